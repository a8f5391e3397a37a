//! The guardrails' numbers from this replica's own metrics: cumulative
//! readings taken each interval, and windows as differences of two.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::experiment::assign::Variant;
use crate::telemetry::metrics::{ArmTotals, Buckets, ExperimentMetrics, FeedbackTotals, Metrics};

/// One arm's numbers over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ArmWindow {
    pub(crate) requests: f64,
    /// 5xx answers plus upstream 429s.
    pub(crate) errors: f64,
    pub(crate) latency_p95_seconds: Option<f64>,
    /// Streamed answers: the sample behind the time-to-first-token p95.
    pub(crate) streams: f64,
    pub(crate) ttft_p95_seconds: Option<f64>,
    pub(crate) mean_response_bytes: Option<f64>,
    pub(crate) feedback_reports: f64,
    pub(crate) feedback_completed: f64,
    /// Ratings of 1, 2, 3, 4 and 5.
    pub(crate) ratings: [f64; 5],
}

impl ArmWindow {
    pub(crate) fn error_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.errors / self.requests)
    }

    pub(crate) fn completion_rate(&self) -> Option<f64> {
        (self.feedback_reports > 0.0).then(|| self.feedback_completed / self.feedback_reports)
    }
}

/// Both arms' cumulative numbers at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub(crate) at: Instant,
    arms: [(ArmTotals, FeedbackTotals); 2],
}

impl Reading {
    /// Reads the cumulative numbers of `experiment`'s arms now.
    pub(crate) fn take(
        metrics: &Metrics,
        bound: &ExperimentMetrics,
        experiment: &str,
        outcomes: &[String],
        completion_outcome: &str,
    ) -> Self {
        let arm = |variant| {
            (
                bound.arm_totals(variant),
                metrics.feedback_totals(experiment, variant, outcomes, completion_outcome),
            )
        };
        Self {
            at: Instant::now(),
            arms: [arm(Variant::Control), arm(Variant::Treatment)],
        }
    }

    /// What each arm saw between `earlier` and this reading:
    /// (control, treatment).
    pub(crate) fn since(&self, earlier: &Reading) -> (ArmWindow, ArmWindow) {
        let window = |i: usize| {
            let ((now, feedback_now), (then, feedback_then)) = (&self.arms[i], &earlier.arms[i]);
            let requests_delta = |a: u64, b: u64| a.saturating_sub(b) as f64;
            let latency = now.latency.since(&then.latency);
            let first_byte = now.stream_first_byte.since(&then.stream_first_byte);
            let bytes: Buckets = now.response_bytes.since(&then.response_bytes);
            let mut ratings = [0.0; 5];
            for (value, slot) in ratings.iter_mut().enumerate() {
                *slot = requests_delta(feedback_now.ratings[value], feedback_then.ratings[value]);
            }
            ArmWindow {
                requests: requests_delta(now.requests, then.requests),
                errors: requests_delta(now.errors, then.errors),
                latency_p95_seconds: latency.quantile(0.95),
                streams: first_byte.count as f64,
                ttft_p95_seconds: first_byte.quantile(0.95),
                mean_response_bytes: bytes.mean(),
                feedback_reports: requests_delta(feedback_now.reports, feedback_then.reports),
                feedback_completed: requests_delta(feedback_now.completed, feedback_then.completed),
                ratings,
            }
        };
        (window(0), window(1))
    }
}

/// Readings of the current split, oldest first: the first is the reading
/// taken when the split began, so no window reaches back before it.
#[derive(Debug, Default)]
pub(crate) struct Readings {
    history: VecDeque<Reading>,
}

impl Readings {
    /// Starts over from `baseline` (the split changed).
    pub(crate) fn restart(&mut self, baseline: Reading) {
        self.history.clear();
        self.history.push_back(baseline);
    }

    /// Adds `latest` and returns the window ending at it: from the newest
    /// reading at least `length` old (or the split's start, if younger),
    /// with its span.
    pub(crate) fn window(
        &mut self,
        latest: Reading,
        length: Duration,
    ) -> (ArmWindow, ArmWindow, Duration) {
        let cutoff = latest.at.checked_sub(length);
        while self.history.len() > 1 && cutoff.is_some_and(|cutoff| self.history[1].at <= cutoff) {
            self.history.pop_front();
        }
        let start = self
            .history
            .front()
            .cloned()
            .unwrap_or_else(|| latest.clone());
        let (control, treatment) = latest.since(&start);
        let span = latest.at.saturating_duration_since(start.at);
        self.history.push_back(latest);
        (control, treatment, span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::RequestRecord;
    use crate::telemetry::route::Route;

    fn record(bound: &ExperimentMetrics, variant: Variant, status: u16, millis: u64) {
        bound.record(&RequestRecord {
            variant,
            route: Route::Chat,
            stream: true,
            status,
            duration: Duration::from_millis(millis),
            time_to_first_byte: Some(Duration::from_millis(millis / 2)),
            response_bytes: 1000,
            prompt_tokens: None,
            completion_tokens: None,
            error: crate::telemetry::metrics::UpstreamErrorKind::from_status(status),
            overhead: Duration::from_micros(10),
        });
    }

    #[test]
    fn windows_count_only_what_happened_inside_them() {
        let metrics = Metrics::new().unwrap();
        let bound = metrics.bind("exp", 0.5);
        let outcomes = vec!["completed".to_owned(), "abandoned".to_owned()];
        let take = || Reading::take(&metrics, &bound, "exp", &outcomes, "completed");
        // Before the split began: must not count.
        for _ in 0..50 {
            record(&bound, Variant::Treatment, 500, 900);
        }
        let mut readings = Readings::default();
        readings.restart(take());
        for _ in 0..90 {
            record(&bound, Variant::Control, 200, 100);
            record(&bound, Variant::Treatment, 200, 100);
        }
        for _ in 0..10 {
            record(&bound, Variant::Treatment, 503, 100);
        }
        metrics.feedback("exp", Variant::Treatment, "completed", Some(5));
        metrics.feedback("exp", Variant::Treatment, "abandoned", Some(2));
        let (control, treatment, _) = readings.window(take(), Duration::from_secs(600));
        assert_eq!(control.requests, 90.0);
        assert_eq!(control.errors, 0.0);
        assert_eq!(treatment.requests, 100.0);
        assert_eq!(treatment.errors, 10.0);
        assert_eq!(treatment.streams, 100.0);
        assert_eq!(treatment.mean_response_bytes, Some(1000.0));
        assert_eq!(
            (treatment.feedback_reports, treatment.feedback_completed),
            (2.0, 1.0)
        );
        assert_eq!(treatment.ratings, [0.0, 1.0, 0.0, 0.0, 1.0]);
        let p95 = control.latency_p95_seconds.unwrap();
        assert!(p95 > 0.05 && p95 <= 0.15, "{p95}");
        // A zero-length window keeps only the newest interval.
        record(&bound, Variant::Control, 200, 100);
        std::thread::sleep(Duration::from_millis(5));
        let (control, _, span) = readings.window(take(), Duration::ZERO);
        assert_eq!(control.requests, 1.0);
        assert!(span < Duration::from_secs(1));
    }
}
