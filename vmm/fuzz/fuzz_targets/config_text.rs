//! What a user types: a TOML configuration file, a network rule, a size.
//! Each must parse or say why, never panic; a rule that parses must
//! decide any address without panicking, and one that names a single
//! address must allow exactly that address on its ports.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use rtvm_vmm::config::{parse_byte_size, parse_size, AddrRule, RtBandwidth, SeccompMode};
use rtvm_vmm::VmConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = VmConfig::from_toml(text);
    let _ = parse_size(text);
    let _ = parse_byte_size(text);
    let _ = text.parse::<RtBandwidth>();
    let _ = text.parse::<SeccompMode>();
    if let Ok(rule) = text.parse::<AddrRule>() {
        for ip in ["198.18.0.1", "0.0.0.0", "255.255.255.255", "::1", "::"] {
            for port in [0, 1, 7000, 65535] {
                let _ = rule.allows(&SocketAddr::new(ip.parse().unwrap(), port));
            }
        }
        if let Some((ip, len)) = rule.net {
            let full = if ip.is_ipv4() { 32 } else { 128 };
            if len == full {
                let lo = *rule.ports.start();
                assert!(rule.allows(&SocketAddr::new(ip, lo)), "{text}");
                let other: IpAddr = if ip.is_ipv4() {
                    std::net::Ipv4Addr::from(u32::from_be_bytes(match ip {
                        IpAddr::V4(v) => v.octets(),
                        IpAddr::V6(_) => unreachable!(),
                    }) ^ 1)
                    .into()
                } else {
                    std::net::Ipv6Addr::from(u128::from_be_bytes(match ip {
                        IpAddr::V6(v) => v.octets(),
                        IpAddr::V4(_) => unreachable!(),
                    }) ^ 1)
                    .into()
                };
                assert!(!rule.allows(&SocketAddr::new(other, lo)), "{text}");
            }
        }
    }
});
