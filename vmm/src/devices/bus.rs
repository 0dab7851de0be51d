//! A bus maps address ranges (I/O ports or MMIO) to devices.
//!
//! Each device sits behind its own mutex, so vCPUs touching different devices
//! never wait for each other; the bus itself is immutable once the VM runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A device on a bus. Offsets are relative to the base the device was
/// inserted at; `data.len()` is the access size.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Slot {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`. Ranges may not overlap.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| Error::Config(format!("bad bus range {base:#x}+{len:#x}")))?;
        let overlaps = self
            .slots
            .range(..end)
            .next_back()
            .is_some_and(|(b, s)| b + s.len > base);
        if overlaps {
            return Err(Error::Config(format!(
                "bus range {base:#x}..{end:#x} overlaps another device"
            )));
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Slot)> {
        let (base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= slot.len).then_some((offset, slot))
    }

    /// Reads from the device at `addr`; false if no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, slot)) => {
                lock(&slot.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, slot)) => {
                lock(&slot.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose holder panicked is still usable: device state is plain data
/// and the VM is better served by carrying on than by a second panic.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b, [7]);
        assert_eq!(dev.lock().unwrap().0, vec![(2, vec![7])]);
    }

    #[test]
    fn accesses_outside_or_across_a_device_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(!bus.write(0x5f, &[0]));
        assert!(!bus.write(0x65, &[0]));
        assert!(
            !bus.write(0x64, &[0, 0]),
            "a 2-byte access crossing the end"
        );
        assert!(!bus.write(u64::MAX, &[0, 0]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert!(bus.insert(0x10f, 1, dev()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev()).is_err());
        assert!(bus.insert(0x110, 1, dev()).is_ok());
        assert!(bus.insert(0xf0, 0x10, dev()).is_ok());
        assert!(bus.insert(0x200, 0, dev()).is_err());
    }
}
