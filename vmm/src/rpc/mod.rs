//! The VMRPC server: serves a guest's call in the host thread of the vCPU
//! that rang the doorbell (see `rtvm_abi::vmrpc` for the protocol).
//!
//! Everything the guest supplies — the call page address, call number,
//! flags, buffer addresses and lengths — is validated before use; bad input
//! gets its status code back in the call page and a log line, never a panic
//! or a host access outside guest RAM (all guest memory access goes through
//! [`CallContext`], which checks the range, and `vm-memory`, which checks
//! it again).
//!
//! A call is routed by its number range (`Call::service`) to the one
//! service that owns it: the calling vCPU's own [`VcpuService`] (ping,
//! clock, timers, facts, log, reports), or a service the VM's vCPUs share
//! ([`Services`]: files, sockets), which implements [`VmService`]. A
//! service gets the call and a [`CallContext`]: the caller, its park (for a
//! long poll, see [`park`]) and guest memory behind checks.
//!
//! Adding a service: its call numbers (a range of its own) in
//! `rtvm_abi::vmrpc::Call` and `Service`; its module here implementing
//! [`VmService`]; a field in [`Services`]; one line in
//! [`RpcServer::route`]; its guest client.

pub mod context;
pub mod counters;
pub mod fs;
pub mod handles;
pub mod net;
pub mod park;
pub mod ring;
pub mod timer;
pub mod vcpu;

use std::sync::Arc;

use rtvm_abi::vmrpc::{
    self, call_page_address, Call, Request, Service, Status, REQUEST_SIZE, RESULTS_OFFSET,
    STATUS_OFFSET,
};
use vm_memory::{Bytes, GuestAddress};

pub use context::CallContext;
pub use counters::{
    CallCounters, CallStats, ExitKind, Lateness, SampleStreams, VcpuActivity, Warn, WarnBudget,
    LATENESS_BOUNDS_US, STREAM_CAPACITY,
};
pub use vcpu::{VcpuFacts, VcpuService};

use crate::clock::now_ns;
use crate::config::{AdvanceMode, VmConfig};
use crate::error::Result;
use crate::memory::GuestRam;
use park::{CountedPark, Park};

/// A service the vCPUs of one VM share (one instance per VM), serving the
/// calls of its number range.
pub trait VmService: Send + Sync {
    fn serve(
        &self,
        req: &Request,
        cx: &mut CallContext<'_>,
    ) -> std::result::Result<[u64; 4], Status>;
}

/// What one VM's vCPUs serve together: built once with the VM.
pub struct Services {
    /// Rations warnings about refused calls (a guest could flood the log).
    pub warnings: WarnBudget,
    /// Only for benchmark runs (`VmConfig::sample_streams`).
    pub streams: Option<SampleStreams>,
    pub counters: CallCounters,
    /// None: the VM has no share, and file calls answer `NoShare`.
    pub files: Option<fs::FileService>,
    pub sockets: net::NetService,
}

impl Services {
    /// The services of a VM configured as `config` says.
    pub fn new(config: &VmConfig) -> Result<Self> {
        Ok(Services {
            warnings: WarnBudget::default(),
            streams: config.sample_streams.then(SampleStreams::new),
            counters: CallCounters::default(),
            files: config.share.clone().map(fs::FileService::new).transpose()?,
            sockets: net::NetService::new(config.net.clone())?,
        })
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

/// The VMRPC server of one vCPU.
pub struct RpcServer {
    ram: Arc<GuestRam>,
    services: Arc<Services>,
    own: VcpuService,
    activity: Arc<VcpuActivity>,
}

impl RpcServer {
    pub fn new(
        facts: VcpuFacts,
        ram: Arc<GuestRam>,
        services: Arc<Services>,
        advance: AdvanceMode,
    ) -> Self {
        RpcServer {
            ram,
            services,
            own: VcpuService::new(facts, advance),
            activity: Arc::default(),
        }
    }

    /// Where this server says which call it serves and the timer advance
    /// in force (the vCPU's, for the VMM's API).
    pub fn with_activity(mut self, activity: Arc<VcpuActivity>) -> Self {
        self.activity = activity;
        self
    }

    /// The timer advance this vCPU uses now (ns).
    pub fn timer_advance(&self) -> u64 {
        self.own.timer_advance()
    }

    /// Called just before each KVM_RUN: completes the record of a wake-up
    /// (benchmarks only; otherwise one branch).
    pub fn entering_guest(&mut self) {
        self.own.entering_guest(self.services.streams.as_ref());
    }

    /// Serves the call whose page the doorbell value names.
    pub fn on_doorbell(&mut self, doorbell: u32, park: &mut dyn Park) -> Doorbell {
        let vcpu = self.own.facts().index;
        let Some(page) = call_page_address(doorbell, self.ram.size()) else {
            self.warn(format_args!(
                "vCPU {vcpu}: VMRPC doorbell {doorbell:#x} names no call page in guest RAM"
            ));
            return Doorbell::BadPage(Status::BadAddress);
        };
        // One copy of the request: the guest may change the page while the
        // call runs, and nothing is read from it twice.
        let mut request = [0u8; REQUEST_SIZE];
        let decoded = match self.ram.mem().read_slice(&mut request, GuestAddress(page)) {
            Ok(()) => Request::decode(&request),
            Err(_) => Err(Status::BadAddress),
        };
        let number = u32::from_le_bytes(request[4..8].try_into().expect("4 bytes"));
        self.activity.serving(Some(number));
        let mut counted = CountedPark::new(park);
        let outcome = decoded.and_then(|req| {
            let mut cx = CallContext::new(vcpu, &self.ram, &mut counted);
            Self::route(&mut self.own, &self.services, &req, &mut cx)
        });
        if decoded.is_ok_and(|r| r.call.service() == Service::Net) {
            self.services.counters.io_parked(vcpu, counted.parks);
        }
        self.activity.serving(None);
        let call = decoded.ok().map(|r| r.call);
        self.services.counters.served(number, call, outcome.is_ok());
        // Results of the timer waits: [deadline, host time at return, ..]
        // and WaitNext's [deadline, lateness, ..].
        match (call, &outcome) {
            (Some(Call::Sleep | Call::SleepUntil), Ok(r)) => {
                self.services
                    .counters
                    .long_poll_late(r[1].saturating_sub(r[0]));
                self.activity.set_timer_advance(self.own.timer_advance());
            }
            (Some(Call::WaitNext), Ok(r)) => {
                self.services.counters.long_poll_late(r[1]);
                self.activity.set_timer_advance(self.own.timer_advance());
            }
            _ => {}
        }
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
                    | Status::NotEmpty
                    | Status::ConnectionRefused
                    | Status::ConnectionReset
                    | Status::AddressInUse => {
                        tracing::debug!("vCPU {vcpu}: VMRPC call {number}: {}", status.name())
                    }
                    // A socket not connected (ENOTCONN): a shutdown at a
                    // program's end, say.
                    Status::NotConfigured
                        if decoded.is_ok_and(|r| r.call.service() == Service::Net) =>
                    {
                        tracing::debug!("vCPU {vcpu}: VMRPC call {number}: {}", status.name())
                    }
                    _ => self.warn(format_args!(
                        "vCPU {vcpu}: VMRPC call {number} refused: {}",
                        status.name()
                    )),
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

    /// A warning about the guest's doing, within the VM's budget.
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        match self.services.warnings.spend(now_ns()) {
            Warn::Log { left_out: 0 } => tracing::warn!("{what}"),
            Warn::Log { left_out } => {
                tracing::warn!("{what} ({left_out} more such warnings were left out of the log)")
            }
            Warn::Quiet => tracing::debug!("{what}"),
        }
    }

    /// The one place a call finds its service.
    fn route(
        own: &mut VcpuService,
        services: &Services,
        req: &Request,
        cx: &mut CallContext<'_>,
    ) -> std::result::Result<[u64; 4], Status> {
        match req.call.service() {
            Service::Vcpu => own.serve(req, cx, services.streams.as_ref()),
            Service::Files => services
                .files
                .as_ref()
                .ok_or(Status::NoShare)?
                .serve(req, cx),
            Service::Net => services.sockets.serve(req, cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::park::{Interrupted, Parked};
    use super::*;
    use crate::clock::{host_tsc, now_ns, TscOffset};
    use rtvm_abi::vmrpc::{vcpu_info, Call};
    use rtvm_abi::ABI_VERSION;

    struct NoPark;
    impl Park for NoPark {
        fn park(
            &mut self,
            _: &mut [libc::pollfd],
            _: u64,
        ) -> std::result::Result<Parked, Interrupted> {
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
        let mut config = VmConfig::new(crate::GuestSpec::Builtin("test".into()));
        config.sample_streams = true;
        RpcServer::new(
            facts,
            ram,
            Arc::new(Services::new(&config).unwrap()),
            AdvanceMode::Off,
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
        let streams = s.services.streams.as_ref().unwrap();
        assert_eq!(streams.take(4), vec![100, 101, 102]);
        assert!(streams.take(4).is_empty());
    }
}
