//! `rtvm bench …`: benchmarks. Each one measures its paths side by side in
//! one run, on one machine, and reports figures and ratios beside their
//! targets; nothing here is a pass/fail test.

mod boot;
mod linux;
mod net;
mod rpc;
pub mod timer;

use std::process::ExitCode;

use clap::Subcommand;

use crate::EXIT_HOST_ERROR;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Process start to the guest's first console line, and VMM memory overhead.
    Boot(boot::BootArgs),
    /// VMRPC null-call round trip vs the raw port-I/O exit floor, from guest CPL3.
    Rpc(rpc::RpcArgs),
    /// Timer lateness of one periodic task: host vs guest interrupt path vs guest long polling.
    Timer(timer::TimerArgs),
    /// UDP echo round trip probed from outside: host vs guest on an RT vCPU via outsourced sockets.
    Net(net::NetArgs),
}

pub fn run(cmd: &BenchCommand) -> ExitCode {
    let result = match cmd {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Rpc(args) => rpc::run(args),
        BenchCommand::Timer(args) => timer::run(args),
        BenchCommand::Net(args) => net::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtvm: error: bench: {e}");
            ExitCode::from(EXIT_HOST_ERROR)
        }
    }
}

/// Refuses a measurement that reads guest time from the TSC where the
/// host's clocksource is not the TSC: there KVM does not keep a guest's TSC
/// in step with host time (`rtvm_vmm::host::tsc_is_clocksource`), so the
/// built-in guest is not told the TSC rate and its figures would be wrong.
pub fn need_tsc_clock(what: &str) -> Result<(), String> {
    if rtvm_vmm::host::tsc_is_clocksource() {
        return Ok(());
    }
    Err(format!(
        "{what} times the guest with its TSC, and this host keeps time with {} rather than \
         the TSC, so KVM does not keep a guest's TSC in step with host time: run it on a \
         host whose clocksource is tsc (README: \"The guest TSC as a clock\")",
        rtvm_vmm::host::clocksource().unwrap_or_else(|| "an unknown clocksource".into())
    ))
}
