//! Outsourced sockets from Linux user space: the VMRPC socket calls
//! (`Call::NetSocket` .. `Call::NetClose`, see `rtvm_abi::vmrpc` for the
//! contract) through a call slot of the region, whose data pages carry the
//! bytes (a process's own buffers are virtual addresses the host cannot
//! read). Each call takes a slot for its duration, any thread, pinned or
//! not: a receive that waits keeps its slot until it returns.
//!
//! Errors are the host's statuses, as [`Error::Status`]; what an unmodified
//! program sees instead (errno) is the preload library's business.

use rtvm_abi::linux::SLOT_DATA_SIZE;
use rtvm_abi::vmrpc::{
    Call, Request, Status, ARGS, CALL_PAGE_SIZE, REQUEST_SIZE, RESULTS, STATUS_OFFSET,
};

pub use rtvm_abi::addr::{Addr, Ready};
pub use rtvm_abi::vmrpc::net::{opt, recv, INET, INET6, NO_DEADLINE, POLL_MAX, TCP, UDP};

use crate::slots::{self, LinuxThreads, Owners, SlotTransport};
use crate::{decode_answer, Error, UNANSWERED};

/// Most bytes one send or receive carries: a slot's data pages.
pub const MAX_IO: usize = SLOT_DATA_SIZE as usize;

/// Where a call's answer bytes go: the buffer, and how many the results say
/// there are.
type Output<'a> = (&'a mut [u8], fn(&[u64; RESULTS]) -> u64);

/// A socket client over a slot transport.
pub struct Sockets<T: SlotTransport, O: Owners = LinuxThreads> {
    transport: T,
    owners: O,
}

/// A slot held for one call, given back on drop (also on a panic).
struct Held<'a, T: SlotTransport, O: Owners> {
    sockets: &'a Sockets<T, O>,
    slot: usize,
}

impl<T: SlotTransport, O: Owners> Drop for Held<'_, T, O> {
    fn drop(&mut self) {
        slots::give_back(
            self.sockets.transport.slot_table(),
            self.slot,
            &self.sockets.owners,
        );
    }
}

impl<T: SlotTransport> Sockets<T, LinuxThreads> {
    pub fn new(transport: T) -> Self {
        Sockets::with_owners(transport, LinuxThreads)
    }
}

impl<T: SlotTransport, O: Owners> Sockets<T, O> {
    pub fn with_owners(transport: T, owners: O) -> Self {
        Sockets { transport, owners }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn hold(&self) -> Result<Held<'_, T, O>, Error> {
        let slot =
            slots::take(self.transport.slot_table(), &self.owners).ok_or(Error::NoFreeSlot)?;
        Ok(Held {
            sockets: self,
            slot,
        })
    }

    /// One call through a slot: `input` copied to the slot's data first,
    /// `args` built from the data's guest-physical address, and `output`
    /// filled from the data after the answer (up to `output_len(results)`
    /// bytes, at most its length).
    fn call(
        &self,
        call: Call,
        input: &[u8],
        args: impl FnOnce(u64) -> [u64; ARGS],
        output: Option<Output<'_>>,
    ) -> Result<[u64; RESULTS], Error> {
        if input.len() > MAX_IO || output.as_ref().is_some_and(|(o, _)| o.len() > MAX_IO) {
            return Err(Error::TooLong);
        }
        let held = self.hold()?;
        if !input.is_empty() {
            self.transport.write_data(held.slot, input);
        }
        let mut request = [0u8; REQUEST_SIZE];
        Request {
            call,
            flags: 0,
            args: args(self.transport.data_address(held.slot)),
        }
        .encode(&mut request);
        let mut page = [0u8; CALL_PAGE_SIZE];
        page[..REQUEST_SIZE].copy_from_slice(&request);
        page[STATUS_OFFSET..STATUS_OFFSET + 4].copy_from_slice(&UNANSWERED.to_le_bytes());
        self.transport.ring_slot(held.slot, &mut page)?;
        let results = decode_answer(&page)?;
        if let Some((out, len)) = output {
            let n = (len(&results) as usize).min(out.len());
            self.transport.read_data(held.slot, &mut out[..n]);
        }
        Ok(results)
    }

    fn simple(&self, call: Call, args: [u64; ARGS]) -> Result<[u64; RESULTS], Error> {
        self.call(call, &[], |_| args, None)
    }

    /// A new socket: `domain` [`INET`] or [`INET6`], `kind` [`UDP`] or [`TCP`].
    /// Owned by the calling process (see [`Sockets::reap_ended`]).
    pub fn socket(&self, domain: u64, kind: u64) -> Result<u64, Error> {
        let owner = self.owners.process();
        Ok(self.simple(Call::NetSocket, [domain, kind, owner, 0, 0, 0])?[0])
    }

    pub fn bind(&self, handle: u64, addr: &Addr) -> Result<(), Error> {
        let [a, b, c] = addr.words();
        self.simple(Call::NetBind, [handle, a, b, c, 0, 0])
            .map(drop)
    }

    pub fn listen(&self, handle: u64, backlog: u64) -> Result<(), Error> {
        self.simple(Call::NetListen, [handle, backlog, 0, 0, 0, 0])
            .map(drop)
    }

    /// Waits until `deadline` (host ns, [`NO_DEADLINE`]: none) for a
    /// connection: its handle and the peer.
    pub fn accept(&self, handle: u64, deadline: u64) -> Result<(u64, Addr), Error> {
        let owner = self.owners.process();
        let r = self.simple(Call::NetAccept, [handle, deadline, owner, 0, 0, 0])?;
        Ok((r[0], Addr::from_words([r[1], r[2], r[3]])))
    }

    pub fn connect(&self, handle: u64, addr: &Addr, deadline: u64) -> Result<(), Error> {
        let [a, b, c] = addr.words();
        self.simple(Call::NetConnect, [handle, a, b, c, deadline, 0])
            .map(drop)
    }

    /// Sends up to [`MAX_IO`] bytes of `data` (to `to`, or the connected
    /// peer); the bytes sent.
    pub fn send(&self, handle: u64, data: &[u8], to: Option<&Addr>) -> Result<usize, Error> {
        let data = &data[..data.len().min(MAX_IO)];
        let [a, b, c] = to.unwrap_or(&Addr::NONE).words();
        let len = data.len() as u64;
        let r = self.call(Call::NetSend, data, |at| [handle, at, len, a, b, c], None)?;
        Ok(r[0] as usize)
    }

    /// Receives into `buf` (up to [`MAX_IO`] bytes), waiting until
    /// `deadline`: the bytes received (0 for TCP: the peer closed) and the
    /// sender.
    pub fn recv(&self, handle: u64, buf: &mut [u8], deadline: u64) -> Result<(usize, Addr), Error> {
        self.recv_flags(handle, buf, deadline, false)
    }

    /// [`Sockets::recv`], leaving what it receives queued when `peek`
    /// (MSG_PEEK).
    pub fn recv_flags(
        &self,
        handle: u64,
        buf: &mut [u8],
        deadline: u64,
        peek: bool,
    ) -> Result<(usize, Addr), Error> {
        let len = buf.len().min(MAX_IO);
        let buf = &mut buf[..len];
        let flags = if peek { recv::PEEK } else { 0 };
        let r = self.call(
            Call::NetRecv,
            &[],
            |at| [handle, at, len as u64, deadline, flags, 0],
            Some((buf, |r| r[0])),
        )?;
        Ok((r[0] as usize, Addr::from_words([r[1], r[2], r[3]])))
    }

    /// Waits until `deadline` for any of `handles` (at most [`POLL_MAX`])
    /// to be readable.
    pub fn poll(&self, handles: &[u64], deadline: u64) -> Result<Ready, Error> {
        if handles.len() as u64 > POLL_MAX {
            return Err(Error::TooLong);
        }
        let bytes: Vec<u8> = handles.iter().flat_map(|h| h.to_le_bytes()).collect();
        let n = handles.len() as u64;
        let r = self.call(Call::NetPoll, &bytes, |at| [at, n, deadline, 0, 0, 0], None)?;
        Ok(Ready {
            mask: r[0],
            count: r[1],
        })
    }

    pub fn setsockopt(&self, handle: u64, option: u64, value: u64) -> Result<(), Error> {
        self.simple(Call::NetSetsockopt, [handle, option, value, 0, 0, 0])
            .map(drop)
    }

    /// Shuts down reading (`how` 0), writing (1) or both (2).
    pub fn shutdown(&self, handle: u64, how: u64) -> Result<(), Error> {
        self.simple(Call::NetShutdown, [handle, how, 0, 0, 0, 0])
            .map(drop)
    }

    /// The socket's own address (getsockname).
    pub fn local_address(&self, handle: u64) -> Result<Addr, Error> {
        let r = self.simple(Call::NetAddress, [handle, 0, 0, 0, 0, 0])?;
        Ok(Addr::from_words([r[0], r[1], r[2]]))
    }

    /// The connected peer's address (getpeername).
    pub fn peer_address(&self, handle: u64) -> Result<Addr, Error> {
        let r = self.simple(Call::NetAddress, [handle, 1, 0, 0, 0, 0])?;
        Ok(Addr::from_words([r[0], r[1], r[2]]))
    }

    /// Option `option` ([`opt`]) of the socket.
    pub fn getsockopt(&self, handle: u64, option: u64) -> Result<u64, Error> {
        Ok(self.simple(Call::NetGetsockopt, [handle, option, 0, 0, 0, 0])?[0])
    }

    /// A second handle to the same socket, owned by process `owner` (for
    /// a process that forks): the socket stays open until both are closed.
    pub fn dup(&self, handle: u64, owner: u64) -> Result<u64, Error> {
        Ok(self.simple(Call::NetDup, [handle, owner, 0, 0, 0, 0])?[0])
    }

    /// Closes every socket process `owner` holds; how many.
    pub fn reap(&self, owner: u64) -> Result<u64, Error> {
        Ok(self.simple(Call::NetReap, [owner, 0, 0, 0, 0, 0])?[0])
    }

    /// The processes that own open sockets.
    pub fn owners(&self) -> Result<Vec<u64>, Error> {
        let mut bytes = vec![0u8; MAX_IO];
        let max = (MAX_IO / 8) as u64;
        let r = self.call(
            Call::NetOwners,
            &[],
            |at| [at, max, 0, 0, 0, 0],
            Some((&mut bytes, |r| r[0] * 8)),
        )?;
        Ok(bytes[..r[0] as usize * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Closes the sockets of processes that ended without closing them
    /// (killed, or exited: the kernel closes a process's descriptors, not
    /// the host's handles); how many. Any process may do it for all.
    pub fn reap_ended(&self) -> Result<u64, Error> {
        let mut closed = 0;
        for owner in self.owners()? {
            if !self.owners.alive(owner) {
                closed += self.reap(owner)?;
            }
        }
        Ok(closed)
    }

    /// The process-owner policy in force (tests substitute their own).
    pub fn owners_policy(&self) -> &O {
        &self.owners
    }

    pub fn close(&self, handle: u64) -> Result<(), Error> {
        self.simple(Call::NetClose, [handle, 0, 0, 0, 0, 0])
            .map(drop)
    }
}

/// The errno an unmodified program expects where the host answered a
/// socket call `call` with `status` (what the preload library sets).
///
/// A bind the VM's policy refuses is `EACCES`, as for a port a process may
/// not bind; a connect or send it refuses is `EPERM`, as when a firewall
/// drops the packet. A wait that reached its deadline is `EAGAIN`: the
/// caller set that deadline (a non-blocking socket, `SO_RCVTIMEO`).
pub fn errno(call: Call, status: Status) -> i32 {
    match status {
        Status::NotPermitted if call == Call::NetBind => libc::EACCES,
        Status::NotPermitted => libc::EPERM,
        Status::BadHandle => libc::EBADF,
        Status::BadAddress => libc::EFAULT,
        Status::TimedOut => libc::EAGAIN,
        Status::Interrupted => libc::EINTR,
        Status::BadArgument | Status::BadFlags => libc::EINVAL,
        Status::NotConfigured => libc::ENOTCONN,
        Status::NoResources if call == Call::NetSocket || call == Call::NetAccept => libc::EMFILE,
        Status::NoResources => libc::ENOBUFS,
        Status::ConnectionRefused => libc::ECONNREFUSED,
        Status::ConnectionReset if call == Call::NetSend => libc::EPIPE,
        Status::ConnectionReset => libc::ECONNRESET,
        Status::AddressInUse => libc::EADDRINUSE,
        Status::TooLarge => libc::EMSGSIZE,
        Status::UnsupportedCall | Status::BadAbiVersion => libc::ENOSYS,
        _ => libc::EIO,
    }
}

/// The address a C `sockaddr` of `len` bytes at `sa` holds, if it is an
/// IPv4 or IPv6 one of a sufficient length.
///
/// # Safety
/// `sa` is null or points to at least `len` readable bytes.
pub unsafe fn addr_from_sockaddr(sa: *const libc::sockaddr, len: libc::socklen_t) -> Option<Addr> {
    if sa.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    match i32::from(unsafe { std::ptr::read_unaligned(sa.cast::<libc::sa_family_t>()) }) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: long enough for a sockaddr_in (checked).
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(Addr::v4(
                sin.sin_addr.s_addr.to_ne_bytes(),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: long enough for a sockaddr_in6 (checked).
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(Addr::v6(
                sin6.sin6_addr.s6_addr,
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// `addr` as a C socket address, and its length (0: a family this
/// library does not know).
pub fn addr_to_sockaddr(addr: &Addr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr.family {
        INET => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(addr.octets4()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in fits in a sockaddr_storage.
            unsafe {
                std::ptr::write_unaligned((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        INET6 => {
            // SAFETY: plain data; all zeroes is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = addr.port.to_be();
            sin6.sin6_addr.s6_addr = addr.bytes;
            // SAFETY: a sockaddr_in6 fits in a sockaddr_storage.
            unsafe {
                std::ptr::write_unaligned(
                    (&mut storage as *mut libc::sockaddr_storage).cast(),
                    sin6,
                )
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        _ => 0,
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_socket_addresses_round_trip() {
        for text in [
            "127.0.0.1:7",
            "10.1.2.3:65535",
            "[::1]:9",
            "[2001:db8::1]:80",
        ] {
            let addr = Addr::parse(text).unwrap();
            let (storage, len) = addr_to_sockaddr(&addr);
            let sa = (&storage as *const libc::sockaddr_storage).cast();
            // SAFETY: `storage` holds `len` bytes.
            assert_eq!(unsafe { addr_from_sockaddr(sa, len) }, Some(addr), "{text}");
            // One byte short is no address.
            // SAFETY: as above, fewer bytes.
            assert_eq!(unsafe { addr_from_sockaddr(sa, len - 1) }, None, "{text}");
        }
        // The C layout itself: port and address in network order.
        let (storage, _) = addr_to_sockaddr(&Addr::parse("1.2.3.4:258").unwrap());
        // SAFETY: a sockaddr_in was written there.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin.sin_port.to_ne_bytes(), [1, 2]);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(addr_to_sockaddr(&Addr::NONE).1, 0);
        // SAFETY: null is refused before any read.
        assert_eq!(unsafe { addr_from_sockaddr(std::ptr::null(), 16) }, None);
    }

    #[test]
    fn statuses_become_the_errno_a_program_expects() {
        assert_eq!(errno(Call::NetBind, Status::NotPermitted), libc::EACCES);
        assert_eq!(errno(Call::NetConnect, Status::NotPermitted), libc::EPERM);
        assert_eq!(errno(Call::NetSend, Status::NotPermitted), libc::EPERM);
        assert_eq!(errno(Call::NetRecv, Status::TimedOut), libc::EAGAIN);
        assert_eq!(errno(Call::NetSocket, Status::NoResources), libc::EMFILE);
        assert_eq!(errno(Call::NetSend, Status::ConnectionReset), libc::EPIPE);
        assert_eq!(
            errno(Call::NetRecv, Status::ConnectionReset),
            libc::ECONNRESET
        );
        assert_eq!(errno(Call::NetClose, Status::BadHandle), libc::EBADF);
        assert_eq!(
            errno(Call::NetConnect, Status::ConnectionRefused),
            libc::ECONNREFUSED
        );
        assert_eq!(errno(Call::NetBind, Status::AddressInUse), libc::EADDRINUSE);
        assert_eq!(
            errno(Call::NetAddress, Status::NotConfigured),
            libc::ENOTCONN
        );
        assert_eq!(errno(Call::NetSend, Status::TooLarge), libc::EMSGSIZE);
        assert_eq!(errno(Call::NetSend, Status::IoError), libc::EIO);
    }
}
