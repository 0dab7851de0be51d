//! The 16550A UART on COM1 (from vm-superio), wired to IRQ 4 through an
//! irqfd, with its output going to the console sink.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::config::SeccompMode;
use crate::seccomp::{self, ThreadKind};

/// Raises the UART's interrupt line through the irqfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice(Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>);

impl SerialDevice {
    pub fn new(irq: EventFd, console: Console) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), console))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.0.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for &byte in data {
            if let Err(e) = self.0.write(offset as u8, byte) {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

/// Where the guest's console output goes: the terminal, a log file, a
/// capture buffer (tests), or several of them.
///
/// The terminal and the log file are each written by a thread of their
/// own, fed through a bounded queue: a vCPU that writes to the UART must
/// never block on a stalled terminal, pipe or FIFO (it could then not be
/// stopped). When a queue is full, output is dropped and counted. A capture
/// buffer is bounded too.
#[derive(Clone, Default)]
pub struct Console {
    stdout: Option<Arc<Terminal>>,
    file: Option<Arc<Terminal>>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
}

/// Bytes the terminal backlog holds before output is dropped.
const TERMINAL_BACKLOG: usize = 1 << 20;
/// Largest capture buffer; beyond it output is dropped.
const CAPTURE_MAX: usize = 64 << 20;

#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    /// Bytes queued and bytes written out, ever: a flush waits for the
    /// second to reach the first.
    queued: u64,
    written: u64,
    dropped: u64,
    /// The filter the writer thread is asked to confine itself with, and
    /// then how that went.
    confine: Option<SeccompMode>,
    confined: Option<crate::Result<()>>,
}

/// An output of a console (the terminal, the log file): a backlog the
/// vCPUs append to without ever blocking on I/O, and a thread that writes
/// it out.
struct Terminal {
    backlog: Mutex<Backlog>,
    changed: std::sync::Condvar,
    /// What the output is, for messages.
    what: &'static str,
}

impl Terminal {
    fn start(what: &'static str, thread: &str, mut out: Box<dyn Write + Send>) -> Arc<Terminal> {
        let terminal = Arc::new(Terminal {
            backlog: Mutex::default(),
            changed: std::sync::Condvar::new(),
            what,
        });
        let weak = Arc::downgrade(&terminal);
        // The thread ends once the last Console holding the terminal is gone.
        let _ = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                while let Some(terminal) = weak.upgrade() {
                    let chunk = {
                        let mut backlog = terminal.lock();
                        if backlog.bytes.is_empty() {
                            let (guard, _) = terminal
                                .changed
                                .wait_timeout(backlog, std::time::Duration::from_millis(200))
                                .unwrap_or_else(|e| e.into_inner());
                            backlog = guard;
                        }
                        if let Some(mode) = backlog.confine.take() {
                            backlog.confined =
                                Some(seccomp::confine_current_thread(ThreadKind::Terminal, mode));
                            terminal.changed.notify_all();
                        }
                        std::mem::take(&mut backlog.bytes)
                    };
                    if !chunk.is_empty() {
                        let _ = out.write_all(&chunk).and_then(|_| out.flush());
                        terminal.lock().written += chunk.len() as u64;
                        terminal.changed.notify_all();
                    }
                }
            });
        terminal
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, buf: &[u8]) {
        let mut backlog = self.lock();
        if backlog.bytes.len() + buf.len() > TERMINAL_BACKLOG {
            backlog.dropped += buf.len() as u64;
            return;
        }
        backlog.bytes.extend_from_slice(buf);
        backlog.queued += buf.len() as u64;
        drop(backlog);
        // Wake the writer at line ends; it also looks on its own every 200 ms.
        if buf.contains(&b'\n') {
            self.changed.notify_all();
        }
    }

    /// Has the writer thread confine itself with `mode`'s filter, and
    /// waits (a bounded time) for it to say it has.
    fn confine(&self, mode: SeccompMode) -> crate::Result<()> {
        let mut backlog = self.lock();
        backlog.confine = Some(mode);
        backlog.confined = None;
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(result) = backlog.confined.take() {
                return result;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(crate::Error::Host {
                    what: format!("confining the {} writer thread", self.what),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            backlog = self
                .changed
                .wait_timeout(backlog, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits (a bounded time) until everything queued so far is written.
    fn flush(&self) {
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut backlog = self.lock();
        let target = backlog.queued;
        while backlog.written < target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            backlog = self
                .changed
                .wait_timeout(backlog, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if backlog.dropped > 0 {
            tracing::warn!(
                "{} bytes of guest console output were dropped: the {} did not keep up",
                backlog.dropped,
                self.what
            );
        }
    }
}

impl Console {
    /// Output to the terminal.
    pub fn stdout() -> Self {
        Console {
            stdout: Some(Terminal::start(
                "terminal",
                "rtvm-console",
                Box::new(io::stdout()),
            )),
            ..Default::default()
        }
    }

    /// Output to a buffer the caller reads.
    pub fn capture(buf: Arc<Mutex<Vec<u8>>>) -> Self {
        Console {
            capture: Some(buf),
            ..Default::default()
        }
    }

    /// Also keep a copy of everything in `buf`.
    pub fn with_capture(mut self, buf: Arc<Mutex<Vec<u8>>>) -> Self {
        self.capture = Some(buf);
        self
    }

    /// Also write everything to `file`.
    pub fn with_file(mut self, file: File) -> Self {
        self.file = Some(Terminal::start(
            "serial log",
            "rtvm-serial-log",
            Box::new(file),
        ));
        self
    }

    /// Has the threads that write the console out confine themselves with
    /// `mode`'s seccomp filter (they need no new resources from here on).
    pub fn confine(&self, mode: SeccompMode) -> crate::Result<()> {
        if mode == SeccompMode::Off {
            return Ok(());
        }
        for terminal in [&self.stdout, &self.file].into_iter().flatten() {
            terminal.confine(mode)?;
        }
        Ok(())
    }

    /// Writes out whatever is still queued or buffered.
    pub fn finish(&self) {
        if let Some(terminal) = &self.stdout {
            terminal.flush();
        }
        if let Some(file) = &self.file {
            file.flush();
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(terminal) = &self.stdout {
            terminal.write(buf);
        }
        if let Some(file) = &self.file {
            file.write(buf);
        }
        if let Some(capture) = &self.capture {
            let mut capture = capture.lock().unwrap_or_else(|e| e.into_inner());
            let room = CAPTURE_MAX.saturating_sub(capture.len());
            capture.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        Ok(buf.len())
    }

    /// The UART flushes after every byte; the sinks are line-buffered
    /// instead, so a flush here waits for the end of the line.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #12: a serial log nobody drains (a FIFO without a reader, a
    /// stalled disk) never blocks the vCPU writing to the UART.
    #[test]
    fn a_stalled_serial_log_never_blocks_the_writer() {
        let fifo = std::env::temp_dir().join(format!("rtvm-stalled-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a plain mode.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        // Read and write ends both ours, and the reader never reads: the
        // pipe fills after 64 KiB and a write to it would block.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        std::fs::remove_file(&fifo).unwrap();
        let mut console = Console::default().with_file(file);
        let (done, wrote) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = [b'x'; 1023];
            for _ in 0..4096 {
                console.write_all(&line).unwrap();
                console.write_all(b"\n").unwrap();
            }
            let _ = done.send(());
        });
        wrote
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("4 MiB of console output blocked on a stalled log");
    }
}
