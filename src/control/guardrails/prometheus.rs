//! The guardrails' numbers for a whole fleet, from a Prometheus server
//! that scrapes every replica. The PromQL is built from the same metric
//! names the gateway exports and asks for the stage's increase, so every
//! replica reading the server judges the same numbers and acts alike.
//!
//! Prometheus keeps latencies only as histogram buckets about 1.5x apart,
//! so each arm's latency and time to first token come back as a bracket
//! (each bucket's count at its lower and at its upper edge): the quantile
//! tests stay valid, only wider by a bucket. Completion tokens are not
//! exported per answer, so the length check reads bytes, with a second
//! moment from the buckets' upper edges (wider, never narrower).

use std::collections::HashMap;
use std::time::Duration;

use abgate_sequential::mean::MeanStats;
use abgate_sequential::sketch::Sketch;
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::config::guardrails::GuardrailsConfig;
use crate::proxy::body::Body;
use crate::proxy::client::HttpClient;
use crate::telemetry::evidence::{ArmEvidence, Quantiles};
use crate::telemetry::readback::ArmCounts;

/// The queries for one span, each answering one number per arm (or per
/// arm and bucket).
pub(crate) fn queries(experiment: &str, span: Duration) -> Vec<(&'static str, String)> {
    let selector = format!(r#"experiment="{experiment}",variant=~"control|treatment""#);
    let range = format!("{}s", span.as_secs().max(1));
    let increase = |metric: &str, extra: &str, by: &str| {
        format!("sum by ({by}) (increase({metric}{{{selector}{extra}}}[{range}]))")
    };
    vec![
        ("requests", increase("abgate_requests_total", "", "variant")),
        (
            "server_errors",
            increase("abgate_requests_total", r#",status_class="5xx""#, "variant"),
        ),
        (
            "rate_limited",
            increase(
                "abgate_upstream_errors_total",
                r#",kind="status_429""#,
                "variant",
            ),
        ),
        (
            "latency",
            increase("abgate_request_duration_seconds_bucket", "", "variant, le"),
        ),
        (
            "ttft",
            increase(
                "abgate_time_to_first_byte_seconds_bucket",
                r#",stream="true""#,
                "variant, le",
            ),
        ),
        (
            "bytes",
            increase("abgate_response_bytes_bucket", "", "variant, le"),
        ),
        (
            "bytes_sum",
            increase("abgate_response_bytes_sum", "", "variant"),
        ),
        (
            "feedback",
            increase("abgate_feedback_total", "", "variant, outcome"),
        ),
        (
            "ratings",
            increase("abgate_feedback_rating_bucket", "", "variant, le"),
        ),
    ]
}

/// One sample of an instant vector: its labels and value.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    metric: HashMap<String, String>,
    value: (f64, String),
}

#[derive(serde::Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<AnswerData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct AnswerData {
    result: Vec<Sample>,
}

/// Reads a query answer's samples; the error says what the server said.
fn parse_answer(body: &[u8]) -> Result<Vec<Sample>, String> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|err| format!("not a Prometheus answer: {err}"))?;
    match (answer.status.as_str(), answer.data) {
        ("success", Some(data)) => Ok(data.result),
        _ => Err(answer.error.unwrap_or_else(|| "query failed".to_owned())),
    }
}

/// Cumulative bucket counts by upper edge (`le`), per arm.
type Cumulative = Vec<(f64, f64)>;

/// Bucket counts: (lower edge, upper edge, count), from cumulative ones.
fn buckets(mut cumulative: Cumulative) -> Vec<(f64, f64, u64)> {
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut lower, mut below) = (0.0, 0.0);
    let mut out = Vec::with_capacity(cumulative.len());
    for (le, count) in cumulative {
        let count = count.max(below);
        out.push((lower, le, (count - below).round() as u64));
        (lower, below) = (le, count);
    }
    out
}

/// A bracket of sketches from histogram buckets; the `+Inf` bucket's
/// values are put at 100 times the last finite edge.
fn bracket(cumulative: Cumulative) -> Quantiles {
    let (mut low, mut high) = (Sketch::new(), Sketch::new());
    let buckets = buckets(cumulative);
    let last_finite = buckets
        .iter()
        .map(|(_, le, _)| *le)
        .filter(|le| le.is_finite())
        .fold(0.0, f64::max);
    for (lower, upper, count) in buckets {
        let upper = if upper.is_finite() {
            upper
        } else {
            last_finite * 100.0
        };
        low.insert_n(lower, count);
        high.insert_n(upper, count);
    }
    Quantiles::Bracketed { low, high }
}

/// n, sum and an upper bound on the sum of squares from buckets and the
/// exact sum (`+Inf` counted at twice the last finite edge).
fn moments(cumulative: Cumulative, sum: f64) -> MeanStats {
    let mut stats = MeanStats {
        sum,
        ..MeanStats::default()
    };
    for (lower, upper, count) in buckets(cumulative) {
        let edge = if upper.is_finite() {
            upper
        } else {
            2.0 * lower
        };
        stats.n += count;
        stats.sum_sq += edge * edge * count as f64;
    }
    stats
}

/// Folds the answers into the two arms' evidence: (control, treatment).
fn fold(answers: &[(&str, Vec<Sample>)], config: &GuardrailsConfig) -> (ArmEvidence, ArmEvidence) {
    #[derive(Default)]
    struct Arm {
        counts: ArmCounts,
        ratings: [f64; 5],
        latency: Cumulative,
        ttft: Cumulative,
        bytes: Cumulative,
        bytes_sum: f64,
    }
    let mut arms = [Arm::default(), Arm::default()];
    let count = |value: f64| value.max(0.0).round() as u64;
    for (name, samples) in answers {
        for sample in samples {
            let index = match sample.metric.get("variant").map(String::as_str) {
                Some("control") => 0,
                Some("treatment") => 1,
                _ => continue,
            };
            let value: f64 = sample.value.1.parse().unwrap_or(f64::NAN);
            let value = if value.is_finite() { value } else { 0.0 };
            let le = sample
                .metric
                .get("le")
                .and_then(|le| le.parse::<f64>().ok());
            let arm = &mut arms[index];
            match (*name, le) {
                ("requests", _) => arm.counts.requests = count(value),
                ("server_errors" | "rate_limited", _) => arm.counts.errors += count(value),
                ("latency", Some(le)) => arm.latency.push((le, value)),
                ("ttft", Some(le)) => arm.ttft.push((le, value)),
                ("bytes", Some(le)) => arm.bytes.push((le, value)),
                ("bytes_sum", _) => arm.bytes_sum = value,
                ("feedback", _) => {
                    arm.counts.feedback_reports += count(value);
                    if sample.metric.get("outcome") == Some(&config.completion_outcome) {
                        arm.counts.feedback_completed += count(value);
                    }
                }
                // Cumulative buckets le="1".."5": turned into counts below.
                ("ratings", Some(le)) if (1.0..=5.0).contains(&le) => {
                    arm.ratings[le as usize - 1] = value;
                }
                _ => {}
            }
        }
    }
    let [control, treatment] = arms.map(|mut arm| {
        for value in (1..5).rev() {
            arm.ratings[value] = (arm.ratings[value] - arm.ratings[value - 1]).max(0.0);
        }
        arm.counts.ratings = arm.ratings.map(count);
        let mut evidence = ArmEvidence::default();
        evidence.fill_counts(&arm.counts);
        evidence.latency = bracket(arm.latency);
        evidence.ttft = bracket(arm.ttft);
        evidence.response_bytes = moments(arm.bytes, arm.bytes_sum);
        evidence
    });
    (control, treatment)
}

/// Asks `base_url` for both arms' numbers over the last `span`:
/// (control, treatment).
pub(crate) async fn fetch(
    client: &HttpClient,
    base_url: &str,
    experiment: &str,
    span: Duration,
    config: &GuardrailsConfig,
    timeout: Duration,
) -> Result<(ArmEvidence, ArmEvidence), String> {
    let mut answers = Vec::new();
    for (name, query) in queries(experiment, span) {
        let uri = format!("{base_url}/api/v1/query?query={}", url_encode(&query));
        let request = http::Request::get(&uri)
            .body(Body::full(Bytes::new()))
            .map_err(|err| format!("{uri}: {err}"))?;
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|err| format!("{base_url}: {err}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|err| format!("{base_url}: {err}"))?
                .to_bytes();
            if !status.is_success() && body.is_empty() {
                return Err(format!("{base_url} answered {status}"));
            }
            parse_answer(&body).map_err(|err| format!("query {name}: {err}"))
        };
        let samples = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                format!(
                    "{base_url} did not answer within {} ms",
                    timeout.as_millis()
                )
            })??;
        answers.push((name, samples));
    }
    Ok(fold(&answers, config))
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved pass).
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_use_the_exported_names() {
        let queries = queries("ft-v3", Duration::from_secs(300));
        let text: Vec<&str> = queries.iter().map(|(_, q)| q.as_str()).collect();
        assert_eq!(
            text[0],
            r#"sum by (variant) (increase(abgate_requests_total{experiment="ft-v3",variant=~"control|treatment"}[300s]))"#
        );
        assert!(text[3]
            .starts_with("sum by (variant, le) (increase(abgate_request_duration_seconds_bucket{"));
        assert_eq!(url_encode("a b{\"}"), "a%20b%7B%22%7D");
    }

    #[test]
    fn answers_fold_into_arms() {
        let answer = |json: &str| parse_answer(json.as_bytes()).unwrap();
        let vector = |pairs: &[(&str, &str, &str)]| {
            let results: Vec<String> = pairs
                .iter()
                .map(|(variant, extra, value)| {
                    format!(r#"{{"metric":{{"variant":"{variant}"{extra}}},"value":[1700000000.1,"{value}"]}}"#)
                })
                .collect();
            answer(&format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
                results.join(",")
            ))
        };
        let answers = vec![
            (
                "requests",
                vector(&[("control", "", "900"), ("treatment", "", "100")]),
            ),
            ("server_errors", vector(&[("treatment", "", "7")])),
            ("rate_limited", vector(&[("treatment", "", "3")])),
            (
                "latency",
                vector(&[
                    ("control", r#","le":"0.1""#, "500"),
                    ("control", r#","le":"0.2""#, "890"),
                    ("control", r#","le":"+Inf""#, "900"),
                    ("treatment", r#","le":"0.1""#, "NaN"),
                ]),
            ),
            (
                "bytes",
                vector(&[
                    ("control", r#","le":"1000""#, "900"),
                    ("control", r#","le":"+Inf""#, "900"),
                ]),
            ),
            ("bytes_sum", vector(&[("control", "", "720000")])),
            (
                "feedback",
                vector(&[
                    ("control", r#","outcome":"completed""#, "40"),
                    ("control", r#","outcome":"abandoned""#, "10"),
                ]),
            ),
            (
                "ratings",
                vector(&[
                    ("control", r#","le":"1""#, "1"),
                    ("control", r#","le":"2""#, "1"),
                    ("control", r#","le":"3""#, "4"),
                    ("control", r#","le":"4""#, "6"),
                    ("control", r#","le":"5""#, "10"),
                    ("control", r#","le":"+Inf""#, "10"),
                ]),
            ),
        ];
        let (control, treatment) = fold(&answers, &GuardrailsConfig::default());
        assert_eq!(
            (control.requests.trials, treatment.requests.trials),
            (900, 100)
        );
        assert_eq!(treatment.requests.events, 10);
        // 500 answers in (0, 0.1], 390 in (0.1, 0.2], 10 above.
        let Quantiles::Bracketed { low, high } = &control.latency else {
            panic!("Prometheus latencies are bracketed");
        };
        assert_eq!((low.count(), high.count()), (900, 900));
        let (p95_low, p95_high) = (low.quantile(0.95).unwrap(), high.quantile(0.95).unwrap());
        assert!((0.099..=0.101).contains(&p95_low), "{p95_low}");
        assert!((0.199..=0.201).contains(&p95_high), "{p95_high}");
        assert_eq!(treatment.latency.count(), 0);
        assert_eq!(control.response_bytes.n, 900);
        assert_eq!(control.response_bytes.mean(), Some(800.0));
        assert_eq!(control.response_bytes.sum_sq, 900.0 * 1e6);
        assert_eq!((control.feedback.trials, control.feedback.events), (50, 40));
        assert_eq!(control.ratings.n, 10);
        assert_eq!(control.ratings.sum, 1.0 + 3.0 * 3.0 + 4.0 * 2.0 + 5.0 * 4.0);
        let failed =
            parse_answer(br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#);
        assert_eq!(failed.unwrap_err(), "parse error");
    }
}
