//! Every way a proxied request can fail, and the one place that decides the
//! HTTP status, the metric label and the JSON body for each.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::assign::Variant;
use crate::body::Body;

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
    #[error("could not connect to the {variant} upstream: {detail}")]
    UpstreamConnect { variant: Variant, detail: String },
    #[error("the {variant} upstream did not answer within {timeout_ms} ms")]
    UpstreamTimeout { variant: Variant, timeout_ms: u128 },
    #[error("the {variant} upstream closed the connection before answering: {detail}")]
    UpstreamReset { variant: Variant, detail: String },
    #[error("{0}")]
    InvalidFeedback(String),
    #[error("{path} takes {allowed}")]
    MethodNotAllowed {
        path: &'static str,
        allowed: &'static str,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The status the client gets. Exhaustive: a new error must pick one.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::NotAnObject
            | ProxyError::WrongFieldType { .. }
            | ProxyError::MissingBody
            | ProxyError::ClientBody(_)
            | ProxyError::UserIdNotUtf8 { .. }
            | ProxyError::UserIdTooLong { .. }
            | ProxyError::UserIdRequired { .. }
            | ProxyError::InvalidFeedback(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NotFound { .. } => StatusCode::NOT_FOUND,
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamReset { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable name: the JSON `code` and the metric label.
    pub fn kind(&self) -> &'static str {
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
            ProxyError::InvalidFeedback(_) => "invalid_feedback",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::UpstreamConnect { .. } => "connect",
            ProxyError::UpstreamTimeout { .. } => "timeout",
            ProxyError::UpstreamReset { .. } => "reset",
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The variant whose upstream failed, for upstream errors.
    pub fn variant(&self) -> Option<Variant> {
        match self {
            ProxyError::UpstreamConnect { variant, .. }
            | ProxyError::UpstreamTimeout { variant, .. }
            | ProxyError::UpstreamReset { variant, .. } => Some(*variant),
            _ => None,
        }
    }

    /// The upstream failure this error counts as, for the arm's metrics.
    pub fn upstream_kind(&self) -> Option<crate::metrics::UpstreamErrorKind> {
        use crate::metrics::UpstreamErrorKind;
        match self {
            ProxyError::UpstreamConnect { .. } => Some(UpstreamErrorKind::Connect),
            ProxyError::UpstreamTimeout { .. } => Some(UpstreamErrorKind::Timeout),
            ProxyError::UpstreamReset { .. } => Some(UpstreamErrorKind::Reset),
            _ => None,
        }
    }

    /// The error `type`, in OpenAI's and Anthropic's vocabulary.
    fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            status if status.is_client_error() => "invalid_request_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            StatusCode::BAD_GATEWAY => "upstream_error",
            _ => "api_error",
        }
    }

    /// The field the client got wrong, when there is one.
    fn param(&self) -> Option<&str> {
        match self {
            ProxyError::WrongFieldType { field, .. } => Some(field),
            ProxyError::UserIdNotUtf8 { header } => Some(header),
            _ => None,
        }
    }

    /// The error as a JSON body both SDKs understand: OpenAI's
    /// `{"error": {message, type, param, code}}` plus Anthropic's top-level
    /// `"type": "error"`, with the variant named for upstream failures.
    pub fn to_json(&self) -> Bytes {
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

    /// The response the client gets (the caller adds the abgate headers).
    pub fn to_response(&self) -> Response<Body> {
        let mut response = Response::new(Body::full(self.to_json()));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
            timeout_ms: 5,
        };
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        let json: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(json["error"]["variant"], "treatment");
        assert_eq!(json["error"]["code"], "timeout");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("treatment"));
    }
}
