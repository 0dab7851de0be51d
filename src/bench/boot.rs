//! `rtvm bench boot`: process start to the guest's first console line, the
//! VMM's memory beyond the guest RAM the guest touched (without and with
//! the management API, runs alternating), and how long a stop takes while
//! a vCPU is parked in a long poll.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::vcpu::VcpuState;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig, VmExitReason};

use crate::report::machine_json;

#[derive(Args)]
pub struct BootArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// How many VMs to boot, one after another.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
}

/// Targets from the foundation issue (Firecracker's published figures).
const TARGET_FIRST_OUTPUT_MS: f64 = 20.0;
const TARGET_OVERHEAD_MIB: f64 = 5.0;
/// A stop must not wait for a parked vCPU's deadline: a kick, a wake, a
/// thread join and the VM's teardown, well under a scheduling tick.
const TARGET_STOP_PARKED_MS: f64 = 10.0;

struct BootSample {
    first_output_ms: f64,
    overhead_bytes: u64,
}

/// One VM's boot; `api`: with the management API on that socket.
fn boot_once(
    exe: &PathBuf,
    vcpus: usize,
    stats: &PathBuf,
    api: Option<&PathBuf>,
) -> Result<BootSample, String> {
    let start = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--guest",
        "builtin:hello",
        "--vcpus",
        &vcpus.to_string(),
        "--stats-json",
    ])
    .arg(stats);
    if let Some(socket) = api {
        cmd.arg("--api-sock").arg(socket);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line)
        .map_err(|e| format!("reading guest output: {e}"))?;
    let first_output_ms = start.elapsed().as_secs_f64() * 1e3;
    // Drain the rest so the child never blocks on a full pipe.
    std::io::copy(&mut out, &mut std::io::sink()).ok();
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the VM: {e}"))?;
    if !status.success() || line.is_empty() {
        return Err(format!(
            "the guest did not boot cleanly ({status}, first line {line:?})"
        ));
    }
    let text = std::fs::read_to_string(stats).map_err(|e| format!("reading run stats: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("run stats: {e}"))?;
    let overhead_bytes = json["vmm_overhead_bytes"]
        .as_u64()
        .ok_or("run stats lack vmm_overhead_bytes")?;
    Ok(BootSample {
        first_output_ms,
        overhead_bytes,
    })
}

/// Starts a VM whose vCPU parks in an hour-long sleep, waits until it is
/// parked, and times `RunningVm::stop` (kick, wake, join, and dropping the
/// VM, which it returns after).
fn stop_parked_once() -> Result<f64, String> {
    let mut config = VmConfig::new(GuestSpec::Builtin("sleep-test".into()));
    config.memory = 32 << 20;
    config.cmdline = "count=1 ns=3600000000000".into();
    let output = Arc::new(Mutex::new(Vec::new()));
    let running = Vm::new(&config, Console::capture(output))
        .and_then(Vm::start)
        .map_err(|e| e.to_string())?;
    let vcpu = &running.vcpus()[0];
    if !vcpu.wait_for(VcpuState::Waiting, Duration::from_secs(10)) {
        running.stop();
        return Err("the sleep-test guest never parked its vCPU".into());
    }
    let start = Instant::now();
    let run = running.stop();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if run.reason != VmExitReason::Stopped {
        return Err(format!("the parked VM ended otherwise: {}", run.reason));
    }
    Ok(ms)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

pub fn run(args: &BootArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the rtvm binary: {e}"))?;
    let stats = std::env::temp_dir().join(format!("rtvm-bench-boot-{}.json", std::process::id()));
    let socket = std::env::temp_dir().join(format!("rtvm-bench-boot-{}.sock", std::process::id()));
    let mut samples = Vec::with_capacity(args.runs as usize);
    let mut api_samples = Vec::with_capacity(args.runs as usize);
    // Alternating, so both see the same machine.
    for _ in 0..args.runs {
        let sample = boot_once(&exe, args.vcpus, &stats, None);
        let _ = std::fs::remove_file(&stats);
        samples.push(sample?);
        let sample = boot_once(&exe, args.vcpus, &stats, Some(&socket));
        let _ = std::fs::remove_file(&stats);
        api_samples.push(sample?);
    }
    let mut api_mib: Vec<f64> = api_samples
        .iter()
        .map(|s| s.overhead_bytes as f64 / (1 << 20) as f64)
        .collect();
    api_mib.sort_by(f64::total_cmp);
    let mut api_ms: Vec<f64> = api_samples.iter().map(|s| s.first_output_ms).collect();
    api_ms.sort_by(f64::total_cmp);
    let (api_overhead_median, api_first_median) = (median(&api_mib), median(&api_ms));
    let mut ms: Vec<f64> = samples.iter().map(|s| s.first_output_ms).collect();
    ms.sort_by(f64::total_cmp);
    let mut mib: Vec<f64> = samples
        .iter()
        .map(|s| s.overhead_bytes as f64 / (1 << 20) as f64)
        .collect();
    mib.sort_by(f64::total_cmp);
    let mut stop_ms = (0..args.runs)
        .map(|_| stop_parked_once())
        .collect::<Result<Vec<f64>, String>>()?;
    stop_ms.sort_by(f64::total_cmp);
    let first_median = median(&ms);
    let overhead_median = median(&mib);
    let stop_median = median(&stop_ms);
    let host = HostInfo::probe();

    if args.json {
        let json = serde_json::json!({
            "first_output_ms": {
                "median": first_median,
                "min": ms[0],
                "max": ms[ms.len() - 1],
                "runs": ms.len(),
            },
            "vmm_overhead_mib": overhead_median,
            "with_api": {
                "vmm_overhead_mib": api_overhead_median,
                "first_output_ms_median": api_first_median,
                "overhead_ratio": api_overhead_median / overhead_median,
            },
            "stop_parked_ms": {
                "median": stop_median,
                "min": stop_ms[0],
                "max": stop_ms[stop_ms.len() - 1],
                "runs": stop_ms.len(),
            },
            "targets": {
                "first_output_ms": TARGET_FIRST_OUTPUT_MS,
                "vmm_overhead_mib": TARGET_OVERHEAD_MIB,
                "stop_parked_ms": TARGET_STOP_PARKED_MS,
            },
            "machine": machine_json(&host),
        });
        println!("{json}");
    } else {
        println!(
            "rtvm bench boot: {} runs, builtin:hello on {} vCPU(s)",
            ms.len(),
            args.vcpus
        );
        println!(
            "  host: {} ({}), preemption {}",
            host.kvm_module, host.cpu_model, host.preemption
        );
        println!(
            "  process start -> first guest line: median {first_median:.2} ms (min {:.2}, max {:.2}); target <= {TARGET_FIRST_OUTPUT_MS} ms: {:.2}x of target",
            ms[0],
            ms[ms.len() - 1],
            first_median / TARGET_FIRST_OUTPUT_MS
        );
        println!(
            "  VMM memory beyond guest RAM: median {overhead_median:.2} MiB; target <= {TARGET_OVERHEAD_MIB} MiB: {:.2}x of target",
            overhead_median / TARGET_OVERHEAD_MIB
        );
        println!(
            "  with the management API on (runs alternating): VMM memory median {api_overhead_median:.2} MiB ({:.2}x of without), first line median {api_first_median:.2} ms",
            api_overhead_median / overhead_median
        );
        println!(
            "  stop with vCPU 0 parked in a long poll: median {stop_median:.2} ms (max {:.2}); target <= {TARGET_STOP_PARKED_MS} ms: {:.2}x of target",
            stop_ms[stop_ms.len() - 1],
            stop_median / TARGET_STOP_PARKED_MS
        );
    }
    Ok(())
}
