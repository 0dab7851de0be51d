//! The built-in rtvm guest kernel.
//!
//! The VMM does all of the machine setup (long mode, paging, GDT, TSS, IDT;
//! see the boot protocol in `rtvm_abi`), because guest CPL0 code is emulated
//! and about 1000x slower than CPL3 code on the nested hosts we run on. So
//! the kernel part is a few dozen instructions: check the boot information,
//! switch the local APIC to x2APIC mode, and `iretq` to CPL3, where the
//! workload runs natively and talks to the VMM through ports.
//! The only other CPL0 code is the vector handlers, which report a fault and
//! end the VM, and the system call and timer interrupt of `syscall`, a few
//! instructions for the interrupt-driven timer path (`timer-irq`).
#![no_std]
#![no_main]

#[macro_use]
mod console;
mod cpu;
mod fmtbuf;
mod fs;
mod header;
mod mem;
mod net;
mod ring;
mod static_buf;
mod syscall;
mod vectors;
mod vmrpc;
mod workloads;

use core::arch::asm;
use rtvm_abi::{panic_code, selector, BootInfo};
use workloads::Ctx;

/// RFLAGS for CPL3: IOPL 3 so `in`/`out` work without a trip through CPL0,
/// IF clear (the guest takes no interrupts), and the always-one bit 1.
/// (The nested `kvm_pvm` hosts clear IOPL at CPL3; there `out` works only
/// because the VMM's TSS has an I/O permission bitmap allowing the ports.)
const USER_RFLAGS: u64 = 0x3002;

/// The ELF entry point, run by every vCPU at CPL0 (see `rtvm_abi` for the
/// machine state). Keep it short: every instruction here is emulated.
#[unsafe(no_mangle)]
extern "C" fn _start(info: *const BootInfo, vcpu: u64) -> ! {
    // SAFETY: the VMM passes the address of the BootInfo page, identity
    // mapped and never written while vCPUs run; `is_valid` checks it is one.
    let info = match unsafe { info.as_ref() } {
        Some(info) if info.is_valid() && vcpu < u64::from(info.vcpu_count) => info,
        _ => cpu::panic(panic_code::BAD_BOOT_INFO),
    };
    cpu::enable_x2apic();
    if vcpu == 0 && &info.workload[..info.workload_len as usize] == workloads::FAULT.as_bytes() {
        triple_fault();
    }

    let user_rsp = info.vcpus[vcpu as usize].user_stack_top - 8; // as if called
                                                                 // SAFETY: switches to CPL3 on the user stack the VMM set up; user_entry
                                                                 // never returns, so nothing of this stack frame is needed again.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = const selector::USER_DATA as u64,
            rsp = in(reg) user_rsp,
            rflags = const USER_RFLAGS,
            cs = const selector::USER_CODE as u64,
            rip = in(reg) user_entry as extern "C" fn(&'static BootInfo, u64) -> ! as usize,
            in("rdi") info,
            in("rsi") vcpu,
            options(noreturn),
        )
    }
}

/// Resets the machine the hard way, for the `fault` workload: with an empty
/// IDT, the #UD cannot be delivered, nor the #GP that causes, nor the #DF.
fn triple_fault() -> ! {
    let empty_idt = [0u16; 5]; // limit 0, base 0
                               // SAFETY: the point is to wreck the machine.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &empty_idt, options(noreturn, nostack)) }
}

/// Where `_start` enters CPL3 (with `iretq`, as if called): runs the workload
/// `info` names.
extern "C" fn user_entry(info: &'static BootInfo, vcpu: u64) -> ! {
    let ctx = Ctx {
        info,
        vcpu: vcpu as usize,
    };
    let name = &info.workload[..info.workload_len as usize];
    match workloads::find(name) {
        Some(workload) => (workload.run)(&ctx),
        // One report is enough; the VM fails at the first PANIC write.
        None if ctx.is_first_vcpu() => {
            let name = core::str::from_utf8(name).unwrap_or("<not UTF-8>");
            println!("rtvm-guest: unknown workload '{name}'");
            cpu::panic(panic_code::UNKNOWN_WORKLOAD)
        }
        None => cpu::vcpu_off(),
    }
}

/// Named by the unwind tables of the precompiled `core` (built for
/// unwinding) even though this image aborts on panic and never unwinds; the
/// stable toolchain offers no other way to satisfy the reference.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn on_panic(info: &core::panic::PanicInfo) -> ! {
    let console = console::Console::lock_for_crash();
    let message = info.message();
    match info.location() {
        Some(at) => console::print_line(
            console,
            format_args!("rtvm-guest: panic: {message} at {at}"),
        ),
        None => console::print_line(console, format_args!("rtvm-guest: panic: {message}")),
    }
    cpu::panic(panic_code::RUST_PANIC)
}
