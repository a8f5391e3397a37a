//! Two-sample asymptotic confidence sequences for means and proportions.
//!
//! Method: the normal-mixture (mSPRT) boundary applied to a two-sample
//! estimator. Johari, Koomen, Pekelis, Walsh, "Peeking at A/B tests",
//! KDD 2017 (Optimizely Stats Engine); Howard, Ramdas, McAuliffe, Sekhon,
//! "Time-uniform, nonparametric, nonasymptotic confidence sequences",
//! Ann. Stat. 2021 (normal mixture, Prop. 4, two-sided); Waudby-Smith,
//! Arbour, Sinha, Kennedy, Ramdas, "Time-uniform central limit theory and
//! asymptotic confidence sequences", 2021 (their Gaussian-mixture
//! asymptotic CS: plugging a consistent variance estimate into that
//! boundary gives an *asymptotic* CS; the same argument applies to any
//! asymptotically linear estimator, here the two-sample difference with
//! unequal arm sizes; theorem numbers differ between arXiv versions).
//!
//! With estimate d, estimator variance s2 = var_T/n_T + var_C/n_C and
//! mixing variance τ², the CS is {θ₀ : Λ(θ₀) < 1/α}, Λ as in
//! [`crate::math::msprt_lambda`], i.e. d ± sqrt(2 s2 (s2+τ²)/τ² ·
//! ln(sqrt((s2+τ²)/s2)/α)).
//!
//! **Choice of τ² (scale-aware).** τ² = ρ² · (N · s2), where N = n_T + n_C
//! and N·s2 is the per-observation variance of the estimator (stable as
//! the stage grows at a fixed split), so τ² is in units of the estimate
//! squared. ρ² = (−2 ln α + ln(1 − 2 ln α)) / N_opt is Howard et al.'s
//! (§3.5) choice that makes the boundary tightest when N reaches the
//! target `target_n`. The ratio τ²/s2 = ρ² N is then exactly the
//! Waudby-Smith et al. form with t = N. The width is insensitive to
//! N_opt (a factor ~1.2–1.5 across two orders of magnitude).
//!
//! Validity is asymptotic (CLT plug-in). For small counts the decision
//! layer requires `min_per_arm` and the proportion variances use a
//! +1/+2 pseudo-count (Agresti–Caffo style) so a run of zero events
//! cannot produce a zero-width interval; the simulator checks the A/A
//! false-trip rate with these settings.

use crate::math::{mixture_tuning_level, normal_mixture_radius};
use serde::Serialize;

/// Sufficient statistics of a real-valued metric for one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanStats {
    /// Number of observations.
    pub n: u64,
    /// Sum of observations.
    pub sum: f64,
    /// Sum of squared observations.
    pub sum_sq: f64,
}

impl MeanStats {
    /// From raw sufficient statistics.
    pub fn new(n: u64, sum: f64, sum_sq: f64) -> Self {
        MeanStats { n, sum, sum_sq }
    }

    /// Add one observation (non-finite values are ignored).
    pub fn push(&mut self, x: f64) {
        if x.is_finite() {
            self.n = self.n.saturating_add(1);
            self.sum += x;
            self.sum_sq += x * x;
        }
    }

    /// Add another arm's statistics.
    pub fn merge(&mut self, o: &MeanStats) {
        self.n = self.n.saturating_add(o.n);
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }

    /// Sample mean, `None` for n = 0 or non-finite sums.
    pub fn mean(&self) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let m = self.sum / self.n as f64;
        m.is_finite().then_some(m)
    }

    /// The same observations read as varying at least `floor` (sample
    /// variance): values recorded to a resolution (whole tokens, bytes,
    /// rating points) carry at least its rounding error, 1/12 of a unit
    /// squared, so a run of identical values still yields an interval.
    pub fn with_min_variance(&self, floor: f64) -> MeanStats {
        match self.variance() {
            Some(v) if v < floor && floor.is_finite() => {
                let n = self.n as f64;
                MeanStats {
                    sum_sq: self.sum * self.sum / n + floor * (n - 1.0),
                    ..*self
                }
            }
            _ => *self,
        }
    }

    /// Unbiased sample variance (clamped at 0), `None` for n < 2.
    pub fn variance(&self) -> Option<f64> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        let m = self.sum / n;
        let v = (self.sum_sq - n * m * m) / (n - 1.0);
        v.is_finite().then_some(v.max(0.0))
    }
}

/// Event counts of a Bernoulli metric for one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CountStats {
    /// Number of trials (requests, feedback reports).
    pub trials: u64,
    /// Number of events (errors, completions); clamped to `trials`.
    pub events: u64,
}

impl CountStats {
    /// From counts.
    pub fn new(trials: u64, events: u64) -> Self {
        CountStats { trials, events }
    }

    fn events_clamped(&self) -> u64 {
        self.events.min(self.trials)
    }

    /// Raw proportion, `None` for zero trials.
    pub fn proportion(&self) -> Option<f64> {
        (self.trials > 0).then(|| self.events_clamped() as f64 / self.trials as f64)
    }
}

/// One look's interval, with what is needed to extrapolate its width.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// Point estimate (difference, or log-ratio).
    pub estimate: f64,
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Estimator variance used (s2).
    pub s2: f64,
    /// N = n_T + n_C used for the boundary.
    pub n_total: f64,
}

/// The normal-mixture boundary with its tuning (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MixtureBoundary {
    /// Miscoverage α of the whole sequence.
    pub alpha: f64,
    /// ρ² per observation (τ² = ρ² · N · s2).
    pub rho2: f64,
}

impl MixtureBoundary {
    /// Boundary at level `alpha`, tightest near `target_n` total
    /// observations. Invalid input gives a boundary with infinite radius.
    pub fn new(alpha: f64, target_n: f64) -> Self {
        let level = mixture_tuning_level(alpha);
        let rho2 = if target_n.is_finite() && target_n > 0.0 {
            level / target_n
        } else {
            f64::NAN
        };
        MixtureBoundary { alpha, rho2 }
    }

    /// Radius for estimator variance `s2` at N = `n_total` observations.
    pub fn radius(&self, s2: f64, n_total: f64) -> f64 {
        normal_mixture_radius(s2, self.rho2 * n_total, self.alpha)
    }

    /// Mixing variance τ² = ρ² N s2 (for [`crate::math::msprt_lambda`]).
    pub fn tau2(&self, s2: f64, n_total: f64) -> f64 {
        self.rho2 * n_total * s2
    }

    fn interval(&self, estimate: f64, s2: f64, n_total: f64) -> Option<Interval> {
        if !(estimate.is_finite() && s2.is_finite() && s2 > 0.0) {
            return None;
        }
        let r = self.radius(s2, n_total);
        if !r.is_finite() {
            return None;
        }
        Some(Interval {
            estimate,
            lower: estimate - r,
            upper: estimate + r,
            s2,
            n_total,
        })
    }
}

fn total(a: u64, b: u64) -> f64 {
    a as f64 + b as f64
}

/// CS for μ_T − μ_C from sufficient statistics. `None` if an arm has
/// n < 2, the variance is 0 or anything is non-finite.
pub fn diff_of_means(t: &MeanStats, c: &MeanStats, b: &MixtureBoundary) -> Option<Interval> {
    let (mt, mc) = (t.mean()?, c.mean()?);
    let (vt, vc) = (t.variance()?, c.variance()?);
    let s2 = vt / t.n as f64 + vc / c.n as f64;
    b.interval(mt - mc, s2, total(t.n, c.n))
}

/// CS for ln(μ_T/μ_C) by the delta method: Var(ln x̄) ≈ var/(n x̄²).
/// `None` if a mean is ≤ 0 (the metric must be positive, e.g. tokens).
pub fn log_ratio_of_means(t: &MeanStats, c: &MeanStats, b: &MixtureBoundary) -> Option<Interval> {
    let (mt, mc) = (t.mean()?, c.mean()?);
    if !(mt > 0.0 && mc > 0.0) {
        return None;
    }
    let (vt, vc) = (t.variance()?, c.variance()?);
    let s2 = vt / (t.n as f64 * mt * mt) + vc / (c.n as f64 * mc * mc);
    b.interval(mt.ln() - mc.ln(), s2, total(t.n, c.n))
}

/// Pseudo-count proportion (x + 1)/(n + 2) used for variances only.
fn smoothed(x: &CountStats) -> f64 {
    (x.events_clamped() as f64 + 1.0) / (x.trials as f64 + 2.0)
}

/// CS for p_T − p_C from counts. The estimate is the raw difference; the
/// variance uses (x+1)/(n+2) per arm so it is never zero.
pub fn diff_of_proportions(
    t: &CountStats,
    c: &CountStats,
    b: &MixtureBoundary,
) -> Option<Interval> {
    let (pt, pc) = (t.proportion()?, c.proportion()?);
    let (st, sc) = (smoothed(t), smoothed(c));
    let s2 = st * (1.0 - st) / t.trials as f64 + sc * (1.0 - sc) / c.trials as f64;
    b.interval(pt - pc, s2, total(t.trials, c.trials))
}

/// CS for ln(p_T/p_C) (delta method, Var(ln p̂) ≈ (1−p)/(n p)), with the
/// continuity-corrected p̃ = (x + ½)/(n + 1) so zero counts are finite.
pub fn log_ratio_of_proportions(
    t: &CountStats,
    c: &CountStats,
    b: &MixtureBoundary,
) -> Option<Interval> {
    if t.trials == 0 || c.trials == 0 {
        return None;
    }
    let cc = |x: &CountStats| (x.events_clamped() as f64 + 0.5) / (x.trials as f64 + 1.0);
    let (pt, pc) = (cc(t), cc(c));
    let s2 = (1.0 - pt) / (t.trials as f64 * pt) + (1.0 - pc) / (c.trials as f64 * pc);
    b.interval(pt.ln() - pc.ln(), s2, total(t.trials, c.trials))
}

/// Running intersection of a confidence sequence's intervals within one
/// stage: lower = max of lowers, upper = min of uppers.
///
/// If every interval covers the truth simultaneously (the CS event, prob
/// ≥ 1−α), so does their intersection; so coverage is unchanged and the
/// bounds become monotone. If the intersection becomes empty the model is
/// wrong (non-stationary data, or an asymptotic CS failing): this is
/// reported through [`Sequence::empty_events`] / the returned flag and the
/// sequence restarts from the latest interval (documented choice: the
/// freshest interval is the best available information).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sequence {
    lower: f64,
    upper: f64,
    started: bool,
    empty_events: u64,
}

impl Sequence {
    /// Empty (no interval seen yet).
    pub fn new() -> Self {
        Sequence {
            lower: f64::NEG_INFINITY,
            upper: f64::INFINITY,
            started: false,
            empty_events: 0,
        }
    }

    /// Forget everything (new stage).
    pub fn reset(&mut self) {
        *self = Sequence::new();
    }

    /// Intersect with [lower, upper]; NaN bounds are treated as unbounded.
    /// Returns the running (lower, upper) and whether the intersection had
    /// become empty at this look (then the result is this look's interval).
    pub fn update(&mut self, lower: f64, upper: f64) -> (f64, f64, bool) {
        let lower = if lower.is_nan() {
            f64::NEG_INFINITY
        } else {
            lower
        };
        let upper = if upper.is_nan() { f64::INFINITY } else { upper };
        if !self.started {
            self.started = true;
            self.lower = lower;
            self.upper = upper;
            return (lower, upper, false);
        }
        let lo = self.lower.max(lower);
        let hi = self.upper.min(upper);
        if lo > hi {
            self.empty_events = self.empty_events.saturating_add(1);
            self.lower = lower;
            self.upper = upper;
            return (lower, upper, true);
        }
        self.lower = lo;
        self.upper = hi;
        (lo, hi, false)
    }

    /// Current running bounds, `None` before the first interval.
    pub fn current(&self) -> Option<(f64, f64)> {
        self.started.then_some((self.lower, self.upper))
    }

    /// How many times the intersection became empty this stage.
    pub fn empty_events(&self) -> u64 {
        self.empty_events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_inputs_give_none() {
        let b = MixtureBoundary::new(0.05, 1e4);
        let z = MeanStats::default();
        assert!(diff_of_means(&z, &z, &b).is_none());
        let nan = MeanStats::new(10, f64::NAN, 1.0);
        assert!(diff_of_means(&nan, &nan, &b).is_none());
        let constant = MeanStats::new(10, 10.0, 10.0);
        assert!(diff_of_means(&constant, &constant, &b).is_none());
        let floored = constant.with_min_variance(1.0 / 12.0);
        assert!((floored.variance().unwrap() - 1.0 / 12.0).abs() < 1e-9);
        assert_eq!(floored.mean(), constant.mean());
        assert!(diff_of_means(&floored, &floored, &b).is_some());
        let neg = MeanStats::new(10, -10.0, 20.0);
        assert!(log_ratio_of_means(&neg, &neg, &b).is_none());
        let c0 = CountStats::new(0, 0);
        assert!(diff_of_proportions(&c0, &c0, &b).is_none());
        assert!(log_ratio_of_proportions(&c0, &c0, &b).is_none());
        // zero events still give a finite, non-degenerate interval
        let c = CountStats::new(100, 0);
        let iv = diff_of_proportions(&c, &c, &b);
        assert!(iv.is_some_and(|iv| iv.upper > iv.lower));
        let iv = log_ratio_of_proportions(&c, &CountStats::new(100, 500), &b);
        assert!(iv.is_some_and(|iv| iv.upper.is_finite()));
        let bad = MixtureBoundary::new(f64::NAN, 1e4);
        assert!(diff_of_proportions(&c, &c, &bad).is_none());
    }

    #[test]
    fn sequence_intersects_and_reports_empty() {
        let mut s = Sequence::new();
        assert_eq!(s.current(), None);
        assert_eq!(s.update(-1.0, 1.0), (-1.0, 1.0, false));
        assert_eq!(s.update(-0.5, 2.0), (-0.5, 1.0, false));
        assert_eq!(s.update(f64::NAN, 0.8), (-0.5, 0.8, false));
        assert_eq!(s.update(3.0, 4.0), (3.0, 4.0, true));
        assert_eq!(s.empty_events(), 1);
        s.reset();
        assert_eq!(s.current(), None);
    }
}
