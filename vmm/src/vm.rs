//! A KVM virtual machine: its memory, interrupt controllers, devices and
//! vCPUs, set up from a [`VmConfig`] and run until it ends.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use rtvm_abi::{port, BootInfo};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::builtin::{self, GuestImage};
use crate::boot::linux;
use crate::boot::x86;
use crate::config::UnhandledIo;
use crate::config::{GuestSpec, VmConfig};
use crate::devices::{Bus, Console, ResetController, SerialDevice};
use crate::error::{Error, Result};
use crate::exit::{ExitSignal, VmExitReason};
use crate::memory::{self, layout, GuestRam};
use crate::realtime::{RtHost, RtHostSettings, RtReport};
use crate::rpc::{CallStats, Services};
use crate::signals;
use crate::vcpu::{VcpuContext, VcpuHandle, VcpuState};

/// KVM wants a three-page region for the TSS of real-mode emulation; put it
/// just below 4 GiB, where no RAM of ours is expected to reach on small VMs.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const COM1_IRQ: u32 = 4;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_EXTINT: u32 = 0x7 << 8;
const APIC_DELIVERY_NMI: u32 = 0x4 << 8;

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
    clock: Option<ClockPage>,
}

/// The (host time, guest TSC) pair in a Linux guest's VMRPC region header.
///
/// One writer — the VMM's control thread — keeps it current under the
/// header's sequence counter: host CLOCK_MONOTONIC is slewed by NTP while the
/// TSC is not, so a pair taken once would drift (tens of ppm: milliseconds
/// an hour).
struct ClockPage {
    ram: Arc<GuestRam>,
    region: u64,
    tsc_khz: u64,
    offset: crate::clock::TscOffset,
    seq: u64,
}

/// How often the control thread refreshes the clock page.
const CLOCK_REFRESH: Duration = Duration::from_millis(100);

impl ClockPage {
    fn publish(&mut self) {
        // Offsets in rtvm_abi::linux::RegionHeader.
        const TSC_KHZ: u64 = 16;
        const SEQ: u64 = 32;
        const HOST_NS: u64 = 40;
        const GUEST_TSC: u64 = 48;
        const ERROR_NS: u64 = 56;
        let mem = self.ram.mem();
        let at = |field: u64| GuestAddress(self.region + field);
        let tsc = crate::clock::host_tsc();
        let now = crate::clock::now_ns();
        self.seq += 1; // odd: being written
        let writes = [
            (SEQ, self.seq),
            (HOST_NS, now),
            (GUEST_TSC, self.offset.guest_tsc(tsc)),
            (ERROR_NS, self.offset.error_ns),
            (TSC_KHZ, self.tsc_khz),
            (SEQ, self.seq + 1),
        ];
        self.seq += 1; // even: stable
        for (field, value) in writes {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if mem.write_obj(value, at(field)).is_err() {
                tracing::warn!(
                    "cannot publish the clock in the VMRPC region at {:#x}",
                    self.region
                );
                return;
            }
        }
    }
}

/// A guest read and checked, before RAM exists.
enum Prepared {
    Builtin(GuestImage),
    Linux(Box<linux::LinuxKernel>, Option<Vec<u8>>),
}

/// Where and how the vCPUs enter the guest.
enum Entry {
    /// Every vCPU at the built-in guest's entry.
    Builtin(u64),
    /// The boot vCPU at the kernel's 64-bit entry; the others wait for the
    /// kernel's INIT/SIPI as on a PC.
    Linux { entry: u64, region: u64 },
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
    /// Samples the guest handed over with `Call::Report`, by stream.
    pub streams: Vec<Vec<u64>>,
    /// What the VMRPC servers served.
    pub calls: CallStats,
    /// What real-time setup was tried and how it went.
    pub rt_report: RtReport,
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
                let kernel = linux::read_kernel(kernel)?;
                let initramfs = match &config.initramfs {
                    Some(path) => Some(linux::read_boot_file(path, "initramfs")?),
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

        let ram = GuestRam::new(config.memory)?;
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
                write_boot_structures(&ram, image, config)?;
                Entry::Builtin(image.entry)
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
                Entry::Linux {
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
            setup_vcpu(
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

        let services = Arc::new(Services::new(config.share.clone(), config.net.clone())?);
        let ram = Arc::new(ram);
        let clock = match entry {
            Entry::Linux { region, .. } => {
                let tsc_khz = crate::clock::guest_tsc_khz(&vcpu_fds[0]);
                crate::clock::measure_tsc_offset(&vcpu_fds[0], tsc_khz).map(|offset| ClockPage {
                    ram: ram.clone(),
                    region,
                    tsc_khz,
                    offset,
                    seq: 0,
                })
            }
            Entry::Builtin(_) => None,
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
        let rt_host = RtHost::setup(
            RtHostSettings {
                bandwidth: self.config.rt_bandwidth,
                mlock: self.config.mlock,
            },
            rt_vcpus,
            &mut rt_report,
        );
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
                cgroups: rt_host.cgroups.clone(),
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
        let running = RunningVm {
            vcpus,
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
    exit: Arc<ExitSignal>,
    console: Console,
    services: Arc<Services>,
    rt_report: RtReport,
    started: Instant,
    clock: Mutex<Option<ClockPage>>,
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
        self.vcpus
            .iter()
            .all(|v| v.wait_for(VcpuState::Paused, timeout) || v.state() == VcpuState::Exited)
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) {
        self.vcpus.iter().for_each(VcpuHandle::resume);
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
        for vcpu in self.vcpus {
            vcpu.join();
        }
        self.console.finish();
        let streams = (0..rtvm_abi::vmrpc::STREAMS as usize)
            .map(|s| self.services.streams.take(s))
            .collect();
        VmRun {
            reason,
            process_rss,
            guest_resident,
            guest_time,
            streams,
            calls: self.services.counters.snapshot(),
            rt_report: self.rt_report,
        }
    }
}

fn build_io_bus(fd: &VmFd, exit: &Arc<ExitSignal>, console: Console) -> Result<Bus> {
    let mut bus = Bus::new();
    let irq = EventFd::new(0).map_err(Error::host("creating the serial irqfd"))?;
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

fn write_boot_structures(ram: &GuestRam, image: &GuestImage, config: &VmConfig) -> Result<()> {
    let mem = ram.mem();
    x86::write_page_tables(mem)?;
    x86::write_idt(mem, &image.vectors)?;

    let workload = match &config.guest {
        GuestSpec::Builtin(workload) => workload,
        GuestSpec::Linux(_) => unreachable!("only built-in guests get BootInfo"),
    };
    let mut info = BootInfo::new();
    info.vcpu_count = config.vcpus as u32;
    info.ram_size = ram.size();
    info.workload[..workload.len()].copy_from_slice(workload.as_bytes());
    info.workload_len = workload.len() as u32;
    info.cmdline[..config.cmdline.len()].copy_from_slice(config.cmdline.as_bytes());
    info.cmdline_len = config.cmdline.len() as u32;
    for index in 0..config.vcpus {
        let area = ram.vcpu_area(index);
        x86::write_gdt_and_tss(mem, area)?;
        let vcpu = &mut info.vcpus[index];
        vcpu.apic_id = index as u32;
        vcpu.user_stack_top = area + layout::AREA_USER_STACK_TOP;
        vcpu.call_page = area + layout::AREA_CALL_PAGE;
    }
    mem.write_slice(boot_info_bytes(&info), GuestAddress(layout::BOOT_INFO))
        .map_err(|e| Error::GuestMemory(format!("writing boot information: {e}")))
}

fn boot_info_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is repr(C), made only of integers and integer arrays
    // laid out without padding (checked by a test), so every byte is initialised.
    unsafe { std::slice::from_raw_parts((info as *const BootInfo).cast::<u8>(), BootInfo::SIZE) }
}

fn setup_vcpu(
    vcpu: &VcpuFd,
    index: usize,
    count: usize,
    supported: &CpuId,
    tsc_deadline: bool,
    ram: &GuestRam,
    entry: &Entry,
) -> Result<()> {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff)
                    | ((index as u32) << 24)
                    | (((count as u32) & 0xff) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
            }
            0xb | 0x1f => e.edx = index as u32, // x2APIC ID
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| Error::KvmMissingCapability("room for boot MSRs"))?;
    vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let area = ram.vcpu_area(index);
    let long_mode = x86::long_mode_sregs(sregs, area);
    let runnable = match *entry {
        Entry::Builtin(entry) => {
            let regs = x86::entry_regs(entry, area, layout::BOOT_INFO, index as u64);
            vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
            vcpu.set_sregs(&long_mode)
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            true
        }
        Entry::Linux { entry, .. } if index == 0 => {
            vcpu.set_regs(&linux::boot_regs(entry))
                .map_err(Error::kvm("KVM_SET_REGS"))?;
            vcpu.set_sregs(&linux::boot_sregs(sregs, long_mode))
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            true
        }
        Entry::Linux { .. } => false,
    };

    // LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_NMI),
    ] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("KVM_SET_LAPIC"))?;

    if runnable {
        // Our own guest needs no INIT/SIPI dance, which would cost CPL0 time
        // on the boot vCPU: every vCPU starts at the entry point at once.
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_has_no_padding() {
        use rtvm_abi::{VcpuBoot, CMDLINE_MAX, MAX_VCPUS, WORKLOAD_NAME_MAX};
        let fields = 8 + 4 + 4 + 8 + 4 + 4 + WORKLOAD_NAME_MAX + CMDLINE_MAX;
        assert_eq!(std::mem::size_of::<VcpuBoot>(), 4 + 4 + 8 + 8 + 8);
        assert_eq!(
            BootInfo::SIZE,
            fields + MAX_VCPUS * std::mem::size_of::<VcpuBoot>()
        );
    }
}
