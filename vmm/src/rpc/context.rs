//! What a service gets with a call: the caller, its park, and guest memory
//! behind checks.

use rtvm_abi::vmrpc::{self, buffer_in_ram, Status};
use vm_memory::{Bytes, GuestAddress};

use super::park::Park;
use crate::memory::GuestRam;

/// One call in progress, as the service serving it sees it. Every guest
/// range is checked against guest RAM before it is touched (and vm-memory
/// checks it again), so a service never reaches outside the guest.
pub struct CallContext<'a> {
    /// The calling vCPU.
    pub vcpu: usize,
    /// How the call waits, if it must (a long poll).
    pub park: &'a mut dyn Park,
    ram: &'a GuestRam,
}

impl<'a> CallContext<'a> {
    pub fn new(vcpu: usize, ram: &'a GuestRam, park: &'a mut dyn Park) -> Self {
        CallContext { vcpu, park, ram }
    }

    /// Guest RAM, for services that keep state in it (I/O rings).
    pub fn ram(&self) -> &'a GuestRam {
        self.ram
    }

    /// `BadAddress` unless `[addr, addr + len)` lies in guest RAM.
    pub fn check_buffer(&self, addr: u64, len: u64) -> Result<(), Status> {
        if buffer_in_ram(addr, len, self.ram.size()) {
            Ok(())
        } else {
            Err(Status::BadAddress)
        }
    }

    /// A copy of `len` guest bytes at `addr`.
    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, Status> {
        self.check_buffer(addr, len)?;
        let mut buf = vec![0u8; len as usize];
        self.ram
            .mem()
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|_| Status::BadAddress)?;
        Ok(buf)
    }

    /// `count` little-endian u64 words at `addr`.
    pub fn read_words(&self, addr: u64, count: u64) -> Result<Vec<u64>, Status> {
        let bytes = self.read(addr, count.checked_mul(8).ok_or(Status::BadArgument)?)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Writes `data` to guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Status> {
        self.check_buffer(addr, data.len() as u64)?;
        self.ram
            .mem()
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| Status::BadAddress)
    }

    /// The bytes of a path argument: its length checked before it is read.
    pub fn path(&self, addr: u64, len: u64) -> Result<Vec<u8>, Status> {
        if len == 0 || len > vmrpc::PATH_MAX {
            return Err(Status::BadArgument);
        }
        self.read(addr, len)
    }
}
