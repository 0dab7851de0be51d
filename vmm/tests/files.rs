//! Outsourced files through real guests: the `fs-selftest` and `logger`
//! workloads against a share the test lays out, with the host checking what
//! landed on disk and what stayed untouched outside.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rtvm_vmm::config::ShareConfig;
use rtvm_vmm::need_kvm;
use rtvm_vmm::{Console, Vm, VmRun};

mod support;
use support::{assert_exit_0, config, one_at_a_time, start};

/// Tests here run one at a time: the descriptor-leak checks count the
/// process's open descriptors, which VMs of parallel tests would change.
static SERIAL: Mutex<()> = Mutex::new(());

/// A share laid out as `fs-selftest` expects, next to an `outside` directory
/// the guest must never reach. Removed on drop.
struct Share {
    base: PathBuf,
}

const INPUT: &[u8] = b"host-made input for the guest\nsecond line\n";

impl Share {
    fn new(name: &str) -> Share {
        let base = std::env::temp_dir().join(format!("rtvm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("share");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/a"), b"a").unwrap();
        std::fs::write(root.join("dir/b"), b"b").unwrap();
        std::fs::write(root.join("input.txt"), INPUT).unwrap();
        std::os::unix::fs::symlink("/", root.join("link-out")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"secret").unwrap();
        Share { base }
    }

    fn root(&self) -> PathBuf {
        self.base.join("share")
    }

    /// Everything outside the share, as (path, content) pairs.
    fn outside(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.base).unwrap().flatten() {
            if entry.file_name() == "share" {
                continue;
            }
            walk(&entry.path(), &mut found);
        }
        found.sort();
        found
    }
}

fn walk(path: &Path, found: &mut Vec<(PathBuf, Vec<u8>)>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            walk(&entry.path(), found);
        }
    } else {
        found.push((path.to_path_buf(), std::fs::read(path).unwrap_or_default()));
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Runs `workload` with `share` (in 64 MiB) to its end.
fn run(workload: &str, vcpus: usize, cmdline: &str, share: Option<ShareConfig>) -> (VmRun, String) {
    let mut c = config(workload, vcpus, cmdline);
    c.memory = 64 << 20;
    c.share = share;
    c.sample_streams = true;
    support::run(&c, Duration::from_secs(120))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn every_file_call_and_error_path_works_and_nothing_escapes() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("all");
    let before = share.outside();
    let size = 100_000;
    let (run, out) = run(
        "fs-selftest",
        1,
        &format!("size={size} keep=1"),
        Some(ShareConfig::new(share.root(), false)),
    );
    assert_exit_0(&run, &out);
    assert!(out.contains("checks passed"), "{out}");
    // The guest read the host-made file byte-exact.
    let expected = format!(
        "input.txt: {} bytes, fnv1a64 {:016x}",
        INPUT.len(),
        fnv1a64(INPUT)
    );
    assert!(out.contains(&expected), "expected {expected:?} in {out}");
    // Nothing outside the share was created, changed or removed.
    assert_eq!(share.outside(), before);
    for name in ["evil", "moved", "x"] {
        assert!(!share.base.join(name).exists(), "{name} escaped the share");
    }
}

#[test]
fn a_guest_written_file_reads_back_byte_exact_on_the_host() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("written");
    let size = 300_000; // far beyond the 3968-byte payload area of a call page
    let (run, out) = run(
        "fs-selftest",
        1,
        &format!("size={size} keep=1"),
        Some(ShareConfig::new(share.root(), false)),
    );
    assert_exit_0(&run, &out);
    let data = std::fs::read(share.root().join("out.bin")).expect("out.bin kept in the share");
    assert_eq!(data.len(), size);
    assert!(
        data.iter()
            .enumerate()
            .all(|(i, &b)| b as usize == (i * 7 + 3) % 251),
        "pattern differs"
    );
}

#[test]
fn read_only_share_refuses_writes() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("ro");
    let before = std::fs::read_dir(share.root()).unwrap().count();
    let (run, out) = run(
        "fs-selftest",
        1,
        "mode=readonly",
        Some(ShareConfig::new(share.root(), true)),
    );
    assert_exit_0(&run, &out);
    assert_eq!(
        std::fs::read(share.root().join("input.txt")).unwrap(),
        INPUT
    );
    assert_eq!(
        std::fs::read_dir(share.root()).unwrap().count(),
        before,
        "nothing created or removed"
    );
}

#[test]
fn limits_are_enforced_with_their_own_statuses() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("limits");
    let mut config = ShareConfig::new(share.root(), false);
    config.max_open_files = 4;
    config.max_bytes_per_call = 4096;
    config.max_bytes_written = 10_000;
    let (run, out) = run(
        "fs-selftest",
        1,
        "mode=limits open=4 call=4096 written=10000",
        Some(config),
    );
    assert_exit_0(&run, &out);
    let written = std::fs::metadata(share.root().join("quota.bin"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 10_000, "{written} bytes written past the quota");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn ten_thousand_open_close_cycles_leak_no_host_descriptor() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("cycles");
    // Other tests in this binary open and close descriptors concurrently,
    // so compare the run's own file service, then the process, with slack.
    let before = open_fds();
    let (run, out) = run(
        "fs-selftest",
        1,
        "mode=cycles count=10000",
        Some(ShareConfig::new(share.root(), false)),
    );
    assert_exit_0(&run, &out);
    assert!(out.contains("10000 open/close cycles"), "{out}");
    let after = open_fds();
    assert!(
        after <= before + 8,
        "descriptors before {before}, after {after}"
    );
}

#[test]
fn without_a_share_file_calls_answer_no_share() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let (run, out) = run("fs-selftest", 1, "mode=noshare", None);
    assert_exit_0(&run, &out);
}

#[test]
fn a_missing_share_directory_is_a_config_error() {
    let _serial = one_at_a_time(&SERIAL);
    let mut c = config("hello", 1, "");
    c.share = Some(ShareConfig::new("/nonexistent/share".into(), false));
    match Vm::new(&c, Console::default()) {
        Err(rtvm_vmm::Error::Config(msg)) => assert!(msg.contains("/nonexistent/share"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("VM created with a missing share"),
    }
}

#[test]
fn files_are_flushed_and_closed_when_the_vm_is_stopped_mid_run() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("crash");
    // The logger leaves its file open until the end; ending the VM while it
    // runs must still leave every record written so far on the host.
    let mut c = config("logger", 1, "count=100000 period=1000000");
    c.memory = 64 << 20;
    c.share = Some(ShareConfig::new(share.root(), false));
    let (running, _out) = start(&c);
    std::thread::sleep(Duration::from_millis(500));
    running.stop();
    let log = std::fs::read_to_string(share.root().join("rt.log")).expect("rt.log");
    let records = log.lines().count();
    assert!(records > 10, "{records} records");
    let last = log.lines().last().unwrap();
    assert_eq!(
        last.split_whitespace().count(),
        3,
        "whole records only: {last:?}"
    );
}

/// The descriptors a program spawned now would inherit (besides 0, 1, 2).
fn inherited_fds() -> Vec<String> {
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "ls /proc/$$/fd"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("sh runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|fd| !["0", "1", "2"].contains(fd))
        .map(String::from)
        .collect()
}

/// Issue #12: nothing the VMM opens (KVM, eventfds, timerfds, the share and
/// its files) leaks into a program it spawns (`ip`, `ldd`, cyclictest).
#[test]
fn a_running_vm_leaks_no_descriptor_into_spawned_programs() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("cloexec");
    let before = inherited_fds();
    let mut c = config("logger", 2, "count=100000 period=1000000");
    c.share = Some(ShareConfig::new(share.root(), false));
    let (running, _out) = start(&c);
    // Once the log exists, the guest has the share open and a file in it.
    let log = share.root().join("rt.log");
    let start = std::time::Instant::now();
    while !log.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no rt.log");
        std::thread::sleep(Duration::from_millis(10));
    }
    let during = inherited_fds();
    running.stop();
    assert_eq!(during, before, "descriptors a spawned program inherits");
}

#[test]
fn logger_keeps_its_deadlines_while_writing() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let share = Share::new("logger");
    let (run, out) = run(
        "logger",
        1,
        "count=300 period=2000000",
        Some(ShareConfig::new(share.root(), false)),
    );
    assert_exit_0(&run, &out);
    assert!(out.contains("logger: cycles=300"), "{out}");
    let log = std::fs::read_to_string(share.root().join("rt.log")).unwrap();
    assert_eq!(log.lines().count(), 300, "one record per period");
    assert_eq!(run.streams[0].len(), 300, "lateness per cycle");
    assert_eq!(run.streams[2].len(), 300, "write duration per cycle");
}

/// Issue #12: a VMM running as root acts as the share's owner in the
/// share, not as root: a file the guest makes belongs to the owner, and a
/// directory only root may write to stays shut to the guest.
#[test]
fn file_calls_act_as_the_share_owner_not_as_root() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("skipping: only root can hand a share to another user");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let share = Share::new("owner");
    let nobody = 65534;
    std::os::unix::fs::chown(share.root(), Some(nobody), Some(nobody)).unwrap();
    let locked = share.root().join("root-only");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = || Some(ShareConfig::new(share.root(), false));

    let (run_ok, out) = run(
        "logger",
        1,
        "count=3 period=1000000 file=made.log",
        config(),
    );
    assert_exit_0(&run_ok, &out);
    let made = std::fs::metadata(share.root().join("made.log")).unwrap();
    assert_eq!(
        (made.uid(), made.gid()),
        (nobody, nobody),
        "owned by the share's owner"
    );

    let (_, out) = run(
        "logger",
        1,
        "count=3 period=1000000 file=root-only/x.log",
        config(),
    );
    assert!(
        out.contains("logger: open root-only/x.log: ") && out.contains("FAIL"),
        "{out}"
    );
    assert!(
        !locked.join("x.log").exists(),
        "root's directory stayed shut"
    );
}
