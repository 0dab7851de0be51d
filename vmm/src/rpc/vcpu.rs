//! The calls of the vCPU service (numbers 1..=19): what a vCPU asks about
//! itself and its own time: ping, clock, sleeps and periodic waits, its
//! facts, log lines and sample reports. Per vCPU, in its thread: the timer
//! state is the vCPU's own.

use rtvm_abi::vmrpc::{self, vcpu_info, Call, Request, Status};

use super::context::CallContext;
use super::counters::{SampleStreams, WakeStages};
use super::timer::{TimerService, WaitOptions};
use crate::clock::{host_tsc, now_ns, TscOffset};
use crate::config::AdvanceMode;

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

/// The vCPU service of one vCPU.
pub struct VcpuService {
    facts: VcpuFacts,
    timer: TimerService,
    /// A recorded wake-up (benchmarks only) waiting for its last stage,
    /// the vCPU's next KVM_RUN.
    entering: Option<WakeStages>,
    /// Where the last recorded wake-up went, for the guest's arrival that
    /// comes with its next wait.
    recorded: Option<usize>,
}

impl VcpuService {
    pub fn new(facts: VcpuFacts, advance: AdvanceMode) -> Self {
        VcpuService {
            facts,
            timer: TimerService::new(advance),
            entering: None,
            recorded: None,
        }
    }

    pub fn facts(&self) -> &VcpuFacts {
        &self.facts
    }

    /// The timer advance this vCPU uses now (ns).
    pub fn timer_advance(&self) -> u64 {
        self.timer.advance().current()
    }

    /// The vCPU is about to enter the guest: a wake-up waiting for that
    /// stage is complete.
    pub fn entering_guest(&mut self, streams: Option<&SampleStreams>) {
        if let (Some(mut wake), Some(streams)) = (self.entering.take(), streams) {
            wake.entered = now_ns();
            wake.vcpu = self.facts.index;
            self.recorded = streams.record_wake(wake);
        }
    }

    pub fn serve(
        &mut self,
        req: &Request,
        cx: &mut CallContext<'_>,
        streams: Option<&SampleStreams>,
    ) -> Result<[u64; 4], Status> {
        let a = req.args;
        let wait = |feedback_arg| WaitOptions::from_call(req.flags, feedback_arg);
        match req.call {
            Call::Ping => Ok([a[0], 0, 0, 0]),
            Call::Clock => Ok(self.clock()),
            Call::Sleep => self.timer.sleep(a[0], wait(a[1]), cx.park),
            Call::SleepUntil => self.timer.sleep_until(a[0], wait(a[1]), cx.park),
            Call::Periodic => self.timer.start_periodic(a[0], a[1]),
            Call::WaitNext => {
                let opts = wait(a[0]);
                if let Some(streams) = streams {
                    if let (Some(index), Some(arrival)) = (self.recorded.take(), opts.feedback) {
                        streams.set_arrival(index, arrival);
                    }
                    streams.prepare_wake();
                }
                let (results, wake) = self.timer.wait_next(opts, cx.park)?;
                // Completed when the vCPU enters the guest again; nothing
                // else happens on the way there (the host stream is made
                // from these records when the VM ends).
                if streams.is_some() {
                    self.entering = Some(wake);
                }
                Ok(results)
            }
            Call::VcpuInfo => Ok(self.info()),
            Call::Log => self.log(cx, a[0], a[1]),
            Call::Report => {
                let streams = streams.ok_or(Status::NotConfigured)?;
                if a[2] >= vmrpc::HOST_STREAM || a[1] > vmrpc::REPORT_MAX {
                    return Err(Status::BadArgument);
                }
                let samples = cx.read_words(a[0], a[1])?;
                Ok([streams.append(a[2] as usize, &samples)?, 0, 0, 0])
            }
            _ => Err(Status::UnsupportedCall),
        }
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

    fn info(&self) -> [u64; 4] {
        let mut flags = 0;
        if self.facts.realtime {
            flags |= vcpu_info::REALTIME;
        }
        if self.timer.advance().is_enabled() {
            flags |= vcpu_info::TIMER_ADVANCE;
        }
        [
            self.facts.index as u64,
            flags,
            self.facts.count as u64,
            self.facts.tsc_khz,
        ]
    }

    fn log(&self, cx: &CallContext<'_>, addr: u64, len: u64) -> Result<[u64; 4], Status> {
        if len > vmrpc::LOG_MAX {
            return Err(Status::BadArgument);
        }
        let bytes = cx.read(addr, len)?;
        tracing::info!(target: "guest", "vCPU {}: {}", self.facts.index, String::from_utf8_lossy(&bytes).trim_end().escape_debug());
        Ok([len, 0, 0, 0])
    }
}
