//! `bad-calls`: vCPU 0 makes one malformed call of each class the VMRPC
//! contract names and checks the host answers each with its status, then
//! that one good call still works. Exit status 1 if any answer was wrong.

use super::Ctx;
use crate::cpu;
use crate::vmrpc::{raw_call, Error, Rpc, Vmrpc, UNANSWERED};
use rtvm_abi::vmrpc::{
    flags, Call, Status as S, ARGS, DOORBELL_ERROR, LOG_MAX, PAYLOAD_OFFSET, STREAMS,
};
use rtvm_abi::ABI_VERSION;

/// A malformed call: (class, ABI version, call number, flags, args, the
/// status it must get).
type Class<'a> = (&'a str, u32, u32, u32, [u64; ARGS], S);

/// Runs the classes on one call page and counts the outcomes.
struct Tally {
    page: u64,
    classes: u32,
    failed: u32,
}

impl Tally {
    /// A well-rung call with a bad request must get status `expected`.
    fn status(&mut self, (class, version, number, flags, args, expected): Class) {
        let doorbell = (self.page >> 12) as u32;
        // SAFETY: the page is this vCPU's call page, used by nothing else now.
        let (eax, status, _) =
            unsafe { raw_call(self.page, doorbell, version, number, flags, args) };
        // EAX other than the doorbell value is an answer too (a wrong one).
        let got = if eax == doorbell {
            Error(status)
        } else {
            Error(eax)
        };
        self.check(class, got, Error::from(expected));
    }

    /// A doorbell value naming no page of RAM must get `DOORBELL_ERROR |
    /// BadAddress` in EAX, and the host must not serve any page for it: the
    /// call page holds a valid `Ping` that must stay unanswered.
    fn doorbell(&mut self, class: &str, doorbell: u32) {
        // SAFETY: as in `status`.
        let (eax, status, _) = unsafe {
            raw_call(
                self.page,
                doorbell,
                ABI_VERSION,
                Call::Ping as u32,
                0,
                [1; ARGS],
            )
        };
        let expected = DOORBELL_ERROR | S::BadAddress as u32;
        let ok = eax == expected && status == UNANSWERED;
        if ok {
            self.pass(
                class,
                format_args!("doorbell error | {}", Error(eax & !DOORBELL_ERROR)),
            );
        } else {
            self.fail(
                class,
                format_args!("EAX {eax:#x} and status {}", Error(status)),
                format_args!("EAX {expected:#x} and the page unanswered"),
            );
        }
    }

    fn check(&mut self, class: &str, got: Error, expected: Error) {
        if got == expected {
            self.pass(class, format_args!("{got}"));
        } else {
            self.fail(class, format_args!("{got}"), format_args!("{expected}"));
        }
    }

    fn pass(&mut self, class: &str, got: core::fmt::Arguments) {
        self.classes += 1;
        println!("bad-calls: {class}: {got} ok");
    }

    fn fail(&mut self, class: &str, got: core::fmt::Arguments, expected: core::fmt::Arguments) {
        self.classes += 1;
        self.failed += 1;
        println!("bad-calls: {class}: got {got}, expected {expected} FAIL");
    }
}

pub fn run(ctx: &Ctx) -> ! {
    if !ctx.is_first_vcpu() {
        cpu::vcpu_off();
    }
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);
    let page = rpc.page();
    let ram = ctx.info.ram_size;
    // A buffer that is surely in RAM: the call page's payload area.
    let buf = page + PAYLOAD_OFFSET as u64;
    let v = ABI_VERSION;
    let (ping, log, report) = (Call::Ping as u32, Call::Log as u32, Call::Report as u32);
    let (wait_next, periodic) = (Call::WaitNext as u32, Call::Periodic as u32);
    let none = [0; ARGS];
    let args = |a: u64, b: u64, c: u64| [a, b, c, 0, 0, 0];
    let early = flags::EARLY_RETURN;
    #[rustfmt::skip]
    let classes: [Class; 12] = [
        ("unknown call number 999", v, 999, 0, none, S::UnsupportedCall),
        ("call number 0", v, 0, 0, none, S::UnsupportedCall),
        ("ABI version + 1", v + 1, ping, 0, none, S::BadAbiVersion),
        ("unknown flag bit 5", v, ping, 1 << 5, none, S::BadFlags),
        ("early return on Ping", v, ping, early, none, S::BadFlags),
        ("Log just past RAM", v, log, 0, args(ram, 16, 0), S::BadAddress),
        ("Log address overflow", v, log, 0, args(u64::MAX - 7, 16, 0), S::BadAddress),
        ("Log longer than LOG_MAX", v, log, 0, args(buf, LOG_MAX + 1, 0), S::BadArgument),
        ("Report to stream STREAMS", v, report, 0, args(buf, 1, STREAMS), S::BadArgument),
        ("Report across the end of RAM", v, report, 0, args(ram - 8, 2, 0), S::BadAddress),
        // Before any Periodic on this vCPU (the next class sets none up).
        ("WaitNext before Periodic", v, wait_next, 0, none, S::NotConfigured),
        ("Periodic with period 0", v, periodic, 0, none, S::BadArgument),
    ];
    let mut t = Tally {
        page,
        classes: 0,
        failed: 0,
    };
    for class in classes {
        t.status(class);
    }
    t.doorbell("doorbell page outside RAM", (ram >> 12) as u32);
    t.doorbell("doorbell bit 31 set", DOORBELL_ERROR | (page >> 12) as u32);

    // The VMM survived all of that and still answers.
    let value = 0x600d_ca11;
    let echo = rpc.ping(value).expect("VMRPC ping");
    assert_eq!(echo, value, "ping after the bad calls echoed wrong");

    if t.failed == 0 {
        println!("bad-calls: all {} classes answered", t.classes);
        cpu::exit(0)
    }
    println!("bad-calls: {} of {} classes FAILED", t.failed, t.classes);
    cpu::exit(1)
}
