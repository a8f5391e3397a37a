//! Seeded statistical tests: coverage of each CS over many looks, sketch
//! accuracy, SRM behaviour, a small A/A simulation of the decision layer,
//! a detected regression, and robustness to degenerate input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use abgate_sequential::decision::*;
use abgate_sequential::math::normal_quantile;
use abgate_sequential::mean::*;
use abgate_sequential::quantile::{QuantileBoundary, QuantileRatio};
use abgate_sequential::sim::Rng;
use abgate_sequential::sketch::Sketch;
use abgate_sequential::srm::SrmTest;

/// Upper end of a generous binomial acceptance region: mean + 3 sd + 2.
fn binomial_bound(n: usize, p: f64) -> usize {
    let m = n as f64 * p;
    (m + 3.0 * (m * (1.0 - p)).sqrt() + 2.0).floor() as usize
}

#[test]
fn diff_of_means_cs_covers_with_unequal_changing_arms() {
    let alpha = 0.1;
    let b = MixtureBoundary::new(alpha, 5_000.0);
    let runs = 200;
    let mut misses = 0;
    for run in 0..runs {
        let mut rng = Rng::new(1000 + run);
        let (mut t, mut c) = (MeanStats::default(), MeanStats::default());
        let mut seq = Sequence::new();
        let mut missed = false;
        for _ in 0..200 {
            // Changing, unequal arm sizes: treatment 1–10, control 5–40 per look.
            let nt = 1 + (rng.next_u64() % 10);
            let nc = 5 + (rng.next_u64() % 36);
            for _ in 0..nt {
                t.push(2.0 + 3.0 * rng.normal());
            }
            for _ in 0..nc {
                c.push(1.5 + 1.0 * rng.normal());
            }
            if t.n < 30 {
                continue;
            }
            if let Some(iv) = diff_of_means(&t, &c, &b) {
                let (lo, hi, _) = seq.update(iv.lower, iv.upper);
                if !(lo <= 0.5 && 0.5 <= hi) {
                    missed = true;
                }
            }
        }
        misses += missed as usize;
    }
    assert!(
        misses <= binomial_bound(runs as usize, alpha),
        "misses {misses}"
    );
}

#[test]
fn ratio_of_means_and_proportion_cs_cover() {
    let alpha = 0.1;
    let b = MixtureBoundary::new(alpha, 20_000.0);
    let runs = 200usize;
    let (mut miss_ratio, mut miss_pdiff, mut miss_pratio) = (0, 0, 0);
    // Lognormal tokens: means e^{mu + s²/2}; treatment 1.2× control.
    let (mu, s) = (5.5f64, 0.6f64);
    let truth_log_ratio = 1.2f64.ln();
    let (pt, pc) = (0.12, 0.10);
    for run in 0..runs {
        let mut rng = Rng::new(7_000 + run as u64);
        let (mut t, mut c) = (MeanStats::default(), MeanStats::default());
        let (mut et, mut ec) = (CountStats::default(), CountStats::default());
        let (mut s1, mut s2, mut s3) = (Sequence::new(), Sequence::new(), Sequence::new());
        let (mut m1, mut m2, mut m3) = (false, false, false);
        for _ in 0..150 {
            for _ in 0..5 {
                t.push(rng.lognormal(mu + 1.2f64.ln(), s));
                et.trials += 1;
                et.events += rng.bernoulli(pt) as u64;
            }
            for _ in 0..20 {
                c.push(rng.lognormal(mu, s));
                ec.trials += 1;
                ec.events += rng.bernoulli(pc) as u64;
            }
            if t.n < 100 {
                continue;
            }
            if let Some(iv) = log_ratio_of_means(&t, &c, &b) {
                let (lo, hi, _) = s1.update(iv.lower, iv.upper);
                m1 |= !(lo <= truth_log_ratio && truth_log_ratio <= hi);
            }
            if let Some(iv) = diff_of_proportions(&et, &ec, &b) {
                let (lo, hi, _) = s2.update(iv.lower, iv.upper);
                m2 |= !(lo <= pt - pc && pt - pc <= hi);
            }
            if let Some(iv) = log_ratio_of_proportions(&et, &ec, &b) {
                let (lo, hi, _) = s3.update(iv.lower, iv.upper);
                let r = (pt / pc).ln();
                m3 |= !(lo <= r && r <= hi);
            }
        }
        miss_ratio += m1 as usize;
        miss_pdiff += m2 as usize;
        miss_pratio += m3 as usize;
    }
    let bound = binomial_bound(runs, alpha);
    eprintln!(
        "misses: ratio {miss_ratio}, pdiff {miss_pdiff}, pratio {miss_pratio}, bound {bound}"
    );
    assert!(miss_ratio <= bound);
    assert!(miss_pdiff <= bound);
    assert!(miss_pratio <= bound);
}

#[test]
fn quantile_cs_covers_true_p95() {
    let alpha = 0.1;
    let (mu, sigma) = (0.0f64, 1.2f64);
    let q95 = (mu + sigma * normal_quantile(0.95)).exp();
    let runs = 200usize;
    let mut misses = 0;
    for run in 0..runs {
        let mut rng = Rng::new(31_000 + run as u64);
        let mut b = QuantileBoundary::new(0.95, alpha, 2_000.0);
        let mut s = Sketch::new();
        let mut seq = Sequence::new();
        let mut missed = false;
        for _ in 0..200 {
            for _ in 0..10 {
                s.insert(rng.lognormal(mu, sigma));
            }
            let iv = b.interval(&s);
            let lo = iv.lower.unwrap_or(0.0);
            let hi = iv.upper.unwrap_or(f64::INFINITY);
            let (lo, hi, _) = seq.update(lo, hi);
            missed |= !(lo <= q95 && q95 <= hi);
        }
        misses += missed as usize;
    }
    eprintln!("quantile misses {misses} of {runs}");
    // Exact method: misses ≤ α in expectation.
    assert!(misses <= binomial_bound(runs, alpha), "misses {misses}");
}

#[test]
fn quantile_ratio_covers() {
    let alpha = 0.1;
    let runs = 150usize;
    let mut misses = 0;
    for run in 0..runs {
        let mut rng = Rng::new(55_000 + run as u64);
        let mut r = QuantileRatio::new(0.95, alpha, 2_000.0, 8_000.0);
        let (mut t, mut c) = (Sketch::new(), Sketch::new());
        let mut seq = Sequence::new();
        let mut missed = false;
        for _ in 0..100 {
            for _ in 0..10 {
                t.insert(1.1 * rng.lognormal(0.0, 0.3));
            }
            for _ in 0..40 {
                c.insert(rng.lognormal(0.0, 0.3));
            }
            let iv = r.interval(&t, &c);
            let lo = iv.lower.unwrap_or(0.0);
            let hi = iv.upper.unwrap_or(f64::INFINITY);
            let (lo, hi, _) = seq.update(lo, hi);
            missed |= !(lo <= 1.1 && 1.1 <= hi);
        }
        misses += missed as usize;
    }
    assert!(misses <= binomial_bound(runs, alpha), "misses {misses}");
}

#[test]
fn sketch_relative_error_within_one_percent_on_lognormal() {
    let mut rng = Rng::new(42);
    let mut s = Sketch::new();
    let mut v: Vec<f64> = (0..100_000).map(|_| rng.lognormal(-0.5, 1.2)).collect();
    for x in &v {
        s.insert(*x);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut worst = 0.0f64;
    for r in (1..=v.len()).step_by(97).chain([v.len()]) {
        let truth = v[r - 1];
        let got = s.value_at_rank(r as u64).unwrap();
        worst = worst.max((got - truth).abs() / truth);
        let (lo, hi) = s.rank_bounds(r as u64).unwrap();
        assert!(lo <= truth && truth <= hi);
    }
    for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
        let rank = (q * (v.len() - 1) as f64).floor() as usize;
        let got = s.quantile(q).unwrap();
        worst = worst.max((got - v[rank]).abs() / v[rank]);
    }
    eprintln!(
        "sketch worst relative error {worst:.5}, memory {} bytes",
        s.memory_bytes()
    );
    assert!(worst <= 0.01);
    assert!(s.memory_bytes() <= 17_000);
}

#[test]
fn srm_accepts_aa_and_rejects_twenty_percent_loss() {
    let alpha = 0.01;
    let p = 0.05;
    let mut rng = Rng::new(9);
    let mut aa = SrmTest::new(p, alpha, 1e4);
    let mut lossy = SrmTest::new(p, alpha, 1e4);
    let (mut at, mut ac, mut lt, mut lc) = (0u64, 0u64, 0u64, 0u64);
    let mut aa_rejected = false;
    let mut loss_rejected_at = None;
    for look in 0..1000 {
        for _ in 0..100 {
            if rng.bernoulli(p) {
                at += 1;
            } else {
                ac += 1;
            }
            if rng.bernoulli(p) {
                if rng.bernoulli(0.8) {
                    lt += 1;
                }
            } else {
                lc += 1;
            }
        }
        aa_rejected |= aa.observe(at, ac).reject;
        let r = lossy.observe(lt, lc);
        if r.reject && loss_rejected_at.is_none() {
            loss_rejected_at = Some(look);
        }
    }
    assert!(!aa_rejected);
    let r = aa.observe(at, ac);
    assert!(r.p_value > alpha && r.p_value <= 1.0);
    eprintln!("SRM 20% loss rejected at look {loss_rejected_at:?} (100 users/look)");
    assert!(loss_rejected_at.is_some());
}

/// A compact A/A / regression stage runner over the decision layer.
struct Stage {
    err: ErrorRate,
    lat: QuantileIncrease,
    len: MeanShift,
    comp: ProportionDecrease,
    rating: MeanDecrease,
}

fn stage(alpha: f64) -> Stage {
    Stage {
        err: ErrorRate::new(ErrorRateConfig {
            alpha,
            min_per_arm: 100,
            target_n: 5_000.0,
            ..ErrorRateConfig::default()
        }),
        lat: QuantileIncrease::new(QuantileIncreaseConfig {
            alpha,
            min_per_arm: 100,
            target_n: 2_000.0,
            ..QuantileIncreaseConfig::default()
        }),
        len: MeanShift::new(MeanShiftConfig {
            alpha,
            min_per_arm: 100,
            target_n: 5_000.0,
            ..MeanShiftConfig::default()
        }),
        comp: ProportionDecrease::new(ProportionDecreaseConfig {
            alpha,
            min_per_arm: 100,
            target_n: 5_000.0,
            ..ProportionDecreaseConfig::default()
        }),
        rating: MeanDecrease::new(MeanDecreaseConfig {
            alpha,
            min_per_arm: 100,
            target_n: 5_000.0,
            ..MeanDecreaseConfig::default()
        }),
    }
}

/// Runs `looks` looks with 4 treatment / 6 control observations per look.
/// `eff`: (error rate T, latency factor T, length factor T, completion T,
/// rating shift T). Returns the first Breach look per check.
fn run(seed: u64, looks: usize, eff: (f64, f64, f64, f64, f64)) -> [Option<usize>; 5] {
    let mut rng = Rng::new(seed);
    let mut st = stage(0.05);
    let (mut et, mut ec) = (CountStats::default(), CountStats::default());
    let (mut lt, mut lc) = (Sketch::new(), Sketch::new());
    let (mut nt, mut nc) = (MeanStats::default(), MeanStats::default());
    let (mut ct, mut cc) = (CountStats::default(), CountStats::default());
    let (mut rt, mut rc) = (MeanStats::default(), MeanStats::default());
    let mut first = [None; 5];
    for look in 0..looks {
        for (treat, k) in [(true, 4), (false, 6)] {
            for _ in 0..k {
                let (e, l, n, c, r) = if treat {
                    eff
                } else {
                    (0.05, 1.0, 1.0, 0.8, 0.0)
                };
                let (es, ls, ns, cs, rs) = if treat {
                    (&mut et, &mut lt, &mut nt, &mut ct, &mut rt)
                } else {
                    (&mut ec, &mut lc, &mut nc, &mut cc, &mut rc)
                };
                es.trials += 1;
                es.events += rng.bernoulli(e) as u64;
                ls.insert(l * rng.lognormal(-1.0, 0.5));
                ns.push(n * rng.lognormal(5.0, 0.6));
                cs.trials += 1;
                cs.events += rng.bernoulli(c) as u64;
                // Rating 1..5 from a rounded, clamped normal.
                let x = (4.0 + r + rng.normal()).round().clamp(1.0, 5.0);
                rs.push(x);
            }
        }
        let outs = [
            st.err.observe(&et, &ec),
            st.lat.observe(&lt, &lc),
            st.len.observe(&nt, &nc),
            st.comp.observe(&ct, &cc),
            st.rating.observe(&rt, &rc),
        ];
        for (f, o) in first.iter_mut().zip(outs.iter()) {
            if o.verdict == Verdict::Breach && f.is_none() {
                *f = Some(look);
            }
        }
    }
    first
}

#[test]
fn small_aa_simulation_false_trips_within_alpha() {
    let stages = 200usize;
    let mut trips = [0usize; 5];
    for s in 0..stages {
        let f = run(100_000 + s as u64, 500, (0.05, 1.0, 1.0, 0.8, 0.0));
        for (t, x) in trips.iter_mut().zip(f.iter()) {
            *t += x.is_some() as usize;
        }
    }
    let bound = binomial_bound(stages, 0.05);
    eprintln!("A/A false trips per check (of {stages}): {trips:?}, bound {bound}");
    for t in trips {
        assert!(t <= bound, "{trips:?}");
    }
}

#[test]
fn seeded_regression_is_detected() {
    let f = run(77, 500, (0.15, 1.6, 1.6, 0.6, -0.5));
    eprintln!("regression first-trip looks: {f:?}");
    assert!(f.iter().all(|x| x.is_some()), "{f:?}");
}

#[test]
fn no_panics_on_degenerate_input() {
    let mut st = stage(0.05);
    let weird_means = [
        MeanStats::default(),
        MeanStats::new(1, 1.0, 1.0),
        MeanStats::new(500, f64::NAN, 1.0),
        MeanStats::new(500, f64::INFINITY, f64::INFINITY),
        MeanStats::new(500, -5.0, -1.0),
        MeanStats::new(u64::MAX, 1e308, 1e308),
    ];
    for a in &weird_means {
        for b in &weird_means {
            let _ = st.len.observe(a, b);
            let _ = st.rating.observe(a, b);
        }
    }
    let counts = [
        CountStats::new(0, 0),
        CountStats::new(500, 0),
        CountStats::new(500, 500),
        CountStats::new(500, 9_999),
        CountStats::new(u64::MAX, u64::MAX),
    ];
    for a in &counts {
        for b in &counts {
            let _ = st.err.observe(a, b);
            let _ = st.comp.observe(a, b);
        }
    }
    let empty = Sketch::new();
    let mut zeros = Sketch::new();
    zeros.insert_n(0.0, 1000);
    let mut nan = Sketch::new();
    nan.insert_n(f64::NAN, 1000);
    let mut one = Sketch::new();
    one.insert_n(1.0, 1000);
    for a in [&empty, &zeros, &nan, &one] {
        for b in [&empty, &zeros, &nan, &one] {
            let _ = st.lat.observe(a, b);
        }
    }
    let mut srm = SampleRatio::new(SampleRatioConfig::default());
    let _ = srm.observe(u64::MAX, u64::MAX);
    let mut bad = QuantileIncrease::new(QuantileIncreaseConfig {
        alpha: f64::NAN,
        p: 2.0,
        ..QuantileIncreaseConfig::default()
    });
    let _ = bad.observe(&one, &one);
    let mut bad = ErrorRate::new(ErrorRateConfig {
        alpha: 0.0,
        target_n: f64::NAN,
        ..ErrorRateConfig::default()
    });
    let o = bad.observe(&CountStats::new(1000, 10), &CountStats::new(1000, 900));
    assert_ne!(o.verdict, Verdict::Breach);
    let mut s = Sketch::new();
    s.insert(f64::MAX);
    s.insert(f64::MIN_POSITIVE);
    s.insert(1e-300);
    assert_eq!(s.count(), 3);
    let _ = s.quantile(0.5);
}
