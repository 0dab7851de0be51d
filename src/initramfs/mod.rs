//! `rtvm initramfs`: builds the initramfs a Linux guest boots into.
//!
//! The archive (gzip-compressed newc cpio, see [`newc`]) holds:
//! - busybox (Debian's `busybox-static`) as `/bin/busybox`, with `/bin/sh`
//!   linking to it; `/init` installs the other applets with
//!   `busybox --install -s` at boot;
//! - files given with `--add HOST[:GUEST]` (rtvm's guest tools, data),
//!   each dynamically linked ELF file (a program or a shared library such
//!   as `librtvm_preload.so`) with the shared libraries it needs;
//! - programs given with `--program PATH`, at the same path, with every
//!   shared library their ELF headers name (found in the system library
//!   directories, nothing run) and their dynamic loader;
//! - the directories of all of these, `/proc`, `/sys`, `/dev`, `/tmp`,
//!   `/run`, a `/dev/console` node, and `/init`: a shell script that mounts
//!   proc, sysfs, devtmpfs and a tmpfs on `/dev/shm` (POSIX shared memory,
//!   which cyclictest and others use), runs the `--run` command once, prints its
//!   status as `rtvm-init: exit N`, and ends the VM (`/bin/rtvm-guest exit
//!   N` when that exists, else `poweroff -f`).
//!
//! Owners are root and all mtimes 0, so the same inputs give the same bytes.

// The reader is for tests: tests/initramfs.rs includes newc.rs to check archives.
#[allow(dead_code)]
pub mod newc;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use flate2::write::GzEncoder;
use flate2::Compression;

#[allow(unused_imports)] // the library face, for tests and other commands
pub use newc::{read_newc, write_newc, Entry};

use crate::{EXIT_HOST_ERROR, EXIT_USAGE};

/// Where busybox is looked for by default (Debian's `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// The command `/init` runs when none is given.
pub const DEFAULT_RUN: &str = "echo rtvm-init: no command";
/// rtvm's guest tool; `/init` ends the VM through it when it is present.
pub const RTVM_GUEST: &str = "/bin/rtvm-guest";

/// The long `--help` text of `rtvm initramfs`.
pub const LONG_HELP: &str =
    "Builds a gzip-compressed cpio (newc) initramfs for a Linux guest: busybox, \
                  files, programs with their shared libraries, and an /init script that mounts \
                  proc, sysfs and devtmpfs, runs one command, prints `rtvm-init: exit N` and \
                  ends the VM (through /bin/rtvm-guest when added, else poweroff -f).\n\n\
                  Debian's busybox-static has no chrt: add util-linux's with \
                  --program /usr/bin/chrt.\n\n\
                  Example:\n  rtvm initramfs --out rt.cpio.gz \\\n    \
                  --add target/release/rtvm-guest:/bin/rtvm-guest \\\n    \
                  --program /usr/bin/cyclictest --rt-cpu 1 \\\n    \
                  --run \"cyclictest -m -p 90 -a 1 -l 10000 -q\"";

#[derive(Args, Clone, Debug)]
pub struct InitramfsArgs {
    /// Write the archive (gzip-compressed newc cpio) to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// A statically linked busybox (Debian: apt-get install busybox-static).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BUSYBOX)]
    pub busybox: PathBuf,
    /// Add the host file HOST_PATH as GUEST_PATH (default: the same path,
    /// which must then be absolute); permission bits are kept. A dynamically
    /// linked ELF file (program or shared library) comes with the shared
    /// libraries its ELF header names (from the system library directories). Repeatable.
    #[arg(long = "add", value_name = "HOST_PATH[:GUEST_PATH]", value_parser = parse_add)]
    pub add: Vec<AddFile>,
    /// Add the program at PATH (same path in the guest, mode 0755) with the
    /// shared libraries its ELF header names and its dynamic loader (from the system library directories). Repeatable.
    #[arg(long = "program", value_name = "PATH")]
    pub programs: Vec<PathBuf>,
    /// The shell command /init runs once [default: "echo rtvm-init: no command"].
    #[arg(long, value_name = "COMMAND")]
    pub run: Option<String>,
    /// The guest CPU (vCPU index) meant for real-time work: /init exports it
    /// as RTVM_RT_CPU, and the kernel cmdline isolating it is suggested.
    #[arg(long, value_name = "N")]
    pub rt_cpu: Option<u32>,
}

/// A host file to put into the archive (`--add HOST_PATH[:GUEST_PATH]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddFile {
    /// The file on the host (symlinks are followed).
    pub host: PathBuf,
    /// Its absolute path in the guest.
    pub guest: String,
}

/// `HOST_PATH[:GUEST_PATH]`: the text after the last `:` is GUEST_PATH when
/// it is an absolute path; otherwise the whole text is HOST_PATH.
pub fn parse_add(text: &str) -> Result<AddFile, String> {
    let (host, guest) = match text.rsplit_once(':') {
        Some((host, guest)) if guest.starts_with('/') && !host.is_empty() => (host, guest),
        _ => (text, text),
    };
    if host.is_empty() {
        return Err("empty HOST_PATH".into());
    }
    if !guest.starts_with('/') {
        return Err(format!(
            "{text:?}: say where it goes in the guest, as {text}:/GUEST/PATH"
        ));
    }
    Ok(AddFile {
        host: PathBuf::from(host),
        guest: guest_path(guest)?,
    })
}

/// What to put into an initramfs; see [`build`].
#[derive(Clone, Debug, Default)]
pub struct InitramfsSpec {
    /// busybox on the host; it becomes `/bin/busybox` (0755).
    pub busybox: PathBuf,
    /// Files added as they are.
    pub add: Vec<AddFile>,
    /// Programs added at their own paths, with their shared libraries.
    pub programs: Vec<PathBuf>,
    /// The command `/init` runs ([`DEFAULT_RUN`] when `None`).
    pub run: Option<String>,
    /// The real-time guest CPU, if any.
    pub rt_cpu: Option<u32>,
}

impl From<&InitramfsArgs> for InitramfsSpec {
    fn from(args: &InitramfsArgs) -> Self {
        Self {
            busybox: args.busybox.clone(),
            add: args.add.clone(),
            programs: args.programs.clone(),
            run: args.run.clone(),
            rt_cpu: args.rt_cpu,
        }
    }
}

/// The kernel cmdline that keeps the host kernel's housekeeping off guest
/// CPU `cpu`: `isolcpus=N nohz_full=N rcu_nocbs=N`.
pub fn rt_cmdline(cpu: u32) -> String {
    format!("isolcpus={cpu} nohz_full={cpu} rcu_nocbs={cpu}")
}

/// Builds the initramfs for `spec`: the gzip-compressed newc archive.
///
/// Errors (a missing file, a program whose libraries cannot be found,
/// two different files for one path…) are messages for the user.
pub fn build(spec: &InitramfsSpec) -> Result<Vec<u8>, String> {
    let archive = write_newc(&entries(spec)?)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&archive).map_err(|e| format!("gzip: {e}"))?;
    gz.finish().map_err(|e| format!("gzip: {e}"))
}

/// The members of the initramfs for `spec`, uncompressed and in archive
/// order (every directory before what it holds).
pub fn entries(spec: &InitramfsSpec) -> Result<Vec<Entry>, String> {
    let mut tree = Tree::default();
    for dir in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/run",
    ] {
        tree.insert(Entry::dir(dir, 0o755), "rtvm")?;
    }
    tree.insert(Entry::dir("/tmp", 0o1777), "rtvm")?;
    tree.insert(Entry::dir("/root", 0o700), "rtvm")?;
    // The kernel opens /dev/console for /init's stdin, stdout and stderr
    // before anything is mounted.
    tree.insert(Entry::char_device("/dev/console", 0o600, 5, 1), "rtvm")?;
    tree.insert(
        Entry::file("/init", 0o755, init_script(spec).into_bytes()),
        "rtvm",
    )?;

    let busybox = &spec.busybox;
    if !busybox.is_file() {
        return Err(format!(
            "busybox not found at {}: install Debian's busybox-static \
             (apt-get install busybox-static) or pass --busybox PATH",
            busybox.display()
        ));
    }
    tree.insert(
        Entry::file("/bin/busybox", 0o755, read_file(busybox)?),
        "--busybox",
    )?;
    tree.insert(Entry::symlink("/bin/sh", "busybox"), "--busybox")?;
    // A dynamically linked busybox needs its libraries too.
    for lib in shared_libraries(busybox)? {
        add_library(&mut tree, &lib)?;
    }

    for add in &spec.add {
        let meta =
            fs::metadata(&add.host).map_err(|e| format!("--add {}: {e}", add.host.display()))?;
        if !meta.is_file() {
            return Err(format!("--add {}: not a regular file", add.host.display()));
        }
        let perm = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        let source = format!("--add {}", add.host.display());
        tree.insert(
            Entry::file(&add.guest, perm, read_file(&add.host)?),
            &source,
        )?;
        // A preload library or a program is no use without what it links to.
        for lib in shared_libraries(&add.host)? {
            add_library(&mut tree, &lib)?;
        }
    }

    for program in &spec.programs {
        if !program.is_file() {
            return Err(format!("--program {}: no such file", program.display()));
        }
        let guest = guest_path_of(program)?;
        let source = format!("--program {}", program.display());
        tree.insert(Entry::file(&guest, 0o755, read_file(program)?), &source)?;
        for lib in shared_libraries(program)? {
            add_library(&mut tree, &lib)?;
        }
    }
    Ok(tree.into_entries())
}

/// The members by path, each with what asked for it.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, (Entry, String)>,
}

impl Tree {
    /// Adds `entry` and the directories above it; the same entry twice is
    /// fine (a library two programs need), two different ones are not.
    fn insert(&mut self, entry: Entry, source: &str) -> Result<(), String> {
        let mut parent = String::new();
        let parts: Vec<&str> = entry.path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            parent.push('/');
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some((existing, by)) if existing.kind() != newc::S_IFDIR => {
                    return Err(format!(
                        "{source} needs directory {parent}, which {by} makes a file"
                    ))
                }
                Some(_) => {}
                None => {
                    self.entries
                        .insert(parent.clone(), (Entry::dir(&parent, 0o755), source.into()));
                }
            }
        }
        match self.entries.get(&entry.path) {
            Some((existing, _)) if *existing == entry => Ok(()),
            Some((existing, _))
                if existing.kind() == newc::S_IFDIR && entry.kind() == newc::S_IFDIR =>
            {
                Ok(())
            }
            Some((_, by)) => Err(format!(
                "{} is given twice: by {by} and by {source}",
                entry.path
            )),
            None => {
                self.entries
                    .insert(entry.path.clone(), (entry, source.into()));
                Ok(())
            }
        }
    }

    /// Sorted by path, so every directory comes before what it holds.
    fn into_entries(self) -> Vec<Entry> {
        self.entries.into_values().map(|(entry, _)| entry).collect()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Adds a shared library at the path it has on the host, with the host's
/// permission bits (symlinks followed: the guest gets the file itself).
fn add_library(tree: &mut Tree, lib: &Path) -> Result<(), String> {
    let meta = fs::metadata(lib).map_err(|e| format!("library {}: {e}", lib.display()))?;
    let perm = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    let guest = guest_path_of(lib)?;
    tree.insert(
        Entry::file(&guest, perm, read_file(lib)?),
        &format!("library {}", lib.display()),
    )
}

/// `path` as a clean absolute guest path: no empty, `.` or `..` parts.
fn guest_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("guest path {path:?} is not absolute"));
    }
    let mut clean = String::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("guest path {path:?} contains \"..\"")),
            _ => {
                clean.push('/');
                clean.push_str(part);
            }
        }
    }
    if clean.is_empty() {
        return Err(format!("guest path {path:?} names no file"));
    }
    Ok(clean)
}

/// The guest path of a host file added at "the same path".
fn guest_path_of(host: &Path) -> Result<String, String> {
    let absolute = std::path::absolute(host).map_err(|e| format!("{}: {e}", host.display()))?;
    let text = absolute
        .to_str()
        .ok_or_else(|| format!("{}: path is not UTF-8", host.display()))?;
    guest_path(text)
}

/// Where a program's dynamic loader and shared libraries may come from:
/// the system's library directories, and nowhere else. `rtvm initramfs`
/// runs as root on programs it does not trust: a crafted ELF must not pull
/// some other file of the host into the image.
const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// `path` if it is a regular file anyone may read that lies, symlinks
/// followed, in one of [`LIBRARY_DIRS`]; the path itself is kept, as the
/// guest's loader will look for it there.
fn library_file(path: &Path, needed_by: &Path) -> Result<PathBuf, String> {
    let refuse = |why: &str| {
        Err(format!(
            "{} needs {}, which {why}",
            needed_by.display(),
            path.display()
        ))
    };
    let Ok(real) = fs::canonicalize(path) else {
        return refuse("does not exist");
    };
    let standard = LIBRARY_DIRS
        .iter()
        .filter_map(|dir| fs::canonicalize(dir).ok())
        .any(|dir| real.parent() == Some(dir.as_path()));
    if !standard {
        return refuse("is not in a system library directory");
    }
    let meta = fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if !meta.is_file() || mode & 0o004 == 0 {
        return refuse("is not a library file anyone may read");
    }
    Ok(path.to_path_buf())
}

/// The shared libraries (dynamic loader included) that `program` (or a
/// shared library) needs, resolved from the ELF's own `PT_INTERP` and
/// `DT_NEEDED` entries in [`LIBRARY_DIRS`], the way the guest's loader
/// will find them; without running the program or `ldd` on it. None for a
/// static program or a file that is not ELF.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    let mut todo = vec![program.to_path_buf()];
    while let Some(file) = todo.pop() {
        let bytes = read_file(&file)?;
        if !bytes.starts_with(b"\x7fELF") {
            continue;
        }
        let elf = goblin::elf::Elf::parse(&bytes)
            .map_err(|e| format!("{}: not an ELF file rtvm can read: {e}", file.display()))?;
        if let Some(loader) = elf.interpreter {
            // The segment's string, to its first NUL.
            let loader = Path::new(loader.split('\0').next().unwrap_or(""));
            let name = loader.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !loader.is_absolute() || !name.starts_with("ld-") {
                return Err(format!(
                    "{} names {} as its dynamic loader, which is not one",
                    file.display(),
                    loader.display()
                ));
            }
            let loader = library_file(loader, &file)?;
            if !libs.contains(&loader) {
                libs.push(loader);
            }
        }
        for name in elf.libraries {
            if name.contains('/') || name.is_empty() {
                return Err(format!(
                    "{} needs {name:?}: only library names are resolved, not paths",
                    file.display()
                ));
            }
            let found = LIBRARY_DIRS
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|path| path.exists())
                .ok_or_else(|| {
                    format!(
                        "{} needs {name}, which is in none of {}",
                        file.display(),
                        LIBRARY_DIRS.join(", ")
                    )
                })?;
            let found = library_file(&found, &file)?;
            // A library reached by two paths (/lib and /usr/lib on a
            // merged-/usr system) goes in once.
            let same = |a: &Path, b: &Path| fs::canonicalize(a).ok() == fs::canonicalize(b).ok();
            if !libs.iter().any(|lib| same(lib, &found)) {
                todo.push(found.clone());
                libs.push(found);
            }
        }
    }
    Ok(libs)
}

/// Quotes `text` for a POSIX shell, as one word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The `/init` script for `spec`.
pub fn init_script(spec: &InitramfsSpec) -> String {
    let run = spec.run.as_deref().unwrap_or(DEFAULT_RUN);
    let mut script = String::from(
        "#!/bin/sh\n\
         # /init, made by `rtvm initramfs`: runs one command, prints its exit\n\
         # status and ends the VM. It must never return (the kernel panics).\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         export HOME=/root\n\
         /bin/busybox --install -s\n\
         mount -t proc proc /proc || echo 'rtvm-init: cannot mount /proc'\n\
         mount -t sysfs sysfs /sys || echo 'rtvm-init: cannot mount /sys'\n\
         mount -t devtmpfs devtmpfs /dev || echo 'rtvm-init: cannot mount /dev'\n\
         mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 shm /dev/shm || echo 'rtvm-init: cannot mount /dev/shm'\n\
         echo 'rtvm-init: starting'\n\
         echo \"rtvm-init: kernel $(uname -r), cmdline: $(cat /proc/cmdline)\"\n",
    );
    if let Some(cpu) = spec.rt_cpu {
        let cmdline = rt_cmdline(cpu);
        script.push_str(&format!(
            "# The real-time vCPU is {cpu}; keep the kernel's housekeeping off it\n\
             # with this on the kernel cmdline: {cmdline}\n\
             RTVM_RT_CPU={cpu}\n\
             export RTVM_RT_CPU\n\
             echo 'rtvm-init: real-time vCPU is {cpu} (kernel cmdline suggestion: {cmdline})'\n"
        ));
    }
    script.push_str(&format!(
        "# The command, in a shell of its own so that `exit` in it cannot end /init.\n\
         /bin/sh -c {}\n\
         status=$?\n\
         echo \"rtvm-init: exit $status\"\n\
         if [ -x {RTVM_GUEST} ]; then\n\
         \x20   {RTVM_GUEST} exit \"$status\"\n\
         \x20   echo 'rtvm-init: {RTVM_GUEST} exit returned; powering off'\n\
         fi\n\
         poweroff -f\n\
         while :; do sleep 60; done\n",
        shell_quote(run)
    ));
    script
}

/// `rtvm initramfs`.
pub fn run(args: &InitramfsArgs) -> ExitCode {
    let spec = InitramfsSpec::from(args);
    let archive = match build(&spec) {
        Ok(archive) => archive,
        Err(e) => {
            eprintln!("rtvm: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = fs::write(&args.out, &archive) {
        eprintln!("rtvm: error: cannot write {}: {e}", args.out.display());
        return ExitCode::from(EXIT_HOST_ERROR);
    }
    println!(
        "wrote {} ({} bytes, gzip-compressed newc cpio)",
        args.out.display(),
        archive.len()
    );
    if let Some(cpu) = spec.rt_cpu {
        println!(
            "real-time vCPU {cpu}: boot the guest with rtvm run --cmdline \"... {}\"",
            rt_cmdline(cpu)
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of `/usr/bin/true` with `from` (a string in it) replaced by
    /// `to`, padded with NULs to the same length.
    fn crafted(name: &str, from: &str, to: &str) -> PathBuf {
        let mut bytes = std::fs::read("/usr/bin/true").unwrap();
        assert!(to.len() <= from.len());
        let at = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("{from} not in /usr/bin/true"));
        let mut patch = to.as_bytes().to_vec();
        patch.resize(from.len(), 0);
        bytes[at..at + from.len()].copy_from_slice(&patch);
        let path = std::env::temp_dir().join(format!("rtvm-crafted-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Issue #12: a crafted program cannot pull other host files into the
    /// image as its "loader" or its "libraries", and nothing runs it.
    #[test]
    fn a_crafted_program_gets_nothing_but_system_libraries() {
        let loader = crafted("loader", "/lib64/ld-linux-x86-64.so.2", "/etc/shadow");
        let err = shared_libraries(&loader).unwrap_err();
        assert!(err.contains("not one"), "{err}");
        // A loader-like name outside the library directories.
        let fake = std::env::temp_dir().join("ld-rtvm-fake");
        std::fs::write(&fake, b"not a loader").unwrap();
        let disguised = crafted(
            "disguised",
            "/lib64/ld-linux-x86-64.so.2",
            fake.to_str().unwrap(),
        );
        let err = shared_libraries(&disguised).unwrap_err();
        std::fs::remove_file(&fake).unwrap();
        assert!(err.contains("not in a system library directory"), "{err}");
        let path = crafted("path", "libc.so.6", "/etc/mtab");
        let err = shared_libraries(&path).unwrap_err();
        assert!(err.contains("not paths"), "{err}");
        for file in [loader, disguised, path] {
            std::fs::remove_file(file).unwrap();
        }
        // The real program still gets its loader and libc.
        let libs = shared_libraries(Path::new("/usr/bin/true")).unwrap();
        assert!(
            libs.iter().any(|l| l.ends_with("ld-linux-x86-64.so.2")),
            "{libs:?}"
        );
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
    }
}
