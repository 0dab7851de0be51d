//! Boots the built-in guest in-process and checks what the VMM observes,
//! KVM-selftest style: the guest workload is named next to the assertion.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtvm_vmm::config::UnhandledIo;
use rtvm_vmm::testing::kvm_available;
use rtvm_vmm::vcpu::VcpuState;
use rtvm_vmm::{Console, Error, GuestSpec, Vm, VmConfig, VmExitReason, VmRun};

fn config(workload: &str, vcpus: usize) -> VmConfig {
    let mut c = VmConfig::new(GuestSpec::Builtin(workload.into()));
    c.vcpus = vcpus;
    c.memory = 32 << 20;
    c
}

/// Runs `config` to its end (at most 30 s) and returns the run and the console.
fn run(config: &VmConfig) -> (VmRun, String) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::new(config, Console::capture(out.clone())).expect("VM set up");
    let running = vm.start().expect("vCPUs started");
    let ended = running.wait_timeout(Duration::from_secs(30));
    let run = running.stop();
    assert!(
        ended.is_some(),
        "guest did not end within 30 s: {:?}",
        run.reason
    );
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    (run, text)
}

#[test]
fn hello_on_one_vcpu() {
    if !kvm_available() {
        return;
    }
    let (run, out) = run(&config("hello", 1));
    assert_eq!(run.reason, VmExitReason::AllVcpusOff);
    assert_eq!(out, "hello from vCPU 0 of 1\n");
}

#[test]
fn hello_from_every_vcpu() {
    if !kvm_available() {
        return;
    }
    let (run, out) = run(&config("hello", 4));
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
    if !kvm_available() {
        return;
    }
    let mut c = config("exit", 2);
    c.cmdline = "status=42".into();
    let (run, _) = run(&c);
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
    if !kvm_available() {
        return;
    }
    let (run, _) = run(&config("fault", 1));
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
    if !kvm_available() {
        return;
    }
    let (run, out) = run(&config("crash", 2));
    assert_eq!(run.reason, VmExitReason::GuestPanic { vcpu: 0, code: 14 });
    assert!(out.contains("page fault (#PF) (vector 14)"), "{out}");
    assert!(out.contains("cr2=0x4000000000"), "{out}");
}

#[test]
fn unclaimed_port_is_fatal_by_default() {
    if !kvm_available() {
        return;
    }
    let (run, out) = run(&config("bad-port", 1));
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
    if !kvm_available() {
        return;
    }
    let mut c = config("bad-port", 1);
    c.unhandled_io = UnhandledIo::Log;
    let (run, out) = run(&c);
    assert_eq!(run.reason, VmExitReason::GuestExit { vcpu: 0, status: 3 });
    assert!(out.contains("still running"), "{out}");
}

#[test]
fn vcpus_pause_resume_and_stop_on_request() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(&config("spin", 2), Console::capture(Default::default())).unwrap();
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
    if !kvm_available() {
        return;
    }
    match Vm::new(&config("no-such-workload", 1), Console::default()) {
        Err(Error::Config(msg)) => {
            assert!(msg.contains("no workload 'no-such-workload'") && msg.contains("hello"))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created for an unknown workload"),
    }
}

#[test]
fn too_little_memory_for_the_vcpus_is_a_config_error() {
    if !kvm_available() {
        return;
    }
    let mut c = config("hello", 64);
    c.memory = 16 << 20;
    match Vm::new(&c, Console::default()) {
        Err(Error::Config(msg)) => assert!(msg.contains("too small"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created with overlapping vCPU areas"),
    }
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    let mut c = config("hello", 1);
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
    if !kvm_available() {
        return;
    }
    let (run, _) = run(&config("hello", 1));
    let rss = run.process_rss.expect("RSS read from /proc");
    let guest = run.guest_resident.expect("guest RAM found in smaps");
    assert!(guest > 0 && guest < rss, "guest {guest} of RSS {rss}");
    assert!(run.vmm_overhead().unwrap() > 0);
}
