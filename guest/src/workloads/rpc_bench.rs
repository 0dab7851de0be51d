//! `rpc-bench count=N`: vCPU 0 times N (default 10000) pairs of interleaved
//! samples at CPL3 with the TSC: the floor, a bare exit (a write to the NOP
//! port, which the VMM ignores), and a `Ping` call, the whole VMRPC round
//! trip. Floor samples (ns) go to stream 0, ping samples to stream 1.
//! Interleaving exposes both to the same host noise, so they compare.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{Batch, Rpc, Vmrpc};
use rtvm_abi::port;

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let count = ctx.number_arg("count", 10_000);
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    if rpc.info().tsc_khz == 0 {
        println!("rpc-bench: the host does not know the TSC frequency; cannot time calls");
        cpu::exit(2);
    }
    let mut floor = Batch::new(0);
    let mut ping = Batch::new(1);
    let (mut min_floor, mut min_ping) = (u64::MAX, u64::MAX);
    for i in 0..count {
        let t0 = cpu::rdtsc_ordered();
        cpu::out32(port::NOP, 0);
        let t1 = cpu::rdtsc_ordered();
        rpc.ping(i).expect("VMRPC ping");
        let t2 = cpu::rdtsc_ordered();
        let (f, p) = (rpc.ticks_to_ns(t1 - t0), rpc.ticks_to_ns(t2 - t1));
        min_floor = min_floor.min(f);
        min_ping = min_ping.min(p);
        floor.push(&mut rpc, f);
        ping.push(&mut rpc, p);
    }
    floor.flush(&mut rpc);
    ping.flush(&mut rpc);
    println!("rpc-bench: {count} samples each");
    if count > 0 {
        println!("rpc-bench: min floor {min_floor} ns, min ping {min_ping} ns");
    }
    cpu::exit(0)
}
