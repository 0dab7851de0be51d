//! Confinement of the file service to its share: paths as the guest gives
//! them, opened beneath the share root by the kernel (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), and host results turned into
//! what the guest sees.

use std::ffi::CString;
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
pub(super) fn openat2(dir: RawFd, path: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
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
pub(super) fn open_existing(dir: RawFd, path: &CString, flags: i32) -> io::Result<OwnedFd> {
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

pub(super) fn kind_of(file_type: std::fs::FileType) -> u64 {
    if file_type.is_symlink() {
        fs::kind::SYMLINK
    } else if file_type.is_dir() {
        fs::kind::DIR
    } else if file_type.is_file() {
        fs::kind::FILE
    } else {
        fs::kind::OTHER
    }
}

pub(super) fn stat_results(st: &libc::stat) -> [u64; 4] {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => fs::kind::FILE,
        libc::S_IFDIR => fs::kind::DIR,
        libc::S_IFLNK => fs::kind::SYMLINK,
        _ => fs::kind::OTHER,
    };
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
