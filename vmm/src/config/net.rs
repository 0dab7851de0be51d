//! The network policy: what a VM may do on the host's network. Nothing by
//! default.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One rule of the policy: an address, a subnet or any, and a port range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrRule {
    /// The network and its prefix length (32 or 128 for one address);
    /// `None`: any address.
    pub net: Option<(IpAddr, u8)>,
    pub ports: RangeInclusive<u16>,
}

impl AddrRule {
    pub fn allows(&self, addr: &SocketAddr) -> bool {
        self.net
            .is_none_or(|(net, len)| in_subnet(addr.ip(), net, len))
            && self.ports.contains(&addr.port())
    }
}

/// Whether `ip` lies in `net/len` (same family only: IPv6 sockets are
/// IPv6-only, so an IPv4 rule never matches an IPv6 peer).
fn in_subnet(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let prefix = |bits: u128, width: u8| {
        let len = u32::from(len.min(width));
        if len == 0 {
            0
        } else {
            bits >> (u32::from(width) - len)
        }
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            prefix(u32::from(a).into(), 32) == prefix(u32::from(n).into(), 32)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => prefix(u128::from(a), 128) == prefix(u128::from(n), 128),
        _ => false,
    }
}

/// `IP:PORT`, `IP/LEN:PORT` (a subnet), `IP:LO-HI`, `IP:*`, `[IPv6]:PORT`,
/// `[IPv6/LEN]:PORT`, `*:PORT`.
impl FromStr for AddrRule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = || {
            format!(
                "'{s}' is not ADDRESS:PORT (e.g. 198.18.0.1:7000, 198.18.0.0/15:*, [::1]:7000-7010)"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(usage)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let net = if host == "*" {
            None
        } else {
            let (ip, len) = match host.split_once('/') {
                Some((ip, len)) => (ip, Some(len.parse::<u8>().map_err(|_| usage())?)),
                None => (host, None),
            };
            let ip = ip.parse::<IpAddr>().map_err(|_| usage())?;
            let width = if ip.is_ipv4() { 32 } else { 128 };
            let len = len.unwrap_or(width);
            if len > width {
                return Err(usage());
            }
            Some((ip, len))
        };
        let ports = match port {
            "*" => 0..=u16::MAX,
            p => match p.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (
                        lo.parse().map_err(|_| usage())?,
                        hi.parse().map_err(|_| usage())?,
                    );
                    if lo > hi {
                        return Err(usage());
                    }
                    lo..=hi
                }
                None => {
                    let p = p.parse().map_err(|_| usage())?;
                    p..=p
                }
            },
        };
        Ok(AddrRule { net, ports })
    }
}

impl<'de> Deserialize<'de> for AddrRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a VM may do on the host's network.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPolicy {
    /// Local addresses the guest may bind.
    #[serde(default)]
    pub bind: Vec<AddrRule>,
    /// Destinations the guest may connect or send to.
    #[serde(default)]
    pub connect: Vec<AddrRule>,
    /// Most sockets open at once.
    #[serde(default = "default_max_sockets")]
    pub max_sockets: usize,
    /// Most bytes each socket may buffer per direction (SO_SNDBUF/SO_RCVBUF).
    #[serde(default = "default_max_buffer", deserialize_with = "super::byte_size")]
    pub max_buffer: u64,
}

pub const DEFAULT_MAX_SOCKETS: usize = 64;
pub const DEFAULT_MAX_BUFFER: u64 = 256 << 10;

fn default_max_sockets() -> usize {
    DEFAULT_MAX_SOCKETS
}
fn default_max_buffer() -> u64 {
    DEFAULT_MAX_BUFFER
}

impl Default for NetPolicy {
    fn default() -> Self {
        NetPolicy {
            bind: Vec::new(),
            connect: Vec::new(),
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_buffer: DEFAULT_MAX_BUFFER,
        }
    }
}

impl NetPolicy {
    pub fn validate(&self) -> Result<()> {
        if self.max_sockets == 0 || self.max_sockets > 32_767 {
            return Err(Error::Config(format!(
                "net max_sockets = {}: must be 1..=32767",
                self.max_sockets
            )));
        }
        if !(4096..=64 << 20).contains(&self.max_buffer) {
            return Err(Error::Config(format!(
                "net max_buffer = {}: must be 4K..=64M",
                self.max_buffer
            )));
        }
        Ok(())
    }
}
