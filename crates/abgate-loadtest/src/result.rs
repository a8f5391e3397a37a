//! One run's result: what was asked, what came back, as JSON for the
//! report and the plot, and as a table for a person.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::process::ProcessUse;
use crate::record::Summary;

/// Everything `loadtest run` measured; the `--json` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// What was measured (`direct`, `abgate`, `nginx`...).
    pub label: String,
    pub url: String,
    /// `open` (fixed rate) or `closed` (fixed concurrency).
    pub mode: String,
    /// Requests per second asked for (open loop).
    pub rate: Option<f64>,
    /// Requests in flight (closed loop).
    pub concurrency: Option<usize>,
    pub stream: bool,
    pub threads: usize,
    pub users: usize,
    pub warmup_seconds: f64,
    pub duration_seconds: f64,
    /// Requests started inside the window: `ok + errors + unanswered`.
    #[serde(default)]
    pub sent: u64,
    /// Requests answered 2xx and read to the end.
    pub ok: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Requests still running when the generator stopped waiting for them
    /// (`Plan::drain` after the window).
    #[serde(default)]
    pub unanswered: u64,
    /// `ok` per second of the measurement window.
    pub throughput_rps: f64,
    /// Most requests in flight at once, waiting for a connection included.
    pub max_inflight: usize,
    /// TCP connections opened, warm-up included.
    pub connections: u64,
    /// Request start (intended, for an open loop) to the answer's last byte.
    pub latency_us: Option<Summary>,
    /// Open loop: intended to actual send.
    pub schedule_lag_us: Option<Summary>,
    /// Streams: request start to the first body bytes.
    pub first_chunk_us: Option<Summary>,
    /// Streams: between consecutive body reads.
    pub chunk_gap_us: Option<Summary>,
    /// Streams: SSE events per successful stream.
    pub events_per_stream: Option<f64>,
    /// The watched server processes during the window.
    pub process: Option<ProcessUse>,
}

impl RunResult {
    /// Failed requests, all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The load, in words: `open loop 1000/s` or `closed loop 64 in flight`.
    pub fn load(&self) -> String {
        match (self.rate, self.concurrency) {
            (Some(rate), _) => format!("open loop {rate}/s"),
            (_, Some(concurrency)) => format!("closed loop {concurrency} in flight"),
            _ => self.mode.clone(),
        }
    }

    /// The human-readable table `loadtest run` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} · {}{} · {} s after {} s warm-up · {} users · {} thread(s)",
            self.label,
            self.load(),
            if self.stream { " · SSE" } else { "" },
            self.duration_seconds,
            self.warmup_seconds,
            self.users,
            self.threads,
        );
        let errors = if self.errors.is_empty() {
            "no errors".to_owned()
        } else {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect();
            format!("{} errors ({})", self.error_count(), kinds.join(", "))
        };
        let unanswered = if self.unanswered > 0 {
            format!(", {} UNANSWERED", self.unanswered)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {} sent, {} ok, {errors}{unanswered}, {:.1} req/s, {} connections, max {} in flight",
            self.sent, self.ok, self.throughput_rps, self.connections, self.max_inflight,
        );
        let _ = writeln!(
            out,
            "  {:<14}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, summary) in [
            ("latency", &self.latency_us),
            ("schedule lag", &self.schedule_lag_us),
            ("first chunk", &self.first_chunk_us),
            ("chunk gap", &self.chunk_gap_us),
        ] {
            if let Some(s) = summary {
                let _ = writeln!(
                    out,
                    "  {name:<14}{:>10}{:>10}{:>10}{:>10}{:>10}",
                    micros(s.p50),
                    micros(s.p90),
                    micros(s.p99),
                    micros(s.p99_9),
                    micros(s.max),
                );
            }
        }
        if let Some(events) = self.events_per_stream {
            let _ = writeln!(out, "  {events:.1} SSE events per stream");
        }
        if let Some(process) = &self.process {
            let _ = writeln!(
                out,
                "  server pid {:?}: {:.2} CPU s ({:.2} cores, {:.3} s per 10k requests), \
                 RSS {} → {} over the window (peak {})",
                process.pids,
                process.cpu_seconds,
                process.cpu_cores,
                process.cpu_seconds_per_10k,
                kib(process.rss_at_start_kib),
                kib(process.memory.rss_kib),
                kib(process.memory.peak_rss_kib),
            );
        }
        out
    }
}

/// `850 µs`, `12.35 ms`, `4.56 s`.
pub fn micros(value: u64) -> String {
    micros_to(value as f64, 2)
}

/// Microseconds in the unit that suits them, with `decimals` for ms and s
/// (whole microseconds always).
pub fn micros_to(value: f64, decimals: usize) -> String {
    if value < 1_000.0 {
        format!("{value:.0} µs")
    } else if value < 1_000_000.0 {
        format!("{:.decimals$} ms", value / 1_000.0)
    } else {
        format!("{:.decimals$} s", value / 1_000_000.0)
    }
}

/// A signed difference in microseconds, for overheads: `+42 µs`, `-0.10 ms`.
pub fn micros_delta(value: i64) -> String {
    let sign = if value < 0 { "-" } else { "+" };
    format!("{sign}{}", micros(value.unsigned_abs()))
}

/// `812 KiB`, `12.3 MiB`.
pub fn kib(value: u64) -> String {
    if value < 1024 {
        format!("{value} KiB")
    } else {
        format!("{:.1} MiB", value as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_magnitude() {
        assert_eq!(micros(850), "850 µs");
        assert_eq!(micros(12_345), "12.35 ms");
        assert_eq!(micros(4_560_000), "4.56 s");
        assert_eq!(micros_delta(-100), "-100 µs");
        assert_eq!(micros_delta(42), "+42 µs");
        assert_eq!(kib(12_595), "12.3 MiB");
        assert_eq!(micros_to(5_000.0, 0), "5 ms");
        assert_eq!(micros_to(2e6, 0), "2 s");
    }
}
