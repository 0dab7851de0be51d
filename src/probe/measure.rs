//! The measurement: timestamped UDP requests from inside the probe's
//! namespace, replies matched by sequence number, round trips from kernel
//! software timestamps (`SO_TIMESTAMPING`).
//!
//! Round trip of one request = RX timestamp of its reply (taken by the
//! kernel as the reply arrived on the probe's veth end) − TX timestamp of
//! the request (taken by the veth driver as it left, read back from the
//! socket's error queue). Neither includes the probe's own scheduling or
//! system-call time. When the kernel gives no usable TX (or RX) timestamp
//! for a request, that sample falls back to user-space clock readings
//! around `send` and `recvmsg`, and is counted in
//! [`ProbeResult::fallbacks`].

use std::io;

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtvm_vmm::config::SeccompMode;
use rtvm_vmm::seccomp::{self, ThreadKind};
use serde_json::{json, Value};

use super::net::{in_bench_net, NetLayout, ProbeNet};
use super::timestamps::{realtime_ns, recv_msg, set_timestamping};
use crate::report::stats::Stats;

/// Smallest request: magic, run token and sequence number.
pub const MIN_SIZE: usize = 16;
/// Largest request that fits a 1500-byte MTU unfragmented (1500 − 20 − 8).
pub const MAX_SIZE: usize = 1472;

const MAGIC: &[u8; 4] = b"RTVP";
/// Sequence number of the uncounted warm-up requests.
pub(crate) const WARMUP_SEQ: u64 = u64::MAX;
/// Most warm-up requests before measuring.
const WARMUPS: u32 = 5;
/// Longest the probe goes without checking for a stop request.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// When the probe stops sending.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Send for this many seconds.
    Seconds(f64),
    /// Send this many requests.
    Count(u64),
}

/// What to measure; [`ProbeOptions::new`] gives the `rtvm probe` defaults.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Where requests go; must be in 198.18.0.0/15 and, for
    /// [`measure_in`], on the [`ProbeNet`]'s /30.
    pub target: SocketAddrV4,
    /// UDP payload bytes per request, [`MIN_SIZE`]..=[`MAX_SIZE`].
    pub size: usize,
    /// A reply later than this after its request counts as lost.
    pub timeout: Duration,
    /// Requests per second; 0 = closed loop (next request right after the
    /// reply or the timeout).
    pub rate: u32,
    pub limit: Limit,
    /// The /30 that [`measure`] sets up (unused by [`measure_in`]).
    pub layout: NetLayout,
    /// Set to stop early; the probe also stops on SIGINT/SIGTERM once
    /// `rtvm_vmm::signals::install_termination_handlers` has run.
    pub stop: Option<Arc<AtomicBool>>,
    /// Over one TCP connection to an echo server instead of UDP
    /// (`super::tcp`).
    pub tcp: bool,
}

/// A request of `size` bytes with the magic and this run's token; the
/// sequence number (bytes 8..16) is the caller's to fill in.
pub(crate) fn request_header(size: usize) -> Vec<u8> {
    static TOKEN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let token = *TOKEN.get_or_init(|| std::process::id() ^ (realtime_ns() as u32).rotate_left(13));
    let mut request = vec![0x5a_u8; size];
    request[..4].copy_from_slice(MAGIC);
    request[4..8].copy_from_slice(&token.to_le_bytes());
    request
}

impl ProbeOptions {
    /// 64-byte requests to `target`, 1000 per second for 5 s, 100 ms timeout,
    /// on the default 198.18.0.0/30.
    pub fn new(target: SocketAddrV4) -> ProbeOptions {
        ProbeOptions {
            target,
            size: 64,
            timeout: Duration::from_millis(100),
            rate: 1000,
            limit: Limit::Seconds(5.0),
            layout: NetLayout::default(),
            stop: None,
            tcp: false,
        }
    }

    /// Checks the options; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !in_bench_net(*self.target.ip()) {
            return Err(format!(
                "target {} is outside the benchmarking range 198.18.0.0/15: rtvm probe sends nowhere else",
                self.target
            ));
        }
        if self.target.port() == 0 {
            return Err("the target needs a port other than 0".into());
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(format!(
                "request size {} is outside {MIN_SIZE}..={MAX_SIZE} bytes",
                self.size
            ));
        }
        if self.timeout.is_zero() {
            return Err("the reply timeout must be above 0".into());
        }
        if let Limit::Seconds(s) = self.limit {
            if !(s.is_finite() && s > 0.0) {
                return Err(format!("--seconds {s} must be a positive number"));
            }
        }
        Ok(())
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
            || rtvm_vmm::signals::termination_signal().is_some()
    }
}

/// Where the round-trip figures came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timestamps {
    /// Every sample from kernel timestamps.
    Kernel,
    /// Every sample from user-space clock readings.
    User,
    /// Some of each: see [`ProbeResult::fallbacks`].
    Mixed,
}

impl Timestamps {
    pub fn as_str(self) -> &'static str {
        match self {
            Timestamps::Kernel => "kernel",
            Timestamps::User => "user",
            Timestamps::Mixed => "mixed",
        }
    }
}

/// What one probe run measured.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub target: SocketAddrV4,
    /// Requests handed to the kernel.
    pub sent: u64,
    /// Replies back within the timeout (one per request at most).
    pub received: u64,
    /// `sent − received`: requests without a reply in time.
    pub lost: u64,
    /// Replies that came after their timeout (counted in `lost`).
    pub late: u64,
    /// Round trip of each received request, in ns, in sending order.
    pub rtt_ns: Vec<u64>,
    /// Statistics of `rtt_ns`; `None` without replies.
    pub rtt: Option<Stats>,
    /// The same round trips by user-space clock readings around `send` and
    /// `recvmsg`: the kernel figures plus the probe's own system-call and
    /// wake-up time, for comparison.
    pub rtt_user: Option<Stats>,
    pub timestamps: Timestamps,
    /// Samples that used user-space clock readings instead of kernel timestamps.
    pub fallbacks: u64,
    /// Sends the kernel refused (full buffer, no route to host…).
    pub send_errors: u64,
    /// The first of those errors.
    pub send_error: Option<String>,
    /// ICMP "port unreachable" reports: nothing listened at the target.
    pub refused: u64,
    /// Time from the first request to the end.
    pub elapsed: Duration,
    /// The run stopped early (stop flag or termination signal).
    pub interrupted: bool,
}

impl ProbeResult {
    /// The JSON of `rtvm probe --json`, less the `machine` object.
    pub fn to_json(&self) -> Value {
        json!({
            "rtt": self.rtt.as_ref().map(Stats::to_json),
            "rtt_user": self.rtt_user.as_ref().map(Stats::to_json),
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost,
            "late": self.late,
            "timestamps": self.timestamps.as_str(),
            "fallbacks": self.fallbacks,
            "send_errors": self.send_errors,
            "send_error": self.send_error,
            "refused": self.refused,
            "target": self.target.to_string(),
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}

/// Measures round-trip latency to `opts.target` from a network namespace
/// of its own: sets up a [`ProbeNet`] with `opts.layout`, probes, and
/// removes the namespace again. The target must already be listening on
/// the layout's host address (use [`measure_in`] to set the network up
/// first).
pub fn measure(opts: &ProbeOptions) -> Result<ProbeResult, String> {
    opts.validate()?;
    let net = ProbeNet::create(opts.layout)?;
    measure_in(&net, opts)
}

/// Measures round-trip latency to `opts.target` from the namespace of
/// `net`, which the caller made (and may have had the target bind to
/// [`ProbeNet::host_addr`] meanwhile). `opts.layout` is ignored.
pub fn measure_in(net: &ProbeNet, opts: &ProbeOptions) -> Result<ProbeResult, String> {
    opts.validate()?;
    if !net.reaches(*opts.target.ip()) {
        return Err(format!(
            "target {} is not on the probe's network {}/30, and nothing is routed beyond it",
            opts.target,
            net.layout().subnet()
        ));
    }
    if opts.tcp {
        return net.run_inside(|| super::tcp::run(opts));
    }
    let probe_addr = net.probe_addr();
    net.run_inside(|| {
        let prober = Prober::new(opts, probe_addr)?;
        // It reads whatever comes back from the guest: from here on, its
        // socket and nothing else.
        seccomp::confine_current_thread(ThreadKind::Probe, SeccompMode::Enforce)
            .map_err(|e| e.to_string())?;
        prober.run()
    })
}

/// Waits up to `timeout` for `events` on `fd` (ppoll: what the probe's
/// seccomp filter allows); whether they came. A signal ends the wait early
/// with `false`.
pub(crate) fn poll_one(fd: i32, events: i16, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one live pollfd, a live timespec, no signal mask change.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// One request's record.
struct Slot {
    sent: Instant,
    /// CLOCK_REALTIME just before `send` (kernel timestamps use that clock).
    user_tx_ns: i64,
    kernel_tx_ns: Option<i64>,
    reply: Option<Reply>,
}

struct Reply {
    user_rx_ns: i64,
    kernel_rx_ns: Option<i64>,
}

struct Prober<'a> {
    opts: &'a ProbeOptions,
    socket: UdpSocket,
    kernel_timestamping: bool,
    token: u32,
    slots: Vec<Slot>,
    late: u64,
    send_errors: u64,
    send_error: Option<String>,
    refused: u64,
    /// Warm-up requests sent (they take the first OPT_IDs).
    warmups: u32,
    /// Warm-up replies received, and whether the last had a kernel RX stamp.
    warmup_replies: u32,
    warmup_rx_kernel: bool,
}

impl<'a> Prober<'a> {
    /// The socket, made on the calling thread (inside the namespace).
    fn new(opts: &'a ProbeOptions, probe_addr: std::net::Ipv4Addr) -> Result<Self, String> {
        let socket = UdpSocket::bind((probe_addr, 0))
            .map_err(|e| format!("binding the probe socket to {probe_addr}: {e}"))?;
        socket
            .connect(opts.target)
            .map_err(|e| format!("connecting the probe socket to {}: {e}", opts.target))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("probe socket: {e}"))?;
        let full = libc::SOF_TIMESTAMPING_SOFTWARE
            | libc::SOF_TIMESTAMPING_RX_SOFTWARE
            | libc::SOF_TIMESTAMPING_TX_SOFTWARE
            | libc::SOF_TIMESTAMPING_OPT_ID
            | libc::SOF_TIMESTAMPING_OPT_TSONLY;
        let rx_only = libc::SOF_TIMESTAMPING_SOFTWARE | libc::SOF_TIMESTAMPING_RX_SOFTWARE;
        let kernel_timestamping = match set_timestamping(socket.as_raw_fd(), full) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("SO_TIMESTAMPING with TX timestamps refused ({e}); RX only");
                set_timestamping(socket.as_raw_fd(), rx_only).is_ok()
            }
        };
        // Send on time: the default 50 µs timer slack would skew the rate.
        // SAFETY: prctl(2) with plain integer arguments, this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        let request = request_header(MIN_SIZE);
        let token = u32::from_le_bytes(request[4..8].try_into().expect("4 bytes"));
        Ok(Prober {
            opts,
            socket,
            kernel_timestamping,
            token,
            slots: Vec::new(),
            late: 0,
            send_errors: 0,
            send_error: None,
            refused: 0,
            warmups: 0,
            warmup_replies: 0,
            warmup_rx_kernel: false,
        })
    }

    fn run(mut self) -> Result<ProbeResult, String> {
        let opts = self.opts;
        let mut request = request_header(opts.size);
        self.warm_up(&mut request)?;
        let start = Instant::now();
        let send_until = match opts.limit {
            Limit::Seconds(s) => Some(start + Duration::from_secs_f64(s)),
            Limit::Count(_) => None,
        };
        let max_count = match opts.limit {
            Limit::Count(n) => n,
            Limit::Seconds(_) => u64::MAX,
        };
        let period =
            (opts.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / u64::from(opts.rate)));
        let mut next_send = start;
        // First request neither answered nor timed out yet.
        let mut oldest = 0;
        let mut sending = true;
        let mut interrupted = false;
        loop {
            if opts.stopped() {
                interrupted = true;
                break;
            }
            self.read_replies()?;
            self.read_tx_timestamps()?;
            let now = Instant::now();
            if sending
                && (self.slots.len() as u64 >= max_count || send_until.is_some_and(|t| now >= t))
            {
                sending = false;
            }
            while oldest < self.slots.len()
                && (self.slots[oldest].reply.is_some()
                    || now.duration_since(self.slots[oldest].sent) > opts.timeout)
            {
                oldest += 1;
            }
            if !sending && oldest == self.slots.len() {
                break;
            }
            // Open loop: on schedule; closed loop: when nothing is outstanding.
            let due = match period {
                Some(_) => now >= next_send,
                None => oldest == self.slots.len() && now >= next_send,
            };
            if sending && due {
                let seq = self.slots.len() as u64;
                request[8..16].copy_from_slice(&seq.to_le_bytes());
                let user_tx_ns = realtime_ns();
                let sent = Instant::now();
                match self.socket.send(&request) {
                    Ok(_) => self.slots.push(Slot {
                        sent,
                        user_tx_ns,
                        kernel_tx_ns: None,
                        reply: None,
                    }),
                    Err(e) => {
                        self.send_error(&e);
                        if period.is_none() {
                            // Try again a little later rather than spin on the error.
                            next_send = now + Duration::from_millis(1);
                        }
                    }
                }
                if let Some(period) = period {
                    next_send += period;
                    // Behind by more than a period (the host stole the
                    // CPU): carry on from now instead of sending a burst.
                    if next_send + period < now {
                        next_send = now;
                    }
                }
                continue;
            }
            let mut wake = now + STOP_CHECK;
            // (Not due, so a send time that matters lies ahead.)
            if sending && (period.is_some() || oldest == self.slots.len()) {
                wake = wake.min(next_send);
            }
            if let Some(slot) = self.slots.get(oldest) {
                wake = wake.min(slot.sent + opts.timeout + Duration::from_micros(1));
            }
            self.wait(wake.saturating_duration_since(now))?;
        }
        let elapsed = start.elapsed();
        // Replies and TX timestamps of the last requests may still be queued.
        self.read_replies()?;
        self.read_tx_timestamps()?;
        Ok(self.result(elapsed, interrupted))
    }

    /// Sends uncounted requests, one at a time, until one comes back with
    /// a kernel RX timestamp (or [`WARMUPS`] were tried). They resolve the
    /// target's ARP entry, and give the kernel time to switch RX
    /// timestamping on (it does that asynchronously): otherwise request 0
    /// would carry an ARP round trip and no RX timestamp.
    fn warm_up(&mut self, request: &mut [u8]) -> Result<(), String> {
        request[8..16].copy_from_slice(&WARMUP_SEQ.to_le_bytes());
        for _ in 0..WARMUPS {
            let replies = self.warmup_replies;
            match self.socket.send(request) {
                Ok(_) => self.warmups += 1,
                Err(e) => self.send_error(&e),
            }
            let deadline = Instant::now() + self.opts.timeout;
            while self.warmup_replies == replies {
                let now = Instant::now();
                if now >= deadline || self.opts.stopped() {
                    break;
                }
                self.wait((deadline - now).min(STOP_CHECK))?;
                self.read_replies()?;
            }
            self.read_tx_timestamps()?;
            if self.opts.stopped()
                || (self.warmup_replies > replies
                    && (self.warmup_rx_kernel || !self.kernel_timestamping))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!(
            "{} warm-up requests, {} replies, kernel RX timestamp: {}",
            self.warmups,
            self.warmup_replies,
            self.warmup_rx_kernel
        );
        // Warm-up sends and errors are not part of the measurement.
        self.send_errors = 0;
        self.send_error = None;
        self.refused = 0;
        Ok(())
    }

    fn send_error(&mut self, e: &io::Error) {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            self.refused += 1;
        } else {
            if self.send_error.is_none() {
                tracing::debug!("probe send: {e}");
                self.send_error = Some(e.to_string());
            }
            self.send_errors += 1;
        }
    }

    /// Waits up to `timeout` for a reply or a TX timestamp.
    fn wait(&self, timeout: Duration) -> Result<(), String> {
        poll_one(self.socket.as_raw_fd(), libc::POLLIN, timeout)
            .map(drop)
            .map_err(|e| format!("waiting for replies: {e}"))
    }

    /// Takes every queued reply, matching it to its request.
    fn read_replies(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 2048];
        loop {
            let msg = match recv_msg(self.socket.as_raw_fd(), &mut buf, 0) {
                Ok(msg) => msg,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.refused += 1;
                    continue;
                }
                Err(e) => return Err(format!("receiving replies: {e}")),
            };
            let user_rx_ns = realtime_ns();
            let data = &buf[..msg.len.min(buf.len())];
            if data.len() < MIN_SIZE
                || &data[..4] != MAGIC
                || data[4..8] != self.token.to_le_bytes()
            {
                continue;
            }
            let seq = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
            if seq == WARMUP_SEQ {
                self.warmup_replies += 1;
                self.warmup_rx_kernel = msg.timestamp_ns.is_some();
                continue;
            }
            let Some(slot) = self.slots.get_mut(seq as usize) else {
                continue;
            };
            if slot.reply.is_some() {
                continue; // a duplicate
            }
            // Judged by when the reply arrived (its kernel RX timestamp, on
            // the same clock as `user_tx_ns`), not by when this thread got
            // round to reading it.
            let arrived_ns = msg.timestamp_ns.unwrap_or(user_rx_ns);
            if arrived_ns - slot.user_tx_ns > self.opts.timeout.as_nanos() as i64 {
                self.late += 1;
                continue;
            }
            slot.reply = Some(Reply {
                user_rx_ns,
                kernel_rx_ns: msg.timestamp_ns,
            });
        }
    }

    /// Takes every TX timestamp from the error queue.
    fn read_tx_timestamps(&mut self) -> Result<(), String> {
        if !self.kernel_timestamping {
            return Ok(());
        }
        let mut buf = [0u8; 64];
        loop {
            let msg = match recv_msg(self.socket.as_raw_fd(), &mut buf, libc::MSG_ERRQUEUE) {
                Ok(msg) => msg,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading TX timestamps: {e}")),
            };
            if let (Some(id), Some(ts)) = (msg.tx_id, msg.timestamp_ns) {
                // OPT_ID numbers the datagrams sent on this socket from 0:
                // the warm-ups, then the requests in sequence.
                let seq = id.checked_sub(self.warmups).map(|s| s as usize);
                if let Some(slot) = seq.and_then(|s| self.slots.get_mut(s)) {
                    slot.kernel_tx_ns = Some(ts);
                }
            }
        }
    }

    fn result(self, elapsed: Duration, interrupted: bool) -> ProbeResult {
        let timeout_ns = self.opts.timeout.as_nanos() as i64;
        let mut rtt_ns = Vec::with_capacity(self.slots.len());
        let mut user_ns = Vec::with_capacity(self.slots.len());
        let mut fallbacks = 0;
        for (seq, slot) in self.slots.iter().enumerate() {
            let Some(reply) = &slot.reply else { continue };
            let user = reply.user_rx_ns.saturating_sub(slot.user_tx_ns).max(0) as u64;
            user_ns.push(user);
            // A kernel pair is used only when it is plausible: the TX stamp
            // within the send window, before the reply's arrival.
            let kernel = match (slot.kernel_tx_ns, reply.kernel_rx_ns) {
                (Some(tx), Some(rx))
                    if tx >= slot.user_tx_ns && tx <= slot.user_tx_ns + timeout_ns && rx >= tx =>
                {
                    Some((rx - tx) as u64)
                }
                _ => None,
            };
            rtt_ns.push(kernel.unwrap_or_else(|| {
                tracing::debug!(
                    "request {seq}: user-space fallback; after the user-space TX time: kernel TX {:?}, \
                     kernel RX {:?}, user RX {} ns",
                    slot.kernel_tx_ns.map(|t| t - slot.user_tx_ns),
                    reply.kernel_rx_ns.map(|t| t - slot.user_tx_ns),
                    reply.user_rx_ns - slot.user_tx_ns
                );
                fallbacks += 1;
                user
            }));
        }
        let received = rtt_ns.len() as u64;
        let sent = self.slots.len() as u64;
        let timestamps = if received == 0 {
            if self.kernel_timestamping {
                Timestamps::Kernel
            } else {
                Timestamps::User
            }
        } else if fallbacks == 0 {
            Timestamps::Kernel
        } else if fallbacks == received {
            Timestamps::User
        } else {
            Timestamps::Mixed
        };
        ProbeResult {
            target: self.opts.target,
            sent,
            received,
            lost: sent - received,
            late: self.late,
            rtt: Stats::from_ns(&rtt_ns),
            rtt_user: Stats::from_ns(&user_ns),
            rtt_ns,
            timestamps,
            fallbacks,
            send_errors: self.send_errors,
            send_error: self.send_error,
            refused: self.refused,
            elapsed,
            interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_outside_the_rules_are_refused() {
        let ok = ProbeOptions::new("198.18.0.1:7000".parse().unwrap());
        assert_eq!(ok.validate(), Ok(()));
        for target in ["10.0.0.1:7", "8.8.8.8:53", "198.20.0.1:7000"] {
            let o = ProbeOptions::new(target.parse().unwrap());
            assert!(
                o.validate().unwrap_err().contains("198.18.0.0/15"),
                "{target}"
            );
        }
        let mut o = ok.clone();
        o.size = MAX_SIZE + 1;
        assert!(o.validate().is_err());
        o.size = MIN_SIZE - 1;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.limit = Limit::Seconds(0.0);
        assert!(o.validate().is_err());
    }
}
