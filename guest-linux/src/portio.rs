//! The real transport: the VMRPC region mapped from `/dev/mem`, and the
//! doorbell rung with a 32-bit `out` from user space.
//!
//! Needs root (CAP_SYS_RAWIO for `/dev/mem` and `ioperm`). `ioperm` grants
//! the port to the calling *thread* only (and to threads it creates later),
//! so [`PortIo`] asks for it once in every thread that calls through it.

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rtvm_abi::linux::{
    call_page, region_size, slot_call_page, slot_data, slot_table, CMDLINE_KEY, REGION_MAGIC,
    SLOTS, SLOT_DATA_SIZE,
};
use rtvm_abi::vmrpc::{Status, DOORBELL_ERROR, PAYLOAD_OFFSET};
use rtvm_abi::{cmdline_arg, port, ABI_VERSION, MAX_VCPUS};

use crate::header::{Header, HeaderMemory};
use crate::slots::{self, LinuxThreads, SlotTransport};
use crate::{Error, Page, Transport};

const PAGE_SIZE: usize = 4096;

/// Bytes of a call page image copied to and from the region per call: the
/// fixed part (request, status, results, reserved). No call of this ABI
/// version reads or writes the payload (buffers travel as guest-physical
/// address pairs), and the region is mapped uncached (`O_SYNC`), where
/// every byte copied costs; the image's payload bytes are left as they are.
/// A call that carries a payload must raise this to the page size.
pub const COPIED_BYTES: usize = PAYLOAD_OFFSET;

/// The region address from a kernel command line (`rtvm.vmrpc=0xADDR`,
/// hexadecimal with `0x`, or decimal).
pub fn parse_region_address(cmdline: &str) -> Result<u64, Error> {
    let value = cmdline_arg(cmdline, CMDLINE_KEY).ok_or(Error::NoRegion)?;
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse::<u64>().ok(),
    };
    match parsed {
        Some(addr) if addr % PAGE_SIZE as u64 == 0 && addr != 0 => Ok(addr),
        _ => Err(Error::BadRegionAddress(value.to_string())),
    }
}

/// A shared mapping of `/dev/mem`, unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all in-process access to the
// header goes through atomics and to call pages through volatile copies by
// the thread pinned to that page's vCPU.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access is atomic or by the page's own thread.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: libc::c_int, phys: u64, len: usize) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(phys)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared mapping of the file; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

// SAFETY: page 0 of the mapping is the header, page-aligned, and lives as
// long as the Mapping; only the VMM writes it other than through atomics.
unsafe impl HeaderMemory for Mapping {
    fn as_ptr(&self) -> *mut rtvm_abi::linux::RegionHeader {
        self.base.cast()
    }
}

thread_local! {
    /// Whether this thread has been granted the doorbell port.
    static PORT_GRANTED: Cell<bool> = const { Cell::new(false) };
}

/// Grants the calling thread the 4 bytes of `port_base` (`ioperm`).
fn grant_port(port_base: u16) -> Result<(), Error> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port_base), 4, 1) } != 0 {
        let e = io::Error::last_os_error();
        return Err(permission_error(e, Error::Ioperm));
    }
    Ok(())
}

/// `NotRoot` for a permission error of a non-root caller, else `wrap(e)`.
fn permission_error(e: io::Error, wrap: fn(io::Error) -> Error) -> Error {
    let denied = matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES));
    // SAFETY: geteuid has no preconditions.
    if denied && unsafe { libc::geteuid() } != 0 {
        Error::NotRoot
    } else {
        wrap(e)
    }
}

/// Forgets the port grant in a forked child, which may not inherit it.
unsafe extern "C" fn forget_port_grant() {
    PORT_GRANTED.with(|g| g.set(false));
}

/// A 32-bit `out` to `port`; returns EAX afterwards (the VMM may rewrite it).
///
/// # Safety
/// The calling thread must have access to `port` (`ioperm`), or it takes a
/// SIGSEGV; and whatever the write makes the VMM do must be safe.
pub unsafe fn out32(port: u16, value: u32) -> u32 {
    let mut eax = value;
    // No `nomem`: the asm is a compiler memory barrier, so the request
    // writes stay before it and the answer reads after it.
    core::arch::asm!("out dx, eax", in("dx") port, inout("eax") eax, options(nostack, preserves_flags));
    eax
}

/// Ends the VM with exit status `status` (a 32-bit `out` to `port::EXIT`).
/// Returns only on failure, or if the write did not end the VM (not
/// running under rtvm).
pub fn exit_vm(status: u32) -> Error {
    if let Err(e) = grant_port(port::EXIT) {
        return e;
    }
    // SAFETY: the thread was granted the port; the VMM ends the VM.
    unsafe { out32(port::EXIT, status) };
    Error::ExitIgnored
}

/// The calling thread's CPU.
pub fn current_cpu() -> Result<u32, Error> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).map_err(|_| Error::NoCpu(io::Error::last_os_error()))
}

/// The VMRPC region of a Linux guest, mapped from `/dev/mem`.
///
/// Each call goes through the call page of the vCPU the caller runs on
/// (`sched_getcpu`): the caller **must be pinned** to that CPU for the
/// duration of the call. A call for a vCPU other than the current CPU is
/// refused (`Status::BadArgument`) rather than rung from the wrong vCPU.
pub struct PortIo {
    map: Arc<Mapping>,
    header: Header,
    region: u64,
    vcpu_count: u32,
}

impl PortIo {
    /// Maps the region named by `/proc/cmdline`.
    pub fn open() -> Result<PortIo, Error> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(Error::Cmdline)?;
        PortIo::open_at(parse_region_address(&cmdline)?)
    }

    /// Maps the region at guest-physical `region`.
    pub fn open_at(region: u64) -> Result<PortIo, Error> {
        let path = CString::new("/dev/mem").unwrap();
        // SAFETY: a NUL-terminated path; the descriptor is closed below.
        let fd =
            unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(permission_error(io::Error::last_os_error(), Error::DevMem));
        }
        let result = PortIo::map(fd, region);
        // SAFETY: our descriptor; the mappings outlive it.
        unsafe { libc::close(fd) };
        let io = result?;
        grant_port(port::DOORBELL)?;
        PORT_GRANTED.with(|g| g.set(true));
        static ATFORK: std::sync::Once = std::sync::Once::new();
        ATFORK.call_once(|| {
            // SAFETY: registers a handler that only resets a thread-local.
            unsafe { libc::pthread_atfork(None, None, Some(forget_port_grant)) };
        });
        Ok(io)
    }

    fn map(fd: libc::c_int, region: u64) -> Result<PortIo, Error> {
        let first = Arc::new(
            Mapping::new(fd, region, PAGE_SIZE).map_err(|e| permission_error(e, Error::DevMem))?,
        );
        let header = Header::new(first.clone());
        if header.magic() != REGION_MAGIC {
            return Err(Error::BadHeader(format!(
                "magic {:#018x} at {region:#x}, expected {REGION_MAGIC:#018x}",
                header.magic()
            )));
        }
        if header.abi_version() != ABI_VERSION {
            return Err(Error::BadHeader(format!(
                "ABI version {}, this library speaks {ABI_VERSION}",
                header.abi_version()
            )));
        }
        let vcpu_count = header.vcpu_count();
        if vcpu_count == 0 || vcpu_count as usize > MAX_VCPUS {
            return Err(Error::BadHeader(format!("{vcpu_count} vCPUs")));
        }
        let last_pfn = (region + region_size(vcpu_count) - 1) >> 12;
        if last_pfn >= u64::from(DOORBELL_ERROR) {
            return Err(Error::BadHeader(format!(
                "region at {region:#x} is beyond what a doorbell can name"
            )));
        }
        drop(header);
        drop(first);
        let len = region_size(vcpu_count) as usize;
        let map = Arc::new(
            Mapping::new(fd, region, len).map_err(|e| permission_error(e, Error::DevMem))?,
        );
        let header = Header::new(map.clone());
        Ok(PortIo {
            map,
            header,
            region,
            vcpu_count,
        })
    }

    /// Guest-physical address of the region.
    pub fn region(&self) -> u64 {
        self.region
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    pub fn region_header(&self) -> &Header {
        &self.header
    }

    /// Whether `cpu` is a real-time vCPU (header bitmap, no exit).
    pub fn is_rt_cpu(&self, cpu: u32) -> bool {
        self.header.is_rt_cpu(cpu)
    }

    /// The calling thread's vCPU, if it has a call page.
    pub fn current_vcpu(&self) -> Result<u32, Error> {
        let cpu = current_cpu()?;
        if cpu >= self.vcpu_count {
            return Err(Error::NoCallPage {
                cpu,
                vcpu_count: self.vcpu_count,
            });
        }
        Ok(cpu)
    }

    /// Rings the doorbell with `page` as vCPU `vcpu` (see [`Transport::call`]).
    pub fn ring(&self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        if vcpu >= self.vcpu_count {
            return Err(Status::BadArgument);
        }
        self.grant_here()?;
        if current_cpu().ok() != Some(vcpu) {
            return Err(Status::BadArgument);
        }
        let offset = (call_page(0, vcpu)) as usize;
        let pfn = (call_page(self.region, vcpu) >> 12) as u32;
        // SAFETY: the call page lies inside our mapping (vcpu < count); only
        // this (pinned) thread uses it meanwhile; the port is granted.
        unsafe { ring_at(self.map.base.add(offset).cast::<u64>(), pfn, page) }
    }
}

/// Copies `page`'s words to the call page at `dst`, rings the doorbell with
/// its frame number, and copies the answer back.
///
/// # Safety
/// `dst` is a call page of our mapping that no other thread uses meanwhile,
/// and the calling thread holds the doorbell port.
unsafe fn ring_at(dst: *mut u64, pfn: u32, page: &mut Page) -> Result<(), Status> {
    let words = COPIED_BYTES / 8;
    for i in 0..words {
        let w = u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
        // SAFETY: in the call page (caller's promise), 8-byte aligned;
        // volatile because the VMM, not this program, reads it.
        unsafe { dst.add(i).write_volatile(w) };
    }
    // SAFETY: the thread holds the port (caller's promise).
    let eax = unsafe { out32(port::DOORBELL, pfn) };
    if eax & DOORBELL_ERROR != 0 {
        return Err(Status::from_u32(eax & !DOORBELL_ERROR).unwrap_or(Status::BadAddress));
    }
    for i in 0..words {
        // SAFETY: as above; the VMM wrote the answer during the `out`.
        let w = unsafe { dst.add(i).read_volatile() };
        page[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    Ok(())
}

impl PortIo {
    fn grant_here(&self) -> Result<(), Status> {
        if !PORT_GRANTED.with(Cell::get) {
            grant_port(port::DOORBELL).map_err(|_| Status::NotPermitted)?;
            PORT_GRANTED.with(|g| g.set(true));
        }
        Ok(())
    }

    /// A byte range of slot `slot`'s data pages in our mapping.
    fn slot_data_ptr(&self, slot: usize, len: usize) -> *mut u8 {
        assert!(slot < SLOTS as usize && len as u64 <= SLOT_DATA_SIZE);
        let offset = slot_data(0, self.vcpu_count, slot as u32) as usize;
        // SAFETY: the slot's data lies inside our mapping (`region_size`
        // counts every slot).
        unsafe { self.map.base.add(offset) }
    }
}

/// The region's call slots, for calls from any thread of any process: the
/// slot table's atomics keep owners apart (see [`crate::slots`]).
impl SlotTransport for PortIo {
    fn slot_table(&self) -> &[AtomicU64] {
        let offset = slot_table(0, self.vcpu_count) as usize;
        // SAFETY: the table page lies inside our mapping (`region_size`
        // counts it), is 8-byte aligned, lives as long as `self`, and is
        // only ever accessed atomically, by this and other processes.
        unsafe {
            std::slice::from_raw_parts(
                self.map.base.add(offset).cast::<AtomicU64>(),
                SLOTS as usize,
            )
        }
    }

    fn data_address(&self, slot: usize) -> u64 {
        slot_data(self.region, self.vcpu_count, slot as u32)
    }

    fn write_data(&self, slot: usize, bytes: &[u8]) {
        let dst = self.slot_data_ptr(slot, bytes.len());
        // SAFETY: inside the slot's data (checked), which the caller owns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    }

    fn read_data(&self, slot: usize, out: &mut [u8]) {
        let src = self.slot_data_ptr(slot, out.len());
        // SAFETY: as in write_data; the VMM wrote it during the call.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
    }

    fn ring_slot(&self, slot: usize, page: &mut Page) -> Result<(), Status> {
        if slot >= SLOTS as usize {
            return Err(Status::BadArgument);
        }
        self.grant_here()?;
        let at = slot_call_page(0, self.vcpu_count, slot as u32) as usize;
        let pfn = (slot_call_page(self.region, self.vcpu_count, slot as u32) >> 12) as u32;
        // SAFETY: the slot's call page lies inside our mapping; the caller
        // owns the slot; the thread holds the port (granted above).
        unsafe { ring_at(self.map.base.add(at).cast::<u64>(), pfn, page) }
    }
}

/// Calls as the vCPU the caller runs on, each through a call slot taken for
/// its duration rather than that vCPU's call page: two processes pinned to
/// one vCPU would otherwise share the page mid-call (one writes its request,
/// is preempted, the other writes and rings). With every slot held by a
/// live thread a call answers `NoResources`.
pub struct SlotCalls<'a>(pub &'a PortIo);

impl Transport for SlotCalls<'_> {
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        if vcpu >= self.0.vcpu_count || current_cpu().ok() != Some(vcpu) {
            return Err(Status::BadArgument);
        }
        let table = self.0.slot_table();
        let slot = slots::take(table, &LinuxThreads).ok_or(Status::NoResources)?;
        let rung = self.0.ring_slot(slot, page);
        slots::give_back(table, slot, &LinuxThreads);
        rung
    }
    fn current_vcpu(&self) -> Result<u32, Error> {
        self.0.current_vcpu()
    }
    fn header(&self) -> Option<Header> {
        Some(self.0.header.clone())
    }
}

impl Transport for PortIo {
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        self.ring(vcpu, page)
    }
    fn current_vcpu(&self) -> Result<u32, Error> {
        PortIo::current_vcpu(self)
    }
    fn header(&self) -> Option<Header> {
        Some(self.header.clone())
    }
}

/// Shared use from several threads (one client per vCPU over one mapping).
impl Transport for &PortIo {
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        self.ring(vcpu, page)
    }
    fn current_vcpu(&self) -> Result<u32, Error> {
        PortIo::current_vcpu(self)
    }
    fn header(&self) -> Option<Header> {
        Some(self.header.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_address_comes_from_the_command_line() {
        let addr = |s| parse_region_address(s);
        assert_eq!(
            addr("console=ttyS0 rtvm.vmrpc=0xfeb00000 quiet").unwrap(),
            0xfeb0_0000
        );
        assert_eq!(addr("rtvm.vmrpc=4096").unwrap(), 4096);
        assert!(matches!(addr("console=ttyS0"), Err(Error::NoRegion)));
        assert!(matches!(
            addr("rtvm.vmrpc=0x1001"),
            Err(Error::BadRegionAddress(_))
        ));
        assert!(matches!(
            addr("rtvm.vmrpc=zz"),
            Err(Error::BadRegionAddress(_))
        ));
        assert!(matches!(
            addr("rtvm.vmrpc="),
            Err(Error::BadRegionAddress(_))
        ));
    }

    #[test]
    fn without_the_region_open_fails_cleanly() {
        // On a build machine /proc/cmdline has no rtvm.vmrpc=: a clear error, no panic.
        if let Ok(c) = std::fs::read_to_string("/proc/cmdline") {
            if !c.contains(CMDLINE_KEY) {
                assert!(matches!(PortIo::open(), Err(Error::NoRegion)));
            }
        }
    }
}
