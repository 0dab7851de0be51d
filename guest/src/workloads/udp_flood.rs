//! `udp-flood to=A ms=T size=S`: vCPU 0 sends S-byte (default 1024)
//! datagrams to A (default `127.0.0.1:47999`, where nobody should listen)
//! as fast as it can for T ms (default 1000), counting the sends that
//! worked and those the host refused, by status; meanwhile vCPU 1, if there
//! is one, pings the host back to back and counts its answers, to show a
//! flooding vCPU does not starve the others. Other vCPUs turn off. Ends
//! with `udp-flood: <sent> sent, <errors> refused, vCPU 1 answered <pings>
//! pings` (and one line per refusal status), exit 0; 1 if no socket could
//! be made, 2 for a bad command line.

use super::Ctx;
use crate::cpu;
use crate::net::{Addr, UDP};
use crate::static_buf::StaticBuf;
use crate::vmrpc::{Rpc, Vmrpc};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rtvm_abi::vmrpc::Status;

const MAX_SIZE: usize = 65507;
static BUF: StaticBuf<MAX_SIZE> = StaticBuf::new();

/// vCPU 0 is flooding: vCPU 1 pings while it is set.
static STARTED: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
/// vCPU 1 has stopped; `PINGS` holds its count.
static STOPPED: AtomicBool = AtomicBool::new(false);
static PINGS: AtomicU64 = AtomicU64::new(0);

/// Status numbers counted one by one; larger ones share the last slot.
const STATUSES: usize = 32;

pub fn run(ctx: &Ctx) -> ! {
    match ctx.vcpu {
        0 => flood(ctx),
        1 => pinger(ctx),
        _ => cpu::vcpu_off(),
    }
}

fn pinger(ctx: &Ctx) -> ! {
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    while !STARTED.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let mut pings: u64 = 0;
    while !DONE.load(Ordering::Acquire) {
        let echo = rpc.ping(pings).expect("VMRPC ping");
        assert_eq!(echo, pings, "ping echoed wrong");
        pings += 1;
    }
    PINGS.store(pings, Ordering::Relaxed);
    STOPPED.store(true, Ordering::Release);
    cpu::vcpu_off()
}

fn flood(ctx: &Ctx) -> ! {
    let text = ctx.arg("to").unwrap_or("127.0.0.1:47999");
    let Some(to) = Addr::parse(text) else {
        println!("udp-flood: to={text}: expected a.b.c.d:port or [v6]:port");
        cpu::exit(2)
    };
    let ms = ctx.number_arg("ms", 1000);
    let size = ctx.number_arg("size", 1024);
    if size > MAX_SIZE as u64 {
        println!("udp-flood: size={size}: at most {MAX_SIZE}");
        cpu::exit(2)
    }
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let buf = &mut BUF.take()[..size as usize];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
    let handle = match rpc.socket(to.family, UDP) {
        Ok(handle) => handle,
        Err(e) => {
            println!("udp-flood: socket: {e}");
            stop_pinger(ctx);
            cpu::exit(1)
        }
    };

    let (mut sent, mut errors) = (0u64, 0u64);
    let mut by_status = [0u64; STATUSES];
    STARTED.store(true, Ordering::Release);
    let end = rpc.now().saturating_add(ms.saturating_mul(1_000_000));
    while rpc.now() < end {
        match rpc.send(handle, buf, Some(to)) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                by_status[(e.0 as usize).min(STATUSES - 1)] += 1;
            }
        }
    }
    let pings = stop_pinger(ctx);
    let _ = rpc.close_socket(handle);
    println!("udp-flood: {sent} sent, {errors} refused, vCPU 1 answered {pings} pings");
    for (number, &n) in by_status.iter().enumerate().filter(|(_, &n)| n > 0) {
        match Status::from_u32(number as u32) {
            Some(status) => println!("udp-flood: {n} refused with {}", status.name()),
            None => println!("udp-flood: {n} refused with status {number} or above"),
        }
    }
    cpu::exit(0)
}

/// Ends vCPU 1's pings (if there is a vCPU 1) and returns its count.
fn stop_pinger(ctx: &Ctx) -> u64 {
    STARTED.store(true, Ordering::Release);
    DONE.store(true, Ordering::Release);
    if ctx.vcpu_count() < 2 {
        return 0;
    }
    while !STOPPED.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    PINGS.load(Ordering::Relaxed)
}
