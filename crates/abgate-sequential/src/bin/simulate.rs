//! Stage simulator for abgate's guard: runs the real decision layer
//! (`abgate_sequential::decision`) over many simulated stages with a look
//! every 30 simulated seconds, and prints a markdown table.
//!
//! Usage: `simulate [--stages N] [--seed S] [--alpha A] [--days D]
//!         [--only SUBSTRING]`
//!
//! Per-interval simulation (per-request simulation of 7 days × 50 req/s ×
//! thousands of stages is too slow):
//! * requests per interval = rate × 30; the treatment count is
//!   Binomial(total, split); errors, feedback reports, completions and
//!   rating categories are binomial draws;
//! * response length (lognormal tokens): exact per-request draws when an
//!   interval has ≤ 48 of them, else (sum, sum of squares) drawn from their
//!   exact bivariate-normal CLT approximation;
//! * latency / TTFT (lognormal): exact per-request draws while an arm has
//!   < 5000 observations or the interval has ≤ 8; afterwards the
//!   interval's values are drawn *per sketch bucket*: the tail above the
//!   window (top 0.05%) is drawn exactly, the window [q0.80, q0.9995] by
//!   an alias table over the distribution's bucket probabilities, and
//!   the mass below q0.80 is counted in one bucket below the window (the
//!   p95 CS ranks never go there once t ≥ 5000; checked at start-up and
//!   reported);
//! * distinct users: rate × 30 / 10 new users per interval (10 requests
//!   per user), treatment ~ Binomial(new, split), optional treatment loss.

use abgate_sequential::decision::{
    CheckKind, ErrorRate, ErrorRateConfig, MeanDecrease, MeanDecreaseConfig, MeanShift,
    MeanShiftConfig, Outcome, ProportionDecrease, ProportionDecreaseConfig, QuantileIncrease,
    QuantileIncreaseConfig, SampleRatio, SampleRatioConfig, Verdict,
};
use abgate_sequential::math::{normal_cdf, normal_quantile};
use abgate_sequential::mean::{CountStats, MeanStats};
use abgate_sequential::quantile::QuantileBoundary;
use abgate_sequential::sim::{AliasTable, Rng};
use abgate_sequential::sketch::Sketch;
use std::io::Write;
use std::time::Instant;

const INTERVAL: u64 = 30;
const EXACT_BELOW: u64 = 5000;
const WINDOW_LO: f64 = 0.80;
const WINDOW_HI: f64 = 0.9995;

/// Lognormal with log-mean `mu`, log-sd `sigma`.
#[derive(Clone, Copy, Debug)]
struct LogNormal {
    mu: f64,
    sigma: f64,
}

impl LogNormal {
    fn with_median(median: f64, sigma: f64) -> Self {
        LogNormal {
            mu: median.ln(),
            sigma,
        }
    }
    fn scaled(self, k: f64) -> Self {
        LogNormal {
            mu: self.mu + k.ln(),
            sigma: self.sigma,
        }
    }
    fn cdf(&self, x: f64) -> f64 {
        if x <= 0.0 {
            0.0
        } else {
            normal_cdf((x.ln() - self.mu) / self.sigma)
        }
    }
    fn quantile(&self, p: f64) -> f64 {
        (self.mu + self.sigma * normal_quantile(p)).exp()
    }
    fn moment(&self, k: f64) -> f64 {
        (k * self.mu + 0.5 * k * k * self.sigma * self.sigma).exp()
    }
}

/// Samples latencies into a sketch (see module docs).
struct BucketSampler {
    dist: LogNormal,
    keys: Vec<i32>,
    alias: AliasTable,
    p_below: f64,
    p_above: f64,
    f_top: f64,
    lump_key: i32,
}

impl BucketSampler {
    fn new(dist: LogNormal) -> Option<Self> {
        let s = Sketch::new();
        let k_lo = s.key_for(dist.quantile(WINDOW_LO))?;
        let k_hi = s.key_for(dist.quantile(WINDOW_HI))?;
        let mut keys = Vec::new();
        let mut w = Vec::new();
        for k in k_lo..=k_hi {
            let (lo, hi) = s.bucket_bounds(k);
            keys.push(k);
            w.push(dist.cdf(hi) - dist.cdf(lo));
        }
        let f_bottom = dist.cdf(s.bucket_bounds(k_lo).0);
        let f_top = dist.cdf(s.bucket_bounds(k_hi).1);
        Some(BucketSampler {
            dist,
            keys,
            alias: AliasTable::new(&w)?,
            p_below: f_bottom,
            p_above: 1.0 - f_top,
            f_top,
            lump_key: s.key_for(dist.quantile(0.4))?,
        })
    }

    fn sample_into(&self, rng: &mut Rng, sketch: &mut Sketch, n: u64) {
        if sketch.count() < EXACT_BELOW || n <= 8 {
            for _ in 0..n {
                sketch.insert(rng.lognormal(self.dist.mu, self.dist.sigma));
            }
            return;
        }
        let n_above = rng.binomial(n, self.p_above);
        for _ in 0..n_above {
            let u = self.f_top + (1.0 - self.f_top) * rng.uniform_open();
            sketch.insert(self.dist.quantile(u.min(1.0 - 1e-16)));
        }
        let rest = n - n_above;
        let n_below = rng.binomial(rest, self.p_below / (1.0 - self.p_above));
        sketch.insert_bucket(self.lump_key, n_below);
        for _ in 0..(rest - n_below) {
            if let Some(k) = self.keys.get(self.alias.sample(rng)) {
                sketch.insert_bucket(*k, 1);
            }
        }
    }
}

#[derive(Clone)]
struct Scenario {
    name: String,
    aa: bool,
    split: f64,
    rate: f64,
    latency: (LogNormal, f64),
    ttft: (LogNormal, f64),
    err: (f64, f64),
    tokens: (LogNormal, f64),
    feedback: f64,
    completion: (f64, f64),
    rating: ([f64; 5], [f64; 5]),
    srm_loss: f64,
}

const RATING_C: [f64; 5] = [0.05, 0.05, 0.10, 0.35, 0.45]; // mean 4.10
const RATING_T: [f64; 5] = [0.07, 0.07, 0.13, 0.35, 0.38]; // mean 3.90

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    for (tail, sigma) in [("light σ=0.3", 0.3), ("heavy σ=1.2", 1.2)] {
        for split in [0.05, 0.5] {
            for rate in [20.0, 50.0] {
                v.push(Scenario {
                    name: format!("A/A {tail}, {}% split, {rate} req/s", split * 100.0),
                    aa: true,
                    split,
                    rate,
                    latency: (LogNormal::with_median(0.8, sigma), 1.0),
                    ttft: (LogNormal::with_median(0.25, sigma), 1.0),
                    err: (0.01, 0.01),
                    tokens: (LogNormal::with_median(250.0, 0.6), 1.0),
                    feedback: 0.05,
                    completion: (0.86, 0.86),
                    rating: (RATING_C, RATING_C),
                    srm_loss: 0.0,
                });
            }
        }
    }
    for split in [0.05, 0.5] {
        v.push(Scenario {
            name: format!("regressions, {}% split, 20 req/s", split * 100.0),
            aa: false,
            split,
            rate: 20.0,
            latency: (LogNormal::with_median(0.8, 0.3), 1.25),
            ttft: (LogNormal::with_median(0.25, 0.3), 1.15),
            err: (0.01, 0.02),
            tokens: (LogNormal::with_median(250.0, 0.6), 1.35),
            feedback: 0.05,
            completion: (0.86, 0.80),
            rating: (RATING_C, RATING_T),
            srm_loss: 0.2,
        });
    }
    v
}

/// Names of the 7 checks, in the order they are evaluated.
const CHECKS: [&str; 7] = [
    "error rate",
    "p95 latency",
    "p95 TTFT",
    "response length",
    "completion rate",
    "rating",
    "SRM (users)",
];

fn effect_label(sc: &Scenario, i: usize) -> String {
    if sc.aa {
        return "A/A".into();
    }
    match i {
        0 => format!(
            "{:.0}% vs {:.0}% (breach > 0)",
            sc.err.1 * 100.0,
            sc.err.0 * 100.0
        ),
        1 => format!("×{:.2} (m = 0.2)", sc.latency.1),
        2 => format!("×{:.2} (m = 0.2)", sc.ttft.1),
        3 => format!("×{:.2} (m = 0.3)", sc.tokens.1),
        4 => format!(
            "{:.2} vs {:.2} (m = 0.05)",
            sc.completion.1, sc.completion.0
        ),
        5 => "3.90 vs 4.10 (breach < 0)".into(),
        _ => format!("{:.0}% treatment users lost", sc.srm_loss * 100.0),
    }
}

#[derive(Default, Clone, Copy)]
struct CheckRecord {
    trip_at: Option<u64>,
    ni_day: bool,
    ni_end: bool,
    empty: bool,
}

struct Arm {
    requests: u64,
    errors: CountStats,
    latency: Sketch,
    ttft: Sketch,
    tokens: MeanStats,
    completion: CountStats,
    rating: MeanStats,
    users: u64,
}

impl Arm {
    fn new() -> Self {
        Arm {
            requests: 0,
            errors: CountStats::default(),
            latency: Sketch::new(),
            ttft: Sketch::new(),
            tokens: MeanStats::default(),
            completion: CountStats::default(),
            rating: MeanStats::default(),
            users: 0,
        }
    }
}

struct Samplers {
    latency: [BucketSampler; 2],
    ttft: [BucketSampler; 2],
}

fn add_tokens(rng: &mut Rng, st: &mut MeanStats, d: LogNormal, n: u64) {
    if n <= 48 {
        for _ in 0..n {
            st.push(rng.lognormal(d.mu, d.sigma));
        }
        return;
    }
    let (m1, m2, m3, m4) = (d.moment(1.0), d.moment(2.0), d.moment(3.0), d.moment(4.0));
    let (v11, v12, v22) = (m2 - m1 * m1, m3 - m1 * m2, m4 - m2 * m2);
    let l11 = v11.sqrt();
    let l21 = v12 / l11;
    let l22 = (v22 - l21 * l21).max(0.0).sqrt();
    let nf = n as f64;
    let (z1, z2) = (rng.normal(), rng.normal());
    st.n += n;
    st.sum += nf * m1 + nf.sqrt() * l11 * z1;
    st.sum_sq += nf * m2 + nf.sqrt() * (l21 * z1 + l22 * z2);
}

fn add_ratings(rng: &mut Rng, st: &mut MeanStats, probs: &[f64; 5], n: u64) {
    let mut left = n;
    let mut mass = 1.0;
    for (i, p) in probs.iter().enumerate() {
        if left == 0 {
            break;
        }
        let c = if i == 4 {
            left
        } else {
            rng.binomial(left, (p / mass).min(1.0))
        };
        left -= c;
        mass -= p;
        let v = (i + 1) as f64;
        st.n += c;
        st.sum += c as f64 * v;
        st.sum_sq += c as f64 * v * v;
    }
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    sc: &Scenario,
    smp: &Samplers,
    rng: &mut Rng,
    alpha: f64,
    looks: u64,
    day_look: u64,
) -> [CheckRecord; 7] {
    let day_n = sc.rate * 86_400.0;
    let mut checks_err = ErrorRate::new(ErrorRateConfig {
        alpha,
        breach_threshold: 0.0,
        ni_margin: 0.01,
        min_per_arm: 500,
        target_n: ErrorRateConfig::default().target_n,
    });
    let qcfg = QuantileIncreaseConfig {
        alpha,
        p: 0.95,
        margin: 0.2,
        min_per_arm: 500,
        target_n: QuantileIncreaseConfig::default().target_n,
    };
    let mut chk_lat = QuantileIncrease::new(qcfg);
    let mut chk_ttft = QuantileIncrease::new(qcfg);
    let mut chk_tok = MeanShift::new(MeanShiftConfig {
        alpha,
        margin: 0.3,
        min_per_arm: 500,
        ..MeanShiftConfig::default()
    });
    let mut chk_comp = ProportionDecrease::new(ProportionDecreaseConfig {
        alpha,
        margin: 0.05,
        min_per_arm: 100,
        target_n: ProportionDecreaseConfig::default().target_n,
    });
    let mut chk_rate = MeanDecrease::new(MeanDecreaseConfig {
        alpha,
        breach_margin: 0.0,
        ni_margin: 0.1,
        min_per_arm: 100,
        ..MeanDecreaseConfig::default()
    });
    let mut chk_srm = SampleRatio::new(SampleRatioConfig {
        alpha,
        treatment_share: sc.split,
        target_users: day_n / 10.0,
    });
    let mut arms = [Arm::new(), Arm::new()]; // [control, treatment]
    let mut rec = [CheckRecord::default(); 7];
    let per_interval = (sc.rate * INTERVAL as f64).round() as u64;
    let users_per_interval = (sc.rate * INTERVAL as f64 / 10.0).round() as u64;
    for look in 1..=looks {
        let n_t = rng.binomial(per_interval, sc.split);
        let ns = [per_interval - n_t, n_t];
        for (a, arm) in arms.iter_mut().enumerate() {
            let n = ns[a];
            let treat = a == 1;
            let pick = |x: (f64, f64)| if treat { x.1 } else { x.0 };
            arm.requests += n;
            arm.errors.trials += n;
            arm.errors.events += rng.binomial(n, pick(sc.err));
            smp.latency[a].sample_into(rng, &mut arm.latency, n);
            smp.ttft[a].sample_into(rng, &mut arm.ttft, n);
            let tok = if treat {
                sc.tokens.0.scaled(sc.tokens.1)
            } else {
                sc.tokens.0
            };
            add_tokens(rng, &mut arm.tokens, tok, n);
            let fb = rng.binomial(n, sc.feedback);
            arm.completion.trials += fb;
            arm.completion.events += rng.binomial(fb, pick(sc.completion));
            let probs = if treat { &sc.rating.1 } else { &sc.rating.0 };
            add_ratings(rng, &mut arm.rating, probs, fb);
        }
        let new_users = users_per_interval;
        let u_t = rng.binomial(new_users, sc.split);
        arms[0].users += new_users - u_t;
        arms[1].users += rng.binomial(u_t, 1.0 - sc.srm_loss);

        let [c, t] = &arms;
        let outs: [Outcome; 7] = [
            checks_err.observe(&t.errors, &c.errors),
            chk_lat.observe(&t.latency, &c.latency),
            chk_ttft.observe(&t.ttft, &c.ttft),
            chk_tok.observe(&t.tokens, &c.tokens),
            chk_comp.observe(&t.completion, &c.completion),
            chk_rate.observe(&t.rating, &c.rating),
            chk_srm.observe(t.users, c.users),
        ];
        for (r, o) in rec.iter_mut().zip(outs.iter()) {
            if o.verdict == Verdict::Breach && r.trip_at.is_none() {
                r.trip_at = Some(look * INTERVAL);
            }
            if o.empty_intersection {
                r.empty = true;
            }
            let ni = o.verdict == Verdict::NonInferior;
            if look == day_look {
                r.ni_day = ni;
            }
            if look == looks {
                r.ni_end = ni;
            }
            debug_assert!(o.check != CheckKind::SampleRatio || o.p_value.is_some());
        }
    }
    rec
}

/// Wilson score 95% interval for k successes in n.
fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let z = 1.959_964;
    let p = k / n;
    let den = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / den;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / den;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

fn fmt_hours(s: u64) -> String {
    let h = s as f64 / 3600.0;
    if h < 1.0 {
        format!("{:.0} min", h * 60.0)
    } else {
        format!("{h:.1} h")
    }
}

fn main() {
    let mut stages = 200usize;
    let mut seed = 1u64;
    let mut alpha = 0.05;
    let mut days = 7.0f64;
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args.get(i).map(String::as_str) {
            Some("--stages") => stages = val.parse().unwrap_or(stages),
            Some("--seed") => seed = val.parse().unwrap_or(seed),
            Some("--alpha") => alpha = val.parse().unwrap_or(alpha),
            Some("--days") => days = val.parse().unwrap_or(days),
            Some("--only") => only = Some(val),
            _ => {}
        }
        i += 2;
    }
    let looks = (days * 86_400.0 / INTERVAL as f64).round() as u64;
    let day_look = (86_400 / INTERVAL).min(looks);
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut err = std::io::stderr();

    // Sanity check for the bucket-window shortcut.
    let mut qb = QuantileBoundary::new(0.95, alpha / 2.0, 20.0 * 86_400.0 * 0.05);
    let cb = qb.count_bounds(EXACT_BELOW);
    let _ = writeln!(
        out,
        "<!-- window check: at t = {EXACT_BELOW} the p95 CS lower rank is {:.3}·t (window starts at {WINDOW_LO}·t) -->",
        cb.k_lo as f64 / EXACT_BELOW as f64
    );
    let _ = writeln!(
        out,
        "\nper-check alpha = {alpha}, {stages} stages per scenario, seed {seed}, look every {INTERVAL} s for {days} days ({looks} looks)\n"
    );
    let _ = writeln!(
        out,
        "| scenario | check | effect | stages | trips by 24 h [95% CI] | trips by end [95% CI] | median time to trip | non-inferior at 24 h | non-inferior at end | empty intersections |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    for (si, sc) in scenarios().into_iter().enumerate() {
        if let Some(o) = &only {
            if !sc.name.contains(o.as_str()) {
                continue;
            }
        }
        let mk = |d: LogNormal, k: f64| BucketSampler::new(d.scaled(k));
        let smp = match (
            mk(sc.latency.0, 1.0),
            mk(sc.latency.0, sc.latency.1),
            mk(sc.ttft.0, 1.0),
            mk(sc.ttft.0, sc.ttft.1),
        ) {
            (Some(a), Some(b), Some(c), Some(d)) => Samplers {
                latency: [a, b],
                ttft: [c, d],
            },
            _ => {
                let _ = writeln!(err, "bad sampler for {}", sc.name);
                continue;
            }
        };
        let t0 = Instant::now();
        let mut recs: Vec<[CheckRecord; 7]> = Vec::with_capacity(stages);
        for st in 0..stages {
            let mut rng =
                Rng::new(seed ^ ((si as u64) << 32) ^ (st as u64).wrapping_mul(0x9E37_79B9));
            recs.push(run_stage(&sc, &smp, &mut rng, alpha, looks, day_look));
        }
        let _ = writeln!(
            err,
            "{}: {} stages in {:.1} s",
            sc.name,
            stages,
            t0.elapsed().as_secs_f64()
        );
        for (ci, cname) in CHECKS.iter().enumerate() {
            let n = recs.len();
            let by_day = recs
                .iter()
                .filter(|r| r[ci].trip_at.is_some_and(|t| t <= 86_400))
                .count();
            let mut times: Vec<u64> = recs.iter().filter_map(|r| r[ci].trip_at).collect();
            times.sort_unstable();
            let by_end = times.len();
            let med = if times.is_empty() {
                "–".to_string()
            } else {
                fmt_hours(times[(times.len() - 1) / 2])
            };
            let ni_day = recs.iter().filter(|r| r[ci].ni_day).count();
            let ni_end = recs.iter().filter(|r| r[ci].ni_end).count();
            let empty = recs.iter().filter(|r| r[ci].empty).count();
            let (a, b) = wilson(by_day, n);
            let (c, d) = wilson(by_end, n);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.3} [{:.3}, {:.3}] | {:.3} [{:.3}, {:.3}] | {} | {:.2} | {:.2} | {} |",
                sc.name,
                cname,
                effect_label(&sc, ci),
                n,
                by_day as f64 / n as f64,
                a,
                b,
                by_end as f64 / n as f64,
                c,
                d,
                med,
                ni_day as f64 / n as f64,
                ni_end as f64 / n as f64,
                empty
            );
        }
        // Family-wise: any of the 7 checks.
        if sc.aa {
            let n = recs.len();
            let any_day = recs
                .iter()
                .filter(|r| r.iter().any(|c| c.trip_at.is_some_and(|t| t <= 86_400)))
                .count();
            let any_end = recs
                .iter()
                .filter(|r| r.iter().any(|c| c.trip_at.is_some()))
                .count();
            let (a, b) = wilson(any_day, n);
            let (c, d) = wilson(any_end, n);
            let _ = writeln!(
                out,
                "| {} | any of 7 (bound 7α = {:.2}) | A/A | {} | {:.3} [{:.3}, {:.3}] | {:.3} [{:.3}, {:.3}] | | | | |",
                sc.name,
                7.0 * alpha,
                n,
                any_day as f64 / n as f64,
                a,
                b,
                any_end as f64 / n as f64,
                c,
                d
            );
        }
        let _ = out.flush();
    }
    let _ = writeln!(err, "total {:.1} s", started.elapsed().as_secs_f64());
}
