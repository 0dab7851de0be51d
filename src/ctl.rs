//! `rtvm ctl`: the management API's client for people (tables) and scripts
//! (`--json`), as ch-remote is Cloud Hypervisor's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::flags::RtVcpuArg;

#[derive(Args)]
pub struct CtlArgs {
    /// The API socket of an `rtvm run --api-sock PATH`.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Print the API's JSON (or metrics text) as it came.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The VMM's version and the VM's state.
    Info,
    /// Each vCPU's host thread and its real-time settings as applied.
    Vcpus,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Stop the VM; prints how it ended.
    Stop,
    /// The Prometheus metrics.
    Metrics,
    /// Configure (what is given) and start a VM that waits for it.
    Start(StartArgs),
}

#[derive(Args)]
struct StartArgs {
    /// builtin:NAME, a workload of the built-in guest.
    #[arg(long, value_name = "SPEC", conflicts_with = "kernel")]
    guest: Option<String>,
    /// A Linux kernel.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    #[arg(long, value_name = "ARGS")]
    cmdline: Option<String>,
    #[arg(long, value_name = "N")]
    vcpus: Option<usize>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// INDEX:prio=P[,cpu=C], as for `rtvm run`.
    #[arg(long = "rt-vcpu", value_name = "SPEC")]
    rt_vcpus: Vec<RtVcpuArg>,
}

/// A response: status and body.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// One request over a fresh connection (the API closes each).
fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the API at {}: {e}", socket.display()))?;
    // A stop waits for the VM's teardown: generous, but never for ever.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(|e| format!("sending to the API: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("reading the API's answer: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("the API's answer is not HTTP".into()),
    };
    Ok(Reply {
        status: response.code.unwrap_or(0),
        body: raw[head..].to_vec(),
    })
}

pub fn run(args: &CtlArgs) -> ExitCode {
    match ctl(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtvm ctl: {e}");
            ExitCode::from(crate::EXIT_HOST_ERROR)
        }
    }
}

fn ctl(args: &CtlArgs) -> Result<(), String> {
    let socket = &args.api_sock;
    let call = |method, path, body: Option<Value>| -> Result<Reply, String> {
        let reply = request(socket, method, path, body.as_ref())?;
        if reply.status >= 400 {
            return Err(format!(
                "{method} {path}: {} ({})",
                reply.fault(),
                reply.status
            ));
        }
        Ok(reply)
    };
    match &args.command {
        CtlCommand::Info => {
            let reply = call("GET", "/", None)?;
            if args.json {
                print!("{}", String::from_utf8_lossy(&reply.body));
            } else {
                let info = reply.json();
                let mut line = format!(
                    "rtvm {}: {}",
                    info["vmm_version"].as_str().unwrap_or("?"),
                    info["state"].as_str().unwrap_or("?")
                );
                if let Some(ms) = info["uptime_ms"].as_u64() {
                    line.push_str(&format!(", up {:.1} s", ms as f64 / 1e3));
                }
                println!("{line}");
            }
        }
        CtlCommand::Vcpus => {
            let reply = call("GET", "/vcpus", None)?;
            if args.json {
                print!("{}", String::from_utf8_lossy(&reply.body));
            } else {
                print!("{}", vcpu_table(&reply.json()));
            }
        }
        CtlCommand::Pause | CtlCommand::Resume => {
            let (state, said) = match args.command {
                CtlCommand::Pause => ("Paused", "paused"),
                _ => ("Resumed", "resumed"),
            };
            call("PATCH", "/vm", Some(json!({ "state": state })))?;
            if !args.json {
                println!("{said}");
            }
        }
        CtlCommand::Stop => {
            let reply = call("PUT", "/actions", Some(json!({"action_type": "Stop"})))?;
            let status = reply.json();
            if args.json {
                print!("{}", String::from_utf8_lossy(&reply.body));
            } else {
                println!(
                    "stopped: {} (status {})",
                    status["exit_reason"].as_str().unwrap_or("?"),
                    status["exit_code"]
                );
            }
        }
        CtlCommand::Metrics => {
            let reply = call("GET", "/metrics", None)?;
            print!("{}", String::from_utf8_lossy(&reply.body));
        }
        CtlCommand::Start(start) => {
            let mut source = serde_json::Map::new();
            if let Some(g) = &start.guest {
                source.insert("guest".into(), json!(g));
            }
            if let Some(k) = &start.kernel {
                source.insert("kernel_image_path".into(), json!(k));
            }
            if let Some(i) = &start.initramfs {
                source.insert("initrd_path".into(), json!(i));
            }
            if let Some(c) = &start.cmdline {
                source.insert("boot_args".into(), json!(c));
            }
            if !source.is_empty() {
                call("PUT", "/boot-source", Some(Value::Object(source)))?;
            }
            let mut machine = serde_json::Map::new();
            if let Some(n) = start.vcpus {
                machine.insert("vcpu_count".into(), json!(n));
            }
            if let Some(m) = start.memory_mib {
                machine.insert("mem_size_mib".into(), json!(m));
            }
            if !start.rt_vcpus.is_empty() {
                let rt: Vec<Value> = start
                    .rt_vcpus
                    .iter()
                    .map(|r| json!({"index": r.vcpu, "priority": r.policy.priority, "cpu": r.policy.cpu}))
                    .collect();
                machine.insert("rt_vcpus".into(), Value::Array(rt));
            }
            if !machine.is_empty() {
                call("PUT", "/machine-config", Some(Value::Object(machine)))?;
            }
            call(
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"})),
            )?;
            if !args.json {
                println!("started");
            }
        }
    }
    Ok(())
}

/// The vCPUs as a table for people.
fn vcpu_table(vcpus: &Value) -> String {
    let mut out = format!(
        "{:<5} {:>8} {:<8} {:<11} {:>4} {:<9} {:>10} {:>11} {:<10} {}\n",
        "vcpu",
        "tid",
        "state",
        "policy",
        "prio",
        "cpus",
        "slack_ns",
        "advance_ns",
        "serving",
        "cgroup"
    );
    for v in vcpus.as_array().into_iter().flatten() {
        let applied = &v["applied"];
        let cpus = applied["cpus"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "-".into());
        let text = |v: &Value| match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push_str(&format!(
            "{:<5} {:>8} {:<8} {:<11} {:>4} {:<9} {:>10} {:>11} {:<10} {}\n",
            text(&v["index"]),
            text(&v["thread_id"]),
            text(&v["state"]),
            text(&applied["policy"]),
            text(&applied["priority"]),
            cpus,
            text(&applied["timer_slack_ns"]),
            text(&v["timer_advance_ns"]),
            text(&v["serving_call"]),
            text(&applied["cgroup"]),
        ));
    }
    out
}
