//! `rtvm bench net`: round-trip latency of a UDP echo, measured from outside
//! by `rtvm probe` (its own network namespace, kernel timestamps), against
//! the same service along each path, back to back in one run:
//!
//! - `host`: a host echo server thread at the same SCHED_FIFO priority/CPU;
//! - `guest_rt`: the guest's `udp-echo` on an RT vCPU, through outsourced
//!   sockets (its receive is a long poll: no guest interrupt);
//! - `guest_other` (optional): the same on a plain SCHED_OTHER vCPU;
//! - `guest_rt_ring`: the same echo through the exitless I/O rings, the RT
//!   vCPU parked in `NetRingWait` between datagrams, the VM's I/O poller at the
//!   same priority on another CPU;
//! - `guest_rt_ring_spin`: the same, the guest spinning on its completion
//!   ring at CPL3 for a window first.
//!
//! Each guest path also reports its CPU cost: the vCPU thread's and the I/O
//! poller's CPU time per request and in % of a CPU.
//!
//! Targets: guest p99 ≤ 1.2 × host p99 + one raw exit floor (the bare VM
//! exit round trip, measured here too), since a guest answer costs at least
//! one exit more than the host's; through the rings with a park ≤ 1.2 × host
//! p99 + 0.5 × exit floor (no exit on the critical path, one entry); with a
//! guest spin ≤ 2 × host p99 + 10 µs (no transition at all).

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
    /// Host CPU of the I/O poller on the ring paths [default: the first
    /// CPU that is not the RT vCPU's].
    #[arg(long)]
    poller_cpu: Option<usize>,
    /// SCHED_FIFO priority of the I/O poller on the ring paths; 0:
    /// SCHED_OTHER. The poller polls only while the guest owes an answer,
    /// so a FIFO poller leaves the probe sharing its CPU room (none of
    /// 10,000 requests lost in two runs here); a SCHED_OTHER one is what
    /// the probe's CPU work delays, by milliseconds at times.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=99))]
    poller_priority: u8,
    /// The guest's spin window on the spinning ring path, in µs: placed
    /// around the receive its rhythm predicts, wide enough for this
    /// machine's jitter (50 µs caught few).
    #[arg(long, default_value_t = 200)]
    guest_spin_us: u64,
    /// Leave the ring paths out.
    #[arg(long)]
    no_rings: bool,
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

/// How a guest path answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `NetRecv` long polls and `NetSend` calls.
    Calls,
    /// The I/O rings, parking in `NetRingWait`.
    RingPark,
    /// The I/O rings, spinning first.
    RingSpin,
}

/// What a guest path cost in CPU: the vCPU thread's and the poller's.
struct Cost {
    vcpu: Duration,
    poller: Duration,
    wall: Duration,
    requests: u64,
    /// The poller's polling window as it had adapted by the end, µs.
    window_us: f64,
}

impl Cost {
    fn json(&self) -> serde_json::Value {
        let total = (self.vcpu + self.poller).as_secs_f64();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / self.requests.max(1) as f64;
        let pct = |d: Duration| d.as_secs_f64() * 100.0 / self.wall.as_secs_f64().max(1e-9);
        json!({
            "cpu_us_per_request": total * 1e6 / self.requests.max(1) as f64,
            "vcpu_us_per_request": per(self.vcpu),
            "poller_us_per_request": per(self.poller),
            "vcpu_cpu_percent": pct(self.vcpu),
            "poller_cpu_percent": pct(self.poller),
            "poller_window_us": self.window_us,
        })
    }

    fn row(&self) -> String {
        let total = (self.vcpu + self.poller).as_secs_f64();
        format!(
            "{:>9.1} {:>6.1}% {:>6.1}%",
            total * 1e6 / self.requests.max(1) as f64,
            self.vcpu.as_secs_f64() * 100.0 / self.wall.as_secs_f64().max(1e-9),
            self.poller.as_secs_f64() * 100.0 / self.wall.as_secs_f64().max(1e-9),
        )
    }
}

/// A guest path: `udp-echo` served through outsourced sockets.
fn guest_path(
    net: &ProbeNet,
    policy: Option<RtPolicy>,
    answer: Answer,
    args: &NetArgs,
    seconds: f64,
    rt: &Mutex<Vec<RtItem>>,
) -> Result<(ProbeResult, Cost), String> {
    let addr = SocketAddrV4::new(net.host_addr(), GUEST_PORT);
    let mut config = VmConfig::new(GuestSpec::Builtin("udp-echo".into()));
    config.sample_streams = true;
    config.cmdline = format!("rt=0 addr={addr}");
    match answer {
        Answer::Calls => {}
        Answer::RingPark => config.cmdline.push_str(" ring=park"),
        Answer::RingSpin => config
            .cmdline
            .push_str(&format!(" ring=spin spin={}", args.guest_spin_us)),
    }
    if let Some(policy) = policy {
        config.set_rt(0, policy);
        config.rt_allow_uncapped = true;
        // The poller on another CPU than the RT vCPU's.
        let rt_cpu = policy.cpu.unwrap_or_else(last_cpu);
        let cpu = args.poller_cpu.unwrap_or(if rt_cpu == 0 { 1 } else { 0 });
        config.io_poller.rt = (args.poller_priority > 0).then_some(RtPolicy {
            priority: args.poller_priority,
            cpu: Some(cpu),
        });
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
    let ready = if answer == Answer::Calls {
        "udp-echo: serving"
    } else {
        "udp-echo: through rings"
    };
    while !text().contains(ready) {
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
    let before = (
        running.vcpus()[0].cpu_time().unwrap_or_default(),
        running.poller_cpu().unwrap_or_default(),
        Instant::now(),
    );
    let result = probe(net, addr, args.rate, seconds);
    let after = (
        running.vcpus()[0].cpu_time().unwrap_or_default(),
        running.poller_cpu().unwrap_or_default(),
        Instant::now(),
    );
    let run = running.stop();
    rt.lock()
        .unwrap()
        .extend(run.rt_report.for_vcpu(0).cloned());
    if answer != Answer::Calls {
        rt.lock().unwrap().extend(
            run.rt_report
                .items
                .iter()
                .filter(|i| i.what.starts_with("I/O poller"))
                .cloned(),
        );
    }
    let result = result?;
    let cost = Cost {
        vcpu: after.0.saturating_sub(before.0),
        poller: after.1.saturating_sub(before.1),
        wall: after.2.duration_since(before.2),
        requests: result.sent.max(1),
        window_us: run.rings.window_ns as f64 / 1e3,
    };
    Ok((result, cost))
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
    let paths = 2.0 + f64::from(u8::from(args.with_other)) + if args.no_rings { 0.0 } else { 2.0 };
    let per_path = args.seconds / paths;
    let rt = Mutex::new(Vec::new());
    let _dma = realtime::hold_cpu_dma_latency().ok();

    let net = ProbeNet::create(args.subnet)?;
    let host_result = host_path(&net, policy, args, per_path, &rt)?;
    let (guest_rt, rt_cost) = guest_path(&net, Some(policy), Answer::Calls, args, per_path, &rt)?;
    let guest_other = if args.with_other {
        Some(guest_path(&net, None, Answer::Calls, args, per_path, &rt)?)
    } else {
        None
    };
    let rings = if args.no_rings {
        None
    } else {
        Some((
            guest_path(&net, Some(policy), Answer::RingPark, args, per_path, &rt)?,
            guest_path(&net, Some(policy), Answer::RingSpin, args, per_path, &rt)?,
        ))
    };
    drop(net);
    let floor = exit_floor_p50_us()?;

    let stats = |r: &ProbeResult| r.rtt.clone().expect("checked in probe()");
    let (host_stats, rt_stats) = (stats(&host_result), stats(&guest_rt));
    let bound = TARGET_FACTOR * host_stats.p99_us + floor;
    let park_bound = TARGET_FACTOR * host_stats.p99_us + 0.5 * floor;
    let spin_bound = 2.0 * host_stats.p99_us + 10.0;
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
            "settings": {
                "rate": args.rate,
                "seconds_per_path": per_path,
                "poller_spin_us": rtvm_vmm::config::IoPollerConfig::default().spin_us,
                "poller_priority": args.poller_priority,
                "guest_spin_us": args.guest_spin_us,
            },
        });
        let with_cost = |r: &ProbeResult, c: &Cost| {
            let mut v = stats(r).to_json();
            for (k, x) in c.json().as_object().expect("an object") {
                v[k] = x.clone();
            }
            v
        };
        out["guest_rt"] = with_cost(&guest_rt, &rt_cost);
        if let Some((other, cost)) = &guest_other {
            out["guest_other"] = with_cost(other, cost);
            out["lost"]["guest_other"] = json!(other.lost);
        }
        if let Some(((park, park_cost), (spin, spin_cost))) = &rings {
            out["guest_rt_ring"] = with_cost(park, park_cost);
            out["guest_rt_ring_spin"] = with_cost(spin, spin_cost);
            out["lost"]["guest_rt_ring"] = json!(park.lost);
            out["lost"]["guest_rt_ring_spin"] = json!(spin.lost);
            out["target"]["guest_rt_ring_p99_max_us"] = json!(park_bound);
            out["target"]["guest_rt_ring_met"] = json!(stats(park).p99_us <= park_bound);
            out["target"]["guest_rt_ring_spin_p99_max_us"] = json!(spin_bound);
            out["target"]["guest_rt_ring_spin_met"] = json!(stats(spin).p99_us <= spin_bound);
        }
        println!("{out}");
    } else {
        println!(
            "rtvm bench net: UDP echo round trip from an external namespace, {} req/s, {:.1} s per path ({} on {}, preemption {})",
            args.rate, per_path, host.kvm_module, host.cpu_model, host.preemption
        );
        println!("{}   lost  cpu_us/req  vcpu%  poller%", Stats::TABLE_HEADER);
        println!("{} {:>6}", host_stats.table_row("host"), host_result.lost);
        let row = |name: &str, r: &ProbeResult, c: &Cost| {
            println!("{} {:>6} {}", stats(r).table_row(name), r.lost, c.row());
        };
        row("guest_rt", &guest_rt, &rt_cost);
        if let Some((other, cost)) = &guest_other {
            row("guest_other", other, cost);
        }
        if let Some(((park, park_cost), (spin, spin_cost))) = &rings {
            row("guest_rt_ring", park, park_cost);
            row("guest_rt_ring_spin", spin, spin_cost);
        }
        println!(
            "guest_rt p99 {:.1} µs; target <= {TARGET_FACTOR} x host p99 + exit floor ({floor:.1} µs) = {bound:.1} µs: {}",
            rt_stats.p99_us,
            if rt_stats.p99_us <= bound { "met" } else { "not met" }
        );
        if let Some(((park, _), (spin, _))) = &rings {
            let met = |ok: bool| if ok { "met" } else { "not met" };
            println!(
                "guest_rt_ring p99 {:.1} µs; target <= {TARGET_FACTOR} x host p99 + 0.5 x exit floor = {park_bound:.1} µs: {}",
                stats(park).p99_us,
                met(stats(park).p99_us <= park_bound)
            );
            println!(
                "guest_rt_ring_spin p99 {:.1} µs; target <= 2 x host p99 + 10 µs = {spin_bound:.1} µs: {}",
                stats(spin).p99_us,
                met(stats(spin).p99_us <= spin_bound)
            );
        }
        for line in rt_items {
            println!("  rt {line}");
        }
    }
    Ok(())
}
