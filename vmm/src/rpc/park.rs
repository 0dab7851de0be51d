//! Parking a vCPU in a long poll: its thread waits in the host for a
//! deadline and/or host file descriptors, and still answers the VMM.
//!
//! A parked vCPU thread blocks in `ppoll` on the call's descriptors (if
//! any), its timerfd armed with the absolute deadline (CLOCK_MONOTONIC,
//! TFD_TIMER_ABSTIME, so no relative-time arithmetic adds error) and its
//! wake eventfd, which the VMM writes with every request (pause, stop). An
//! eventfd stays readable until drained, so a request that races with the
//! thread going to sleep is never lost, which a signal alone could not
//! give. Every pass looks at the wake eventfd first, so descriptors that
//! keep reporting ready can never hide a stop. A pause is served inside the
//! wait, which then goes on; a stop cuts it short ([`Interrupted`]).
//!
//! One error policy: `EINTR` (the kick signal) retries; any other failure
//! of the host's wait ends the wait as cut short, with a log line, so a
//! guest call never spins on a broken wait.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

use crate::clock::now_ns;
use crate::error::Error;

/// A deadline meaning "none": wait for the descriptors alone.
pub const NO_DEADLINE: u64 = u64::MAX;

/// How a park ended, when it was not cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parked {
    /// At least one descriptor is ready (their `revents` say which). Also
    /// reported when the deadline has passed too: what is ready counts.
    Ready,
    /// The deadline passed with no descriptor ready.
    Deadline,
}

/// A park cut short by the VMM: the vCPU must stop. The call answers
/// `Status::Interrupted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted;

impl From<Interrupted> for rtvm_abi::vmrpc::Status {
    fn from(_: Interrupted) -> Self {
        rtvm_abi::vmrpc::Status::Interrupted
    }
}

/// How a call parks its vCPU. The vCPU thread's is [`VcpuPark`]; tests
/// substitute their own.
pub trait Park {
    /// Parks until one of `fds` is ready (`revents` filled in), `deadline`
    /// (host ns; [`NO_DEADLINE`]: none) passes, or the VMM stops the vCPU.
    fn park(&mut self, fds: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted>;

    /// Parks until `deadline`.
    fn park_until(&mut self, deadline: u64) -> Result<(), Interrupted> {
        self.park(&mut [], deadline).map(drop)
    }
}

/// A park that counts how often the call it serves parked.
pub struct CountedPark<'a> {
    inner: &'a mut dyn Park,
    pub parks: u64,
}

impl<'a> CountedPark<'a> {
    pub fn new(inner: &'a mut dyn Park) -> Self {
        CountedPark { inner, parks: 0 }
    }
}

impl Park for CountedPark<'_> {
    fn park(&mut self, fds: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted> {
        self.parks += 1;
        self.inner.park(fds, deadline)
    }
}

/// What a parked vCPU answers to: the VMM's requests (see `vcpu`).
pub trait Requests {
    /// Written by the VMM with every request.
    fn wake(&self) -> &EventFd;
    /// Honours the request the VMM made: returns at once to run on, blocks
    /// while paused; false when the vCPU must stop.
    fn obey(&self) -> bool;
    /// The vCPU is parked (true) or runs again (false), for its observers.
    fn set_parked(&self, parked: bool);
}

/// A vCPU thread's timer for its parks, made once per thread.
pub struct Parker {
    timer: OwnedFd,
}

/// Why one host wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Woken {
    Ready,
    Deadline,
    /// The VMM wrote the wake eventfd.
    Kicked,
}

impl Parker {
    pub fn new() -> crate::error::Result<Self> {
        // SAFETY: plain syscall with constant arguments; the result is
        // checked before it is used as a descriptor.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(Error::Host {
                what: "creating a timerfd".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Parker { timer })
    }

    /// The park of a vCPU thread that answers to `requests`.
    pub fn park_for<'a, R: Requests>(&'a self, requests: &'a R) -> VcpuPark<'a, R> {
        VcpuPark {
            parker: self,
            requests,
        }
    }

    /// One host wait: until one of `fds` is ready, `deadline` passes or
    /// `wake` is written, whichever is seen first (`wake` before all).
    fn wait(
        &self,
        fds: &mut [libc::pollfd],
        deadline: u64,
        wake: &EventFd,
    ) -> std::io::Result<Woken> {
        let timed = deadline != NO_DEADLINE;
        if timed {
            self.arm(deadline)?;
        }
        let mut all: Vec<libc::pollfd> = fds.to_vec();
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        all.push(pollfd(self.timer.as_raw_fd()));
        all.push(pollfd(wake.as_raw_fd()));
        let (n, timer, wake_at) = (fds.len(), fds.len(), fds.len() + 1);
        let outcome = loop {
            all.iter_mut().for_each(|p| p.revents = 0);
            // A deadline already past: look without blocking, so what is
            // ready right now still counts.
            let passed = timed && now_ns() >= deadline;
            if let Err(e) = ppoll(&mut all, passed.then_some(0)) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break Err(e);
            }
            if all[wake_at].revents != 0 {
                break Ok(Woken::Kicked);
            }
            if all[..n].iter().any(|p| p.revents != 0) {
                break Ok(Woken::Ready);
            }
            if passed || all[timer].revents != 0 {
                break Ok(Woken::Deadline);
            }
        };
        if timed {
            self.disarm();
        }
        for (out, p) in fds.iter_mut().zip(&all) {
            out.revents = p.revents;
        }
        outcome
    }

    /// Arms the timerfd to fire at host CLOCK_MONOTONIC `deadline_ns`.
    fn arm(&self, deadline_ns: u64) -> std::io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: our timerfd and a live itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Disarms the timer and drains an expiry, so the next wait starts clean.
    fn disarm(&self) {
        // SAFETY: itimerspec is plain integers, for which all zeros is valid.
        let zero: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: our timerfd and a live itimerspec.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &zero, std::ptr::null_mut()) };
        let mut expirations = 0u64;
        // SAFETY: a non-blocking read of 8 bytes into a live u64 from our
        // timerfd; EAGAIN (nothing fired) is fine.
        unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                (&mut expirations as *mut u64).cast(),
                8,
            )
        };
    }
}

/// How a vCPU thread parks: on its [`Parker`], answering its [`Requests`].
pub struct VcpuPark<'a, R> {
    parker: &'a Parker,
    requests: &'a R,
}

impl<R: Requests> Park for VcpuPark<'_, R> {
    fn park(&mut self, fds: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted> {
        self.requests.set_parked(true);
        let outcome = loop {
            match self.parker.wait(fds, deadline, self.requests.wake()) {
                Ok(Woken::Ready) => break Ok(Parked::Ready),
                Ok(Woken::Deadline) => break Ok(Parked::Deadline),
                Ok(Woken::Kicked) => {
                    // Drained before obeying: a request made after this
                    // writes it again.
                    let _ = self.requests.wake().read();
                    if !self.requests.obey() {
                        break Err(Interrupted);
                    }
                    self.requests.set_parked(true);
                }
                Err(e) => {
                    tracing::warn!("a vCPU's long poll failed in the host ({e}): cut short");
                    break Err(Interrupted);
                }
            }
        };
        self.requests.set_parked(false);
        outcome
    }
}

/// `ppoll` on `fds` for at most `timeout` ns (`None`: no limit), with no
/// signal mask change; how many descriptors are ready.
fn ppoll(fds: &mut [libc::pollfd], timeout: Option<u64>) -> std::io::Result<usize> {
    let spec = timeout.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let spec: *const libc::timespec = spec.as_ref().map_or(std::ptr::null(), |s| s);
    // SAFETY: `fds` is a live pollfd slice of the given length and `spec`
    // null or a live timespec, for the whole call.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            spec,
            std::ptr::null(),
        )
    };
    usize::try_from(rc).map_err(|_| std::io::Error::last_os_error())
}

/// A park with no VMM to answer to (tests, in-process servers): it waits
/// on the descriptors and the deadline alone, and is never cut short.
pub struct Unattended;

impl Park for Unattended {
    fn park(&mut self, fds: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted> {
        loop {
            let timeout = (deadline != NO_DEADLINE).then(|| deadline.saturating_sub(now_ns()));
            match ppoll(fds, timeout) {
                Ok(0) => {}
                Ok(_) => return Ok(Parked::Ready),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return Err(Interrupted),
            }
            if now_ns() >= deadline {
                return Ok(Parked::Deadline);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Requests that ask for a stop after `runs` wake-ups answered "run on".
    struct Scripted {
        wake: EventFd,
        runs: Cell<u32>,
        parked: Cell<u32>,
    }

    impl Scripted {
        fn new(runs: u32) -> Self {
            Scripted {
                wake: EventFd::new(EFD_NONBLOCK).unwrap(),
                runs: Cell::new(runs),
                parked: Cell::new(0),
            }
        }
    }

    impl Requests for Scripted {
        fn wake(&self) -> &EventFd {
            &self.wake
        }
        fn obey(&self) -> bool {
            let left = self.runs.get();
            self.runs.set(left.saturating_sub(1));
            left > 0
        }
        fn set_parked(&self, parked: bool) {
            if parked {
                self.parked.set(self.parked.get() + 1);
            }
        }
    }

    fn readable() -> (EventFd, libc::pollfd) {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        fd.write(1).unwrap();
        let p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        (fd, p)
    }

    #[test]
    fn waits_until_the_deadline_and_never_before() {
        let parker = Parker::new().unwrap();
        let requests = Scripted::new(0);
        let mut park = parker.park_for(&requests);
        for _ in 0..5 {
            let deadline = now_ns() + 2_000_000;
            assert_eq!(park.park(&mut [], deadline), Ok(Parked::Deadline));
            assert!(now_ns() >= deadline);
        }
        assert_eq!(
            park.park_until(0),
            Ok(()),
            "a past deadline returns at once"
        );
    }

    #[test]
    fn a_stop_written_before_the_park_is_not_lost() {
        let parker = Parker::new().unwrap();
        let requests = Scripted::new(0);
        requests.wake.write(1).unwrap();
        let mut park = parker.park_for(&requests);
        assert_eq!(park.park(&mut [], NO_DEADLINE), Err(Interrupted));
    }

    #[test]
    fn a_request_to_run_on_resumes_the_park() {
        let parker = Parker::new().unwrap();
        let requests = Scripted::new(1);
        requests.wake.write(1).unwrap();
        let mut park = parker.park_for(&requests);
        let deadline = now_ns() + 1_000_000;
        assert_eq!(park.park(&mut [], deadline), Ok(Parked::Deadline));
        assert!(now_ns() >= deadline);
        assert_eq!(requests.parked.get(), 2, "parked again after obeying");
    }

    #[test]
    fn a_ready_descriptor_ends_the_park_even_past_its_deadline() {
        let parker = Parker::new().unwrap();
        let requests = Scripted::new(0);
        let mut park = parker.park_for(&requests);
        let (_fd, p) = readable();
        let mut fds = [p];
        assert_eq!(park.park(&mut fds, NO_DEADLINE), Ok(Parked::Ready));
        assert_ne!(fds[0].revents, 0);
        assert_eq!(park.park(&mut fds, 0), Ok(Parked::Ready));
        assert_eq!(Unattended.park(&mut fds, NO_DEADLINE), Ok(Parked::Ready));
    }

    #[test]
    fn an_unattended_park_keeps_its_deadline() {
        let deadline = now_ns() + 1_000_000;
        assert_eq!(Unattended.park_until(deadline), Ok(()));
        assert!(now_ns() >= deadline);
    }

    /// The spin of issue #12: descriptors that stay ready must not hide a
    /// stop, before or after the deadline.
    #[test]
    fn a_stop_is_seen_before_ready_descriptors() {
        let parker = Parker::new().unwrap();
        let requests = Scripted::new(0);
        let mut park = parker.park_for(&requests);
        let (_fd, p) = readable();
        for deadline in [0, now_ns() + 1_000_000_000, NO_DEADLINE] {
            requests.wake.write(1).unwrap();
            assert_eq!(park.park(&mut [p], deadline), Err(Interrupted));
        }
    }
}
