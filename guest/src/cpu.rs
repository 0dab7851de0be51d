//! Thin wrappers over the instructions the guest needs, and the rtvm port
//! calls built on them.
//!
//! Port I/O works at CPL3 too, so an `out` goes straight to the VMM without a
//! trip through (emulated) CPL0: the workloads run with RFLAGS.IOPL = 3, and
//! the VMM's TSS I/O bitmap allows the ports where the host ignores IOPL.

use core::arch::asm;
use rtvm_abi::port;

pub fn out8(port: u16, value: u8) {
    // SAFETY: port writes have no memory effects on the guest.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn out32(port: u16, value: u32) {
    // SAFETY: as for `out8`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a model-specific register. CPL0 only.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading the MSRs we use has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register. CPL0 only.
///
/// # Safety
/// The caller must know what writing `value` to `msr` does to the machine.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
}

/// The time-stamp counter. Native at CPL3; works (slowly) at CPL0, unlike
/// `rdtscp`, which kills the vCPU there on our nested hosts.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The time-stamp counter, read only once every earlier instruction has
/// completed (`lfence` first), for timestamps that must not drift ahead of
/// the work they measure. CPL3 only in practice: at CPL0 each read costs
/// microseconds of emulation.
pub fn rdtsc_ordered() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: lfence and rdtsc only order and read.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Waits forever after a port write that ends this vCPU or the VM: the VMM
/// stops the vCPU at the write, so this only guards against it not doing so.
/// Never `hlt` with IF = 0: with the in-kernel irqchip it would never return
/// to the VMM.
pub fn spin_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Ends the VM with `status`.
pub fn exit(status: u32) -> ! {
    out32(port::EXIT, status);
    spin_forever()
}

/// Ends this vCPU; the VM ends with status 0 once every vCPU has.
pub fn vcpu_off() -> ! {
    out32(port::VCPU_OFF, 0);
    spin_forever()
}

/// Ends the VM with a failure: `code` is an `rtvm_abi::panic_code`.
pub fn panic(code: u32) -> ! {
    out32(port::PANIC, code);
    spin_forever()
}

const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE bit: the local APIC is in x2APIC mode.
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE bit: the local APIC is enabled.
const APIC_BASE_ENABLE: u64 = 1 << 11;
const X2APIC_ID: u32 = 0x802;

/// Switches this vCPU's local APIC to x2APIC mode. CPL0 only.
pub fn enable_x2apic() {
    let base = rdmsr(IA32_APIC_BASE);
    // SAFETY: the VMM starts the APIC enabled in xAPIC mode and advertises
    // x2APIC in CPUID, so this is a legal transition; nothing uses the xAPIC
    // MMIO page.
    unsafe { wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC) };
}

/// This vCPU's x2APIC ID, or `None` if x2APIC mode is not on yet (reading
/// the ID MSR would then fault). CPL0 only.
pub fn x2apic_id() -> Option<u32> {
    (rdmsr(IA32_APIC_BASE) & APIC_BASE_X2APIC != 0).then(|| rdmsr(X2APIC_ID) as u32)
}
