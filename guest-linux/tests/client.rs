//! The client end to end against the VMM's real VMRPC server, through the
//! in-process transport (the dispatch a vCPU thread runs on a doorbell exit).

mod support;

use rtvm_abi::vmrpc::{flags, vcpu_info, Call, Status, HOST_STREAM};
use rtvm_guest_linux::{Client, Error, GuestDeadline};
use rtvm_vmm::clock::now_ns;
use support::InProcess;

#[test]
fn ping_round_trips() {
    let mut c = Client::new(InProcess::new(0, 1, false));
    for x in [0, 1, 0xdead_beef, u64::MAX] {
        assert_eq!(c.ping(x).unwrap(), x);
    }
}

#[test]
fn clock_lies_within_the_callers_own_bracket() {
    let mut c = Client::new(InProcess::new(1, 2, true));
    for _ in 0..100 {
        let before = now_ns();
        let host = c.clock().unwrap();
        let after = now_ns();
        assert!(
            before <= host && host <= after,
            "{before} <= {host} <= {after}"
        );
    }
    // And the TSC-mapped clock of the header never runs ahead of it.
    let before = now_ns();
    let mapped = c.host_now().unwrap();
    let after = now_ns();
    assert!(mapped <= after, "mapped {mapped} after {after}");
    assert!(
        mapped + 1_000_000 >= before,
        "mapped {mapped} far behind {before}"
    );
}

#[test]
fn vcpu_info_describes_the_calling_vcpu() {
    let mut c = Client::new(InProcess::new(2, 4, true));
    let info = c.vcpu_info(2).unwrap();
    assert_eq!(info.index, 2);
    assert_eq!(info.count, 4);
    assert_eq!(info.tsc_khz, support::tsc_khz());
    assert_eq!(info.flags, vcpu_info::REALTIME | vcpu_info::TIMER_ADVANCE);
    assert!(info.is_realtime() && info.has_timer_advance());
    assert!(c.is_rt_cpu(2) && !c.is_rt_cpu(1) && !c.is_rt_cpu(4));

    let mut plain = Client::new(InProcess::new(0, 1, false));
    let info = plain.vcpu_info(0).unwrap();
    assert_eq!((info.index, info.count, info.flags), (0, 1, 0));
    assert!(!plain.is_rt_cpu(0));
    // A call for a vCPU the caller is not on is refused before it is made.
    assert!(matches!(
        plain.vcpu_info(3),
        Err(Error::WrongCpu {
            vcpu: 3,
            running_on: 0
        })
    ));
}

/// Sleeps to deadlines `gap` apart and checks each by the test's own
/// CLOCK_MONOTONIC (the host clock here).
fn never_early(c: &mut Client<InProcess>, rounds: usize, gap: u64) -> Vec<u64> {
    let mut late = Vec::new();
    for _ in 0..rounds {
        let deadline = now_ns() + gap;
        let woke = c.sleep_until_host(deadline).unwrap();
        let now = now_ns();
        assert!(now >= deadline, "returned {} ns early", deadline - now);
        assert!(woke.returned >= deadline);
        assert_eq!(woke.deadline, deadline);
        late.push(now - deadline);
    }
    late
}

#[test]
fn rt_sleeps_return_early_from_the_host_then_spin_to_the_deadline() {
    let mut c = Client::new(InProcess::new(1, 2, true));
    assert!(c.early_return(1).unwrap());
    let late = never_early(&mut c, 60, 400_000);
    // The adaptive advance learned something and the client spun the rest.
    let last = c.sleep_until_host(now_ns() + 400_000).unwrap();
    assert!(last.early_return);
    assert!(last.advance_ns > 0, "advance {}", last.advance_ns);
    eprintln!("RT lateness (ns): {late:?}");
    // Deadlines already past return at once, still not "early".
    let past = now_ns() - 1_000_000;
    let woke = c.sleep_until_host(past).unwrap();
    assert!(woke.returned >= past);
}

#[test]
fn non_rt_sleeps_are_served_whole_by_the_host() {
    let mut c = Client::new(InProcess::new(0, 2, false));
    assert!(!c.early_return(0).unwrap());
    never_early(&mut c, 20, 300_000);
    let woke = c.sleep_host(200_000).unwrap();
    assert!(!woke.early_return);
    assert_eq!(woke.advance_ns, 0);
}

#[test]
fn guest_deadlines_convert_and_sleep() {
    let mut c = Client::new(InProcess::new(0, 1, true));
    // The guest is this process: guest and host CLOCK_MONOTONIC coincide.
    let mono = now_ns() + 500_000;
    c.sleep_until_guest(GuestDeadline::Monotonic(mono)).unwrap();
    assert!(now_ns() >= mono);
    let start = now_ns();
    c.sleep_until_guest(GuestDeadline::Relative(300_000))
        .unwrap();
    assert!(now_ns() >= start + 300_000);
    let real = rtvm_guest_linux::guest_clock_ns(libc::CLOCK_REALTIME) + 400_000;
    c.sleep_until_guest(GuestDeadline::Realtime(real)).unwrap();
    // Within the TSC mapping's error (ns), realtime has passed the deadline.
    let real_now = rtvm_guest_linux::guest_clock_ns(libc::CLOCK_REALTIME);
    assert!(real_now + 10_000 >= real, "{real_now} vs {real}");
}

#[test]
fn refusals_map_to_their_status() {
    let mut c = Client::new(InProcess::new(0, 1, false));
    // No periodic timer started.
    assert!(matches!(
        c.call(0, Call::WaitNext, 0, [0; 6]),
        Err(Error::Status(Status::NotConfigured))
    ));
    // Guests may not report to the host's own stream.
    assert!(matches!(
        c.call(0, Call::Report, 0, [0, 1, HOST_STREAM, 0, 0, 0]),
        Err(Error::Status(Status::BadArgument))
    ));
    // Wait-only flags on a call that does not wait.
    assert!(matches!(
        c.call(0, Call::Ping, flags::EARLY_RETURN, [0; 6]),
        Err(Error::Status(Status::BadFlags))
    ));
    // No share configured.
    assert!(matches!(
        c.call(0, Call::FsFsync, 0, [0; 6]),
        Err(Error::Status(Status::NoShare))
    ));
    // A doorbell naming no page of guest RAM: refused in EAX.
    c.transport_mut().doorbell_override = Some((support::RAM >> 12) as u32);
    assert!(matches!(c.ping(1), Err(Error::Status(Status::BadAddress))));
    c.transport_mut().doorbell_override = None;
    // A call the host never answered.
    c.transport_mut().drop_calls = true;
    assert!(matches!(c.ping(1), Err(Error::Unanswered)));
    c.transport_mut().drop_calls = false;
    assert_eq!(c.ping(9).unwrap(), 9, "still serving");
}

#[test]
fn a_vcpu_the_host_numbers_differently_is_caught_before_sleeping() {
    // The host serves vCPU 1; the "thread" believes it runs on CPU 0.
    let mut t = InProcess::new(1, 2, true);
    t.vcpu = 0;
    let mut c = Client::new(t);
    assert!(matches!(
        c.sleep_host(1_000),
        Err(Error::VcpuMismatch { cpu: 0, index: 1 })
    ));
}
