//! Getting a guest into memory and its vCPUs to their first instruction.

pub mod acpi;
pub mod builtin;
pub mod cpu;
pub mod linux;
pub mod x86;
