//! `net-selftest port=P sockets=N cycles=C`: vCPU 0 checks the host's
//! socket service (the VMRPC socket calls) from the guest side; the other
//! vCPUs turn off. One line per check, `net-selftest: <check>: ok` or
//! `net-selftest: <check>: <detail> FAIL`, then `net-selftest: all <n>
//! checks passed` (exit 0) or `net-selftest: <k> of <n> checks failed`
//! (exit 1). A bad command line exits 2.
//!
//! The host must run it with this network policy: bind allowed on
//! `127.0.0.1` and `[::1]`, any port; connect and send allowed to the same;
//! nothing else; at most N sockets (default 16: pass the configured limit).
//! The host has no `getsockname`, so the sockets bind fixed ports P, P+1,
//! … P+6 (default P = 47000), which must be free on the host's loopback.
//!
//! Checked: UDP over IPv4 and IPv6 both ways with the sender's address, a
//! maximum-size IPv4 datagram byte for byte, a connected UDP socket, binding
//! port 0; TCP over IPv4 and IPv6 (listen, connect, accept, both ways, a
//! 1 MiB stream, end of stream after close); poll (exactly the ready entry,
//! a timeout no earlier than its deadline); timeouts of recv and accept;
//! every option; every error path (bad, closed and file-range handles,
//! buffers outside RAM, forbidden binds, connects and sends, bad families,
//! kinds, options and backlogs); the socket limit, exactly at N; and C
//! (default 1000) socket+close cycles.

// As in fs-selftest: a failure's detail is text in a fixed buffer.
#![expect(clippy::result_large_err, reason = "details are rare and unboxable")]

use super::Ctx;
use crate::cpu;
use crate::net::{opt, Addr, HANDLE_TAG, INET, INET6, POLL_MAX, TCP, UDP};
use crate::static_buf::StaticBuf;
use crate::vmrpc::{Error, Rpc};
use rtvm_abi::vmrpc::{Call, Status as S};

use super::selftest::{detail, expect, fail, ok, Check, Detail, Tally};

mod errors;
mod limits;

use errors::errors;
use limits::{socket_cycles, socket_limit};

/// `expect`, with `what` failed in the detail.
fn expect_in<T>(what: &str, result: Result<T, Error>, expected: S) -> Check {
    expect(result, expected).map_err(|e| detail!("{what}: {e}"))
}

/// Largest datagram: the UDP length field.
const BUF: usize = 65535;
/// Largest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header).
const MAX_V4_DATAGRAM: usize = 65507;
static SEND_BUF: StaticBuf<BUF> = StaticBuf::new();
static RECV_BUF: StaticBuf<BUF> = StaticBuf::new();

/// Most sockets this test keeps track of (so the largest `sockets=`).
const MAX_SOCKETS: usize = 1024;
/// How long a wait that should succeed may take.
const PATIENCE_MS: u64 = 2000;
/// The deadline of a wait that should time out.
const SHORT_MS: u64 = 50;
/// Bytes of the TCP stream check, and its pieces.
const STREAM: usize = 1 << 20;
const PIECE: usize = 32 * 1024;

const LO4: [u8; 4] = [127, 0, 0, 1];
const LO6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// A handle never issued.
const NEVER: u64 = HANDLE_TAG | 0x1234;
/// A destination the policy forbids (198.18.0.0/15 is for benchmarks; no
/// packet is ever sent to it).
const FORBIDDEN: Addr = Addr::v4([198, 18, 0, 9], 9);

/// Byte `i` of test data number `seed`.
fn pattern(seed: usize, i: usize) -> u8 {
    (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(7)) % 251) as u8
}

/// The test's state: the client, the sockets it holds open (so the limit
/// check can count them and everything is closed at the end), its buffers.
struct Net {
    rpc: Rpc,
    open: [u64; MAX_SOCKETS],
    n_open: usize,
    port: u16,
    ram: u64,
    send_buf: &'static mut [u8; BUF],
    recv_buf: &'static mut [u8; BUF],
}

impl Net {
    fn lo4(&self, offset: u16) -> Addr {
        Addr::v4(LO4, self.port + offset)
    }

    fn lo6(&self, offset: u16) -> Addr {
        Addr::v6(LO6, self.port + offset)
    }

    fn soon(&mut self) -> u64 {
        self.rpc.deadline_after_ms(PATIENCE_MS)
    }

    fn track(&mut self, handle: u64) {
        if self.n_open < MAX_SOCKETS {
            self.open[self.n_open] = handle;
            self.n_open += 1;
        }
    }

    fn untrack(&mut self, handle: u64) {
        if let Some(i) = self.open[..self.n_open].iter().position(|&h| h == handle) {
            self.n_open -= 1;
            self.open[i] = self.open[self.n_open];
        }
    }

    fn socket(&mut self, domain: u64, kind: u64) -> Result<u64, Detail> {
        let handle = ok("socket", self.rpc.socket(domain, kind))?;
        self.track(handle);
        Ok(handle)
    }

    fn close(&mut self, handle: u64) -> Check {
        ok("close", self.rpc.close_socket(handle))?;
        self.untrack(handle);
        Ok(())
    }

    /// A socket bound to `addr`.
    fn bound(&mut self, kind: u64, addr: Addr) -> Result<u64, Detail> {
        let handle = self.socket(addr.family, kind)?;
        ok("bind", self.rpc.bind(handle, addr)).map_err(|e| detail!("{addr}: {e}"))?;
        Ok(handle)
    }

    /// Sends a `len`-byte datagram (data number `seed`) from `from` to
    /// `to` at `to_addr`, and checks `to` receives it whole, from
    /// `from_addr`.
    fn datagram(
        &mut self,
        (from, from_addr): (u64, Addr),
        (to, to_addr): (u64, Addr),
        len: usize,
        seed: usize,
    ) -> Check {
        for (i, b) in self.send_buf[..len].iter_mut().enumerate() {
            *b = pattern(seed, i);
        }
        self.recv_buf.fill(0);
        let sent = ok(
            "send",
            self.rpc.send(from, &self.send_buf[..len], Some(to_addr)),
        )?;
        if sent != len {
            fail!("sent {sent} of {len} bytes");
        }
        let deadline = self.soon();
        let (n, sender) = ok("recv", self.rpc.recv(to, &mut self.recv_buf[..], deadline))?;
        if n != len {
            fail!("received {n} bytes, sent {len}");
        }
        if sender != from_addr {
            fail!("sender {sender}, expected {from_addr}");
        }
        if let Some(i) = (0..len).find(|&i| self.recv_buf[i] != self.send_buf[i]) {
            fail!("byte {i} differs");
        }
        Ok(())
    }

    /// Sends `len` bytes (data number `seed`) on TCP connection `from` and
    /// checks they arrive whole on `to`.
    fn stream(&mut self, from: u64, to: u64, len: usize, seed: usize) -> Check {
        for (i, b) in self.send_buf[..len].iter_mut().enumerate() {
            *b = pattern(seed, i);
        }
        let deadline = self.soon();
        ok(
            "send",
            self.rpc.send_all(from, &self.send_buf[..len], deadline),
        )?;
        let got = ok(
            "recv",
            self.rpc.recv_full(to, &mut self.recv_buf[..len], deadline),
        )?;
        if got != len {
            fail!("received {got} of {len} bytes before the end of stream");
        }
        if let Some(i) = (0..len).find(|&i| self.recv_buf[i] != self.send_buf[i]) {
            fail!("byte {i} differs");
        }
        Ok(())
    }

    /// Checks a wait answered `TimedOut`, and no earlier than `deadline`
    /// by the host clock.
    fn timed_out<T>(&mut self, result: Result<T, Error>, deadline: u64) -> Check {
        expect(result, S::TimedOut)?;
        let now = self.rpc.now_by_exit();
        if now < deadline {
            fail!("returned {} ns before its deadline", deadline - now);
        }
        Ok(())
    }
}

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let port = ctx.number_arg("port", 47000);
    let limit = ctx.number_arg("sockets", 16);
    let cycles = ctx.number_arg("cycles", 1000);
    if port == 0 || port + 6 > 65535 {
        println!("net-selftest: port={port}: needs 1..=65529 (it uses port..port+6)");
        cpu::exit(2)
    }
    if limit < 8 || limit >= MAX_SOCKETS as u64 {
        println!("net-selftest: sockets={limit}: needs 8..{MAX_SOCKETS}");
        cpu::exit(2)
    }
    let mut net = Net {
        rpc: Rpc::new(ctx.info, ctx.vcpu),
        open: [0; MAX_SOCKETS],
        n_open: 0,
        port: port as u16,
        ram: ctx.info.ram_size,
        send_buf: SEND_BUF.take(),
        recv_buf: RECV_BUF.take(),
    };
    let mut t = Tally::new("net-selftest");
    let udp = udp(&mut net, &mut t);
    tcp(&mut net, &mut t);
    options(&mut net, &mut t, udp);
    errors(&mut net, &mut t, udp);
    socket_limit(&mut net, &mut t, limit as usize);
    socket_cycles(&mut net, &mut t, cycles);
    t.finish()
}

/// The UDP sockets the later checks reuse: bound to P, P+1 ([`INET`]) and
/// P+2, P+3 ([`INET6`]); `None` where that failed.
#[derive(Clone, Copy)]
struct Udp {
    a: Option<u64>,
    b: Option<u64>,
    c: Option<u64>,
    d: Option<u64>,
}

fn need(handle: Option<u64>) -> Result<u64, Detail> {
    handle.ok_or_else(|| detail!("skipped: an earlier check made no socket"))
}

// --------------------------------------------------------------------- UDP

fn udp(n: &mut Net, t: &mut Tally) -> Udp {
    let (a4, b4, c6, d6) = (n.lo4(0), n.lo4(1), n.lo6(2), n.lo6(3));
    let mut u = Udp {
        a: None,
        b: None,
        c: None,
        d: None,
    };
    t.record("udp v4 socket and bind 127.0.0.1:P, :P+1", {
        (|| {
            u.a = Some(n.bound(UDP, a4)?);
            u.b = Some(n.bound(UDP, b4)?);
            Ok(())
        })()
    });
    t.record("udp v4 round trip, both ways", {
        (|| {
            let (a, b) = (need(u.a)?, need(u.b)?);
            n.datagram((b, b4), (a, a4), 13, 1)?;
            n.datagram((a, a4), (b, b4), 700, 2)
        })()
    });
    t.record("udp v4 datagram of 65507 bytes, byte-exact", {
        (|| {
            let (a, b) = (need(u.a)?, need(u.b)?);
            n.datagram((b, b4), (a, a4), MAX_V4_DATAGRAM, 3)
        })()
    });
    t.record("udp v4 empty datagram", {
        (|| {
            let (a, b) = (need(u.a)?, need(u.b)?);
            n.datagram((a, a4), (b, b4), 0, 4)
        })()
    });
    t.record("recv with a short deadline times out at it", {
        (|| {
            let a = need(u.a)?;
            let deadline = n.rpc.deadline_after_ms(SHORT_MS);
            let r = n.rpc.recv(a, &mut n.recv_buf[..], deadline);
            n.timed_out(r, deadline)
        })()
    });

    t.record("udp v6 socket and bind [::1]:P+2, :P+3", {
        (|| {
            u.c = Some(n.bound(UDP, c6)?);
            u.d = Some(n.bound(UDP, d6)?);
            Ok(())
        })()
    });
    t.record("udp v6 round trip, both ways", {
        (|| {
            let (c, d) = (need(u.c)?, need(u.d)?);
            n.datagram((c, c6), (d, d6), 21, 5)?;
            n.datagram((d, d6), (c, c6), 1200, 6)
        })()
    });

    // Poll over a, b, c: only b gets a datagram.
    t.record("poll wakes with exactly the ready entry", {
        (|| {
            let (a, b, c) = (need(u.a)?, need(u.b)?, need(u.c)?);
            let sent = ok("send", n.rpc.send(a, b"for b", Some(b4)))?;
            if sent != 5 {
                fail!("sent {sent} of 5 bytes");
            }
            let deadline = n.soon();
            let ready = ok("poll", n.rpc.poll(&[a, b, c], deadline))?;
            let (got, from) = ok("recv", n.rpc.recv(b, &mut n.recv_buf[..], deadline))?;
            if ready.mask != 0b010 || ready.count != 1 {
                fail!(
                    "mask {:#b}, count {}: expected 0b10, 1",
                    ready.mask,
                    ready.count
                );
            }
            if got != 5 || from != a4 {
                fail!("b then received {got} bytes from {from}");
            }
            Ok(())
        })()
    });
    t.record("poll with nothing ready times out at its deadline", {
        (|| {
            let (a, b, c) = (need(u.a)?, need(u.b)?, need(u.c)?);
            let deadline = n.rpc.deadline_after_ms(SHORT_MS);
            let r = n.rpc.poll(&[a, b, c], deadline);
            n.timed_out(r, deadline)
        })()
    });
    t.record("poll of POLL_MAX + 1 handles is refused", {
        (|| {
            let a = need(u.a)?;
            let handles = [a; POLL_MAX as usize + 1];
            let deadline = n.rpc.deadline_after_ms(SHORT_MS);
            match n.rpc.poll(&handles, deadline) {
                Err(e) if e == S::BadArgument.into() || e == S::TooLarge.into() => Ok(()),
                Err(e) => fail!("got {e}, expected bad argument or too large"),
                Ok(_) => fail!("succeeded"),
            }
        })()
    });
    t.record("poll of POLL_MAX handles is served", {
        (|| {
            let a = need(u.a)?;
            let handles = [a; POLL_MAX as usize];
            let deadline = n.rpc.deadline_after_ms(SHORT_MS);
            let r = n.rpc.poll(&handles, deadline);
            n.timed_out(r, deadline)
        })()
    });

    // Last: it connects b to a, so b hears only from a afterwards.
    t.record("udp connected send", {
        (|| {
            let (a, b) = (need(u.a)?, need(u.b)?);
            let deadline = n.soon();
            ok("connect", n.rpc.connect(b, a4, deadline))?;
            let sent = ok("send", n.rpc.send(b, b"connected", None))?;
            let (got, from) = ok("recv", n.rpc.recv(a, &mut n.recv_buf[..], deadline))?;
            if sent != 9 || got != 9 || from != b4 || &n.recv_buf[..9] != b"connected" {
                fail!("sent {sent}, received {got} bytes from {from}");
            }
            Ok(())
        })()
    });
    t.record("udp bind 127.0.0.1:0 (any port)", {
        (|| {
            let h = n.bound(UDP, Addr::v4(LO4, 0))?;
            n.close(h)
        })()
    });
    u
}

// --------------------------------------------------------------------- TCP

/// A listener on `addr`, a client connected to it, and the accepted end.
fn tcp_pair(n: &mut Net, addr: Addr) -> Result<(u64, u64, u64), Detail> {
    let listener = n.socket(addr.family, TCP)?;
    ok("REUSEADDR", n.rpc.setsockopt(listener, opt::REUSEADDR, 1))?;
    ok("bind", n.rpc.bind(listener, addr))?;
    ok("listen", n.rpc.listen(listener, 4))?;
    let client = n.socket(addr.family, TCP)?;
    let deadline = n.soon();
    ok("connect", n.rpc.connect(client, addr, deadline))?;
    let (server, peer) = ok("accept", n.rpc.accept(listener, deadline))?;
    n.track(server);
    if peer.family != addr.family || !peer.same_host(&addr) {
        fail!("accepted a peer at {peer}, expected the host of {addr}");
    }
    Ok((listener, client, server))
}

fn tcp(n: &mut Net, t: &mut Tally) {
    let mut pair = None;
    let addr = n.lo4(4);
    t.record("tcp v4 listen, connect, accept", {
        tcp_pair(n, addr).map(|p| pair = Some(p))
    });
    let Some((listener, client, server)) = pair else {
        return;
    };
    t.record("tcp v4 both ways", {
        n.stream(client, server, 20, 7)
            .and_then(|()| n.stream(server, client, 3000, 8))
    });
    t.record("tcp v4 stream of 1 MiB in 32 KiB pieces", {
        (|| {
            for piece in 0..STREAM / PIECE {
                n.stream(client, server, PIECE, piece)
                    .map_err(|e| detail!("piece {piece}: {e}"))?;
            }
            Ok(())
        })()
    });
    t.record("tcp v4 send of 60000 bytes at once", {
        // Possibly more than one send takes (the host caps socket buffers),
        // so the sender loops; the receiver reads it all after.
        n.stream(client, server, 60_000, 9)
    });
    t.record("accept with a short deadline times out at it", {
        let deadline = n.rpc.deadline_after_ms(SHORT_MS);
        let r = n.rpc.accept(listener, deadline);
        if let Ok((h, _)) = r {
            n.track(h);
        }
        n.timed_out(r, deadline)
    });
    t.record("tcp v4 close is the end of stream on the other side", {
        (|| {
            n.close(client)?;
            let deadline = n.soon();
            match ok("recv", n.rpc.recv(server, &mut n.recv_buf[..], deadline))? {
                (0, _) => Ok(()),
                (got, _) => fail!("received {got} bytes"),
            }
        })()
    });
    t.record("tcp v4 close of the accepted and listening sockets", {
        n.close(server).and_then(|()| n.close(listener))
    });

    let addr = n.lo6(5);
    t.record("tcp v6 listen, connect, accept, both ways, close", {
        (|| {
            let (listener, client, server) = tcp_pair(n, addr)?;
            n.stream(client, server, 100, 10)?;
            n.stream(server, client, 100, 11)?;
            n.close(server)?;
            let deadline = n.soon();
            match ok("recv", n.rpc.recv(client, &mut n.recv_buf[..], deadline))? {
                (0, _) => {}
                (got, _) => fail!("client received {got} bytes after the close"),
            }
            n.close(client)?;
            n.close(listener)
        })()
    });
}

// ----------------------------------------------------------------- options

fn options(n: &mut Net, t: &mut Tally, u: Udp) {
    t.record(
        "setsockopt REUSEADDR, RCVBUF, SNDBUF, PRIORITY, TOS on udp v4",
        {
            (|| {
                let a = need(u.a)?;
                for (name, option, value) in [
                    ("REUSEADDR", opt::REUSEADDR, 1),
                    ("RCVBUF", opt::RCVBUF, 256 * 1024),
                    ("SNDBUF", opt::SNDBUF, 256 * 1024),
                    ("PRIORITY", opt::PRIORITY, 6),
                    ("TOS", opt::TOS, 0xb8),
                ] {
                    ok(name, n.rpc.setsockopt(a, option, value))?;
                }
                Ok(())
            })()
        },
    );
    t.record("setsockopt TOS (traffic class) on udp v6", {
        (|| {
            let c = need(u.c)?;
            ok("TOS", n.rpc.setsockopt(c, opt::TOS, 0xb8))
        })()
    });
    t.record("setsockopt NODELAY, PRIORITY, TOS on tcp", {
        (|| {
            let h = n.socket(INET, TCP)?;
            let r = ok("NODELAY", n.rpc.setsockopt(h, opt::NODELAY, 1))
                .and_then(|()| ok("PRIORITY", n.rpc.setsockopt(h, opt::PRIORITY, 0)))
                .and_then(|()| ok("TOS", n.rpc.setsockopt(h, opt::TOS, 0x10)));
            n.close(h)?;
            r
        })()
    });
    t.record("setsockopt of an unknown option", {
        (|| {
            let a = need(u.a)?;
            expect_in("option 99", n.rpc.setsockopt(a, 99, 1), S::BadArgument)?;
            expect_in("option 0", n.rpc.setsockopt(a, 0, 1), S::BadArgument)
        })()
    });
    t.record("setsockopt PRIORITY 7 and TOS 256 are out of range", {
        (|| {
            let a = need(u.a)?;
            let r = n.rpc.setsockopt(a, opt::PRIORITY, 7);
            expect_in("PRIORITY 7", r, S::BadArgument)?;
            let r = n.rpc.setsockopt(a, opt::TOS, 256);
            expect_in("TOS 256", r, S::BadArgument)
        })()
    });
}

// ------------------------------------------------------------------ errors
