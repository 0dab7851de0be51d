//! What the VMM's test suites share: a built-in guest's configuration,
//! starting and running it with its console captured, and the KVM check.
#![allow(dead_code)] // each suite uses its own subset

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtvm_vmm::{Console, GuestSpec, RunningVm, Vm, VmConfig, VmExitReason, VmRun};

/// Built-in workload `workload` on `vcpus` vCPUs with guest arguments
/// `cmdline`, in 32 MiB.
pub fn config(workload: &str, vcpus: usize, cmdline: &str) -> VmConfig {
    let mut c = VmConfig::new(GuestSpec::Builtin(workload.into()));
    c.vcpus = vcpus;
    c.memory = 32 << 20;
    c.cmdline = cmdline.into();
    c
}

/// What a guest printed, as it prints.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    pub fn console(&self) -> Console {
        Console::capture(self.0.clone())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Holds the capture buffer: a vCPU that prints meanwhile blocks.
    pub fn hold(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap()
    }

    /// Waits until the guest printed `needle` (e.g. a server is ready).
    pub fn wait_for(&self, needle: &str, within: Duration) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < within,
                "no {needle:?} within {within:?} in:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sets up and starts the VM of `config`.
pub fn start(config: &VmConfig) -> (RunningVm, Output) {
    let out = Output::default();
    let vm = Vm::new(config, out.console()).expect("VM set up");
    (vm.start().expect("vCPUs started"), out)
}

/// Waits up to `within` for the guest to end, then stops the VM; the run
/// and the console.
pub fn finish(running: RunningVm, out: &Output, within: Duration) -> (VmRun, String) {
    let ended = running.wait_timeout(within);
    let run = running.stop();
    assert!(
        ended.is_some(),
        "the guest did not end within {within:?} ({}); console:\n{}",
        run.reason,
        out.text()
    );
    (run, out.text())
}

/// Runs `config` to its end, up to `within`.
pub fn run(config: &VmConfig, within: Duration) -> (VmRun, String) {
    let (running, out) = start(config);
    finish(running, &out, within)
}

/// The guest ended through its exit port with status 0 and printed no FAIL.
pub fn assert_exit_0(run: &VmRun, console: &str) {
    assert!(!console.contains("FAIL"), "console:\n{console}");
    assert!(
        matches!(run.reason, VmExitReason::GuestExit { status: 0, .. }),
        "{}; console:\n{console}",
        run.reason
    );
}

/// Serialises the tests of one suite that must not overlap (descriptor
/// counts, RT bandwidth).
pub fn one_at_a_time(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}
