//! Anytime-valid sample-ratio-mismatch (SRM) test for two arms.
//!
//! Lindon & Malek, "Anytime-valid inference for multinomial count data",
//! NeurIPS 2022: with a Dirichlet mixture over the cell probabilities the
//! Bayes factor against the design probabilities is a nonnegative
//! martingale under H0 (it is a mixture of likelihood ratios), so by
//! Ville's inequality P(∃n: BF_n ≥ 1/α) ≤ α. For two cells (a beta prior):
//!
//! BF = [B(a + n_T, b + n_C) / B(a, b)] / (p^n_T (1−p)^n_C),
//!
//! computed in log space with [`crate::math::ln_gamma`]. The always-valid
//! p-value is min(1, 1 / max_{looks} BF), non-increasing over looks.
//!
//! Prior: a = p·c, b = (1−p)·c (centred on the design share), with c
//! from [`crate::math::beta_concentration`] for a target number of users.
//!
//! **Input must be counts of DISTINCT USERS per arm** (cumulative over the
//! stage), not requests: assignment is per user, so users are the i.i.d.
//! units of the martingale; request counts are clustered by user and one
//! heavy user could fake (or hide) a mismatch.
//!
//! The BF depends only on the cumulative counts, so looking at any times
//! is fine; counts that decrease between looks (a bug upstream) are still
//! evaluated as given.

use crate::math::{beta_concentration, ln_beta};
use serde::Serialize;

/// State of one stage's SRM test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SrmTest {
    p: f64,
    alpha: f64,
    a: f64,
    b: f64,
    valid: bool,
    max_log_bf: f64,
}

/// Result of one look.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SrmResult {
    /// ln BF at this look.
    pub log_bf: f64,
    /// Always-valid p-value, min(1, 1/max BF so far).
    pub p_value: f64,
    /// Whether max BF so far ≥ 1/α.
    pub reject: bool,
    /// Observed treatment share of users (`None` with no users).
    pub observed_share: Option<f64>,
}

/// Log Bayes factor for (n_T, n_C) against share `p` with Beta(a, b)
/// prior; NaN for invalid parameters.
pub fn log_bayes_factor(n_t: u64, n_c: u64, p: f64, a: f64, b: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && a > 0.0 && b > 0.0) {
        return f64::NAN;
    }
    let (nt, nc) = (n_t as f64, n_c as f64);
    ln_beta(a + nt, b + nc) - ln_beta(a, b) - nt * p.ln() - nc * (1.0 - p).ln()
}

impl SrmTest {
    /// Test of treatment user share `p` at level `alpha`, prior tuned for
    /// `target_users` users. With invalid parameters it never rejects.
    pub fn new(p: f64, alpha: f64, target_users: f64) -> Self {
        let c = beta_concentration(alpha, target_users);
        let valid = p > 0.0 && p < 1.0 && alpha > 0.0 && alpha < 1.0;
        SrmTest {
            p,
            alpha,
            a: p * c,
            b: (1.0 - p) * c,
            valid,
            max_log_bf: f64::NEG_INFINITY,
        }
    }

    /// New stage: forget the running maximum.
    pub fn reset(&mut self) {
        self.max_log_bf = f64::NEG_INFINITY;
    }

    /// Level α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Look at cumulative distinct-user counts.
    pub fn observe(&mut self, users_treatment: u64, users_control: u64) -> SrmResult {
        let total = users_treatment.saturating_add(users_control);
        let observed_share = (total > 0).then(|| users_treatment as f64 / total as f64);
        if !self.valid {
            return SrmResult {
                log_bf: f64::NAN,
                p_value: 1.0,
                reject: false,
                observed_share,
            };
        }
        let lbf = log_bayes_factor(users_treatment, users_control, self.p, self.a, self.b);
        if lbf > self.max_log_bf {
            self.max_log_bf = lbf;
        }
        let p_value = (-self.max_log_bf).exp().min(1.0);
        SrmResult {
            log_bf: lbf,
            p_value,
            reject: self.max_log_bf >= -self.alpha.ln(),
            observed_share,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_counts_and_invalid() {
        let mut t = SrmTest::new(0.05, 0.01, 1e4);
        let r = t.observe(0, 0);
        assert!(r.log_bf.abs() < 1e-12);
        assert_eq!(r.p_value, 1.0);
        assert!(!r.reject);
        let mut bad = SrmTest::new(1.5, 0.01, 1e4);
        assert!(!bad.observe(10, 0).reject);
    }
}
