//! The guest's VMRPC client: calls to the host through this vCPU's call page
//! and the doorbell port (see `rtvm_abi::vmrpc` for the contract).
//!
//! Everything here runs at CPL3: the doorbell `out` goes straight to the VMM
//! (no trip through emulated CPL0), and `rdtsc` is native, so the host clock
//! can be read from the TSC without an exit once it has been calibrated.
//!
//! An [`Rpc`] is made per workload run on each vCPU and owns that vCPU's
//! call page for its lifetime (`&mut self` on every call keeps two calls from
//! sharing the page); there is no global state. It is this guest's
//! transport for the protocol in `rtvm_abi::client` ([`Vmrpc`]): the call
//! page and doorbell, and host time from the calibrated TSC. Calls that a
//! working host never refuses (ping, clock, log, report) panic on a
//! refusal here, which reports it to the VMM.

use crate::cpu;
use core::arch::asm;

use rtvm_abi::client::{answer, Feedback};
use rtvm_abi::vmrpc::{Call, CallPage, Status, ARGS, DOORBELL_ERROR, LOG_MAX, REPORT_MAX, RESULTS};
use rtvm_abi::{port, BootInfo, ABI_VERSION};

pub use rtvm_abi::client::{Refused as Error, VcpuInfo, Vmrpc, UNANSWERED};

/// How many samples the clock calibration takes; it keeps the one with the
/// shortest round trip, whose midpoint is the least uncertain.
const CALIBRATION_SAMPLES: usize = 8;

/// Samples per [`Batch`]: 4 KiB of stack, one `Report` call per batch.
pub const BATCH: usize = 512;

/// Rings the doorbell with `doorbell` and returns what the host left in EAX:
/// `doorbell` itself, or [`DOORBELL_ERROR`] or-ed with a status.
pub fn ring(doorbell: u32) -> u32 {
    let mut eax = doorbell;
    // SAFETY: the host reads and writes the call page during this `out`. No
    // `nomem`, so the asm is a compiler memory barrier: the request writes
    // stay before it and the answer reads after it.
    unsafe {
        asm!("out dx, eax", in("dx") port::DOORBELL, inout("eax") eax, options(nostack, preserves_flags))
    };
    eax
}

/// Writes a request, as given, into the call page at `page`, rings the
/// doorbell with `doorbell` (normally `page >> 12`), and returns EAX after
/// the `out`, the status and the results, whatever they are. For crafting
/// malformed calls; [`Rpc::call`] is the checked way.
///
/// # Safety
/// `page` must be a page of guest RAM that nothing else uses during the call.
pub unsafe fn raw_call(
    page: u64,
    doorbell: u32,
    version: u32,
    number: u32,
    flags: u32,
    args: [u64; ARGS],
) -> (u32, u32, [u64; RESULTS]) {
    // Volatile: the host, not this program, reads these and writes the answer.
    let p = page as *mut CallPage;
    (&raw mut (*p).abi_version).write_volatile(version);
    (&raw mut (*p).call).write_volatile(number);
    (&raw mut (*p).flags).write_volatile(flags);
    (&raw mut (*p).args).write_volatile(args);
    (&raw mut (*p).status).write_volatile(UNANSWERED);
    let eax = ring(doorbell);
    let status = (&raw const (*p).status).read_volatile();
    let results = (&raw const (*p).results).read_volatile();
    (eax, status, results)
}

/// The VMRPC client of one vCPU.
pub struct Rpc {
    /// Guest-physical (= virtual) address of this vCPU's call page.
    page: u64,
    info: VcpuInfo,
    /// A TSC reading and the host time it maps to (see `calibrate`).
    tsc0: u64,
    host0: u64,
    /// Half the round trip of the calibration sample: how far the mapping's
    /// offset can be off, since the host read its clock somewhere in it.
    clock_error_ns: u64,
    feedback: Feedback,
    /// The host keeps no sample streams (see [`Rpc::report`]).
    no_streams: bool,
    /// Bytes the file calls move per call when splitting a large request
    /// (see `fs`): 0 until the first such call, which starts at
    /// `fs::FIRST_CHUNK`; halved whenever the host answers `TooLarge`, so
    /// the host's unknown limit is learned once.
    pub(crate) fs_chunk: usize,
    /// The same for `net::Rpc::send_all`, on the host's per-socket buffer
    /// cap (`net::FIRST_CHUNK` first).
    pub(crate) net_chunk: usize,
}

impl Rpc {
    /// The client of vCPU `vcpu`, which `info` describes: asks the host
    /// about the vCPU and calibrates the host clock against the TSC.
    pub fn new(info: &BootInfo, vcpu: usize) -> Rpc {
        let mut rpc = Rpc {
            page: info.vcpus[vcpu].call_page,
            info: VcpuInfo::default(),
            tsc0: 0,
            host0: 0,
            clock_error_ns: 0,
            feedback: None,
            no_streams: false,
            fs_chunk: 0,
            net_chunk: 0,
        };
        rpc.info =
            Vmrpc::vcpu_info(&mut rpc).unwrap_or_else(|e| panic!("VMRPC VcpuInfo failed: {e}"));
        // A mismatch means the host served this page on another vCPU's
        // behalf (or mixed up pages): nothing measured here would mean much.
        assert!(
            rpc.info.index == vcpu as u64,
            "VcpuInfo on vCPU {} answered index {}",
            vcpu,
            rpc.info.index
        );
        assert!(
            rpc.info.count == u64::from(info.vcpu_count),
            "VcpuInfo answered {} vCPUs, the boot information {}",
            rpc.info.count,
            info.vcpu_count
        );
        if rpc.info.tsc_khz != 0 {
            rpc.calibrate();
        }
        rpc
    }

    /// Maps the TSC to host time: the host read its clock somewhere between
    /// two TSC readings around a `Clock` call, so take the midpoint as the
    /// moment it did, from the sample with the shortest round trip.
    fn calibrate(&mut self) {
        // The host pairs its clock with this vCPU's TSC itself when it can:
        // far tighter than timing an exit from here.
        let [host, tsc, error_ns, _] = self.must(Call::Clock, 0, [0; ARGS]);
        if tsc != 0 {
            self.tsc0 = tsc;
            self.host0 = host;
            self.clock_error_ns = error_ns;
            return;
        }
        let mut best_window = u64::MAX;
        for _ in 0..CALIBRATION_SAMPLES {
            let t0 = cpu::rdtsc_ordered();
            let host = self.now_by_exit();
            let t1 = cpu::rdtsc_ordered();
            let window = t1.wrapping_sub(t0);
            if window < best_window {
                best_window = window;
                self.tsc0 = t0 + window / 2;
                self.host0 = host;
            }
        }
        self.clock_error_ns = self.ticks_to_ns(best_window / 2);
    }

    /// What the host said about this vCPU when the client was made.
    pub fn info(&self) -> VcpuInfo {
        self.info
    }

    /// The address of this vCPU's call page.
    pub fn page(&self) -> u64 {
        self.page
    }

    /// How far [`Rpc::now`] may be off the host clock (0 when it asks
    /// the host each time), not counting TSC drift since the calibration.
    pub fn clock_error_ns(&self) -> u64 {
        self.clock_error_ns
    }

    /// TSC ticks in ns. Only for a vCPU whose `tsc_khz` is known (non-zero).
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.info.tsc_khz)) as u64
    }

    /// Host time (CLOCK_MONOTONIC ns): from the TSC without an exit where
    /// it tells host time, else by a `Clock` call.
    pub fn now(&mut self) -> u64 {
        self.tsc_now().unwrap_or_else(|| self.now_by_exit())
    }

    /// Host time read by the host (one exit).
    pub fn now_by_exit(&mut self) -> u64 {
        self.must(Call::Clock, 0, [0; ARGS])[0]
    }

    /// The TSC value at which [`Rpc::now`] reaches `host_ns` (rounded
    /// up, so a wait for it never ends before `host_ns` by `now`). For
    /// programming the TSC-deadline timer. Only for a vCPU whose `tsc_khz`
    /// is known (non-zero).
    pub fn host_to_tsc(&self, host_ns: u64) -> u64 {
        let ns = u128::from(host_ns.saturating_sub(self.host0));
        let ticks = (ns * u128::from(self.info.tsc_khz)).div_ceil(1_000_000);
        self.tsc0.saturating_add(ticks as u64)
    }

    /// Makes a call and returns its results, or the status it failed with.
    pub fn call(
        &mut self,
        call: Call,
        flags: u32,
        args: [u64; ARGS],
    ) -> Result<[u64; RESULTS], Error> {
        let doorbell = (self.page >> 12) as u32;
        // SAFETY: the page is this vCPU's call page, reserved for it by the
        // VMM, and `&mut self` keeps any other call off it meanwhile.
        let (eax, status, results) =
            unsafe { raw_call(self.page, doorbell, ABI_VERSION, call as u32, flags, args) };
        if eax & DOORBELL_ERROR != 0 {
            return Err(Error(eax & !DOORBELL_ERROR));
        }
        answer(status, results)
    }

    /// A call that must not fail: a failure means the host is broken (or
    /// the caller passed nonsense), so panic, which reports it to the VMM.
    pub fn must(&mut self, call: Call, flags: u32, args: [u64; ARGS]) -> [u64; RESULTS] {
        self.call(call, flags, args)
            .unwrap_or_else(|e| panic!("VMRPC {call:?} failed: {e}"))
    }

    /// Writes `text` to the VMM's log, in pieces of at most `LOG_MAX` bytes
    /// cut at character boundaries.
    pub fn log(&mut self, mut text: &str) {
        while !text.is_empty() {
            let mut len = text.len().min(LOG_MAX as usize);
            while !text.is_char_boundary(len) {
                len -= 1;
            }
            let (piece, rest) = text.split_at(len);
            self.must(
                Call::Log,
                0,
                [piece.as_ptr() as u64, len as u64, 0, 0, 0, 0],
            );
            text = rest;
        }
    }

    /// Appends `samples` to the host's sample stream `stream`, in calls of at
    /// most `REPORT_MAX` samples. (Guest addresses are physical addresses:
    /// memory is identity mapped.) A VMM that keeps no samples (a run that
    /// is no benchmark) answers `NotConfigured`: then the samples are
    /// dropped, and later reports skipped without an exit.
    pub fn report(&mut self, stream: u64, samples: &[u64]) {
        if self.no_streams {
            return;
        }
        for chunk in samples.chunks(REPORT_MAX as usize) {
            let args = [chunk.as_ptr() as u64, chunk.len() as u64, stream, 0, 0, 0];
            match self.call(Call::Report, 0, args) {
                Ok(_) => {}
                Err(e) if e == Error::from(Status::NotConfigured) => {
                    self.no_streams = true;
                    return;
                }
                Err(e) => panic!("VMRPC Report failed: {e}"),
            }
        }
    }
}

impl Vmrpc for Rpc {
    type Error = Error;

    fn call(&mut self, call: Call, flags: u32, args: [u64; ARGS]) -> Result<[u64; RESULTS], Error> {
        Rpc::call(self, call, flags, args)
    }

    /// Maps the TSC to host time through the calibration point. Saturating:
    /// a TSC reading before the calibration point (another host CPU's TSC a
    /// little behind) maps to no earlier than it.
    fn tsc_now(&mut self) -> Option<u64> {
        (self.info.tsc_khz != 0)
            .then(|| self.host0 + self.ticks_to_ns(cpu::rdtsc_ordered().saturating_sub(self.tsc0)))
    }

    fn timer_advance(&mut self) -> Result<bool, Error> {
        Ok(self.info.has_timer_advance())
    }

    fn feedback(&mut self) -> &mut Feedback {
        &mut self.feedback
    }
}

/// Samples collected in a fixed buffer and handed to the host one full
/// batch at a time: a run of any length needs one batch of memory, and the
/// `Report` exits stay out of the measured stretches as far as possible.
pub struct Batch {
    stream: u64,
    len: usize,
    samples: [u64; BATCH],
}

impl Batch {
    pub fn new(stream: u64) -> Batch {
        Batch {
            stream,
            len: 0,
            samples: [0; BATCH],
        }
    }

    pub fn push(&mut self, rpc: &mut Rpc, sample: u64) {
        self.samples[self.len] = sample;
        self.len += 1;
        if self.len == BATCH {
            self.flush(rpc);
        }
    }

    /// Reports what is buffered (nothing if empty).
    pub fn flush(&mut self, rpc: &mut Rpc) {
        rpc.report(self.stream, &self.samples[..self.len]);
        self.len = 0;
    }
}
