//! `rtvm bench net`: round-trip latency of a UDP echo, measured from outside
//! by `rtvm probe` (its own network namespace, kernel timestamps), against
//! the same service along each path, back to back in one run:
//!
//! - `host`: a host echo server thread at the same SCHED_FIFO priority/CPU;
//! - `guest_rt`: the guest's `udp-echo` on an RT vCPU, through outsourced
//!   sockets (its receive is a long poll: no guest interrupt);
//! - `guest_other` (optional): the same on a plain SCHED_OTHER vCPU.
//!
//! The target is guest p99 ≤ 1.2 × host p99 + one raw exit floor (the bare
//! VM exit round trip, measured here too), since a guest answer costs at
//! least one exit more than the host's.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rtvm_vmm::config::RtPolicy;
use rtvm_vmm::config::{AddrRule, NetPolicy};
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::realtime::{self, RtItem};
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};
use serde_json::json;

use crate::probe::{measure_in, serve_echo, Limit, NetLayout, ProbeNet, ProbeOptions, ProbeResult};
use crate::report::machine_json;
use crate::report::stats::Stats;

#[derive(Args)]
pub struct NetArgs {
    /// Total probing time in seconds, split evenly between the paths.
    #[arg(long, default_value_t = 9.0)]
    seconds: f64,
    /// Requests per second (0: closed loop).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Also measure the guest echo on a plain SCHED_OTHER vCPU.
    #[arg(long)]
    with_other: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// SCHED_FIFO priority of the echo thread / RT vCPU.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=99))]
    priority: u8,
    /// Host CPU the echo thread / RT vCPU is pinned to [default: the last CPU].
    #[arg(long)]
    cpu: Option<usize>,
    /// The /30 of 198.18.0.0/15 the probe's veth pair uses.
    #[arg(long, default_value = "198.18.0.20", value_parser = parse_layout)]
    subnet: NetLayout,
}

fn parse_layout(s: &str) -> Result<NetLayout, String> {
    NetLayout::new(
        s.parse()
            .map_err(|_| format!("'{s}' is not an IPv4 address"))?,
    )
}

const TARGET_FACTOR: f64 = 1.2;
const HOST_PORT: u16 = 7100;
const GUEST_PORT: u16 = 7101;

fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

fn probe(
    net: &ProbeNet,
    target: SocketAddrV4,
    rate: u32,
    seconds: f64,
) -> Result<ProbeResult, String> {
    let mut opts = ProbeOptions::new(target);
    opts.rate = rate;
    opts.limit = Limit::Seconds(seconds);
    opts.layout = net.layout();
    let result = measure_in(net, &opts)?;
    if result.rtt.is_none() {
        return Err(format!("no replies from {target}"));
    }
    Ok(result)
}

/// The host path: an echo thread at the RT policy, probed from outside.
fn host_path(
    net: &ProbeNet,
    policy: RtPolicy,
    args: &NetArgs,
    seconds: f64,
    rt: &Mutex<Vec<RtItem>>,
) -> Result<ProbeResult, String> {
    let addr = SocketAddrV4::new(net.host_addr(), HOST_PORT);
    let socket =
        UdpSocket::bind(addr).map_err(|e| format!("binding the host echo to {addr}: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let items = realtime::apply_thread_policy("host echo thread", &policy);
            (items, serve_echo(&socket, &stop))
        })
    };
    let result = probe(net, addr, args.rate, seconds);
    stop.store(true, Ordering::Relaxed);
    let (items, served) = server.join().map_err(|_| "the host echo thread panicked")?;
    rt.lock().unwrap().extend(items);
    served.map_err(|e| format!("host echo: {e}"))?;
    result
}

/// A guest path: `udp-echo` served through outsourced sockets.
fn guest_path(
    net: &ProbeNet,
    policy: Option<RtPolicy>,
    args: &NetArgs,
    seconds: f64,
    rt: &Mutex<Vec<RtItem>>,
) -> Result<ProbeResult, String> {
    let addr = SocketAddrV4::new(net.host_addr(), GUEST_PORT);
    let mut config = VmConfig::new(GuestSpec::Builtin("udp-echo".into()));
    config.sample_streams = true;
    config.cmdline = format!("rt=0 addr={addr}");
    if let Some(policy) = policy {
        config.set_rt(0, policy);
        config.rt_allow_uncapped = true;
    }
    config.net = NetPolicy {
        bind: vec![AddrRule {
            net: Some(((*addr.ip()).into(), 32)),
            ports: GUEST_PORT..=GUEST_PORT,
        }],
        connect: vec![AddrRule {
            net: Some((net.probe_addr().into(), 32)),
            ports: 0..=u16::MAX,
        }],
        ..NetPolicy::default()
    };
    let console = Arc::new(Mutex::new(Vec::new()));
    let running = Vm::new(&config, Console::capture(console.clone()))
        .and_then(Vm::start)
        .map_err(|e| e.to_string())?;
    let text = || String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let start = Instant::now();
    while !text().contains("udp-echo: serving") {
        if let Some(reason) = running.wait_timeout(Duration::from_millis(10)) {
            return Err(format!(
                "the guest echo ended before serving ({reason}):\n{}",
                text()
            ));
        }
        if start.elapsed() > Duration::from_secs(10) {
            running.stop();
            return Err(format!("the guest echo did not start serving:\n{}", text()));
        }
    }
    let result = probe(net, addr, args.rate, seconds);
    let run = running.stop();
    rt.lock()
        .unwrap()
        .extend(run.rt_report.for_vcpu(0).cloned());
    result
}

/// The bare exit floor: p50 of a port write the VMM answers with nothing.
fn exit_floor_p50_us() -> Result<f64, String> {
    let mut config = VmConfig::new(GuestSpec::Builtin("rpc-bench".into()));
    config.sample_streams = true;
    config.cmdline = "count=2000".into();
    let run = Vm::new(&config, Console::default())
        .and_then(Vm::run)
        .map_err(|e| e.to_string())?;
    Stats::from_ns(&run.streams[0])
        .map(|s| s.p50_us)
        .ok_or_else(|| "no exit floor samples".into())
}

pub fn run(args: &NetArgs) -> Result<(), String> {
    let host = HostInfo::probe();
    let policy = RtPolicy {
        priority: args.priority,
        cpu: Some(args.cpu.unwrap_or_else(last_cpu)),
    };
    policy.validate()?;
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(format!(
            "--seconds {}: must be between 0 and 3600",
            args.seconds
        ));
    }
    let paths = if args.with_other { 3.0 } else { 2.0 };
    let per_path = args.seconds / paths;
    let rt = Mutex::new(Vec::new());
    let _dma = realtime::hold_cpu_dma_latency().ok();

    let net = ProbeNet::create(args.subnet)?;
    let host_result = host_path(&net, policy, args, per_path, &rt)?;
    let guest_rt = guest_path(&net, Some(policy), args, per_path, &rt)?;
    let guest_other = if args.with_other {
        Some(guest_path(&net, None, args, per_path, &rt)?)
    } else {
        None
    };
    drop(net);
    let floor = exit_floor_p50_us()?;

    let stats = |r: &ProbeResult| r.rtt.clone().expect("checked in probe()");
    let (host_stats, rt_stats) = (stats(&host_result), stats(&guest_rt));
    let bound = TARGET_FACTOR * host_stats.p99_us + floor;
    let rt_items: Vec<String> = rt
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|i| match i.result {
            Ok(()) => format!("ok: {}", i.what),
            Err(e) => format!("FAILED: {}: {e}", i.what),
        })
        .collect();

    if args.json {
        let mut machine = machine_json(&host);
        machine["rt"] = json!(rt_items);
        let mut out = json!({
            "host": host_stats.to_json(),
            "guest_rt": rt_stats.to_json(),
            "exit_floor_p50_us": floor,
            "target": {"guest_rt_p99_max_us": bound, "met": rt_stats.p99_us <= bound},
            "lost": {"host": host_result.lost, "guest_rt": guest_rt.lost},
            "timestamps": guest_rt.timestamps.as_str(),
            "machine": machine,
        });
        if let Some(other) = &guest_other {
            out["guest_other"] = stats(other).to_json();
            out["lost"]["guest_other"] = json!(other.lost);
        }
        println!("{out}");
    } else {
        println!(
            "rtvm bench net: UDP echo round trip from an external namespace, {} req/s, {:.1} s per path ({} on {}, preemption {})",
            args.rate, per_path, host.kvm_module, host.cpu_model, host.preemption
        );
        println!("{}   lost", Stats::TABLE_HEADER);
        println!("{} {:>6}", host_stats.table_row("host"), host_result.lost);
        println!("{} {:>6}", rt_stats.table_row("guest_rt"), guest_rt.lost);
        if let Some(other) = &guest_other {
            println!(
                "{} {:>6}",
                stats(other).table_row("guest_other"),
                other.lost
            );
        }
        println!(
            "guest_rt p99 {:.1} µs; target <= {TARGET_FACTOR} x host p99 + exit floor ({floor:.1} µs) = {bound:.1} µs: {}",
            rt_stats.p99_us,
            if rt_stats.p99_us <= bound { "met" } else { "not met" }
        );
        for line in rt_items {
            println!("  rt {line}");
        }
    }
    Ok(())
}
