//! Time the hypervisor under this host took from the RT CPU ("steal"): on a
//! host that is itself a VM, its vCPU may not run at all for a while, and
//! nothing scheduled inside it can tell; the kernel only learns it from the
//! paravirtual steal clock and counts it per CPU in /proc/stat. Its unit
//! there is USER_HZ (10 ms): enough to tell a millisecond stall that came
//! from below from one this host's scheduler made, not to time small ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rtvm_vmm::clock::now_ns;

/// `cpu`'s steal time so far in ns, from `/proc/stat` text; `None` if the
/// line or field is missing (a kernel without steal accounting shows 0).
pub fn parse_steal_ns(stat: &str, cpu: usize, ns_per_tick: u64) -> Option<u64> {
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    // cpuN user nice system idle iowait irq softirq steal guest guest_nice
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks * ns_per_tick)
}

fn ns_per_tick() -> u64 {
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / hz.max(1) as u64
}

/// `cpu`'s steal time so far, ns.
pub fn steal_ns(cpu: usize) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal_ns(&stat, cpu, ns_per_tick())
}

/// How often the sampler reads /proc/stat: well below its 10 ms unit.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// Samples one CPU's steal time from a thread kept off that CPU, until
/// finished; each change is kept with its host CLOCK_MONOTONIC time.
pub struct StealSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, u64)>>,
}

impl StealSampler {
    pub fn start(cpu: usize) -> Option<StealSampler> {
        steal_ns(cpu)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // The sampler must not take the CPU it watches.
                let _ = rtvm_vmm::realtime::keep_off(&[cpu]);
                let mut samples: Vec<(u64, u64)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(steal) = steal_ns(cpu) {
                        let at = now_ns();
                        // Of a run of equal readings only the first and
                        // the last are kept: either answers for any time
                        // between them.
                        match samples.as_mut_slice() {
                            [.., a, b] if a.1 == steal && b.1 == steal => b.0 = at,
                            _ => samples.push((at, steal)),
                        }
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
                samples
            })
        };
        Some(StealSampler { stop, thread })
    }

    pub fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Steal time counted between the last sample at or before `from` and the
/// first at or after `to` + `settle` (the kernel adds a stall's steal at the
/// CPU's next tick after it): at least what was stolen in `[from, to)`, in
/// the counter's 10 ms unit. `None` if the samples do not cover the window.
pub fn stolen_between(samples: &[(u64, u64)], from: u64, to: u64, settle: u64) -> Option<u64> {
    let before = samples.partition_point(|s| s.0 <= from).checked_sub(1)?;
    let after = samples.partition_point(|s| s.0 < to + settle);
    let end = samples.get(after)?;
    Some(end.1 - samples[before].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  2892722 0 574435 1874568 78797 0 2644 21303 702080 0\n\
        cpu0 1408440 0 280301 1002964 15800 0 521 10302 339361 0\n\
        cpu1 1484282 0 294134 871604 62997 0 2122 11001 362719 0\n\
        intr 1 2 3\n";

    #[test]
    fn steal_is_the_eighth_field_of_the_cpus_line() {
        assert_eq!(parse_steal_ns(STAT, 1, 10_000_000), Some(110_010_000_000));
        assert_eq!(parse_steal_ns(STAT, 0, 10_000_000), Some(103_020_000_000));
        assert_eq!(parse_steal_ns(STAT, 2, 10_000_000), None);
        assert_eq!(parse_steal_ns("cpu1 1 2 3\n", 1, 10), None);
    }

    #[test]
    fn stolen_between_brackets_the_window() {
        // (time, steal): 20 ms stolen around t = 50, settled by t = 62.
        let samples = [(0, 100), (40, 100), (62, 120), (90, 120)];
        assert_eq!(stolen_between(&samples, 45, 55, 5), Some(20));
        // Before the stall.
        assert_eq!(stolen_between(&samples, 0, 30, 5), Some(0));
        // Not covered: before the first sample, or no sample after.
        assert_eq!(stolen_between(&samples, 0, 30, 100), None);
        assert_eq!(stolen_between(&[(10, 1), (20, 1)], 5, 15, 0), None);
    }
}
