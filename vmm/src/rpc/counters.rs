//! What a VM's calls leave behind for the host to read: call counters and
//! the sample streams benchmarks collect.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use rtvm_abi::vmrpc::{self, Call, Status};

/// Most samples one stream keeps; more is refused with `NoResources`, so a
/// guest cannot grow the VMM's memory without bound.
pub const STREAM_CAPACITY: usize = 4 << 20;

/// Sample streams guests hand to the host with `Call::Report`, and the
/// host's own record of each long-poll wake-up, stage by stage.
pub struct SampleStreams {
    streams: Mutex<Vec<Vec<u64>>>,
    /// In chunks that never grow: recording happens between a timestamp
    /// and KVM_RUN, where a vector's doubling (a copy of everything so far)
    /// would show up as a late wake-up of our own making.
    wakes: Mutex<Vec<Vec<WakeStages>>>,
}

/// Wake-ups per chunk of the record.
const WAKES_CHUNK: usize = 4096;

impl Default for SampleStreams {
    fn default() -> Self {
        SampleStreams {
            streams: Mutex::new(vec![Vec::new(); vmrpc::STREAMS as usize]),
            wakes: Mutex::default(),
        }
    }
}

/// One periodic long-poll wait (`WaitNext`) as the host served it, in host
/// CLOCK_MONOTONIC ns: where each stage between the deadline and the guest
/// running again ended. With the guest's own arrival time, this says which
/// stage made a late wake-up late.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeStages {
    /// The vCPU that waited.
    pub vcpu: usize,
    /// The task's deadline.
    pub deadline: u64,
    /// When the host timer was armed to fire: the deadline less the advance.
    pub wake_at: u64,
    /// When the vCPU thread ran again after its park.
    pub woke: u64,
    /// When the answer was ready (after the advance spin, if any).
    pub returned: u64,
    /// When the vCPU thread entered KVM_RUN again.
    pub entered: u64,
    /// When the guest first read the time back in the guest, before any
    /// spin of its own to the deadline: told with its next wait (the
    /// feedback of an early return); `None` without one.
    pub arrived: Option<u64>,
}

/// Most wake-ups recorded per VM (a 10-minute run at 1 kHz is 600,000).
pub const WAKES_CAPACITY: usize = 4 << 20;

impl SampleStreams {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to `stream` (< `vmrpc::STREAMS`); returns its length.
    pub fn append(&self, stream: usize, samples: &[u64]) -> Result<u64, Status> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let s = streams.get_mut(stream).ok_or(Status::BadArgument)?;
        if s.len() + samples.len() > STREAM_CAPACITY {
            return Err(Status::NoResources);
        }
        s.extend_from_slice(samples);
        Ok(s.len() as u64)
    }

    /// Makes room for the next [`SampleStreams::record_wake`], so that
    /// recording allocates nothing: called before a wait, where the time
    /// it takes is absorbed by the wait.
    pub fn prepare_wake(&self) {
        let mut wakes = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
        let full = wakes.last().is_none_or(|c| c.len() == c.capacity());
        if full && wakes.len() * WAKES_CHUNK < WAKES_CAPACITY {
            wakes.push(Vec::with_capacity(WAKES_CHUNK));
        }
    }

    /// Records one wake-up and says where it went (for
    /// [`SampleStreams::set_arrival`]); without room prepared (beyond
    /// [`WAKES_CAPACITY`]) the record stops growing.
    pub fn record_wake(&self, wake: WakeStages) -> Option<usize> {
        let mut wakes = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
        let chunks = wakes.len();
        let chunk = wakes.last_mut().filter(|c| c.len() < c.capacity())?;
        chunk.push(wake);
        Some((chunks - 1) * WAKES_CHUNK + chunk.len() - 1)
    }

    /// Completes recorded wake-up `index` with the guest's arrival, `ns`
    /// after its deadline (signed).
    pub fn set_arrival(&self, index: usize, after_deadline: i64) {
        let mut wakes = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
        let w = wakes
            .get_mut(index / WAKES_CHUNK)
            .and_then(|c| c.get_mut(index % WAKES_CHUNK));
        if let Some(w) = w {
            w.arrived = Some(w.deadline.saturating_add_signed(after_deadline));
        }
    }

    /// Takes the recorded wake-ups out.
    pub fn take_wakes(&self) -> Vec<WakeStages> {
        std::mem::take(&mut *self.wakes.lock().unwrap_or_else(|e| e.into_inner())).concat()
    }

    /// Takes the samples of `stream` out.
    pub fn take(&self, stream: usize) -> Vec<u64> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .get_mut(stream)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Call numbers below this are counted one by one (all of today's are).
const COUNTED_CALLS: usize = 64;

/// What the VMRPC servers of one VM have served, shared by its vCPUs:
/// cheap enough (relaxed atomics) to stay on always.
pub struct CallCounters {
    by_number: [AtomicU64; COUNTED_CALLS],
    refused_by_number: [AtomicU64; COUNTED_CALLS],
    refused: AtomicU64,
    long_polls: AtomicU64,
    io_parks: [AtomicU64; rtvm_abi::MAX_VCPUS],
    lateness: LatenessCounts,
}

/// Upper bounds (µs, inclusive) of the buckets of long-poll lateness: how
/// long after its deadline a timer wait handed control back. One bucket
/// more counts the rest.
pub const LATENESS_BOUNDS_US: [u64; 12] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 5_000, 20_000];

#[derive(Default)]
struct LatenessCounts {
    buckets: [AtomicU64; LATENESS_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

/// A snapshot of the long polls' lateness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    /// Waits per bucket of [`LATENESS_BOUNDS_US`], the last one unbounded
    /// (not cumulative).
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl Lateness {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// A snapshot of [`CallCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls by kind, in call-number order; only those made at least once.
    pub calls: Vec<(Call, u64)>,
    /// Calls answered with a status other than `Ok`.
    pub refused: u64,
    /// Timer waits (`Sleep`, `SleepUntil`, `WaitNext`) served as long polls:
    /// the calling vCPU parked in the host until its deadline.
    pub long_polls: u64,
    /// Calls answered with a status other than `Ok`, by kind (only those
    /// refused at least once).
    pub refused_by_call: Vec<(Call, u64)>,
    /// How late the timer long polls handed control back.
    pub lateness: Lateness,
    /// By vCPU (up to the last that parked): how often socket calls parked
    /// it in the host waiting for I/O (a receive, accept or poll long
    /// poll; a send or connect waiting for the network).
    pub io_parks: Vec<u64>,
}

impl Default for CallCounters {
    fn default() -> Self {
        CallCounters {
            by_number: std::array::from_fn(|_| AtomicU64::new(0)),
            refused_by_number: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: AtomicU64::new(0),
            long_polls: AtomicU64::new(0),
            io_parks: std::array::from_fn(|_| AtomicU64::new(0)),
            lateness: LatenessCounts::default(),
        }
    }
}

impl CallCounters {
    /// Counts one answered call: its number as the guest wrote it (known
    /// or not), and how it went.
    pub fn served(&self, number: u32, call: Option<Call>, ok: bool) {
        if let Some(count) = self.by_number.get(number as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = self.refused_by_number.get(number as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        } else if call.is_some_and(Call::is_long_poll) {
            self.long_polls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `parks` waits for I/O by one socket call of `vcpu`.
    pub fn io_parked(&self, vcpu: usize, parks: u64) {
        if let Some(count) = self.io_parks.get(vcpu).filter(|_| parks > 0) {
            count.fetch_add(parks, Ordering::Relaxed);
        }
    }

    /// Counts one timer long poll that handed control back `late_ns`
    /// after its deadline.
    pub fn long_poll_late(&self, late_ns: u64) {
        let us = late_ns.div_ceil(1_000);
        let bucket = LATENESS_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENESS_BOUNDS_US.len());
        self.lateness.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.lateness.sum_ns.fetch_add(late_ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CallStats {
        let mut io_parks: Vec<u64> = self
            .io_parks
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        while io_parks.last() == Some(&0) {
            io_parks.pop();
        }
        CallStats {
            calls: (0..COUNTED_CALLS as u32)
                .filter_map(|n| {
                    let count = self.by_number[n as usize].load(Ordering::Relaxed);
                    Some((Call::from_u32(n)?, count)).filter(|_| count > 0)
                })
                .collect(),
            refused: self.refused.load(Ordering::Relaxed),
            refused_by_call: (0..COUNTED_CALLS as u32)
                .filter_map(|n| {
                    let count = self.refused_by_number[n as usize].load(Ordering::Relaxed);
                    Some((Call::from_u32(n)?, count)).filter(|_| count > 0)
                })
                .collect(),
            lateness: Lateness {
                buckets: self
                    .lateness
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
                sum_ns: self.lateness.sum_ns.load(Ordering::Relaxed),
            },
            long_polls: self.long_polls.load(Ordering::Relaxed),
            io_parks,
        }
    }
}

/// How many warnings about refused calls one VM may log per window: a
/// guest must not be able to flood the host's log. The rest go to debug
/// and are counted, and the next warning says how many were left out.
#[derive(Default)]
pub struct WarnBudget {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    start_ns: u64,
    logged: u32,
    left_out: u64,
}

/// Whether a warning may be logged now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warn {
    /// Log it, saying how many were left out since the last one logged.
    Log { left_out: u64 },
    /// Over the budget: debug only.
    Quiet,
}

impl WarnBudget {
    /// Warnings per window.
    pub const PER_WINDOW: u32 = 10;
    /// The window, in ns.
    pub const WINDOW_NS: u64 = 10_000_000_000;

    /// Spends one warning at host time `now_ns`, if the window has any left.
    pub fn spend(&self, now_ns: u64) -> Warn {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ns.saturating_sub(w.start_ns) >= Self::WINDOW_NS {
            w.start_ns = now_ns;
            w.logged = 0;
        }
        if w.logged < Self::PER_WINDOW {
            w.logged += 1;
            Warn::Log {
                left_out: std::mem::take(&mut w.left_out),
            }
        } else {
            w.left_out += 1;
            Warn::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rationed_per_window_and_the_left_out_counted() {
        let budget = WarnBudget::default();
        let second = 1_000_000_000;
        for i in 0..WarnBudget::PER_WINDOW {
            assert_eq!(budget.spend(u64::from(i)), Warn::Log { left_out: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(budget.spend(5 * second), Warn::Quiet);
        }
        // A new window: logging again, saying what was left out.
        let later = WarnBudget::WINDOW_NS + second;
        assert_eq!(budget.spend(later), Warn::Log { left_out: 1000 });
        assert_eq!(budget.spend(later), Warn::Log { left_out: 0 });
    }
}

/// Why a vCPU left `KVM_RUN`, as its [`VcpuActivity`] counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A VMRPC doorbell (a port write, counted apart).
    Doorbell,
    IoOut,
    IoIn,
    Mmio,
    /// A kick or a signal (`EINTR`, `KVM_EXIT_INTR`).
    Interrupted,
    /// Anything else (shutdown, halt, errors: each ends the VM).
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 6] = [
        ExitKind::Doorbell,
        ExitKind::IoOut,
        ExitKind::IoIn,
        ExitKind::Mmio,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Doorbell => "vmrpc_doorbell",
            ExitKind::IoOut => "io_out",
            ExitKind::IoIn => "io_in",
            ExitKind::Mmio => "mmio",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// What one vCPU is doing and has done, written by its thread with relaxed
/// stores (cheap enough to stay on) and read by the VMM's API at any time.
#[derive(Default)]
pub struct VcpuActivity {
    exits: [AtomicU64; ExitKind::ALL.len()],
    /// The number of the VMRPC call being served, plus one (0: none).
    serving: AtomicU32,
    advance_ns: AtomicU64,
}

impl VcpuActivity {
    pub fn exited(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn serving(&self, number: Option<u32>) {
        self.serving
            .store(number.map_or(0, |n| n.saturating_add(1)), Ordering::Relaxed);
    }

    pub fn set_timer_advance(&self, ns: u64) {
        self.advance_ns.store(ns, Ordering::Relaxed);
    }

    /// Exits by kind, in [`ExitKind::ALL`] order.
    pub fn exits(&self) -> [(ExitKind, u64); ExitKind::ALL.len()] {
        ExitKind::ALL.map(|k| (k, self.exits[k as usize].load(Ordering::Relaxed)))
    }

    /// The call being served now: its number, and its name if known.
    pub fn call(&self) -> Option<(u32, Option<Call>)> {
        let n = self.serving.load(Ordering::Relaxed).checked_sub(1)?;
        Some((n, Call::from_u32(n)))
    }

    /// The timer advance the vCPU's last timer call used (ns).
    pub fn timer_advance_ns(&self) -> u64 {
        self.advance_ns.load(Ordering::Relaxed)
    }
}
