//! Call slots (`rtvm_abi::linux`): call pages with data pages that any
//! thread of any guest process may take, pinned or not. Ownership lives in
//! the region's slot table, shared by every process that maps the region:
//! an owner word holds its owner's Linux thread id, taken from 0 with a
//! compare-and-swap and given back by storing 0. A thread that died owning
//! a slot (killed mid-call, say) does not leak it: a slot whose owner no
//! longer exists is taken over.
//!
//! Why not the per-vCPU call pages: two processes pinned to one vCPU can
//! interleave on its page (one writes its request, is preempted, the other
//! writes and rings), and a process that is not pinned has no page at all.

use std::sync::atomic::{AtomicU64, Ordering};

use rtvm_abi::vmrpc::Status;

use crate::Page;

/// Delivers calls through the region's call slots.
pub trait SlotTransport {
    /// The slot table: one owner word per slot.
    fn slot_table(&self) -> &[AtomicU64];
    /// Guest-physical address of slot `slot`'s data pages.
    fn data_address(&self, slot: usize) -> u64;
    /// Copies `bytes` (at most `SLOT_DATA_SIZE`) to the start of the data.
    fn write_data(&self, slot: usize, bytes: &[u8]);
    /// Copies the start of the data into `out` (at most `SLOT_DATA_SIZE`).
    fn read_data(&self, slot: usize, out: &mut [u8]);
    /// Delivers the call in `page` through the slot's call page and leaves
    /// the answer in it; `Err` when the doorbell itself was refused.
    fn ring_slot(&self, slot: usize, page: &mut Page) -> Result<(), Status>;
}

impl<T: SlotTransport + ?Sized> SlotTransport for &T {
    fn slot_table(&self) -> &[AtomicU64] {
        (**self).slot_table()
    }
    fn data_address(&self, slot: usize) -> u64 {
        (**self).data_address(slot)
    }
    fn write_data(&self, slot: usize, bytes: &[u8]) {
        (**self).write_data(slot, bytes)
    }
    fn read_data(&self, slot: usize, out: &mut [u8]) {
        (**self).read_data(slot, out)
    }
    fn ring_slot(&self, slot: usize, page: &mut Page) -> Result<(), Status> {
        (**self).ring_slot(slot, page)
    }
}

/// Who owns slots: the calling thread's id, and whether an id still lives.
/// Sockets are owned by processes, by the same ids (a process's id is its
/// main thread's).
pub trait Owners {
    fn me(&self) -> u64;
    fn alive(&self, id: u64) -> bool;
    /// The calling process's id.
    fn process(&self) -> u64 {
        u64::from(std::process::id())
    }
}

/// Linux threads of this guest, by thread id (`/proc/TID` exists for a
/// thread of any process as long as it lives).
pub struct LinuxThreads;

impl Owners for LinuxThreads {
    fn me(&self) -> u64 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as u64 }
    }

    fn alive(&self, id: u64) -> bool {
        std::path::Path::new(&format!("/proc/{id}")).exists()
    }
}

/// Takes a free slot of `table` for the caller, else one whose owner is
/// gone; `None` when every slot is owned by a live thread.
pub fn take(table: &[AtomicU64], owners: &impl Owners) -> Option<usize> {
    let me = owners.me();
    let claim = |word: &AtomicU64, from: u64| {
        word.compare_exchange(from, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    };
    if let Some(free) = table.iter().position(|w| claim(w, 0)) {
        return Some(free);
    }
    table.iter().position(|w| {
        let owner = w.load(Ordering::Relaxed);
        owner != 0 && owner != me && !owners.alive(owner) && claim(w, owner)
    })
}

/// Gives slot `slot` back, if the caller still owns it (a slot taken over
/// from it meanwhile stays with its new owner).
pub fn give_back(table: &[AtomicU64], slot: usize, owners: &impl Owners) {
    if let Some(word) = table.get(slot) {
        let _ = word.compare_exchange(owners.me(), 0, Ordering::Release, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fake {
        me: Cell<u64>,
        dead: Vec<u64>,
    }

    impl Owners for Fake {
        fn me(&self) -> u64 {
            self.me.get()
        }
        fn alive(&self, id: u64) -> bool {
            !self.dead.contains(&id)
        }
    }

    fn table(owners: [u64; 3]) -> [AtomicU64; 3] {
        owners.map(AtomicU64::new)
    }

    #[test]
    fn a_free_slot_is_taken_then_given_back() {
        let t = table([7, 0, 0]);
        let f = Fake {
            me: Cell::new(9),
            dead: vec![],
        };
        assert_eq!(take(&t, &f), Some(1));
        assert_eq!(t[1].load(Ordering::Relaxed), 9);
        assert_eq!(take(&t, &f), Some(2), "a second slot for a second call");
        give_back(&t, 1, &f);
        assert_eq!(t[1].load(Ordering::Relaxed), 0);
        assert_eq!(t[0].load(Ordering::Relaxed), 7, "another's slot untouched");
    }

    #[test]
    fn a_dead_owners_slot_is_taken_over_and_live_ones_never() {
        let t = table([5, 6, 7]);
        let f = Fake {
            me: Cell::new(9),
            dead: vec![],
        };
        assert_eq!(take(&t, &f), None, "all owned by live threads");
        let f = Fake {
            me: Cell::new(9),
            dead: vec![6],
        };
        assert_eq!(take(&t, &f), Some(1));
        assert_eq!(t[1].load(Ordering::Relaxed), 9);
        // The dead owner's late give-back (it cannot, but a stale one)
        // leaves the new owner's slot alone.
        f.me.set(6);
        give_back(&t, 1, &f);
        assert_eq!(t[1].load(Ordering::Relaxed), 9);
        give_back(&t, 99, &f);
    }

    #[test]
    fn a_thread_of_another_process_that_died_owning_a_slot_leaks_nothing() {
        let t = table([0, 0, 0]);
        // A real process that owned slot 0 and is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as u64;
        child.wait().unwrap();
        t[0].store(dead, Ordering::Relaxed);
        t[1].store(LinuxThreads.me(), Ordering::Relaxed);
        t[2].store(1, Ordering::Relaxed); // init lives
        assert!(LinuxThreads.alive(LinuxThreads.me()));
        assert!(!LinuxThreads.alive(dead));
        assert_eq!(take(&t, &LinuxThreads), Some(0));
    }
}
