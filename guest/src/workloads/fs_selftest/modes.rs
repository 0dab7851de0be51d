//! The modes of `fs-selftest` beside `all`: a read-only share, the
//! limits, open/close cycles, no share.

use super::*;

pub(super) fn readonly(rpc: &mut Rpc, t: &mut Tally) {
    t.record("read input.txt", {
        (|| {
            let h = ok("open", rpc.open("input.txt", open::READ, 0))?;
            let mut b = [0u8; 64];
            let n = ok("read", rpc.read(h, &mut b, 0));
            ok("close", rpc.close(h))?;
            let size = ok("stat", rpc.stat("input.txt"))?.size;
            if n? as u64 != size.min(64) {
                fail!("short read of a {size}-byte file");
            }
            Ok(())
        })()
    });
    let ro = S::ReadOnly;
    for (check, path, flags) in [
        ("open for writing", "input.txt", open::WRITE),
        ("open with CREATE", "new.txt", open::READ | open::CREATE),
        (
            "open with TRUNCATE",
            "input.txt",
            open::READ | open::TRUNCATE,
        ),
        ("open with APPEND", "input.txt", open::READ | open::APPEND),
    ] {
        let r = rpc.open(path, flags, 0);
        t.record(check, expect_open(rpc, r, ro));
    }
    t.record("mkdir", expect(rpc.mkdir("newdir", 0), ro));
    t.record(
        "unlink input.txt",
        expect(rpc.unlink("input.txt", false), ro),
    );
    t.record(
        "rename input.txt to x",
        expect(rpc.rename("input.txt", "x"), ro),
    );
    t.record("input.txt still there", {
        ok("stat", rpc.stat("input.txt")).and_then(|s| match s.kind {
            kind::FILE => Ok(()),
            k => Err(detail!("kind {k}")),
        })
    });
    t.record("new.txt not made", expect(rpc.stat("new.txt"), S::NotFound));
}

// ------------------------------------------------------------- mode=limits

/// Most open files `mode=limits` can hold handles for.
const MAX_OPEN: usize = 1024;

pub(super) fn limits(ctx: &Ctx, rpc: &mut Rpc, t: &mut Tally) {
    let (Some(files), Some(call), Some(written)) = (
        ctx.arg("open").map(|_| ctx.number_arg("open", 0)),
        ctx.arg("call").map(|_| ctx.number_arg("call", 0)),
        ctx.arg("written").map(|_| ctx.number_arg("written", 0)),
    ) else {
        println!("fs-selftest: mode=limits needs open=N call=B written=W");
        cpu::exit(2)
    };
    if files as usize >= MAX_OPEN || call == 0 {
        println!("fs-selftest: mode=limits: open={files} must be < {MAX_OPEN}, call={call} > 0");
        cpu::exit(2)
    }
    let files = files as usize;
    let ram = ctx.info.ram_size;
    let buf = scratch();

    let mut handles = [0u64; MAX_OPEN];
    let mut opened = 0;
    t.record("open input.txt up to the limit", {
        (|| {
            while opened < files {
                handles[opened] = ok("open", rpc.open("input.txt", open::READ, 0))
                    .map_err(|e| detail!("file {}: {e}", opened + 1))?;
                opened += 1;
            }
            Ok(())
        })()
    });
    let r = rpc.open("input.txt", open::READ, 0);
    t.record("one more open", expect_open(rpc, r, S::TooManyOpenFiles));
    t.record("close them all", {
        let mut result = Ok(());
        for &h in &handles[..opened] {
            if let Err(e) = rpc.close(h) {
                result = Err(detail!("close {h}: {e}"));
            }
        }
        result
    });
    t.record("open after closing", {
        ok("open", rpc.open("input.txt", open::READ, 0)).and_then(|h| ok("close", rpc.close(h)))
    });

    let Ok(h) = rpc.open("quota.bin", open::CREATE | open::WRITE | open::TRUNCATE, 0) else {
        t.record("create quota.bin", Err(detail!("open failed")));
        return;
    };
    // Making quota.bin took its share of the quota.
    let written = written.saturating_sub(rtvm_abi::vmrpc::fs::CREATE_COST);
    // The bytes to write: the scratch buffer if it is large enough; else
    // any guest RAM (the host only reads it), from the image on.
    let source = if call < SCRATCH as u64 {
        buf.as_ptr() as u64
    } else {
        GUEST_IMAGE_BASE
    };
    if source + call + 1 > ram {
        println!("fs-selftest: mode=limits: call={call} is larger than guest RAM");
        cpu::exit(2)
    }
    // One FsWrite of `len` bytes at the file position, counted in `total`.
    let mut total = 0;
    let raw_write = |rpc: &mut Rpc, total: &mut u64, len: u64| {
        let r = rpc.call(Call::FsWrite, 0, [h, source, len, CURRENT, 0, 0]);
        r.map(|r| {
            *total += r[0];
            r[0]
        })
    };
    let r = raw_write(rpc, &mut total, call + 1);
    t.record("one write of call + 1 bytes", expect(r, S::TooLarge));
    t.record("one write of call bytes", {
        match ok("write", raw_write(rpc, &mut total, call)) {
            Ok(n) if n == call => Ok(()),
            Ok(n) => Err(detail!("wrote {n} bytes")),
            Err(e) => Err(e),
        }
    });
    // Splitting at the host's limit, unknown to the library, if the quota
    // leaves room for it.
    if 2 * call < SCRATCH as u64 && 4 * call < written {
        let data = &buf[..2 * call as usize + 1];
        t.record("write_all of 2 * call + 1 bytes", {
            let r = ok("write_all", rpc.write_all(h, data, CURRENT));
            if r.is_ok() {
                total += data.len() as u64;
            }
            r
        });
    }
    t.record("writes until the quota", {
        (|| {
            for _ in 0..written / call + 3 {
                match raw_write(rpc, &mut total, call) {
                    Ok(_) => {}
                    Err(e) if e == Error::from(S::QuotaExceeded) => {
                        if total > written || total + call <= written {
                            fail!("{total} bytes accepted, quota {written}, {call} per call");
                        }
                        return Ok(());
                    }
                    Err(e) => fail!("after {total} bytes: {e}"),
                }
            }
            fail!("{total} bytes accepted and no QuotaExceeded (quota {written})")
        })()
    });
    // Whether the host refused a whole write that would cross the quota or
    // took what fitted, the rest up to the quota must go in, not a byte more.
    t.record("writes up to exactly the quota", {
        (|| {
            let rest = written.saturating_sub(total);
            if rest > 0 {
                match ok("write", raw_write(rpc, &mut total, rest))? {
                    n if n == rest => {}
                    n => fail!("{n} of the last {rest} bytes of the quota written"),
                }
            }
            expect(raw_write(rpc, &mut total, 1), S::QuotaExceeded)
                .map_err(|e| detail!("one byte past the quota: {e}"))
        })()
    });
    println!("fs-selftest: {total} bytes written in all");
    // quota.bin stays, for the host to check its size.
    t.record("quota.bin holds what was written", {
        (|| {
            size_is(rpc, h, total)?;
            ok("close", rpc.close(h))
        })()
    });
}

// ------------------------------------------------------------- mode=cycles

pub(super) fn cycles(ctx: &Ctx, rpc: &mut Rpc, t: &mut Tally) {
    let count = ctx.number_arg("count", 10_000);
    let start = rpc.now();
    t.record("open/close cycles", {
        (|| {
            for i in 0..count {
                let h = ok("open", rpc.open("input.txt", open::READ, 0))
                    .map_err(|e| detail!("cycle {i}: {e}"))?;
                ok("close", rpc.close(h)).map_err(|e| detail!("cycle {i}: {e}"))?;
            }
            Ok(())
        })()
    });
    let elapsed = rpc.now() - start;
    println!("fs-selftest: {count} open/close cycles");
    if let Some(each) = elapsed.checked_div(count) {
        println!("fs-selftest: {each} ns per open+close");
    }
}

// ------------------------------------------------------------ mode=noshare

pub(super) fn noshare(rpc: &mut Rpc, t: &mut Tally) {
    let ns = S::NoShare;
    let r = rpc.open("input.txt", open::READ, 0);
    t.record("open", expect_open(rpc, r, ns));
    t.record("stat", expect(rpc.stat("input.txt"), ns));
    let mut b = [0u8; 64];
    t.record("read", expect(rpc.read(1, &mut b, 0), ns));
    t.record("write", expect(rpc.write(1, b"x", 0), ns));
    t.record("fsync", expect(rpc.fsync(1), ns));
    t.record("close", expect(rpc.close(1), ns));
    t.record("fstat", expect(rpc.fstat(1), ns));
    t.record("mkdir", expect(rpc.mkdir("d", 0), ns));
    t.record("unlink", expect(rpc.unlink("input.txt", false), ns));
    t.record("rename", expect(rpc.rename("input.txt", "x"), ns));
    t.record("readdir", expect(rpc.readdir("dir", 0, &mut b), ns));
}
