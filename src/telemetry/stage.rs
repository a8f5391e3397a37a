//! A split epoch: the time since the treatment fraction (or experiment, or
//! salt) last changed. Stage age, per-arm counts for the sample ratio test
//! and the guardrails' earliest reading all start with it, so nothing from
//! an earlier split is mixed into a comparison.
//!
//! It also keeps what the guard's sequential tests need and Prometheus'
//! buckets cannot give: each arm's latency and time to first token in a
//! quantile sketch with a bounded relative error (DDSketch buckets at
//! 0.5%, [`abgate_sequential::sketch`]), and the count, sum and sum of
//! squares of its completion tokens and response bytes. Recording is lock-free: an atomic add per
//! bucket or sum.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use abgate_sequential::sketch::Sketch;
use serde::Serialize;

use crate::experiment::assign::Variant;
use crate::experiment::srm::ArmCounts;
use crate::telemetry::readback::Reading;

/// The lowest bucket key kept: γ^-1400 ≈ 0.9 µs. Shorter values count in it.
const LOWEST_KEY: i32 = -1400;
/// Buckets kept: up to γ^1000 ≈ 6 hours; longer values count in the last.
const KEYS: usize = 2400;

/// A quantile sketch's bucket counts, shared by the requests that add to
/// them: 2,400 atomic counters (19 KiB) on the same keys as
/// [`Sketch::new`], so that [`AtomicSketch::snapshot`] is exact.
#[derive(Debug)]
pub(crate) struct AtomicSketch {
    counts: Box<[AtomicU64]>,
    ln_gamma: f64,
}

impl Default for AtomicSketch {
    fn default() -> Self {
        Self {
            counts: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
            ln_gamma: Sketch::new().gamma().ln(),
        }
    }
}

impl AtomicSketch {
    /// Counts one value (seconds).
    pub(crate) fn insert(&self, value: Duration) {
        let seconds = value.as_secs_f64().max(1e-9);
        let key = (seconds.ln() / self.ln_gamma).ceil();
        let index = (key - f64::from(LOWEST_KEY)).clamp(0.0, (KEYS - 1) as f64) as usize;
        if let Some(count) = self.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far, as a sketch the sequential tests read.
    pub(crate) fn snapshot(&self) -> Sketch {
        let mut sketch = Sketch::new();
        for (index, count) in self.counts.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                sketch.insert_bucket(LOWEST_KEY + index as i32, count);
            }
        }
        sketch
    }
}

/// Count, sum and sum of squares of a quantity, shared lock-free.
#[derive(Debug, Default)]
pub(crate) struct AtomicMoments {
    count: AtomicU64,
    sum: AtomicU64,
    /// An f64's bits: squares of token counts outgrow a u64's range.
    sum_squares: AtomicU64,
}

impl AtomicMoments {
    pub(crate) fn add(&self, value: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        let square = (value as f64) * (value as f64);
        let _ = self
            .sum_squares
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + square).to_bits())
            });
    }

    /// (count, sum, sum of squares).
    pub(crate) fn read(&self) -> (u64, f64, f64) {
        (
            self.count.load(Ordering::Relaxed),
            self.sum.load(Ordering::Relaxed) as f64,
            f64::from_bits(self.sum_squares.load(Ordering::Relaxed)),
        )
    }
}

/// One arm's answers over the stage, for the guard.
#[derive(Debug, Default)]
pub(crate) struct StageArm {
    /// Every answer's duration, start to last byte.
    pub(crate) latency: AtomicSketch,
    /// Streamed answers' time to their first byte.
    pub(crate) ttft: AtomicSketch,
    /// Completion tokens of the answers whose usage was read.
    pub(crate) completion_tokens: AtomicMoments,
    /// Every answer's length on the wire: the length check's measure when
    /// usage is not known.
    pub(crate) response_bytes: AtomicMoments,
}

impl StageArm {
    /// Counts one randomly assigned answer.
    pub(crate) fn record(
        &self,
        duration: Duration,
        time_to_first_byte: Option<Duration>,
        completion_tokens: Option<u64>,
        response_bytes: u64,
    ) {
        self.latency.insert(duration);
        self.response_bytes.add(response_bytes);
        if let Some(ttft) = time_to_first_byte {
            self.ttft.insert(ttft);
        }
        if let Some(tokens) = completion_tokens {
            self.completion_tokens.add(tokens);
        }
    }

    /// What `/admin/stats` shows of the arm over the stage.
    pub(crate) fn summary(&self) -> StageSummary {
        let (latency, ttft) = (self.latency.snapshot(), self.ttft.snapshot());
        let (tokens, sum, _) = self.completion_tokens.read();
        StageSummary {
            answers: latency.count(),
            latency_p95_seconds: latency.quantile(0.95),
            streams: ttft.count(),
            ttft_p95_seconds: ttft.quantile(0.95),
            answers_with_usage: tokens,
            mean_completion_tokens: (tokens > 0).then(|| sum / tokens as f64),
        }
    }
}

/// One arm over the stage: sketch quantiles (within 1% of the exact
/// order statistic), not interpolated from Prometheus' buckets.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StageSummary {
    pub(crate) answers: u64,
    pub(crate) latency_p95_seconds: Option<f64>,
    pub(crate) streams: u64,
    pub(crate) ttft_p95_seconds: Option<f64>,
    pub(crate) answers_with_usage: u64,
    pub(crate) mean_completion_tokens: Option<f64>,
}

/// One split, from the moment it began.
#[derive(Debug)]
pub(crate) struct SplitEpoch {
    pub(crate) since: Instant,
    pub(crate) since_wall: SystemTime,
    /// Requests and distinct users per arm from assigned users, and the
    /// sample ratio test's state for the stage (its always-valid p-value is
    /// a running minimum over the stage's looks).
    pub(crate) counts: ArmCounts,
    /// Cumulative metrics when the split began.
    pub(crate) baseline: Reading,
    /// The split was in force when this process started (not changed while
    /// it ran): a fleet's stage began before this replica saw it.
    pub(crate) at_start: bool,
    /// Control's and treatment's answers over the stage.
    arms: [StageArm; 2],
}

impl SplitEpoch {
    /// A split beginning now, from `baseline`; `at_start` when it is the
    /// one the process started with.
    pub(crate) fn begin(baseline: Reading, at_start: bool) -> Self {
        Self {
            since: baseline.at,
            since_wall: SystemTime::now(),
            counts: ArmCounts::default(),
            baseline,
            at_start,
            arms: Default::default(),
        }
    }

    /// An arm's answers over the stage; none for unassigned requests,
    /// which belong to no arm.
    pub(crate) fn arm(&self, variant: Variant) -> Option<&StageArm> {
        match variant {
            Variant::Control => self.arms.first(),
            Variant::Treatment => self.arms.get(1),
            Variant::Unassigned => None,
        }
    }

    /// Seconds since the split began.
    pub(crate) fn age_seconds(&self) -> f64 {
        self.since.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shared_sketch_reads_quantiles_within_one_percent() {
        let sketch = AtomicSketch::default();
        // 1 ms to 10 s, spread log-uniformly: every bucket range at once.
        let mut values: Vec<f64> = (0..10_000)
            .map(|i| 1e-3 * 10f64.powf(4.0 * f64::from(i) / 10_000.0))
            .collect();
        for value in &values {
            sketch.insert(Duration::from_secs_f64(*value));
        }
        values.sort_by(f64::total_cmp);
        let snapshot = sketch.snapshot();
        assert_eq!(snapshot.count(), 10_000);
        for q in [0.5, 0.95, 0.99] {
            let exact = values[(q * 10_000.0) as usize - 1];
            let read = snapshot.quantile(q).unwrap();
            assert!(
                (read / exact - 1.0).abs() <= 0.011,
                "q{q}: {read} vs {exact}"
            );
        }
        // Outside the kept range: counted at its edges, never lost.
        sketch.insert(Duration::ZERO);
        sketch.insert(Duration::from_secs(1_000_000));
        assert_eq!(sketch.snapshot().count(), 10_002);
    }

    #[test]
    fn moments_add_up() {
        let moments = AtomicMoments::default();
        for tokens in [10, 20, 30] {
            moments.add(tokens);
        }
        assert_eq!(moments.read(), (3, 60.0, 1400.0));
    }
}
