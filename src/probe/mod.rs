//! `rtvm probe`: network round-trip latency measured from outside the
//! target, the role an external DPDK machine played in the original
//! research.
//!
//! The probe makes a network namespace of its own, joined to the root
//! namespace by a veth pair (see [`net`]), and sends timestamped UDP
//! requests from there to a target on the root-namespace side: a host echo
//! server, or a guest's UDP echo served through rtvm's outsourced sockets.
//! Round trips come from kernel timestamps (see [`measure`]), and nothing is
//! added inside the target. `--tcp` probes a TCP echo server over one
//! connection instead (see [`tcp`]: user-space clock readings).
//!
//! Library use (`rtvm bench net`): [`measure`] sets the network up and
//! probes; or make a [`ProbeNet`] first, have the target bind
//! [`ProbeNet::host_addr`], and call [`measure_in`]. [`serve_echo`] /
//! [`EchoServer`] are the reusable UDP echo server.
//!
//! Network rules: addresses come only from 198.18.0.0/15 (RFC 2544), on our
//! own veth pair; nothing is routed beyond its /30; a target anywhere else
//! is refused before anything is made or sent; everything made is removed
//! at exit, also on errors and on SIGINT/SIGTERM (exit status 130/143).

mod echo;
mod measure;
mod net;
mod tcp;
mod timestamps;

use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use rtvm_vmm::host::HostInfo;

#[allow(unused_imports)] // the library face, for `rtvm bench net`
pub use echo::{serve_echo, EchoServer};
#[allow(unused_imports)]
pub use measure::{
    measure, measure_in, Limit, ProbeOptions, ProbeResult, Timestamps, MAX_SIZE, MIN_SIZE,
};
#[allow(unused_imports)]
pub use net::{in_bench_net, NetLayout, ProbeNet};

use crate::report::histogram::Histogram;
use crate::report::machine_json;
use crate::report::plot::latency_svg;
use crate::report::stats::Stats;
use crate::{EXIT_HOST_ERROR, EXIT_USAGE};

/// Port of the default target (and of `--echo-server`).
pub const DEFAULT_PORT: u16 = 7000;

#[derive(Args, Clone, Debug)]
pub struct ProbeArgs {
    /// Where to send: IPV4:PORT in 198.18.0.0/15, on the probe's /30
    /// [default: the host end, 198.18.0.1:7000].
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_target)]
    pub target: Option<SocketAddrV4>,
    /// Requests per second; 0 = closed loop (next request right after the reply).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub rate: u32,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5.0, conflicts_with = "count")]
    pub seconds: f64,
    /// Send this many requests instead of sending for --seconds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// UDP payload bytes per request (sequence number plus padding).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(16..=1472))]
    pub size: u16,
    /// A reply not back within this many ms counts as lost.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
    /// Probe a TCP echo server over one connection instead of UDP (round
    /// trips by user-space clock readings)
    #[arg(long)]
    pub tcp: bool,
    /// Also run a UDP echo server on the host end (the target's address) in
    /// this process, to measure the host path end to end.
    #[arg(long)]
    pub echo_server: bool,
    /// The /30 of 198.18.0.0/15 for the veth pair: host end .1, probe end .2.
    #[arg(long, value_name = "A.B.C.D/30", default_value = "198.18.0.0/30")]
    pub subnet: NetLayout,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the round trips as a cyclictest-format histogram (1 µs buckets) to FILE.
    #[arg(long, value_name = "FILE")]
    pub histogram: Option<PathBuf>,
    /// Draw the round-trip distribution into an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `--target`: an IPv4 socket address inside 198.18.0.0/15.
fn parse_target(s: &str) -> Result<SocketAddrV4, String> {
    let addr: SocketAddrV4 = s
        .parse()
        .map_err(|_| format!("{s:?} is not IPV4:PORT, e.g. 198.18.0.1:7000"))?;
    if !in_bench_net(*addr.ip()) {
        return Err(format!(
            "{addr} is outside the benchmarking range 198.18.0.0/15; rtvm probe sends nowhere else"
        ));
    }
    Ok(addr)
}

impl ProbeArgs {
    fn options(&self) -> Result<ProbeOptions, String> {
        let target = self
            .target
            .unwrap_or(SocketAddrV4::new(self.subnet.host_addr(), DEFAULT_PORT));
        let opts = ProbeOptions {
            size: usize::from(self.size),
            timeout: Duration::from_millis(self.timeout_ms),
            rate: self.rate,
            limit: match self.count {
                Some(n) => Limit::Count(n),
                None => Limit::Seconds(self.seconds),
            },
            layout: self.subnet,
            tcp: self.tcp,
            ..ProbeOptions::new(target)
        };
        opts.validate()?;
        if self.tcp && self.echo_server {
            return Err("--echo-server serves UDP only; leave it out with --tcp".into());
        }
        let (host, probe) = (self.subnet.host_addr(), self.subnet.probe_addr());
        if *target.ip() != host {
            return Err(if *target.ip() == probe {
                format!("target {target} is the probe's own address")
            } else {
                format!(
                    "target {target} is not on the probe's network {}/30 (host end {host}); \
                     nothing is routed beyond it (see --subnet)",
                    self.subnet.subnet()
                )
            });
        }
        Ok(opts)
    }
}

pub fn run(args: &ProbeArgs) -> ExitCode {
    let opts = match args.options() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("rtvm: error: probe: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = rtvm_vmm::signals::install_termination_handlers() {
        eprintln!("rtvm: error: probe: {e}");
        return ExitCode::from(EXIT_HOST_ERROR);
    }
    // The network and echo server are gone when this returns.
    let outcome = probe(args, &opts);
    if let Some(sig) = rtvm_vmm::signals::termination_signal() {
        eprintln!("rtvm: probe stopped by signal {sig}; its network namespace is removed");
        return ExitCode::from(128 + sig as u8);
    }
    let result = match outcome {
        Ok(result) if result.interrupted => {
            eprintln!("rtvm: error: probe: stopped early");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
        Ok(result) => result,
        Err(e) => {
            eprintln!("rtvm: error: probe: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    match report(args, &opts, &result) {
        Ok(()) if result.received > 0 => ExitCode::SUCCESS,
        Ok(()) => {
            eprintln!(
                "rtvm: error: probe: no replies from {}{}",
                opts.target,
                if result.refused > 0 {
                    " (port unreachable: nothing listens there)"
                } else {
                    ""
                }
            );
            ExitCode::from(EXIT_HOST_ERROR)
        }
        Err(e) => {
            eprintln!("rtvm: error: probe: {e}");
            ExitCode::from(EXIT_HOST_ERROR)
        }
    }
}

fn probe(args: &ProbeArgs, opts: &ProbeOptions) -> Result<ProbeResult, String> {
    if !args.echo_server {
        return measure(opts);
    }
    let net = ProbeNet::create(opts.layout)?;
    let echo = EchoServer::start(opts.target)?;
    tracing::debug!(
        "echo server on {} ({} {}), probe in {} on {}",
        echo.addr(),
        net.host_if(),
        net.host_addr(),
        net.netns(),
        net.probe_if()
    );
    let result = measure_in(&net, opts);
    let echoed = echo.stop()?;
    tracing::debug!("echo server on {} echoed {echoed} datagrams", opts.target);
    result
}

fn report(args: &ProbeArgs, opts: &ProbeOptions, result: &ProbeResult) -> Result<(), String> {
    let host = HostInfo::probe();
    let (proto, path) = if opts.tcp {
        ("TCP", "tcp_rtt")
    } else {
        ("UDP", "udp_rtt")
    };
    if let Some(file) = &args.histogram {
        let title = format!(
            "rtvm probe: {proto} round trip to {}, {} bytes, in µs",
            opts.target, opts.size
        );
        create_parent(file)?;
        fs::write(
            file,
            Histogram::from_ns(&result.rtt_ns).to_cyclictest(&title),
        )
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    }
    if let Some(file) = &args.plot {
        create_parent(file)?;
        let title = format!(
            "{proto} round trip to {} ({})",
            opts.target, host.kvm_module
        );
        latency_svg(file, &title, "round trip", &[(path, &result.rtt_ns)])?;
    }
    if args.json {
        let mut out = result.to_json();
        out["settings"] = serde_json::json!({
            "rate": opts.rate,
            "size": opts.size,
            "timeout_ms": args.timeout_ms,
            "seconds": args.count.is_none().then_some(args.seconds),
            "count": args.count,
            "subnet": format!("{}/30", opts.layout.subnet()),
            "echo_server": args.echo_server,
            "protocol": proto.to_ascii_lowercase(),
        });
        out["machine"] = machine_json(&host);
        println!("{out}");
        return Ok(());
    }
    let pace = match opts.rate {
        0 => "closed loop".to_string(),
        r => format!("{r}/s"),
    };
    let limit = match opts.limit {
        Limit::Seconds(s) => format!("for {s} s"),
        Limit::Count(n) => format!("{n} requests"),
    };
    println!(
        "rtvm probe: {proto} round trip to {} from {} in its own namespace, {} bytes, {pace}, {limit}, timeout {} ms \
         ({} on {}, preemption {})",
        opts.target,
        opts.layout.probe_addr(),
        opts.size,
        args.timeout_ms,
        host.kvm_module,
        host.cpu_model,
        host.preemption
    );
    println!("{}", Stats::TABLE_HEADER);
    match &result.rtt {
        Some(s) => println!("{}", s.table_row(path)),
        None => println!("{:<18} {:>9}", path, 0),
    }
    if let Some(s) = result.rtt_user.as_ref().filter(|_| !opts.tcp) {
        println!(
            "{}   (user-space clocks, for comparison)",
            s.table_row(&format!("  {path}, user"))
        );
    }
    let pct = |n: u64| {
        if result.sent == 0 {
            0.0
        } else {
            n as f64 * 100.0 / result.sent as f64
        }
    };
    println!(
        "sent {}, received {}, lost {} ({:.2}%, {} late), timestamps: {} ({} user-space fallbacks)",
        result.sent,
        result.received,
        result.lost,
        pct(result.lost),
        result.late,
        result.timestamps.as_str(),
        result.fallbacks
    );
    if let Some(file) = &args.histogram {
        println!("histogram: {}", file.display());
    }
    if let Some(file) = &args.plot {
        println!("plot: {}", file.display());
    }
    Ok(())
}

fn create_parent(file: &Path) -> Result<(), String> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
        }
        None => Ok(()),
    }
}
