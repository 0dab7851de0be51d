//! SVG plot of latency distributions, one curve per path, counts on a log
//! axis (the way cyclictest results are usually drawn).

use std::path::Path;

use plotters::prelude::*;

/// Draws the samples (ns) of each `(name, samples)` path to `file`;
/// `quantity` names what they measure on the x axis ("lateness", "round trip").
pub fn latency_svg(
    file: &Path,
    title: &str,
    quantity: &str,
    paths: &[(&str, &[u64])],
) -> Result<(), String> {
    let p999_max = paths
        .iter()
        .filter_map(|(_, s)| super::stats::Stats::from_ns(s))
        .map(|s| s.p999_us)
        .fold(1.0f64, f64::max);
    let max_us = paths
        .iter()
        .flat_map(|(_, s)| s.iter())
        .max()
        .map_or(1, |m| m / 1000) as f64;
    // Show the bulk and the tail, not a lone outlier far to the right.
    let x_max = max_us.min(p999_max * 3.0).max(10.0);
    let width = (x_max / 400.0).ceil().max(1.0);
    let buckets = (x_max / width).ceil() as usize + 1;
    let mut curves = Vec::new();
    let mut y_max = 1u64;
    for (name, samples) in paths {
        let mut counts = vec![0u64; buckets];
        for &s in *samples {
            let b = ((s as f64 / 1000.0) / width) as usize;
            if let Some(c) = counts.get_mut(b) {
                *c += 1;
            }
        }
        y_max = y_max.max(*counts.iter().max().unwrap_or(&1));
        curves.push((name.to_string(), counts));
    }

    let root = SVGBackend::new(file, (1000, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (1u64..y_max * 2).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(format!("{quantity} (µs), {width} µs buckets"))
        .y_desc("samples (log)")
        .draw()
        .map_err(|e| err(&e))?;
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, counts)) in curves.iter().enumerate() {
        let color = palette[i % palette.len()];
        // Empty buckets cannot sit on a log axis: draw each run of
        // consecutive non-empty buckets as its own line (a lone bucket as a
        // dot), instead of lines jumping across the gaps.
        let mut runs: Vec<Vec<(f64, u64)>> = Vec::new();
        for (b, &c) in counts.iter().enumerate() {
            match (c, runs.last_mut()) {
                (0, _) => {}
                (_, Some(run))
                    if run
                        .last()
                        .is_some_and(|&(x, _)| x == (b as f64 - 1.0) * width) =>
                {
                    run.push((b as f64 * width, c))
                }
                _ => runs.push(vec![(b as f64 * width, c)]),
            }
        }
        for (n, run) in runs.into_iter().enumerate() {
            let drawn = if run.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(run[0], 2, color.filled())))
            } else {
                chart.draw_series(LineSeries::new(run, color.stroke_width(2)))
            }
            .map_err(|e| err(&e))?;
            if n == 0 {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_a_curve_per_path() {
        let file = std::env::temp_dir().join(format!("rtvm-plot-test-{}.svg", std::process::id()));
        let a: Vec<u64> = (0..1000).map(|i| 10_000 + i * 37 % 5_000).collect();
        let b: Vec<u64> = (0..1000).map(|i| 50_000 + i * 91 % 40_000).collect();
        latency_svg(&file, "test", "lateness", &[("host", &a), ("guest", &b)]).unwrap();
        let svg = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(
            texts.contains(&"host") && texts.contains(&"guest"),
            "legend names each path"
        );
        assert!(svg.matches("<polyline").count() >= 2, "a curve per path");
    }
}
