//! Sample ratio mismatch: are the arms getting the share of traffic the
//! split says they should? A broken split (a client that retries only one
//! arm, a cache in front of one model, a bug in the hashing) invalidates
//! every other comparison, so this is checked before any of them.
//!
//! Counts are requests from assigned users (unassigned ones are in neither
//! arm) since the treatment fraction last changed, tested with a chi-square
//! goodness-of-fit test (1 degree of freedom) against the exact expected
//! share: the fraction of the 1000 buckets in treatment. Mismatch is flagged
//! at p < 0.001.
//!
//! The unit randomised is the user, while the unit counted is the request.
//! A few very heavy users can therefore push p down on their own. The
//! threshold is strict for that reason, and a flag means "look", not "proof".

use std::sync::atomic::{AtomicU64, Ordering};

use crate::assign::{is_treatment, Variant, BUCKETS};
use crate::stats::erfc;

/// p-value below which the split is flagged.
pub const MISMATCH_P: f64 = 0.001;

/// Per-arm request counts for one treatment fraction.
#[derive(Debug, Default)]
pub struct ArmCounts {
    control: AtomicU64,
    treatment: AtomicU64,
}

impl ArmCounts {
    /// Counts one assigned request.
    pub fn count(&self, variant: Variant) {
        match variant {
            Variant::Control => self.control.fetch_add(1, Ordering::Relaxed),
            Variant::Treatment => self.treatment.fetch_add(1, Ordering::Relaxed),
            Variant::Unassigned => 0,
        };
    }

    /// The test result for these counts at `treatment_fraction`.
    pub fn check(&self, treatment_fraction: f64) -> SampleRatio {
        SampleRatio::test(
            self.control.load(Ordering::Relaxed),
            self.treatment.load(Ordering::Relaxed),
            treatment_fraction,
        )
    }
}

/// The outcome of the test.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SampleRatio {
    pub control: u64,
    pub treatment: u64,
    /// Share of buckets in treatment: what the split promises.
    pub expected_treatment_share: f64,
    pub chi_square: f64,
    pub p_value: f64,
    pub mismatch: bool,
}

impl SampleRatio {
    /// Tests observed counts against the split at `treatment_fraction`.
    pub fn test(control: u64, treatment: u64, treatment_fraction: f64) -> Self {
        let treated_buckets = (0..BUCKETS)
            .filter(|bucket| is_treatment(*bucket, treatment_fraction))
            .count();
        let share = treated_buckets as f64 / f64::from(BUCKETS);
        let total = (control + treatment) as f64;
        let (chi_square, p_value) = if total == 0.0 {
            (0.0, 1.0)
        } else if share == 0.0 || share == 1.0 {
            // Every request must be in one arm: any other is a mismatch.
            let stray = if share == 0.0 { treatment } else { control };
            if stray == 0 {
                (0.0, 1.0)
            } else {
                (f64::INFINITY, 0.0)
            }
        } else {
            let expected_treatment = total * share;
            let expected_control = total - expected_treatment;
            let chi = (treatment as f64 - expected_treatment).powi(2) / expected_treatment
                + (control as f64 - expected_control).powi(2) / expected_control;
            // Chi-square with one degree of freedom: p = erfc(sqrt(x / 2)).
            (chi, erfc((chi / 2.0).sqrt()))
        };
        Self {
            control,
            treatment,
            expected_treatment_share: share,
            chi_square,
            p_value,
            mismatch: p_value < MISMATCH_P,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_p_values() {
        // 5000/5000 at 0.5: perfect.
        let even = SampleRatio::test(5000, 5000, 0.5);
        assert!(!even.mismatch && (even.p_value - 1.0).abs() < 1e-6);
        // 5200/4800 at 0.5: chi2 = 16, p = 6.33e-5 (scipy.stats.chi2.sf(16, 1)).
        let skewed = SampleRatio::test(5200, 4800, 0.5);
        assert!((skewed.chi_square - 16.0).abs() < 1e-9);
        assert!(
            (skewed.p_value - 6.334e-5).abs() < 1e-7,
            "{}",
            skewed.p_value
        );
        assert!(skewed.mismatch);
        // 9050/950 at 0.1: chi2 = 2.78, p = 0.096: within noise.
        assert!(!SampleRatio::test(9050, 950, 0.1).mismatch);
        // The exact promise is the bucket share: 0.0995 means 100 buckets of 1000.
        assert_eq!(
            SampleRatio::test(1, 1, 0.0995).expected_treatment_share,
            0.1
        );
        assert!(SampleRatio::test(10, 1, 0.0).mismatch);
        assert!(!SampleRatio::test(10, 0, 0.0).mismatch);
        assert!(!SampleRatio::test(0, 0, 0.3).mismatch);
    }
}
