//! The comparison: one row per thing measured (direct, abgate, nginx,
//! haproxy...), built from its runs: the closed loop gives the maximum
//! throughput, the open loop the latency at a fixed rate and the CPU it
//! cost; SSE runs make a second table for streams. Latency overheads are
//! differences from the baseline row (the client talking to the upstream
//! directly), percentile by percentile.
//!
//! With several rounds per label (a shared machine is noisy), each row
//! takes the fastest closed loop and the open loop with the lowest median,
//! the same rule for every label; errors and peak memory count every run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::record::Summary;
use crate::result::{kib, micros, micros_delta, RunResult};

/// The comparison `loadtest report` prints and writes.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub machine: String,
    /// The label overheads are measured from.
    pub baseline: String,
    /// Plain requests.
    pub rows: Vec<Row>,
    /// SSE streams.
    pub stream_rows: Vec<StreamRow>,
    /// Every run the rows were built from.
    pub runs: Vec<RunResult>,
}

/// One target under plain requests.
#[derive(Debug, Serialize)]
pub struct Row {
    pub label: String,
    /// Closed loop: successful requests per second.
    pub max_throughput_rps: Option<f64>,
    /// Closed loop: requests in flight.
    pub saturation_concurrency: Option<usize>,
    /// Open loop: the fixed rate.
    pub rate: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Open loop latency minus the baseline's, at p50 and p99.
    pub added_p50_us: Option<i64>,
    pub added_p99_us: Option<i64>,
    /// Server CPU seconds per 10,000 requests, at saturation and at the rate.
    pub cpu_per_10k_at_max: Option<f64>,
    pub cpu_per_10k_at_rate: Option<f64>,
    /// Highest peak RSS seen over the runs.
    pub peak_rss_kib: Option<u64>,
    /// Failed requests over the runs.
    pub errors: u64,
}

/// One target under SSE streams.
#[derive(Debug, Serialize)]
pub struct StreamRow {
    pub label: String,
    /// Streams completed in the window.
    pub streams: u64,
    pub max_inflight: usize,
    pub events_per_stream: Option<f64>,
    pub first_chunk_p50_us: Option<u64>,
    pub first_chunk_p99_us: Option<u64>,
    pub added_first_chunk_p50_us: Option<i64>,
    pub added_first_chunk_p99_us: Option<i64>,
    pub chunk_gap_p50_us: Option<u64>,
    pub chunk_gap_p99_us: Option<u64>,
    pub added_chunk_gap_p50_us: Option<i64>,
    pub added_chunk_gap_p99_us: Option<i64>,
    pub cpu_per_10k_streams: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub errors: u64,
}

impl Comparison {
    /// Rows in the order their labels first appear in `runs`.
    pub fn new(runs: &[RunResult], baseline: &str, machine: &str) -> Self {
        let mut labels: Vec<&str> = Vec::new();
        for run in runs {
            if !labels.contains(&run.label.as_str()) {
                labels.push(&run.label);
            }
        }
        let open_base = least_disturbed(runs, baseline);
        let stream_base = runs
            .iter()
            .rev()
            .find(|run| run.label == baseline && run.stream);

        let mut rows = Vec::new();
        let mut stream_rows = Vec::new();
        for label in labels {
            let closed = fastest(runs, label);
            let open = least_disturbed(runs, label);
            if closed.is_some() || open.is_some() {
                let plain: Vec<&RunResult> = runs
                    .iter()
                    .filter(|run| run.label == label && !run.stream)
                    .collect();
                let latency = open.and_then(|run| run.latency_us.as_ref());
                let base = open_base.and_then(|run| run.latency_us.as_ref());
                rows.push(Row {
                    label: label.to_owned(),
                    max_throughput_rps: closed.map(|run| run.throughput_rps),
                    saturation_concurrency: closed.and_then(|run| run.concurrency),
                    rate: open.and_then(|run| run.rate),
                    p50_us: latency.map(|s| s.p50),
                    p99_us: latency.map(|s| s.p99),
                    added_p50_us: added(latency, base, |s| s.p50),
                    added_p99_us: added(latency, base, |s| s.p99),
                    cpu_per_10k_at_max: cpu_per_10k(closed),
                    cpu_per_10k_at_rate: cpu_per_10k(open),
                    peak_rss_kib: peak_rss(&plain),
                    errors: plain.iter().map(|run| run.error_count()).sum(),
                });
            }
            let stream = runs
                .iter()
                .rev()
                .find(|run| run.label == label && run.stream);
            if let Some(run) = stream {
                let ttfc = run.first_chunk_us.as_ref();
                let gap = run.chunk_gap_us.as_ref();
                let base_ttfc = stream_base.and_then(|base| base.first_chunk_us.as_ref());
                let base_gap = stream_base.and_then(|base| base.chunk_gap_us.as_ref());
                stream_rows.push(StreamRow {
                    label: label.to_owned(),
                    streams: run.ok,
                    max_inflight: run.max_inflight,
                    events_per_stream: run.events_per_stream,
                    first_chunk_p50_us: ttfc.map(|s| s.p50),
                    first_chunk_p99_us: ttfc.map(|s| s.p99),
                    added_first_chunk_p50_us: added(ttfc, base_ttfc, |s| s.p50),
                    added_first_chunk_p99_us: added(ttfc, base_ttfc, |s| s.p99),
                    chunk_gap_p50_us: gap.map(|s| s.p50),
                    chunk_gap_p99_us: gap.map(|s| s.p99),
                    added_chunk_gap_p50_us: added(gap, base_gap, |s| s.p50),
                    added_chunk_gap_p99_us: added(gap, base_gap, |s| s.p99),
                    cpu_per_10k_streams: cpu_per_10k(Some(run)),
                    peak_rss_kib: peak_rss(&[run]),
                    errors: run.error_count(),
                });
            }
        }
        Self {
            machine: machine.to_owned(),
            baseline: baseline.to_owned(),
            rows,
            stream_rows,
            runs: runs.to_vec(),
        }
    }

    /// The tables as plain text for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.machine.is_empty() {
            let _ = writeln!(out, "{}\n", self.machine);
        }
        for table in self.tables() {
            out.push_str(&table.text());
            out.push('\n');
        }
        for line in self.against_peers() {
            let _ = writeln!(out, "{line}\n");
        }
        out
    }

    /// The tables as Markdown, with the machine and the run settings.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.machine.is_empty() {
            let _ = writeln!(out, "{}\n", self.machine);
        }
        for table in self.tables() {
            out.push_str(&table.markdown());
            out.push('\n');
        }
        for line in self.against_peers() {
            let _ = writeln!(out, "{line}\n");
        }
        if self.runs.len() > self.rows.len() + self.stream_rows.len() {
            let _ = writeln!(
                out,
                "Of several rounds, each row shows its fastest closed loop and its open \
                 loop with the lowest median; CPU comes from those runs, errors and peak \
                 RSS from all of them.\n"
            );
        }
        let _ = writeln!(out, "Runs, in the order they ran:\n");
        for run in &self.runs {
            let latency = run.latency_us.as_ref().map_or_else(String::new, |s| {
                format!(", p50 {}, p99 {}", micros(s.p50), micros(s.p99))
            });
            let _ = writeln!(
                out,
                "- {}: {}{}, {} s after {} s warm-up, {} users, {} generator thread(s): \
                 {} ok, {} errors, {:.0} req/s{latency}",
                run.label,
                run.load(),
                if run.stream { ", SSE" } else { "" },
                run.duration_seconds,
                run.warmup_seconds,
                run.users,
                run.threads,
                run.ok,
                run.error_count(),
                run.throughput_rps,
            );
        }
        out
    }

    /// Each build of abgate (`abgate`, `abgate-plain`, …) against the
    /// faster peer: not the baseline, nor another build of abgate.
    fn against_peers(&self) -> Vec<String> {
        let Some((peer, best)) = self
            .rows
            .iter()
            .filter(|row| !row.label.starts_with("abgate") && row.label != self.baseline)
            .filter_map(|row| Some((row, row.max_throughput_rps?)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
        else {
            return Vec::new();
        };
        let builds = self
            .rows
            .iter()
            .filter(|row| row.label.starts_with("abgate"));
        builds
            .filter_map(|build| {
                let own = build.max_throughput_rps?;
                let mut line = format!(
                    "{}: {:.0}% of the faster peer's throughput ({} at {:.0} req/s)",
                    build.label,
                    own / best * 100.0,
                    peer.label,
                    best
                );
                if let (Some(own_cpu), Some(peer_cpu)) =
                    (build.cpu_per_10k_at_max, peer.cpu_per_10k_at_max)
                {
                    let _ = write!(line, ", at {:.2}× its CPU per request", own_cpu / peer_cpu);
                }
                line.push('.');
                Some(line)
            })
            .collect()
    }

    fn tables(&self) -> Vec<Table> {
        let mut tables = Vec::new();
        if !self.rows.is_empty() {
            let rate = self
                .rows
                .iter()
                .find_map(|row| row.rate)
                .map_or_else(|| "fixed rate".to_owned(), |rate| format!("{rate}/s"));
            let concurrency = self
                .rows
                .iter()
                .find_map(|row| row.saturation_concurrency)
                .map_or_else(String::new, |c| format!(" (closed loop, {c} in flight)"));
            tables.push(Table {
                header: vec![
                    "target".to_owned(),
                    format!("max throughput{concurrency}"),
                    format!("p50 @ {rate}"),
                    format!("p99 @ {rate}"),
                    format!("added p50 over {}", self.baseline),
                    format!("added p99 over {}", self.baseline),
                    "CPU s / 10k req at max".to_owned(),
                    format!("CPU s / 10k req @ {rate}"),
                    "peak RSS".to_owned(),
                    "errors".to_owned(),
                ],
                rows: self
                    .rows
                    .iter()
                    .map(|row| {
                        vec![
                            row.label.clone(),
                            row.max_throughput_rps
                                .map_or_else(dash, |rps| format!("{rps:.0} req/s")),
                            row.p50_us.map_or_else(dash, micros),
                            row.p99_us.map_or_else(dash, micros),
                            delta(&row.label, &self.baseline, row.added_p50_us),
                            delta(&row.label, &self.baseline, row.added_p99_us),
                            row.cpu_per_10k_at_max.map_or_else(dash, seconds),
                            row.cpu_per_10k_at_rate.map_or_else(dash, seconds),
                            row.peak_rss_kib.map_or_else(dash, kib),
                            row.errors.to_string(),
                        ]
                    })
                    .collect(),
            });
        }
        if !self.stream_rows.is_empty() {
            tables.push(Table {
                header: vec![
                    "target".to_owned(),
                    "streams (max open)".to_owned(),
                    "first chunk p50".to_owned(),
                    "first chunk p99".to_owned(),
                    format!("added first chunk p50 / p99 over {}", self.baseline),
                    "chunk gap p50 / p99".to_owned(),
                    format!("added chunk gap p50 / p99 over {}", self.baseline),
                    "CPU s / 10k streams".to_owned(),
                    "peak RSS".to_owned(),
                    "errors".to_owned(),
                ],
                rows: self
                    .stream_rows
                    .iter()
                    .map(|row| {
                        vec![
                            row.label.clone(),
                            format!("{} ({})", row.streams, row.max_inflight),
                            row.first_chunk_p50_us.map_or_else(dash, micros),
                            row.first_chunk_p99_us.map_or_else(dash, micros),
                            deltas(
                                &row.label,
                                &self.baseline,
                                row.added_first_chunk_p50_us,
                                row.added_first_chunk_p99_us,
                            ),
                            format!(
                                "{} / {}",
                                row.chunk_gap_p50_us.map_or_else(dash, micros),
                                row.chunk_gap_p99_us.map_or_else(dash, micros)
                            ),
                            deltas(
                                &row.label,
                                &self.baseline,
                                row.added_chunk_gap_p50_us,
                                row.added_chunk_gap_p99_us,
                            ),
                            row.cpu_per_10k_streams.map_or_else(dash, seconds),
                            row.peak_rss_kib.map_or_else(dash, kib),
                            row.errors.to_string(),
                        ]
                    })
                    .collect(),
            });
        }
        tables
    }
}

/// The label's closed-loop run with the highest throughput: with several
/// rounds on a shared machine, the one least slowed by its neighbours.
fn fastest<'a>(runs: &'a [RunResult], label: &str) -> Option<&'a RunResult> {
    runs.iter()
        .filter(|run| run.label == label && run.mode == "closed" && !run.stream)
        .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps))
}

/// The label's open-loop run with the lowest median latency, for the same
/// reason.
fn least_disturbed<'a>(runs: &'a [RunResult], label: &str) -> Option<&'a RunResult> {
    runs.iter()
        .filter(|run| run.label == label && run.mode == "open" && !run.stream)
        .min_by_key(|run| run.latency_us.as_ref().map_or(u64::MAX, |s| s.p50))
}

/// `value - base` at one percentile, when both runs have it.
fn added(
    value: Option<&Summary>,
    base: Option<&Summary>,
    at: impl Fn(&Summary) -> u64,
) -> Option<i64> {
    let (value, base) = (value?, base?);
    Some(i64::try_from(at(value)).ok()? - i64::try_from(at(base)).ok()?)
}

fn cpu_per_10k(run: Option<&RunResult>) -> Option<f64> {
    run?.process
        .as_ref()
        .map(|process| process.cpu_seconds_per_10k)
}

fn peak_rss(runs: &[&RunResult]) -> Option<u64> {
    runs.iter()
        .filter_map(|run| run.process.as_ref())
        .map(|process| process.memory.peak_rss_kib)
        .max()
}

fn delta(label: &str, baseline: &str, value: Option<i64>) -> String {
    if label == baseline {
        "(baseline)".to_owned()
    } else {
        value.map_or_else(dash, micros_delta)
    }
}

/// `+50 µs / +300 µs`, or `(baseline)` for the baseline itself.
fn deltas(label: &str, baseline: &str, p50: Option<i64>, p99: Option<i64>) -> String {
    if label == baseline {
        "(baseline)".to_owned()
    } else {
        format!(
            "{} / {}",
            p50.map_or_else(dash, micros_delta),
            p99.map_or_else(dash, micros_delta)
        )
    }
}

fn seconds(value: f64) -> String {
    format!("{value:.3} s")
}

fn dash() -> String {
    "–".to_owned()
}

/// Rows of cells, rendered aligned for a terminal or as Markdown.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }

    fn text(&self) -> String {
        let widths = self.widths();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| {
                    let pad = width.saturating_sub(cell.chars().count());
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect();
            padded.join("  ").trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.header);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        out.push_str(&line(&vec!["---".to_owned(); self.header.len()]));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{Memory, ProcessUse};
    use std::collections::BTreeMap;

    fn summary(p50: u64, p99: u64) -> Summary {
        Summary {
            count: 100,
            min: 1,
            mean: p50 as f64,
            p50,
            p90: p99,
            p99,
            p99_9: p99,
            max: p99,
            curve: vec![(0.0, 1), (0.5, p50), (0.99, p99), (1.0, p99)],
        }
    }

    fn run(label: &str, mode: &str, p50: u64, p99: u64, rps: f64) -> RunResult {
        RunResult {
            label: label.to_owned(),
            url: "http://127.0.0.1:1/v1/chat/completions".to_owned(),
            mode: mode.to_owned(),
            rate: (mode == "open").then_some(1000.0),
            concurrency: (mode == "closed").then_some(64),
            stream: false,
            threads: 1,
            users: 10,
            warmup_seconds: 1.0,
            duration_seconds: 5.0,
            sent: 5002,
            ok: 5000,
            errors: BTreeMap::from([("status_502".to_owned(), 2)]),
            unanswered: 0,
            throughput_rps: rps,
            max_inflight: 64,
            connections: 64,
            latency_us: Some(summary(p50, p99)),
            schedule_lag_us: None,
            first_chunk_us: None,
            chunk_gap_us: None,
            events_per_stream: None,
            process: (label != "direct").then(|| ProcessUse {
                pids: vec![1],
                cpu_seconds: 1.0,
                cpu_seconds_per_10k: 2.0,
                cpu_cores: 0.2,
                rss_at_start_kib: 1000,
                memory: Memory {
                    peak_rss_kib: 2048,
                    rss_kib: 1024,
                },
            }),
        }
    }

    #[test]
    fn rows_compare_each_target_with_the_baseline() {
        let runs = [
            run("direct", "closed", 500, 900, 20_000.0),
            run("direct", "open", 100, 300, 1000.0),
            run("abgate", "closed", 600, 1000, 15_000.0),
            run("abgate", "open", 160, 450, 1000.0),
            run("abgate", "closed", 900, 3000, 9_000.0),
            run("abgate", "open", 400, 2000, 1000.0),
            run("nginx", "closed", 500, 900, 18_000.0),
            run("haproxy", "closed", 500, 900, 16_000.0),
        ];
        let comparison = Comparison::new(&runs, "direct", "test machine");
        assert_eq!(comparison.rows.len(), 4);
        assert!(comparison.stream_rows.is_empty());
        let abgate = &comparison.rows[1];
        assert_eq!(abgate.max_throughput_rps, Some(15_000.0));
        assert_eq!(
            (abgate.added_p50_us, abgate.added_p99_us),
            (Some(60), Some(150))
        );
        assert_eq!(abgate.peak_rss_kib, Some(2048));
        assert_eq!(abgate.errors, 8);
        assert_eq!(comparison.rows[0].cpu_per_10k_at_rate, None);

        let markdown = comparison.markdown();
        assert!(markdown.starts_with("test machine\n"));
        assert!(markdown.contains("| abgate | 15000 req/s | 160 µs | 450 µs | +60 µs | +150 µs |"));
        assert!(markdown.contains("| direct | 20000 req/s | 100 µs | 300 µs | (baseline) |"));
        let verdict = "abgate: 83% of the faster peer's throughput (nginx at 18000 req/s), \
                       at 1.00× its CPU per request.";
        assert!(markdown.contains(verdict), "{markdown}");
        let text = comparison.text();
        assert!(text.lines().any(|line| line.starts_with("abgate  ")));
        assert!(text.contains(verdict));
    }

    #[test]
    fn another_build_of_abgate_is_not_a_peer() {
        let runs = [
            run("direct", "closed", 500, 900, 20_000.0),
            run("abgate", "closed", 600, 1000, 15_000.0),
            run("abgate-plain", "closed", 600, 1000, 19_000.0),
            run("nginx", "closed", 500, 900, 18_000.0),
        ];
        let markdown = Comparison::new(&runs, "direct", "test machine").markdown();
        assert!(
            markdown.contains("| abgate-plain | 19000 req/s |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("abgate: 83% of the faster peer's throughput (nginx at 18000 req/s)"),
            "{markdown}"
        );
        // Each build gets its own line, against the same peer.
        assert!(
            markdown.contains(
                "abgate-plain: 106% of the faster peer's throughput (nginx at 18000 req/s)"
            ),
            "{markdown}"
        );
    }

    #[test]
    fn stream_runs_make_their_own_table() {
        let mut direct = run("direct", "open", 100, 300, 100.0);
        direct.stream = true;
        direct.first_chunk_us = Some(summary(200, 400));
        direct.chunk_gap_us = Some(summary(10_000, 11_000));
        let mut abgate = direct.clone();
        abgate.label = "abgate".to_owned();
        abgate.first_chunk_us = Some(summary(250, 700));
        abgate.chunk_gap_us = Some(summary(10_010, 11_100));
        let comparison = Comparison::new(&[direct, abgate], "direct", "");
        assert!(comparison.rows.is_empty());
        let row = &comparison.stream_rows[1];
        assert_eq!(row.added_first_chunk_p50_us, Some(50));
        assert_eq!(row.added_first_chunk_p99_us, Some(300));
        assert_eq!(row.added_chunk_gap_p99_us, Some(100));
        assert!(comparison.markdown().contains("+50 µs / +300 µs"));
    }
}
