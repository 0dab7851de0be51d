//! The management API (`rtvm run --api-sock`) driven by real clients: curl,
//! `rtvm ctl`, and raw sockets playing bad clients. `/metrics` is read with
//! a Prometheus parser, as a scraper would.

mod support;
use support::{rtvm, temp_path, text, wait_output_within};

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtvm_vmm::need_kvm;
use serde_json::Value;

/// Held by the tests whose VM has an RT vCPU: each VM's RT cgroup takes
/// 40% of the kernel's 95% RT budget, so a third at once would be refused
/// its start (as it must), and tests run in parallel.
fn rt_vm() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running `rtvm run --api-sock`, killed if a test fails half-way.
struct Api {
    child: Option<Child>,
    socket: PathBuf,
}

impl Api {
    fn start(name: &str, extra: &[&str]) -> Api {
        let socket = temp_path(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let child = rtvm()
            .args(["run", "--api-sock"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rtvm starts");
        // Up when the socket answers (a hang here ends in the assert).
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the API socket never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Api {
            child: Some(child),
            socket,
        }
    }

    /// `curl` against the socket: the HTTP status and the body.
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method, "-w", "\n%{http_code}"]);
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", body]);
        }
        cmd.arg(format!("http://localhost{path}"));
        let out = cmd.output().expect("curl runs (CI installs it)");
        assert!(out.status.success(), "curl: {}", text(&out.stderr));
        let all = text(&out.stdout);
        let (body, code) = all.rsplit_once('\n').expect("the status line");
        (code.trim().parse().expect("a status"), body.to_string())
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, text) = self.curl(method, path, body);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
        };
        (status, value)
    }

    /// `PUT /actions {"action_type": "InstanceStart"}`.
    fn instance_start(&self) -> (u16, Value) {
        self.json(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        )
    }

    fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, text) = self.curl("GET", "/metrics", None);
        assert_eq!(status, 200);
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("Prometheus text")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        support::output_within(
            rtvm()
                .args(["ctl", "--api-sock"])
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(90),
        )
    }

    /// Waits for the process to end (after a stop): its output.
    fn wait(mut self) -> Output {
        wait_output_within(self.child.take().unwrap(), Duration::from_secs(60))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The value of the sample of `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn wait_next_calls(api: &Api) -> f64 {
    sample(
        &api.metrics(),
        "rtvm_vmrpc_calls_total",
        &[("call", "WaitNext"), ("status", "ok")],
    )
    .unwrap_or(0.0)
}

/// Polls `f` until it holds (a hang ends in the assert, never a timing
/// check on a healthy machine).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn thread_name(tid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Issue #15's scenario: start with no guest, configure and start a 2-vCPU
/// VM with an RT vCPU through curl, read /vcpus and /metrics while it runs,
/// pause, resume, stop, get the status.
#[test]
fn curl_configures_starts_observes_pauses_resumes_and_stops_a_vm() {
    need_kvm!();
    let _rt = rt_vm();
    let api = Api::start("scenario", &[]);
    let mode = std::fs::metadata(&api.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (status, info) = api.json("GET", "/", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("Not started")));
    // Not configured yet: starting says what is missing.
    let (status, err) = api.instance_start();
    assert_eq!(status, 400, "{err}");
    assert!(
        err["fault_message"].as_str().unwrap().contains("guest"),
        "{err}"
    );
    // A guest that does not exist: the start fails, says why, and leaves
    // the configuration to be fixed.
    let (status, _) = api.json(
        "PUT",
        "/boot-source",
        Some(r#"{"guest":"builtin:no-such"}"#),
    );
    assert_eq!(status, 204);
    let (status, err) = api.instance_start();
    assert_eq!(status, 400, "{err}");
    assert!(
        err["fault_message"].as_str().unwrap().contains("no-such"),
        "{err}"
    );
    let (_, info) = api.json("GET", "/", None);
    assert_eq!(info["state"], "Not started");
    let (status, _) = api.json(
        "PUT",
        "/boot-source",
        Some(r#"{"guest":"builtin:periodic","boot_args":"count=1000000 period=1000000"}"#),
    );
    assert_eq!(status, 204);
    let (status, _) = api.json(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":2,"mem_size_mib":64,"rt_vcpus":[{"index":1,"priority":80}]}"#),
    );
    assert_eq!(status, 204);
    let (_, config) = api.json("GET", "/vm/config", None);
    assert_eq!(config["machine-config"]["vcpu_count"], 2, "{config}");
    assert_eq!(
        config["boot-source"]["guest"], "builtin:periodic",
        "{config}"
    );
    let (status, body) = api.instance_start();
    assert_eq!(status, 204, "{body}");
    let (_, info) = api.json("GET", "/", None);
    assert_eq!(info["state"], "Running");
    // Pre-boot settings are refused once it runs.
    let (status, _) = api.json("PUT", "/machine-config", Some(r#"{"vcpu_count":1}"#));
    assert_eq!(status, 400);

    let (status, vcpus) = api.json("GET", "/vcpus", None);
    assert_eq!(status, 200);
    let vcpus = vcpus.as_array().expect("a list").clone();
    assert_eq!(vcpus.len(), 2);
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["index"], i);
        let tid = v["thread_id"].as_u64().expect("a thread id");
        assert_eq!(thread_name(tid), format!("vcpu{i}"), "{v}");
    }
    assert_eq!(vcpus[1]["applied"]["policy"], "SCHED_FIFO", "{}", vcpus[1]);
    assert_eq!(vcpus[1]["applied"]["priority"], 80);
    assert_eq!(vcpus[1]["rt_configured"]["priority"], 80);
    assert_eq!(vcpus[0]["applied"]["policy"], "SCHED_OTHER");

    // The RT task long-polls: the metrics count it.
    eventually("WaitNext calls counted", || wait_next_calls(&api) > 10.0);
    let m = api.metrics();
    assert!(
        sample(
            &m,
            "rtvm_vcpu_exits_total",
            &[("vcpu", "1"), ("reason", "vmrpc_doorbell")]
        )
        .unwrap()
            > 10.0
    );
    assert!(sample(&m, "rtvm_long_polls_total", &[]).unwrap() > 10.0);
    assert!(sample(&m, "rtvm_process_resident_bytes", &[]).unwrap() > 0.0);
    let lateness = m
        .samples
        .iter()
        .find(|s| s.metric == "rtvm_long_poll_lateness_us")
        .expect("the lateness histogram");
    match &lateness.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let all = buckets.last().unwrap();
            assert!(
                all.less_than.is_infinite() && all.count > 10.0,
                "{buckets:?}"
            );
        }
        other => panic!("lateness is not a histogram: {other:?}"),
    }

    // Paused: the RT task makes no call; resumed: it goes on.
    let (status, _) = api.json("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(status, 204);
    let (_, info) = api.json("GET", "/", None);
    assert_eq!(info["state"], "Paused");
    let (_, vcpus) = api.json("GET", "/vcpus", None);
    assert!(
        vcpus
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "Paused"),
        "{vcpus}"
    );
    let frozen = wait_next_calls(&api);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(wait_next_calls(&api), frozen, "a paused RT vCPU called");
    let (status, _) = api.json("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(status, 204);
    eventually("calls after the resume", || wait_next_calls(&api) > frozen);

    let (status, end) = api.json("PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
    assert_eq!(status, 200, "{end}");
    assert_eq!(end["exit_code"], 0, "{end}");
    assert_eq!(end["exit_reason"], "stopped by the VMM", "{end}");
    let socket = api.socket.clone();
    let out = api.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!socket.exists(), "the socket is removed at the end");
}

/// `rtvm ctl` does the same for a person; and a pause does not move the RT
/// task out of phase (the guest checks every deadline and fails if one is).
#[test]
fn rtvm_ctl_starts_reads_pauses_resumes_and_the_rt_task_stays_in_phase() {
    need_kvm!();
    let _rt = rt_vm();
    let api = Api::start("ctl", &[]);
    let out = api.ctl(&[
        "start",
        "--guest",
        "builtin:periodic",
        "--cmdline",
        "count=8000 period=1000000",
        "--vcpus",
        "2",
        "--rt-vcpu",
        "1:prio=80",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "started\n");
    let out = api.ctl(&["vcpus"]);
    let table = text(&out.stdout);
    assert!(table.starts_with("vcpu "), "{table}");
    assert!(
        table.lines().nth(2).unwrap().contains("SCHED_FIFO"),
        "{table}"
    );
    let out = api.ctl(&["--json", "info"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(text(&api.ctl(&["pause"]).stdout), "paused\n");
    assert!(text(&api.ctl(&["info"]).stdout).contains("Paused"));
    // Long enough for deadlines to pass while paused (any length will do).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(text(&api.ctl(&["resume"]).stdout), "resumed\n");
    let metrics = text(&api.ctl(&["metrics"]).stdout);
    assert!(
        metrics.contains("rtvm_vmrpc_calls_total{call=\"WaitNext\""),
        "{metrics}"
    );
    // The guest ends on its own: in phase, the pause's deadlines missed.
    let out = api.wait();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let missed: u64 = stdout
        .split("missed=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the periodic summary");
    assert!(missed > 0, "the pause missed no deadline: {stdout}");
    assert!(!stdout.contains("out of phase"), "{stdout}");
}

/// One raw request; the status line's code and the whole answer. The
/// server may answer and close before a too-large request is all written
/// (413, 431): the write's error is then expected, the answer still read.
fn raw(socket: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// Bad clients get their status and never harm the VM: malformed HTTP,
/// unknown paths and methods, bad JSON, huge bodies, a client that stalls
/// half-way, clients that vanish, more clients than the server holds.
#[test]
fn bad_clients_get_errors_and_the_vm_runs_on() {
    need_kvm!();
    let api = Api::start(
        "bad",
        &[
            "--guest",
            "builtin:periodic",
            "--cmdline",
            "count=1000000",
            "--vcpus",
            "2",
        ],
    );
    let s = &api.socket;
    assert_eq!(raw(s, b"NOT HTTP AT ALL\r\n\r\n").0, 400);
    assert_eq!(raw(s, b"GET /nowhere HTTP/1.1\r\n\r\n").0, 404);
    let (code, answer) = raw(s, b"DELETE /vm HTTP/1.1\r\n\r\n");
    assert_eq!(code, 405);
    assert!(answer.contains("Allow: PATCH"), "{answer}");
    assert_eq!(api.curl("PATCH", "/vm", Some("{not json")).0, 400);
    assert_eq!(
        api.curl("PATCH", "/vm", Some(r#"{"state":"Sleeping"}"#)).0,
        400
    );
    assert_eq!(
        api.curl("PATCH", "/vm", Some(r#"{"state":"Paused","x":1}"#))
            .0,
        400
    );
    assert_eq!(
        api.curl("PUT", "/actions", Some(r#"{"action_type":"Reboot"}"#))
            .0,
        400
    );
    assert_eq!(
        raw(
            s,
            b"PUT /actions HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n"
        )
        .0,
        413
    );
    let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(raw(s, long.as_bytes()).0, 431);
    // A body larger than announced and the head split across writes.
    let mut split = UnixStream::connect(s).unwrap();
    split.write_all(b"GET / HT").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    split.write_all(b"TP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    split.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Stalled clients (half a request, never finished) and vanished ones
    // (gone before their answer) hold the server for no one: up to its
    // limit they wait their turn, beyond it they are told so at once.
    let stalled: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut c = UnixStream::connect(s).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let (code, answer) = raw(s, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(code, 503, "{answer}");
    drop(stalled);
    for _ in 0..20 {
        let mut gone = UnixStream::connect(s).unwrap();
        gone.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    }
    eventually("the server serves again", || {
        raw(s, b"GET / HTTP/1.1\r\n\r\n").0 == 200
    });
    // The API thread is confined like every other (seccomp filter mode 2).
    let pid = api.child.as_ref().unwrap().id();
    let confined = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            (comm.trim() == "rtvm-api").then(|| status.contains("Seccomp:\t2"))
        })
        .collect::<Vec<_>>();
    assert_eq!(confined, [true], "the API thread and its seccomp filter");
    // The VM ran on through all of it.
    let before = wait_next_calls(&api);
    eventually("the RT task goes on", || wait_next_calls(&api) > before);
    let (status, end) = api.json("PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
    assert_eq!((status, end["exit_code"].as_u64()), (200, Some(0)), "{end}");
    assert_eq!(api.wait().status.code(), Some(0));
}

/// The socket path is checked before anything starts: a file that is not
/// a socket is never replaced; a live socket is never taken over.
#[test]
fn the_api_socket_refuses_a_path_that_is_not_a_stale_socket() {
    let path = temp_path("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let out = support::output_within(
        rtvm().args(["run", "--api-sock"]).arg(&path),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is not a socket"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

/// The OpenAPI description and the server agree: every documented path
/// and method answers (not 404/405), and what is not documented is 404.
#[test]
fn every_documented_route_answers_and_nothing_else_does() {
    let api = Api::start("openapi", &[]);
    let (status, doc) = api.json("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let repo: Value =
        serde_json::from_str(&std::fs::read_to_string("src/api/openapi.json").unwrap()).unwrap();
    assert_eq!(doc, repo, "the served description is the repository's");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 9);
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            let body = (method != "GET").then_some("{}");
            let (status, answer) = api.curl(&method, path, body);
            assert!(
                status != 404 && status != 405,
                "{method} {path}: {status} {answer}"
            );
        }
        // A method it does not document is refused.
        let (status, _) = api.curl("DELETE", path, None);
        assert_eq!(status, 405, "DELETE {path}");
    }
    assert_eq!(api.curl("GET", "/undocumented", None).0, 404);
}

/// The share's use shows in the metrics while the guest writes there.
#[test]
fn metrics_count_the_guests_files_in_its_share() {
    need_kvm!();
    let dir = temp_path("share");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let share = dir.to_str().unwrap().to_string();
    let api = Api::start(
        "share",
        &[
            "--guest",
            "builtin:logger",
            "--cmdline",
            "count=1000000",
            "--vcpus",
            "2",
            "--share",
            &share,
        ],
    );
    eventually("the guest's writes counted", || {
        let m = api.metrics();
        sample(&m, "rtvm_open_files", &[]).unwrap_or(0.0) >= 1.0
            && sample(&m, "rtvm_share_written_bytes", &[]).unwrap_or(0.0) > 0.0
    });
    // `rtvm ctl stop` says how the VM ended, for a person.
    let out = api.ctl(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "stopped: stopped by the VMM (status 0)\n"
    );
    assert_eq!(api.wait().status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}
