//! Why a VM ended, and how the vCPUs and the VMM agree on it.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// Process exit status when the guest crashed or the VMM met a fatal guest event.
pub const EXIT_GUEST_CRASH: u8 = 125;
/// Process exit status when the guest reset the machine. rtvm does not
/// reboot a guest, so a reset ends the VM, and it is no success: a Linux
/// guest resets when it panics (rtvm gives it `panic=-1`).
pub const EXIT_GUEST_RESET: u8 = 126;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest wrote its exit status to the exit port.
    GuestExit { vcpu: usize, status: u32 },
    /// Every vCPU wrote to the vCPU-off port.
    AllVcpusOff,
    /// The guest reset the machine (i8042 or a KVM system event): for a
    /// Linux guest, a panic or a reboot.
    Reset,
    /// The guest asked for power-off through a KVM system event.
    PowerOff,
    /// The guest reported an unrecoverable error through the panic port.
    GuestPanic { vcpu: usize, code: u32 },
    /// A vCPU met an event the VMM cannot continue from.
    Fatal {
        vcpu: usize,
        what: String,
        rip: Option<u64>,
    },
    /// The VMM received a termination signal (SIGINT, SIGTERM).
    Signal(i32),
    /// The VMM stopped the VM on request of its owner.
    Stopped,
}

impl VmExitReason {
    /// The status the `rtvm` process exits with for this reason.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExitReason::GuestExit { status, .. } => u8::try_from(*status).unwrap_or(u8::MAX),
            VmExitReason::AllVcpusOff | VmExitReason::PowerOff | VmExitReason::Stopped => 0,
            VmExitReason::Reset => EXIT_GUEST_RESET,
            VmExitReason::GuestPanic { .. } | VmExitReason::Fatal { .. } => EXIT_GUEST_CRASH,
            VmExitReason::Signal(sig) => 128u8.saturating_add(*sig as u8),
        }
    }

    /// Whether the VM ended the way a guest ends on purpose.
    pub fn is_clean(&self) -> bool {
        !matches!(
            self,
            VmExitReason::GuestPanic { .. } | VmExitReason::Fatal { .. } | VmExitReason::Reset
        )
    }
}

impl fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExitReason::GuestExit { vcpu, status } => {
                write!(f, "guest exited with status {status} (from vCPU {vcpu})")
            }
            VmExitReason::AllVcpusOff => write!(f, "every vCPU finished"),
            VmExitReason::Reset => write!(
                f,
                "guest reset the machine (a Linux guest does when it panics or reboots: \
                 its console says which)"
            ),
            VmExitReason::PowerOff => write!(f, "guest powered off"),
            VmExitReason::GuestPanic { vcpu, code } => write!(
                f,
                "vCPU {vcpu}: guest panic: {} (code {code:#x})",
                rtvm_abi::panic_code::describe(*code)
            ),
            VmExitReason::Fatal { vcpu, what, rip } => {
                write!(f, "vCPU {vcpu}: {what}")?;
                match rip {
                    Some(rip) => write!(f, " at RIP {rip:#x}"),
                    None => write!(f, " (RIP unavailable)"),
                }
            }
            VmExitReason::Signal(sig) => write!(f, "stopped by signal {sig}"),
            VmExitReason::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

/// The first exit reason wins; later ones (other vCPUs failing as the VM
/// goes down) are only logged.
pub struct ExitSignal {
    reason: Mutex<Option<VmExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(Error::host("creating exit eventfd"))?,
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the VMM.
    pub fn request(&self, reason: VmExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            None => {
                tracing::debug!("VM exit requested: {reason}");
                *slot = Some(reason);
                // A full eventfd counter still wakes the VMM, so an error is harmless.
                let _ = self.event.write(1);
            }
            Some(first) => tracing::debug!("VM already ending ({first}); also: {reason}"),
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(VmExitReason::GuestExit { vcpu: 1, status: 7 });
        s.request(VmExitReason::Reset);
        assert_eq!(
            s.reason(),
            Some(VmExitReason::GuestExit { vcpu: 1, status: 7 })
        );
        assert_eq!(s.event().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes_follow_the_reason() {
        assert_eq!(
            VmExitReason::GuestExit { vcpu: 0, status: 3 }.exit_code(),
            3
        );
        assert_eq!(
            VmExitReason::GuestExit {
                vcpu: 0,
                status: 1000
            }
            .exit_code(),
            255
        );
        assert_eq!(VmExitReason::AllVcpusOff.exit_code(), 0);
        assert_eq!(VmExitReason::Reset.exit_code(), EXIT_GUEST_RESET);
        assert!(!VmExitReason::Reset.is_clean());
        assert_eq!(VmExitReason::Signal(15).exit_code(), 143);
        let fatal = VmExitReason::Fatal {
            vcpu: 1,
            what: "triple fault".into(),
            rip: Some(0x20_1000),
        };
        assert_eq!(fatal.exit_code(), EXIT_GUEST_CRASH);
        assert_eq!(fatal.to_string(), "vCPU 1: triple fault at RIP 0x201000");
    }
}
