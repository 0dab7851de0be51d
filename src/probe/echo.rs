//! A UDP echo server: sends every datagram back to where it came from.
//! The probe's own target for measuring the host path, and the host-side
//! reference `rtvm bench net` compares a guest's echo against.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rtvm_vmm::config::SeccompMode;
use rtvm_vmm::seccomp::{self, ThreadKind};

/// How often a blocked server looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// Echoes datagrams on `socket` from the calling thread until `stop` is set
/// (seen within 20 ms), returning how many it echoed. Runs on the caller's
/// thread so the caller chooses its scheduling (e.g. SCHED_FIFO) first;
/// the thread then confines itself to the echo's seccomp filter, since it
/// answers whatever arrives. Changes the socket's read timeout.
pub fn serve_echo(socket: &UdpSocket, stop: &AtomicBool) -> io::Result<u64> {
    socket.set_read_timeout(Some(STOP_CHECK))?;
    seccomp::confine_current_thread(ThreadKind::Probe, SeccompMode::Enforce)
        .map_err(io::Error::other)?;
    let mut buf = [0u8; 65536];
    let mut echoed = 0;
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        // Only answer the benchmarking range: the server never becomes a
        // way to send anywhere else.
        let SocketAddr::V4(peer) = from else { continue };
        if !super::net::in_bench_net(*peer.ip()) {
            continue;
        }
        match socket.send_to(&buf[..len], from) {
            Ok(_) => echoed += 1,
            // A full queue or a vanished peer loses one echo, like a network would.
            Err(e) => tracing::debug!("echo to {from}: {e}"),
        }
    }
    Ok(echoed)
}

/// [`serve_echo`] on a thread of its own, stopped and joined on drop.
pub struct EchoServer {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl EchoServer {
    /// Binds `addr` (in 198.18.0.0/15; port 0 picks one) and starts echoing.
    pub fn start(addr: SocketAddrV4) -> Result<EchoServer, String> {
        if !super::net::in_bench_net(*addr.ip()) {
            return Err(format!(
                "echo server address {addr} is outside 198.18.0.0/15"
            ));
        }
        let socket =
            UdpSocket::bind(addr).map_err(|e| format!("binding the echo server to {addr}: {e}"))?;
        let addr = match socket.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            _ => addr,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rtvm-echo".into())
            .spawn(move || serve_echo(&socket, &flag))
            .map_err(|e| format!("starting the echo server: {e}"))?;
        Ok(EchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Stops it and returns how many datagrams it echoed.
    pub fn stop(mut self) -> Result<u64, String> {
        self.finish()
    }

    fn finish(&mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(n))) => Ok(n),
            Some(Ok(Err(e))) => Err(format!("echo server on {}: {e}", self.addr)),
            Some(Err(_)) => Err("the echo server panicked".into()),
            None => Ok(0),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
