//! The few statistical tests the gateway makes on its own: the sample
//! ratio check and the guardrails. Normal approximations throughout, which
//! the minimum samples the guardrails demand make sound.

/// Complementary error function: the one the guard's sequential tests
/// use (Numerical Recipes' Chebyshev fit, relative error below 1.2e-7),
/// ample for thresholds like 0.001.
pub(crate) use abgate_sequential::math::erfc;

/// P(Z > z) for a standard normal Z.
pub(crate) fn normal_upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// One-sided two-proportion z-test: the p-value of "the second rate is
/// higher than the first" (`successes_b / n_b` against `successes_a / n_a`),
/// with the pooled standard error. `None` when either sample is empty or
/// the pooled rate is 0 or 1 (no variation to test against).
pub(crate) fn two_proportion_greater(
    successes_a: f64,
    n_a: f64,
    successes_b: f64,
    n_b: f64,
) -> Option<f64> {
    if n_a <= 0.0 || n_b <= 0.0 {
        return None;
    }
    let pooled = (successes_a + successes_b) / (n_a + n_b);
    let variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b);
    if variance <= 0.0 || !variance.is_finite() {
        return None;
    }
    let z = (successes_b / n_b - successes_a / n_a) / variance.sqrt();
    Some(normal_upper_tail(z))
}

/// Counts of the values 1 to 5 (a rating scale): mean and sample variance.
pub(crate) fn scale_moments(counts: &[f64; 5]) -> Option<(f64, f64, f64)> {
    let n: f64 = counts.iter().sum();
    if n < 2.0 {
        return None;
    }
    let values = (1..=5).map(f64::from);
    let mean = values.clone().zip(counts).map(|(v, c)| v * c).sum::<f64>() / n;
    let variance = values
        .zip(counts)
        .map(|(v, c)| c * (v - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    Some((n, mean, variance))
}

/// One-sided Welch z-test: the p-value of "mean b is lower than mean a",
/// from (n, mean, variance) of each. `None` without variation.
pub(crate) fn mean_lower(a: (f64, f64, f64), b: (f64, f64, f64)) -> Option<f64> {
    let (n_a, mean_a, var_a) = a;
    let (n_b, mean_b, var_b) = b;
    let standard_error = (var_a / n_a + var_b / n_b).sqrt();
    if standard_error <= 0.0 || !standard_error.is_finite() {
        return None;
    }
    Some(normal_upper_tail((mean_a - mean_b) / standard_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} vs {expected}"
        );
    }

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
            close(erfc(x), expected, 1e-7 * f64::max(expected, 1e-3));
        }
    }

    #[test]
    fn two_proportions() {
        // 30/1000 against 10/1000, pooled: z = 3.19438, p = 0.00070065
        // (Python: 0.5 * math.erfc(z / math.sqrt(2))).
        let p = two_proportion_greater(10.0, 1000.0, 30.0, 1000.0).unwrap();
        close(p, 0.000_700_65, 1e-8);
        // The other direction is near 1.
        assert!(two_proportion_greater(30.0, 1000.0, 10.0, 1000.0).unwrap() > 0.99);
        // No errors anywhere: nothing to test.
        assert_eq!(two_proportion_greater(0.0, 500.0, 0.0, 500.0), None);
        assert_eq!(two_proportion_greater(0.0, 0.0, 1.0, 10.0), None);
    }

    #[test]
    fn ratings() {
        let (n, mean, variance) = scale_moments(&[0.0, 0.0, 10.0, 10.0, 0.0]).unwrap();
        close(n, 20.0, 0.0);
        close(mean, 3.5, 1e-12);
        close(variance, 0.263_157_894_7, 1e-9); // numpy.var(ddof=1)
                                                // 4.0 ± 0.9 over 200 against 3.6 ± 0.9 over 200: z = 4.44.
        let p = mean_lower((200.0, 4.0, 0.81), (200.0, 3.6, 0.81)).unwrap();
        close(p, 4.5e-6, 1e-6);
        assert!(mean_lower((200.0, 3.6, 0.81), (200.0, 4.0, 0.81)).unwrap() > 0.99);
        assert_eq!(scale_moments(&[1.0, 0.0, 0.0, 0.0, 0.0]), None);
    }
}
