//! rtvm's virtual machine monitor.
//!
//! - [`config`]: what a VM is made of, from CLI flags or TOML.
//! - [`memory`]: guest RAM and its fixed layout.
//! - [`boot`]: the built-in guest image and the long-mode state the VMM prepares.
//! - [`vm`]: the KVM VM, its devices, and the run from start to exit.
//! - [`vcpu`]: one thread per vCPU, its state machine and exit dispatch.
//! - [`devices`]: the port/MMIO bus, serial console, reset controller.
//! - [`exit`]: why a VM ended, and the process status that follows.
//! - [`clock`]: host time (`now_ns`, the host TSC) and how a vCPU's TSC relates to it.
//! - [`host`]: facts about the host that decide how timing results read.
//! - [`rpc`]: the VMRPC server (ping, clock, long-polling timers, log, report).
//! - [`realtime`]: RT vCPUs: SCHED_FIFO, pinning, RT-bandwidth cgroups, report.
//! - [`seccomp`]: the allow-list each kind of thread confines itself to.
//! - [`signals`]: SIGINT/SIGTERM to a clean shutdown.

pub mod boot;
pub mod clock;
pub mod config;
pub mod devices;
pub mod error;
pub mod exit;
pub mod host;
pub mod memory;
pub mod realtime;
pub mod rpc;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod vm;

pub use config::{GuestSpec, VmConfig};
pub use devices::Console;
pub use error::{Error, Result};
pub use exit::VmExitReason;
pub use vm::{RunningVm, Vm, VmRun};

/// Support for test suites that boot real guests.
pub mod testing {
    /// Returns from a test that needs KVM where there is none, after a
    /// note; under `RTVM_REQUIRE_KVM=1` (CI) the test fails instead (see
    /// [`kvm_available`]).
    #[macro_export]
    macro_rules! need_kvm {
        () => {
            if !$crate::testing::kvm_available() {
                return;
            }
        };
    }

    /// Whether KVM can be used for tests. When it cannot and
    /// `RTVM_REQUIRE_KVM=1` is set (as CI does), this panics, so a KVM test
    /// fails instead of passing without having run.
    pub fn kvm_available() -> bool {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(crate::config::DEFAULT_KVM_DEVICE)
            .map_err(|e| e.to_string());
        match usable {
            Ok(_) => true,
            Err(e) if std::env::var("RTVM_REQUIRE_KVM").as_deref() == Ok("1") => {
                panic!("RTVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}")
            }
            Err(e) => {
                eprintln!("skipping: /dev/kvm cannot be opened ({e}); set RTVM_REQUIRE_KVM=1 to make this fatal");
                false
            }
        }
    }
}
