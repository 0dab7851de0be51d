//! Confinement of the file service to its share: paths as the guest gives
//! them, opened beneath the share root by the kernel (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), and host results turned into
//! what the guest sees.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use rtvm_abi::vmrpc::{fs, Status, PATH_MAX};

/// Maps an OS error to the status the guest sees.
pub(super) fn status_of(e: &io::Error) -> Status {
    match e.raw_os_error() {
        Some(libc::ENOENT) => Status::NotFound,
        Some(libc::EEXIST) => Status::AlreadyExists,
        Some(libc::ENOTDIR) => Status::NotADirectory,
        Some(libc::EISDIR) => Status::IsADirectory,
        Some(libc::ENOTEMPTY) => Status::NotEmpty,
        Some(libc::EROFS) => Status::ReadOnly,
        // EXDEV and ELOOP are how RESOLVE_BENEATH/NO_XDEV/NO_MAGICLINKS refuse.
        Some(libc::EXDEV | libc::ELOOP | libc::EACCES | libc::EPERM) => Status::NotPermitted,
        Some(libc::ENAMETOOLONG | libc::EINVAL) => Status::BadArgument,
        Some(libc::EMFILE | libc::ENFILE) => Status::NoResources,
        _ => Status::IoError,
    }
}

/// Opens `path` beneath `dir` as the kernel resolves it for the share:
/// never above `dir`, through no magic link (`/proc/self/...`), and across
/// no mount point (a file system mounted inside the share is not the
/// share). Never a controlling terminal, never inherited by a child.
pub(super) fn openat2(dir: RawFd, path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // openat2 takes no other flags beside O_PATH.
    let tty = if flags & libc::O_PATH == 0 {
        libc::O_NOCTTY
    } else {
        0
    };
    how.flags = (flags | libc::O_CLOEXEC | tty) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // SAFETY: valid dirfd, NUL-terminated path, and a live open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens `path` beneath `dir` if it is a regular file or a directory,
/// never anything else, not even for a moment: it is looked up with
/// `O_PATH` first (which no driver sees: opening a device node can act, a
/// FIFO's open can block), checked, and then that very inode is reopened
/// through `/proc/self/fd` with `flags` (which must not create).
pub(super) fn open_existing(dir: RawFd, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    debug_assert_eq!(flags & (libc::O_CREAT | libc::O_EXCL), 0);
    let found = openat2(dir, path, libc::O_PATH, 0)?;
    // SAFETY: stat is plain data, filled by fstat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor and a stat buffer of the right type.
    check(unsafe { libc::fstat(found.as_raw_fd(), &mut st) })?;
    if !matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR) {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    let again =
        CString::new(format!("/proc/self/fd/{}", found.as_raw_fd())).expect("no NUL in a number");
    // SAFETY: a NUL-terminated path; the result is checked below.
    let fd = unsafe { libc::open(again.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A guest path, checked: UTF-8, no NUL, not empty, at most PATH_MAX.
pub fn guest_path(bytes: &[u8]) -> std::result::Result<String, Status> {
    if bytes.is_empty() || bytes.len() as u64 > PATH_MAX || bytes.contains(&0) {
        return Err(Status::BadArgument);
    }
    let path = std::str::from_utf8(bytes).map_err(|_| Status::BadArgument)?;
    Ok(path.to_string())
}

/// Splits a path into its parent (resolved beneath the root) and final name.
pub(super) fn split(path: &str) -> std::result::Result<(String, String), Status> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some((p, n)) => (if p.is_empty() { "/" } else { p }, n),
        None => (".", trimmed),
    };
    // The final component is acted on by name, so it cannot be a way out.
    if name.is_empty() || name == "." || name == ".." {
        return Err(Status::NotPermitted);
    }
    Ok((parent.to_string(), name.to_string()))
}

pub(super) fn cstring(s: &str) -> std::result::Result<CString, Status> {
    CString::new(s).map_err(|_| Status::BadArgument)
}

/// Walks directory `dir` (open for reading) from offset `cookie` (0: the
/// start) with getdents64, `chunk` bytes of kernel records at a time,
/// leaving out `.` and `..`: `visit(name, d_type, offset after it)` gets
/// each entry and returns false to stop. Reads only as far as the visitor
/// goes (within a chunk), so a call costs what it looks at.
pub(super) fn walk_dir(
    dir: RawFd,
    cookie: u64,
    chunk: usize,
    mut visit: impl FnMut(&[u8], u8, u64) -> bool,
) -> io::Result<()> {
    if cookie != 0 {
        let offset =
            i64::try_from(cookie).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a live descriptor.
        if unsafe { libc::lseek(dir, offset, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let corrupt = || io::Error::from_raw_os_error(libc::EIO);
    // Room for at least one record of the longest name (NAME_MAX 255).
    let mut buf = vec![0u8; chunk.clamp(512, 64 << 10)];
    loop {
        // SAFETY: a live descriptor and a buffer of the length passed.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let mut rest = &buf[..n as usize];
        // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
        while !rest.is_empty() {
            let header = rest.get(..19).ok_or_else(corrupt)?;
            let offset = u64::from_ne_bytes(header[8..16].try_into().expect("8 bytes"));
            let len = usize::from(u16::from_ne_bytes([header[16], header[17]]));
            let record = rest.get(19..len).ok_or_else(corrupt)?;
            let name = &record[..record.iter().position(|&b| b == 0).unwrap_or(record.len())];
            rest = &rest[len..];
            if name != b"." && name != b".." && !visit(name, header[18], offset) {
                return Ok(());
            }
        }
    }
}

/// An entry's [`fs::kind`] from its `d_type`, asking the file system
/// (without following a link) where that is `DT_UNKNOWN`.
pub(super) fn kind_of_entry(dir: RawFd, name: &[u8], d_type: u8) -> u64 {
    match d_type {
        libc::DT_REG => fs::kind::FILE,
        libc::DT_DIR => fs::kind::DIR,
        libc::DT_LNK => fs::kind::SYMLINK,
        libc::DT_UNKNOWN => {
            let Ok(name) = CString::new(name) else {
                return fs::kind::OTHER;
            };
            // SAFETY: stat is plain data, filled before it is read.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: a live dirfd, a NUL-terminated name, a stat buffer.
            let rc =
                unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
            if rc == 0 {
                kind_of_mode(st.st_mode)
            } else {
                fs::kind::OTHER
            }
        }
        _ => fs::kind::OTHER,
    }
}

fn kind_of_mode(mode: libc::mode_t) -> u64 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => fs::kind::FILE,
        libc::S_IFDIR => fs::kind::DIR,
        libc::S_IFLNK => fs::kind::SYMLINK,
        _ => fs::kind::OTHER,
    }
}

pub(super) fn stat_results(st: &libc::stat) -> [u64; 4] {
    let kind = kind_of_mode(st.st_mode);
    // Before 1970 reads as 0; far future saturates.
    let mtime =
        u64::try_from(i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec))
            .unwrap_or(if st.st_mtime < 0 { 0 } else { u64::MAX });
    [
        st.st_size as u64,
        kind,
        mtime,
        u64::from(st.st_mode & 0o7777),
    ]
}
