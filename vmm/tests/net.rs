//! Outsourced sockets through real guests: echo servers in the guest talked
//! to from the host over loopback, the guest's own self-test of every call
//! and error path, and a flooding guest that must not take the VMM down.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

use rtvm_vmm::config::NetPolicy;
use rtvm_vmm::need_kvm;
use rtvm_vmm::{RunningVm, VmExitReason, VmRun};

mod support;
use support::{assert_exit_0, config, one_at_a_time, Output};

/// Tests here run one at a time: the descriptor-leak checks count the
/// process's open descriptors, which VMs of parallel tests would change.
static SERIAL: Mutex<()> = Mutex::new(());

fn policy(bind: &[&str], connect: &[&str]) -> NetPolicy {
    NetPolicy {
        bind: bind.iter().map(|r| r.parse().unwrap()).collect(),
        connect: connect.iter().map(|r| r.parse().unwrap()).collect(),
        ..NetPolicy::default()
    }
}

/// Starts `workload` (in 64 MiB) with network policy `net`.
fn start(workload: &str, vcpus: usize, cmdline: &str, net: NetPolicy) -> (RunningVm, Output) {
    let mut c = config(workload, vcpus, cmdline);
    c.memory = 64 << 20;
    c.net = net;
    support::start(&c)
}

/// Lets the guest end (up to 60 s).
fn finish(running: RunningVm, out: &Output) -> (VmRun, String) {
    support::finish(running, out, Duration::from_secs(60))
}

/// How many calls named `name` (`Call`'s Debug name) the run served.
fn calls_named(run: &VmRun, name: &str) -> u64 {
    run.calls
        .calls
        .iter()
        .find(|(c, _)| format!("{c:?}") == name)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn udp_echo_round_trips_byte_exact_including_a_max_size_datagram() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let net = policy(&["127.0.0.1:47101"], &["127.0.0.1:*"]);
    let (running, out) = start("udp-echo", 1, "addr=127.0.0.1:47101 count=4", net);
    out.wait_for("udp-echo: serving", Duration::from_secs(20));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 70_000];
    for size in [1usize, 64, 1472, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + size) as u8).collect();
        sock.send_to(&payload, "127.0.0.1:47101").unwrap();
        let (n, from) = sock.recv_from(&mut buf).expect("echo");
        assert_eq!(from.to_string(), "127.0.0.1:47101");
        assert_eq!(&buf[..n], &payload[..], "{size}-byte datagram");
    }
    let (run, out) = finish(running, &out);
    assert_exit_0(&run, &out);
    assert!(out.contains("udp-echo: 4 datagrams echoed"), "{out}");
}

#[test]
fn udp_echo_through_the_io_rings_parked_or_spinning_and_by_calls_without_a_poller() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    for (mode, poller) in [("park", true), ("spin", true), ("park", false)] {
        let mut c = config(
            "udp-echo",
            1,
            &format!("addr=127.0.0.1:47104 count=50 ring={mode}"),
        );
        c.memory = 64 << 20;
        c.net = policy(&["127.0.0.1:47104"], &["127.0.0.1:*"]);
        c.io_poller.enabled = poller;
        let (running, out) = support::start(&c);
        out.wait_for("udp-echo: serving", Duration::from_secs(20));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 9000];
        for i in 0..50usize {
            let size = [1, 64, 1472, 8192][i % 4];
            let payload: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            sock.send_to(&payload, "127.0.0.1:47104").unwrap();
            let (n, from) = sock.recv_from(&mut buf).expect("echo");
            assert_eq!(from.to_string(), "127.0.0.1:47104");
            assert_eq!(
                &buf[..n],
                &payload[..],
                "{mode}: datagram {i} ({size} bytes)"
            );
        }
        let (run, out) = finish(running, &out);
        assert_exit_0(&run, &out);
        assert!(out.contains("udp-echo: 50 datagrams echoed"), "{out}");
        let calls = |name: &str| calls_named(&run, name);
        if poller {
            assert!(out.contains("udp-echo: through rings"), "{out}");
            // 7 receives posted first, then per datagram its echo and the
            // receive posted again: no socket call on the path.
            assert_eq!(run.rings.submissions, 7 + 2 * 50, "{mode}");
            // Receives still posted when the guest closed its socket may
            // complete too (BadHandle).
            assert!(run.rings.completions >= 2 * 50, "{mode}");
            assert_eq!((calls("NetRecv"), calls("NetSend")), (0, 0), "{mode}");
            assert!(run.poller_cpu.is_some());
        } else {
            assert!(
                out.contains("the VMM serves no rings: using calls"),
                "{out}"
            );
            assert_eq!(run.rings.submissions, 0);
            assert_eq!(calls("NetRecv"), 50);
            assert_eq!(run.poller_cpu, None);
        }
    }
}

#[test]
fn tcp_echo_carries_a_multi_megabyte_stream_by_calls_and_through_the_io_rings() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    for mode in ["off", "park", "spin"] {
        let net = policy(&["127.0.0.1:47102"], &[]);
        let cmdline = format!("addr=127.0.0.1:47102 conns=1 ring={mode}");
        let (running, out) = start("tcp-echo", 1, &cmdline, net);
        out.wait_for("tcp-echo: serving", Duration::from_secs(20));
        let mut stream = TcpStream::connect("127.0.0.1:47102").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let payload: Vec<u8> = (0..4usize << 20)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || {
                stream.write_all(&payload).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut echoed = Vec::new();
        if let Err(e) = stream.read_to_end(&mut echoed) {
            panic!("{mode}: {e} after {} bytes echoed", echoed.len());
        }
        writer.join().unwrap();
        assert_eq!(echoed.len(), payload.len(), "{mode}");
        assert!(echoed == payload, "{mode}: stream differs");
        let (run, out) = finish(running, &out);
        assert_exit_0(&run, &out);
        assert!(
            out.contains(&format!(
                "tcp-echo: {} bytes echoed over 1 connections",
                4 << 20
            )),
            "{out}"
        );
        let calls = |name: &str| calls_named(&run, name);
        if mode == "off" {
            assert_eq!(run.rings.submissions, 0);
            assert!(calls("NetRecv") > 0);
        } else {
            assert!(out.contains("tcp-echo: through rings"), "{out}");
            assert!(run.rings.submissions > 2, "{mode}: {:?}", run.rings);
            assert_eq!((calls("NetRecv"), calls("NetSend")), (0, 0), "{mode}");
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn every_socket_call_and_error_path_and_no_descriptor_leak() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let mut net = policy(&["127.0.0.1:*", "[::1]:*"], &["127.0.0.1:*", "[::1]:*"]);
    net.max_sockets = 16;
    let before = open_fds();
    let (running, out) = start("net-selftest", 1, "sockets=16 port=47200 cycles=1000", net);
    let (run, out) = finish(running, &out);
    assert_exit_0(&run, &out);
    assert!(out.contains("checks passed"), "{out}");
    // The VM is gone: its sockets with it (other tests run beside this one).
    let after = open_fds();
    assert!(
        after <= before + 8,
        "descriptors before {before}, after {after}"
    );
}

#[test]
fn a_flooding_guest_is_bounded_and_the_vmm_stays_responsive() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    let mut net = policy(&[], &["127.0.0.1:47999"]);
    net.max_buffer = 64 << 10;
    let (running, out) = start("udp-flood", 2, "to=127.0.0.1:47999 ms=1500", net);
    // While the guest floods, the VMM still answers: pause and resume work.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        running.pause(Duration::from_secs(2)),
        "vCPUs pause during the flood"
    );
    running.resume();
    let (run, out) = finish(running, &out);
    assert_exit_0(&run, &out);
    let line = out
        .lines()
        .find(|l| l.starts_with("udp-flood:"))
        .expect(&out);
    let pings: u64 = line
        .rsplit("answered ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pings > 100, "vCPU 1 kept being served: {line}");
}

#[test]
fn forbidden_binds_and_destinations_are_refused_by_default() {
    let _serial = one_at_a_time(&SERIAL);
    need_kvm!();
    // No policy at all: the echo server cannot even bind.
    let (running, out) = start("udp-echo", 1, "addr=127.0.0.1:47103", NetPolicy::default());
    let (run, out) = finish(running, &out);
    assert!(
        !matches!(run.reason, VmExitReason::GuestExit { status: 0, .. }),
        "{out}"
    );
    assert!(out.contains("not permitted"), "{out}");
}
