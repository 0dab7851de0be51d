//! Every error status the socket calls give a guest that asks for it.

use super::*;

pub(super) fn errors(n: &mut Net, t: &mut Tally, u: Udp) {
    let ram = n.ram;
    let b4 = n.lo4(1);
    let mut buf = [0u8; 16];
    let short = n.rpc.deadline_after_ms(SHORT_MS);

    for (name, handle) in [
        ("never-issued handle", NEVER),
        ("file-range handle 1", 1),
        ("handle 0", 0),
    ] {
        let check = detail!("{name}: every call answers bad handle");
        t.record(check.as_str(), {
            (|| {
                let bh = S::BadHandle;
                let rpc = &mut n.rpc;
                expect_in("bind", rpc.bind(handle, b4), bh)?;
                expect_in("listen", rpc.listen(handle, 1), bh)?;
                expect_in("accept", rpc.accept(handle, short), bh)?;
                expect_in("connect", rpc.connect(handle, b4, short), bh)?;
                expect_in("send", rpc.send(handle, b"x", Some(b4)), bh)?;
                expect_in("recv", rpc.recv(handle, &mut buf, short), bh)?;
                expect_in("poll", rpc.poll(&[handle], short), bh)?;
                expect_in("setsockopt", rpc.setsockopt(handle, opt::TOS, 0), bh)?;
                expect_in("close", rpc.close_socket(handle), bh)
            })()
        });
    }
    t.record("closed handle: answers bad handle", {
        (|| {
            let h = n.socket(INET, UDP)?;
            n.close(h)?;
            let bh = S::BadHandle;
            let rpc = &mut n.rpc;
            expect_in("send", rpc.send(h, b"x", Some(b4)), bh)?;
            expect_in("recv", rpc.recv(h, &mut buf, short), bh)?;
            expect_in("bind", rpc.bind(h, b4), bh)?;
            expect_in("setsockopt", rpc.setsockopt(h, opt::TOS, 0), bh)?;
            expect_in("close again", rpc.close_socket(h), bh)
        })()
    });
    t.record("poll with a bad handle among good ones", {
        (|| {
            let a = need(u.a)?;
            expect(n.rpc.poll(&[a, NEVER], short), S::BadHandle)
        })()
    });

    t.record("send from a buffer outside guest RAM", {
        (|| {
            let a = need(u.a)?;
            let [w0, w1, w2] = b4.words();
            let r = n.rpc.call(Call::NetSend, 0, [a, ram - 8, 16, w0, w1, w2]);
            expect_in("across the end", r, S::BadAddress)?;
            let r = n
                .rpc
                .call(Call::NetSend, 0, [a, u64::MAX - 3, 8, w0, w1, w2]);
            expect_in("overflowing", r, S::BadAddress)
        })()
    });
    t.record("recv into a buffer outside guest RAM", {
        (|| {
            let a = need(u.a)?;
            // A datagram waiting, so a host that checks late still must say so.
            ok("send", n.rpc.send(need(u.b)?, b"pending", Some(n.lo4(0))))?;
            let deadline = n.rpc.deadline_after_ms(SHORT_MS);
            let r = n
                .rpc
                .call(Call::NetRecv, 0, [a, ram - 8, 16, deadline, 0, 0]);
            expect_in("across the end", r, S::BadAddress)?;
            let r = n
                .rpc
                .call(Call::NetRecv, 0, [a, u64::MAX - 3, 8, deadline, 0, 0]);
            expect_in("overflowing", r, S::BadAddress)?;
            // Drain what is left (if the host took the datagram, nothing).
            let _ = n.rpc.recv(a, &mut n.recv_buf[..], deadline);
            Ok(())
        })()
    });
    t.record("poll of a handle list outside guest RAM", {
        let r = n.rpc.call(Call::NetPoll, 0, [ram - 8, 2, short, 0, 0, 0]);
        expect(r, S::BadAddress)
    });

    let port = n.port;
    for (name, domain, addr) in [
        ("198.18.0.1:1", INET, Addr::v4([198, 18, 0, 1], 1)),
        ("0.0.0.0:P+6", INET, Addr::v4([0; 4], port + 6)),
        ("127.0.0.2:P+6", INET, Addr::v4([127, 0, 0, 2], port + 6)),
        ("[::]:P+6", INET6, Addr::v6([0; 16], port + 6)),
        (
            "[::ffff:127.0.0.1]:P+6",
            INET6,
            Addr::v6(
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
                port + 6,
            ),
        ),
    ] {
        let check = detail!("bind to forbidden {name}");
        t.record(check.as_str(), {
            (|| {
                let h = n.socket(domain, UDP)?;
                let r = n.rpc.bind(h, addr);
                n.close(h)?;
                expect(r, S::NotPermitted)
            })()
        });
    }
    t.record(
        "listen on an unbound tcp socket (it would bind 0.0.0.0) is refused",
        {
            (|| {
                let h = n.socket(INET, TCP)?;
                let r = n.rpc.listen(h, 1);
                n.close(h)?;
                match r {
                    Err(_) => Ok(()),
                    Ok(()) => fail!("succeeded"),
                }
            })()
        },
    );
    let mapped = Addr::v6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 9], 9);
    t.record("connect to forbidden 198.18.0.9:9 (udp and tcp)", {
        (|| {
            for kind in [UDP, TCP] {
                let h = n.socket(INET, kind)?;
                let deadline = n.soon();
                let r = n.rpc.connect(h, FORBIDDEN, deadline);
                n.close(h)?;
                expect_in(if kind == UDP { "udp" } else { "tcp" }, r, S::NotPermitted)?;
            }
            Ok(())
        })()
    });
    t.record("connect to forbidden [::ffff:198.18.0.9]:9 (tcp)", {
        (|| {
            let h = n.socket(INET6, TCP)?;
            let deadline = n.soon();
            let r = n.rpc.connect(h, mapped, deadline);
            n.close(h)?;
            expect(r, S::NotPermitted)
        })()
    });
    t.record(
        "send to forbidden 198.18.0.9:9 and [::ffff:198.18.0.9]:9",
        {
            (|| {
                let (a, c) = (need(u.a)?, need(u.c)?);
                expect_in("v4", n.rpc.send(a, b"x", Some(FORBIDDEN)), S::NotPermitted)?;
                expect_in("v6", n.rpc.send(c, b"x", Some(mapped)), S::NotPermitted)
            })()
        },
    );

    t.record("socket of a bad family or kind", {
        (|| {
            for (domain, kind) in [(5, UDP), (0, TCP), (INET, 3), (INET6, 0), (INET, u64::MAX)] {
                let r = n.rpc.socket(domain, kind);
                if let Ok(h) = r {
                    n.track(h);
                }
                expect_in(
                    detail!("family {domain} kind {kind}").as_str(),
                    r,
                    S::BadArgument,
                )?;
            }
            Ok(())
        })()
    });
    t.record("bind to an address of an unknown family", {
        (|| {
            let h = n.socket(INET, UDP)?;
            let weird = Addr {
                family: 9,
                ..n.lo4(6)
            };
            let r = n.rpc.bind(h, weird);
            n.close(h)?;
            expect(r, S::BadArgument)
        })()
    });
    t.record("listen with a backlog of 1025", {
        (|| {
            let h = n.socket(INET, TCP)?;
            ok("REUSEADDR", n.rpc.setsockopt(h, opt::REUSEADDR, 1))?;
            let bound = ok("bind", n.rpc.bind(h, n.lo4(6)));
            let r = n.rpc.listen(h, 1025);
            n.close(h)?;
            bound?;
            expect(r, S::BadArgument)
        })()
    });
}

// ------------------------------------------------------------------ limits
