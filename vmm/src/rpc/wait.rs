//! Parking a vCPU thread until a host deadline, interruptibly.
//!
//! A long poll blocks the vCPU's own thread in `ppoll` on two fds: a timerfd
//! armed with the absolute deadline (CLOCK_MONOTONIC, TFD_TIMER_ABSTIME, so
//! no relative-time arithmetic adds error) and the vCPU's wake eventfd, which
//! the VMM writes whenever it wants the vCPU's attention (pause, stop). An
//! eventfd stays readable until drained, so a wake-up that races with the
//! thread going to sleep is never lost — which a signal alone could not give.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// Host CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The deadline passed.
    Deadline,
    /// The VMM wrote the wake eventfd.
    Kicked,
}

/// Why a wait on file descriptors ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WokenIo {
    /// At least one descriptor is ready.
    Ready,
    /// The deadline passed.
    Deadline,
    /// The VMM wrote the wake eventfd.
    Kicked,
}

/// Polls `fds` without waiting; true if any is ready.
pub fn poll_now(fds: &mut [libc::pollfd]) -> bool {
    // SAFETY: a valid pollfd array; timeout 0 never blocks.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) > 0 }
}

/// A vCPU thread's means to sleep until a deadline.
pub struct Waiter {
    timer: OwnedFd,
}

impl Waiter {
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall; the fd is owned right away.
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
        Ok(Waiter {
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sleeps until host CLOCK_MONOTONIC ≥ `deadline_ns` or `wake` is written.
    pub fn wait_until(&self, deadline_ns: u64, wake: &EventFd) -> Woken {
        if now_ns() >= deadline_ns {
            return Woken::Deadline;
        }
        if let Err(e) = self.arm(deadline_ns) {
            // Cannot arm a timer (should not happen): fall back to sleeping
            // in slices so the deadline is still honoured.
            tracing::warn!("timerfd_settime failed: {e}");
            return self.sleep_in_slices(deadline_ns, wake);
        }
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.timer.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: a valid pollfd array for the duration of the call.
            let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, std::ptr::null(), std::ptr::null()) };
            if n < 0 {
                // EINTR from the kick signal: the wake eventfd tells whether
                // the VMM wants something; otherwise sleep on.
                continue;
            }
            if fds[1].revents != 0 {
                self.disarm();
                return Woken::Kicked;
            }
            if fds[0].revents != 0 {
                let mut expirations = 0u64;
                // SAFETY: reading 8 bytes into a live u64 from our timerfd.
                unsafe {
                    libc::read(
                        self.timer.as_raw_fd(),
                        (&mut expirations as *mut u64).cast(),
                        8,
                    )
                };
                return Woken::Deadline;
            }
        }
    }

    /// Sleeps until one of `fds` is ready (their `revents` are filled in),
    /// `deadline_ns` passes ([`u64::MAX`]: never), or `wake` is written.
    pub fn wait_fds(&self, fds: &mut [libc::pollfd], deadline_ns: u64, wake: &EventFd) -> WokenIo {
        let timed = deadline_ns != u64::MAX;
        if timed {
            if now_ns() >= deadline_ns {
                // Still report what is ready right now.
                return if poll_now(fds) {
                    WokenIo::Ready
                } else {
                    WokenIo::Deadline
                };
            }
            if let Err(e) = self.arm(deadline_ns) {
                tracing::warn!("timerfd_settime failed: {e}");
            }
        }
        let mut all: Vec<libc::pollfd> = fds.to_vec();
        all.push(libc::pollfd {
            fd: self.timer.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        all.push(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let n = fds.len();
        let outcome = loop {
            all.iter_mut().for_each(|p| p.revents = 0);
            // SAFETY: a valid pollfd array for the duration of the call.
            let rc = unsafe {
                libc::ppoll(
                    all.as_mut_ptr(),
                    all.len() as libc::nfds_t,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::warn!("ppoll failed: {e}");
                break WokenIo::Deadline;
            }
            // The VMM's wake comes first: a socket that keeps reporting
            // ready must never hide a stop request.
            if all[n + 1].revents != 0 {
                break WokenIo::Kicked;
            }
            if all[..n].iter().any(|p| p.revents != 0) {
                break WokenIo::Ready;
            }
            if all[n].revents != 0 {
                break WokenIo::Deadline;
            }
        };
        if timed {
            self.disarm();
            let mut expirations = 0u64;
            // SAFETY: non-blocking read of 8 bytes into a live u64 (drains a fired timer).
            unsafe {
                libc::read(
                    self.timer.as_raw_fd(),
                    (&mut expirations as *mut u64).cast(),
                    8,
                )
            };
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

    fn disarm(&self) {
        let zero: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: our timerfd and a live itimerspec.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &zero, std::ptr::null_mut()) };
    }

    fn sleep_in_slices(&self, deadline_ns: u64, wake: &EventFd) -> Woken {
        loop {
            let now = now_ns();
            if now >= deadline_ns {
                return Woken::Deadline;
            }
            let ms = ((deadline_ns - now) / 1_000_000).clamp(1, 100) as i32;
            let mut fd = libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut fd, 1, ms) } > 0 {
                return Woken::Kicked;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn waits_until_the_deadline_and_never_before() {
        let waiter = Waiter::new().unwrap();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        for _ in 0..5 {
            let deadline = now_ns() + 2_000_000;
            assert_eq!(waiter.wait_until(deadline, &wake), Woken::Deadline);
            assert!(now_ns() >= deadline);
        }
        assert_eq!(
            waiter.wait_until(0, &wake),
            Woken::Deadline,
            "a past deadline returns at once"
        );
    }

    #[test]
    fn a_wake_written_before_the_wait_is_not_lost() {
        let waiter = Waiter::new().unwrap();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        wake.write(1).unwrap();
        let start = now_ns();
        assert_eq!(
            waiter.wait_until(start + 10_000_000_000, &wake),
            Woken::Kicked
        );
        assert!(now_ns() - start < 1_000_000_000);
    }
}
