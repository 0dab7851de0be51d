//! The API's routes: what each path and method does. [`ROUTES`] lists them
//! all; `openapi.json` must describe exactly these (a test checks).

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use rtvm_vmm::config::{RtPolicy, VmConfig};
use rtvm_vmm::{GuestSpec, RunningVm};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{Handler, Request, Response};
use super::{Control, Phase, StartRequest};
use crate::flags::RtVcpuArg;

/// Every path and the methods it answers.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/", &["GET"]),
    ("/vm", &["PATCH"]),
    ("/vm/config", &["GET"]),
    ("/vcpus", &["GET"]),
    ("/metrics", &["GET"]),
    ("/actions", &["PUT"]),
    ("/boot-source", &["PUT"]),
    ("/machine-config", &["PUT"]),
    ("/openapi.json", &["GET"]),
];

/// How long a pause may take before the API says it failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stop may take (the vCPUs' grace, and the teardown).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long building and starting a VM may take.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Api {
    pub control: std::sync::Arc<Control>,
}

impl Handler for Api {
    fn handle(&self, request: &Request) -> Response {
        let Some((_, methods)) = ROUTES.iter().find(|(p, _)| *p == request.path) else {
            return Response::error(404, format!("no such resource: {}", request.path));
        };
        if !methods.contains(&request.method.as_str()) {
            let mut r = Response::error(
                405,
                format!("{} does not answer {}", request.path, request.method),
            );
            r.headers.push(format!("Allow: {}", methods.join(", ")));
            return r;
        }
        let response = match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/") => self.info(),
            ("PATCH", "/vm") => body(request).and_then(|b| self.patch_vm(b)),
            ("GET", "/vm/config") => self.config(),
            ("GET", "/vcpus") => self.vcpus(),
            ("GET", "/metrics") => Ok(Response::text(
                200,
                "text/plain; version=0.0.4",
                super::metrics::render(&self.control),
            )),
            ("PUT", "/actions") => body(request).and_then(|b| self.action(b)),
            ("PUT", "/boot-source") => body(request).and_then(|b| self.boot_source(b)),
            ("PUT", "/machine-config") => body(request).and_then(|b| self.machine_config(b)),
            ("GET", "/openapi.json") => Ok(Response::text(
                200,
                "application/json",
                super::OPENAPI.to_string(),
            )),
            _ => Err(Response::error(500, "route without a handler")),
        };
        response.unwrap_or_else(|r| r)
    }
}

/// The request's JSON body as `T`, or a 400 naming what is wrong.
fn body<'a, T: Deserialize<'a>>(request: &'a Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body)
        .map_err(|e| Response::error(400, format!("bad request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSource {
    kernel_image_path: Option<PathBuf>,
    initrd_path: Option<PathBuf>,
    /// `builtin:NAME`: a workload of the built-in guest.
    guest: Option<String>,
    boot_args: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfig {
    vcpu_count: Option<usize>,
    mem_size_mib: Option<u64>,
    rt_vcpus: Option<Vec<RtVcpu>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RtVcpu {
    index: usize,
    priority: u8,
    cpu: Option<usize>,
}

fn not_running() -> Response {
    Response::error(400, "no VM is running")
}

fn pre_boot_only() -> Response {
    Response::error(
        400,
        "the VM has been started: this can only be set before InstanceStart",
    )
}

impl Api {
    fn vm(&self) -> Result<std::sync::Arc<RunningVm>, Response> {
        self.control.vm().ok_or_else(not_running)
    }

    fn info(&self) -> Result<Response, Response> {
        let phase = self.control.lock();
        let mut info = json!({
            "app_name": "rtvm",
            "id": format!("rtvm-{}", std::process::id()),
            "state": phase.name(),
            "vmm_version": env!("CARGO_PKG_VERSION"),
        });
        match &*phase {
            Phase::Running { vm, .. } => {
                info["uptime_ms"] = json!(vm.uptime().as_millis() as u64);
            }
            Phase::Ended(status) => info["exit"] = status.clone(),
            _ => {}
        }
        Ok(Response::json(200, &info))
    }

    fn patch_vm(&self, state: VmState) -> Result<Response, Response> {
        let vm = self.vm()?;
        let paused = match state.state.as_str() {
            "Paused" => {
                if !vm.pause(PAUSE_TIMEOUT) {
                    return Err(Response::error(
                        500,
                        format!("not every vCPU paused within {PAUSE_TIMEOUT:?}"),
                    ));
                }
                true
            }
            "Resumed" => {
                vm.resume();
                false
            }
            other => {
                return Err(Response::error(
                    400,
                    format!("state '{other}': expected Paused or Resumed"),
                ))
            }
        };
        if let Phase::Running { paused: p, .. } = &mut *self.control.lock() {
            *p = paused;
        }
        Ok(Response::no_content())
    }

    fn action(&self, action: Action) -> Result<Response, Response> {
        match action.action_type.as_str() {
            "InstanceStart" => self.instance_start(),
            "Stop" => {
                self.vm()?.request_stop();
                match self.control.wait_ended(STOP_TIMEOUT) {
                    Some(status) => Ok(Response::json(200, &status)),
                    None => Err(Response::error(
                        500,
                        format!("the VM did not end within {STOP_TIMEOUT:?}"),
                    )),
                }
            }
            other => Err(Response::error(
                400,
                format!("action_type '{other}': expected InstanceStart or Stop"),
            )),
        }
    }

    fn instance_start(&self) -> Result<Response, Response> {
        let (config, args) = {
            let mut phase = self.control.lock();
            let Phase::Configuring(args) = &*phase else {
                return Err(Response::error(
                    400,
                    format!("the VM cannot start: it is {}", phase.name()),
                ));
            };
            let config = args.to_config().map_err(|e| {
                Response::error(
                    400,
                    format!("the configuration is not complete or not valid: {e}"),
                )
            })?;
            let args = args.clone();
            *phase = Phase::Starting;
            (config, args)
        };
        // A start that fails leaves the configuration as it was.
        let restore = |control: &Control| control.set(Phase::Configuring(args.clone()));
        let (reply, replies) = mpsc::channel();
        let sent = self
            .control
            .start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(StartRequest {
                config: Box::new(config),
                reply,
            });
        if sent.is_err() {
            return Err(Response::error(500, "the VMM is shutting down"));
        }
        match replies.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(Response::no_content()),
            Ok(Err(e)) => {
                restore(&self.control);
                Err(Response::error(400, format!("the VM did not start: {e}")))
            }
            Err(_) => {
                // If it starts after all, the main thread says Running.
                restore(&self.control);
                Err(Response::error(500, "the VM did not start in time"))
            }
        }
    }

    fn boot_source(&self, source: BootSource) -> Result<Response, Response> {
        let mut phase = self.control.lock();
        let Phase::Configuring(args) = &mut *phase else {
            return Err(pre_boot_only());
        };
        match (&source.kernel_image_path, &source.guest) {
            (Some(kernel), None) => {
                args.kernel = Some(kernel.clone());
                args.guest = None;
                args.initramfs = source.initrd_path.clone();
            }
            (None, Some(guest)) => {
                if source.initrd_path.is_some() {
                    return Err(Response::error(
                        400,
                        "initrd_path goes with kernel_image_path, not with guest",
                    ));
                }
                let spec: GuestSpec = guest
                    .parse()
                    .map_err(|e| Response::error(400, format!("guest '{guest}': {e}")))?;
                args.guest = Some(spec);
                args.kernel = None;
                args.initramfs = None;
            }
            _ => {
                return Err(Response::error(
                    400,
                    "give either kernel_image_path (with initrd_path) or guest (builtin:NAME)",
                ))
            }
        }
        args.cmdline = source.boot_args;
        Ok(Response::no_content())
    }

    fn machine_config(&self, machine: MachineConfig) -> Result<Response, Response> {
        let mut rt = Vec::new();
        for v in machine.rt_vcpus.iter().flatten() {
            let policy = RtPolicy {
                priority: v.priority,
                cpu: v.cpu,
            };
            policy
                .validate()
                .map_err(|e| Response::error(400, format!("rt_vcpus[{}]: {e}", v.index)))?;
            rt.push(RtVcpuArg {
                vcpu: v.index,
                policy,
            });
        }
        let mut phase = self.control.lock();
        let Phase::Configuring(args) = &mut *phase else {
            return Err(pre_boot_only());
        };
        if let Some(n) = machine.vcpu_count {
            args.vcpus = Some(n);
        }
        if let Some(mib) = machine.mem_size_mib {
            let bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| Response::error(400, "mem_size_mib is too large"))?;
            args.memory = Some(bytes);
        }
        if machine.rt_vcpus.is_some() {
            args.rt_vcpus = rt;
        }
        Ok(Response::no_content())
    }

    fn config(&self) -> Result<Response, Response> {
        let phase = self.control.lock();
        let config = match &*phase {
            Phase::Running { config, .. } => (**config).clone(),
            Phase::Configuring(args) => match args.to_config() {
                Ok(c) => c,
                // Not complete yet: what has been set so far.
                Err(e) => {
                    return Ok(Response::json(
                        200,
                        &json!({
                            "complete": false,
                            "missing": e.to_string(),
                            "boot-source": {
                                "kernel_image_path": args.kernel,
                                "initrd_path": args.initramfs,
                                "guest": args.guest.as_ref().map(|g| g.to_string()),
                                "boot_args": args.cmdline,
                            },
                            "machine-config": {
                                "vcpu_count": args.vcpus,
                                "mem_size_mib": args.memory.map(|m| m >> 20),
                                "rt_vcpus": args.rt_vcpus.iter().map(|r| json!({
                                    "index": r.vcpu,
                                    "priority": r.policy.priority,
                                    "cpu": r.policy.cpu,
                                })).collect::<Vec<_>>(),
                            },
                        }),
                    ))
                }
            },
            _ => return Err(Response::error(400, format!("the VM is {}", phase.name()))),
        };
        Ok(Response::json(200, &config_json(&config)))
    }

    fn vcpus(&self) -> Result<Response, Response> {
        let vm = self.vm()?;
        let config = match &*self.control.lock() {
            Phase::Running { config, .. } => (**config).clone(),
            _ => return Err(not_running()),
        };
        let list: Vec<Value> = vm
            .vcpus()
            .iter()
            .map(|v| {
                let tid = v.thread_id();
                let activity = v.activity();
                let serving = activity.call().map(|(n, call)| match call {
                    Some(c) => format!("{c:?}"),
                    None => format!("call {n}"),
                });
                json!({
                    "index": v.index(),
                    "thread_id": tid,
                    "thread_name": format!("vcpu{}", v.index()),
                    "state": format!("{:?}", v.state()),
                    "rt_configured": config.rt_policy(v.index()).map(|p| json!({
                        "priority": p.priority,
                        "cpu": p.cpu,
                    })),
                    "applied": tid.map(thread_settings),
                    "timer_advance_ns": activity.timer_advance_ns(),
                    "serving_call": serving,
                    "cpu_time_ms": v.cpu_time().map(|d| d.as_secs_f64() * 1e3),
                })
            })
            .collect();
        Ok(Response::json(200, &Value::Array(list)))
    }
}

/// The effective configuration, with Firecracker's names for what it has.
pub fn config_json(c: &VmConfig) -> Value {
    let (kernel, guest) = match &c.guest {
        GuestSpec::Linux(path) => (Some(path.clone()), None),
        other => (None, Some(other.to_string())),
    };
    let rt_vcpus: Vec<Value> = (0..c.vcpus)
        .filter_map(|i| {
            c.rt_policy(i)
                .map(|p| json!({"index": i, "priority": p.priority, "cpu": p.cpu}))
        })
        .collect();
    // As the flags write them: ADDR[/LEN]:PORT[-HI], `*` for any.
    let rules = |rules: &[rtvm_vmm::config::AddrRule]| -> Vec<String> {
        rules
            .iter()
            .map(|r| {
                let net = match r.net {
                    None => "*".to_string(),
                    Some((ip, len)) if u32::from(len) == if ip.is_ipv4() { 32 } else { 128 } => {
                        ip.to_string()
                    }
                    Some((ip, len)) => format!("{ip}/{len}"),
                };
                let net = if net.contains(':') {
                    format!("[{net}]")
                } else {
                    net
                };
                let ports = match (*r.ports.start(), *r.ports.end()) {
                    (0, 65535) => "*".to_string(),
                    (lo, hi) if lo == hi => lo.to_string(),
                    (lo, hi) => format!("{lo}-{hi}"),
                };
                format!("{net}:{ports}")
            })
            .collect()
    };
    json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": c.initramfs,
            "guest": guest,
            "boot_args": c.cmdline,
        },
        "machine-config": {
            "vcpu_count": c.vcpus,
            "mem_size_mib": c.memory >> 20,
            "rt_vcpus": rt_vcpus,
        },
        "rt": {
            "bandwidth_us": {"runtime": c.rt_bandwidth.runtime_us, "period": c.rt_bandwidth.period_us},
            "strict": c.rt_strict,
            "allow_uncapped": c.rt_allow_uncapped,
            "mlock": c.mlock,
            "timer_advance": c.timer_advance.to_string(),
        },
        "memory": {
            "huge_pages": c.huge_pages.to_string(),
            "prefault": c.prefault,
        },
        "share": c.share.as_ref().map(|s| json!({
            "path": s.path,
            "read_only": s.read_only,
            "max_open_files": s.max_open_files,
            "max_bytes_per_call": s.max_bytes_per_call,
            "max_bytes_written": s.max_bytes_written,
        })),
        "net": {
            "bind": rules(&c.net.bind),
            "connect": rules(&c.net.connect),
            "max_sockets": c.net.max_sockets,
            "max_buffer": c.net.max_buffer,
        },
        "io_poller": {
            "enabled": c.io_poller.enabled,
            "spin_us": c.io_poller.spin_us,
            "priority": c.io_poller.rt.map(|p| p.priority),
            "cpu": c.io_poller.rt.and_then(|p| p.cpu),
        },
        "seccomp": c.seccomp.to_string(),
        "serial_log": c.serial_log,
        "kvm_device": c.kvm_device,
    })
}

/// What the kernel says of a thread of this process now: its scheduling
/// policy and priority, the CPUs it may run on, its cgroup, timer slack.
fn thread_settings(tid: i32) -> Value {
    // SAFETY: plain queries about a thread id; failures return -1.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a live sched_param.
    let priority =
        (unsafe { libc::sched_getparam(tid, &mut param) } == 0).then_some(param.sched_priority);
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size given.
    let cpus: Option<Vec<usize>> =
        (unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0)
            .then(|| {
                (0..libc::CPU_SETSIZE as usize)
                    // SAFETY: `set` is initialised; the index is in range.
                    .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                    .collect()
            });
    let task = format!("/proc/self/task/{tid}");
    let cgroup = std::fs::read_to_string(format!("{task}/cgroup"))
        .ok()
        .and_then(|text| {
            // cgroup v1's cpu controller, else the v2 line.
            let line = text
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == "cpu"))
                })
                .or_else(|| text.lines().find(|l| l.starts_with("0::")))?;
            Some(line.splitn(3, ':').nth(2)?.to_string())
        });
    // Per thread at /proc/TID (the task directory has no such file).
    let slack = std::fs::read_to_string(format!("/proc/{tid}/timerslack_ns"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    json!({
        "policy": match policy {
            libc::SCHED_OTHER => "SCHED_OTHER".to_string(),
            libc::SCHED_FIFO => "SCHED_FIFO".to_string(),
            libc::SCHED_RR => "SCHED_RR".to_string(),
            libc::SCHED_BATCH => "SCHED_BATCH".to_string(),
            libc::SCHED_IDLE => "SCHED_IDLE".to_string(),
            -1 => "unknown".to_string(),
            n => format!("policy {n}"),
        },
        "priority": priority,
        "cpus": cpus,
        "cgroup": cgroup,
        "timer_slack_ns": slack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route is documented in `openapi.json`, with exactly its
    /// methods, and the description documents nothing else.
    #[test]
    fn the_openapi_description_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(super::super::OPENAPI).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), ROUTES.len());
        for (path, methods) in ROUTES {
            let documented = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} is not documented"));
            let mut documented: Vec<String> = documented
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .collect();
            documented.sort();
            let mut served: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
            served.sort();
            assert_eq!(documented, served, "{path}");
        }
    }
}
