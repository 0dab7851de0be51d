//! `rpc-ping count=N`: vCPU 0 makes N (default 1000) `Ping` calls, each with
//! a different value, and checks every echo; exit status 1 on a mismatch.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{Rpc, Vmrpc};

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let count = ctx.number_arg("count", 1000);
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    for i in 0..count {
        // Distinct, and different in every byte from the last, so a host that
        // answers a stale or half-written page is caught.
        let value = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5_a5a5_a5a5_a5a5;
        let echo = rpc.ping(value).expect("VMRPC ping");
        if echo != value {
            println!("rpc-ping: call {i}: sent {value:#x}, got {echo:#x} back");
            cpu::exit(1);
        }
    }
    // Also in the VMM's log: exercises a call that passes a guest buffer.
    rpc.log("rpc-ping: all echoes matched");
    println!("rpc-ping: {count} calls answered");
    cpu::exit(0)
}
