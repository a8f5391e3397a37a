//! A split epoch: the time since the treatment fraction (or experiment, or
//! salt) last changed. Stage age, per-arm counts for the sample ratio test
//! and the guardrails' earliest reading all start with it, so nothing from
//! an earlier split is mixed into a comparison.

use std::time::{Instant, SystemTime};

use crate::experiment::srm::ArmCounts;
use crate::telemetry::readback::Reading;

/// One split, from the moment it began.
#[derive(Debug)]
pub(crate) struct SplitEpoch {
    pub(crate) since: Instant,
    pub(crate) since_wall: SystemTime,
    /// Requests per arm from assigned users.
    pub(crate) counts: ArmCounts,
    /// Cumulative metrics when the split began.
    pub(crate) baseline: Reading,
    /// The split was in force when this process started (not changed while
    /// it ran): a fleet's numbers from before are still this split's.
    pub(crate) at_start: bool,
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
        }
    }

    /// Seconds since the split began.
    pub(crate) fn age_seconds(&self) -> f64 {
        self.since.elapsed().as_secs_f64()
    }
}
