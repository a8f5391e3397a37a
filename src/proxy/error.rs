//! Every way a proxied request can fail, and the one place that decides the
//! HTTP status, the metric label and the JSON body for each.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::experiment::assign::Variant;
use crate::proxy::body::Body;
use crate::telemetry::metrics::UpstreamErrorKind;

/// Which of the upstream timeouts ran out; each is its own setting and
/// error kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// `timeouts.connect_ms`: no connection.
    Connect,
    /// `timeouts.first_byte_ms`: no response headers.
    FirstByte,
    /// `timeouts.idle_ms`: the answer paused too long.
    Idle,
    /// `timeouts.total_ms`: the whole request took too long.
    Total,
}

impl Timeout {
    /// The config key that sets it.
    pub(crate) const fn key(self) -> &'static str {
        match self {
            Timeout::Connect => "timeouts.connect_ms",
            Timeout::FirstByte => "timeouts.first_byte_ms",
            Timeout::Idle => "timeouts.idle_ms",
            Timeout::Total => "timeouts.total_ms",
        }
    }

    /// Its error kind.
    pub(crate) const fn kind(self) -> UpstreamErrorKind {
        match self {
            Timeout::Connect => UpstreamErrorKind::ConnectTimeout,
            Timeout::FirstByte => UpstreamErrorKind::FirstByteTimeout,
            Timeout::Idle => UpstreamErrorKind::IdleTimeout,
            Timeout::Total => UpstreamErrorKind::TotalTimeout,
        }
    }

    fn describe(self, variant: Variant, timeout_ms: u128) -> String {
        let what = match self {
            Timeout::Connect => format!("could not connect to the {variant} upstream within"),
            Timeout::FirstByte => format!("the {variant} upstream sent no response headers within"),
            Timeout::Idle => format!("the {variant} upstream's answer paused for longer than"),
            Timeout::Total => format!("the request to the {variant} upstream took longer than"),
        };
        format!("{what} {timeout_ms} ms ({})", self.key())
    }
}

/// A request the gateway answers itself instead of with the upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("\"{field}\" must be {expected}")]
    WrongFieldType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("request body is empty; this endpoint takes a JSON object")]
    MissingBody,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    #[error("the {header} header is not valid UTF-8")]
    UserIdNotUtf8 { header: String },
    #[error("the user ID is {len} bytes long; at most {max} bytes are accepted")]
    UserIdTooLong { len: usize, max: usize },
    #[error("no user ID: send the {header} header, OpenAI's \"user\" field or Anthropic's \"metadata.user_id\"")]
    UserIdRequired { header: String },
    #[error("no route for {path}: abgate forwards /v1/... API paths")]
    NotFound { path: String },
    #[error("the request path {reason}: abgate forwards a path only as it is meant, with no segment an upstream could normalise away")]
    InvalidPath { reason: &'static str },
    #[error("could not connect to the {variant} upstream: {detail}")]
    UpstreamConnect { variant: Variant, detail: String },
    #[error("{}", .timeout.describe(*.variant, *.timeout_ms))]
    UpstreamTimeout {
        variant: Variant,
        timeout: Timeout,
        timeout_ms: u128,
    },
    #[error("the {variant} upstream closed the connection before answering: {detail}")]
    UpstreamReset { variant: Variant, detail: String },
    #[error("the {variant} upstream's answer broke off: {detail}")]
    UpstreamBrokeOff { variant: Variant, detail: String },
    #[error("{} at its limit of {limit} requests in flight; retry after {retry_after_seconds} s", shed_scope(*.variant))]
    Shed {
        /// The upstream whose cap was hit; none for the gateway's own.
        variant: Option<Variant>,
        limit: usize,
        retry_after_seconds: u32,
    },
    #[error("abgate is shutting down, and this request was still running when the {drain_timeout_ms} ms allowed for draining (server.drain_timeout_ms) ran out; retry it")]
    ShuttingDown {
        /// The arm the request was in, when it was assigned.
        variant: Option<Variant>,
        drain_timeout_ms: u128,
    },
    #[error("the request line and headers are {size} bytes; at most {limit} are accepted")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("the request body did not arrive within {timeout_ms} ms (timeouts.total_ms)")]
    RequestTimeout { timeout_ms: u128 },
    #[error("abgate does not forward {method} requests; API calls use {FORWARDED_METHODS}")]
    MethodNotForwarded { method: String },
    #[error("{0}")]
    InvalidFeedback(String),
    #[error("feedback for this request_id was already recorded; a request is reported once")]
    DuplicateFeedback,
    #[error("this request was served {age_seconds} s ago; feedback is accepted for {max_age_seconds} s after a request (feedback.max_age_seconds)")]
    FeedbackExpired {
        age_seconds: u64,
        max_age_seconds: u64,
    },
    #[error("this replica holds as many feedback reports as it can check for duplicates ({limit}); retry once older ones expire (feedback.max_age_seconds)")]
    FeedbackFull { limit: usize },
    #[error("{path} takes {allowed}")]
    MethodNotAllowed {
        path: &'static str,
        allowed: &'static str,
    },
    #[error("no gateway API key: send it as Authorization: Bearer <key> or x-api-key: <key>")]
    MissingApiKey,
    #[error("the API key is not one of the gateway's keys")]
    InvalidApiKey,
    #[error("x-abgate-force-variant is not allowed here: {reason}")]
    ForcedVariantRefused { reason: &'static str },
    #[error("x-abgate-force-variant must be control or treatment")]
    InvalidForcedVariant,
    #[error("internal error: {0}")]
    Internal(String),
}

/// Methods the gateway forwards, as an `Allow` header lists them.
pub(crate) const FORWARDED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS";

fn shed_scope(variant: Option<Variant>) -> String {
    match variant {
        Some(variant) => format!("the {variant} upstream is"),
        None => "abgate is".to_owned(),
    }
}

impl ProxyError {
    /// The status the client gets. Exhaustive: a new error must pick one.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::NotAnObject
            | ProxyError::WrongFieldType { .. }
            | ProxyError::MissingBody
            | ProxyError::ClientBody(_)
            | ProxyError::UserIdNotUtf8 { .. }
            | ProxyError::UserIdTooLong { .. }
            | ProxyError::UserIdRequired { .. }
            | ProxyError::InvalidForcedVariant
            | ProxyError::InvalidFeedback(_)
            | ProxyError::FeedbackExpired { .. }
            | ProxyError::InvalidPath { .. } => StatusCode::BAD_REQUEST,
            ProxyError::DuplicateFeedback => StatusCode::CONFLICT,
            ProxyError::FeedbackFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::MissingApiKey | ProxyError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ProxyError::ForcedVariantRefused { .. } => StatusCode::FORBIDDEN,
            ProxyError::MethodNotAllowed { .. } | ProxyError::MethodNotForwarded { .. } => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ProxyError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NotFound { .. } => StatusCode::NOT_FOUND,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamBrokeOff { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Shed { .. } | ProxyError::ShuttingDown { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable name: the JSON `code` and the metric label.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::NotAnObject => "not_an_object",
            ProxyError::WrongFieldType { .. } => "wrong_field_type",
            ProxyError::MissingBody => "missing_body",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body",
            ProxyError::UserIdNotUtf8 { .. } => "invalid_user_id",
            ProxyError::UserIdTooLong { .. } => "invalid_user_id",
            ProxyError::UserIdRequired { .. } => "missing_user_id",
            ProxyError::NotFound { .. } => "not_found",
            ProxyError::InvalidPath { .. } => "invalid_path",
            ProxyError::InvalidFeedback(_) => "invalid_feedback",
            ProxyError::DuplicateFeedback => "duplicate_feedback",
            ProxyError::FeedbackExpired { .. } => "feedback_expired",
            ProxyError::FeedbackFull { .. } => "feedback_full",
            ProxyError::MissingApiKey => "missing_api_key",
            ProxyError::InvalidApiKey => "invalid_api_key",
            ProxyError::ForcedVariantRefused { .. } => "forced_variant_refused",
            ProxyError::InvalidForcedVariant => "invalid_forced_variant",
            ProxyError::MethodNotAllowed { .. } | ProxyError::MethodNotForwarded { .. } => {
                "method_not_allowed"
            }
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamBrokeOff { .. }
            | ProxyError::Shed { .. }
            | ProxyError::ShuttingDown { .. } => match self.upstream_kind() {
                Some(kind) => kind.as_str(),
                None => "internal",
            },
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The variant whose upstream failed, for upstream errors.
    pub(crate) fn variant(&self) -> Option<Variant> {
        match self {
            ProxyError::UpstreamConnect { variant, .. }
            | ProxyError::UpstreamTimeout { variant, .. }
            | ProxyError::UpstreamReset { variant, .. }
            | ProxyError::UpstreamBrokeOff { variant, .. } => Some(*variant),
            ProxyError::Shed { variant, .. } | ProxyError::ShuttingDown { variant, .. } => *variant,
            _ => None,
        }
    }

    /// The upstream failure this error counts as, for the arm's metrics
    /// (the metric `kind`, and the JSON `code` of upstream errors).
    pub(crate) fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::UpstreamConnect { .. } => Some(UpstreamErrorKind::Connect),
            ProxyError::UpstreamTimeout { timeout, .. } => Some(timeout.kind()),
            ProxyError::UpstreamReset { .. } | ProxyError::UpstreamBrokeOff { .. } => {
                Some(UpstreamErrorKind::Reset)
            }
            ProxyError::Shed { .. } => Some(UpstreamErrorKind::Shed),
            ProxyError::ShuttingDown { .. } => Some(UpstreamErrorKind::Shutdown),
            _ => None,
        }
    }

    /// Whether the request was refused for its credentials (counted in
    /// `abgate_auth_failures_total` under its [`Self::kind`]).
    pub(crate) fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::MissingApiKey
                | ProxyError::InvalidApiKey
                | ProxyError::ForcedVariantRefused { .. }
        )
    }

    /// The error `type`, in OpenAI's and Anthropic's vocabulary (a wrong
    /// API key is OpenAI's `invalid_request_error` with code
    /// `invalid_api_key`).
    fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            status if status.is_client_error() => "invalid_request_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            StatusCode::BAD_GATEWAY => "upstream_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The field the client got wrong, when there is one.
    fn param(&self) -> Option<&str> {
        match self {
            ProxyError::WrongFieldType { field, .. } => Some(field),
            ProxyError::UserIdNotUtf8 { header } => Some(header),
            ProxyError::ForcedVariantRefused { .. } | ProxyError::InvalidForcedVariant => {
                Some("x-abgate-force-variant")
            }
            _ => None,
        }
    }

    /// The error as a JSON body both SDKs understand: OpenAI's
    /// `{"error": {message, type, param, code}}` plus Anthropic's top-level
    /// `"type": "error"`, with the variant named for upstream failures.
    pub(crate) fn to_json(&self) -> Bytes {
        let mut error = serde_json::json!({
            "message": self.to_string(),
            "type": self.error_type(),
            "param": self.param(),
            "code": self.kind(),
        });
        if let (Some(variant), Some(object)) = (self.variant(), error.as_object_mut()) {
            object.insert("variant".into(), variant.as_str().into());
        }
        let body = serde_json::json!({ "type": "error", "error": error });
        Bytes::from(body.to_string())
    }

    /// The error as the last event of an SSE stream that already started:
    /// `event: error` with the same JSON as [`Self::to_json`], which the
    /// OpenAI and Anthropic SDKs both raise as an API error.
    pub(crate) fn to_sse_event(&self) -> Bytes {
        let json = self.to_json();
        let mut event = Vec::with_capacity(json.len() + 22);
        event.extend_from_slice(b"event: error\ndata: ");
        event.extend_from_slice(&json);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    /// The response the client gets (the caller adds the abgate headers).
    pub(crate) fn to_response(&self) -> Response<Body> {
        let mut response = Response::new(Body::full(self.to_json()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ProxyError::Shed {
                retry_after_seconds,
                ..
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            ProxyError::MethodNotForwarded { .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
            }
            // A head this large is not a client's mistake to retry on the
            // same connection: closed after the answer, as nginx does.
            ProxyError::HeadersTooLarge { .. } => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_name_the_variant() {
        let err = ProxyError::UpstreamTimeout {
            variant: Variant::Treatment,
            timeout: Timeout::FirstByte,
            timeout_ms: 5,
        };
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        let json: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(json["error"]["variant"], "treatment");
        assert_eq!(json["error"]["code"], "first_byte_timeout");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("treatment"), "{message}");
        assert!(message.contains("timeouts.first_byte_ms"), "{message}");
    }

    #[test]
    fn each_timeout_is_its_own_kind_and_setting() {
        for (timeout, code) in [
            (Timeout::Connect, "connect_timeout"),
            (Timeout::FirstByte, "first_byte_timeout"),
            (Timeout::Idle, "idle_timeout"),
            (Timeout::Total, "total_timeout"),
        ] {
            let err = ProxyError::UpstreamTimeout {
                variant: Variant::Control,
                timeout,
                timeout_ms: 7,
            };
            assert_eq!(err.kind(), code);
            assert_eq!(
                err.upstream_kind().map(UpstreamErrorKind::as_str),
                Some(code)
            );
            assert!(err.to_string().contains(timeout.key()), "{err}");
        }
    }

    #[test]
    fn a_stream_error_is_one_sse_event_with_the_json_error() {
        let err = ProxyError::UpstreamTimeout {
            variant: Variant::Treatment,
            timeout: Timeout::Idle,
            timeout_ms: 300,
        };
        let event = err.to_sse_event();
        let text = std::str::from_utf8(&event).unwrap();
        let data = text
            .strip_prefix("event: error\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap();
        assert!(!data.contains('\n'), "one data line");
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["code"], "idle_timeout");
        assert_eq!(json["error"]["type"], "timeout_error");
    }

    #[test]
    fn shed_load_says_when_to_retry() {
        let err = ProxyError::Shed {
            variant: None,
            limit: 3,
            retry_after_seconds: 2,
        };
        let response = err.to_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(err.kind(), "shed");
    }
}
