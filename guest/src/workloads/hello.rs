//! `hello`: every vCPU greets, then stops; the VM ends with status 0.

use super::Ctx;
use crate::cpu;

pub fn run(ctx: &Ctx) -> ! {
    println!("hello from vCPU {} of {}", ctx.vcpu, ctx.vcpu_count());
    cpu::vcpu_off()
}
