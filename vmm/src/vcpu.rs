//! One vCPU = one host thread running `KVM_RUN` in a loop, with an explicit
//! state the VMM can observe and change (pause, resume, stop).
//!
//! Port and MMIO exits go to the device buses; the rtvm ports (exit, panic,
//! vCPU off, NOP, and the VMRPC doorbell) are the vCPU's own control channel
//! and are handled right here, in the thread that took the exit — so a VMRPC
//! long poll parks this vCPU only.
//!
//! Getting the attention of a vCPU thread takes two means, because it may be
//! in `KVM_RUN` or parked in a long poll: a signal, whose handler sets
//! `kvm_run.immediate_exit` (so a signal that lands just before the thread
//! enters `KVM_RUN` is not lost either), and a wake eventfd the long poll
//! waits on beside its timer.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use rtvm_abi::{port, vmrpc};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::clock;
use crate::config::{AdvanceMode, RtPolicy, SeccompMode, UnhandledIo};
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::exit::{ExitSignal, VmExitReason};
use crate::memory::GuestRam;
use crate::realtime::{self, RtCgroups, RtItem};
use crate::rpc::park::{Parker, Requests};
use crate::rpc::{Doorbell, ExitKind, RpcServer, Services, VcpuActivity, VcpuFacts};
use crate::seccomp::{self, ThreadKind};

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Set up, thread not yet in its run loop.
    Created,
    /// Running guest code (or handling an exit).
    Running,
    /// Parked in the host in a VMRPC long poll.
    Waiting,
    /// Parked by the VMM; resumes on request.
    Paused,
    /// Left its run loop for good.
    Exited,
}

/// What the VMM wants the vCPU to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct Shared {
    state: VcpuState,
    request: Request,
}

/// State and requests, shared between the vCPU thread and its handle.
struct Control {
    shared: Mutex<Shared>,
    /// The thread's kernel id, once it runs (0 before).
    tid: std::sync::atomic::AtomicI32,
    changed: Condvar,
    /// Written on every request, for a thread parked in a long poll.
    wake: EventFd,
    /// CPU time the thread used (host and guest), written as it ends.
    cpu_ns: std::sync::atomic::AtomicU64,
    /// Its exits, the call it serves, its timer advance.
    activity: Arc<VcpuActivity>,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: VcpuState) {
        self.lock().state = state;
        self.changed.notify_all();
    }
}

/// A vCPU parked in a long poll answers its handle's requests.
impl Requests for Control {
    fn wake(&self) -> &EventFd {
        &self.wake
    }

    fn obey(&self) -> bool {
        obey_requests(self)
    }

    fn set_parked(&self, parked: bool) {
        self.set_state(if parked {
            VcpuState::Waiting
        } else {
            VcpuState::Running
        });
    }
}

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub index: usize,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub unhandled_io: UnhandledIo,
    /// vCPUs that have not finished; the last one to finish ends the VM.
    pub live: Arc<AtomicUsize>,
    pub count: usize,
    pub ram: Arc<GuestRam>,
    /// The VMRPC services this vCPU shares with the others.
    pub services: Arc<Services>,
    pub advance: AdvanceMode,
    pub rt: Option<RtPolicy>,
    /// The host CPUs the VM's RT vCPUs are pinned to, which its other
    /// vCPUs keep off.
    pub rt_cpus: Arc<[usize]>,
    pub cgroups: Option<Arc<RtCgroups>>,
    /// The seccomp filter the thread confines itself with once set up.
    pub seccomp: SeccompMode,
    /// Where the thread reports its real-time setup before it runs the guest.
    pub started: std::sync::mpsc::Sender<(usize, Vec<RtItem>)>,
}

/// What the run loop does after an exit was handled.
enum Flow {
    Continue,
    /// This vCPU is done (vCPU-off port); the VM goes on.
    Off,
    /// End the VM.
    EndVm(VmExitReason),
    /// End the VM with a fatal error; the RIP is added by the run loop.
    Fatal(String),
    /// A VMRPC doorbell with this value.
    Doorbell(u32),
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: usize,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a thread-local read and a byte store.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is the live kvm_run mapping of this thread's
        // vCPU; it is cleared before the vCPU fd is dropped.
        unsafe { (*run).immediate_exit = 1 };
    }
}

fn install_kick_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, on_kick).map_err(|e| {
            Error::Host {
                what: "installing the vCPU kick signal handler".into(),
                source: e.into(),
            }
        });
    });
    result
}

impl VcpuHandle {
    /// Starts the thread that runs `fd`.
    pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> Result<VcpuHandle> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            shared: Mutex::new(Shared {
                state: VcpuState::Created,
                request: Request::Run,
            }),
            tid: std::sync::atomic::AtomicI32::new(0),
            changed: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(Error::host("creating a vCPU wake eventfd"))?,
            cpu_ns: std::sync::atomic::AtomicU64::new(0),
            activity: Arc::default(),
        });
        let index = ctx.index;
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_thread(fd, ctx, &thread_control))
            .map_err(Error::host(format!("spawning the thread of vCPU {index}")))?;
        Ok(VcpuHandle {
            index,
            control,
            thread: Some(thread),
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn state(&self) -> VcpuState {
        self.control.lock().state
    }

    /// CPU time its thread has used so far (host and guest); `None` before
    /// it runs or after it ended (see [`VcpuHandle::join_until`]).
    pub fn cpu_time(&self) -> Option<Duration> {
        self.thread_id().and_then(crate::clock::thread_cpu_of)
    }

    /// Its exits by kind, the call it serves now, its timer advance.
    pub fn activity(&self) -> &VcpuActivity {
        &self.control.activity
    }

    /// The kernel's id of the vCPU's host thread, once it has started
    /// (for `/proc/PID/task/TID`, schedulers and tracers).
    pub fn thread_id(&self) -> Option<i32> {
        Some(self.control.tid.load(Ordering::Acquire)).filter(|&tid| tid != 0)
    }

    /// Asks the vCPU to park; see [`VcpuHandle::wait_for`].
    pub fn pause(&self) {
        self.request(Request::Pause);
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.request(Request::Run);
    }

    /// Asks the vCPU to leave its run loop.
    pub fn stop(&self) {
        self.request(Request::Stop);
    }

    fn request(&self, request: Request) {
        {
            let mut shared = self.control.lock();
            if shared.request == Request::Stop {
                return;
            }
            shared.request = request;
        }
        self.control.changed.notify_all();
        // A full counter still wakes the waiter, so an error is harmless.
        let _ = self.control.wake.write(1);
        self.kick();
    }

    /// Interrupts `KVM_RUN` (or a blocking wait) so the thread sees its request.
    fn kick(&self) {
        if let Some(thread) = &self.thread {
            if self.state() != VcpuState::Exited {
                // ESRCH only means the thread has already gone.
                let _ = thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
        }
    }

    /// Waits until the vCPU is in `state`, up to `timeout`.
    pub fn wait_for(&self, state: VcpuState, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut shared = self.control.lock();
        while shared.state != state {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            shared = self
                .control
                .changed
                .wait_timeout(shared, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Stops the vCPU and waits, until `deadline`, for its thread to end.
    /// A thread still in the host by then (blocked where no kick reaches
    /// it: a lock held elsewhere, a host call that does not return) is
    /// left behind with a log line, and `None` says so: one stuck thread
    /// must not hang the VMM's shutdown. What it uses (guest RAM, its vCPU
    /// fd, the services) it holds shares of, so leaving it is safe; it ends
    /// when it next sees its stop request, or with the process. A thread
    /// that ended gives the CPU time it used.
    pub fn join_until(mut self, deadline: Instant) -> Option<Duration> {
        self.finish(deadline)
            .then(|| Duration::from_nanos(self.control.cpu_ns.load(Ordering::Acquire)))
    }

    fn finish(&mut self, deadline: Instant) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        self.stop();
        let left = deadline.saturating_duration_since(Instant::now());
        if !self.wait_for(VcpuState::Exited, left) && !thread.is_finished() {
            tracing::error!(
                "vCPU {} did not stop (state {:?}): its thread is blocked in the host and is left behind",
                self.index,
                self.state()
            );
            return false;
        }
        if thread.join().is_err() {
            tracing::error!("vCPU {} thread panicked", self.index);
        }
        true
    }
}

/// How long a stop waits for the vCPU threads to end before it leaves the
/// stuck ones behind ([`VcpuHandle::join_until`]).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish(Instant::now() + STOP_GRACE);
    }
}

fn run_thread(mut fd: VcpuFd, ctx: VcpuContext, control: &Control) {
    KVM_RUN.with(|r| r.set(fd.get_kvm_run()));
    // SAFETY: gettid has no preconditions.
    control
        .tid
        .store(unsafe { libc::gettid() }, Ordering::Release);
    let rt_items = realtime::apply_to_current_thread(
        ctx.index,
        ctx.rt.as_ref(),
        ctx.cgroups.as_deref(),
        &ctx.rt_cpus,
    );
    let facts = VcpuFacts {
        index: ctx.index,
        count: ctx.count,
        realtime: ctx.rt.is_some(),
        tsc_khz: clock::guest_tsc_khz(&fd),
        tsc_offset: None,
    };
    let facts = VcpuFacts {
        tsc_offset: clock::measure_tsc_offset(&fd, facts.tsc_khz),
        ..facts
    };
    // Everything the thread opens or creates for itself comes before it
    // drops file privileges and confines itself.
    let cgroup_exit = ctx.cgroups.as_ref().map(|c| c.exit_for_this_thread());
    let parker = Parker::new().and_then(|parker| {
        if let Some(Err(e)) = &cgroup_exit {
            return Err(Error::Realtime(e.clone()));
        }
        if let Some(owner) = ctx.services.files.as_ref().and_then(|f| f.owner()) {
            owner
                .act_as_on_this_thread()
                .map_err(Error::host("taking on the share owner's file identity"))?;
        }
        seccomp::confine_current_thread(ThreadKind::Vcpu, ctx.seccomp)?;
        Ok(parker)
    });
    // The VMM may be gone already (start failed); then nothing waits for this.
    let _ = ctx.started.send((ctx.index, rt_items));
    let mut rpc = RpcServer::new(facts, ctx.ram.clone(), ctx.services.clone(), ctx.advance)
        .with_activity(control.activity.clone());
    control.activity.set_timer_advance(rpc.timer_advance());
    let finished = match parker {
        Ok(parker) => run_loop(&mut fd, &ctx, control, &mut rpc, &parker),
        Err(e) => {
            ctx.exit.request(VmExitReason::Fatal {
                vcpu: ctx.index,
                what: e.to_string(),
                rip: None,
            });
            false
        }
    };
    if let Some(Ok(exit)) = cgroup_exit {
        exit.leave();
    }
    if ctx.advance != AdvanceMode::Off {
        tracing::info!(
            "vCPU {}: timer advance at the end: {} ns ({})",
            ctx.index,
            rpc.timer_advance(),
            ctx.advance
        );
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    control
        .cpu_ns
        .store(clock::thread_cpu_ns(), Ordering::Release);
    control.set_state(VcpuState::Exited);
    if finished && ctx.live.fetch_sub(1, Ordering::AcqRel) == 1 {
        ctx.exit.request(VmExitReason::AllVcpusOff);
    }
}

/// Runs the vCPU until it is stopped or the VM ends. Returns true if the
/// vCPU finished on its own (vCPU-off port).
fn run_loop(
    fd: &mut VcpuFd,
    ctx: &VcpuContext,
    control: &Control,
    rpc: &mut RpcServer,
    parker: &Parker,
) -> bool {
    control.set_state(VcpuState::Running);
    loop {
        if !obey_requests(control) {
            return false;
        }
        rpc.entering_guest();
        let flow = match fd.run() {
            Ok(exit) => {
                control.activity.exited(exit_kind(&exit));
                handle_exit(ctx, exit)
            }
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked: look at the requests again.
                control.activity.exited(ExitKind::Interrupted);
                fd.set_kvm_immediate_exit(0);
                Flow::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Flow::Continue,
            Err(e) => Flow::Fatal(format!("KVM_RUN failed: {e}")),
        };
        match flow {
            Flow::Continue => {}
            Flow::Doorbell(value) => {
                let mut park = parker.park_for(control);
                if let Doorbell::BadPage(status) = rpc.on_doorbell(value, &mut park) {
                    // No call page to answer in: the status goes into EAX.
                    if let Err(e) = set_eax(fd, vmrpc::DOORBELL_ERROR | status as u32) {
                        return fatal(fd, ctx, format!("cannot answer a bad VMRPC doorbell: {e}"));
                    }
                }
            }
            Flow::Off => {
                tracing::debug!("vCPU {} finished", ctx.index);
                return true;
            }
            Flow::EndVm(reason) => {
                ctx.exit.request(reason);
                return false;
            }
            Flow::Fatal(what) => return fatal(fd, ctx, what),
        }
    }
}

fn fatal(fd: &VcpuFd, ctx: &VcpuContext, mut what: String) -> bool {
    let mut rip = fd.get_regs().ok().map(|r| r.rip);
    // KVM on AMD resets a vCPU on a shutdown intercept before it exits to
    // user space: its registers are the reset state's (CS 0xf000, RIP
    // 0xfff0), and the faulting RIP is gone. Say so rather than name it.
    let cs = fd.get_sregs().ok().map(|s| s.cs.selector);
    if rip == Some(0xfff0) && cs == Some(0xf000) {
        rip = None;
        what.push_str(
            "; the vCPU was reset before the exit reached rtvm, so the faulting RIP is unknown",
        );
    }
    let reason = VmExitReason::Fatal {
        vcpu: ctx.index,
        what,
        rip,
    };
    tracing::debug!("{reason}");
    ctx.exit.request(reason);
    false
}

fn set_eax(fd: &VcpuFd, value: u32) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    let mut regs = fd.get_regs()?;
    regs.rax = (regs.rax & !0xffff_ffff) | u64::from(value);
    fd.set_regs(&regs)
}

/// Waits while paused; returns false once the vCPU must stop.
fn obey_requests(control: &Control) -> bool {
    let mut shared = control.lock();
    loop {
        match shared.request {
            Request::Run => {
                if shared.state != VcpuState::Running {
                    shared.state = VcpuState::Running;
                    control.changed.notify_all();
                }
                return true;
            }
            Request::Stop => return false,
            Request::Pause => {
                if shared.state != VcpuState::Paused {
                    shared.state = VcpuState::Paused;
                    control.changed.notify_all();
                }
                shared = control
                    .changed
                    .wait(shared)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

fn exit_kind(exit: &VcpuExit<'_>) -> ExitKind {
    match exit {
        VcpuExit::IoOut(port::DOORBELL, _) => ExitKind::Doorbell,
        VcpuExit::IoOut(..) => ExitKind::IoOut,
        VcpuExit::IoIn(..) => ExitKind::IoIn,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitKind::Mmio,
        VcpuExit::Intr => ExitKind::Interrupted,
        _ => ExitKind::Other,
    }
}

fn handle_exit(ctx: &VcpuContext, exit: VcpuExit<'_>) -> Flow {
    match exit {
        VcpuExit::IoOut(port::DOORBELL, data) if data.len() == 4 => Flow::Doorbell(le_value(data)),
        VcpuExit::IoOut(port, data) if port::is_rtvm(port) => handle_rtvm_port(ctx, port, data),
        VcpuExit::IoOut(port, data) => {
            if ctx.io_bus.write(port.into(), data) {
                Flow::Continue
            } else {
                unhandled(ctx, "port write", port.into(), Some(data))
            }
        }
        VcpuExit::IoIn(port, data) => {
            if !port::is_rtvm(port) && ctx.io_bus.read(port.into(), data) {
                Flow::Continue
            } else {
                data.fill(0xff);
                unhandled(ctx, "port read", port.into(), None)
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if ctx.mmio_bus.write(addr, data) {
                Flow::Continue
            } else {
                unhandled(ctx, "MMIO write", addr, Some(data))
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if ctx.mmio_bus.read(addr, data) {
                Flow::Continue
            } else {
                data.fill(0xff);
                unhandled(ctx, "MMIO read", addr, None)
            }
        }
        VcpuExit::Intr => Flow::Continue,
        VcpuExit::Shutdown => {
            Flow::Fatal("guest triple fault (KVM_EXIT_SHUTDOWN: the CPU could not deliver an exception)".into())
        }
        VcpuExit::Hlt => Flow::Fatal("guest halted with no way to wake (KVM_EXIT_HLT)".into()),
        VcpuExit::InternalError => {
            Flow::Fatal("KVM internal error (KVM_EXIT_INTERNAL_ERROR: KVM could not emulate the guest)".into())
        }
        VcpuExit::FailEntry(reason, cpu) => Flow::Fatal(format!(
            "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host CPU {cpu})"
        )),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Flow::EndVm(VmExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Flow::EndVm(VmExitReason::Reset),
            other => Flow::Fatal(format!("guest system event {other} (KVM_EXIT_SYSTEM_EVENT)")),
        },
        other => Flow::Fatal(format!("unexpected VM exit {other:?}")),
    }
}

fn handle_rtvm_port(ctx: &VcpuContext, port: u16, data: &[u8]) -> Flow {
    let value = le_value(data);
    match port {
        port::EXIT => Flow::EndVm(VmExitReason::GuestExit {
            vcpu: ctx.index,
            status: value,
        }),
        port::PANIC => Flow::EndVm(VmExitReason::GuestPanic {
            vcpu: ctx.index,
            code: value,
        }),
        port::VCPU_OFF => Flow::Off,
        port::NOP => Flow::Continue,
        _ => unhandled(ctx, "port write", port.into(), Some(data)),
    }
}

fn unhandled(ctx: &VcpuContext, kind: &str, addr: u64, data: Option<&[u8]>) -> Flow {
    let what = match data {
        Some(data) => format!(
            "unhandled {kind} at {addr:#x} (value {:#x}, {} bytes)",
            le_value(data),
            data.len()
        ),
        None => format!("unhandled {kind} at {addr:#x}"),
    };
    match ctx.unhandled_io {
        UnhandledIo::Fatal => Flow::Fatal(what),
        UnhandledIo::Log => {
            tracing::debug!("vCPU {}: {what}", ctx.index);
            Flow::Continue
        }
    }
}
