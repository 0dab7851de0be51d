//! The STATS shape every rtvm benchmark reports: sample count and min, avg,
//! p50, p99, p99.9, max in microseconds.

use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub samples: usize,
    pub min_us: f64,
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Stats {
    /// Statistics of samples in nanoseconds; `None` for no samples.
    pub fn from_ns(samples: &[u64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        // Nearest rank: the smallest sample with at least p of all at or below it.
        let pct = |p: f64| {
            us(sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1])
        };
        let sum: u128 = sorted.iter().map(|&s| s as u128).sum();
        Some(Stats {
            samples: sorted.len(),
            min_us: us(sorted[0]),
            avg_us: sum as f64 / sorted.len() as f64 / 1e3,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            max_us: us(sorted[sorted.len() - 1]),
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "samples": self.samples,
            "min_us": self.min_us,
            "avg_us": self.avg_us,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
        })
    }

    pub const TABLE_HEADER: &'static str =
        "path                       samples    min_us    avg_us    p50_us    p99_us  p99.9_us    max_us";

    pub fn table_row(&self, name: &str) -> String {
        format!(
            "{name:<24} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.samples,
            self.min_us,
            self.avg_us,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let s = Stats::from_ns(&samples).unwrap();
        assert_eq!(s.samples, 1000);
        assert_eq!((s.min_us, s.max_us), (1.0, 1000.0));
        assert_eq!((s.p50_us, s.p99_us, s.p999_us), (500.0, 990.0, 999.0));
        assert!((s.avg_us - 500.5).abs() < 1e-9);
        assert_eq!(Stats::from_ns(&[]), None);
        let one = Stats::from_ns(&[7_000]).unwrap();
        assert_eq!((one.p50_us, one.p999_us), (7.0, 7.0));
    }
}
