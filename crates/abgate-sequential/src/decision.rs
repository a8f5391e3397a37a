//! The decision layer called by the gateway's guard and by the simulator.
//!
//! One state object per check persists across the looks of one stage and
//! is [`reset`](ErrorRate::reset) when the stage (the split) changes.
//! Every `observe` takes the stage's *cumulative* per-arm numbers.
//!
//! **Guarantee.** Each check keeps a confidence sequence (CS) at its own
//! α, intersected over looks ([`Sequence`]). On the CS event (prob ≥ 1−α,
//! for all looks at once) the true effect is inside every reported
//! interval, so with identical arms a check trips (Breach) with
//! probability ≤ α over the whole stage, however often it looks; and a
//! NonInferior verdict is wrong with probability ≤ α. Splitting a total α
//! over the checks with [`split_alpha`] (Bonferroni) bounds the chance
//! that *any* check trips by the total, under any dependence between
//! checks. The mean/proportion CS are asymptotic (see [`crate::mean`]);
//! the quantile and SRM ones are exact.
//!
//! **Units of [`Outcome`].** `Scale::Difference`: treatment − control in
//! the metric's units (error rate: proportion, e.g. 0.01 = 1 point;
//! rating: points). `Scale::Relative`: treatment/control − 1 (0.25 =
//! treatment 25% higher). Margins are given in the same units.
//!
//! **Verdicts.** With running bounds [lo, hi]: Breach when the bound is
//! wholly beyond a breach threshold (sticky for the rest of the stage:
//! the guard rolls back); NonInferior when the bound is wholly inside the
//! non-inferiority region (closed comparisons); otherwise Undecided;
//! InsufficientData below `min_per_arm` observations in either arm or
//! while no interval can be formed yet (e.g. zero variance).

use crate::math::normal_mixture_radius;
use crate::mean::{
    diff_of_means, diff_of_proportions, log_ratio_of_means, log_ratio_of_proportions, CountStats,
    Interval, MeanStats, MixtureBoundary, Sequence,
};
use crate::quantile::{Bracket, QuantileRatio};
use crate::sketch::Sketch;
use crate::srm::SrmTest;
use serde::Serialize;

/// The gateway's default total α per stage.
pub const DEFAULT_TOTAL_ALPHA: f64 = 0.001;
/// The gateway's default number of checks sharing it (error rate, p95
/// latency, p95 TTFT, response length, completion rate, rating).
pub const DEFAULT_CHECKS: usize = 6;

/// Bonferroni split of a total α over `enabled_checks` checks (valid
/// under any dependence). Zero checks → the total; invalid total → 0
/// (never trips).
pub fn split_alpha(total: f64, enabled_checks: usize) -> f64 {
    if !(total.is_finite() && total > 0.0) {
        return 0.0;
    }
    total.min(1.0) / enabled_checks.max(1) as f64
}

fn default_alpha() -> f64 {
    split_alpha(DEFAULT_TOTAL_ALPHA, DEFAULT_CHECKS)
}

/// Verdict of one check at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Treatment is worse beyond the breach threshold (roll back).
    Breach,
    /// Treatment is shown inside the non-inferiority margin.
    NonInferior,
    /// Neither yet.
    Undecided,
    /// Too few observations to judge.
    InsufficientData,
}

/// Which direction of change is harmful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (errors, latency).
    IncreaseIsWorse,
    /// Lower is worse (completion rate, rating).
    DecreaseIsWorse,
    /// Any large change is worse (response length).
    ChangeIsWorse,
}

/// Units of the estimate and bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// treatment − control, metric units.
    Difference,
    /// treatment / control − 1.
    Relative,
}

/// Which check produced an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Difference of error proportions.
    ErrorRate,
    /// Ratio of p-quantiles (latency, TTFT).
    QuantileIncrease,
    /// Ratio of means (response length).
    MeanShift,
    /// Ratio of proportions (completion rate).
    ProportionDecrease,
    /// Difference of means (rating).
    MeanDecrease,
    /// Sample-ratio mismatch on distinct users.
    SampleRatio,
}

/// Approximate extra observations needed before the bound would reach a
/// decision, if the current estimate and variance stayed as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MoreNeeded {
    /// Additional treatment observations.
    pub treatment: u64,
    /// Additional control observations (same split).
    pub control: u64,
}

/// Thresholds in outcome units. `None` = that side has no limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Breach when upper bound < this.
    pub breach_below: Option<f64>,
    /// Breach when lower bound > this.
    pub breach_above: Option<f64>,
    /// Non-inferior needs lower bound ≥ this.
    pub ni_lower: Option<f64>,
    /// Non-inferior needs upper bound ≤ this.
    pub ni_upper: Option<f64>,
}

impl Thresholds {
    fn breach(&self, lo: f64, hi: f64) -> bool {
        self.breach_above.is_some_and(|b| lo > b) || self.breach_below.is_some_and(|b| hi < b)
    }
    fn non_inferior(&self, lo: f64, hi: f64) -> bool {
        (self.ni_lower.is_some() || self.ni_upper.is_some())
            && self.ni_lower.map_or(true, |b| lo >= b)
            && self.ni_upper.map_or(true, |b| hi <= b)
    }
}

/// Result of one check at one look.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Outcome {
    /// Which check.
    pub check: CheckKind,
    /// Harmful direction.
    pub direction: Direction,
    /// Units of estimate/lower/upper/thresholds.
    pub scale: Scale,
    /// Point estimate at this look.
    pub estimate: Option<f64>,
    /// Running lower confidence bound (`None`: unbounded).
    pub lower: Option<f64>,
    /// Running upper confidence bound (`None`: unbounded).
    pub upper: Option<f64>,
    /// Verdict.
    pub verdict: Verdict,
    /// This check's α.
    pub alpha: f64,
    /// Breach and non-inferiority thresholds.
    pub thresholds: Thresholds,
    /// Treatment observations used.
    pub n_treatment: u64,
    /// Control observations used.
    pub n_control: u64,
    /// The running intersection became empty at this look (model wrong);
    /// bounds are this look's interval.
    pub empty_intersection: bool,
    /// Approximate extra observations to a decision (Undecided only).
    pub more_needed: Option<MoreNeeded>,
    /// Always-valid p-value (SRM only).
    pub p_value: Option<f64>,
}

/// Shared state of a check: running CS, stickiness, thresholds.
#[derive(Debug, Clone)]
struct Core {
    kind: CheckKind,
    direction: Direction,
    scale: Scale,
    alpha: f64,
    thresholds: Thresholds,
    min_per_arm: u64,
    seq: Sequence,
    tripped: bool,
}

impl Core {
    fn new(
        kind: CheckKind,
        direction: Direction,
        scale: Scale,
        alpha: f64,
        thresholds: Thresholds,
        min_per_arm: u64,
    ) -> Self {
        Core {
            kind,
            direction,
            scale,
            alpha,
            thresholds,
            min_per_arm,
            seq: Sequence::new(),
            tripped: false,
        }
    }

    fn reset(&mut self) {
        self.seq.reset();
        self.tripped = false;
    }

    fn base(&self, n_t: u64, n_c: u64) -> Outcome {
        Outcome {
            check: self.kind,
            direction: self.direction,
            scale: self.scale,
            estimate: None,
            lower: None,
            upper: None,
            verdict: Verdict::InsufficientData,
            alpha: self.alpha,
            thresholds: self.thresholds,
            n_treatment: n_t,
            n_control: n_c,
            empty_intersection: false,
            more_needed: None,
            p_value: None,
        }
    }

    fn enough(&self, n_t: u64, n_c: u64) -> bool {
        n_t >= self.min_per_arm && n_c >= self.min_per_arm && n_t > 0 && n_c > 0
    }

    /// Convert a native-scale value (difference, or log-ratio) to outcome units.
    fn to_units(&self, x: f64) -> f64 {
        match self.scale {
            Scale::Difference => x,
            Scale::Relative => x.exp() - 1.0,
        }
    }

    /// Outcome-unit threshold to native scale.
    fn to_native(&self, x: f64) -> f64 {
        match self.scale {
            Scale::Difference => x,
            Scale::Relative => {
                if x > -1.0 {
                    (1.0 + x).ln()
                } else {
                    f64::NEG_INFINITY
                }
            }
        }
    }

    /// Update the running CS with this look's native-scale bounds (or
    /// none) and produce the outcome.
    fn finish(
        &mut self,
        n_t: u64,
        n_c: u64,
        estimate_native: Option<f64>,
        bounds_native: Option<(f64, f64)>,
    ) -> (Outcome, Option<(f64, f64)>) {
        let mut out = self.base(n_t, n_c);
        let (running, empty) = match bounds_native {
            Some((lo, hi)) => {
                let (lo, hi, empty) = self.seq.update(lo, hi);
                (Some((lo, hi)), empty)
            }
            None => (self.seq.current(), false),
        };
        out.estimate = estimate_native.map(|e| self.to_units(e));
        out.empty_intersection = empty;
        let Some((lo_n, hi_n)) = running else {
            if self.tripped {
                out.verdict = Verdict::Breach;
            }
            return (out, None);
        };
        let (lo, hi) = (self.to_units(lo_n), self.to_units(hi_n));
        out.lower = lo.is_finite().then_some(lo);
        out.upper = hi.is_finite().then_some(hi);
        out.verdict = if self.tripped || self.thresholds.breach(lo, hi) {
            self.tripped = true;
            Verdict::Breach
        } else if self.thresholds.non_inferior(lo, hi) {
            Verdict::NonInferior
        } else {
            Verdict::Undecided
        };
        (out, Some((lo_n, hi_n)))
    }

    /// Radius (native scale) at which a decision would be reached around
    /// `est`: the larger of the breach radius and the NI radius.
    fn decisive_radius(&self, est: f64) -> Option<f64> {
        let t = &self.thresholds;
        let mut best: Option<f64> = None;
        let mut consider = |r: f64| {
            if r > 0.0 && r.is_finite() {
                best = Some(best.map_or(r, |b: f64| b.max(r)));
            }
        };
        if let Some(b) = t.breach_above {
            consider(est - self.to_native(b));
        }
        if let Some(b) = t.breach_below {
            consider(self.to_native(b) - est);
        }
        let mut ni: Option<f64> = None;
        let mut ok = t.ni_lower.is_some() || t.ni_upper.is_some();
        for (b, lower_side) in [(t.ni_lower, true), (t.ni_upper, false)] {
            if let Some(b) = b {
                let gap = if lower_side {
                    est - self.to_native(b)
                } else {
                    self.to_native(b) - est
                };
                if gap > 0.0 {
                    ni = Some(ni.map_or(gap, |x: f64| x.min(gap)));
                } else {
                    ok = false;
                }
            }
        }
        if ok {
            if let Some(r) = ni {
                consider(r);
            }
        }
        best
    }
}

/// Extra observations for a normal-mixture interval: scale both arms by
/// k (same split) until radius(s2/k, N·k) ≤ target. Approximate: assumes
/// estimate and per-observation variance stay as now and ignores the
/// running intersection.
fn more_needed_mixture(
    iv: &Interval,
    b: &MixtureBoundary,
    target_radius: f64,
    n_t: u64,
    n_c: u64,
) -> Option<MoreNeeded> {
    let r = |k: f64| normal_mixture_radius(iv.s2 / k, b.rho2 * iv.n_total * k, b.alpha);
    if r(1.0) <= target_radius {
        return Some(MoreNeeded {
            treatment: 0,
            control: 0,
        });
    }
    let (mut lo, mut hi) = (1.0f64, 2.0f64);
    while r(hi) > target_radius {
        lo = hi;
        hi *= 2.0;
        if hi > 1e12 {
            return None;
        }
    }
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if r(mid) > target_radius {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(MoreNeeded {
        treatment: ((hi - 1.0) * n_t as f64).ceil() as u64,
        control: ((hi - 1.0) * n_c as f64).ceil() as u64,
    })
}

// ---------------------------------------------------------------- ErrorRate

/// Configuration of [`ErrorRate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErrorRateConfig {
    /// This check's α.
    pub alpha: f64,
    /// Breach when the lower bound of p_T − p_C exceeds this (0: "higher
    /// beyond noise").
    pub breach_threshold: f64,
    /// Non-inferior when the upper bound of p_T − p_C is ≤ this.
    pub ni_margin: f64,
    /// Requests per arm before judging.
    pub min_per_arm: u64,
    /// Total requests at which the boundary is tightest.
    pub target_n: f64,
}

impl Default for ErrorRateConfig {
    fn default() -> Self {
        ErrorRateConfig {
            alpha: default_alpha(),
            breach_threshold: 0.0,
            ni_margin: 0.005,
            min_per_arm: 200,
            target_n: 1e4,
        }
    }
}

/// Error-rate check: CS for p_T − p_C (difference of proportions).
#[derive(Debug, Clone)]
pub struct ErrorRate {
    core: Core,
    boundary: MixtureBoundary,
}

impl ErrorRate {
    /// New check.
    pub fn new(cfg: ErrorRateConfig) -> Self {
        ErrorRate {
            core: Core::new(
                CheckKind::ErrorRate,
                Direction::IncreaseIsWorse,
                Scale::Difference,
                cfg.alpha,
                Thresholds {
                    breach_below: None,
                    breach_above: Some(cfg.breach_threshold),
                    ni_lower: None,
                    ni_upper: Some(cfg.ni_margin),
                },
                cfg.min_per_arm,
            ),
            boundary: MixtureBoundary::new(cfg.alpha, cfg.target_n),
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
    }

    /// Look at cumulative (requests, errors) per arm.
    pub fn observe(&mut self, treatment: &CountStats, control: &CountStats) -> Outcome {
        let (nt, nc) = (treatment.trials, control.trials);
        mixture_observe(&mut self.core, &self.boundary, nt, nc, || {
            diff_of_proportions(treatment, control, &self.boundary)
        })
    }
}

fn mixture_observe(
    core: &mut Core,
    boundary: &MixtureBoundary,
    nt: u64,
    nc: u64,
    compute: impl FnOnce() -> Option<Interval>,
) -> Outcome {
    if !core.enough(nt, nc) {
        let mut o = core.base(nt, nc);
        if core.tripped {
            o.verdict = Verdict::Breach;
        }
        return o;
    }
    let iv = compute();
    let (mut out, _) = core.finish(
        nt,
        nc,
        iv.map(|i| i.estimate),
        iv.map(|i| (i.lower, i.upper)),
    );
    if out.verdict == Verdict::Undecided {
        if let Some(iv) = iv {
            out.more_needed = core
                .decisive_radius(iv.estimate)
                .and_then(|r| more_needed_mixture(&iv, boundary, r, nt, nc));
        }
    }
    out
}

// ---------------------------------------------------------- QuantileIncrease

/// Configuration of [`QuantileIncrease`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuantileIncreaseConfig {
    /// This check's α (split α/2 per arm inside).
    pub alpha: f64,
    /// Quantile level, e.g. 0.95.
    pub p: f64,
    /// Relative margin m: breach when q_T/q_C > 1+m surely, non-inferior
    /// when q_T/q_C ≤ 1+m surely.
    pub margin: f64,
    /// Observations per arm before judging.
    pub min_per_arm: u64,
    /// Per-arm observations at which each arm's boundary is tightest.
    pub target_n: f64,
}

impl Default for QuantileIncreaseConfig {
    fn default() -> Self {
        QuantileIncreaseConfig {
            alpha: default_alpha(),
            p: 0.95,
            margin: 0.2,
            min_per_arm: 200,
            target_n: 2e3,
        }
    }
}

/// Quantile check (p95 latency / TTFT): CS for q_T/q_C from two sketches.
#[derive(Debug, Clone)]
pub struct QuantileIncrease {
    core: Core,
    ratio: QuantileRatio,
    log_floor: f64,
}

impl QuantileIncrease {
    /// New check.
    pub fn new(cfg: QuantileIncreaseConfig) -> Self {
        QuantileIncrease {
            core: Core::new(
                CheckKind::QuantileIncrease,
                Direction::IncreaseIsWorse,
                Scale::Relative,
                cfg.alpha,
                Thresholds {
                    breach_below: None,
                    breach_above: Some(cfg.margin),
                    ni_lower: None,
                    ni_upper: Some(cfg.margin),
                },
                cfg.min_per_arm,
            ),
            ratio: QuantileRatio::new(cfg.p, cfg.alpha, cfg.target_n, cfg.target_n),
            // One bucket of each arm (default sketch): the width the
            // sketch adds that no amount of data removes.
            log_floor: 2.0 * Sketch::new().gamma().ln(),
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
        self.ratio.reset();
    }

    /// Look at the two arms' cumulative sketches.
    pub fn observe(&mut self, treatment: &Sketch, control: &Sketch) -> Outcome {
        self.observe_bracketed(&Bracket::exact(treatment), &Bracket::exact(control))
    }

    /// Look at two arms known only up to coarse buckets (see [`Bracket`]):
    /// valid, and wider by the buckets' width, which no amount of data
    /// removes.
    pub fn observe_bracketed(&mut self, treatment: &Bracket, control: &Bracket) -> Outcome {
        let (nt, nc) = (treatment.high.count(), control.high.count());
        if !self.core.enough(nt, nc) {
            let mut o = self.core.base(nt, nc);
            if self.core.tripped {
                o.verdict = Verdict::Breach;
            }
            return o;
        }
        let iv = self.ratio.interval_bracketed(treatment, control);
        let ln_or = |x: Option<f64>, none: f64| match x {
            Some(v) if v > 0.0 => v.ln(),
            Some(_) => f64::NEG_INFINITY,
            None => none,
        };
        let lo = ln_or(iv.lower, f64::NEG_INFINITY);
        let hi = ln_or(iv.upper, f64::INFINITY);
        let est = iv.estimate.filter(|e| *e > 0.0).map(f64::ln);
        let (mut out, _) = self.core.finish(nt, nc, est, Some((lo, hi)));
        if out.verdict == Verdict::Undecided {
            if let Some(e) = est {
                out.more_needed = self.more_needed(e, lo, hi, nt, nc);
            }
        }
        out
    }

    /// While a side of the interval is unbounded (an arm has too few
    /// observations above its quantile for an upper bound), what it takes
    /// for both arms to have one: a lower bound on what a decision needs.
    fn until_bounded(&self, nt: u64, nc: u64) -> Option<MoreNeeded> {
        let (t_at, c_at) = self.ratio.first_upper_bounds_at();
        // Both arms grow together at the stage's split.
        let scale = |at: Option<u64>, n: u64| at.map(|at| at as f64 / n.max(1) as f64);
        let k = scale(t_at, nt)?.max(scale(c_at, nc)?).max(1.0);
        Some(MoreNeeded {
            treatment: ((k - 1.0) * nt as f64).ceil() as u64,
            control: ((k - 1.0) * nc as f64).ceil() as u64,
        })
    }

    /// Approximation: each log half-width w shrinks like
    /// floor + (w − floor)/√k with k-fold data (ignores the boundary's
    /// slowly growing log factor), floor = one sketch bucket per arm.
    fn more_needed(&self, est: f64, lo: f64, hi: f64, nt: u64, nc: u64) -> Option<MoreNeeded> {
        let target = self.core.decisive_radius(est)?;
        // Which side decides: breach uses the lower bound, NI the upper.
        let margin = self
            .core
            .to_native(self.core.thresholds.breach_above.unwrap_or(0.0));
        let w = if est > margin { est - lo } else { hi - est };
        if !w.is_finite() {
            return self.until_bounded(nt, nc);
        }
        if target <= self.log_floor {
            return None;
        }
        if w <= target {
            return Some(MoreNeeded {
                treatment: 0,
                control: 0,
            });
        }
        let k = ((w - self.log_floor) / (target - self.log_floor)).powi(2);
        if !k.is_finite() || k > 1e12 {
            return None;
        }
        Some(MoreNeeded {
            treatment: ((k - 1.0) * nt as f64).ceil() as u64,
            control: ((k - 1.0) * nc as f64).ceil() as u64,
        })
    }
}

// ----------------------------------------------------------------- MeanShift

/// Configuration of [`MeanShift`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanShiftConfig {
    /// This check's α.
    pub alpha: f64,
    /// Relative margin m: the acceptable band for μ_T/μ_C is
    /// [1−m, 1+m] (plain, not symmetric in log: "±30%" means what it says).
    pub margin: f64,
    /// Observations per arm before judging.
    pub min_per_arm: u64,
    /// Total observations at which the boundary is tightest.
    pub target_n: f64,
    /// Least per-observation variance an arm is read with (see
    /// [`MeanStats::with_min_variance`]); 1/12 for whole units.
    pub min_variance: f64,
}

/// Rounding error of values recorded in whole units.
pub const WHOLE_UNIT_VARIANCE: f64 = 1.0 / 12.0;

/// Both arms read with at least `floor` variance (see
/// [`MeanStats::with_min_variance`]).
fn floored(treatment: &MeanStats, control: &MeanStats, floor: f64) -> (MeanStats, MeanStats) {
    (
        treatment.with_min_variance(floor),
        control.with_min_variance(floor),
    )
}

impl Default for MeanShiftConfig {
    fn default() -> Self {
        MeanShiftConfig {
            alpha: default_alpha(),
            margin: 0.3,
            min_per_arm: 200,
            target_n: 1e4,
            min_variance: WHOLE_UNIT_VARIANCE,
        }
    }
}

/// Response-length check: CS for μ_T/μ_C (log-ratio of means, delta
/// method). Breach when the CS lies wholly outside [1−m, 1+m] (either
/// side), non-inferior when wholly inside.
#[derive(Debug, Clone)]
pub struct MeanShift {
    core: Core,
    boundary: MixtureBoundary,
    min_variance: f64,
}

impl MeanShift {
    /// New check.
    pub fn new(cfg: MeanShiftConfig) -> Self {
        let low = if cfg.margin < 1.0 {
            Some(-cfg.margin)
        } else {
            None
        };
        MeanShift {
            core: Core::new(
                CheckKind::MeanShift,
                Direction::ChangeIsWorse,
                Scale::Relative,
                cfg.alpha,
                Thresholds {
                    breach_below: low,
                    breach_above: Some(cfg.margin),
                    ni_lower: low,
                    ni_upper: Some(cfg.margin),
                },
                cfg.min_per_arm,
            ),
            boundary: MixtureBoundary::new(cfg.alpha, cfg.target_n),
            min_variance: cfg.min_variance,
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
    }

    /// Look at cumulative (n, sum, sum of squares) per arm.
    pub fn observe(&mut self, treatment: &MeanStats, control: &MeanStats) -> Outcome {
        let b = self.boundary;
        let (t, c) = floored(treatment, control, self.min_variance);
        mixture_observe(&mut self.core, &b, t.n, c.n, || {
            log_ratio_of_means(&t, &c, &b)
        })
    }
}

// -------------------------------------------------------- ProportionDecrease

/// Configuration of [`ProportionDecrease`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProportionDecreaseConfig {
    /// This check's α.
    pub alpha: f64,
    /// Relative margin m: breach when p_T/p_C < 1−m surely, non-inferior
    /// when p_T/p_C ≥ 1−m surely.
    pub margin: f64,
    /// Reports per arm before judging.
    pub min_per_arm: u64,
    /// Total reports at which the boundary is tightest.
    pub target_n: f64,
}

impl Default for ProportionDecreaseConfig {
    fn default() -> Self {
        ProportionDecreaseConfig {
            alpha: default_alpha(),
            margin: 0.05,
            min_per_arm: 200,
            target_n: 2e3,
        }
    }
}

/// Completion-rate check: CS for p_T/p_C (log relative risk).
#[derive(Debug, Clone)]
pub struct ProportionDecrease {
    core: Core,
    boundary: MixtureBoundary,
}

impl ProportionDecrease {
    /// New check.
    pub fn new(cfg: ProportionDecreaseConfig) -> Self {
        ProportionDecrease {
            core: Core::new(
                CheckKind::ProportionDecrease,
                Direction::DecreaseIsWorse,
                Scale::Relative,
                cfg.alpha,
                Thresholds {
                    breach_below: Some(-cfg.margin),
                    breach_above: None,
                    ni_lower: Some(-cfg.margin),
                    ni_upper: None,
                },
                cfg.min_per_arm,
            ),
            boundary: MixtureBoundary::new(cfg.alpha, cfg.target_n),
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
    }

    /// Look at cumulative (reports, completions) per arm.
    pub fn observe(&mut self, treatment: &CountStats, control: &CountStats) -> Outcome {
        let b = self.boundary;
        mixture_observe(&mut self.core, &b, treatment.trials, control.trials, || {
            log_ratio_of_proportions(treatment, control, &b)
        })
    }
}

// -------------------------------------------------------------- MeanDecrease

/// Configuration of [`MeanDecrease`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanDecreaseConfig {
    /// This check's α.
    pub alpha: f64,
    /// Breach when the upper bound of μ_T − μ_C < −breach_margin.
    pub breach_margin: f64,
    /// Non-inferior when the lower bound of μ_T − μ_C ≥ −ni_margin.
    pub ni_margin: f64,
    /// Reports per arm before judging.
    pub min_per_arm: u64,
    /// Total reports at which the boundary is tightest.
    pub target_n: f64,
    /// Least per-observation variance an arm is read with; 1/12 for
    /// whole rating points.
    pub min_variance: f64,
}

impl Default for MeanDecreaseConfig {
    fn default() -> Self {
        MeanDecreaseConfig {
            alpha: default_alpha(),
            breach_margin: 0.0,
            ni_margin: 0.1,
            min_per_arm: 200,
            target_n: 2e3,
            min_variance: WHOLE_UNIT_VARIANCE,
        }
    }
}

/// Rating check: CS for μ_T − μ_C.
#[derive(Debug, Clone)]
pub struct MeanDecrease {
    core: Core,
    boundary: MixtureBoundary,
    min_variance: f64,
}

impl MeanDecrease {
    /// New check.
    pub fn new(cfg: MeanDecreaseConfig) -> Self {
        MeanDecrease {
            core: Core::new(
                CheckKind::MeanDecrease,
                Direction::DecreaseIsWorse,
                Scale::Difference,
                cfg.alpha,
                Thresholds {
                    breach_below: Some(-cfg.breach_margin),
                    breach_above: None,
                    ni_lower: Some(-cfg.ni_margin),
                    ni_upper: None,
                },
                cfg.min_per_arm,
            ),
            boundary: MixtureBoundary::new(cfg.alpha, cfg.target_n),
            min_variance: cfg.min_variance,
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
    }

    /// Look at cumulative (n, sum, sum of squares) per arm.
    pub fn observe(&mut self, treatment: &MeanStats, control: &MeanStats) -> Outcome {
        let b = self.boundary;
        let (t, c) = floored(treatment, control, self.min_variance);
        mixture_observe(&mut self.core, &b, t.n, c.n, || diff_of_means(&t, &c, &b))
    }
}

// --------------------------------------------------------------- SampleRatio

/// Configuration of [`SampleRatio`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleRatioConfig {
    /// This check's α (not part of the 6 quality checks by default; give
    /// it its own share if it should be).
    pub alpha: f64,
    /// Designed treatment share of users.
    pub treatment_share: f64,
    /// Users at which the prior is tuned.
    pub target_users: f64,
}

impl Default for SampleRatioConfig {
    fn default() -> Self {
        SampleRatioConfig {
            alpha: default_alpha(),
            treatment_share: 0.05,
            target_users: 1e4,
        }
    }
}

/// SRM check on cumulative distinct users per arm. Verdict is Breach
/// (mismatch shown) or Undecided; it never reports NonInferior, so a
/// promotion rule should use it as a veto only (see [`promotable`]).
/// Estimate: observed share / designed share − 1.
#[derive(Debug, Clone)]
pub struct SampleRatio {
    core: Core,
    test: SrmTest,
    share: f64,
}

impl SampleRatio {
    /// New check.
    pub fn new(cfg: SampleRatioConfig) -> Self {
        SampleRatio {
            core: Core::new(
                CheckKind::SampleRatio,
                Direction::ChangeIsWorse,
                Scale::Relative,
                cfg.alpha,
                Thresholds {
                    breach_below: None,
                    breach_above: None,
                    ni_lower: None,
                    ni_upper: None,
                },
                0,
            ),
            test: SrmTest::new(cfg.treatment_share, cfg.alpha, cfg.target_users),
            share: cfg.treatment_share,
        }
    }

    /// New stage.
    pub fn reset(&mut self) {
        self.core.reset();
        self.test.reset();
    }

    /// Look at cumulative distinct users per arm.
    pub fn observe(&mut self, users_treatment: u64, users_control: u64) -> Outcome {
        let r = self.test.observe(users_treatment, users_control);
        let mut o = self.core.base(users_treatment, users_control);
        o.estimate = r
            .observed_share
            .filter(|_| self.share > 0.0)
            .map(|s| s / self.share - 1.0);
        o.p_value = Some(r.p_value);
        if users_treatment.saturating_add(users_control) > 0 {
            o.verdict = Verdict::Undecided;
        }
        if r.reject || self.core.tripped {
            self.core.tripped = true;
            o.verdict = Verdict::Breach;
        }
        o
    }
}

/// Roll back if any check is in Breach.
pub fn should_roll_back(outcomes: &[Outcome]) -> bool {
    outcomes.iter().any(|o| o.verdict == Verdict::Breach)
}

/// Promote only if no check is in Breach and every quality check (all but
/// SRM) has shown non-inferiority. An empty list is not promotable.
pub fn promotable(outcomes: &[Outcome]) -> bool {
    let quality: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.check != CheckKind::SampleRatio)
        .collect();
    !quality.is_empty()
        && !should_roll_back(outcomes)
        && quality.iter().all(|o| o.verdict == Verdict::NonInferior)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_alpha_bonferroni() {
        assert!((split_alpha(0.001, 6) - 0.001 / 6.0).abs() < 1e-18);
        assert_eq!(split_alpha(0.05, 0), 0.05);
        assert_eq!(split_alpha(f64::NAN, 3), 0.0);
        assert_eq!(split_alpha(-1.0, 3), 0.0);
    }

    #[test]
    fn insufficient_and_nan_inputs_do_not_panic() {
        let mut e = ErrorRate::new(ErrorRateConfig::default());
        let o = e.observe(&CountStats::new(0, 0), &CountStats::new(0, 0));
        assert_eq!(o.verdict, Verdict::InsufficientData);
        let o = e.observe(&CountStats::new(1000, 5000), &CountStats::new(1000, 0));
        assert_ne!(o.verdict, Verdict::InsufficientData);
        let mut m = MeanShift::new(MeanShiftConfig::default());
        let nan = MeanStats::new(1000, f64::NAN, f64::NAN);
        assert_eq!(m.observe(&nan, &nan).verdict, Verdict::InsufficientData);
        let mut d = MeanDecrease::new(MeanDecreaseConfig {
            min_variance: 0.0,
            ..MeanDecreaseConfig::default()
        });
        let c = MeanStats::new(1000, 5000.0, 25000.0);
        assert_eq!(d.observe(&c, &c).verdict, Verdict::InsufficientData);
        // Read to their resolution, identical constant arms are an interval
        // around 0.
        let mut d = MeanDecrease::new(MeanDecreaseConfig::default());
        assert_eq!(d.observe(&c, &c).verdict, Verdict::NonInferior);
        let mut q = QuantileIncrease::new(QuantileIncreaseConfig::default());
        let s = Sketch::new();
        assert_eq!(q.observe(&s, &s).verdict, Verdict::InsufficientData);
        let mut z = Sketch::new();
        z.insert_n(0.0, 1000);
        let o = q.observe(&z, &z);
        assert!(o.verdict != Verdict::Breach);
        let mut p = ProportionDecrease::new(ProportionDecreaseConfig::default());
        let o = p.observe(&CountStats::new(500, 0), &CountStats::new(500, 0));
        assert!(o.verdict != Verdict::Breach);
        let mut srm = SampleRatio::new(SampleRatioConfig::default());
        assert_eq!(srm.observe(0, 0).verdict, Verdict::InsufficientData);
        assert!(!promotable(&[]));
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("\"proportion_decrease\""));
    }

    #[test]
    fn clear_regression_breaches_and_sticks() {
        let mut e = ErrorRate::new(ErrorRateConfig {
            alpha: 0.01,
            ..ErrorRateConfig::default()
        });
        let o = e.observe(&CountStats::new(20_000, 800), &CountStats::new(20_000, 200));
        assert_eq!(o.verdict, Verdict::Breach);
        assert!(should_roll_back(&[o]));
        // Even if later data look fine, the stage stays tripped.
        let o = e.observe(&CountStats::new(20_001, 800), &CountStats::new(20_001, 800));
        assert_eq!(o.verdict, Verdict::Breach);
        e.reset();
        let o = e.observe(&CountStats::new(20_000, 200), &CountStats::new(20_000, 200));
        assert_ne!(o.verdict, Verdict::Breach);
    }

    #[test]
    fn non_inferior_when_tight_and_more_needed_when_not() {
        let mut d = MeanDecrease::new(MeanDecreaseConfig {
            alpha: 0.05,
            ..MeanDecreaseConfig::default()
        });
        // 1e6 ratings each, same mean 4, sd 1.
        let s = MeanStats::new(1_000_000, 4e6, 1e6 * 17.0);
        let o = d.observe(&s, &s);
        assert_eq!(o.verdict, Verdict::NonInferior);
        let mut d2 = MeanDecrease::new(MeanDecreaseConfig {
            alpha: 0.05,
            ..MeanDecreaseConfig::default()
        });
        let s = MeanStats::new(300, 1200.0, 300.0 * 17.0);
        let o = d2.observe(&s, &s);
        assert_eq!(o.verdict, Verdict::Undecided);
        let more = o.more_needed.unwrap();
        assert!(
            more.treatment > 300 && more.treatment < 1_000_000,
            "{more:?}"
        );
    }
}
