//! `rtvm bench rpc`: the VMRPC null call (`ping`) against the raw exit floor
//! (an `out` to the NOP port, which the VMM answers with nothing), measured
//! interleaved from guest CPL3 with the guest's TSC; and the floor again
//! with the seccomp filters off, in VMs alternating with the others.

use clap::Args;
use rtvm_vmm::config::{RtBandwidth, RtPolicy, SeccompMode};
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};
use serde_json::json;

use crate::report::machine_json;
use crate::report::stats::Stats;

#[derive(Args)]
pub struct RpcArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Samples of each path.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    samples: u64,
    /// Run the measuring vCPU as a real-time vCPU (SCHED_FIFO 80, pinned to
    /// the last CPU). The guest never stops calling, so its RT bandwidth is
    /// raised to 90% for the run; the cap would otherwise throttle it.
    #[arg(long)]
    rt: bool,
}

/// The target from the VMRPC issue: a call costs at most 5% over a bare exit.
const TARGET_RATIO_P50: f64 = 1.05;
const FLOOR_STREAM: usize = 0;
const PING_STREAM: usize = 1;

pub fn run(args: &RpcArgs) -> Result<(), String> {
    super::need_tsc_clock("bench rpc")?;
    let host = HostInfo::probe();
    let mut config = VmConfig::new(GuestSpec::Builtin("rpc-bench".into()));
    config.sample_streams = true;
    if args.rt {
        config.set_rt(
            0,
            RtPolicy {
                priority: 80,
                cpu: Some(host.cpus - 1),
            },
        );
        config.rt_allow_uncapped = true;
        config.rt_bandwidth = RtBandwidth {
            runtime_us: 90_000,
            period_us: 100_000,
        };
    }
    // The same guest in eight VMs, seccomp on and off alternately, so the
    // filters' cost per exit is measured side by side with what it is
    // compared to: a host's drift falls on both alike. The ratio of minima
    // is reported beside the p50s' as the measure least moved by load
    // from elsewhere. Ping and floor are interleaved within each VM.
    let (mut floors, mut pings, mut unfiltered) = (Vec::new(), Vec::new(), Vec::new());
    let mut rt_report = None;
    const ROUNDS: u64 = 4;
    for (round, mode) in [SeccompMode::Enforce, SeccompMode::Off]
        .repeat(ROUNDS as usize)
        .into_iter()
        .enumerate()
    {
        config.seccomp = mode;
        config.cmdline = format!("count={}", (args.samples / ROUNDS).max(10));
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let vm = Vm::new(&config, Console::capture(output.clone())).map_err(|e| e.to_string())?;
        let run = vm.run().map_err(|e| e.to_string())?;
        if !run.reason.is_clean() || run.reason.exit_code() != 0 {
            let console = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
            return Err(format!(
                "the benchmark guest failed (round {round}, seccomp {mode}): {}\n{console}",
                run.reason
            ));
        }
        if mode == SeccompMode::Enforce {
            floors.extend_from_slice(&run.streams[FLOOR_STREAM]);
            pings.extend_from_slice(&run.streams[PING_STREAM]);
            rt_report.get_or_insert(run.rt_report);
        } else {
            unfiltered.extend_from_slice(&run.streams[FLOOR_STREAM]);
        }
    }
    let floor = Stats::from_ns(&floors).ok_or("the guest reported no floor samples")?;
    let ping = Stats::from_ns(&pings).ok_or("the guest reported no ping samples")?;
    let floor_unfiltered =
        Stats::from_ns(&unfiltered).ok_or("the guest reported no floor samples")?;
    let seccomp_ratio_p50 = floor.p50_us / floor_unfiltered.p50_us;
    let seccomp_ratio_min = floor.min_us / floor_unfiltered.min_us;
    let ratio_p50 = ping.p50_us / floor.p50_us;
    let rt: Vec<String> = rt_report
        .unwrap_or_default()
        .items
        .iter()
        .map(|i| match &i.result {
            Ok(()) => format!("ok: {}", i.what),
            Err(e) => format!("FAILED: {}: {e}", i.what),
        })
        .collect();

    if args.json {
        let mut machine = machine_json(&host);
        machine["rt"] = json!(rt);
        let out = json!({
            "floor": floor.to_json(),
            "ping": ping.to_json(),
            "floor_without_seccomp": floor_unfiltered.to_json(),
            "ratio_p50": ratio_p50,
            "seccomp_ratio_p50": seccomp_ratio_p50,
            "seccomp_ratio_min": seccomp_ratio_min,
            "target_ratio_p50": TARGET_RATIO_P50,
            "machine": machine,
        });
        println!("{out}");
    } else {
        println!(
            "rtvm bench rpc: {} interleaved samples per path, from guest CPL3 ({} on {}, preemption {})",
            args.samples, host.kvm_module, host.cpu_model, host.preemption
        );
        println!("{}", Stats::TABLE_HEADER);
        println!("{}", floor.table_row("floor (bare exit)"));
        println!("{}", ping.table_row("ping (VMRPC)"));
        println!("{}", floor_unfiltered.table_row("floor, no seccomp"));
        println!("ratio of p50s ping/floor: {ratio_p50:.3} (target <= {TARGET_RATIO_P50})");
        println!(
            "floor with/without the seccomp filters, ratio of p50s: {seccomp_ratio_p50:.3}, of minima: {seccomp_ratio_min:.3} (VMs alternating)"
        );
        for line in rt {
            println!("  rt {line}");
        }
    }
    Ok(())
}
