//! `bad-port port=P`: vCPU 0 writes to a port no device claims (default
//! 0x1234). The VMM decides what that does; if the guest goes on, it says so
//! and exits with status 3.

use super::Ctx;
use crate::cpu;

const DEFAULT_PORT: u64 = 0x1234;
const STATUS_STILL_RUNNING: u32 = 3;

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let port = ctx.number_arg("port", DEFAULT_PORT);
    let port =
        u16::try_from(port).unwrap_or_else(|_| panic!("port={port:#x} is not a 16-bit port"));
    println!("writing to unclaimed port {port:#x}");
    cpu::out8(port, 0);
    println!("still running");
    cpu::exit(STATUS_STILL_RUNNING)
}
