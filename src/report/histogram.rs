//! Latency histograms in the text format of cyclictest's `-h` option
//! (rt-tests), so the plotting scripts people already use for cyclictest
//! read rtvm's results unchanged.

use std::fmt::Write as _;

/// A histogram with 1 µs buckets `0..size`; larger samples are overflows.
pub struct Histogram {
    buckets: Vec<u64>,
    overflows: u64,
    total: u64,
    sum_us: u128,
    min_us: u64,
    max_us: u64,
}

impl Histogram {
    pub fn new(size: usize) -> Self {
        Histogram {
            buckets: vec![0; size.max(1)],
            overflows: 0,
            total: 0,
            sum_us: 0,
            min_us: u64::MAX,
            max_us: 0,
        }
    }

    /// A histogram of latency samples in ns, sized to hold them (at least
    /// 1000 buckets, as cyclictest's usual `-h 1000`, at most 100000).
    pub fn from_ns(samples: &[u64]) -> Self {
        let max_us = samples.iter().max().map_or(0, |m| m / 1000);
        let mut h = Histogram::new((max_us as usize + 1).clamp(1000, 100_000));
        for &s in samples {
            h.add_us(s / 1000);
        }
        h
    }

    pub fn add_us(&mut self, us: u64) {
        match self.buckets.get_mut(us as usize) {
            Some(b) => *b += 1,
            None => self.overflows += 1,
        }
        self.total += 1;
        self.sum_us += us as u128;
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    /// The cyclictest `-h` text: one row per non-empty bucket, then totals.
    pub fn to_cyclictest(&self, title: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# {title}");
        let _ = writeln!(out, "# Histogram");
        for (us, &count) in self.buckets.iter().enumerate() {
            if count != 0 {
                let _ = writeln!(out, "{us:06} {count:06}");
            }
        }
        let avg = if self.total == 0 {
            0
        } else {
            (self.sum_us / self.total as u128) as u64
        };
        let min = if self.total == 0 { 0 } else { self.min_us };
        let _ = writeln!(out, "# Total: {:09}", self.total);
        let _ = writeln!(out, "# Min Latencies: {min:05}");
        let _ = writeln!(out, "# Avg Latencies: {avg:05}");
        let _ = writeln!(out, "# Max Latencies: {:05}", self.max_us);
        let _ = writeln!(out, "# Histogram Overflows: {:05}", self.overflows);
        let _ = writeln!(out, "# Histogram Overflow at cycle number:");
        let _ = writeln!(out, "# Thread 0:");
        out
    }

    /// Parses the first data column of a cyclictest `-h` histogram into
    /// per-µs counts (for `--with-cyclictest`).
    pub fn parse_cyclictest(text: &str) -> Vec<(u64, u64)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let us = cols.next()?.parse().ok()?;
                let count = cols.next()?.parse().ok()?;
                Some((us, count))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_cyclictest_format_and_reads_it_back() {
        let h = Histogram::from_ns(&[3_400, 3_900, 5_000, 2_000_000]);
        let text = h.to_cyclictest("test");
        assert!(
            text.contains("# Histogram\n000003 000002\n000005 000001\n"),
            "{text}"
        );
        assert!(text.contains("# Total: 000000004\n"));
        assert!(text.contains("# Min Latencies: 00003\n"));
        assert!(text.contains("# Max Latencies: 02000\n"));
        assert!(
            text.contains("# Histogram Overflows: 00000\n"),
            "sized to hold the max: {text}"
        );
        assert_eq!(
            Histogram::parse_cyclictest(&text),
            vec![(3, 2), (5, 1), (2000, 1)]
        );
        let mut small = Histogram::new(10);
        small.add_us(50);
        assert!(small
            .to_cyclictest("x")
            .contains("# Histogram Overflows: 00001"));
    }
}
