//! `periodic rt=V period=P count=N overrun_every=M work=W housekeeping=H`:
//! a real-time task on vCPU V (default: the last) waits for N (default 1000)
//! deadlines of a periodic host timer of period P ns (default 1 ms), VMRPC
//! `WaitNext` (the long poll), and reports how late each wait returned
//! (stream 0) and how many deadlines it missed (stream 1). After each wake
//! it is busy for W ns (default 0). Every Mth cycle (default 0: never) it
//! overruns on purpose, busy for 3.5 periods, and the next wait must then
//! report exactly 3 missed deadlines, or, if the vCPU reached the host over
//! half a period late, the count right for when it did. Every deadline must lie a whole number
//! of periods after the first (in phase), however many were missed: a VM
//! paused and resumed goes on in phase.
//!
//! Meanwhile vCPU 0, if it is not the RT vCPU, does housekeeping H (default
//! `ping`; see `rt`) to show the other vCPUs and the VMM go on serving while
//! the RT vCPU is parked in the host.

use super::rt::{self, Housekeeping};
use super::Ctx;
use crate::vmrpc::{Batch, Rpc, Vmrpc};

pub fn run(ctx: &Ctx) -> ! {
    rt::run(ctx, "periodic", Housekeeping::Ping, rt_task)
}

fn rt_task(ctx: &Ctx) -> u32 {
    let period = ctx.number_arg("period", 1_000_000);
    let count = ctx.number_arg("count", 1000);
    let overrun_every = ctx.number_arg("overrun_every", 0);
    let work = ctx.number_arg("work", 0);
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let mut late = Batch::new(0);
    let mut missed = Batch::new(1);
    let (mut total_missed, mut max_late) = (0, 0);
    // Overruns whose next wait did not report 3 missed deadlines, the first
    // of them as (cycle, missed), and how many of them were in phase.
    let (mut overruns, mut bad_overruns, mut first_bad, mut in_phase) = (0, 0, None, 0);
    // The deadline of the cycle that overran, if the last one did.
    let mut overran: Option<u64> = None;
    // Every deadline must lie a whole number of periods after the first,
    // however many were missed (a pause, a preemption): the task stays in
    // phase.
    let (mut first_deadline, mut out_of_phase) = (None, 0u64);

    rpc.periodic(period, 0).expect("VMRPC Periodic");
    for cycle in 1..=count {
        let wait = rpc
            .wait_next()
            .unwrap_or_else(|e| panic!("WaitNext in cycle {cycle}: {e}"));
        let first = *first_deadline.get_or_insert(wait.woke.deadline);
        if !wait
            .woke
            .deadline
            .wrapping_sub(first)
            .is_multiple_of(period)
        {
            out_of_phase += 1;
        }
        late.push(&mut rpc, wait.woke.late_ns());
        missed.push(&mut rpc, wait.missed);
        total_missed += wait.missed;
        max_late = max_late.max(wait.woke.late_ns());
        if work != 0 {
            // From the wake, as `timer-irq` does.
            rt::busy_until(&mut rpc, wait.woke.deadline + wait.woke.late_ns() + work);
        }
        if let Some(overran) = overran.filter(|_| wait.missed != 3) {
            bad_overruns += 1;
            first_bad.get_or_insert((cycle, wait.missed));
            // The count matches the deadline the host chose: it is right,
            // only the call reached the host late (the vCPU was preempted).
            if wait.woke.deadline == overran + (wait.missed + 1) * period {
                in_phase += 1;
            }
        }
        overran = None;
        if overrun_every != 0 && cycle % overrun_every == 0 && cycle < count {
            // Busy until halfway between the 3rd and 4th deadline after this
            // one (counted from the deadline, not from when the wait
            // returned, so this cycle's lateness cannot shift the count):
            // exactly 3 deadlines pass before the next wait.
            overruns += 1;
            overran = Some(wait.woke.deadline);
            rt::busy_until(&mut rpc, wait.woke.deadline + 3 * period + period / 2);
        }
    }
    late.flush(&mut rpc);
    missed.flush(&mut rpc);

    println!("periodic: cycles={count} missed={total_missed} max_late_ns={max_late}");
    if out_of_phase > 0 {
        println!("periodic: {out_of_phase} deadlines out of phase FAIL");
        return 1;
    }
    match first_bad {
        Some((cycle, got)) => {
            println!(
                "periodic: {bad_overruns} of {overruns} overruns not reported as 3 missed \
                 (first: cycle {cycle}, missed {got})"
            );
            if in_phase > 0 {
                println!(
                    "periodic: {in_phase} of those counted right for when the call reached \
                     the host, over half a period late: the vCPU was preempted (make it RT)"
                );
            }
            // A count right for when the call reached the host is the
            // host's count done right: the vCPU was held up on its way
            // there (by the host, or what runs below it). Only a wrong
            // count fails.
            if in_phase < bad_overruns {
                println!(
                    "periodic: {} overruns counted wrong FAIL",
                    bad_overruns - in_phase
                );
                return 1;
            }
            0
        }
        None => 0,
    }
}
