//! The VMRPC server: serves a guest's call in the host thread of the vCPU
//! that rang the doorbell (see `rtvm_abi::vmrpc` for the protocol).
//!
//! Everything the guest supplies — the call page address, call number,
//! flags, buffer addresses and lengths — is validated here before use; bad
//! input gets its status code back in the call page and a log line, never a
//! panic or a host access outside guest RAM (all guest memory access goes
//! through `vm-memory`, which bounds-checks it again).

pub mod fs;
pub mod handles;
pub mod net;
pub mod park;
pub mod timer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rtvm_abi::vmrpc::{
    self, buffer_in_ram, call_page_address, vcpu_info, Call, Request, Status, REQUEST_SIZE,
    RESULTS_OFFSET, STATUS_OFFSET,
};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::{host_tsc, now_ns, TscOffset};
use crate::memory::GuestRam;
use park::Park;
use timer::{AdvanceMode, TimerService, WaitOptions};

/// Most samples one stream keeps; more is refused with `NoResources`, so a
/// guest cannot grow the VMM's memory without bound.
pub const STREAM_CAPACITY: usize = 4 << 20;

/// Sample streams guests hand to the host with `Call::Report`.
#[derive(Default)]
pub struct SampleStreams {
    streams: Mutex<Vec<Vec<u64>>>,
}

impl SampleStreams {
    pub fn new() -> Self {
        SampleStreams {
            streams: Mutex::new(vec![Vec::new(); vmrpc::STREAMS as usize]),
        }
    }

    fn append(&self, stream: usize, samples: &[u64]) -> Result<u64, Status> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut streams[stream];
        if s.len() + samples.len() > STREAM_CAPACITY {
            return Err(Status::NoResources);
        }
        s.extend_from_slice(samples);
        Ok(s.len() as u64)
    }

    /// Takes the samples of `stream` out.
    pub fn take(&self, stream: usize) -> Vec<u64> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .get_mut(stream)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Call numbers below this are counted one by one (all of today's are).
const COUNTED_CALLS: usize = 64;

/// What the VMRPC servers of one VM have served, shared by its vCPUs:
/// cheap enough (relaxed atomics) to stay on always.
pub struct CallCounters {
    by_number: [AtomicU64; COUNTED_CALLS],
    refused: AtomicU64,
    long_polls: AtomicU64,
}

/// A snapshot of [`CallCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls by kind, in call-number order; only those made at least once.
    pub calls: Vec<(Call, u64)>,
    /// Calls answered with a status other than `Ok`.
    pub refused: u64,
    /// Timer waits (`Sleep`, `SleepUntil`, `WaitNext`) served as long polls:
    /// the calling vCPU parked in the host until its deadline.
    pub long_polls: u64,
}

impl Default for CallCounters {
    fn default() -> Self {
        CallCounters {
            by_number: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: AtomicU64::new(0),
            long_polls: AtomicU64::new(0),
        }
    }
}

impl CallCounters {
    fn served(&self, number: u32, ok: bool) {
        if let Some(count) = self.by_number.get(number as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> CallStats {
        CallStats {
            calls: (0..COUNTED_CALLS as u32)
                .filter_map(|n| {
                    let count = self.by_number[n as usize].load(Ordering::Relaxed);
                    Some((Call::from_u32(n)?, count)).filter(|_| count > 0)
                })
                .collect(),
            refused: self.refused.load(Ordering::Relaxed),
            long_polls: self.long_polls.load(Ordering::Relaxed),
        }
    }
}

/// What became of a doorbell.
#[derive(Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// Served; status and results are in the call page.
    Served,
    /// The doorbell named no page of guest RAM: the status goes into EAX.
    BadPage(Status),
}

/// Static facts about the vCPU a server belongs to.
#[derive(Clone, Copy, Debug)]
pub struct VcpuFacts {
    pub index: usize,
    pub count: usize,
    pub realtime: bool,
    pub tsc_khz: u64,
    /// Guest TSC minus host TSC, and how precisely that is known (ns).
    pub tsc_offset: Option<TscOffset>,
}

/// The VMRPC server of one vCPU.
pub struct RpcServer {
    facts: VcpuFacts,
    ram: Arc<GuestRam>,
    streams: Arc<SampleStreams>,
    counters: Arc<CallCounters>,
    timer: TimerService,
    files: Option<Arc<fs::FileService>>,
    sockets: Arc<net::NetService>,
}

impl RpcServer {
    pub fn new(
        facts: VcpuFacts,
        ram: Arc<GuestRam>,
        streams: Arc<SampleStreams>,
        counters: Arc<CallCounters>,
        advance: AdvanceMode,
        files: Option<Arc<fs::FileService>>,
        sockets: Arc<net::NetService>,
    ) -> Self {
        RpcServer {
            facts,
            ram,
            streams,
            counters,
            timer: TimerService::new(advance),
            files,
            sockets,
        }
    }

    /// The timer advance this vCPU uses now (ns).
    pub fn timer_advance(&self) -> u64 {
        self.timer.advance().current()
    }

    /// Serves the call whose page the doorbell value names.
    pub fn on_doorbell(&mut self, doorbell: u32, park: &mut dyn Park) -> Doorbell {
        let Some(page) = call_page_address(doorbell, self.ram.size()) else {
            tracing::warn!(
                "vCPU {}: VMRPC doorbell {doorbell:#x} names no call page in guest RAM",
                self.facts.index
            );
            return Doorbell::BadPage(Status::BadAddress);
        };
        let mut request = [0u8; REQUEST_SIZE];
        let outcome = match self.ram.mem().read_slice(&mut request, GuestAddress(page)) {
            Ok(()) => Request::decode(&request).and_then(|req| self.dispatch(&req, park)),
            Err(_) => Err(Status::BadAddress),
        };
        let number = u32::from_le_bytes(request[4..8].try_into().unwrap());
        self.counters.served(number, outcome.is_ok());
        let (status, results) = match outcome {
            Ok(results) => (Status::Ok, results),
            Err(status) => {
                // Outcomes a correct guest meets in normal work stay at
                // debug; malformed or forbidden requests are worth a warning.
                match status {
                    Status::Interrupted
                    | Status::TimedOut
                    | Status::NotFound
                    | Status::AlreadyExists
                    | Status::NotADirectory
                    | Status::IsADirectory
                    | Status::NotEmpty => tracing::debug!(
                        "vCPU {}: VMRPC call {number}: {}",
                        self.facts.index,
                        status.name()
                    ),
                    _ => tracing::warn!(
                        "vCPU {}: VMRPC call {number} refused: {}",
                        self.facts.index,
                        status.name()
                    ),
                }
                (status, [0; vmrpc::RESULTS])
            }
        };
        let mut out = [0u8; vmrpc::RESULTS * 8];
        for (chunk, r) in out.chunks_exact_mut(8).zip(results) {
            chunk.copy_from_slice(&r.to_le_bytes());
        }
        let mem = self.ram.mem();
        // The page was checked to lie in RAM, so these cannot fail; if they
        // did, the guest would just see its pre-set status.
        let _ = mem.write_slice(&out, GuestAddress(page + RESULTS_OFFSET as u64));
        let _ = mem.write_obj(status as u32, GuestAddress(page + STATUS_OFFSET as u64));
        Doorbell::Served
    }

    fn dispatch(&mut self, req: &Request, park: &mut dyn Park) -> Result<[u64; 4], Status> {
        let results = self.dispatch_call(req, park);
        if results.is_ok() && matches!(req.call, Call::Sleep | Call::SleepUntil | Call::WaitNext) {
            self.counters.long_polls.fetch_add(1, Ordering::Relaxed);
        }
        results
    }

    fn dispatch_call(&mut self, req: &Request, park: &mut dyn Park) -> Result<[u64; 4], Status> {
        let a = req.args;
        match req.call {
            Call::Ping => Ok([a[0], 0, 0, 0]),
            Call::Clock => Ok(self.clock()),
            Call::Sleep => self
                .timer
                .sleep(a[0], WaitOptions::from_call(req.flags, a[1]), park),
            Call::SleepUntil => {
                self.timer
                    .sleep_until(a[0], WaitOptions::from_call(req.flags, a[1]), park)
            }
            Call::Periodic => self.timer.start_periodic(a[0], a[1]),
            Call::WaitNext => {
                let results = self
                    .timer
                    .wait_next(WaitOptions::from_call(req.flags, a[0]), park)?;
                // Full stream: the cross-check simply stops growing.
                let _ = self
                    .streams
                    .append(vmrpc::HOST_STREAM as usize, &[results[1]]);
                Ok(results)
            }
            Call::VcpuInfo => {
                let mut flags = 0;
                if self.facts.realtime {
                    flags |= vcpu_info::REALTIME;
                }
                if self.timer.advance().is_enabled() {
                    flags |= vcpu_info::TIMER_ADVANCE;
                }
                Ok([
                    self.facts.index as u64,
                    flags,
                    self.facts.count as u64,
                    self.facts.tsc_khz,
                ])
            }
            Call::Log => self.log(a[0], a[1]),
            Call::Report => self.report(a[0], a[1], a[2]),
            Call::FsOpen => self.files()?.open(&self.path(a[0], a[1])?, a[2], a[3]),
            Call::FsRead => {
                let files = self.files()?;
                files.check_len(a[2])?;
                self.check_buffer(a[1], a[2])?;
                let data = files.read(a[0], a[2], a[3])?;
                self.write_guest(a[1], &data)?;
                Ok([data.len() as u64, 0, 0, 0])
            }
            Call::FsWrite => {
                let files = self.files()?;
                files.check_len(a[2])?;
                files.write(a[0], &self.read_guest(a[1], a[2])?, a[3])
            }
            Call::FsFsync => self.files()?.fsync(a[0]),
            Call::FsClose => self.files()?.close(a[0]),
            Call::FsStat => self.files()?.stat(&self.path(a[0], a[1])?),
            Call::FsFstat => self.files()?.fstat(a[0]),
            Call::FsMkdir => self.files()?.mkdir(&self.path(a[0], a[1])?, a[2]),
            Call::FsUnlink => self.files()?.unlink(&self.path(a[0], a[1])?, a[2]),
            Call::FsRename => self
                .files()?
                .rename(&self.path(a[0], a[1])?, &self.path(a[2], a[3])?),
            Call::FsReaddir => {
                let files = self.files()?;
                self.check_buffer(a[3], a[4])?;
                let (records, results) = files.readdir(&self.path(a[0], a[1])?, a[2], a[4])?;
                self.write_guest(a[3], &records)?;
                Ok(results)
            }
            Call::NetSocket
            | Call::NetBind
            | Call::NetListen
            | Call::NetAccept
            | Call::NetConnect
            | Call::NetSend
            | Call::NetRecv
            | Call::NetPoll
            | Call::NetSetsockopt
            | Call::NetClose => self.dispatch_net(req, park),
        }
    }

    fn dispatch_net(&mut self, req: &Request, park: &mut dyn Park) -> Result<[u64; 4], Status> {
        let a = req.args;
        let sockets = self.sockets.clone();
        match req.call {
            Call::NetSocket => sockets.open(a[0], a[1]),
            Call::NetBind => sockets.bind(a[0], [a[1], a[2], a[3]]),
            Call::NetListen => sockets.listen(a[0], a[1]),
            Call::NetAccept => sockets.accept(a[0], a[1], park),
            Call::NetConnect => sockets.connect(a[0], [a[1], a[2], a[3]], a[4], park),
            Call::NetSend => {
                if a[2] > net::MAX_TRANSFER {
                    return Err(Status::TooLarge);
                }
                sockets.send(
                    a[0],
                    &self.read_guest(a[1], a[2])?,
                    [a[3], a[4], a[5]],
                    park,
                )
            }
            Call::NetRecv => {
                self.check_buffer(a[1], a[2])?;
                let (data, results) = sockets.recv(a[0], a[2], a[3], park)?;
                self.write_guest(a[1], &data)?;
                Ok(results)
            }
            Call::NetPoll => {
                if a[1] == 0 || a[1] > vmrpc::net::POLL_MAX {
                    return Err(Status::BadArgument);
                }
                let raw = self.read_guest(a[0], a[1] * 8)?;
                let handles: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                sockets.poll(&handles, a[2], park)
            }
            Call::NetSetsockopt => sockets.setsockopt(a[0], a[1], a[2]),
            Call::NetClose => sockets.close(a[0]),
            _ => Err(Status::UnsupportedCall),
        }
    }

    fn files(&self) -> Result<&fs::FileService, Status> {
        self.files.as_deref().ok_or(Status::NoShare)
    }

    /// A guest path argument: checked for length before it is read.
    fn path(&self, addr: u64, len: u64) -> Result<String, Status> {
        if len == 0 || len > vmrpc::PATH_MAX {
            return Err(Status::BadArgument);
        }
        fs::guest_path(&self.read_guest(addr, len)?)
    }

    fn check_buffer(&self, addr: u64, len: u64) -> Result<(), Status> {
        if buffer_in_ram(addr, len, self.ram.size()) {
            Ok(())
        } else {
            Err(Status::BadAddress)
        }
    }

    fn write_guest(&self, addr: u64, data: &[u8]) -> Result<(), Status> {
        self.check_buffer(addr, data.len() as u64)?;
        self.ram
            .mem()
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| Status::BadAddress)
    }

    fn clock(&self) -> [u64; 4] {
        match self.facts.tsc_offset {
            Some(offset) => {
                let tsc = host_tsc();
                let now = now_ns();
                [now, offset.guest_tsc(tsc), offset.error_ns.max(1), 0]
            }
            None => [now_ns(), 0, 0, 0],
        }
    }

    /// Reads `len` bytes of guest memory at `addr`, after checking the range.
    fn read_guest(&self, addr: u64, len: u64) -> Result<Vec<u8>, Status> {
        if !buffer_in_ram(addr, len, self.ram.size()) {
            return Err(Status::BadAddress);
        }
        let mut buf = vec![0u8; len as usize];
        self.ram
            .mem()
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|_| Status::BadAddress)?;
        Ok(buf)
    }

    fn log(&self, addr: u64, len: u64) -> Result<[u64; 4], Status> {
        if len > vmrpc::LOG_MAX {
            return Err(Status::BadArgument);
        }
        let bytes = self.read_guest(addr, len)?;
        tracing::info!(target: "guest", "vCPU {}: {}", self.facts.index, String::from_utf8_lossy(&bytes).trim_end().escape_debug());
        Ok([len, 0, 0, 0])
    }

    fn report(&self, addr: u64, count: u64, stream: u64) -> Result<[u64; 4], Status> {
        if stream >= vmrpc::HOST_STREAM || count > vmrpc::REPORT_MAX {
            return Err(Status::BadArgument);
        }
        let bytes = self.read_guest(addr, count * 8)?;
        let samples: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let total = self.streams.append(stream as usize, &samples)?;
        Ok([total, 0, 0, 0])
    }
}

#[cfg(test)]
mod tests {
    use super::park::{Interrupted, Parked};
    use super::*;
    use rtvm_abi::ABI_VERSION;

    struct NoPark;
    impl Park for NoPark {
        fn park(&mut self, _: &mut [libc::pollfd], _: u64) -> Result<Parked, Interrupted> {
            Err(Interrupted)
        }
    }

    const PAGE: u64 = 0x10_0000;

    fn server() -> RpcServer {
        let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
        let facts = VcpuFacts {
            index: 1,
            count: 2,
            realtime: true,
            tsc_khz: 1_000_000,
            tsc_offset: Some(TscOffset {
                ticks: -1000,
                error_ns: 5,
            }),
        };
        RpcServer::new(
            facts,
            ram,
            Arc::new(SampleStreams::new()),
            Arc::new(CallCounters::default()),
            AdvanceMode::Off,
            None,
            Arc::new(net::NetService::new(net::NetPolicy::default()).unwrap()),
        )
    }

    fn call(
        s: &mut RpcServer,
        version: u32,
        number: u32,
        flags: u32,
        args: [u64; 6],
    ) -> (u32, [u64; 4]) {
        let mem = s.ram.mem();
        mem.write_obj(version, GuestAddress(PAGE)).unwrap();
        mem.write_obj(number, GuestAddress(PAGE + 4)).unwrap();
        mem.write_obj(flags, GuestAddress(PAGE + 8)).unwrap();
        mem.write_obj(u32::MAX, GuestAddress(PAGE + 12)).unwrap();
        for (i, a) in args.iter().enumerate() {
            mem.write_obj(*a, GuestAddress(PAGE + 16 + 8 * i as u64))
                .unwrap();
        }
        assert_eq!(
            s.on_doorbell((PAGE >> 12) as u32, &mut NoPark),
            Doorbell::Served
        );
        let mem = s.ram.mem();
        let status: u32 = mem.read_obj(GuestAddress(PAGE + 12)).unwrap();
        let results = std::array::from_fn(|i| {
            mem.read_obj(GuestAddress(PAGE + 64 + 8 * i as u64))
                .unwrap()
        });
        (status, results)
    }

    #[test]
    fn ping_and_vcpu_info_answer() {
        let mut s = server();
        assert_eq!(
            call(
                &mut s,
                ABI_VERSION,
                Call::Ping as u32,
                0,
                [77, 0, 0, 0, 0, 0]
            ),
            (0, [77, 0, 0, 0])
        );
        let (status, r) = call(&mut s, ABI_VERSION, Call::VcpuInfo as u32, 0, [0; 6]);
        assert_eq!((status, r), (0, [1, vcpu_info::REALTIME, 2, 1_000_000]));
    }

    #[test]
    fn every_bad_argument_class_gets_its_status() {
        let mut s = server();
        let ram = 16u64 << 20;
        let st = |s: &mut RpcServer, v, n, f, a| call(s, v, n, f, a).0;
        assert_eq!(
            st(&mut s, ABI_VERSION + 1, 1, 0, [0; 6]),
            Status::BadAbiVersion as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, 999, 0, [0; 6]),
            Status::UnsupportedCall as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, 1, 1 << 9, [0; 6]),
            Status::BadFlags as u32
        );
        let log = Call::Log as u32;
        assert_eq!(
            st(&mut s, ABI_VERSION, log, 0, [ram, 16, 0, 0, 0, 0]),
            Status::BadAddress as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, log, 0, [u64::MAX - 7, 16, 0, 0, 0, 0]),
            Status::BadAddress as u32
        );
        assert_eq!(
            st(
                &mut s,
                ABI_VERSION,
                log,
                0,
                [0, vmrpc::LOG_MAX + 1, 0, 0, 0, 0]
            ),
            Status::BadArgument as u32
        );
        let report = Call::Report as u32;
        assert_eq!(
            st(
                &mut s,
                ABI_VERSION,
                report,
                0,
                [0, 1, vmrpc::HOST_STREAM, 0, 0, 0]
            ),
            Status::BadArgument as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, report, 0, [ram - 8, 2, 0, 0, 0, 0]),
            Status::BadAddress as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, report, 0, [0, u64::MAX, 0, 0, 0, 0]),
            Status::BadArgument as u32
        );
        assert_eq!(
            st(&mut s, ABI_VERSION, Call::WaitNext as u32, 0, [0; 6]),
            Status::NotConfigured as u32
        );
        assert_eq!(
            st(
                &mut s,
                ABI_VERSION,
                Call::SleepUntil as u32,
                0,
                [u64::MAX, 0, 0, 0, 0, 0]
            ),
            Status::Interrupted as u32,
            "a wait cut short says so"
        );
        assert_eq!(
            s.on_doorbell((ram >> 12) as u32, &mut NoPark),
            Doorbell::BadPage(Status::BadAddress)
        );
        assert_eq!(
            s.on_doorbell(u32::MAX, &mut NoPark),
            Doorbell::BadPage(Status::BadAddress)
        );
        // Still serving.
        assert_eq!(
            call(&mut s, ABI_VERSION, 1, 0, [5, 0, 0, 0, 0, 0]),
            (0, [5, 0, 0, 0])
        );
    }

    #[test]
    fn clock_pairs_host_time_with_the_guest_tsc() {
        let mut s = server();
        let before = (now_ns(), host_tsc());
        let (status, r) = call(&mut s, ABI_VERSION, Call::Clock as u32, 0, [0; 6]);
        let after = (now_ns(), host_tsc());
        assert_eq!(status, 0);
        assert!(r[0] >= before.0 && r[0] <= after.0);
        assert!(
            r[1] + 1000 >= before.1 && r[1] + 1000 <= after.1,
            "guest TSC = host TSC - 1000"
        );
        assert_eq!(r[2], 5);
    }

    #[test]
    fn reports_reach_their_stream() {
        let mut s = server();
        let mem = s.ram.mem();
        for i in 0..3u64 {
            mem.write_obj(100 + i, GuestAddress(0x20_0000 + 8 * i))
                .unwrap();
        }
        let (status, r) = call(
            &mut s,
            ABI_VERSION,
            Call::Report as u32,
            0,
            [0x20_0000, 3, 4, 0, 0, 0],
        );
        assert_eq!((status, r[0]), (0, 3));
        assert_eq!(s.streams.take(4), vec![100, 101, 102]);
        assert!(s.streams.take(4).is_empty());
    }
}
