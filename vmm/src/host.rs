//! Facts about the host that decide how real-time results read: a latency
//! figure from a PREEMPT_RT host and one from a PREEMPT_DYNAMIC host are not
//! comparable, nor are results under nested KVM and on bare metal.

use std::fs;
use std::sync::OnceLock;

/// Whether the host kernel keeps time with the TSC (its clocksource is
/// `tsc`), read once.
///
/// Only then is a guest's TSC a fixed offset from the host's: when the
/// kernel has found its TSC unstable and keeps time with something else
/// (HPET, ACPI PM timer: under QEMU TCG, say), KVM moves a guest's TSC
/// offset whenever the vCPU thread is scheduled in again, so a guest TSC
/// stands still while its vCPU is parked. Mapped to host time by a pair
/// taken earlier, it then runs behind by every park: measured in the
/// nested-KVM harness, long-poll sleeps came back 20 ms late after spinning
/// on such a mapping, and an early wake was seen too.
pub fn tsc_is_clocksource() -> bool {
    static TSC: OnceLock<bool> = OnceLock::new();
    *TSC.get_or_init(|| clocksource().as_deref() == Some("tsc"))
}

/// The host kernel's current clocksource (`tsc`, `hpet`, `kvm-clock`…).
pub fn clocksource() -> Option<String> {
    fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .ok()
        .map(|name| name.trim().to_string())
}

/// What the host is, as far as timing results are concerned.
#[derive(Clone, Debug, Default)]
pub struct HostInfo {
    /// `uname -r` and `uname -v`.
    pub kernel: String,
    /// `PREEMPT_RT`, `full`, `voluntary`, `none`, `dynamic (…)`, or `unknown`.
    pub preemption: String,
    /// The KVM module providing /dev/kvm (`kvm_intel`, `kvm_amd`, `kvm_pvm`…).
    pub kvm_module: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
}

impl HostInfo {
    pub fn probe() -> HostInfo {
        let read = |p: &str| fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
        let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
        let version = read("/proc/sys/kernel/version").unwrap_or_default();
        HostInfo {
            kernel: format!("{release} {version}").trim().to_string(),
            preemption: preemption_model(
                &version,
                read("/sys/kernel/realtime"),
                read("/sys/kernel/debug/sched/preempt"),
            ),
            kvm_module: ["kvm_intel", "kvm_amd", "kvm_pvm"]
                .into_iter()
                .find(|m| fs::metadata(format!("/sys/module/{m}")).is_ok())
                .unwrap_or("unknown")
                .to_string(),
            cpu_model: read("/proc/cpuinfo")
                .and_then(|c| {
                    c.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, m)| m.trim().to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }

    /// Whether guest CPL0 code is emulated here (nested `kvm_pvm`), which
    /// makes guest-kernel paths far slower than on hardware KVM.
    pub fn is_nested_pvm(&self) -> bool {
        self.kvm_module == "kvm_pvm"
    }
}

/// The preemption model from `uname -v`, `/sys/kernel/realtime` and the
/// debugfs preempt file (`none voluntary (full)` style, current in parens).
fn preemption_model(version: &str, realtime: Option<String>, debugfs: Option<String>) -> String {
    if realtime.as_deref() == Some("1") || version.contains("PREEMPT_RT") {
        return "PREEMPT_RT".into();
    }
    let current = debugfs.and_then(|d| {
        let start = d.find('(')?;
        let end = d[start..].find(')')?;
        Some(d[start + 1..start + end].to_string())
    });
    match (current, version.contains("PREEMPT_DYNAMIC")) {
        (Some(mode), true) => format!("dynamic ({mode})"),
        (Some(mode), false) => mode,
        (None, true) => "dynamic".into(),
        (None, false) if version.contains("PREEMPT") => "full".into(),
        (None, false) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preemption_model_is_read_from_all_sources() {
        assert_eq!(
            preemption_model("#1 SMP PREEMPT_RT", None, None),
            "PREEMPT_RT"
        );
        assert_eq!(
            preemption_model("#1 SMP", Some("1".into()), None),
            "PREEMPT_RT"
        );
        assert_eq!(
            preemption_model(
                "#1 SMP PREEMPT_DYNAMIC",
                None,
                Some("none voluntary (full) lazy".into())
            ),
            "dynamic (full)"
        );
        assert_eq!(
            preemption_model("#1 SMP PREEMPT_DYNAMIC", None, None),
            "dynamic"
        );
        assert_eq!(preemption_model("#1 SMP", None, None), "unknown");
    }

    #[test]
    fn probe_finds_this_host() {
        let info = HostInfo::probe();
        assert!(!info.kernel.is_empty());
        assert!(info.cpus >= 1);
    }
}
