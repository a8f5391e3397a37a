//! `POST /v1/feedback`: a business outcome (and optionally a 1-5 rating)
//! for a request the gateway served, attributed to its arm by the signed
//! request id alone.

use bytes::Bytes;
use serde::Deserialize;

use super::error::ProxyError;
use crate::experiment::request_id::{Attribution, RequestIds};
use crate::telemetry::metrics::Metrics;

/// The path feedback is posted to on the proxy port.
pub const PATH: &str = "/v1/feedback";

/// Feedback bodies are small; anything larger is not feedback.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    request_id: String,
    outcome: String,
    #[serde(default)]
    rating: Option<serde_json::Value>,
}

/// Validates a report and counts it; returns what it was attributed to.
pub fn record(
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
