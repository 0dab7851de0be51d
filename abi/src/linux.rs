//! VMRPC for Linux guests: the region of guest-physical memory the VMM
//! reserves (an e820 "reserved" range, so the guest kernel never uses it as
//! RAM) and announces on the kernel command line as `rtvm.vmrpc=0xADDR`.
//!
//! Page 0 of the region is a [`RegionHeader`]: vCPU count, TSC frequency,
//! which vCPUs are real-time, and a (host time, guest TSC) pair that lets
//! guest user space read host CLOCK_MONOTONIC from `rdtsc` with no exit, the
//! way the vDSO reads the guest's own clock. Page `1 + i` is vCPU `i`'s call
//! page (see [`crate::vmrpc`]); a caller must run pinned to vCPU `i` while it
//! uses page `1 + i`, or use any other page of the region it owns.
//!
//! After the call pages come the **call slots**, for callers that are not
//! pinned, that live in several processes, or that pass data: a slot table
//! page of [`SLOTS`] owner words, then each slot's call page followed by
//! [`SLOT_DATA_PAGES`] data pages (the buffers its calls name by
//! guest-physical address). The doorbell names the page, not the vCPU, so a
//! slot serves whichever vCPU rings it. A caller owns a slot while its owner
//! word holds the caller's nonzero id (the Linux thread id), taken with a
//! compare-and-swap from 0 and given back by storing 0 (release); a slot
//! whose owner no longer exists may be taken over. The VMM never reads the
//! owner words: ownership is the guest's own affair, and the VMM validates
//! every page and buffer address whoever rings.

use core::sync::atomic::{fence, Ordering};

/// The kernel command-line key that carries the region's address.
pub const CMDLINE_KEY: &str = "rtvm.vmrpc";

/// `RegionHeader::magic`: "RTVMRGN1" little-endian.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"RTVMRGN1");

/// Page 0 of the region. All fields little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionHeader {
    /// [`REGION_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs, and of call pages after this one.
    pub vcpu_count: u32,
    /// Guest TSC frequency in kHz (0: unknown, or the TSC is no clock on
    /// this host; then use `Clock` calls).
    pub tsc_khz: u64,
    /// Bit i set: vCPU i is a real-time vCPU (its waits long-poll with the
    /// timer advance).
    pub rt_vcpus: u64,
    /// Sequence counter of the clock pair below: odd while the VMM writes
    /// it; read it before and after, and retry if it changed or was odd.
    pub seq: u64,
    /// Host CLOCK_MONOTONIC (ns) at the moment the guest TSC read `guest_tsc`.
    pub host_ns: u64,
    pub guest_tsc: u64,
    /// How far that pairing may be off, in ns.
    pub error_ns: u64,
}

/// Byte offsets of the header's fields, for the two sides' word accesses.
pub mod field {
    use super::RegionHeader;
    use core::mem::offset_of;

    pub const MAGIC: usize = offset_of!(RegionHeader, magic);
    pub const ABI_VERSION: usize = offset_of!(RegionHeader, abi_version);
    pub const VCPU_COUNT: usize = offset_of!(RegionHeader, vcpu_count);
    pub const TSC_KHZ: usize = offset_of!(RegionHeader, tsc_khz);
    pub const RT_VCPUS: usize = offset_of!(RegionHeader, rt_vcpus);
    pub const SEQ: usize = offset_of!(RegionHeader, seq);
    pub const HOST_NS: usize = offset_of!(RegionHeader, host_ns);
    pub const GUEST_TSC: usize = offset_of!(RegionHeader, guest_tsc);
    pub const ERROR_NS: usize = offset_of!(RegionHeader, error_ns);
}

/// The header's (host time, guest TSC) pair, as one consistent read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockPair {
    pub host_ns: u64,
    pub guest_tsc: u64,
    pub error_ns: u64,
}

/// Writes a new clock pair under the header's sequence counter, the VMM's
/// half of the seqlock: counter odd, the pair, counter even again. `store`
/// writes a u64 field at a byte offset of the header with the given
/// ordering (atomically: a guest may read meanwhile); `seq` is the
/// counter's current value, and the new one is returned.
pub fn write_clock_pair(
    mut store: impl FnMut(usize, u64, Ordering),
    seq: u64,
    pair: ClockPair,
) -> u64 {
    let writing = seq | 1;
    store(field::SEQ, writing, Ordering::Relaxed);
    fence(Ordering::Release);
    store(field::HOST_NS, pair.host_ns, Ordering::Relaxed);
    store(field::GUEST_TSC, pair.guest_tsc, Ordering::Relaxed);
    store(field::ERROR_NS, pair.error_ns, Ordering::Relaxed);
    store(field::SEQ, writing + 1, Ordering::Release);
    writing + 1
}

/// Reads the clock pair consistently, the guest's half of the seqlock: the
/// counter even and unchanged across the read. `load` reads a u64 field at
/// a byte offset of the header with the given ordering. `None` when the
/// pair stayed mid-update for `retries` attempts (a VMM that died between
/// its two counter writes must not hang the guest).
pub fn read_clock_pair(load: impl Fn(usize, Ordering) -> u64, retries: u32) -> Option<ClockPair> {
    for _ in 0..retries {
        let before = load(field::SEQ, Ordering::Acquire);
        if before & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        let pair = ClockPair {
            host_ns: load(field::HOST_NS, Ordering::Relaxed),
            guest_tsc: load(field::GUEST_TSC, Ordering::Relaxed),
            error_ns: load(field::ERROR_NS, Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        if load(field::SEQ, Ordering::Relaxed) == before {
            return Some(pair);
        }
    }
    None
}

/// Call slots in the region.
pub const SLOTS: u32 = 32;
/// Data pages after each slot's call page: 64 KiB, a whole UDP datagram.
pub const SLOT_DATA_PAGES: u64 = 16;
/// Bytes a slot's calls can pass at once.
pub const SLOT_DATA_SIZE: u64 = SLOT_DATA_PAGES * 4096;

/// Bytes of the region for `vcpus` vCPUs: the header page, a call page
/// each, the slot table page and the slots.
pub const fn region_size(vcpus: u32) -> u64 {
    slot_call_page(0, vcpus, SLOTS)
}

/// Guest-physical address of the slot table (one owner word per slot, u64
/// little-endian) in the region at `region` of a `vcpus`-vCPU VM.
pub const fn slot_table(region: u64, vcpus: u32) -> u64 {
    region + (1 + vcpus as u64) * 4096
}

/// Guest-physical address of slot `slot`'s call page; its data pages follow.
pub const fn slot_call_page(region: u64, vcpus: u32, slot: u32) -> u64 {
    slot_table(region, vcpus) + 4096 + slot as u64 * (1 + SLOT_DATA_PAGES) * 4096
}

/// Guest-physical address of slot `slot`'s data pages.
pub const fn slot_data(region: u64, vcpus: u32, slot: u32) -> u64 {
    slot_call_page(region, vcpus, slot) + 4096
}

/// Guest-physical address of vCPU `vcpu`'s call page in the region at `region`.
pub const fn call_page(region: u64, vcpu: u32) -> u64 {
    region + (1 + vcpu as u64) * 4096
}

/// Host ns at guest TSC `tsc`, from the header's pair (u128 math, no overflow).
pub fn host_ns_at(header: &RegionHeader, tsc: u64) -> Option<u64> {
    if header.tsc_khz == 0 {
        return None;
    }
    let delta = tsc as i128 - header.guest_tsc as i128;
    let ns = delta * 1_000_000 / header.tsc_khz as i128;
    u64::try_from(header.host_ns as i128 + ns).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_pair_maps_tsc_to_host_time() {
        let h = RegionHeader {
            tsc_khz: 2_000_000,
            host_ns: 1_000_000,
            guest_tsc: 500,
            ..Default::default()
        };
        assert_eq!(host_ns_at(&h, 500), Some(1_000_000));
        assert_eq!(
            host_ns_at(&h, 2_500),
            Some(1_001_000),
            "2 GHz: 2000 ticks = 1 µs"
        );
        assert_eq!(host_ns_at(&h, 0), Some(999_750));
        assert_eq!(host_ns_at(&RegionHeader::default(), 1), None);
        assert_eq!(core::mem::size_of::<RegionHeader>(), 64);
        assert_eq!(call_page(0x1000_0000, 2), 0x1000_3000);
        // Header, 2 call pages, slot table, 32 slots of 17 pages.
        assert_eq!(region_size(2), (4 + 32 * 17) * 4096);
        assert_eq!(slot_table(0x1000_0000, 2), 0x1000_3000);
        assert_eq!(slot_call_page(0x1000_0000, 2, 0), 0x1000_4000);
        assert_eq!(slot_data(0x1000_0000, 2, 0), 0x1000_5000);
        assert_eq!(slot_call_page(0x1000_0000, 2, 1), 0x1000_4000 + 17 * 4096);
        assert_eq!(
            slot_data(0, 2, SLOTS - 1) + SLOT_DATA_SIZE,
            region_size(2),
            "the last slot's data ends the region"
        );
    }

    #[test]
    fn the_clock_pair_seqlock_round_trips_and_refuses_a_torn_pair() {
        use core::cell::Cell;
        let words: [Cell<u64>; 8] = Default::default();
        let at = |offset: usize| &words[offset / 8];
        let pair = ClockPair {
            host_ns: 5,
            guest_tsc: 6,
            error_ns: 7,
        };
        let seq = write_clock_pair(|o, v, _| at(o).set(v), 0, pair);
        assert_eq!(seq, 2);
        assert_eq!(read_clock_pair(|o, _| at(o).get(), 3), Some(pair));
        assert_eq!(at(field::SEQ).get(), 2);
        // A writer that stopped halfway leaves the counter odd.
        at(field::SEQ).set(3);
        assert_eq!(read_clock_pair(|o, _| at(o).get(), 3), None);
        assert_eq!(
            (field::TSC_KHZ, field::SEQ, field::ERROR_NS),
            (16, 32, 56),
            "the layout guests rely on"
        );
    }
}
