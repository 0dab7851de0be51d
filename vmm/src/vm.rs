//! A KVM virtual machine: its memory, interrupt controllers, devices and
//! vCPUs, set up from a [`VmConfig`] and run until it ends.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use rtvm_abi::port;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::builtin::{self, GuestImage};
use crate::boot::cpu;
use crate::boot::linux;
use crate::config::{GuestSpec, VmConfig};
use crate::config::{HugePages, SeccompMode, UnhandledIo};
use crate::devices::{Bus, Console, ResetController, SerialDevice};
use crate::error::{Error, Result};
use crate::exit::{ExitSignal, VmExitReason};
use crate::memory::{self, GuestRam};
use crate::realtime::{self, RtHost, RtHostSettings, RtItem, RtReport};
use crate::rpc::counters::WakeStages;
use crate::rpc::ring::{IoPoller, RingCounts};
use crate::rpc::{CallStats, Services};
use crate::seccomp::{self, ThreadKind};
use crate::signals;
use crate::vcpu::{VcpuContext, VcpuHandle, VcpuState};

/// KVM wants a three-page region for the TSS of real-mode emulation; put it
/// just below 4 GiB, where no RAM of ours is expected to reach on small VMs.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const COM1_IRQ: u32 = 4;

/// A VM that is set up and whose vCPUs have not run yet.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    vcpu_fds: Vec<VcpuFd>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitSignal>,
    console: Console,
    config: VmConfig,
    services: Arc<Services>,
    /// The host-clock page of a Linux guest's VMRPC region.
    clock: Option<linux::ClockPage>,
    /// How guest RAM got backed, for the RT report.
    backing: Vec<memory::BackingStep>,
}

/// How often the control thread refreshes the clock page.
const CLOCK_REFRESH: Duration = Duration::from_millis(100);

/// A guest read and checked, before RAM exists.
enum Prepared {
    Builtin(GuestImage),
    Linux(Box<linux::LinuxKernel>, Option<Vec<u8>>),
}

/// How a VM run ended and what it cost.
#[derive(Debug, Clone)]
pub struct VmRun {
    pub reason: VmExitReason,
    /// Resident set size of the VMM process when the guest ended.
    pub process_rss: Option<u64>,
    /// Guest RAM resident in host memory at that moment.
    pub guest_resident: Option<u64>,
    /// From the first vCPU start to the end of the guest.
    pub guest_time: Duration,
    /// Samples the guest handed over with `Call::Report`, by stream (all
    /// empty unless `VmConfig::sample_streams`).
    pub streams: Vec<Vec<u64>>,
    /// The host's record of each periodic long-poll wake-up, stage by
    /// stage, in the order served (empty unless `VmConfig::sample_streams`).
    pub wakes: Vec<WakeStages>,
    /// What the VMRPC servers served.
    pub calls: CallStats,
    /// Sockets the guest still held open when the VM ended.
    pub open_sockets: usize,
    /// What the guest's I/O rings served.
    pub rings: RingCounts,
    /// CPU time of the I/O poller (none: the VM had none).
    pub poller_cpu: Option<Duration>,
    /// What real-time setup was tried and how it went.
    pub rt_report: RtReport,
    /// vCPUs whose threads had not ended when the stop's grace period
    /// ran out, left behind (see `VcpuHandle::join_until`).
    pub stuck: Vec<usize>,
    /// CPU time each vCPU's thread used, host and guest together (`None`
    /// for one left behind).
    pub vcpu_cpu: Vec<Option<Duration>>,
}

impl VmRun {
    /// Host memory the VMM uses beyond the guest RAM the guest touched.
    pub fn vmm_overhead(&self) -> Option<u64> {
        Some(self.process_rss?.saturating_sub(self.guest_resident?))
    }
}

fn open_kvm(config: &VmConfig) -> Result<Kvm> {
    let path = std::ffi::CString::new(config.kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Config("the KVM device path contains a NUL byte".into()))?;
    let kvm = Kvm::new_with_path(&path).map_err(|e| Error::KvmUnavailable {
        path: config.kvm_device.display().to_string(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmMissingCapability(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM, loads the guest and prepares every vCPU to run.
    /// Guest console output goes to `console`.
    pub fn new(config: &VmConfig, console: Console) -> Result<Vm> {
        config.validate()?;
        let mut config = config.clone();
        let prepared = match &config.guest {
            GuestSpec::Builtin(workload) => {
                let image = GuestImage::builtin()?;
                if !image.has_workload(workload) {
                    return Err(Error::Config(format!(
                        "the built-in guest has no workload '{workload}' (it has: {})",
                        image.workloads.join(", ")
                    )));
                }
                Prepared::Builtin(image)
            }
            GuestSpec::Linux(kernel) => {
                if config.memory > linux::linux_layout::MAX_RAM {
                    return Err(Error::Config(format!(
                        "Linux guests take at most {} MiB of memory for now",
                        linux::linux_layout::MAX_RAM >> 20
                    )));
                }
                let kernel = linux::read_kernel(kernel, config.memory)?;
                let initramfs = match &config.initramfs {
                    Some(path) => Some(linux::read_boot_file(path, "initramfs", config.memory)?),
                    None => None,
                };
                // Linux probes legacy ports we do not emulate; that is normal.
                config.unhandled_io = UnhandledIo::Log;
                Prepared::Linux(Box::new(kernel), initramfs)
            }
        };
        let config = &config;

        let kvm = open_kvm(config)?;
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;

        let (ram, backing) =
            GuestRam::with_backing(config.memory, config.huge_pages, config.prefault)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base()?,
        };
        // SAFETY: the region is the guest RAM mapping, which outlives the VM
        // fd: both live in this Vm and the RAM is dropped after the fd.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        let entry = match &prepared {
            Prepared::Builtin(image) => {
                let image_end = builtin::load(ram.mem(), builtin::BUILTIN_GUEST_ELF)?;
                memory::check_fits(ram.size(), image_end, config.vcpus)?;
                builtin::write_boot_structures(&ram, image, config)?;
                cpu::Entry::Builtin(image.entry)
            }
            Prepared::Linux(kernel, initramfs) => {
                let rt_mask = (0..config.vcpus)
                    .filter(|&i| config.rt_policy(i).is_some())
                    .fold(0u64, |m, i| m | 1 << i);
                let loaded = linux::load(
                    ram.mem(),
                    ram.size(),
                    kernel,
                    initramfs.as_deref(),
                    &config.cmdline,
                    config.vcpus as u32,
                    rt_mask,
                )?;
                tracing::info!("Linux: {}, command line: {}", kernel.kind, loaded.cmdline);
                cpu::Entry::Linux {
                    entry: loaded.entry,
                    region: loaded.region,
                }
            }
        };

        let exit = Arc::new(ExitSignal::new()?);
        let io_bus = Arc::new(build_io_bus(&fd, &exit, console.clone())?);
        let mmio_bus = Arc::new(Bus::new());

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpu_fds = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(index as u64)
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            cpu::setup_vcpu(
                &vcpu,
                index,
                config.vcpus,
                &cpuid,
                tsc_deadline,
                &ram,
                &entry,
            )?;
            vcpu_fds.push(vcpu);
        }

        let services = Arc::new(Services::new(config)?);
        let ram = Arc::new(ram);
        let clock = match entry {
            cpu::Entry::Linux { region, .. } => {
                let tsc_khz = crate::clock::guest_tsc_khz(&vcpu_fds[0]);
                let offset = crate::clock::measure_tsc_offset(&vcpu_fds[0], tsc_khz);
                linux::ClockPage::start(ram.clone(), region, tsc_khz, offset)
            }
            cpu::Entry::Builtin(_) => None,
        };
        Ok(Vm {
            services,
            kvm,
            fd,
            ram,
            vcpu_fds,
            io_bus,
            mmio_bus,
            exit,
            console,
            clock,
            backing,
            config: config.clone(),
        })
    }

    /// Applies the real-time settings and starts every vCPU thread. With
    /// `rt_strict`, a real-time step that fails stops the VM again and is
    /// returned as an error.
    pub fn start(self) -> Result<RunningVm> {
        let count = self.vcpu_fds.len();
        let rt_vcpus = (0..count)
            .filter(|&i| self.config.rt_policy(i).is_some())
            .count();
        let mut rt_report = RtReport::default();
        // How guest RAM is backed matters to a real-time guest, or to one
        // that asked for more than the default.
        if rt_vcpus > 0 || self.config.prefault || self.config.huge_pages == HugePages::Hugetlbfs {
            for (what, result) in self.backing {
                rt_report.record(what, result);
            }
        }
        let rt_host = RtHost::setup(
            RtHostSettings {
                bandwidth: self.config.rt_bandwidth,
                mlock: self.config.mlock,
                allow_uncapped: self.config.rt_allow_uncapped,
            },
            rt_vcpus,
            &mut rt_report,
        )
        .map_err(Error::Realtime)?;
        let rt_cpus: Arc<[usize]> = (0..count)
            .filter_map(|i| self.config.rt_policy(i).and_then(|p| p.cpu))
            .collect();
        // Before the vCPUs: the guest may set rings up at once.
        let poller = if self.config.io_poller.enabled {
            let (poller, items) =
                spawn_poller(&self.config, &self.services, &self.ram, &rt_host, &rt_cpus)?;
            rt_report.items.extend(items);
            Some(poller)
        } else {
            None
        };
        let live = Arc::new(AtomicUsize::new(count));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        let mut vcpus = Vec::with_capacity(count);
        for (index, fd) in self.vcpu_fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                index,
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                exit: self.exit.clone(),
                unhandled_io: self.config.unhandled_io,
                live: live.clone(),
                count,
                ram: self.ram.clone(),
                services: self.services.clone(),
                advance: self.config.advance_for(index),
                rt: self.config.rt_policy(index),
                rt_cpus: rt_cpus.clone(),
                cgroups: rt_host.cgroups.clone(),
                seccomp: self.config.seccomp,
                started: started_tx.clone(),
            };
            vcpus.push(VcpuHandle::spawn(fd, ctx)?);
        }
        drop(started_tx);
        let mut per_vcpu: Vec<(usize, Vec<_>)> = started_rx.iter().take(count).collect();
        per_vcpu.sort_by_key(|(i, _)| *i);
        rt_report
            .items
            .extend(per_vcpu.into_iter().flat_map(|(_, items)| items));
        if !rt_report.is_empty() {
            tracing::info!("{rt_report}");
            for failure in rt_report.failures() {
                tracing::warn!(
                    "real-time setting not applied: {}: {}",
                    failure.what,
                    failure.result.as_ref().unwrap_err()
                );
            }
        }
        if let Err(e) = self.console.confine(self.config.seccomp) {
            // The vCPUs run already: stop them before giving up.
            let deadline = Instant::now() + crate::vcpu::STOP_GRACE;
            for vcpu in vcpus {
                vcpu.join_until(deadline);
            }
            return Err(e);
        }
        match self.config.seccomp {
            SeccompMode::Enforce => {}
            SeccompMode::Log => tracing::warn!(
                "seccomp in log mode: calls outside a thread's filter are let through and logged by the kernel"
            ),
            SeccompMode::Off => tracing::warn!("seccomp is off: no thread of this VM is confined"),
        }
        let running = RunningVm {
            vcpus,
            poller,
            exit: self.exit,
            console: self.console,
            ram: self.ram,
            services: self.services,
            rt_report,
            started,
            clock: Mutex::new(self.clock),
            _rt_host: rt_host,
            _fd: self.fd,
            _kvm: self.kvm,
        };
        if self.config.rt_strict {
            let failed = running.rt_report.failures().next().map(|failed| {
                format!(
                    "real-time setting not applied (strict real-time was asked for): {}: {}",
                    failed.what,
                    failed.result.as_ref().unwrap_err()
                )
            });
            if let Some(msg) = failed {
                running.stop();
                return Err(Error::Realtime(msg));
            }
        }
        Ok(running)
    }

    /// Runs the VM to its end.
    pub fn run(self) -> Result<VmRun> {
        Ok(self.start()?.wait())
    }
}

/// A VM whose vCPU threads run.
pub struct RunningVm {
    // Field order is drop order: vCPU threads end, then the VM fd closes
    // (which also ends KVM's worker threads), then guest RAM is unmapped,
    // and last the RT cgroups, by then empty, are removed.
    vcpus: Vec<VcpuHandle>,
    /// Stops touching guest RAM before it is unmapped.
    poller: Option<IoPoller>,
    exit: Arc<ExitSignal>,
    console: Console,
    services: Arc<Services>,
    rt_report: RtReport,
    started: Instant,
    clock: Mutex<Option<linux::ClockPage>>,
    _fd: VmFd,
    _kvm: Kvm,
    ram: Arc<GuestRam>,
    _rt_host: RtHost,
}

impl RunningVm {
    /// What real-time setup was tried and how it went.
    pub fn rt_report(&self) -> &RtReport {
        &self.rt_report
    }

    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Pauses every vCPU and waits until all are parked (or gone).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.vcpus.iter().for_each(VcpuHandle::pause);
        // The poller too: a paused VM's memory changes no more.
        let poller = self.poller.is_none() || self.services.sockets.rings().pause(timeout);
        self.vcpus
            .iter()
            .all(|v| v.wait_for(VcpuState::Paused, timeout) || v.state() == VcpuState::Exited)
            && poller
    }

    /// Lets every paused vCPU (and the I/O poller) run again.
    pub fn resume(&self) {
        self.services.sockets.rings().resume();
        self.vcpus.iter().for_each(VcpuHandle::resume);
    }

    /// Asks the VM to end (as `stop` does) without waiting: the thread in
    /// [`RunningVm::wait_timeout`] sees the reason and tears the VM down.
    pub fn request_stop(&self) {
        self.exit.request(VmExitReason::Stopped);
    }

    /// The VMRPC calls served so far (live counters).
    pub fn calls(&self) -> CallStats {
        self.services.counters.snapshot()
    }

    /// The I/O rings' counts so far.
    pub fn rings(&self) -> RingCounts {
        self.services.sockets.rings().counts()
    }

    /// Guest sockets open now.
    pub fn open_sockets(&self) -> usize {
        self.services.sockets.open_sockets()
    }

    /// Files the guest holds open in its share, and the bytes it has
    /// written there (none: no share).
    pub fn share_use(&self) -> Option<(usize, u64)> {
        let files = self.services.files.as_ref()?;
        Some((files.open_files(), files.bytes_written()))
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// CPU time the I/O poller used so far (none: no poller).
    pub fn poller_cpu(&self) -> Option<Duration> {
        self.poller.as_ref().and_then(IoPoller::cpu_time)
    }

    /// Waits up to `timeout` for the VM to end on its own or for a
    /// termination signal; returns the reason if it ended.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExitReason> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reason) = self.exit.reason() {
                return Some(reason);
            }
            if let Some(sig) = signals::termination_signal() {
                self.exit.request(VmExitReason::Signal(sig));
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = vec![libc::pollfd {
                fd: self.exit.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(fd) = signals::termination_fd() {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let mut wait = left;
            if let Some(clock) = self
                .clock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                clock.publish();
                wait = wait.min(CLOCK_REFRESH);
            }
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of pollfd for the whole call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        }
    }

    /// Waits for the VM to end, then stops and joins every vCPU thread.
    pub fn wait(self) -> VmRun {
        let reason = loop {
            if let Some(reason) = self.wait_timeout(Duration::from_secs(3600)) {
                break reason;
            }
        };
        self.finish(reason)
    }

    /// Ends the VM now (if it has not ended on its own) and joins its vCPUs.
    pub fn stop(self) -> VmRun {
        self.exit.request(VmExitReason::Stopped);
        let reason = self.exit.reason().unwrap_or(VmExitReason::Stopped);
        self.finish(reason)
    }

    fn finish(self, reason: VmExitReason) -> VmRun {
        let guest_time = self.started.elapsed();
        let process_rss = memory::process_rss();
        let guest_resident = self.ram.resident_bytes();
        // All stop at once; then each gets what is left of one grace period.
        self.vcpus.iter().for_each(VcpuHandle::stop);
        let deadline = Instant::now() + crate::vcpu::STOP_GRACE;
        let mut stuck = Vec::new();
        let mut vcpu_cpu = Vec::new();
        for vcpu in self.vcpus {
            let index = vcpu.index();
            let joined = vcpu.join_until(deadline);
            vcpu_cpu.push(joined);
            if joined.is_none() {
                stuck.push(index);
            }
        }
        let poller_cpu = self.poller.and_then(IoPoller::stop);
        self.console.finish();
        let wakes = self
            .services
            .streams
            .as_ref()
            .map(|streams| streams.take_wakes())
            .unwrap_or_default();
        let streams = (0..rtvm_abi::vmrpc::STREAMS as usize)
            .map(|s| match &self.services.streams {
                // The host's own stream: the lateness of every periodic
                // wait as the host handed control back.
                Some(_) if s == rtvm_abi::vmrpc::HOST_STREAM as usize => wakes
                    .iter()
                    .map(|w| w.returned.saturating_sub(w.deadline))
                    .collect(),
                Some(streams) => streams.take(s),
                None => Vec::new(),
            })
            .collect();
        VmRun {
            reason,
            wakes,
            process_rss,
            guest_resident,
            guest_time,
            streams,
            calls: self.services.counters.snapshot(),
            open_sockets: self.services.sockets.open_sockets(),
            rings: self.services.sockets.rings().counts(),
            poller_cpu,
            rt_report: self.rt_report,
            stuck,
            vcpu_cpu,
        }
    }
}

/// Starts the I/O poller with its real-time settings (the RT report's
/// items) and its seccomp filter. The guest may set rings up from its
/// first instruction: the poller serves them from the start.
fn spawn_poller(
    config: &VmConfig,
    services: &Arc<Services>,
    ram: &Arc<GuestRam>,
    rt_host: &RtHost,
    rt_cpus: &Arc<[usize]>,
) -> Result<(IoPoller, Vec<RtItem>)> {
    let seccomp = config.seccomp;
    let config = config.io_poller.clone();
    let cgroups = rt_host.cgroups.clone();
    let rt_cpus = rt_cpus.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    services.sockets.serve_rings();
    let poller = IoPoller::spawn(services.clone(), ram.clone(), config.spin(), move || {
        let mut items = Vec::new();
        let item = |what: String, result| RtItem {
            vcpu: None,
            what,
            result,
        };
        match &config.rt {
            Some(policy) => {
                if let Some(groups) = &cgroups {
                    items.push(item(
                        format!("I/O poller: in cgroup {}", groups.rt_group().display()),
                        groups.join_rt(),
                    ));
                }
                items.extend(realtime::apply_thread_policy("I/O poller", policy));
            }
            None if !rt_cpus.is_empty() => items.push(item(
                format!("I/O poller: kept off the RT vCPUs' CPUs {rt_cpus:?}"),
                realtime::keep_off(&rt_cpus),
            )),
            None => {}
        }
        let confined = seccomp::confine_current_thread(ThreadKind::IoPoller, seccomp);
        let _ = tx.send((items, confined));
    })?;
    let (items, confined) = rx.recv().map_err(|_| Error::Host {
        what: "starting the I/O poller thread".into(),
        source: std::io::Error::other("it ended before it was set up"),
    })?;
    confined?;
    Ok((poller, items))
}

fn build_io_bus(fd: &VmFd, exit: &Arc<ExitSignal>, console: Console) -> Result<Bus> {
    let mut bus = Bus::new();
    let irq = EventFd::new(libc::EFD_CLOEXEC).map_err(Error::host("creating the serial irqfd"))?;
    fd.register_irqfd(&irq, COM1_IRQ)
        .map_err(Error::kvm("KVM_IRQFD"))?;
    bus.insert(
        port::COM1.into(),
        8,
        Arc::new(Mutex::new(SerialDevice::new(irq, console))),
    )?;
    // 0x60..=0x64: data port, (0x61 is the in-kernel PIT's), command port.
    bus.insert(
        port::I8042_DATA.into(),
        5,
        Arc::new(Mutex::new(ResetController::new(exit.clone()))),
    )?;
    Ok(bus)
}
