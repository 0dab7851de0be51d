//! `rtvm`: the command line of the rtvm real-time VMM.

mod api;
mod bench;
mod ctl;
mod demo;
mod flags;
mod initramfs;
mod probe;
mod report;

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use flags::{RtVcpuArg, ShareArg};
use rtvm_vmm::config::{
    parse_byte_size, parse_size, AddrRule, AdvanceMode, HugePages, IoPollerConfig, RtBandwidth,
    SeccompMode,
};
use rtvm_vmm::seccomp::{self, ThreadKind};
use rtvm_vmm::{Console, Error, GuestSpec, Vm, VmConfig, VmRun};

/// Exit status for bad user input (flags, config file, guest name).
pub const EXIT_USAGE: u8 = 2;
/// Exit status for a host-side failure (no KVM, out of memory…).
pub const EXIT_HOST_ERROR: u8 = 1;

#[derive(Parser)]
#[command(
    name = "rtvm",
    version,
    about = "A real-time virtual machine monitor for Linux/KVM",
    long_about = "rtvm runs real-time work in KVM guests with host-grade timing: guests call the host \
                  through VMRPC and wait through VM long polling on real-time vCPUs.\n\n\
                  Logging: set RUST_LOG (e.g. RUST_LOG=debug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it ends; exits with the guest's status.
    Run(Box<RunArgs>),
    /// The main demonstration: boots the built-in guest on 2 vCPUs and reports.
    Demo(demo::DemoArgs),
    /// Benchmarks, reporting figures measured side by side in one run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Network round-trip latency from a namespace of its own, as an external
    /// host would measure it (UDP, kernel timestamps, 198.18.0.0/15 only).
    Probe(probe::ProbeArgs),
    /// Build an initramfs (gzipped newc cpio) for a Linux guest: busybox,
    /// rtvm's guest tools, programs with their libraries, and an /init.
    #[command(long_about = initramfs::LONG_HELP)]
    Initramfs(initramfs::InitramfsArgs),
    /// Drive an `rtvm run --api-sock PATH`: info, vcpus, pause, resume,
    /// stop, metrics, start.
    Ctl(ctl::CtlArgs),
}

#[derive(Args, Clone, Default)]
pub struct RunArgs {
    /// TOML file with the VM's options; flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The guest: builtin:NAME, a workload of the built-in guest (an unknown NAME lists them all).
    #[arg(long, value_name = "SPEC")]
    guest: Option<GuestSpec>,
    /// Boot a Linux kernel (bzImage or ELF vmlinux) instead of a built-in guest.
    #[arg(long, value_name = "PATH", conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// The initramfs of the Linux guest.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<usize>,
    /// Guest RAM, e.g. 64M or 1G; a bare number is MiB [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Arguments for the guest, e.g. "status=3".
    #[arg(long, value_name = "ARGS")]
    cmdline: Option<String>,
    /// Also write the guest console to FILE.
    #[arg(long, value_name = "FILE")]
    serial_log: Option<PathBuf>,
    /// The KVM device node [default: /dev/kvm].
    #[arg(long, value_name = "PATH")]
    kvm_device: Option<PathBuf>,
    /// Make a vCPU real-time: INDEX:prio=P[,cpu=C] (SCHED_FIFO priority P,
    /// pinned to host CPU C). Repeat for more vCPUs.
    #[arg(long = "rt-vcpu", value_name = "SPEC")]
    rt_vcpus: Vec<RtVcpuArg>,
    /// Refuse to start if any real-time setting cannot be applied.
    #[arg(long)]
    rt_strict: bool,
    /// Run real-time vCPUs even where no per-VM RT bandwidth cap can be made
    /// (then only the kernel's system-wide RT throttle bounds a guest that
    /// spins). Without it such a VM refuses to start.
    #[arg(long)]
    rt_allow_uncapped: bool,
    /// Pages that back guest RAM: thp (transparent huge pages), off (4 KiB),
    /// hugetlbfs (the host's reserved 2 MiB pages) [default: thp].
    #[arg(long, value_name = "MODE")]
    huge_pages: Option<HugePages>,
    /// Fault all of guest RAM in at start (no first-touch faults later).
    #[arg(long)]
    prefault: bool,
    /// Lock all memory (mlockall) when real-time vCPUs exist.
    #[arg(long)]
    mlock: bool,
    /// RT bandwidth cap of the RT vCPUs' cgroup: RUNTIME_US/PERIOD_US [default: 400000/1000000].
    #[arg(long, value_name = "R/P")]
    rt_bandwidth: Option<RtBandwidth>,
    /// Timer advance of long polls on RT vCPUs: auto, off, or e.g. 20us [default: auto].
    #[arg(long, value_name = "MODE")]
    timer_advance: Option<AdvanceMode>,
    /// Serve the guest's file calls from host directory DIR (DIR:ro for read-only).
    #[arg(long, value_name = "DIR[:ro]")]
    share: Option<ShareArg>,
    /// Most files the guest may hold open in the share [default: 64].
    #[arg(long, value_name = "N", requires = "share")]
    share_max_open: Option<usize>,
    /// Most bytes one file call may move, e.g. 1M [default: 1M].
    #[arg(long, value_name = "SIZE", requires = "share", value_parser = parse_byte_size)]
    share_max_call: Option<u64>,
    /// Most bytes the guest may write into the share in all, e.g. 1G [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "share", value_parser = parse_byte_size)]
    share_max_written: Option<u64>,
    /// Most entries the guest may make one directory hold [default: 10000].
    #[arg(long, value_name = "N", requires = "share")]
    share_max_dir_entries: Option<usize>,
    /// The I/O poller serving the guest's I/O rings: off, on, or
    /// spin=US[,prio=P][,cpu=C] (its polling window after work, and
    /// SCHED_FIFO priority P pinned to host CPU C) [default: on, spin=50,
    /// SCHED_OTHER off the RT vCPUs' CPUs].
    #[arg(long, value_name = "SPEC")]
    io_poller: Option<IoPollerConfig>,
    /// Let the guest bind local ADDRESS:PORT (PORT may be LO-HI or *; repeatable).
    #[arg(long = "net-bind", value_name = "ADDR:PORT")]
    net_bind: Vec<AddrRule>,
    /// Let the guest connect/send to ADDRESS:PORT (repeatable).
    #[arg(long = "net-connect", value_name = "ADDR:PORT")]
    net_connect: Vec<AddrRule>,
    /// Most sockets the guest may hold open [default: 64].
    #[arg(long, value_name = "N")]
    net_max_sockets: Option<usize>,
    /// Most bytes each guest socket may buffer per direction, e.g. 256K [default: 256K].
    #[arg(long, value_name = "SIZE", value_parser = parse_byte_size)]
    net_max_buffer: Option<u64>,
    /// Seccomp filters on every thread: on, log (let calls outside a
    /// filter through, logged by the kernel), off (for debugging) [default: on].
    #[arg(long, value_name = "MODE")]
    seccomp: Option<SeccompMode>,
    /// Write how the run ended and what it cost (RSS, times) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Serve the management API (HTTP/1.1 + JSON) on Unix socket PATH; with
    /// no guest named, wait for one to be configured and started through it.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

impl RunArgs {
    /// The configuration: the file's, then each flag given on top.
    fn to_config(&self) -> Result<VmConfig, Error> {
        let guest = match (&self.guest, &self.kernel) {
            (Some(guest), _) => Some(guest.clone()),
            (None, Some(kernel)) => Some(GuestSpec::Linux(kernel.clone())),
            (None, None) => None,
        };
        let mut config =
            match (&self.config, &guest) {
                (Some(path), _) => VmConfig::from_file(path)?,
                (None, Some(guest)) => VmConfig::new(guest.clone()),
                (None, None) => return Err(Error::Config(
                    "say which guest to run: --guest builtin:NAME, --kernel PATH or --config FILE"
                        .into(),
                )),
            };
        if let Some(guest) = guest {
            config.guest = guest;
        }
        if let Some(initramfs) = &self.initramfs {
            config.initramfs = Some(initramfs.clone());
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(memory) = self.memory {
            config.memory = memory;
        }
        if let Some(cmdline) = &self.cmdline {
            config.cmdline = cmdline.clone();
        }
        if let Some(log) = &self.serial_log {
            config.serial_log = Some(log.clone());
        }
        if let Some(dev) = &self.kvm_device {
            config.kvm_device = dev.clone();
        }
        for rt in &self.rt_vcpus {
            config.set_rt(rt.vcpu, rt.policy);
        }
        config.rt_strict |= self.rt_strict;
        config.rt_allow_uncapped |= self.rt_allow_uncapped;
        config.mlock |= self.mlock;
        config.prefault |= self.prefault;
        if let Some(pages) = self.huge_pages {
            config.huge_pages = pages;
        }
        if let Some(bw) = self.rt_bandwidth {
            config.rt_bandwidth = bw;
        }
        if let Some(advance) = self.timer_advance {
            config.timer_advance = advance;
        }
        if let Some(mode) = self.seccomp {
            config.seccomp = mode;
        }
        if let Some(poller) = &self.io_poller {
            config.io_poller = poller.clone();
        }
        if let Some(ShareArg(share)) = &self.share {
            config.share = Some(share.clone());
        }
        config.net.bind.extend(self.net_bind.iter().cloned());
        config.net.connect.extend(self.net_connect.iter().cloned());
        if let Some(n) = self.net_max_sockets {
            config.net.max_sockets = n;
        }
        if let Some(n) = self.net_max_buffer {
            config.net.max_buffer = n;
        }
        if let Some(share) = &mut config.share {
            if let Some(n) = self.share_max_open {
                share.max_open_files = n;
            }
            if let Some(n) = self.share_max_call {
                share.max_bytes_per_call = n;
            }
            if let Some(n) = self.share_max_written {
                share.max_bytes_written = n;
            }
            if let Some(n) = self.share_max_dir_entries {
                share.max_dir_entries = n;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// Builds the console for `config`: the terminal, plus the log file if asked.
pub fn console_for(config: &VmConfig) -> Result<Console, Error> {
    let console = Console::stdout();
    match &config.serial_log {
        Some(path) => {
            let file = File::create(path).map_err(|e| {
                Error::Config(format!("cannot create serial log {}: {e}", path.display()))
            })?;
            Ok(console.with_file(file))
        }
        None => Ok(console),
    }
}

/// The process status for an error that kept a VM from running.
pub fn report_error(err: &Error) -> ExitCode {
    eprintln!("rtvm: error: {err}");
    ExitCode::from(if err.is_user_error() {
        EXIT_USAGE
    } else {
        EXIT_HOST_ERROR
    })
}

fn stats_json(run: &VmRun) -> serde_json::Value {
    serde_json::json!({
        "exit_reason": run.reason.to_string(),
        "exit_code": run.reason.exit_code(),
        "clean": run.reason.is_clean(),
        "guest_time_ms": run.guest_time.as_secs_f64() * 1e3,
        "process_rss_bytes": run.process_rss,
        "guest_resident_bytes": run.guest_resident,
        "vmm_overhead_bytes": run.vmm_overhead(),
        "stuck_vcpus": run.stuck,
        "vmrpc": {
            "calls": run
                .calls
                .calls
                .iter()
                .map(|(call, count)| (format!("{call:?}"), serde_json::json!(count)))
                .collect::<serde_json::Map<_, _>>(),
            "refused": run.calls.refused,
            "long_polls": run.calls.long_polls,
            "io_parks": run.calls.io_parks,
        },
        "open_sockets": run.open_sockets,
        "io_rings": {
            "rings": run.rings.rings,
            "submissions": run.rings.submissions,
            "completions": run.rings.completions,
            "kicks": run.rings.kicks,
            "poller_sleeps": run.rings.sleeps,
            "poller_spin_ms": run.rings.spin_ns as f64 / 1e6,
            "poller_window_us": run.rings.window_ns as f64 / 1e3,
            "served_by_parked_vcpu": run.rings.by_vcpu,
            "poller_cpu_ms": run.poller_cpu.map(|d| d.as_secs_f64() * 1e3),
        },
    })
}

fn run(args: &RunArgs) -> ExitCode {
    // The socket from the flag, else from the configuration file.
    let api_sock = args.api_sock.clone().or_else(|| {
        let path = args.config.as_ref()?;
        VmConfig::from_file(path).ok()?.api_sock
    });
    if let Some(socket) = api_sock {
        return api::run(args, &socket);
    }
    let result = args.to_config().and_then(|config| {
        rtvm_vmm::signals::install_termination_handlers()?;
        let running = Vm::new(&config, console_for(&config)?)?.start()?;
        // From here this thread only waits, tears down and reports.
        seccomp::confine_current_thread(ThreadKind::Control, config.seccomp)?;
        if !running.rt_report().is_empty() {
            eprint!("{}", running.rt_report());
        }
        Ok(running.wait())
    });
    match result {
        Ok(run) => finish_run(&run, args.stats_json.as_deref()),
        Err(err) => report_error(&err),
    }
}

/// Reports how a VM's run ended (and its stats, if asked); its status.
pub fn finish_run(run: &VmRun, stats_json_path: Option<&std::path::Path>) -> ExitCode {
    if !run.stuck.is_empty() {
        eprintln!(
            "rtvm: error: vCPU threads {:?} were blocked in the host and did not stop",
            run.stuck
        );
    }
    if run.reason.is_clean() {
        tracing::info!("{}", run.reason);
    } else {
        eprintln!("rtvm: error: {}", run.reason);
    }
    if let Some(path) = stats_json_path {
        let text = serde_json::to_string_pretty(&stats_json(run)).expect("JSON of plain values");
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("rtvm: error: cannot write {}: {e}", path.display());
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    }
    ExitCode::from(run.reason.exit_code())
}

fn main() -> ExitCode {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RUST_LOG as `LEVEL` and `TARGET=LEVEL` directives (tracing's
    // `Targets`): what people use of env_logger's syntax, without the regex
    // engine EnvFilter brings (a quarter MiB of resident code in every VMM).
    let log = std::env::var("RUST_LOG").ok();
    let filter = match log.as_deref().map(str::parse::<Targets>) {
        Some(Ok(filter)) => filter,
        Some(Err(e)) => {
            eprintln!("rtvm: RUST_LOG ignored ({e}); logging warnings");
            Targets::new().with_default(tracing::Level::WARN)
        }
        None => Targets::new().with_default(tracing::Level::WARN),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .finish()
        .with(filter)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(cmd) => bench::run(&cmd),
        Command::Probe(args) => probe::run(&args),
        Command::Initramfs(args) => initramfs::run(&args),
        Command::Ctl(args) => ctl::run(&args),
    }
}
