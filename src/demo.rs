//! `rtvm demo`: the main job a newcomer runs first. It boots the built-in
//! guest on two vCPUs and reports what happened and on what kind of host.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;
use rtvm_vmm::host::HostInfo;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};

use crate::report_error;

#[derive(Args)]
pub struct DemoArgs {
    /// Number of vCPUs to boot.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
}

pub fn run(args: &DemoArgs) -> ExitCode {
    let host = HostInfo::probe();
    println!("rtvm demo: the built-in guest on {} vCPUs", args.vcpus);
    println!("  host kernel      {}", host.kernel);
    println!("  preemption model {}", host.preemption);
    println!("  KVM module       {}", host.kvm_module);
    println!("  CPU              {} x {}", host.cpus, host.cpu_model);
    if host.is_nested_pvm() {
        println!("  note: nested kvm_pvm host: guest kernel (CPL0) code is emulated here, guest user code is native");
    }
    println!("--- guest console ---");

    let mut config = VmConfig::new(GuestSpec::Builtin("hello".into()));
    config.vcpus = args.vcpus;
    let output = Arc::new(Mutex::new(Vec::new()));
    let console = Console::stdout().with_capture(output.clone());
    let result = rtvm_vmm::signals::install_termination_handlers()
        .and_then(|_| Vm::new(&config, console))
        .and_then(Vm::run);
    let run = match result {
        Ok(run) => run,
        Err(err) => return report_error(&err),
    };
    println!("--- end of guest console ---");

    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    let greeted = (0..args.vcpus)
        .filter(|i| text.contains(&format!("hello from vCPU {i} of {}", args.vcpus)))
        .count();
    println!("vCPUs that answered:  {greeted} of {}", args.vcpus);
    println!("how the guest ended:  {}", run.reason);
    println!(
        "guest run time:       {:.1} ms",
        run.guest_time.as_secs_f64() * 1e3
    );
    if let Some(overhead) = run.vmm_overhead() {
        println!(
            "VMM memory overhead:  {:.1} MiB beyond guest RAM",
            overhead as f64 / (1 << 20) as f64
        );
    }
    if greeted == args.vcpus && run.reason.is_clean() {
        println!("Every vCPU booted into long mode, dropped to user mode and reached the host through port I/O.");
        ExitCode::SUCCESS
    } else {
        eprintln!("rtvm: error: the demo guest did not run as expected");
        ExitCode::from(run.reason.exit_code().max(1))
    }
}
