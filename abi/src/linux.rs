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

/// Bytes of the region for `vcpus` vCPUs: the header page and a call page each.
pub const fn region_size(vcpus: u32) -> u64 {
    (1 + vcpus as u64) * 4096
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
        assert_eq!(region_size(2), 3 * 4096);
    }
}
