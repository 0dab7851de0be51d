//! What ran on the real-time CPU instead of the vCPU thread, and when the
//! thread was woken: the kernel's `sched_switch` and `sched_wakeup`
//! tracepoints, read through tracefs as rtla and perf do, in
//! an instance of our own (a tracer the user runs meanwhile is not
//! disturbed) with the `mono` trace clock, so its timestamps are host
//! CLOCK_MONOTONIC like the wake-up records they are matched with.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

const TRACEFS: &str = "/sys/kernel/tracing";
/// Ring buffer for the traced CPU: about a million switches, 8 minutes of
/// a 1 kHz task; a longer run keeps its last part (see `Trace::covers_from`).
const BUFFER_KB: u64 = 64 << 10;

/// One context switch on the traced CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    /// Host CLOCK_MONOTONIC, ns (the trace prints µs).
    pub at_ns: u64,
    /// The task that ran until then, as `comm-pid`.
    pub prev: String,
    /// The task that runs from then on.
    pub next: String,
}

/// A task made runnable on the traced CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wakeup {
    /// Host CLOCK_MONOTONIC, ns.
    pub at_ns: u64,
    /// The task woken, as `comm-pid`.
    pub task: String,
}

/// What a trace recorded, oldest first.
#[derive(Debug, Default)]
pub struct Trace {
    pub switches: Vec<Switch>,
    pub wakeups: Vec<Wakeup>,
}

/// Tracing of one CPU's context switches, stopped and removed on drop.
pub struct SchedTrace {
    instance: PathBuf,
    cpu: usize,
    mounted_here: bool,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

impl SchedTrace {
    /// Starts tracing context switches on `cpu` (mounting tracefs first if
    /// nobody has).
    pub fn start(cpu: usize) -> Result<SchedTrace, String> {
        let root = Path::new(TRACEFS);
        let mut mounted_here = false;
        if !root.join("instances").exists() {
            let target = std::ffi::CString::new(TRACEFS).expect("no NUL");
            // SAFETY: NUL-terminated strings and no data.
            let rc = unsafe {
                libc::mount(
                    c"nodev".as_ptr(),
                    target.as_ptr(),
                    c"tracefs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(format!(
                    "cannot mount tracefs on {TRACEFS}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            mounted_here = true;
        }
        let instance = root.join(format!("instances/rtvm-{}", std::process::id()));
        fs::create_dir(&instance)
            .map_err(|e| format!("creating trace instance {}: {e}", instance.display()))?;
        let trace = SchedTrace {
            instance,
            cpu,
            mounted_here,
        };
        let at = |p: &str| trace.instance.join(p);
        write(&at("trace_clock"), "mono")?;
        write(&at("tracing_cpumask"), &cpumask(cpu))?;
        write(
            &at(&format!("per_cpu/cpu{cpu}/buffer_size_kb")),
            &BUFFER_KB.to_string(),
        )?;
        write(&at("events/sched/sched_switch/enable"), "1")?;
        write(&at("events/sched/sched_wakeup/enable"), "1")?;
        write(&at("tracing_on"), "1")?;
        Ok(trace)
    }

    /// Stops tracing and returns what was recorded.
    pub fn finish(self) -> Result<Trace, String> {
        write(&self.instance.join("tracing_on"), "0")?;
        let path = self.instance.join(format!("per_cpu/cpu{}/trace", self.cpu));
        let file = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut trace = Trace::default();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(switch) = parse(&line) {
                trace.switches.push(switch);
            } else if let Some(wakeup) = parse_wakeup(&line) {
                trace.wakeups.push(wakeup);
            }
        }
        Ok(trace)
    }
}

impl Drop for SchedTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.instance.join("tracing_on"), "0");
        let _ = fs::write(self.instance.join("events/sched/sched_switch/enable"), "0");
        let _ = fs::write(self.instance.join("events/sched/sched_wakeup/enable"), "0");
        if let Err(e) = fs::remove_dir(&self.instance) {
            eprintln!(
                "rtvm: warning: removing trace instance {}: {e}",
                self.instance.display()
            );
        }
        if self.mounted_here {
            let target = std::ffi::CString::new(TRACEFS).expect("no NUL");
            // SAFETY: a NUL-terminated path we mounted.
            unsafe { libc::umount(target.as_ptr()) };
        }
    }
}

/// tracing_cpumask for one CPU: hex, in comma-separated 32-bit groups.
fn cpumask(cpu: usize) -> String {
    let groups = cpu / 32 + 1;
    (0..groups)
        .rev()
        .map(|g| {
            if g == cpu / 32 {
                format!("{:08x}", 1u32 << (cpu % 32))
            } else {
                "00000000".into()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The timestamp of a trace line's event (`secs.micros` before `: NAME: `).
fn stamp(head: &str) -> Option<u64> {
    let stamp = head.rsplit(' ').next()?;
    let (secs, micros) = stamp.split_once('.')?;
    Some(
        secs.parse::<u64>().ok()? * 1_000_000_000
            + micros.parse::<u64>().ok()? * 10u64.pow(9u32.checked_sub(micros.len() as u32)?),
    )
}

/// A `sched_wakeup` line: `... 123.456789: sched_wakeup: comm=vcpu1
/// pid=42 prio=19 target_cpu=001`.
pub fn parse_wakeup(line: &str) -> Option<Wakeup> {
    let (head, fields) = line.split_once(": sched_wakeup: ")?;
    let comm = fields.strip_prefix("comm=")?;
    let (comm, rest) = comm.split_at(comm.find(" pid=")?);
    let pid = rest[" pid=".len()..].split(' ').next()?;
    Some(Wakeup {
        at_ns: stamp(head)?,
        task: format!("{comm}-{pid}"),
    })
}

/// A `sched_switch` line of the trace file, e.g.
/// `<idle>-0 [001] d..2. 123.456789: sched_switch: prev_comm=swapper/1
/// prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=vcpu1
/// next_pid=42 next_prio=19`. Commands may hold spaces, so fields are
/// cut at the next key.
pub fn parse(line: &str) -> Option<Switch> {
    let (head, fields) = line.split_once(": sched_switch: ")?;
    let at_ns = stamp(head)?;
    let between = |from: &str, to: &str| -> Option<&str> {
        let start = fields.find(from)? + from.len();
        let end = fields[start..].find(to).map_or(fields.len(), |e| start + e);
        Some(&fields[start..end])
    };
    let prev = format!(
        "{}-{}",
        between("prev_comm=", " prev_pid=")?,
        between(" prev_pid=", " prev_prio=")?
    );
    let next = format!(
        "{}-{}",
        between(" ==> next_comm=", " next_pid=")?,
        between(" next_pid=", " next_prio=")?
    );
    Some(Switch { at_ns, prev, next })
}

/// Who held the CPU in `[from, to)`, and for how long (ns), longest first;
/// the task named `ours` (the vCPU thread, as `comm-`) is left out, and is
/// known to run from `ours_from` on, whatever the trace says: some kernels
/// (this project's nested hosts among them) record no switch out of the
/// idle task, so a thread woken on an idle CPU would seem never to run.
pub fn occupants(
    switches: &[Switch],
    (from, to): (u64, u64),
    ours: &str,
    ours_from: u64,
) -> Vec<(String, u64)> {
    let first = switches.partition_point(|s| s.at_ns < from);
    // Who ran at `from`: the task the last switch before it handed over to.
    let mut running = first.checked_sub(1).map(|i| switches[i].next.clone());
    let ours_now = Switch {
        at_ns: ours_from,
        prev: String::new(),
        next: ours.to_string(),
    };
    let mut window: Vec<&Switch> = switches[first..]
        .iter()
        .take_while(|s| s.at_ns < to)
        .collect();
    if (from..to).contains(&ours_from) {
        let at = window.partition_point(|s| s.at_ns <= ours_from);
        window.insert(at, &ours_now);
    }
    let mut since = from;
    let mut held: Vec<(String, u64)> = Vec::new();
    let credit = |task: &Option<String>, ns: u64, held: &mut Vec<(String, u64)>| {
        if let Some(task) = task.as_deref().filter(|t| !t.starts_with(ours) && ns > 0) {
            match held.iter_mut().find(|(t, _)| t == task) {
                Some((_, total)) => *total += ns,
                None => held.push((task.to_string(), ns)),
            }
        }
    };
    for s in window {
        credit(&running, s.at_ns - since, &mut held);
        running = Some(s.next.clone());
        since = s.at_ns;
    }
    credit(&running, to.saturating_sub(since), &mut held);
    held.sort_by_key(|(_, ns)| std::cmp::Reverse(*ns));
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_parse_with_spaces_in_commands() {
        let line = "   kworker/1:2 x-77   [001] d..2. 16244.079078: sched_switch: prev_comm=kworker/1:2 x prev_pid=77 prev_prio=120 prev_state=I ==> next_comm=vcpu1 next_pid=42 next_prio=19";
        let s = parse(line).unwrap();
        assert_eq!(s.at_ns, 16_244_079_078_000);
        assert_eq!(s.prev, "kworker/1:2 x-77");
        assert_eq!(s.next, "vcpu1-42");
        assert!(parse("  <idle>-0 [001] 1.000001: sched_wakeup: comm=x").is_none());
        let woken = parse_wakeup(
            "  <idle>-0  [001] dNs5. 24423.204662: sched_wakeup: comm=vcpu1 pid=42 prio=19 target_cpu=001",
        )
        .unwrap();
        assert_eq!(
            (woken.at_ns, woken.task.as_str()),
            (24_423_204_662_000, "vcpu1-42")
        );
        assert_eq!(cpumask(1), "00000002");
        assert_eq!(cpumask(33), "00000002,00000000");
    }

    #[test]
    fn occupants_are_what_held_the_cpu_in_the_window() {
        let sw = |at_ns, prev: &str, next: &str| Switch {
            at_ns,
            prev: prev.into(),
            next: next.into(),
        };
        let switches = [
            sw(100, "vcpu1-42", "ksoftirqd/1-20"),
            sw(300, "ksoftirqd/1-20", "stress-9"),
            sw(700, "stress-9", "vcpu1-42"),
            sw(900, "vcpu1-42", "swapper/1-0"),
        ];
        assert_eq!(
            occupants(&switches, (200, 800), "vcpu1-", 700),
            [
                ("stress-9".to_string(), 400),
                ("ksoftirqd/1-20".to_string(), 100)
            ]
        );
        assert!(occupants(&switches, (750, 850), "vcpu1-", 700).is_empty());
        // No switch out of idle recorded: the thread runs from when it
        // says it woke.
        let idle = [
            sw(100, "vcpu1-42", "swapper/1-0"),
            sw(2000, "vcpu1-42", "swapper/1-0"),
        ];
        assert_eq!(
            occupants(&idle, (1000, 1500), "vcpu1-", 1040),
            [("swapper/1-0".to_string(), 40)]
        );
    }
}
