//! Outsourced sockets for unmodified programs: the C library's socket
//! functions, and the descriptor functions that meet sockets (`read`,
//! `close`, `poll`, `dup`, `fork`, …), routed to the host's sockets through
//! VMRPC for the process's IPv4/IPv6 UDP and TCP sockets
//! (`rtvm_guest_linux::descriptors` has the semantics). Every other
//! descriptor goes to the C library's own function untouched.
//!
//! The set-up (the region, `/dev/mem`) happens at the process's first
//! `socket` call for an IPv4/IPv6 socket; before it, and when it fails (not
//! root, not under rtvm), or under `RTVM_NET=off`, sockets are the guest
//! kernel's own.

use std::ffi::CStr;
use std::sync::OnceLock;

use libc::{c_int, c_ulong, c_void, size_t, sockaddr, socklen_t, ssize_t};
use rtvm_guest_linux::descriptors::{Errno, Host, SocketDescriptors};
use rtvm_guest_linux::net::{addr_from_sockaddr, addr_to_sockaddr, Addr, MAX_IO};
use rtvm_guest_linux::{Client, HostClock, PortIo, SlotCalls};

use crate::{debug, port, real};

/// Where the descriptor layer runs: the guest, with the region's clock.
pub struct Guest {
    port: &'static PortIo,
    /// Host time from the TSC, made once (every bounded park asks for it).
    clock: HostClock,
}

impl Host for Guest {
    fn now(&self) -> u64 {
        if let Some(now) = self.clock.now() {
            return now;
        }
        // No TSC frequency in the header: ask the host.
        Client::new(SlotCalls(self.port)).clock().unwrap_or(0)
    }

    fn on_rt_vcpu(&self) -> bool {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        u32::try_from(cpu).is_ok_and(|cpu| self.port.is_rt_cpu(cpu))
    }
}

type Net = SocketDescriptors<&'static PortIo, Guest>;

static NET: OnceLock<Option<Net>> = OnceLock::new();

/// The layer, if a socket was outsourced already; never sets it up (so
/// the set-up's own file reads come through here harmlessly).
fn net() -> Option<&'static Net> {
    NET.get().and_then(Option::as_ref)
}

/// The layer, set up on first use.
fn net_init() -> Option<&'static Net> {
    NET.get_or_init(|| {
        if std::env::var_os("RTVM_NET").is_some_and(|v| v == "off" || v == "0") {
            debug("sockets stay the guest's own: RTVM_NET=off");
            return None;
        }
        match port() {
            Ok(port) => {
                let clock = HostClock::new(port.region_header().clone());
                let net = SocketDescriptors::new(port, Guest { port, clock });
                // What processes that ended left open in the host (the
                // kernel closed their descriptors, not the host's handles)
                // goes now: a process's start is a cheap moment to look.
                let reaped = guarded(|| net.sockets().reap_ended().map_err(|_| libc::EIO));
                if let Ok(n @ 1..) = reaped {
                    debug(&format!("closed {n} host sockets of ended processes"));
                }
                Some(net)
            }
            Err(why) => {
                debug(&format!("sockets stay the guest's own: {why}"));
                None
            }
        }
    })
    .as_ref()
}

/// `net()` if `fd` is one of its sockets.
fn ours(fd: c_int) -> Option<&'static Net> {
    net().filter(|n| n.is_outsourced(fd))
}

fn set_errno(e: Errno) {
    // SAFETY: errno is thread-local and always writable.
    unsafe { *libc::__errno_location() = e };
}

/// A C return value from a result: the value, or -1 with errno set.
fn c_ret<V: Into<i64>>(r: Result<V, Errno>) -> i64 {
    match r {
        Ok(v) => v.into(),
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// Never unwind into C: a panic in the layer is `EIO`.
fn guarded<R>(f: impl FnOnce() -> Result<R, Errno>) -> Result<R, Errno> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        debug("a socket call panicked: EIO");
        Err(libc::EIO)
    })
}

/// Writes `addr` to a caller's `sockaddr` of `*len` bytes (truncated, as
/// the kernel does) and sets `*len` to its full length.
unsafe fn put_addr(addr: &Addr, sa: *mut sockaddr, len: *mut socklen_t) {
    if sa.is_null() || len.is_null() {
        return;
    }
    let (storage, full) = addr_to_sockaddr(addr);
    let n = (*len).min(full) as usize;
    std::ptr::copy_nonoverlapping(
        (&storage as *const libc::sockaddr_storage).cast::<u8>(),
        sa.cast::<u8>(),
        n,
    );
    *len = full;
}

/// The C library's function `$name` of type `$ty`.
macro_rules! libc_fn {
    ($name:literal, $ty:ty) => {{
        static REAL: OnceLock<usize> = OnceLock::new();
        real::<$ty>(&REAL, $name)
    }};
}

type SocketFn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type AddrFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type NameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type IntIntFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type SendToFn = unsafe extern "C" fn(
    c_int,
    *const c_void,
    size_t,
    c_int,
    *const sockaddr,
    socklen_t,
) -> ssize_t;
type RecvFromFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type SendMsgFn = unsafe extern "C" fn(c_int, *const libc::msghdr, c_int) -> ssize_t;
type RecvMsgFn = unsafe extern "C" fn(c_int, *mut libc::msghdr, c_int) -> ssize_t;
type ReadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
type WriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
type ReadvFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type SetsockoptFn = unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int;
type GetsockoptFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
type PollFn = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
type PpollFn = unsafe extern "C" fn(
    *mut libc::pollfd,
    libc::nfds_t,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type SelectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::timeval,
) -> c_int;
type PselectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type EpollCtlFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
type EpollWaitFn = unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
type EpollPwaitFn = unsafe extern "C" fn(
    c_int,
    *mut libc::epoll_event,
    c_int,
    c_int,
    *const libc::sigset_t,
) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type ForkFn = unsafe extern "C" fn() -> libc::pid_t;

/// `ENOSYS` when the C library lacks a function (it never does on glibc).
fn missing() -> i64 {
    set_errno(libc::ENOSYS);
    -1
}

/// `socket(2)`: IPv4/IPv6 UDP and TCP sockets are outsourced.
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    if matches!(domain, libc::AF_INET | libc::AF_INET6) {
        if let Some(net) = net_init() {
            if let Some(r) = net.socket(domain, ty, protocol) {
                return c_ret(guarded(|| r)) as c_int;
            }
        }
    }
    match libc_fn!(c"socket", SocketFn) {
        Some(f) => f(domain, ty, protocol),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| {
            net.bind(fd, addr_from_sockaddr(addr, len)).map(|()| 0)
        })) as c_int;
    }
    match libc_fn!(c"bind", AddrFn) {
        Some(f) => f(fd, addr, len),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| {
            net.connect(fd, addr_from_sockaddr(addr, len)).map(|()| 0)
        })) as c_int;
    }
    match libc_fn!(c"connect", AddrFn) {
        Some(f) => f(fd, addr, len),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| net.listen(fd, backlog).map(|()| 0))) as c_int;
    }
    match libc_fn!(c"listen", IntIntFn) {
        Some(f) => f(fd, backlog),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| {
            let (new, peer) = net.accept(fd, flags)?;
            put_addr(&peer, addr, len);
            Ok(new)
        })) as c_int;
    }
    match libc_fn!(c"accept4", Accept4Fn) {
        Some(f) => f(fd, addr, len, flags),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    accept4(fd, addr, len, 0)
}

/// `sendto` for an outsourced socket.
unsafe fn send_ours(
    net: &Net,
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    to: *const sockaddr,
    to_len: socklen_t,
) -> ssize_t {
    c_ret(guarded(|| {
        let data: &[u8] = if n == 0 {
            &[]
        } else if buf.is_null() {
            return Err(libc::EFAULT);
        } else {
            std::slice::from_raw_parts(buf.cast::<u8>(), n)
        };
        let to = if to.is_null() {
            None
        } else {
            Some(addr_from_sockaddr(to, to_len).ok_or(libc::EINVAL)?)
        };
        net.send(fd, data, to, flags).map(|n| n as i64)
    })) as ssize_t
}

/// `recvfrom` for an outsourced socket.
unsafe fn recv_ours(
    net: &Net,
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    from: *mut sockaddr,
    from_len: *mut socklen_t,
) -> ssize_t {
    c_ret(guarded(|| {
        let out: &mut [u8] = if n == 0 {
            &mut []
        } else if buf.is_null() {
            return Err(libc::EFAULT);
        } else {
            std::slice::from_raw_parts_mut(buf.cast::<u8>(), n)
        };
        let (got, sender) = net.recv(fd, out, flags)?;
        put_addr(&sender, from, from_len);
        Ok(got as i64)
    })) as ssize_t
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    to: *const sockaddr,
    to_len: socklen_t,
) -> ssize_t {
    if let Some(net) = ours(fd) {
        return send_ours(net, fd, buf, n, flags, to, to_len);
    }
    match libc_fn!(c"sendto", SendToFn) {
        Some(f) => f(fd, buf, n, flags, to, to_len),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    sendto(fd, buf, n, flags, std::ptr::null(), 0)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    from: *mut sockaddr,
    from_len: *mut socklen_t,
) -> ssize_t {
    if let Some(net) = ours(fd) {
        return recv_ours(net, fd, buf, n, flags, from, from_len);
    }
    match libc_fn!(c"recvfrom", RecvFromFn) {
        Some(f) => f(fd, buf, n, flags, from, from_len),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    recvfrom(
        fd,
        buf,
        n,
        flags,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if let Some(net) = ours(fd) {
        return recv_ours(
            net,
            fd,
            buf,
            n,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
    match libc_fn!(c"read", ReadFn) {
        Some(f) => f(fd, buf, n),
        None => libc::syscall(libc::SYS_read, fd, buf, n) as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if let Some(net) = ours(fd) {
        return send_ours(net, fd, buf, n, 0, std::ptr::null(), 0);
    }
    match libc_fn!(c"write", WriteFn) {
        Some(f) => f(fd, buf, n),
        None => libc::syscall(libc::SYS_write, fd, buf, n) as ssize_t,
    }
}

/// The iovecs' bytes, gathered (at most `limit`; `None`: more than that).
unsafe fn gather(iov: *const libc::iovec, count: c_int, limit: usize) -> Result<Vec<u8>, Errno> {
    if count < 0 || (count > 0 && iov.is_null()) {
        return Err(libc::EINVAL);
    }
    let mut data = Vec::new();
    for v in std::slice::from_raw_parts(iov, count as usize) {
        if v.iov_len == 0 {
            continue;
        }
        if v.iov_base.is_null() {
            return Err(libc::EFAULT);
        }
        if data.len() + v.iov_len > limit {
            return Err(libc::EMSGSIZE);
        }
        data.extend_from_slice(std::slice::from_raw_parts(
            v.iov_base.cast::<u8>(),
            v.iov_len,
        ));
    }
    Ok(data)
}

/// Spreads `data` over the iovecs.
unsafe fn scatter(iov: *const libc::iovec, count: c_int, data: &[u8]) {
    let mut at = 0;
    for v in std::slice::from_raw_parts(iov, count.max(0) as usize) {
        let n = v.iov_len.min(data.len() - at);
        if n > 0 {
            std::ptr::copy_nonoverlapping(data[at..].as_ptr(), v.iov_base.cast::<u8>(), n);
            at += n;
        }
    }
}

/// Total bytes the iovecs hold, at most [`MAX_IO`].
unsafe fn capacity(iov: *const libc::iovec, count: c_int) -> Result<usize, Errno> {
    if count < 0 || (count > 0 && iov.is_null()) {
        return Err(libc::EINVAL);
    }
    Ok(std::slice::from_raw_parts(iov, count as usize)
        .iter()
        .map(|v| v.iov_len)
        .fold(0usize, usize::saturating_add)
        .min(MAX_IO))
}

unsafe fn sendmsg_ours(net: &Net, fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t {
    c_ret(guarded(|| {
        let msg = msg.as_ref().ok_or(libc::EFAULT)?;
        if msg.msg_controllen > 0 {
            // SCM_RIGHTS and other ancillary data have no host counterpart.
            return Err(libc::EOPNOTSUPP);
        }
        let data = gather(msg.msg_iov, msg.msg_iovlen as c_int, 64 << 20)?;
        let to = if msg.msg_name.is_null() {
            None
        } else {
            Some(addr_from_sockaddr(msg.msg_name.cast(), msg.msg_namelen).ok_or(libc::EINVAL)?)
        };
        net.send(fd, &data, to, flags).map(|n| n as i64)
    })) as ssize_t
}

unsafe fn recvmsg_ours(net: &Net, fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t {
    c_ret(guarded(|| {
        let msg = msg.as_mut().ok_or(libc::EFAULT)?;
        let iovlen = msg.msg_iovlen as c_int;
        let mut buf = vec![0u8; capacity(msg.msg_iov, iovlen)?];
        let (got, sender) = net.recv(fd, &mut buf, flags)?;
        scatter(msg.msg_iov, iovlen, &buf[..got]);
        if !msg.msg_name.is_null() {
            put_addr(&sender, msg.msg_name.cast(), &mut msg.msg_namelen);
        }
        msg.msg_controllen = 0;
        msg.msg_flags = 0;
        Ok(got as i64)
    })) as ssize_t
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t {
    if let Some(net) = ours(fd) {
        return sendmsg_ours(net, fd, msg, flags);
    }
    match libc_fn!(c"sendmsg", SendMsgFn) {
        Some(f) => f(fd, msg, flags),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t {
    if let Some(net) = ours(fd) {
        return recvmsg_ours(net, fd, msg, flags);
    }
    match libc_fn!(c"recvmsg", RecvMsgFn) {
        Some(f) => f(fd, msg, flags),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, count: c_int) -> ssize_t {
    if let Some(net) = ours(fd) {
        let msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: iov.cast_mut(),
            msg_iovlen: count.max(0) as usize,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        return sendmsg_ours(net, fd, &msg, 0);
    }
    match libc_fn!(c"writev", ReadvFn) {
        Some(f) => f(fd, iov, count),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, count: c_int) -> ssize_t {
    if let Some(net) = ours(fd) {
        let mut msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: iov.cast_mut(),
            msg_iovlen: count.max(0) as usize,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        return recvmsg_ours(net, fd, &mut msg, 0);
    }
    match libc_fn!(c"readv", ReadvFn) {
        Some(f) => f(fd, iov, count),
        None => missing() as ssize_t,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if let Some(net) = net() {
        if let Some(r) = net.close(fd) {
            return c_ret(r.map(|()| 0)) as c_int;
        }
    }
    match libc_fn!(c"close", CloseFn) {
        Some(f) => f(fd),
        None => libc::syscall(libc::SYS_close, fd) as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| net.shutdown(fd, how).map(|()| 0))) as c_int;
    }
    match libc_fn!(c"shutdown", IntIntFn) {
        Some(f) => f(fd, how),
        None => missing() as c_int,
    }
}

unsafe fn name(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, peer: bool) -> Option<c_int> {
    let net = ours(fd)?;
    Some(c_ret(guarded(|| {
        if addr.is_null() || len.is_null() {
            return Err(libc::EFAULT);
        }
        put_addr(&net.name(fd, peer)?, addr, len);
        Ok(0)
    })) as c_int)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(r) = name(fd, addr, len, false) {
        return r;
    }
    match libc_fn!(c"getsockname", NameFn) {
        Some(f) => f(fd, addr, len),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(r) = name(fd, addr, len, true) {
        return r;
    }
    match libc_fn!(c"getpeername", NameFn) {
        Some(f) => f(fd, addr, len),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| {
            if value.is_null() {
                return Err(libc::EFAULT);
            }
            let bytes = std::slice::from_raw_parts(value.cast::<u8>(), len as usize);
            let r = net.setsockopt(fd, level, name, bytes);
            if r == Err(libc::ENOPROTOOPT) {
                debug(&format!(
                    "setsockopt level {level} option {name}: not supported on outsourced sockets (ENOPROTOOPT)"
                ));
            }
            r.map(|()| 0)
        })) as c_int;
    }
    match libc_fn!(c"setsockopt", SetsockoptFn) {
        Some(f) => f(fd, level, name, value, len),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    if let Some(net) = ours(fd) {
        return c_ret(guarded(|| {
            if value.is_null() || len.is_null() {
                return Err(libc::EFAULT);
            }
            let bytes = net.getsockopt(fd, level, name)?;
            let n = (*len as usize).min(bytes.len());
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), value.cast::<u8>(), n);
            *len = n as socklen_t;
            Ok(0)
        })) as c_int;
    }
    match libc_fn!(c"getsockopt", GetsockoptFn) {
        Some(f) => f(fd, level, name, value, len),
        None => missing() as c_int,
    }
}

/// `fcntl` on an outsourced socket: `None` for what the placeholder's own
/// `fcntl` answers (descriptor flags, locks).
fn fcntl_ours(net: &Net, fd: c_int, cmd: c_int, arg: usize) -> Option<i64> {
    match cmd {
        libc::F_GETFL => Some(c_ret(net.status_flags(fd))),
        libc::F_SETFL => Some(c_ret(
            net.set_nonblocking(fd, arg as c_int & libc::O_NONBLOCK != 0)
                .map(|()| 0),
        )),
        _ => None,
    }
}

/// `fcntl(2)`: `F_GETFL`/`F_SETFL` (`O_NONBLOCK`) and `F_DUPFD`,
/// `F_DUPFD_CLOEXEC` on outsourced sockets; the rest as the C library's.
///
/// # Safety
/// As for the C function. Declared with one word of argument, which is how
/// x86-64 passes fcntl's one optional argument.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_any(c"fcntl", fd, cmd, arg)
}

/// `fcntl64`, the same.
///
/// # Safety
/// As for [`fcntl`].
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_any(c"fcntl64", fd, cmd, arg)
}

unsafe fn fcntl_any(which: &CStr, fd: c_int, cmd: c_int, arg: usize) -> c_int {
    let net = ours(fd);
    if let Some(r) = net.and_then(|net| fcntl_ours(net, fd, cmd, arg)) {
        return r as c_int;
    }
    static REAL: OnceLock<usize> = OnceLock::new();
    static REAL64: OnceLock<usize> = OnceLock::new();
    let cache = if which == c"fcntl" { &REAL } else { &REAL64 };
    let rc = match real::<FcntlFn>(cache, which) {
        Some(f) => f(fd, cmd, arg),
        None => libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int,
    };
    if rc >= 0 && matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) {
        if let Some(net) = net {
            net.duplicated(fd, rc);
        }
    }
    rc
}

/// `ioctl(2)`: `FIONREAD` and `FIONBIO` on outsourced sockets (others are
/// `ENOTTY`); the rest as the C library's.
///
/// # Safety
/// As for the C function; one word of argument, as for [`fcntl`].
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: usize) -> c_int {
    if let Some(net) = ours(fd) {
        let out = arg as *mut c_int;
        return c_ret(guarded(|| match request {
            libc::FIONREAD => {
                let n = net.readable(fd)?;
                out.as_mut().map(|o| *o = n).ok_or(libc::EFAULT)?;
                Ok(0)
            }
            libc::FIONBIO => {
                let on = out.as_ref().ok_or(libc::EFAULT)?;
                net.set_nonblocking(fd, *on != 0).map(|()| 0)
            }
            _ => Err(libc::ENOTTY),
        })) as c_int;
    }
    match libc_fn!(c"ioctl", IoctlFn) {
        Some(f) => f(fd, request, arg),
        None => libc::syscall(libc::SYS_ioctl, fd, request, arg) as c_int,
    }
}

/// A C timeout in ms as ns (`None`: negative, no limit).
fn ms_timeout(ms: c_int) -> Option<u64> {
    u64::try_from(ms).ok().map(|ms| ms * 1_000_000)
}

unsafe fn timespec_timeout(ts: *const libc::timespec) -> Result<Option<u64>, Errno> {
    match ts.as_ref() {
        None => Ok(None),
        Some(ts) if ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) => Err(libc::EINVAL),
        Some(ts) => Ok(Some(
            (ts.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(ts.tv_nsec as u64),
        )),
    }
}

unsafe fn poll_ours(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: Option<u64>,
) -> Option<c_int> {
    let net = net()?;
    if fds.is_null() || n == 0 {
        return None;
    }
    let set = std::slice::from_raw_parts_mut(fds, n as usize);
    let r = net.poll(set, timeout)?;
    Some(c_ret(r.map(|n| n as i64)) as c_int)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    if let Some(r) = poll_ours(fds, n, ms_timeout(timeout)) {
        return r;
    }
    match libc_fn!(c"poll", PollFn) {
        Some(f) => f(fds, n, timeout),
        None => missing() as c_int,
    }
}

/// The signal mask is not applied to a set with outsourced sockets: the
/// wait happens in the host, where the guest delivers no signal anyway.
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    if net().is_some() {
        match timespec_timeout(timeout) {
            Ok(t) => {
                if let Some(r) = poll_ours(fds, n, t) {
                    return r;
                }
            }
            Err(e) => return c_ret::<i64>(Err(e)) as c_int,
        }
    }
    match libc_fn!(c"ppoll", PpollFn) {
        Some(f) => f(fds, n, timeout, mask),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: c_int,
    fds_len: size_t,
) -> c_int {
    if (fds_len / std::mem::size_of::<libc::pollfd>()) < n as usize {
        libc::abort();
    }
    poll(fds, n, timeout)
}

unsafe fn select_ours(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: Option<u64>,
) -> Option<c_int> {
    let net = net()?;
    let result = net.select(nfds, r, w, e, timeout)?;
    Some(c_ret(result.map(i64::from)) as c_int)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    if net().is_some() {
        let t = match timeout.as_ref() {
            None => Ok(None),
            Some(tv) if tv.tv_sec < 0 || !(0..1_000_000).contains(&tv.tv_usec) => Err(libc::EINVAL),
            Some(tv) => Ok(Some(
                (tv.tv_sec as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(tv.tv_usec as u64 * 1_000),
            )),
        };
        match t {
            Ok(t) => {
                if let Some(rc) = select_ours(nfds, r, w, e, t) {
                    // Linux leaves no time left in the timeout it was given:
                    // programs that reuse it see it spent.
                    if let Some(tv) = timeout.as_mut() {
                        if rc == 0 {
                            tv.tv_sec = 0;
                            tv.tv_usec = 0;
                        }
                    }
                    return rc;
                }
            }
            Err(err) => return c_ret::<i64>(Err(err)) as c_int,
        }
    }
    match libc_fn!(c"select", SelectFn) {
        Some(f) => f(nfds, r, w, e, timeout),
        None => missing() as c_int,
    }
}

/// The signal mask is not applied to sets with outsourced sockets (as for
/// [`ppoll`]).
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    if net().is_some() {
        match timespec_timeout(timeout) {
            Ok(t) => {
                if let Some(rc) = select_ours(nfds, r, w, e, t) {
                    return rc;
                }
            }
            Err(err) => return c_ret::<i64>(Err(err)) as c_int,
        }
    }
    match libc_fn!(c"pselect", PselectFn) {
        Some(f) => f(nfds, r, w, e, timeout, mask),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    if let Some(net) = net() {
        if let Some(r) = net.epoll_ctl(epfd, op, fd, event.as_ref().copied()) {
            return c_ret(r.map(|()| 0)) as c_int;
        }
    }
    match libc_fn!(c"epoll_ctl", EpollCtlFn) {
        Some(f) => f(epfd, op, fd, event),
        None => missing() as c_int,
    }
}

unsafe fn epoll_wait_ours(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> Option<c_int> {
    let net = net()?;
    if events.is_null() || max <= 0 {
        return None;
    }
    let out = std::slice::from_raw_parts_mut(events, max as usize);
    let r = net.epoll_wait(epfd, out, ms_timeout(timeout))?;
    Some(c_ret(r.map(|n| n as i64)) as c_int)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    if let Some(r) = epoll_wait_ours(epfd, events, max, timeout) {
        return r;
    }
    match libc_fn!(c"epoll_wait", EpollWaitFn) {
        Some(f) => f(epfd, events, max, timeout),
        None => missing() as c_int,
    }
}

/// The signal mask is not applied to sets with outsourced sockets (as for
/// [`ppoll`]).
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    if let Some(r) = epoll_wait_ours(epfd, events, max, timeout) {
        return r;
    }
    match libc_fn!(c"epoll_pwait", EpollPwaitFn) {
        Some(f) => f(epfd, events, max, timeout, mask),
        None => missing() as c_int,
    }
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let rc = match libc_fn!(c"dup", DupFn) {
        Some(f) => f(fd),
        None => missing() as c_int,
    };
    if rc >= 0 {
        if let Some(net) = net() {
            net.duplicated(fd, rc);
        }
    }
    rc
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let rc = match libc_fn!(c"dup2", Dup2Fn) {
        Some(f) => f(old, new),
        None => missing() as c_int,
    };
    if rc >= 0 {
        if let Some(net) = net() {
            net.duplicated(old, rc);
        }
    }
    rc
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let rc = match libc_fn!(c"dup3", Dup3Fn) {
        Some(f) => f(old, new, flags),
        None => missing() as c_int,
    };
    if rc >= 0 {
        if let Some(net) = net() {
            net.duplicated(old, rc);
        }
    }
    rc
}

/// `fork(2)`: the child's outsourced sockets get host handles of their
/// own, so either process closing one leaves the other's open.
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    let real_fork = || match libc_fn!(c"fork", ForkFn) {
        Some(f) => f(),
        None => missing() as libc::pid_t,
    };
    match net() {
        Some(net) if !net.is_empty() => net.fork_with(real_fork),
        _ => real_fork(),
    }
}

/// # Safety
/// As for the C function (`__read_chk`, what fortified programs call).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buf_len: size_t,
) -> ssize_t {
    if n > buf_len {
        libc::abort();
    }
    read(fd, buf, n)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buf_len: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buf_len {
        libc::abort();
    }
    recv(fd, buf, n, flags)
}

/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buf_len: size_t,
    flags: c_int,
    from: *mut sockaddr,
    from_len: *mut socklen_t,
) -> ssize_t {
    if n > buf_len {
        libc::abort();
    }
    recvfrom(fd, buf, n, flags, from, from_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn iovecs_gather_and_scatter_in_order_within_their_limits() {
        let (mut a, mut b, mut empty) = (*b"abc", *b"defg", [0u8; 0]);
        let v = [iov(&mut a), iov(&mut empty), iov(&mut b)];
        // SAFETY: three live iovecs.
        unsafe {
            assert_eq!(gather(v.as_ptr(), 3, 100).unwrap(), b"abcdefg");
            assert_eq!(gather(v.as_ptr(), 3, 6), Err(libc::EMSGSIZE));
            assert_eq!(gather(v.as_ptr(), -1, 100), Err(libc::EINVAL));
            assert_eq!(capacity(v.as_ptr(), 3), Ok(7));
            scatter(v.as_ptr(), 3, b"12345");
        }
        assert_eq!((&a, &b), (b"123", b"45fg"), "only what came is written");
    }

    #[test]
    fn an_address_is_truncated_to_the_callers_room_and_its_length_told() {
        let addr = Addr::parse("10.1.2.3:258").unwrap();
        // SAFETY: plain data.
        let mut out: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = 4 as socklen_t;
        // SAFETY: `out` has room for `len` bytes.
        unsafe { put_addr(&addr, (&mut out as *mut libc::sockaddr_in).cast(), &mut len) };
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(out.sin_port.to_ne_bytes(), [1, 2], "the port came");
        assert_eq!(out.sin_addr.s_addr, 0, "the address did not: no room");
        // SAFETY: null is refused before any write.
        unsafe { put_addr(&addr, std::ptr::null_mut(), &mut len) };
    }
}
