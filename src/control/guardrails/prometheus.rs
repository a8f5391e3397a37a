//! The guardrails' numbers for a whole fleet, from a Prometheus server
//! that scrapes every replica. The PromQL is built from the same metric
//! names the gateway exports, over the same window the local source uses,
//! so every replica reading the server judges the same numbers and acts
//! alike.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::config::guardrails::GuardrailsConfig;
use crate::proxy::body::Body;
use crate::proxy::client::HttpClient;
use crate::telemetry::readback::ArmWindow;

/// The queries for one window, each answering one number per arm.
pub(crate) fn queries(experiment: &str, window: Duration) -> Vec<(&'static str, String)> {
    let selector = format!(r#"experiment="{experiment}",variant=~"control|treatment""#);
    let range = format!("{}s", window.as_secs().max(1));
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
            "latency_p95",
            format!(
                "histogram_quantile(0.95, {})",
                increase("abgate_request_duration_seconds_bucket", "", "variant, le")
            ),
        ),
        (
            "streams",
            increase(
                "abgate_time_to_first_byte_seconds_count",
                r#",stream="true""#,
                "variant",
            ),
        ),
        (
            "ttft_p95",
            format!(
                "histogram_quantile(0.95, {})",
                increase(
                    "abgate_time_to_first_byte_seconds_bucket",
                    r#",stream="true""#,
                    "variant, le"
                )
            ),
        ),
        (
            "mean_response_bytes",
            format!(
                "{} / {}",
                increase("abgate_response_bytes_sum", "", "variant"),
                increase("abgate_response_bytes_count", "", "variant")
            ),
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

/// Folds the answers into the two arms' windows.
fn fold(answers: &[(&str, Vec<Sample>)], config: &GuardrailsConfig) -> (ArmWindow, ArmWindow) {
    let mut arms = [ArmWindow::default(), ArmWindow::default()];
    for (name, samples) in answers {
        for sample in samples {
            let index = match sample.metric.get("variant").map(String::as_str) {
                Some("control") => 0,
                Some("treatment") => 1,
                _ => continue,
            };
            let value: f64 = sample.value.1.parse().unwrap_or(f64::NAN);
            let finite = value.is_finite().then_some(value);
            let arm = &mut arms[index];
            match *name {
                "requests" => arm.requests = value.max(0.0),
                "server_errors" | "rate_limited" => arm.errors += finite.unwrap_or(0.0),
                "latency_p95" => arm.latency_p95_seconds = finite,
                "streams" => arm.streams = finite.unwrap_or(0.0),
                "ttft_p95" => arm.ttft_p95_seconds = finite,
                "mean_response_bytes" => arm.mean_response_bytes = finite,
                "feedback" => {
                    let count = finite.unwrap_or(0.0);
                    arm.feedback_reports += count;
                    if sample.metric.get("outcome") == Some(&config.completion_outcome) {
                        arm.feedback_completed += count;
                    }
                }
                "ratings" => {
                    // Cumulative buckets le="1".."5": turned into counts below.
                    let bucket = sample
                        .metric
                        .get("le")
                        .and_then(|le| le.parse::<f64>().ok());
                    if let Some(le) = bucket.filter(|le| (1.0..=5.0).contains(le)) {
                        arm.ratings[le as usize - 1] = finite.unwrap_or(0.0);
                    }
                }
                _ => {}
            }
        }
    }
    for arm in &mut arms {
        for value in (1..5).rev() {
            arm.ratings[value] = (arm.ratings[value] - arm.ratings[value - 1]).max(0.0);
        }
    }
    let [control, treatment] = arms;
    (control, treatment)
}

/// Asks `base_url` for both arms' numbers over `window`.
pub(crate) async fn fetch(
    client: &HttpClient,
    base_url: &str,
    experiment: &str,
    window: Duration,
    config: &GuardrailsConfig,
    timeout: Duration,
) -> Result<(ArmWindow, ArmWindow), String> {
    let mut answers = Vec::new();
    for (name, query) in queries(experiment, window) {
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
        assert!(text[3].starts_with("histogram_quantile(0.95, sum by (variant, le) (increase(abgate_request_duration_seconds_bucket{"));
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
                "latency_p95",
                vector(&[("control", "", "0.5"), ("treatment", "", "NaN")]),
            ),
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
        assert_eq!((control.requests, treatment.requests), (900.0, 100.0));
        assert_eq!(treatment.errors, 10.0);
        assert_eq!(control.latency_p95_seconds, Some(0.5));
        assert_eq!(treatment.latency_p95_seconds, None);
        assert_eq!(
            (control.feedback_reports, control.feedback_completed),
            (50.0, 40.0)
        );
        assert_eq!(control.ratings, [1.0, 0.0, 3.0, 2.0, 4.0]);
        let failed =
            parse_answer(br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#);
        assert_eq!(failed.unwrap_err(), "parse error");
    }
}
