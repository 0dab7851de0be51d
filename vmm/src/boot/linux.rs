//! Linux guests: a bzImage or an ELF vmlinux, entered directly in 64-bit mode
//! (the kernel's 64-bit boot protocol), with the zero page, command line,
//! initramfs, e820 map and the VMRPC region.
//!
//! A bzImage's compressed payload (gzip, LZ4 or xz: what Debian's cloud and
//! PREEMPT_RT kernels use) is unpacked on the host and its ELF vmlinux
//! loaded directly, skipping the in-guest decompressor: faster everywhere,
//! and essential where guest kernel code is emulated (nested `kvm_pvm`, where
//! the in-guest LZ4 decompression alone takes minutes).

use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{elf::Elf, KernelLoader};
use rtvm_abi::linux as region;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::clock::{host_tsc, now_ns, TscOffset};
use crate::error::{Error, Result};
use crate::memory::{layout, GuestRam};

/// Guest-physical layout of what the VMM writes for a Linux guest.
pub mod linux_layout {
    /// The kernel's GDT while it boots (selectors as the boot protocol wants).
    pub const GDT: u64 = 0x1000;
    /// The zero page (`struct boot_params`).
    pub const ZERO_PAGE: u64 = 0xa000;
    /// Initial stack, below the zero page.
    pub const STACK_TOP: u64 = 0x9ff0;
    /// The kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 4096;
    /// End of low RAM (the EBDA and BIOS area above are reserved).
    pub const LOW_RAM_END: u64 = 0x9_fc00;
    /// Where high RAM starts and the kernel may be loaded from.
    pub const HIGH_RAM: u64 = 0x10_0000;
    /// Linux RAM ends below the 32-bit MMIO hole; more is not supported yet.
    pub const MAX_RAM: u64 = 3 << 30;
    /// The reset vector (F000:FFF0 in real mode), where a PC's firmware
    /// starts: rtvm's [`reset_stub`](super::reset_stub) sits there.
    pub const RESET_VECTOR: u64 = 0xf_fff0;
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// `boot_params.hdr.header`: "HdrS".
const HDRS: u32 = 0x5372_6448;
const LOADFLAGS_LOADED_HIGH: u8 = 0x01;
const LOADFLAGS_CAN_USE_HEAP: u8 = 0x80;

/// Boot-protocol selectors: __BOOT_CS and __BOOT_DS.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// A kernel ready to load: its ELF image and, for a bzImage, its setup header.
pub struct LinuxKernel {
    pub elf: Vec<u8>,
    pub setup: Option<setup_header>,
    /// What the file was: "ELF vmlinux" or "bzImage (LZ4 payload)" etc.
    pub kind: String,
}

/// Compression of a bzImage payload, told by its magic bytes.
fn compression(payload: &[u8]) -> &'static str {
    match payload {
        [0x1f, 0x8b, ..] => "gzip",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x5d, 0, 0, ..] => "lzma",
        [0x89, b'L', b'Z', b'O', ..] => "lzo",
        [0x7f, b'E', b'L', b'F', ..] => "none",
        _ => "unknown",
    }
}

/// Largest vmlinux we unpack: a kernel's image must fit Linux guest RAM, and
/// a payload that expands beyond it (a decompression bomb) is refused
/// instead of exhausting host memory.
const MAX_VMLINUX: u64 = linux_layout::MAX_RAM;

fn too_big(limit: u64) -> String {
    format!(
        "the payload unpacks to more than {} MiB (the guest's RAM)",
        limit >> 20
    )
}

/// Unpacks the kernel's legacy-format LZ4 stream (what `lz4 -l` writes and
/// the kernel's build uses): a magic, then blocks of at most 8 MiB, each
/// prefixed by its compressed size.
fn unlz4_legacy(data: &[u8], limit: u64) -> std::result::Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let word = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        at += 4;
        if word == MAGIC {
            continue;
        }
        let size = word as usize;
        if size == 0 || at + size > data.len() {
            // The kernel appends the uncompressed size after the stream.
            break;
        }
        if (out.len() + BLOCK_MAX) as u64 > limit.max(BLOCK_MAX as u64) {
            return Err(too_big(limit));
        }
        let block = lz4_flex::block::decompress(&data[at..at + size], BLOCK_MAX)
            .map_err(|e| format!("LZ4 block at byte {at}: {e}"))?;
        out.extend_from_slice(&block);
        at += size;
    }
    Ok(out)
}

/// Reads a kernel or initramfs file: a regular file no larger than Linux
/// guest RAM (a FIFO or a device would hang or flood the VMM).
pub fn read_boot_file(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Config(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    let limit = limit.min(MAX_VMLINUX);
    if meta.len() > limit {
        return Err(Error::Config(format!(
            "{what} {} is larger than {} MiB (the guest's RAM)",
            path.display(),
            limit >> 20
        )));
    }
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
}

/// Reads a kernel file for a guest with `ram` bytes of RAM: an ELF vmlinux
/// as it is, a bzImage unpacked. The file, and what it unpacks to, must fit
/// in that RAM: a larger one is refused before it costs host memory.
pub fn read_kernel(path: &Path, ram: u64) -> Result<LinuxKernel> {
    let bytes = read_boot_file(path, "kernel", ram)?;
    parse_kernel(&bytes, ram)
        .map_err(|e| Error::GuestImage(format!("kernel {}: {e}", path.display())))
}

/// [`read_kernel`] on bytes; the unpacked vmlinux may take `limit` bytes.
pub fn parse_kernel(bytes: &[u8], limit: u64) -> std::result::Result<LinuxKernel, String> {
    let limit = limit.min(MAX_VMLINUX);
    if bytes.starts_with(b"\x7fELF") {
        return Ok(LinuxKernel {
            elf: bytes.to_vec(),
            setup: None,
            kind: "ELF vmlinux".into(),
        });
    }
    if bytes.len() < 0x270 || u32::from_le_bytes(bytes[0x202..0x206].try_into().unwrap()) != HDRS {
        return Err("neither an ELF vmlinux nor a bzImage (no HdrS setup header)".into());
    }
    let mut setup = setup_header::default();
    let hdr_len = std::mem::size_of::<setup_header>();
    let raw = bytes
        .get(0x1f1..0x1f1 + hdr_len)
        .ok_or("truncated setup header")?;
    // SAFETY: setup_header is plain old data (ByteValued in linux-loader) and
    // `raw` holds exactly its size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            raw.as_ptr(),
            (&mut setup as *mut setup_header).cast::<u8>(),
            hdr_len,
        )
    };
    let version = setup.version;
    if version < 0x0208 {
        return Err(format!(
            "boot protocol {version:#x} is too old (2.08 or later needed for the payload)"
        ));
    }
    let setup_sects = if setup.setup_sects == 0 {
        4
    } else {
        setup.setup_sects as usize
    };
    let pm_start = (setup_sects + 1) * 512;
    let (offset, length) = (setup.payload_offset as usize, setup.payload_length as usize);
    let payload = bytes
        .get(pm_start + offset..pm_start + offset + length)
        .ok_or("payload outside the file")?;
    let method = compression(payload);
    let elf = match method {
        "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(Cursor::new(payload))
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip payload: {e}"))?;
            if out.len() as u64 > limit {
                return Err(too_big(limit));
            }
            out
        }
        "lz4" => unlz4_legacy(payload, limit)?,
        "xz" => {
            // The kernel appends the uncompressed size after the xz stream;
            // the decoder stops at the stream's end and ignores it.
            let mut out = Vec::new();
            liblzma::read::XzDecoder::new(Cursor::new(payload))
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("xz payload: {e}"))?;
            if out.len() as u64 > limit {
                return Err(too_big(limit));
            }
            out
        }
        "none" => payload.to_vec(),
        other => {
            return Err(format!(
                "the bzImage payload is {other}-compressed; rtvm unpacks gzip, LZ4 and xz (pass an uncompressed vmlinux instead)"
            ))
        }
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err("the unpacked payload is not an ELF vmlinux".into());
    }
    Ok(LinuxKernel {
        elf,
        setup: Some(setup),
        kind: format!("bzImage ({method} payload, unpacked on the host)"),
    })
}

/// What [`load`] put where.
pub struct LoadedLinux {
    pub entry: u64,
    pub region: u64,
    pub cmdline: String,
}

/// The host clock in a Linux guest's VMRPC region header: the (host time,
/// guest TSC) pair by which guest user space reads host CLOCK_MONOTONIC
/// from `rdtsc`.
///
/// One writer, the VMM's control thread, keeps it current through the
/// header's seqlock (`rtvm_abi::linux::write_clock_pair`): host
/// CLOCK_MONOTONIC is slewed by NTP while the TSC is not, so a pair taken
/// once would drift (tens of ppm: milliseconds an hour).
pub struct ClockPage {
    ram: Arc<GuestRam>,
    region: u64,
    offset: TscOffset,
    seq: u64,
}

impl ClockPage {
    /// Publishes the guest TSC's rate and a first pair, where the guest's
    /// TSC is a clock (`offset` known); None otherwise, and the header then
    /// says `tsc_khz` 0 (host time only by `Clock` calls).
    pub fn start(
        ram: Arc<GuestRam>,
        region: u64,
        tsc_khz: u64,
        offset: Option<TscOffset>,
    ) -> Option<ClockPage> {
        let offset = offset.filter(|_| tsc_khz != 0)?;
        let mut page = ClockPage {
            ram,
            region,
            offset,
            seq: 0,
        };
        page.store(region::field::TSC_KHZ, tsc_khz, Ordering::Release);
        page.publish();
        Some(page)
    }

    fn store(&self, field: usize, value: u64, order: Ordering) {
        let at = GuestAddress(self.region + field as u64);
        if self.ram.mem().store(value, at, order).is_err() {
            tracing::warn!(
                "cannot publish the clock in the VMRPC region at {:#x}",
                self.region
            );
        }
    }

    /// Writes a fresh pair.
    pub fn publish(&mut self) {
        let tsc = host_tsc();
        let pair = region::ClockPair {
            host_ns: now_ns(),
            guest_tsc: self.offset.guest_tsc(tsc),
            error_ns: self.offset.error_ns,
        };
        self.seq =
            region::write_clock_pair(|at, v, order| self.store(at, v, order), self.seq, pair);
    }
}

/// The e820 map: RAM, with the BIOS area and the VMRPC region reserved.
pub fn e820(ram_size: u64, region: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: linux_layout::LOW_RAM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: linux_layout::LOW_RAM_END,
            size: linux_layout::HIGH_RAM - linux_layout::LOW_RAM_END,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: linux_layout::HIGH_RAM,
            size: region - linux_layout::HIGH_RAM,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: region,
            size: ram_size - region,
            r#type: E820_RESERVED,
        },
    ]
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, val: T, addr: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory(format!("writing Linux boot data at {addr:#x}: {e}")))
}

/// Loads `kernel` (and the initramfs) into RAM and writes the zero page,
/// command line, e820 map, page tables, GDT and the VMRPC region header.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &LinuxKernel,
    initramfs: Option<&[u8]>,
    cmdline: &str,
    vcpus: u32,
    rt_vcpus: u64,
) -> Result<LoadedLinux> {
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(&kernel.elf),
        Some(GuestAddress(linux_layout::HIGH_RAM)),
    )
    .map_err(|e| Error::GuestImage(format!("cannot load the vmlinux: {e}")))?;
    let region = (ram_size - region::region_size(vcpus)) & !0xfff;

    let mut params = boot_params::default();
    if let Some(setup) = kernel.setup {
        params.hdr = setup;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = HDRS;
        params.hdr.version = 0x020f;
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= LOADFLAGS_LOADED_HIGH | LOADFLAGS_CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;

    let full_cmdline = kernel_cmdline(cmdline, region);
    if full_cmdline.len() + 1 > linux_layout::CMDLINE_MAX {
        return Err(Error::Config(format!(
            "the kernel command line is over {} bytes",
            linux_layout::CMDLINE_MAX - 1
        )));
    }
    let mut line = full_cmdline.clone().into_bytes();
    line.push(0);
    mem.write_slice(&line, GuestAddress(linux_layout::CMDLINE))
        .map_err(|e| Error::GuestMemory(format!("writing the command line: {e}")))?;
    params.hdr.cmd_line_ptr = linux_layout::CMDLINE as u32;
    params.hdr.cmdline_size = line.len() as u32;

    if let Some(initrd) = initramfs {
        let size = initrd.len() as u64;
        let addr = region
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= loaded.kernel_end)
            .ok_or_else(|| {
                Error::Config(format!(
                    "{} MiB of memory is too small for this kernel and initramfs",
                    ram_size >> 20
                ))
            })?;
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(|e| Error::GuestMemory(format!("writing the initramfs: {e}")))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    if vcpus > 255 {
        return Err(Error::Config(
            "a Linux guest takes at most 255 vCPUs".into(),
        ));
    }
    params.acpi_rsdp_addr = super::acpi::write(mem, vcpus as u8)?;

    let map = e820(ram_size, region);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    write(mem, params, linux_layout::ZERO_PAGE)?;

    mem.write_slice(&reset_stub(), GuestAddress(linux_layout::RESET_VECTOR))
        .map_err(|e| Error::GuestMemory(format!("writing the reset stub: {e}")))?;

    super::x86::write_page_tables(mem)?;
    let gdt: [u64; 5] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // __BOOT_CS: 64-bit code
        0x00cf_9300_0000_ffff, // __BOOT_DS
        0x0080_8b00_0000_0067, // a busy TSS, which VM entry insists on
    ];
    for (i, entry) in gdt.iter().enumerate() {
        write(mem, *entry, linux_layout::GDT + i as u64 * 8)?;
    }

    let header = region::RegionHeader {
        magic: region::REGION_MAGIC,
        abi_version: rtvm_abi::ABI_VERSION,
        vcpu_count: vcpus,
        rt_vcpus,
        ..Default::default()
    };
    // SAFETY: RegionHeader is repr(C) of u64/u32 fields without padding.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&header as *const region::RegionHeader).cast::<u8>(),
            std::mem::size_of_val(&header),
        )
    };
    mem.write_slice(bytes, GuestAddress(region))
        .map_err(|e| Error::GuestMemory(format!("writing the VMRPC region: {e}")))?;

    Ok(LoadedLinux {
        entry: loaded.kernel_load.0,
        region,
        cmdline: full_cmdline,
    })
}

/// Special registers of the boot vCPU: long mode, the boot GDT selectors.
pub fn boot_sregs(mut sregs: kvm_sregs, long_mode: kvm_sregs) -> kvm_sregs {
    let data = super::x86::segment(BOOT_DS, 0x3, 1, 0, 0, 1);
    sregs.cs = super::x86::segment(BOOT_CS, 0xb, 1, 0, 1, 0);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        s: 0,
        ..super::x86::segment(BOOT_TSS, 0xb, 0, 0, 0, 0)
    };
    sregs.gdt.base = linux_layout::GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = long_mode.cr0;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = long_mode.cr4;
    sregs.efer = long_mode.efer;
    sregs
}

/// General registers of the boot vCPU: the 64-bit entry with RSI = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: linux_layout::ZERO_PAGE,
        rsp: linux_layout::STACK_TOP,
        rbp: linux_layout::STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Real-mode code for the reset vector: pulse the i8042 reset line (which
/// ends the VM), then halt.
///
/// There is no firmware, and Linux's reboot (a panic with `panic=-1`
/// included) ends up there: with a hardware-reduced FADT it reboots "through
/// EFI", finds none, and falls back to jumping to the firmware's reset
/// vector in real mode (`machine_real_restart`). With nothing there the vCPU
/// would run zeroed memory forever, without one exit, and the VM would never
/// end. This stub is the one thing a PC's firmware does that rtvm needs.
#[rustfmt::skip]
fn reset_stub() -> [u8; 7] {
    use rtvm_abi::port::{I8042_COMMAND, I8042_RESET};
    [
        0xb0, I8042_RESET,         // mov al, 0xfe
        0xe6, I8042_COMMAND as u8, // out 0x64, al
        0xf4,                      // hlt
        0xeb, 0xfd,                // jmp back to the hlt
    ]
}

/// The command line the kernel gets: the user's, `panic=-1` unless it says
/// otherwise, and the VMRPC region's address.
///
/// A panicking kernel waits forever by default, and the VM with it; with
/// `panic=-1` it resets at once, which ends the VM with the panic on the
/// console.
fn kernel_cmdline(user: &str, region: u64) -> String {
    let mut line = user.trim().to_string();
    if !line
        .split_whitespace()
        .any(|word| word.starts_with("panic="))
    {
        line.push_str(" panic=-1");
    }
    format!("{line} {}={region:#x}", region::CMDLINE_KEY)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_resets_on_panic_unless_the_user_says_otherwise() {
        assert_eq!(
            super::kernel_cmdline(" console=ttyS0 ", 0x1000),
            "console=ttyS0 panic=-1 rtvm.vmrpc=0x1000"
        );
        assert_eq!(
            super::kernel_cmdline("panic=10 quiet", 0x1000),
            "panic=10 quiet rtvm.vmrpc=0x1000"
        );
        assert_eq!(
            super::kernel_cmdline("", 0x1000),
            "panic=-1 rtvm.vmrpc=0x1000"
        );
    }

    use super::*;

    #[test]
    fn the_reset_vector_resets_through_the_i8042_and_fits_below_1_mib() {
        let stub = reset_stub();
        assert_eq!(&stub[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
        // Below 1 MiB, in a range e820 reserves: the kernel never takes it
        // for RAM.
        let end = linux_layout::RESET_VECTOR + stub.len() as u64;
        assert!(end <= 0x10_0000);
        let map = e820(256 << 20, (256 << 20) - 3 * 4096);
        assert!(map.iter().any(|e| e.r#type == E820_RESERVED
            && e.addr <= linux_layout::RESET_VECTOR
            && end <= e.addr + e.size));
    }

    #[test]
    fn e820_reserves_the_bios_area_and_the_vmrpc_region() {
        let map = e820(256 << 20, (256 << 20) - 3 * 4096);
        assert_eq!(map.len(), 4);
        let (ram, reserved): (Vec<&boot_e820_entry>, Vec<&boot_e820_entry>) =
            map.iter().partition(|e| e.r#type == E820_RAM);
        let ram_total: u64 = ram.iter().map(|e| e.size).sum();
        assert_eq!(
            ram_total,
            (256 << 20) - 3 * 4096 - (linux_layout::HIGH_RAM - linux_layout::LOW_RAM_END)
        );
        let last = reserved.last().unwrap();
        assert_eq!(
            ({ last.addr }, { last.size }),
            ((256 << 20) - 3 * 4096, 3 * 4096)
        );
        // Contiguous and ordered.
        for pair in map.windows(2) {
            assert_eq!({ pair[0].addr } + { pair[0].size }, { pair[1].addr });
        }
    }

    #[test]
    fn legacy_lz4_streams_unpack() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut stream = 0x184c_2102u32.to_le_bytes().to_vec();
        stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
        stream.extend_from_slice(&block);
        stream.extend_from_slice(&(data.len() as u32).to_le_bytes()); // the kernel's size trailer
        assert_eq!(unlz4_legacy(&stream, 64 << 20).unwrap(), data);
    }

    #[test]
    fn non_kernels_are_refused_with_a_reason() {
        let err = |b: &[u8]| parse_kernel(b, 64 << 20).err().expect("refused");
        assert!(err(b"hello").contains("neither an ELF vmlinux nor a bzImage"));
        let mut fake = vec![0u8; 0x1000];
        fake[0x202..0x206].copy_from_slice(&HDRS.to_le_bytes());
        fake[0x206..0x208].copy_from_slice(&0x0200u16.to_le_bytes());
        assert!(err(&fake).contains("too old"));
        assert_eq!(compression(&[0xfd, b'7', b'z', b'X', b'Z', 0]), "xz");
        // Issue #12: not a regular file, or not fitting the guest's RAM.
        let refused =
            |path: &str, ram| read_kernel(Path::new(path), ram).err().unwrap().to_string();
        assert!(refused("/dev/zero", 64 << 20).contains("not a regular file"));
        let big = std::env::temp_dir().join(format!("rtvm-big-kernel-{}", std::process::id()));
        std::fs::write(&big, vec![0u8; 2 << 20]).unwrap();
        let msg = refused(big.to_str().unwrap(), 1 << 20);
        std::fs::remove_file(&big).unwrap();
        assert!(msg.contains("larger than 1 MiB"), "{msg}");
    }

    /// Issue #12: a payload that unpacks beyond the guest's RAM is refused
    /// once it gets there, whatever it would unpack to.
    #[test]
    fn a_payload_is_unpacked_no_further_than_the_guest_ram() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 8 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        let mut image = vec![0u8; 0x400];
        image[0x1f1] = 1; // setup_sects
        image[0x202..0x206].copy_from_slice(&HDRS.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes()); // payload_offset
        image[0x24c..0x250].copy_from_slice(&(bomb.len() as u32).to_le_bytes());
        image.extend_from_slice(&bomb);
        let msg = parse_kernel(&image, 4 << 20).err().unwrap();
        assert!(msg.contains("more than 4 MiB"), "{msg}");
    }

    /// The real Debian kernel, where the test setup fetched one
    /// (`scripts/fetch-debian-kernel.sh`, `.ci/run` exports RTVM_TEST_KERNEL).
    #[test]
    fn debian_bzimage_payload_unpacks_to_a_vmlinux() {
        let Some(path) = std::env::var_os("RTVM_TEST_KERNEL") else {
            assert!(std::env::var("CI").is_err(), "CI must set RTVM_TEST_KERNEL");
            eprintln!("skipping: RTVM_TEST_KERNEL not set");
            return;
        };
        let kernel = read_kernel(Path::new(&path), 512 << 20).unwrap();
        assert!(kernel.kind.starts_with("bzImage"), "{}", kernel.kind);
        let setup = kernel.setup.unwrap();
        let version = setup.version;
        assert!(version >= 0x020c, "64-bit boot protocol: {version:#x}");
        assert!(
            kernel.elf.len() > 10 << 20,
            "a whole vmlinux: {} bytes",
            kernel.elf.len()
        );
        // It loads at its link address with its entry in high RAM.
        let ram = crate::memory::GuestRam::new(512 << 20).unwrap();
        let loaded = load(
            ram.mem(),
            ram.size(),
            &kernel,
            Some(b"initrd"),
            "console=ttyS0",
            2,
            0b10,
        )
        .unwrap();
        assert!(loaded.entry >= linux_layout::HIGH_RAM);
        assert!(loaded
            .cmdline
            .ends_with(&format!("rtvm.vmrpc={:#x}", loaded.region)));
        let params: boot_params = ram
            .mem()
            .read_obj(GuestAddress(linux_layout::ZERO_PAGE))
            .unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.ramdisk_size }, 6);
        assert_eq!(params.e820_entries, 4);
        let mut stub = [0u8; 7];
        ram.mem()
            .read_slice(&mut stub, GuestAddress(linux_layout::RESET_VECTOR))
            .unwrap();
        assert_eq!(stub, reset_stub());
    }
}
