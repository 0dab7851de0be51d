//! The workloads of the built-in guest. `WORKLOADS` is the one list of them:
//! the guest header's name list is computed from it at compile time, so a
//! new workload is a new module plus one entry here.

mod bad_calls;
mod bad_port;
mod crash;
mod exit;
mod fault;
mod fs_selftest;
mod hello;
mod independence;
mod logger;
mod net_selftest;
mod periodic;
mod rpc_bench;
mod rpc_ping;
mod rt;
pub(crate) mod selftest;
mod sleep_test;
mod spin;
mod tcp_echo;
mod timer_irq;
mod udp_echo;
mod udp_flood;

use rtvm_abi::{BootInfo, WORKLOAD_NAME_MAX};

/// What a workload runs with.
pub struct Ctx {
    pub info: &'static BootInfo,
    /// This vCPU's index, `0..vcpu_count()`.
    pub vcpu: usize,
}

impl Ctx {
    pub fn vcpu_count(&self) -> usize {
        self.info.vcpu_count as usize
    }

    /// The one vCPU that acts for the VM where only one should.
    pub fn is_first_vcpu(&self) -> bool {
        self.vcpu == 0
    }

    /// The value of `key=value` in the command line.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.info.arg(key)
    }

    /// The number in argument `key` (decimal, or hex with `0x`), `default`
    /// without one. A malformed number is a bug in the caller's command
    /// line, so it panics and the VM fails.
    pub fn number_arg(&self, key: &str, default: u64) -> u64 {
        let Some(text) = self.arg(key) else {
            return default;
        };
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        parsed.unwrap_or_else(|_| panic!("argument {key}={text} is not a number"))
    }
}

pub struct Workload {
    pub name: &'static str,
    /// Runs on every vCPU, at CPL3, and never returns.
    pub run: fn(&Ctx) -> !,
}

/// The workload that triple-faults; `_start` acts on it before CPL3.
pub const FAULT: &str = "fault";

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "hello",
        run: hello::run,
    },
    Workload {
        name: "exit",
        run: exit::run,
    },
    Workload {
        name: FAULT,
        run: fault::run,
    },
    Workload {
        name: "crash",
        run: crash::run,
    },
    Workload {
        name: "spin",
        run: spin::run,
    },
    Workload {
        name: "bad-port",
        run: bad_port::run,
    },
    Workload {
        name: "rpc-ping",
        run: rpc_ping::run,
    },
    Workload {
        name: "sleep-test",
        run: sleep_test::run,
    },
    Workload {
        name: "periodic",
        run: periodic::run,
    },
    Workload {
        name: "independence",
        run: independence::run,
    },
    Workload {
        name: "bad-calls",
        run: bad_calls::run,
    },
    Workload {
        name: "rpc-bench",
        run: rpc_bench::run,
    },
    Workload {
        name: "timer-irq",
        run: timer_irq::run,
    },
    Workload {
        name: "fs-selftest",
        run: fs_selftest::run,
    },
    Workload {
        name: "logger",
        run: logger::run,
    },
    Workload {
        name: "udp-echo",
        run: udp_echo::run,
    },
    Workload {
        name: "tcp-echo",
        run: tcp_echo::run,
    },
    Workload {
        name: "net-selftest",
        run: net_selftest::run,
    },
    Workload {
        name: "udp-flood",
        run: udp_flood::run,
    },
];

/// The workload called `name`.
pub fn find(name: &[u8]) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name.as_bytes() == name)
}

/// The workload names for the guest header: each followed by a NUL.
#[used]
pub static WORKLOAD_NAMES: [u8; WORKLOAD_NAMES_LEN] = workload_names();

pub const WORKLOAD_NAMES_LEN: usize = {
    let mut len = 0;
    let mut i = 0;
    while i < WORKLOADS.len() {
        len += WORKLOADS[i].name.len() + 1;
        i += 1;
    }
    len
};

/// Builds `WORKLOAD_NAMES`, refusing (at compile time) names the VMM could
/// not pass in `BootInfo` or that would break the NUL-separated list.
const fn workload_names() -> [u8; WORKLOAD_NAMES_LEN] {
    let mut names = [0; WORKLOAD_NAMES_LEN];
    let mut at = 0;
    let mut i = 0;
    while i < WORKLOADS.len() {
        let name = WORKLOADS[i].name.as_bytes();
        assert!(
            !name.is_empty() && name.len() <= WORKLOAD_NAME_MAX,
            "bad workload name length"
        );
        let mut j = 0;
        while j < name.len() {
            assert!(name[j] != 0, "NUL in a workload name");
            names[at] = name[j];
            at += 1;
            j += 1;
        }
        at += 1; // the NUL, already there
        i += 1;
    }
    names
}
