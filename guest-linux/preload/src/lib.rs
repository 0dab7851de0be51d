//! `librtvm_preload.so`: long-polling sleeps for unmodified programs.
//!
//! ```text
//! LD_PRELOAD=/usr/lib/librtvm_preload.so cyclictest -a 1 -t 1 -p 90 -i 1000 -m
//! ```
//!
//! Exports `nanosleep`, `clock_nanosleep` and `usleep`. When the calling
//! thread runs on a real-time vCPU (by `sched_getcpu` and the region
//! header's bitmap) and the VMRPC client could be set up (lazily, once per
//! process: root, `rtvm.vmrpc=` on the kernel command line, `/dev/mem`), a
//! sleep becomes a VMRPC `SleepUntil` long poll: the vCPU waits parked in
//! the host, with the host's timer advance and a final spin, instead of
//! through the guest's own timer interrupt. Everything else — other clocks,
//! non-RT vCPUs, a failed set-up (then for the rest of the process), any
//! error on the way — goes to the C library's own function
//! (`dlsym(RTLD_NEXT, …)`).
//!
//! # Semantics kept
//!
//! - Relative sleeps and `TIMER_ABSTIME` on `CLOCK_MONOTONIC` and
//!   `CLOCK_REALTIME`; other clocks, and flag bits other than
//!   `TIMER_ABSTIME`, go to the C library.
//! - `EINVAL` for a `tv_nsec` outside `0..1e9` or a negative `tv_sec`;
//!   `clock_nanosleep` returns the error number, `nanosleep` and `usleep`
//!   return -1 and set `errno`.
//! - A completed relative sleep zeroes `*rem` (if given).
//!
//! # Limitations
//!
//! - **Signals do not interrupt a long-polled sleep**: the vCPU is parked in
//!   the host and the guest kernel cannot deliver a signal until the wait
//!   ends, so that part never returns `EINTR`; a pending signal is handled
//!   when the sleep returns. To bound this (and how long the guest CPU
//!   answers no interrupts, IPIs included), a sleep longer than
//!   [`decision::LONG_POLL_MAX_NS`] first sleeps the ordinary, interruptible
//!   way until that much before its deadline, and long-polls only the rest.
//! - The thread must be pinned to its CPU (a migrating thread falls back to
//!   the C library when it is caught, but see `rtvm_guest_linux`).
//! - The calling thread needs the doorbell port: the library asks for it
//!   (`ioperm`) in each thread on its first long poll; the process must run
//!   as root.
//! - Set `RTVM_PRELOAD=off` to disable the library, `RTVM_PRELOAD_DEBUG=1`
//!   to have it say on stderr why it falls through for good, and why a sleep
//!   it took went the ordinary way.

pub mod decision;
pub mod net;

use std::ffi::CStr;
use std::sync::{Mutex, OnceLock};

use decision::{plan_real_sleep, route, timespec_ns, PollClock, Route, LONG_POLL_MAX_NS};
use libc::{c_int, c_uint, clockid_t, timespec};
use rtvm_guest_linux::{guest_clock_ns, Client, GuestDeadline, PortIo, SlotCalls};

/// The process-wide VMRPC state: one client per vCPU over one mapping,
/// each call through a call slot of its own (other processes sleep on the
/// same vCPUs).
struct State {
    port: &'static PortIo,
    clients: Vec<Mutex<Client<SlotCalls<'static>>>>,
}

static STATE: OnceLock<Option<State>> = OnceLock::new();

/// The region, mapped once per process for sleeps and sockets alike.
fn port() -> Result<&'static PortIo, String> {
    static PORT: OnceLock<Result<&'static PortIo, String>> = OnceLock::new();
    PORT.get_or_init(|| {
        if std::env::var_os("RTVM_PRELOAD").is_some_and(|v| v == "off" || v == "0") {
            return Err("disabled by RTVM_PRELOAD".into());
        }
        let port = PortIo::open().map_err(|e| e.to_string())?;
        Ok(&*Box::leak(Box::new(port)))
    })
    .clone()
}

fn init() -> Result<State, String> {
    let port = port()?;
    let clients = (0..port.vcpu_count())
        .map(|_| Mutex::new(Client::new(SlotCalls(port))))
        .collect();
    Ok(State { port, clients })
}

fn state() -> Option<&'static State> {
    STATE
        .get_or_init(|| match init() {
            Ok(s) => Some(s),
            Err(why) => {
                debug(&format!("sleeping the ordinary way: {why}"));
                None
            }
        })
        .as_ref()
}

/// A line on stderr under `RTVM_PRELOAD_DEBUG=1`: why a sleep was not
/// long-polled.
fn debug(what: &str) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("RTVM_PRELOAD_DEBUG").is_some_and(|v| v != "0")) {
        eprintln!("librtvm_preload: {what}");
    }
}

/// The C library's own function `name`.
fn real<F: Copy>(cache: &OnceLock<usize>, name: &CStr) -> Option<F> {
    let addr = *cache.get_or_init(|| {
        // SAFETY: a NUL-terminated name; RTLD_NEXT looks past this library.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    });
    if addr == 0 {
        return None;
    }
    // SAFETY: F is the function pointer type of `name`, as the callers
    // declare it; a function pointer has the size of a usize.
    Some(unsafe { std::mem::transmute_copy::<usize, F>(&addr) })
}

type ClockNanosleep =
    unsafe extern "C" fn(clockid_t, c_int, *const timespec, *mut timespec) -> c_int;
type Nanosleep = unsafe extern "C" fn(*const timespec, *mut timespec) -> c_int;
type Usleep = unsafe extern "C" fn(c_uint) -> c_int;

/// The C library's `clock_nanosleep` (or the system call itself).
unsafe fn real_clock_nanosleep(
    clock: clockid_t,
    flags: c_int,
    req: *const timespec,
    rem: *mut timespec,
) -> c_int {
    static REAL: OnceLock<usize> = OnceLock::new();
    match real::<ClockNanosleep>(&REAL, c"clock_nanosleep") {
        Some(f) => f(clock, flags, req, rem),
        None => {
            let rc = libc::syscall(libc::SYS_clock_nanosleep, clock, flags, req, rem);
            if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            }
        }
    }
}

unsafe fn real_nanosleep(req: *const timespec, rem: *mut timespec) -> c_int {
    static REAL: OnceLock<usize> = OnceLock::new();
    match real::<Nanosleep>(&REAL, c"nanosleep") {
        Some(f) => f(req, rem),
        None => libc::syscall(libc::SYS_nanosleep, req, rem) as c_int,
    }
}

unsafe fn real_usleep(us: c_uint) -> c_int {
    static REAL: OnceLock<usize> = OnceLock::new();
    match real::<Usleep>(&REAL, c"usleep") {
        Some(f) => f(us),
        None => {
            let ts = decision::ns_to_timespec(u64::from(us) * 1_000);
            real_nanosleep(&ts, std::ptr::null_mut())
        }
    }
}

/// Sleeps until guest `clock` reads `deadline` the ordinary way (absolute,
/// so no time is lost to what went before); on `EINTR` of a relative
/// request, stores the time left in `rem`. Returns 0 or an error number.
unsafe fn finish_real(
    clock: clockid_t,
    deadline: u64,
    relative: bool,
    rem: *mut timespec,
) -> c_int {
    let ts = decision::ns_to_timespec(deadline);
    let rc = real_clock_nanosleep(clock, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut());
    if rc == libc::EINTR && relative && !rem.is_null() {
        *rem = decision::ns_to_timespec(deadline.saturating_sub(guest_clock_ns(clock)));
    } else if rc == 0 && relative && !rem.is_null() {
        *rem = decision::ns_to_timespec(0);
    }
    rc
}

/// Serves a sleep by long polling if it should be; `None`: not ours, call
/// the C library with the original arguments. `Some(0 or errno)` otherwise.
unsafe fn long_poll_sleep(
    clock: clockid_t,
    flags: c_int,
    req: *const timespec,
    rem: *mut timespec,
) -> Option<c_int> {
    if req.is_null() {
        return None;
    }
    // Decide on the clock and flags first: no set-up for sleeps never ours.
    if route(clock, flags, true, true) == Route::Fallthrough {
        return None;
    }
    let state = state();
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = u32::try_from(unsafe { libc::sched_getcpu() }).ok();
    let on_rt = match (state, cpu) {
        (Some(s), Some(cpu)) => s.port.is_rt_cpu(cpu),
        _ => false,
    };
    let Route::LongPoll {
        clock: on,
        absolute,
    } = route(clock, flags, state.is_some(), on_rt)
    else {
        return None;
    };
    let (state, cpu) = (state?, cpu?);
    let Some(ns) = timespec_ns(&*req) else {
        return Some(libc::EINVAL);
    };
    // Relative sleeps run on CLOCK_MONOTONIC whatever clock they name: a
    // duration does not depend on it.
    let guest_clock = match on {
        PollClock::Realtime if absolute => libc::CLOCK_REALTIME,
        _ => libc::CLOCK_MONOTONIC,
    };
    let relative = !absolute;
    let now = guest_clock_ns(guest_clock);
    let deadline = if absolute { ns } else { now.saturating_add(ns) };

    if let Some(until) = plan_real_sleep(deadline, now, LONG_POLL_MAX_NS) {
        let ts = decision::ns_to_timespec(until);
        let rc = real_clock_nanosleep(guest_clock, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut());
        if rc == libc::EINTR {
            if relative && !rem.is_null() {
                *rem =
                    decision::ns_to_timespec(deadline.saturating_sub(guest_clock_ns(guest_clock)));
            }
            return Some(libc::EINTR);
        }
        if rc != 0 {
            return Some(finish_real(guest_clock, deadline, relative, rem));
        }
    }

    // Never panic across the C boundary: a panic here means "sleep the
    // ordinary way".
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A busy client means this thread interrupted a sleep on the same
        // vCPU (a signal handler) or another thread is mid-call on it.
        let Ok(mut client) = state.clients.get(cpu as usize)?.try_lock() else {
            debug("this vCPU's client is busy: this sleep goes the ordinary way");
            return None;
        };
        let target = match guest_clock {
            libc::CLOCK_REALTIME => GuestDeadline::Realtime(deadline),
            _ => GuestDeadline::Monotonic(deadline),
        };
        client
            .sleep_until_guest(target)
            .map_err(|e| {
                debug(&format!(
                    "long poll failed ({e}): this sleep goes the ordinary way"
                ))
            })
            .ok()
    }));
    match polled {
        // Never early by the guest's own clock: the host deadline was only
        // as good as the two clocks' agreement, so a sleep that the guest
        // clock says is not over yet sleeps the rest the ordinary way.
        Ok(Some(_)) if guest_clock_ns(guest_clock) >= deadline => {
            if relative && !rem.is_null() {
                *rem = decision::ns_to_timespec(0);
            }
            Some(0)
        }
        Err(_) => {
            debug("a long poll panicked: this sleep goes the ordinary way");
            Some(finish_real(guest_clock, deadline, relative, rem))
        }
        _ => Some(finish_real(guest_clock, deadline, relative, rem)),
    }
}

fn set_errno(e: c_int) {
    // SAFETY: errno is thread-local and always writable.
    unsafe { *libc::__errno_location() = e };
}

/// `clock_nanosleep(3)`, long-polled on real-time vCPUs.
///
/// # Safety
/// As for the C function: `req` must point to a valid `timespec` (or be
/// null, which the C library answers), `rem` be null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn clock_nanosleep(
    clock: clockid_t,
    flags: c_int,
    req: *const timespec,
    rem: *mut timespec,
) -> c_int {
    match long_poll_sleep(clock, flags, req, rem) {
        Some(rc) => rc,
        None => real_clock_nanosleep(clock, flags, req, rem),
    }
}

/// `nanosleep(2)`, long-polled on real-time vCPUs.
///
/// # Safety
/// As for the C function.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nanosleep(req: *const timespec, rem: *mut timespec) -> c_int {
    match long_poll_sleep(libc::CLOCK_MONOTONIC, 0, req, rem) {
        Some(0) => 0,
        Some(e) => {
            set_errno(e);
            -1
        }
        None => real_nanosleep(req, rem),
    }
}

/// `usleep(3)`, long-polled on real-time vCPUs.
///
/// # Safety
/// As for the C function (none beyond it).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn usleep(us: c_uint) -> c_int {
    let ts = decision::ns_to_timespec(u64::from(us) * 1_000);
    match long_poll_sleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) {
        Some(0) => 0,
        Some(e) => {
            set_errno(e);
            -1
        }
        None => real_usleep(us),
    }
}
