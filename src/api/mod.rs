//! The management API: `rtvm run --api-sock PATH` serves HTTP/1.1 + JSON on
//! a Unix socket, modelled on Firecracker's (its field names where one
//! fits): configure and start a VM, read its vCPUs and metrics, pause,
//! resume, stop. `openapi.json` (next to this file) describes it; a test
//! checks the two agree.
//!
//! Threads: the API thread (`rtvm-api`, seccomp kind `Api`) parses and
//! answers requests ([`http`]); the main thread owns the VM's life (builds
//! and starts it when asked, waits for its end, tears it down), as it does
//! without the API. They meet in [`Control`]. A vCPU never waits for either.

pub mod http;
mod metrics;
mod routes;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rtvm_vmm::seccomp::{self, ThreadKind};
use rtvm_vmm::{RunningVm, Vm, VmConfig, VmExitReason};
use vmm_sys_util::eventfd::EventFd;

use crate::RunArgs;

/// The OpenAPI description of this API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Where the VM is in its life, as the API sees it.
pub enum Phase {
    /// No VM yet: `PUT /boot-source` and `PUT /machine-config` change
    /// these arguments; `PUT /actions InstanceStart` builds the VM.
    Configuring(Box<RunArgs>),
    /// The main thread is building and starting the VM.
    Starting,
    /// It is ending: the main thread tears it down.
    Stopping,
    Running {
        vm: Arc<RunningVm>,
        config: Box<VmConfig>,
        paused: bool,
    },
    /// It ended: how, as JSON (`exit_reason`, `exit_code`).
    Ended(serde_json::Value),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Configuring(_) => "Not started",
            Phase::Starting => "Starting",
            Phase::Stopping => "Stopping",
            Phase::Running { paused: true, .. } => "Paused",
            Phase::Running { .. } => "Running",
            Phase::Ended(_) => "Ended",
        }
    }
}

/// What the API thread asks of the main thread: start this VM, and say
/// how it went.
struct StartRequest {
    config: Box<VmConfig>,
    reply: mpsc::Sender<Result<(), String>>,
}

/// What the two threads share.
pub struct Control {
    phase: Mutex<Phase>,
    changed: Condvar,
    start: Mutex<mpsc::Sender<StartRequest>>,
    socket: PathBuf,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.lock() = phase;
        self.changed.notify_all();
    }

    /// The running VM, if there is one (a clone: the lock is not held
    /// while it is used).
    fn vm(&self) -> Option<Arc<RunningVm>> {
        match &*self.lock() {
            Phase::Running { vm, .. } => Some(vm.clone()),
            _ => None,
        }
    }

    /// Waits until the VM has ended (up to `timeout`); how it ended.
    fn wait_ended(&self, timeout: Duration) -> Option<serde_json::Value> {
        let phase = self.lock();
        let (phase, _) = self
            .changed
            .wait_timeout_while(phase, timeout, |p| !matches!(p, Phase::Ended(_)))
            .unwrap_or_else(|e| e.into_inner());
        match &*phase {
            Phase::Ended(status) => Some(status.clone()),
            _ => None,
        }
    }
}

/// `rtvm run --api-sock PATH`: serves the API, starts the VM at once if the
/// arguments name a guest, else when the API says so; returns the guest's
/// status once it has ended.
pub fn run(args: &RunArgs, socket: &Path) -> ExitCode {
    let listener = match http::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rtvm: error: --api-sock {e}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    if let Err(e) = rtvm_vmm::signals::install_termination_handlers() {
        remove_socket(socket);
        return crate::report_error(&e);
    }
    let (start_tx, start_rx) = mpsc::channel();
    let control = Arc::new(Control {
        phase: Mutex::new(Phase::Configuring(Box::new(args.clone()))),
        changed: Condvar::new(),
        start: Mutex::new(start_tx),
        socket: socket.to_path_buf(),
    });
    let stop = match EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            eprintln!("rtvm: error: making the API's eventfd: {e}");
            return ExitCode::from(crate::EXIT_HOST_ERROR);
        }
    };
    let seccomp_mode = args.seccomp.unwrap_or_default();
    let server = {
        let control = control.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("rtvm-api".into())
            .spawn(move || {
                if let Err(e) = seccomp::confine_current_thread(ThreadKind::Api, seccomp_mode) {
                    eprintln!("rtvm: error: {e}");
                    return;
                }
                let handler = routes::Api { control };
                http::serve(&listener, &handler, &stop, http::Limits::default());
            })
    };
    let server = match server {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rtvm: error: starting the API thread: {e}");
            remove_socket(socket);
            return ExitCode::from(crate::EXIT_HOST_ERROR);
        }
    };
    let code = life(args, &control, &start_rx);
    let _ = stop.write(1);
    let _ = server.join();
    remove_socket(socket);
    code
}

/// Removes the API socket with unlinkat(2), which the control thread's
/// seccomp filter allows (it may be confined by now).
fn remove_socket(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a NUL-terminated path that lives through the call.
        unsafe { libc::unlinkat(libc::AT_FDCWD, c.as_ptr(), 0) };
    }
}

/// The VM's life on the main thread: wait for a start (or start at once),
/// run, end; the process status.
fn life(args: &RunArgs, control: &Control, starts: &mpsc::Receiver<StartRequest>) -> ExitCode {
    let named_guest = args.guest.is_some() || args.kernel.is_some() || args.config.is_some();
    let (vm, config, started) = if named_guest {
        let config = match args.to_config() {
            Ok(c) => c,
            Err(e) => return crate::report_error(&e),
        };
        control.set(Phase::Starting);
        match start(&config) {
            Ok(vm) => (vm, config, None),
            Err(e) => return crate::report_error(&e),
        }
    } else {
        eprintln!(
            "rtvm: waiting for the VM's configuration on {}",
            control.socket.display()
        );
        loop {
            if let Some(sig) = rtvm_vmm::signals::termination_signal() {
                return ExitCode::from(VmExitReason::Signal(sig).exit_code());
            }
            let Ok(request) = starts.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            match start(&request.config) {
                // Answered once the phase says Running (below).
                Ok(vm) => break (vm, *request.config, Some(request.reply)),
                // The API thread goes back to configuring with what the
                // client had set: it may fix it and try again.
                Err(e) => {
                    let _ = request.reply.send(Err(e.to_string()));
                }
            }
        }
    };
    if !vm.rt_report().is_empty() {
        eprint!("{}", vm.rt_report());
    }
    let vm = Arc::new(vm);
    control.set(Phase::Running {
        vm: vm.clone(),
        config: Box::new(config.clone()),
        paused: false,
    });
    if let Some(reply) = started {
        let _ = reply.send(Ok(()));
    }
    // From here this thread only waits, tears down and reports.
    if let Err(e) = seccomp::confine_current_thread(ThreadKind::Control, config.seccomp) {
        vm.request_stop();
        eprintln!("rtvm: error: {e}");
    }
    while vm.wait_timeout(Duration::from_secs(3600)).is_none() {}
    // The API thread may hold the VM for a moment (a request under way);
    // it takes no new hold once the phase has changed.
    control.set(Phase::Stopping);
    let mut vm = vm;
    let vm = loop {
        match Arc::try_unwrap(vm) {
            Ok(vm) => break vm,
            Err(again) => {
                vm = again;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let run = vm.stop();
    let code = crate::finish_run(&run, args.stats_json.as_deref());
    control.set(Phase::Ended(serde_json::json!({
        "exit_reason": run.reason.to_string(),
        "exit_code": run.reason.exit_code(),
        "clean": run.reason.is_clean(),
    })));
    code
}

/// Builds and starts the VM `config` describes.
fn start(config: &VmConfig) -> Result<RunningVm, rtvm_vmm::Error> {
    Vm::new(config, crate::console_for(config)?)?.start()
}
