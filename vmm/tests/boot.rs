//! Boots the built-in guest in-process and checks what the VMM observes,
//! KVM-selftest style: the guest workload is named next to the assertion.

use std::time::{Duration, Instant};

use rtvm_vmm::config::UnhandledIo;
use rtvm_vmm::need_kvm;
use rtvm_vmm::vcpu::VcpuState;
use rtvm_vmm::{Console, Error, Vm, VmExitReason};

mod support;
use support::{config, run};

/// How long a guest here may take.
const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn hello_on_one_vcpu() {
    need_kvm!();
    let (run, out) = run(&config("hello", 1, ""), LIMIT);
    assert_eq!(run.reason, VmExitReason::AllVcpusOff);
    assert_eq!(out, "hello from vCPU 0 of 1\n");
}

#[test]
fn hello_from_every_vcpu() {
    need_kvm!();
    let (run, out) = run(&config("hello", 4, ""), LIMIT);
    assert_eq!(run.reason, VmExitReason::AllVcpusOff);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        (0..4)
            .map(|i| format!("hello from vCPU {i} of 4"))
            .collect::<Vec<_>>(),
        "one whole line per vCPU"
    );
}

#[test]
fn guest_exit_status_reaches_the_vmm() {
    need_kvm!();
    let mut c = config("exit", 2, "");
    c.cmdline = "status=42".into();
    let (run, _) = run(&c, LIMIT);
    assert_eq!(
        run.reason,
        VmExitReason::GuestExit {
            vcpu: 0,
            status: 42
        }
    );
    assert_eq!(run.reason.exit_code(), 42);
}

#[test]
fn triple_fault_is_fatal_and_names_vcpu_and_rip() {
    need_kvm!();
    let (run, _) = run(&config("fault", 1, ""), LIMIT);
    match &run.reason {
        VmExitReason::Fatal { vcpu: 0, what, rip } => {
            assert!(what.contains("triple fault"), "{what}");
            match rip {
                Some(rip) => assert!(
                    *rip >= rtvm_abi::GUEST_IMAGE_BASE,
                    "RIP {rip:#x} is in the guest image"
                ),
                // KVM on AMD: the vCPU is reset before the exit is seen.
                None => assert!(what.contains("faulting RIP is unknown"), "{what}"),
            }
        }
        other => panic!("expected a fatal triple fault, got {other:?}"),
    }
    assert!(!run.reason.is_clean());
}

#[test]
fn guest_exception_is_reported_with_its_vector() {
    need_kvm!();
    let (run, out) = run(&config("crash", 2, ""), LIMIT);
    assert_eq!(run.reason, VmExitReason::GuestPanic { vcpu: 0, code: 14 });
    assert!(out.contains("page fault (#PF) (vector 14)"), "{out}");
    assert!(out.contains("cr2=0x4000000000"), "{out}");
}

#[test]
fn unclaimed_port_is_fatal_by_default() {
    need_kvm!();
    let (run, out) = run(&config("bad-port", 1, ""), LIMIT);
    match &run.reason {
        VmExitReason::Fatal {
            vcpu: 0,
            what,
            rip: Some(_),
        } => {
            assert!(what.contains("unhandled port write at 0x1234"), "{what}")
        }
        other => panic!("expected a fatal unhandled port, got {other:?}"),
    }
    assert!(!out.contains("still running"));
}

#[test]
fn unclaimed_port_can_be_logged_instead() {
    need_kvm!();
    let mut c = config("bad-port", 1, "");
    c.unhandled_io = UnhandledIo::Log;
    let (run, out) = run(&c, LIMIT);
    assert_eq!(run.reason, VmExitReason::GuestExit { vcpu: 0, status: 3 });
    assert!(out.contains("still running"), "{out}");
}

#[test]
fn vcpus_pause_resume_and_stop_on_request() {
    need_kvm!();
    let vm = Vm::new(&config("spin", 2, ""), Console::capture(Default::default())).unwrap();
    let running = vm.start().unwrap();
    for v in running.vcpus() {
        assert!(
            v.wait_for(VcpuState::Running, Duration::from_secs(5)),
            "vCPU {} runs",
            v.index()
        );
    }
    assert!(running.pause(Duration::from_secs(5)), "all vCPUs parked");
    assert!(running
        .vcpus()
        .iter()
        .all(|v| v.state() == VcpuState::Paused));
    running.resume();
    for v in running.vcpus() {
        assert!(v.wait_for(VcpuState::Running, Duration::from_secs(5)));
    }
    assert_eq!(
        running.wait_timeout(Duration::from_millis(200)),
        None,
        "spin never ends by itself"
    );
    let start = Instant::now();
    let run = running.stop();
    assert_eq!(run.reason, VmExitReason::Stopped);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "spinning vCPUs stop promptly"
    );
}

#[test]
fn unknown_workload_is_a_config_error() {
    need_kvm!();
    match Vm::new(&config("no-such-workload", 1, ""), Console::default()) {
        Err(Error::Config(msg)) => {
            assert!(msg.contains("no workload 'no-such-workload'") && msg.contains("hello"))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created for an unknown workload"),
    }
}

#[test]
fn too_little_memory_for_the_vcpus_is_a_config_error() {
    need_kvm!();
    let mut c = config("hello", 64, "");
    c.memory = 16 << 20;
    match Vm::new(&c, Console::default()) {
        Err(Error::Config(msg)) => assert!(msg.contains("too small"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created with overlapping vCPU areas"),
    }
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    let mut c = config("hello", 1, "");
    c.kvm_device = "/nonexistent/kvm".into();
    match Vm::new(&c, Console::default()) {
        Err(e @ Error::KvmUnavailable { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/nonexistent/kvm") && msg.contains("No such file"),
                "{msg}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created without KVM"),
    }
}

#[test]
fn vmm_memory_overhead_is_measured() {
    need_kvm!();
    let (run, _) = run(&config("hello", 1, ""), LIMIT);
    let rss = run.process_rss.expect("RSS read from /proc");
    let guest = run.guest_resident.expect("guest RAM found in smaps");
    assert!(guest > 0 && guest < rss, "guest {guest} of RSS {rss}");
    assert!(run.vmm_overhead().unwrap() > 0);
}

/// Issue #12: a vCPU thread blocked in the host where no kick reaches it
/// (here: on the console's capture lock, which the test holds) cannot hang
/// the stop: after the grace period it is left behind and named, and the
/// stop returns. Released, the thread then ends on its own.
#[test]
fn a_vcpu_blocked_in_the_host_does_not_hang_the_stop() {
    need_kvm!();
    let out = support::Output::default();
    let capture = out.clone();
    let held = capture.hold();
    let running = Vm::new(&config("spin", 1, ""), out.console())
        .unwrap()
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let tid = loop {
        if let Some(tid) = running.vcpus()[0].thread_id() {
            break tid;
        }
        assert!(Instant::now() < deadline, "the vCPU thread never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    let task = format!("/proc/self/task/{tid}");
    // The guest's first line blocks its vCPU on the held lock: wait until
    // the thread sleeps in futex(2) (202 on x86-64).
    while !std::fs::read_to_string(format!("{task}/syscall"))
        .unwrap_or_default()
        .starts_with("202 ")
    {
        assert!(Instant::now() < deadline, "the vCPU never blocked");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(running.stop());
    });
    let run = stopped
        .recv_timeout(Duration::from_secs(60))
        .expect("the stop returned while a vCPU stayed blocked");
    assert_eq!(run.reason, VmExitReason::Stopped);
    assert_eq!(run.stuck, vec![0]);
    drop(held);
    // The thread left behind finishes once it can.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&task).exists() {
        assert!(
            Instant::now() < deadline,
            "the released vCPU thread never ended"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
