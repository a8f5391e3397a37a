//! Phase 8, **answer**: the upstream's status, headers and body stream,
//! with the gateway's `x-abgate-*` fields; a failure becomes its JSON
//! error answer here and only here. The answer's body is watched by the
//! idle and total deadlines and the shutdown's cut, and records the
//! request when it ends.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::Response;

use super::answer_fields::GatewayFields;
use super::body::Body;
use super::context::RequestContext;
use super::deadline::Deadlines;
use super::error::ProxyError;
use super::observe::{Observation, ObservedBody, UsageFormat};
use crate::telemetry::metrics::UpstreamErrorKind;

impl RequestContext<'_> {
    /// The answer to the request: what the phases came to, measured on
    /// its way to the client. From here on the answer records the
    /// request. (Lent, not given: the context is not copied to answer.)
    pub(crate) fn answer(&mut self, result: Result<Response<Body>, ProxyError>) -> Response<Body> {
        let (gateway, live) = (self.gateway, self.live);
        let config = &live.config;
        let started = self.started;
        let (response, error, deadlines) = match result {
            Ok(response) => {
                // The head is here; from now on the body is watched.
                let headers_at = self.headers_at.unwrap_or_else(std::time::Instant::now);
                let deadlines = Deadlines::new(
                    config.idle_timeout,
                    config.total_timeout,
                    started.into(),
                    headers_at.into(),
                );
                let (mut parts, body) = response.into_parts();
                super::headers::prepare_answer(&mut parts.headers);
                (Response::from_parts(parts, body), None, Some(deadlines))
            }
            Err(err) => {
                if err.is_auth_failure() {
                    gateway.metrics.auth_failed(err.kind());
                }
                if err.status().is_server_error() {
                    tracing::warn!(kind = err.kind(), variant = ?self.variant, "{err}");
                } else {
                    tracing::debug!(kind = err.kind(), "{err}");
                }
                (err.to_response(), err.upstream_kind(), None)
            }
        };
        let status = response.status().as_u16();
        let (usage_format, error_event) = answer_content(&response);
        let request_id = self.take_request_id();
        // The upstream's own error answers count against its arm.
        let error = error.or_else(|| self.variant.and(UpstreamErrorKind::from_status(status)));
        let cut = deadlines
            .is_some()
            .then(|| (gateway.drain.signal(), config.drain_timeout));
        // The client's side cuts a client that stops reading, and tells
        // the body before it drops it.
        let write_limits = abgate_http1::server::WriteLimits {
            per_write: config.client_write_timeout,
            deadline: Some((started + config.total_timeout).into()),
        };
        let observation = Observation {
            usage_format,
            deadlines,
            cut,
            error_event,
            write_limits: Some(write_limits),
            ..self.observation(status, error, &request_id)
        };
        let fields = GatewayFields {
            forced: self.forced,
            variant: self.variant,
            fallback: self.fallback,
            model: self.model.take(),
            experiment: Some(config.experiment_header.clone()),
            // The id's own bytes become the value, not a copy of them.
            request_id: HeaderValue::from_maybe_shared(Bytes::from(request_id)).ok(),
        };
        response.map(|body| Body::Observed(Box::new(ObservedBody::new(body, observation, fields))))
    }
}

/// What the observer makes of an answer's content, each of its fields
/// looked up once: how its token usage is read (successful JSON, plain or
/// gzip as providers send it when clients accept it, or plain SSE), and
/// whether a failure mid-body can be told to the client as an SSE error
/// event (an uncompressed event stream without a declared length, so that
/// an event added at the end is read as one).
fn answer_content(response: &Response<Body>) -> (UsageFormat, bool) {
    let headers = response.headers();
    let media = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let event_stream = media.starts_with("text/event-stream");
    let json = media.starts_with("application/json");
    // An encoding that is not text is neither identity nor gzip.
    let encoding = headers
        .get(http::header::CONTENT_ENCODING)
        .map(|value| value.to_str().map_or("", str::trim));
    let identity = match encoding {
        None => true,
        Some(encoding) => encoding.eq_ignore_ascii_case("identity"),
    };
    let gzip = encoding.is_some_and(|encoding| encoding.eq_ignore_ascii_case("gzip"));
    let usage = if !response.status().is_success() {
        UsageFormat::None
    } else if identity && event_stream {
        UsageFormat::EventStream
    } else if identity && json {
        UsageFormat::Json
    } else if gzip && json {
        UsageFormat::GzipJson
    } else {
        UsageFormat::None
    };
    // A known length (declared, or the framing of an upstream's answer,
    // whose Content-Length stays out of the map) leaves no room for an
    // event.
    let length_known = headers.contains_key(CONTENT_LENGTH)
        || http_body::Body::size_hint(response.body())
            .exact()
            .is_some();
    (usage, event_stream && identity && !length_known)
}
