//! The timer service: host clock, sleeps and periodic deadlines served by
//! long polling, with an adaptive timer advance.
//!
//! # Timer advance
//!
//! A host thread asked to wake at T wakes at T + L, where L (timer interrupt,
//! scheduler, VM re-entry) is tens of microseconds on a stock kernel. So a
//! waiting call arms its timer `advance` before the deadline, then either
//! spins the rest in the host, or — with `EARLY_RETURN` — hands control back
//! at once so the guest spins the rest at CPL3, which also hides the VM
//! re-entry. The advance follows the observed arrival offsets the way KVM's
//! `lapic_timer_advance` does: it steps toward the lateness it sees, keeping
//! a margin of twice the observed jitter, within `[0, max]`.

use super::wait::now_ns;
use rtvm_abi::vmrpc::{flags, Status};

/// How the timer advance is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvanceMode {
    /// No advance: the host arms its timer at the deadline itself.
    Off,
    /// A fixed advance in ns.
    Fixed(u64),
    /// Learn the advance from observed lateness, up to a bound in ns.
    Adaptive { max_ns: u64 },
}

impl std::str::FromStr for AdvanceMode {
    type Err = String;

    /// `auto`, `off`, or a fixed advance: `20us`, `20000ns`, `20000` (ns).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => {
                return Ok(AdvanceMode::Adaptive {
                    max_ns: DEFAULT_MAX_ADVANCE_NS,
                })
            }
            "off" | "0" => return Ok(AdvanceMode::Off),
            _ => {}
        }
        let (num, scale) = if let Some(n) = t.strip_suffix("us") {
            (n, 1_000)
        } else if let Some(n) = t.strip_suffix("ns") {
            (n, 1)
        } else {
            (t.as_str(), 1)
        };
        let ns = num
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| format!("timer advance '{s}' is not auto, off, or a time like 20us"))?;
        if ns > DEFAULT_MAX_ADVANCE_NS * 4 {
            return Err(format!(
                "timer advance '{s}' is over {} µs",
                DEFAULT_MAX_ADVANCE_NS * 4 / 1000
            ));
        }
        Ok(AdvanceMode::Fixed(ns))
    }
}

impl std::fmt::Display for AdvanceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdvanceMode::Off => write!(f, "off"),
            AdvanceMode::Fixed(ns) => write!(f, "fixed {ns} ns"),
            AdvanceMode::Adaptive { max_ns } => {
                write!(f, "adaptive (at most {} µs)", max_ns / 1000)
            }
        }
    }
}

/// Default bound on the adaptive advance: more would mean spinning for long
/// stretches on every wait.
pub const DEFAULT_MAX_ADVANCE_NS: u64 = 500_000;

/// The advance state of one vCPU.
#[derive(Clone, Debug)]
pub struct TimerAdvance {
    mode: AdvanceMode,
    ns: f64,
    mean: f64,
    jitter: f64,
}

impl TimerAdvance {
    pub fn new(mode: AdvanceMode) -> Self {
        let ns = match mode {
            AdvanceMode::Fixed(ns) => ns as f64,
            _ => 0.0,
        };
        TimerAdvance {
            mode,
            ns,
            mean: 0.0,
            jitter: 0.0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.mode != AdvanceMode::Off
    }

    /// The advance to use now, in ns.
    pub fn current(&self) -> u64 {
        self.ns.round() as u64
    }

    /// Learns from one wait: `arrival` is when control reached the point
    /// the advance is meant to get there on time (signed ns after the deadline).
    pub fn observe(&mut self, arrival_ns: i64) {
        let AdvanceMode::Adaptive { max_ns } = self.mode else {
            return;
        };
        let a = arrival_ns as f64;
        self.mean += (a - self.mean) / 16.0;
        self.jitter += ((a - self.mean).abs() - self.jitter) / 16.0;
        // Aim to arrive a little early: spinning a few µs is cheap, being late is not.
        let target = -2.0 * self.jitter;
        self.ns = (self.ns + (a - target) / 4.0).clamp(0.0, max_ns as f64);
    }
}

/// A periodic timer of one vCPU.
#[derive(Clone, Copy, Debug)]
struct Periodic {
    period: u64,
    next: u64,
}

/// Longest period or relative sleep we accept, so deadlines cannot overflow.
const MAX_PERIOD_NS: u64 = 3_600 * 1_000_000_000;
/// Shortest period: below this the exit cost alone exceeds the period.
const MIN_PERIOD_NS: u64 = 1_000;

/// Timer state of one vCPU.
pub struct TimerService {
    advance: TimerAdvance,
    periodic: Option<Periodic>,
}

/// A wait that was cut short by the VMM (pause requests are handled inside
/// the wait; only a stop cuts it short).
pub struct Interrupted;

impl TimerService {
    pub fn new(mode: AdvanceMode) -> Self {
        TimerService {
            advance: TimerAdvance::new(mode),
            periodic: None,
        }
    }

    pub fn advance(&self) -> &TimerAdvance {
        &self.advance
    }

    pub fn sleep(
        &mut self,
        ns: u64,
        call_flags: u32,
        park: &mut dyn Park,
    ) -> Result<[u64; 4], Status> {
        if ns > MAX_PERIOD_NS {
            return Err(Status::BadArgument);
        }
        self.sleep_until(now_ns() + ns, call_flags, park)
    }

    /// Waits until `deadline`; results: deadline, host time at return, advance.
    pub fn sleep_until(
        &mut self,
        deadline: u64,
        call_flags: u32,
        park: &mut dyn Park,
    ) -> Result<[u64; 4], Status> {
        let returned = self.wait_for(deadline, call_flags, park)?;
        Ok([deadline, returned, self.advance.current(), 0])
    }

    pub fn start_periodic(&mut self, period: u64, first: u64) -> Result<[u64; 4], Status> {
        if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period) {
            return Err(Status::BadArgument);
        }
        let now = now_ns();
        let next = if first == 0 { now + period } else { first };
        if next > now + MAX_PERIOD_NS {
            return Err(Status::BadArgument);
        }
        self.periodic = Some(Periodic { period, next });
        Ok([next, 0, 0, 0])
    }

    /// Waits for the next periodic deadline. Deadlines that passed before the
    /// call are counted as missed and skipped, so the task stays in phase.
    pub fn wait_next(&mut self, call_flags: u32, park: &mut dyn Park) -> Result<[u64; 4], Status> {
        let mut p = self.periodic.ok_or(Status::NotConfigured)?;
        let now = now_ns();
        let mut missed = 0;
        if now >= p.next {
            missed = (now - p.next) / p.period + 1;
            p.next += missed * p.period;
        }
        let deadline = p.next;
        p.next += p.period;
        self.periodic = Some(p);
        let returned = self.wait_for(deadline, call_flags, park)?;
        let late = returned.saturating_sub(deadline);
        Ok([deadline, late, missed, self.advance.current()])
    }

    /// Parks until the deadline (minus the advance), then spins or returns
    /// early; returns the host time at which control goes back to the guest.
    fn wait_for(
        &mut self,
        deadline: u64,
        call_flags: u32,
        park: &mut dyn Park,
    ) -> Result<u64, Status> {
        // Spinning is bounded to a quarter of the wait, so a short period
        // cannot turn a waiting RT vCPU into a busy one (and run it into its
        // RT bandwidth cap) however noisy the host.
        let now = now_ns();
        let full = self.advance.current();
        let wake_at = deadline.saturating_sub(full.min(deadline.saturating_sub(now) / 4));
        park.park_until(wake_at)
            .map_err(|Interrupted| Status::Interrupted)?;
        let woke = now_ns();
        if now < wake_at {
            // Learn the wake-up latency as if the full advance had been used.
            let latency = woke.saturating_sub(wake_at) as i64;
            self.advance.observe(latency - full as i64);
        }
        if call_flags & flags::EARLY_RETURN != 0 && self.advance.is_enabled() {
            return Ok(woke);
        }
        // Never hand back before the deadline.
        let mut now = woke;
        while now < deadline {
            std::hint::spin_loop();
            now = now_ns();
        }
        Ok(now)
    }
}

/// How a vCPU thread parks: the vCPU's own waits on its timerfd and wake
/// eventfd and honours pause/stop requests (see `vcpu`); tests substitute their own.
pub trait Park {
    fn park_until(&mut self, deadline: u64) -> Result<(), Interrupted>;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct SleepPark;
    impl Park for SleepPark {
        fn park_until(&mut self, deadline: u64) -> Result<(), Interrupted> {
            while now_ns() < deadline {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            Ok(())
        }
    }

    #[test]
    fn adaptive_advance_grows_with_lateness_and_stays_bounded() {
        let mut a = TimerAdvance::new(AdvanceMode::Adaptive { max_ns: 100_000 });
        for _ in 0..200 {
            // Always 40 µs late: the advance must grow toward that.
            a.observe(40_000 - a.current() as i64);
        }
        assert!(
            a.current() >= 35_000 && a.current() <= 100_000,
            "{}",
            a.current()
        );
        for _ in 0..200 {
            a.observe(10_000_000);
        }
        assert_eq!(a.current(), 100_000, "bounded by max");
        let mut off = TimerAdvance::new(AdvanceMode::Off);
        off.observe(50_000);
        assert_eq!(off.current(), 0);
        assert_eq!(
            TimerAdvance::new(AdvanceMode::Fixed(7_000)).current(),
            7_000
        );
    }

    #[test]
    fn sleep_until_never_returns_before_the_deadline() {
        let mut t = TimerService::new(AdvanceMode::Adaptive { max_ns: 500_000 });
        for _ in 0..20 {
            let deadline = now_ns() + 300_000;
            let r = t.sleep_until(deadline, 0, &mut SleepPark).unwrap();
            assert!(r[1] >= deadline && now_ns() >= deadline);
        }
    }

    #[test]
    fn early_return_hands_back_within_the_advance() {
        let mut t = TimerService::new(AdvanceMode::Fixed(200_000));
        let deadline = now_ns() + 1_000_000;
        let r = t
            .sleep_until(deadline, flags::EARLY_RETURN, &mut SleepPark)
            .unwrap();
        assert!(r[1] + 200_000 >= deadline, "not earlier than the advance");
        assert_eq!(r[2], 200_000);
    }

    #[test]
    fn periodic_counts_missed_periods_and_keeps_phase() {
        let mut t = TimerService::new(AdvanceMode::Off);
        assert_eq!(
            t.wait_next(0, &mut SleepPark).unwrap_err(),
            Status::NotConfigured
        );
        assert_eq!(t.start_periodic(0, 0).unwrap_err(), Status::BadArgument);
        let period = 1_000_000;
        let first = t.start_periodic(period, 0).unwrap()[0];
        let r = t.wait_next(0, &mut SleepPark).unwrap();
        assert_eq!((r[0], r[2]), (first, 0));
        // Overrun by 3.5 periods: three deadlines pass unserved.
        let until = r[0] + 3 * period + period / 2;
        while now_ns() < until {}
        let r = t.wait_next(0, &mut SleepPark).unwrap();
        assert_eq!(r[2], 3, "missed periods");
        assert_eq!(r[0], first + 4 * period, "next deadline stays in phase");
    }
}
