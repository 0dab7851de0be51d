//! Outsourced files: a guest's file I/O served by the host, confined to one
//! host directory (the share).
//!
//! Confinement is the feature, so every path goes through `openat2(2)` from
//! the share's root with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: `..`
//! that would climb out, absolute paths, symlinks leading out and `/proc`
//! magic links all fail in the kernel, not in string checks of ours.
//! Operations on a name (mkdir, unlink, rename, stat) open its parent that
//! way and act with the `*at` call on the final component, which must be a
//! plain name. Only regular files and directories can be opened, so a FIFO
//! or device in the share cannot block or reach anything.
//!
//! File I/O blocks only the vCPU that asked; handles live in one table per
//! VM, shared by its vCPUs, and the table lock is never held during I/O
//! (an open reserves its slot, opens unlocked, then fills the slot).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};

use rtvm_abi::vmrpc::{fs, Call, Request, Status};

mod confine;

pub use confine::guest_path;
use confine::{
    check, cstring, kind_of_entry, open_existing, openat2, split, stat_results, status_of, walk_dir,
};

use super::context::CallContext;
use super::handles::HandleTable;
use super::VmService;
use crate::config::ShareConfig;
use crate::error::{Error, Result};

use fs::CREATE_COST;

struct OpenFile {
    file: File,
    writable: bool,
}

/// The file service of one VM.
pub struct FileService {
    owner: Option<ShareOwner>,
    config: ShareConfig,
    root: OwnedFd,
    files: HandleTable<OpenFile>,
    written: AtomicU64,
}

/// The share's owner, whose file-system identity the vCPU threads take on
/// when the VMM runs as root (see [`FileService::owner`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareOwner {
    pub uid: u32,
    pub gid: u32,
}

impl ShareOwner {
    /// Makes the calling thread act as the owner wherever the kernel checks
    /// file permissions: its file-system uid and gid become the owner's,
    /// its supplementary groups go, and with a non-root fs uid the
    /// capabilities that override file permissions are gone too. Raw system
    /// calls, because the C library's `setgroups` would change every thread
    /// of the process; this changes the caller only.
    pub fn act_as_on_this_thread(self) -> std::io::Result<()> {
        // SAFETY: setgroups with an empty list reads no memory.
        let rc = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
        check(rc as i32)?;
        // SAFETY: setfsgid/setfsuid take plain ids; -1 (no change) reads
        // back the id in force, since they report no error otherwise.
        let (gid, uid) = unsafe {
            libc::syscall(libc::SYS_setfsgid, self.gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
            (
                libc::syscall(libc::SYS_setfsgid, u32::MAX),
                libc::syscall(libc::SYS_setfsuid, u32::MAX),
            )
        };
        if (uid, gid) != (i64::from(self.uid), i64::from(self.gid)) {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }
}

impl FileService {
    /// Opens the share root; a missing or unusable directory is a config error.
    pub fn new(config: ShareConfig) -> Result<Self> {
        config.validate()?;
        let dir = File::open(&config.path).map_err(|e| {
            Error::Config(format!(
                "cannot open share directory {}: {e}",
                config.path.display()
            ))
        })?;
        let meta = dir
            .metadata()
            .map_err(|e| Error::Config(format!("share {}: {e}", config.path.display())))?;
        if !meta.is_dir() {
            return Err(Error::Config(format!(
                "share {} is not a directory",
                config.path.display()
            )));
        }
        // SAFETY: geteuid has no preconditions.
        let owner = (unsafe { libc::geteuid() } == 0 && meta.uid() != 0).then(|| ShareOwner {
            uid: meta.uid(),
            gid: meta.gid(),
        });
        Ok(FileService {
            owner,
            root: dir.into(),
            files: HandleTable::new(0, config.max_open_files, Status::TooManyOpenFiles),
            config,
            written: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &ShareConfig {
        &self.config
    }

    /// Whom the file calls act as when the VMM runs as root and the share
    /// belongs to someone else: that owner, whose permissions then hold
    /// in the share and who owns what the guest makes there.
    pub fn owner(&self) -> Option<ShareOwner> {
        self.owner
    }

    /// Descriptors the service holds open (for leak checks).
    pub fn open_files(&self) -> usize {
        self.files.len()
    }

    /// Bytes charged to the write quota so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Takes `n` bytes from the write quota, or refuses the whole call.
    fn charge(&self, n: u64) -> std::result::Result<(), Status> {
        let limit = self.config.max_bytes_written;
        self.written
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                w.checked_add(n).filter(|&t| t <= limit)
            })
            .map(|_| ())
            .map_err(|_| Status::QuotaExceeded)
    }

    fn refund(&self, n: u64) {
        self.written.fetch_sub(n, Ordering::AcqRel);
    }

    fn writable_share(&self) -> std::result::Result<(), Status> {
        if self.config.read_only {
            Err(Status::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn parent(&self, path: &str) -> std::result::Result<(OwnedFd, CString), Status> {
        let (parent, name) = split(path)?;
        let dir = openat2(
            self.root.as_raw_fd(),
            &cstring(&parent)?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| status_of(&e))?;
        Ok((dir, cstring(&name)?))
    }

    /// `FsOpen`.
    pub fn open(&self, path: &str, flags: u64, mode: u64) -> std::result::Result<[u64; 4], Status> {
        use fs::open::*;
        // Permission bits only: no setuid, setgid or sticky files from a guest.
        if flags & !ALL != 0 || flags & (READ | WRITE) == 0 || mode > 0o777 {
            return Err(Status::BadArgument);
        }
        if flags & WRITE_CLASS != 0 {
            self.writable_share()?;
        }
        let writable = flags & (WRITE | APPEND) != 0;
        let mut os = match (flags & READ != 0, writable) {
            (true, true) => libc::O_RDWR,
            (false, true) => libc::O_WRONLY,
            _ => libc::O_RDONLY,
        };
        // O_NONBLOCK: reads and writes of the share's files never park the
        // vCPU (only regular files and directories are opened at all).
        os |= libc::O_NONBLOCK;
        if flags & CREATE != 0 {
            os |= libc::O_CREAT;
        }
        if flags & EXCLUSIVE != 0 {
            os |= libc::O_EXCL;
        }
        if flags & TRUNCATE != 0 {
            os |= libc::O_TRUNC;
        }
        if flags & APPEND != 0 {
            os |= libc::O_APPEND;
        }
        // openat2 insists on mode 0 unless a file may be created.
        let mode = match (flags & CREATE != 0, mode) {
            (false, _) => 0,
            (true, 0) => 0o644,
            (true, m) => m as u32,
        };
        // Reserve a slot first, so a full table costs no open; then open
        // with the table unlocked: a slow open (a large O_TRUNC, a slow share)
        // must not stall other vCPUs' file calls.
        let slot = self.files.reserve()?;
        let fd = self.open_charged(path, os, mode, flags & EXCLUSIVE != 0)?;
        let file = File::from(fd);
        Ok([slot.fill(OpenFile { file, writable }), 0, 0, 0])
    }

    /// Opens `path`; a file it makes is charged against the write quota
    /// ([`CREATE_COST`]). Without `exclusive`, an `O_CREAT` open first tries
    /// to make the file, and opens the one that exists if it does. What
    /// exists already opens only if it is a regular file or a directory
    /// ([`open_existing`]); what `O_EXCL` makes is a regular file.
    fn open_charged(
        &self,
        path: &str,
        os: libc::c_int,
        mode: u32,
        exclusive: bool,
    ) -> std::result::Result<OwnedFd, Status> {
        let root = self.root.as_raw_fd();
        let existing = os & !(libc::O_CREAT | libc::O_EXCL);
        let name = cstring(path)?;
        if os & libc::O_CREAT == 0 {
            return open_existing(root, &name, existing).map_err(|e| status_of(&e));
        }
        let refused = match self.room_in(&self.parent(path)?.0) {
            Err(Status::DirectoryFull) => Some(Status::DirectoryFull),
            Err(other) => return Err(other),
            Ok(()) => self.charge(CREATE_COST).err(),
        };
        if let Some(why) = refused {
            // No room or no quota to make a file: one that exists still opens.
            return match open_existing(root, &name, existing) {
                Ok(_) if exclusive => Err(Status::AlreadyExists),
                Ok(fd) => Ok(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(why),
                Err(e) => Err(status_of(&e)),
            };
        }
        match openat2(root, &name, os | libc::O_EXCL, mode) {
            Ok(fd) => Ok(fd),
            Err(e) => {
                self.refund(CREATE_COST);
                if exclusive || e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(status_of(&e));
                }
                open_existing(root, &name, existing).map_err(|e| status_of(&e))
            }
        }
    }

    /// `FsClose`.
    pub fn close(&self, handle: u64) -> std::result::Result<[u64; 4], Status> {
        self.files.remove(handle)?;
        Ok([0; 4])
    }

    /// Checks a transfer's length against the per-call limit.
    pub fn check_len(&self, len: u64) -> std::result::Result<(), Status> {
        if len > self.config.max_bytes_per_call {
            Err(Status::TooLarge)
        } else {
            Ok(())
        }
    }

    /// `FsRead` into a host buffer (the caller copies it to the guest).
    pub fn read(&self, handle: u64, len: u64, offset: u64) -> std::result::Result<Vec<u8>, Status> {
        self.check_len(len)?;
        let file = &self.files.get(handle)?.file;
        let mut buf = vec![0u8; len as usize];
        let n = if offset == fs::CURRENT {
            (&*file).read(&mut buf)
        } else {
            file.read_at(&mut buf, offset)
        }
        .map_err(|e| status_of(&e))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `FsWrite` from a host copy of the guest buffer.
    pub fn write(
        &self,
        handle: u64,
        data: &[u8],
        offset: u64,
    ) -> std::result::Result<[u64; 4], Status> {
        self.check_len(data.len() as u64)?;
        let open = self.files.get(handle)?;
        let (file, writable) = (&open.file, open.writable);
        if !writable {
            return Err(Status::NotPermitted);
        }
        self.writable_share()?;
        let len = data.len() as u64;
        self.charge(len)?;
        let result = if offset == fs::CURRENT {
            (&*file).write(data)
        } else {
            file.write_at(data, offset)
        };
        let n = match result {
            Ok(n) => n as u64,
            Err(e) => {
                self.refund(len);
                return Err(status_of(&e));
            }
        };
        self.refund(len - n);
        Ok([n, 0, 0, 0])
    }

    /// `FsFsync`.
    pub fn fsync(&self, handle: u64) -> std::result::Result<[u64; 4], Status> {
        let file = &self.files.get(handle)?.file;
        file.sync_all().map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// `FsFstat`.
    pub fn fstat(&self, handle: u64) -> std::result::Result<[u64; 4], Status> {
        let file = &self.files.get(handle)?.file;
        // SAFETY: stat is plain integers, for which all zeros is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: an open descriptor and a live stat to fill in.
        check(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }).map_err(|e| status_of(&e))?;
        Ok(stat_results(&st))
    }

    /// `FsStat` (a final symlink is reported, not followed).
    pub fn stat(&self, path: &str) -> std::result::Result<[u64; 4], Status> {
        // SAFETY: a zeroed stat is valid output space.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if path.trim_end_matches('/') == "." {
            // SAFETY: the share's open root and a live stat to fill in.
            check(unsafe { libc::fstat(self.root.as_raw_fd(), &mut st) })
                .map_err(|e| status_of(&e))?;
        } else {
            let (dir, name) = self.parent(path)?;
            // SAFETY: valid dirfd, NUL-terminated name, live stat.
            check(unsafe {
                libc::fstatat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map_err(|e| status_of(&e))?;
        }
        Ok(stat_results(&st))
    }

    /// `FsMkdir`.
    pub fn mkdir(&self, path: &str, mode: u64) -> std::result::Result<[u64; 4], Status> {
        self.writable_share()?;
        if mode > 0o777 {
            return Err(Status::BadArgument);
        }
        let (dir, name) = self.parent(path)?;
        let mode = if mode == 0 {
            0o755
        } else {
            mode as libc::mode_t
        };
        self.room_in(&dir)?;
        self.charge(CREATE_COST)?;
        // SAFETY: valid dirfd and NUL-terminated name.
        if let Err(e) = check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }) {
            self.refund(CREATE_COST);
            return Err(status_of(&e));
        }
        Ok([0; 4])
    }

    /// `FsUnlink`.
    pub fn unlink(&self, path: &str, flags: u64) -> std::result::Result<[u64; 4], Status> {
        self.writable_share()?;
        if flags & !fs::REMOVE_DIR != 0 {
            return Err(Status::BadArgument);
        }
        let (dir, name) = self.parent(path)?;
        let at = if flags & fs::REMOVE_DIR != 0 {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: valid dirfd and NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), at) })
            .map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// `FsRename`.
    pub fn rename(&self, from: &str, to: &str) -> std::result::Result<[u64; 4], Status> {
        self.writable_share()?;
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        // A rename within one directory adds no entry to it.
        if identity(&from_dir)? != identity(&to_dir)? {
            self.room_in(&to_dir)?;
        }
        // SAFETY: valid dirfds and NUL-terminated names.
        check(unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                from_name.as_ptr(),
                to_dir.as_raw_fd(),
                to_name.as_ptr(),
            )
        })
        .map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// `FsReaddir`: the records to copy to the guest, and the results.
    /// Reads only the entries it returns (and one more), from the
    /// directory offset the cookie names: a page costs the same in a
    /// directory of ten entries or of a million.
    pub fn readdir(
        &self,
        path: &str,
        cookie: u64,
        buf_len: u64,
    ) -> std::result::Result<(Vec<u8>, [u64; 4]), Status> {
        self.check_len(buf_len)?;
        let dir = open_existing(
            self.root.as_raw_fd(),
            &cstring(path)?,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .map_err(|e| status_of(&e))?;
        let fd = dir.as_raw_fd();
        let mut out = Vec::new();
        let (mut next, mut written, mut more) = (cookie, 0u64, false);
        // A kernel record is at most about 24 bytes longer than ours.
        let chunk = (buf_len as usize).saturating_mul(2).saturating_add(1024);
        walk_dir(fd, cookie, chunk, |name, d_type, offset| {
            let name = String::from_utf8_lossy(name);
            if out.len() + 3 + name.len() > buf_len as usize {
                more = true;
                return false;
            }
            out.push(kind_of_entry(fd, name.as_bytes(), d_type) as u8);
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            (next, written) = (offset, written + 1);
            true
        })
        .map_err(|e| status_of(&e))?;
        if written == 0 && more {
            // Not even one record fits: the guest must offer a larger buffer.
            return Err(Status::TooLarge);
        }
        let bytes = out.len() as u64;
        Ok((out, [if more { next } else { 0 }, bytes, written, 0]))
    }

    /// Refuses when directory `dir` (an `O_PATH` descriptor beneath the
    /// root) holds `max_dir_entries` already. Counts no further than the
    /// cap, so the cap bounds what the check costs.
    fn room_in(&self, dir: &OwnedFd) -> std::result::Result<(), Status> {
        let cap = self.config.max_dir_entries;
        let listing = openat2(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| status_of(&e))?;
        let mut entries = 0;
        walk_dir(listing.as_raw_fd(), 0, 64 << 10, |_, _, _| {
            entries += 1;
            entries < cap
        })
        .map_err(|e| status_of(&e))?;
        if entries >= cap {
            return Err(Status::DirectoryFull);
        }
        Ok(())
    }
}

/// Which inode a descriptor is (device, inode number).
fn identity(fd: &OwnedFd) -> std::result::Result<(u64, u64), Status> {
    // SAFETY: stat is plain data, filled by fstat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor (O_PATH works with fstat) and a stat buffer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }).map_err(|e| status_of(&e))?;
    Ok((st.st_dev, st.st_ino))
}

impl VmService for FileService {
    fn serve(
        &self,
        req: &Request,
        cx: &mut CallContext<'_>,
    ) -> std::result::Result<[u64; 4], Status> {
        let a = req.args;
        let path = |addr, len| guest_path(&cx.path(addr, len)?);
        match req.call {
            Call::FsOpen => self.open(&path(a[0], a[1])?, a[2], a[3]),
            Call::FsRead => {
                self.check_len(a[2])?;
                cx.check_buffer(a[1], a[2])?;
                let data = self.read(a[0], a[2], a[3])?;
                cx.write(a[1], &data)?;
                Ok([data.len() as u64, 0, 0, 0])
            }
            Call::FsWrite => {
                self.check_len(a[2])?;
                self.write(a[0], &cx.read(a[1], a[2])?, a[3])
            }
            Call::FsFsync => self.fsync(a[0]),
            Call::FsClose => self.close(a[0]),
            Call::FsStat => self.stat(&path(a[0], a[1])?),
            Call::FsFstat => self.fstat(a[0]),
            Call::FsMkdir => self.mkdir(&path(a[0], a[1])?, a[2]),
            Call::FsUnlink => self.unlink(&path(a[0], a[1])?, a[2]),
            Call::FsRename => self.rename(&path(a[0], a[1])?, &path(a[2], a[3])?),
            Call::FsReaddir => {
                cx.check_buffer(a[3], a[4])?;
                let (records, results) = self.readdir(&path(a[0], a[1])?, a[2], a[4])?;
                cx.write(a[3], &records)?;
                Ok(results)
            }
            _ => Err(Status::UnsupportedCall),
        }
    }
}

impl Drop for FileService {
    /// Whatever the guest left open is flushed and closed, also after a
    /// guest fault: the data it wrote is on the host's stable storage.
    fn drop(&mut self) {
        for open in self.files.drain() {
            if open.writable {
                let _ = open.file.sync_data();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::path::PathBuf;

    fn share() -> (PathBuf, FileService) {
        let base = std::env::temp_dir().join(format!(
            "rtvm-fs-unit-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let root = base.join("share");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"secret").unwrap();
        std::fs::write(root.join("input.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("/", root.join("link-out")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
        let svc = FileService::new(ShareConfig::new(root, false)).unwrap();
        (base, svc)
    }

    /// Issue #12: a FIFO or a device node planted in the share is refused
    /// without ever being opened (its driver would see an open; a FIFO's
    /// open can block): inotify, which reports every real open and none of
    /// the `O_PATH` lookups, sees nothing. Regular files still open.
    #[test]
    fn special_files_are_refused_before_they_are_opened() {
        let (base, svc) = share();
        let root = base.join("share");
        let cpath = |name: &str| {
            std::ffi::CString::new(root.join(name).as_os_str().as_encoded_bytes()).unwrap()
        };
        // SAFETY: NUL-terminated paths, plain modes.
        assert_eq!(unsafe { libc::mkfifo(cpath("fifo").as_ptr(), 0o666) }, 0);
        // SAFETY: as above; (1, 3) is /dev/null's device number.
        let null = unsafe {
            libc::mknod(
                cpath("null").as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            )
        };
        let specials: &[&str] = if null == 0 {
            &["fifo", "null"]
        } else {
            &["fifo"]
        };
        // SAFETY: plain syscall; the descriptor is checked and owned below.
        let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(inotify >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(inotify) };
        // SAFETY: a live descriptor and a NUL-terminated path.
        let watch = unsafe {
            libc::inotify_add_watch(inotify.as_raw_fd(), cpath("").as_ptr(), libc::IN_OPEN)
        };
        assert!(watch >= 0);
        use fs::open::*;
        for name in specials {
            for flags in [READ, WRITE, READ | WRITE | TRUNCATE, WRITE | CREATE] {
                assert_eq!(
                    svc.open(name, flags, 0).map(|_| ()),
                    Err(Status::NotPermitted),
                    "{name} {flags:#x}"
                );
            }
        }
        // The names inotify saw opened (the share itself, unnamed, is
        // opened to count its entries before a create).
        let opened = || {
            let mut events = [0u8; 4096];
            // SAFETY: a live descriptor and a buffer of the length passed.
            let n = unsafe {
                libc::read(
                    inotify.as_raw_fd(),
                    events.as_mut_ptr().cast(),
                    events.len(),
                )
            };
            let mut names = Vec::new();
            let mut at = 0;
            while at + 16 <= n.max(0) as usize {
                let len = u32::from_ne_bytes(events[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &events[at + 16..at + 16 + len];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(len)];
                names.push(String::from_utf8_lossy(name).into_owned());
                at += 16 + len;
            }
            names
        };
        let seen = opened();
        assert!(
            specials.iter().all(|s| !seen.iter().any(|n| n == s)),
            "the share saw opens of {seen:?}"
        );
        assert!(svc.open("input.txt", READ, 0).is_ok());
        assert!(
            opened().contains(&"input.txt".to_string()),
            "inotify reports a real open"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Issue #12: a file system mounted inside the share (a bind mount of
    /// something else, /proc) is not part of it.
    #[test]
    fn mount_points_inside_the_share_are_not_crossed() {
        let (base, svc) = share();
        let mnt = base.join("share/mnt");
        std::fs::create_dir(&mnt).unwrap();
        let target = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                std::env::var("CI").is_err(),
                "CI runs as root and can mount: {e}"
            );
            eprintln!("skipping: cannot mount a tmpfs here ({e})");
            std::fs::remove_dir_all(base).unwrap();
            return;
        }
        std::fs::write(mnt.join("inside"), b"other fs").unwrap();
        use fs::open::*;
        let across = svc.open("mnt/inside", READ, 0).map(|_| ());
        let make = svc.open("mnt/new", WRITE | CREATE, 0).map(|_| ());
        // SAFETY: a NUL-terminated path of our own mount.
        unsafe { libc::umount(target.as_ptr()) };
        assert_eq!(across, Err(Status::NotPermitted));
        assert_eq!(make, Err(Status::NotPermitted));
        assert!(
            svc.open("input.txt", READ, 0).is_ok(),
            "the share itself opens"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn escapes_are_refused_in_the_kernel() {
        let (base, svc) = share();
        use fs::open::*;
        for path in [
            "../outside/secret",
            "/etc/passwd",
            "link-out/etc/passwd",
            "escape/secret",
        ] {
            assert_eq!(
                svc.open(path, READ, 0).unwrap_err(),
                Status::NotPermitted,
                "{path}"
            );
        }
        assert_eq!(svc.mkdir("../evil", 0).unwrap_err(), Status::NotPermitted);
        assert_eq!(
            svc.rename("input.txt", "../moved").unwrap_err(),
            Status::NotPermitted
        );
        assert_eq!(svc.stat("..").unwrap_err(), Status::NotPermitted);
        assert_eq!(
            svc.open("../x", WRITE | CREATE, 0).unwrap_err(),
            Status::NotPermitted
        );
        assert!(
            !base.join("evil").exists() && !base.join("moved").exists() && !base.join("x").exists()
        );
        assert_eq!(
            svc.stat("link-out").unwrap()[1],
            fs::kind::SYMLINK,
            "reported, not followed"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn handles_are_checked_and_stale_ones_refused() {
        let (base, svc) = share();
        let h = svc.open("input.txt", fs::open::READ, 0).unwrap()[0];
        assert_eq!(svc.read(h, 16, 0).unwrap(), b"hello");
        assert_eq!(
            svc.write(h, b"x", 0).unwrap_err(),
            Status::NotPermitted,
            "opened read-only"
        );
        svc.close(h).unwrap();
        assert_eq!(svc.read(h, 1, 0).unwrap_err(), Status::BadHandle);
        let h2 = svc.open("input.txt", fs::open::READ, 0).unwrap()[0];
        assert_ne!(h, h2, "a reused slot gets a new generation");
        assert_eq!(svc.close(h).unwrap_err(), Status::BadHandle);
        assert_eq!(svc.read(0, 1, 0).unwrap_err(), Status::BadHandle);
        assert_eq!(svc.read(u64::MAX, 1, 0).unwrap_err(), Status::BadHandle);
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Issue #12: making files costs quota (a guest made 40,000 files under
    /// a 4 KiB quota); opening one that exists costs nothing.
    #[test]
    fn creates_are_charged_against_the_write_quota() {
        let (base, _) = share();
        let mut config = ShareConfig::new(base.join("share"), false);
        config.max_bytes_written = 3 * CREATE_COST;
        let svc = FileService::new(config).unwrap();
        use fs::open::*;
        for name in ["n1", "n2"] {
            let h = svc.open(name, WRITE | CREATE | EXCLUSIVE, 0).unwrap()[0];
            svc.close(h).unwrap();
        }
        let h = svc.open("n1", WRITE | CREATE, 0).unwrap()[0];
        svc.close(h).unwrap();
        assert_eq!(
            svc.open("n1", WRITE | CREATE | EXCLUSIVE, 0).unwrap_err(),
            Status::AlreadyExists,
            "refunded"
        );
        svc.mkdir("d", 0).unwrap();
        assert_eq!(
            svc.open("n3", WRITE | CREATE, 0).unwrap_err(),
            Status::QuotaExceeded
        );
        assert_eq!(svc.mkdir("d2", 0).unwrap_err(), Status::QuotaExceeded);
        assert!(
            !base.join("share/n3").exists(),
            "nothing made past the quota"
        );
        let h = svc.open("n2", READ | CREATE, 0).unwrap()[0];
        svc.close(h).unwrap();
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn limits_have_their_own_statuses() {
        let (base, _) = share();
        let mut config = ShareConfig::new(base.join("share"), false);
        config.max_open_files = 2;
        config.max_bytes_per_call = 8;
        config.max_bytes_written = 20;
        let svc = FileService::new(config).unwrap();
        use fs::open::*;
        // Made by the host: making it through the service would cost more
        // than this quota.
        std::fs::write(base.join("share/a"), b"").unwrap();
        let a = svc.open("a", WRITE, 0).unwrap()[0];
        svc.open("input.txt", READ, 0).unwrap();
        assert_eq!(
            svc.open("input.txt", READ, 0).unwrap_err(),
            Status::TooManyOpenFiles
        );
        assert_eq!(
            svc.write(a, &[0; 9], fs::CURRENT).unwrap_err(),
            Status::TooLarge
        );
        assert_eq!(svc.write(a, &[0; 8], fs::CURRENT).unwrap()[0], 8);
        assert_eq!(svc.write(a, &[0; 8], fs::CURRENT).unwrap()[0], 8);
        assert_eq!(
            svc.write(a, &[0; 8], fs::CURRENT).unwrap_err(),
            Status::QuotaExceeded
        );
        assert_eq!(
            svc.write(a, &[0; 4], fs::CURRENT).unwrap()[0],
            4,
            "exactly up to the quota"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn guests_cannot_make_setuid_files_and_file_handles_never_look_like_sockets() {
        let (base, svc) = share();
        use fs::open::*;
        assert_eq!(
            svc.open("s", WRITE | CREATE, 0o4755).unwrap_err(),
            Status::BadArgument
        );
        assert_eq!(svc.mkdir("d", 0o1777).unwrap_err(), Status::BadArgument);
        for _ in 0..40_000 {
            let h = svc.open("input.txt", READ, 0).unwrap()[0];
            assert_eq!(h & rtvm_abi::vmrpc::net::HANDLE_TAG, 0, "{h:#x}");
            svc.close(h).unwrap();
        }
        assert_eq!(
            svc.read(rtvm_abi::vmrpc::net::HANDLE_TAG | 0x1_0001, 1, 0)
                .unwrap_err(),
            Status::BadHandle
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn read_only_share_refuses_every_write_class_call() {
        let (base, _) = share();
        let svc = FileService::new(ShareConfig::new(base.join("share"), true)).unwrap();
        use fs::open::*;
        assert!(svc.open("input.txt", READ, 0).is_ok());
        assert_eq!(
            svc.open("input.txt", WRITE, 0).unwrap_err(),
            Status::ReadOnly
        );
        assert_eq!(
            svc.open("new", READ | CREATE, 0).unwrap_err(),
            Status::ReadOnly
        );
        assert_eq!(svc.mkdir("d", 0).unwrap_err(), Status::ReadOnly);
        assert_eq!(svc.unlink("input.txt", 0).unwrap_err(), Status::ReadOnly);
        assert_eq!(svc.rename("input.txt", "y").unwrap_err(), Status::ReadOnly);
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Every name of `dir`, paged through with `buf_len`-byte buffers: the
    /// names and the most records one call returned.
    fn list_all(svc: &FileService, dir: &str, buf_len: u64) -> (Vec<String>, u64) {
        let (mut names, mut most, mut cookie) = (Vec::new(), 0, 0);
        loop {
            let (out, [next, bytes, entries, _]) = svc.readdir(dir, cookie, buf_len).unwrap();
            assert_eq!(bytes as usize, out.len());
            let mut at = 0;
            while at < out.len() {
                let len = u16::from_le_bytes([out[at + 1], out[at + 2]]) as usize;
                names.push(String::from_utf8(out[at + 3..at + 3 + len].to_vec()).unwrap());
                at += 3 + len;
            }
            most = most.max(entries);
            if next == 0 {
                break;
            }
            assert_ne!(next, cookie, "the cookie moves on");
            cookie = next;
        }
        (names, most)
    }

    /// Issue #12: readdir pages by the directory's own offset, so each
    /// call reads what it returns; every entry comes exactly once.
    #[test]
    fn readdir_pages_by_cookie_through_every_entry_once() {
        let (base, svc) = share();
        std::fs::write(base.join("share/dir/b"), b"").unwrap();
        std::fs::write(base.join("share/dir/a"), b"").unwrap();
        std::fs::create_dir(base.join("share/dir/sub")).unwrap();
        // Records of a, b and sub are 4, 4 and 6 bytes; the order is the
        // file system's, so 6 bytes hold whichever comes first, never two.
        let (out, r) = svc.readdir("dir", 0, 6).unwrap();
        assert_eq!(r[2], 1, "one record fits");
        assert_ne!(r[0], 0, "and there are more");
        assert!(out.len() == 4 || out.len() == 6, "{out:?}");
        let (mut names, most) = list_all(&svc, "dir", 6);
        assert_eq!(most, 1);
        names.sort();
        assert_eq!(names, ["a", "b", "sub"]);
        assert_eq!(svc.readdir("dir", 0, 2).unwrap_err(), Status::TooLarge);
        assert_eq!(
            svc.readdir("input.txt", 0, 100).unwrap_err(),
            Status::NotADirectory
        );
        // 3,000 entries, a page of about 100 at a time.
        let many = base.join("share/many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..3000 {
            std::fs::write(many.join(format!("f{i:04}")), b"").unwrap();
        }
        let (mut names, most) = list_all(&svc, "many", 800);
        assert!(most > 1 && most < 3000, "{most} per page");
        names.sort();
        let expected: Vec<String> = (0..3000).map(|i| format!("f{i:04}")).collect();
        assert_eq!(names, expected);
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Issue #12: a directory holds at most `max_dir_entries` the guest
    /// made: files, directories and renames into it are refused beyond
    /// that, while what exists still opens and renames within it work.
    #[test]
    fn directories_are_capped() {
        let (base, _) = share();
        let mut config = ShareConfig::new(base.join("share"), false);
        config.max_dir_entries = 3;
        let svc = FileService::new(config).unwrap();
        use fs::open::*;
        std::fs::write(base.join("share/dir/b"), b"").unwrap();
        std::fs::write(base.join("share/dir/a"), b"").unwrap();
        svc.open("dir/c", WRITE | CREATE, 0).unwrap();
        assert_eq!(
            svc.open("dir/d", WRITE | CREATE, 0).unwrap_err(),
            Status::DirectoryFull
        );
        assert_eq!(svc.mkdir("dir/e", 0).unwrap_err(), Status::DirectoryFull);
        assert_eq!(
            svc.rename("input.txt", "dir/f").unwrap_err(),
            Status::DirectoryFull
        );
        assert!(svc.open("dir/a", WRITE | CREATE, 0).is_ok(), "it exists");
        assert_eq!(
            svc.open("dir/a", WRITE | CREATE | EXCLUSIVE, 0)
                .unwrap_err(),
            Status::AlreadyExists
        );
        svc.rename("dir/a", "dir/z").unwrap();
        assert!(!base.join("share/dir/d").exists() && !base.join("share/dir/e").exists());
        svc.unlink("dir/z", 0).unwrap();
        svc.open("dir/d", WRITE | CREATE, 0).unwrap();
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn paths_are_validated() {
        assert_eq!(guest_path(b"").unwrap_err(), Status::BadArgument);
        assert_eq!(guest_path(b"a\0b").unwrap_err(), Status::BadArgument);
        assert_eq!(guest_path(&[0xff, 0xfe]).unwrap_err(), Status::BadArgument);
        assert_eq!(
            guest_path(&vec![b'a'; rtvm_abi::vmrpc::PATH_MAX as usize + 1]).unwrap_err(),
            Status::BadArgument
        );
        assert_eq!(split("a/b/c").unwrap(), ("a/b".into(), "c".into()));
        assert_eq!(split("c/").unwrap(), (".".into(), "c".into()));
        assert_eq!(split("/etc").unwrap(), ("/".into(), "etc".into()));
        assert_eq!(split("a/..").unwrap_err(), Status::NotPermitted);
    }
}
