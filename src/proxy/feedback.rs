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
use crate::telemetry::events::{FeedbackEvent, Line};
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

/// Reports this replica remembers at most, to count each request id once:
/// with its expiry, some 45 bytes each (the set and the queue of
/// expiries), so at most about 45 MB. Past it,
/// new reports are refused (503) until old ones expire, rather than
/// forgetting one that could then be counted twice.
pub(crate) const MAX_REMEMBERED: usize = 1_000_000;

/// The request ids reported on, each until `feedback.max_age_seconds`
/// after the request (after which a report is refused for its age anyway;
/// ids of the earlier format, which carry no issue time, until that long
/// after their first report): one replica's memory. Replicas of a fleet do
/// not share it, so a report replayed to another replica counts there
/// too, until the rollout's shared store holds it.
#[derive(Debug, Default)]
pub(crate) struct Reported {
    seen: std::sync::Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    macs: std::collections::HashSet<u64>,
    /// When each is forgotten, oldest first.
    expiries: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Reported {
    /// Notes a report on the id whose MAC is `mac`: refused if one was
    /// noted within `max_age`, or if this replica remembers too many.
    pub(crate) fn note(&self, mac: u64, max_age: std::time::Duration) -> Result<(), ProxyError> {
        self.note_at(mac, max_age, std::time::Instant::now(), MAX_REMEMBERED)
    }

    fn note_at(
        &self,
        mac: u64,
        max_age: std::time::Duration,
        now: std::time::Instant,
        limit: usize,
    ) -> Result<(), ProxyError> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| ProxyError::Internal("feedback memory poisoned".into()))?;
        while let Some(&(expiry, old)) = seen.expiries.front() {
            if expiry > now {
                break;
            }
            seen.expiries.pop_front();
            seen.macs.remove(&old);
        }
        if seen.macs.contains(&mac) {
            return Err(ProxyError::DuplicateFeedback);
        }
        if seen.macs.len() >= limit {
            return Err(ProxyError::FeedbackFull { limit });
        }
        seen.macs.insert(mac);
        seen.expiries.push_back((now + max_age, mac));
        Ok(())
    }
}

/// A fleet-wide memory of the request ids reported on (the rollout's
/// shared store), asked before this replica's own.
pub(crate) trait SharedReports: Send + Sync {
    /// Notes a report on the id whose MAC is `mac`, remembered for
    /// `remember`: `Ok(true)` if it is the first, `Ok(false)` if the fleet
    /// has counted one, `Err` if the store did not answer.
    fn note(
        &self,
        mac: u64,
        remember: std::time::Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + '_>>;
}

/// A report as counted.
pub(crate) struct Recorded {
    pub(crate) attribution: Attribution,
    pub(crate) request_id: String,
    pub(crate) outcome: String,
    pub(crate) rating: Option<u8>,
}

/// Validates a report, counts it once per request id and only within
/// `max_age` of the request; returns what it was attributed to.
pub(crate) fn record(
    body: &Bytes,
    ids: &RequestIds,
    outcomes: &[String],
    (reported, max_age): (&Reported, std::time::Duration),
    metrics: &Metrics,
) -> Result<Recorded, ProxyError> {
    let (recorded, remember) = validate(body, ids, outcomes, max_age)?;
    // Counted once: the last check, so that a refused report does not
    // use up its request id.
    reported.note(recorded.attribution.mac, remember)?;
    count(&recorded, metrics);
    Ok(recorded)
}

/// As [`record`], with the fleet's memory deciding what is a duplicate;
/// while it does not answer, this replica's own.
async fn record_shared(
    body: &Bytes,
    ids: &RequestIds,
    outcomes: &[String],
    (reported, max_age): (&Reported, std::time::Duration),
    metrics: &Metrics,
    shared: &dyn SharedReports,
) -> Result<Recorded, ProxyError> {
    let (recorded, remember) = validate(body, ids, outcomes, max_age)?;
    match shared.note(recorded.attribution.mac, remember).await {
        Ok(true) => {}
        Ok(false) => return Err(ProxyError::DuplicateFeedback),
        Err(err) => {
            tracing::warn!("feedback counted against this replica's memory only: {err}");
            reported.note(recorded.attribution.mac, remember)?;
        }
    }
    count(&recorded, metrics);
    Ok(recorded)
}

fn count(recorded: &Recorded, metrics: &Metrics) {
    metrics.feedback(
        &recorded.attribution.experiment,
        recorded.attribution.variant,
        &recorded.outcome,
        recorded.rating,
    );
}

/// A report checked: well formed, for an id this key signed, within its
/// age; with how long its id must be remembered.
fn validate(
    body: &Bytes,
    ids: &RequestIds,
    outcomes: &[String],
    max_age: std::time::Duration,
) -> Result<(Recorded, std::time::Duration), ProxyError> {
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
    let age = attribution
        .issued_at
        .map(|issued| unix_now().saturating_sub(issued));
    if let Some(age_seconds) = age.filter(|age| *age > max_age.as_secs()) {
        return Err(ProxyError::FeedbackExpired {
            age_seconds,
            max_age_seconds: max_age.as_secs(),
        });
    }
    // Remembered as long as a replay could still be accepted.
    let remember = max_age
        .saturating_sub(std::time::Duration::from_secs(age.unwrap_or(0)))
        .max(std::time::Duration::from_secs(1));
    Ok((
        Recorded {
            attribution,
            request_id: report.request_id,
            outcome: report.outcome,
            rating,
        },
        remember,
    ))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
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
        let max_age = std::time::Duration::from_secs(live.config.feedback.max_age_seconds);
        let recorded = match gateway.shared_reports.get() {
            Some(shared) => {
                record_shared(
                    &body,
                    &live.request_ids,
                    outcomes,
                    (&gateway.reported, max_age),
                    &gateway.metrics,
                    shared.as_ref(),
                )
                .await?
            }
            None => record(
                &body,
                &live.request_ids,
                outcomes,
                (&gateway.reported, max_age),
                &gateway.metrics,
            )?,
        };
        let attribution = &recorded.attribution;
        if let Some(events) = &gateway.events {
            events.emit(Line::Feedback(FeedbackEvent {
                event: "feedback",
                timestamp: crate::config::clock::now_rfc3339(),
                request_id: recorded.request_id.clone(),
                experiment: attribution.experiment.clone(),
                variant: attribution.variant.as_str(),
                outcome: recorded.outcome.clone(),
                rating: recorded.rating,
                request_issued_at: attribution.issued_at.map(|secs| {
                    crate::config::clock::format_rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                    )
                }),
            }));
        }
        Ok(serde_json::json!({
            "recorded": true,
            "experiment": attribution.experiment,
            "variant": attribution.variant.as_str(),
            "outcome": recorded.outcome,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::experiment::assign::Variant;
    use std::time::{Duration, Instant};

    #[test]
    fn a_request_id_is_counted_once_until_it_expires() {
        let reported = Reported::default();
        let (start, age) = (Instant::now(), Duration::from_secs(60));
        assert!(reported.note_at(1, age, start, 10).is_ok());
        assert!(reported.note_at(2, age, start, 10).is_ok());
        assert!(matches!(
            reported.note_at(1, age, start + Duration::from_secs(59), 10),
            Err(ProxyError::DuplicateFeedback)
        ));
        // Forgotten at its max age: its memory is freed.
        assert!(reported.note_at(1, age, start + age, 10).is_ok());
    }

    #[test]
    fn a_report_is_accepted_only_within_its_max_age_of_the_request() {
        let ids = RequestIds::new(b"key".to_vec());
        let metrics = Metrics::new().unwrap();
        let reported = Reported::default();
        let outcomes = vec!["completed".to_owned()];
        let week = Duration::from_secs(7 * 86_400);
        let report =
            |id: &str| Bytes::from(format!(r#"{{"request_id":"{id}","outcome":"completed"}}"#));
        let old = ids.issue_at(Variant::Treatment, "exp", unix_now() - 8 * 86_400);
        match record(&report(&old), &ids, &outcomes, (&reported, week), &metrics) {
            Err(ProxyError::FeedbackExpired {
                age_seconds,
                max_age_seconds,
            }) => {
                assert!((8 * 86_400..8 * 86_400 + 5).contains(&age_seconds));
                assert_eq!(max_age_seconds, 7 * 86_400);
            }
            _ => panic!("an 8-day-old request takes no feedback"),
        }
        let recent = ids.issue_at(Variant::Treatment, "exp", unix_now() - 86_400);
        let recorded = record(
            &report(&recent),
            &ids,
            &outcomes,
            (&reported, week),
            &metrics,
        )
        .ok()
        .unwrap();
        assert_eq!(recorded.attribution.variant, Variant::Treatment);
        assert_eq!(recorded.request_id, recent);
        assert!(matches!(
            record(
                &report(&recent),
                &ids,
                &outcomes,
                (&reported, week),
                &metrics
            ),
            Err(ProxyError::DuplicateFeedback)
        ));
    }

    #[test]
    fn past_its_bound_a_replica_refuses_rather_than_forgets() {
        let reported = Reported::default();
        let (start, age) = (Instant::now(), Duration::from_secs(60));
        for mac in 0..3 {
            assert!(reported.note_at(mac, age, start, 3).is_ok());
        }
        assert!(matches!(
            reported.note_at(9, age, start, 3),
            Err(ProxyError::FeedbackFull { limit: 3 })
        ));
        // The remembered ones are still refused as duplicates.
        assert!(matches!(
            reported.note_at(0, age, start, 3),
            Err(ProxyError::DuplicateFeedback)
        ));
        assert!(reported.note_at(9, age, start + age, 3).is_ok());
    }
}
