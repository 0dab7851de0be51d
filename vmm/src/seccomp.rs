//! Seccomp: every thread of a running VM confines itself to the system
//! calls its kind of work needs, once its setup is done.
//!
//! The guest drives vCPU threads (its calls are served there) and, through
//! them, what the console threads write; the control thread only waits and
//! tears down. A thread that a guest managed to subvert should still be
//! unable to start programs, create processes, map other processes' memory,
//! load modules, mount, trace or change credentials. So each kind gets an
//! allow-list (compiled with seccompiler, installed on the calling thread
//! only, never with TSYNC), and anything else ends the process with a line
//! naming the thread and the call, status [`EXIT_SECCOMP`].
//!
//! What a vCPU thread must do only once (SCHED_FIFO, affinity, its RT
//! cgroup, creating its timerfd) happens before its filter; see
//! `vcpu::run_thread`. The lists below are what the threads were seen to
//! call in the test suites (`SeccompMode::Log` finds more on another
//! kernel or C library: the kernel logs each call a filter would refuse as
//! `audit: type=1326 ... syscall=N`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::config::SeccompMode;
use crate::error::{Error, Result};

/// Process status when a thread made a system call its filter forbids:
/// 128 + SIGSYS, as a shell would report the signal seccomp raises.
pub const EXIT_SECCOMP: u8 = 128 + libc::SIGSYS as u8;

/// What a thread does, which decides what it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs a vCPU: KVM_RUN, the devices on the bus, and the guest's
    /// VMRPC calls: timers, files in the share, sockets.
    Vcpu,
    /// Waits for the VM to end and tears it down: polls, joins, closes,
    /// removes the RT cgroups, writes the report.
    Control,
    /// Writes the guest console to the terminal or the serial log.
    Terminal,
    /// The network probe's measuring thread and the host UDP echo it
    /// (or `rtvm bench net`) measures against: their socket, nothing else.
    Probe,
    /// The VM's I/O poller: the guest's I/O rings in guest RAM (no system
    /// call), its sockets, its eventfds.
    IoPoller,
    /// The management API: its Unix socket's clients, and what it reads
    /// of the VM's threads (/proc, their scheduling).
    Api,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Control => "control",
            ThreadKind::Terminal => "console",
            ThreadKind::Probe => "probe",
            ThreadKind::IoPoller => "I/O poller",
            ThreadKind::Api => "API",
        }
    }
}

/// Confines the calling thread to what `kind` needs, as `mode` says
/// (nothing for [`SeccompMode::Off`]).
pub fn confine_current_thread(kind: ThreadKind, mode: SeccompMode) -> Result<()> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    install_violation_handler()?;
    let program = compile(kind, mismatch).map_err(|e| Error::Host {
        what: format!("compiling the seccomp filter of a {} thread", kind.name()),
        source: std::io::Error::other(e.to_string()),
    })?;
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(&program).map_err(|e| Error::Host {
        what: format!("installing the seccomp filter of a {} thread", kind.name()),
        source: std::io::Error::other(e.to_string()),
    })
}

fn compile(kind: ThreadKind, mismatch: SeccompAction) -> seccompiler::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[libc::c_long]| {
        for &call in calls {
            rules.insert(call, Vec::new());
        }
    };
    allow(RUNTIME);
    match kind {
        ThreadKind::Vcpu => {
            allow(WAITS);
            allow(FILES);
            allow(SOCKETS);
            // An I/O ring's completion eventfd, made by `NetRingSetup`.
            allow(&[libc::SYS_eventfd2]);
        }
        ThreadKind::Control => {
            allow(WAITS);
            allow(FILES);
            allow(TEARDOWN);
        }
        ThreadKind::Terminal => {}
        ThreadKind::Probe | ThreadKind::IoPoller => {
            allow(WAITS);
            allow(SOCKETS);
        }
        ThreadKind::Api => {
            allow(WAITS);
            allow(&[
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_openat,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_lseek,
                libc::SYS_sched_getscheduler,
                libc::SYS_sched_getparam,
                libc::SYS_prctl,
            ]);
        }
    }
    if matches!(kind, ThreadKind::Vcpu | ThreadKind::Control) {
        rules.insert(libc::SYS_ioctl, ioctl_rules()?);
    }
    if kind == ThreadKind::Api {
        // Its clients' sockets made non-blocking; no other request.
        rules.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::FIONBIO,
            )?])?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )?;
    Ok(filter.try_into()?)
}

/// KVM's own requests (type byte 0xAE: KVM_RUN, register and state
/// access, interrupts), and the few a socket or terminal answers.
fn ioctl_rules() -> seccompiler::Result<Vec<SeccompRule>> {
    let request = |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value);
    let mut rules = vec![SeccompRule::new(vec![request(
        SeccompCmpOp::MaskedEq(0xff00),
        u64::from(KVMIO) << 8,
    )?])?];
    for value in [
        libc::FIONREAD,
        libc::FIONBIO,
        libc::TCGETS,
        libc::TIOCGWINSZ,
    ] {
        rules.push(SeccompRule::new(vec![request(SeccompCmpOp::Eq, value)?])?);
    }
    Ok(rules)
}

/// The ioctl type of every KVM request.
const KVMIO: u8 = 0xae;

/// What any Rust thread does: allocate, lock, read clocks, log to stderr,
/// handle signals, panic, end.
const RUNTIME: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Parking on descriptors: eventfds, the timerfd, sockets.
const WAITS: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// The share's file calls (each opened beneath the share's directory
/// with openat2; the confinement is `rpc::fs`'s, since a filter cannot
/// read the path), and the control thread's few files: /proc, cgroups,
/// the report.
const FILES: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
];

/// The guest's sockets (addresses checked by `rpc::net`'s policy first).
const SOCKETS: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Tearing the VM down: the RT cgroups removed, guest residency measured.
const TEARDOWN: &[libc::c_long] = &[libc::SYS_rmdir, libc::SYS_mincore];

thread_local! {
    /// The kind of the calling thread's filter, for the violation message.
    static KIND: Cell<&'static str> = const { Cell::new("unconfined") };
}

fn install_violation_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_violation).map_err(
            |e| Error::Host {
                what: "installing the seccomp violation handler".into(),
                source: e.into(),
            },
        );
    });
    result
}

/// The fields of a SIGSYS `siginfo_t` (the libc crate does not name them).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Says which thread kind made which call and ends the process. Only
/// async-signal-safe work: a thread-local read, formatting into a stack
/// buffer, write(2) and _exit(2), all of which every filter allows.
extern "C" fn on_violation(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo, laid out as SigsysInfo.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(|k| k.get());
    let mut line = StackLine::default();
    line.push(b"rtvm: seccomp: a ");
    line.push(kind.as_bytes());
    line.push(b" thread made system call ");
    line.push_number(i64::from(syscall));
    line.push(b", which its filter forbids; the process ends (--seccomp log lets it through and logs it)\n");
    // SAFETY: write(2) of a live stack buffer, then _exit(2): both
    // async-signal-safe.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(i32::from(EXIT_SECCOMP));
    }
}

/// A line formatted without allocating, for a signal handler.
struct StackLine {
    buf: [u8; 256],
    len: usize,
}

impl Default for StackLine {
    fn default() -> Self {
        StackLine {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl StackLine {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Control,
            ThreadKind::Terminal,
            ThreadKind::Probe,
        ] {
            for action in [SeccompAction::Trap, SeccompAction::Log] {
                assert!(!compile(kind, action).unwrap().is_empty(), "{kind:?}");
            }
        }
    }

    /// Runs this test binary again with only `test` and `RTVM_SECCOMP_CHILD`
    /// set, where `test` does something its filter forbids; returns how
    /// that child ended.
    fn in_child(test: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env("RTVM_SECCOMP_CHILD", "1")
            .output()
            .unwrap()
    }

    fn is_child() -> bool {
        std::env::var_os("RTVM_SECCOMP_CHILD").is_some()
    }

    /// What a subverted vCPU thread would try first: run a program. The
    /// filter refuses it, and the process ends saying which thread made
    /// which call, with status 159.
    #[test]
    fn a_vcpu_thread_that_tries_to_run_a_program_ends_the_process() {
        if is_child() {
            let ran = std::thread::spawn(|| {
                confine_current_thread(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap();
                let sh = c"/bin/sh";
                let argv = [sh.as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated path and a NULL-terminated argv
                // that outlive the call; environment none.
                unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), std::ptr::null()) }
            })
            .join();
            panic!("execve came back: {ran:?}");
        }
        let out =
            in_child("seccomp::tests::a_vcpu_thread_that_tries_to_run_a_program_ends_the_process");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(EXIT_SECCOMP)), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "rtvm: seccomp: a vCPU thread made system call {}, which its filter forbids",
                libc::SYS_execve
            )),
            "{stderr}"
        );
    }

    /// A filter is the calling thread's alone: the thread that spawned a
    /// confined one can still do what it forbids (here: create a process).
    #[test]
    fn a_filter_binds_only_the_thread_that_installed_it() {
        if is_child() {
            std::thread::spawn(|| {
                confine_current_thread(ThreadKind::Terminal, SeccompMode::Enforce).unwrap();
            })
            .join()
            .unwrap();
            let status = std::process::Command::new("/bin/true").status().unwrap();
            assert!(status.success());
            std::process::exit(42);
        }
        let out = in_child("seccomp::tests::a_filter_binds_only_the_thread_that_installed_it");
        assert_eq!(
            out.status.code(),
            Some(42),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `log` lets a forbidden call through (the kernel logs it).
    #[test]
    fn log_mode_lets_a_forbidden_call_through() {
        if is_child() {
            let pid = std::thread::spawn(|| {
                confine_current_thread(ThreadKind::Terminal, SeccompMode::Log).unwrap();
                // SAFETY: getppid has no preconditions; it is not on the
                // console thread's list.
                unsafe { libc::getppid() }
            })
            .join()
            .unwrap();
            assert!(pid > 0);
            std::process::exit(43);
        }
        let out = in_child("seccomp::tests::log_mode_lets_a_forbidden_call_through");
        assert_eq!(
            out.status.code(),
            Some(43),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_violation_line_is_formatted_without_allocating() {
        let mut line = StackLine::default();
        line.push(b"call ");
        line.push_number(59);
        line.push(b" ");
        line.push_number(-1);
        line.push(b" ");
        line.push_number(0);
        assert_eq!(&line.buf[..line.len], b"call 59 -1 0");
        let mut full = StackLine::default();
        full.push(&[b'x'; 300]);
        assert_eq!(full.len, 256);
    }
}
