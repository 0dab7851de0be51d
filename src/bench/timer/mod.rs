//! `rtvm bench timer`: the same periodic task, with absolute deadlines,
//! measured back to back on one machine along each path a real-time task
//! could take:
//!
//! - `host`: a host thread at the same SCHED_FIFO priority and CPU sleeping
//!   with `clock_nanosleep(TIMER_ABSTIME)` — what cyclictest measures;
//! - `guest_interrupt`: the conventional path in the built-in guest: its
//!   kernel programs the LAPIC TSC-deadline timer, halts, and the interrupt
//!   wakes the task (`timer-irq` workload);
//! - `guest_longpoll`: the task on an RT vCPU waiting through VMRPC long
//!   polling with the adaptive timer advance (`periodic` workload);
//! - `guest_longpoll_noadvance` (optional): the same without the advance.
//!
//! Lateness = wake time − deadline, in host CLOCK_MONOTONIC ns; in the guest
//! it is taken at CPL3 from the TSC mapped to host time by the VMM's
//! (host time, guest TSC) pair, and for long polling also cross-checked by
//! the host's own record of when it handed control back.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rtvm_abi::vmrpc::HOST_STREAM;
use rtvm_vmm::clock::now_ns;
use rtvm_vmm::config::RtPolicy;
use rtvm_vmm::config::{AdvanceMode, HugePages, DEFAULT_MAX_ADVANCE_NS};
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::realtime::{self, RtItem};
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};
use serde_json::{json, Value};

use crate::report::histogram::Histogram;
use crate::report::machine_json;
use crate::report::plot::latency_svg;
use crate::report::stats::Stats;
use crate::report::PathResult;

mod report;
mod sched_trace;
mod stages;
mod steal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// A cyclictest-like periodic task (period from --period-us).
    Periodic,
    /// Frame pacing, the media-player case: a frame every 16.667 ms, each
    /// followed by --frame-work-us of rendering.
    Frames,
}

#[derive(Args, Clone)]
pub struct TimerArgs {
    /// Total measuring time in seconds, split evenly between the paths.
    #[arg(long, default_value_t = 10.0, conflicts_with = "minutes")]
    pub seconds: f64,
    /// A long run: M minutes in all, one round a minute (unless --rounds
    /// says otherwise), each round's figures so far printed to stderr as it
    /// ends; the final table or JSON as for --seconds.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub minutes: Option<u64>,
    /// Period of the task, in µs (periodic workload).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=1_000_000))]
    pub period_us: u64,
    /// Load the host (a busy SCHED_OTHER thread per CPU) and guest vCPU 0
    /// (busy housekeeping) for every path; guest_longpoll is first also
    /// measured without load, as the baseline for its growth.
    #[arg(long)]
    pub load: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write a cyclictest-format histogram per path into DIR.
    #[arg(long, value_name = "DIR")]
    pub histogram_dir: Option<PathBuf>,
    /// Draw the latency distributions into an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Also run cyclictest (Debian rt-tests) on the host, as a reference for `host`.
    #[arg(long)]
    pub with_cyclictest: bool,
    /// Also measure long polling with the timer advance off.
    #[arg(long)]
    pub with_noadvance: bool,
    /// What the task does.
    #[arg(long, value_enum, default_value_t = Workload::Periodic)]
    pub workload: Workload,
    /// Rendering time per frame in µs (frames workload).
    #[arg(long, default_value_t = 2000)]
    pub frame_work_us: u64,
    /// SCHED_FIFO priority of the measuring thread/vCPU.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub priority: u8,
    /// Host CPU the measuring thread/vCPU is pinned to [default: the last CPU].
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Instead of the built-in guest, run an unmodified cyclictest in a Linux
    /// guest booted from KERNEL, with and without the preload library,
    /// beside the host's cyclictest (needs hardware KVM).
    #[arg(long, value_name = "KERNEL", requires = "linux_tools")]
    pub linux: Option<PathBuf>,
    /// Run every path this many times in turn, each for its share of the
    /// time, and pool the results: a noisy host's drift then falls on every
    /// path alike [default: 1, or 4 with --compare-memory].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub rounds: Option<u64>,
    /// Also measure long polling with guest RAM on 4 KiB pages
    /// (`guest_longpoll_4k`) and with RAM prefaulted
    /// (`guest_longpoll_prefault`), beside the default (transparent huge
    /// pages, faulted lazily), alternating round by round.
    #[arg(long)]
    pub compare_memory: bool,
    /// List the worst long-poll wake-ups, each broken down by stage (host
    /// timer, advance spin, rtvm's path back, VM entry).
    #[arg(long)]
    pub trace: bool,
    /// Directory holding the guest tools for --linux: a static `rtvm-guest`
    /// and `librtvm_preload.so`.
    #[arg(long, value_name = "DIR")]
    pub linux_tools: Option<PathBuf>,
}

/// Frame period of the frames workload (60 Hz).
const FRAME_PERIOD_NS: u64 = 16_666_667;
/// A frame more than this late is a visible miss.
const FRAME_MISS_NS: u64 = 1_000_000;
/// Targets from the timer-evaluation issue.
const TARGET_LONGPOLL_OVER_HOST_P99: f64 = 1.0;
const TARGET_LONGPOLL_OVER_INTERRUPT_P99: f64 = 0.5;
const TARGET_LOAD_GROWTH_P99: f64 = 1.5;

/// Everything one run of the bench measured.
pub struct TimerReport {
    pub paths: Vec<PathResult>,
    pub rt: Vec<RtItem>,
    pub host: HostInfo,
    pub period_ns: u64,
    pub work_ns: u64,
    pub seconds_per_path: f64,
    pub load: bool,
    pub workload: Workload,
    /// Long-poll paths' wake-ups, stage by stage (see `stages`).
    pub breakdowns: Vec<(&'static str, Vec<stages::Breakdown>)>,
    /// The interrupt path's wake-ups, for the trace to break down.
    pub irq_wakes: Vec<(&'static str, Vec<stages::IrqWake>)>,
    /// Steal time on the RT CPU while each path ran, ns (`None`: the
    /// kernel does not show it).
    pub steal_ns: Vec<(&'static str, Option<u64>)>,
    /// The RT CPU's steal time sampled through the run (`--trace`), as
    /// (host ns, steal ns so far), to say what of a late wake-up the
    /// hypervisor below took.
    pub steal_samples: Option<Vec<(u64, u64)>>,
    /// How many of the worst wake-ups to list (`--trace`); 0: none.
    pub worst: usize,
    /// Context switches and wake-ups on the RT CPU during the run
    /// (`--trace`), to say what ran there instead of the vCPU thread.
    pub trace: Option<sched_trace::Trace>,
    pub cpu: usize,
}

impl TimerReport {
    pub fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }

    fn p99(&self, name: &str) -> Option<f64> {
        self.path(name).map(|p| p.stats.p99_us)
    }

    /// (name, value, target) of each ratio the issue sets a target for.
    pub fn ratios(&self) -> Vec<(&'static str, f64, f64)> {
        let mut out = Vec::new();
        if let (Some(lp), Some(host)) = (self.p99("guest_longpoll"), self.p99("host")) {
            out.push((
                "longpoll_p99_over_host_p99",
                lp / host,
                TARGET_LONGPOLL_OVER_HOST_P99,
            ));
        }
        if let (Some(lp), Some(irq)) = (self.p99("guest_longpoll"), self.p99("guest_interrupt")) {
            out.push((
                "longpoll_p99_over_interrupt_p99",
                lp / irq,
                TARGET_LONGPOLL_OVER_INTERRUPT_P99,
            ));
        }
        if let (Some(lp), Some(quiet)) = (
            self.p99("guest_longpoll"),
            self.p99("guest_longpoll_noload"),
        ) {
            out.push((
                "longpoll_p99_load_over_noload",
                lp / quiet,
                TARGET_LOAD_GROWTH_P99,
            ));
        }
        out
    }
}

fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

fn sleep_until(deadline: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid clock id, flags and a live timespec; EINTR just retries.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
}

fn spin_for(ns: u64) {
    let until = now_ns() + ns;
    while now_ns() < until {
        std::hint::spin_loop();
    }
}

/// The `host` path: the task as a plain host thread, like cyclictest's.
fn host_path(
    policy: RtPolicy,
    period: u64,
    count: u64,
    work: u64,
    rt: &Mutex<Vec<RtItem>>,
) -> PathResult {
    let (late, missed, items, cpu) = std::thread::spawn(move || {
        let items = realtime::apply_thread_policy("host path thread", &policy);
        let cpu_before = rtvm_vmm::clock::thread_cpu_ns();
        let mut late = Vec::with_capacity(count as usize);
        let mut missed = 0;
        let mut next = now_ns() + period;
        for _ in 0..count {
            // Same rule as the guest paths: deadlines already gone are
            // counted as missed and skipped.
            let now = now_ns();
            if now >= next {
                let gone = (now - next) / period + 1;
                missed += gone;
                next += gone * period;
            }
            sleep_until(next);
            late.push(now_ns().saturating_sub(next));
            spin_for(work);
            next += period;
        }
        let cpu = rtvm_vmm::clock::thread_cpu_ns() - cpu_before;
        (late, missed, items, cpu)
    })
    .join()
    .expect("host path thread");
    rt.lock().unwrap().extend(items);
    let stats = Stats::from_ns(&late).expect("samples");
    PathResult {
        name: "host",
        cpu_per_period_ns: Some(cpu / count.max(1)),
        late_ns: late,
        missed,
        host_side_ns: Vec::new(),
        stats,
    }
}

/// A guest path: `workload` on RT vCPU 1, vCPU 0 idle or busy.
#[allow(clippy::too_many_arguments)]
fn guest_path(
    name: &'static str,
    workload: &str,
    advance: AdvanceMode,
    (huge_pages, prefault): (HugePages, bool),
    policy: RtPolicy,
    period: u64,
    count: u64,
    work: u64,
    busy_vcpu0: bool,
    rt: &Mutex<Vec<RtItem>>,
) -> Result<GuestPath, String> {
    let mut config = VmConfig::new(GuestSpec::Builtin(workload.into()));
    config.sample_streams = true;
    config.vcpus = 2;
    config.set_rt(1, policy);
    // A bench's guest works in bounded bursts; where no cap can be made it
    // still runs, and its RT report says so.
    config.rt_allow_uncapped = true;
    config.timer_advance = advance;
    config.huge_pages = huge_pages;
    config.prefault = prefault;
    let housekeeping = if busy_vcpu0 { "busy" } else { "none" };
    config.cmdline =
        format!("rt=1 period={period} count={count} work={work} housekeeping={housekeeping}");
    let console = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::new(&config, Console::capture(console.clone())).map_err(|e| e.to_string())?;
    let run = vm.run().map_err(|e| e.to_string())?;
    if run.reason.exit_code() != 0 {
        let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
        return Err(format!(
            "{name}: the guest did not finish cleanly ({}):\n{text}",
            run.reason
        ));
    }
    // The RT vCPU's steps and the VM's own (its cgroups, how its RAM is backed).
    rt.lock().unwrap().extend(
        run.rt_report
            .items
            .iter()
            .filter(|i| i.vcpu.is_none_or(|v| v == 1))
            .cloned(),
    );
    let mut streams = run.streams;
    let late = std::mem::take(&mut streams[0]);
    let missed = streams[1].iter().sum();
    let host_side = std::mem::take(&mut streams[HOST_STREAM as usize]);
    let stats =
        Stats::from_ns(&late).ok_or_else(|| format!("{name}: the guest reported no samples"))?;
    // The RT vCPU's thread over the whole run (boot and the end included,
    // a few ms against seconds of periods).
    let cpu = run.vcpu_cpu.get(1).copied().flatten();
    let breakdowns = stages::join(&run.wakes, 1, &late);
    let irq_wakes = match workload {
        "timer-irq" => stages::irq_wakes(&streams[2], &late),
        _ => Vec::new(),
    };
    Ok((
        PathResult {
            name,
            cpu_per_period_ns: cpu.map(|c| c.as_nanos() as u64 / count.max(1)),
            late_ns: late,
            missed,
            host_side_ns: host_side,
            stats,
        },
        breakdowns,
        irq_wakes,
    ))
}

/// A guest path's result, its long-poll wake-ups stage by stage, and its
/// interrupt-path wake-ups.
type GuestPath = (
    PathResult,
    Option<Vec<stages::Breakdown>>,
    Vec<stages::IrqWake>,
);

/// cyclictest on the host for the same time, as a reference for `host`.
fn cyclictest_path(policy: RtPolicy, period: u64, seconds: f64) -> Result<PathResult, String> {
    let out = std::process::Command::new("cyclictest")
        .args(["-q", "-m", "-t1"])
        .arg(format!("-p{}", policy.priority))
        .arg(format!("-a{}", policy.cpu.unwrap_or_else(last_cpu)))
        .arg(format!("-i{}", period / 1000))
        .arg(format!("-D{}", seconds.ceil() as u64))
        .arg("-h10000")
        .output()
        .map_err(|e| {
            format!("cannot run cyclictest ({e}); on Debian it is in the rt-tests package")
        })?;
    if !out.status.success() {
        return Err(format!(
            "cyclictest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut late = Vec::new();
    for (us, count) in Histogram::parse_cyclictest(&String::from_utf8_lossy(&out.stdout)) {
        late.extend(std::iter::repeat_n(us * 1000, count as usize));
    }
    let stats = Stats::from_ns(&late).ok_or("cyclictest reported no samples")?;
    Ok(PathResult {
        name: "host_cyclictest",
        late_ns: late,
        missed: 0,
        host_side_ns: Vec::new(),
        stats,
        cpu_per_period_ns: None,
    })
}

/// Busy SCHED_OTHER threads on every CPU until dropped.
struct HostLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostLoad {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..=last_cpu())
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        HostLoad { stop, threads }
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs every path and returns the report.
pub fn measure(args: &TimerArgs) -> Result<TimerReport, String> {
    let host = HostInfo::probe();
    let cpu = args.cpu.unwrap_or_else(last_cpu);
    let policy = RtPolicy {
        priority: args.priority,
        cpu: Some(cpu),
    };
    policy.validate()?;
    let seconds = args.minutes.map_or(args.seconds, |m| m as f64 * 60.0);
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!("--seconds {seconds}: must be between 0 and 86400"));
    }
    if let Some(tools) = &args.linux_tools {
        super::linux::check_tools(tools)?;
    }
    let (period, work) = match args.workload {
        Workload::Periodic => (args.period_us * 1000, 0),
        Workload::Frames => (FRAME_PERIOD_NS, args.frame_work_us * 1000),
    };
    if work >= period {
        return Err(format!(
            "--frame-work-us {} does not fit in a {} µs frame",
            args.frame_work_us,
            period / 1000
        ));
    }
    if args.linux.is_none() {
        super::need_tsc_clock("bench timer (the built-in guest's paths)")?;
    }
    // With --load, long polling is first measured quiet, as the baseline
    // its growth under load is judged against; then every path runs loaded.
    let mut names = Vec::new();
    if args.linux.is_some() {
        names.extend([
            "host",
            "host_cyclictest",
            "linux_cyclictest",
            "linux_cyclictest_longpoll",
        ]);
    } else {
        if args.load {
            names.push("guest_longpoll_noload");
        }
        names.extend(["host", "guest_interrupt", "guest_longpoll"]);
    }
    if args.with_noadvance {
        names.push("guest_longpoll_noadvance");
    }
    if args.with_cyclictest && args.linux.is_none() {
        names.push("host_cyclictest");
    }
    if args.compare_memory && args.linux.is_none() {
        names.extend(["guest_longpoll_4k", "guest_longpoll_prefault"]);
    }
    let rounds = args
        .rounds
        .unwrap_or(match (args.minutes, args.compare_memory) {
            (Some(minutes), _) => minutes,
            (None, true) => 4,
            (None, false) => 1,
        });
    let per_path = seconds / names.len() as f64;
    let per_round = per_path / rounds as f64;
    let count = ((per_round * 1e9) / period as f64).ceil().max(10.0) as u64;

    let progress = ProgressBar::new((seconds * 10.0) as u64);
    progress.set_style(
        ProgressStyle::with_template("{msg:>26} [{bar:30}] {elapsed}/{duration}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let ticking = Arc::new(AtomicBool::new(true));
    let ticker = {
        let (progress, ticking) = (progress.clone(), ticking.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while ticking.load(Ordering::Relaxed) {
                progress.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let rt = Mutex::new(Vec::new());
    let dma = realtime::hold_cpu_dma_latency();
    rt.lock().unwrap().push(RtItem {
        vcpu: None,
        what: "/dev/cpu_dma_latency held at 0 µs".into(),
        result: dma.as_ref().map(drop).map_err(Clone::clone),
    });
    let _dma = dma.ok();
    let adaptive = AdvanceMode::Adaptive {
        max_ns: DEFAULT_MAX_ADVANCE_NS,
    };
    let mut paths = Vec::new();
    let mut breakdowns = Vec::new();
    let mut irq_wakes = Vec::new();
    let mut steal_ns: Vec<(&'static str, Option<u64>)> = Vec::new();
    let mut load: Option<HostLoad> = None;
    let trace = if args.trace && args.linux.is_none() {
        let started = sched_trace::SchedTrace::start(cpu);
        rt.lock().unwrap().push(RtItem {
            vcpu: None,
            what: format!("sched_switch traced on CPU {cpu} (tracefs)"),
            result: started.as_ref().map(drop).map_err(Clone::clone),
        });
        started.ok()
    } else {
        None
    };
    let steal_sampler = if trace.is_some() {
        steal::StealSampler::start(cpu)
    } else {
        None
    };
    let result = (|| {
        for _ in 0..rounds {
            for &name in &names {
                progress.set_message(name);
                if args.load && name != "guest_longpoll_noload" && load.is_none() {
                    load = Some(HostLoad::start());
                }
                let busy = load.is_some();
                let steal_before = steal::steal_ns(cpu);
                let mut guest = |workload: &str, advance: AdvanceMode, backing| {
                    let (path, stages, irq) = guest_path(
                        name, workload, advance, backing, policy, period, count, work, busy, &rt,
                    )?;
                    if let Some(stages) = stages {
                        merge_rounds(&mut breakdowns, name, stages, |b| &mut b.cycle);
                    }
                    if !irq.is_empty() {
                        merge_rounds(&mut irq_wakes, name, irq, |w| &mut w.cycle);
                    }
                    Ok::<_, String>(path)
                };
                let lazy_thp = (HugePages::Transparent, false);
                let path = match name {
                    "host" => host_path(policy, period, count, work, &rt),
                    "guest_interrupt" => guest("timer-irq", AdvanceMode::Off, lazy_thp)?,
                    "guest_longpoll" | "guest_longpoll_noload" => {
                        guest("periodic", adaptive, lazy_thp)?
                    }
                    "guest_longpoll_noadvance" => guest("periodic", AdvanceMode::Off, lazy_thp)?,
                    "guest_longpoll_4k" => guest("periodic", adaptive, (HugePages::Off, false))?,
                    "guest_longpoll_prefault" => {
                        guest("periodic", adaptive, (HugePages::Transparent, true))?
                    }
                    "host_cyclictest" => cyclictest_path(policy, period, per_round)?,
                    "linux_cyclictest" => {
                        let kernel = args.linux.as_deref().expect("names come from --linux");
                        let tools = args.linux_tools.as_deref().expect("clap requires it");
                        let mut both =
                            super::linux::measure(kernel, tools, policy, period, per_round, &rt)?;
                        let polled = both.pop().expect("two paths");
                        merge_path(&mut paths, both.pop().expect("two paths"));
                        polled
                    }
                    // Measured together with linux_cyclictest, in one boot.
                    "linux_cyclictest_longpoll" => continue,
                    _ => unreachable!("path names are fixed above"),
                };
                merge_path(&mut paths, path);
                let stolen = steal_before.zip(steal::steal_ns(cpu)).map(|(a, b)| b - a);
                match steal_ns.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, total)) => *total = total.zip(stolen).map(|(a, b)| a + b),
                    None => steal_ns.push((name, stolen)),
                }
            }
            // Each round's quiet baseline is quiet again.
            load = None;
            if args.minutes.is_some() {
                progress.suspend(|| {
                    for p in &paths {
                        eprintln!(
                            "so far, {:<24} {} samples, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs, {} missed",
                            p.name, p.stats.samples, p.stats.p99_us, p.stats.p999_us, p.stats.max_us, p.missed
                        );
                    }
                });
            }
        }
        Ok::<(), String>(())
    })();
    drop(load);
    let steal_samples = steal_sampler.map(steal::StealSampler::finish);
    let trace = match trace.map(sched_trace::SchedTrace::finish) {
        Some(Ok(trace)) => Some(trace),
        Some(Err(e)) => {
            eprintln!("rtvm: warning: reading the sched_switch trace: {e}");
            None
        }
        None => None,
    };
    ticking.store(false, Ordering::Relaxed);
    let _ = ticker.join();
    progress.finish_and_clear();
    result?;
    // Every guest path reports the same settings for its own VM; keep one
    // of each, with the per-VM cgroup name made generic.
    let mut rt_items: Vec<RtItem> = Vec::new();
    for mut item in rt.into_inner().unwrap() {
        if let Some(at) = item.what.find("/rtvm/vm-") {
            let rest = &item.what[at + "/rtvm/vm-".len()..];
            let end = rest.find('/').unwrap_or(rest.len());
            item.what = format!("{}/rtvm/vm-*{}", &item.what[..at], &rest[end..]);
        }
        if !rt_items
            .iter()
            .any(|i| i.what == item.what && i.result == item.result)
        {
            rt_items.push(item);
        }
    }
    Ok(TimerReport {
        paths,
        rt: rt_items,
        host,
        period_ns: period,
        work_ns: work,
        seconds_per_path: per_path,
        load: args.load,
        workload: args.workload,
        breakdowns,
        irq_wakes,
        steal_ns,
        steal_samples,
        worst: if args.trace { WORST_LISTED } else { 0 },
        trace,
        cpu,
    })
}

/// Adds one round's result for a path to what earlier rounds measured.
fn merge_path(paths: &mut Vec<PathResult>, round: PathResult) {
    let Some(earlier) = paths.iter_mut().find(|p| p.name == round.name) else {
        paths.push(round);
        return;
    };
    let periods = |p: &PathResult| p.late_ns.len() as u64;
    earlier.cpu_per_period_ns = match (earlier.cpu_per_period_ns, round.cpu_per_period_ns) {
        (Some(a), Some(b)) => {
            let (na, nb) = (periods(earlier), periods(&round));
            Some((a * na + b * nb) / (na + nb).max(1))
        }
        _ => None,
    };
    earlier.late_ns.extend(round.late_ns);
    earlier.host_side_ns.extend(round.host_side_ns);
    earlier.missed += round.missed;
    earlier.stats = Stats::from_ns(&earlier.late_ns).expect("samples from both rounds");
}

/// Adds one round's wake-ups of a path (long-poll breakdowns or
/// interrupt-path wake-ups) to the earlier rounds', cycles numbered on.
fn merge_rounds<T>(
    all: &mut Vec<(&'static str, Vec<T>)>,
    name: &'static str,
    mut round: Vec<T>,
    cycle: fn(&mut T) -> &mut usize,
) {
    match all.iter_mut().find(|(n, _)| *n == name) {
        Some((_, earlier)) => {
            let offset = earlier.len();
            round.iter_mut().for_each(|w| *cycle(w) += offset);
            earlier.extend(round);
        }
        None => all.push((name, round)),
    }
}

/// How many of the worst wake-ups `--trace` lists.
const WORST_LISTED: usize = 10;

pub fn run(args: &TimerArgs) -> Result<(), String> {
    let report = measure(args)?;
    let hist = match &args.histogram_dir {
        Some(dir) => report.write_histograms(dir)?,
        None => Vec::new(),
    };
    if let Some(plot) = &args.plot {
        report.write_plot(plot)?;
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        report.print_table();
        println!("{}", report.summary());
        for f in hist {
            println!("histogram: {}", f.display());
        }
        if let Some(plot) = &args.plot {
            println!("plot: {}", plot.display());
        }
    }
    Ok(())
}
