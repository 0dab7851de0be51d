//! `rtvm probe`: round trips measured from a network namespace of its own,
//! and the network rules: only 198.18.0.0/15, everything removed at exit
//! (also on SIGINT/SIGTERM). Needs root and iproute2; skipped without them
//! unless RTVM_REQUIRE_KVM=1 (as in CI), where their absence fails.
//!
//! Tests that make a network use different /30s (so a leftover of one
//! cannot disturb another) and take turns: creating and deleting network
//! namespaces is heavy work for the kernel, which would otherwise show up
//! in the round trips measured meanwhile on a 2-CPU machine.

mod support;
use support::{output_within, rtvm, temp_path, text, wait_output_within};

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

static NET_TURN: Mutex<()> = Mutex::new(());

/// The turn to make a network, if this process can (root, `ip` present).
fn net_turn() -> Option<MutexGuard<'static, ()>> {
    net_available().then(|| NET_TURN.lock().unwrap_or_else(|e| e.into_inner()))
}

fn net_available() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if root && ip {
        return true;
    }
    let why = if root {
        "iproute2's `ip` is missing"
    } else {
        "not root"
    };
    if std::env::var("RTVM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("rtvm probe tests need root and iproute2: {why}");
    }
    eprintln!("skipping: {why}; set RTVM_REQUIRE_KVM=1 to make this fatal");
    false
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// What a probe with process id `pid` made and has not removed: its
/// namespaces (`rtvm-probe-<pid>…`), veth ends (`rtvp<pid>…`) and any
/// address of `subnet` (a /30 given by its first three numbers and base).
fn leftovers(pid: u32, subnet: [u8; 4]) -> Vec<String> {
    let mut left = Vec::new();
    let ns = format!("rtvm-probe-{pid}");
    for line in ip(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name == ns || name.starts_with(&format!("{ns}-")) {
            left.push(format!("netns {name}"));
        }
    }
    let veth = format!("rtvp{pid}");
    for line in ip(&["-o", "link"]).lines() {
        // "7: rtvp123h@if2: <…"
        let name = line.split_whitespace().nth(1).unwrap_or_default();
        if name.starts_with(&veth) {
            left.push(format!("link {name}"));
        }
    }
    let [a, b, c, base] = subnet;
    for host in 1..=2 {
        let addr = format!("inet {a}.{b}.{c}.{}/", base + host);
        for line in ip(&["-o", "-4", "addr"]).lines() {
            if line.contains(&addr) {
                left.push(format!("address: {line}"));
            }
        }
    }
    if Path::new(&format!("/var/run/netns/{ns}")).exists() {
        left.push(format!("/var/run/netns/{ns}"));
    }
    left
}

#[test]
fn echo_server_round_trips_are_measured_with_kernel_timestamps() {
    let Some(_turn) = net_turn() else { return };
    let hist = temp_path("rtt.hist");
    let plot = temp_path("rtt.svg");
    let mut cmd = rtvm();
    cmd.args(["probe", "--echo-server", "--seconds", "1", "--json"])
        .arg("--histogram")
        .arg(&hist)
        .arg("--plot")
        .arg(&plot);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rtvm starts");
    let pid = child.id();
    let out = wait_output_within(child, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));

    let sent = json["sent"].as_u64().unwrap();
    let received = json["received"].as_u64().unwrap();
    let lost = json["lost"].as_u64().unwrap();
    // 1000 requests a second for 1 s; the schedule skips ahead (no bursts)
    // when the host steals the CPU, so a few may go unsent.
    assert!((500..=1001).contains(&sent), "sent {sent}: {json}");
    assert_eq!(received + lost, sent, "{json}");
    assert!(
        received * 10 >= sent * 9,
        "received {received} of {sent}: {json}\nstderr: {stderr}"
    );
    assert_eq!(json["target"], "198.18.0.1:7000");

    let rtt = &json["rtt"];
    assert_eq!(rtt["samples"].as_u64(), Some(received), "{json}");
    let p50 = rtt["p50_us"].as_f64().unwrap();
    assert!((1.0..100_000.0).contains(&p50), "p50 {p50} µs: {json}");
    let (min, max) = (
        rtt["min_us"].as_f64().unwrap(),
        rtt["max_us"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= p50 && p50 <= max, "{json}");

    // What this kernel does (6.x, veth): the veth driver stamps TX, the
    // stack stamps RX; the probe's warm-up lets RX timestamping switch on
    // before request 0, so every sample has kernel timestamps. A rare
    // sample without one falls back and is counted.
    let fallbacks = json["fallbacks"].as_u64().unwrap();
    let expected = if fallbacks == 0 { "kernel" } else { "mixed" };
    assert_eq!(json["timestamps"], expected, "{json}");
    assert!(fallbacks * 100 <= received, "{fallbacks} fallbacks: {json}");
    // Kernel timestamps leave out the probe's own system calls and
    // wake-ups, which the user-space clocks include.
    let user_p50 = json["rtt_user"]["p50_us"].as_f64().unwrap();
    assert!(
        p50 < user_p50,
        "kernel p50 {p50} µs, user-space {user_p50} µs"
    );
    assert!(json["machine"]["kernel"].is_string(), "{json}");

    let histogram = std::fs::read_to_string(&hist).unwrap();
    assert!(
        histogram.contains(&format!("# Total: {received:09}\n")),
        "{histogram}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("udp_rtt"));
    let _ = std::fs::remove_file(&hist);
    let _ = std::fs::remove_file(&plot);

    assert_eq!(leftovers(pid, [198, 18, 0, 0]), Vec::<String>::new());
}

#[test]
fn table_output_and_closed_loop_with_a_count() {
    let Some(_turn) = net_turn() else { return };
    let mut cmd = rtvm();
    cmd.args([
        "probe",
        "--echo-server",
        "--subnet",
        "198.18.0.12/30",
        "--rate",
        "0",
        "--count",
        "300",
        "--size",
        "1472",
    ]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = wait_output_within(child, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("UDP round trip to 198.18.0.13:7000"),
        "{stdout}"
    );
    assert!(stdout.contains("closed loop"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("udp_rtt "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let samples: u64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(samples >= 270, "{stdout}");
    assert!(
        stdout.contains("sent 300, received "),
        "exactly --count requests: {stdout}"
    );
    assert_eq!(leftovers(pid, [198, 18, 0, 12]), Vec::<String>::new());
}

#[test]
fn a_tcp_echo_server_is_probed_over_one_connection() {
    let Some(_turn) = net_turn() else { return };
    // A TCP echo server in the root namespace, on every address: the
    // probe's veth end comes and goes with the probe.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut echoed = 0u64;
        loop {
            match std::io::Read::read(&mut conn, &mut buf) {
                Ok(0) | Err(_) => return echoed,
                Ok(n) => {
                    std::io::Write::write_all(&mut conn, &buf[..n]).unwrap();
                    echoed += n as u64;
                }
            }
        }
    });
    let target = format!("198.18.0.25:{port}");
    let mut cmd = rtvm();
    cmd.args([
        "probe",
        "--tcp",
        "--subnet",
        "198.18.0.24/30",
        "--target",
        &target,
        "--rate",
        "0",
        "--count",
        "200",
        "--json",
    ]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = wait_output_within(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["settings"]["protocol"], "tcp", "{v}");
    assert_eq!(
        (v["sent"].as_u64(), v["received"].as_u64()),
        (Some(200), Some(200)),
        "{v}"
    );
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["rtt"]["samples"], 200, "{v}");
    assert_eq!(v["timestamps"], "user", "{v}");
    // The warm-up and 200 requests of 64 bytes, each echoed whole.
    assert_eq!(server.join().unwrap(), 201 * 64);
    assert_eq!(leftovers(pid, [198, 18, 0, 24]), Vec::<String>::new());

    let out = output_within(
        rtvm().args(["probe", "--tcp", "--echo-server", "--count", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(text(&out.stderr).contains("--echo-server serves UDP only"));
}

/// Starts a 30 s probe, waits until it is measuring, sends `signal`, and
/// checks it ends promptly with 128 + signal, removing everything.
fn stops_cleanly_on(signal: i32, subnet: [u8; 4]) {
    let [a, b, c, d] = subnet;
    let mut child = rtvm()
        .args(["probe", "--echo-server", "--seconds", "30", "--subnet"])
        .arg(format!("{a}.{b}.{c}.{d}/30"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rtvm starts");
    let pid = child.id();
    let netns = PathBuf::from(format!("/var/run/netns/rtvm-probe-{pid}"));
    let host_if = PathBuf::from(format!("/sys/class/net/rtvp{pid}h"));
    let start = Instant::now();
    while !(netns.exists() && host_if.exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the namespace never appeared"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rtvm ended early: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let it get well into sending.
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, signal) };
    let sent = Instant::now();
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("rtvm did not end within 5 s of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(leftovers(pid, subnet), Vec::<String>::new());
}

#[test]
fn sigint_mid_run_exits_130_and_removes_everything() {
    let Some(_turn) = net_turn() else { return };
    stops_cleanly_on(libc::SIGINT, [198, 18, 0, 4]);
}

#[test]
fn sigterm_mid_run_exits_143_and_removes_everything() {
    let Some(_turn) = net_turn() else { return };
    stops_cleanly_on(libc::SIGTERM, [198, 18, 0, 8]);
}

#[test]
fn targets_outside_the_benchmarking_range_are_refused() {
    // No root needed: the refusal comes before anything is made or sent.
    for target in [
        "10.0.0.1:7",
        "8.8.8.8:53",
        "198.20.0.1:7000",
        "127.0.0.1:7000",
    ] {
        let start = Instant::now();
        let out = output_within(
            rtvm().args(["probe", "--target", target, "--seconds", "1"]),
            Duration::from_secs(30),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{target}: {stderr}");
        assert!(stderr.contains("198.18.0.0/15"), "{target}: {stderr}");
        assert!(out.stdout.is_empty(), "{target}: measured nothing");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{target}: refused at once"
        );
    }
}

#[test]
fn targets_off_the_probe_network_are_refused() {
    // In range but beyond the /30: nothing routes there.
    for (target, why) in [
        ("198.18.5.1:7000", "not on the probe's network"),
        ("198.18.0.2:7000", "the probe's own address"),
    ] {
        let out = output_within(
            rtvm().args(["probe", "--target", target]),
            Duration::from_secs(30),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{target}: {stderr}");
        assert!(stderr.contains(why), "{target}: {stderr}");
    }
    let out = output_within(
        rtvm().args(["probe", "--subnet", "10.0.0.0/30"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Issue #12: what a killed probe left (its namespace, its veth pair) is
/// removed by the next probe, not only warned about.
#[test]
fn a_dead_probes_namespace_is_removed_by_the_next_one() {
    let Some(_turn) = net_turn() else { return };
    // A process id that no longer runs.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    ip(&["netns", "add", &format!("rtvm-probe-{dead}")]);
    ip(&[
        "link",
        "add",
        &format!("rtvp{dead}h"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("rtvp{dead}p"),
    ]);
    assert_eq!(
        leftovers(dead, [198, 18, 0, 20]).len(),
        4,
        "netns, its file, two links"
    );
    let out = output_within(
        rtvm().args([
            "probe",
            "--subnet",
            "198.18.0.20/30",
            "--count",
            "2",
            "--timeout-ms",
            "20",
        ]),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("removed network namespace rtvm-probe-{dead}")),
        "{stderr}"
    );
    assert_eq!(leftovers(dead, [198, 18, 0, 20]), Vec::<String>::new());
}

#[test]
fn no_replies_is_an_error_and_still_cleans_up() {
    let Some(_turn) = net_turn() else { return };
    // Nothing listens on the host end: every request is lost.
    let child = rtvm()
        .args([
            "probe",
            "--subnet",
            "198.18.0.16/30",
            "--count",
            "20",
            "--timeout-ms",
            "20",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = wait_output_within(child, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no replies from 198.18.0.17:7000"),
        "{stderr}"
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sent"], 20);
    assert_eq!(json["received"], 0);
    assert_eq!(json["lost"], 20);
    assert!(json["rtt"].is_null());
    assert_eq!(leftovers(pid, [198, 18, 0, 16]), Vec::<String>::new());
}
