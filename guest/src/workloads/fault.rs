//! `fault`: vCPU 0 triple-faults. That happens at CPL0 in `_start`, before
//! it would get here (a CPL3 fault would only reach the handlers); the other
//! vCPUs just stop.

use super::Ctx;
use crate::cpu;

pub fn run(_ctx: &Ctx) -> ! {
    cpu::vcpu_off()
}
