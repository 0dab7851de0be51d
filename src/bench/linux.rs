//! `rtvm bench timer --linux KERNEL`: an unmodified cyclictest inside a
//! Linux guest on the RT vCPU, once with the guest's own timer interrupts
//! and once with `librtvm_preload.so` (its `clock_nanosleep` long-polls),
//! next to the host's cyclictest and our host path — the research's
//! original experiment, with the same table, JSON, histograms and plot.
//!
//! cyclictest runs with `-h`, so its histogram comes back on the guest
//! console between markers the init script prints; that is all the guest
//! has to say, and nothing is added inside it beyond the preload library.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rtvm_vmm::config::RtPolicy;
use rtvm_vmm::realtime::RtItem;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig, VmExitReason};

use crate::initramfs::{self, AddFile, InitramfsSpec};
use crate::report::histogram::Histogram;
use crate::report::stats::Stats;
use crate::report::PathResult;

const PLAIN: &str = "@@rtvm-bench: cyclictest";
const POLLED: &str = "@@rtvm-bench: cyclictest+preload";
const END: &str = "@@rtvm-bench: end";
/// The RT vCPU of the Linux guest.
const RT_VCPU: usize = 1;

/// Where the guest tools are: `rtvm-guest` (static) and `librtvm_preload.so`.
fn tool(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build the guest tools first (see guest-linux/README.md or scripts/linux-cyclictest.sh)",
            path.display()
        ))
    }
}

/// Checks up front that `dir` holds the guest tools, before any path runs.
pub fn check_tools(dir: &Path) -> Result<(), String> {
    tool(dir, "rtvm-guest")
        .and(tool(dir, "librtvm_preload.so"))
        .map(|_| ())
}

/// The samples (ns) of each cyclictest histogram between the markers.
pub fn parse_console(console: &str) -> Result<(Vec<u64>, Vec<u64>), String> {
    let section = |from: &str, to: &str| -> Result<Vec<u64>, String> {
        let start = console
            .find(from)
            .ok_or_else(|| format!("the guest never printed {from:?}"))?
            + from.len();
        let end = console[start..]
            .find(to)
            .map(|e| start + e)
            .ok_or_else(|| format!("the guest never printed {to:?}"))?;
        let mut samples = Vec::new();
        for (us, count) in Histogram::parse_cyclictest(&console[start..end]) {
            samples.extend(std::iter::repeat_n(us * 1000, count as usize));
        }
        if samples.is_empty() {
            return Err(format!("no cyclictest histogram after {from:?}"));
        }
        Ok(samples)
    };
    Ok((section(PLAIN, POLLED)?, section(POLLED, END)?))
}

/// Boots `kernel` and returns the two guest paths.
pub fn measure(
    kernel: &Path,
    tools: &Path,
    policy: RtPolicy,
    period_ns: u64,
    seconds: f64,
    rt: &Mutex<Vec<RtItem>>,
) -> Result<Vec<PathResult>, String> {
    let guest_tool = tool(tools, "rtvm-guest")?;
    let preload = tool(tools, "librtvm_preload.so")?;
    let loops = ((seconds * 1e9) / period_ns as f64).ceil().max(100.0) as u64;
    let cyclictest = format!(
        "cyclictest -m -q -p {} -a {RT_VCPU} --mainaffinity=0 -t 1 -i {} -l {loops} -h 10000",
        policy.priority,
        period_ns / 1000
    );
    let run = format!(
        "rtvm-guest ping && echo '{PLAIN}' && {cyclictest} && echo '{POLLED}' && \
         LD_PRELOAD=/lib/librtvm_preload.so {cyclictest} && echo '{END}'"
    );
    let spec = InitramfsSpec {
        busybox: PathBuf::from("/bin/busybox"),
        add: vec![
            AddFile {
                host: guest_tool,
                guest: "/bin/rtvm-guest".into(),
            },
            AddFile {
                host: preload,
                guest: "/lib/librtvm_preload.so".into(),
            },
        ],
        programs: vec![PathBuf::from("/usr/bin/cyclictest")],
        run: Some(run),
        rt_cpu: Some(RT_VCPU as u32),
    };
    let image = initramfs::build(&spec)?;
    let path =
        std::env::temp_dir().join(format!("rtvm-bench-linux-{}.cpio.gz", std::process::id()));
    std::fs::write(&path, image).map_err(|e| format!("writing {}: {e}", path.display()))?;

    let mut config = VmConfig::new(GuestSpec::Linux(kernel.to_path_buf()));
    config.initramfs = Some(path.clone());
    config.vcpus = 2;
    config.memory = 1 << 30;
    config.set_rt(RT_VCPU, policy);
    // A bench's guest works in bounded bursts; where no cap can be made it
    // still runs, and its RT report says so.
    config.rt_allow_uncapped = true;
    config.cmdline =
        format!("console=ttyS0 quiet isolcpus={RT_VCPU} nohz_full={RT_VCPU} rcu_nocbs={RT_VCPU}");
    let console = Arc::new(Mutex::new(Vec::new()));
    let result = Vm::new(&config, Console::capture(console.clone())).and_then(Vm::run);
    let _ = std::fs::remove_file(&path);
    let run = result.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    if !matches!(run.reason, VmExitReason::GuestExit { status: 0, .. }) {
        let tail: String = text
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(format!("the Linux guest did not finish its cyclictest runs ({}); its console ended with:\n{tail}", run.reason));
    }
    rt.lock()
        .unwrap()
        .extend(run.rt_report.for_vcpu(1).cloned());
    let (plain, polled) = parse_console(&text)?;
    let path = |name: &'static str, late_ns: Vec<u64>| {
        let stats = Stats::from_ns(&late_ns).expect("non-empty");
        PathResult {
            name,
            late_ns,
            missed: 0,
            host_side_ns: Vec::new(),
            stats,
            cpu_per_period_ns: None,
        }
    };
    Ok(vec![
        path("linux_cyclictest", plain),
        path("linux_cyclictest_longpoll", polled),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_read_between_the_markers() {
        let console = format!(
            "boot noise\n{PLAIN}\n# Histogram\n000003 000002\n000010 000001\n# Total: 000000003\n\
             {POLLED}\n# Histogram\n000001 000004\n# Max Latencies: 00001\n{END}\nrtvm-init: exit 0\n"
        );
        let (plain, polled) = parse_console(&console).unwrap();
        assert_eq!(plain, vec![3000, 3000, 10_000]);
        assert_eq!(polled, vec![1000; 4]);
        assert!(parse_console("no markers")
            .unwrap_err()
            .contains("never printed"));
        let empty = format!("{PLAIN}\n{POLLED}\n{END}\n");
        assert!(parse_console(&empty)
            .unwrap_err()
            .contains("no cyclictest histogram"));
    }
}
