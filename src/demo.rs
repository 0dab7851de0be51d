//! `rtvm demo`: the main job a newcomer runs first. It boots the built-in
//! guest on two vCPUs, then runs the timer comparison — bare host, guest
//! interrupt path, guest long polling — and says what the numbers mean.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};

use crate::bench::timer::{self, TimerArgs, Workload};
use crate::{report_error, EXIT_HOST_ERROR};

#[derive(Args)]
pub struct DemoArgs {
    /// How long the timer comparison runs, in seconds (split between its paths).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Where the plot and the histograms are written.
    #[arg(long, value_name = "DIR", default_value = "rtvm-demo")]
    out_dir: PathBuf,
}

const VCPUS: usize = 2;

pub fn run(args: &DemoArgs) -> ExitCode {
    let host = HostInfo::probe();
    println!("rtvm demo");
    println!("  host kernel      {}", host.kernel);
    println!("  preemption model {}", host.preemption);
    println!("  KVM module       {}", host.kvm_module);
    println!("  CPU              {} x {}", host.cpus, host.cpu_model);
    if host.is_nested_pvm() {
        println!("  note: nested kvm_pvm host: guest kernel (CPL0) code is emulated here, guest user code is native");
    }

    // 1. The machine works: every vCPU boots and reaches the host.
    let mut config = VmConfig::new(GuestSpec::Builtin("hello".into()));
    config.vcpus = VCPUS;
    let output = Arc::new(Mutex::new(Vec::new()));
    let result = rtvm_vmm::signals::install_termination_handlers()
        .and_then(|_| Vm::new(&config, Console::capture(output.clone())))
        .and_then(Vm::run);
    let run = match result {
        Ok(run) => run,
        Err(err) => return report_error(&err),
    };
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    let greeted = (0..VCPUS)
        .filter(|i| text.contains(&format!("hello from vCPU {i} of {VCPUS}")))
        .count();
    println!(
        "\nboot: {greeted} of {VCPUS} vCPUs answered from guest user mode in {:.1} ms ({})",
        run.guest_time.as_secs_f64() * 1e3,
        run.reason
    );
    if greeted != VCPUS || !run.reason.is_clean() {
        eprintln!("rtvm: error: the demo guest did not boot as expected:\n{text}");
        return ExitCode::from(run.reason.exit_code().max(1));
    }

    // 2. The point of rtvm: a guest task's timer as precise as the host's.
    println!("\ntimer comparison, {:.0} s: a 1 ms periodic task on the host, in the guest by interrupt, in the guest by long polling", args.seconds);
    let timer_args = TimerArgs {
        seconds: args.seconds,
        period_us: 1000,
        load: false,
        json: false,
        histogram_dir: Some(args.out_dir.clone()),
        plot: Some(args.out_dir.join("timer-latency.svg")),
        with_cyclictest: false,
        with_noadvance: false,
        workload: Workload::Periodic,
        frame_work_us: 0,
        priority: 80,
        cpu: None,
        linux: None,
        linux_tools: None,
        trace: false,
        rounds: None,
        minutes: None,
        compare_memory: false,
    };
    let report = match timer::measure(&timer_args) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("rtvm: error: timer comparison: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    report.print_table();
    let written = report.write_histograms(&args.out_dir).and_then(|files| {
        report
            .write_plot(timer_args.plot.as_ref().unwrap())
            .map(|_| files)
    });
    match written {
        Ok(files) => {
            println!(
                "\nplot:       {}",
                timer_args.plot.as_ref().unwrap().display()
            );
            for f in files {
                println!("histogram:  {}", f.display());
            }
        }
        Err(e) => {
            eprintln!("rtvm: error: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    }
    println!("\n{}", report.summary());
    ExitCode::SUCCESS
}
