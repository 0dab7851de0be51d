//! How `bench timer` reports: the table, the JSON and the targets' verdicts.

use super::*;

/// The RT vCPU's thread in the trace, as `comm-`.
const VCPU_THREAD: &str = "vcpu1-";
/// The kernel adds a stall's steal time at the CPU's next tick after it.
const STEAL_SETTLE_NS: u64 = 20_000_000;

/// When the trace saw the RT vCPU's thread woken, oldest first.
fn vcpu_wakeups(trace: &sched_trace::Trace) -> Vec<u64> {
    trace
        .wakeups
        .iter()
        .filter(|w| w.task.starts_with(VCPU_THREAD))
        .map(|w| w.at_ns)
        .collect()
}

fn held_json(held: Option<Vec<(String, u64)>>) -> Value {
    match held {
        Some(tasks) => Value::Array(
            tasks
                .into_iter()
                .map(|(task, ns)| json!({"task": task, "us": ns as f64 / 1e3}))
                .collect(),
        ),
        None => Value::Null,
    }
}

fn stolen_json(ns: Option<u64>) -> Value {
    ns.map_or(Value::Null, |ns| json!(ns / 1_000_000))
}

fn jitter_us(samples: &[u64]) -> f64 {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n;
    (samples
        .iter()
        .map(|&s| (s as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
        / 1e3
}

impl TimerReport {
    pub fn to_json(&self) -> Value {
        let mut out = json!({});
        for p in &self.paths {
            out[p.name] = p.stats.to_json();
        }
        let missed: serde_json::Map<String, Value> = self
            .paths
            .iter()
            .map(|p| (p.name.to_string(), json!(p.missed)))
            .collect();
        out["missed_periods"] = Value::Object(missed);
        let cpu: serde_json::Map<String, Value> = self
            .paths
            .iter()
            .filter_map(|p| Some((p.name.to_string(), json!(p.cpu_per_period_ns? as f64 / 1e3))))
            .collect();
        out["cpu_per_period_us"] = Value::Object(cpu);
        out["steal_ms"] = Value::Object(
            self.steal_ns
                .iter()
                .map(|(name, ns)| (name.to_string(), json!(ns.map(|ns| ns as f64 / 1e6))))
                .collect(),
        );
        // Each long-poll path's wake-ups stage by stage; `worst` with --trace.
        let mut worst = Vec::new();
        for (name, breakdowns) in &self.breakdowns {
            out[*name]["stages"] = Value::Object(
                stages::stage_stats(breakdowns)
                    .into_iter()
                    .map(|(stage, stats)| (stage.to_string(), stats.to_json()))
                    .collect(),
            );
            if self.worst > 0 {
                for b in stages::worst(breakdowns, self.worst) {
                    let mut entry = b.to_json();
                    entry["path"] = json!(name);
                    entry["woken_after_us"] = match self.woken_after(b) {
                        Some(ns) => json!(ns as f64 / 1e3),
                        None => Value::Null,
                    };
                    entry["ran_instead"] = held_json(self.ran_instead(b));
                    entry["stolen_ms"] = stolen_json(self.stolen_in(b.window()));
                    worst.push(entry);
                }
            }
        }
        // The interrupt path's, where the trace saw them.
        if let Some(trace) = &self.trace {
            let wakeups = vcpu_wakeups(trace);
            for (name, wakes) in &self.irq_wakes {
                out[*name]["stages"] = Value::Object(
                    stages::irq_stage_stats(wakes, &wakeups, self.period_ns)
                        .into_iter()
                        .map(|(stage, stats)| (stage.to_string(), stats.to_json()))
                        .collect(),
                );
                for w in stages::worst_irq(wakes, self.worst) {
                    let woken = w.woken(&wakeups, self.period_ns);
                    let us = |ns: i64| json!(ns as f64 / 1e3);
                    worst.push(json!({
                        "path": name,
                        "cycle": w.cycle,
                        "total_us": us(w.total as i64),
                        "woken_after_us": woken.map(|t| us(t as i64 - w.deadline as i64)),
                        "ran_instead": held_json(self.ran_instead_irq(w, woken)),
                        "stolen_ms": stolen_json(self.stolen_in(w.window())),
                    }));
                }
            }
        }
        if self.worst > 0 {
            out["worst"] = Value::Array(worst);
        }
        if let Some(lp) = self.path("guest_longpoll") {
            if let Some(s) = Stats::from_ns(&lp.host_side_ns) {
                out["guest_longpoll_host_side"] = s.to_json();
            }
        }
        if self.workload == Workload::Frames {
            let frames: serde_json::Map<String, Value> = self
                .paths
                .iter()
                .map(|p| {
                    let misses =
                        p.late_ns.iter().filter(|&&l| l > FRAME_MISS_NS).count() as u64 + p.missed;
                    (
                        p.name.to_string(),
                        json!({"deadline_misses": misses, "jitter_us": jitter_us(&p.late_ns)}),
                    )
                })
                .collect();
            out["frames"] = Value::Object(frames);
        }
        out["ratios"] = Value::Object(
            self.ratios()
                .into_iter()
                .map(|(name, value, target)| {
                    (name.to_string(), json!({"value": value, "target": target}))
                })
                .collect(),
        );
        out["settings"] = json!({
            "workload": format!("{:?}", self.workload).to_lowercase(),
            "period_us": self.period_ns as f64 / 1e3,
            "work_us": self.work_ns as f64 / 1e3,
            "seconds_per_path": self.seconds_per_path,
            "load": self.load,
        });
        let mut machine = machine_json(&self.host);
        machine["rt"] = json!(self
            .rt
            .iter()
            .map(|i| match &i.result {
                Ok(()) => format!("ok: {}", i.what),
                Err(e) => format!("FAILED: {}: {e}", i.what),
            })
            .collect::<Vec<_>>());
        out["machine"] = machine;
        out
    }

    /// What held the RT CPU while wake-up `b` was on its way, other than
    /// the vCPU thread; `None` without a trace that covers it.
    fn ran_instead(&self, b: stages::Breakdown) -> Option<Vec<(String, u64)>> {
        let switches = &self.trace.as_ref()?.switches;
        let (from, to) = b.window();
        (switches.first()?.at_ns <= from)
            .then(|| sched_trace::occupants(switches, (from, to), VCPU_THREAD, b.thread_woke()))
    }

    /// What held the RT CPU while interrupt-path wake-up `w` was on its
    /// way: the vCPU thread counts as running from its first switch in
    /// after `woken`, else from `woken` (a wake-up on an idle CPU), else
    /// throughout (a halt poll).
    fn ran_instead_irq(
        &self,
        w: stages::IrqWake,
        woken: Option<u64>,
    ) -> Option<Vec<(String, u64)>> {
        let switches = &self.trace.as_ref()?.switches;
        let (from, to) = w.window();
        let ours_from = match woken {
            Some(t) => switches[switches.partition_point(|s| s.at_ns < t)..]
                .iter()
                .take_while(|s| s.at_ns < to)
                .find(|s| s.next.starts_with(VCPU_THREAD))
                .map_or(t, |s| s.at_ns),
            None => from,
        };
        (switches.first()?.at_ns <= from)
            .then(|| sched_trace::occupants(switches, (from, to), VCPU_THREAD, ours_from))
    }

    /// Steal time counted on the RT CPU over `window` (see `steal`).
    fn stolen_in(&self, (from, to): (u64, u64)) -> Option<u64> {
        steal::stolen_between(self.steal_samples.as_deref()?, from, to, STEAL_SETTLE_NS)
    }

    /// When the kernel made the vCPU thread runnable in wake-up `b`'s
    /// window, as µs after the host timer's expiry; `None` without a trace
    /// entry for it.
    fn woken_after(&self, b: stages::Breakdown) -> Option<u64> {
        let wakeups = &self.trace.as_ref()?.wakeups;
        let (from, to) = b.window();
        let first = wakeups.partition_point(|w| w.at_ns < from);
        wakeups[first..]
            .iter()
            .take_while(|w| w.at_ns < to)
            .find(|w| w.task.starts_with(VCPU_THREAD))
            .map(|w| w.at_ns - from)
    }

    pub fn print_table(&self) {
        println!(
            "rtvm bench timer: {} workload, period {:.3} ms, {:.1} s per path{} ({} on {}, preemption {})",
            format!("{:?}", self.workload).to_lowercase(),
            self.period_ns as f64 / 1e6,
            self.seconds_per_path,
            if self.load { ", host and guest vCPU 0 loaded" } else { "" },
            self.host.kvm_module,
            self.host.cpu_model,
            self.host.preemption,
        );
        println!("{}   missed  cpu_us/period  steal_ms", Stats::TABLE_HEADER);
        for p in &self.paths {
            let cpu = p
                .cpu_per_period_ns
                .map_or("-".to_string(), |c| format!("{:.1}", c as f64 / 1e3));
            let steal = self
                .steal_ns
                .iter()
                .find(|(n, _)| *n == p.name)
                .and_then(|(_, ns)| *ns)
                .map_or("-".to_string(), |ns| format!("{}", ns / 1_000_000));
            println!(
                "{} {:>8} {cpu:>14} {steal:>9}",
                p.stats.table_row(p.name),
                p.missed
            );
        }
        if let Some(s) = self
            .path("guest_longpoll")
            .and_then(|lp| Stats::from_ns(&lp.host_side_ns))
        {
            println!(
                "{}   (host's own record of its wake-ups)",
                s.table_row("  longpoll, host")
            );
        }
        for (name, breakdowns) in &self.breakdowns {
            println!("{name}, stage by stage (host record + guest arrival):");
            for (stage, stats) in stages::stage_stats(breakdowns) {
                println!("{}", stats.table_row(&format!("  {stage}")));
            }
            if self.worst > 0 {
                println!(
                    "  worst {}, µs: total = advance + timer + spin + vmm + entry + guest_spin",
                    self.worst
                );
                for b in stages::worst(breakdowns, self.worst) {
                    let us = |ns: i64| ns as f64 / 1e3;
                    println!(
                        "  cycle {:>7}: {:>9.1} = {:>7.1} + {:>8.1} + {:>6.1} + {:>6.1} + {:>8.1} + {:>6.1}",
                        b.cycle,
                        us(b.total),
                        us(b.advance),
                        us(b.timer),
                        us(b.spin),
                        us(b.vmm),
                        us(b.entry),
                        us(b.guest_spin)
                    );
                    if let Some(ns) = self.woken_after(b) {
                        let runnable = b.thread_woke().saturating_sub(b.window().0 + ns);
                        println!(
                            "      made runnable {:.1} µs after the timer's expiry, then runnable {:.1} µs before it ran",
                            ns as f64 / 1e3,
                            runnable as f64 / 1e3
                        );
                    }
                    self.print_held(self.ran_instead(b), self.stolen_in(b.window()));
                }
            }
        }
        if let Some(trace) = &self.trace {
            let wakeups = vcpu_wakeups(trace);
            for (name, wakes) in &self.irq_wakes {
                println!("{name}, stage by stage (guest deadline + the trace's wake-up of the vCPU thread):");
                for (stage, stats) in stages::irq_stage_stats(wakes, &wakeups, self.period_ns) {
                    println!("{}", stats.table_row(&format!("  {stage}")));
                }
                println!(
                    "  worst {}, µs: total (vCPU thread woken after the deadline)",
                    self.worst
                );
                for w in stages::worst_irq(wakes, self.worst) {
                    let woken = w.woken(&wakeups, self.period_ns);
                    let after = woken.map_or("not woken: a halt poll caught it".into(), |t| {
                        format!(
                            "woken {:.1} µs after the deadline",
                            (t as i64 - w.deadline as i64) as f64 / 1e3
                        )
                    });
                    println!(
                        "  cycle {:>7}: {:>9.1} ({after})",
                        w.cycle,
                        w.total as f64 / 1e3
                    );
                    self.print_held(self.ran_instead_irq(w, woken), self.stolen_in(w.window()));
                }
            }
        }
        if self.workload == Workload::Frames {
            for p in &self.paths {
                let misses =
                    p.late_ns.iter().filter(|&&l| l > FRAME_MISS_NS).count() as u64 + p.missed;
                println!(
                    "frames {:<24} {misses} frames more than 1 ms late, jitter {:.1} µs",
                    p.name,
                    jitter_us(&p.late_ns)
                );
            }
        }
        for (name, value, target) in self.ratios() {
            println!("{name}: {value:.2} (target <= {target})");
        }
        for item in &self.rt {
            match &item.result {
                Ok(()) => println!("  rt ok: {}", item.what),
                Err(e) => println!("  rt FAILED: {}: {e}", item.what),
            }
        }
    }

    /// What held the RT CPU during one late wake-up, and what the
    /// hypervisor below took of it.
    fn print_held(&self, held: Option<Vec<(String, u64)>>, stolen: Option<u64>) {
        match held {
            Some(tasks) if tasks.is_empty() => println!(
                "      nothing else was scheduled on CPU {}: the time went below this kernel's scheduler",
                self.cpu
            ),
            Some(tasks) if tasks.iter().all(|(t, _)| t.starts_with("swapper/")) => println!(
                "      CPU {} idle until the thread ran ({:.1} µs): timer interrupt and idle exit; then nothing else was scheduled",
                self.cpu,
                tasks[0].1 as f64 / 1e3
            ),
            Some(tasks) => println!(
                "      ran instead on CPU {}: {}",
                self.cpu,
                tasks
                    .iter()
                    .take(4)
                    .map(|(t, ns)| format!("{t} {:.1} µs", *ns as f64 / 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => {}
        }
        if let Some(ns) = stolen.filter(|&ns| ns > 0) {
            println!(
                "      the hypervisor below took {} ms of CPU {} meanwhile (its steal time, counted in 10 ms)",
                ns / 1_000_000,
                self.cpu
            );
        }
    }

    /// Writes `<dir>/<path>.hist` for every path.
    pub fn write_histograms(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut written = Vec::new();
        for p in &self.paths {
            let file = dir.join(format!("{}.hist", p.name));
            let title = format!(
                "rtvm bench timer: {}, period {} µs, lateness in µs",
                p.name,
                self.period_ns / 1000
            );
            fs::write(&file, Histogram::from_ns(&p.late_ns).to_cyclictest(&title))
                .map_err(|e| format!("writing {}: {e}", file.display()))?;
            written.push(file);
        }
        Ok(written)
    }

    pub fn write_plot(&self, file: &Path) -> Result<(), String> {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let series: Vec<(&str, &[u64])> = self
            .paths
            .iter()
            .map(|p| (p.name, p.late_ns.as_slice()))
            .collect();
        let title = format!(
            "timer lateness, period {} µs ({})",
            self.period_ns / 1000,
            self.host.kvm_module
        );
        latency_svg(file, &title, "lateness", &series)
    }

    /// One sentence on what the numbers mean.
    pub fn summary(&self) -> String {
        let (Some(lp), Some(host), Some(irq)) = (
            self.p99("guest_longpoll"),
            self.p99("host"),
            self.p99("guest_interrupt"),
        ) else {
            return String::new();
        };
        format!(
            "A guest task waiting through VM long polling woke with a p99 lateness of {lp:.1} µs: {:.2}x the bare \
             host's ({host:.1} µs) and {:.2}x the conventional guest-interrupt path's ({irq:.1} µs).",
            lp / host,
            lp / irq
        )
    }
}
