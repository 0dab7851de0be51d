//! `independence ns=T`: while vCPU 1 is parked in the host in one long
//! `SleepUntil` (T ns, default 1 s), vCPU 0 keeps making calls. Shows that a
//! long poll blocks only the vCPU that made it. Needs 2 vCPUs (else exit 2);
//! exit 1 if vCPU 0 got no call answered meanwhile.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{Rpc, Vmrpc};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rtvm_abi::vmrpc::Call;

/// vCPU 1 is about to sleep.
static STARTED: AtomicBool = AtomicBool::new(false);
/// vCPU 1 has woken; `SLEPT_NS` holds how long it slept.
static DONE: AtomicBool = AtomicBool::new(false);
static SLEPT_NS: AtomicU64 = AtomicU64::new(0);

pub fn run(ctx: &Ctx) -> ! {
    if ctx.vcpu_count() < 2 {
        if ctx.is_first_vcpu() {
            println!("independence: needs at least 2 vCPUs");
            cpu::exit(2);
        }
        cpu::vcpu_off();
    }
    match ctx.vcpu {
        0 => pinger(ctx),
        1 => sleeper(ctx),
        _ => cpu::vcpu_off(),
    }
}

fn sleeper(ctx: &Ctx) -> ! {
    let ns = ctx.number_arg("ns", 1_000_000_000);
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    STARTED.store(true, Ordering::Release);
    let start = rpc.now_by_exit();
    // One plain call, no early return: the vCPU stays in the host throughout.
    rpc.call(Call::SleepUntil, 0, [start + ns, 0, 0, 0, 0, 0])
        .unwrap_or_else(|e| panic!("SleepUntil: {e}"));
    SLEPT_NS.store(rpc.now_by_exit() - start, Ordering::Relaxed);
    DONE.store(true, Ordering::Release);
    cpu::vcpu_off()
}

fn pinger(ctx: &Ctx) -> ! {
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    while !STARTED.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let mut pings: u64 = 0;
    while !DONE.load(Ordering::Acquire) {
        let echo = rpc.ping(pings).expect("VMRPC ping");
        assert_eq!(echo, pings, "ping echoed wrong");
        pings += 1;
    }
    let ms = SLEPT_NS.load(Ordering::Relaxed) / 1_000_000;
    println!("independence: vCPU 0 answered {pings} pings while vCPU 1 slept {ms} ms");
    cpu::exit(if pings == 0 { 1 } else { 0 })
}
