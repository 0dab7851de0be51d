//! The guest's socket library: the VMRPC socket calls (`Call::NetSocket` ..
//! `Call::NetClose`) on host sockets owned by the VM, as methods on [`Rpc`]
//! (see `rtvm_abi::vmrpc` for the contract), and [`Addr`], a socket address
//! that converts to and from the three argument words the calls take.
//!
//! As in `fs`, buffers are passed by address (guest RAM is identity mapped),
//! never through the call page's payload. Waits take an absolute host
//! deadline (host `CLOCK_MONOTONIC` ns, as [`Rpc::now`] reads it;
//! [`NO_DEADLINE`]: none, see [`Rpc::deadline_after_ms`]) and park only the
//! calling vCPU. Everything the host refuses comes back as the status it
//! answered; for malformed arguments (addresses outside RAM, unknown
//! families) call [`Rpc::call`] directly with the raw words.
//!
//! The socket close is [`Rpc::close_socket`]: `Rpc::close` is the file call.

use crate::vmrpc::{Error, Rpc};
use rtvm_abi::vmrpc::{Call, Status};

pub use rtvm_abi::addr::{Addr, Ready};
pub use rtvm_abi::vmrpc::net::{opt, HANDLE_TAG, INET, INET6, NO_DEADLINE, POLL_MAX, TCP, UDP};

/// The chunk [`Rpc::send_all`] tries first; halved whenever the host
/// answers `TooLarge` (its per-socket buffer cap), and remembered.
pub const FIRST_CHUNK: usize = 1 << 20;

impl Rpc {
    /// The deadline `ms` milliseconds from now; [`NO_DEADLINE`] for 0.
    pub fn deadline_after_ms(&mut self, ms: u64) -> u64 {
        if ms == 0 {
            return NO_DEADLINE;
        }
        self.now().saturating_add(ms.saturating_mul(1_000_000))
    }

    /// A new socket: `domain` [`INET`] or [`INET6`], `kind` [`UDP`] or
    /// [`TCP`]. Returns its handle.
    pub fn socket(&mut self, domain: u64, kind: u64) -> Result<u64, Error> {
        Ok(self.call(Call::NetSocket, 0, [domain, kind, 0, 0, 0, 0])?[0])
    }

    /// Binds the socket to `addr` (port 0: any port).
    pub fn bind(&mut self, handle: u64, addr: Addr) -> Result<(), Error> {
        let [a0, a1, a2] = addr.words();
        self.call(Call::NetBind, 0, [handle, a0, a1, a2, 0, 0])
            .map(drop)
    }

    /// Makes a bound TCP socket listen, with `backlog` (≤ 1024) pending
    /// connections.
    pub fn listen(&mut self, handle: u64, backlog: u64) -> Result<(), Error> {
        self.call(Call::NetListen, 0, [handle, backlog, 0, 0, 0, 0])
            .map(drop)
    }

    /// Waits until `deadline` for a connection on a listening socket.
    /// Returns the new connection's handle and the peer's address.
    pub fn accept(&mut self, handle: u64, deadline: u64) -> Result<(u64, Addr), Error> {
        let [h, a0, a1, a2] = self.call(Call::NetAccept, 0, [handle, deadline, 0, 0, 0, 0])?;
        Ok((h, Addr::from_words([a0, a1, a2])))
    }

    /// Connects the socket to `addr`: a TCP socket waits until `deadline`
    /// for the handshake; a UDP socket only sets its default destination.
    pub fn connect(&mut self, handle: u64, addr: Addr, deadline: u64) -> Result<(), Error> {
        let [a0, a1, a2] = addr.words();
        self.call(Call::NetConnect, 0, [handle, a0, a1, a2, deadline, 0])
            .map(drop)
    }

    /// One `NetSend` of `data`, to `to` (`None`: the connected peer).
    /// Returns the bytes sent: for TCP possibly fewer than `data.len()`
    /// (see [`Rpc::send_all`]), for UDP the whole datagram.
    pub fn send(&mut self, handle: u64, data: &[u8], to: Option<Addr>) -> Result<usize, Error> {
        let [a0, a1, a2] = to.unwrap_or(Addr::NONE).words();
        let args = [handle, data.as_ptr() as u64, data.len() as u64, a0, a1, a2];
        Ok(self.call(Call::NetSend, 0, args)?[0] as usize)
    }

    /// Sends all of `data` on a connected (TCP) socket, in as many
    /// `NetSend` calls as partial sends and the host's buffer cap need.
    /// A send that found no buffer space for [`net::SEND_WAIT_NS`]
    /// (`TimedOut`) is tried again until host time `deadline`
    /// ([`NO_DEADLINE`]: for ever); after it, `TimedOut` ends it. A send
    /// that moves no byte ends it with `IoError`.
    pub fn send_all(&mut self, handle: u64, data: &[u8], deadline: u64) -> Result<(), Error> {
        if self.net_chunk == 0 {
            self.net_chunk = FIRST_CHUNK;
        }
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(self.net_chunk);
            match self.send(handle, &data[done..done + n], None) {
                Ok(0) => return Err(Status::IoError.into()),
                Ok(sent) => done += sent.min(n),
                Err(e) if e == Error::from(Status::TooLarge) && n > 1 => {
                    self.net_chunk = n / 2;
                }
                Err(e) if e == Error::from(Status::TimedOut) && self.now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until `deadline` for data and receives up to `buf.len()`
    /// bytes. Returns the bytes (for TCP, 0: the peer closed) and the
    /// sender's address.
    pub fn recv(
        &mut self,
        handle: u64,
        buf: &mut [u8],
        deadline: u64,
    ) -> Result<(usize, Addr), Error> {
        let args = [
            handle,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
            deadline,
            0,
            0,
        ];
        let [n, a0, a1, a2] = self.call(Call::NetRecv, 0, args)?;
        Ok((n as usize, Addr::from_words([a0, a1, a2])))
    }

    /// Receives until `buf` is full (for TCP), waiting until `deadline`
    /// each time. Returns the bytes received: fewer than `buf.len()` only
    /// if the peer closed.
    pub fn recv_full(
        &mut self,
        handle: u64,
        buf: &mut [u8],
        deadline: u64,
    ) -> Result<usize, Error> {
        let mut done = 0;
        while done < buf.len() {
            match self.recv(handle, &mut buf[done..], deadline)?.0 {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// Waits until `deadline` for any of `handles` (at most [`POLL_MAX`])
    /// to be readable.
    pub fn poll(&mut self, handles: &[u64], deadline: u64) -> Result<Ready, Error> {
        let args = [
            handles.as_ptr() as u64,
            handles.len() as u64,
            deadline,
            0,
            0,
            0,
        ];
        let [mask, count, _, _] = self.call(Call::NetPoll, 0, args)?;
        Ok(Ready { mask, count })
    }

    /// Sets option `option` ([`opt`]) of the socket to `value`.
    pub fn setsockopt(&mut self, handle: u64, option: u64, value: u64) -> Result<(), Error> {
        self.call(Call::NetSetsockopt, 0, [handle, option, value, 0, 0, 0])
            .map(drop)
    }

    /// Closes the socket (`NetClose`; `Rpc::close` closes files).
    pub fn close_socket(&mut self, handle: u64) -> Result<(), Error> {
        self.call(Call::NetClose, 0, [handle, 0, 0, 0, 0, 0])
            .map(drop)
    }
}
