//! The handle table of a service that hands the guest handles (open files,
//! sockets): one per service and VM, shared by its vCPUs.
//!
//! A handle is `tag | generation << 16 | (slot + 1)`, below 2^32. The slot
//! number makes lookup a bounds check; the generation, bumped on every
//! reuse of a slot, makes a stale handle to a reused slot `BadHandle`
//! instead of someone else's entry; 0 is never a handle; and the tag (bit
//! 31, set for sockets, clear for files) keeps one service's handles from
//! ever naming the other's. A slot that has used all its generations is
//! retired rather than wrapped: after 32,767 reuses a stale handle would
//! otherwise name a new entry.

use std::sync::{Arc, Mutex, MutexGuard};

use rtvm_abi::vmrpc::Status;

/// The tag bit (the ABI's socket handle tag); generations stay below it.
pub const TAG: u64 = rtvm_abi::vmrpc::net::HANDLE_TAG;
/// Slot numbers take the low 16 bits.
const MAX_SLOTS: usize = 0xffff;
const GENERATION_MASK: u16 = 0x7fff;

struct Slot<T> {
    generation: u16,
    entry: Option<Arc<T>>,
    /// Taken by an insert in progress, which may run unlocked (a slow open
    /// must not stall other vCPUs' calls).
    reserved: bool,
}

impl<T> Slot<T> {
    fn in_use(&self) -> bool {
        self.entry.is_some() || self.reserved
    }

    /// Free for a new entry: not in use, and its generation not spent. A
    /// slot that has handed out its last generation is retired for good,
    /// so no handle ever names two entries.
    fn free(&self) -> bool {
        !self.in_use() && self.generation < GENERATION_MASK
    }
}

/// Entries of type `T` under generation-tagged handles, at most `limit`.
pub struct HandleTable<T> {
    tag: u64,
    limit: usize,
    /// What a guest gets when the table is full.
    full: Status,
    slots: Mutex<Vec<Slot<T>>>,
}

/// A slot taken for an insert that completes with [`Reserved::fill`];
/// dropped unfilled, it is free again.
pub struct Reserved<'a, T> {
    table: &'a HandleTable<T>,
    slot: usize,
}

impl<T> HandleTable<T> {
    /// A table whose handles carry `tag` (0 or [`TAG`]), holding at most
    /// `limit` entries; more is refused with `full`.
    pub fn new(tag: u64, limit: usize, full: Status) -> Self {
        debug_assert!(tag == 0 || tag == TAG);
        HandleTable {
            tag,
            limit,
            full,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot<T>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle_of(&self, slot: usize, generation: u16) -> u64 {
        self.tag | (u64::from(generation & GENERATION_MASK) << 16) | (slot as u64 + 1)
    }

    /// The slot a handle names, if it is of this table's shape at all.
    fn slot_of(&self, handle: u64) -> Result<usize, Status> {
        if handle >> 32 != 0 || handle & TAG != self.tag {
            return Err(Status::BadHandle);
        }
        let slot = (handle & 0xffff).checked_sub(1).ok_or(Status::BadHandle)?;
        Ok(slot as usize)
    }

    /// The entry `handle` names.
    pub fn get(&self, handle: u64) -> Result<Arc<T>, Status> {
        let slot = self.slot_of(handle)?;
        let slots = self.lock();
        match slots.get(slot) {
            Some(Slot {
                generation,
                entry: Some(entry),
                ..
            }) if self.handle_of(slot, *generation) == handle => Ok(entry.clone()),
            _ => Err(Status::BadHandle),
        }
    }

    /// Takes a slot for an entry still to be made, within the limit.
    pub fn reserve(&self) -> Result<Reserved<'_, T>, Status> {
        let mut slots = self.lock();
        if slots.iter().filter(|s| s.in_use()).count() >= self.limit {
            return Err(self.full);
        }
        let slot = match slots.iter().position(Slot::free) {
            Some(slot) => slot,
            // Every slot number taken or retired.
            None if slots.len() >= MAX_SLOTS => return Err(self.full),
            None => {
                slots.push(Slot {
                    generation: 0,
                    entry: None,
                    reserved: false,
                });
                slots.len() - 1
            }
        };
        slots[slot].reserved = true;
        Ok(Reserved { table: self, slot })
    }

    /// Adds `entry` under a new handle, within the limit.
    pub fn insert(&self, entry: T) -> Result<u64, Status> {
        Ok(self.reserve()?.fill(entry))
    }

    /// Takes the entry out; its handle is stale from now on. Checked and
    /// cleared under one lock, so two racing removes cannot both succeed.
    pub fn remove(&self, handle: u64) -> Result<Arc<T>, Status> {
        let slot = self.slot_of(handle)?;
        let mut slots = self.lock();
        match slots.get_mut(slot) {
            Some(s) if s.entry.is_some() && self.handle_of(slot, s.generation) == handle => {
                Ok(s.entry.take().expect("checked"))
            }
            _ => Err(Status::BadHandle),
        }
    }

    /// How many entries the table holds.
    pub fn len(&self) -> usize {
        self.lock().iter().filter(|s| s.entry.is_some()).count()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every entry out (the VM is ending).
    pub fn drain(&mut self) -> Vec<Arc<T>> {
        self.slots
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .filter_map(|s| s.entry.take())
            .collect()
    }
}

impl<T> Reserved<'_, T> {
    /// Puts `entry` in the reserved slot; returns its handle.
    pub fn fill(self, entry: T) -> u64 {
        self.fill_shared(Arc::new(entry))
    }

    /// Puts an entry another handle may name too in the reserved slot;
    /// returns its handle.
    pub fn fill_shared(self, entry: Arc<T>) -> u64 {
        let mut slots = self.table.lock();
        let s = &mut slots[self.slot];
        s.reserved = false;
        s.generation += 1;
        s.entry = Some(entry);
        let handle = self.table.handle_of(self.slot, s.generation);
        drop(slots);
        std::mem::forget(self);
        handle
    }
}

impl<T> Drop for Reserved<'_, T> {
    fn drop(&mut self) {
        self.table.lock()[self.slot].reserved = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_name_their_entry_until_removed_and_never_again() {
        let table = HandleTable::new(0, 4, Status::TooManyOpenFiles);
        let a = table.insert("a").unwrap();
        assert_eq!(*table.get(a).unwrap(), "a");
        assert_eq!(*table.remove(a).unwrap(), "a");
        assert_eq!(table.get(a).unwrap_err(), Status::BadHandle);
        assert_eq!(table.remove(a).unwrap_err(), Status::BadHandle);
        let b = table.insert("b").unwrap();
        assert_ne!(a, b, "a reused slot gets a new generation");
        assert_eq!(a & 0xffff, b & 0xffff, "the slot was reused");
        assert_eq!(table.get(a).unwrap_err(), Status::BadHandle);
        for bad in [0, b | 1 << 32, b | TAG, u64::MAX, b + 1] {
            assert_eq!(table.get(bad).unwrap_err(), Status::BadHandle, "{bad:#x}");
        }
    }

    #[test]
    fn tagged_and_untagged_handles_never_meet() {
        let files = HandleTable::new(0, 4, Status::TooManyOpenFiles);
        let sockets = HandleTable::new(TAG, 4, Status::NoResources);
        let f = files.insert(1).unwrap();
        let s = sockets.insert(2).unwrap();
        assert_eq!(f & TAG, 0);
        assert_eq!(s & TAG, TAG);
        assert_eq!(sockets.get(f).unwrap_err(), Status::BadHandle);
        assert_eq!(files.get(s).unwrap_err(), Status::BadHandle);
        assert_eq!(
            files.get(s & !TAG).map(|e| *e),
            Ok(1),
            "same slot and generation"
        );
    }

    #[test]
    fn the_limit_counts_reservations_and_a_dropped_one_frees_its_slot() {
        let table = HandleTable::new(TAG, 2, Status::NoResources);
        let first = table.reserve().unwrap();
        let _second = table.insert(2).unwrap();
        assert_eq!(table.insert(3).unwrap_err(), Status::NoResources);
        drop(first);
        let third = table.insert(3).unwrap();
        assert_eq!(*table.get(third).unwrap(), 3);
        assert_eq!(table.len(), 2);
    }

    /// Issue #12: generations never wrap, so no stale handle ever names
    /// a later entry; a spent slot is retired and the next entry gets
    /// another slot, within the same limit.
    #[test]
    fn a_slot_is_retired_before_its_generation_wraps() {
        let table = HandleTable::new(0, 1, Status::TooManyOpenFiles);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..GENERATION_MASK {
            let h = table.insert(()).unwrap();
            assert_eq!((h & TAG, h & 0xffff), (0, 1), "slot 0 while it lasts");
            assert!(seen.insert(h), "{h:#x} handed out twice");
            table.remove(h).unwrap();
        }
        let next = table.insert(()).unwrap();
        assert_eq!(next & 0xffff, 2, "slot 0 retired, slot 1 taken");
        assert!(!seen.contains(&next));
        assert!(seen.iter().all(|&old| table.get(old).is_err()));
        assert_eq!(table.insert(()).unwrap_err(), Status::TooManyOpenFiles);
    }
}
