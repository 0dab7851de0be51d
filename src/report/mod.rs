//! What benchmarks and the probe report, and how: latency statistics,
//! histograms, SVG plots, the machine the figures come from, and one
//! path's measurement.

pub mod histogram;
pub mod plot;
pub mod stats;

use rtvm_vmm::host::HostInfo;
use serde_json::{json, Value};

use stats::Stats;

/// One path's measurement.
pub struct PathResult {
    pub name: &'static str,
    pub late_ns: Vec<u64>,
    pub missed: u64,
    /// The host's own record of its wake-ups (long polling only).
    pub host_side_ns: Vec<u64>,
    pub stats: Stats,
    /// CPU time the measuring thread (or the RT vCPU's thread, host and
    /// guest together) used per period: what its precision costs.
    pub cpu_per_period_ns: Option<u64>,
}

/// The `machine` object of every bench's JSON.
pub fn machine_json(host: &HostInfo) -> Value {
    json!({
        "cpu": host.cpu_model,
        "cpus": host.cpus,
        "kernel": host.kernel,
        "preemption": host.preemption,
        "kvm_module": host.kvm_module,
    })
}
