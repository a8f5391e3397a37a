//! The guard's evidence: each arm's cumulative numbers over the stage, in
//! the forms the sequential tests read (`abgate_sequential`): counts for
//! the rates, sufficient statistics (n, sum, sum of squares) for the means,
//! and quantile sketches for p95s. A replica builds it from its own stage
//! ([`StageEvidence::local`]); a fleet's comes from Prometheus, where
//! latencies are known only up to histogram buckets
//! ([`Quantiles::Bracketed`]).

use abgate_sequential::mean::{CountStats, MeanStats};
use abgate_sequential::quantile::Bracket;
use abgate_sequential::sketch::Sketch;
use serde::Serialize;

use crate::experiment::assign::Variant;
use crate::telemetry::readback::{ArmCounts, Reading};
use crate::telemetry::stage::SplitEpoch;

/// One arm's values for a quantile test.
#[derive(Debug, Clone)]
pub(crate) enum Quantiles {
    /// Every value in a sketch bucket 0.5% wide.
    Exact(Sketch),
    /// Values known only to lie in coarse buckets: `low` holds each at its
    /// bucket's lower edge, `high` at its upper edge.
    Bracketed { low: Sketch, high: Sketch },
}

impl Default for Quantiles {
    fn default() -> Self {
        Quantiles::Exact(Sketch::new())
    }
}

impl Quantiles {
    pub(crate) fn bracket(&self) -> Bracket<'_> {
        match self {
            Quantiles::Exact(sketch) => Bracket::exact(sketch),
            Quantiles::Bracketed { low, high } => Bracket { low, high },
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.bracket().high.count()
    }

    /// The p-quantile as the sketch reads it (for a bracket, its upper
    /// side, as `histogram_quantile` would).
    pub(crate) fn quantile(&self, p: f64) -> Option<f64> {
        self.bracket().high.quantile(p)
    }
}

/// One arm over the stage.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArmEvidence {
    /// Requests (trials) and errors (5xx answers plus upstream 429s).
    pub(crate) requests: CountStats,
    /// Answers' duration, start to last byte, in seconds.
    pub(crate) latency: Quantiles,
    /// Streamed answers' time to first byte, in seconds.
    pub(crate) ttft: Quantiles,
    /// Completion tokens of the answers whose usage was read.
    pub(crate) completion_tokens: MeanStats,
    /// Response bytes of every answer.
    pub(crate) response_bytes: MeanStats,
    /// Feedback reports (trials) and those with the completion outcome.
    pub(crate) feedback: CountStats,
    /// Ratings, 1 to 5.
    pub(crate) ratings: MeanStats,
}

/// Both arms over the stage, and how long the numbers took to gather (for
/// estimates of how long a decision still needs).
#[derive(Debug, Clone, Default)]
pub(crate) struct StageEvidence {
    pub(crate) control: ArmEvidence,
    pub(crate) treatment: ArmEvidence,
    pub(crate) seconds: f64,
}

impl StageEvidence {
    /// This replica's numbers since the split began: counts from the
    /// metrics less the stage's baseline reading, sketches and moments from
    /// the stage itself.
    pub(crate) fn local(epoch: &SplitEpoch, latest: &Reading) -> Self {
        let (control, treatment) = latest.since(&epoch.baseline);
        let arm = |variant, counts: &ArmCounts| {
            let mut evidence = ArmEvidence::default();
            evidence.fill_counts(counts);
            if let Some(stage) = epoch.arm(variant) {
                evidence.latency = Quantiles::Exact(stage.latency.snapshot());
                evidence.ttft = Quantiles::Exact(stage.ttft.snapshot());
                evidence.completion_tokens = moments(stage.completion_tokens.read());
                evidence.response_bytes = moments(stage.response_bytes.read());
            }
            evidence
        };
        Self {
            control: arm(Variant::Control, &control),
            treatment: arm(Variant::Treatment, &treatment),
            seconds: latest
                .at
                .saturating_duration_since(epoch.since)
                .as_secs_f64(),
        }
    }
}

impl ArmEvidence {
    /// Requests, errors, feedback and ratings from counts.
    pub(crate) fn fill_counts(&mut self, counts: &ArmCounts) {
        self.requests = CountStats::new(counts.requests, counts.errors);
        self.feedback = CountStats::new(counts.feedback_reports, counts.feedback_completed);
        self.ratings = rating_moments(&counts.ratings);
    }
}

fn moments((n, sum, sum_squares): (u64, f64, f64)) -> MeanStats {
    MeanStats::new(n, sum, sum_squares)
}

/// n, sum and sum of squares of ratings counted by value (1 to 5).
pub(crate) fn rating_moments(counts: &[u64; 5]) -> MeanStats {
    let mut stats = MeanStats::default();
    for (index, count) in counts.iter().enumerate() {
        let value = (index + 1) as f64;
        let count_f = *count as f64;
        stats.n += count;
        stats.sum += value * count_f;
        stats.sum_sq += value * value * count_f;
    }
    stats
}

/// What `/admin/report` shows of an arm's evidence.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EvidenceSummary {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) answers: u64,
    pub(crate) streams: u64,
    pub(crate) answers_with_usage: u64,
    pub(crate) feedback_reports: u64,
    pub(crate) ratings: u64,
}

impl ArmEvidence {
    pub(crate) fn summary(&self) -> EvidenceSummary {
        EvidenceSummary {
            requests: self.requests.trials,
            errors: self.requests.events,
            answers: self.latency.count(),
            streams: self.ttft.count(),
            answers_with_usage: self.completion_tokens.n,
            feedback_reports: self.feedback.trials,
            ratings: self.ratings.n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_become_moments() {
        let stats = rating_moments(&[1, 0, 0, 2, 1]);
        assert_eq!((stats.n, stats.sum, stats.sum_sq), (4, 14.0, 58.0));
        assert_eq!(stats.mean(), Some(3.5));
    }
}
