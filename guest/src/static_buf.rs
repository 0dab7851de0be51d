//! Large buffers as statics: the user stack is well under 256 KiB and there
//! is no allocator, so a workload that needs a 64 KiB datagram buffer keeps
//! it in `.bss` and takes it once.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// `N` bytes that can be taken, as a `&'static mut`, exactly once.
pub struct StaticBuf<const N: usize> {
    buf: UnsafeCell<[u8; N]>,
    taken: AtomicBool,
}

// SAFETY: `take` hands the buffer out once, so no two references to it ever
// exist, whatever vCPU asks.
unsafe impl<const N: usize> Sync for StaticBuf<N> {}

impl<const N: usize> StaticBuf<N> {
    pub const fn new() -> Self {
        StaticBuf {
            buf: UnsafeCell::new([0; N]),
            taken: AtomicBool::new(false),
        }
    }

    /// The buffer. Panics if it was taken before.
    #[expect(clippy::mut_from_ref, reason = "the flag hands it out once")]
    pub fn take(&'static self) -> &'static mut [u8; N] {
        assert!(
            !self.taken.swap(true, Ordering::AcqRel),
            "static buffer taken twice"
        );
        // SAFETY: the flag makes this the only reference ever made.
        unsafe { &mut *self.buf.get() }
    }
}
