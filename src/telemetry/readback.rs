//! The guard's counts from this replica's own metrics: a cumulative
//! reading, and what happened between two of them (the stage's counts
//! are the latest reading less the one taken when the split began).

use std::time::Instant;

use crate::experiment::assign::Variant;
use crate::telemetry::metrics::{ExperimentMetrics, FeedbackTotals, Metrics};

/// One arm's counts between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ArmCounts {
    pub(crate) requests: u64,
    /// 5xx answers plus upstream 429s.
    pub(crate) errors: u64,
    pub(crate) feedback_reports: u64,
    pub(crate) feedback_completed: u64,
    /// Ratings of 1, 2, 3, 4 and 5.
    pub(crate) ratings: [u64; 5],
}

/// Both arms' cumulative counts at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub(crate) at: Instant,
    /// Control's, then treatment's: (requests, errors, feedback).
    arms: [(u64, u64, FeedbackTotals); 2],
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
            let (requests, errors) = bound.arm_counts(variant);
            (
                requests,
                errors,
                metrics.feedback_totals(experiment, variant, outcomes, completion_outcome),
            )
        };
        Self {
            at: Instant::now(),
            arms: [arm(Variant::Control), arm(Variant::Treatment)],
        }
    }

    /// What each arm counted between `earlier` and this reading:
    /// (control, treatment).
    pub(crate) fn since(&self, earlier: &Reading) -> (ArmCounts, ArmCounts) {
        let counts = |i: usize| {
            let ((requests, errors, feedback), (then_requests, then_errors, then_feedback)) =
                (&self.arms[i], &earlier.arms[i]);
            let mut ratings = [0; 5];
            for (value, slot) in ratings.iter_mut().enumerate() {
                *slot = feedback.ratings[value].saturating_sub(then_feedback.ratings[value]);
            }
            ArmCounts {
                requests: requests.saturating_sub(*then_requests),
                errors: errors.saturating_sub(*then_errors),
                feedback_reports: feedback.reports.saturating_sub(then_feedback.reports),
                feedback_completed: feedback.completed.saturating_sub(then_feedback.completed),
                ratings,
            }
        };
        (counts(0), counts(1))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::metrics::RequestRecord;
    use crate::telemetry::route::Route;

    fn record(bound: &ExperimentMetrics, variant: Variant, status: u16) {
        bound.record(&RequestRecord {
            variant,
            route: Route::Chat,
            stream: true,
            status,
            duration: Duration::from_millis(100),
            time_to_first_byte: Some(Duration::from_millis(50)),
            response_bytes: 1000,
            prompt_tokens: None,
            completion_tokens: None,
            error: crate::telemetry::metrics::UpstreamErrorKind::from_status(status),
            overhead: Duration::from_micros(10),
        });
    }

    #[test]
    fn counts_since_a_reading_leave_out_what_came_before() {
        let metrics = Metrics::new().unwrap();
        let bound = metrics.bind("exp", 0.5);
        let outcomes = vec!["completed".to_owned(), "abandoned".to_owned()];
        let take = || Reading::take(&metrics, &bound, "exp", &outcomes, "completed");
        // Before the split began: must not count.
        for _ in 0..50 {
            record(&bound, Variant::Treatment, 500);
        }
        let start = take();
        for _ in 0..90 {
            record(&bound, Variant::Control, 200);
            record(&bound, Variant::Treatment, 200);
        }
        for _ in 0..10 {
            record(&bound, Variant::Treatment, 503);
        }
        record(&bound, Variant::Treatment, 429);
        metrics.feedback("exp", Variant::Treatment, "completed", Some(5));
        metrics.feedback("exp", Variant::Treatment, "abandoned", Some(2));
        let (control, treatment) = take().since(&start);
        assert_eq!((control.requests, control.errors), (90, 0));
        assert_eq!((treatment.requests, treatment.errors), (101, 11));
        assert_eq!(
            (treatment.feedback_reports, treatment.feedback_completed),
            (2, 1)
        );
        assert_eq!(treatment.ratings, [0, 1, 0, 0, 1]);
    }
}
