//! The probe over TCP (`rtvm probe --tcp`): one connection to an echo
//! server, each request written whole and read back whole before the next
//! (a stream has no datagrams to match out of order). Round trips come from
//! user-space clock readings around the exchange: TCP gives no per-request
//! kernel timestamps a reply could be matched with. A request without its
//! echo within the timeout is lost, and so is every later one: the stream
//! is out of step from there.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rtvm_vmm::config::SeccompMode;
use rtvm_vmm::seccomp::{self, ThreadKind};

use super::measure::{
    poll_one, request_header, Limit, ProbeOptions, ProbeResult, Timestamps, WARMUP_SEQ,
};
use crate::report::stats::Stats;

/// Longest the connection may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits up to `timeout` for `events` on the connection.
fn wait(fd: i32, events: i16, timeout: Duration) -> Result<bool, String> {
    poll_one(fd, events, timeout).map_err(|e| format!("waiting on the connection: {e}"))
}

/// Sleeps `d` (with ppoll: what the probe's filter allows).
fn sleep(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: no descriptors, a live timespec.
    unsafe { libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) };
}

/// One exchange: `request` out, the same bytes back, by `deadline`.
/// `Ok(false)`: the deadline passed first.
fn exchange(stream: &TcpStream, request: &[u8], deadline: Instant) -> Result<bool, String> {
    let fd = stream.as_raw_fd();
    let mut sent = 0;
    while sent < request.len() {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // SAFETY: sending from a live buffer.
        let n = unsafe {
            libc::send(
                fd,
                request[sent..].as_ptr().cast(),
                request.len() - sent,
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => {
                wait(fd, libc::POLLOUT, deadline - now)?;
            }
            e if e.kind() == io::ErrorKind::Interrupted => {}
            e => return Err(format!("sending to the echo server: {e}")),
        }
    }
    let mut reply = vec![0u8; request.len()];
    let mut got = 0;
    while got < reply.len() {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // SAFETY: receiving into a live buffer.
        let n = unsafe { libc::recv(fd, reply[got..].as_mut_ptr().cast(), reply.len() - got, 0) };
        if n == 0 {
            return Err("the echo server closed the connection".into());
        }
        if n > 0 {
            got += n as usize;
            continue;
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => {
                wait(fd, libc::POLLIN, deadline - now)?;
            }
            e if e.kind() == io::ErrorKind::Interrupted => {}
            e => return Err(format!("receiving from the echo server: {e}")),
        }
    }
    if reply != request {
        return Err("the echo server sent back other bytes than it was sent".into());
    }
    Ok(true)
}

/// Measures, inside the probe's namespace.
pub fn run(opts: &ProbeOptions) -> Result<ProbeResult, String> {
    let target = SocketAddr::V4(opts.target);
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT.max(opts.timeout))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_nonblocking(true))
        .map_err(|e| format!("probe connection: {e}"))?;
    // It reads whatever comes back from the guest: from here on, its
    // connection and nothing else.
    seccomp::confine_current_thread(ThreadKind::Probe, SeccompMode::Enforce)
        .map_err(|e| e.to_string())?;

    let mut request = request_header(opts.size);
    request[8..16].copy_from_slice(&WARMUP_SEQ.to_le_bytes());
    // The first exchange sets the connection up end to end (the server's
    // first wait, slow starts): uncounted.
    if !exchange(&stream, &request, Instant::now() + opts.timeout)? {
        return Err(format!("no echo from {target} within the timeout"));
    }

    let start = Instant::now();
    let period =
        (opts.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / u64::from(opts.rate)));
    let mut rtt_ns = Vec::new();
    let mut sent = 0u64;
    let mut next = start;
    let mut interrupted = false;
    loop {
        let more = match opts.limit {
            Limit::Count(n) => sent < n,
            Limit::Seconds(s) => start.elapsed() < Duration::from_secs_f64(s),
        };
        if !more {
            break;
        }
        if opts.stopped() {
            interrupted = true;
            break;
        }
        if let Some(period) = period {
            let now = Instant::now();
            if next > now {
                sleep(next - now);
            }
            next += period;
        }
        request[8..16].copy_from_slice(&sent.to_le_bytes());
        sent += 1;
        let t0 = Instant::now();
        if !exchange(&stream, &request, t0 + opts.timeout)? {
            tracing::debug!("request {} had no echo within the timeout", sent - 1);
            // Out of step from here: what the count still wanted is lost too.
            if let Limit::Count(n) = opts.limit {
                sent = n;
            }
            break;
        }
        rtt_ns.push(t0.elapsed().as_nanos() as u64);
    }
    let received = rtt_ns.len() as u64;
    Ok(ProbeResult {
        target: opts.target,
        sent,
        received,
        lost: sent - received,
        late: 0,
        rtt: Stats::from_ns(&rtt_ns),
        rtt_user: Stats::from_ns(&rtt_ns),
        rtt_ns,
        timestamps: Timestamps::User,
        fallbacks: received,
        send_errors: 0,
        send_error: None,
        refused: 0,
        elapsed: start.elapsed(),
        interrupted,
    })
}
