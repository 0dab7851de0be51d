//! The guest kernel's system calls (`int 0x80`, gate `vector::SYSCALL`) and
//! the LAPIC timer interrupt (`vector::TIMER`): the conventional,
//! interrupt-driven timer path that `timer-irq` measures against the VMRPC
//! long poll.
//!
//! The entries are a few instructions of assembly, not Rust: guest CPL0 code
//! is emulated on our nested hosts (a microsecond or two per instruction), so
//! every instruction here is part of the latency being measured.
//!
//! Calling convention: the call number in RAX, its argument in RDI; the
//! result comes back in RAX (0, or [`UNKNOWN`]); RCX, RDX and RSI are
//! clobbered; every other register and RFLAGS (IF included: CPL3 runs with
//! IF = 0) are as before the `int`.
//!
//! Two ways in:
//! - On hardware KVM, `int 0x80` goes through its gate (DPL 3, no IST) to
//!   `rtvm_syscall_entry` on the TSS's RSP0 stack: the kernel stack `_start`
//!   ran on, dead since its `iretq` to CPL3.
//! - The nested `kvm_pvm` hosts we run on refuse every `int n` at CPL3 with
//!   a #UD at the `int` (measured: `int 0x80` and `int 0x81` alike), and
//!   `syscall` there jumps to LSTAR still at CPL3. So the #UD handler
//!   (`rtvm_ud_entry`) completes an `int 0x80` itself: it moves the
//!   interrupt frame from its IST1 stack (which the timer interrupt shares,
//!   so the frame cannot stay there across the wait) to the caller's stack,
//!   points it past the `int`, and joins `rtvm_syscall_entry`. Eleven more
//!   emulated instructions per call. The caller's stack is safe to use: the
//!   caller's asm block has no `nostack`, so the compiler keeps nothing in
//!   the red zone across it. Any other #UD goes to the fault report.

use core::arch::{asm, global_asm};
use rtvm_abi::vector;

/// Enables the local APIC and puts its timer in TSC-deadline mode on
/// `vector::TIMER`. Once per vCPU, before [`WAIT_TSC`].
pub const TIMER_INIT: u64 = 1;
/// Arms the TSC-deadline timer with the argument (a TSC value) and halts
/// until its interrupt has come; returns at or after that TSC value.
pub const WAIT_TSC: u64 = 2;
/// What an unknown call number returns.
pub const UNKNOWN: u64 = u64::MAX;

/// x2APIC MSRs and the values the timer path writes to them.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const MSR_X2APIC_EOI: u32 = 0x80b;
const MSR_X2APIC_SVR: u32 = 0x80f;
const MSR_X2APIC_LVT_TIMER: u32 = 0x832;
const MSR_X2APIC_LVT_LINT0: u32 = 0x835;
/// Spurious-interrupt vector register: APIC software-enabled, vector 0xff.
const SVR_ENABLE: u32 = 0x100 | 0xff;
/// LVT timer: TSC-deadline mode (0b10 in bits 17..18), not masked.
const LVT_TIMER_TSC_DEADLINE: u32 = vector::TIMER as u32 | (0b10 << 17);
/// LVT mask bit. LINT0 is masked so that nothing routed through the legacy
/// PIC (KVM makes LINT0 ExtINT on the boot vCPU) can interrupt a wait.
const LVT_MASKED: u32 = 1 << 16;

// `rtvm_syscall_entry`, `rtvm_ud_entry` and `rtvm_timer_entry`, which the
// vector table (see `vectors`) names for `vector::SYSCALL`, #UD (6) and
// `vector::TIMER`.
//
// WAIT_TSC keeps its "fired" flag in a quadword on its stack and, while it
// halts, the flag's address in RSI: the timer handler sets the flag through
// RSI. That is sound because the timer interrupt can only arrive inside the
// `sti; hlt` window of that loop: IF is 0 everywhere else (CPL3 runs with
// IF = 0 and every gate is an interrupt gate). The flag makes the loop tell
// the timer apart from anything else that ends a `hlt`.
global_asm!(
    ".pushsection .text.rtvm_syscall, \"ax\"",
    ".balign 16",
    ".globl rtvm_ud_entry",
    "rtvm_ud_entry:",
    // #UD pushes no error code: RIP, CS, RFLAGS, RSP, SS from [rsp] up.
    // (A #UD passed on is reported with RCX already overwritten; the
    // report does not show RCX.)
    "    mov rcx, [rsp]",
    "    cmp word ptr [rcx], {int_0x80}",
    "    jne rtvm_vector_6",
    "    add rcx, 2",
    "    mov rsi, rsp",
    "    mov rsp, [rsi + 24]",
    "    push qword ptr [rsi + 32]",
    "    push qword ptr [rsi + 24]",
    "    push qword ptr [rsi + 16]",
    "    push qword ptr [rsi + 8]",
    "    push rcx",
    "    jmp rtvm_syscall_entry",
    "",
    ".balign 16",
    ".globl rtvm_syscall_entry",
    "rtvm_syscall_entry:",
    "    cmp rax, {wait_tsc}",
    "    je 2f",
    "    cmp rax, {timer_init}",
    "    je 1f",
    "    mov rax, {unknown}",
    "    iretq",
    // TIMER_INIT. The SVR first: while the APIC is software-disabled, KVM
    // keeps every LVT entry masked whatever is written to it.
    "1:",
    "    xor edx, edx",
    "    mov ecx, {svr}",
    "    mov eax, {svr_enable}",
    "    wrmsr",
    "    mov ecx, {lvt_lint0}",
    "    mov eax, {lvt_masked}",
    "    wrmsr",
    "    mov ecx, {lvt_timer}",
    "    mov eax, {lvt_timer_value}",
    "    wrmsr",
    "    xor eax, eax",
    "    iretq",
    // WAIT_TSC(rdi = deadline).
    "2:",
    "    push 0",
    "    mov rsi, rsp",
    "    mov eax, edi",
    "    mov rdx, rdi",
    "    shr rdx, 32",
    "    mov ecx, {tsc_deadline}",
    "    wrmsr",
    // `sti` holds interrupts off until after `hlt` has begun, so a timer
    // that fired already (a deadline in the past) still wakes the `hlt`.
    "3:",
    "    sti",
    "    hlt",
    "    cli",
    "    cmp byte ptr [rsi], 0",
    "    je 3b",
    "    pop rax",
    "    xor eax, eax",
    "    iretq",
    "",
    // The timer interrupt, on IST1, interrupting the loop above.
    ".balign 16",
    ".globl rtvm_timer_entry",
    "rtvm_timer_entry:",
    "    mov byte ptr [rsi], 1",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    xor eax, eax",
    "    xor edx, edx",
    "    mov ecx, {eoi}",
    "    wrmsr",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    iretq",
    ".popsection",
    wait_tsc = const WAIT_TSC,
    timer_init = const TIMER_INIT,
    int_0x80 = const u16::from_le_bytes([0xcd, vector::SYSCALL]),
    unknown = const UNKNOWN,
    svr = const MSR_X2APIC_SVR,
    svr_enable = const SVR_ENABLE,
    lvt_lint0 = const MSR_X2APIC_LVT_LINT0,
    lvt_masked = const LVT_MASKED,
    lvt_timer = const MSR_X2APIC_LVT_TIMER,
    lvt_timer_value = const LVT_TIMER_TSC_DEADLINE,
    tsc_deadline = const MSR_TSC_DEADLINE,
    eoi = const MSR_X2APIC_EOI,
);

/// Makes system call `number` with `arg`; returns RAX. CPL3 only.
fn syscall(number: u64, arg: u64) -> u64 {
    let result: u64;
    // SAFETY: the kernel side (above) changes no memory of this program but
    // below the stack pointer, which this asm block (without `nostack`)
    // allows, and no register but the ones named here.
    unsafe {
        asm!(
            "int {vector}",
            vector = const vector::SYSCALL,
            inout("rax") number => result,
            in("rdi") arg,
            out("rcx") _,
            out("rdx") _,
            out("rsi") _,
        )
    };
    result
}

/// Whether the CPU offers the TSC-deadline mode of the local APIC timer
/// (CPUID.1:ECX bit 24).
pub fn has_tsc_deadline() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 24) != 0
}

/// [`TIMER_INIT`]: sets up the local APIC timer of this vCPU.
pub fn timer_init() {
    let result = syscall(TIMER_INIT, 0);
    assert_eq!(result, 0, "TIMER_INIT failed");
}

/// [`WAIT_TSC`]: halts until the TSC reaches `deadline` (at once if it has).
pub fn wait_tsc(deadline: u64) {
    // A deadline of 0 would disarm the timer and halt forever.
    let result = syscall(WAIT_TSC, deadline.max(1));
    assert_eq!(result, 0, "WAIT_TSC failed");
}
