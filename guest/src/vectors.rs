//! The handlers the VMM points the IDT at, and the table listing them.
//!
//! Three vectors have handlers of their own, in `syscall`: the system call
//! (`vector::SYSCALL`), the LAPIC timer (`vector::TIMER`), which only ever
//! arrives inside a system call's `sti; hlt`, and #UD, which completes an
//! `int 0x80` the host refused and passes any other #UD on to the stub
//! here. Every other vector is a CPU exception (or a stray interrupt) the
//! guest cannot recover from: the handler here reports it on the console
//! and ends the VM through the PANIC port. The VMM gives every vector but the system call an IST stack, so a
//! handler never pushes onto the (red-zoned) stack it interrupted; the system
//! call, entered from CPL3 only, switches to the kernel stack instead.

use crate::console::{self, Console};
use crate::cpu;
use core::arch::{asm, global_asm};
use rtvm_abi::{panic_code, port, vector};

/// The stack a vector stub hands to `on_vector`: the general registers it
/// saved, then what the stub and the CPU pushed. Lowest address first.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors that have none.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// One stub per vector, then `rtvm_vector_table`, 256 handler addresses (the
// guest header points the VMM at it): the stubs, but for the three vectors
// `syscall` handles (their stubs stay, to keep the table uniform; #UD's
// is where `syscall`'s #UD handler sends a #UD it does not handle).
// Each stub makes the stack uniform -- a 0 where the CPU pushes no error
// code, then the vector number -- and joins the common path, which saves
// the general registers and calls `on_vector` with the stack 16-byte aligned
// (the CPU aligns the IST stack, and 22 quadwords are pushed by then).
global_asm!(
    ".pushsection .text.rtvm_vectors, \"ax\"",
    ".altmacro",
    ".macro rtvm_vector_stub n",
    "    .balign 16",
    "rtvm_vector_\\n:",
    // The exceptions for which the CPU pushes an error code.
    "    .if \\n == 8 || \\n == 10 || \\n == 11 || \\n == 12 || \\n == 13 || \\n == 14 || \\n == 17 || \\n == 21 || \\n == 29 || \\n == 30",
    "    .else",
    "    push 0",
    "    .endif",
    "    push \\n",
    "    jmp rtvm_vector_common",
    ".endm",
    ".macro rtvm_vector_entry n",
    "    .if \\n == 6",
    "    .quad rtvm_ud_entry",
    "    .elseif \\n == {timer}",
    "    .quad rtvm_timer_entry",
    "    .elseif \\n == {syscall}",
    "    .quad rtvm_syscall_entry",
    "    .else",
    "    .quad rtvm_vector_\\n",
    "    .endif",
    ".endm",
    "",
    ".set rtvm_vector, 0",
    ".rept 256",
    "    rtvm_vector_stub %rtvm_vector",
    "    .set rtvm_vector, rtvm_vector + 1",
    ".endr",
    "",
    // `syscall`'s #UD handler passes every #UD but its own on to this stub.
    ".globl rtvm_vector_6",
    "",
    "rtvm_vector_common:",
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    // The SysV ABI wants DF clear; the interrupted code may have set it.
    "    cld",
    "    mov rdi, rsp",
    "    call {on_vector}",
    "    ud2",
    ".popsection",
    "",
    ".pushsection .rodata.rtvm_vectors, \"a\"",
    ".balign 8",
    ".globl rtvm_vector_table",
    "rtvm_vector_table:",
    ".set rtvm_vector, 0",
    ".rept 256",
    "    rtvm_vector_entry %rtvm_vector",
    "    .set rtvm_vector, rtvm_vector + 1",
    ".endr",
    ".size rtvm_vector_table, . - rtvm_vector_table",
    ".popsection",
    ".noaltmacro",
    on_vector = sym on_vector,
    timer = const vector::TIMER,
    syscall = const vector::SYSCALL,
);

/// Reports the vector in `frame` and ends the VM. Runs at CPL0, where every
/// instruction is emulated, but only once per VM. Never returns: the stubs
/// have no way back (the vectors that return are handled in `syscall`).
extern "C" fn on_vector(frame: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let vector = frame.vector as u32;
    console::print_line(
        Console::lock_for_crash(),
        format_args!(
            "rtvm-guest: vCPU {} {} (vector {vector}) error={:#x} rip={:#x} cs={:#x} rsp={:#x} cr2={cr2:#x}",
            ApicId(cpu::x2apic_id()),
            panic_code::describe(vector),
            frame.error_code,
            frame.rip,
            frame.cs,
            frame.rsp,
        ),
    );
    cpu::out32(port::PANIC, vector);
    cpu::spin_forever()
}

/// Shows an x2APIC ID, or `?` when there is none.
struct ApicId(Option<u32>);

impl core::fmt::Display for ApicId {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("?"),
        }
    }
}
