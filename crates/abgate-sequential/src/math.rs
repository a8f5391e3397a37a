//! Numerical helpers shared by the tests: `ln_gamma`, `ln_beta`, the
//! normal-mixture boundary and its tuning, and the beta-mixture tuning.
//!
//! Everything here is total: invalid input gives NaN or infinity, never a panic.

/// Lanczos coefficients for g = 7, n = 9 (the widely used set from
/// Numerical Recipes 3rd ed. §6.1 / Godfrey's table). Relative error of
/// Γ(x) is about 1e-15 for x > 0.5.
const LANCZOS_G: f64 = 7.0;
const LANCZOS_COEF: [f64; 9] = [
    0.999_999_999_999_809_9,
    676.520_368_121_885_1,
    -1_259.139_216_722_402_8,
    771.323_428_777_653_1,
    -176.615_029_162_140_6,
    12.507_343_278_686_905,
    -0.138_571_095_265_720_12,
    9.984_369_578_019_572e-6,
    1.505_632_735_149_311_6e-7,
];

/// ln Γ(x) for x > 0 (Lanczos approximation, computed in log form so it
/// never overflows; reflection formula for 0 < x < 0.5).
///
/// Accuracy (checked in the tests against exact factorials, Γ(1/2) = √π
/// and a Stirling series): absolute error below 1e-13 for x ≤ 10, relative
/// error below 1e-14 for larger x. Near the roots x = 1 and x = 2 the
/// absolute error is ~1e-15. For x ≤ 0 or NaN returns NaN (the callers only
/// need positive arguments); for x = +∞ returns +∞.
///
/// std has no stable `lgamma`, hence this function.
pub fn ln_gamma(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return f64::NAN;
    }
    if x.is_infinite() {
        return f64::INFINITY;
    }
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx); sin(πx) > 0 on (0, 0.5).
        let s = (std::f64::consts::PI * x).sin();
        return std::f64::consts::PI.ln() - s.ln() - ln_gamma(1.0 - x);
    }
    let z = x - 1.0;
    let mut series = LANCZOS_COEF[0];
    for (i, c) in LANCZOS_COEF.iter().enumerate().skip(1) {
        series += c / (z + i as f64);
    }
    let t = z + LANCZOS_G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + series.ln()
}

/// ln B(a, b) = ln Γ(a) + ln Γ(b) − ln Γ(a + b); NaN unless a, b > 0.
pub fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// The "crossing level" term of Howard et al. (2021, Ann. Stat., §3.5,
/// eq. for the normal mixture's optimal ρ): −2 ln α + ln(1 − 2 ln α).
/// Dividing it by a target intrinsic time gives the ρ² that makes the
/// normal-mixture boundary tightest there.
pub fn mixture_tuning_level(alpha: f64) -> f64 {
    let l = -2.0 * alpha.ln();
    l + (1.0 + l).ln()
}

/// Radius of the two-sided normal-mixture confidence sequence.
///
/// Robbins' normal mixture (Robbins 1970; Howard et al. 2021 Prop. 4
/// two-sided; Johari et al. KDD 2017 mSPRT; Waudby-Smith et al. 2021
/// Gaussian-mixture asymptotic CS). For an estimate with variance `s2` and mixing
/// variance τ² = `r`·`s2` the mSPRT statistic for θ₀ is
/// Λ = sqrt(s2/(s2+τ²)) · exp(τ²(d−θ₀)² / (2 s2 (s2+τ²))),
/// and {θ₀ : Λ < 1/α} = d ± sqrt(2 s2 (1+r)/r · ln(sqrt(1+r)/α)).
///
/// Returns +∞ for non-finite or non-positive `r`, NaN `s2`, or α ∉ (0,1).
pub fn normal_mixture_radius(s2: f64, r: f64, alpha: f64) -> f64 {
    if !(s2.is_finite() && s2 >= 0.0 && r.is_finite() && r > 0.0 && alpha > 0.0 && alpha < 1.0) {
        return f64::INFINITY;
    }
    let log_term = 0.5 * (1.0 + r).ln() - alpha.ln();
    (2.0 * s2 * (1.0 + r) / r * log_term).sqrt()
}

/// mSPRT statistic Λ (Johari et al. 2017, eq. for the normal mixture) for
/// the null θ₀, estimate `d`, estimator variance `s2` and mixing variance
/// `tau2`. Returns NaN on invalid input. Exposed for always-valid p-values
/// (p = min over looks of 1/Λ).
pub fn msprt_lambda(d: f64, theta0: f64, s2: f64, tau2: f64) -> f64 {
    if !(s2 > 0.0 && tau2 > 0.0) {
        return f64::NAN;
    }
    let diff = d - theta0;
    (s2 / (s2 + tau2)).sqrt() * (tau2 * diff * diff / (2.0 * s2 * (s2 + tau2))).exp()
}

/// Concentration c = a + b of a Beta(p·c, (1−p)·c) mixing prior on a
/// Bernoulli rate, chosen so that its variance matches the normal mixture
/// tuned for `target_n` observations: prior variance p(1−p)/(c+1) equals
/// ρ²·p(1−p) with ρ² = level/target_n, i.e. c + 1 = target_n / level
/// (Howard et al. 2021 §3.5 tune the beta-binomial mixture the same way).
/// Never below 1.
pub fn beta_concentration(alpha: f64, target_n: f64) -> f64 {
    let level = mixture_tuning_level(alpha);
    let c = target_n / level - 1.0;
    if c.is_finite() && c > 1.0 {
        c
    } else {
        1.0
    }
}

/// Standard normal CDF Φ(x) via `erfc` (used by the simulator and tests).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Complementary error function, Chebyshev fit from Numerical Recipes
/// (`erfcc`), fractional error < 1.2e-7 everywhere: the simulator's
/// bucket probabilities, and the gateway's fixed-sample sample-ratio and
/// guardrail p-values (`abgate::experiment::stats`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let ans = t * poly.exp();
    if x >= 0.0 {
        ans
    } else {
        2.0 - ans
    }
}

/// Inverse standard normal CDF (Acklam's rational approximation, relative
/// error < 1.2e-9). Returns ±∞ at 0 and 1 and NaN outside [0, 1].
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let plow = 0.024_25;
    if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        // scipy.special.erfc
        for (x, expected) in [
            (0.0, 1.0),
            (0.5, 0.479_500_122),
            (1.0, 0.157_299_207),
            (2.0, 0.004_677_735),
            (3.0, 2.209_049_7e-5),
        ] {
            let tolerance = 1e-7 * f64::max(expected, 1e-3);
            assert!((erfc(x) - expected).abs() <= tolerance, "erfc({x})");
        }
    }

    #[test]
    fn ln_gamma_exact_values() {
        // ln((n-1)!) for integers.
        let mut fact = 1.0f64;
        for n in 1..=30u32 {
            if n > 1 {
                fact *= (n - 1) as f64;
            }
            let got = ln_gamma(n as f64);
            if n % 10 == 0 {
                eprintln!("ln_gamma({n}) abs error: {:.2e}", (got - fact.ln()).abs());
            }
            assert!(
                (got - fact.ln()).abs() < 1e-12 * fact.ln().abs().max(1.0),
                "n={n}"
            );
        }
        let half = ln_gamma(0.5);
        assert!((half - 0.5 * std::f64::consts::PI.ln()).abs() < 1e-14);
        assert!(ln_gamma(0.0).is_nan());
        assert!(ln_gamma(-1.0).is_nan());
        assert!(ln_gamma(f64::NAN).is_nan());
    }

    #[test]
    fn ln_gamma_large_matches_stirling() {
        for &x in &[50.0, 1e3, 1e5, 3e7, 1e10] {
            let stirling = (x - 0.5) * f64::ln(x) - x
                + 0.5 * (2.0 * std::f64::consts::PI).ln()
                + 1.0 / (12.0 * x)
                - 1.0 / (360.0 * x * x * x)
                + 1.0 / (1260.0 * x.powi(5));
            let got = ln_gamma(x);
            let err = (got - stirling).abs() / stirling.abs();
            eprintln!("ln_gamma({x:e}) relative error vs Stirling: {err:.2e}");
            assert!(err <= 1e-14, "x={x}");
        }
    }

    #[test]
    fn normal_quantile_inverts_cdf() {
        for &p in &[1e-6, 0.01, 0.3, 0.5, 0.9, 0.95, 0.999] {
            let z = normal_quantile(p);
            assert!((normal_cdf(z) - p).abs() < 1e-6 * p.max(1e-3));
        }
    }

    #[test]
    fn mixture_radius_matches_lambda() {
        let (s2, tau2, alpha) = (0.04, 0.01, 0.05);
        let r = normal_mixture_radius(s2, tau2 / s2, alpha);
        let lam = msprt_lambda(1.0 + r, 1.0, s2, tau2);
        assert!((lam - 1.0 / alpha).abs() < 1e-9 / alpha);
    }
}
