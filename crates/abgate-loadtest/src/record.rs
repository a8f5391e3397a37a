//! What one generator thread measures, kept thread-local and merged once at
//! the end, so recording a sample never takes a lock.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest value a histogram holds, in microseconds (one hour); longer
/// samples are clamped to it rather than lost.
const HIGHEST_US: u64 = 3_600_000_000;

/// Quantiles kept in the JSON for plotting: dense where latency curves bend.
const CURVE_QUANTILES: &[f64] = &[
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.9625, 0.975, 0.98,
    0.99, 0.9925, 0.995, 0.9975, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
];

/// A latency histogram in microseconds, 3 significant digits.
pub struct Latencies(Histogram<u64>);

impl Latencies {
    /// An empty histogram covering 1 µs to one hour.
    pub fn new() -> Result<Self, String> {
        Histogram::new_with_bounds(1, HIGHEST_US, 3)
            .map(Self)
            .map_err(|err| format!("cannot create a histogram: {err:?}"))
    }

    /// Adds one sample; values beyond the range are clamped.
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(HIGHEST_US);
        self.0.saturating_record(micros.min(HIGHEST_US));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so this cannot fail; if it ever did,
        // the merged histogram would undercount, never corrupt.
        let _ = self.0.add(&other.0);
    }

    /// Percentiles and the plotting curve; `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Summary> {
        if self.0.is_empty() {
            return None;
        }
        let at = |quantile: f64| self.0.value_at_quantile(quantile);
        Some(Summary {
            count: self.0.len(),
            min: self.0.min(),
            mean: self.0.mean(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p99_9: at(0.999),
            max: self.0.max(),
            curve: CURVE_QUANTILES.iter().map(|&q| (q, at(q))).collect(),
        })
    }
}

/// A histogram's digest, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    /// `(quantile, value)` pairs from 0 to 1, for the percentile plot.
    pub curve: Vec<(f64, u64)>,
}

/// Everything one generator thread measured inside the measurement window.
pub struct Recorder {
    /// Answer complete, from the intended send time (open loop) or the
    /// actual send time (closed loop).
    pub latency: Latencies,
    /// Open loop: how late the request actually left, waiting for the
    /// pacer or a free connection included.
    pub schedule_lag: Latencies,
    /// Streams: first body bytes, measured like `latency`.
    pub first_chunk: Latencies,
    /// Streams: time between consecutive body reads.
    pub chunk_gap: Latencies,
    /// Requests started (each ends as `ok`, an error or `unanswered`).
    pub sent: u64,
    /// Requests answered 2xx with their whole body read.
    pub ok: u64,
    /// Failed requests by kind (`connect`, `timeout`, `status_502`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Requests still running when the generator stopped waiting.
    pub unanswered: u64,
    /// SSE events read (blank-line terminated), over all streams.
    pub events: u64,
    /// Response body bytes read.
    pub body_bytes: u64,
}

impl Recorder {
    /// Nothing recorded yet.
    pub fn new() -> Result<Self, String> {
        Ok(Self {
            latency: Latencies::new()?,
            schedule_lag: Latencies::new()?,
            first_chunk: Latencies::new()?,
            chunk_gap: Latencies::new()?,
            sent: 0,
            ok: 0,
            errors: BTreeMap::new(),
            unanswered: 0,
            events: 0,
            body_bytes: 0,
        })
    }

    /// Counts one failure of `kind`.
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }

    /// Adds everything `other` measured.
    pub fn merge(&mut self, other: &Recorder) {
        self.latency.merge(&other.latency);
        self.schedule_lag.merge(&other.schedule_lag);
        self.first_chunk.merge(&other.first_chunk);
        self.chunk_gap.merge(&other.chunk_gap);
        self.sent += other.sent;
        self.ok += other.ok;
        self.unanswered += other.unanswered;
        for (kind, count) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += count;
        }
        self.events += other.events;
        self.body_bytes += other.body_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_summaries_hold_every_sample() {
        let mut a = Latencies::new().unwrap();
        let mut b = Latencies::new().unwrap();
        for micros in 1..=100 {
            a.record(Duration::from_micros(micros));
            b.record(Duration::from_micros(micros + 100));
        }
        a.merge(&b);
        let summary = a.summary().unwrap();
        assert_eq!(summary.count, 200);
        assert_eq!(summary.min, 1);
        assert_eq!(summary.max, 200);
        assert_eq!(summary.p50, 100);
        assert_eq!(summary.curve.first().unwrap().0, 0.0);
        assert_eq!(summary.curve.last().unwrap(), &(1.0, 200));
        assert!(Latencies::new().unwrap().summary().is_none());
    }

    #[test]
    fn samples_beyond_an_hour_are_clamped_not_lost() {
        let mut latencies = Latencies::new().unwrap();
        latencies.record(Duration::from_secs(10_000));
        let summary = latencies.summary().unwrap();
        assert_eq!(summary.count, 1);
        assert!(summary.max >= HIGHEST_US);
    }
}
