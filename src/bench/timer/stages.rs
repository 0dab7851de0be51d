//! Where a long-poll wake-up's lateness comes from, stage by stage: the
//! host's record of each wait (`VmRun::wakes`) joined with the guest's own
//! arrival time for the same cycle.
//!
//! ```text
//! deadline ─ advance ─► timer fires ─ timer ─► thread runs ─ spin ─► answer
//!   ─ vmm ─► KVM_RUN ─ entry ─► guest reads the time ─ guest_spin ─► task runs
//! ```
//!
//! `advance` is negative (the host arms its timer early); the six add up
//! to the guest's lateness. `timer` is the host's timer and scheduler,
//! `spin` the host's advance spin, `vmm` rtvm's own path back to the guest,
//! `entry` the VM entry (and any preemption of the vCPU thread in between),
//! `guest_spin` the guest's CPL3 spin to the deadline after an early
//! return. Where the guest sent no arrival (no early return), `entry`
//! runs to the task and `guest_spin` is 0.

use rtvm_vmm::rpc::counters::WakeStages;
use serde_json::{json, Value};

use crate::report::stats::Stats;

/// The stages of one wake-up, ns (signed: the advance is negative, and a
/// clock-mapping error can make `entry` slightly so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breakdown {
    /// Index of the cycle in the run.
    pub cycle: usize,
    /// The cycle's deadline, host CLOCK_MONOTONIC ns.
    pub deadline: u64,
    pub total: i64,
    pub advance: i64,
    pub timer: i64,
    pub spin: i64,
    pub vmm: i64,
    pub entry: i64,
    pub guest_spin: i64,
}

pub const STAGES: [&str; 6] = ["advance", "timer", "spin", "vmm", "entry", "guest_spin"];

impl Breakdown {
    fn stage(self, name: &str) -> i64 {
        match name {
            "advance" => self.advance,
            "timer" => self.timer,
            "spin" => self.spin,
            "vmm" => self.vmm,
            "entry" => self.entry,
            "guest_spin" => self.guest_spin,
            _ => unreachable!("stage names are fixed"),
        }
    }

    pub fn to_json(self) -> Value {
        let us = |ns: i64| ns as f64 / 1e3;
        let mut out = json!({"cycle": self.cycle, "total_us": us(self.total)});
        for name in STAGES {
            out[format!("{name}_us")] = json!(us(self.stage(name)));
        }
        out
    }
}

/// Joins the host's records of `vcpu` with the guest's lateness per cycle
/// (same order, one each per wait); `None` when the counts differ, since
/// then cycles cannot be paired.
pub fn join(wakes: &[WakeStages], vcpu: usize, late_ns: &[u64]) -> Option<Vec<Breakdown>> {
    let wakes: Vec<&WakeStages> = wakes.iter().filter(|w| w.vcpu == vcpu).collect();
    if wakes.len() != late_ns.len() || wakes.is_empty() {
        return None;
    }
    let d = |a: u64, b: u64| a as i64 - b as i64;
    Some(
        wakes
            .iter()
            .zip(late_ns)
            .enumerate()
            .map(|(cycle, (w, &late))| {
                let runs = w.deadline + late;
                let arrived = w.arrived.unwrap_or(runs);
                Breakdown {
                    cycle,
                    deadline: w.deadline,
                    total: late as i64,
                    advance: d(w.wake_at, w.deadline),
                    timer: d(w.woke, w.wake_at),
                    spin: d(w.returned, w.woke),
                    vmm: d(w.entered, w.returned),
                    entry: d(arrived, w.entered),
                    guest_spin: d(runs, arrived),
                }
            })
            .collect(),
    )
}

/// Each stage's distribution: the advance by how early the timer was
/// armed, the others as they are (a negative value counted as 0).
pub fn stage_stats(breakdowns: &[Breakdown]) -> Vec<(&'static str, Stats)> {
    STAGES
        .iter()
        .filter_map(|&name| {
            let ns: Vec<u64> = breakdowns
                .iter()
                .map(|b| match name {
                    "advance" => b.advance.unsigned_abs(),
                    _ => b.stage(name).max(0) as u64,
                })
                .collect();
            Some((name, Stats::from_ns(&ns)?))
        })
        .collect()
}

impl Breakdown {
    /// From the host timer's expiry to the task running, host ns.
    pub fn window(self) -> (u64, u64) {
        (
            self.deadline.saturating_add_signed(self.advance),
            self.deadline.saturating_add_signed(self.total),
        )
    }

    /// When the vCPU thread ran again after its park, host ns.
    pub fn thread_woke(self) -> u64 {
        self.deadline
            .saturating_add_signed(self.advance)
            .saturating_add_signed(self.timer)
    }
}

/// A wake-up of the interrupt path: the guest's deadline and lateness. The
/// host takes no part in it (KVM's in-kernel LAPIC timer wakes the halted
/// vCPU thread), so its stages come from the scheduler's trace only:
///
/// ```text
/// deadline ─ timer ─► vCPU thread woken ─ after_wake ─► task runs
/// ```
///
/// `timer` is KVM's timer and the host's (negative where KVM's own timer
/// advance woke the thread early); `after_wake` the thread getting the CPU,
/// the VM entry, the interrupt's delivery and the guest's handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqWake {
    pub cycle: usize,
    /// Host CLOCK_MONOTONIC ns.
    pub deadline: u64,
    /// The guest's lateness, ns.
    pub total: u64,
}

impl IrqWake {
    pub fn window(self) -> (u64, u64) {
        (self.deadline, self.deadline + self.total)
    }

    /// When the vCPU thread was woken for this deadline: its last wake-up
    /// from half a period before the deadline to the task running (a halt
    /// poll that caught the interrupt leaves none).
    pub fn woken(self, wakeups: &[u64], period: u64) -> Option<u64> {
        let (from, to) = (
            self.deadline.saturating_sub(period / 2),
            self.deadline + self.total,
        );
        let last = wakeups.partition_point(|&w| w <= to).checked_sub(1)?;
        (wakeups[last] > from).then_some(wakeups[last])
    }
}

/// Pairs the guest's deadlines with its lateness, cycle by cycle.
pub fn irq_wakes(deadlines: &[u64], late_ns: &[u64]) -> Vec<IrqWake> {
    deadlines
        .iter()
        .zip(late_ns)
        .enumerate()
        .map(|(cycle, (&deadline, &total))| IrqWake {
            cycle,
            deadline,
            total,
        })
        .collect()
}

/// The interrupt path's stages over every wake-up the trace saw the vCPU
/// thread woken for: `timer` (how late the thread was woken; one woken
/// early counts 0) and `after_wake`.
pub fn irq_stage_stats(
    wakes: &[IrqWake],
    wakeups: &[u64],
    period: u64,
) -> Vec<(&'static str, Stats)> {
    let (mut timer, mut after) = (Vec::new(), Vec::new());
    for w in wakes {
        if let Some(woken) = w.woken(wakeups, period) {
            timer.push(woken.saturating_sub(w.deadline));
            after.push((w.deadline + w.total).saturating_sub(woken.max(w.deadline)));
        }
    }
    [("timer", timer), ("after_wake", after)]
        .into_iter()
        .filter_map(|(name, ns)| Some((name, Stats::from_ns(&ns)?)))
        .collect()
}

/// The `n` latest interrupt-path wake-ups, latest first.
pub fn worst_irq(wakes: &[IrqWake], n: usize) -> Vec<IrqWake> {
    let mut sorted = wakes.to_vec();
    sorted.sort_by_key(|w| std::cmp::Reverse(w.total));
    sorted.truncate(n);
    sorted
}

/// The `n` latest wake-ups, latest first.
pub fn worst(breakdowns: &[Breakdown], n: usize) -> Vec<Breakdown> {
    let mut sorted = breakdowns.to_vec();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.total));
    sorted.truncate(n);
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(vcpu: usize, deadline: u64) -> WakeStages {
        WakeStages {
            vcpu,
            deadline,
            wake_at: deadline - 20,
            woke: deadline - 5,
            returned: deadline + 1,
            entered: deadline + 4,
            arrived: None,
        }
    }

    #[test]
    fn stages_add_up_to_the_lateness_and_pair_by_cycle() {
        let mut wakes = [wake(1, 1000), wake(0, 1500), wake(1, 2000)];
        // The first wake-up's guest read the time 2 ns before its deadline.
        wakes[0].arrived = Some(998);
        let got = join(&wakes, 1, &[10, 300]).unwrap();
        assert_eq!(got.len(), 2);
        let b = got[0];
        assert_eq!(
            (b.advance, b.timer, b.spin, b.vmm, b.entry, b.guest_spin),
            (-20, 15, 6, 3, -6, 12)
        );
        for b in &got {
            let sum = b.advance + b.timer + b.spin + b.vmm + b.entry + b.guest_spin;
            assert_eq!(sum, b.total);
        }
        assert_eq!(
            (got[1].entry, got[1].guest_spin),
            (296, 0),
            "no arrival: entry runs to the task"
        );
        assert_eq!(worst(&got, 1)[0].cycle, 1);
        assert!(
            join(&wakes, 1, &[10]).is_none(),
            "counts differ: no pairing"
        );
        let stats = stage_stats(&got);
        assert_eq!(stats.len(), 6);
        assert_eq!(stats[0].1.max_us, 0.02, "the advance by how early");
    }

    #[test]
    fn interrupt_wakeups_pair_with_the_thread_woken_for_them() {
        let wakes = irq_wakes(&[1000, 2000, 3000], &[50, 400, 30]);
        assert_eq!(
            wakes[1],
            IrqWake {
                cycle: 1,
                deadline: 2000,
                total: 400
            }
        );
        // Woken 10 late for the first; early (KVM's advance) for the
        // second, plus a stray earlier wake-up; none for the third (a halt
        // poll caught it).
        let wakeups = [1010, 1990, 1400, 1995];
        let mut sorted = wakeups;
        sorted.sort();
        assert_eq!(wakes[0].woken(&sorted, 1000), Some(1010));
        assert_eq!(wakes[1].woken(&sorted, 1000), Some(1995));
        assert_eq!(wakes[2].woken(&sorted, 1000), None);
        let stats = irq_stage_stats(&wakes, &sorted, 1000);
        assert_eq!(stats[0].0, "timer");
        assert_eq!(stats[0].1.samples, 2);
        assert_eq!(stats[0].1.max_us, 0.01);
        assert_eq!(
            stats[1].1.max_us, 0.4,
            "after_wake from the deadline when woken early"
        );
        assert_eq!(worst_irq(&wakes, 1)[0].cycle, 1);
    }
}
