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
//! The unit randomised is the user, while the unit counted is the request:
//! a user who sends ten requests moves ten counts to one arm at once, so
//! requests are over-dispersed and a plain chi-square would cry wolf on
//! ordinary traffic. The counts are therefore also kept per bucket (the
//! buckets are the clusters the hash randomises), the over-dispersion is
//! estimated from how much bucket counts vary within each arm (the
//! quasi-Poisson dispersion, at least 1), and the statistic is divided by
//! it before p is read. With one request per user this is the plain test.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::experiment::assign::{is_treatment, Variant, BUCKETS};
use abgate_sequential::math::erfc;

/// p-value below which the split is flagged.
pub(crate) const MISMATCH_P: f64 = 0.001;

/// Per-arm and per-bucket request counts for one treatment fraction.
#[derive(Debug)]
pub(crate) struct ArmCounts {
    control: AtomicU64,
    treatment: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Default for ArmCounts {
    fn default() -> Self {
        Self {
            control: AtomicU64::new(0),
            treatment: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl ArmCounts {
    /// Counts one request of an assigned user in `bucket`.
    pub(crate) fn count(&self, variant: Variant, bucket: u32) {
        match variant {
            Variant::Control => self.control.fetch_add(1, Ordering::Relaxed),
            Variant::Treatment => self.treatment.fetch_add(1, Ordering::Relaxed),
            Variant::Unassigned => return,
        };
        if let Some(count) = self.buckets.get(bucket as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The test result for these counts at `treatment_fraction`.
    pub(crate) fn check(&self, treatment_fraction: f64) -> SampleRatio {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        SampleRatio::test_dispersed(
            self.control.load(Ordering::Relaxed),
            self.treatment.load(Ordering::Relaxed),
            treatment_fraction,
            dispersion(&counts, treatment_fraction),
        )
    }
}

/// Quasi-Poisson dispersion of per-bucket counts: the pooled within-arm
/// variance over the mean, at least 1 (Poisson), 1 without data.
pub(crate) fn dispersion(bucket_counts: &[u64], treatment_fraction: f64) -> f64 {
    let mut sums = [(0.0f64, 0.0f64, 0usize); 2];
    for (bucket, count) in bucket_counts.iter().enumerate() {
        let arm = usize::from(is_treatment(bucket as u32, treatment_fraction));
        let value = *count as f64;
        sums[arm].0 += value;
        sums[arm].1 += value * value;
        sums[arm].2 += 1;
    }
    let (mut squares, mut totals) = (0.0, 0.0);
    for (sum, sum_of_squares, n) in sums {
        if n < 2 {
            continue;
        }
        let mean = sum / n as f64;
        squares += sum_of_squares - n as f64 * mean * mean;
        totals += (n - 1) as f64 * mean;
    }
    if totals > 0.0 {
        (squares / totals).max(1.0)
    } else {
        1.0
    }
}

/// The outcome of the test.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct SampleRatio {
    pub(crate) control: u64,
    pub(crate) treatment: u64,
    /// Share of buckets in treatment: what the split promises.
    pub(crate) expected_treatment_share: f64,
    /// The plain statistic, before the dispersion is divided out.
    pub(crate) chi_square: f64,
    /// Over-dispersion of requests (1 = one request per user, Poisson).
    pub(crate) dispersion: f64,
    pub(crate) p_value: f64,
    pub(crate) mismatch: bool,
}

impl SampleRatio {
    /// Tests observed counts against the split at `treatment_fraction`,
    /// as if each request came from its own user.
    #[cfg(test)]
    fn test(control: u64, treatment: u64, treatment_fraction: f64) -> Self {
        Self::test_dispersed(control, treatment, treatment_fraction, 1.0)
    }

    /// Tests observed counts against the split, with the statistic divided
    /// by the requests' over-dispersion.
    pub(crate) fn test_dispersed(
        control: u64,
        treatment: u64,
        treatment_fraction: f64,
        dispersion: f64,
    ) -> Self {
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
            (chi, erfc((chi / dispersion.max(1.0) / 2.0).sqrt()))
        };
        Self {
            control,
            treatment,
            expected_treatment_share: share,
            chi_square,
            dispersion: dispersion.max(1.0),
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

    #[test]
    fn repeat_requests_are_not_taken_for_a_broken_split() {
        use crate::experiment::assign::bucket;
        // 600 users, five requests each, at 5%: the users' own binomial
        // noise, multiplied by five, must not read as a mismatch.
        let counts = ArmCounts::default();
        for user in 0..600 {
            let id = format!("user-{user}");
            let b = bucket(id.as_bytes(), None);
            let variant = crate::experiment::assign::variant_of(b, 0.05);
            for _ in 0..5 {
                counts.count(variant, b);
            }
        }
        let result = counts.check(0.05);
        assert!(result.dispersion > 3.0, "{result:?}");
        assert!(!result.mismatch, "{result:?}");
        // The plain test on the same counts flags it: the reason for the correction.
        assert!(SampleRatio::test(result.control, result.treatment, 0.05).p_value < result.p_value);

        // One request per user, and control users sending twice as many as
        // they should: flagged.
        let skewed = ArmCounts::default();
        for user in 0..4000 {
            let id = format!("u{user}");
            let b = bucket(id.as_bytes(), None);
            let variant = crate::experiment::assign::variant_of(b, 0.5);
            let times = if variant == Variant::Control { 2 } else { 1 };
            for _ in 0..times {
                skewed.count(variant, b);
            }
        }
        let result = skewed.check(0.5);
        assert!(result.mismatch, "{result:?}");
    }
}
