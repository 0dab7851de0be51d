//! Guest RAM and where things live in it.
//!
//! Guest RAM is one anonymous mapping starting at guest-physical address 0.
//! All guest memory access from the VMM goes through `vm-memory`, which checks
//! every access against the mapping: a guest-supplied address can never make
//! the VMM touch host memory outside guest RAM.

use crate::config::{HugePages, MAX_RAM, MIN_RAM};
use rtvm_abi::{BootInfo, GUEST_IMAGE_BASE, MAX_VCPUS};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::error::{Error, Result};

/// Fixed guest-physical layout of the low pages and of the per-vCPU areas.
pub mod layout {
    /// The [`rtvm_abi::BootInfo`] page.
    pub const BOOT_INFO: u64 = 0x1000;
    /// The IDT, shared by all vCPUs (256 16-byte gates).
    pub const IDT: u64 = 0x2000;
    pub const IDT_LIMIT: u16 = 256 * 16 - 1;
    /// Page-map level 4.
    pub const PML4: u64 = 0x3000;
    /// The single page-directory-pointer table.
    pub const PDPT: u64 = 0x4000;
    /// Page directories, one per GiB of identity-mapped space.
    pub const PD: u64 = 0x5000;
    /// How much guest-physical space the boot page tables identity-map.
    pub const IDENTITY_MAPPED: u64 = 4 << 30;

    /// Each vCPU owns one area of this size, carved from the top of the
    /// identity-mapped RAM downwards.
    pub const VCPU_AREA_SIZE: u64 = 0x4_0000;
    /// Offsets inside a vCPU area.
    pub const AREA_GDT: u64 = 0x0;
    /// The TSS and, right after it, its I/O permission bitmap (8 KiB + 1).
    pub const AREA_TSS: u64 = 0x1000;
    /// Reserved for the vCPU's VMRPC call page.
    pub const AREA_CALL_PAGE: u64 = 0x4000;
    /// Stack tops (stacks grow down from these offsets).
    pub const AREA_KERNEL_STACK_TOP: u64 = 0x9000;
    pub const AREA_IST_TOPS: [u64; 4] = [0xd000, 0xf000, 0x1_1000, 0x1_3000];
    pub const AREA_USER_STACK_TOP: u64 = VCPU_AREA_SIZE;

    // The fixed low pages must not run into each other or into the image.
    const _: () = assert!(BOOT_INFO + super::BootInfo::SIZE as u64 <= IDT);
    const _: () = assert!(IDT + (IDT_LIMIT as u64 + 1) <= PML4);
    const _: () = assert!(PD + (IDENTITY_MAPPED >> 30) * 4096 <= super::GUEST_IMAGE_BASE);
    const _: () = assert!(AREA_TSS + 0x68 + 8193 <= AREA_CALL_PAGE);
}

/// Guest RAM of one VM.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

/// One step of backing guest RAM and how it went, for the RT report.
pub type BackingStep = (String, std::result::Result<(), String>);

/// Size of an x86-64 huge page (2 MiB), the unit of hugetlbfs-backed RAM.
const HUGE_PAGE: u64 = 2 << 20;

impl GuestRam {
    /// Maps `size` bytes of anonymous guest RAM at guest-physical 0, in
    /// 4 KiB pages, faulted in as the guest touches them.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_backing(size, HugePages::Off, false).map(|(ram, _)| ram)
    }

    /// Maps guest RAM as a real-time guest wants it: on huge pages (fewer
    /// TLB misses and, under nested or shadow paging, fewer and cheaper
    /// faults), prefaulted if asked (no fault on a first touch in the
    /// middle of a deadline), never merged by KSM (a merged page is
    /// copied on the next write: a fault at an unpredictable time). A
    /// step the host does not allow is reported, not fatal; hugetlbfs
    /// without enough huge pages is an error, since it was asked for.
    pub fn with_backing(
        size: u64,
        huge_pages: HugePages,
        prefault: bool,
    ) -> Result<(Self, Vec<BackingStep>)> {
        if !(MIN_RAM..=MAX_RAM).contains(&size) {
            return Err(Error::Config(format!(
                "memory size {} MiB is out of range ({}..={} MiB)",
                size >> 20,
                MIN_RAM >> 20,
                MAX_RAM >> 20
            )));
        }
        if size % 4096 != 0 {
            return Err(Error::Config(format!(
                "memory size {size} is not a multiple of 4 KiB"
            )));
        }
        let mut steps = Vec::new();
        let mem = if huge_pages == HugePages::Hugetlbfs {
            if size % HUGE_PAGE != 0 {
                return Err(Error::Config(format!(
                    "memory size {} KiB is not a multiple of the 2 MiB huge page (huge_pages = hugetlbfs)",
                    size >> 10
                )));
            }
            // No MAP_NORESERVE: too few huge pages fail here, not as a
            // SIGBUS when the guest first touches one.
            let region = MmapRegionBuilder::new(size as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB)
                .with_hugetlbfs(true)
                .build()
                .map_err(|e| {
                    Error::GuestMemory(format!(
                        "cannot map {} MiB on 2 MiB huge pages ({e}); reserve them in /proc/sys/vm/nr_hugepages",
                        size >> 20
                    ))
                })?;
            let region = GuestRegionMmap::new(region, GuestAddress(0))
                .ok_or_else(|| Error::GuestMemory("guest RAM region".into()))?;
            steps.push(("guest RAM on hugetlbfs 2 MiB pages".to_string(), Ok(())));
            GuestMemoryMmap::from_regions(vec![region])
                .map_err(|e| Error::GuestMemory(e.to_string()))?
        } else {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
                .map_err(|e| Error::GuestMemory(format!("cannot map {} MiB: {e}", size >> 20)))?
        };
        let ram = GuestRam { mem, size };
        let base = ram.host_base()? as *mut libc::c_void;
        let advise = |advice, what: &str| {
            // SAFETY: [base, base + size) is this RAM's own live mapping;
            // madvise changes how the kernel backs it, never its contents.
            let rc = unsafe { libc::madvise(base, size as usize, advice) };
            let result = if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            };
            (what.to_string(), result)
        };
        if huge_pages == HugePages::Transparent {
            let mut step = advise(
                libc::MADV_HUGEPAGE,
                "guest RAM on transparent huge pages (MADV_HUGEPAGE)",
            );
            if step.1.is_ok() && transparent_huge_pages_off() {
                step.1 = Err(
                    "the host has them off (/sys/kernel/mm/transparent_hugepage/enabled is never)"
                        .into(),
                );
            }
            steps.push(step);
        }
        steps.push(advise(
            libc::MADV_UNMERGEABLE,
            "guest RAM excluded from KSM merging",
        ));
        if prefault {
            steps.push(advise(
                libc::MADV_POPULATE_WRITE,
                "guest RAM prefaulted (MADV_POPULATE_WRITE)",
            ));
        }
        Ok((ram, steps))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `vm-memory` view, for loaders and bounds-checked access.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest-physical 0, for KVM's memory slot.
    pub fn host_base(&self) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .map_err(|e| Error::GuestMemory(e.to_string()))
    }

    /// Whether `[addr, addr + len)` lies inside guest RAM (overflow-safe).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Guest-physical base of vCPU `index`'s area.
    pub fn vcpu_area(&self, index: usize) -> u64 {
        vcpu_area_base(self.size, index)
    }

    /// Bytes of guest RAM resident in host memory (mincore(2)).
    pub fn resident_bytes(&self) -> Option<u64> {
        let base = self.host_base().ok()?;
        let pages = (self.size / PAGE_SIZE) as usize;
        let mut residency = vec![0u8; pages];
        // SAFETY: [base, base + size) is our own live mapping and the vector
        // holds one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                base as *mut libc::c_void,
                self.size as usize,
                residency.as_mut_ptr(),
            )
        };
        (rc == 0).then(|| residency.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE)
    }
}

const PAGE_SIZE: u64 = 4096;

fn transparent_huge_pages_off() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[never]"))
}

/// Guest-physical base of vCPU `index`'s area in RAM of `ram_size` bytes.
pub fn vcpu_area_base(ram_size: u64, index: usize) -> u64 {
    let top = ram_size.min(layout::IDENTITY_MAPPED);
    top - (index as u64 + 1) * layout::VCPU_AREA_SIZE
}

/// Checks that the fixed layout, an image ending at `image_end` and `vcpus`
/// vCPU areas fit in RAM of `ram_size` bytes without overlapping.
pub fn check_fits(ram_size: u64, image_end: u64, vcpus: usize) -> Result<()> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::Config(format!(
            "{vcpus} vCPUs requested; rtvm supports 1..={MAX_VCPUS}"
        )));
    }
    let areas_base = vcpu_area_base(ram_size, vcpus - 1);
    if image_end > areas_base {
        return Err(Error::Config(format!(
            "{} MiB of memory is too small for the guest image and {vcpus} vCPUs",
            ram_size >> 20
        )));
    }
    Ok(())
}

/// Resident set size of this process in bytes.
pub fn process_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_size_is_validated() {
        assert!(GuestRam::new(1 << 20).is_err());
        assert!(GuestRam::new(MAX_RAM + 4096).is_err());
        assert!(GuestRam::new((32 << 20) + 1).is_err());
        let ram = GuestRam::new(32 << 20).unwrap();
        assert_eq!(ram.size(), 32 << 20);
    }

    #[test]
    fn contains_is_overflow_safe() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(ram.contains(0, 16 << 20));
        assert!(!ram.contains(1, 16 << 20));
        assert!(!ram.contains(u64::MAX, 2));
        assert!(ram.contains(16 << 20, 0));
    }

    #[test]
    fn vcpu_areas_are_below_identity_map_and_disjoint() {
        let big = 8u64 << 30;
        assert_eq!(
            vcpu_area_base(big, 0),
            layout::IDENTITY_MAPPED - layout::VCPU_AREA_SIZE
        );
        assert_eq!(
            vcpu_area_base(32 << 20, 0) - vcpu_area_base(32 << 20, 1),
            layout::VCPU_AREA_SIZE
        );
        assert!(check_fits(16 << 20, 0x30_0000, 64).is_err());
        assert!(check_fits(32 << 20, 0x30_0000, 64).is_ok());
        assert!(check_fits(32 << 20, 0x30_0000, 0).is_err());
        assert!(check_fits(32 << 20, 0x30_0000, 65).is_err());
    }

    #[test]
    fn resident_bytes_follow_touched_pages() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        let before = ram.resident_bytes().expect("guest mapping found in smaps");
        for page in 0..64u64 {
            ram.mem().write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = ram.resident_bytes().unwrap();
        assert!(after >= before + 64 * 4096, "{before} -> {after}");
    }

    /// Issue #16: prefaulted RAM is all resident before the guest runs;
    /// THP is asked for and KSM refused, each step reported.
    #[test]
    fn backing_prefaults_and_reports_each_step() {
        let size = 32 << 20;
        let (lazy, steps) = GuestRam::with_backing(size, HugePages::Off, false).unwrap();
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert!(
            steps[0].0.contains("KSM") && steps[0].1.is_ok(),
            "{steps:?}"
        );
        assert!(
            lazy.resident_bytes().unwrap() < size,
            "touched only as used"
        );
        let (eager, steps) = GuestRam::with_backing(size, HugePages::Transparent, true).unwrap();
        let names: Vec<&str> = steps.iter().map(|(what, _)| what.as_str()).collect();
        assert!(names[0].contains("transparent huge pages"), "{names:?}");
        assert!(
            names[1].contains("KSM") && names[2].contains("prefaulted"),
            "{names:?}"
        );
        assert!(steps[2].1.is_ok(), "{steps:?}");
        assert_eq!(eager.resident_bytes().unwrap(), size, "every page in");
        match GuestRam::with_backing(size + 4096, HugePages::Hugetlbfs, false) {
            Err(Error::Config(msg)) => assert!(msg.contains("2 MiB huge page"), "{msg}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("hugetlbfs RAM that is no multiple of 2 MiB"),
        }
    }
}
