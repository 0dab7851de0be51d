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

use super::park::Park;
use crate::clock::now_ns;
use crate::config::AdvanceMode;
use crate::rpc::counters::WakeStages;
use rtvm_abi::vmrpc::{flags, Status};

/// The share of waits the adaptive advance aims to have arrive on time.
pub const ADVANCE_TARGET_QUANTILE: f64 = 0.99;

/// The advance state of one vCPU.
///
/// The adaptive advance tracks the [`ADVANCE_TARGET_QUANTILE`] of the
/// latency a wait would have with no advance at all (host wake-up, plus VM
/// re-entry when the guest reports its arrival), by stochastic quantile
/// estimation: a sample above the estimate raises it by `q·step`, one below
/// lowers it by `(1−q)·step`, which settles where a share `q` of samples lie
/// below. So 99% of waits reach their deadline early and end in a short
/// spin, whatever the shape of the host's latency tail. The step follows the
/// latencies' own spread, so it works at bare-metal microseconds and nested
/// tens of microseconds alike.
#[derive(Clone, Debug)]
pub struct TimerAdvance {
    mode: AdvanceMode,
    ns: f64,
    mean: f64,
    spread: f64,
    seen: u32,
}

/// Samples during which the advance only rises, to the largest latency seen:
/// a new vCPU starts on the safe side (early, spinning a little more) instead
/// of being late while the quantile estimate climbs.
const WARMUP_SAMPLES: u32 = 32;

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
            spread: 0.0,
            seen: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.mode != AdvanceMode::Off
    }

    /// The advance to use now, in ns.
    pub fn current(&self) -> u64 {
        self.ns.round() as u64
    }

    /// Learns from one wait's latency: how late control would have arrived
    /// had there been no advance (ns; negative is impossible but harmless).
    pub fn observe(&mut self, latency_ns: i64) {
        let AdvanceMode::Adaptive { max_ns } = self.mode else {
            return;
        };
        let x = latency_ns as f64;
        if self.seen < WARMUP_SAMPLES {
            self.seen += 1;
            self.mean += (x - self.mean) / f64::from(self.seen);
            self.ns = self.ns.max(x).clamp(0.0, max_ns as f64);
            return;
        }
        self.mean += (x - self.mean) / 32.0;
        self.spread += ((x - self.mean).abs() - self.spread) / 32.0;
        let step = (self.spread / 2.0).clamp(100.0, 5_000.0);
        let q = ADVANCE_TARGET_QUANTILE;
        let delta = if x > self.ns {
            q * step
        } else {
            -(1.0 - q) * step
        };
        self.ns = (self.ns + delta).clamp(0.0, max_ns as f64);
    }
}

/// A periodic timer of one vCPU.
#[derive(Clone, Copy, Debug)]
struct Periodic {
    period: u64,
    next: u64,
}

impl Periodic {
    /// The deadline to wait for when the task asks at `now`, and how many
    /// deadlines passed unserved before it asked: those are skipped, so the
    /// task stays in phase.
    fn take(&mut self, now: u64) -> (u64, u64) {
        let mut missed = 0;
        if now >= self.next {
            missed = (now - self.next) / self.period + 1;
            self.next += missed * self.period;
        }
        let deadline = self.next;
        self.next += self.period;
        (deadline, missed)
    }
}

/// Longest period or relative sleep we accept, so deadlines cannot overflow.
const MAX_PERIOD_NS: u64 = 3_600 * 1_000_000_000;
/// Shortest period: below this the exit cost alone exceeds the period.
const MIN_PERIOD_NS: u64 = 1_000;

/// Timer state of one vCPU.
pub struct TimerService {
    advance: TimerAdvance,
    /// The advance the previous wait used, which the guest's feedback on
    /// that wait is relative to.
    last_advance: u64,
    periodic: Option<Periodic>,
}

/// How a waiting call wants to be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitOptions {
    /// `flags::EARLY_RETURN`: hand back before the deadline, by up to the advance.
    pub early_return: bool,
    /// `flags::FEEDBACK`: the guest-measured arrival of its previous wait.
    pub feedback: Option<i64>,
}

impl WaitOptions {
    /// From a call's flags and the argument that carries its feedback.
    pub fn from_call(call_flags: u32, feedback_arg: u64) -> Self {
        WaitOptions {
            early_return: call_flags & flags::EARLY_RETURN != 0,
            feedback: (call_flags & flags::FEEDBACK != 0).then_some(feedback_arg as i64),
        }
    }
}

/// Feedback beyond this (ns) is clamped: one wild sample must not throw
/// the advance far off.
const MAX_FEEDBACK_NS: i64 = 10_000_000;

impl TimerService {
    pub fn new(mode: AdvanceMode) -> Self {
        TimerService {
            advance: TimerAdvance::new(mode),
            last_advance: 0,
            periodic: None,
        }
    }

    pub fn advance(&self) -> &TimerAdvance {
        &self.advance
    }

    pub fn sleep(
        &mut self,
        ns: u64,
        opts: WaitOptions,
        park: &mut dyn Park,
    ) -> Result<[u64; 4], Status> {
        if ns > MAX_PERIOD_NS {
            return Err(Status::BadArgument);
        }
        self.sleep_until(now_ns() + ns, opts, park)
    }

    /// Waits until `deadline`; results: deadline, host time at return, advance.
    pub fn sleep_until(
        &mut self,
        deadline: u64,
        opts: WaitOptions,
        park: &mut dyn Park,
    ) -> Result<[u64; 4], Status> {
        let wake = self.wait_for(deadline, opts, park)?;
        Ok([deadline, wake.returned, self.advance.current(), 0])
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
    /// The wait's stages come with the results (`entered` still 0).
    pub fn wait_next(
        &mut self,
        opts: WaitOptions,
        park: &mut dyn Park,
    ) -> Result<([u64; 4], WakeStages), Status> {
        let periodic = self.periodic.as_mut().ok_or(Status::NotConfigured)?;
        let (deadline, missed) = periodic.take(now_ns());
        let wake = self.wait_for(deadline, opts, park)?;
        let late = wake.returned.saturating_sub(deadline);
        Ok(([deadline, late, missed, self.advance.current()], wake))
    }

    /// Parks until the deadline (minus the advance), then spins or returns
    /// early; returns when each stage ended, `returned` being the host time
    /// at which control goes back to the guest.
    fn wait_for(
        &mut self,
        deadline: u64,
        opts: WaitOptions,
        park: &mut dyn Park,
    ) -> Result<WakeStages, Status> {
        // Spinning is bounded to a quarter of the wait, so a short period
        // cannot turn a waiting RT vCPU into a busy one (and run it into its
        // RT bandwidth cap) however noisy the host.
        let now = now_ns();
        let advance = self.advance.current().min(deadline.saturating_sub(now) / 4);
        let wake_at = deadline.saturating_sub(advance);
        park.park_until(wake_at)?;
        let woke = now_ns();
        match opts.feedback {
            // What the guest saw of the previous wait is what counts: its
            // arrival after the deadline, plus the advance that wait used.
            Some(arrival) => {
                let latency =
                    arrival.clamp(-MAX_FEEDBACK_NS, MAX_FEEDBACK_NS) + self.last_advance as i64;
                self.advance.observe(latency);
            }
            // Otherwise learn the host's own wake-up latency.
            None if now < wake_at => self.advance.observe(woke.saturating_sub(wake_at) as i64),
            None => {}
        }
        self.last_advance = advance;
        let mut now = woke;
        // Never hand back before the deadline, unless the guest spins the
        // rest itself.
        if !(opts.early_return && self.advance.is_enabled()) {
            while now < deadline {
                std::hint::spin_loop();
                now = now_ns();
            }
        }
        Ok(WakeStages {
            vcpu: 0,
            deadline,
            wake_at,
            woke,
            returned: now,
            entered: 0,
            arrived: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rpc::park::Unattended;

    #[test]
    fn adaptive_advance_settles_on_the_latency_quantile_and_stays_bounded() {
        let mut a = TimerAdvance::new(AdvanceMode::Adaptive { max_ns: 1_000_000 });
        // Latencies 20..=119 µs, uniformly: the 99th percentile is ~119 µs.
        for i in 0..20_000u64 {
            a.observe((20_000 + (i * 7919 % 100) * 1_000) as i64);
        }
        let adv = a.current();
        assert!((110_000..=125_000).contains(&adv), "advance {adv}");
        for _ in 0..5_000 {
            a.observe(10_000_000);
        }
        assert_eq!(a.current(), 1_000_000, "bounded by max");
        let mut off = TimerAdvance::new(AdvanceMode::Off);
        off.observe(50_000);
        assert_eq!(off.current(), 0);
        assert_eq!(
            TimerAdvance::new(AdvanceMode::Fixed(7_000)).current(),
            7_000
        );
    }

    #[test]
    fn guest_feedback_drives_the_advance() {
        let mut t = TimerService::new(AdvanceMode::Adaptive { max_ns: 500_000 });
        let early = WaitOptions::from_call(flags::EARLY_RETURN | flags::FEEDBACK, 30_000);
        for _ in 0..300 {
            let deadline = now_ns() + 400_000;
            t.sleep_until(deadline, early, &mut Unattended).unwrap();
        }
        // Every wait reported arriving 30 µs late on top of its advance.
        assert!(t.advance().current() >= 30_000, "{}", t.advance().current());
    }

    #[test]
    fn sleep_until_never_returns_before_the_deadline() {
        let mut t = TimerService::new(AdvanceMode::Adaptive { max_ns: 500_000 });
        for _ in 0..20 {
            let deadline = now_ns() + 300_000;
            let r = t
                .sleep_until(deadline, WaitOptions::default(), &mut Unattended)
                .unwrap();
            assert!(r[1] >= deadline && now_ns() >= deadline);
        }
    }

    #[test]
    fn early_return_hands_back_within_the_advance() {
        let mut t = TimerService::new(AdvanceMode::Fixed(200_000));
        let deadline = now_ns() + 1_000_000;
        let r = t
            .sleep_until(
                deadline,
                WaitOptions::from_call(flags::EARLY_RETURN, 0),
                &mut Unattended,
            )
            .unwrap();
        assert!(r[1] + 200_000 >= deadline, "not earlier than the advance");
        assert_eq!(r[2], 200_000);
    }

    #[test]
    fn periodic_counts_missed_periods_and_keeps_phase() {
        let period = 1_000;
        let mut p = Periodic {
            period,
            next: 10_000,
        };
        assert_eq!(p.take(9_000), (10_000, 0), "asked in time");
        assert_eq!(p.take(11_000), (12_000, 1), "asked on the next deadline");
        // Asked 3.5 periods after the deadline due at 13 000: that one and
        // three more passed unserved; the next is in phase.
        assert_eq!(p.take(16_500), (17_000, 4));
        assert_eq!(p.take(17_100), (18_000, 0));
    }

    #[test]
    fn periodic_waits_are_served_in_phase_and_never_early() {
        let mut t = TimerService::new(AdvanceMode::Off);
        assert_eq!(
            t.wait_next(WaitOptions::default(), &mut Unattended)
                .unwrap_err(),
            Status::NotConfigured
        );
        assert_eq!(t.start_periodic(0, 0).unwrap_err(), Status::BadArgument);
        let period = 1_000_000;
        let first = t.start_periodic(period, 0).unwrap()[0];
        let (r, wake) = t
            .wait_next(WaitOptions::default(), &mut Unattended)
            .unwrap();
        assert_eq!(r[0], first);
        assert!(now_ns() >= first, "never before the deadline");
        // Its stages, in order, end where the answer was handed back.
        assert_eq!((wake.deadline, wake.wake_at), (first, first), "no advance");
        assert!(wake.woke >= wake.wake_at && wake.returned >= wake.woke);
        assert_eq!(wake.returned - first, r[1], "the lateness answered");
        // However late the next call comes, its deadline is in phase and
        // ahead of it.
        let (r, _) = t
            .wait_next(WaitOptions::default(), &mut Unattended)
            .unwrap();
        assert_eq!((r[0] - first) % period, 0, "in phase");
        assert!(r[0] >= first + period);
        assert!(now_ns() >= r[0]);
    }
}
