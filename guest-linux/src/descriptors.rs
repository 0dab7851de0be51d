//! Outsourced sockets as file descriptors of a guest process: what the
//! preload library's socket functions stand on, with the C library's
//! semantics and errno, over [`Sockets`] (one call slot per call).
//!
//! An outsourced socket is a real descriptor of the process: an eventfd the
//! table here maps to the host's socket handle. So descriptor numbers,
//! `dup`, close-on-exec and `fork` behave as programs expect, and a
//! descriptor this library did not make is never mistaken for one. The
//! eventfd is non-blocking and never signalled: a call that reaches it
//! behind this library's back (stdio's internal reads, `sendfile`) gets
//! `EAGAIN` or `EINVAL`, never a hang.
//!
//! Waits are long polls, bounded: one call parks its vCPU in the host for at
//! most [`RT_PARK_NS`] on a real-time vCPU and [`PARK_NS`] on others, then
//! parks again until the caller's own deadline (none, `SO_RCVTIMEO`, or
//! none at all when non-blocking). In between, the guest kernel takes the
//! interrupts that came meanwhile (a signal to this thread is delivered
//! there; the call then goes on, as under `SA_RESTART`), and on other vCPUs
//! the thread yields, so the guest's other threads there run.
//!
//! `poll`/`select`/`epoll` over outsourced descriptors wait in the host for
//! readability; an outsourced socket is always writable (a send waits in
//! the host for buffer space, at most `SEND_WAIT_NS`) unless it listens.
//! A set mixing outsourced and guest-local descriptors is served in
//! slices: local readiness is checked (without waiting) after
//! [`MIXED_SLICE_NS`], then at doubling intervals up to the park bound
//! while nothing happens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rtvm_abi::vmrpc::{Call, Status};

use crate::net::{self, opt, Addr, Sockets, INET, INET6, MAX_IO, NO_DEADLINE, POLL_MAX, TCP, UDP};
use crate::slots::{LinuxThreads, Owners, SlotTransport};
use crate::Error;

/// An errno value.
pub type Errno = i32;
/// A file descriptor.
pub type Fd = i32;

/// What the descriptor layer needs of where it runs.
pub trait Host {
    /// Host `CLOCK_MONOTONIC` now, in ns: deadlines are the host's.
    fn now(&self) -> u64;
    /// Whether the calling thread runs on a real-time vCPU now.
    fn on_rt_vcpu(&self) -> bool;
}

/// Longest single park on a real-time vCPU: the guest CPU answers no
/// interrupt while parked (the same bound as a long-polled sleep's).
pub const RT_PARK_NS: u64 = 10_000_000;
/// Longest single park on other vCPUs, where the guest's other threads
/// wait for the CPU meanwhile.
pub const PARK_NS: u64 = 1_000_000;
/// How soon a poll set with guest-local descriptors first checks them
/// again (then at doubling intervals, up to the park bound).
pub const MIXED_SLICE_NS: u64 = 1_000_000;
/// How long a connect waits for its answer without `SO_SNDTIMEO`.
pub const CONNECT_WAIT_NS: u64 = 10_000_000_000;

/// What a set of descriptors naming one socket share (an open file
/// description's part of a socket).
struct Socket {
    handle: AtomicU64,
    kind: u64,
    family: u64,
    nonblocking: AtomicBool,
    /// `SO_RCVTIMEO` / `SO_SNDTIMEO` in ns; 0: none.
    recv_timeout: AtomicU64,
    send_timeout: AtomicU64,
    listening: AtomicBool,
    /// Descriptors of this process naming it: the last one's close closes
    /// the host's handle.
    fds: AtomicUsize,
}

impl Socket {
    fn handle(&self) -> u64 {
        self.handle.load(Ordering::Acquire)
    }

    fn stream(&self) -> bool {
        self.kind == TCP
    }

    fn writable(&self) -> bool {
        !self.listening.load(Ordering::Relaxed)
    }
}

/// An `epoll` registration of an outsourced descriptor.
struct Interest {
    fd: Fd,
    socket: Arc<Socket>,
    events: u32,
    data: u64,
}

/// The outsourced sockets of one process, by descriptor.
pub struct SocketDescriptors<T: SlotTransport, H: Host, O: Owners = LinuxThreads> {
    sockets: Sockets<T, O>,
    host: H,
    fds: RwLock<HashMap<Fd, Arc<Socket>>>,
    /// How many descriptors `fds` holds: 0 lets every other descriptor's
    /// call through without a lock.
    count: AtomicUsize,
    /// Outsourced registrations of each epoll descriptor.
    epolls: Mutex<HashMap<Fd, Vec<Interest>>>,
}

/// The errno a failed call `call` gives a program.
fn errno_of(call: Call, e: &Error) -> Errno {
    match e {
        Error::Status(status) => net::errno(call, *status),
        Error::NoFreeSlot => libc::ENOBUFS,
        Error::TooLong => libc::EMSGSIZE,
        _ => libc::EIO,
    }
}

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The system calls this layer makes itself, raw: the preload library
/// exports `close`, `poll` and the like, so the C library's would come
/// back here.
mod sys {
    use super::{last_errno, Errno, Fd};

    pub fn placeholder(cloexec: bool) -> Result<Fd, Errno> {
        let flags = libc::EFD_NONBLOCK | if cloexec { libc::EFD_CLOEXEC } else { 0 };
        // SAFETY: plain system call, no pointers.
        let fd = unsafe { libc::syscall(libc::SYS_eventfd2, 0, flags) };
        if fd < 0 {
            Err(last_errno())
        } else {
            Ok(fd as Fd)
        }
    }

    pub fn close(fd: Fd) {
        // SAFETY: plain system call on a descriptor this layer owns.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }

    /// Whether `fd` is an open descriptor.
    pub fn is_open(fd: Fd) -> bool {
        // SAFETY: plain system call, no pointers.
        unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) >= 0 }
    }

    /// Readiness of `fds` now, without waiting.
    pub fn poll_now(fds: &mut [libc::pollfd]) -> Result<usize, Errno> {
        if fds.is_empty() {
            return Ok(0);
        }
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `fds` and `zero` live through the call; no signal mask.
        let n = unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                fds.as_mut_ptr(),
                fds.len(),
                &zero,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            Err(last_errno())
        } else {
            Ok(n as usize)
        }
    }

    /// The ready events of epoll `epfd` now, without waiting.
    pub fn epoll_now(epfd: Fd, events: &mut [libc::epoll_event]) -> Result<usize, Errno> {
        if events.is_empty() {
            return Ok(0);
        }
        // SAFETY: `events` is writable for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait,
                epfd,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                0,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            Err(last_errno())
        } else {
            Ok(n as usize)
        }
    }

    pub fn yield_cpu() {
        // SAFETY: plain system call.
        unsafe { libc::syscall(libc::SYS_sched_yield) };
    }

    pub fn sleep(ns: u64) {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` lives through the call.
        unsafe {
            libc::syscall(
                libc::SYS_clock_nanosleep,
                libc::CLOCK_MONOTONIC,
                0,
                &ts,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
    }
}

/// A timeout in ns as a C `timeval`'s bytes, and back.
fn timeval_bytes(ns: u64) -> Vec<u8> {
    let tv = libc::timeval {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_usec: ((ns % 1_000_000_000) / 1_000) as libc::suseconds_t,
    };
    // SAFETY: a timeval is plain data.
    unsafe {
        std::slice::from_raw_parts(
            (&tv as *const libc::timeval).cast::<u8>(),
            std::mem::size_of::<libc::timeval>(),
        )
    }
    .to_vec()
}

fn timeval_ns(value: &[u8]) -> Result<u64, Errno> {
    if value.len() < std::mem::size_of::<libc::timeval>() {
        return Err(libc::EINVAL);
    }
    // SAFETY: long enough for a timeval (checked); read unaligned.
    let tv = unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<libc::timeval>()) };
    if tv.tv_sec < 0 || !(0..1_000_000).contains(&tv.tv_usec) {
        return Err(libc::EDOM);
    }
    Ok((tv.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(tv.tv_usec as u64 * 1_000))
}

fn int_value(value: &[u8]) -> Result<i32, Errno> {
    let bytes: [u8; 4] = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(libc::EINVAL)?;
    Ok(i32::from_ne_bytes(bytes))
}

fn int_bytes(v: i64) -> Vec<u8> {
    (v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
        .to_ne_bytes()
        .to_vec()
}

/// Socket options the host keeps, by (level, name).
fn host_option(level: i32, name: i32) -> Option<u64> {
    Some(match (level, name) {
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => opt::REUSEADDR,
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => opt::RCVBUF,
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => opt::SNDBUF,
        (libc::SOL_SOCKET, libc::SO_PRIORITY) => opt::PRIORITY,
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => opt::NODELAY,
        (libc::IPPROTO_IP, libc::IP_TOS) | (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => opt::TOS,
        _ => return None,
    })
}

/// Receive flags this layer honours; others are `EOPNOTSUPP`.
const RECV_FLAGS: i32 = libc::MSG_DONTWAIT
    | libc::MSG_PEEK
    | libc::MSG_WAITALL
    | libc::MSG_NOSIGNAL
    | libc::MSG_CMSG_CLOEXEC;
/// Send flags this layer honours (`MSG_MORE` as a plain send).
const SEND_FLAGS: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE;

impl<T: SlotTransport, H: Host> SocketDescriptors<T, H, LinuxThreads> {
    pub fn new(transport: T, host: H) -> Self {
        Self::with_owners(transport, host, LinuxThreads)
    }
}

impl<T: SlotTransport, H: Host, O: Owners> SocketDescriptors<T, H, O> {
    pub fn with_owners(transport: T, host: H, owners: O) -> Self {
        SocketDescriptors {
            sockets: Sockets::with_owners(transport, owners),
            host,
            fds: RwLock::default(),
            count: AtomicUsize::new(0),
            epolls: Mutex::default(),
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    pub fn sockets(&self) -> &Sockets<T, O> {
        &self.sockets
    }

    fn get(&self, fd: Fd) -> Option<Arc<Socket>> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.fds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fd)
            .cloned()
    }

    /// Whether `fd` is an outsourced socket.
    pub fn is_outsourced(&self, fd: Fd) -> bool {
        self.get(fd).is_some()
    }

    /// How many descriptors name outsourced sockets.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn socket_of(&self, fd: Fd) -> Result<Arc<Socket>, Errno> {
        self.get(fd).ok_or(libc::EBADF)
    }

    /// Maps `fd` to `socket`; whatever `fd` named before is released.
    fn install(&self, fd: Fd, socket: Arc<Socket>) {
        socket.fds.fetch_add(1, Ordering::AcqRel);
        let old = {
            let mut fds = self.fds.write().unwrap_or_else(|e| e.into_inner());
            let old = fds.insert(fd, socket);
            self.count.store(fds.len(), Ordering::Release);
            old
        };
        if let Some(old) = old {
            self.release(fd, &old);
        }
    }

    /// One descriptor fewer names `socket`: its last closes the host's
    /// handle; its epoll registrations go.
    fn release(&self, fd: Fd, socket: &Arc<Socket>) {
        {
            let mut epolls = self.epolls.lock().unwrap_or_else(|e| e.into_inner());
            for interests in epolls.values_mut() {
                interests.retain(|i| !(i.fd == fd && Arc::ptr_eq(&i.socket, socket)));
            }
        }
        if socket.fds.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.sockets.close(socket.handle());
        }
    }

    /// Takes `fd` out of the table (it is being closed or replaced);
    /// `false` if it was not an outsourced socket.
    pub fn forget(&self, fd: Fd) -> bool {
        let old = {
            let mut fds = self.fds.write().unwrap_or_else(|e| e.into_inner());
            let old = fds.remove(&fd);
            self.count.store(fds.len(), Ordering::Release);
            old
        };
        match old {
            Some(socket) => {
                self.release(fd, &socket);
                true
            }
            None => false,
        }
    }

    /// A deadline `timeout` ns (0: none) from now, or now when the call
    /// must not wait.
    fn deadline(&self, timeout: u64, nonblocking: bool) -> u64 {
        if nonblocking {
            0
        } else if timeout == 0 {
            NO_DEADLINE
        } else {
            self.host.now().saturating_add(timeout)
        }
    }

    /// Runs a waiting call `op` with a deadline in bounded parks until the
    /// caller's `deadline`: `TimedOut` before it means park again.
    fn waiting<R>(
        &self,
        call: Call,
        deadline: u64,
        mut op: impl FnMut(u64) -> Result<R, Error>,
    ) -> Result<R, Errno> {
        loop {
            let rt = self.host.on_rt_vcpu();
            let bound = if rt { RT_PARK_NS } else { PARK_NS };
            let slice = if deadline == 0 {
                0
            } else {
                deadline.min(self.host.now().saturating_add(bound))
            };
            match op(slice) {
                Err(Error::Status(Status::TimedOut)) if slice < deadline => {
                    if !rt {
                        sys::yield_cpu();
                    }
                }
                Err(e) => return Err(errno_of(call, &e)),
                Ok(r) => return Ok(r),
            }
        }
    }

    /// `op`, once more after closing what ended processes left open if the
    /// VM's socket limit refused it.
    fn reaping<R>(&self, mut op: impl FnMut() -> Result<R, Error>) -> Result<R, Error> {
        match op() {
            Err(Error::Status(Status::NoResources))
                if self.sockets.reap_ended().is_ok_and(|n| n > 0) =>
            {
                op()
            }
            r => r,
        }
    }

    /// `socket(2)`: `None` when the socket is not one to outsource (not
    /// IPv4/IPv6, not UDP/TCP): the caller makes it locally.
    pub fn socket(&self, domain: i32, ty: i32, protocol: i32) -> Option<Result<Fd, Errno>> {
        let family = match domain {
            libc::AF_INET => INET,
            libc::AF_INET6 => INET6,
            _ => return None,
        };
        let kind = match (ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC), protocol) {
            (libc::SOCK_DGRAM, 0 | libc::IPPROTO_UDP) => UDP,
            (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => TCP,
            _ => return None,
        };
        Some(self.open(
            family,
            kind,
            ty & libc::SOCK_NONBLOCK != 0,
            ty & libc::SOCK_CLOEXEC != 0,
            None,
        ))
    }

    /// A descriptor for host handle `handle` (new, or from `accept`).
    fn open(
        &self,
        family: u64,
        kind: u64,
        nonblocking: bool,
        cloexec: bool,
        handle: Option<u64>,
    ) -> Result<Fd, Errno> {
        let handle = match handle {
            Some(h) => h,
            None => self
                .reaping(|| self.sockets.socket(family, kind))
                .map_err(|e| errno_of(Call::NetSocket, &e))?,
        };
        let fd = match sys::placeholder(cloexec) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = self.sockets.close(handle);
                return Err(e);
            }
        };
        self.install(
            fd,
            Arc::new(Socket {
                handle: handle.into(),
                kind,
                family,
                nonblocking: nonblocking.into(),
                recv_timeout: 0.into(),
                send_timeout: 0.into(),
                listening: false.into(),
                fds: 0.into(),
            }),
        );
        Ok(fd)
    }

    /// An address argument: of the socket's family, or `EAFNOSUPPORT`
    /// (`EINVAL` when too short to say).
    fn address(&self, socket: &Socket, addr: Option<Addr>) -> Result<Addr, Errno> {
        let addr = addr.ok_or(libc::EINVAL)?;
        if addr.family != socket.family {
            return Err(libc::EAFNOSUPPORT);
        }
        Ok(addr)
    }

    pub fn bind(&self, fd: Fd, addr: Option<Addr>) -> Result<(), Errno> {
        let socket = self.socket_of(fd)?;
        let addr = self.address(&socket, addr)?;
        self.sockets
            .bind(socket.handle(), &addr)
            .map_err(|e| errno_of(Call::NetBind, &e))
    }

    pub fn listen(&self, fd: Fd, backlog: i32) -> Result<(), Errno> {
        let socket = self.socket_of(fd)?;
        if !socket.stream() {
            return Err(libc::EOPNOTSUPP);
        }
        // As Linux: a backlog out of range is the largest one.
        let backlog = if (1..=1024).contains(&backlog) {
            backlog as u64
        } else {
            1024
        };
        self.sockets
            .listen(socket.handle(), backlog)
            .map_err(|e| errno_of(Call::NetListen, &e))?;
        socket.listening.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `accept4(2)`: the new descriptor (`SOCK_NONBLOCK`, `SOCK_CLOEXEC`
    /// in `flags`) and the peer.
    pub fn accept(&self, fd: Fd, flags: i32) -> Result<(Fd, Addr), Errno> {
        let socket = self.socket_of(fd)?;
        if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
            return Err(libc::EINVAL);
        }
        if !socket.listening.load(Ordering::Relaxed) {
            return Err(libc::EINVAL);
        }
        let deadline = self.deadline(
            socket.recv_timeout.load(Ordering::Relaxed),
            socket.nonblocking.load(Ordering::Relaxed),
        );
        let (handle, peer) = self.waiting(Call::NetAccept, deadline, |until| {
            self.reaping(|| self.sockets.accept(socket.handle(), until))
        })?;
        let fd = self.open(
            socket.family,
            TCP,
            flags & libc::SOCK_NONBLOCK != 0,
            flags & libc::SOCK_CLOEXEC != 0,
            Some(handle),
        )?;
        Ok((fd, peer))
    }

    /// `connect(2)`: waits for the answer (at most `SO_SNDTIMEO`, else
    /// [`CONNECT_WAIT_NS`]) in bounded parks, non-blocking sockets too: a
    /// connect never answers `EINPROGRESS`.
    pub fn connect(&self, fd: Fd, addr: Option<Addr>) -> Result<(), Errno> {
        let socket = self.socket_of(fd)?;
        let addr = self.address(&socket, addr)?;
        let timeout = match socket.send_timeout.load(Ordering::Relaxed) {
            0 => CONNECT_WAIT_NS,
            t => t,
        };
        let deadline = self.host.now().saturating_add(timeout);
        // In bounded parks like any wait: a connect still under way when a
        // park ends is waited for by the next call.
        self.waiting(Call::NetConnect, deadline, |until| {
            self.sockets.connect(socket.handle(), &addr, until)
        })
        .map_err(|e| {
            if e == libc::EAGAIN {
                libc::ETIMEDOUT
            } else {
                e
            }
        })
    }

    /// `sendto(2)` and its kin: the bytes sent. A reset stream raises
    /// `SIGPIPE` unless `MSG_NOSIGNAL`, as the kernel would.
    pub fn send(&self, fd: Fd, data: &[u8], to: Option<Addr>, flags: i32) -> Result<usize, Errno> {
        let socket = self.socket_of(fd)?;
        if flags & !SEND_FLAGS != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let to = match to {
            Some(addr) if !socket.stream() => Some(self.address(&socket, Some(addr))?),
            // As Linux: a stream socket ignores the address.
            _ => None,
        };
        if !socket.stream() && data.len() > MAX_IO {
            return Err(libc::EMSGSIZE);
        }
        let mut sent = 0;
        loop {
            let chunk = &data[sent..data.len().min(sent + MAX_IO)];
            match self.sockets.send(socket.handle(), chunk, to.as_ref()) {
                Ok(n) => sent += n,
                Err(_) if sent > 0 => return Ok(sent),
                Err(Error::Status(Status::TimedOut)) => return Err(libc::EAGAIN),
                Err(e) => {
                    let errno = errno_of(Call::NetSend, &e);
                    if errno == libc::EPIPE && flags & libc::MSG_NOSIGNAL == 0 {
                        // SAFETY: raising a signal in this thread, as the
                        // kernel's send would have.
                        unsafe { libc::raise(libc::SIGPIPE) };
                    }
                    return Err(errno);
                }
            }
            if sent >= data.len() || !socket.stream() {
                return Ok(sent);
            }
        }
    }

    /// `recvfrom(2)` and its kin: the bytes received and the sender.
    pub fn recv(&self, fd: Fd, buf: &mut [u8], flags: i32) -> Result<(usize, Addr), Errno> {
        let socket = self.socket_of(fd)?;
        if flags & !RECV_FLAGS != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        if socket.listening.load(Ordering::Relaxed) {
            return Err(libc::ENOTCONN);
        }
        let nonblocking =
            socket.nonblocking.load(Ordering::Relaxed) || flags & libc::MSG_DONTWAIT != 0;
        let deadline = self.deadline(socket.recv_timeout.load(Ordering::Relaxed), nonblocking);
        let peek = flags & libc::MSG_PEEK != 0;
        let all = flags & libc::MSG_WAITALL != 0 && socket.stream() && !peek && !nonblocking;
        let mut got = 0;
        let mut from = Addr::NONE;
        loop {
            let want = &mut buf[got..];
            let want_len = want.len().min(MAX_IO);
            let result = self.waiting(Call::NetRecv, deadline, |until| {
                self.sockets
                    .recv_flags(socket.handle(), &mut want[..want_len], until, peek)
            });
            match result {
                Ok((n, sender)) => {
                    got += n;
                    from = sender;
                    if !all || n == 0 || got == buf.len() {
                        return Ok((got, from));
                    }
                }
                Err(_) if got > 0 => return Ok((got, from)),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn shutdown(&self, fd: Fd, how: i32) -> Result<(), Errno> {
        let socket = self.socket_of(fd)?;
        let how = match how {
            libc::SHUT_RD => 0,
            libc::SHUT_WR => 1,
            libc::SHUT_RDWR => 2,
            _ => return Err(libc::EINVAL),
        };
        self.sockets
            .shutdown(socket.handle(), how)
            .map_err(|e| errno_of(Call::NetShutdown, &e))
    }

    /// getsockname (`peer` false) or getpeername (`peer` true).
    pub fn name(&self, fd: Fd, peer: bool) -> Result<Addr, Errno> {
        let socket = self.socket_of(fd)?;
        let addr = if peer {
            self.sockets.peer_address(socket.handle())
        } else {
            self.sockets.local_address(socket.handle())
        };
        addr.map_err(|e| errno_of(Call::NetAddress, &e))
    }

    /// `setsockopt(2)` with the option's bytes.
    pub fn setsockopt(&self, fd: Fd, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
        let socket = self.socket_of(fd)?;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => {
                socket
                    .recv_timeout
                    .store(timeval_ns(value)?, Ordering::Relaxed);
                return Ok(());
            }
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => {
                socket
                    .send_timeout
                    .store(timeval_ns(value)?, Ordering::Relaxed);
                return Ok(());
            }
            // The host's IPv6 sockets are IPv6-only, always.
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if socket.family == INET6 => {
                return match int_value(value)? {
                    0 => Err(libc::EOPNOTSUPP),
                    _ => Ok(()),
                };
            }
            _ => {}
        }
        let option = host_option(level, name).ok_or(libc::ENOPROTOOPT)?;
        let v = int_value(value)?;
        let v = match option {
            opt::REUSEADDR | opt::NODELAY => u64::from(v != 0),
            _ => u64::try_from(v).map_err(|_| libc::EINVAL)?,
        };
        self.sockets
            .setsockopt(socket.handle(), option, v)
            .map_err(|e| errno_of(Call::NetSetsockopt, &e))
    }

    /// `getsockopt(2)`: the option's bytes (an int, or a timeval).
    pub fn getsockopt(&self, fd: Fd, level: i32, name: i32) -> Result<Vec<u8>, Errno> {
        let socket = self.socket_of(fd)?;
        let local = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_TYPE) => Some(i64::from(if socket.stream() {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_DGRAM
            })),
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(i64::from(if socket.family == INET6 {
                libc::AF_INET6
            } else {
                libc::AF_INET
            })),
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => Some(i64::from(if socket.stream() {
                libc::IPPROTO_TCP
            } else {
                libc::IPPROTO_UDP
            })),
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => {
                Some(i64::from(socket.listening.load(Ordering::Relaxed)))
            }
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if socket.family == INET6 => Some(1),
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => {
                return Ok(timeval_bytes(socket.recv_timeout.load(Ordering::Relaxed)))
            }
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => {
                return Ok(timeval_bytes(socket.send_timeout.load(Ordering::Relaxed)))
            }
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let status = self
                    .sockets
                    .getsockopt(socket.handle(), opt::ERROR)
                    .map_err(|e| errno_of(Call::NetGetsockopt, &e))?;
                Some(match Status::from_u32(status as u32) {
                    Some(Status::Ok) => 0,
                    Some(s) => i64::from(net::errno(Call::NetConnect, s)),
                    None => i64::from(libc::EIO),
                })
            }
            _ => None,
        };
        let value = match local {
            Some(v) => v,
            None => {
                let option = host_option(level, name).ok_or(libc::ENOPROTOOPT)?;
                let v = self
                    .sockets
                    .getsockopt(socket.handle(), option)
                    .map_err(|e| errno_of(Call::NetGetsockopt, &e))?;
                i64::try_from(v).unwrap_or(i64::MAX)
            }
        };
        Ok(int_bytes(value))
    }

    /// `ioctl(fd, FIONREAD)`: bytes ready to be received.
    pub fn readable(&self, fd: Fd) -> Result<i32, Errno> {
        let socket = self.socket_of(fd)?;
        let n = self
            .sockets
            .getsockopt(socket.handle(), opt::READABLE)
            .map_err(|e| errno_of(Call::NetGetsockopt, &e))?;
        Ok(n.min(i32::MAX as u64) as i32)
    }

    /// The file status flags (`fcntl(F_GETFL)`).
    pub fn status_flags(&self, fd: Fd) -> Result<i32, Errno> {
        let socket = self.socket_of(fd)?;
        Ok(libc::O_RDWR
            | if socket.nonblocking.load(Ordering::Relaxed) {
                libc::O_NONBLOCK
            } else {
                0
            })
    }

    /// `O_NONBLOCK` on or off (`fcntl(F_SETFL)`, `ioctl(FIONBIO)`).
    pub fn set_nonblocking(&self, fd: Fd, on: bool) -> Result<(), Errno> {
        self.socket_of(fd)?.nonblocking.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// `close(2)` of an outsourced descriptor: `None` if `fd` is not one.
    pub fn close(&self, fd: Fd) -> Option<Result<(), Errno>> {
        // No outsourced socket, no registration either: nothing to look up.
        if self.is_empty() {
            return None;
        }
        if self.forget(fd) {
            sys::close(fd);
            return Some(Ok(()));
        }
        // An epoll descriptor's registrations go with it.
        self.epolls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fd);
        None
    }

    /// After the caller duplicated outsourced `old` into `new` (`dup`,
    /// `dup2`, `dup3`, `F_DUPFD`): `new` names the same socket.
    pub fn duplicated(&self, old: Fd, new: Fd) {
        if old == new {
            return;
        }
        match self.get(old) {
            Some(socket) => self.install(new, socket),
            None => {
                self.forget(new);
            }
        }
    }

    /// Which of `ours` (a socket and the poll events asked for) are ready,
    /// as poll revents, waiting until `timeout` ns (`None`: no limit) in
    /// bounded parks; `local()` reports how many guest-local descriptors
    /// are ready now (it is called once per slice). Returns the local count
    /// and the revents of `ours`.
    fn wait_ready(
        &self,
        ours: &[(Arc<Socket>, i16)],
        has_local: bool,
        local: &mut dyn FnMut() -> Result<usize, Errno>,
        timeout: Option<u64>,
    ) -> Result<(usize, Vec<i16>), Errno> {
        let readable = libc::POLLIN | libc::POLLRDNORM | libc::POLLPRI;
        let polled: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].1 & readable != 0)
            .collect();
        if polled.len() as u64 > POLL_MAX {
            return Err(libc::EINVAL);
        }
        let handles: Vec<u64> = polled.iter().map(|&i| ours[i].0.handle()).collect();
        let deadline = match timeout {
            Some(0) => 0,
            Some(ns) => self.host.now().saturating_add(ns),
            None => NO_DEADLINE,
        };
        // Local descriptors are checked after the first slice, then at
        // doubling intervals while nothing happens, up to the park bound:
        // an idle mixed set (socat's socket and pipe) parks as long as a
        // pure one soon.
        let mut mixed_slice = MIXED_SLICE_NS;
        loop {
            let mut revents: Vec<i16> = ours
                .iter()
                .map(|(s, events)| {
                    let out = libc::POLLOUT | libc::POLLWRNORM;
                    if events & out != 0 && s.writable() {
                        events & out
                    } else {
                        0
                    }
                })
                .collect();
            let local_ready = if has_local { local()? } else { 0 };
            let ready_now = local_ready > 0 || revents.iter().any(|&r| r != 0);
            let rt = self.host.on_rt_vcpu();
            let bound = if rt { RT_PARK_NS } else { PARK_NS };
            let slice = if has_local { mixed_slice } else { bound };
            mixed_slice = (mixed_slice * 2).min(bound.max(MIXED_SLICE_NS));
            let until = if ready_now || deadline == 0 {
                0
            } else {
                deadline.min(self.host.now().saturating_add(slice))
            };
            if !handles.is_empty() {
                match self.sockets.poll(&handles, until) {
                    Ok(ready) => {
                        for (bit, &i) in polled.iter().enumerate() {
                            if ready.mask & (1 << bit) != 0 {
                                revents[i] |= ours[i].1 & readable & !libc::POLLPRI;
                            }
                        }
                    }
                    Err(Error::Status(Status::TimedOut)) => {}
                    Err(e) => return Err(errno_of(Call::NetPoll, &e)),
                }
            } else if until > 0 {
                // Nothing to wait for in the host: wait for the clock.
                sys::sleep(until.saturating_sub(self.host.now()).min(slice));
            }
            if ready_now || revents.iter().any(|&r| r != 0) {
                return Ok((local_ready, revents));
            }
            if deadline == 0 || self.host.now() >= deadline {
                return Ok((0, revents));
            }
            if !rt {
                sys::yield_cpu();
            }
        }
    }

    /// `poll(2)` (`timeout` in ns, `None`: no limit): `None` when no
    /// descriptor of the set is outsourced (the caller's own poll serves
    /// it).
    pub fn poll(
        &self,
        fds: &mut [libc::pollfd],
        timeout: Option<u64>,
    ) -> Option<Result<usize, Errno>> {
        let ours: Vec<(usize, Arc<Socket>)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.get(p.fd).map(|s| (i, s)))
            .collect();
        if ours.is_empty() {
            return None;
        }
        let local_at: Vec<usize> = (0..fds.len())
            .filter(|&i| fds[i].fd >= 0 && !ours.iter().any(|(j, _)| *j == i))
            .collect();
        let mut local: Vec<libc::pollfd> = local_at
            .iter()
            .map(|&i| libc::pollfd {
                fd: fds[i].fd,
                events: fds[i].events,
                revents: 0,
            })
            .collect();
        let wanted: Vec<(Arc<Socket>, i16)> = ours
            .iter()
            .map(|(i, s)| (s.clone(), fds[*i].events))
            .collect();
        let result = self.wait_ready(
            &wanted,
            !local.is_empty(),
            &mut || sys::poll_now(&mut local),
            timeout,
        );
        let (_, revents) = match result {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        for p in fds.iter_mut() {
            p.revents = 0;
        }
        for (k, &i) in local_at.iter().enumerate() {
            fds[i].revents = local[k].revents;
        }
        for (k, (i, _)) in ours.iter().enumerate() {
            fds[*i].revents = revents[k];
        }
        Some(Ok(fds.iter().filter(|p| p.revents != 0).count()))
    }

    /// `select(2)` over `nfds` descriptors (`timeout` in ns): `None` when
    /// none of the sets' descriptors is outsourced.
    ///
    /// # Safety
    /// Each set is null or a valid `fd_set`.
    pub unsafe fn select(
        &self,
        nfds: i32,
        read: *mut libc::fd_set,
        write: *mut libc::fd_set,
        except: *mut libc::fd_set,
        timeout: Option<u64>,
    ) -> Option<Result<i32, Errno>> {
        if self.is_empty() || !(0..=libc::FD_SETSIZE as i32).contains(&nfds) {
            return None;
        }
        let sets = [
            (read, libc::POLLIN),
            (write, libc::POLLOUT),
            (except, libc::POLLPRI),
        ];
        let mut fds: Vec<libc::pollfd> = Vec::new();
        for fd in 0..nfds {
            let events = sets
                .iter()
                // SAFETY: the caller's sets are valid (or null, skipped).
                .filter(|(set, _)| !set.is_null() && unsafe { libc::FD_ISSET(fd, *set) })
                .fold(0, |e, (_, ev)| e | ev);
            if events != 0 {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
        }
        if let Err(e) = self.poll(&mut fds, timeout)? {
            return Some(Err(e));
        }
        if fds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
            return Some(Err(libc::EBADF));
        }
        for (set, _) in sets {
            if !set.is_null() {
                // SAFETY: a valid set (checked non-null).
                unsafe { libc::FD_ZERO(set) };
            }
        }
        let mut count = 0;
        for p in &fds {
            let hits = [
                (
                    read,
                    libc::POLLIN,
                    libc::POLLIN | libc::POLLHUP | libc::POLLERR,
                ),
                (write, libc::POLLOUT, libc::POLLOUT | libc::POLLERR),
                (except, libc::POLLPRI, libc::POLLPRI),
            ];
            for (set, asked, mask) in hits {
                if !set.is_null() && p.events & asked != 0 && p.revents & mask != 0 {
                    // SAFETY: a valid set (checked non-null), fd < nfds.
                    unsafe { libc::FD_SET(p.fd, set) };
                    count += 1;
                }
            }
        }
        Some(Ok(count))
    }

    /// `epoll_ctl(2)` for an outsourced `fd`: `None` when `fd` is not one
    /// (the caller's own epoll_ctl serves it).
    pub fn epoll_ctl(
        &self,
        epfd: Fd,
        op: i32,
        fd: Fd,
        event: Option<libc::epoll_event>,
    ) -> Option<Result<(), Errno>> {
        let socket = self.get(fd)?;
        if !sys::is_open(epfd) {
            return Some(Err(libc::EBADF));
        }
        if epfd == fd {
            return Some(Err(libc::EINVAL));
        }
        let mut epolls = self.epolls.lock().unwrap_or_else(|e| e.into_inner());
        let interests = epolls.entry(epfd).or_default();
        let at = interests.iter().position(|i| i.fd == fd);
        let result = match (op, at, event) {
            (libc::EPOLL_CTL_ADD, Some(_), _) => Err(libc::EEXIST),
            (libc::EPOLL_CTL_ADD, None, Some(ev)) => {
                interests.push(Interest {
                    fd,
                    socket,
                    events: ev.events,
                    data: ev.u64,
                });
                Ok(())
            }
            (libc::EPOLL_CTL_MOD, Some(at), Some(ev)) => {
                interests[at].events = ev.events;
                interests[at].data = ev.u64;
                Ok(())
            }
            (libc::EPOLL_CTL_DEL, Some(at), _) => {
                interests.remove(at);
                Ok(())
            }
            (libc::EPOLL_CTL_MOD | libc::EPOLL_CTL_DEL, None, _) => Err(libc::ENOENT),
            (libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD, _, None) => Err(libc::EFAULT),
            _ => Err(libc::EINVAL),
        };
        Some(result)
    }

    /// `epoll_wait(2)` (`timeout` in ns): `None` when `epfd` has no
    /// outsourced descriptor registered (the caller's own epoll_wait
    /// serves it). Level-triggered: `EPOLLET` is served as level-triggered
    /// (a program that reads until `EAGAIN` sees no difference);
    /// `EPOLLONESHOT` disarms the registration once it is reported.
    pub fn epoll_wait(
        &self,
        epfd: Fd,
        events: &mut [libc::epoll_event],
        timeout: Option<u64>,
    ) -> Option<Result<usize, Errno>> {
        let wanted: Vec<(Arc<Socket>, i16, Fd)> = {
            let epolls = self.epolls.lock().unwrap_or_else(|e| e.into_inner());
            let interests = epolls.get(&epfd).filter(|i| !i.is_empty())?;
            interests
                .iter()
                .map(|i| {
                    let mut ev = 0;
                    if i.events & libc::EPOLLIN as u32 != 0 {
                        ev |= libc::POLLIN;
                    }
                    if i.events & libc::EPOLLOUT as u32 != 0 {
                        ev |= libc::POLLOUT;
                    }
                    (i.socket.clone(), ev, i.fd)
                })
                .collect()
        };
        if events.is_empty() {
            return Some(Err(libc::EINVAL));
        }
        let ours: Vec<(Arc<Socket>, i16)> =
            wanted.iter().map(|(s, e, _)| (s.clone(), *e)).collect();
        let mut local_n = 0;
        let result = self.wait_ready(
            &ours,
            true,
            &mut || {
                local_n = sys::epoll_now(epfd, events)?;
                Ok(local_n)
            },
            timeout,
        );
        let (_, revents) = match result {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let mut n = local_n;
        let mut epolls = self.epolls.lock().unwrap_or_else(|e| e.into_inner());
        let interests = epolls.entry(epfd).or_default();
        for (k, (_, _, fd)) in wanted.iter().enumerate() {
            if revents[k] == 0 || n == events.len() {
                continue;
            }
            let Some(interest) = interests.iter_mut().find(|i| i.fd == *fd) else {
                continue;
            };
            let mut ev = 0u32;
            if revents[k] & libc::POLLIN != 0 {
                ev |= libc::EPOLLIN as u32;
            }
            if revents[k] & libc::POLLOUT != 0 {
                ev |= libc::EPOLLOUT as u32;
            }
            ev &= interest.events;
            if ev == 0 {
                continue;
            }
            events[n] = libc::epoll_event {
                events: ev,
                u64: interest.data,
            };
            n += 1;
            if interest.events & libc::EPOLLONESHOT as u32 != 0 {
                interest.events = 0;
            }
        }
        Some(Ok(n))
    }

    /// Forks through `fork` (the C library's): each outsourced socket gets
    /// a second host handle first, which the child takes, so either
    /// process's close leaves the other's socket open. Returns `fork`'s
    /// result; on its failure, the extra handles are closed again.
    pub fn fork_with(&self, fork: impl FnOnce() -> libc::pid_t) -> libc::pid_t {
        // Held across the fork: no other thread changes the table meanwhile
        // (and the child's copy of the lock is released by this guard's
        // copy).
        let fds = self.fds.write().unwrap_or_else(|e| e.into_inner());
        let mut distinct: Vec<Arc<Socket>> = Vec::new();
        for socket in fds.values() {
            if !distinct.iter().any(|s| Arc::ptr_eq(s, socket)) {
                distinct.push(socket.clone());
            }
        }
        // Owned by this process until the child adopts them: a child that
        // never does leaves nothing once this process ends.
        let me = self.sockets.owners_policy().process();
        let twins: Vec<Option<u64>> = distinct
            .iter()
            .map(|s| self.sockets.dup(s.handle(), me).ok())
            .collect();
        let pid = fork();
        match pid {
            0 => {
                let child = self.sockets.owners_policy().process();
                for (socket, twin) in distinct.iter().zip(&twins) {
                    let handle = match twin {
                        // Adopted: a handle the child owns, the twin gone.
                        Some(twin) => match self.sockets.dup(*twin, child) {
                            Ok(own) => {
                                let _ = self.sockets.close(*twin);
                                own
                            }
                            Err(_) => *twin,
                        },
                        // No second handle (the VM's socket limit): the
                        // child's socket answers EBADF rather than closing
                        // the parent's.
                        None => 0,
                    };
                    socket.handle.store(handle, Ordering::Release);
                }
            }
            _ if pid < 0 => {
                for twin in twins.into_iter().flatten() {
                    let _ = self.sockets.close(twin);
                }
            }
            _ => {}
        }
        drop(fds);
        pid
    }
}
