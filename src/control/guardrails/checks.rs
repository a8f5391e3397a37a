//! The checks: treatment against control over one window. Pure functions
//! of the two arms' numbers, so the same code judges a replica's own
//! metrics and a fleet's numbers from Prometheus.
//!
//! A check judges only with enough data (`min_requests_per_arm`,
//! `min_feedback_per_arm`); below that it says so. The rate and rating
//! checks need both a practical difference and statistical evidence
//! (one-sided, at `alpha`) so noise alone never trips them; the latency and
//! length checks compare against a relative limit, with the minimum sample
//! keeping the p95 estimates steady.

use serde::Serialize;

use crate::config::guardrails::{Check, GuardrailsConfig};
use crate::experiment::stats;
use crate::telemetry::readback::ArmWindow;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    Ok,
    Breach,
    InsufficientData,
}

/// One check's verdict over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CheckResult {
    pub(crate) check: Check,
    pub(crate) status: Status,
    pub(crate) control: Option<f64>,
    pub(crate) treatment: Option<f64>,
    /// The limit, in words.
    pub(crate) limit: String,
    /// One-sided p-value, for the statistical checks.
    pub(crate) p_value: Option<f64>,
    /// Breaches in a row, including this one (filled in by [`Streaks`]).
    pub(crate) consecutive: u32,
    /// The verdict in a sentence.
    pub(crate) detail: String,
}

/// Runs every configured check on one window.
pub(crate) fn evaluate(
    config: &GuardrailsConfig,
    control: &ArmWindow,
    treatment: &ArmWindow,
) -> Vec<CheckResult> {
    Check::ALL
        .into_iter()
        .filter(|check| config.runs(*check))
        .map(|check| match check {
            Check::ErrorRate => error_rate(config, control, treatment),
            Check::LatencyP95 => relative_increase(
                check,
                "p95 latency",
                config.max_latency_p95_increase,
                (control.requests, control.latency_p95_seconds),
                (treatment.requests, treatment.latency_p95_seconds),
                config.min_requests_per_arm,
            ),
            Check::TtftP95 => relative_increase(
                check,
                "p95 time to first token",
                config.max_ttft_p95_increase,
                (control.streams, control.ttft_p95_seconds),
                (treatment.streams, treatment.ttft_p95_seconds),
                config.min_requests_per_arm,
            ),
            Check::ResponseLength => response_length(config, control, treatment),
            Check::CompletionRate => completion_rate(config, control, treatment),
            Check::Rating => rating(config, control, treatment),
        })
        .collect()
}

fn result(
    check: Check,
    status: Status,
    control: Option<f64>,
    treatment: Option<f64>,
    limit: String,
    p_value: Option<f64>,
    detail: String,
) -> CheckResult {
    CheckResult {
        check,
        status,
        control,
        treatment,
        limit,
        p_value,
        consecutive: 0,
        detail,
    }
}

fn insufficient(
    check: Check,
    limit: String,
    what: &str,
    have: (f64, f64),
    need: u64,
) -> CheckResult {
    result(
        check,
        Status::InsufficientData,
        None,
        None,
        limit,
        None,
        format!(
            "needs {need} {what} per arm in the window; control has {}, treatment {}",
            have.0, have.1
        ),
    )
}

fn error_rate(
    config: &GuardrailsConfig,
    control: &ArmWindow,
    treatment: &ArmWindow,
) -> CheckResult {
    let check = Check::ErrorRate;
    let limit = format!("higher than control with p < {}", config.alpha);
    let need = config.min_requests_per_arm;
    if control.requests < need as f64 || treatment.requests < need as f64 {
        return insufficient(
            check,
            limit,
            "requests",
            (control.requests, treatment.requests),
            need,
        );
    }
    let (c, t) = (control.error_rate(), treatment.error_rate());
    let p_value = stats::two_proportion_greater(
        control.errors,
        control.requests,
        treatment.errors,
        treatment.requests,
    );
    let breach = p_value.is_some_and(|p| p < config.alpha);
    let detail = format!(
        "error rate: treatment {:.4} ({} of {}), control {:.4} ({} of {}), one-sided p = {}",
        t.unwrap_or(0.0),
        treatment.errors,
        treatment.requests,
        c.unwrap_or(0.0),
        control.errors,
        control.requests,
        p_value.map_or("n/a (no errors)".to_owned(), |p| format!("{p:.2e}")),
    );
    result(check, status(breach), c, t, limit, p_value, detail)
}

fn status(breach: bool) -> Status {
    if breach {
        Status::Breach
    } else {
        Status::Ok
    }
}

/// Treatment's value more than `max_increase` (relative) above control's.
fn relative_increase(
    check: Check,
    what: &str,
    max_increase: f64,
    control: (f64, Option<f64>),
    treatment: (f64, Option<f64>),
    need: u64,
) -> CheckResult {
    let limit = format!("at most {:.0}% above control", max_increase * 100.0);
    let (Some(c), Some(t)) = (control.1, treatment.1) else {
        return insufficient(check, limit, "observations", (control.0, treatment.0), need);
    };
    if control.0 < need as f64 || treatment.0 < need as f64 {
        return insufficient(check, limit, "observations", (control.0, treatment.0), need);
    }
    let change = if c > 0.0 { t / c - 1.0 } else { 0.0 };
    let detail = format!(
        "{what}: treatment {:.1} ms, control {:.1} ms ({:+.1}%)",
        t * 1000.0,
        c * 1000.0,
        change * 100.0
    );
    result(
        check,
        status(change > max_increase),
        Some(c),
        Some(t),
        limit,
        None,
        detail,
    )
}

fn response_length(
    config: &GuardrailsConfig,
    control: &ArmWindow,
    treatment: &ArmWindow,
) -> CheckResult {
    let check = Check::ResponseLength;
    let max = config.max_response_length_change;
    let limit = format!("within ±{:.0}% of control", max * 100.0);
    let need = config.min_requests_per_arm;
    let (Some(c), Some(t)) = (control.mean_response_bytes, treatment.mean_response_bytes) else {
        return insufficient(
            check,
            limit,
            "responses",
            (control.requests, treatment.requests),
            need,
        );
    };
    if control.requests < need as f64 || treatment.requests < need as f64 {
        return insufficient(
            check,
            limit,
            "responses",
            (control.requests, treatment.requests),
            need,
        );
    }
    let change = if c > 0.0 { t / c - 1.0 } else { 0.0 };
    let detail = format!(
        "mean response length: treatment {t:.0} bytes, control {c:.0} bytes ({:+.1}%)",
        change * 100.0
    );
    result(
        check,
        status(change.abs() > max),
        Some(c),
        Some(t),
        limit,
        None,
        detail,
    )
}

fn completion_rate(
    config: &GuardrailsConfig,
    control: &ArmWindow,
    treatment: &ArmWindow,
) -> CheckResult {
    let check = Check::CompletionRate;
    let max = config.max_completion_rate_decrease;
    let limit = format!(
        "at most {:.0}% (relative) below control, judged at p < {}",
        max * 100.0,
        config.alpha
    );
    let need = config.min_feedback_per_arm;
    let (Some(c), Some(t)) = (control.completion_rate(), treatment.completion_rate()) else {
        return insufficient(
            check,
            limit,
            "feedback reports",
            (control.feedback_reports, treatment.feedback_reports),
            need,
        );
    };
    if control.feedback_reports < need as f64 || treatment.feedback_reports < need as f64 {
        return insufficient(
            check,
            limit,
            "feedback reports",
            (control.feedback_reports, treatment.feedback_reports),
            need,
        );
    }
    // "Treatment completes less" is "treatment fails to complete more".
    let p_value = stats::two_proportion_greater(
        control.feedback_reports - control.feedback_completed,
        control.feedback_reports,
        treatment.feedback_reports - treatment.feedback_completed,
        treatment.feedback_reports,
    );
    let relative_drop = if c > 0.0 { 1.0 - t / c } else { 0.0 };
    let breach = relative_drop > max && p_value.is_some_and(|p| p < config.alpha);
    let detail = format!(
        "completion rate: treatment {t:.3}, control {c:.3} ({:+.1}%), one-sided p = {}",
        -relative_drop * 100.0,
        p_value.map_or("n/a".to_owned(), |p| format!("{p:.2e}")),
    );
    result(
        check,
        status(breach),
        Some(c),
        Some(t),
        limit,
        p_value,
        detail,
    )
}

fn rating(config: &GuardrailsConfig, control: &ArmWindow, treatment: &ArmWindow) -> CheckResult {
    let check = Check::Rating;
    let limit = format!("not below control with p < {}", config.alpha);
    let need = config.min_feedback_per_arm;
    let counts = |arm: &ArmWindow| arm.ratings.iter().sum::<f64>();
    let (Some(c), Some(t)) = (
        stats::scale_moments(&control.ratings),
        stats::scale_moments(&treatment.ratings),
    ) else {
        return insufficient(
            check,
            limit,
            "ratings",
            (counts(control), counts(treatment)),
            need,
        );
    };
    if c.0 < need as f64 || t.0 < need as f64 {
        return insufficient(check, limit, "ratings", (c.0, t.0), need);
    }
    let p_value = stats::mean_lower(c, t);
    let breach = p_value.is_some_and(|p| p < config.alpha);
    let detail = format!(
        "mean rating: treatment {:.2} of {}, control {:.2} of {}, one-sided p = {}",
        t.1,
        t.0,
        c.1,
        c.0,
        p_value.map_or("n/a".to_owned(), |p| format!("{p:.2e}")),
    );
    result(
        check,
        status(breach),
        Some(c.1),
        Some(t.1),
        limit,
        p_value,
        detail,
    )
}

/// Breaches in a row, per check: one bad window never trips on its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Streaks {
    counts: [u32; 6],
}

impl Streaks {
    /// Counts this round's breaches into `results` (a check that is fine or
    /// lacks data breaks its streak) and returns the checks whose streak
    /// reached `needed`.
    pub(crate) fn observe(&mut self, results: &mut [CheckResult], needed: u32) -> Vec<Check> {
        let mut tripped = Vec::new();
        for result in results.iter_mut() {
            let index = Check::ALL
                .iter()
                .position(|c| *c == result.check)
                .unwrap_or(0);
            let count = &mut self.counts[index];
            *count = if result.status == Status::Breach {
                *count + 1
            } else {
                0
            };
            result.consecutive = *count;
            if *count >= needed {
                tripped.push(result.check);
            }
        }
        tripped
    }

    /// Starts every streak over (after a trip, or when the split changes).
    pub(crate) fn reset(&mut self) {
        self.counts = [0; 6];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(requests: f64, errors: f64, p95: f64) -> ArmWindow {
        ArmWindow {
            requests,
            errors,
            latency_p95_seconds: Some(p95),
            streams: requests,
            ttft_p95_seconds: Some(p95 / 4.0),
            mean_response_bytes: Some(800.0),
            feedback_reports: 400.0,
            feedback_completed: 300.0,
            ratings: [10.0, 20.0, 60.0, 150.0, 160.0],
        }
    }

    fn by_check(results: &[CheckResult], check: Check) -> &CheckResult {
        results.iter().find(|r| r.check == check).unwrap()
    }

    #[test]
    fn identical_arms_pass_every_check() {
        let config = GuardrailsConfig::default();
        let results = evaluate(&config, &arm(5000.0, 50.0, 0.8), &arm(600.0, 6.0, 0.8));
        assert_eq!(results.len(), 6);
        for result in &results {
            assert_eq!(result.status, Status::Ok, "{result:?}");
        }
    }

    #[test]
    fn each_red_flag_is_caught() {
        let config = GuardrailsConfig::default();
        let control = arm(5000.0, 50.0, 0.8);
        let mut bad = arm(1000.0, 100.0, 1.2);
        bad.ttft_p95_seconds = Some(0.3);
        bad.mean_response_bytes = Some(1200.0);
        bad.feedback_completed = 200.0;
        bad.ratings = [60.0, 80.0, 100.0, 100.0, 60.0];
        let results = evaluate(&config, &control, &bad);
        for result in &results {
            assert_eq!(result.status, Status::Breach, "{result:?}");
        }
        assert!(by_check(&results, Check::ErrorRate)
            .detail
            .contains("treatment 0.1000 (100 of 1000)"));
        // Shorter answers are a shift too.
        bad.mean_response_bytes = Some(500.0);
        assert_eq!(
            by_check(&evaluate(&config, &control, &bad), Check::ResponseLength).status,
            Status::Breach
        );
    }

    #[test]
    fn noise_and_small_samples_do_not_trip() {
        let config = GuardrailsConfig::default();
        // 1.3% against 1.0% over 600 requests: within noise.
        let results = evaluate(&config, &arm(5000.0, 50.0, 0.8), &arm(600.0, 8.0, 0.85));
        assert_eq!(by_check(&results, Check::ErrorRate).status, Status::Ok);
        assert_eq!(by_check(&results, Check::LatencyP95).status, Status::Ok);
        // Too few requests: no verdict, however bad.
        let results = evaluate(&config, &arm(5000.0, 50.0, 0.8), &arm(100.0, 50.0, 5.0));
        let error = by_check(&results, Check::ErrorRate);
        assert_eq!(error.status, Status::InsufficientData);
        assert!(
            error.detail.contains("needs 500 requests per arm"),
            "{}",
            error.detail
        );
        // A drop in completion too small to matter is not a breach, however certain.
        let mut slightly = arm(5000.0, 50.0, 0.8);
        slightly.feedback_reports = 100_000.0;
        slightly.feedback_completed = 73_000.0;
        let mut control = arm(5000.0, 50.0, 0.8);
        control.feedback_reports = 100_000.0;
        control.feedback_completed = 75_000.0;
        assert_eq!(
            by_check(
                &evaluate(&config, &control, &slightly),
                Check::CompletionRate
            )
            .status,
            Status::Ok
        );
    }

    #[test]
    fn disabled_checks_do_not_run() {
        let config = GuardrailsConfig {
            checks: vec![Check::ErrorRate],
            ..GuardrailsConfig::default()
        };
        assert_eq!(
            evaluate(&config, &ArmWindow::default(), &ArmWindow::default()).len(),
            1
        );
        let off = GuardrailsConfig {
            enabled: false,
            ..GuardrailsConfig::default()
        };
        assert!(evaluate(&off, &ArmWindow::default(), &ArmWindow::default()).is_empty());
    }

    #[test]
    fn a_breach_trips_only_after_a_streak() {
        let config = GuardrailsConfig::default();
        let (control, bad, good) = (
            arm(5000.0, 50.0, 0.8),
            arm(1000.0, 100.0, 0.8),
            arm(1000.0, 10.0, 0.8),
        );
        let mut streaks = Streaks::default();
        let mut round = |treatment: &ArmWindow| {
            let mut results = evaluate(&config, &control, treatment);
            streaks.observe(&mut results, 3)
        };
        assert!(round(&bad).is_empty());
        assert!(round(&bad).is_empty());
        assert!(round(&good).is_empty(), "a good window breaks the streak");
        assert!(round(&bad).is_empty());
        assert!(round(&bad).is_empty());
        assert_eq!(round(&bad), vec![Check::ErrorRate]);
    }
}
