//! `[guardrails]`: which checks run, on what numbers, how often, and what
//! happens when one trips.

use http::Uri;
use serde::{Deserialize, Serialize};

/// One guardrail check (a metric label, so a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Check {
    /// Error rate (5xx and upstream 429) above control.
    ErrorRate,
    /// p95 latency more than `max_latency_p95_increase` above control.
    LatencyP95,
    /// p95 time to first token (first byte of a stream) likewise.
    TtftP95,
    /// Mean response length (completion tokens, or bytes where usage is
    /// unknown) shifted more than `max_response_length_change`.
    ResponseLength,
    /// Completion rate of feedback reports more than
    /// `max_completion_rate_decrease` (relative) below control.
    CompletionRate,
    /// Mean rating below control.
    Rating,
}

impl Check {
    /// Every check, in report order.
    pub(crate) const ALL: [Check; 6] = [
        Check::ErrorRate,
        Check::LatencyP95,
        Check::TtftP95,
        Check::ResponseLength,
        Check::CompletionRate,
        Check::Rating,
    ];

    /// The label value and config name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Check::ErrorRate => "error_rate",
            Check::LatencyP95 => "latency_p95",
            Check::TtftP95 => "ttft_p95",
            Check::ResponseLength => "response_length",
            Check::CompletionRate => "completion_rate",
            Check::Rating => "rating",
        }
    }
}

/// Where the numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Source {
    /// This replica's own metrics.
    #[default]
    Local,
    /// A Prometheus server scraping every replica: the fleet's numbers.
    Prometheus,
}

/// What a trip does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnBreach {
    /// Treatment fraction to 0 at once.
    #[default]
    Rollback,
    /// Back to the stage below the current fraction (0 below the first).
    PreviousStage,
}

/// `[guardrails]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuardrailsConfig {
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
    #[serde(default)]
    pub(crate) source: Source,
    /// Base URL of the Prometheus server (`source = "prometheus"`).
    #[serde(default)]
    pub(crate) prometheus_url: Option<String>,
    #[serde(default = "default_interval_seconds")]
    pub(crate) interval_seconds: f64,
    /// With `source = "prometheus"`: how long before its own start a
    /// replica counts the fleet's stage as begun, when the split was
    /// already in force as it started (it did not see the change). The
    /// local source ignores it: a replica's stage is what it saw.
    #[serde(default = "default_window_seconds")]
    pub(crate) window_seconds: f64,
    /// Looks in a row a breach must be seen at before it trips.
    #[serde(default = "default_consecutive_breaches")]
    pub(crate) consecutive_breaches: u32,
    /// Requests each arm needs in the stage before a check judges.
    #[serde(default = "default_min_requests_per_arm")]
    pub(crate) min_requests_per_arm: u64,
    /// Feedback reports (or ratings) each arm needs likewise.
    #[serde(default = "default_min_feedback_per_arm")]
    pub(crate) min_feedback_per_arm: u64,
    /// The chance, per stage, that identical arms ever trip a check,
    /// however often the guard looks; split evenly over the checks that
    /// run (Bonferroni).
    #[serde(default = "default_alpha")]
    pub(crate) alpha: f64,
    #[serde(default)]
    pub(crate) on_breach: OnBreach,
    #[serde(default = "default_checks")]
    pub(crate) checks: Vec<Check>,
    #[serde(default = "default_twenty_percent")]
    pub(crate) max_latency_p95_increase: f64,
    #[serde(default = "default_twenty_percent")]
    pub(crate) max_ttft_p95_increase: f64,
    #[serde(default = "default_thirty_percent")]
    pub(crate) max_response_length_change: f64,
    #[serde(default = "default_five_percent")]
    pub(crate) max_completion_rate_decrease: f64,
    /// Largest error-rate increase (absolute: 0.01 = one point) treatment
    /// may show and still be promoted.
    #[serde(default = "default_one_percent")]
    pub(crate) max_error_rate_increase: f64,
    /// Largest drop in mean rating (points of 1–5) treatment may show and
    /// still be promoted.
    #[serde(default = "default_rating_decrease")]
    pub(crate) max_rating_decrease: f64,
    /// The feedback outcome that counts as a completion.
    #[serde(default = "default_completion_outcome")]
    pub(crate) completion_outcome: String,
}

impl Default for GuardrailsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            source: Source::Local,
            prometheus_url: None,
            interval_seconds: default_interval_seconds(),
            window_seconds: default_window_seconds(),
            consecutive_breaches: default_consecutive_breaches(),
            min_requests_per_arm: default_min_requests_per_arm(),
            min_feedback_per_arm: default_min_feedback_per_arm(),
            alpha: default_alpha(),
            on_breach: OnBreach::Rollback,
            checks: default_checks(),
            max_latency_p95_increase: default_twenty_percent(),
            max_ttft_p95_increase: default_twenty_percent(),
            max_response_length_change: default_thirty_percent(),
            max_completion_rate_decrease: default_five_percent(),
            max_error_rate_increase: default_one_percent(),
            max_rating_decrease: default_rating_decrease(),
            completion_outcome: default_completion_outcome(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_interval_seconds() -> f64 {
    30.0
}
fn default_window_seconds() -> f64 {
    900.0
}
fn default_consecutive_breaches() -> u32 {
    3
}
fn default_min_requests_per_arm() -> u64 {
    500
}
fn default_min_feedback_per_arm() -> u64 {
    100
}
fn default_alpha() -> f64 {
    0.001
}
fn default_checks() -> Vec<Check> {
    Check::ALL.to_vec()
}
fn default_twenty_percent() -> f64 {
    0.20
}
fn default_thirty_percent() -> f64 {
    0.30
}
fn default_five_percent() -> f64 {
    0.05
}
fn default_one_percent() -> f64 {
    0.01
}
fn default_rating_decrease() -> f64 {
    0.1
}
fn default_completion_outcome() -> String {
    "completed".to_owned()
}

impl GuardrailsConfig {
    /// Checks the section against the feedback outcomes it refers to.
    pub(crate) fn validate(&self, outcomes: &[String], report: &mut dyn FnMut(&str, String)) {
        let positive = |value: f64| value.is_finite() && value > 0.0;
        if !positive(self.interval_seconds) {
            report("guardrails.interval_seconds", "must be above 0".into());
        }
        if !(positive(self.window_seconds) && self.window_seconds >= self.interval_seconds) {
            report(
                "guardrails.window_seconds",
                "must be at least interval_seconds".into(),
            );
        }
        if self.consecutive_breaches == 0 {
            report(
                "guardrails.consecutive_breaches",
                "must be at least 1".into(),
            );
        }
        if self.min_requests_per_arm == 0 {
            report(
                "guardrails.min_requests_per_arm",
                "must be at least 1".into(),
            );
        }
        if self.min_feedback_per_arm < 2 {
            report(
                "guardrails.min_feedback_per_arm",
                "must be at least 2".into(),
            );
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            report("guardrails.alpha", "must be between 0 and 0.5".into());
        }
        for (key, value) in [
            ("max_latency_p95_increase", self.max_latency_p95_increase),
            ("max_ttft_p95_increase", self.max_ttft_p95_increase),
            (
                "max_response_length_change",
                self.max_response_length_change,
            ),
        ] {
            if !positive(value) {
                report(
                    &format!("guardrails.{key}"),
                    "must be above 0 (0.2 = 20%)".into(),
                );
            }
        }
        for (key, value, hint) in [
            (
                "max_error_rate_increase",
                self.max_error_rate_increase,
                "(0.01 = one percentage point)",
            ),
            (
                "max_rating_decrease",
                self.max_rating_decrease,
                "(rating points, 0.1 of 1-5)",
            ),
        ] {
            if !(positive(value) && value < 1.0) {
                report(
                    &format!("guardrails.{key}"),
                    format!("must be between 0 and 1 {hint}"),
                );
            }
        }
        if !(positive(self.max_completion_rate_decrease) && self.max_completion_rate_decrease < 1.0)
        {
            report(
                "guardrails.max_completion_rate_decrease",
                "must be between 0 and 1 (0.05 = 5%)".into(),
            );
        }
        if self.checks.contains(&Check::CompletionRate)
            && !outcomes.contains(&self.completion_outcome)
        {
            report(
                "guardrails.completion_outcome",
                format!(
                    "{:?} is not one of feedback.outcomes {:?}",
                    self.completion_outcome, outcomes
                ),
            );
        }
        match (self.source, &self.prometheus_url) {
            (Source::Prometheus, None) => report(
                "guardrails.prometheus_url",
                "is required with source = \"prometheus\"".into(),
            ),
            (_, Some(url)) => {
                if let Err(message) = parse_base_url(url) {
                    report("guardrails.prometheus_url", message);
                }
            }
            (Source::Local, None) => {}
        }
    }

    /// Whether `check` runs.
    pub(crate) fn runs(&self, check: Check) -> bool {
        self.enabled && self.checks.contains(&check)
    }
}

/// Checks a base URL (`http://prometheus:9090`, optionally with a path
/// prefix) and returns it without a trailing slash.
pub(crate) fn parse_base_url(url: &str) -> Result<String, String> {
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => {}
        _ => return Err(format!("{url:?} must be an http:// or https:// URL")),
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_problems_are_named() {
        let outcomes = vec!["completed".to_owned()];
        let mut found = Vec::new();
        GuardrailsConfig::default()
            .validate(&outcomes, &mut |p, m| found.push(format!("{p}: {m}")));
        assert!(found.is_empty(), "{found:?}");
        let config = GuardrailsConfig {
            source: Source::Prometheus,
            alpha: 0.7,
            window_seconds: 1.0,
            completion_outcome: "done".into(),
            ..GuardrailsConfig::default()
        };
        config.validate(&outcomes, &mut |p, m| found.push(format!("{p}: {m}")));
        for expected in [
            "guardrails.prometheus_url: is required",
            "guardrails.alpha:",
            "guardrails.window_seconds:",
            "guardrails.completion_outcome: \"done\" is not one of",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} in {found:#?}"
            );
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("http://prom:9090/").unwrap(),
            "http://prom:9090"
        );
        assert_eq!(
            parse_base_url("https://m.example/prom").unwrap(),
            "https://m.example/prom"
        );
        assert!(parse_base_url("prom:9090").is_err());
        assert!(parse_base_url("ftp://prom").is_err());
        assert!(parse_base_url("http://prom:9090/?x=1").is_err());
    }
}
