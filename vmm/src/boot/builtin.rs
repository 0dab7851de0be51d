//! The built-in guest: its ELF image is built by `vmm/build.rs` from `guest/`
//! and embedded in the VMM, so running it needs no file and no download.

use std::io::Cursor;

use linux_loader::loader::{elf::Elf, KernelLoader};
use rtvm_abi::{BootInfo, GuestHeader, ABI_VERSION, GUEST_HEADER_MAGIC, GUEST_IMAGE_BASE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::x86;
use crate::config::{GuestSpec, VmConfig};
use crate::error::{Error, Result};
use crate::memory::{layout, GuestRam};

/// The built-in guest ELF.
pub static BUILTIN_GUEST_ELF: &[u8] = include_bytes!(env!("RTVM_GUEST_ELF"));

/// What the VMM needs to know about a guest image it has read.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// ELF entry point.
    pub entry: u64,
    /// Handler address for each vector, from the header's vector table.
    pub vectors: Box<[u64; 256]>,
    /// Names of the workloads the image offers.
    pub workloads: Vec<String>,
}

impl GuestImage {
    /// Reads and validates the header and tables of an rtvm guest ELF.
    pub fn parse(elf: &[u8]) -> Result<GuestImage> {
        let bad = |what: &str| Error::GuestImage(format!("not a valid rtvm guest image: {what}"));
        let file = ElfFile::parse(elf).ok_or_else(|| bad("malformed ELF"))?;
        let raw = file
            .read(GUEST_IMAGE_BASE, GuestHeader::SIZE)
            .ok_or_else(|| bad("no header at the image base"))?;
        let field = |at: usize, n: usize| -> u64 {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&raw[at..at + n]);
            u64::from_le_bytes(b)
        };
        let header = GuestHeader {
            magic: field(0, 8),
            abi_version: field(8, 4) as u32,
            vector_count: field(12, 4) as u32,
            vectors: field(16, 8),
            workloads: field(24, 8),
            workloads_len: field(32, 8),
        };
        if header.magic != GUEST_HEADER_MAGIC {
            return Err(bad("bad header magic"));
        }
        if header.abi_version != ABI_VERSION {
            return Err(Error::GuestImage(format!(
                "guest image speaks ABI version {}, this VMM speaks {ABI_VERSION}",
                header.abi_version
            )));
        }
        if header.vector_count != 256 {
            return Err(bad("vector table does not have 256 entries"));
        }
        let table = file
            .read(header.vectors, 256 * 8)
            .ok_or_else(|| bad("vector table outside the image"))?;
        let mut vectors = Box::new([0u64; 256]);
        for (v, chunk) in vectors.iter_mut().zip(table.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().unwrap());
        }
        let names_len =
            usize::try_from(header.workloads_len).map_err(|_| bad("workload list too long"))?;
        let names = file
            .read(header.workloads, names_len)
            .ok_or_else(|| bad("workload list outside the image"))?;
        let workloads = rtvm_abi::workload_names(names)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        Ok(GuestImage {
            entry: file.entry,
            vectors,
            workloads,
        })
    }

    /// The built-in guest's image.
    pub fn builtin() -> Result<GuestImage> {
        Self::parse(BUILTIN_GUEST_ELF)
    }

    /// Whether the image offers workload `name`.
    pub fn has_workload(&self, name: &str) -> bool {
        self.workloads.iter().any(|w| w == name)
    }
}

/// Loads the ELF's segments into guest RAM; returns the end of the image.
pub fn load(mem: &GuestMemoryMmap, elf: &[u8]) -> Result<u64> {
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(GUEST_IMAGE_BASE)),
    )
    .map_err(|e| Error::GuestImage(format!("cannot load the guest ELF: {e}")))?;
    Ok(loaded.kernel_end)
}

/// Just enough ELF64 reading to find bytes by virtual address in the file.
struct ElfFile<'a> {
    bytes: &'a [u8],
    entry: u64,
    /// (vaddr, file offset, file size) of each PT_LOAD.
    loads: Vec<(u64, u64, u64)>,
}

impl<'a> ElfFile<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        fn field<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
            bytes.get(at..at.checked_add(N)?)?.try_into().ok()
        }
        let u16_at = |at: usize| field(bytes, at).map(u16::from_le_bytes);
        let u32_at = |at: usize| field(bytes, at).map(u32::from_le_bytes);
        let u64_at = |at: usize| field(bytes, at).map(u64::from_le_bytes);
        // ELF magic, 64-bit, little-endian.
        if bytes.get(..6)? != b"\x7fELF\x02\x01" {
            return None;
        }
        let entry = u64_at(24)?;
        let phoff = usize::try_from(u64_at(32)?).ok()?;
        let phentsize = u16_at(54)? as usize;
        let phnum = u16_at(56)? as usize;
        let mut loads = Vec::new();
        for i in 0..phnum {
            let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
            const PT_LOAD: u32 = 1;
            if u32_at(ph)? == PT_LOAD {
                loads.push((
                    u64_at(ph.checked_add(16)?)?,
                    u64_at(ph.checked_add(8)?)?,
                    u64_at(ph.checked_add(32)?)?,
                ));
            }
        }
        Some(ElfFile {
            bytes,
            entry,
            loads,
        })
    }

    /// `len` file-backed bytes at virtual address `addr`, if one segment holds them all.
    fn read(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        self.loads.iter().find_map(|&(vaddr, offset, filesz)| {
            let rel = addr.checked_sub(vaddr)?;
            if rel.checked_add(len as u64)? > filesz {
                return None;
            }
            let start = usize::try_from(offset.checked_add(rel)?).ok()?;
            self.bytes.get(start..start.checked_add(len)?)
        })
    }
}

/// Writes what every vCPU of the built-in guest needs before its first
/// instruction: page tables, IDT, per-vCPU GDT and TSS, and the [`BootInfo`].
pub fn write_boot_structures(ram: &GuestRam, image: &GuestImage, config: &VmConfig) -> Result<()> {
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

    #[test]
    fn builtin_image_has_header_vectors_and_workloads() {
        let image = GuestImage::builtin().unwrap();
        assert!(image.entry >= GUEST_IMAGE_BASE);
        for w in ["hello", "fault", "spin", "exit", "crash", "bad-port"] {
            assert!(
                image.has_workload(w),
                "missing workload {w}: {:?}",
                image.workloads
            );
        }
        let mut distinct = image.vectors.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 256, "each vector has its own handler");
        assert!(image.vectors.iter().all(|&v| v >= GUEST_IMAGE_BASE));
    }

    #[test]
    fn garbage_is_not_a_guest_image() {
        assert!(GuestImage::parse(b"").is_err());
        assert!(GuestImage::parse(b"\x7fELF\x02\x01\0\0").is_err());
        let mut elf = BUILTIN_GUEST_ELF.to_vec();
        // Corrupt the program header offset.
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GuestImage::parse(&elf).is_err());
    }

    #[test]
    fn image_loads_into_guest_ram() {
        let ram = crate::memory::GuestRam::new(16 << 20).unwrap();
        let end = load(ram.mem(), BUILTIN_GUEST_ELF).unwrap();
        assert!(end > GUEST_IMAGE_BASE && end < 16 << 20);
        let magic: u64 =
            vm_memory::Bytes::read_obj(ram.mem(), GuestAddress(GUEST_IMAGE_BASE)).unwrap();
        assert_eq!(magic, GUEST_HEADER_MAGIC);
    }
}
