//! Termination signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT) turned into a
//! clean VM shutdown: each would otherwise end the process with its RT
//! cgroups, the probe's network namespace and the guest's open files left
//! behind.
//!
//! The handler only writes to an eventfd, which the VMM's control thread
//! polls beside the VM's own exit event; all real work happens there.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;

use crate::error::{Error, Result};

static EVENT: OnceLock<EventFd> = OnceLock::new();
static EVENT_FD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_termination(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(sig, Ordering::SeqCst);
    let fd = EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Makes SIGINT, SIGTERM, SIGHUP (a closed terminal) and SIGQUIT end
/// running VMs cleanly instead of killing the process. Call once, from the
/// program that owns the process.
pub fn install_termination_handlers() -> Result<()> {
    let event = match EVENT.get() {
        Some(event) => event,
        None => {
            let event = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(Error::host("creating the signal eventfd"))?;
            EVENT.get_or_init(|| event)
        }
    };
    EVENT_FD.store(event.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        register_signal_handler(sig, on_termination).map_err(|e| Error::Host {
            what: format!("installing the handler for signal {sig}"),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// The termination signal received so far, if any.
pub fn termination_signal() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// The eventfd that becomes readable when a termination signal arrives.
pub fn termination_fd() -> Option<RawFd> {
    EVENT.get().map(AsRawFd::as_raw_fd)
}
