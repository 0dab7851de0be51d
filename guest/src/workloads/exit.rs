//! `exit status=N`: the VM ends with exit status N (default 0).

use super::Ctx;
use crate::cpu;

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let status = ctx.number_arg("status", 0);
    let status =
        u32::try_from(status).unwrap_or_else(|_| panic!("status={status} does not fit in 32 bits"));
    cpu::exit(status)
}
