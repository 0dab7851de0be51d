//! A socket address as the VMRPC socket calls carry it, and the answer to
//! a `NetPoll`: written once for every guest (the built-in guest's socket
//! library and the Linux guests' client) and the host's tests.

use core::fmt;

use crate::vmrpc::net::{self, INET, INET6};

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

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    /// `Display` into a fixed buffer (the crate is `no_std`).
    fn shown(addr: &Addr) -> ([u8; 64], usize) {
        struct Buf([u8; 64], usize);
        impl Write for Buf {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let end = self.1 + s.len();
                self.0
                    .get_mut(self.1..end)
                    .ok_or(fmt::Error)?
                    .copy_from_slice(s.as_bytes());
                self.1 = end;
                Ok(())
            }
        }
        let mut buf = Buf([0; 64], 0);
        write!(buf, "{addr}").unwrap();
        (buf.0, buf.1)
    }

    fn round_trips(text: &str, shown_as: &str) {
        let addr = Addr::parse(text).unwrap_or_else(|| panic!("{text} does not parse"));
        let (buf, len) = shown(&addr);
        assert_eq!(core::str::from_utf8(&buf[..len]).unwrap(), shown_as);
        assert_eq!(Addr::from_words(addr.words()), addr);
    }

    #[test]
    fn addresses_parse_and_print_in_their_usual_forms() {
        round_trips("127.0.0.1:7", "127.0.0.1:7");
        round_trips("[::1]:7", "[::1]:7");
        round_trips("[::]:65535", "[::]:65535");
        round_trips("[2001:db8:0:0:1:0:0:1]:80", "[2001:db8::1:0:0:1]:80");
        round_trips("[::ffff:10.0.0.1]:9", "[::ffff:10.0.0.1]:9");
        assert_eq!(Addr::parse("10.0.0.1:7").unwrap().octets4(), [10, 0, 0, 1]);
        assert_eq!(
            Addr::v4([10, 0, 0, 1], 7).words(),
            net::v4([10, 0, 0, 1], 7)
        );
        for bad in [
            "",
            "1.2.3:4",
            "1.2.3.4",
            "1.2.3.256:1",
            "1.2.3.4:65536",
            "[::1]",
            "[1::2::3]:4",
            "[:::]:1",
            "1.2.3.4:-1",
        ] {
            assert_eq!(Addr::parse(bad), None, "{bad}");
        }
        assert!(Addr::v4([1, 2, 3, 4], 1).same_host(&Addr::v4([1, 2, 3, 4], 2)));
        assert!(!Addr::v4([1, 2, 3, 4], 1).same_host(&Addr::v6([0; 16], 1)));
    }
}
