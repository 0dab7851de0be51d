//! `timer-irq rt=V period=P count=N work=W housekeeping=H`: the periodic
//! task of `periodic` (same arguments, defaults and sample streams), but
//! woken the conventional way: the guest kernel programs its LAPIC timer in
//! TSC-deadline mode and halts, and the timer interrupt wakes the task
//! (`syscall::WAIT_TSC`). This path runs guest CPL0 code (the system call,
//! the halt loop, the interrupt handler) on purpose: it is what the VMRPC
//! long poll is measured against.
//!
//! The deadlines are host times (first: one period after the start) mapped
//! to TSC values with the `Rpc` clock calibration. A cycle whose deadline
//! has already passed when it would wait counts the deadlines that passed as
//! missed and skips them, as the host's `WaitNext` does. Stream 0 gets how
//! late each wait returned (host ns, guest-side), stream 1 the missed count,
//! stream 2 the deadline (host ns), for the bench to match each cycle with
//! the host scheduler's trace of the vCPU thread.

use super::rt::{self, Housekeeping};
use super::Ctx;
use crate::syscall;
use crate::vmrpc::{Batch, Rpc};

pub fn run(ctx: &Ctx) -> ! {
    rt::run(ctx, "timer-irq", Housekeeping::None, rt_task)
}

fn rt_task(ctx: &Ctx) -> u32 {
    let period = ctx.number_arg("period", 1_000_000);
    let count = ctx.number_arg("count", 1000);
    let work = ctx.number_arg("work", 0);
    if period == 0 {
        println!("timer-irq: period must be more than 0");
        return 2;
    }
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    if rpc.info().tsc_khz == 0 {
        println!("timer-irq: the host does not know the TSC frequency: no deadlines to program");
        return 2;
    }
    if !syscall::has_tsc_deadline() {
        println!("timer-irq: the vCPU has no TSC-deadline timer (CPUID.1:ECX[24])");
        return 2;
    }
    syscall::timer_init();

    let mut late = Batch::new(0);
    let mut missed = Batch::new(1);
    let mut deadlines = Batch::new(2);
    let (mut total_missed, mut max_late) = (0, 0);
    let mut next = rpc.now() + period;
    for _ in 0..count {
        let now = rpc.now();
        let mut missed_now = 0;
        if now >= next {
            missed_now = (now - next) / period + 1;
            next += missed_now * period;
        }
        syscall::wait_tsc(rpc.host_to_tsc(next));
        let woke = rpc.now();
        let late_ns = woke.saturating_sub(next);
        late.push(&mut rpc, late_ns);
        missed.push(&mut rpc, missed_now);
        deadlines.push(&mut rpc, next);
        total_missed += missed_now;
        max_late = max_late.max(late_ns);
        if work != 0 {
            rt::busy_until(&mut rpc, woke + work);
        }
        next += period;
    }
    late.flush(&mut rpc);
    missed.flush(&mut rpc);
    deadlines.flush(&mut rpc);

    println!("timer-irq: cycles={count} missed={total_missed} max_late_ns={max_late}");
    0
}
