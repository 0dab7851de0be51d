//! `udp-echo rt=V addr=A count=N timeout=T housekeeping=H`: the real-time
//! UDP echo server. On vCPU V (default: the last) it binds a UDP socket to
//! A (default `198.18.0.1:7000`; `a.b.c.d:port` or `[v6]:port`), prints
//! `udp-echo: serving <A>`, and then receives datagrams (a long poll that
//! parks only its vCPU) and sends each, byte for byte, back to its sender,
//! until it has echoed N (default 0: forever) or T ms (default 0: never)
//! pass without a datagram. It ends with `udp-echo: <n> datagrams echoed`,
//! exit 0; 1 if a socket call failed, 2 for a bad command line.
//!
//! Housekeeping on vCPU 0 (default `none`) and how the VM ends are as for
//! `periodic` (see `rt`).

use super::rt::{self, Housekeeping};
use super::Ctx;
use crate::net::{Addr, UDP};
use crate::static_buf::StaticBuf;
use crate::vmrpc::{Error, Rpc};
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

fn rt_task(ctx: &Ctx) -> u32 {
    let Some(addr) = addr_arg(ctx, "udp-echo", DEFAULT_ADDR) else {
        return 2;
    };
    let count = ctx.number_arg("count", 0);
    let timeout_ms = ctx.number_arg("timeout", 0);
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
