//! x86-64 long-mode state prepared by the VMM: page tables, GDT, TSS, IDT,
//! control registers.
//!
//! The VMM does all of this itself, instead of leaving it to guest boot code,
//! because guest CPL0 code is expensive (emulated on nested `kvm_pvm` hosts)
//! and every instruction the guest does not run at CPL0 is boot time saved.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use rtvm_abi::{ist, selector};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::memory::layout;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PDE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Size of a 64-bit TSS.
const TSS_SIZE: u64 = 0x68;
/// One bit per port, plus the all-ones byte the CPU may read past the end.
const IO_BITMAP_SIZE: u64 = 65536 / 8 + 1;
/// The TSS with its I/O permission bitmap, minus one.
const TSS_LIMIT: u32 = (TSS_SIZE + IO_BITMAP_SIZE - 1) as u32;
/// Type of a busy 64-bit TSS. The TSS is loaded through KVM_SET_SREGS rather
/// than `ltr`, so its descriptor is marked busy as `ltr` would have done.
const TSS_TYPE_BUSY: u8 = 0xb;
/// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
const GATE_INTERRUPT: u8 = 0x8e;
/// The same with DPL 3: reachable with `int` from CPL3.
const GATE_INTERRUPT_USER: u8 = 0xee;

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, val: T, addr: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory(format!("writing boot structure at {addr:#x}: {e}")))
}

/// Identity-maps the first 4 GiB with 2 MiB pages, user-accessible, so the
/// guest's CPL3 code can use all of it without page-table work of its own.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    write(mem, layout::PDPT | flags, layout::PML4)?;
    let gib = layout::IDENTITY_MAPPED >> 30;
    for g in 0..gib {
        let pd = layout::PD + g * 4096;
        write(mem, pd | flags, layout::PDPT + g * 8)?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            write(mem, phys | flags | PDE_HUGE, pd + i * 8)?;
        }
    }
    Ok(())
}

/// A flat code or data segment descriptor.
const fn segment_descriptor(access: u8, flags: u8) -> u64 {
    0xffff | (0xf << 48) | ((access as u64) << 40) | ((flags as u64) << 52)
}

/// GDT entries in the order of [`rtvm_abi::selector`].
const GDT: [u64; 5] = [
    0,
    segment_descriptor(0x9a, 0xa), // kernel code: present, DPL0, exec/read; G, L
    segment_descriptor(0x92, 0xc), // kernel data: present, DPL0, read/write; G, D/B
    segment_descriptor(0xf2, 0xc), // user data: DPL3
    segment_descriptor(0xfa, 0xa), // user code: DPL3, L
];

/// Writes vCPU area `area`'s GDT (with its own TSS descriptor) and TSS.
/// Each vCPU has its own GDT because a TSS descriptor is per CPU.
pub fn write_gdt_and_tss(mem: &GuestMemoryMmap, area: u64) -> Result<()> {
    let gdt = area + layout::AREA_GDT;
    for (i, entry) in GDT.iter().enumerate() {
        write(mem, *entry, gdt + i as u64 * 8)?;
    }
    let tss = area + layout::AREA_TSS;
    let low = (TSS_LIMIT as u64 & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | ((TSS_TYPE_BUSY as u64) << 40)
        | (1 << 47)
        | (((tss >> 24) & 0xff) << 56);
    write(mem, low, gdt + selector::TSS as u64)?;
    write(mem, tss >> 32, gdt + selector::TSS as u64 + 8)?;

    // 64-bit TSS: RSP0 at 4, IST1..IST7 at 36.., I/O map base at 102.
    write(mem, area + layout::AREA_KERNEL_STACK_TOP, tss + 4)?;
    for (slot, top) in layout::AREA_IST_TOPS.iter().enumerate() {
        write(mem, area + top, tss + 36 + slot as u64 * 8)?;
    }
    // An all-clear I/O permission bitmap lets guest CPL3 code use every
    // port. RFLAGS.IOPL=3 would be enough on hardware KVM, but nested
    // `kvm_pvm` runs guest CPL3 with IOPL 0 whatever the guest sets, so the
    // bitmap is what actually makes CPL3 doorbells work there.
    write(mem, TSS_SIZE as u16, tss + 102)?;
    mem.write_slice(
        &[0u8; IO_BITMAP_SIZE as usize - 1],
        GuestAddress(tss + TSS_SIZE),
    )
    .map_err(|e| Error::GuestMemory(format!("writing the I/O bitmap: {e}")))?;
    write(mem, 0xffu8, tss + TSS_SIZE + IO_BITMAP_SIZE - 1)?;
    Ok(())
}

/// Size of the GDT, minus one.
pub const GDT_LIMIT: u16 = (selector::TSS as usize + 16 - 1) as u16;

fn gate_type(vector: u8) -> u8 {
    if vector == rtvm_abi::vector::SYSCALL {
        GATE_INTERRUPT_USER
    } else {
        GATE_INTERRUPT
    }
}

/// Writes the shared IDT: gate N goes to `handlers[N]` on the IST stack the
/// ABI assigns to N; only the system-call gate is open to CPL3.
pub fn write_idt(mem: &GuestMemoryMmap, handlers: &[u64; 256]) -> Result<()> {
    for (vector, &handler) in handlers.iter().enumerate() {
        let ist = ist::for_vector(vector as u8) as u64;
        let low = (handler & 0xffff)
            | ((selector::KERNEL_CODE as u64) << 16)
            | (ist << 32)
            | ((gate_type(vector as u8) as u64) << 40)
            | (((handler >> 16) & 0xffff) << 48);
        let addr = layout::IDT + vector as u64 * 16;
        write(mem, low, addr)?;
        write(mem, handler >> 32, addr + 8)?;
    }
    Ok(())
}

/// A flat (base 0, 4 GiB, page-granular) present segment.
pub(crate) fn segment(selector: u16, type_: u8, s: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for the vCPU owning `area`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, area: u64) -> kvm_sregs {
    let code = segment(selector::KERNEL_CODE, 0xb, 1, 0, 1, 0);
    let data = segment(selector::KERNEL_DATA, 0x3, 1, 0, 0, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: area + layout::AREA_TSS,
        limit: TSS_LIMIT,
        g: 0,
        db: 0,
        ..segment(selector::TSS, TSS_TYPE_BUSY, 0, 0, 0, 0)
    };
    sregs.gdt.base = area + layout::AREA_GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = layout::IDT_LIMIT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the guest entry: see the boot protocol in `rtvm_abi`.
pub fn entry_regs(entry: u64, area: u64, boot_info: u64, vcpu_index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: area + layout::AREA_KERNEL_STACK_TOP - 8,
        rdi: boot_info,
        rsi: vcpu_index,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn page_tables_identity_map_with_user_huge_pages() {
        let ram = GuestRam::new(16 << 20).unwrap();
        write_page_tables(ram.mem()).unwrap();
        let mem = ram.mem();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT);
        // 3 GiB + 6 MiB must map to itself through PDPT[3], PD entry 3.
        let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPT + 3 * 8)).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 3 * 8))
            .unwrap();
        assert_eq!(pde & !0x1f_ffff, (3 << 30) + (6 << 20));
        assert_eq!(pde & 0xff, PTE_PRESENT | PTE_WRITABLE | PTE_USER | PDE_HUGE);
    }

    #[test]
    fn gdt_descriptors_match_the_abi_selectors() {
        // Access bytes: DPL in bits 45..47, L in bit 53.
        let dpl = |d: u64| (d >> 45) & 3;
        let long = |d: u64| (d >> 53) & 1;
        assert_eq!(dpl(GDT[(selector::USER_CODE >> 3) as usize]), 3);
        assert_eq!(long(GDT[(selector::USER_CODE >> 3) as usize]), 1);
        assert_eq!(dpl(GDT[(selector::USER_DATA >> 3) as usize]), 3);
        assert_eq!(dpl(GDT[(selector::KERNEL_CODE >> 3) as usize]), 0);
        assert_eq!(long(GDT[(selector::KERNEL_CODE >> 3) as usize]), 1);
    }

    #[test]
    fn tss_and_idt_point_at_their_stacks_and_handlers() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let area = ram.vcpu_area(0);
        write_gdt_and_tss(ram.mem(), area).unwrap();
        let mem = ram.mem();
        let tss = area + layout::AREA_TSS;
        let ist2: u64 = mem.read_obj(GuestAddress(tss + 36 + 8)).unwrap();
        assert_eq!(ist2, area + layout::AREA_IST_TOPS[1]);
        let tss_low: u64 = mem
            .read_obj(GuestAddress(area + selector::TSS as u64))
            .unwrap();
        let base = ((tss_low >> 16) & 0xff_ffff) | (((tss_low >> 56) & 0xff) << 24);
        assert_eq!(base, tss & 0xffff_ffff);

        let mut handlers = [0u64; 256];
        for (i, h) in handlers.iter_mut().enumerate() {
            *h = 0xffff_8000_1234_0000 + i as u64 * 16;
        }
        write_idt(mem, &handlers).unwrap();
        let low: u64 = mem.read_obj(GuestAddress(layout::IDT + 8 * 16)).unwrap();
        let high: u64 = mem
            .read_obj(GuestAddress(layout::IDT + 8 * 16 + 8))
            .unwrap();
        let handler = (low & 0xffff) | (((low >> 48) & 0xffff) << 16) | (high << 32);
        assert_eq!(handler, handlers[8]);
        assert_eq!((low >> 32) & 7, ist::DOUBLE_FAULT as u64);
        assert_eq!((low >> 45) & 3, 0, "DPL 0");
        let syscall = layout::IDT + rtvm_abi::vector::SYSCALL as u64 * 16;
        let low: u64 = mem.read_obj(GuestAddress(syscall)).unwrap();
        assert_eq!((low >> 45) & 3, 3, "the system-call gate is open to CPL3");
        assert_eq!((low >> 32) & 7, 0, "and switches to RSP0, not an IST stack");
    }
}
