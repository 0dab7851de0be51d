//! VMRPC from Linux guest user space: the client side of `rtvm_abi::vmrpc`
//! for a Linux guest of rtvm, whose VMM reserves a VMRPC region
//! (`rtvm_abi::linux`) and names it on the kernel command line as
//! `rtvm.vmrpc=0xADDR`.
//!
//! - [`Transport`] delivers one call page image; [`PortIo`] is the real one
//!   (`/dev/mem` + the doorbell port, root only), the tests bring an
//!   in-process one that drives the VMM's real server.
//! - [`Client`] makes calls: [`Client::ping`], [`Client::clock`],
//!   [`Client::vcpu_info`], and [`Client::sleep_until_host`], a long-polling
//!   wait with the same semantics as the built-in guest's (early return and
//!   a final spin on real-time vCPUs, never returning before the deadline).
//! - [`HostClock`] reads host `CLOCK_MONOTONIC` from `rdtsc` through the
//!   region header's clock pair, and turns guest-clock deadlines into host
//!   deadlines.
//!
//! # vCPUs and CPUs
//!
//! A Linux CPU number is taken to be the rtvm vCPU index (the VMM numbers
//! x2APIC IDs in vCPU order, and Linux numbers CPUs in that order). The
//! client checks it once per vCPU with a `VcpuInfo` call before it sleeps
//! there. A caller must stay **pinned** to one CPU (`sched_setaffinity`,
//! `taskset`, `cyclictest -a`) while it makes a call: the call goes through
//! that vCPU's call page, which a thread migrating mid-call could share with
//! another.

pub mod descriptors;
mod header;
pub mod net;
mod portio;
pub mod slots;

use std::fmt;

use rtvm_abi::client::{answer, Feedback, Refused, Vmrpc};
use rtvm_abi::vmrpc::{
    Call, Request, Status, ARGS, CALL_PAGE_SIZE, REQUEST_SIZE, RESULTS, RESULTS_OFFSET,
    STATUS_OFFSET,
};
use rtvm_abi::MAX_VCPUS;

pub use rtvm_abi::client::{VcpuInfo, Woke, UNANSWERED};

pub use header::{
    guest_clock_ns, rdtsc, ClockPair, GuestDeadline, Header, HeaderMemory, HostClock, OwnedHeader,
    SEQLOCK_RETRIES,
};
pub use portio::{
    current_cpu, exit_vm, out32, parse_region_address, PortIo, SlotCalls, COPIED_BYTES,
};

/// A call page image.
pub type Page = [u8; CALL_PAGE_SIZE];

/// Everything that can go wrong.
#[derive(Debug)]
pub enum Error {
    /// The host answered a call with this status (never `Ok`), or refused
    /// the doorbell itself with it.
    Status(Status),
    /// The host answered with a status number this ABI version does not know.
    UnknownStatus(u32),
    /// The call page came back with its status unwritten.
    Unanswered,
    /// The operation needs root (`/dev/mem` and I/O ports).
    NotRoot,
    /// The kernel command line has no `rtvm.vmrpc=`: not an rtvm Linux guest.
    NoRegion,
    /// `rtvm.vmrpc=` holds something that is not a page-aligned address.
    BadRegionAddress(String),
    /// Reading `/proc/cmdline` failed.
    Cmdline(std::io::Error),
    /// Opening or mapping `/dev/mem` failed.
    DevMem(std::io::Error),
    /// `ioperm` failed.
    Ioperm(std::io::Error),
    /// The region header is not one this library understands.
    BadHeader(String),
    /// The caller runs on a CPU that has no call page (not a vCPU of the VM
    /// as the header counts them).
    NoCallPage { cpu: u32, vcpu_count: u32 },
    /// `sched_getcpu` failed.
    NoCpu(std::io::Error),
    /// A call meant for one vCPU was made from another (the caller is not pinned).
    WrongCpu { vcpu: u32, running_on: u32 },
    /// The host says the calling vCPU has another index than its CPU number.
    VcpuMismatch { cpu: u32, index: u64 },
    /// The host clock cannot be read (no header, or its pair stayed mid-update).
    NoHostClock,
    /// A write to the exit port did not end the VM (not running under rtvm).
    ExitIgnored,
    /// Every call slot of the region is owned by a live thread.
    NoFreeSlot,
    /// More bytes than a call slot carries, or more handles than a poll takes.
    TooLong,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Status(s) => write!(f, "the host refused the call: {}", s.name()),
            Error::UnknownStatus(n) => write!(f, "the host answered unknown status {n}"),
            Error::Unanswered => f.write_str("the host left the call unanswered"),
            Error::NotRoot => f.write_str("VMRPC needs root (/dev/mem and I/O port access)"),
            Error::NoRegion => write!(
                f,
                "no {}= on the kernel command line: not running in an rtvm Linux guest",
                rtvm_abi::linux::CMDLINE_KEY
            ),
            Error::BadRegionAddress(v) => write!(
                f,
                "{}={v} is not a page-aligned address",
                rtvm_abi::linux::CMDLINE_KEY
            ),
            Error::Cmdline(e) => write!(f, "cannot read /proc/cmdline: {e}"),
            Error::DevMem(e) => write!(f, "cannot map the VMRPC region from /dev/mem: {e}"),
            Error::Ioperm(e) => write!(f, "cannot get access to the doorbell port: {e}"),
            Error::BadHeader(why) => write!(f, "bad VMRPC region header: {why}"),
            Error::NoCallPage { cpu, vcpu_count } => write!(
                f,
                "CPU {cpu} has no call page (the VM has {vcpu_count} vCPUs)"
            ),
            Error::NoCpu(e) => write!(f, "sched_getcpu failed: {e}"),
            Error::WrongCpu { vcpu, running_on } => write!(
                f,
                "a call for vCPU {vcpu} made on CPU {running_on} (pin the thread)"
            ),
            Error::VcpuMismatch { cpu, index } => write!(
                f,
                "CPU {cpu} is vCPU {index} by the host: CPU numbers do not match vCPU indices"
            ),
            Error::NoHostClock => f.write_str("the host clock cannot be read"),
            Error::ExitIgnored => {
                f.write_str("the exit port did not end the VM (not running under rtvm?)")
            }
            Error::NoFreeSlot => f.write_str("every VMRPC call slot is in use by a live thread"),
            Error::TooLong => f.write_str("more than one VMRPC call slot carries"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Status(s)
    }
}

impl From<Refused> for Error {
    fn from(refused: Refused) -> Self {
        match refused.status() {
            Some(status) => Error::Status(status),
            None if refused.unanswered() => Error::Unanswered,
            None => Error::UnknownStatus(refused.0),
        }
    }
}

/// Delivers call page images to the host.
pub trait Transport {
    /// Delivers the call in `page` as vCPU `vcpu` and leaves the host's
    /// answer (status, results) in it. `Err` when the host refused the
    /// doorbell itself (or the transport could not ring it); the call's own
    /// status is in the page.
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status>;

    /// The vCPU the calling thread runs on now.
    fn current_vcpu(&self) -> Result<u32, Error>;

    /// The live region header, if the transport has one (clock pair, RT
    /// bitmap). Without one, waits never return early.
    fn header(&self) -> Option<Header> {
        None
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn call(&mut self, vcpu: u32, page: &mut Page) -> Result<(), Status> {
        (**self).call(vcpu, page)
    }
    fn current_vcpu(&self) -> Result<u32, Error> {
        (**self).current_vcpu()
    }
    fn header(&self) -> Option<Header> {
        (**self).header()
    }
}

/// A VMRPC client over a transport.
///
/// `&mut self` on every call keeps two calls of one client off one call
/// page; for several threads, use one client per vCPU (see the preload
/// library) or one per thread, each pinned.
pub struct Client<T: Transport> {
    transport: T,
    clock: Option<HostClock>,
    /// Per vCPU: the wait feedback of `rtvm_abi::client`.
    feedback: [Feedback; MAX_VCPUS],
    /// Per vCPU, once the host confirmed its index equals the CPU number:
    /// what the host says about it.
    infos: [Option<VcpuInfo>; MAX_VCPUS],
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T) -> Client<T> {
        let clock = transport.header().map(HostClock::new);
        Client {
            transport,
            clock,
            feedback: [None; MAX_VCPUS],
            infos: [None; MAX_VCPUS],
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The host clock from the region header, if there is one.
    pub fn host_clock(&self) -> Option<&HostClock> {
        self.clock.as_ref()
    }

    /// The vCPU the calling thread runs on.
    pub fn current_vcpu(&self) -> Result<u32, Error> {
        self.transport.current_vcpu()
    }

    /// Whether `cpu` is a real-time vCPU, by the header's bitmap (no exit;
    /// false without a header).
    pub fn is_rt_cpu(&self, cpu: u32) -> bool {
        self.clock
            .as_ref()
            .is_some_and(|c| c.header().is_rt_cpu(cpu))
    }

    /// Makes `call` as vCPU `vcpu` and returns its results or the status it
    /// failed with.
    pub fn call(
        &mut self,
        vcpu: u32,
        call: Call,
        call_flags: u32,
        args: [u64; ARGS],
    ) -> Result<[u64; RESULTS], Error> {
        let mut page = [0u8; CALL_PAGE_SIZE];
        let mut request = [0u8; REQUEST_SIZE];
        Request {
            call,
            flags: call_flags,
            args,
        }
        .encode(&mut request);
        page[..REQUEST_SIZE].copy_from_slice(&request);
        page[STATUS_OFFSET..STATUS_OFFSET + 4].copy_from_slice(&UNANSWERED.to_le_bytes());
        self.transport.call(vcpu, &mut page)?;
        decode_answer(&page)
    }

    /// The calls of `rtvm_abi::client` as vCPU `vcpu`.
    fn on(&mut self, vcpu: u32) -> OnVcpu<'_, T> {
        OnVcpu { client: self, vcpu }
    }

    /// The host echoes `x`.
    pub fn ping(&mut self, x: u64) -> Result<u64, Error> {
        let vcpu = self.current_vcpu()?;
        self.on(vcpu).ping(x)
    }

    /// Host `CLOCK_MONOTONIC` in ns, read by the host (one exit).
    pub fn clock(&mut self) -> Result<u64, Error> {
        let vcpu = self.current_vcpu()?;
        self.on(vcpu).clock()
    }

    /// What the host says about vCPU `vcpu`; the caller must run on it.
    pub fn vcpu_info(&mut self, vcpu: u32) -> Result<VcpuInfo, Error> {
        let running_on = self.current_vcpu()?;
        if running_on != vcpu {
            return Err(Error::WrongCpu { vcpu, running_on });
        }
        self.on(vcpu).vcpu_info()
    }

    /// Host time now: from the TSC without an exit when the header allows,
    /// else with a `Clock` call.
    pub fn host_now(&mut self) -> Result<u64, Error> {
        let vcpu = self.current_vcpu()?;
        self.on(vcpu).host_now()
    }

    /// Whether waits on `vcpu` ask the host to return early and spin the
    /// rest (see `rtvm_abi::client::early_return`); the caller must run on
    /// `vcpu` the first time it asks about it.
    pub fn early_return(&mut self, vcpu: u32) -> Result<bool, Error> {
        self.on(vcpu).returns_early()
    }

    /// What the host says about `vcpu`, asked once, after checking that the
    /// host calls it by its CPU number.
    fn verified_info(&mut self, vcpu: u32) -> Result<VcpuInfo, Error> {
        let slot = self.infos.get(vcpu as usize).ok_or(Error::NoCallPage {
            cpu: vcpu,
            vcpu_count: MAX_VCPUS as u32,
        })?;
        if let Some(info) = slot {
            return Ok(*info);
        }
        let info = self.vcpu_info(vcpu)?;
        if info.index != u64::from(vcpu) {
            return Err(Error::VcpuMismatch {
                cpu: vcpu,
                index: info.index,
            });
        }
        self.infos[vcpu as usize] = Some(info);
        Ok(info)
    }

    /// Waits until host `CLOCK_MONOTONIC` reaches `deadline` (ns), parked in
    /// the host (a long poll) on the vCPU the caller runs on, by the
    /// protocol of `rtvm_abi::client` (early return and a final spin where
    /// that vCPU runs a timer advance and the header's clock pair tells
    /// host time). Never returns before the deadline by the client's host
    /// clock.
    pub fn sleep_until_host(&mut self, deadline: u64) -> Result<Woke, Error> {
        let vcpu = self.current_vcpu()?;
        self.verified_info(vcpu)?;
        self.on(vcpu).sleep_until(deadline)
    }

    /// Waits `ns` from now (host time), as [`Client::sleep_until_host`].
    pub fn sleep_host(&mut self, ns: u64) -> Result<Woke, Error> {
        let deadline = self.host_now()?.saturating_add(ns);
        self.sleep_until_host(deadline)
    }

    /// The host time of a guest-clock deadline: through the header's clock
    /// pair where the TSC tells host time, else by one `Clock` call (the
    /// guest clock and the host's then run at the same rate, as kvm-clock
    /// makes them, but not from the same origin).
    pub fn host_deadline(&mut self, deadline: GuestDeadline) -> Result<u64, Error> {
        if let Some(host) = self.clock.as_ref().and_then(|c| c.host_deadline(deadline)) {
            return Ok(host);
        }
        let host_now = self.clock()?;
        let guest_now = deadline.clock().map_or(0, guest_clock_ns);
        Ok(host_deadline_from(deadline, host_now, guest_now))
    }

    /// Waits until a guest-clock deadline, converted to host time by
    /// [`Client::host_deadline`]. The guest clock may still read a little
    /// before the deadline afterwards (the conversion is as good as the two
    /// clocks' agreement): callers that promise "never early" by the guest
    /// clock check it and sleep the rest, as the preload library does.
    pub fn sleep_until_guest(&mut self, deadline: GuestDeadline) -> Result<Woke, Error> {
        let host = self.host_deadline(deadline)?;
        self.sleep_until_host(host)
    }
}

/// A client making the calls of one vCPU: the transport of
/// `rtvm_abi::client`'s protocol for Linux guests.
struct OnVcpu<'a, T: Transport> {
    client: &'a mut Client<T>,
    vcpu: u32,
}

impl<T: Transport> Vmrpc for OnVcpu<'_, T> {
    type Error = Error;

    fn call(&mut self, call: Call, flags: u32, args: [u64; ARGS]) -> Result<[u64; RESULTS], Error> {
        self.client.call(self.vcpu, call, flags, args)
    }

    fn tsc_now(&mut self) -> Option<u64> {
        self.client.clock.as_ref().and_then(HostClock::now)
    }

    fn timer_advance(&mut self) -> Result<bool, Error> {
        Ok(self.client.verified_info(self.vcpu)?.has_timer_advance())
    }

    fn feedback(&mut self) -> &mut Feedback {
        &mut self.client.feedback[self.vcpu as usize]
    }
}

/// `deadline` in host time, given that host time `host_now` and guest
/// time `guest_now` (on the deadline's clock) are the same moment.
fn host_deadline_from(deadline: GuestDeadline, host_now: u64, guest_now: u64) -> u64 {
    let host = match deadline {
        GuestDeadline::Monotonic(d) | GuestDeadline::Realtime(d) => {
            i128::from(host_now) + (i128::from(d) - i128::from(guest_now))
        }
        GuestDeadline::Relative(d) => i128::from(host_now) + i128::from(d),
    };
    host.clamp(0, i128::from(u64::MAX)) as u64
}

/// Status and results of an answered call page image.
pub fn decode_answer(page: &Page) -> Result<[u64; RESULTS], Error> {
    let word32 = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
    let results = std::array::from_fn(|i| {
        let at = RESULTS_OFFSET + 8 * i;
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
    });
    Ok(answer(word32(STATUS_OFFSET), results)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_deadlines_map_to_host_time_by_the_offset_of_one_moment() {
        let map = |d, host_now, guest_now| host_deadline_from(d, host_now, guest_now);
        assert_eq!(map(GuestDeadline::Monotonic(1_500), 10_000, 1_000), 10_500);
        assert_eq!(map(GuestDeadline::Realtime(900), 10_000, 1_000), 9_900);
        assert_eq!(map(GuestDeadline::Relative(250), 10_000, 77), 10_250);
        assert_eq!(
            map(GuestDeadline::Monotonic(0), 10, 1_000),
            0,
            "clamped at 0"
        );
    }

    #[test]
    fn answers_decode_to_results_or_errors() {
        let mut page = [0u8; CALL_PAGE_SIZE];
        page[RESULTS_OFFSET..RESULTS_OFFSET + 8].copy_from_slice(&42u64.to_le_bytes());
        assert_eq!(decode_answer(&page).unwrap(), [42, 0, 0, 0]);
        page[STATUS_OFFSET..STATUS_OFFSET + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            decode_answer(&page),
            Err(Error::Status(Status::BadArgument))
        ));
        page[STATUS_OFFSET..STATUS_OFFSET + 4].copy_from_slice(&UNANSWERED.to_le_bytes());
        assert!(matches!(decode_answer(&page), Err(Error::Unanswered)));
        page[STATUS_OFFSET..STATUS_OFFSET + 4].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            decode_answer(&page),
            Err(Error::UnknownStatus(999))
        ));
    }
}
