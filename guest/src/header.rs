//! The `rtvm_abi::GuestHeader` at the first byte of the image: it tells the
//! VMM where the vector handlers are (so it can build the IDT) and which
//! workloads this image has (so it can reject an unknown one up front).

use crate::workloads::{WORKLOAD_NAMES, WORKLOAD_NAMES_LEN};
use core::arch::global_asm;
use core::mem::offset_of;
use rtvm_abi::{GuestHeader, ABI_VERSION, GUEST_HEADER_MAGIC};

/// Entries in `rtvm_vector_table`.
const VECTOR_COUNT: u32 = 256;

// Written in assembly because a Rust static cannot turn addresses into the
// header's `u64` fields at compile time. The layout must match GuestHeader.
const _: () = assert!(
    GuestHeader::SIZE == 40
        && offset_of!(GuestHeader, magic) == 0
        && offset_of!(GuestHeader, abi_version) == 8
        && offset_of!(GuestHeader, vector_count) == 12
        && offset_of!(GuestHeader, vectors) == 16
        && offset_of!(GuestHeader, workloads) == 24
        && offset_of!(GuestHeader, workloads_len) == 32
);

global_asm!(
    // "a": allocated, so it is loaded; linker.ld puts it first.
    ".pushsection .rtvm_header, \"a\"",
    ".globl rtvm_guest_header",
    "rtvm_guest_header:",
    ".quad {magic}",
    ".long {abi_version}",
    ".long {vector_count}",
    ".quad rtvm_vector_table",
    ".quad {workloads}",
    ".quad {workloads_len}",
    ".size rtvm_guest_header, . - rtvm_guest_header",
    ".popsection",
    magic = const GUEST_HEADER_MAGIC,
    abi_version = const ABI_VERSION,
    vector_count = const VECTOR_COUNT,
    workloads = sym WORKLOAD_NAMES,
    workloads_len = const WORKLOAD_NAMES_LEN,
);
