//! The probe's own little network: a network namespace standing in for an
//! external host, joined to the root namespace by a veth pair, with
//! addresses from the RFC 2544 benchmarking range only.
//!
//! ```text
//!  root namespace                         namespace rtvm-probe-<pid>
//!  rtvp<pid>h 198.18.0.1/30  <── veth ──>  rtvp<pid>p 198.18.0.2/30
//!  (the target binds here)                 (the probe sends from here)
//! ```
//!
//! Nothing is routed beyond the /30: the namespace has no default route and
//! the root namespace only gains the /30's connected route. Everything is
//! made with iproute2's `ip` and removed again when the [`ProbeNet`] drops.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The RFC 2544 network benchmarking range, 198.18.0.0/15: the only
/// addresses rtvm probe uses or sends to.
pub const BENCH_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Prefix length of [`BENCH_NET`].
pub const BENCH_NET_PREFIX: u8 = 15;

/// Whether `addr` lies in 198.18.0.0/15.
pub fn in_bench_net(addr: Ipv4Addr) -> bool {
    in_prefix(addr, BENCH_NET, BENCH_NET_PREFIX)
}

fn in_prefix(addr: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(addr) & mask == u32::from(net) & mask
}

/// Which /30 of 198.18.0.0/15 the veth pair uses: the root-namespace (host)
/// end gets `.1`, the probe end `.2` of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetLayout {
    subnet: Ipv4Addr,
}

impl Default for NetLayout {
    /// 198.18.0.0/30: host end 198.18.0.1, probe end 198.18.0.2.
    fn default() -> Self {
        NetLayout {
            subnet: Ipv4Addr::new(198, 18, 0, 0),
        }
    }
}

impl NetLayout {
    /// The /30 starting at `subnet`, which must be aligned and inside
    /// 198.18.0.0/15.
    pub fn new(subnet: Ipv4Addr) -> Result<NetLayout, String> {
        if !in_bench_net(subnet) {
            return Err(format!(
                "subnet {subnet}/30 is outside the benchmarking range {BENCH_NET}/{BENCH_NET_PREFIX}"
            ));
        }
        if u32::from(subnet) & 3 != 0 {
            return Err(format!(
                "{subnet} does not start a /30 (the last number must be a multiple of 4)"
            ));
        }
        Ok(NetLayout { subnet })
    }

    pub fn subnet(&self) -> Ipv4Addr {
        self.subnet
    }

    /// The root-namespace end's address (`.1` of the /30).
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }

    /// The probe end's address inside the namespace (`.2` of the /30).
    pub fn probe_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 2)
    }

    fn contains(&self, addr: Ipv4Addr) -> bool {
        in_prefix(addr, self.subnet, 30)
    }
}

impl std::str::FromStr for NetLayout {
    type Err = String;

    /// `198.18.0.4/30` or `198.18.0.4`.
    fn from_str(s: &str) -> Result<Self, String> {
        let addr = match s.split_once('/') {
            Some((addr, "30")) => addr,
            Some((_, len)) => return Err(format!("the subnet must be a /30, not /{len}")),
            None => s,
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 subnet such as 198.18.0.4/30"))?;
        NetLayout::new(addr)
    }
}

/// Network namespaces made by this process so far, for unique names.
static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth pair to the root namespace, removed on
/// drop (also after an error part-way through [`ProbeNet::create`]).
///
/// Create one first when the target must bind the host-side address before
/// probing starts (e.g. `rtvm bench net` starting a guest's echo service),
/// then pass it to [`super::measure_in`]:
///
/// ```ignore
/// let net = ProbeNet::create(NetLayout::default())?;   // 198.18.0.1 <-> 198.18.0.2
/// let echo = EchoServer::start((net.host_addr(), 7000).into())?;
/// let result = measure_in(&net, &ProbeOptions::new((net.host_addr(), 7000).into()))?;
/// ```
///
/// Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2. Names carry
/// the process id: namespace `rtvm-probe-<pid>`, veth ends `rtvp<pid>h`
/// (root namespace) and `rtvp<pid>p` (in the namespace); a second instance
/// in the same process gets a `-<n>`/`<n>` suffix. Two instances at once
/// need different layouts: creation refuses a /30 whose addresses are
/// already on an interface.
#[derive(Debug)]
pub struct ProbeNet {
    netns: String,
    host_if: String,
    probe_if: String,
    layout: NetLayout,
}

impl ProbeNet {
    /// Makes the namespace and veth pair with `layout`'s addresses, both
    /// ends up, no routes beyond the /30.
    pub fn create(layout: NetLayout) -> Result<ProbeNet, String> {
        check_ip_tool()?;
        // Before the layout check: a dead probe's veth may hold its addresses.
        remove_stale();
        check_layout_free(&layout)?;
        let pid = std::process::id();
        let n = INSTANCES.fetch_add(1, Ordering::SeqCst);
        let suffix = |sep: &str| {
            if n == 0 {
                String::new()
            } else {
                format!("{sep}{n}")
            }
        };
        let net = ProbeNet {
            netns: format!("rtvm-probe-{pid}{}", suffix("-")),
            host_if: format!("rtvp{pid}h{}", suffix("")),
            probe_if: format!("rtvp{pid}p{}", suffix("")),
            layout,
        };
        if net.host_if.len() > 15 {
            return Err(format!("interface name {} is too long", net.host_if));
        }
        // From here on, drop removes whatever got made.
        net.setup()?;
        tracing::debug!(
            "probe network: {} ({}) <-> {} in {} ({})",
            net.host_if,
            layout.host_addr(),
            net.probe_if,
            net.netns,
            layout.probe_addr()
        );
        Ok(net)
    }

    fn setup(&self) -> Result<(), String> {
        let (ns, h, p) = (self.netns.as_str(), self.host_if.as_str(), &*self.probe_if);
        let host_cidr = format!("{}/30", self.layout.host_addr());
        let probe_cidr = format!("{}/30", self.layout.probe_addr());
        ip(&["netns", "add", ns])?;
        // The peer is born inside the namespace: it never appears in the root one.
        ip(&[
            "link", "add", h, "type", "veth", "peer", "name", p, "netns", ns,
        ])?;
        // No IPv6 link-local addresses, hence no IPv6 chatter (DAD, router
        // solicitations) on the pair: only what we send crosses it.
        ip(&["link", "set", "dev", h, "addrgenmode", "none"])?;
        ip(&["-n", ns, "link", "set", "dev", p, "addrgenmode", "none"])?;
        ip(&["addr", "add", &host_cidr, "dev", h])?;
        ip(&["-n", ns, "addr", "add", &probe_cidr, "dev", p])?;
        ip(&["link", "set", "dev", h, "up"])?;
        ip(&["-n", ns, "link", "set", "dev", p, "up"])?;
        Ok(())
    }

    /// The namespace's name (`rtvm-probe-<pid>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The root-namespace end of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace end of the veth pair.
    pub fn probe_if(&self) -> &str {
        &self.probe_if
    }

    pub fn layout(&self) -> NetLayout {
        self.layout
    }

    /// The root-namespace end's address, where a target listens.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.layout.host_addr()
    }

    /// The probe's address inside the namespace.
    pub fn probe_addr(&self) -> Ipv4Addr {
        self.layout.probe_addr()
    }

    /// Whether `addr` is on this pair's /30 (and so reachable from the probe).
    pub fn reaches(&self, addr: Ipv4Addr) -> bool {
        self.layout.contains(addr)
    }

    /// The namespace file `ip netns` keeps: `/var/run/netns/<name>`, or
    /// `/run/netns/<name>` where `/var/run` is not `/run` (as in a bare
    /// initramfs) and `ip` was built for the latter.
    pub fn netns_path(&self) -> PathBuf {
        NETNS_DIRS
            .iter()
            .map(|dir| PathBuf::from(dir).join(&self.netns))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(NETNS_DIRS[0]).join(&self.netns))
    }

    /// Runs `f` on a new thread that has entered the namespace (sockets it
    /// creates live there) and returns its result. Joining the thread before
    /// returning keeps `f`'s borrows valid.
    pub fn run_inside<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send,
    ) -> Result<T, String> {
        let path = self.netns_path();
        let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("rtvm-probe".into())
                .spawn_scoped(s, move || {
                    // SAFETY: setns(2) on an open namespace file; it only
                    // moves this thread, which is ours and ends with `f`.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(format!(
                            "entering network namespace {}: {}",
                            self.netns,
                            std::io::Error::last_os_error()
                        ));
                    }
                    drop(file);
                    f()
                })
                .map_err(|e| format!("starting the probe thread: {e}"))?
                .join()
                .map_err(|_| "the probe thread panicked".to_string())?
        })
    }
}

impl Drop for ProbeNet {
    fn drop(&mut self) {
        // Deleting one end deletes the pair at once, even while a thread
        // still holds the namespace; then the namespace's name goes.
        if link_exists(&self.host_if) {
            if let Err(e) = ip(&["link", "del", "dev", &self.host_if]) {
                eprintln!("rtvm: warning: removing {}: {e}", self.host_if);
            }
        }
        if self.netns_path().exists() {
            if let Err(e) = ip(&["netns", "del", &self.netns]) {
                eprintln!("rtvm: warning: removing namespace {}: {e}", self.netns);
            }
        }
    }
}

/// Where `ip netns` may keep its namespace files.
const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Where the system's own `ip` is: the probe runs as root, so a PATH
/// that names some other `ip` first must not decide what runs.
const IP_PATHS: &[&str] = &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

/// The system's `ip`, by absolute path.
fn ip_tool() -> Result<&'static str, String> {
    IP_PATHS
        .iter()
        .copied()
        .find(|p| std::path::Path::new(p).is_file())
        .ok_or_else(|| {
            format!(
                "iproute2's `ip` command is missing from {} (Debian: apt-get install iproute2)",
                IP_PATHS.join(", ")
            )
        })
}

/// Runs `ip ARGS`, returning its error text on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    // Its own process group: a Ctrl-C at the terminal reaches only us, so
    // it cannot kill an `ip` half-way through making or removing things.
    let out = Command::new(ip_tool()?)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("Operation not permitted") || err.contains("Permission denied") {
            " (rtvm probe needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        } else {
            ""
        };
        Err(format!(
            "`ip {}` failed: {}{hint}",
            args.join(" "),
            err.trim()
        ))
    }
}

fn check_ip_tool() -> Result<(), String> {
    let ip = ip_tool()?;
    Command::new(ip)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(drop)
        .map_err(|e| format!("running `{ip} -V`: {e}"))
}

/// Refuses a layout whose addresses some interface of the root namespace
/// already has (another probe running, or someone else's test network):
/// two connected routes for one /30 would send replies astray.
fn check_layout_free(layout: &NetLayout) -> Result<(), String> {
    let out = ip(&["-o", "-4", "addr", "show"])?;
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let dev = words.nth(1).unwrap_or("?");
        let Some(cidr) = words.skip_while(|w| *w != "inet").nth(1) else {
            continue;
        };
        let addr = cidr.split('/').next().unwrap_or_default();
        if let Ok(addr) = addr.parse::<Ipv4Addr>() {
            if layout.contains(addr) {
                return Err(format!(
                    "{addr} is already on interface {dev}: another rtvm probe (or test network) uses {}/30; \
                     pick another with --subnet, e.g. 198.18.0.4/30",
                    layout.subnet()
                ));
            }
        }
    }
    Ok(())
}

/// Mentions namespaces left by probes that were killed outright (SIGKILL
/// gives no chance to clean up), with the commands that remove them.
/// Removes the namespaces and veth pairs of probes whose process no longer
/// runs (killed before they could clean up): their addresses would block
/// the layout, and nothing else removes them.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("rtvm-probe-") else {
            continue;
        };
        let (pid, n) = rest.split_once('-').unwrap_or((rest, ""));
        if pid.parse::<u32>().is_err() || std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        // The host end goes with its peer; either may already be gone.
        let _ = ip(&["link", "del", &format!("rtvp{pid}h{n}")]);
        match ip(&["netns", "del", name]) {
            Ok(_) => eprintln!(
                "rtvm: removed network namespace {name}, left by a probe that no longer runs"
            ),
            Err(e) => eprintln!("rtvm: warning: cannot remove stale namespace {name}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #12: the probe runs `ip` as root; which one runs is not up to
    /// PATH.
    #[test]
    fn ip_is_the_systems_by_absolute_path() {
        let Ok(ip) = ip_tool() else {
            return; // no iproute2 here: check_ip_tool says so to the user
        };
        assert!(IP_PATHS.contains(&ip), "{ip}");
        assert!(std::path::Path::new(ip).is_absolute());
    }

    #[test]
    fn only_the_benchmarking_range_is_accepted() {
        assert!(in_bench_net("198.18.0.1".parse().unwrap()));
        assert!(in_bench_net("198.19.255.254".parse().unwrap()));
        for a in [
            "198.20.0.1",
            "198.17.255.255",
            "10.0.0.1",
            "8.8.8.8",
            "127.0.0.1",
        ] {
            assert!(!in_bench_net(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn layouts_are_aligned_slash_30s_in_range() {
        let d = NetLayout::default();
        assert_eq!(d.host_addr(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(d.probe_addr(), Ipv4Addr::new(198, 18, 0, 2));
        let l: NetLayout = "198.19.1.4/30".parse().unwrap();
        assert_eq!(l.host_addr(), Ipv4Addr::new(198, 19, 1, 5));
        assert!(l.contains(Ipv4Addr::new(198, 19, 1, 7)));
        assert!(!l.contains(Ipv4Addr::new(198, 19, 1, 8)));
        assert!("198.18.0.5/30".parse::<NetLayout>().is_err());
        assert!("198.18.0.4/24".parse::<NetLayout>().is_err());
        assert!("10.0.0.0/30".parse::<NetLayout>().is_err());
    }
}
