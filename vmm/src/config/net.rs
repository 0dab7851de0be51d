//! The network policy: what a VM may do on the host's network. Nothing by
//! default.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::Deserialize;

use super::RtPolicy;
use crate::error::{Error, Result};

/// The VM's I/O poller, the host thread that serves the guest's I/O rings
/// (`rpc::ring`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IoPollerConfig {
    /// Serve rings at all; off, `NetRingSetup` answers `NotConfigured` (the
    /// guest uses the calls) and there is no poller thread.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// How long the poller keeps polling after its last work before it
    /// sleeps, in µs (at most [`MAX_SPIN_US`]).
    #[serde(default = "default_spin_us")]
    pub spin_us: u64,
    /// SCHED_FIFO priority and CPU of the poller (none: SCHED_OTHER, kept
    /// off the RT vCPUs' CPUs).
    #[serde(default)]
    pub rt: Option<RtPolicy>,
}

/// Longest polling window.
pub const MAX_SPIN_US: u64 = 10_000;

fn enabled() -> bool {
    true
}

fn default_spin_us() -> u64 {
    50
}

impl Default for IoPollerConfig {
    fn default() -> Self {
        IoPollerConfig {
            enabled: true,
            spin_us: default_spin_us(),
            rt: None,
        }
    }
}

impl IoPollerConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.spin_us > MAX_SPIN_US {
            return Err(format!(
                "I/O poller spin {} µs is above {MAX_SPIN_US} µs",
                self.spin_us
            ));
        }
        self.rt.as_ref().map_or(Ok(()), RtPolicy::validate)
    }

    /// The polling window.
    pub fn spin(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.spin_us)
    }
}

/// `off`, `on`, or `spin=US[,prio=P[,cpu=C]]` (any of them).
impl FromStr for IoPollerConfig {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "off" => {
                return Ok(IoPollerConfig {
                    enabled: false,
                    ..IoPollerConfig::default()
                })
            }
            "on" => return Ok(IoPollerConfig::default()),
            _ => {}
        }
        let usage = || format!("'{s}' is not off, on, or spin=US[,prio=P][,cpu=C]");
        let mut config = IoPollerConfig::default();
        let (mut priority, mut cpu) = (None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(usage)?;
            let v: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("'{part}': not a number"))?;
            match k.trim() {
                "spin" => config.spin_us = v,
                "prio" | "priority" => {
                    priority = Some(
                        u8::try_from(v)
                            .map_err(|_| format!("RT priority {v} is out of range 1..=99"))?,
                    )
                }
                "cpu" => cpu = Some(v as usize),
                other => {
                    return Err(format!(
                        "unknown I/O poller setting '{other}' (use spin, prio, cpu)"
                    ))
                }
            }
        }
        config.rt = match (priority, cpu) {
            (Some(priority), cpu) => Some(RtPolicy { priority, cpu }),
            (None, Some(_)) => return Err("the I/O poller's cpu= needs a prio= too".into()),
            (None, None) => None,
        };
        config.validate()?;
        Ok(config)
    }
}

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

#[cfg(test)]
mod poller_tests {
    use super::*;

    #[test]
    fn io_poller_specs_parse_and_validate() {
        assert!(!"off".parse::<IoPollerConfig>().unwrap().enabled);
        assert_eq!(
            "on".parse::<IoPollerConfig>().unwrap(),
            IoPollerConfig::default()
        );
        let c: IoPollerConfig = "spin=200,prio=70,cpu=0".parse().unwrap();
        assert_eq!(
            (c.enabled, c.spin_us, c.rt),
            (
                true,
                200,
                Some(RtPolicy {
                    priority: 70,
                    cpu: Some(0)
                })
            )
        );
        assert_eq!("spin=0".parse::<IoPollerConfig>().unwrap().rt, None);
        for (bad, why) in [
            ("spin=20000", "above"),
            ("cpu=0", "needs a prio"),
            ("prio=0", "out of range"),
            ("hz=5", "unknown I/O poller setting"),
            ("spin", "is not off, on"),
            ("spin=x", "not a number"),
        ] {
            let e = bad.parse::<IoPollerConfig>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
