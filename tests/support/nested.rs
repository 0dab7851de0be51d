//! The nested-KVM harness: Linux guests under rtvm on a machine whose own
//! KVM cannot run them (or that has no KVM at all).
//!
//! QEMU's TCG emulates AMD SVM with nested paging. So an "outer" Linux VM
//! booted by `qemu-system-x86_64 -accel tcg -cpu EPYC` can load `kvm_amd`
//! and gets a working /dev/kvm, and rtvm runs inside it, booting the
//! "inner" Linux guest the scenario names. Everything is emulated: timings
//! inside mean nothing, function is what a scenario proves.
//!
//! The outer VM boots a Debian cloud kernel with an initramfs made by
//! `rtvm initramfs`: rtvm (with its libraries), the kernel's `irqbypass`,
//! `kvm` and `kvm-amd` modules, the inner kernel and initramfs, and a
//! driver script. The driver loads KVM, mounts a cgroup v1 `cpu` hierarchy
//! (for RT bandwidth caps), runs the scenario's command (by default
//! `rtvm run` of the inner guest with `--stats-json`), and prints rtvm's
//! status and statistics between markers. The inner initramfs holds
//! `rtvm-guest` (static), `librtvm_preload.so`, cyclictest and coreutils'
//! `sleep`.
//!
//! Each stage (QEMU up to the outer /init, loading KVM, the inner kernel's
//! boot, the scenario's command, power-off) has its own time limit; a stage
//! that overruns kills QEMU and is named in the error with the console's
//! tail. What a run leaves (images, `console.log`) stays in
//! `target/nested/SCENARIO/`.
//!
//! Needs: `qemu-system-x86_64` (Debian `qemu-system-x86`), busybox-static,
//! rt-tests, socat, apt-get (for the Debian kernels) and cargo. Nothing needs the
//! host's /dev/kvm.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The repository's root.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A Debian kernel flavour, for the inner guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `linux-image-*-cloud-amd64`: PREEMPT_DYNAMIC, no MP tables.
    Cloud,
    /// `linux-image-*-rt-amd64`: PREEMPT_RT.
    Rt,
}

impl Kernel {
    fn flavour(self) -> &'static str {
        match self {
            Kernel::Cloud => "cloud",
            Kernel::Rt => "rt",
        }
    }
}

/// How QEMU's TCG runs the outer VM's two vCPUs. Each way freezes a
/// workload the other runs, so a scenario picks the one it runs under (the
/// monitor's view of both freezes is in README, "Stalls inside the harness
/// are the emulator's").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tcg {
    /// A host thread per vCPU: what nested Linux guests need. Under it the
    /// VMM's long suite run froze now and then, both outer vCPUs stuck in
    /// the outer kernel with interrupts off.
    MultiThreaded,
    /// One host thread for both, round-robin: the suites ran clean, but a
    /// nested Linux guest stopped in its boot with both outer vCPUs halted
    /// or spinning on a seqcount.
    SingleThreaded,
}

/// What one nested run does.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Names the run's directory under `target/nested/`.
    pub name: String,
    /// The inner guest's kernel.
    pub kernel: Kernel,
    /// The command the inner guest's /init runs.
    pub guest_run: String,
    /// `rtvm run` flags beyond `--kernel`, `--initramfs` and `--stats-json`.
    pub rtvm_args: Vec<String>,
    /// Instead of `rtvm run`: a shell command the outer VM runs (with the
    /// inner kernel at /guest/vmlinuz and its initramfs at
    /// /guest/initramfs.cpio.gz all the same).
    pub outer_run: Option<String>,
    /// Host programs the outer VM gets at their own paths, with their
    /// libraries (e.g. test binaries).
    pub outer_programs: Vec<PathBuf>,
    /// How long the scenario's command may take, inner boot included.
    pub command_limit: Duration,
    /// How QEMU runs the outer vCPUs (see [`Tcg`]).
    pub tcg: Tcg,
}

impl Scenario {
    /// A scenario that boots the inner guest with `rtvm run RTVM_ARGS` and
    /// has its /init run `guest_run`.
    pub fn new(name: &str, kernel: Kernel, guest_run: &str, rtvm_args: &[&str]) -> Scenario {
        Scenario {
            name: name.into(),
            kernel,
            guest_run: guest_run.into(),
            rtvm_args: rtvm_args.iter().map(|a| a.to_string()).collect(),
            outer_run: None,
            outer_programs: Vec::new(),
            // Long enough to outlast two of the inner guest's rare ~300 s
            // stalls in a scenario (README "Stalls inside the harness").
            command_limit: Duration::from_secs(840),
            tcg: Tcg::MultiThreaded,
        }
    }
}

/// What a nested run gave back.
#[derive(Debug)]
pub struct Outcome {
    /// Everything the outer console printed: the outer /init, the driver,
    /// rtvm's output and the inner guest's console.
    pub console: String,
    /// rtvm's exit status (or the outer command's), as the driver saw it.
    pub rtvm_status: Option<i32>,
    /// The status the inner /init reported (`rtvm-init: exit N`).
    pub guest_status: Option<i32>,
    /// rtvm's `--stats-json`, when it wrote one.
    pub stats: Option<serde_json::Value>,
    /// Where the run's files are.
    pub dir: PathBuf,
}

impl Outcome {
    /// The last lines of the console, for failure messages.
    pub fn tail(&self) -> String {
        tail(&self.console, 60)
    }

    /// Panics with the console's tail unless rtvm ended with `status`.
    pub fn expect_rtvm_status(&self, status: i32) {
        assert_eq!(
            self.rtvm_status,
            Some(status),
            "rtvm's status (console in {}):\n{}",
            self.dir.display(),
            self.tail()
        );
    }

    /// rtvm ended with a fatal guest event before the inner /init printed
    /// anything (the outer /init's line is the first "starting").
    fn died_before_guest_init(&self) -> bool {
        self.rtvm_status == Some(125) && self.console.matches("rtvm-init: starting").count() < 2
    }

    /// Panics with the console's tail unless the console shows `text`.
    pub fn expect_console(&self, text: &str) {
        assert!(
            self.console.contains(text),
            "no {text:?} on the console (in {}):\n{}",
            self.dir.display(),
            self.tail()
        );
    }

    /// A counter from rtvm's statistics (`vmrpc.NAME`), 0 when absent.
    pub fn vmrpc_counter(&self, name: &str) -> u64 {
        self.stats
            .as_ref()
            .and_then(|s| s["vmrpc"][name].as_u64())
            .unwrap_or_else(|| {
                panic!(
                    "no vmrpc.{name} in rtvm's statistics {:?}:\n{}",
                    self.stats,
                    self.tail()
                )
            })
    }
}

/// A nested run that did not get to the end.
#[derive(Debug)]
pub struct NestedError {
    pub message: String,
    /// A stage overran because the outer VM itself stopped: its heartbeat
    /// (a shell loop writing to its second serial line) stopped too. No
    /// process in there, rtvm included, can stop that loop; the emulator
    /// can (README, "Stalls inside the harness are the emulator's").
    pub frozen: bool,
}

impl std::fmt::Display for NestedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What every nested run needs, made once per test process.
struct Assets {
    qemu: PathBuf,
    rtvm: PathBuf,
    /// The outer VM's kernel and its module tree (`lib/modules/VERSION`).
    outer_kernel: PathBuf,
    outer_modules: PathBuf,
    rtvm_guest: PathBuf,
    preload: PathBuf,
}

/// Whether the harness must run (CI) rather than skip when something is
/// missing.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
        || std::env::var("RTVM_REQUIRE_NESTED").as_deref() == Ok("1")
}

static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();
/// Nested runs go one at a time: each QEMU wants both CPUs, and stage
/// limits assume it has them.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `scenario`; `None` (after a note) when the harness cannot run here
/// and is not required to. Under `CI=true` a missing tool fails the test.
pub fn run(scenario: &Scenario) -> Option<Result<Outcome, NestedError>> {
    let assets = match ASSETS.get_or_init(prepare) {
        Ok(assets) => assets,
        Err(why) if required() => panic!("the nested-KVM harness cannot run: {why}"),
        Err(why) => {
            eprintln!("skipping: the nested-KVM harness cannot run here: {why}");
            return None;
        }
    };
    let _turn = lock();
    let first = run_with(assets, scenario);
    // The emulated SVM is not flawless: about one boot in several of the inner
    // kernel has died in early boot with a triple fault (RIP lost), never
    // after /init started. Such a run is tried once more, loudly; a guest
    // that dies after its /init started is never retried.
    match &first {
        Err(e) if e.frozen => {
            eprintln!(
                "nested run {:?}: the outer VM froze (its heartbeat stopped); trying once \
                 more. What was seen:\n{}",
                scenario.name, e.message
            );
            let again = Scenario {
                name: format!("{}-again", scenario.name),
                ..scenario.clone()
            };
            Some(run_with(assets, &again))
        }
        Ok(outcome) if outcome.died_before_guest_init() => {
            eprintln!(
                "nested run {:?}: the inner guest died before its /init (status {:?}); \
                 trying once more. First console kept in {}",
                scenario.name,
                outcome.rtvm_status,
                outcome.dir.display()
            );
            let again = Scenario {
                name: format!("{}-again", scenario.name),
                ..scenario.clone()
            };
            Some(run_with(assets, &again))
        }
        _ => Some(first),
    }
}

fn lock() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `cmd`, returning its stdout, or a message with its stderr.
fn checked(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The bzImage of a Debian kernel flavour, fetched once into
/// `target/debian-kernel` (shared with the other Linux-guest tests).
fn debian_kernel(kernel: Kernel) -> Result<PathBuf, String> {
    if kernel == Kernel::Cloud {
        if let Some(path) = std::env::var_os("RTVM_TEST_KERNEL") {
            return Ok(path.into());
        }
    }
    let path = checked(
        Command::new(format!("{ROOT}/scripts/fetch-debian-kernel.sh"))
            .arg(kernel.flavour())
            .arg(format!("{ROOT}/target/debian-kernel"))
            .current_dir(ROOT),
        "scripts/fetch-debian-kernel.sh",
    )?;
    Ok(PathBuf::from(path))
}

/// The cargo that runs this test.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `lib/modules/VERSION` beside a kernel unpacked from its package
/// (`DIR/boot/vmlinuz-VERSION`).
fn modules_of(kernel: &Path) -> Result<PathBuf, String> {
    let name = kernel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let version = name
        .strip_prefix("vmlinuz-")
        .ok_or_else(|| format!("{}: not a vmlinuz-VERSION file", kernel.display()))?;
    let root = kernel
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{}: not in a boot/ directory", kernel.display()))?;
    let modules = root.join("lib/modules").join(version);
    if !modules.join("kernel/arch/x86/kvm/kvm-amd.ko").is_file() {
        return Err(format!(
            "{} has no kernel/arch/x86/kvm/kvm-amd.ko: the kernel's package was not unpacked beside it",
            modules.display()
        ));
    }
    Ok(modules)
}

fn prepare() -> Result<Assets, String> {
    let qemu = checked(
        Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]),
        "looking for qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)",
    )
    .map(PathBuf::from)?;
    if !Path::new("/bin/busybox").is_file() {
        return Err("no /bin/busybox (Debian: apt-get install busybox-static)".into());
    }
    if !Path::new("/usr/bin/cyclictest").is_file() {
        return Err("no /usr/bin/cyclictest (Debian: apt-get install rt-tests)".into());
    }
    if !Path::new("/usr/bin/socat").is_file() {
        return Err("no /usr/bin/socat (Debian: apt-get install socat)".into());
    }
    let outer_kernel = debian_kernel(Kernel::Cloud)?;
    let outer_modules = modules_of(&outer_kernel)?;
    // The guest tools, built in a target directory of their own: the
    // static build needs other flags, which would otherwise invalidate the
    // artefacts of the test build this runs from.
    let tools = format!("{ROOT}/target/nested-tools");
    let cargo = cargo();
    checked(
        Command::new(&cargo)
            .args([
                "build",
                "--release",
                "-p",
                "rtvm-guest-linux",
                "--bin",
                "rtvm-guest",
            ])
            .args([
                "--target",
                "x86_64-unknown-linux-gnu",
                "--target-dir",
                &tools,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(ROOT),
        "building a static rtvm-guest",
    )?;
    checked(
        Command::new(&cargo)
            .args([
                "build",
                "--release",
                "-p",
                "rtvm-preload",
                "--target-dir",
                &tools,
            ])
            .env_remove("RUSTFLAGS")
            .current_dir(ROOT),
        "building librtvm_preload.so",
    )?;
    Ok(Assets {
        qemu,
        rtvm: PathBuf::from(env!("CARGO_BIN_EXE_rtvm")),
        outer_kernel,
        outer_modules,
        rtvm_guest: PathBuf::from(format!(
            "{tools}/x86_64-unknown-linux-gnu/release/rtvm-guest"
        )),
        preload: PathBuf::from(format!("{tools}/release/librtvm_preload.so")),
    })
}

/// The outer VM's driver: loads KVM, prepares what rtvm's RT setup and the
/// guest tools expect, runs the command and reports.
fn driver_script(command: &str) -> String {
    format!(
        r#"# The nested-KVM harness's driver, run by the outer VM's /init.
# A heartbeat on the second serial line: the harness tells a frozen outer
# VM (the emulator's doing) from a stuck command (ours) by it.
( while :; do echo beat > /dev/ttyS1; sleep 2; done ) 2>/dev/null &
echo "nested-stage: loading kvm"
for m in irqbypass kvm kvm-amd; do
    insmod /nested/$m.ko || {{ echo "nested: cannot load $m.ko"; exit 90; }}
done
[ -c /dev/kvm ] || {{ echo "nested: no /dev/kvm after loading kvm-amd"; exit 91; }}
# RT bandwidth caps need the cgroup v1 cpu controller, as on our hosts.
mount -t tmpfs cgroup /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/cpu \
    && mount -t cgroup -o cpu,cpuacct cgroup /sys/fs/cgroup/cpu \
    || echo "nested: no cgroup v1 cpu controller"
echo "nested: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# Guests' outsourced sockets talk over the outer VM's loopback, and
# `rtvm probe` reaches them over a veth pair.
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up || echo "nested: no loopback"
insmod /nested/veth.ko 2>/dev/null || echo "nested: no veth module"
echo "nested-stage: command"
{command}
status=$?
echo "nested: rtvm status $status"
if [ -s /tmp/stats.json ]; then
    echo "nested: stats begin"
    cat /tmp/stats.json
    echo
    echo "nested: stats end"
fi
exit 0
"#
    )
}

fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn rtvm_initramfs(assets: &Assets, args: &[String], what: &str) -> Result<(), NestedError> {
    checked(Command::new(&assets.rtvm).arg("initramfs").args(args), what)
        .map(drop)
        .map_err(|message| NestedError {
            message,
            frozen: false,
        })
}

/// How long the outer VM's heartbeat may be silent before the VM counts as
/// frozen.
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(30);

/// One stage of a run: it is over when the console has shown `until`.
struct Stage {
    name: &'static str,
    until: &'static str,
    limit: Duration,
}

fn run_with(assets: &Assets, scenario: &Scenario) -> Result<Outcome, NestedError> {
    let fail = |message: String| NestedError {
        message,
        frozen: false,
    };
    let dir = PathBuf::from(format!("{ROOT}/target/nested/{}", scenario.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let inner_kernel = debian_kernel(scenario.kernel).map_err(fail)?;
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();

    // The inner guest's initramfs: rtvm's guest tools and test programs.
    let mut inner = vec![
        "--out".to_string(),
        path("initramfs.cpio.gz"),
        "--add".into(),
        format!("{}:/bin/rtvm-guest", assets.rtvm_guest.display()),
        "--add".into(),
        format!("{}:/lib/librtvm_preload.so", assets.preload.display()),
        "--program".into(),
        "/usr/bin/cyclictest".into(),
        "--program".into(),
        "/usr/bin/sleep".into(),
        "--program".into(),
        "/usr/bin/socat".into(),
        "--run".into(),
        scenario.guest_run.clone(),
    ];
    if scenario.guest_run.is_empty() {
        inner.truncate(inner.len() - 2);
    }
    rtvm_initramfs(assets, &inner, "building the inner initramfs")?;

    let command = scenario.outer_run.clone().unwrap_or_else(|| {
        let mut words = vec![
            quote(&assets.rtvm.to_string_lossy()),
            "run".into(),
            "--kernel".into(),
            "/guest/vmlinuz".into(),
            "--initramfs".into(),
            "/guest/initramfs.cpio.gz".into(),
            "--stats-json".into(),
            "/tmp/stats.json".into(),
        ];
        words.extend(scenario.rtvm_args.iter().map(|a| quote(a)));
        words.join(" ")
    });
    let driver = dir.join("driver.sh");
    std::fs::write(&driver, driver_script(&command))
        .map_err(|e| fail(format!("{}: {e}", driver.display())))?;

    let modules = &assets.outer_modules.join("kernel");
    let mut outer = vec![
        "--out".to_string(),
        path("outer.cpio.gz"),
        "--program".into(),
        assets.rtvm.to_string_lossy().into_owned(),
        "--add".into(),
        format!("{}:/guest/vmlinuz", inner_kernel.display()),
        "--add".into(),
        format!("{}:/guest/initramfs.cpio.gz", path("initramfs.cpio.gz")),
        "--add".into(),
        format!("{}:/nested/driver.sh", driver.display()),
        "--run".into(),
        "sh /nested/driver.sh".into(),
    ];
    for (module, file) in [
        ("irqbypass", "virt/lib/irqbypass.ko"),
        ("kvm", "arch/x86/kvm/kvm.ko"),
        ("kvm-amd", "arch/x86/kvm/kvm-amd.ko"),
        // For `rtvm probe`'s veth pair.
        ("veth", "drivers/net/veth.ko"),
    ] {
        outer.push("--add".into());
        outer.push(format!(
            "{}:/nested/{module}.ko",
            modules.join(file).display()
        ));
    }
    for program in &scenario.outer_programs {
        outer.push("--program".into());
        outer.push(program.to_string_lossy().into_owned());
    }
    rtvm_initramfs(assets, &outer, "building the outer initramfs")?;

    // The inner boot is part of the command's stage unless rtvm runs it.
    let mut stages = vec![
        Stage {
            name: "QEMU booting the outer VM to its /init",
            until: "rtvm-init: starting",
            limit: Duration::from_secs(90),
        },
        Stage {
            name: "loading kvm_amd in the outer VM",
            until: "nested-stage: command",
            limit: Duration::from_secs(60),
        },
    ];
    if scenario.outer_run.is_none() {
        // A boot takes under a minute; the emulator's stalls (README,
        // "Stalls inside the harness") last about 300 s and end by
        // themselves, and one came during a boot: outlasted here too.
        stages.push(Stage {
            name: "the inner guest's kernel booting to its /init",
            until: "rtvm-init: starting",
            limit: Duration::from_secs(480),
        });
    }
    stages.push(Stage {
        name: "the scenario's command",
        until: "nested: rtvm status",
        limit: scenario.command_limit,
    });
    stages.push(Stage {
        name: "the outer VM powering off",
        until: "reboot: Power down",
        limit: Duration::from_secs(60),
    });

    let console_path = dir.join("console.log");
    let monitor = dir.join("monitor.sock");
    let heartbeat = dir.join("heartbeat.log");
    let mut child = Command::new(&assets.qemu)
        .arg("-accel")
        .arg(match scenario.tcg {
            Tcg::MultiThreaded => "tcg,thread=multi",
            Tcg::SingleThreaded => "tcg,thread=single",
        })
        .args(["-smp", "2", "-m", "2G"])
        // EPYC: an SVM-capable model whose nested guests keep both vCPUs
        // (EPYC-Rome hangs the inner guest's second vCPU).
        .args(["-cpu", "EPYC", "-M", "q35", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio", "-serial"])
        .arg(format!("file:{}", heartbeat.display()))
        .arg("-monitor")
        // The monitor answers where each outer vCPU is when a stage
        // overruns: a frozen emulator and a busy guest look alike on the
        // console.
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-kernel")
        .arg(&assets.outer_kernel)
        .arg("-initrd")
        .arg(path("outer.cpio.gz"))
        // nokaslr: the outer kernel's addresses match its System.map.
        .args(["-append", "console=ttyS0 panic=-1 quiet nokaslr"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", assets.qemu.display())))?;
    let (lines, from_qemu) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let errors = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let _ = errors.send(format!("qemu: {}", String::from_utf8_lossy(&line)));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = lines.send(String::from_utf8_lossy(&line).into_owned());
        }
    });

    // A line showing a later stage's marker skips the stages between (a
    // guest that panics never shows its /init starting). The console goes
    // to its file as it comes, to follow a long run.
    let mut log = std::fs::File::create(&console_path)
        .map_err(|e| fail(format!("{}: {e}", console_path.display())))?;
    let mut console = String::new();
    let mut timed_out = None;
    let start = Instant::now();
    let mut stage = 0;
    let mut deadline = Instant::now() + stages[0].limit;
    while stage < stages.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match from_qemu.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if let Some(done) = stages[stage..].iter().position(|s| line.contains(s.until)) {
                    stage += done + 1;
                    if let Some(next) = stages.get(stage) {
                        deadline = Instant::now() + next.limit;
                    }
                }
                let _ = writeln!(log, "{line}");
                console.push_str(line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = Some(&stages[stage]);
                break;
            }
            // QEMU has ended: what it printed is all there is.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let cpus = timed_out.map(|_| where_the_cpus_are(&monitor));
    // Seconds since the outer VM's last heartbeat, when a stage overran.
    let silent = timed_out.map(|_| {
        std::fs::metadata(&heartbeat)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map_or(u64::MAX, |age| age.as_secs())
    });
    let _ = child.kill();
    let _ = child.wait();
    while let Ok(line) = from_qemu.try_recv() {
        let _ = writeln!(log, "{line}");
        console.push_str(&line);
        console.push('\n');
    }
    if let Some(stage) = timed_out {
        let silent = silent.unwrap_or(u64::MAX);
        return Err(NestedError {
            message: format!(
                "nested run {:?}: stage \"{}\" did not finish within {:?} ({:.0} s into the run; \
                 the outer VM's last heartbeat {}); console in {}, its tail:\n{}\n\n{}",
                scenario.name,
                stage.name,
                stage.limit,
                start.elapsed().as_secs_f64(),
                if silent == u64::MAX {
                    "never came".to_string()
                } else {
                    format!("{silent} s before")
                },
                console_path.display(),
                tail(&console, 60),
                cpus.unwrap_or_default()
            ),
            // Beats come every 2 s; half a minute of silence is no hiccup.
            frozen: silent >= HEARTBEAT_SILENCE.as_secs(),
        });
    }

    let number_after = |marker: &str| -> Option<i32> {
        let at = console.find(marker)? + marker.len();
        console[at..].split_whitespace().next()?.parse().ok()
    };
    let rtvm_status = number_after("nested: rtvm status ");
    if rtvm_status.is_none() {
        return Err(fail(format!(
            "nested run {:?}: QEMU ended before the scenario's command did; console in {}, \
             its tail:\n{}",
            scenario.name,
            console_path.display(),
            tail(&console, 60)
        )));
    }
    // The inner /init's line comes before the driver's report; the outer
    // /init's own comes after it.
    let report = console
        .find("nested: rtvm status ")
        .unwrap_or(console.len());
    let guest_status = console[..report]
        .rfind("rtvm-init: exit ")
        .and_then(|at| console[at + 16..].split_whitespace().next()?.parse().ok());
    let stats = console
        .find("nested: stats begin\n")
        .zip(console.find("nested: stats end"))
        .and_then(|(from, to)| serde_json::from_str(&console[from + 20..to]).ok());
    Ok(Outcome {
        console,
        rtvm_status,
        guest_status,
        stats,
        dir,
    })
}

/// Where QEMU's vCPUs are, three looks half a second apart, through its
/// monitor: each vCPU's RIP, CPL and halt state, and the instructions
/// there. Under emulated SVM a vCPU in guest mode shows the nested
/// guest's registers. (Debian ships no real System.map; with `nokaslr`
/// the outer kernel's addresses match its /proc/kallsyms, to look up by
/// hand.)
fn where_the_cpus_are(monitor: &Path) -> String {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let mut report = String::from("where QEMU's vCPUs were (its monitor):\n");
    for look in 0..3 {
        if look > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let answer = (|| -> std::io::Result<String> {
            let mut stream = UnixStream::connect(monitor)?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"info registers -a\ncpu 0\nx/3i $pc\ncpu 1\nx/3i $pc\n")?;
            let mut text = Vec::new();
            let mut chunk = [0u8; 4096];
            // The answer ends when the monitor goes quiet.
            while let Ok(n) = stream.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&chunk[..n]);
            }
            Ok(String::from_utf8_lossy(&text).into_owned())
        })();
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                report.push_str(&format!("  the monitor did not answer: {e}\n"));
                break;
            }
        };
        report.push_str(&format!("  look {look}:\n"));
        for line in answer.lines().map(str::trim) {
            if line.starts_with("CPU#") || line.starts_with("RIP=") || line.starts_with("0x") {
                report.push_str(&format!("    {line}\n"));
            }
        }
    }
    report
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The test binaries of the VMM's own KVM suites (`rtvm-vmm`'s unit and
/// integration tests and the `rtvm` binary's `cli` tests), as this `cargo test` built
/// them, each copied without its debug information into `dir` (the outer
/// initramfs holds them all in RAM).
pub fn kvm_suites(dir: &Path) -> Result<Vec<PathBuf>, String> {
    // The same command as the run this test is part of, so nothing is
    // rebuilt: only the names of the fresh artefacts are wanted.
    let listing = checked(
        Command::new(cargo())
            .args(["test", "--workspace", "--no-run", "--message-format=json"])
            .current_dir(ROOT),
        "listing the test binaries",
    )?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut suites = Vec::new();
    for line in listing.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let package = message["package_id"].as_str().unwrap_or("");
        let name = target["name"].as_str().unwrap_or("");
        let Some(exe) = message["executable"].as_str() else {
            continue;
        };
        // Every test binary of rtvm-vmm (its unit tests' too) and `cli`.
        let tests = message["profile"]["test"].as_bool() == Some(true)
            || target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if !(tests && (package.contains("#rtvm-vmm@") || name == "cli")) {
            continue;
        }
        let copy = dir.join(name);
        checked(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(exe)
                .arg(&copy),
            "objcopy --strip-debug of a test binary",
        )?;
        suites.push(copy);
    }
    suites.sort();
    if suites.is_empty() {
        return Err(format!("cargo listed no VMM test binaries:\n{listing}"));
    }
    Ok(suites)
}
