//! HostClock math and the header's seqlock, against hand-made headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rtvm_abi::linux::{RegionHeader, REGION_MAGIC};
use rtvm_guest_linux::{ClockPair, GuestDeadline, Header, HostClock, OwnedHeader};

/// 1 GHz (one tick per ns), host 5 ms at TSC 1000.
fn header() -> Arc<OwnedHeader> {
    let h = OwnedHeader::new(RegionHeader {
        magic: REGION_MAGIC,
        abi_version: rtvm_abi::ABI_VERSION,
        vcpu_count: 4,
        tsc_khz: 1_000_000,
        rt_vcpus: 0b1010,
        ..RegionHeader::default()
    });
    h.publish_clock(5_000_000, 1_000, 3);
    h
}

fn clock(h: &Arc<OwnedHeader>) -> HostClock {
    HostClock::new(Header::new(h.clone()))
}

#[test]
fn tsc_maps_to_host_time() {
    let c = clock(&header());
    assert_eq!(c.host_ns_at(1_000), Some(5_000_000));
    assert_eq!(c.host_ns_at(3_000), Some(5_002_000));
    assert_eq!(c.host_ns_at(0), Some(4_999_000));
    // 2 GHz: two ticks per ns.
    let h = OwnedHeader::new(RegionHeader {
        tsc_khz: 2_000_000,
        ..RegionHeader::default()
    });
    h.publish_clock(1_000_000, 500, 0);
    assert_eq!(clock(&h).host_ns_at(2_500), Some(1_001_000));
    // Unknown frequency: no TSC clock.
    let h = OwnedHeader::new(RegionHeader::default());
    assert!(!clock(&h).is_usable());
    assert_eq!(clock(&h).host_ns_at(1), None);
    assert_eq!(
        clock(&h).host_deadline_at(GuestDeadline::Relative(1), 1, 0),
        None
    );
}

#[test]
fn monotonic_deadlines_keep_their_distance_from_now() {
    let c = clock(&header());
    // At TSC 2000 the host reads 5_001_000; the guest's monotonic clock 10 ms.
    let at = |d| c.host_deadline_at(d, 2_000, 10_000_000).unwrap();
    assert_eq!(at(GuestDeadline::Monotonic(10_000_500)), 5_001_500);
    assert_eq!(at(GuestDeadline::Monotonic(10_000_000)), 5_001_000);
    // Already past: as far in the host's past.
    assert_eq!(at(GuestDeadline::Monotonic(9_999_000)), 5_000_000);
    // Far past: clamped at 0.
    assert_eq!(at(GuestDeadline::Monotonic(0)), 0);
    // Far future: the distance carries over exactly, or saturates.
    assert_eq!(at(GuestDeadline::Monotonic(u64::MAX)), u64::MAX - 4_999_000);
    assert_eq!(
        c.host_deadline_at(GuestDeadline::Monotonic(u64::MAX), 2_000, 0),
        Some(u64::MAX)
    );
}

#[test]
fn realtime_deadlines_go_through_guest_realtime_now() {
    let c = clock(&header());
    let epoch_now = 1_700_000_000_000_000_000u64;
    let at = |d| c.host_deadline_at(d, 2_000, epoch_now).unwrap();
    assert_eq!(at(GuestDeadline::Realtime(epoch_now + 250_000)), 5_251_000);
    assert_eq!(at(GuestDeadline::Realtime(epoch_now - 1_000)), 5_000_000);
}

#[test]
fn relative_sleeps_start_from_host_now() {
    let c = clock(&header());
    // The guest clock does not matter for a duration.
    for guest_now in [0, 123, u64::MAX] {
        assert_eq!(
            c.host_deadline_at(GuestDeadline::Relative(700), 2_000, guest_now),
            Some(5_001_700)
        );
    }
    assert_eq!(
        c.host_deadline_at(GuestDeadline::Relative(u64::MAX), 2_000, 0),
        Some(u64::MAX)
    );
}

#[test]
fn the_rt_bitmap_is_read_without_an_exit() {
    let h = header();
    let hdr = Header::new(h.clone());
    assert_eq!(
        (0..6).map(|i| hdr.is_rt_cpu(i)).collect::<Vec<_>>(),
        [false, true, false, true, false, false]
    );
    h.set_rt_vcpus(u64::MAX);
    assert!(hdr.is_rt_cpu(0) && hdr.is_rt_cpu(3));
    assert!(!hdr.is_rt_cpu(4), "beyond vcpu_count");
    assert!(!hdr.is_rt_cpu(64) && !hdr.is_rt_cpu(u32::MAX));
}

#[test]
fn a_read_during_an_update_waits_for_the_new_pair() {
    let h = header();
    // The VMM is mid-update: counter odd, half of a new pair written.
    h.set_seq(7);
    h.store_pair_raw(9_000_000, 4_000, 5);
    let writer = {
        let h = h.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h.store_pair_raw(9_000_000, 4_000, 6);
            h.set_seq(8);
        })
    };
    let hdr = Header::new(h.clone());
    let start = Instant::now();
    // Spins through odd counters (each attempt is short; the writer is
    // 20 ms away, within the retry budget on any machine we run on).
    let mut pair = hdr.clock_pair();
    while pair.is_none() {
        pair = hdr.clock_pair();
    }
    writer.join().unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(15),
        "did not wait for the writer"
    );
    assert_eq!(
        pair,
        Some(ClockPair {
            host_ns: 9_000_000,
            guest_tsc: 4_000,
            error_ns: 6
        })
    );
    assert_eq!(clock(&h).host_ns_at(5_000), Some(9_001_000));
}

#[test]
fn a_counter_stuck_odd_gives_up_instead_of_hanging() {
    let h = header();
    h.set_seq(1);
    let c = clock(&h);
    assert_eq!(c.header().clock_pair(), None);
    assert_eq!(c.now(), None);
    h.publish_clock(1, 2, 3);
    assert!(c.now().is_some());
}

#[test]
fn snapshots_copy_the_whole_header() {
    let h = header();
    let s = Header::new(h).snapshot().unwrap();
    assert_eq!(s.magic, REGION_MAGIC);
    assert_eq!(
        (s.vcpu_count, s.tsc_khz, s.rt_vcpus),
        (4, 1_000_000, 0b1010)
    );
    assert_eq!((s.host_ns, s.guest_tsc, s.error_ns), (5_000_000, 1_000, 3));
}
