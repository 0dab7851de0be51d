//! `crash`: vCPU 0 reads unmapped memory at CPL3; the page fault handler
//! reports it and fails the VM.

use super::Ctx;
use crate::cpu;

/// Past the 4 GiB the VMM identity maps, so not mapped at all.
const UNMAPPED: u64 = 0x40_0000_0000;

pub fn run(ctx: &Ctx) -> ! {
    if ctx.is_first_vcpu() {
        // SAFETY: none; the point is the #PF. The read is volatile so the
        // compiler cannot drop it.
        let value = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
        panic!("read {value:#x} from unmapped address {UNMAPPED:#x}");
    }
    cpu::vcpu_off()
}
