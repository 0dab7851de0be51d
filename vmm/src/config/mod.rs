//! What a VM is made of: vCPUs, memory, guest, console. The same options
//! come from the command line or from a TOML file; both end up here and are
//! checked here, so a bad value gets the same clear message either way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rtvm_abi::{CMDLINE_MAX, MAX_VCPUS, WORKLOAD_NAME_MAX};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

mod net;
mod realtime;
mod share;
mod timer;

pub use net::{AddrRule, IoPollerConfig, NetPolicy, DEFAULT_MAX_BUFFER, DEFAULT_MAX_SOCKETS};
pub use realtime::{RtBandwidth, RtPolicy};
pub use share::{
    ShareConfig, DEFAULT_MAX_BYTES_PER_CALL, DEFAULT_MAX_BYTES_WRITTEN, DEFAULT_MAX_OPEN_FILES,
    MAX_BYTES_PER_CALL,
};
pub use timer::{AdvanceMode, DEFAULT_MAX_ADVANCE_NS};

pub const DEFAULT_VCPUS: usize = 1;
pub const DEFAULT_MEMORY: u64 = 64 << 20;
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Smallest guest RAM we accept.
pub const MIN_RAM: u64 = 16 << 20;
/// Largest guest RAM we accept.
pub const MAX_RAM: u64 = 64 << 30;
/// Longest Linux command line we pass (the VMM appends its own words).
pub const LINUX_CMDLINE_MAX: usize = 3900;

/// What to do about unclaimed port or MMIO accesses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnhandledIo {
    /// End the VM with an error naming the access. Right for our own guests,
    /// which touch no device they do not expect.
    #[default]
    Fatal,
    /// Log the access; reads return all ones, as on an empty bus.
    Log,
}

/// Which guest to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSpec {
    /// A workload of the built-in guest: `builtin:NAME`.
    Builtin(String),
    /// A Linux kernel (bzImage or ELF vmlinux): `linux:PATH`.
    Linux(PathBuf),
}

impl FromStr for GuestSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            Some(("builtin", name)) if !name.is_empty() => {
                if name.len() > WORKLOAD_NAME_MAX || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!("'{name}' is not a valid workload name"));
                }
                Ok(GuestSpec::Builtin(name.to_string()))
            }
            Some(("linux", path)) if !path.is_empty() => Ok(GuestSpec::Linux(PathBuf::from(path))),
            _ => Err(format!(
                "guest '{s}' is not of the form builtin:NAME (e.g. builtin:hello) or linux:KERNEL"
            )),
        }
    }
}

impl fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestSpec::Builtin(name) => write!(f, "builtin:{name}"),
            GuestSpec::Linux(path) => write!(f, "linux:{}", path.display()),
        }
    }
}

/// A memory size: `64M`, `1G`, `512MiB`, `1048576K`; a bare number is MiB.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 64M, 1G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A byte count: a size with a unit (`1M`, `64K`) or a bare number of bytes.
pub(crate) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Bytes {
        Text(String),
        Count(u64),
    }
    match Bytes::deserialize(d)? {
        Bytes::Text(s) => parse_byte_size(&s).map_err(serde::de::Error::custom),
        Bytes::Count(n) => Ok(n),
    }
}

/// A byte count for limits: `4096`, `64K`, `1M`, `1G` (a bare number is bytes).
pub fn parse_byte_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| format!("'{s}' is too large"));
    }
    parse_size(t)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Text(String),
        Mib(u64),
    }
    match Size::deserialize(d)? {
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
        Size::Mib(n) => n
            .checked_mul(1 << 20)
            .ok_or_else(|| serde::de::Error::custom("memory size too large")),
    }
}

fn from_str<'de, D: Deserializer<'de>, T: FromStr<Err = String>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

/// Per-vCPU settings: `[[vcpu]]` tables in TOML, `--rt-vcpu` on the CLI.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VcpuSettings {
    /// Which vCPU; defaults to the table's position.
    #[serde(default)]
    pub id: Option<usize>,
    /// Make this a real-time vCPU.
    #[serde(default)]
    pub rt: Option<RtPolicy>,
}

/// One VM's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest to boot, `builtin:NAME`.
    #[serde(deserialize_with = "from_str")]
    pub guest: GuestSpec,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: usize,
    /// Guest RAM in bytes.
    #[serde(default = "default_memory", deserialize_with = "size")]
    pub memory: u64,
    /// Arguments for the guest (`key=value` words), or a Linux kernel's command line.
    #[serde(default)]
    pub cmdline: String,
    /// The initramfs of a Linux guest.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Also write the guest console to this file.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// The KVM device node.
    #[serde(default = "default_kvm_device")]
    pub kvm_device: PathBuf,
    /// Per-vCPU settings.
    #[serde(default)]
    pub vcpu: Vec<VcpuSettings>,
    /// The host directory the guest's file calls are served from (none by default).
    #[serde(default)]
    pub share: Option<ShareConfig>,
    /// What the guest may do on the host's network (nothing by default).
    #[serde(default)]
    pub net: NetPolicy,
    /// Refuse to start if any real-time setting cannot be applied.
    #[serde(default)]
    pub rt_strict: bool,
    /// Run RT vCPUs even where no per-VM RT bandwidth cap can be made (no
    /// RT group scheduling, cgroup v2, bandwidth not grantable): then only
    /// the kernel's system-wide RT throttle bounds them. Off, such a VM
    /// refuses to start.
    #[serde(default)]
    pub rt_allow_uncapped: bool,
    /// Lock all VMM and guest memory (mlockall) when RT vCPUs exist.
    #[serde(default)]
    pub mlock: bool,
    /// RT bandwidth cap of the RT vCPUs' cgroup, `RUNTIME_US/PERIOD_US`.
    #[serde(default, deserialize_with = "from_str")]
    pub rt_bandwidth: RtBandwidth,
    /// Timer advance of waits on RT vCPUs: `auto`, `off` or e.g. `20us`.
    #[serde(default = "default_advance", deserialize_with = "from_str")]
    pub timer_advance: AdvanceMode,
    /// What to do about accesses to ports and MMIO no device claims.
    #[serde(skip)]
    pub unhandled_io: UnhandledIo,
    /// Keep the samples guests hand over with `Report` (and the host's own
    /// record of long-poll wake-ups) for the run's `VmRun::streams`: for
    /// benchmarks only. Off, `Report` answers `NotConfigured` and the VMM
    /// holds no samples, so a guest cannot grow its memory that way.
    #[serde(skip)]
    pub sample_streams: bool,
    /// How guest RAM is backed: `thp` (transparent huge pages, the
    /// default), `off` (4 KiB pages), `hugetlbfs` (reserved 2 MiB pages).
    #[serde(default, deserialize_with = "from_str")]
    pub huge_pages: HugePages,
    /// Fault all of guest RAM in at start, so no first touch faults later.
    #[serde(default)]
    pub prefault: bool,
    /// The seccomp filters of the VM's threads: `on` (default), `log`, `off`.
    #[serde(default, deserialize_with = "from_str")]
    pub seccomp: SeccompMode,
    /// The I/O poller that serves the guest's I/O rings.
    #[serde(default)]
    pub io_poller: IoPollerConfig,
    /// The management API's Unix socket (`rtvm run --api-sock`); none: no API.
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
}

/// Which pages back guest RAM (see `GuestRam::with_backing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Transparent huge pages, asked for with MADV_HUGEPAGE where the host
    /// allows them.
    #[default]
    Transparent,
    /// 4 KiB pages.
    Off,
    /// 2 MiB pages from the host's reserved hugetlbfs pool.
    Hugetlbfs,
}

impl FromStr for HugePages {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "thp" => Ok(HugePages::Transparent),
            "off" => Ok(HugePages::Off),
            "hugetlbfs" => Ok(HugePages::Hugetlbfs),
            _ => Err(format!(
                "huge pages '{s}' is not one of thp, off, hugetlbfs"
            )),
        }
    }
}

impl fmt::Display for HugePages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePages::Transparent => "thp",
            HugePages::Off => "off",
            HugePages::Hugetlbfs => "hugetlbfs",
        })
    }
}

/// Whether the VM's threads confine themselves with seccomp filters (see
/// `rtvm_vmm::seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A call outside a thread's list ends the process with a message.
    #[default]
    Enforce,
    /// Calls outside the lists go through, and the kernel logs each one
    /// (`audit: type=1326` in the kernel log): to find what a filter
    /// lacks on another kernel or C library.
    Log,
    /// No filters, for debugging.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("seccomp mode '{s}' is not one of on, log, off")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

fn default_advance() -> AdvanceMode {
    AdvanceMode::Adaptive {
        max_ns: DEFAULT_MAX_ADVANCE_NS,
    }
}

fn default_vcpus() -> usize {
    DEFAULT_VCPUS
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY
}
fn default_kvm_device() -> PathBuf {
    PathBuf::from(DEFAULT_KVM_DEVICE)
}

impl VmConfig {
    /// A configuration with defaults for everything but the guest.
    pub fn new(guest: GuestSpec) -> Self {
        VmConfig {
            guest,
            vcpus: DEFAULT_VCPUS,
            memory: DEFAULT_MEMORY,
            cmdline: String::new(),
            initramfs: None,
            serial_log: None,
            kvm_device: default_kvm_device(),
            vcpu: Vec::new(),
            share: None,
            net: NetPolicy::default(),
            rt_strict: false,
            rt_allow_uncapped: false,
            mlock: false,
            rt_bandwidth: RtBandwidth::default(),
            timer_advance: default_advance(),
            unhandled_io: UnhandledIo::Fatal,
            sample_streams: false,
            seccomp: SeccompMode::Enforce,
            huge_pages: HugePages::default(),
            prefault: false,
            io_poller: IoPollerConfig::default(),
            api_sock: None,
        }
    }

    /// Makes vCPU `index` real-time with `policy` (replacing earlier settings for it).
    pub fn set_rt(&mut self, index: usize, policy: RtPolicy) {
        self.vcpu.retain(|v| v.id != Some(index));
        self.vcpu.push(VcpuSettings {
            id: Some(index),
            rt: Some(policy),
        });
    }

    /// The real-time policy of vCPU `index`, if it is an RT vCPU.
    pub fn rt_policy(&self, index: usize) -> Option<RtPolicy> {
        self.vcpu
            .iter()
            .enumerate()
            .find(|(pos, v)| v.id.unwrap_or(*pos) == index)
            .and_then(|(_, v)| v.rt)
    }

    /// The timer advance waits on vCPU `index` use.
    pub fn advance_for(&self, index: usize) -> AdvanceMode {
        if self.rt_policy(index).is_some() {
            self.timer_advance
        } else {
            AdvanceMode::Off
        }
    }

    /// Parses a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: VmConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::from_toml(&text)
            .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))
    }

    /// Checks every value; the first bad one is named in the error.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "vcpus = {}: must be between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if !(MIN_RAM..=MAX_RAM).contains(&self.memory) || self.memory % 4096 != 0 {
            return Err(Error::Config(format!(
                "memory = {} bytes: must be a multiple of 4 KiB between {} MiB and {} GiB",
                self.memory,
                MIN_RAM >> 20,
                MAX_RAM >> 30
            )));
        }
        let cmdline_max = match self.guest {
            GuestSpec::Builtin(_) => CMDLINE_MAX,
            GuestSpec::Linux(_) => LINUX_CMDLINE_MAX,
        };
        if self.cmdline.len() > cmdline_max {
            return Err(Error::Config(format!(
                "cmdline is {} bytes; at most {cmdline_max} are allowed",
                self.cmdline.len()
            )));
        }
        if self.initramfs.is_some() && matches!(self.guest, GuestSpec::Builtin(_)) {
            return Err(Error::Config(
                "an initramfs is only for Linux guests".into(),
            ));
        }
        if !self
            .cmdline
            .bytes()
            .all(|b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(Error::Config("cmdline must be printable ASCII".into()));
        }
        if let Some(share) = &self.share {
            share.validate()?;
        }
        self.net.validate()?;
        self.io_poller
            .validate()
            .map_err(|e| Error::Config(format!("io_poller: {e}")))?;
        let mut seen = std::collections::BTreeSet::new();
        for (pos, v) in self.vcpu.iter().enumerate() {
            let id = v.id.unwrap_or(pos);
            if id >= self.vcpus {
                return Err(Error::Config(format!(
                    "settings for vCPU {id}, but the VM has vCPUs 0..={}",
                    self.vcpus - 1
                )));
            }
            if !seen.insert(id) {
                return Err(Error::Config(format!("vCPU {id} is configured twice")));
            }
            if let Some(rt) = &v.rt {
                rt.validate()
                    .map_err(|e| Error::Config(format!("vCPU {id}: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("16384k"), Ok(16 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn guest_specs_parse() {
        assert_eq!(
            "builtin:hello".parse(),
            Ok(GuestSpec::Builtin("hello".into()))
        );
        assert!("hello".parse::<GuestSpec>().is_err());
        assert!("builtin:".parse::<GuestSpec>().is_err());
        assert!("kernel:/x".parse::<GuestSpec>().is_err());
        assert_eq!(
            "linux:/boot/vmlinuz".parse(),
            Ok(GuestSpec::Linux("/boot/vmlinuz".into()))
        );
        assert!("linux:".parse::<GuestSpec>().is_err());
        assert!("builtin:a b".parse::<GuestSpec>().is_err());
    }

    #[test]
    fn toml_config_parses_with_defaults() {
        let c = VmConfig::from_toml("guest = \"builtin:hello\"\nvcpus = 2\nmemory = \"32M\"\n")
            .unwrap();
        assert_eq!(c.guest, GuestSpec::Builtin("hello".into()));
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory, 32 << 20);
        let c = VmConfig::from_toml("guest = \"builtin:spin\"\nmemory = 128").unwrap();
        assert_eq!((c.vcpus, c.memory), (1, 128 << 20));
        assert_eq!(c.seccomp, SeccompMode::Enforce, "seccomp is on by default");
    }

    #[test]
    fn seccomp_mode_is_on_log_or_off() {
        for (text, mode) in [
            ("on", SeccompMode::Enforce),
            ("log", SeccompMode::Log),
            ("off", SeccompMode::Off),
        ] {
            let c =
                VmConfig::from_toml(&format!("guest = \"builtin:hello\"\nseccomp = \"{text}\""))
                    .unwrap();
            assert_eq!(c.seccomp, mode);
            assert_eq!(mode.to_string(), text);
        }
        let err = VmConfig::from_toml("guest = \"builtin:hello\"\nseccomp = \"strict\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("seccomp mode 'strict' is not one of on, log, off"),
            "{err}"
        );
    }

    #[test]
    fn toml_config_rejects_bad_input_with_the_key_named() {
        let err = |t: &str| VmConfig::from_toml(t).unwrap_err().to_string();
        assert!(err("guest = \"builtin:hello\"\ncpus = 2").contains("unknown field `cpus`"));
        assert!(err("guest = \"builtin:hello\"\nvcpus = 0").contains("vcpus = 0"));
        assert!(err("guest = \"builtin:hello\"\nvcpus = 65").contains("vcpus = 65"));
        assert!(err("guest = \"builtin:hello\"\nmemory = \"1Q\"").contains("unknown unit"));
        assert!(err("guest = \"builtin:hello\"\nmemory = 1").contains("memory"));
        assert!(err("guest = \"hello\"").contains("builtin:NAME"));
        assert!(err("vcpus = 1").contains("missing field `guest`"));
        assert!(err("guest = \"builtin:hello\"\nvcpus = \"two\"").contains("vcpus"));
        assert!(
            err("guest = \"builtin:hello\"\n[[vcpu]]\nid = 3\nrt = { priority = 80 }")
                .contains("vCPU 3")
        );
        assert!(
            err("guest = \"builtin:hello\"\n[[vcpu]]\nrt = { priority = 0 }")
                .contains("out of range")
        );
        assert!(
            err("guest = \"builtin:hello\"\n[[vcpu]]\nrt = { prio = 5 }")
                .contains("unknown field `prio`")
        );
        assert!(
            err("guest = \"builtin:hello\"\ntimer_advance = \"soon\"").contains("timer advance")
        );
        assert!(err("guest = \"builtin:hello\"\nrt_bandwidth = \"9/10\"").contains("RT bandwidth"));
    }

    #[test]
    fn share_table_parses_with_limits() {
        let c = VmConfig::from_toml(
            "guest = \"builtin:hello\"\n[share]\npath = \"/tmp\"\nread_only = true\n\
             max_open_files = 4\nmax_bytes_per_call = \"4K\"\nmax_bytes_written = 10000\n",
        )
        .unwrap();
        let share = c.share.unwrap();
        assert!(share.read_only);
        assert_eq!(
            (
                share.max_open_files,
                share.max_bytes_per_call,
                share.max_bytes_written
            ),
            (4, 4096, 10000)
        );
        let err = VmConfig::from_toml(
            "guest = \"builtin:hello\"\n[share]\npath = \"/tmp\"\nmax_open_files = 0",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_open_files"), "{err}");
        assert!(VmConfig::from_toml(
            "guest = \"builtin:hello\"\n[share]\npath = \"/tmp\"\nsize = 1"
        )
        .is_err());
    }

    #[test]
    fn rt_vcpus_come_from_toml_tables() {
        let c = VmConfig::from_toml(
            "guest = \"builtin:hello\"\nvcpus = 2\ntimer_advance = \"20us\"\nrt_strict = true\n\
             [[vcpu]]\nid = 1\nrt = { priority = 80, cpu = 0 }\n",
        )
        .unwrap();
        assert_eq!(
            c.rt_policy(1),
            Some(RtPolicy {
                priority: 80,
                cpu: Some(0)
            })
        );
        assert_eq!(c.rt_policy(0), None);
        assert_eq!(c.advance_for(1), AdvanceMode::Fixed(20_000));
        assert_eq!(c.advance_for(0), AdvanceMode::Off);
        assert!(c.rt_strict);
    }
}
