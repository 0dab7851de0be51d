//! An in-process transport: the VMM's real VMRPC server, driven the way a
//! vCPU thread drives it on a doorbell exit, over a page of its guest RAM.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use rtvm_abi::linux::{RegionHeader, REGION_MAGIC};
use rtvm_abi::vmrpc::{Status, CALL_PAGE_SIZE};
use rtvm_abi::ABI_VERSION;
use rtvm_guest_linux::{Error, Header, OwnedHeader, Page, Transport};
use rtvm_vmm::clock::{now_ns, TscOffset};
use rtvm_vmm::config::AdvanceMode;
use rtvm_vmm::memory::GuestRam;
use rtvm_vmm::rpc::park::Unattended;
use rtvm_vmm::rpc::{Doorbell, RpcServer, Services, VcpuFacts};
use rtvm_vmm::{GuestSpec, VmConfig};

/// Guest RAM size.
pub const RAM: u64 = 16 << 20;
/// Where the call pages sit in guest RAM: vCPU i's at `PAGES + i * 4096`.
pub const PAGES: u64 = 0x10_0000;

/// The host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// The host TSC frequency, measured once against CLOCK_MONOTONIC and
/// rounded *up* by 0.01%: a slightly fast frequency makes the TSC-mapped
/// clock run slow, so a guest spinning on it can only end late, never early.
pub fn tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let t0 = clock_and_tsc();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t1 = clock_and_tsc();
        let khz = (t1.1 - t0.1) as u128 * 1_000_000 / (t1.0 - t0.0) as u128;
        (khz as u64) + (khz as u64) / 10_000 + 1
    })
}

/// A (CLOCK_MONOTONIC, TSC) pair read as close together as we can: the
/// midpoint of the tightest of a few TSC brackets around the clock read.
fn clock_and_tsc() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..16 {
        let a = host_tsc();
        let t = now_ns();
        let b = host_tsc();
        if b - a < best.0 {
            best = (b - a, t, a + (b - a) / 2);
        }
    }
    (best.1, best.2)
}

/// Publishes a fresh clock pair, the way the VMM keeps the header current:
/// the host clock read *before* the TSC, so the pair maps the TSC to at most
/// the true host time.
pub fn refresh_clock(header: &OwnedHeader) {
    let host = now_ns();
    let tsc = host_tsc();
    header.publish_clock(host, tsc, 1);
}

/// The VMM side of one VM, in-process.
pub struct InProcess {
    ram: Arc<GuestRam>,
    server: RpcServer,
    pub header: Arc<OwnedHeader>,
    /// The vCPU the "calling thread" runs on.
    pub vcpu: u32,
    /// Rings this doorbell value instead of the page's (to test refusals).
    pub doorbell_override: Option<u32>,
    /// Skips the server entirely (to test an unanswered call).
    pub drop_calls: bool,
}

impl InProcess {
    /// vCPU `vcpu` of `count`; real-time (adaptive advance, header bit set)
    /// or not (no advance, bit clear).
    pub fn new(vcpu: u32, count: u32, realtime: bool) -> InProcess {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let facts = VcpuFacts {
            index: vcpu as usize,
            count: count as usize,
            realtime,
            tsc_khz: tsc_khz(),
            tsc_offset: Some(TscOffset {
                ticks: 0,
                error_ns: 1,
            }),
        };
        let advance = if realtime {
            AdvanceMode::Adaptive { max_ns: 500_000 }
        } else {
            AdvanceMode::Off
        };
        let mut config = VmConfig::new(GuestSpec::Builtin("in-process".into()));
        config.sample_streams = true;
        let services = Services::new(&config).unwrap();
        let server = RpcServer::new(facts, ram.clone(), Arc::new(services), advance);
        let header = OwnedHeader::new(RegionHeader {
            magic: REGION_MAGIC,
            abi_version: ABI_VERSION,
            vcpu_count: count,
            tsc_khz: tsc_khz(),
            rt_vcpus: if realtime { 1 << vcpu } else { 0 },
            ..RegionHeader::default()
        });
        refresh_clock(&header);
        InProcess {
            ram,
            server,
            header,
            vcpu,
            doorbell_override: None,
            drop_calls: false,
        }
    }

    fn page_address(vcpu: u32) -> u64 {
        PAGES + u64::from(vcpu) * CALL_PAGE_SIZE as u64
    }
}

impl Transport for InProcess {
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        if self.drop_calls {
            return Ok(());
        }
        let addr = Self::page_address(vcpu);
        assert!(addr + CALL_PAGE_SIZE as u64 <= RAM);
        let base = self.ram.host_base().unwrap() as *mut u8;
        // SAFETY: the page lies inside the RAM mapping (checked above), which
        // `self.ram` keeps alive; the server touches it only inside
        // `on_doorbell`, on this thread.
        unsafe {
            std::ptr::copy_nonoverlapping(page.as_ptr(), base.add(addr as usize), CALL_PAGE_SIZE)
        };
        refresh_clock(&self.header);
        let doorbell = self.doorbell_override.unwrap_or((addr >> 12) as u32);
        let outcome = self.server.on_doorbell(doorbell, &mut Unattended);
        refresh_clock(&self.header);
        match outcome {
            Doorbell::Served => {
                // SAFETY: as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        base.add(addr as usize),
                        page.as_mut_ptr(),
                        CALL_PAGE_SIZE,
                    )
                };
                Ok(())
            }
            Doorbell::BadPage(status) => Err(status),
        }
    }

    fn current_vcpu(&self) -> Result<u32, Error> {
        Ok(self.vcpu)
    }

    fn header(&self) -> Option<Header> {
        Some(Header::new(self.header.clone()))
    }
}

/// Where the in-process VMRPC region sits in guest RAM (its call slots).
pub const REGION: u64 = 0x40_0000;

/// The VMM side of one VM for socket calls through call slots, in-process:
/// the real server, its `NetService` under `net`, the region's slots in
/// its guest RAM.
pub struct InProcessSlots {
    ram: Arc<GuestRam>,
    services: Arc<Services>,
    server: std::sync::Mutex<RpcServer>,
    vcpus: u32,
}

impl InProcessSlots {
    pub fn new(net: rtvm_vmm::config::NetPolicy) -> InProcessSlots {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let facts = VcpuFacts {
            index: 0,
            count: 1,
            realtime: false,
            tsc_khz: tsc_khz(),
            tsc_offset: None,
        };
        let mut config = VmConfig::new(GuestSpec::Builtin("in-process".into()));
        config.net = net;
        let services = Arc::new(Services::new(&config).unwrap());
        let server = RpcServer::new(facts, ram.clone(), services.clone(), AdvanceMode::Off);
        assert!(REGION + rtvm_abi::linux::region_size(1) <= RAM);
        InProcessSlots {
            ram,
            services,
            server: std::sync::Mutex::new(server),
            vcpus: 1,
        }
    }

    /// Sockets the guest holds open in the host, as the VMM counts them.
    pub fn open_sockets(&self) -> usize {
        self.services.sockets.open_sockets()
    }

    /// How often socket calls parked the (one) vCPU in the host.
    pub fn io_parks(&self) -> u64 {
        self.services
            .counters
            .snapshot()
            .io_parks
            .first()
            .copied()
            .unwrap_or(0)
    }

    fn host(&self, guest_addr: u64) -> *mut u8 {
        let base = self.ram.host_base().unwrap() as *mut u8;
        // SAFETY: every address passed lies in the region, inside RAM
        // (checked at construction).
        unsafe { base.add(guest_addr as usize) }
    }
}

impl rtvm_guest_linux::slots::SlotTransport for InProcessSlots {
    fn slot_table(&self) -> &[std::sync::atomic::AtomicU64] {
        let at = self.host(rtvm_abi::linux::slot_table(REGION, self.vcpus));
        // SAFETY: the table page lies in RAM, 8-byte aligned, lives as long
        // as `self.ram`, and is only accessed atomically.
        unsafe {
            std::slice::from_raw_parts(
                at.cast::<std::sync::atomic::AtomicU64>(),
                rtvm_abi::linux::SLOTS as usize,
            )
        }
    }

    fn data_address(&self, slot: usize) -> u64 {
        rtvm_abi::linux::slot_data(REGION, self.vcpus, slot as u32)
    }

    fn write_data(&self, slot: usize, bytes: &[u8]) {
        let at = self.host(self.data_address(slot));
        // SAFETY: inside the slot's data pages, in RAM.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
    }

    fn read_data(&self, slot: usize, out: &mut [u8]) {
        let at = self.host(self.data_address(slot));
        // SAFETY: as in write_data.
        unsafe { std::ptr::copy_nonoverlapping(at, out.as_mut_ptr(), out.len()) };
    }

    fn ring_slot(&self, slot: usize, page: &mut Page) -> Result<(), Status> {
        let addr = rtvm_abi::linux::slot_call_page(REGION, self.vcpus, slot as u32);
        let at = self.host(addr);
        // SAFETY: the call page lies in RAM; the server reads it only inside
        // `on_doorbell`, below, on this thread.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), at, CALL_PAGE_SIZE) };
        // Like a vCPU: one call at a time per server (a waiting call holds it).
        let outcome = self
            .server
            .lock()
            .unwrap()
            .on_doorbell((addr >> 12) as u32, &mut Unattended);
        match outcome {
            Doorbell::Served => {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(at, page.as_mut_ptr(), CALL_PAGE_SIZE) };
                Ok(())
            }
            Doorbell::BadPage(status) => Err(status),
        }
    }
}
