//! The checks: sequential tests of treatment against control over the
//! whole stage, from `abgate_sequential::decision`. Each keeps an
//! always-valid confidence sequence at its share of `alpha` (the total is
//! split evenly over the checks that run: Bonferroni, valid under any
//! dependence), so identical arms trip any check during a stage with
//! probability at most `alpha`, however often the guard looks:
//!
//! - error rate, completion rate: two proportions, normal-mixture
//!   confidence sequences (mSPRT; Johari et al., "Peeking at A/B tests",
//!   KDD 2017; Howard et al., Ann. Statist. 2021);
//! - p95 latency and TTFT: quantile confidence sequences per arm (Howard &
//!   Ramdas, Bernoulli 2022), read from each arm's sketch;
//! - response length and rating: means, the same mixture sequences.
//!
//! A check breaches when its interval lies wholly on the wrong side of its
//! breach line, and shows non-inferiority when it lies wholly inside the
//! margin; promotion needs the latter. Pure over the evidence, so the same
//! code judges a replica's own stage and a fleet's numbers.

use abgate_sequential::decision::{self as sequential, MoreNeeded, Outcome, Scale, Verdict};
use abgate_sequential::mean::MeanStats;
use serde::Serialize;

use crate::config::guardrails::{Check, GuardrailsConfig};
use crate::telemetry::evidence::{ArmEvidence, StageEvidence};

/// The quantile the latency checks compare.
const QUANTILE: f64 = 0.95;

/// Which length the response-length check measures in this stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LengthMeasure {
    CompletionTokens,
    ResponseBytes,
}

/// One check's running test.
enum Test {
    ErrorRate(sequential::ErrorRate),
    LatencyP95(sequential::QuantileIncrease),
    TtftP95(sequential::QuantileIncrease),
    /// Both measures keep their own sequence; the stage judges by the one
    /// chosen at its first judgeable look, so it never switches.
    ResponseLength {
        tokens: sequential::MeanShift,
        bytes: sequential::MeanShift,
        measure: Option<LengthMeasure>,
    },
    CompletionRate(sequential::ProportionDecrease),
    Rating(sequential::MeanDecrease),
}

/// The stage's tests, built from the config; a new stage (or a changed
/// `[guardrails]`) starts them over.
pub(crate) struct StageTests {
    config: GuardrailsConfig,
    tests: Vec<(Check, Test)>,
}

/// An estimate of what a decision still needs, if the numbers go on as
/// they have.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Needed {
    pub(crate) treatment: u64,
    pub(crate) control: u64,
    /// At the stage's rate so far; none if nothing arrived yet.
    pub(crate) seconds: Option<f64>,
}

/// An always-valid interval for treatment versus control.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct ConfidenceInterval {
    /// Coverage over the whole stage: 1 - the check's alpha.
    pub(crate) level: f64,
    pub(crate) lower: Option<f64>,
    pub(crate) upper: Option<f64>,
}

/// Observations per arm behind a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Observations {
    pub(crate) control: u64,
    pub(crate) treatment: u64,
}

/// One check's verdict at one look.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CheckResult {
    pub(crate) check: Check,
    pub(crate) decision: Verdict,
    /// What is compared ("error rate", "p95 latency (s)", ...).
    pub(crate) measure: &'static str,
    pub(crate) control: Option<f64>,
    pub(crate) treatment: Option<f64>,
    /// `difference` (treatment - control) or `relative` (treatment /
    /// control - 1): the units of `estimate` and the interval.
    pub(crate) scale: Scale,
    pub(crate) estimate: Option<f64>,
    pub(crate) confidence_interval: ConfidenceInterval,
    /// treatment / control - 1, whatever the scale.
    pub(crate) relative_difference: Option<f64>,
    pub(crate) breach_when: String,
    pub(crate) non_inferior_when: String,
    pub(crate) alpha: f64,
    pub(crate) observations: Observations,
    pub(crate) more_needed: Option<Needed>,
    /// Looks in a row this check was in breach, including this one.
    pub(crate) consecutive: u32,
    /// The verdict in a sentence.
    pub(crate) detail: String,
}

impl StageTests {
    /// Fresh tests for the checks `config` runs.
    pub(crate) fn new(config: &GuardrailsConfig) -> Self {
        let enabled: Vec<Check> = Check::ALL
            .into_iter()
            .filter(|check| config.runs(*check))
            .collect();
        let alpha = sequential::split_alpha(config.alpha, enabled.len());
        let requests = config.min_requests_per_arm;
        let feedback = config.min_feedback_per_arm;
        let quantile = |margin| {
            sequential::QuantileIncrease::new(sequential::QuantileIncreaseConfig {
                alpha,
                p: QUANTILE,
                margin,
                min_per_arm: requests,
                ..sequential::QuantileIncreaseConfig::default()
            })
        };
        let length = || {
            sequential::MeanShift::new(sequential::MeanShiftConfig {
                alpha,
                margin: config.max_response_length_change,
                min_per_arm: requests,
                ..sequential::MeanShiftConfig::default()
            })
        };
        let tests = enabled
            .into_iter()
            .map(|check| {
                let test = match check {
                    Check::ErrorRate => {
                        Test::ErrorRate(sequential::ErrorRate::new(sequential::ErrorRateConfig {
                            alpha,
                            breach_threshold: 0.0,
                            ni_margin: config.max_error_rate_increase,
                            min_per_arm: requests,
                            ..sequential::ErrorRateConfig::default()
                        }))
                    }
                    Check::LatencyP95 => {
                        Test::LatencyP95(quantile(config.max_latency_p95_increase))
                    }
                    Check::TtftP95 => Test::TtftP95(quantile(config.max_ttft_p95_increase)),
                    Check::ResponseLength => Test::ResponseLength {
                        tokens: length(),
                        bytes: length(),
                        measure: None,
                    },
                    Check::CompletionRate => Test::CompletionRate(
                        sequential::ProportionDecrease::new(sequential::ProportionDecreaseConfig {
                            alpha,
                            margin: config.max_completion_rate_decrease,
                            min_per_arm: feedback,
                            ..sequential::ProportionDecreaseConfig::default()
                        }),
                    ),
                    Check::Rating => Test::Rating(sequential::MeanDecrease::new(
                        sequential::MeanDecreaseConfig {
                            alpha,
                            breach_margin: 0.0,
                            ni_margin: config.max_rating_decrease,
                            min_per_arm: feedback,
                            ..sequential::MeanDecreaseConfig::default()
                        },
                    )),
                };
                (check, test)
            })
            .collect();
        Self {
            config: config.clone(),
            tests,
        }
    }

    /// Whether these tests were built from `config`.
    pub(crate) fn fits(&self, config: &GuardrailsConfig) -> bool {
        self.config == *config
    }

    /// One look at the stage's cumulative evidence.
    pub(crate) fn evaluate(&mut self, evidence: &StageEvidence) -> Vec<CheckResult> {
        let min_requests = self.config.min_requests_per_arm;
        let config = &self.config;
        let (c, t) = (&evidence.control, &evidence.treatment);
        let seconds = evidence.seconds;
        self.tests
            .iter_mut()
            .map(|(check, test)| {
                let check = *check;
                match test {
                    Test::ErrorRate(test) => judge(
                        check,
                        test.observe(&t.requests, &c.requests),
                        Measure::ERROR_RATE,
                        (c.requests.proportion(), t.requests.proportion()),
                        (c, t),
                        seconds,
                        config,
                    ),
                    Test::LatencyP95(test) => judge(
                        check,
                        test.observe_bracketed(&t.latency.bracket(), &c.latency.bracket()),
                        Measure::LATENCY,
                        (c.latency.quantile(QUANTILE), t.latency.quantile(QUANTILE)),
                        (c, t),
                        seconds,
                        config,
                    ),
                    Test::TtftP95(test) => judge(
                        check,
                        test.observe_bracketed(&t.ttft.bracket(), &c.ttft.bracket()),
                        Measure::TTFT,
                        (c.ttft.quantile(QUANTILE), t.ttft.quantile(QUANTILE)),
                        (c, t),
                        seconds,
                        config,
                    ),
                    Test::ResponseLength {
                        tokens,
                        bytes,
                        measure: chosen,
                    } => {
                        if chosen.is_none() && enough_answers(c, t, min_requests) {
                            *chosen = Some(choose_length(c, t));
                        }
                        let (outcome, measure) = if *chosen == Some(LengthMeasure::CompletionTokens)
                        {
                            (
                                tokens.observe(&t.completion_tokens, &c.completion_tokens),
                                Measure::TOKENS,
                            )
                        } else {
                            (
                                bytes.observe(&t.response_bytes, &c.response_bytes),
                                Measure::BYTES,
                            )
                        };
                        let stats = measure.stats.unwrap_or(|arm| &arm.response_bytes);
                        judge(
                            check,
                            outcome,
                            measure,
                            (stats(c).mean(), stats(t).mean()),
                            (c, t),
                            seconds,
                            config,
                        )
                    }
                    Test::CompletionRate(test) => judge(
                        check,
                        test.observe(&t.feedback, &c.feedback),
                        Measure::COMPLETION,
                        (c.feedback.proportion(), t.feedback.proportion()),
                        (c, t),
                        seconds,
                        config,
                    ),
                    Test::Rating(test) => judge(
                        check,
                        test.observe(&t.ratings, &c.ratings),
                        Measure::RATING,
                        (c.ratings.mean(), t.ratings.mean()),
                        (c, t),
                        seconds,
                        config,
                    ),
                }
            })
            .collect()
    }
}

/// Both arms have answered enough to judge their length.
fn enough_answers(control: &ArmEvidence, treatment: &ArmEvidence, min: u64) -> bool {
    control.response_bytes.n >= min && treatment.response_bytes.n >= min
}

/// Tokens when usage was read from at least half of each arm's answers;
/// bytes otherwise (an upstream that reports no usage).
fn choose_length(control: &ArmEvidence, treatment: &ArmEvidence) -> LengthMeasure {
    let with_usage =
        |arm: &ArmEvidence| arm.completion_tokens.n.saturating_mul(2) >= arm.response_bytes.n;
    if with_usage(control) && with_usage(treatment) {
        LengthMeasure::CompletionTokens
    } else {
        LengthMeasure::ResponseBytes
    }
}

/// How a check's numbers read in words.
#[derive(Clone, Copy)]
struct Measure {
    name: &'static str,
    /// What one observation is, plural.
    noun: &'static str,
    /// An arm's value in words.
    show: fn(Option<f64>, &ArmEvidence) -> String,
    /// The moments a mean check reads.
    stats: Option<fn(&ArmEvidence) -> &MeanStats>,
    /// Decimals of a difference on this measure's scale.
    decimals: usize,
}

fn or_none(value: Option<f64>, show: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "none".to_owned(), show)
}

impl Measure {
    const ERROR_RATE: Measure = Measure {
        name: "error rate",
        noun: "requests",
        show: |rate, arm| {
            format!(
                "{} ({} of {})",
                or_none(rate, |r| format!("{r:.4}")),
                arm.requests.events,
                arm.requests.trials
            )
        },
        stats: None,
        decimals: 4,
    };
    const LATENCY: Measure = Measure {
        name: "p95 latency",
        noun: "answers",
        show: |p95, _| or_none(p95, |s| format!("{:.1} ms", s * 1000.0)),
        stats: None,
        decimals: 4,
    };
    const TTFT: Measure = Measure {
        name: "p95 time to first token",
        noun: "streams",
        show: |p95, _| or_none(p95, |s| format!("{:.1} ms", s * 1000.0)),
        stats: None,
        decimals: 4,
    };
    const TOKENS: Measure = Measure {
        name: "mean completion tokens",
        noun: "answers with usage",
        show: |mean, arm| {
            format!(
                "{} of {}",
                or_none(mean, |m| format!("{m:.1}")),
                arm.completion_tokens.n
            )
        },
        stats: Some(|arm| &arm.completion_tokens),
        decimals: 1,
    };
    const BYTES: Measure = Measure {
        name: "mean response bytes",
        noun: "answers",
        show: |mean, arm| {
            format!(
                "{} of {}",
                or_none(mean, |m| format!("{m:.0}")),
                arm.response_bytes.n
            )
        },
        stats: Some(|arm| &arm.response_bytes),
        decimals: 0,
    };
    const COMPLETION: Measure = Measure {
        name: "completion rate",
        noun: "feedback reports",
        show: |rate, arm| {
            format!(
                "{} ({} of {})",
                or_none(rate, |r| format!("{r:.3}")),
                arm.feedback.events,
                arm.feedback.trials
            )
        },
        stats: None,
        decimals: 3,
    };
    const RATING: Measure = Measure {
        name: "mean rating",
        noun: "ratings",
        show: |mean, arm| {
            format!(
                "{} of {}",
                or_none(mean, |m| format!("{m:.2}")),
                arm.ratings.n
            )
        },
        stats: Some(|arm| &arm.ratings),
        decimals: 2,
    };

    /// A value on `scale`: a signed percentage, or a signed difference.
    fn on_scale(&self, scale: Scale, value: f64) -> String {
        match scale {
            Scale::Relative => format!("{:+.1}%", value * 100.0),
            Scale::Difference => format!("{value:+.prec$}", prec = self.decimals),
        }
    }
}

/// The breach and non-inferiority lines of an outcome, in words.
fn lines(outcome: &Outcome, measure: &Measure) -> (String, String) {
    let show = |value: f64| measure.on_scale(outcome.scale, value);
    let thresholds = &outcome.thresholds;
    let mut breach = Vec::new();
    if let Some(line) = thresholds.breach_above {
        breach.push(format!("lower bound above {}", show(line)));
    }
    if let Some(line) = thresholds.breach_below {
        breach.push(format!("upper bound below {}", show(line)));
    }
    let non_inferior = match (thresholds.ni_lower, thresholds.ni_upper) {
        (Some(low), Some(high)) => format!("interval inside [{}, {}]", show(low), show(high)),
        (Some(low), None) => format!("lower bound at or above {}", show(low)),
        (None, Some(high)) => format!("upper bound at or below {}", show(high)),
        (None, None) => "never (a veto only)".to_owned(),
    };
    (breach.join(" or "), non_inferior)
}

/// An outcome of the sequential layer as the report shows it.
fn judge(
    check: Check,
    outcome: Outcome,
    measure: Measure,
    (control, treatment): (Option<f64>, Option<f64>),
    (control_arm, treatment_arm): (&ArmEvidence, &ArmEvidence),
    seconds: f64,
    config: &GuardrailsConfig,
) -> CheckResult {
    let (breach_when, non_inferior_when) = lines(&outcome, &measure);
    let more_needed = outcome.more_needed.map(|more: MoreNeeded| Needed {
        treatment: more.treatment,
        control: more.control,
        seconds: (outcome.n_treatment > 0 && seconds > 0.0)
            .then(|| more.treatment as f64 * seconds / outcome.n_treatment as f64),
    });
    let relative_difference = match (control, treatment) {
        (Some(c), Some(t)) if c > 0.0 => Some(t / c - 1.0),
        _ => None,
    };
    let min = match check {
        Check::CompletionRate | Check::Rating => config.min_feedback_per_arm,
        _ => config.min_requests_per_arm,
    };
    let interval = ConfidenceInterval {
        level: 1.0 - outcome.alpha,
        lower: outcome.lower,
        upper: outcome.upper,
    };
    let bound = |value: Option<f64>, none: &str| {
        value.map_or_else(|| none.to_owned(), |v| measure.on_scale(outcome.scale, v))
    };
    let numbers = format!(
        "{}: treatment {}, control {}",
        measure.name,
        (measure.show)(treatment, treatment_arm),
        (measure.show)(control, control_arm),
    );
    let verdict = match outcome.verdict {
        Verdict::InsufficientData if outcome.n_treatment >= min && outcome.n_control >= min => {
            "insufficient data: no interval can be formed from these numbers yet".to_owned()
        }
        Verdict::InsufficientData => format!(
            "insufficient data: needs {min} {} per arm, has {} treatment and {} control",
            measure.noun, outcome.n_treatment, outcome.n_control
        ),
        Verdict::Breach => format!("breach ({breach_when})"),
        Verdict::NonInferior => format!("non-inferior ({non_inferior_when})"),
        Verdict::Undecided => match &more_needed {
            Some(more) => format!(
                "undecided: about {} more treatment {}{}",
                more.treatment,
                measure.noun,
                more.seconds
                    .map(|s| format!(" ({} at the stage's rate)", duration_words(s)))
                    .unwrap_or_default()
            ),
            None => "undecided".to_owned(),
        },
    };
    let detail = match outcome.verdict {
        Verdict::InsufficientData => format!("{numbers}; {verdict}"),
        _ => format!(
            "{numbers}; {} {} [{}, {}] at {:.4}% over the stage: {verdict}",
            match outcome.scale {
                Scale::Relative => "change",
                Scale::Difference => "difference",
            },
            bound(outcome.estimate, "n/a"),
            bound(outcome.lower, "-inf"),
            bound(outcome.upper, "+inf"),
            interval.level * 100.0,
        ),
    };
    CheckResult {
        check,
        decision: outcome.verdict,
        measure: measure.name,
        control,
        treatment,
        scale: outcome.scale,
        estimate: outcome.estimate,
        confidence_interval: interval,
        relative_difference,
        breach_when,
        non_inferior_when,
        alpha: outcome.alpha,
        observations: Observations {
            control: outcome.n_control,
            treatment: outcome.n_treatment,
        },
        more_needed,
        consecutive: 0,
        detail,
    }
}

/// Seconds in the unit a person reads them in.
fn duration_words(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("~{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("~{:.0} min", seconds / 60.0)
    } else if seconds < 172_800.0 {
        format!("~{:.1} h", seconds / 3600.0)
    } else {
        format!("~{:.1} days", seconds / 86_400.0)
    }
}

/// Looks in a row each check was in breach. The sequential tests already
/// keep a breach for the rest of the stage, so a streak only delays the
/// trip by `consecutive_breaches - 1` looks; it adds no false trips.
#[derive(Debug, Clone, Default)]
pub(crate) struct Streaks {
    counts: [u32; 6],
}

impl Streaks {
    /// Counts this look's breaches into `results` and returns the checks
    /// whose streak reached `needed`.
    pub(crate) fn observe(&mut self, results: &mut [CheckResult], needed: u32) -> Vec<Check> {
        let mut tripped = Vec::new();
        for result in results.iter_mut() {
            let index = Check::ALL
                .iter()
                .position(|c| *c == result.check)
                .unwrap_or(0);
            let count = &mut self.counts[index];
            *count = if result.decision == Verdict::Breach {
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

    /// Starts every streak over (after a trip, or when the stage changes).
    pub(crate) fn reset(&mut self) {
        self.counts = [0; 6];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use abgate_sequential::mean::CountStats;
    use abgate_sequential::sketch::Sketch;

    use super::*;
    use crate::telemetry::evidence::{rating_moments, Quantiles};

    /// An arm of `requests` answers, `errors` of them failed, latencies
    /// spread evenly around `p95_seconds` (so its p95 is near it), 100
    /// tokens and 800 bytes an answer give or take, and feedback.
    fn arm(
        requests: u64,
        errors: u64,
        p95_seconds: f64,
        completed: u64,
        ratings: [u64; 5],
    ) -> ArmEvidence {
        let mut latency = Sketch::new();
        let mut ttft = Sketch::new();
        let mut tokens = MeanStats::default();
        let mut bytes = MeanStats::default();
        for i in 0..requests {
            let spread = (i % 100) as f64 / 95.0;
            latency.insert(p95_seconds * spread);
            ttft.insert(p95_seconds * spread / 4.0);
            tokens.push(90.0 + (i % 21) as f64);
            bytes.push(700.0 + (i % 201) as f64);
        }
        let reports: u64 = ratings.iter().sum();
        ArmEvidence {
            requests: CountStats::new(requests, errors),
            latency: Quantiles::Exact(latency),
            ttft: Quantiles::Exact(ttft),
            completion_tokens: tokens,
            response_bytes: bytes,
            feedback: CountStats::new(reports, completed),
            ratings: rating_moments(&ratings),
        }
    }

    fn evidence(control: ArmEvidence, treatment: ArmEvidence) -> StageEvidence {
        StageEvidence {
            control,
            treatment,
            seconds: 600.0,
        }
    }

    fn by_check(results: &[CheckResult], check: Check) -> &CheckResult {
        results.iter().find(|r| r.check == check).unwrap()
    }

    const RATINGS: [u64; 5] = [300, 600, 1800, 4500, 4800];

    #[test]
    fn identical_arms_with_plenty_of_data_are_non_inferior() {
        let config = GuardrailsConfig::default();
        let mut tests = StageTests::new(&config);
        let same = || arm(40_000, 400, 0.8, 9000, RATINGS);
        let results = tests.evaluate(&evidence(same(), same()));
        assert_eq!(results.len(), 6);
        for result in &results {
            assert!((result.alpha - 0.001 / 6.0).abs() < 1e-15);
            assert_eq!(result.decision, Verdict::NonInferior, "{}", result.detail);
            let (lower, upper) = (
                result.confidence_interval.lower.unwrap(),
                result.confidence_interval.upper.unwrap(),
            );
            assert!(lower <= 0.0 && upper >= 0.0, "{result:?}");
        }
        let length = by_check(&results, Check::ResponseLength);
        assert_eq!(length.measure, "mean completion tokens");
    }

    #[test]
    fn each_red_flag_breaches_and_says_why() {
        let config = GuardrailsConfig::default();
        let mut tests = StageTests::new(&config);
        let control = arm(20_000, 200, 0.8, 3000, RATINGS);
        let mut bad = arm(5_000, 500, 1.2, 500, [600, 800, 1000, 1000, 600]);
        for i in 0..5_000 {
            bad.completion_tokens.push(200.0 + (i % 21) as f64);
        }
        let results = tests.evaluate(&evidence(control, bad));
        for result in &results {
            assert_eq!(result.decision, Verdict::Breach, "{}", result.detail);
        }
        let error = by_check(&results, Check::ErrorRate);
        assert!(
            error.detail.starts_with(
                "error rate: treatment 0.1000 (500 of 5000), control 0.0100 (200 of 20000)"
            ),
            "{}",
            error.detail
        );
        assert!(error.confidence_interval.lower.unwrap() > 0.0);
        assert_eq!(error.scale, Scale::Difference);
        let latency = by_check(&results, Check::LatencyP95);
        assert_eq!(latency.scale, Scale::Relative);
        assert!(
            latency.confidence_interval.lower.unwrap() > 0.2,
            "{latency:?}"
        );
    }

    #[test]
    fn too_little_data_is_said_and_a_middle_ground_is_undecided() {
        let config = GuardrailsConfig::default();
        let mut tests = StageTests::new(&config);
        let results = tests.evaluate(&evidence(
            arm(5000, 50, 0.8, 0, [0; 5]),
            arm(100, 50, 5.0, 0, [0; 5]),
        ));
        let error = by_check(&results, Check::ErrorRate);
        assert_eq!(error.decision, Verdict::InsufficientData);
        assert!(
            error
                .detail
                .contains("needs 500 requests per arm, has 100 treatment"),
            "{}",
            error.detail
        );
        assert_eq!(
            by_check(&results, Check::Rating).decision,
            Verdict::InsufficientData
        );
        // 1.0% against 1.1% over 2,000 requests: neither a breach nor shown
        // within a point, with an estimate of what it needs.
        let mut tests = StageTests::new(&config);
        let results = tests.evaluate(&evidence(
            arm(20_000, 200, 0.8, 0, [0; 5]),
            arm(2_000, 22, 0.8, 0, [0; 5]),
        ));
        let error = by_check(&results, Check::ErrorRate);
        assert_eq!(error.decision, Verdict::Undecided, "{}", error.detail);
        let more = error.more_needed.unwrap();
        assert!(
            more.treatment > 0 && more.seconds.unwrap() > 0.0,
            "{more:?}"
        );
        assert!(
            error.detail.contains("more treatment requests"),
            "{}",
            error.detail
        );
    }

    #[test]
    fn without_usage_the_length_is_judged_in_bytes() {
        let config = GuardrailsConfig {
            checks: vec![Check::ResponseLength],
            ..GuardrailsConfig::default()
        };
        let mut tests = StageTests::new(&config);
        let mut control = arm(20_000, 0, 0.8, 0, [0; 5]);
        let mut treatment = arm(20_000, 0, 0.8, 0, [0; 5]);
        control.completion_tokens = MeanStats::default();
        treatment.completion_tokens = MeanStats::default();
        let results = tests.evaluate(&evidence(control.clone(), treatment.clone()));
        assert_eq!(results[0].measure, "mean response bytes");
        assert_eq!(
            results[0].decision,
            Verdict::NonInferior,
            "{}",
            results[0].detail
        );
        // The stage keeps its measure once chosen, even if usage appears.
        treatment.completion_tokens = MeanStats::new(20_000, 4e6, 8e8);
        control.completion_tokens = MeanStats::new(20_000, 2e6, 2e8);
        let results = tests.evaluate(&evidence(control, treatment));
        assert_eq!(results[0].measure, "mean response bytes");
    }

    #[test]
    fn disabled_checks_do_not_run() {
        let config = GuardrailsConfig {
            checks: vec![Check::ErrorRate],
            ..GuardrailsConfig::default()
        };
        let mut tests = StageTests::new(&config);
        let results = tests.evaluate(&StageEvidence::default());
        assert_eq!(results.len(), 1);
        assert!((results[0].alpha - 0.001).abs() < 1e-15);
        assert!(tests.fits(&config));
        assert!(!tests.fits(&GuardrailsConfig::default()));
        let off = GuardrailsConfig {
            enabled: false,
            ..GuardrailsConfig::default()
        };
        assert!(StageTests::new(&off)
            .evaluate(&StageEvidence::default())
            .is_empty());
    }

    #[test]
    fn a_breach_trips_only_after_a_streak() {
        let config = GuardrailsConfig {
            checks: vec![Check::ErrorRate],
            ..GuardrailsConfig::default()
        };
        let mut tests = StageTests::new(&config);
        let mut streaks = Streaks::default();
        let mut look = |errors| {
            let mut results = tests.evaluate(&evidence(
                arm(20_000, 200, 0.8, 0, [0; 5]),
                arm(5_000, errors, 0.8, 0, [0; 5]),
            ));
            streaks.observe(&mut results, 3)
        };
        assert!(look(500).is_empty());
        assert!(look(500).is_empty());
        // A breach holds for the stage: better numbers later do not undo it.
        assert_eq!(look(50), vec![Check::ErrorRate]);
    }
}
