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
use core::fmt;
use rtvm_abi::vmrpc::{net, Call, Status};

pub use rtvm_abi::vmrpc::net::{opt, HANDLE_TAG, INET, INET6, NO_DEADLINE, POLL_MAX, TCP, UDP};

/// The chunk [`Rpc::send_all`] tries first; halved whenever the host
/// answers `TooLarge` (its per-socket buffer cap), and remembered.
pub const FIRST_CHUNK: usize = 1 << 20;

/// A socket address: family ([`INET`], [`INET6`], or whatever the host
/// answered), port, and the 16 address bytes in network order (an IPv4
/// address in the last 4, as in the argument words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    pub family: u64,
    pub port: u16,
    pub bytes: [u8; 16],
}

impl Addr {
    /// No address: family 0, the words of "no destination" in `NetSend`.
    pub const NONE: Addr = Addr {
        family: 0,
        port: 0,
        bytes: [0; 16],
    };

    pub const fn v4(octets: [u8; 4], port: u16) -> Addr {
        Addr::from_words(net::v4(octets, port))
    }

    pub const fn v6(octets: [u8; 16], port: u16) -> Addr {
        Addr::from_words(net::v6(octets, port))
    }

    /// The address the three words `port | family << 16`, high and low
    /// half of the address bytes (big-endian) describe. Any family is kept
    /// as it is, so what the host answers can be printed and compared.
    pub const fn from_words(words: [u64; 3]) -> Addr {
        let hi = words[1].to_be_bytes();
        let lo = words[2].to_be_bytes();
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < 8 {
            bytes[i] = hi[i];
            bytes[i + 8] = lo[i];
            i += 1;
        }
        Addr {
            family: words[0] >> 16,
            port: words[0] as u16,
            bytes,
        }
    }

    /// The three argument words.
    pub const fn words(&self) -> [u64; 3] {
        let b = &self.bytes;
        let hi = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let lo = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        [self.port as u64 | self.family << 16, hi, lo]
    }

    /// The IPv4 address bytes (the last 4).
    pub fn octets4(&self) -> [u8; 4] {
        let [.., a, b, c, d] = self.bytes;
        [a, b, c, d]
    }

    /// The same host and family (the port may differ).
    pub fn same_host(&self, other: &Addr) -> bool {
        self.family == other.family && self.bytes == other.bytes
    }

    /// Parses `a.b.c.d:port` or `[v6]:port` (`::` compression and a
    /// trailing dotted IPv4 part allowed, e.g. `[::1]:7`, `[::]:7`,
    /// `[::ffff:10.0.0.1]:7`).
    pub fn parse(text: &str) -> Option<Addr> {
        if let Some(rest) = text.strip_prefix('[') {
            let (host, port) = rest.split_once("]:")?;
            Some(Addr::v6(parse_v6(host)?, parse_port(port)?))
        } else {
            let (host, port) = text.rsplit_once(':')?;
            Some(Addr::v4(parse_v4(host)?, parse_port(port)?))
        }
    }
}

fn all_digits(text: &str, radix: u32) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_digit(radix))
}

fn parse_port(text: &str) -> Option<u16> {
    all_digits(text, 10).then(|| text.parse().ok()).flatten()
}

fn parse_v4(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut out {
        let part = parts.next()?;
        if !all_digits(part, 10) || part.len() > 3 {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses colon-separated hex groups (the last may be a dotted IPv4
/// address, two groups) into `out`; returns how many. Empty text: none.
fn parse_groups(text: &str, out: &mut [u16; 8]) -> Option<usize> {
    if text.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    let mut pieces = text.split(':').peekable();
    while let Some(piece) = pieces.next() {
        if pieces.peek().is_none() && piece.contains('.') {
            let [a, b, c, d] = parse_v4(piece)?;
            if n + 2 > out.len() {
                return None;
            }
            out[n] = u16::from_be_bytes([a, b]);
            out[n + 1] = u16::from_be_bytes([c, d]);
            return Some(n + 2);
        }
        if n == out.len() || !all_digits(piece, 16) || piece.len() > 4 {
            return None;
        }
        out[n] = u16::from_str_radix(piece, 16).ok()?;
        n += 1;
    }
    Some(n)
}

fn parse_v6(text: &str) -> Option<[u8; 16]> {
    let mut groups = [0u16; 8];
    match text.split_once("::") {
        None => {
            if parse_groups(text, &mut groups)? != 8 {
                return None;
            }
        }
        Some((head, tail)) => {
            let mut tail_groups = [0u16; 8];
            let n_head = parse_groups(head, &mut groups)?;
            let n_tail = parse_groups(tail, &mut tail_groups)?;
            // `::` stands for at least one zero group.
            if n_head + n_tail > 7 {
                return None;
            }
            groups[8 - n_tail..].copy_from_slice(&tail_groups[..n_tail]);
        }
    }
    let mut bytes = [0u8; 16];
    for (pair, group) in bytes.chunks_exact_mut(2).zip(groups) {
        pair.copy_from_slice(&group.to_be_bytes());
    }
    Some(bytes)
}

/// Writes IPv6 groups in the RFC 5952 form: lower-case hex, the longest
/// run of two or more zero groups (the first of equal ones) as `::`, and
/// an IPv4-mapped address as `::ffff:a.b.c.d`.
fn write_v6(f: &mut fmt::Formatter, bytes: &[u8; 16]) -> fmt::Result {
    if let [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] = *bytes {
        return write!(f, "::ffff:{a}.{b}.{c}.{d}");
    }
    let mut groups = [0u16; 8];
    for (group, pair) in groups.iter_mut().zip(bytes.chunks_exact(2)) {
        *group = u16::from_be_bytes([pair[0], pair[1]]);
    }
    let (mut best_at, mut best_len) = (0, 0);
    let mut i = 0;
    while i < 8 {
        let start = i;
        while i < 8 && groups[i] == 0 {
            i += 1;
        }
        if i - start > best_len {
            (best_at, best_len) = (start, i - start);
        }
        i += 1;
    }
    let write_run = |f: &mut fmt::Formatter, run: &[u16]| -> fmt::Result {
        for (k, g) in run.iter().enumerate() {
            if k > 0 {
                f.write_str(":")?;
            }
            write!(f, "{g:x}")?;
        }
        Ok(())
    };
    if best_len >= 2 {
        write_run(f, &groups[..best_at])?;
        f.write_str("::")?;
        write_run(f, &groups[best_at + best_len..])
    } else {
        write_run(f, &groups)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.family {
            INET => {
                let [a, b, c, d] = self.octets4();
                write!(f, "{a}.{b}.{c}.{d}:{}", self.port)
            }
            INET6 => {
                f.write_str("[")?;
                write_v6(f, &self.bytes)?;
                write!(f, "]:{}", self.port)
            }
            0 => f.write_str("<none>"),
            other => write!(f, "<family {other}>:{}", self.port),
        }
    }
}

/// The answer to one `NetPoll`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// Bit i set: entry i of the handle list is readable.
    pub mask: u64,
    /// How many entries are.
    pub count: u64,
}

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
