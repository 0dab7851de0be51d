//! VMRPC and VM long polling, through real guests: the built-in guest's
//! workload runs on one side, the assertion on what the VMM saw on the other.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rtvm_abi::vmrpc::Call;
use rtvm_vmm::config::AdvanceMode;
use rtvm_vmm::config::{RtBandwidth, RtPolicy};
use rtvm_vmm::need_kvm;
use rtvm_vmm::vcpu::VcpuState;
use rtvm_vmm::{Console, Error, RunningVm, Vm, VmConfig, VmExitReason};

mod support;
use support::{assert_exit_0, config, run, start};

/// How long a guest here may take.
const LIMIT: Duration = Duration::from_secs(60);

/// The last host CPU: RT vCPUs in tests are pinned there.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

fn rt(priority: u8) -> RtPolicy {
    RtPolicy {
        priority,
        cpu: Some(last_cpu()),
    }
}

/// Held by tests that run RT vCPUs: each VM reserves 40% of a CPU of RT
/// bandwidth, and the host grants 95% in all, so they take turns.
static RT_BANDWIDTH: Mutex<()> = Mutex::new(());

fn rt_turn() -> std::sync::MutexGuard<'static, ()> {
    RT_BANDWIDTH.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn ping_is_answered() {
    need_kvm!();
    let (run, out) = run(&config("rpc-ping", 1, "count=500"), LIMIT);
    assert_exit_0(&run, &out);
    assert!(out.contains("rpc-ping: 500 calls answered"), "{out}");
}

#[test]
fn sleep_until_wakes_after_never_before_the_deadline() {
    need_kvm!();
    let _turn = rt_turn();
    // A plain vCPU (host arms its timer at the deadline) and an RT vCPU with
    // the adaptive advance (early return, then a CPL3 spin in the guest).
    let plain = config("sleep-test", 1, "count=20 ns=2000000");
    let mut realtime = plain.clone();
    realtime.set_rt(0, rt(70));
    realtime.rt_allow_uncapped = true;
    for c in [plain, realtime] {
        let (run, out) = run(&c, LIMIT);
        assert_exit_0(&run, &out);
        assert!(out.contains("sleep-test: 20 sleeps, none early"), "{out}");
    }
}

/// Issue #12: sample streams exist only in benchmark runs, so a guest's
/// `Report` calls cannot grow the VMM's memory in an ordinary run; a guest
/// that reports anyway (its samples are for a benchmark) runs on.
#[test]
fn reports_are_refused_outside_benchmarks_and_the_vmm_keeps_nothing() {
    need_kvm!();
    let (run, out) = run(&config("periodic", 1, "period=1000000 count=600"), LIMIT);
    assert_exit_0(&run, &out);
    assert!(out.contains("periodic: cycles=600"), "{out}");
    assert!(run.streams.iter().all(Vec::is_empty), "no samples kept");
    let reports = run
        .calls
        .calls
        .iter()
        .find(|(call, _)| *call == Call::Report)
        .map(|(_, n)| *n);
    assert_eq!(
        reports,
        Some(1),
        "the guest stops reporting after the refusal"
    );
    assert!(run.calls.refused >= 1);
}

#[test]
fn periodic_counts_missed_periods_when_the_task_overruns() {
    need_kvm!();
    let _turn = rt_turn();
    let mut c = config(
        "periodic",
        2,
        "rt=1 period=2000000 count=60 overrun_every=20",
    );
    c.set_rt(1, rt(70));
    c.rt_allow_uncapped = true;
    c.sample_streams = true;
    let (run, out) = run(&c, LIMIT);
    assert_exit_0(&run, &out);
    assert!(out.contains("periodic: cycles=60"), "{out}");
    assert!(out.contains("housekeeping:"), "vCPU 0 kept working: {out}");
    let missed = &run.streams[1];
    assert_eq!(missed.len(), 60, "one missed count per cycle");
    // Cycles 20 and 40 overran by 3.5 periods: the following waits report
    // 3, or more where the vCPU reached the host late, which the guest
    // checked was counted right for when it did (it exited 0).
    assert!(missed[20] >= 3, "{missed:?}");
    assert!(missed[40] >= 3, "{missed:?}");
    assert!(
        (missed[20] == 3 && missed[40] == 3)
            || out.contains("counted right for when the call reached the host"),
        "{missed:?}: {out}"
    );
    assert_eq!(run.streams[0].len(), 60, "one lateness sample per cycle");
}

#[test]
fn a_parked_vcpu_does_not_stall_the_others() {
    need_kvm!();
    let (running, out) = start(&config("independence", 2, "ns=1000000000"));
    let parked = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        running.vcpus()[1].state() == VcpuState::Waiting
    });
    assert!(parked, "vCPU 1 is seen parked in its long poll");
    let ended = running.wait_timeout(Duration::from_secs(30));
    let run = running.stop();
    let out = out.text();
    assert!(ended.is_some(), "{out}");
    assert_exit_0(&run, &out);
    let line = out
        .lines()
        .find(|l| l.starts_with("independence:"))
        .expect("result line");
    let pings: u64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .expect(line);
    let slept_ms: u64 = line
        .split_whitespace()
        .nth(10)
        .and_then(|n| n.parse().ok())
        .expect(line);
    assert!(pings >= 1000, "vCPU 0 answered thousands of pings: {line}");
    assert!(slept_ms >= 1000, "{line}");
}

/// Starts a guest whose vCPU 0 parks in an hour-long sleep (the longest a
/// call may ask for) and waits until it does.
fn parked_guest() -> RunningVm {
    let (running, _) = start(&config("sleep-test", 1, "count=1 ns=3600000000000"));
    let parked = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        running.vcpus()[0].state() == VcpuState::Waiting
    });
    assert!(parked, "vCPU 0 parks in its long poll");
    running
}

#[test]
fn shutdown_while_parked_is_prompt() {
    need_kvm!();
    let running = parked_guest();
    // The stop must not wait for the sleep's deadline, an hour away. How
    // long a stop takes is `rtvm bench boot`'s to measure; this only allows
    // a minute, far from both.
    let (stopped, run) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = stopped.send(running.stop());
    });
    let run = run
        .recv_timeout(Duration::from_secs(60))
        .expect("stopping a VM whose vCPU is parked waits for the guest's deadline");
    assert_eq!(run.reason, VmExitReason::Stopped);
}

#[test]
fn a_parked_vcpu_pauses_and_resumes_its_wait() {
    need_kvm!();
    let running = parked_guest();
    assert!(running.pause(Duration::from_secs(2)));
    assert_eq!(running.vcpus()[0].state(), VcpuState::Paused);
    running.resume();
    assert!(running.vcpus()[0].wait_for(VcpuState::Waiting, Duration::from_secs(2)));
    assert_eq!(
        running.wait_timeout(Duration::from_millis(100)),
        None,
        "still sleeping"
    );
    running.stop();
}

#[test]
fn every_bad_argument_class_gets_its_status_and_the_vmm_stays_up() {
    need_kvm!();
    // With sample streams, so that Report's own argument checks are reached.
    let mut c = config("bad-calls", 1, "");
    c.sample_streams = true;
    let (run, out) = run(&c, LIMIT);
    assert!(!out.contains("FAIL"), "{out}");
    assert_exit_0(&run, &out);
    let answered = out
        .lines()
        .filter(|l| l.starts_with("bad-calls:") && l.ends_with(" ok"))
        .count();
    assert!(answered >= 14, "{answered} classes: {out}");
    assert!(
        out.contains(&format!("bad-calls: all {answered} classes answered")),
        "{out}"
    );
}

#[test]
fn report_lists_the_applied_rt_settings() {
    need_kvm!();
    let _turn = rt_turn();
    let mut c = config("rpc-ping", 2, "count=10");
    c.set_rt(1, rt(60));
    c.rt_allow_uncapped = true;
    let (run, _) = run(&c, LIMIT);
    let report = run.rt_report.to_string();
    for expected in [
        "vCPU 1: SCHED_FIFO priority 60",
        "vCPU 1: timer slack 1 ns",
        "cpu_dma_latency",
    ] {
        let item = run
            .rt_report
            .items
            .iter()
            .find(|i| i.what.contains(expected));
        let item = item.unwrap_or_else(|| panic!("{expected} missing from\n{report}"));
        assert!(item.result.is_ok(), "{report}");
    }
    assert!(
        report.contains(&format!("vCPU 1: pinned to host CPU {}", last_cpu())),
        "{report}"
    );
    assert!(
        !report.contains("vCPU 0: SCHED_FIFO"),
        "vCPU 0 is not RT: {report}"
    );
    // Issue #16: the ordinary vCPU keeps off the RT vCPU's CPU, where a
    // busy one delayed it by tens of µs.
    let kept_off = run
        .rt_report
        .items
        .iter()
        .find(|i| i.what == format!("vCPU 0: kept off the RT vCPUs' CPUs [{}]", last_cpu()));
    let kept_off = kept_off.unwrap_or_else(|| panic!("vCPU 0 not kept off: {report}"));
    if last_cpu() > 0 {
        assert!(kept_off.result.is_ok(), "{report}");
    }
    assert!(report.contains("preemption model"), "{report}");
    if std::path::Path::new("/sys/fs/cgroup/cpu/cpu.rt_runtime_us").exists() {
        let cap = run
            .rt_report
            .items
            .iter()
            .find(|i| i.what.starts_with("RT bandwidth cap"));
        assert!(
            cap.is_some_and(|i| i.result.is_ok()),
            "cgroup v1 cap applied: {report}"
        );
    }
}

/// Issue #12: an RT vCPU never runs without its per-VM cap unless that is
/// asked for; and `rt_strict` refuses any RT setting that failed.
#[test]
fn an_rt_vm_whose_cap_cannot_be_made_refuses_to_start_unless_allowed() {
    need_kvm!();
    let _turn = rt_turn();
    let mut c = config("rpc-ping", 1, "count=10");
    c.set_rt(0, rt(60));
    // More RT bandwidth than the host grants any group (95% by default), or
    // a host without RT group scheduling: either way, no cap.
    c.rt_bandwidth = RtBandwidth {
        runtime_us: 99_000,
        period_us: 100_000,
    };
    let refusal = |c: &VmConfig| match Vm::new(c, Console::default()).unwrap().start() {
        Err(Error::Realtime(msg)) => msg,
        Err(e) => panic!("wrong error: {e}"),
        Ok(running) => {
            running.stop();
            panic!("started with an RT vCPU and no cap");
        }
    };
    let msg = refusal(&c);
    assert!(
        msg.contains("per-VM RT bandwidth cap") && msg.contains("rt_allow_uncapped"),
        "{msg}"
    );
    c.rt_allow_uncapped = true;
    c.rt_strict = true;
    let msg = refusal(&c);
    assert!(
        msg.contains("strict real-time") && msg.contains("RT bandwidth"),
        "{msg}"
    );
    // Allowed and not strict: the VM runs, and its report says so.
    c.rt_strict = false;
    let (run, out) = run(&c, LIMIT);
    assert_exit_0(&run, &out);
    let report = run.rt_report.to_string();
    assert!(
        run.rt_report
            .failures()
            .any(|f| f.what.contains("RT bandwidth")),
        "{report}"
    );
    assert!(
        report.contains("without a per-VM RT bandwidth cap"),
        "{report}"
    );
}

/// Issue #12: the shared `rtvm` group holds what live VMs' groups need and
/// no more; a VM that ends gives its part of the host's RT budget back.
#[test]
fn the_shared_rt_group_gives_back_what_an_ended_vm_took() {
    need_kvm!();
    let _turn = rt_turn();
    let base = std::path::Path::new("/sys/fs/cgroup/cpu/rtvm");
    let runtime = || {
        std::fs::read_to_string(base.join("cpu.rt_runtime_us"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let mut c = config("sleep-test", 1, "count=1 ns=3600000000000");
    c.set_rt(0, rt(60));
    c.rt_allow_uncapped = true;
    let (running, _out) = start(&c);
    let capped = running
        .rt_report()
        .items
        .iter()
        .any(|i| i.what.starts_with("RT bandwidth cap") && i.result.is_ok());
    if !capped {
        running.stop();
        eprintln!("no RT cap can be made here: nothing to give back");
        return;
    }
    let during = runtime().expect("the shared group exists");
    let run = running.stop();
    assert_eq!(run.reason, VmExitReason::Stopped);
    // 40% of every CPU for this VM (the default cap), rounded up.
    assert!(
        (400_000..=401_000).contains(&during),
        "the shared group held {during} µs of every second for one 40% VM"
    );
    let live = std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    if live == 0 {
        assert_eq!(runtime(), Some(0), "nothing held once the last VM ended");
    }
}

/// Time a thread of this process has run, in ns (schedstat).
fn thread_run_ns(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

/// CPU time the calling thread used, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Issue #12: a spinning RT vCPU gets no more of its CPU than its cap
/// promises (runtime/period of each CPU), and a host thread beside it gets
/// the rest. Where no cap can be made the VM refuses to start instead.
#[test]
fn a_spinning_rt_vcpu_gets_no_more_than_its_cap() {
    need_kvm!();
    let _turn = rt_turn();
    let cpu = last_cpu();
    let mut c = config("spin", 1, "");
    c.set_rt(
        0,
        RtPolicy {
            priority: 10,
            cpu: Some(cpu),
        },
    );
    c.timer_advance = AdvanceMode::Off;
    // A short period, so that the one second measured spans ten of them:
    // a window as long as the period can hold the end of one budget and
    // the start of the next, up to twice the cap.
    c.rt_bandwidth = RtBandwidth {
        runtime_us: 40_000,
        period_us: 100_000,
    };
    let cap = c.rt_bandwidth.runtime_us as f64 / c.rt_bandwidth.period_us as f64;
    let running = match Vm::new(&c, Console::default()).unwrap().start() {
        Ok(running) => running,
        Err(Error::Realtime(msg)) if msg.contains("rt_allow_uncapped") => {
            eprintln!("no RT cap can be made here, and the VM refused to start: {msg}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert!(running.vcpus()[0].wait_for(VcpuState::Running, Duration::from_secs(5)));
    let tid = running.vcpus()[0]
        .thread_id()
        .expect("the vCPU thread runs");
    let vcpu_before = thread_run_ns(tid);
    // A SCHED_OTHER thread on the same CPU as the spinning SCHED_FIFO vCPU.
    let (wall, share) = std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t is valid; cpu is a CPU of this host.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let (wall, cpu0) = (Instant::now(), thread_cpu_ns());
        while wall.elapsed() < Duration::from_secs(1) {
            std::hint::black_box(0u64);
        }
        let wall = wall.elapsed().as_nanos() as f64;
        (wall, (thread_cpu_ns() - cpu0) as f64 / wall)
    })
    .join()
    .unwrap();
    let vcpu_share = (thread_run_ns(tid) - vcpu_before) as f64 / wall;
    let run = running.stop();
    assert_eq!(run.reason, VmExitReason::Stopped);
    eprintln!(
        "spinning RT vCPU: {:.1}% of its CPU (cap {:.0}%); host SCHED_OTHER thread beside it: {:.1}%",
        vcpu_share * 100.0,
        cap * 100.0,
        share * 100.0
    );
    // The bound is the cap itself, plus a throttling period's slack; the
    // kernel's own throttle alone would give the vCPU 95%.
    assert!(
        vcpu_share <= cap + 0.1,
        "the RT vCPU got {:.1}% of its CPU under a {:.0}% cap",
        vcpu_share * 100.0,
        cap * 100.0
    );
    assert!(share >= 0.05, "the host thread got {:.1}%", share * 100.0);
}
