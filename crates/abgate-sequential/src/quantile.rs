//! Confidence sequences for a fixed quantile, read from a [`Sketch`].
//!
//! Howard & Ramdas, "Sequential estimation of quantiles with applications
//! to A/B-testing and best-arm identification", Bernoulli 2022: a CS for
//! the p-quantile q is obtained from order statistics at the ranks where a
//! uniform boundary for the count process N_t = #{i ≤ t : X_i ≤ q} is
//! crossed (their fixed-quantile construction; `confseq`'s
//! `fixed_quantile_confidence_bounds`).
//!
//! **Boundary.** N_t is Binomial(t, p) at the true quantile (continuous
//! data). We use the two-sided beta-binomial mixture (Howard, Ramdas,
//! McAuliffe, Sekhon, Ann. Stat. 2021, Prop. 6): with a Beta(a, b) prior
//! on the Bernoulli rate,
//! M_t(k) = B(a+k, b+t−k)/B(a, b) / (p^k (1−p)^(t−k))
//! is the mixture of likelihood ratios, an exact nonnegative martingale
//! with mean 1 under rate p, so by Ville P(∃t: M_t(N_t) ≥ 1/α) ≤ α. The
//! count confidence set K_t = {k : M_t(k) < 1/α} = [k_lo, k_hi] is an
//! interval (ln M_t is convex in k) containing ≈ tp. It is non-asymptotic
//! and exact for small t (no CLT), and handles the skewed Bernoulli(0.05)
//! tail of a p95 correctly (a Gaussian boundary with variance p(1−p)
//! would not be valid on the heavy side).
//!
//! Prior: a = p·c, b = (1−p)·c with c from [`beta_concentration`]
//! (tightest near `target_n` observations).
//!
//! **Ranks.** On the CS event, N_t ≥ k_lo, so the k_lo-th order
//! statistic is ≤ q (lower bound; none if k_lo = 0), and N_t ≤ k_hi, so
//! the (k_hi+1)-th order statistic is > q (upper bound; none if
//! k_hi + 1 > t). With atoms the coupling X_i = F⁻¹(U_i) with uniform U_i
//! gives the same guarantee (#{X ≤ q} ≥ #{U ≤ p} ≥ #{X < q}).
//!
//! **Sketch.** We do not use the sketch's representative value: the lower
//! bound is the lower *edge* of the bucket holding rank k_lo and the
//! upper bound the upper edge of the bucket holding rank k_hi+1. The true
//! order statistic lies in that bucket, so the sketch cannot make the
//! bound invalid; it only widens it by at most one bucket (≈1% at
//! a = 0.005).

use crate::math::{beta_concentration, ln_beta, ln_gamma};
use crate::sketch::Sketch;
use serde::Serialize;

/// The count boundary for one quantile level, with a warm-start cache so
/// repeated looks at a growing t cost O(log Δt) evaluations.
#[derive(Debug, Clone)]
pub struct QuantileBoundary {
    p: f64,
    alpha: f64,
    a: f64,
    b: f64,
    ln_beta_ab: f64,
    ln_p: f64,
    ln_1mp: f64,
    ln_threshold: f64,
    valid: bool,
    /// (t, k_lo, k_hi) of the last call, used as a search hint.
    hint: Option<(u64, u64, u64)>,
}

/// The count confidence set [k_lo, k_hi] at time t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CountBounds {
    /// Observations so far.
    pub t: u64,
    /// Smallest plausible count below the quantile.
    pub k_lo: u64,
    /// Largest plausible count below the quantile.
    pub k_hi: u64,
}

impl CountBounds {
    /// 1-based rank of the lower-bound order statistic (`None`: no bound).
    pub fn lower_rank(&self) -> Option<u64> {
        (self.k_lo >= 1).then_some(self.k_lo)
    }
    /// 1-based rank of the upper-bound order statistic (`None`: no bound).
    pub fn upper_rank(&self) -> Option<u64> {
        let r = self.k_hi.saturating_add(1);
        (r <= self.t).then_some(r)
    }
}

/// A quantile CS at one look. `None` bounds mean 0 (lower) or +∞ (upper).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuantileInterval {
    /// Sketch estimate of the quantile.
    pub estimate: Option<f64>,
    /// Lower confidence bound.
    pub lower: Option<f64>,
    /// Upper confidence bound.
    pub upper: Option<f64>,
}

impl QuantileBoundary {
    /// Boundary for quantile level `p` ∈ (0,1) at level `alpha`, tuned for
    /// `target_n` observations. Invalid parameters give a boundary that
    /// never bounds anything (`k_lo = 0`, `k_hi = t`).
    pub fn new(p: f64, alpha: f64, target_n: f64) -> Self {
        let valid = p > 0.0 && p < 1.0 && alpha > 0.0 && alpha < 1.0;
        let c = beta_concentration(alpha, target_n);
        let (a, b) = (p * c, (1.0 - p) * c);
        QuantileBoundary {
            p,
            alpha,
            a,
            b,
            ln_beta_ab: ln_beta(a, b),
            ln_p: p.ln(),
            ln_1mp: (1.0 - p).ln(),
            ln_threshold: -alpha.ln(),
            valid: valid && a > 0.0 && b > 0.0,
            hint: None,
        }
    }

    /// Quantile level p.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Miscoverage α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// ln M_t(k), the log mixture likelihood ratio (see module docs).
    pub fn log_mixture(&self, t: u64, k: u64) -> f64 {
        let (tf, kf) = (t as f64, k.min(t) as f64);
        ln_gamma(self.a + kf) + ln_gamma(self.b + tf - kf)
            - ln_gamma(self.a + self.b + tf)
            - self.ln_beta_ab
            - kf * self.ln_p
            - (tf - kf) * self.ln_1mp
    }

    fn inside(&self, t: u64, k: u64) -> bool {
        self.log_mixture(t, k) < self.ln_threshold
    }

    /// The count confidence set at time `t`.
    pub fn count_bounds(&mut self, t: u64) -> CountBounds {
        let trivial = CountBounds {
            t,
            k_lo: 0,
            k_hi: t,
        };
        if !self.valid || t == 0 {
            return trivial;
        }
        let tf = t as f64;
        let mut k_star = ((tf * self.p).round() as u64).min(t);
        if !self.inside(t, k_star) {
            // Not expected (M_t(tp) ≤ ~1), but find the minimiser of the
            // convex ln M_t(·) to be safe.
            let (mut lo, mut hi) = (0u64, t);
            while hi - lo > 2 {
                let m1 = lo + (hi - lo) / 3;
                let m2 = hi - (hi - lo) / 3;
                if self.log_mixture(t, m1) < self.log_mixture(t, m2) {
                    hi = m2;
                } else {
                    lo = m1;
                }
            }
            k_star = (lo..=hi)
                .min_by(|&x, &y| {
                    self.log_mixture(t, x)
                        .partial_cmp(&self.log_mixture(t, y))
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .unwrap_or(k_star);
            if !self.inside(t, k_star) {
                // Empty set cannot happen for a martingale with M ≥ 0
                // somewhere below 1/α; report the trivial set.
                return trivial;
            }
        }
        let (hint_lo, hint_hi) = match self.hint {
            Some((t0, l0, h0)) if t0 <= t => {
                let shift = ((t - t0) as f64 * self.p).round() as u64;
                (l0.saturating_add(shift), h0.saturating_add(shift))
            }
            _ => (k_star, k_star),
        };
        let k_lo = self.edge_low(t, k_star, hint_lo.min(k_star));
        let k_hi = self.edge_high(t, k_star, hint_hi.clamp(k_star, t));
        self.hint = Some((t, k_lo, k_hi));
        CountBounds { t, k_lo, k_hi }
    }

    /// Smallest k in [0, k_star] inside the set (k_star is inside).
    fn edge_low(&self, t: u64, k_star: u64, hint: u64) -> u64 {
        // Invariant for bisection: `out_k` outside, `in_k` inside.
        let (mut out_k, mut in_k);
        if self.inside(t, hint) {
            in_k = hint;
            let mut step = 1u64;
            loop {
                if in_k == 0 {
                    return 0;
                }
                let cand = in_k.saturating_sub(step);
                if !self.inside(t, cand) {
                    out_k = cand;
                    break;
                }
                in_k = cand;
                step = step.saturating_mul(2);
            }
        } else {
            out_k = hint;
            let mut step = 1u64;
            loop {
                let cand = out_k.saturating_add(step).min(k_star);
                if self.inside(t, cand) {
                    in_k = cand;
                    break;
                }
                if cand == k_star {
                    return k_star;
                }
                out_k = cand;
                step = step.saturating_mul(2);
            }
        }
        while in_k - out_k > 1 {
            let mid = out_k + (in_k - out_k) / 2;
            if self.inside(t, mid) {
                in_k = mid;
            } else {
                out_k = mid;
            }
        }
        in_k
    }

    /// Largest k in [k_star, t] inside the set (k_star is inside).
    fn edge_high(&self, t: u64, k_star: u64, hint: u64) -> u64 {
        let (mut out_k, mut in_k);
        if self.inside(t, hint) {
            in_k = hint;
            let mut step = 1u64;
            loop {
                if in_k >= t {
                    return t;
                }
                let cand = in_k.saturating_add(step).min(t);
                if !self.inside(t, cand) {
                    out_k = cand;
                    break;
                }
                in_k = cand;
                step = step.saturating_mul(2);
            }
        } else {
            out_k = hint;
            let mut step = 1u64;
            loop {
                let cand = out_k.saturating_sub(step).max(k_star);
                if self.inside(t, cand) {
                    in_k = cand;
                    break;
                }
                if cand == k_star {
                    return k_star;
                }
                out_k = cand;
                step = step.saturating_mul(2);
            }
        }
        while out_k - in_k > 1 {
            let mid = in_k + (out_k - in_k) / 2;
            if self.inside(t, mid) {
                in_k = mid;
            } else {
                out_k = mid;
            }
        }
        in_k
    }

    /// The fewest observations at which the CS has an upper bound at all
    /// (a rank above the count's confidence set); `None` past 10⁹.
    pub fn first_upper_bound_at(&self) -> Option<u64> {
        let mut probe = self.clone();
        probe.hint = None;
        let mut has = |t: u64| probe.count_bounds(t).upper_rank().is_some();
        let (mut lo, mut hi) = (1u64, 2u64);
        while !has(hi) {
            lo = hi;
            hi = hi.checked_mul(2).filter(|h| *h <= 1_000_000_000)?;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if has(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// The quantile CS at this look, read from `sketch` (bucket edges).
    pub fn interval(&mut self, sketch: &Sketch) -> QuantileInterval {
        self.interval_bracketed(&Bracket::exact(sketch))
    }

    /// The quantile CS at this look from a [`Bracket`]: ranks from the
    /// count, the lower bound from `low`, the upper from `high`, the
    /// estimate from `high` (what `histogram_quantile` would read).
    pub fn interval_bracketed(&mut self, bracket: &Bracket) -> QuantileInterval {
        let t = bracket.high.count().min(bracket.low.count());
        let cb = self.count_bounds(t);
        QuantileInterval {
            estimate: bracket.high.quantile(self.p),
            lower: cb
                .lower_rank()
                .and_then(|r| bracket.low.rank_bounds(r))
                .map(|(lo, _)| lo),
            upper: cb
                .upper_rank()
                .and_then(|r| bracket.high.rank_bounds(r))
                .map(|(_, hi)| hi),
        }
    }
}

/// One arm's values known only up to coarse buckets `(lo, hi]`: `low`
/// holds each bucket's count at its lower edge and `high` at its upper
/// edge, so every order statistic of `low` is at most the true one and of
/// `high` at least. On the CS event the true order statistics bound the
/// quantile, so `low`'s lower bound and `high`'s upper bound do too. An
/// exact sketch is the bracket whose two sides are the same.
#[derive(Debug, Clone, Copy)]
pub struct Bracket<'a> {
    /// Values at (or below) their true value.
    pub low: &'a Sketch,
    /// Values at (or above) their true value.
    pub high: &'a Sketch,
}

impl<'a> Bracket<'a> {
    /// A sketch that needs no bracket.
    pub fn exact(sketch: &'a Sketch) -> Self {
        Bracket {
            low: sketch,
            high: sketch,
        }
    }
}

/// A CS for the ratio q_T/q_C of two arms' p-quantiles.
///
/// Each arm gets its own CS at α/2 (Bonferroni: both cover simultaneously
/// with probability ≥ 1−α under any dependence), and on that event
/// L_T/U_C ≤ q_T/q_C ≤ U_T/L_C.
#[derive(Debug, Clone)]
pub struct QuantileRatio {
    treatment: QuantileBoundary,
    control: QuantileBoundary,
}

/// One look of [`QuantileRatio`]. `None`: lower 0 / upper +∞.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioInterval {
    /// q̂_T / q̂_C from the sketches.
    pub estimate: Option<f64>,
    /// L_T / U_C.
    pub lower: Option<f64>,
    /// U_T / L_C.
    pub upper: Option<f64>,
    /// The treatment arm's interval.
    pub treatment: QuantileInterval,
    /// The control arm's interval.
    pub control: QuantileInterval,
}

impl QuantileRatio {
    /// Ratio CS for quantile level `p` at total level `alpha`.
    /// `target_n_treatment` / `target_n_control` tune each arm's mixture.
    pub fn new(p: f64, alpha: f64, target_n_treatment: f64, target_n_control: f64) -> Self {
        QuantileRatio {
            treatment: QuantileBoundary::new(p, alpha / 2.0, target_n_treatment),
            control: QuantileBoundary::new(p, alpha / 2.0, target_n_control),
        }
    }

    /// The fewest observations (treatment, control) at which each arm's
    /// CS has an upper bound.
    pub fn first_upper_bounds_at(&self) -> (Option<u64>, Option<u64>) {
        (
            self.treatment.first_upper_bound_at(),
            self.control.first_upper_bound_at(),
        )
    }

    /// Forget the search hints (new stage). The boundary itself has no
    /// data state.
    pub fn reset(&mut self) {
        self.treatment.hint = None;
        self.control.hint = None;
    }

    /// Interval at this look from the two arms' cumulative sketches.
    pub fn interval(&mut self, treatment: &Sketch, control: &Sketch) -> RatioInterval {
        self.interval_bracketed(&Bracket::exact(treatment), &Bracket::exact(control))
    }

    /// Interval at this look when each arm's values are known only to lie
    /// within coarse buckets (a Prometheus histogram): lower bounds read
    /// the arm's `low` sketch, upper bounds its `high` one (see
    /// [`Bracket`]), so the interval stays valid and is only wider.
    pub fn interval_bracketed(&mut self, treatment: &Bracket, control: &Bracket) -> RatioInterval {
        let t = self.treatment.interval_bracketed(treatment);
        let c = self.control.interval_bracketed(control);
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(x), Some(y)) if y > 0.0 && x.is_finite() && y.is_finite() => Some(x / y),
            _ => None,
        };
        RatioInterval {
            estimate: div(t.estimate, c.estimate),
            lower: div(t.lower, c.upper),
            upper: div(t.upper, c.lower),
            treatment: t,
            control: c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(b: &QuantileBoundary, t: u64) -> (u64, u64) {
        let ins: Vec<u64> = (0..=t).filter(|&k| b.inside(t, k)).collect();
        (ins[0], ins[ins.len() - 1])
    }

    #[test]
    fn count_bounds_match_brute_force_with_hints() {
        let mut b = QuantileBoundary::new(0.95, 0.025, 2000.0);
        for t in [1u64, 2, 5, 10, 37, 100, 101, 500, 1000, 1003, 5000] {
            let cb = b.count_bounds(t);
            assert_eq!((cb.k_lo, cb.k_hi), brute(&b, t), "t={t}");
        }
        // Cold start too.
        let mut b2 = QuantileBoundary::new(0.5, 0.05, 100.0);
        let cb = b2.count_bounds(777);
        assert_eq!((cb.k_lo, cb.k_hi), brute(&b2, 777));
    }

    #[test]
    fn a_bracket_from_coarse_buckets_contains_the_exact_interval() {
        // Values 1..=2000 ms; coarse buckets with edges 1.5× apart.
        let edges: Vec<f64> = (0..20).map(|i| 0.001 * 1.5f64.powi(i)).collect();
        let (mut exact, mut low, mut high) = (Sketch::new(), Sketch::new(), Sketch::new());
        for ms in 1..=2000u32 {
            let x = f64::from(ms) / 1000.0;
            exact.insert(x);
            let i = edges.iter().position(|e| x <= *e).unwrap();
            low.insert(if i == 0 { 0.0 } else { edges[i - 1] });
            high.insert(edges[i]);
        }
        let mut b = QuantileBoundary::new(0.95, 0.01, 1000.0);
        let e = b.interval(&exact);
        let w = b.interval_bracketed(&Bracket {
            low: &low,
            high: &high,
        });
        assert!(w.lower.unwrap() <= e.lower.unwrap(), "{w:?} {e:?}");
        assert!(w.upper.unwrap() >= e.upper.unwrap(), "{w:?} {e:?}");
        // Only as wide as a bucket on each side.
        assert!(
            w.upper.unwrap() / w.lower.unwrap() < 1.5 * 1.5 * 1.1,
            "{w:?}"
        );
    }

    #[test]
    fn the_first_upper_bound_is_where_the_count_set_leaves_room() {
        let b = QuantileBoundary::new(0.95, 0.001, 2000.0);
        let t = b.first_upper_bound_at().unwrap();
        let mut check = b.clone();
        assert!(check.count_bounds(t).upper_rank().is_some());
        assert!(check.count_bounds(t - 1).upper_rank().is_none());
        assert!((50..2000).contains(&t), "{t}");
    }

    #[test]
    fn invalid_parameters_are_trivial() {
        let mut b = QuantileBoundary::new(f64::NAN, 0.05, 100.0);
        let cb = b.count_bounds(50);
        assert_eq!((cb.k_lo, cb.k_hi), (0, 50));
        let mut s = Sketch::new();
        assert_eq!(b.interval(&s).lower, None);
        s.insert(1.0);
        let mut r = QuantileRatio::new(0.95, 0.05, 100.0, 100.0);
        let iv = r.interval(&s, &Sketch::new());
        assert_eq!(iv.upper, None);
        assert_eq!(iv.lower, None);
    }
}
