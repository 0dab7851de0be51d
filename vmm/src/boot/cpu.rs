//! A vCPU's state before its first instruction: CPUID, MSRs, FPU, LAPIC,
//! registers and whether it runs at once. One place for both guests; what
//! differs is where they enter ([`Entry`]).

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_msr_entry, CpuId, Msrs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::{linux, x86};
use crate::error::{Error, Result};
use crate::memory::{layout, GuestRam};

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_EXTINT: u32 = 0x7 << 8;
const APIC_DELIVERY_NMI: u32 = 0x4 << 8;

/// Where and how the vCPUs enter the guest.
pub enum Entry {
    /// Every vCPU at the built-in guest's entry.
    Builtin(u64),
    /// The boot vCPU at the kernel's 64-bit entry; the others wait for the
    /// kernel's INIT/SIPI as on a PC.
    Linux { entry: u64, region: u64 },
}

/// Sets vCPU `index` of `count` up to enter the guest at `entry`.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    index: usize,
    count: usize,
    supported: &CpuId,
    tsc_deadline: bool,
    ram: &GuestRam,
    entry: &Entry,
) -> Result<()> {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff)
                    | ((index as u32) << 24)
                    | (((count as u32) & 0xff) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
            }
            0xb | 0x1f => e.edx = index as u32, // x2APIC ID
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| Error::KvmMissingCapability("room for boot MSRs"))?;
    vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let area = ram.vcpu_area(index);
    let long_mode = x86::long_mode_sregs(sregs, area);
    let runnable = match *entry {
        Entry::Builtin(entry) => {
            let regs = x86::entry_regs(entry, area, layout::BOOT_INFO, index as u64);
            vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
            vcpu.set_sregs(&long_mode)
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            true
        }
        Entry::Linux { entry, .. } if index == 0 => {
            vcpu.set_regs(&linux::boot_regs(entry))
                .map_err(Error::kvm("KVM_SET_REGS"))?;
            vcpu.set_sregs(&linux::boot_sregs(sregs, long_mode))
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            true
        }
        Entry::Linux { .. } => false,
    };

    // LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_NMI),
    ] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("KVM_SET_LAPIC"))?;

    if runnable {
        // Our own guest needs no INIT/SIPI dance, which would cost CPL0 time
        // on the boot vCPU: every vCPU starts at the entry point at once.
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}
