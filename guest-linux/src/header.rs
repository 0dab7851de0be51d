//! The region header ([`RegionHeader`]) as live memory, and the host clock
//! it lets user space read with no exit.
//!
//! The VMM rewrites the header's clock pair under a sequence counter while
//! the guest may be reading it, so every field is read with an atomic load
//! (plain `mov`s on x86-64), and the pair through the seqlock protocol: the
//! counter even and unchanged across the read.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub use rtvm_abi::linux::ClockPair;
use rtvm_abi::linux::{field, host_ns_at, read_clock_pair, write_clock_pair, RegionHeader};

/// How many times a clock-pair read retries while the VMM is mid-update
/// before giving up: a VMM that died between its two counter writes must not
/// hang the guest (the caller falls back to a `Clock` call or fails).
pub const SEQLOCK_RETRIES: u32 = 1_000_000;

/// Memory that holds a live [`RegionHeader`].
///
/// # Safety
/// `as_ptr` must return the same 8-byte-aligned pointer for the lifetime of
/// the implementor, valid for reads (and, for writers, writes) of a whole
/// `RegionHeader`, and every access to it other than through atomics must
/// come from outside this process (the VMM).
pub unsafe trait HeaderMemory: Send + Sync {
    fn as_ptr(&self) -> *mut RegionHeader;
}

/// A header in this process's own memory: for tests and simulations of the
/// VMM. Written only through its methods, which use atomics (with the
/// seqlock protocol for the clock pair), so readers on other threads are sound.
pub struct OwnedHeader {
    cell: UnsafeCell<RegionHeader>,
}

// SAFETY: all access after construction goes through atomics.
unsafe impl Sync for OwnedHeader {}

impl OwnedHeader {
    pub fn new(header: RegionHeader) -> Arc<Self> {
        Arc::new(OwnedHeader {
            cell: UnsafeCell::new(header),
        })
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of `rtvm_abi::linux::field`'s u64 field
        // offsets, so the word lies in our cell, 8-byte aligned (repr(C)),
        // and it is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.cell.get().cast::<u8>().add(offset).cast()) }
    }

    /// Writes a new clock pair the way the VMM does (the seqlock of
    /// `rtvm_abi::linux::write_clock_pair`).
    pub fn publish_clock(&self, host_ns: u64, guest_tsc: u64, error_ns: u64) {
        let seq = self.word(field::SEQ).load(Ordering::Relaxed);
        let pair = ClockPair {
            host_ns,
            guest_tsc,
            error_ns,
        };
        write_clock_pair(|at, v, order| self.word(at).store(v, order), seq, pair);
    }

    /// Sets the sequence counter as it is (odd: "being written").
    pub fn set_seq(&self, seq: u64) {
        self.word(field::SEQ).store(seq, Ordering::Release);
    }

    /// Writes the clock pair without touching the counter (to play a VMM
    /// that is mid-update, with the counter left odd).
    pub fn store_pair_raw(&self, host_ns: u64, guest_tsc: u64, error_ns: u64) {
        self.word(field::HOST_NS).store(host_ns, Ordering::Relaxed);
        self.word(field::GUEST_TSC)
            .store(guest_tsc, Ordering::Relaxed);
        self.word(field::ERROR_NS)
            .store(error_ns, Ordering::Release);
    }

    /// Sets the real-time bitmap.
    pub fn set_rt_vcpus(&self, bits: u64) {
        self.word(field::RT_VCPUS).store(bits, Ordering::Release);
    }
}

// SAFETY: the cell lives as long as the OwnedHeader, at a fixed address
// (it is only handed out inside an Arc), aligned as RegionHeader is.
unsafe impl HeaderMemory for OwnedHeader {
    fn as_ptr(&self) -> *mut RegionHeader {
        self.cell.get()
    }
}

/// A live region header. Cheap to clone (it shares the memory).
#[derive(Clone)]
pub struct Header {
    mem: Arc<dyn HeaderMemory>,
    ptr: *mut RegionHeader,
}

// SAFETY: the pointer is only dereferenced through atomics, and the memory
// it points to is kept alive by `mem`, which is Send + Sync.
unsafe impl Send for Header {}
// SAFETY: as for Send: shared access is through atomics only.
unsafe impl Sync for Header {}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("vcpu_count", &self.vcpu_count())
            .field("tsc_khz", &self.tsc_khz())
            .field("rt_vcpus", &format_args!("{:#x}", self.rt_vcpus()))
            .finish()
    }
}

impl Header {
    pub fn new(mem: Arc<dyn HeaderMemory>) -> Header {
        let ptr = mem.as_ptr();
        Header { mem, ptr }
    }

    /// The memory this header lives in.
    pub fn memory(&self) -> &Arc<dyn HeaderMemory> {
        &self.mem
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of `rtvm_abi::linux::field`'s u64 field
        // offsets, so the word lies in the header, which `HeaderMemory`
        // guarantees is live, 8-byte aligned and accessed atomically
        // in-process.
        unsafe { AtomicU64::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for `word`, for a u32 field (4-byte aligned).
        unsafe { AtomicU32::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    pub fn magic(&self) -> u64 {
        self.word(field::MAGIC).load(Ordering::Relaxed)
    }

    pub fn abi_version(&self) -> u32 {
        self.word32(field::ABI_VERSION).load(Ordering::Relaxed)
    }

    pub fn vcpu_count(&self) -> u32 {
        self.word32(field::VCPU_COUNT).load(Ordering::Relaxed)
    }

    pub fn tsc_khz(&self) -> u64 {
        self.word(field::TSC_KHZ).load(Ordering::Relaxed)
    }

    pub fn rt_vcpus(&self) -> u64 {
        self.word(field::RT_VCPUS).load(Ordering::Relaxed)
    }

    /// Whether guest CPU (= vCPU) `cpu` is a real-time vCPU, by the header's
    /// bitmap: no exit. False for CPUs the VM does not have.
    pub fn is_rt_cpu(&self, cpu: u32) -> bool {
        cpu < 64 && cpu < self.vcpu_count() && self.rt_vcpus() & (1 << cpu) != 0
    }

    /// The clock pair, read consistently: the counter even and unchanged
    /// across the read. `None` if it stayed mid-update for
    /// [`SEQLOCK_RETRIES`] attempts.
    pub fn clock_pair(&self) -> Option<ClockPair> {
        read_clock_pair(|at, order| self.word(at).load(order), SEQLOCK_RETRIES)
    }

    /// A consistent copy of the whole header.
    pub fn snapshot(&self) -> Option<RegionHeader> {
        let pair = self.clock_pair()?;
        Some(RegionHeader {
            magic: self.magic(),
            abi_version: self.abi_version(),
            vcpu_count: self.vcpu_count(),
            tsc_khz: self.tsc_khz(),
            rt_vcpus: self.rt_vcpus(),
            seq: 0,
            host_ns: pair.host_ns,
            guest_tsc: pair.guest_tsc,
            error_ns: pair.error_ns,
        })
    }
}

/// The guest TSC, ordered after earlier loads (`lfence; rdtsc`).
pub fn rdtsc() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// A guest clock read with `clock_gettime`, in ns (0 before the epoch or on error).
pub fn guest_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a live timespec; an invalid clock id only returns an error.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 || ts.tv_sec < 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A deadline on a guest clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestDeadline {
    /// Absolute guest `CLOCK_MONOTONIC` time, ns.
    Monotonic(u64),
    /// Absolute guest `CLOCK_REALTIME` time, ns since the epoch.
    Realtime(u64),
    /// This long from now, ns.
    Relative(u64),
}

impl GuestDeadline {
    /// The guest clock the deadline is measured on (`None`: relative).
    pub fn clock(self) -> Option<libc::clockid_t> {
        match self {
            GuestDeadline::Monotonic(_) => Some(libc::CLOCK_MONOTONIC),
            GuestDeadline::Realtime(_) => Some(libc::CLOCK_REALTIME),
            GuestDeadline::Relative(_) => None,
        }
    }
}

/// Host `CLOCK_MONOTONIC` read from the guest TSC through the region
/// header's clock pair: no exit.
#[derive(Clone, Debug)]
pub struct HostClock {
    header: Header,
}

impl HostClock {
    pub fn new(header: Header) -> HostClock {
        HostClock { header }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the host clock can be read from the TSC (`tsc_khz` known).
    pub fn is_usable(&self) -> bool {
        self.header.tsc_khz() != 0
    }

    /// Host ns at guest TSC `tsc` (`None`: TSC frequency unknown, or the
    /// pair stayed mid-update).
    pub fn host_ns_at(&self, tsc: u64) -> Option<u64> {
        let pair = self.header.clock_pair()?;
        let h = RegionHeader {
            tsc_khz: self.header.tsc_khz(),
            host_ns: pair.host_ns,
            guest_tsc: pair.guest_tsc,
            ..RegionHeader::default()
        };
        host_ns_at(&h, tsc)
    }

    /// Host ns now.
    pub fn now(&self) -> Option<u64> {
        self.host_ns_at(rdtsc())
    }

    /// The host deadline of `deadline`, given the guest TSC `tsc` and the
    /// guest clock of the deadline (`guest_now`, ns; ignored for relative
    /// deadlines) read at the same moment. A deadline already past maps to
    /// the same distance in the host's past (clamped at 0); one beyond the
    /// host clock's range saturates.
    pub fn host_deadline_at(
        &self,
        deadline: GuestDeadline,
        tsc: u64,
        guest_now: u64,
    ) -> Option<u64> {
        let host_now = self.host_ns_at(tsc)? as i128;
        let host = match deadline {
            GuestDeadline::Monotonic(d) | GuestDeadline::Realtime(d) => {
                host_now + (d as i128 - guest_now as i128)
            }
            GuestDeadline::Relative(d) => host_now + d as i128,
        };
        Some(host.clamp(0, u64::MAX as i128) as u64)
    }

    /// The host deadline of `deadline`, reading the guest clock and TSC now.
    pub fn host_deadline(&self, deadline: GuestDeadline) -> Option<u64> {
        let guest_now = deadline.clock().map_or(0, guest_clock_ns);
        self.host_deadline_at(deadline, rdtsc(), guest_now)
    }
}
