//! The one definition of the contract between rtvm and its guests.
//!
//! Everything a guest and the VMM must agree on lives here, and nothing else:
//! the I/O ports the guest talks through, the boot information the VMM hands
//! to every vCPU, and the header a built-in guest image carries so the VMM can
//! prepare the guest's CPU tables for it. The crate is `no_std` and has no
//! dependencies so that any guest (our freestanding kernel, a Linux user-space
//! library) can use it as it is.
//!
//! # Boot protocol of the built-in guest
//!
//! The VMM loads the guest ELF, reads its [`GuestHeader`] at
//! [`GUEST_IMAGE_BASE`], and starts every vCPU directly in 64-bit long mode at
//! the ELF entry point, CPL0, interrupts disabled, with:
//!
//! - `RDI` = guest-physical (= guest-virtual, identity mapped) address of the
//!   [`BootInfo`] page,
//! - `RSI` = the vCPU index (0-based),
//! - `RSP` = the top of the vCPU's kernel stack minus 8 (SysV alignment at a
//!   function entry),
//! - paging on, the first 4 GiB identity mapped with 2 MiB user-accessible
//!   pages, SSE enabled (CR4.OSFXSR|OSXMMEXCPT), EFER.SCE|LME|LMA,
//! - a per-vCPU GDT laid out as in [`selector`] with a loaded TSS whose
//!   IST1..IST4 stacks are set and whose I/O permission bitmap allows every
//!   port (so CPL3 code can ring doorbells even where the host ignores
//!   RFLAGS.IOPL, as nested `kvm_pvm` does), and an IDT whose 256 gates point at the
//!   handlers listed in the header's vector table (see [`ist`] for the stack
//!   each vector uses).
//!
//! What remains for the guest at CPL0 is tiny on purpose: on our nested
//! machines guest CPL0 code is emulated and about 1000x slower than CPL3 code.
#![no_std]

pub mod addr;
pub mod client;
pub mod linux;
pub mod ring;
pub mod vmrpc;

/// Version of this ABI. The VMM refuses a guest whose header names another.
pub const ABI_VERSION: u32 = 2;

/// Guest-physical address the built-in guest image is linked at.
/// Its [`GuestHeader`] is the first thing there.
pub const GUEST_IMAGE_BASE: u64 = 0x20_0000;

/// Largest number of vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;

/// I/O ports. The rtvm ports sit in a range of their own, clear of the legacy
/// PC devices (0x40 PIT, 0x60/0x64 i8042, 0x70 RTC, 0x3f8 COM1, 0xcf8 PCI).
pub mod port {
    /// COM1, a 16550A UART, the guest's console (IRQ 4).
    pub const COM1: u16 = 0x3f8;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port; writing [`I8042_RESET`] resets the machine.
    pub const I8042_COMMAND: u16 = 0x64;
    /// The i8042 command that pulses the CPU reset line.
    pub const I8042_RESET: u8 = 0xfe;

    /// First port of the rtvm range.
    pub const RTVM_BASE: u16 = 0x600;
    /// Number of ports in the rtvm range.
    pub const RTVM_LEN: u16 = 0x20;
    /// 32-bit write: end the VM; the value is its exit status.
    pub const EXIT: u16 = RTVM_BASE;
    /// 32-bit write: the guest hit an unrecoverable error; the value is a
    /// [`crate::panic_code`]. The VM ends with a failure status.
    pub const PANIC: u16 = RTVM_BASE + 4;
    /// 32-bit write (value ignored): this vCPU has finished; its thread stops.
    /// The VM ends with status 0 once every vCPU has finished.
    pub const VCPU_OFF: u16 = RTVM_BASE + 8;
    /// 32-bit write: the VMRPC doorbell; the value is the page frame number
    /// of the call page (see [`crate::vmrpc`]).
    pub const DOORBELL: u16 = RTVM_BASE + 12;
    /// Any write: the VMM does nothing and resumes the vCPU. The floor a
    /// VMRPC call is measured against (a bare exit round trip).
    pub const NOP: u16 = RTVM_BASE + 16;

    /// Whether `port` lies in the rtvm range.
    pub const fn is_rtvm(port: u16) -> bool {
        port >= RTVM_BASE && port < RTVM_BASE + RTVM_LEN
    }
}

/// Values a guest writes to [`port::PANIC`].
pub mod panic_code {
    /// Codes below 256 are the CPU exception or interrupt vector that the
    /// guest could not handle.
    pub const VECTOR_LIMIT: u32 = 256;
    /// The guest's Rust code panicked.
    pub const RUST_PANIC: u32 = 0x100;
    /// The boot information was missing or malformed.
    pub const BAD_BOOT_INFO: u32 = 0x101;
    /// The requested workload does not exist in this guest image.
    pub const UNKNOWN_WORKLOAD: u32 = 0x102;

    /// A human-readable name for a panic code.
    pub fn describe(code: u32) -> &'static str {
        match code {
            0 => "divide error (#DE)",
            1 => "debug exception (#DB)",
            2 => "non-maskable interrupt",
            3 => "breakpoint (#BP)",
            4 => "overflow (#OF)",
            5 => "bound range exceeded (#BR)",
            6 => "invalid opcode (#UD)",
            7 => "device not available (#NM)",
            8 => "double fault (#DF)",
            10 => "invalid TSS (#TS)",
            11 => "segment not present (#NP)",
            12 => "stack-segment fault (#SS)",
            13 => "general protection fault (#GP)",
            14 => "page fault (#PF)",
            16 => "x87 floating-point error (#MF)",
            17 => "alignment check (#AC)",
            18 => "machine check (#MC)",
            19 => "SIMD floating-point error (#XM)",
            20 => "virtualization exception (#VE)",
            21 => "control protection exception (#CP)",
            9 | 15 | 22..=31 => "reserved exception",
            32..=255 => "unexpected interrupt",
            RUST_PANIC => "Rust panic",
            BAD_BOOT_INFO => "bad boot information",
            UNKNOWN_WORKLOAD => "unknown workload",
            _ => "unknown panic code",
        }
    }
}

/// Segment selectors of the GDT the VMM gives every vCPU.
pub mod selector {
    pub const KERNEL_CODE: u16 = 0x08;
    pub const KERNEL_DATA: u16 = 0x10;
    /// User data precedes user code so the layout also suits `sysret`.
    pub const USER_DATA: u16 = 0x18 | 3;
    pub const USER_CODE: u16 = 0x20 | 3;
    /// A 16-byte 64-bit TSS descriptor.
    pub const TSS: u16 = 0x28;
}

/// Interrupt stack table slots used by the IDT the VMM builds. Every vector
/// runs on an IST stack, because the guest kernel is compiled with a red zone
/// and an interrupt must never push onto the stack it arrived on.
pub mod ist {
    /// No stack switch by IST: the system-call gate, entered from CPL3 only,
    /// switches to the TSS's RSP0 stack like any privilege change. (It must
    /// not share IST1 with the timer interrupt it waits for.)
    pub const NONE: u8 = 0;
    /// All vectors but the ones below.
    pub const DEFAULT: u8 = 1;
    /// #DF (8), so a fault while handling a fault still has a stack.
    pub const DOUBLE_FAULT: u8 = 2;
    /// NMI (2).
    pub const NMI: u8 = 3;
    /// #MC (18).
    pub const MACHINE_CHECK: u8 = 4;

    /// The IST slot the VMM assigns to `vector`.
    pub const fn for_vector(vector: u8) -> u8 {
        match vector {
            8 => DOUBLE_FAULT,
            2 => NMI,
            18 => MACHINE_CHECK,
            crate::vector::SYSCALL => NONE,
            _ => DEFAULT,
        }
    }
}

/// Interrupt vectors with a fixed meaning in the built-in guest.
pub mod vector {
    /// The guest kernel's system call (`int 0x80`): the only gate CPL3 code
    /// may use (DPL 3). The built-in guest uses it only for the
    /// conventional interrupt-driven timer path it is measured against.
    pub const SYSCALL: u8 = 0x80;
    /// The LAPIC timer (TSC-deadline mode) of the built-in guest.
    pub const TIMER: u8 = 0x40;
}

/// `GuestHeader::magic`: "RTVMGST1" little-endian.
pub const GUEST_HEADER_MAGIC: u64 = u64::from_le_bytes(*b"RTVMGST1");

/// The header at [`GUEST_IMAGE_BASE`] of a built-in guest image.
///
/// All addresses are guest-physical (identity mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestHeader {
    /// [`GUEST_HEADER_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] the guest was built against.
    pub abi_version: u32,
    /// Number of entries in the vector table; must be 256.
    pub vector_count: u32,
    /// Address of `[u64; vector_count]`: the handler for each vector.
    pub vectors: u64,
    /// Address of the workload names: each name followed by a NUL byte.
    pub workloads: u64,
    /// Length in bytes of the workload names.
    pub workloads_len: u64,
}

impl GuestHeader {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// `BootInfo::magic`: "RTVMBOOT" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"RTVMBOOT");

/// Longest workload name, in bytes.
pub const WORKLOAD_NAME_MAX: usize = 32;
/// Longest command line, in bytes.
pub const CMDLINE_MAX: usize = 256;

/// What the VMM tells a vCPU about itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuBoot {
    /// x2APIC ID of the vCPU.
    pub apic_id: u32,
    /// `VCPU_FLAG_*` bits.
    pub flags: u32,
    /// Top of the stack the guest's CPL3 code should run on.
    pub user_stack_top: u64,
    /// Guest-physical address of the vCPU's VMRPC call page.
    pub call_page: u64,
    pub reserved: u64,
}

/// The page the VMM writes for the guest before the first vCPU runs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs; only the first `vcpu_count` entries of `vcpus` are valid.
    pub vcpu_count: u32,
    /// Guest RAM size in bytes, from guest-physical address 0.
    pub ram_size: u64,
    /// Length of `workload` in bytes.
    pub workload_len: u32,
    /// Length of `cmdline` in bytes.
    pub cmdline_len: u32,
    /// Name of the workload to run (not NUL-terminated).
    pub workload: [u8; WORKLOAD_NAME_MAX],
    /// Workload arguments, `key=value` words separated by spaces.
    pub cmdline: [u8; CMDLINE_MAX],
    pub vcpus: [VcpuBoot; MAX_VCPUS],
}

impl BootInfo {
    pub const SIZE: usize = core::mem::size_of::<Self>();

    /// An empty boot information block.
    pub const fn new() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION,
            vcpu_count: 0,
            ram_size: 0,
            workload_len: 0,
            cmdline_len: 0,
            workload: [0; WORKLOAD_NAME_MAX],
            cmdline: [0; CMDLINE_MAX],
            vcpus: [VcpuBoot {
                apic_id: 0,
                flags: 0,
                user_stack_top: 0,
                call_page: 0,
                reserved: 0,
            }; MAX_VCPUS],
        }
    }

    /// Whether the block carries the magic and version this crate defines and
    /// its lengths are in range.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.abi_version == ABI_VERSION
            && self.vcpu_count >= 1
            && self.vcpu_count as usize <= MAX_VCPUS
            && self.workload_len as usize <= WORKLOAD_NAME_MAX
            && self.cmdline_len as usize <= CMDLINE_MAX
    }

    /// The workload name, or `None` if it is not valid UTF-8 or the block is invalid.
    pub fn workload(&self) -> Option<&str> {
        let bytes = self.workload.get(..self.workload_len as usize)?;
        core::str::from_utf8(bytes).ok()
    }

    /// The command line, or `None` if it is not valid UTF-8 or the block is invalid.
    pub fn cmdline(&self) -> Option<&str> {
        let bytes = self.cmdline.get(..self.cmdline_len as usize)?;
        core::str::from_utf8(bytes).ok()
    }

    /// The value of `key=value` in the command line.
    pub fn arg(&self, key: &str) -> Option<&str> {
        cmdline_arg(self.cmdline()?, key)
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// The value of `key` in a command line of space-separated `key=value` words.
/// A bare `key` has the empty value.
pub fn cmdline_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| {
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        (k == key).then_some(v)
    })
}

/// The names in a NUL-separated workload list, as the guest header carries it.
pub fn workload_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&b| b == 0).filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_fits_one_page() {
        const { assert!(BootInfo::SIZE <= 4096, "BootInfo fits one page") };
        assert_eq!(GuestHeader::SIZE, 40);
    }

    #[test]
    fn boot_info_validation_rejects_bad_fields() {
        let mut info = BootInfo::new();
        assert!(!info.is_valid(), "no vCPUs is invalid");
        info.vcpu_count = 2;
        assert!(info.is_valid());
        info.cmdline_len = CMDLINE_MAX as u32 + 1;
        assert!(!info.is_valid());
        assert_eq!(info.cmdline(), None);
        info.cmdline_len = 0;
        info.vcpu_count = MAX_VCPUS as u32 + 1;
        assert!(!info.is_valid());
        info.vcpu_count = 1;
        info.magic ^= 1;
        assert!(!info.is_valid());
    }

    #[test]
    fn cmdline_args_are_found_by_key() {
        assert_eq!(cmdline_arg("status=7 quiet", "status"), Some("7"));
        assert_eq!(cmdline_arg("status=7 quiet", "quiet"), Some(""));
        assert_eq!(cmdline_arg("status=7 quiet", "stat"), None);
        assert_eq!(cmdline_arg("  a=1   b=2 ", "b"), Some("2"));
        assert_eq!(cmdline_arg("a=x=y", "a"), Some("x=y"));
    }

    #[test]
    fn workload_names_split_on_nul() {
        let names: [&[u8]; 2] = [b"hello", b"spin"];
        assert!(workload_names(b"hello\0spin\0").eq(names));
        assert_eq!(workload_names(b"").count(), 0);
    }

    #[test]
    fn ports_do_not_collide_with_legacy_devices() {
        for legacy in [0x40u16, 0x60, 0x64, 0x70, 0x3f8, 0xcf8] {
            assert!(!port::is_rtvm(legacy));
        }
        for p in [
            port::EXIT,
            port::PANIC,
            port::VCPU_OFF,
            port::DOORBELL,
            port::NOP,
        ] {
            assert!(port::is_rtvm(p));
        }
    }
}
