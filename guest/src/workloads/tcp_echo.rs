//! `tcp-echo rt=V addr=A conns=C timeout=T housekeeping=H`: the real-time
//! TCP echo server. On vCPU V (default: the last) it listens on A (default
//! `198.18.0.1:7001`), prints `tcp-echo: serving <A>`, and serves C
//! connections (default 1; 0: for ever) one after the other: every byte
//! received goes straight back, until the peer closes; then the next. T ms
//! (default 0: never) without a connection or without a byte from the peer
//! end the server (or that connection); a send waits as long for buffer
//! space. It ends with `tcp-echo: <bytes> bytes echoed over <n>
//! connections`, exit 0; 1 if a socket call failed, 2 for a bad command
//! line.
//!
//! With `ring=park` or `ring=spin` (`spin=US`, as for `udp-echo`) each
//! connection's bytes go through the exitless I/O rings when the VMM
//! offers them (`tcp-echo: through rings`): a receive posted, its bytes
//! posted back as sends until all have left (a stream send may take part),
//! then the next receive. Accepting stays a call.
//!
//! Housekeeping on vCPU 0 (default `none`) and how the VM ends are as for
//! `periodic` (see `rt`).

use super::rt::{self, Housekeeping};
use super::udp_echo::{addr_arg, ring_arg};
use super::Ctx;
use crate::net::{opt, TCP};
use crate::ring::{IoRing, Wait};
use crate::static_buf::StaticBuf;
use crate::vmrpc::{Error, Rpc};
use rtvm_abi::ring::op;
use rtvm_abi::vmrpc::Status;

/// Bytes received (and sent back) per call at most.
const CHUNK: usize = 64 * 1024;

static BUF: StaticBuf<CHUNK> = StaticBuf::new();

const DEFAULT_ADDR: &str = "198.18.0.1:7001";
const BACKLOG: u64 = 16;

pub fn run(ctx: &Ctx) -> ! {
    rt::run(ctx, "tcp-echo", Housekeeping::None, rt_task)
}

fn rt_task(ctx: &Ctx) -> u32 {
    let Some(addr) = addr_arg(ctx, "tcp-echo", DEFAULT_ADDR) else {
        return 2;
    };
    let conns = ctx.number_arg("conns", 1);
    let timeout_ms = ctx.number_arg("timeout", 0);
    let Some(wait) = ring_arg(ctx, "tcp-echo") else {
        return 2;
    };
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let buf = BUF.take();

    let listener = match listen(&mut rpc, addr) {
        Ok(handle) => handle,
        Err((what, e)) => {
            println!("tcp-echo: {what} {addr}: {e}");
            return 1;
        }
    };
    println!("tcp-echo: serving {addr}");
    let mut ring = None;
    if let Some(wait) = wait {
        match IoRing::setup(&mut rpc) {
            Ok(Some(r)) => {
                println!("tcp-echo: through rings ({wait:?})");
                ring = Some((r, wait));
            }
            Ok(None) => println!("tcp-echo: the VMM serves no rings: using calls"),
            Err(e) => {
                println!("tcp-echo: ring setup: {e}");
                let _ = rpc.close_socket(listener);
                return 1;
            }
        }
    }

    let (mut bytes, mut served, mut status) = (0u64, 0u64, 0);
    while conns == 0 || served < conns {
        let deadline = rpc.deadline_after_ms(timeout_ms);
        let (conn, peer) = match rpc.accept(listener, deadline) {
            Ok(accepted) => accepted,
            Err(e) if e == Error::from(Status::TimedOut) => {
                println!("tcp-echo: {timeout_ms} ms without a connection");
                break;
            }
            Err(e) => {
                println!("tcp-echo: accept: {e}");
                status = 1;
                break;
            }
        };
        served += 1;
        // Echoes are small and latency-bound: no Nagle delay.
        if let Err(e) = rpc.setsockopt(conn, opt::NODELAY, 1) {
            println!("tcp-echo: connection {served} from {peer}: NODELAY: {e}");
            status = 1;
        }
        let (echoed, result) = match &mut ring {
            Some((ring, wait)) => echo_through_ring(&mut rpc, ring, *wait, conn, buf, timeout_ms),
            None => echo(&mut rpc, conn, buf, timeout_ms),
        };
        bytes += echoed;
        if let Err((what, e)) = result {
            println!("tcp-echo: connection {served} from {peer}: {what}: {e} after {echoed} bytes");
            status = 1;
        }
        if let Err(e) = rpc.close_socket(conn) {
            println!("tcp-echo: connection {served}: close: {e}");
            status = 1;
        }
    }
    let _ = rpc.close_socket(listener);
    println!("tcp-echo: {bytes} bytes echoed over {served} connections");
    status
}

/// A listening socket on `addr`, or what failed.
fn listen(rpc: &mut Rpc, addr: crate::net::Addr) -> Result<u64, (&'static str, Error)> {
    let handle = rpc.socket(addr.family, TCP).map_err(|e| ("socket", e))?;
    let result = rpc
        .setsockopt(handle, opt::REUSEADDR, 1)
        .map_err(|e| ("REUSEADDR", e))
        .and_then(|()| rpc.bind(handle, addr).map_err(|e| ("bind", e)))
        .and_then(|()| rpc.listen(handle, BACKLOG).map_err(|e| ("listen", e)));
    match result {
        Ok(()) => Ok(handle),
        Err(failure) => {
            let _ = rpc.close_socket(handle);
            Err(failure)
        }
    }
}

/// Echoes everything received on `conn` until the peer closes. Returns the
/// bytes echoed and how it ended: `Ok` when the peer closed, else the call
/// that failed.
fn echo(
    rpc: &mut Rpc,
    conn: u64,
    buf: &mut [u8],
    timeout_ms: u64,
) -> (u64, Result<(), (&'static str, Error)>) {
    let mut echoed = 0;
    loop {
        let deadline = rpc.deadline_after_ms(timeout_ms);
        let n = match rpc.recv(conn, buf, deadline) {
            Ok((0, _)) => return (echoed, Ok(())),
            Ok((n, _)) => n,
            Err(e) => return (echoed, Err(("recv", e))),
        };
        let deadline = rpc.deadline_after_ms(timeout_ms);
        if let Err(e) = rpc.send_all(conn, &buf[..n], deadline) {
            return (echoed, Err(("send", e)));
        }
        echoed += n as u64;
    }
}

/// [`echo`] over the rings: one receive posted at a time, its bytes sent
/// back (what a send leaves is posted again) before the next receive, so
/// the stream keeps its order.
fn echo_through_ring(
    rpc: &mut Rpc,
    ring: &mut IoRing,
    wait: Wait,
    conn: u64,
    buf: &mut [u8],
    timeout_ms: u64,
) -> (u64, Result<(), (&'static str, Error)>) {
    let mut echoed = 0;
    // The bytes received and not yet all sent back: buf[sent..pending].
    let (mut sent, mut pending) = (0usize, 0usize);
    if let Err(e) = ring.post_recv(conn, buf, 0) {
        return (echoed, Err(("posting a receive", e)));
    }
    loop {
        let deadline = rpc.deadline_after_ms(timeout_ms);
        let c = match ring.next(rpc, wait, deadline) {
            Ok(c) => c,
            Err(e) => return (echoed, Err(("waiting on the ring", e))),
        };
        if c.status != 0 {
            let what = if c.op == op::RECV { "recv" } else { "send" };
            return (echoed, Err((what, Error(c.status))));
        }
        let posted = if c.op == op::RECV {
            if c.len == 0 {
                return (echoed, Ok(()));
            }
            (sent, pending) = (0, (c.len as usize).min(buf.len()));
            ring.post_send(conn, &buf[..pending], None, 1)
        } else {
            sent += c.len as usize;
            if sent < pending {
                ring.post_send(conn, &buf[sent..pending], None, 1)
            } else {
                echoed += pending as u64;
                ring.post_recv(conn, buf, 0)
            }
        };
        if let Err(e) = posted {
            return (echoed, Err(("posting", e)));
        }
    }
}
