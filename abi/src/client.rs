//! The guest half of VMRPC, written once for every guest: how a call's
//! answer reads, and how a guest waits (early return, feedback and the
//! final spin). The built-in guest and the Linux guest library each bring a
//! transport (how a call page reaches the host, how the host clock is read
//! from the TSC) by implementing [`Vmrpc`]; the protocol is in its provided
//! methods.

use crate::vmrpc::{flags, vcpu_info, Call, Status, ARGS, RESULTS};

/// What `status` holds until the host answers: no status has this number,
/// so a call page the host never wrote is told apart from any answer.
pub const UNANSWERED: u32 = 0xFFFF_FFFF;

/// A call the host did not answer with `Ok`: the status number it wrote (or
/// put in EAX beside `DOORBELL_ERROR`), kept raw so that a number this ABI
/// version does not know can still be shown; or [`UNANSWERED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub u32);

impl Refused {
    /// The status, if this ABI version defines the number.
    pub fn status(self) -> Option<Status> {
        Status::from_u32(self.0)
    }

    /// The page came back with its status unwritten.
    pub fn unanswered(self) -> bool {
        self.0 == UNANSWERED
    }
}

impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        Refused(status as u32)
    }
}

impl core::fmt::Display for Refused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.status() {
            Some(status) => f.write_str(status.name()),
            None if self.unanswered() => f.write_str("no answer (status left unwritten)"),
            None => write!(f, "unknown status {}", self.0),
        }
    }
}

/// A call page's answer: its results when `status` is `Ok`.
pub fn answer(status: u32, results: [u64; RESULTS]) -> Result<[u64; RESULTS], Refused> {
    if status == Status::Ok as u32 {
        Ok(results)
    } else {
        Err(Refused(status))
    }
}

/// What `VcpuInfo` tells a vCPU about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u64,
    /// [`vcpu_info`] bits.
    pub flags: u64,
    pub count: u64,
    /// TSC frequency in kHz; 0 when the TSC tells no host time.
    pub tsc_khz: u64,
}

impl VcpuInfo {
    pub fn from_results([index, flags, count, tsc_khz]: [u64; RESULTS]) -> Self {
        VcpuInfo {
            index,
            flags,
            count,
            tsc_khz,
        }
    }

    /// The vCPU's host thread runs with a real-time policy.
    pub fn is_realtime(&self) -> bool {
        self.flags & vcpu_info::REALTIME != 0
    }

    /// Waits on this vCPU use a timer advance.
    pub fn has_timer_advance(&self) -> bool {
        self.flags & vcpu_info::TIMER_ADVANCE != 0
    }
}

/// Whether a vCPU's waits ask the host to return early and spin the rest:
/// only worth it when the host runs a timer advance there, and only safe
/// when the guest reads host time from its TSC (else the spin could end
/// before the deadline).
pub fn early_return(timer_advance: bool, tsc_clock: bool) -> bool {
    timer_advance && tsc_clock
}

/// How a wait went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Woke {
    /// The deadline (host ns).
    pub deadline: u64,
    /// Host time when control came back to the caller (after the spin, if
    /// any), measured guest-side where the TSC tells host time, else the
    /// host's own; never before `deadline`.
    pub returned: u64,
    /// Whether the host handed control back early and the guest spun the rest.
    pub early_return: bool,
    /// The host's timer advance for this vCPU (ns).
    pub advance_ns: u64,
}

impl Woke {
    /// How late the caller got control back (ns).
    pub fn late_ns(&self) -> u64 {
        self.returned.saturating_sub(self.deadline)
    }
}

/// The result of [`Vmrpc::wait_next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitNext {
    pub woke: Woke,
    /// Deadlines that had passed before the wait began.
    pub missed: u64,
}

/// What a client keeps per vCPU between two waits: when the previous
/// early-return wait got control back, in signed ns after its deadline,
/// told to the host with the next wait so it tunes its timer advance by
/// what the guest actually saw (VM re-entry included).
pub type Feedback = Option<i64>;

/// A guest's VMRPC client on the vCPU it runs on. A transport implements
/// the required methods; the protocol is in the provided ones.
pub trait Vmrpc {
    type Error: From<Refused>;

    /// Delivers one call and returns its results (see [`answer`]).
    fn call(
        &mut self,
        call: Call,
        flags: u32,
        args: [u64; ARGS],
    ) -> Result<[u64; RESULTS], Self::Error>;

    /// Host time from the TSC, without an exit; `None` where the TSC tells
    /// no host time.
    fn tsc_now(&mut self) -> Option<u64>;

    /// Whether waits on this vCPU run a timer advance in the host.
    fn timer_advance(&mut self) -> Result<bool, Self::Error>;

    /// This vCPU's [`Feedback`].
    fn feedback(&mut self) -> &mut Feedback;

    /// The host echoes `x`.
    fn ping(&mut self, x: u64) -> Result<u64, Self::Error> {
        Ok(self.call(Call::Ping, 0, [x, 0, 0, 0, 0, 0])?[0])
    }

    /// Host `CLOCK_MONOTONIC` in ns, read by the host (one exit).
    fn clock(&mut self) -> Result<u64, Self::Error> {
        Ok(self.call(Call::Clock, 0, [0; ARGS])?[0])
    }

    /// What the host says about this vCPU.
    fn vcpu_info(&mut self) -> Result<VcpuInfo, Self::Error> {
        Ok(VcpuInfo::from_results(self.call(
            Call::VcpuInfo,
            0,
            [0; ARGS],
        )?))
    }

    /// Host time now: from the TSC without an exit where it tells host
    /// time, else by a `Clock` call.
    fn host_now(&mut self) -> Result<u64, Self::Error> {
        match self.tsc_now() {
            Some(now) => Ok(now),
            None => self.clock(),
        }
    }

    /// Whether this vCPU's waits return early (see [`early_return`]).
    fn returns_early(&mut self) -> Result<bool, Self::Error> {
        let tsc_clock = self.tsc_now().is_some();
        Ok(early_return(self.timer_advance()?, tsc_clock))
    }

    /// Starts this vCPU's periodic timer; returns the first deadline.
    fn periodic(&mut self, period_ns: u64, first_deadline: u64) -> Result<u64, Self::Error> {
        Ok(self.call(Call::Periodic, 0, [period_ns, first_deadline, 0, 0, 0, 0])?[0])
    }

    /// Waits until host time `deadline`, parked in the host (a long poll).
    /// Never returns before the deadline.
    fn sleep_until(&mut self, deadline: u64) -> Result<Woke, Self::Error> {
        let early = self.returns_early()?;
        let (flags, feedback) = wait_flags(early, *self.feedback());
        let results = self.call(Call::SleepUntil, flags, [deadline, feedback, 0, 0, 0, 0])?;
        self.finish_wait(deadline, early, results[1], results[2])
    }

    /// Waits `ns` from now, as [`Vmrpc::sleep_until`].
    fn sleep(&mut self, ns: u64) -> Result<Woke, Self::Error> {
        let deadline = self.host_now()?.saturating_add(ns);
        self.sleep_until(deadline)
    }

    /// Waits for the next deadline of the periodic timer. Never returns
    /// before it.
    fn wait_next(&mut self) -> Result<WaitNext, Self::Error> {
        let early = self.returns_early()?;
        let (flags, feedback) = wait_flags(early, *self.feedback());
        let [deadline, host_late, missed, advance] =
            self.call(Call::WaitNext, flags, [feedback, 0, 0, 0, 0, 0])?;
        let returned = deadline.saturating_add(host_late);
        Ok(WaitNext {
            woke: self.finish_wait(deadline, early, returned, advance)?,
            missed,
        })
    }

    /// After the host answered a wait for `deadline` (handing back at host
    /// time `host_returned`): where the TSC tells host time, the arrival is
    /// measured guest-side (VM re-entry included), kept as feedback after an
    /// early return, and the rest of the way to the deadline spun at CPL3
    /// (native, no exits). Elsewhere the host never returns early, and its
    /// own time stands.
    fn finish_wait(
        &mut self,
        deadline: u64,
        early: bool,
        host_returned: u64,
        advance_ns: u64,
    ) -> Result<Woke, Self::Error> {
        let Some(arrival) = self.tsc_now() else {
            return Ok(Woke {
                deadline,
                returned: host_returned.max(deadline),
                early_return: false,
                advance_ns,
            });
        };
        if early {
            *self.feedback() = Some(arrival.wrapping_sub(deadline) as i64);
        }
        let mut now = arrival;
        while now < deadline {
            core::hint::spin_loop();
            now = self.tsc_now().unwrap_or(deadline);
        }
        Ok(Woke {
            deadline,
            returned: now,
            early_return: early,
            advance_ns,
        })
    }
}

/// The flags and feedback argument of a wait.
fn wait_flags(early: bool, feedback: Feedback) -> (u32, u64) {
    match (early, feedback) {
        (false, _) => (0, 0),
        (true, None) => (flags::EARLY_RETURN, 0),
        (true, Some(arrival)) => (flags::EARLY_RETURN | flags::FEEDBACK, arrival as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host in a test: answers waits at a scripted time, its clock moved
    /// by the calls themselves.
    struct Scripted {
        now: u64,
        advance: u64,
        tsc_clock: bool,
        feedback: Feedback,
        seen_flags: u32,
        seen_feedback: u64,
    }

    impl Vmrpc for Scripted {
        type Error = Refused;

        fn call(&mut self, call: Call, fl: u32, args: [u64; ARGS]) -> Result<[u64; 4], Refused> {
            self.seen_flags = fl;
            match call {
                Call::SleepUntil => {
                    self.seen_feedback = args[1];
                    let deadline = args[0];
                    // Early return hands back `advance` before the deadline.
                    let back = if fl & flags::EARLY_RETURN != 0 {
                        deadline - self.advance
                    } else {
                        deadline + 7
                    };
                    self.now = self.now.max(back);
                    Ok([deadline, back, self.advance, 0])
                }
                Call::Ping => Ok([args[0], 0, 0, 0]),
                _ => Err(Status::UnsupportedCall.into()),
            }
        }
        fn tsc_now(&mut self) -> Option<u64> {
            // Every look at the clock moves it on a little.
            self.now += 3;
            self.tsc_clock.then_some(self.now)
        }
        fn timer_advance(&mut self) -> Result<bool, Refused> {
            Ok(self.advance > 0)
        }
        fn feedback(&mut self) -> &mut Feedback {
            &mut self.feedback
        }
    }

    fn host(advance: u64, tsc_clock: bool) -> Scripted {
        Scripted {
            now: 0,
            advance,
            tsc_clock,
            feedback: None,
            seen_flags: 0,
            seen_feedback: 0,
        }
    }

    #[test]
    fn an_early_return_is_spun_to_the_deadline_and_reported_with_the_next_wait() {
        let mut h = host(100, true);
        let woke = h.sleep_until(1_000).unwrap();
        assert!(woke.early_return);
        assert_eq!(h.seen_flags, flags::EARLY_RETURN, "no feedback yet");
        assert!(woke.returned >= 1_000, "never before the deadline");
        // Control came back at 900 (+3 for the look at the clock).
        assert_eq!(h.feedback, Some(-97));
        h.sleep_until(2_000).unwrap();
        assert_eq!(h.seen_flags, flags::EARLY_RETURN | flags::FEEDBACK);
        assert_eq!(h.seen_feedback as i64, -97);
    }

    #[test]
    fn without_a_tsc_clock_or_an_advance_the_host_waits_it_all() {
        for (advance, tsc_clock) in [(100, false), (0, true), (0, false)] {
            let mut h = host(advance, tsc_clock);
            let woke = h.sleep_until(1_000).unwrap();
            assert_eq!(h.seen_flags, 0);
            assert!(!woke.early_return);
            assert!(woke.returned >= 1_000);
            assert_eq!(h.feedback, None);
        }
        let mut h = host(0, false);
        assert_eq!(
            h.sleep_until(1_000).unwrap().returned,
            1_007,
            "the host's time"
        );
    }

    #[test]
    fn answers_read_as_results_or_refusals() {
        assert_eq!(answer(0, [1, 2, 3, 4]), Ok([1, 2, 3, 4]));
        let bad = answer(Status::BadArgument as u32, [0; 4]).unwrap_err();
        assert_eq!(bad.status(), Some(Status::BadArgument));
        let none = answer(UNANSWERED, [0; 4]).unwrap_err();
        assert!(none.unanswered() && none.status().is_none());
        assert_eq!(answer(999, [0; 4]).unwrap_err().status(), None);
        assert_eq!(host(0, false).ping(5), Ok(5));
        assert_eq!(
            host(0, false).clock(),
            Err(Refused(Status::UnsupportedCall as u32))
        );
    }
}
