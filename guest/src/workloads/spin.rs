//! `spin`: every vCPU busy-loops at CPL3 forever; for tests of stopping a VM
//! from outside and of what a spinning guest does to the host.

use super::Ctx;

pub fn run(ctx: &Ctx) -> ! {
    if ctx.is_first_vcpu() {
        println!("spinning on {} vCPUs", ctx.vcpu_count());
    }
    // A volatile counter keeps the loop doing real work (a memory write per
    // turn), as a busy guest would.
    let mut turns: u64 = 0;
    loop {
        // SAFETY: `turns` is a live local.
        unsafe {
            core::ptr::write_volatile(&mut turns, core::ptr::read_volatile(&turns).wrapping_add(1))
        };
        core::hint::spin_loop();
    }
}
