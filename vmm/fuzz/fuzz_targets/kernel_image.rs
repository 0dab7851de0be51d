//! A kernel image as a user (or whoever wrote the file) hands it over:
//! `parse_kernel` (ELF vmlinux, or a bzImage with a gzip, LZ4, xz or
//! uncompressed payload, unpacked on the host up to the guest's RAM), then,
//! if that accepts it, `load` into a small guest RAM (the ELF's segments,
//! zero page, command line, e820). Any input must end in Ok or a clear
//! error: never a panic, an allocation beyond the limit, or a write outside
//! the guest's memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rtvm_vmm::boot::linux::{load, parse_kernel};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Small guest RAM: the limit on what a payload may unpack to, too.
const RAM: u64 = 32 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Ok(kernel) = parse_kernel(data, RAM) else {
        return;
    };
    assert!(kernel.elf.len() as u64 <= RAM.max(data.len() as u64));
    let _ = load(memory(), RAM, &kernel, Some(b"initramfs"), "console=ttyS0", 2, 1);
});
