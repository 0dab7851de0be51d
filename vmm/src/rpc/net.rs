//! Outsourced sockets: the guest's network I/O served by host sockets the VM
//! owns, so a real-time task waits for a packet with no guest interrupt:
//! `NetRecv`, `NetAccept` and `NetPoll` are long polls that park only the
//! calling vCPU's thread on the socket (ppoll, beside its timer and wake
//! eventfd) until data, the deadline, or the VMM's stop.
//!
//! The guest is untrusted and the host's network is not its own: the policy
//! says which local addresses it may bind and which destinations it may
//! connect or send to — nothing by default — plus how many sockets it may
//! hold and how much each may buffer. A refusal is a `NotPermitted` status
//! and a log line; the VMM stays up.
//!
//! Sockets are non-blocking: a would-block answer turns into a wait on the
//! socket's readiness, never into a blocked thread that a stop could not cut
//! short. Handles are tagged ([`net::HANDLE_TAG`]) and carry a generation, so
//! a file handle, a closed socket or another VM's number is `BadHandle`.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use rtvm_abi::vmrpc::{net, Call, Request, Status};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::context::CallContext;
use super::handles::HandleTable;
use super::park::{Park, Parked};
use super::VmService;
use crate::clock::now_ns;
use crate::config::{AddrRule, NetPolicy};
use crate::error::Result;

/// Most bytes one send or receive may move.
pub const MAX_TRANSFER: u64 = 1 << 20;

/// Decodes the three address words of the ABI.
pub fn decode_addr(words: [u64; 3]) -> std::result::Result<SocketAddr, Status> {
    if words[0] >> 32 != 0 {
        return Err(Status::BadArgument);
    }
    let port = words[0] as u16;
    match (words[0] >> 16) & 0xffff {
        net::INET if words[1] == 0 && words[2] >> 32 == 0 => Ok(SocketAddr::new(
            Ipv4Addr::from(words[2] as u32).into(),
            port,
        )),
        net::INET6 => {
            let ip = (u128::from(words[1]) << 64) | u128::from(words[2]);
            Ok(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
        }
        _ => Err(Status::BadArgument),
    }
}

/// Encodes an address as the ABI's three words.
pub fn encode_addr(addr: &SocketAddr) -> [u64; 3] {
    match addr {
        SocketAddr::V4(a) => net::v4(a.ip().octets(), a.port()),
        SocketAddr::V6(a) => net::v6(a.ip().octets(), a.port()),
    }
}

fn status_of(e: &io::Error) -> Status {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Status::ConnectionRefused,
        Some(libc::ECONNRESET | libc::EPIPE) => Status::ConnectionReset,
        Some(libc::EADDRINUSE) => Status::AddressInUse,
        Some(libc::EACCES | libc::EPERM) => Status::NotPermitted,
        Some(libc::EMSGSIZE) => Status::TooLarge,
        Some(
            libc::EINVAL
            | libc::EADDRNOTAVAIL
            | libc::EAFNOSUPPORT
            | libc::EOPNOTSUPP
            | libc::EISCONN,
        ) => Status::BadArgument,
        Some(libc::ENOTCONN | libc::EDESTADDRREQ) => Status::NotConfigured,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Status::NoResources,
        Some(libc::ETIMEDOUT) => Status::TimedOut,
        _ => Status::IoError,
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS)
    )
}

/// A host socket the guest holds.
struct GuestSocket {
    socket: Socket,
    /// The guest bound it (explicitly, to an address the policy allows),
    /// or it came from `accept`. A UDP socket the guest never bound gets
    /// an ephemeral port on every interface at its first send, so it only
    /// hears from peers the `connect` rules allow (see `recv`).
    bound: std::sync::atomic::AtomicBool,
    /// How many handles name it (`NetDup`): the last one's close shuts it.
    handles: std::sync::atomic::AtomicUsize,
}

impl std::ops::Deref for GuestSocket {
    type Target = Socket;

    fn deref(&self) -> &Socket {
        &self.socket
    }
}

/// What one receive got: the bytes and the sender's address words.
pub type Received = (Vec<u8>, [u64; 3]);

/// A guest socket kept open while the I/O poller works on it (a handle
/// closed meanwhile leaves it open until dropped).
#[derive(Clone)]
pub struct HeldSocket(Arc<GuestSocket>);

impl HeldSocket {
    /// Its host descriptor, for polling while held.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Bytes queued for receiving on `socket` (FIONREAD).
fn readable_bytes(socket: &Socket) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on our own socket writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// The socket service of one VM.
pub struct NetService {
    policy: NetPolicy,
    sockets: HandleTable<GuestSocket>,
    /// Who owns each handle that has an owner (a guest process id), so a
    /// guest can close what a process that ended left open.
    owners: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    /// The guest's I/O rings (served by the VM's I/O poller, if it has one).
    rings: super::ring::Rings,
    /// Whether an I/O poller serves rings: without, `NetRingSetup` is
    /// `NotConfigured` and the guest uses the calls.
    rings_served: std::sync::atomic::AtomicBool,
}

impl NetService {
    pub fn new(policy: NetPolicy) -> Result<Self> {
        policy.validate()?;
        Ok(NetService {
            sockets: HandleTable::new(net::HANDLE_TAG, policy.max_sockets, Status::NoResources),
            owners: Default::default(),
            rings: super::ring::Rings::new()?,
            rings_served: Default::default(),
            policy,
        })
    }

    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    /// The guest's I/O rings.
    pub fn rings(&self) -> &super::ring::Rings {
        &self.rings
    }

    /// Says an I/O poller serves the rings (before the guest runs).
    pub fn serve_rings(&self) {
        self.rings_served
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Sockets the VM holds open.
    pub fn open_sockets(&self) -> usize {
        self.sockets.len()
    }

    fn socket(&self, handle: u64) -> std::result::Result<Arc<GuestSocket>, Status> {
        self.sockets.get(handle)
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `handle`'s owner (0: none); returns the handle.
    fn owned(&self, handle: u64, owner: u64) -> u64 {
        if owner != 0 {
            self.owners().insert(handle, owner);
        }
        handle
    }

    /// Registers a socket under a new handle, within the socket limit.
    fn register(&self, socket: Socket, bound: bool) -> std::result::Result<u64, Status> {
        let slot = self.sockets.reserve()?;
        let cap = self.policy.max_buffer as usize;
        for (get, set) in [
            (
                Socket::recv_buffer_size as fn(&Socket) -> io::Result<usize>,
                Socket::set_recv_buffer_size as fn(&Socket, usize) -> io::Result<()>,
            ),
            (Socket::send_buffer_size, Socket::set_send_buffer_size),
        ] {
            // Always set, even to the default: a size that was set stays
            // put (SOCK_*BUF_LOCK), while an unset one is grown by TCP's
            // autotuning far past the cap. The kernel reports twice what
            // was set.
            let size = get(&socket).map_or(cap, |size| (size / 2).min(cap));
            set(&socket, size).map_err(|e| status_of(&e))?;
        }
        Ok(slot.fill(GuestSocket {
            socket,
            bound: bound.into(),
            handles: 1.into(),
        }))
    }

    fn permitted(
        &self,
        rules: &[AddrRule],
        addr: &SocketAddr,
        what: &str,
    ) -> std::result::Result<(), Status> {
        if rules.iter().any(|r| r.allows(addr)) {
            Ok(())
        } else {
            // The refusal itself is warned about, rationed, where the call is answered.
            tracing::debug!("guest {what} {addr} refused by the network policy");
            Err(Status::NotPermitted)
        }
    }

    /// `NetSocket`.
    pub fn open(
        &self,
        domain: u64,
        kind: u64,
        owner: u64,
    ) -> std::result::Result<[u64; 4], Status> {
        let domain = match domain {
            net::INET => Domain::IPV4,
            net::INET6 => Domain::IPV6,
            _ => return Err(Status::BadArgument),
        };
        let (ty, proto) = match kind {
            net::UDP => (Type::DGRAM, Protocol::UDP),
            net::TCP => (Type::STREAM, Protocol::TCP),
            _ => return Err(Status::BadArgument),
        };
        let socket = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))
            .map_err(|e| status_of(&e))?;
        if domain == Domain::IPV6 {
            // An IPv6 socket must not reach IPv4 through mapped addresses
            // the policy's IPv4 rules never saw.
            socket.set_only_v6(true).map_err(|e| status_of(&e))?;
        }
        Ok([self.owned(self.register(socket, false)?, owner), 0, 0, 0])
    }

    /// `NetBind`.
    pub fn bind(&self, handle: u64, addr: [u64; 3]) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let addr = decode_addr(addr)?;
        self.permitted(&self.policy.bind, &addr, "bind to")?;
        socket
            .bind(&SockAddr::from(addr))
            .map_err(|e| status_of(&e))?;
        socket
            .bound
            .store(true, std::sync::atomic::Ordering::Release);
        Ok([0; 4])
    }

    /// `NetListen`.
    pub fn listen(&self, handle: u64, backlog: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        if backlog == 0 || backlog > 1024 {
            return Err(Status::BadArgument);
        }
        // Listening on an unbound socket would have the kernel bind it to
        // every interface behind the policy's back: a listener needs an
        // explicit, permitted bind. (A client socket that sends or connects
        // unbound gets an ephemeral port like any client; the policy governs
        // where its packets may go.)
        let bound = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() != 0);
        if !bound {
            tracing::debug!("guest listen on an unbound socket refused");
            return Err(Status::NotPermitted);
        }
        socket.listen(backlog as i32).map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// Runs `op` on the socket of `handle` until it does not say "would
    /// block", parking on `events` in between. Each pass looks the handle
    /// up again, so a socket another vCPU closed (and thereby woke) answers
    /// `BadHandle`, and a pass at or past the deadline answers `TimedOut`
    /// instead of trying again: a socket that polls ready while its
    /// operation would still block cannot keep the vCPU spinning.
    fn retry<T>(
        &self,
        handle: u64,
        events: i16,
        deadline: u64,
        park: &mut dyn Park,
        mut op: impl FnMut(&GuestSocket) -> io::Result<T>,
    ) -> std::result::Result<T, Status> {
        loop {
            let socket = self.socket(handle)?;
            match op(&socket) {
                Ok(done) => return Ok(done),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(status_of(&e)),
            }
            if now_ns() >= deadline {
                return Err(Status::TimedOut);
            }
            Self::wait(&socket, events, deadline, park)?;
        }
    }

    /// Waits until `socket` is ready for `events` or the deadline passes.
    fn wait(
        socket: &Socket,
        events: i16,
        deadline: u64,
        park: &mut dyn Park,
    ) -> std::result::Result<(), Status> {
        let mut fd = [libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        }];
        match park.park(&mut fd, deadline)? {
            Parked::Ready => Ok(()),
            Parked::Deadline => Err(Status::TimedOut),
        }
    }

    /// `NetAccept`.
    pub fn accept(
        &self,
        handle: u64,
        deadline: u64,
        owner: u64,
        park: &mut dyn Park,
    ) -> std::result::Result<[u64; 4], Status> {
        let (conn, peer) = self.retry(handle, libc::POLLIN, deadline, park, |s| s.accept())?;
        conn.set_nonblocking(true).map_err(|e| status_of(&e))?;
        let peer = peer
            .as_socket()
            .map(|a| encode_addr(&a))
            .unwrap_or_default();
        let conn = self.owned(self.register(conn, true)?, owner);
        Ok([conn, peer[0], peer[1], peer[2]])
    }

    /// `NetConnect`.
    pub fn connect(
        &self,
        handle: u64,
        addr: [u64; 3],
        deadline: u64,
        park: &mut dyn Park,
    ) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let addr = decode_addr(addr)?;
        self.permitted(&self.policy.connect, &addr, "connection to")?;
        match socket.connect(&SockAddr::from(addr)) {
            Ok(()) => return Ok([0; 4]),
            // EALREADY: an earlier call's connect is still under way (that
            // call's deadline came first), so this one waits for it too.
            Err(e) if would_block(&e) || e.raw_os_error() == Some(libc::EALREADY) => {}
            // Connected meanwhile, by an earlier call's connect.
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) && socket.peer_addr().is_ok() => {
                return Ok([0; 4])
            }
            Err(e) => return Err(status_of(&e)),
        }
        Self::wait(&socket, libc::POLLOUT, deadline, park)?;
        match socket.take_error() {
            Ok(None) => Ok([0; 4]),
            Ok(Some(e)) | Err(e) => Err(status_of(&e)),
        }
    }

    /// Where a send goes: `None` for the connected peer (family 0), else a
    /// destination the policy allows.
    fn destination(&self, to: [u64; 3]) -> std::result::Result<Option<SockAddr>, Status> {
        if (to[0] >> 16) & 0xffff == 0 {
            return Ok(None);
        }
        let addr = decode_addr(to)?;
        self.permitted(&self.policy.connect, &addr, "datagram to")?;
        Ok(Some(SockAddr::from(addr)))
    }

    /// One send attempt; `WouldBlock` when the socket's buffer is full.
    fn send_once(socket: &Socket, data: &[u8], dest: Option<&SockAddr>) -> io::Result<usize> {
        // MSG_NOSIGNAL: a peer's reset must not raise SIGPIPE in the VMM.
        match dest {
            Some(dest) => socket.send_to_with_flags(data, dest, libc::MSG_NOSIGNAL),
            None => socket.send_with_flags(data, libc::MSG_NOSIGNAL),
        }
    }

    /// One receive attempt into `buf`: the bytes and the sender, what the
    /// policy lets an unbound socket hear (the rest is dropped).
    fn recv_once(
        &self,
        socket: &GuestSocket,
        buf: &mut [MaybeUninit<u8>],
        peek: bool,
    ) -> io::Result<(usize, Option<SocketAddr>)> {
        loop {
            let (n, from) = if peek {
                socket.peek_from(buf)?
            } else {
                socket.recv_from(buf)?
            };
            let from = from
                .as_socket()
                .or_else(|| socket.peer_addr().ok().and_then(|a| a.as_socket()));
            // An unbound socket's implicit port is open on every interface:
            // what comes from a peer the guest may not talk to is dropped.
            let unbound = !socket.bound.load(std::sync::atomic::Ordering::Acquire);
            if unbound && !from.is_some_and(|a| self.policy.connect.iter().any(|r| r.allows(&a))) {
                tracing::debug!("a datagram from {from:?} to an unbound socket dropped");
                if peek {
                    // Taken off the queue, or the next peek finds it again.
                    socket.recv_from(buf)?;
                }
                continue;
            }
            return Ok((n, from));
        }
    }

    /// `NetSend` (to the connected peer when `to` has family 0).
    pub fn send(
        &self,
        handle: u64,
        data: &[u8],
        to: [u64; 3],
        park: &mut dyn Park,
    ) -> std::result::Result<[u64; 4], Status> {
        self.socket(handle)?;
        let dest = self.destination(to)?;
        let deadline = now_ns().saturating_add(net::SEND_WAIT_NS);
        let sent = self.retry(handle, libc::POLLOUT, deadline, park, |socket| {
            Self::send_once(socket, data, dest.as_ref())
        })?;
        Ok([sent as u64, 0, 0, 0])
    }

    /// `NetRecv` into a host buffer of `len` bytes with `flags`
    /// ([`net::recv`]); returns the bytes and the results.
    pub fn recv(
        &self,
        handle: u64,
        len: u64,
        deadline: u64,
        flags: u64,
        park: &mut dyn Park,
    ) -> std::result::Result<(Vec<u8>, [u64; 4]), Status> {
        self.socket(handle)?;
        if len > MAX_TRANSFER {
            return Err(Status::TooLarge);
        }
        if flags & !net::recv::ALL != 0 {
            return Err(Status::BadFlags);
        }
        let peek = flags & net::recv::PEEK != 0;
        let mut buf: Vec<MaybeUninit<u8>> = vec![MaybeUninit::uninit(); len as usize];
        let (n, from) = self.retry(handle, libc::POLLIN, deadline, park, |socket| {
            self.recv_once(socket, &mut buf, peek)
        })?;
        // SAFETY: recv_from initialised the first n bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let [a, b, c] = from.map(|a| encode_addr(&a)).unwrap_or_default();
        Ok((data, [n as u64, a, b, c]))
    }

    /// A socket the I/O poller holds while it works on it.
    pub fn held(&self, handle: u64) -> std::result::Result<HeldSocket, Status> {
        self.socket(handle).map(HeldSocket)
    }

    /// One send without waiting (the I/O poller's): `Ok(None)` when the
    /// socket's buffer is full.
    pub fn try_send(
        &self,
        socket: &HeldSocket,
        data: &[u8],
        to: [u64; 3],
    ) -> std::result::Result<Option<usize>, Status> {
        let dest = self.destination(to)?;
        match Self::send_once(&socket.0, data, dest.as_ref()) {
            Ok(n) => Ok(Some(n)),
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(status_of(&e)),
        }
    }

    /// One receive of up to `len` bytes without waiting (the I/O
    /// poller's): the bytes and the sender's address words, `Ok(None)`
    /// when nothing is queued.
    pub fn try_recv(
        &self,
        socket: &HeldSocket,
        len: u64,
    ) -> std::result::Result<Option<Received>, Status> {
        if len > MAX_TRANSFER {
            return Err(Status::TooLarge);
        }
        let mut buf: Vec<MaybeUninit<u8>> = vec![MaybeUninit::uninit(); len as usize];
        match self.recv_once(&socket.0, &mut buf, false) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first n bytes.
                let data = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                Ok(Some((
                    data,
                    from.map(|a| encode_addr(&a)).unwrap_or_default(),
                )))
            }
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(status_of(&e)),
        }
    }

    /// `NetPoll` over `handles` (already read from the guest).
    pub fn poll(
        &self,
        handles: &[u64],
        deadline: u64,
        park: &mut dyn Park,
    ) -> std::result::Result<[u64; 4], Status> {
        if handles.is_empty() || handles.len() as u64 > net::POLL_MAX {
            return Err(Status::BadArgument);
        }
        let sockets = handles
            .iter()
            .map(|&h| self.socket(h))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut fds: Vec<libc::pollfd> = sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        match park.park(&mut fds, deadline)? {
            Parked::Ready => {
                let mask = fds
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.revents != 0)
                    .fold(0u64, |m, (i, _)| m | 1 << i);
                Ok([mask, u64::from(mask.count_ones()), 0, 0])
            }
            Parked::Deadline => Err(Status::TimedOut),
        }
    }

    /// `NetSetsockopt`.
    pub fn setsockopt(
        &self,
        handle: u64,
        opt: u64,
        value: u64,
    ) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let flag = |v: u64| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Status::BadArgument),
        };
        let cap = self.policy.max_buffer.min(value) as usize;
        let result = match opt {
            net::opt::REUSEADDR => socket.set_reuse_address(flag(value)?),
            net::opt::RCVBUF => socket.set_recv_buffer_size(cap),
            net::opt::SNDBUF => socket.set_send_buffer_size(cap),
            net::opt::NODELAY => socket.set_tcp_nodelay(flag(value)?),
            net::opt::PRIORITY if value <= 6 => socket.set_priority(value as u32),
            net::opt::TOS if value <= 255 => match socket.domain().map_err(|e| status_of(&e))? {
                Domain::IPV6 => socket.set_tclass_v6(value as u32),
                _ => socket.set_tos_v4(value as u32),
            },
            _ => return Err(Status::BadArgument),
        };
        result.map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// `NetShutdown`.
    pub fn shutdown(&self, handle: u64, how: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let how = match how {
            0 => std::net::Shutdown::Read,
            1 => std::net::Shutdown::Write,
            2 => std::net::Shutdown::Both,
            _ => return Err(Status::BadArgument),
        };
        socket.shutdown(how).map_err(|e| status_of(&e))?;
        Ok([0; 4])
    }

    /// `NetAddress`.
    pub fn address(&self, handle: u64, which: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let addr = match which {
            0 => socket.local_addr(),
            1 => socket.peer_addr(),
            _ => return Err(Status::BadArgument),
        }
        .map_err(|e| status_of(&e))?;
        let addr = addr.as_socket().ok_or(Status::BadArgument)?;
        let [a, b, c] = encode_addr(&addr);
        Ok([a, b, c, 0])
    }

    /// `NetGetsockopt`.
    pub fn getsockopt(&self, handle: u64, opt: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let value = match opt {
            net::opt::REUSEADDR => socket.reuse_address().map(u64::from),
            net::opt::RCVBUF => socket.recv_buffer_size().map(|n| n as u64),
            net::opt::SNDBUF => socket.send_buffer_size().map(|n| n as u64),
            net::opt::NODELAY => socket.tcp_nodelay().map(u64::from),
            net::opt::PRIORITY => socket.priority().map(u64::from),
            net::opt::TOS => match socket.domain().map_err(|e| status_of(&e))? {
                Domain::IPV6 => socket.tclass_v6().map(u64::from),
                _ => socket.tos_v4().map(u64::from),
            },
            net::opt::ERROR => socket
                .take_error()
                .map(|e| e.map_or(0, |e| status_of(&e) as u64)),
            net::opt::READABLE => readable_bytes(&socket),
            _ => return Err(Status::BadArgument),
        };
        Ok([value.map_err(|e| status_of(&e))?, 0, 0, 0])
    }

    /// `NetDup`: another handle to the same socket, within the limit.
    pub fn dup(&self, handle: u64, owner: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.socket(handle)?;
        let slot = self.sockets.reserve()?;
        socket
            .handles
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok([self.owned(slot.fill_shared(socket), owner), 0, 0, 0])
    }

    /// `NetReap`: closes every handle `owner` holds.
    pub fn reap(&self, owner: u64) -> std::result::Result<[u64; 4], Status> {
        if owner == 0 {
            return Err(Status::BadArgument);
        }
        let handles: Vec<u64> = self
            .owners()
            .iter()
            .filter(|(_, o)| **o == owner)
            .map(|(h, _)| *h)
            .collect();
        // A handle its owner closed meanwhile is just not counted.
        let closed = handles.iter().filter(|&&h| self.close(h).is_ok()).count();
        if closed > 0 {
            tracing::debug!("closed {closed} sockets guest process {owner} left open");
        }
        Ok([closed as u64, 0, 0, 0])
    }

    /// `NetOwners`: the distinct owners of open handles, sorted.
    pub fn owner_list(&self) -> Vec<u64> {
        let mut owners: Vec<u64> = self.owners().values().copied().collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// `NetClose`. Closing the last handle to a socket wakes a vCPU still
    /// waiting on it (shutdown) rather than keeping an uncounted socket
    /// alive until data comes; with other handles left, it stays open.
    pub fn close(&self, handle: u64) -> std::result::Result<[u64; 4], Status> {
        let socket = self.sockets.remove(handle)?;
        self.owners().remove(&handle);
        if socket
            .handles
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            // ENOTCONN for a socket that never connected is fine.
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        Ok([0; 4])
    }
}

impl VmService for NetService {
    fn serve(
        &self,
        req: &Request,
        cx: &mut CallContext<'_>,
    ) -> std::result::Result<[u64; 4], Status> {
        let a = req.args;
        match req.call {
            Call::NetSocket => self.open(a[0], a[1], a[2]),
            Call::NetBind => self.bind(a[0], [a[1], a[2], a[3]]),
            Call::NetListen => self.listen(a[0], a[1]),
            Call::NetAccept => self.accept(a[0], a[1], a[2], cx.park),
            Call::NetConnect => self.connect(a[0], [a[1], a[2], a[3]], a[4], cx.park),
            Call::NetSend => {
                if a[2] > MAX_TRANSFER {
                    return Err(Status::TooLarge);
                }
                let data = cx.read(a[1], a[2])?;
                self.send(a[0], &data, [a[3], a[4], a[5]], cx.park)
            }
            Call::NetRecv => {
                cx.check_buffer(a[1], a[2])?;
                let (data, results) = self.recv(a[0], a[2], a[3], a[4], cx.park)?;
                cx.write(a[1], &data)?;
                Ok(results)
            }
            Call::NetPoll => {
                if a[1] == 0 || a[1] > net::POLL_MAX {
                    return Err(Status::BadArgument);
                }
                let handles = cx.read_words(a[0], a[1])?;
                self.poll(&handles, a[2], cx.park)
            }
            Call::NetSetsockopt => self.setsockopt(a[0], a[1], a[2]),
            Call::NetClose => self.close(a[0]),
            Call::NetShutdown => self.shutdown(a[0], a[1]),
            Call::NetAddress => self.address(a[0], a[1]),
            Call::NetGetsockopt => self.getsockopt(a[0], a[1]),
            Call::NetDup => self.dup(a[0], a[1]),
            Call::NetReap => self.reap(a[0]),
            Call::NetRingSetup | Call::NetRingKick | Call::NetRingWait
                if !self.rings_served.load(std::sync::atomic::Ordering::Acquire) =>
            {
                Err(Status::NotConfigured)
            }
            Call::NetRingSetup => self.rings.setup(cx.ram(), a[0], a[1], a[2]),
            Call::NetRingKick => self.rings.kick(a[0]),
            Call::NetRingWait => self.rings.wait(self, cx.ram(), a[0], a[1], cx.park),
            Call::NetOwners => {
                // At most one owner per open handle is written, whatever
                // room the guest claims.
                let owners = self.owner_list();
                let n = owners.len().min(a[1] as usize);
                let bytes: Vec<u8> = owners[..n].iter().flat_map(|o| o.to_le_bytes()).collect();
                cx.write(a[0], &bytes)?;
                Ok([n as u64, owners.len() as u64, 0, 0])
            }
            _ => Err(Status::UnsupportedCall),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rpc::park::{Unattended as Now, NO_DEADLINE};

    fn loopback_policy() -> NetPolicy {
        NetPolicy {
            bind: vec!["127.0.0.1:*".parse().unwrap()],
            connect: vec!["127.0.0.1:*".parse().unwrap()],
            ..NetPolicy::default()
        }
    }

    /// Issue #12: a rule may name a subnet (the README's example does).
    #[test]
    fn rules_name_subnets() {
        let r: AddrRule = "198.18.0.0/15:*".parse().unwrap();
        assert!(r.allows(&"198.18.0.2:9".parse().unwrap()));
        assert!(r.allows(&"198.19.255.255:9".parse().unwrap()));
        assert!(!r.allows(&"198.20.0.1:9".parse().unwrap()));
        assert!(
            !r.allows(&"[::ffff:198.18.0.2]:9".parse().unwrap()),
            "families apart"
        );
        let v6: AddrRule = "[2001:db8::/32]:53".parse().unwrap();
        assert!(v6.allows(&"[2001:db8:1::7]:53".parse().unwrap()));
        assert!(!v6.allows(&"[2001:db9::7]:53".parse().unwrap()));
        let all: AddrRule = "0.0.0.0/0:80".parse().unwrap();
        assert!(all.allows(&"203.0.113.9:80".parse().unwrap()));
        let one: AddrRule = "198.18.0.1:7".parse().unwrap();
        assert!(
            !one.allows(&"198.18.0.2:7".parse().unwrap()),
            "no prefix: one address"
        );
        for bad in ["198.18.0.0/33:1", "[::1/129]:1", "1.2.3.4/x:1"] {
            assert!(bad.parse::<AddrRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_parse_and_match() {
        let r: AddrRule = "198.18.0.1:7000-7010".parse().unwrap();
        assert!(r.allows(&"198.18.0.1:7005".parse().unwrap()));
        assert!(!r.allows(&"198.18.0.1:7011".parse().unwrap()));
        assert!(!r.allows(&"198.18.0.2:7005".parse().unwrap()));
        let any: AddrRule = "*:53".parse().unwrap();
        assert!(any.allows(&"[::1]:53".parse().unwrap()));
        let v6: AddrRule = "[::1]:*".parse().unwrap();
        assert!(v6.allows(&"[::1]:1".parse().unwrap()));
        for bad in [
            "1.2.3.4",
            "1.2.3.4:x",
            "1.2.3.4:9-1",
            "host:1",
            "[::1]:70000",
        ] {
            assert!(bad.parse::<AddrRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_round_trip_through_the_abi_words() {
        for addr in ["198.18.0.1:7000", "[::1]:443", "[2001:db8::42]:1"] {
            let a: SocketAddr = addr.parse().unwrap();
            assert_eq!(decode_addr(encode_addr(&a)), Ok(a));
        }
        assert_eq!(decode_addr([7 << 16, 0, 0]), Err(Status::BadArgument));
        assert_eq!(decode_addr([1 << 40, 0, 0]), Err(Status::BadArgument));
        assert_eq!(
            decode_addr([net::INET << 16, 0, 1 << 33]),
            Err(Status::BadArgument)
        );
    }

    #[test]
    fn nothing_is_permitted_by_default() {
        let svc = NetService::new(NetPolicy::default()).unwrap();
        let h = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        assert_eq!(
            svc.bind(h, net::v4([127, 0, 0, 1], 0)),
            Err(Status::NotPermitted)
        );
        assert_eq!(
            svc.send(h, b"x", net::v4([127, 0, 0, 1], 9), &mut Now),
            Err(Status::NotPermitted)
        );
        assert_eq!(
            svc.connect(h, net::v4([127, 0, 0, 1], 9), 0, &mut Now),
            Err(Status::NotPermitted)
        );
    }

    #[test]
    fn udp_round_trip_and_handle_checks() {
        let svc = NetService::new(loopback_policy()).unwrap();
        let a = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        let b = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.bind(a, net::v4([127, 0, 0, 1], 47_311)).unwrap();
        svc.bind(b, net::v4([127, 0, 0, 1], 47_312)).unwrap();
        svc.send(b, b"ping", net::v4([127, 0, 0, 1], 47_311), &mut Now)
            .unwrap();
        let deadline = now_ns() + 1_000_000_000;
        let (data, r) = svc.recv(a, 100, deadline, 0, &mut Now).unwrap();
        assert_eq!(data, b"ping");
        assert_eq!(
            decode_addr([r[1], r[2], r[3]]),
            Ok("127.0.0.1:47312".parse().unwrap())
        );
        assert_eq!(
            svc.recv(a, 100, now_ns() + 1_000_000, 0, &mut Now),
            Err(Status::TimedOut)
        );
        svc.close(a).unwrap();
        assert_eq!(svc.close(a), Err(Status::BadHandle));
        assert_eq!(
            svc.recv(1, 10, 0, 0, &mut Now),
            Err(Status::BadHandle),
            "untagged (file-range) handle"
        );
        assert_eq!(svc.setsockopt(b, 99, 0), Err(Status::BadArgument));
        assert_eq!(
            svc.setsockopt(b, net::opt::PRIORITY, 7),
            Err(Status::BadArgument)
        );
        svc.setsockopt(b, net::opt::TOS, 0xb8).unwrap();
    }

    /// Issue #12: a receive parked on a socket another vCPU closes ends
    /// with `BadHandle` (the close shuts the socket down, which wakes it)
    /// instead of spinning on a readable socket that has nothing to read.
    #[test]
    fn a_peek_leaves_the_datagram_queued_and_unknown_flags_are_refused() {
        let svc = NetService::new(loopback_policy()).unwrap();
        let a = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        let b = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.bind(a, net::v4([127, 0, 0, 1], 47_321)).unwrap();
        svc.bind(b, net::v4([127, 0, 0, 1], 47_322)).unwrap();
        svc.send(b, b"once", net::v4([127, 0, 0, 1], 47_321), &mut Now)
            .unwrap();
        let deadline = now_ns() + 1_000_000_000;
        let (data, r) = svc.recv(a, 1, deadline, net::recv::PEEK, &mut Now).unwrap();
        assert_eq!((data.as_slice(), r[0]), (&b"o"[..], 1));
        assert_eq!(
            decode_addr([r[1], r[2], r[3]]),
            Ok("127.0.0.1:47322".parse().unwrap())
        );
        let (data, _) = svc.recv(a, 100, deadline, 0, &mut Now).unwrap();
        assert_eq!(data, b"once", "still queued after the peek");
        assert_eq!(
            svc.recv(a, 100, deadline, 2, &mut Now),
            Err(Status::BadFlags)
        );
    }

    #[test]
    fn a_duplicated_handle_keeps_the_socket_open_until_the_last_close() {
        let svc = NetService::new(loopback_policy()).unwrap();
        let a = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        let b = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.bind(a, net::v4([127, 0, 0, 1], 47_331)).unwrap();
        let second = svc.dup(a, 0).unwrap()[0];
        assert_ne!(second, a);
        assert_eq!(svc.open_sockets(), 3, "a handle counts against the limit");
        svc.close(a).unwrap();
        svc.send(b, b"still", net::v4([127, 0, 0, 1], 47_331), &mut Now)
            .unwrap();
        let deadline = now_ns() + 1_000_000_000;
        let (data, _) = svc.recv(second, 100, deadline, 0, &mut Now).unwrap();
        assert_eq!(data, b"still", "open through the other handle");
        svc.close(second).unwrap();
        assert_eq!(svc.dup(second, 0), Err(Status::BadHandle));
        assert_eq!(svc.open_sockets(), 1);
    }

    #[test]
    fn what_an_ended_process_left_open_is_reaped_and_nothing_else() {
        let svc = NetService::new(loopback_policy()).unwrap();
        let a = svc.open(net::INET, net::UDP, 41).unwrap()[0];
        let b = svc.open(net::INET, net::TCP, 41).unwrap()[0];
        let other = svc.open(net::INET, net::UDP, 42).unwrap()[0];
        let unowned = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        // A child's handle to a's socket, owned by the child.
        let child = svc.dup(a, 43).unwrap()[0];
        assert_eq!(svc.owner_list(), vec![41, 42, 43]);
        assert_eq!(svc.reap(41), Ok([2, 0, 0, 0]));
        assert_eq!(svc.close(b), Err(Status::BadHandle), "reaped");
        assert_eq!(svc.owner_list(), vec![42, 43]);
        // The child's handle still names the socket.
        svc.bind(child, net::v4([127, 0, 0, 1], 47_341)).unwrap();
        assert_eq!(svc.reap(41), Ok([0; 4]), "nothing left");
        assert_eq!(svc.reap(0), Err(Status::BadArgument));
        svc.close(other).unwrap();
        assert_eq!(svc.owner_list(), vec![43]);
        svc.close(unowned).unwrap();
        svc.reap(43).unwrap();
        assert_eq!(svc.open_sockets(), 0);
        assert!(svc.owner_list().is_empty());
    }

    #[test]
    fn a_receive_on_a_socket_another_vcpu_closes_answers_bad_handle() {
        let svc = Arc::new(NetService::new(loopback_policy()).unwrap());
        let h = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.bind(h, net::v4([127, 0, 0, 1], 47_314)).unwrap();
        let (done, result) = std::sync::mpsc::channel();
        let waiter = svc.clone();
        std::thread::spawn(move || {
            let _ = done.send(waiter.recv(h, 100, NO_DEADLINE, 0, &mut Now).map(|_| ()));
        });
        // The receive is parked (or about to be): the close reaches it either way.
        std::thread::sleep(std::time::Duration::from_millis(50));
        svc.close(h).unwrap();
        assert_eq!(
            result
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the receive never ended"),
            Err(Status::BadHandle)
        );
    }

    /// Issue #12: the buffer cap holds for a TCP connection that moves a
    /// lot of data, on both ends (TCP autotuning grew them to MiBs).
    #[test]
    fn socket_buffers_stay_within_the_cap_under_bulk_tcp() {
        let cap = 64 << 10;
        let svc = Arc::new(
            NetService::new(NetPolicy {
                max_buffer: cap,
                ..loopback_policy()
            })
            .unwrap(),
        );
        let listener = svc.open(net::INET, net::TCP, 0).unwrap()[0];
        svc.bind(listener, net::v4([127, 0, 0, 1], 47_315)).unwrap();
        svc.listen(listener, 1).unwrap();
        let client = svc.open(net::INET, net::TCP, 0).unwrap()[0];
        svc.connect(
            client,
            net::v4([127, 0, 0, 1], 47_315),
            NO_DEADLINE,
            &mut Now,
        )
        .unwrap();
        let server = svc.accept(listener, NO_DEADLINE, 0, &mut Now).unwrap()[0];
        let total = 16 << 20;
        let sender = svc.clone();
        let sent = std::thread::spawn(move || {
            let chunk = vec![7u8; 256 << 10];
            let mut sent = 0;
            while sent < total {
                sent += sender.send(client, &chunk, [0; 3], &mut Now).unwrap()[0] as usize;
            }
        });
        let mut received = 0;
        while received < total {
            let (data, _) = svc
                .recv(server, 256 << 10, NO_DEADLINE, 0, &mut Now)
                .unwrap();
            received += data.len();
        }
        sent.join().unwrap();
        for handle in [client, server] {
            let socket = svc.socket(handle).unwrap();
            for size in [socket.recv_buffer_size(), socket.send_buffer_size()] {
                let size = size.unwrap();
                assert!(size <= 2 * cap as usize, "{size} bytes");
            }
        }
    }

    /// Issue #12: a UDP socket the guest never bound gets an ephemeral port
    /// on every interface at its first send; it hears only from peers the
    /// connect rules allow, not from anyone who finds the port.
    #[test]
    fn an_unbound_udp_socket_hears_only_from_permitted_peers() {
        let svc = NetService::new(NetPolicy {
            bind: vec!["127.0.0.1:47317".parse().unwrap()],
            connect: vec!["127.0.0.1:*".parse().unwrap()],
            ..NetPolicy::default()
        })
        .unwrap();
        let server = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.bind(server, net::v4([127, 0, 0, 1], 47_317)).unwrap();
        let client = svc.open(net::INET, net::UDP, 0).unwrap()[0];
        svc.send(client, b"hello", net::v4([127, 0, 0, 1], 47_317), &mut Now)
            .unwrap();
        let deadline = now_ns() + 5_000_000_000;
        let (_, from) = svc.recv(server, 64, deadline, 0, &mut Now).unwrap();
        let client_addr = decode_addr([from[1], from[2], from[3]]).unwrap();
        // A stranger (another loopback address) writes to the client's
        // implicit port first...
        let stranger = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        stranger.send_to(b"spoof", client_addr).unwrap();
        // ...then the server answers.
        svc.send(server, b"answer", [from[1], from[2], from[3]], &mut Now)
            .unwrap();
        let (data, _) = svc.recv(client, 64, deadline, 0, &mut Now).unwrap();
        assert_eq!(data, b"answer");
        // The server, bound on purpose, hears from anyone (it answers only
        // where the connect rules allow).
        stranger
            .send_to(b"ask", "127.0.0.1:47317".parse::<SocketAddr>().unwrap())
            .unwrap();
        let (data, _) = svc.recv(server, 64, deadline, 0, &mut Now).unwrap();
        assert_eq!(data, b"ask");
    }

    #[test]
    fn listening_needs_an_explicit_bind() {
        let svc = NetService::new(loopback_policy()).unwrap();
        let h = svc.open(net::INET, net::TCP, 0).unwrap()[0];
        assert_eq!(svc.listen(h, 4), Err(Status::NotPermitted));
        svc.bind(h, net::v4([127, 0, 0, 1], 47_313)).unwrap();
        svc.listen(h, 4).unwrap();
    }

    #[test]
    fn the_socket_limit_holds() {
        let policy = NetPolicy {
            max_sockets: 3,
            ..NetPolicy::default()
        };
        let svc = NetService::new(policy).unwrap();
        for _ in 0..3 {
            svc.open(net::INET6, net::TCP, 0).unwrap();
        }
        assert_eq!(svc.open(net::INET, net::UDP, 0), Err(Status::NoResources));
        assert_eq!(svc.open_sockets(), 3);
    }
}
