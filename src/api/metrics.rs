//! `GET /metrics`: the VM's counters in Prometheus' text exposition format
//! (version 0.0.4). Every figure is read from counters that are always on
//! (relaxed atomics the vCPUs and services bump as they go), so a scrape
//! costs the VM nothing.

use std::fmt::Write;

use rtvm_vmm::rpc::LATENESS_BOUNDS_US;

use super::{Control, Phase};

/// One metric family: its help line and type, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                // Label values here are names and numbers of ours: no
                // quote, backslash or newline to escape.
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

pub fn render(control: &Control) -> String {
    let mut out = String::new();
    let (state, vm) = {
        let phase = control.lock();
        let vm = match &*phase {
            Phase::Running { vm, .. } => Some(vm.clone()),
            _ => None,
        };
        (phase.name(), vm)
    };
    Family::new(
        &mut out,
        "rtvm_vm_state",
        "gauge",
        "1 for the VM's state now.",
    )
    .sample("rtvm_vm_state", &[("state", state)], 1);
    if let Some(rss) = rtvm_vmm::memory::process_rss() {
        Family::new(
            &mut out,
            "rtvm_process_resident_bytes",
            "gauge",
            "Resident memory of the rtvm process, guest RAM included.",
        )
        .sample("rtvm_process_resident_bytes", &[], rss);
    }
    let Some(vm) = vm else {
        return out;
    };
    Family::new(
        &mut out,
        "rtvm_uptime_seconds",
        "gauge",
        "Time since the vCPUs started.",
    )
    .sample("rtvm_uptime_seconds", &[], vm.uptime().as_secs_f64());

    let mut f = Family::new(
        &mut out,
        "rtvm_vcpu_exits_total",
        "counter",
        "Exits from KVM_RUN by vCPU and reason.",
    );
    for v in vm.vcpus() {
        let index = v.index().to_string();
        for (kind, count) in v.activity().exits() {
            f.sample(
                "rtvm_vcpu_exits_total",
                &[("vcpu", &index), ("reason", kind.name())],
                count,
            );
        }
    }
    let mut f = Family::new(
        &mut out,
        "rtvm_vcpu_cpu_seconds_total",
        "counter",
        "CPU time of each vCPU's host thread (host and guest mode).",
    );
    for v in vm.vcpus() {
        if let Some(t) = v.cpu_time() {
            f.sample(
                "rtvm_vcpu_cpu_seconds_total",
                &[("vcpu", &v.index().to_string())],
                t.as_secs_f64(),
            );
        }
    }
    let mut f = Family::new(
        &mut out,
        "rtvm_timer_advance_ns",
        "gauge",
        "The timer advance in force on each vCPU (its last timer wait's).",
    );
    for v in vm.vcpus() {
        f.sample(
            "rtvm_timer_advance_ns",
            &[("vcpu", &v.index().to_string())],
            v.activity().timer_advance_ns(),
        );
    }

    let calls = vm.calls();
    let mut f = Family::new(
        &mut out,
        "rtvm_vmrpc_calls_total",
        "counter",
        "VMRPC calls answered, by call and status (ok or refused).",
    );
    for (call, count) in &calls.calls {
        let refused = calls
            .refused_by_call
            .iter()
            .find(|(c, _)| c == call)
            .map_or(0, |(_, n)| *n);
        let name = format!("{call:?}");
        f.sample(
            "rtvm_vmrpc_calls_total",
            &[("call", &name), ("status", "ok")],
            count - refused.min(*count),
        );
        if refused > 0 {
            f.sample(
                "rtvm_vmrpc_calls_total",
                &[("call", &name), ("status", "refused")],
                refused,
            );
        }
    }
    Family::new(
        &mut out,
        "rtvm_vmrpc_refused_total",
        "counter",
        "VMRPC calls answered with a status other than Ok (unknown call numbers included).",
    )
    .sample("rtvm_vmrpc_refused_total", &[], calls.refused);
    Family::new(
        &mut out,
        "rtvm_long_polls_total",
        "counter",
        "Timer waits served as long polls.",
    )
    .sample("rtvm_long_polls_total", &[], calls.long_polls);
    let mut f = Family::new(
        &mut out,
        "rtvm_long_poll_lateness_us",
        "histogram",
        "How long after its deadline each timer long poll handed control back, in microseconds.",
    );
    let mut cumulative = 0;
    for (bound, count) in LATENESS_BOUNDS_US.iter().zip(&calls.lateness.buckets) {
        cumulative += count;
        f.sample(
            "rtvm_long_poll_lateness_us_bucket",
            &[("le", &bound.to_string())],
            cumulative,
        );
    }
    f.sample(
        "rtvm_long_poll_lateness_us_bucket",
        &[("le", "+Inf")],
        calls.lateness.count(),
    );
    f.sample(
        "rtvm_long_poll_lateness_us_sum",
        &[],
        calls.lateness.sum_ns as f64 / 1e3,
    );
    f.sample(
        "rtvm_long_poll_lateness_us_count",
        &[],
        calls.lateness.count(),
    );
    let mut f = Family::new(
        &mut out,
        "rtvm_io_parks_total",
        "counter",
        "Socket calls' waits for I/O that parked each vCPU in the host.",
    );
    for (vcpu, parks) in calls.io_parks.iter().enumerate() {
        f.sample("rtvm_io_parks_total", &[("vcpu", &vcpu.to_string())], parks);
    }
    Family::new(
        &mut out,
        "rtvm_open_sockets",
        "gauge",
        "Host sockets the guest holds open.",
    )
    .sample("rtvm_open_sockets", &[], vm.open_sockets());
    if let Some((files, written)) = vm.share_use() {
        Family::new(
            &mut out,
            "rtvm_open_files",
            "gauge",
            "Files the guest holds open in its share.",
        )
        .sample("rtvm_open_files", &[], files);
        Family::new(
            &mut out,
            "rtvm_share_written_bytes",
            "gauge",
            "Bytes the guest has written into its share (charged to its quota).",
        )
        .sample("rtvm_share_written_bytes", &[], written);
    }
    let rings = vm.rings();
    let mut f = Family::new(
        &mut out,
        "rtvm_io_ring_operations_total",
        "counter",
        "Exitless I/O ring work: submissions taken, completions written, kicks.",
    );
    for (what, n) in [
        ("submission", rings.submissions),
        ("completion", rings.completions),
        ("kick", rings.kicks),
    ] {
        f.sample("rtvm_io_ring_operations_total", &[("kind", what)], n);
    }
    Family::new(
        &mut out,
        "rtvm_io_rings",
        "gauge",
        "I/O rings the guest has set up.",
    )
    .sample("rtvm_io_rings", &[], rings.rings);
    if let Some(cpu) = vm.poller_cpu() {
        Family::new(
            &mut out,
            "rtvm_io_poller_cpu_seconds_total",
            "counter",
            "CPU time of the I/O poller thread.",
        )
        .sample("rtvm_io_poller_cpu_seconds_total", &[], cpu.as_secs_f64());
    }
    out
}
