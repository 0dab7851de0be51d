//! Exitless I/O rings: a guest posts socket work to a submission ring and
//! finds the results in a completion ring, both in its own RAM, while the
//! VMM's I/O poller thread serves them. No VM exit is on that path; the
//! doorbell (`Call::NetRingKick`) and a long poll (`Call::NetRingWait`) are the
//! fallbacks when the poller sleeps or the guest has nothing else to do.
//!
//! # Layout
//!
//! A ring area is page-aligned guest RAM of [`area_size`] bytes: a
//! [`RingHeader`] page, then `sq_entries` [`Sqe`]s, then `cq_entries`
//! [`Cqe`]s (64 bytes each). Entry counts are powers of two up to
//! [`MAX_ENTRIES`]. The guest fills the header's constant part (magic,
//! version, counts; indices 0) and registers the area with
//! `Call::NetRingSetup`; the VMM keeps its own copy of the constant part and
//! never reads it again.
//!
//! # Who writes what
//!
//! Indices are free-running `u32`s; an entry's slot is `index & (entries −
//! 1)`.
//!
//! - Submissions: the guest writes [`Sqe`]s at `sq_tail..` and then stores
//!   `sq_tail` (release). The poller loads `sq_tail` (acquire), copies each
//!   entry out before it looks at it (a guest may change it meanwhile: what
//!   counts is the copy), and stores `sq_head` (release) past what it has
//!   taken. The guest may reuse an SQ slot once `sq_head` has passed it.
//! - Completions: every submission gets exactly one [`Cqe`], carrying its
//!   `user` cookie. The poller writes it at `cq_tail` and stores `cq_tail`
//!   (release); the guest loads `cq_tail` (acquire), reads, and stores
//!   `cq_head` (release). A full completion ring stops the poller from
//!   taking more submissions of that ring, so nothing is ever dropped: a
//!   guest keeps at most `cq_entries` submissions in flight, and one that
//!   stops consuming completions only stalls its own ring.
//! - A send is done when its completion says so (status 0, the bytes sent):
//!   until then its buffer is the poller's. A receive is posted ahead: its
//!   buffer is filled, and its completion written, when data comes.
//!
//! # Wake-ups are never lost
//!
//! - The poller, before it sleeps, sets [`host_flags::ASLEEP`] and then
//!   reads `sq_tail` again (both sequentially consistent). A guest stores
//!   `sq_tail` and then reads `host_flags` (both sequentially consistent):
//!   either the poller sees the new tail, or the guest sees `ASLEEP` and
//!   kicks it with `Call::NetRingKick` (an exit, only when the poller sleeps).
//! - `Call::NetRingWait` serves the ring's new submissions before it parks,
//!   in the calling vCPU's thread: a guest about to wait owes no kick, so
//!   it may leave the kick to the wait (one exit where there were two).
//! - A guest that waits for a completion with `Call::NetRingWait` parks in the
//!   host; the host registers the wait and only then checks the completion
//!   ring, and the poller wakes a registered waiter after every completion
//!   it publishes.

use core::sync::atomic::{AtomicU32, Ordering};

/// `RingHeader::magic`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RTVR");
/// `RingHeader::version`: this layout and protocol.
pub const VERSION: u32 = 1;
/// Most entries of either ring.
pub const MAX_ENTRIES: u32 = 4096;
/// Size of one entry of either ring.
pub const ENTRY_SIZE: u64 = 64;
/// Where the submission ring starts in the area.
pub const SQ_OFFSET: u64 = 4096;

/// Bytes of a ring area with these entry counts (whole pages).
pub const fn area_size(sq_entries: u32, cq_entries: u32) -> u64 {
    let bytes = SQ_OFFSET + (sq_entries as u64 + cq_entries as u64) * ENTRY_SIZE;
    bytes.div_ceil(4096) * 4096
}

/// Offset of the completion ring in the area.
pub const fn cq_offset(sq_entries: u32) -> u64 {
    SQ_OFFSET + sq_entries as u64 * ENTRY_SIZE
}

/// Whether `n` is a usable entry count.
pub const fn valid_entries(n: u32) -> bool {
    n.is_power_of_two() && n <= MAX_ENTRIES
}

/// The first page of a ring area.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingHeader {
    pub magic: u32,
    pub version: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    /// Written by the poller.
    pub sq_head: AtomicU32,
    /// Written by the guest.
    pub sq_tail: AtomicU32,
    /// Written by the guest.
    pub cq_head: AtomicU32,
    /// Written by the poller.
    pub cq_tail: AtomicU32,
    /// Written by the poller: [`host_flags`].
    pub host_flags: AtomicU32,
}

/// Byte offsets of the header's fields.
pub mod field {
    use super::RingHeader;
    use core::mem::offset_of;

    pub const MAGIC: usize = offset_of!(RingHeader, magic);
    pub const VERSION: usize = offset_of!(RingHeader, version);
    pub const SQ_ENTRIES: usize = offset_of!(RingHeader, sq_entries);
    pub const CQ_ENTRIES: usize = offset_of!(RingHeader, cq_entries);
    pub const SQ_HEAD: usize = offset_of!(RingHeader, sq_head);
    pub const SQ_TAIL: usize = offset_of!(RingHeader, sq_tail);
    pub const CQ_HEAD: usize = offset_of!(RingHeader, cq_head);
    pub const CQ_TAIL: usize = offset_of!(RingHeader, cq_tail);
    pub const HOST_FLAGS: usize = offset_of!(RingHeader, host_flags);
}

/// Bits of `RingHeader::host_flags`.
pub mod host_flags {
    /// The poller sleeps: a guest that posts kicks it (`Call::NetRingKick`).
    pub const ASLEEP: u32 = 1;
}

/// Submission operations.
pub mod op {
    /// Send `len` bytes at `buf` on `handle`, to `addr` (family 0: the
    /// connected peer). Completes when sent, with the bytes sent.
    pub const SEND: u32 = 1;
    /// Receive up to `len` bytes into `buf` from `handle`. Completes when
    /// data came, with the bytes and the sender.
    pub const RECV: u32 = 2;
}

/// A submission (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// [`op`].
    pub op: u32,
    /// None yet: 0 (others complete with `BadFlags`).
    pub flags: u32,
    /// A socket handle.
    pub handle: u64,
    /// Guest-physical address of the buffer.
    pub buf: u64,
    pub len: u32,
    pub _pad: u32,
    /// Returned in the completion as it is.
    pub user: u64,
    /// For [`op::SEND`]: the destination (`vmrpc::net` address words).
    pub addr: [u64; 3],
}

/// A completion (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// The submission's cookie.
    pub user: u64,
    /// A `vmrpc::Status` number: 0 done.
    pub status: u32,
    /// The submission's [`op`].
    pub op: u32,
    /// Bytes sent or received.
    pub len: u64,
    /// For [`op::RECV`]: the sender.
    pub addr: [u64; 3],
    /// Host time (ns, the clock of `Call::Clock`) when the host wrote the
    /// completion: a receive's data taken from its socket, a send gone. 0
    /// from a host that predates it (the field was padding).
    pub time: u64,
    pub _pad: u64,
}

const _: () = assert!(core::mem::size_of::<Sqe>() as u64 == ENTRY_SIZE);
const _: () = assert!(core::mem::size_of::<Cqe>() as u64 == ENTRY_SIZE);

impl Sqe {
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.handle.to_le_bytes());
        b[16..24].copy_from_slice(&self.buf.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.user.to_le_bytes());
        for (i, w) in self.addr.iter().enumerate() {
            b[40 + 8 * i..48 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; 64]) -> Sqe {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Sqe {
            op: u32_at(0),
            flags: u32_at(4),
            handle: u64_at(8),
            buf: u64_at(16),
            len: u32_at(24),
            _pad: 0,
            user: u64_at(32),
            addr: [u64_at(40), u64_at(48), u64_at(56)],
        }
    }
}

impl Cqe {
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..8].copy_from_slice(&self.user.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.op.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        for (i, w) in self.addr.iter().enumerate() {
            b[24 + 8 * i..32 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[48..56].copy_from_slice(&self.time.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 64]) -> Cqe {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Cqe {
            user: u64_at(0),
            status: u32_at(8),
            op: u32_at(12),
            len: u64_at(16),
            addr: [u64_at(24), u64_at(32), u64_at(40)],
            time: u64_at(48),
            _pad: 0,
        }
    }
}

/// How many entries lie between `head` and `tail`, if that is a possible
/// count for a ring of `entries` (a guest may write anything there).
pub fn pending(head: u32, tail: u32, entries: u32) -> Option<u32> {
    let n = tail.wrapping_sub(head);
    (n <= entries).then_some(n)
}

/// The guest's side of a ring area mapped at `base` (a pointer to the
/// header page, the rings after it): posting submissions and taking
/// completions, with the ordering above.
pub struct GuestRing {
    base: *mut u8,
    sq_entries: u32,
    cq_entries: u32,
}

// SAFETY: the area is shared memory the ring protocol governs; one
// `GuestRing` is used by one guest thread at a time (`&mut self`).
unsafe impl Send for GuestRing {}

impl GuestRing {
    /// Writes the header's constant part and zeroes the indices.
    ///
    /// # Safety
    /// `base` points to [`area_size`]`(sq_entries, cq_entries)` writable
    /// bytes, page-aligned, that nothing else uses, for the ring's life.
    pub unsafe fn init(base: *mut u8, sq_entries: u32, cq_entries: u32) -> GuestRing {
        let header = base.cast::<RingHeader>();
        // SAFETY: the caller's area holds a header.
        unsafe {
            header.write(RingHeader {
                magic: MAGIC,
                version: VERSION,
                sq_entries,
                cq_entries,
                ..RingHeader::default()
            })
        };
        GuestRing {
            base,
            sq_entries,
            cq_entries,
        }
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: `base` points to the header for the ring's life (init).
        unsafe { &*self.base.cast::<RingHeader>() }
    }

    /// Room for more submissions.
    pub fn sq_free(&self) -> u32 {
        let h = self.header();
        let used = h
            .sq_tail
            .load(Ordering::Relaxed)
            .wrapping_sub(h.sq_head.load(Ordering::Acquire));
        self.sq_entries.saturating_sub(used)
    }

    /// Posts `sqe`; false when the submission ring is full. Returns
    /// whether the poller must be kicked (it sleeps).
    pub fn post(&mut self, sqe: &Sqe) -> Option<bool> {
        if self.sq_free() == 0 {
            return None;
        }
        let h = self.header();
        let tail = h.sq_tail.load(Ordering::Relaxed);
        let at = SQ_OFFSET + u64::from(tail & (self.sq_entries - 1)) * ENTRY_SIZE;
        let bytes = sqe.to_bytes();
        // SAFETY: inside the area (slot index masked); the slot is the
        // guest's until sq_tail is published.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at as usize), 64) };
        h.sq_tail.store(tail.wrapping_add(1), Ordering::SeqCst);
        Some(h.host_flags.load(Ordering::SeqCst) & host_flags::ASLEEP != 0)
    }

    /// Whether a completion is waiting.
    pub fn has_completion(&self) -> bool {
        let h = self.header();
        h.cq_tail.load(Ordering::Acquire) != h.cq_head.load(Ordering::Relaxed)
    }

    /// The next completion, if any.
    pub fn complete(&mut self) -> Option<Cqe> {
        let h = self.header();
        let head = h.cq_head.load(Ordering::Relaxed);
        if h.cq_tail.load(Ordering::Acquire) == head {
            return None;
        }
        let at = cq_offset(self.sq_entries) + u64::from(head & (self.cq_entries - 1)) * ENTRY_SIZE;
        let mut bytes = [0u8; 64];
        // SAFETY: inside the area; the poller published this slot.
        unsafe {
            core::ptr::copy_nonoverlapping(self.base.add(at as usize), bytes.as_mut_ptr(), 64)
        };
        h.cq_head.store(head.wrapping_add(1), Ordering::Release);
        Some(Cqe::from_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_their_bytes() {
        let sqe = Sqe {
            op: op::SEND,
            flags: 0,
            handle: 0x8000_0001,
            buf: 0x12_3000,
            len: 1472,
            _pad: 0,
            user: 77,
            addr: [1, 2, 3],
        };
        assert_eq!(Sqe::from_bytes(&sqe.to_bytes()), sqe);
        let cqe = Cqe {
            user: 77,
            status: 4,
            op: op::RECV,
            len: 9,
            addr: [4, 5, 6],
            time: 123_456_789,
            _pad: 0,
        };
        assert_eq!(Cqe::from_bytes(&cqe.to_bytes()), cqe);
    }

    #[test]
    fn sizes_and_counts() {
        assert_eq!(area_size(64, 64), 4096 + 8192);
        assert_eq!(area_size(1, 1), 8192);
        assert_eq!(cq_offset(64), 4096 + 4096);
        assert!(valid_entries(1) && valid_entries(4096));
        assert!(!valid_entries(0) && !valid_entries(3) && !valid_entries(8192));
        assert_eq!(pending(5, 7, 4), Some(2));
        assert_eq!(pending(u32::MAX, 1, 4), Some(2), "wraps");
        assert_eq!(pending(7, 5, 4), None, "tail behind head");
        assert_eq!(pending(0, 5, 4), None, "more than the ring holds");
    }
}
