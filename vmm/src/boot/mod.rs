//! Getting a guest into memory and its vCPUs to their first instruction.

pub mod builtin;
pub mod x86;
