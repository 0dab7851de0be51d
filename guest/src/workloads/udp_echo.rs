//! `udp-echo rt=V addr=A count=N timeout=T housekeeping=H ring=R spin=US`:
//! the real-time UDP echo server. On vCPU V (default: the last) it binds a
//! UDP socket to A (default `198.18.0.1:7000`; `a.b.c.d:port` or
//! `[v6]:port`), prints `udp-echo: serving <A>`, and then receives
//! datagrams (a long poll that parks only its vCPU) and sends each, byte for
//! byte, back to its sender, until it has echoed N (default 0: forever) or T
//! ms (default 0: never) pass without a datagram. It ends with `udp-echo:
//! <n> datagrams echoed`, exit 0; 1 if a socket call failed, 2 for a bad
//! command line.
//!
//! With `ring=park` or `ring=spin` it goes through the exitless I/O rings
//! when the VMM offers them (`udp-echo: through rings`, else `the VMM
//! serves no rings: using calls`): receives posted ahead, each echo posted
//! as a send, completions waited for with the `NetRingWait` long poll, or
//! first by spinning US µs (default 50) at CPL3; datagrams up to 8 KiB.
//!
//! Housekeeping on vCPU 0 (default `none`) and how the VM ends are as for
//! `periodic` (see `rt`).

use super::rt::{self, Housekeeping};
use super::Ctx;
use crate::net::{Addr, UDP};
use crate::ring::{IoRing, Wait};
use crate::static_buf::StaticBuf;
use crate::vmrpc::{Error, Rpc};
use rtvm_abi::ring::op;
use rtvm_abi::vmrpc::Status;

/// The largest datagram UDP can carry (its length field).
const MAX_DATAGRAM: usize = 65535;

static BUF: StaticBuf<MAX_DATAGRAM> = StaticBuf::new();

pub const DEFAULT_ADDR: &str = "198.18.0.1:7000";

pub fn run(ctx: &Ctx) -> ! {
    rt::run(ctx, "udp-echo", Housekeeping::None, rt_task)
}

/// The address in argument `addr`, or `default`; `None` (and a message)
/// if it does not parse.
pub fn addr_arg(ctx: &Ctx, name: &str, default: &str) -> Option<Addr> {
    let text = ctx.arg("addr").unwrap_or(default);
    let addr = Addr::parse(text);
    if addr.is_none() {
        println!("{name}: addr={text}: expected a.b.c.d:port or [v6]:port");
    }
    addr
}

/// How argument `ring` (off, park, spin, with `spin=US`) says to use the
/// I/O rings: `Some(None)` not at all; `None` (and a message) if it does
/// not parse.
pub fn ring_arg(ctx: &Ctx, name: &str) -> Option<Option<Wait>> {
    match ctx.arg("ring") {
        None | Some("off") => Some(None),
        Some("park") => Some(Some(Wait::Park)),
        Some("spin") => Some(Some(Wait::Spin(ctx.number_arg("spin", 50) * 1_000))),
        Some(other) => {
            println!("{name}: ring={other}: expected off, park or spin");
            None
        }
    }
}

fn rt_task(ctx: &Ctx) -> u32 {
    let Some(addr) = addr_arg(ctx, "udp-echo", DEFAULT_ADDR) else {
        return 2;
    };
    let count = ctx.number_arg("count", 0);
    let timeout_ms = ctx.number_arg("timeout", 0);
    let Some(wait) = ring_arg(ctx, "udp-echo") else {
        return 2;
    };
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let buf = BUF.take();

    let handle = match rpc
        .socket(addr.family, UDP)
        .and_then(|h| rpc.bind(h, addr).map(|()| h))
    {
        Ok(handle) => handle,
        Err(e) => {
            println!("udp-echo: socket or bind {addr}: {e}");
            return 1;
        }
    };
    println!("udp-echo: serving {addr}");
    if let Some(wait) = wait {
        match IoRing::setup(&mut rpc) {
            Ok(Some(ring)) => {
                return echo_through_ring(&mut rpc, ring, handle, buf, wait, count, timeout_ms)
            }
            Ok(None) => println!("udp-echo: the VMM serves no rings: using calls"),
            Err(e) => {
                println!("udp-echo: ring setup: {e}");
                return 1;
            }
        }
    }

    let (mut echoed, mut received) = (0u64, 0u64);
    let mut failed_sends = 0u64;
    let mut status = 0;
    while count == 0 || received < count {
        let deadline = rpc.deadline_after_ms(timeout_ms);
        let (n, from) = match rpc.recv(handle, buf, deadline) {
            Ok(got) => got,
            Err(e) if e == Error::from(Status::TimedOut) => {
                println!("udp-echo: {timeout_ms} ms without a datagram");
                break;
            }
            Err(e) => {
                println!("udp-echo: recv: {e}");
                status = 1;
                break;
            }
        };
        received += 1;
        let result = rpc.send(handle, &buf[..n], Some(from));
        if result == Ok(n) {
            echoed += 1;
            continue;
        }
        // Only the first failure is printed: a stream of them must not turn
        // the server into a console writer.
        if failed_sends == 0 {
            match result {
                Ok(sent) => println!("udp-echo: echo to {from}: sent {sent} of {n} bytes"),
                Err(e) => println!("udp-echo: echo to {from}: {e}"),
            }
        }
        failed_sends += 1;
    }
    if failed_sends > 0 {
        println!("udp-echo: {failed_sends} echoes failed");
        status = 1;
    }
    let _ = rpc.close_socket(handle);
    println!("udp-echo: {echoed} datagrams echoed");
    status
}

/// Buffers of the ring path: receives posted ahead, each one's echo sent
/// from it.
const SLOTS: usize = 7;
const SLOT: usize = 8192;
/// Marks a send's cookie (the low bits are its slot).
const SEND: u64 = 1 << 32;

/// The echo loop over the rings: a datagram's completion becomes its echo's
/// send, the send's completion posts the receive again.
fn echo_through_ring(
    rpc: &mut Rpc,
    mut ring: IoRing,
    handle: u64,
    buf: &mut [u8; MAX_DATAGRAM],
    wait: Wait,
    count: u64,
    timeout_ms: u64,
) -> u32 {
    println!("udp-echo: through rings ({wait:?})");
    let mut lens = [0usize; SLOTS];
    for slot in 0..SLOTS {
        let part = &mut buf[slot * SLOT..(slot + 1) * SLOT];
        if let Err(e) = ring.post_recv(handle, part, slot as u64) {
            println!("udp-echo: posting a receive: {e}");
            return 1;
        }
    }
    let (mut echoed, mut received, mut failed) = (0u64, 0u64, 0u64);
    let mut status = 0;
    while count == 0 || echoed + failed < count {
        let deadline = rpc.deadline_after_ms(timeout_ms);
        let c = match ring.next(rpc, wait, deadline) {
            Ok(c) => c,
            Err(e) if e == Error::from(Status::TimedOut) => {
                println!("udp-echo: {timeout_ms} ms without a datagram");
                break;
            }
            Err(e) => {
                println!("udp-echo: waiting on the ring: {e}");
                status = 1;
                break;
            }
        };
        let slot = (c.user & 0xff) as usize % SLOTS;
        let posted = if c.op == op::RECV && c.status == 0 {
            received += 1;
            lens[slot] = c.len as usize;
            let data = &buf[slot * SLOT..slot * SLOT + lens[slot]];
            let to = Addr::from_words(c.addr);
            ring.post_send(handle, data, Some(to), SEND | slot as u64)
        } else {
            if c.op == op::SEND && c.status == 0 && c.len as usize == lens[slot] {
                echoed += 1;
            } else {
                if failed == 0 {
                    println!("udp-echo: ring op {} failed with status {}", c.op, c.status);
                }
                failed += 1;
            }
            let part = &mut buf[slot * SLOT..(slot + 1) * SLOT];
            ring.post_recv(handle, part, slot as u64)
        };
        if let Err(e) = posted {
            println!("udp-echo: posting: {e}");
            status = 1;
            break;
        }
    }
    if failed > 0 {
        println!("udp-echo: {failed} ring operations failed");
        status = 1;
    }
    let _ = rpc.close_socket(handle);
    println!(
        "udp-echo: rings: {received} received, {} kicks, {} completions found spinning, {} parked",
        ring.kicks, ring.spun, ring.parked
    );
    println!("udp-echo: {echoed} datagrams echoed");
    status
}
