//! What the self-test workloads share: a check's outcome with its detail in
//! a fixed buffer (the guest has no allocator), the tally that prints one
//! line per check and ends the VM with the verdict, and the two ways a call
//! is judged (must work, must fail with a given status).

// A failure's detail is text in a fixed buffer (there is no allocator); it
// is only moved on the failure path, where its size costs nothing.
#![expect(clippy::result_large_err, reason = "details are rare and unboxable")]

use crate::cpu;
use crate::fmtbuf::FmtBuf;
use crate::vmrpc::Error;
use rtvm_abi::vmrpc::Status;

/// Why a check failed.
pub type Detail = FmtBuf<240>;
pub type Check = Result<(), Detail>;

/// A [`Detail`] from format arguments.
macro_rules! detail {
    ($($arg:tt)*) => {
        $crate::fmtbuf::FmtBuf::<240>::format(format_args!($($arg)*))
    };
}
pub(crate) use detail;

/// Returns a failed check from format arguments.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::workloads::selftest::detail!($($arg)*))
    };
}
pub(crate) use fail;

/// Counts the checks and prints each outcome as `<name>: <check>: ok|FAIL`.
pub struct Tally {
    name: &'static str,
    checks: u32,
    failed: u32,
}

impl Tally {
    pub fn new(name: &'static str) -> Self {
        Tally {
            name,
            checks: 0,
            failed: 0,
        }
    }

    pub fn record(&mut self, check: &str, result: Check) {
        self.checks += 1;
        match result {
            Ok(()) => println!("{}: {check}: ok", self.name),
            Err(detail) => {
                self.failed += 1;
                println!("{}: {check}: {detail} FAIL", self.name);
            }
        }
    }

    /// Ends the VM: status 0 if every check passed, else 1.
    pub fn finish(&self) -> ! {
        if self.failed == 0 {
            println!("{}: all {} checks passed", self.name, self.checks);
            cpu::exit(0)
        }
        println!(
            "{}: {} of {} checks failed",
            self.name, self.failed, self.checks
        );
        cpu::exit(1)
    }
}

/// The value of a call that must work, or a detail saying `what` failed.
pub fn ok<T>(what: &str, result: Result<T, Error>) -> Result<T, Detail> {
    result.map_err(|e| detail!("{what}: {e}"))
}

/// A call that must fail with `expected`.
pub fn expect<T>(result: Result<T, Error>, expected: Status) -> Check {
    match result {
        Err(e) if e == Error::from(expected) => Ok(()),
        Err(e) => Err(detail!("got {e}, expected {}", expected.name())),
        Ok(_) => Err(detail!("succeeded, expected {}", expected.name())),
    }
}
