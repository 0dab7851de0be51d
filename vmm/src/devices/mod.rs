//! Emulated devices and the buses that route guest port and MMIO accesses to them.

mod bus;
mod serial;

pub use bus::{Bus, BusDevice};
pub use serial::{Console, SerialDevice};

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::exit::{ExitSignal, VmExitReason};

/// The i8042 controller, kept only for its CPU-reset command: a guest that
/// resets the machine ends the VM, as a reboot of a real-time appliance is a
/// decision for whoever runs rtvm, not for the guest.
pub struct ResetController(I8042Device<ResetTrigger>);

impl ResetController {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        ResetController(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for ResetController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.0.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            // The trigger cannot fail: it only records the exit reason.
            let _ = self.0.write(offset as u8, value);
        }
    }
}

/// Turns the i8042 reset line into a VM exit.
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExitReason::Reset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtvm_abi::port::{I8042_COMMAND, I8042_DATA, I8042_RESET};

    #[test]
    fn the_i8042_reset_command_ends_the_vm_with_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut bus = Bus::new();
        bus.insert(
            I8042_DATA.into(),
            5,
            Arc::new(std::sync::Mutex::new(ResetController::new(exit.clone()))),
        )
        .unwrap();
        // What Linux's kb_wait() polls before it writes the command.
        let mut status = [0xffu8];
        assert!(bus.read(I8042_COMMAND.into(), &mut status));
        assert_eq!(status[0] & 0x02, 0, "input buffer empty");
        assert_eq!(exit.reason(), None);
        assert!(bus.write(I8042_COMMAND.into(), &[I8042_RESET]));
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}
