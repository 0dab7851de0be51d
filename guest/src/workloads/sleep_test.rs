//! `sleep-test count=N ns=P`: vCPU 0 sleeps N times (default 20) for P ns
//! (default 1 ms) each, alternating between the library's `sleep_until`
//! (early return and a CPL3 spin, when the host offers a timer advance) and
//! a plain `SleepUntil` call, and checks with the host's own clock that no
//! sleep ended before its deadline. Exit status 1 on an early wake.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{Rpc, Vmrpc};
use rtvm_abi::vmrpc::Call;

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let count = ctx.number_arg("count", 20);
    let ns = ctx.number_arg("ns", 1_000_000);
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    // Max lateness per path [library, plain], by the host clock read right
    // after the sleep (so it includes the exit of that `Clock` call).
    let mut max_late = [0u64; 2];
    for i in 0..count {
        let path = (i % 2) as usize;
        let deadline = rpc.now_by_exit() + ns;
        if path == 0 {
            rpc.sleep_until(deadline)
                .unwrap_or_else(|e| panic!("sleep_until({deadline}): {e}"));
        } else {
            let results = rpc
                .call(Call::SleepUntil, 0, [deadline, 0, 0, 0, 0, 0])
                .unwrap_or_else(|e| panic!("SleepUntil({deadline}): {e}"));
            // The host's own account of when it handed control back.
            check(deadline, results[1], "the host's handback time");
        }
        let now = rpc.now_by_exit();
        check(deadline, now, "the clock after the sleep");
        max_late[path] = max_late[path].max(now - deadline);
    }
    println!(
        "sleep-test: {count} sleeps, none early, max late {} ns",
        max_late[0].max(max_late[1])
    );
    // How far the TSC-based host clock, which the early-return spin relies
    // on, has drifted from the host's own since the calibration.
    let (before, host, after) = (rpc.now(), rpc.now_by_exit(), rpc.now());
    let drift = host as i64 - (before / 2 + after / 2) as i64;
    let early_return = if rpc.returns_early().unwrap_or(false) {
        "on"
    } else {
        "off"
    };
    println!(
        "sleep-test: library path (early return {early_return}) max late {} ns, plain path {} \
         ns; host clock mapping +-{} ns, host {drift} ns ahead of it at the end",
        max_late[0],
        max_late[1],
        rpc.clock_error_ns()
    );
    cpu::exit(0)
}

/// Fails the VM if host time `now` is before `deadline`.
fn check(deadline: u64, now: u64, what: &str) {
    if now < deadline {
        println!("sleep-test: EARLY by {} ns ({what})", deadline - now);
        cpu::exit(1);
    }
}
