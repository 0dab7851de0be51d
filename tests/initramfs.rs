//! `rtvm initramfs` as a user meets it: the archive it writes is read back
//! (gunzip, then the newc reader of `src/initramfs/newc.rs`, whose own
//! round-trip tests run here too) and checked member by member; programs
//! and `/init` are run from an extracted copy where the host allows.
//!
//! Host files: /bin/busybox (Debian busybox-static) and /usr/bin/cyclictest
//! (Debian rt-tests). A test needing one is skipped when it is missing,
//! except under CI (`CI` set), where a missing one is a failure.

mod support;
use support::{output_within, rtvm, text};

#[allow(dead_code)]
#[path = "../src/initramfs/newc.rs"]
mod newc;

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use newc::{read_newc, Entry, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};

const BUSYBOX: &str = "/bin/busybox";
const CYCLICTEST: &str = "/usr/bin/cyclictest";

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("rtvm-initramfs-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn file(&self, name: &str, data: &[u8], perm: u32) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, data).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(perm)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether the host file a test needs is there; under CI it must be.
fn host_has(path: &str, package: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{path} is missing under CI: .ci/run must install {package}"
    );
    eprintln!("skipped: {path} is missing (apt-get install {package})");
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The archive read back: the decompressed bytes and the members.
struct Archive {
    raw: Vec<u8>,
    entries: Vec<Entry>,
}

impl Archive {
    fn read(path: &Path) -> Self {
        let gz = fs::read(path).expect("archive written");
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .expect("valid gzip");
        let entries = read_newc(&raw).expect("valid newc archive");
        Self { raw, entries }
    }

    fn get(&self, path: &str) -> &Entry {
        self.entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} is not in the archive: {:?}", self.paths()))
    }

    fn has(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.path == path)
    }

    fn paths(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn init(&self) -> String {
        let init = self.get("/init");
        assert_eq!(init.mode, S_IFREG | 0o755, "/init is an executable file");
        String::from_utf8(init.data.clone()).expect("/init is text")
    }

    /// Writes the members below `root` (device nodes left out).
    fn extract(&self, root: &Path) {
        for entry in &self.entries {
            let path = root.join(entry.path.trim_start_matches('/'));
            match entry.kind() {
                S_IFDIR => fs::create_dir_all(&path).unwrap(),
                S_IFREG => fs::write(&path, &entry.data).unwrap(),
                S_IFLNK => std::os::unix::fs::symlink(text(&entry.data), &path).unwrap(),
                _ => continue,
            }
            if entry.kind() != S_IFLNK {
                fs::set_permissions(&path, fs::Permissions::from_mode(entry.perm())).unwrap();
            }
        }
    }
}

/// Runs `rtvm initramfs ARGS --out DIR/out.cpio.gz`.
fn build(dir: &TempDir, args: &[&str]) -> (Output, PathBuf) {
    let out_path = dir.join("out.cpio.gz");
    let out = output_within(
        rtvm()
            .arg("initramfs")
            .arg("--out")
            .arg(&out_path)
            .args(args),
        Duration::from_secs(60),
    );
    (out, out_path)
}

fn build_ok(dir: &TempDir, args: &[&str]) -> (Output, Archive) {
    let (out, path) = build(dir, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rtvm initramfs {args:?}: {}",
        text(&out.stderr)
    );
    (out, Archive::read(&path))
}

#[test]
fn added_files_come_back_byte_exact_with_modes_parents_and_init() {
    let dir = TempDir::new("add");
    let busybox = dir.file("busybox", b"#!/bin/sh\n# not really busybox\n", 0o755);
    // 13 bytes: not a multiple of 4, so the padding is exercised.
    let note = dir.file("note.txt", b"hello, guest\n", 0o640);
    let tool = dir.file("tool", b"#!/bin/sh\necho tool\n", 0o755);
    let empty = dir.file("empty", b"", 0o644);
    let (out, archive) = build_ok(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--add",
            &format!("{}:/etc/rtvm/note.txt", note.display()),
            "--add",
            &format!("{}:/opt/rtvm/bin/tool", tool.display()),
            "--add",
            &format!("{}:/var/empty", empty.display()),
            "--run",
            "echo hi",
        ],
    );
    assert!(
        text(&out.stdout).contains("wrote "),
        "{}",
        text(&out.stdout)
    );

    let note = archive.get("/etc/rtvm/note.txt");
    assert_eq!(note.mode, S_IFREG | 0o640);
    assert_eq!(note.data, b"hello, guest\n");
    let tool = archive.get("/opt/rtvm/bin/tool");
    assert_eq!(tool.mode, S_IFREG | 0o755);
    assert_eq!(tool.data, b"#!/bin/sh\necho tool\n");
    assert_eq!(archive.get("/var/empty").data, b"");

    let busybox = archive.get("/bin/busybox");
    assert_eq!(busybox.mode, S_IFREG | 0o755);
    assert_eq!(busybox.data, b"#!/bin/sh\n# not really busybox\n");
    let sh = archive.get("/bin/sh");
    assert_eq!((sh.kind(), sh.data.as_slice()), (S_IFLNK, &b"busybox"[..]));
    let console = archive.get("/dev/console");
    assert_eq!((console.kind(), console.rdev), (S_IFCHR, (5, 1)));
    for mount_point in ["/proc", "/sys", "/dev", "/tmp"] {
        assert_eq!(archive.get(mount_point).kind(), S_IFDIR, "{mount_point}");
    }

    // Every parent is there, as a directory, before what it holds; no path twice.
    let mut seen = HashSet::new();
    for entry in &archive.entries {
        let parent = Path::new(&entry.path).parent().unwrap().to_str().unwrap();
        if parent != "/" {
            assert!(
                seen.contains(parent),
                "{} comes before its parent",
                entry.path
            );
            assert_eq!(archive.get(parent).kind(), S_IFDIR, "{parent}");
        }
        assert!(seen.insert(entry.path.clone()), "{} twice", entry.path);
    }
    for parent in [
        "/etc",
        "/etc/rtvm",
        "/opt",
        "/opt/rtvm",
        "/opt/rtvm/bin",
        "/var",
    ] {
        assert_eq!(archive.get(parent).mode, S_IFDIR | 0o755, "{parent}");
    }

    // The trailer ends the archive (read_newc also fails without one).
    // 110-byte header + "TRAILER!!!\0" padded to 124 bytes.
    let trailer_at = archive.raw.len() - 124;
    assert_eq!(&archive.raw[trailer_at..trailer_at + 6], b"070701");
    assert_eq!(
        &archive.raw[trailer_at + 110..trailer_at + 120],
        b"TRAILER!!!"
    );

    let init = archive.init();
    assert!(init.starts_with("#!/bin/sh\n"), "{init}");
    for needed in [
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "echo 'rtvm-init: starting'",
        "/bin/sh -c 'echo hi'",
        "status=$?",
        "echo \"rtvm-init: exit $status\"",
        "if [ -x /bin/rtvm-guest ]; then",
        "/bin/rtvm-guest exit \"$status\"",
        "poweroff -f",
    ] {
        assert!(init.contains(needed), "/init lacks {needed:?}:\n{init}");
    }
    let exit_at = init.find("/bin/rtvm-guest exit").unwrap();
    assert!(
        init[exit_at..].contains("poweroff -f"),
        "poweroff comes last:\n{init}"
    );
    assert!(
        !init.contains("RTVM_RT_CPU"),
        "no RT vCPU was asked for:\n{init}"
    );
}

#[test]
fn same_inputs_give_the_same_archive() {
    let dir = TempDir::new("same");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let args = ["--busybox", busybox.to_str().unwrap(), "--run", "true"];
    let (_, first) = build_ok(&dir, &args);
    let (_, second) = build_ok(&dir, &args);
    assert_eq!(first.raw, second.raw);
    assert!(first.init().contains("/bin/sh -c 'true'"));
}

#[test]
fn default_command_says_there_is_none() {
    let dir = TempDir::new("default-run");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let (_, archive) = build_ok(&dir, &["--busybox", busybox.to_str().unwrap()]);
    assert!(archive
        .init()
        .contains("/bin/sh -c 'echo rtvm-init: no command'"));
}

#[test]
fn init_passes_sh_syntax_check_and_notes_the_rt_cpu() {
    let dir = TempDir::new("syntax");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let run = r#"taskset -c "$RTVM_RT_CPU" echo 'it''s "quoted"' $HOME; exit 3"#;
    let (out, archive) = build_ok(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--rt-cpu",
            "2",
            "--run",
            run,
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("isolcpus=2 nohz_full=2 rcu_nocbs=2"),
        "{stdout}"
    );
    assert!(stdout.contains("--cmdline"), "{stdout}");
    let init = archive.init();
    assert!(init.contains("RTVM_RT_CPU=2\n"), "{init}");
    assert!(
        init.contains("isolcpus=2 nohz_full=2 rcu_nocbs=2"),
        "{init}"
    );
    assert!(init.contains("real-time vCPU is 2"), "{init}");

    let script = dir.file("init", init.as_bytes(), 0o755);
    let check = |shell: &[&str]| {
        let out = output_within(
            Command::new(shell[0])
                .args(&shell[1..])
                .arg("-n")
                .arg(&script),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{shell:?} -n /init: {}\n{init}",
            text(&out.stderr)
        );
    };
    check(&["sh"]);
    if Path::new(BUSYBOX).exists() {
        // The shell /init really runs under.
        check(&[BUSYBOX, "sh"]);
    }

    // The quoting keeps the command intact: the host shell runs the same
    // `/bin/sh -c …` line and gets the command's own output and status.
    let line = init
        .lines()
        .find(|l| l.starts_with("/bin/sh -c "))
        .expect("the command line");
    let out = output_within(
        Command::new("sh")
            .arg("-c")
            .arg(line)
            .env("RTVM_RT_CPU", "0")
            .env("HOME", "/root"),
        Duration::from_secs(10),
    );
    assert_eq!(text(&out.stdout), "its \"quoted\" /root\n");
    assert_eq!(out.status.code(), Some(3));
}

/// The files `ldd` says `file` needs (loader included), as absolute paths.
fn ldd_paths(file: &str) -> Vec<String> {
    let ldd = Command::new("ldd").arg(file).output().unwrap();
    text(&ldd.stdout)
        .lines()
        .map(|line| line.split_once("=> ").map_or(line.trim(), |(_, rest)| rest))
        .filter_map(|path| path.split(" (").next())
        .filter(|path| path.starts_with('/'))
        .map(str::to_string)
        .collect()
}

#[test]
fn program_comes_with_its_libraries_and_loader() {
    if !host_has(CYCLICTEST, "rt-tests") {
        return;
    }
    let dir = TempDir::new("program");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let (_, archive) = build_ok(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--program",
            CYCLICTEST,
            "--run",
            "cyclictest -q -l 10",
        ],
    );
    let program = archive.get(CYCLICTEST);
    assert_eq!(program.mode, S_IFREG | 0o755);
    assert_eq!(program.data, fs::read(CYCLICTEST).unwrap());
    let named = |name: &str| {
        archive
            .entries
            .iter()
            .find(|e| e.path.ends_with(&format!("/{name}")) && e.kind() == S_IFREG)
            .unwrap_or_else(|| panic!("no {name} in {:?}", archive.paths()))
    };
    assert!(named("libc.so.6").data.len() > 100_000, "the real libc");
    assert!(named("ld-linux-x86-64.so.2").data.starts_with(b"\x7fELF"));
    // Exactly where ldd (and so the guest's loader) looks for them.
    for path in ldd_paths(CYCLICTEST) {
        assert!(archive.has(&path), "{path} from ldd is missing");
        assert_eq!(archive.get(&path).data, fs::read(&path).unwrap(), "{path}");
    }

    // The program runs from the archive alone (root: chroot).
    if is_root() {
        let root = dir.join("root");
        archive.extract(&root);
        let out = output_within(
            Command::new("chroot")
                .arg(&root)
                .args([CYCLICTEST, "--help"]),
            Duration::from_secs(30),
        );
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(
            all.contains("cyclictest V"),
            "cyclictest in a chroot: {all}"
        );
    }
}

#[test]
fn added_dynamic_elf_files_come_with_their_libraries() {
    // A preload library (here libgcc_s, which librtvm_preload.so itself
    // needs) and a program added under another name: both are useless
    // without what they link to.
    const LIBGCC: &str = "/lib/x86_64-linux-gnu/libgcc_s.so.1";
    if !host_has(CYCLICTEST, "rt-tests") || !Path::new(LIBGCC).is_file() {
        return;
    }
    let dir = TempDir::new("add-dynamic");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let static_file = dir.file("data", b"not ELF", 0o644);
    let (_, archive) = build_ok(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--add",
            &format!("{LIBGCC}:/lib/libpreload.so"),
            "--add",
            &format!("{CYCLICTEST}:/opt/ct"),
            "--add",
            &format!("{}:/etc/data", static_file.display()),
        ],
    );
    assert_eq!(
        archive.get("/lib/libpreload.so").data,
        fs::read(LIBGCC).unwrap()
    );
    for file in [LIBGCC, CYCLICTEST] {
        let needed = ldd_paths(file);
        for path in &needed {
            assert!(archive.has(path), "{path}, which {file} needs, is missing");
        }
        assert!(
            needed.len() >= 2,
            "ldd {file} lists libc and the loader at least"
        );
    }
    assert_eq!(archive.get("/etc/data").data, b"not ELF");
}

#[test]
fn program_with_an_unresolvable_library_is_refused() {
    if !host_has(CYCLICTEST, "rt-tests") {
        return;
    }
    let dir = TempDir::new("unresolved");
    let busybox = dir.file("busybox", b"bb", 0o755);
    // cyclictest needing "libnumx.so.1", which no host has.
    let mut binary = fs::read(CYCLICTEST).unwrap();
    let at = binary
        .windows(12)
        .position(|w| w == b"libnuma.so.1")
        .expect("cyclictest links libnuma");
    binary[at + 6] = b'x';
    let broken = dir.file("cyclictest-broken", &binary, 0o755);
    let (out, _) = build(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--program",
            broken.to_str().unwrap(),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("libnumx.so.1"), "{stderr}");
    assert!(!dir.join("out.cpio.gz").exists(), "no archive on failure");
}

#[test]
fn default_busybox_goes_in_as_bin_busybox() {
    if !host_has(BUSYBOX, "busybox-static") {
        return;
    }
    let dir = TempDir::new("busybox");
    let (_, archive) = build_ok(&dir, &[]);
    let busybox = archive.get("/bin/busybox");
    assert_eq!(busybox.mode, S_IFREG | 0o755);
    assert_eq!(busybox.data, fs::read(BUSYBOX).unwrap());
    assert_eq!(archive.get("/bin/sh").data, b"busybox");
}

#[test]
fn init_runs_the_command_and_hands_its_status_to_rtvm_guest() {
    // /init itself, under the real busybox, in a chroot of the extracted
    // archive, in mount and PID namespaces of its own (so its mounts stay
    // there, and a poweroff there ends only that namespace). A stand-in
    // rtvm-guest records its arguments and ends /init (SIGKILL), which runs
    // as PID 2 so that the signal is delivered.
    if !host_has(BUSYBOX, "busybox-static") {
        return;
    }
    let namespaces_work = is_root()
        && Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !namespaces_work {
        eprintln!("skipped: needs root and unshare --mount --pid");
        return;
    }
    let dir = TempDir::new("boot");
    let fake_guest = dir.file(
        "rtvm-guest",
        b"#!/bin/sh\necho \"rtvm-guest $*\" > /tmp/rtvm-guest.out\nkill -KILL $PPID\n",
        0o755,
    );
    let (_, archive) = build_ok(
        &dir,
        &[
            "--add",
            &format!("{}:/bin/rtvm-guest", fake_guest.display()),
            "--rt-cpu",
            "1",
            "--run",
            "echo \"hi from $(uname -s) on cpu $RTVM_RT_CPU\"; \
             grep -q ' /dev/shm tmpfs ' /proc/mounts && echo 'shm is mounted'; \
             ls /proc/self >/dev/null && exit 3",
        ],
    );
    let root = dir.join("root");
    archive.extract(&root);
    let out = output_within(
        Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child", "chroot"])
            .arg(&root)
            // `; echo` keeps /init a child (PID 2), not the namespace's init.
            .args(["/bin/busybox", "sh", "-c", "/init; echo \"init ended: $?\""]),
        Duration::from_secs(30),
    );
    let stdout = text(&out.stdout);
    let started = stdout.find("rtvm-init: starting").expect(&stdout);
    let said_hi = stdout.find("hi from Linux on cpu 1\n").expect(&stdout);
    let ended = stdout.find("rtvm-init: exit 3\n").expect(&stdout);
    assert!(started < said_hi && said_hi < ended, "{stdout}");
    assert!(stdout.contains("shm is mounted\n"), "/dev/shm: {stdout}");
    assert!(!stdout.contains("cannot mount"), "{stdout}");
    assert!(!stdout.contains("powering off"), "{stdout}");
    assert!(
        stdout.ends_with("init ended: 137\n"),
        "killed by rtvm-guest: {stdout}"
    );
    let recorded = fs::read_to_string(root.join("tmp/rtvm-guest.out")).expect(&stdout);
    assert_eq!(recorded, "rtvm-guest exit 3\n");
    // `busybox --install -s` made the applets.
    assert!(fs::symlink_metadata(root.join("bin/mount")).is_ok());
}

#[test]
fn missing_program_is_refused_with_its_path() {
    let dir = TempDir::new("missing");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let missing = dir.join("no-such-program");
    let (out, path) = build(
        &dir,
        &[
            "--busybox",
            busybox.to_str().unwrap(),
            "--program",
            missing.to_str().unwrap(),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert!(!path.exists(), "no archive on failure");
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let dir = TempDir::new("bad");
    let busybox = dir.file("busybox", b"bb", 0o755);
    let bb = busybox.to_str().unwrap();
    let note = dir.file("note", b"x", 0o644);
    let missing = dir.join("nothing-here");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--busybox".into(), missing.display().to_string()],
            "busybox-static",
        ),
        (
            vec![
                "--busybox".into(),
                bb.into(),
                "--add".into(),
                format!("{}:/x", missing.display()),
            ],
            "nothing-here",
        ),
        (
            vec![
                "--busybox".into(),
                bb.into(),
                "--add".into(),
                "relative/file".into(),
            ],
            "GUEST",
        ),
        (
            vec![
                "--busybox".into(),
                bb.into(),
                "--add".into(),
                format!("{}:/a/../b", note.display()),
            ],
            "..",
        ),
        (
            vec![
                "--busybox".into(),
                bb.into(),
                "--add".into(),
                format!("{}:/init", note.display()),
            ],
            "/init is given twice",
        ),
        (
            vec![
                "--busybox".into(),
                bb.into(),
                "--add".into(),
                format!("{}:/tmp", dir.0.display()),
            ],
            "not a regular file",
        ),
        (vec!["--rt-cpu".into(), "x".into()], "--rt-cpu"),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, _) = build(&dir, &args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // --out is required.
    let out = output_within(rtvm().args(["initramfs"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--out"));
}

#[test]
fn help_describes_the_command() {
    let out = output_within(
        rtvm().args(["initramfs", "--help"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in [
        "--out",
        "--busybox",
        "--add",
        "--program",
        "--run",
        "--rt-cpu",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    let out = output_within(rtvm().arg("--help"), Duration::from_secs(10));
    assert!(text(&out.stdout).contains("initramfs"));
}
