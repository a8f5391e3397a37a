//! `POST /v1/feedback`: a business outcome (and optionally a 1-5 rating)
//! for a request the gateway served, attributed to its arm by the signed
//! request id alone.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use serde::Deserialize;

use super::body::Body;
use super::error::ProxyError;
use super::{Gateway, Live};
use crate::experiment::request_id::{Attribution, RequestIds};
use crate::telemetry::metrics::Metrics;

/// The path feedback is posted to on the proxy port.
pub(crate) const PATH: &str = "/v1/feedback";

/// Feedback bodies are small; anything larger is not feedback.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    request_id: String,
    outcome: String,
    #[serde(default)]
    rating: Option<serde_json::Value>,
}

/// Validates a report and counts it; returns what it was attributed to.
pub(crate) fn record(
    body: &Bytes,
    ids: &RequestIds,
    outcomes: &[String],
    metrics: &Metrics,
) -> Result<(Attribution, String), ProxyError> {
    let report: Report = serde_json::from_slice(body).map_err(|err| {
        ProxyError::InvalidFeedback(format!(
            "feedback must be {{\"request_id\": \"...\", \"outcome\": \"...\", \"rating\": 1-5}}: {err}"
        ))
    })?;
    let attribution = ids.verify(&report.request_id).ok_or_else(|| {
        ProxyError::InvalidFeedback(
            "unknown or malformed request_id: quote the x-abgate-request-id header of a response"
                .into(),
        )
    })?;
    if !outcomes.contains(&report.outcome) {
        return Err(ProxyError::InvalidFeedback(format!(
            "outcome {:?} is not one of {}",
            report.outcome,
            outcomes.join(", ")
        )));
    }
    let rating = match report.rating {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(rating @ 1..=5) => Some(rating as u8),
            _ => {
                return Err(ProxyError::InvalidFeedback(format!(
                    "rating must be a whole number from 1 to 5, not {value}"
                )))
            }
        },
    };
    metrics.feedback(
        &attribution.experiment,
        attribution.variant,
        &report.outcome,
        rating,
    );
    Ok((attribution, report.outcome))
}

/// Answers `POST /v1/feedback`; never forwarded.
pub(crate) async fn answer(
    gateway: &Gateway,
    live: &Live,
    request: Request<Body>,
) -> Response<Body> {
    let answer = async {
        if request.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed {
                path: PATH,
                allowed: "POST",
            });
        }
        let (parts, body) = request.into_parts();
        if let Some(keys) = &live.config.gateway_keys {
            super::access::authenticate(keys, &parts.headers)?;
        }
        let body = super::read::read_body(body, &parts, MAX_BODY_BYTES).await?;
        let outcomes = &live.config.feedback.outcomes;
        let (attribution, outcome) = record(&body, &live.request_ids, outcomes, &gateway.metrics)?;
        Ok(serde_json::json!({
            "recorded": true,
            "experiment": attribution.experiment,
            "variant": attribution.variant.as_str(),
            "outcome": outcome,
        }))
    };
    match answer.await {
        Ok(json) => {
            let mut response = Response::new(Body::full(json.to_string()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(err) => {
            if err.is_auth_failure() {
                gateway.metrics.auth_failed(err.kind());
            }
            err.to_response()
        }
    }
}
