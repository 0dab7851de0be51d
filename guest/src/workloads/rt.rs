//! What the real-time workloads (`periodic`, `timer-irq`) share: which vCPU
//! runs the RT task (`rt=`, default the last), what vCPU 0 does meanwhile
//! (`housekeeping=`), the busy time after each wake (`work=`), and how the
//! VM ends.
//!
//! Housekeeping, on vCPU 0 when it is not the RT vCPU:
//! - `none`: vCPU 0 turns off at once; the RT task ends the VM.
//! - `ping`: VMRPC pings back to back, to show the other vCPUs and the VMM
//!   go on serving while the RT task waits.
//! - `busy`: a CPU-bound CPL3 loop walking memory, with a ping every
//!   [`BUSY_ITERATIONS`] iterations, to load the machine as a guest's
//!   ordinary work would.
//!
//! When the RT task is done it ends the VM with its status itself if it is
//! on vCPU 0 or there is no housekeeping; otherwise it hands the status to
//! the housekeeping loop, which prints its count and ends the VM.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{Rpc, Vmrpc};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Set by the RT task when it has finished, after `STATUS`.
static DONE: AtomicBool = AtomicBool::new(false);
/// The exit status the RT task asks for.
static STATUS: AtomicU32 = AtomicU32::new(0);

/// What vCPU 0 does while the RT task runs on another vCPU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Housekeeping {
    None,
    Ping,
    Busy,
}

impl Housekeeping {
    fn parse(text: &str) -> Option<Housekeeping> {
        match text {
            "none" => Some(Housekeeping::None),
            "ping" => Some(Housekeeping::Ping),
            "busy" => Some(Housekeeping::Busy),
            _ => None,
        }
    }
}

/// Runs a real-time workload called `name` on this vCPU: `task` (which
/// returns the VM's exit status) on the RT vCPU, housekeeping (default
/// `housekeeping`) on vCPU 0, nothing elsewhere.
pub fn run(ctx: &Ctx, name: &str, housekeeping: Housekeeping, task: fn(&Ctx) -> u32) -> ! {
    let rt = ctx.number_arg("rt", ctx.vcpu_count() as u64 - 1);
    if rt >= ctx.vcpu_count() as u64 {
        usage_error(
            ctx,
            format_args!(
                "{name}: rt={rt}, but there are only {} vCPUs",
                ctx.vcpu_count()
            ),
        );
    }
    let housekeeping = match ctx.arg("housekeeping") {
        None => housekeeping,
        Some(text) => Housekeeping::parse(text).unwrap_or_else(|| {
            usage_error(
                ctx,
                format_args!("{name}: housekeeping={text}: expected none, ping or busy"),
            )
        }),
    };
    if ctx.vcpu as u64 == rt {
        let status = task(ctx);
        if ctx.is_first_vcpu() || housekeeping == Housekeeping::None {
            cpu::exit(status);
        }
        STATUS.store(status, Ordering::Relaxed);
        DONE.store(true, Ordering::Release);
        cpu::vcpu_off()
    } else if ctx.is_first_vcpu() && housekeeping != Housekeeping::None {
        housekeep(ctx, housekeeping)
    } else {
        cpu::vcpu_off()
    }
}

/// A bad command line: vCPU 0 says so and ends the VM with status 2.
fn usage_error(ctx: &Ctx, message: core::fmt::Arguments) -> ! {
    if ctx.is_first_vcpu() {
        println!("{message}");
        cpu::exit(2);
    }
    cpu::vcpu_off()
}

/// Spins at CPL3 until the host clock reaches `until`: the work a task does
/// after a wake (`work=`).
pub fn busy_until(rpc: &mut Rpc, until: u64) {
    while rpc.now() < until {
        core::hint::spin_loop();
    }
}

/// Iterations of the busy loop between two pings.
pub const BUSY_ITERATIONS: u32 = 1000;
/// Words the busy loop walks: 64 KiB, so it goes beyond L1.
const BUSY_WORDS: usize = 8192;
/// Words per iteration: one per cache line of a 4 KiB page.
const BUSY_STRIDE: usize = 8;
const BUSY_WORDS_PER_ITERATION: usize = 4096 / 8 / BUSY_STRIDE;

/// The memory the busy loop walks (only vCPU 0 uses it; atomics only to
/// share a static without `unsafe`: relaxed loads and stores are plain moves).
static BUSY_MEMORY: [AtomicU64; BUSY_WORDS] = [const { AtomicU64::new(0) }; BUSY_WORDS];

/// One iteration of the busy loop: mixes `h` with one word per cache line of
/// a page chosen by `h`, writing the running hash back.
fn churn(mut h: u64) -> u64 {
    let pages = BUSY_WORDS * 8 / 4096;
    let base = (h >> 40) as usize % pages * (4096 / 8);
    for i in 0..BUSY_WORDS_PER_ITERATION {
        let word = &BUSY_MEMORY[base + i * BUSY_STRIDE];
        h = (h ^ word.load(Ordering::Relaxed))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
        word.store(h, Ordering::Relaxed);
    }
    h
}

/// vCPU 0's job while the RT task runs elsewhere, and the VM's end.
fn housekeep(ctx: &Ctx, housekeeping: Housekeeping) -> ! {
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let mut pings: u64 = 0;
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    while !DONE.load(Ordering::Acquire) {
        if housekeeping == Housekeeping::Busy {
            for _ in 0..BUSY_ITERATIONS {
                h = churn(h);
            }
        }
        let echo = rpc.ping(pings).expect("VMRPC ping");
        assert_eq!(echo, pings, "housekeeping ping echoed wrong");
        pings += 1;
    }
    core::hint::black_box(h);
    match housekeeping {
        Housekeeping::Busy => println!("housekeeping: busy, {pings} pings while the RT task ran"),
        _ => println!("housekeeping: {pings} pings while the RT task ran"),
    }
    cpu::exit(STATUS.load(Ordering::Relaxed))
}
