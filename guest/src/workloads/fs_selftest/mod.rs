//! `fs-selftest mode=M`: vCPU 0 checks the host's file service (the VMRPC
//! file calls on the share) from the guest side; the other vCPUs turn off.
//! One line per check, `fs-selftest: <check>: ok` or `fs-selftest: <check>:
//! <detail> FAIL`, then `fs-selftest: all <n> checks passed` (exit 0) or
//! `fs-selftest: <k> of <n> checks failed` (exit 1). A bad command line
//! exits 2.
//!
//! The share must hold what the host test prepares: a file `input.txt`, a
//! directory `dir/` with files `a` and `b`, a symlink `link-out -> /`, and a
//! symlink `escape -> ../outside` (a directory beside the share).
//!
//! Modes:
//! - `all` (default): reads `input.txt` and prints `fs-selftest: input.txt:
//!   <len> bytes, fnv1a64 <hex>` for the host to compare; writes `out.bin`
//!   (`size=` bytes, default 100000, byte i = (i*7+3) % 251) in 4000-byte
//!   writes and reads it back; positioned, file-position and append I/O;
//!   stat kinds; directories (mkdir, rename, readdir and its pagination,
//!   unlink); every error status the guest can provoke; and escapes from the
//!   share, which must all be `NotPermitted`. Leaves the share as it found
//!   it, but for `out.bin` with `keep=1`, for the host to check.
//! - `readonly`: on a read-only share, reading works and every write-class
//!   call answers `ReadOnly`.
//! - `limits open=N call=B written=W` (the limits the host was given): N
//!   open files and no more, B bytes per call and no more, W bytes written
//!   in all and no more. Writes `quota.bin` and leaves it, for the host to
//!   check it holds no more than W bytes.
//! - `cycles count=C`: C (default 10000) open+close pairs of `input.txt`.
//! - `noshare`: without a share, every file call answers `NoShare`.

// A failure's detail is text in a fixed buffer (there is no allocator); it
// is only moved on the failure path, where its size costs nothing.
#![expect(clippy::result_large_err, reason = "details are rare and unboxable")]

use super::Ctx;
use crate::cpu;
use crate::fs::{kind, open, records, CURRENT};
use crate::vmrpc::{Error, Rpc};
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};
use rtvm_abi::vmrpc::{Call, Status as S, PATH_MAX};
use rtvm_abi::GUEST_IMAGE_BASE;

use super::selftest::{detail, expect, fail, ok, Check, Detail, Tally};

mod errors;
mod modes;

use errors::{errors, escapes};
use modes::{cycles, limits, noshare, readonly};

/// An open that must fail with `expected`; a handle it got anyway is closed.
fn expect_open(rpc: &mut Rpc, result: Result<u64, Error>, expected: S) -> Check {
    if let Ok(handle) = result {
        let _ = rpc.close(handle);
    }
    expect(result, expected)
}

/// Bytes of the scratch buffer: room for large reads and writes without a
/// large stack frame (the user stack is well under 256 KiB).
const SCRATCH: usize = 256 * 1024;

struct Scratch(UnsafeCell<[u8; SCRATCH]>);

// SAFETY: only `scratch` touches the buffer, and it hands it out once.
unsafe impl Sync for Scratch {}

static SCRATCH_BUF: Scratch = Scratch(UnsafeCell::new([0; SCRATCH]));
static SCRATCH_TAKEN: AtomicBool = AtomicBool::new(false);

/// The scratch buffer. Once per run (only vCPU 0 runs this workload).
fn scratch() -> &'static mut [u8; SCRATCH] {
    assert!(
        !SCRATCH_TAKEN.swap(true, Ordering::Relaxed),
        "scratch buffer taken twice"
    );
    // SAFETY: the flag makes this the only reference ever made.
    unsafe { &mut *SCRATCH_BUF.0.get() }
}

/// FNV-1a, 64-bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Byte `i` of `out.bin`.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) % 251) as u8
}

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let mut t = Tally::new("fs-selftest");
    match ctx.arg("mode").unwrap_or("all") {
        "all" => all(ctx, &mut rpc, &mut t),
        "readonly" => readonly(&mut rpc, &mut t),
        "limits" => limits(ctx, &mut rpc, &mut t),
        "cycles" => cycles(ctx, &mut rpc, &mut t),
        "noshare" => noshare(&mut rpc, &mut t),
        other => {
            println!(
                "fs-selftest: mode={other}: expected all, readonly, limits, cycles or noshare"
            );
            cpu::exit(2)
        }
    }
    t.finish()
}

// ---------------------------------------------------------------- mode=all

fn all(ctx: &Ctx, rpc: &mut Rpc, t: &mut Tally) {
    let size = ctx.number_arg("size", 100_000);
    let ram = ctx.info.ram_size;
    let buf = scratch();
    // What an earlier, interrupted run may have left.
    for (path, dir) in [
        ("newdir/f", false),
        ("newdir/g", false),
        ("newdir", true),
        ("out.bin", false),
        ("pos.bin", false),
    ] {
        let _ = rpc.unlink(path, dir);
    }

    let input = read_input(rpc, buf);
    let input_len = input.as_ref().ok().copied();
    t.record("read input.txt", input.map(drop));
    t.record("write out.bin", write_out(rpc, size));
    t.record("read back out.bin", read_back(rpc, size, buf));
    positioned(rpc, t);
    kinds(rpc, t, input_len);
    directories(rpc, t);
    errors(rpc, t, ram);
    escapes(rpc, t);
    if ctx.number_arg("keep", 0) == 0 {
        t.record("remove out.bin", {
            let removed = ok("unlink", rpc.unlink("out.bin", false));
            removed.and_then(|()| expect(rpc.stat("out.bin"), S::NotFound))
        });
    }
}

/// (a) Reads `input.txt` whole and prints its length and hash; returns the
/// length.
fn read_input(rpc: &mut Rpc, buf: &mut [u8]) -> Result<u64, Detail> {
    let handle = ok("open", rpc.open("input.txt", open::READ, 0))?;
    let mut hash = Fnv::new();
    let mut len = 0u64;
    loop {
        // At the file position: each read_full goes on where the last ended.
        let n = ok("read", rpc.read_full(handle, buf, CURRENT))?;
        hash.update(&buf[..n]);
        len += n as u64;
        if n < buf.len() {
            break;
        }
    }
    println!(
        "fs-selftest: input.txt: {len} bytes, fnv1a64 {:016x}",
        hash.0
    );
    let stat = ok("fstat", rpc.fstat(handle))?;
    ok("close", rpc.close(handle))?;
    if stat.size != len {
        fail!("read {len} bytes, fstat says {}", stat.size);
    }
    Ok(len)
}

/// Bytes per write of `out.bin`: the file is far larger than the call
/// page's payload area, and no write lines up with a page.
const WRITE_SIZE: usize = 4000;

/// (b) Writes `out.bin`.
fn write_out(rpc: &mut Rpc, size: u64) -> Check {
    let handle = ok(
        "open",
        rpc.open("out.bin", open::CREATE | open::WRITE | open::TRUNCATE, 0),
    )?;
    let mut piece = [0u8; WRITE_SIZE];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(WRITE_SIZE as u64) as usize;
        for (i, b) in piece[..n].iter_mut().enumerate() {
            *b = pattern(at + i as u64);
        }
        ok("write", rpc.write_all(handle, &piece[..n], CURRENT))
            .map_err(|e| detail!("at {at}: {e}"))?;
        at += n as u64;
    }
    ok("fsync", rpc.fsync(handle))?;
    ok("close", rpc.close(handle))
}

/// (b) Reopens `out.bin` and checks every byte and the size.
fn read_back(rpc: &mut Rpc, size: u64, buf: &mut [u8]) -> Check {
    let handle = ok("open", rpc.open("out.bin", open::READ, 0))?;
    let mut at = 0;
    while at < size {
        let want = (size - at).min(buf.len() as u64) as usize;
        let n = ok("read", rpc.read_full(handle, &mut buf[..want], at))?;
        if n < want {
            fail!("file ends at {}, expected {size} bytes", at + n as u64);
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(at + i as u64)) {
            let i = at + i as u64;
            fail!("byte {i} is {}, expected {}", buf[i as usize], pattern(i));
        }
        at += n as u64;
    }
    let mut extra = [0u8; 16];
    let n = ok("read at the end", rpc.read(handle, &mut extra, size))?;
    if n != 0 {
        fail!("read at offset {size} (the end) got {n} bytes");
    }
    let stat = ok("fstat", rpc.fstat(handle))?;
    if stat.size != size || stat.kind != kind::FILE {
        fail!(
            "fstat: size {} kind {}, expected {size} and a file",
            stat.size,
            stat.kind
        );
    }
    ok("close", rpc.close(handle))
}

/// Reads `want.len()` bytes at `offset` of `handle` and compares them to
/// `want`.
fn read_is(rpc: &mut Rpc, handle: u64, offset: u64, want: &[u8]) -> Check {
    let mut got = [0u8; 64];
    let got = &mut got[..want.len()];
    let n = ok("read", rpc.read_full(handle, got, offset))?;
    if &got[..n] != want {
        let (got, want) = (Bytes(&got[..n]), Bytes(want));
        if offset == CURRENT {
            fail!("read at the position: {got:?}, expected {want:?}");
        }
        fail!("read at {offset}: {got:?}, expected {want:?}");
    }
    Ok(())
}

/// Bytes shown as text where they are printable.
struct Bytes<'a>(&'a [u8]);

impl core::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        f.write_str("\"")?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

fn size_is(rpc: &mut Rpc, handle: u64, size: u64) -> Check {
    let stat = ok("fstat", rpc.fstat(handle))?;
    if stat.size != size {
        fail!("size {}, expected {size}", stat.size);
    }
    Ok(())
}

/// (c) Positioned I/O, the file position, append mode, on `pos.bin`.
fn positioned(rpc: &mut Rpc, t: &mut Tally) {
    let rw = open::READ | open::WRITE;
    let Ok(h) = rpc.open("pos.bin", rw | open::CREATE | open::TRUNCATE, 0) else {
        t.record("create pos.bin", Err(detail!("open failed")));
        return;
    };
    t.record("write and read at offsets", {
        (|| {
            ok("write", rpc.write_all(h, b"0123456789", 0))?;
            ok("write", rpc.write_all(h, b"AB", 4))?;
            read_is(rpc, h, 0, b"0123AB6789")?;
            read_is(rpc, h, 3, b"3AB6")
        })()
    });
    t.record("write past the end leaves a hole of zeros", {
        (|| {
            ok("write", rpc.write_all(h, b"Z", 20))?;
            size_is(rpc, h, 21)?;
            read_is(rpc, h, 8, b"89\0\0\0\0\0\0\0\0\0\0Z")
        })()
    });
    t.record("read at the end gives 0 bytes", {
        let mut b = [0u8; 8];
        match ok("read", rpc.read(h, &mut b, 21)) {
            Ok(0) => Ok(()),
            Ok(n) => Err(detail!("got {n} bytes")),
            Err(e) => Err(e),
        }
    });
    t.record("reads at CURRENT advance the position", {
        (|| {
            let r = ok("open", rpc.open("pos.bin", open::READ, 0))?;
            let result = read_is(rpc, r, CURRENT, b"0123")
                .and_then(|()| read_is(rpc, r, CURRENT, b"AB67"))
                .and_then(|()| read_is(rpc, r, CURRENT, b"89\0"));
            ok("close", rpc.close(r))?;
            result
        })()
    });
    t.record("writes at CURRENT advance the position", {
        (|| {
            let w = ok("open", rpc.open("pos.bin", open::WRITE, 0))?;
            let result = ok("write", rpc.write_all(w, b"xy", CURRENT))
                .and_then(|()| ok("write", rpc.write_all(w, b"zw", CURRENT)));
            ok("close", rpc.close(w))?;
            result?;
            read_is(rpc, h, 0, b"xyzwAB6789")?;
            size_is(rpc, h, 21)
        })()
    });
    t.record("APPEND writes at the end", {
        (|| {
            let a = ok("open", rpc.open("pos.bin", open::WRITE | open::APPEND, 0))?;
            let result = ok("write", rpc.write_all(a, b"tail", CURRENT))
                .and_then(|()| size_is(rpc, a, 25))
                .and_then(|()| ok("write", rpc.write_all(a, b"!", CURRENT)))
                .and_then(|()| size_is(rpc, a, 26));
            ok("close", rpc.close(a))?;
            result?;
            read_is(rpc, h, 19, b"\0Ztail!")
        })()
    });
    t.record("remove pos.bin", {
        let closed = ok("close", rpc.close(h));
        closed.and_then(|()| ok("unlink", rpc.unlink("pos.bin", false)))
    });
}

/// (d) Stat kinds; the final symlink is not followed.
fn kinds(rpc: &mut Rpc, t: &mut Tally, input_len: Option<u64>) {
    t.record("stat input.txt is a file", {
        (|| {
            let stat = ok("stat", rpc.stat("input.txt"))?;
            if stat.kind != kind::FILE {
                fail!("kind {}, expected {} (file)", stat.kind, kind::FILE);
            }
            if input_len.is_some_and(|len| len != stat.size) {
                fail!(
                    "size {}, but {} bytes were read",
                    stat.size,
                    input_len.unwrap_or(0)
                );
            }
            if stat.mtime_ns == 0 || stat.mode & 0o777 == 0 {
                fail!("mtime_ns {} mode {:#o}", stat.mtime_ns, stat.mode);
            }
            Ok(())
        })()
    });
    for (path, want, name) in [
        ("dir", kind::DIR, "directory"),
        ("link-out", kind::SYMLINK, "symlink"),
        ("escape", kind::SYMLINK, "symlink"),
    ] {
        let check = detail!("stat {path} is a {name}");
        t.record(check.as_str(), {
            match ok("stat", rpc.stat(path)) {
                Ok(stat) if stat.kind == want => Ok(()),
                Ok(stat) => Err(detail!("kind {}, expected {want} ({name})", stat.kind)),
                Err(e) => Err(e),
            }
        });
    }
}

/// The names in a directory listing, gathered page by page with a buffer
/// of `buf_len` bytes, with the most entries any one call returned.
fn list(rpc: &mut Rpc, path: &str, buf_len: usize) -> Result<(Detail, u64, u32), Detail> {
    let mut names = Detail::new();
    let mut buf = [0u8; 256];
    let buf = &mut buf[..buf_len];
    let (mut cookie, mut most, mut calls) = (0, 0, 0);
    loop {
        calls += 1;
        if calls > 16 {
            fail!("still not done after 16 calls: {names}");
        }
        let page = ok("readdir", rpc.readdir(path, cookie, buf))?;
        if page.bytes > buf.len() {
            fail!(
                "{} bytes reported for a {}-byte buffer",
                page.bytes,
                buf.len()
            );
        }
        let mut entries = 0;
        for record in records(&buf[..page.bytes]) {
            let Ok(entry) = record else {
                fail!("malformed record in {:?}", Bytes(&buf[..page.bytes]));
            };
            if entry.kind != kind::FILE {
                fail!("{:?} has kind {}", Bytes(entry.name), entry.kind);
            }
            let sep = if names.as_bytes().is_empty() { "" } else { " " };
            let _ = write!(names, "{sep}{:?}", Bytes(entry.name));
            entries += 1;
        }
        if entries != page.entries {
            fail!("{entries} records, {} reported", page.entries);
        }
        most = most.max(entries);
        if page.next == 0 {
            return Ok((names, most, calls));
        }
        if page.next <= cookie {
            fail!("cookie went from {cookie} to {}", page.next);
        }
        cookie = page.next;
    }
}

/// (e) Directories.
fn directories(rpc: &mut Rpc, t: &mut Tally) {
    t.record("mkdir newdir", {
        (|| {
            ok("mkdir", rpc.mkdir("newdir", 0))?;
            match ok("stat", rpc.stat("newdir"))? {
                stat if stat.kind == kind::DIR => Ok(()),
                stat => Err(detail!("kind {}, expected a directory", stat.kind)),
            }
        })()
    });
    t.record(
        "mkdir of an existing directory",
        expect(rpc.mkdir("newdir", 0), S::AlreadyExists),
    );
    t.record("create newdir/f", {
        (|| {
            let flags = open::CREATE | open::WRITE | open::EXCLUSIVE;
            let h = ok("open", rpc.open("newdir/f", flags, 0o600))?;
            let written = ok("write", rpc.write_all(h, b"f", 0));
            ok("close", rpc.close(h))?;
            written
        })()
    });
    t.record("rename newdir/f to newdir/g", {
        (|| {
            ok("rename", rpc.rename("newdir/f", "newdir/g"))?;
            expect(rpc.stat("newdir/f"), S::NotFound).map_err(|e| detail!("stat newdir/f: {e}"))?;
            let stat = ok("stat newdir/g", rpc.stat("newdir/g"))?;
            if stat.kind != kind::FILE || stat.size != 1 {
                fail!("newdir/g: kind {} size {}", stat.kind, stat.size);
            }
            let (names, _, _) = list(rpc, "newdir", 256)?;
            if names.as_str() != "\"g\"" {
                fail!("newdir lists {names}, expected \"g\"");
            }
            Ok(())
        })()
    });
    // The host's order, not sorted.
    let a_and_b = |names: &str| matches!(names, "\"a\" \"b\"" | "\"b\" \"a\"");
    t.record("readdir dir gives a, b", {
        list(rpc, "dir", 256).and_then(|(names, _, _)| {
            if a_and_b(names.as_str()) {
                Ok(())
            } else {
                Err(detail!("got {names}"))
            }
        })
    });
    // A record of a one-byte name is 4 bytes: 7 bytes hold one, not two.
    t.record("readdir pages through dir one record at a time", {
        list(rpc, "dir", 7).and_then(|(names, most, calls)| {
            if !a_and_b(names.as_str()) || most != 1 || calls < 2 {
                fail!("got {names} in {calls} calls, at most {most} per call");
            }
            Ok(())
        })
    });
    t.record("unlink of a non-empty directory", {
        expect(rpc.unlink("newdir", true), S::NotEmpty)
    });
    t.record("unlink of a directory without REMOVE_DIR", {
        expect(rpc.unlink("newdir", false), S::IsADirectory)
    });
    t.record("unlink of a file with REMOVE_DIR", {
        expect(rpc.unlink("newdir/g", true), S::NotADirectory)
    });
    t.record("remove newdir", {
        (|| {
            ok("unlink newdir/g", rpc.unlink("newdir/g", false))?;
            ok("unlink newdir", rpc.unlink("newdir", true))?;
            expect(rpc.stat("newdir"), S::NotFound).map_err(|e| detail!("stat newdir: {e}"))
        })()
    });
}
