//! The pure decisions of the preload library, kept apart so they can be
//! tested without a VM.

use libc::{c_int, clockid_t, timespec};

/// Longest stretch of one sleep that is long-polled. A longer sleep first
/// sleeps the ordinary (interruptible) way until this long before its
/// deadline: while a vCPU long-polls, its guest CPU takes no interrupt,
/// signal or IPI, so the stretch is kept short.
pub const LONG_POLL_MAX_NS: u64 = 10_000_000;

const NS_PER_SEC: u64 = 1_000_000_000;

/// The guest clock a long-polled sleep is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollClock {
    Monotonic,
    Realtime,
}

/// What to do with a sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Call the C library's function with the original arguments.
    Fallthrough,
    /// Long-poll it: on `clock`, with an absolute (`TIMER_ABSTIME`) or a
    /// relative request.
    LongPoll { clock: PollClock, absolute: bool },
}

/// Whether a sleep on `clock` with `flags` is long-polled, given whether
/// the client is set up and whether the calling thread runs on a real-time
/// vCPU.
pub fn route(clock: clockid_t, flags: c_int, initialised: bool, on_rt_vcpu: bool) -> Route {
    let clock = match clock {
        libc::CLOCK_MONOTONIC => PollClock::Monotonic,
        libc::CLOCK_REALTIME => PollClock::Realtime,
        _ => return Route::Fallthrough,
    };
    if flags & !libc::TIMER_ABSTIME != 0 || !initialised || !on_rt_vcpu {
        return Route::Fallthrough;
    }
    Route::LongPoll {
        clock,
        absolute: flags & libc::TIMER_ABSTIME != 0,
    }
}

/// A request's time in ns, or `None` where the kernel answers `EINVAL`
/// (`tv_nsec` outside `0..1e9`, negative `tv_sec`). Saturates far beyond
/// any real deadline.
pub fn timespec_ns(ts: &timespec) -> Option<u64> {
    if ts.tv_sec < 0 || !(0..NS_PER_SEC as i64).contains(&ts.tv_nsec) {
        return None;
    }
    Some(
        (ts.tv_sec as u64)
            .saturating_mul(NS_PER_SEC)
            .saturating_add(ts.tv_nsec as u64),
    )
}

/// The timespec of `ns`.
pub fn ns_to_timespec(ns: u64) -> timespec {
    timespec {
        tv_sec: (ns / NS_PER_SEC) as libc::time_t,
        tv_nsec: (ns % NS_PER_SEC) as libc::c_long,
    }
}

/// For a sleep until `deadline` on a clock that reads `now`: the time to
/// sleep the ordinary way until before long-polling the last `cap` ns, or
/// `None` to long-poll all of it.
pub fn plan_real_sleep(deadline: u64, now: u64, cap: u64) -> Option<u64> {
    (deadline.saturating_sub(now) > cap).then(|| deadline - cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::{
        CLOCK_BOOTTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_REALTIME, TIMER_ABSTIME,
    };

    #[test]
    fn the_fallthrough_decision_table() {
        use PollClock::*;
        let poll = |clock, absolute| Route::LongPoll { clock, absolute };
        #[rustfmt::skip]
        let table = [
            // clock, flags, initialised, on RT vCPU => route
            (CLOCK_MONOTONIC, 0, true, true, poll(Monotonic, false)),
            (CLOCK_MONOTONIC, TIMER_ABSTIME, true, true, poll(Monotonic, true)),
            (CLOCK_REALTIME, 0, true, true, poll(Realtime, false)),
            (CLOCK_REALTIME, TIMER_ABSTIME, true, true, poll(Realtime, true)),
            // Not on an RT vCPU, or not set up: the C library.
            (CLOCK_MONOTONIC, 0, true, false, Route::Fallthrough),
            (CLOCK_MONOTONIC, TIMER_ABSTIME, false, true, Route::Fallthrough),
            (CLOCK_REALTIME, 0, false, false, Route::Fallthrough),
            // Other clocks always fall through.
            (CLOCK_BOOTTIME, 0, true, true, Route::Fallthrough),
            (CLOCK_PROCESS_CPUTIME_ID, TIMER_ABSTIME, true, true, Route::Fallthrough),
            (12345, 0, true, true, Route::Fallthrough),
            // Unknown flag bits: the C library decides.
            (CLOCK_MONOTONIC, 2, true, true, Route::Fallthrough),
            (CLOCK_MONOTONIC, TIMER_ABSTIME | 4, true, true, Route::Fallthrough),
        ];
        for (clock, flags, init, rt, want) in table {
            assert_eq!(
                route(clock, flags, init, rt),
                want,
                "clock {clock} flags {flags} initialised {init} rt {rt}"
            );
        }
    }

    #[test]
    fn bad_timespecs_are_einval_like_the_kernel() {
        let ts = |s, n| timespec {
            tv_sec: s,
            tv_nsec: n,
        };
        assert_eq!(timespec_ns(&ts(0, 0)), Some(0));
        assert_eq!(timespec_ns(&ts(2, 999_999_999)), Some(2_999_999_999));
        assert_eq!(timespec_ns(&ts(0, 1_000_000_000)), None);
        assert_eq!(timespec_ns(&ts(0, -1)), None);
        assert_eq!(timespec_ns(&ts(-1, 0)), None);
        assert_eq!(timespec_ns(&ts(libc::time_t::MAX, 0)), Some(u64::MAX));
        let back = ns_to_timespec(3_000_000_007);
        assert_eq!((back.tv_sec, back.tv_nsec), (3, 7));
    }

    #[test]
    fn long_sleeps_long_poll_only_their_end() {
        let cap = LONG_POLL_MAX_NS;
        assert_eq!(
            plan_real_sleep(1_000 + cap, 1_000, cap),
            None,
            "exactly the cap"
        );
        assert_eq!(plan_real_sleep(2_000 + cap, 1_000, cap), Some(2_000));
        assert_eq!(plan_real_sleep(500, 1_000, cap), None, "already past");
        assert_eq!(plan_real_sleep(u64::MAX, 0, cap), Some(u64::MAX - cap));
    }
}
