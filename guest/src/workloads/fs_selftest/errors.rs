//! (f) and (g) of `fs-selftest`: every error status a guest can run into,
//! and every way out of the share.

use super::*;

/// (f) Every error status a well-formed guest can run into, and the
/// malformed arguments.
pub(super) fn errors(rpc: &mut Rpc, t: &mut Tally, ram: u64) {
    let r = rpc.open("missing.txt", open::READ, 0);
    t.record("open of a missing file", expect_open(rpc, r, S::NotFound));
    let r = rpc.open("input.txt", open::CREATE | open::WRITE | open::EXCLUSIVE, 0);
    t.record(
        "exclusive create of an existing file",
        expect_open(rpc, r, S::AlreadyExists),
    );
    let r = rpc.open("dir", open::WRITE, 0);
    t.record(
        "open of a directory for writing",
        expect_open(rpc, r, S::IsADirectory),
    );
    let r = rpc.open("input.txt/x", open::READ, 0);
    t.record("open below a file", expect_open(rpc, r, S::NotADirectory));
    let mut b = [0u8; 16];
    t.record("read of a never-issued handle", {
        expect(rpc.read(0xdead_beef, &mut b, 0), S::BadHandle)
    });
    t.record(
        "close of a never-issued handle",
        expect(rpc.close(0xdead_beef), S::BadHandle),
    );
    t.record("use of a closed handle", {
        (|| {
            let h = ok("open", rpc.open("input.txt", open::READ, 0))?;
            ok("close", rpc.close(h))?;
            expect(rpc.read(h, &mut b, 0), S::BadHandle).map_err(|e| detail!("read: {e}"))?;
            expect(rpc.fstat(h), S::BadHandle).map_err(|e| detail!("fstat: {e}"))?;
            expect(rpc.close(h), S::BadHandle).map_err(|e| detail!("close again: {e}"))
        })()
    });
    let r = rpc
        .call(Call::FsOpen, 0, [ram, 4, open::READ, 0, 0, 0])
        .map(|r| r[0]);
    t.record("path at the end of RAM", expect_open(rpc, r, S::BadAddress));
    let r = rpc
        .call(Call::FsStat, 0, [u64::MAX - 3, 8, 0, 0, 0, 0])
        .map(|r| r[0]);
    t.record("path address overflowing", expect(r, S::BadAddress));
    // "x/x/.../xx": a path of many components, none of which exists.
    let mut long = [b'x'; PATH_MAX as usize + 1];
    for pair in long.chunks_mut(2) {
        pair[0] = b'x';
        if pair.len() == 2 {
            pair[1] = b'/';
        }
    }
    long[PATH_MAX as usize - 1] = b'x';
    let r = rpc.open(&long[..], open::READ, 0);
    t.record(
        "path of PATH_MAX + 1 bytes",
        expect_open(rpc, r, S::BadArgument),
    );
    let r = rpc.open(&long[..PATH_MAX as usize], open::READ, 0);
    t.record(
        "path of PATH_MAX bytes is looked up",
        expect_open(rpc, r, S::NotFound),
    );
    t.record("read across the end of RAM", {
        (|| {
            let h = ok("open", rpc.open("input.txt", open::READ, 0))?;
            let r = rpc.call(Call::FsRead, 0, [h, ram - 8, 16, 0, 0, 0]);
            ok("close", rpc.close(h))?;
            expect(r, S::BadAddress)
        })()
    });
    let r = rpc.open("input.txt", open::READ | 1 << 20, 0);
    t.record("unknown open flag", expect_open(rpc, r, S::BadArgument));
    t.record("write to a read-only handle", {
        (|| {
            let h = ok("open", rpc.open("input.txt", open::READ, 0))?;
            let r = rpc.write(h, b"x", 0);
            ok("close", rpc.close(h))?;
            expect(r, S::NotPermitted)
        })()
    });
    let r = rpc.open(b"bad\xff.txt", open::READ, 0);
    t.record("path not UTF-8", expect_open(rpc, r, S::BadArgument));
}

/// (g) Ways out of the share: all refused, nothing made or moved.
pub(super) fn escapes(rpc: &mut Rpc, t: &mut Tally) {
    let np = S::NotPermitted;
    let write = open::CREATE | open::WRITE;
    for (path, flags) in [
        ("../x", write),
        ("dir/../../x", write),
        ("/etc/passwd", open::READ),
        ("link-out/etc/passwd", open::READ),
        ("escape/secret", open::READ),
        ("escape/new", write),
    ] {
        let check = detail!("open {path}");
        let r = rpc.open(path, flags, 0);
        t.record(check.as_str(), expect_open(rpc, r, np));
    }
    t.record("mkdir ../evil", expect(rpc.mkdir("../evil", 0), np));
    t.record("mkdir escape/evil", expect(rpc.mkdir("escape/evil", 0), np));
    t.record("rename out.bin to ../moved", {
        expect(rpc.rename("out.bin", "../moved"), np)
            .and_then(|()| ok("stat out.bin afterwards", rpc.stat("out.bin")).map(drop))
    });
    t.record("rename escape/secret into the share", {
        expect(rpc.rename("escape/secret", "stolen"), np)
            .and_then(|()| expect(rpc.stat("stolen"), S::NotFound))
    });
    t.record("stat ..", expect(rpc.stat(".."), np));
    t.record("stat escape/secret", expect(rpc.stat("escape/secret"), np));
    t.record(
        "unlink escape/secret",
        expect(rpc.unlink("escape/secret", false), np),
    );
    let mut buf = [0u8; 64];
    t.record(
        "readdir link-out",
        expect(rpc.readdir("link-out", 0, &mut buf), np),
    );
    t.record(
        "readdir escape",
        expect(rpc.readdir("escape", 0, &mut buf), np),
    );
}

// ----------------------------------------------------------- mode=readonly
