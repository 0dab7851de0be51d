//! The timer advance of waits on real-time vCPUs (see `rpc::timer`).

/// How the timer advance is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvanceMode {
    /// No advance: the host arms its timer at the deadline itself.
    Off,
    /// A fixed advance in ns.
    Fixed(u64),
    /// Learn the advance from observed lateness, up to a bound in ns.
    Adaptive { max_ns: u64 },
}

impl std::str::FromStr for AdvanceMode {
    type Err = String;

    /// `auto`, `off`, or a fixed advance: `20us`, `20000ns`, `20000` (ns).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => {
                return Ok(AdvanceMode::Adaptive {
                    max_ns: DEFAULT_MAX_ADVANCE_NS,
                })
            }
            "off" | "0" => return Ok(AdvanceMode::Off),
            _ => {}
        }
        let (num, scale) = if let Some(n) = t.strip_suffix("us") {
            (n, 1_000)
        } else if let Some(n) = t.strip_suffix("ns") {
            (n, 1)
        } else {
            (t.as_str(), 1)
        };
        let ns = num
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| format!("timer advance '{s}' is not auto, off, or a time like 20us"))?;
        if ns > DEFAULT_MAX_ADVANCE_NS * 4 {
            return Err(format!(
                "timer advance '{s}' is over {} µs",
                DEFAULT_MAX_ADVANCE_NS * 4 / 1000
            ));
        }
        Ok(AdvanceMode::Fixed(ns))
    }
}

impl std::fmt::Display for AdvanceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdvanceMode::Off => write!(f, "off"),
            AdvanceMode::Fixed(ns) => write!(f, "fixed {ns} ns"),
            AdvanceMode::Adaptive { max_ns } => {
                write!(f, "adaptive (at most {} µs)", max_ns / 1000)
            }
        }
    }
}

/// Default bound on the adaptive advance: more would mean spinning for long
/// stretches on every wait.
pub const DEFAULT_MAX_ADVANCE_NS: u64 = 500_000;
