//! The 16550A UART on COM1 (from vm-superio), wired to IRQ 4 through an
//! irqfd, with its output going to the console sink.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

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
#[derive(Clone, Default)]
pub struct Console {
    stdout: bool,
    file: Option<Arc<Mutex<LineWriter<File>>>>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl Console {
    /// Output to the terminal.
    pub fn stdout() -> Self {
        Console {
            stdout: true,
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
        self.file = Some(Arc::new(Mutex::new(LineWriter::new(file))));
        self
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stdout {
            // Line-buffered: a line appears as soon as the guest ends it.
            io::stdout().lock().write_all(buf)?;
        }
        if let Some(file) = &self.file {
            file.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(buf)?;
        }
        if let Some(capture) = &self.capture {
            capture
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    /// The UART flushes after every byte; the sinks are line-buffered
    /// instead, so a flush here waits for the end of the line.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// Writes out whatever partial line is still buffered.
    pub fn finish(&self) {
        if self.stdout {
            let _ = io::stdout().lock().flush();
        }
        if let Some(file) = &self.file {
            let _ = file.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
    }
}
