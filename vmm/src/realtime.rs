//! Real-time vCPUs: the host scheduling a vCPU thread needs to keep
//! deadlines, and the bounds that keep a runaway real-time guest from
//! freezing the host.
//!
//! Per RT vCPU thread: SCHED_FIFO at the configured priority, pinned to its
//! CPU, timer slack 1 ns (the default 50 µs slack would be added to every
//! wake-up). Per process, while an RT vCPU exists: `/dev/cpu_dma_latency`
//! held at 0 (no deep C-states), optionally `mlockall`, and an RT-bandwidth
//! cgroup: `<cpu controller>/rtvm/vm-<pid>-<n>/{rt,vmm}` with RT vCPU threads
//! in `rt` (capped at `runtime/period` of each CPU) and the other vCPU
//! threads in `vmm`. The VMM's control thread stays where it was started.
//!
//! Nothing here fails silently: every step is recorded in an [`RtReport`]
//! with its outcome, shown at start and in bench output; with `strict`, any
//! failed step makes the VM refuse to start.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{RtBandwidth, RtPolicy};
use crate::host::HostInfo;

/// One step of the real-time setup and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtItem {
    /// The vCPU whose thread the step was for, if it was for one.
    pub vcpu: Option<usize>,
    pub what: String,
    pub result: Result<(), String>,
}

/// Every real-time step tried for a VM.
#[derive(Clone, Debug, Default)]
pub struct RtReport {
    pub preemption: String,
    pub items: Vec<RtItem>,
}

impl RtReport {
    pub fn record(&mut self, what: impl Into<String>, result: Result<(), String>) {
        self.items.push(RtItem {
            vcpu: None,
            what: what.into(),
            result,
        });
    }

    /// The steps taken for vCPU `vcpu`'s thread.
    pub fn for_vcpu(&self, vcpu: usize) -> impl Iterator<Item = &RtItem> {
        self.items.iter().filter(move |i| i.vcpu == Some(vcpu))
    }

    pub fn failures(&self) -> impl Iterator<Item = &RtItem> {
        self.items.iter().filter(|i| i.result.is_err())
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl fmt::Display for RtReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "real-time setup (host preemption model: {}):",
            self.preemption
        )?;
        for item in &self.items {
            match &item.result {
                Ok(()) => writeln!(f, "  [ok]     {}", item.what)?,
                Err(why) => writeln!(f, "  [FAILED] {}: {why}", item.what)?,
            }
        }
        Ok(())
    }
}

/// The VM's RT cgroups (v1 cpu controller), removed when dropped.
#[derive(Debug)]
pub struct RtCgroups {
    root: PathBuf,
    vm: PathBuf,
    rt: PathBuf,
    vmm: PathBuf,
}

impl RtCgroups {
    pub fn rt_tasks(&self) -> PathBuf {
        self.rt.join("tasks")
    }

    pub fn vmm_tasks(&self) -> PathBuf {
        self.vmm.join("tasks")
    }

    pub fn rt_group(&self) -> &Path {
        &self.rt
    }

    /// Moves the calling thread into the RT group (a thread that ends
    /// leaves it by itself).
    pub fn join_rt(&self) -> Result<(), String> {
        // SAFETY: gettid has no preconditions.
        write_file(&self.rt_tasks(), unsafe { libc::gettid() })
    }

    /// The way back to the root group for the calling vCPU thread, opened
    /// now, while the thread may still open cgroup files (before it takes on
    /// the share owner's file identity and confines itself).
    pub fn exit_for_this_thread(&self) -> Result<CgroupExit, String> {
        let path = self.root.join("tasks");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .map(CgroupExit)
            .map_err(|e| format!("opening {}: {e}", path.display()))
    }
}

/// A vCPU thread's way out of the VM's RT cgroups: [`CgroupExit::leave`]
/// moves it back to the root group, so the groups are empty once the VM is
/// gone. (KVM's own worker threads, created by the first KVM_RUN in the
/// cgroup of that vCPU thread, leave when the VM fd closes; `RunningVm`
/// closes it before it removes the groups.)
#[derive(Debug)]
pub struct CgroupExit(File);

impl CgroupExit {
    pub fn leave(mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Err(e) = self.0.write_all(tid.to_string().as_bytes()) {
            tracing::warn!("vCPU thread cannot leave its cgroup: {e}");
        }
    }
}

impl Drop for RtCgroups {
    fn drop(&mut self) {
        let _lock = BudgetLock::take();
        // A removed group still counts against its parent until the kernel
        // has let go of it, some time after rmdir: give its runtime back
        // first, so the shared group can shrink (and the next VM's fits).
        for dir in [&self.rt, &self.vmm, &self.vm] {
            let _ = write_file(&dir.join("cpu.rt_runtime_us"), 0);
        }
        // The vCPU threads have left and been joined; an EBUSY can still
        // happen for a moment while the kernel lets go of them.
        for dir in [&self.rt, &self.vmm, &self.vm] {
            let mut tries = 0;
            while let Err(e) = fs::remove_dir(dir) {
                tries += 1;
                if e.raw_os_error() != Some(libc::EBUSY) || tries == 200 {
                    tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        // Give back what this VM took from the host's RT budget.
        if let Some(base) = self.vm.parent() {
            if let Err(e) = size_shared_group(&self.root, base, None) {
                tracing::warn!("cannot shrink the RT bandwidth of {}: {e}", base.display());
            }
        }
    }
}

/// Serialises changes to the shared `rtvm` group's RT budget among rtvm
/// processes (an flock, released when dropped).
struct BudgetLock {
    _file: Option<File>,
}

impl BudgetLock {
    const PATH: &'static str = "/run/rtvm-rt-bandwidth.lock";

    fn take() -> BudgetLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::PATH);
        match file {
            Ok(file) => {
                use std::os::fd::AsRawFd;
                // SAFETY: an open descriptor; flock blocks until it is ours.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    tracing::debug!("flock {}: {}", Self::PATH, std::io::Error::last_os_error());
                }
                BudgetLock { _file: Some(file) }
            }
            Err(e) => {
                tracing::debug!(
                    "cannot open {}: {e}; RT budget changes unserialised",
                    Self::PATH
                );
                BudgetLock { _file: None }
            }
        }
    }
}

/// The share of a CPU an RT group may use, as the kernel reckons it.
fn ratio(runtime_us: u64, period_us: u64) -> f64 {
    runtime_us as f64 / period_us.max(1) as f64
}

/// Sets the shared `rtvm` group's RT runtime to what its VM groups need,
/// plus `adding` (a group about to be made): the host's RT budget beyond
/// that stays with the host, and a VM that ends gives its part back.
fn size_shared_group(root: &Path, base: &Path, adding: Option<RtBandwidth>) -> Result<(), String> {
    let period = read_u64(&root.join("cpu.rt_period_us")).unwrap_or(1_000_000);
    let mut need = adding.map_or(0.0, |bw| ratio(bw.runtime_us, bw.period_us));
    let mut groups = 0u64;
    for entry in fs::read_dir(base)
        .map_err(|e| format!("{}: {e}", base.display()))?
        .flatten()
    {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        if let (Some(runtime), Some(p)) = (
            read_u64(&dir.join("cpu.rt_runtime_us")),
            read_u64(&dir.join("cpu.rt_period_us")),
        ) {
            need += ratio(runtime, p);
            groups += 1;
        }
    }
    // The kernel compares rounded-down ratios: a microsecond of slack per
    // group keeps the sum of the children within their parent.
    let runtime = if need == 0.0 {
        0
    } else {
        (need * period as f64).ceil() as u64 + groups + 1
    };
    write_file(&base.join("cpu.rt_period_us"), period)?;
    write_file(&base.join("cpu.rt_runtime_us"), runtime)
        .map_err(|e| format!("{e} (the host's RT bandwidth is held by other groups)"))
}

fn write_file(path: &Path, value: impl fmt::Display) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.to_string().as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

const CGROUP_V1_CPU: &str = "/sys/fs/cgroup/cpu";
const CGROUP_V2_ROOT: &str = "/sys/fs/cgroup/cgroup.controllers";

/// Removes the groups of rtvm processes that are gone (killed before they
/// could clean up), so their RT bandwidth returns to the pool.
fn remove_stale_groups(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = entry.path();
        for child in ["rt", "vmm"] {
            let _ = fs::remove_dir(dir.join(child));
        }
        match fs::remove_dir(&dir) {
            Ok(()) => tracing::info!("removed stale cgroup {}", dir.display()),
            Err(e) => tracing::debug!("stale cgroup {} stays: {e}", dir.display()),
        }
    }
}

/// Creates the VM's RT groups under the v1 cpu controller at `root`.
fn create_cgroups_v1(root: &Path, bw: RtBandwidth) -> Result<RtCgroups, String> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = root.join("rtvm");
    if !base.exists() {
        fs::create_dir(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    }
    // The shared rtvm group holds what its VMs' groups need, this one's
    // included, and no more: the rest of the host's RT budget stays free.
    let lock = BudgetLock::take();
    remove_stale_groups(&base);
    size_shared_group(root, &base, Some(bw))?;
    let vm = base.join(format!(
        "vm-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&vm).map_err(|e| format!("creating {}: {e}", vm.display()))?;
    let groups = RtCgroups {
        root: root.to_path_buf(),
        rt: vm.join("rt"),
        vmm: vm.join("vmm"),
        vm,
    };
    let setup = || -> Result<(), String> {
        write_file(&groups.vm.join("cpu.rt_period_us"), bw.period_us)?;
        write_file(&groups.vm.join("cpu.rt_runtime_us"), bw.runtime_us)
            .map_err(|e| format!("{e} (other rtvm VMs may hold the RT bandwidth)"))?;
        for dir in [&groups.rt, &groups.vmm] {
            fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            write_file(&dir.join("cpu.rt_period_us"), bw.period_us)?;
        }
        write_file(&groups.rt.join("cpu.rt_runtime_us"), bw.runtime_us)
    };
    let result = setup();
    // Dropping the groups takes the lock again.
    drop(lock);
    match result {
        Ok(()) => Ok(groups),
        Err(e) => {
            // Dropping removes what was created.
            if !groups.rt.exists() {
                let _ = fs::create_dir(&groups.rt);
            }
            if !groups.vmm.exists() {
                let _ = fs::create_dir(&groups.vmm);
            }
            drop(groups);
            Err(e)
        }
    }
}

/// Process-wide real-time state held while an RT vCPU exists.
#[derive(Default)]
pub struct RtHost {
    pub cgroups: Option<Arc<RtCgroups>>,
    _dma_latency: Option<File>,
}

/// What the whole VM asks of the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct RtHostSettings {
    pub bandwidth: RtBandwidth,
    pub mlock: bool,
    /// Run RT vCPUs even where no per-VM cap can be made (see
    /// `VmConfig::rt_allow_uncapped`).
    pub allow_uncapped: bool,
}

impl RtHost {
    /// Applies the process-wide settings for a VM with `rt_vcpus` RT vCPUs.
    /// Refuses (with the reason) when no per-VM RT bandwidth cap can be
    /// made and running uncapped was not allowed: an RT vCPU that spins
    /// must never get more of a CPU than the cap promises, and the kernel's
    /// system-wide throttle alone leaves the host 5 %.
    pub fn setup(
        settings: RtHostSettings,
        rt_vcpus: usize,
        report: &mut RtReport,
    ) -> Result<RtHost, String> {
        report.preemption = HostInfo::probe().preemption;
        if rt_vcpus == 0 {
            return Ok(RtHost::default());
        }
        let cgroups = if Path::new(CGROUP_V1_CPU).join("cpu.rt_runtime_us").exists() {
            let bw = settings.bandwidth;
            let what = format!(
                "RT bandwidth cap {} of every {} µs for RT vCPUs (cgroup v1 cpu controller)",
                bw.runtime_us, bw.period_us
            );
            match create_cgroups_v1(Path::new(CGROUP_V1_CPU), bw) {
                Ok(g) => {
                    report.record(format!("{what}: {}", g.rt_group().display()), Ok(()));
                    Some(Arc::new(g))
                }
                Err(e) => {
                    report.record(what, Err(e));
                    None
                }
            }
        } else if Path::new(CGROUP_V2_ROOT).exists() {
            let system = read_u64(Path::new("/proc/sys/kernel/sched_rt_runtime_us"));
            report.record(
                "RT bandwidth cap for RT vCPUs",
                Err(format!(
                    "cgroup v2 has no per-group RT bandwidth on this kernel; only the system-wide RT throttle \
                     applies (sched_rt_runtime_us = {})",
                    system.map_or("unknown".into(), |v| v.to_string())
                )),
            );
            None
        } else if Path::new(CGROUP_V1_CPU).join("cpu.shares").exists() {
            report.record(
                "RT bandwidth cap for RT vCPUs",
                Err(
                    "the cgroup v1 cpu controller has no RT bandwidth (a kernel built without \
                     CONFIG_RT_GROUP_SCHED); only the system-wide RT throttle applies"
                        .into(),
                ),
            );
            None
        } else {
            report.record(
                "RT bandwidth cap for RT vCPUs",
                Err("no cgroup cpu controller is mounted".into()),
            );
            None
        };
        if cgroups.is_none() {
            let why = report
                .failures()
                .last()
                .and_then(|f| f.result.clone().err())
                .unwrap_or_default();
            if !settings.allow_uncapped {
                return Err(format!(
                    "RT vCPUs need a per-VM RT bandwidth cap, and none can be made here ({why}); \
                     to run them under only the kernel's system-wide RT throttle, allow it \
                     explicitly (rt_allow_uncapped)"
                ));
            }
            report.record(
                "RT vCPUs run without a per-VM RT bandwidth cap (allowed: rt_allow_uncapped)",
                Ok(()),
            );
        }

        let dma_latency = match hold_cpu_dma_latency() {
            Ok(f) => {
                report.record(
                    "/dev/cpu_dma_latency held at 0 µs (no deep C-states)",
                    Ok(()),
                );
                Some(f)
            }
            Err(e) => {
                report.record("/dev/cpu_dma_latency held at 0 µs", Err(e));
                None
            }
        };

        if settings.mlock {
            // SAFETY: plain syscall.
            let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
            let result = if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            };
            report.record("mlockall (guest RAM and VMM memory locked)", result);
        }
        Ok(RtHost {
            cgroups,
            _dma_latency: dma_latency,
        })
    }
}

/// Applies `policy` (or, for a non-RT vCPU, the `vmm` group) to the calling
/// thread; returns what was tried.
pub fn apply_to_current_thread(
    index: usize,
    policy: Option<&RtPolicy>,
    cgroups: Option<&RtCgroups>,
    rt_cpus: &[usize],
) -> Vec<RtItem> {
    let mut items = Vec::new();
    let vcpu = Some(index);
    let mut record =
        |what: String, result: Result<(), String>| items.push(RtItem { vcpu, what, result });
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let Some(policy) = policy else {
        if let Some(groups) = cgroups {
            record(
                format!("vCPU {index}: in cgroup {}", groups.vmm.display()),
                write_file(&groups.vmm_tasks(), tid),
            );
        }
        // A busy ordinary vCPU on an RT vCPU's CPU delays it: getting a
        // thread out of guest mode takes a VM exit (tens of µs measured on
        // a nested host), so it is kept to the other CPUs.
        if !rt_cpus.is_empty() {
            record(
                format!("vCPU {index}: kept off the RT vCPUs' CPUs {rt_cpus:?}"),
                keep_off(rt_cpus),
            );
        }
        return items;
    };
    // The group needs its RT runtime before SCHED_FIFO is allowed in it, which
    // create_cgroups_v1 gave it; so join first, then change the policy.
    if let Some(groups) = cgroups {
        record(
            format!("vCPU {index}: in cgroup {}", groups.rt.display()),
            write_file(&groups.rt_tasks(), tid),
        );
    }
    items.extend(
        apply_thread_policy(&format!("vCPU {index}"), policy)
            .into_iter()
            .map(|item| RtItem { vcpu, ..item }),
    );
    items
}

/// Takes `cpus` out of the calling thread's affinity (an error, and the
/// affinity unchanged, if no CPU would be left).
pub fn keep_off(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: the calling thread's affinity into a set of the size passed.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    for &cpu in cpus {
        // SAFETY: a CPU index below CPU_SETSIZE (validated with the policy).
        unsafe { libc::CPU_CLR(cpu, &mut set) };
    }
    // SAFETY: reads the set just written.
    if unsafe { libc::CPU_COUNT(&set) } == 0 {
        return Err("every CPU it may use is an RT vCPU's".into());
    }
    // SAFETY: a live set of the size passed, for the calling thread.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Applies an RT policy to the calling thread: SCHED_FIFO, pinning, 1 ns
/// timer slack. `who` names the thread in the report ("vCPU 1", "host path").
pub fn apply_thread_policy(who: &str, policy: &RtPolicy) -> Vec<RtItem> {
    let mut items = Vec::new();
    let mut record = |what: String, rc: libc::c_int| {
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        };
        items.push(RtItem {
            vcpu: None,
            what,
            result,
        });
    };
    let param = libc::sched_param {
        sched_priority: i32::from(policy.priority),
    };
    // SAFETY: pid 0 is the calling thread; param is a live struct.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    record(
        format!("{who}: SCHED_FIFO priority {}", policy.priority),
        rc,
    );
    if let Some(cpu) = policy.cpu {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds as cpu was validated.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        record(format!("{who}: pinned to host CPU {cpu}"), rc);
    }
    // SAFETY: plain prctl on the calling thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    record(format!("{who}: timer slack 1 ns"), rc);
    items
}

/// Holds `/dev/cpu_dma_latency` at 0 µs (no deep C-states) while the file lives.
pub fn hold_cpu_dma_latency() -> Result<File, String> {
    OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|_| f))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_failures() {
        let mut r = RtReport {
            preemption: "full".into(),
            ..Default::default()
        };
        r.record("a", Ok(()));
        r.record("b", Err("no permission".into()));
        assert_eq!(r.failures().count(), 1);
        let text = r.to_string();
        assert!(
            text.contains("[ok]     a") && text.contains("[FAILED] b: no permission"),
            "{text}"
        );
    }
}
