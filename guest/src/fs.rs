//! The guest's file library: the VMRPC file calls (`Call::FsOpen` ..
//! `Call::FsReaddir`) on the host directory shared with the VM, as methods
//! on [`Rpc`] (see `rtvm_abi::vmrpc` for the contract).
//!
//! Buffers and paths are passed by address: guest RAM is identity mapped,
//! so the address of any slice is its guest-physical address, and the data
//! never goes through the call page's payload area. Paths are anything that
//! is bytes (`&str`, `&[u8]`, `b"..."`), so malformed ones (not UTF-8, too
//! long) can be sent on purpose. For anything more malformed than that
//! (addresses outside RAM, unknown flags), call [`Rpc::call`] directly with
//! the raw arguments, or `vmrpc::raw_call` for a malformed call page.
//!
//! The host limits the bytes one `FsRead`/`FsWrite` may move and does not
//! say how many; [`Rpc::write_all`] and [`Rpc::read_full`] split a request
//! into chunks of [`FIRST_CHUNK`] bytes and halve the chunk on `TooLarge`,
//! remembering it for the next request.

use crate::vmrpc::{Error, Rpc};
use rtvm_abi::vmrpc::{fs, Call, Status};

pub use rtvm_abi::vmrpc::fs::{kind, open, CURRENT};

/// The chunk [`Rpc::write_all`] and [`Rpc::read_full`] try first.
pub const FIRST_CHUNK: usize = 64 * 1024;

/// What `FsStat` and `FsFstat` tell about a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    /// A [`kind`] value.
    pub kind: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: u64,
    /// Mode bits (permissions, as the host has them).
    pub mode: u64,
}

impl Stat {
    fn from_results([size, kind, mtime_ns, mode]: [u64; 4]) -> Stat {
        Stat {
            size,
            kind,
            mtime_ns,
            mode,
        }
    }
}

/// The answer to one `FsReaddir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readdir {
    /// The cookie to continue from (the host directory's offset); 0: there
    /// are no more.
    pub next: u64,
    /// Bytes of records written to the buffer.
    pub bytes: usize,
    /// Records written.
    pub entries: u64,
}

/// One directory record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// A [`kind`] value.
    pub kind: u64,
    pub name: &'a [u8],
}

/// A record that does not fit in what is left of the buffer: its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub at: usize,
}

/// Parses `FsReaddir` records (`kind: u8, name_len: u16 LE, name`): the
/// `bytes` the call reported, not the whole buffer. Yields an `Err` for a
/// truncated record, then nothing more.
pub fn records(bytes: &[u8]) -> Records<'_> {
    Records {
        bytes,
        at: 0,
        broken: false,
    }
}

pub struct Records<'a> {
    bytes: &'a [u8],
    at: usize,
    broken: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Entry<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.broken || self.at == self.bytes.len() {
            return None;
        }
        let rest = &self.bytes[self.at..];
        let entry = match rest {
            [kind, lo, hi, names @ ..] => {
                let len = usize::from(u16::from_le_bytes([*lo, *hi]));
                names.get(..len).map(|name| (*kind, name))
            }
            _ => None,
        };
        match entry {
            Some((kind, name)) => {
                self.at += 3 + name.len();
                Some(Ok(Entry {
                    kind: u64::from(kind),
                    name,
                }))
            }
            None => {
                self.broken = true;
                Some(Err(Malformed { at: self.at }))
            }
        }
    }
}

/// The (address, length) arguments of a path.
fn path_args(path: &[u8]) -> (u64, u64) {
    (path.as_ptr() as u64, path.len() as u64)
}

/// The offset `done` bytes after `offset`; the file position stays the
/// file position.
fn advance(offset: u64, done: usize) -> u64 {
    if offset == fs::CURRENT {
        fs::CURRENT
    } else {
        offset.saturating_add(done as u64)
    }
}

impl Rpc {
    /// Opens `path` with [`open`] flags; `mode` (0: 0o644) for a file it
    /// creates. Returns the handle.
    pub fn open(&mut self, path: impl AsRef<[u8]>, flags: u64, mode: u64) -> Result<u64, Error> {
        let (addr, len) = path_args(path.as_ref());
        Ok(self.call(Call::FsOpen, 0, [addr, len, flags, mode, 0, 0])?[0])
    }

    /// One `FsRead` of up to `buf.len()` bytes at `offset` ([`CURRENT`]: the
    /// file position). Returns the bytes read, 0 at the end of the file.
    pub fn read(&mut self, handle: u64, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        let args = [
            handle,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
            offset,
            0,
            0,
        ];
        Ok(self.call(Call::FsRead, 0, args)?[0] as usize)
    }

    /// One `FsWrite` of `data` at `offset` ([`CURRENT`]: the file position,
    /// or the end for a file opened with `APPEND`). Returns the bytes
    /// written.
    pub fn write(&mut self, handle: u64, data: &[u8], offset: u64) -> Result<usize, Error> {
        let args = [
            handle,
            data.as_ptr() as u64,
            data.len() as u64,
            offset,
            0,
            0,
        ];
        Ok(self.call(Call::FsWrite, 0, args)?[0] as usize)
    }

    /// Runs `op` on successive pieces of a `len`-byte request, each at most
    /// the current chunk, halving the chunk on `TooLarge`. `op(done, n)`
    /// moves up to `n` bytes starting `done` bytes in and returns how many
    /// it moved; the loop ends when all `len` are done or `op` moves none.
    /// Returns the bytes done.
    fn chunked(
        &mut self,
        len: usize,
        mut op: impl FnMut(&mut Rpc, usize, usize) -> Result<usize, Error>,
    ) -> Result<usize, Error> {
        if self.fs_chunk == 0 {
            self.fs_chunk = FIRST_CHUNK;
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.fs_chunk);
            match op(self, done, n) {
                Ok(0) => break,
                Ok(moved) => done += moved.min(n),
                Err(e) if e == Error::from(Status::TooLarge) && n > 1 => {
                    self.fs_chunk = n / 2;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes all of `data` at `offset` ([`CURRENT`]: at the file position)
    /// in as many `FsWrite` calls as the host's per-call limit needs. A
    /// write the host accepts no byte of ends it with `IoError`.
    pub fn write_all(&mut self, handle: u64, data: &[u8], offset: u64) -> Result<(), Error> {
        let done = self.chunked(data.len(), |rpc, done, n| {
            rpc.write(handle, &data[done..done + n], advance(offset, done))
        })?;
        if done < data.len() {
            return Err(Status::IoError.into());
        }
        Ok(())
    }

    /// Reads into `buf` from `offset` ([`CURRENT`]: from the file position)
    /// until it is full or the file ends, in as many `FsRead` calls as the
    /// host's per-call limit needs. Returns the bytes read.
    pub fn read_full(&mut self, handle: u64, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        let len = buf.len();
        self.chunked(len, |rpc, done, n| {
            rpc.read(handle, &mut buf[done..done + n], advance(offset, done))
        })
    }

    /// Flushes the file to stable storage.
    pub fn fsync(&mut self, handle: u64) -> Result<(), Error> {
        self.call(Call::FsFsync, 0, [handle, 0, 0, 0, 0, 0])
            .map(drop)
    }

    pub fn close(&mut self, handle: u64) -> Result<(), Error> {
        self.call(Call::FsClose, 0, [handle, 0, 0, 0, 0, 0])
            .map(drop)
    }

    /// Stats `path`, not following a final symlink.
    pub fn stat(&mut self, path: impl AsRef<[u8]>) -> Result<Stat, Error> {
        let (addr, len) = path_args(path.as_ref());
        let results = self.call(Call::FsStat, 0, [addr, len, 0, 0, 0, 0])?;
        Ok(Stat::from_results(results))
    }

    pub fn fstat(&mut self, handle: u64) -> Result<Stat, Error> {
        let results = self.call(Call::FsFstat, 0, [handle, 0, 0, 0, 0, 0])?;
        Ok(Stat::from_results(results))
    }

    /// Makes directory `path`; `mode` 0 means 0o755.
    pub fn mkdir(&mut self, path: impl AsRef<[u8]>, mode: u64) -> Result<(), Error> {
        let (addr, len) = path_args(path.as_ref());
        self.call(Call::FsMkdir, 0, [addr, len, mode, 0, 0, 0])
            .map(drop)
    }

    /// Removes `path`: a directory (which must be empty) if `dir`, else a
    /// file or symlink.
    pub fn unlink(&mut self, path: impl AsRef<[u8]>, dir: bool) -> Result<(), Error> {
        let (addr, len) = path_args(path.as_ref());
        let flags = if dir { fs::REMOVE_DIR } else { 0 };
        self.call(Call::FsUnlink, 0, [addr, len, flags, 0, 0, 0])
            .map(drop)
    }

    pub fn rename(&mut self, from: impl AsRef<[u8]>, to: impl AsRef<[u8]>) -> Result<(), Error> {
        let (from_addr, from_len) = path_args(from.as_ref());
        let (to_addr, to_len) = path_args(to.as_ref());
        self.call(
            Call::FsRename,
            0,
            [from_addr, from_len, to_addr, to_len, 0, 0],
        )
        .map(drop)
    }

    /// Lists directory `path` from `cookie` (0: the start; else a `next`
    /// an earlier call returned) into `buf` as records, in the host's order
    /// (parse `&buf[..bytes]` with [`records`]).
    pub fn readdir(
        &mut self,
        path: impl AsRef<[u8]>,
        cookie: u64,
        buf: &mut [u8],
    ) -> Result<Readdir, Error> {
        let (addr, len) = path_args(path.as_ref());
        let args = [
            addr,
            len,
            cookie,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
            0,
        ];
        let [next, bytes, entries, _] = self.call(Call::FsReaddir, 0, args)?;
        Ok(Readdir {
            next,
            bytes: bytes as usize,
            entries,
        })
    }
}
