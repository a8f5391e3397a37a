//! The latency-by-percentile chart: one curve per run, the percentile on a
//! log scale of 1/(1-q) so that p50, p99, p99.9 and p99.99 are evenly
//! spaced and the tail can be seen next to the median.

use std::path::Path;

use plotters::prelude::*;

use crate::record::Summary;
use crate::result::{micros_to, RunResult};

/// Highest percentile drawn, as 1/(1-q): 99.999%.
const X_MAX: f64 = 100_000.0;

/// Which distribution of a run to draw.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Metric {
    /// Request start to last byte.
    Latency,
    /// Request start to the first body bytes (streams).
    FirstChunk,
    /// Between body reads (streams).
    ChunkGap,
}

impl Metric {
    fn of(self, run: &RunResult) -> Option<&Summary> {
        match self {
            Metric::Latency => run.latency_us.as_ref(),
            Metric::FirstChunk => run.first_chunk_us.as_ref(),
            Metric::ChunkGap => run.chunk_gap_us.as_ref(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Latency => "latency",
            Metric::FirstChunk => "time to first chunk",
            Metric::ChunkGap => "gap between chunks",
        }
    }
}

/// Writes `out` as an SVG with one curve per label that has `metric`.
pub fn draw(
    runs: &[RunResult],
    metric: Metric,
    title: Option<&str>,
    out: &Path,
) -> Result<(), String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = one_per_label(runs, metric)
        .into_iter()
        .map(|(label, summary)| (label, points(summary)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    if curves.is_empty() {
        return Err(format!("no run has a {} distribution", metric.name()));
    }
    let values = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1));
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(low, high), v| {
        (low.min(v), high.max(v))
    });
    let title = title.map_or_else(
        || format!("{} by percentile, {}", metric.name(), runs[0].load()),
        str::to_owned,
    );
    let plot_error = |err: &dyn std::fmt::Display| format!("{}: {err}", out.display());

    let root = SVGBackend::new(out, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..X_MAX)
                .log_scale()
                .with_key_points(vec![1.0, 2.0, 10.0, 100.0, 1e3, 1e4, 1e5]),
            ((low / 1.5).max(1.0)..high * 1.5)
                .log_scale()
                .with_key_points(one_two_five(low / 1.5, high * 1.5)),
        )
        .map_err(|e| plot_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc(metric.name())
        .x_label_formatter(&|x| percentile_label(*x))
        // The 1-2-5 steps need no decimals: `200 µs`, `5 ms`, `2 s`.
        .y_label_formatter(&|y| micros_to(*y, 0))
        .draw()
        .map_err(|e| plot_error(&e))?;
    for (index, (label, points)) in curves.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| plot_error(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))?;
    Ok(())
}

/// One distribution per label, in the order labels first appear: of
/// several rounds, the one with the lowest median, as the report chooses.
fn one_per_label(runs: &[RunResult], metric: Metric) -> Vec<(&str, &Summary)> {
    let mut chosen: Vec<(&str, &Summary)> = Vec::new();
    for run in runs {
        let Some(summary) = metric.of(run) else {
            continue;
        };
        match chosen.iter_mut().find(|(label, _)| *label == run.label) {
            Some(entry) if summary.p50 < entry.1.p50 => entry.1 = summary,
            Some(_) => {}
            None => chosen.push((&run.label, summary)),
        }
    }
    chosen
}

/// A run's curve as (1/(1-q), microseconds), up to 99.999%. Microseconds
/// rather than milliseconds: the log axis labels only values from 1 up.
fn points(summary: &Summary) -> Vec<(f64, f64)> {
    summary
        .curve
        .iter()
        .filter(|(quantile, _)| 1.0 / (1.0 - quantile) <= X_MAX * 1.000_001)
        .map(|&(quantile, micros)| (1.0 / (1.0 - quantile), micros.max(1) as f64))
        .collect()
}

/// 1, 2, 5, 10, 20, 50... from `low` to `high`: axis labels a person reads
/// at a glance.
fn one_two_five(low: f64, high: f64) -> Vec<f64> {
    let mut points = Vec::new();
    let mut decade = 1.0;
    while decade <= high {
        for step in [1.0, 2.0, 5.0] {
            let point = decade * step;
            if (low..=high).contains(&point) {
                points.push(point);
            }
        }
        decade *= 10.0;
    }
    points
}

/// `1` → `0%`, `10` → `90%`, `1000` → `99.9%`.
fn percentile_label(x: f64) -> String {
    let percentile = 100.0 * (1.0 - 1.0 / x);
    let text = format!("{percentile:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_labels_step_one_two_five() {
        assert_eq!(one_two_five(150.0, 2500.0), [200.0, 500.0, 1000.0, 2000.0]);
    }

    #[test]
    fn percentiles_are_labelled_as_people_write_them() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(10_000.0), "99.99%");
    }

    #[test]
    fn the_maximum_is_left_out_of_the_log_axis() {
        let summary = Summary {
            count: 3,
            min: 1,
            mean: 2.0,
            p50: 2,
            p90: 3,
            p99: 3,
            p99_9: 3,
            max: 3,
            curve: vec![(0.0, 0), (0.5, 2000), (0.99999, 3000), (1.0, 3000)],
        };
        let points = points(&summary);
        assert_eq!(points.len(), 3);
        assert_eq!(points[0], (1.0, 1.0));
        assert_eq!(points[1], (2.0, 2000.0));
    }
}
