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

mod header;
mod portio;

use std::fmt;

use rtvm_abi::vmrpc::{
    flags, vcpu_info, Call, Request, Status, ARGS, CALL_PAGE_SIZE, REQUEST_SIZE, RESULTS,
    RESULTS_OFFSET, STATUS_OFFSET,
};
use rtvm_abi::MAX_VCPUS;

pub use header::{
    guest_clock_ns, rdtsc, ClockPair, GuestDeadline, Header, HeaderMemory, HostClock, OwnedHeader,
    SEQLOCK_RETRIES,
};
pub use portio::{current_cpu, exit_vm, out32, parse_region_address, PortIo, COPIED_BYTES};

/// A call page image.
pub type Page = [u8; CALL_PAGE_SIZE];

/// What `status` holds until the host answers: no status has this number,
/// so a call page the host never wrote is told apart from any answer.
pub const UNANSWERED: u32 = 0xFFFF_FFFF;

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
        }
    }
}

impl std::error::Error for Error {}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Status(s)
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

/// What `VcpuInfo` tells a vCPU about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u64,
    /// `rtvm_abi::vmrpc::vcpu_info` bits.
    pub flags: u64,
    pub count: u64,
    /// TSC frequency in kHz; 0 if the host does not know it.
    pub tsc_khz: u64,
}

impl VcpuInfo {
    /// The vCPU's host thread runs with a real-time policy.
    pub fn is_realtime(&self) -> bool {
        self.flags & vcpu_info::REALTIME != 0
    }

    /// Waits on this vCPU use a timer advance.
    pub fn has_timer_advance(&self) -> bool {
        self.flags & vcpu_info::TIMER_ADVANCE != 0
    }
}

/// How a [`Client::sleep_until_host`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Woke {
    /// The deadline (host ns).
    pub deadline: u64,
    /// Host time when control came back (after the spin, if any), by the
    /// host clock the client reads; never before `deadline`.
    pub returned: u64,
    /// Whether the host handed control back early and the client spun the rest.
    pub early_return: bool,
    /// The host's timer advance for this vCPU (ns).
    pub advance_ns: u64,
}

/// A VMRPC client over a transport.
///
/// `&mut self` on every call keeps two calls of one client off one call
/// page; for several threads, use one client per vCPU (see the preload
/// library) or one per thread, each pinned.
pub struct Client<T: Transport> {
    transport: T,
    clock: Option<HostClock>,
    /// Per vCPU: the guest-measured arrival of its previous early-return
    /// wait (signed ns after that wait's deadline), told to the host with
    /// the next wait so it tunes its timer advance by it.
    feedback: [Option<i64>; MAX_VCPUS],
    /// vCPUs whose index the host confirmed equals the CPU number.
    verified: u64,
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T) -> Client<T> {
        let clock = transport.header().map(HostClock::new);
        Client {
            transport,
            clock,
            feedback: [None; MAX_VCPUS],
            verified: 0,
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

    /// The host echoes `x`.
    pub fn ping(&mut self, x: u64) -> Result<u64, Error> {
        let vcpu = self.current_vcpu()?;
        Ok(self.call(vcpu, Call::Ping, 0, [x, 0, 0, 0, 0, 0])?[0])
    }

    /// Host `CLOCK_MONOTONIC` in ns, read by the host (one exit).
    pub fn clock(&mut self) -> Result<u64, Error> {
        let vcpu = self.current_vcpu()?;
        Ok(self.call(vcpu, Call::Clock, 0, [0; ARGS])?[0])
    }

    /// What the host says about vCPU `vcpu`; the caller must run on it.
    pub fn vcpu_info(&mut self, vcpu: u32) -> Result<VcpuInfo, Error> {
        let running_on = self.current_vcpu()?;
        if running_on != vcpu {
            return Err(Error::WrongCpu { vcpu, running_on });
        }
        let [index, flags, count, tsc_khz] = self.call(vcpu, Call::VcpuInfo, 0, [0; ARGS])?;
        Ok(VcpuInfo {
            index,
            flags,
            count,
            tsc_khz,
        })
    }

    /// Host time now: from the TSC without an exit when the header allows,
    /// else with a `Clock` call.
    pub fn host_now(&mut self) -> Result<u64, Error> {
        match self.clock.as_ref().and_then(HostClock::now) {
            Some(now) => Ok(now),
            None => self.clock(),
        }
    }

    /// Whether waits on `vcpu` ask the host to return early and spin the
    /// rest: only on a real-time vCPU (which runs a timer advance), and only
    /// when the host clock can be read from the TSC.
    pub fn early_return(&self, vcpu: u32) -> bool {
        self.clock
            .as_ref()
            .is_some_and(|c| c.is_usable() && c.header().is_rt_cpu(vcpu))
    }

    /// Checks once per vCPU that the host calls it by its CPU number.
    fn verify_vcpu(&mut self, vcpu: u32) -> Result<(), Error> {
        let bit = 1u64.checked_shl(vcpu).unwrap_or(0);
        if bit == 0 {
            return Err(Error::NoCallPage {
                cpu: vcpu,
                vcpu_count: MAX_VCPUS as u32,
            });
        }
        if self.verified & bit != 0 {
            return Ok(());
        }
        let info = self.vcpu_info(vcpu)?;
        if info.index != u64::from(vcpu) {
            return Err(Error::VcpuMismatch {
                cpu: vcpu,
                index: info.index,
            });
        }
        self.verified |= bit;
        Ok(())
    }

    /// Waits until host `CLOCK_MONOTONIC` reaches `deadline` (ns), parked in
    /// the host (a long poll) on the vCPU the caller runs on. Never returns
    /// before the deadline by the client's host clock.
    ///
    /// On a real-time vCPU with a known TSC frequency it asks the host to
    /// return up to its timer advance early (`EARLY_RETURN`), spins the rest
    /// on `rdtsc` mapped through the header's clock pair, and reports when
    /// control came back as `FEEDBACK` with the next wait, exactly as the
    /// built-in guest does. Elsewhere the host itself never returns before
    /// the deadline.
    pub fn sleep_until_host(&mut self, deadline: u64) -> Result<Woke, Error> {
        let vcpu = self.current_vcpu()?;
        self.verify_vcpu(vcpu)?;
        let early = self.early_return(vcpu);
        let slot = vcpu as usize;
        let (wait_flags, feedback) = match (early, self.feedback[slot]) {
            (false, _) => (0, 0),
            (true, None) => (flags::EARLY_RETURN, 0),
            (true, Some(arrival)) => (flags::EARLY_RETURN | flags::FEEDBACK, arrival as u64),
        };
        let results = self.call(
            vcpu,
            Call::SleepUntil,
            wait_flags,
            [deadline, feedback, 0, 0, 0, 0],
        )?;
        let advance_ns = results[2];
        if !early {
            return Ok(Woke {
                deadline,
                returned: results[1],
                early_return: false,
                advance_ns,
            });
        }
        let arrival = self.host_now()?;
        self.feedback[slot] = Some(arrival.wrapping_sub(deadline) as i64);
        let mut now = arrival;
        while now < deadline {
            std::hint::spin_loop();
            now = self.host_now()?;
        }
        Ok(Woke {
            deadline,
            returned: now,
            early_return: true,
            advance_ns,
        })
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
    let status = word32(STATUS_OFFSET);
    match Status::from_u32(status) {
        Some(Status::Ok) => Ok(std::array::from_fn(|i| {
            let at = RESULTS_OFFSET + 8 * i;
            u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
        })),
        Some(s) => Err(Error::Status(s)),
        None if status == UNANSWERED => Err(Error::Unanswered),
        None => Err(Error::UnknownStatus(status)),
    }
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
