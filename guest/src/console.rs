//! The guest console: COM1, one byte per `out`.
//!
//! The VMM's UART accepts every byte, so there is no need to poll the line
//! status register. A spinlock keeps the lines of different vCPUs whole.

use crate::cpu;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use rtvm_abi::port;

static LOCKED: AtomicBool = AtomicBool::new(false);

/// How long a crash report waits for the console before taking it anyway,
/// in TSC ticks (tens of milliseconds on any current CPU). The holder may be
/// the very code that crashed, and a garbled line beats a silent hang.
const CRASH_WAIT_TICKS: u64 = 1 << 27;

/// The console, held: printing through it cannot interleave with other vCPUs.
pub struct Console {
    owns_lock: bool,
}

impl Console {
    pub fn lock() -> Self {
        while LOCKED.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        Console { owns_lock: true }
    }

    /// The console for a crash report: like `lock`, but gives up waiting
    /// after `CRASH_WAIT_TICKS` and prints anyway.
    pub fn lock_for_crash() -> Self {
        let start = cpu::rdtsc();
        while LOCKED.swap(true, Ordering::Acquire) {
            if cpu::rdtsc().wrapping_sub(start) > CRASH_WAIT_TICKS {
                return Console { owns_lock: false };
            }
            core::hint::spin_loop();
        }
        Console { owns_lock: true }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|byte| cpu::out8(port::COM1, byte));
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.owns_lock {
            LOCKED.store(false, Ordering::Release);
        }
    }
}

/// Prints one line (with a `\n` appended) on `console`.
pub fn print_line(mut console: Console, args: fmt::Arguments) {
    // Writing to the UART cannot fail; a failing `Display` impl only cuts
    // its own line short.
    let _ = console.write_fmt(args);
    let _ = console.write_str("\n");
}

/// Prints one line on the console, like `std::println!`.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print_line($crate::console::Console::lock(), format_args!($($arg)*))
    };
}
