//! `GET /healthz` and `GET /readyz` on the traffic port, answered by the
//! gateway itself (never forwarded, never counted): a load balancer that
//! sees only this port can tell a live gateway from a dead one, and a
//! draining one from a ready one, as on the admin port.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use super::body::Body;
use super::error::ProxyError;
use super::Gateway;

/// Liveness: 200 while the process serves.
pub(crate) const HEALTH_PATH: &str = "/healthz";
/// Readiness: 200, or 503 once a shutdown has begun.
pub(crate) const READY_PATH: &str = "/readyz";

/// Whether `path` is one of the gateway's own health paths.
pub(crate) fn is_health(path: &str) -> bool {
    path == HEALTH_PATH || path == READY_PATH
}

/// The answer to a health path.
pub(crate) fn answer(gateway: &Gateway, request: &Request<Body>) -> Response<Body> {
    let path = if request.uri().path() == HEALTH_PATH {
        HEALTH_PATH
    } else {
        READY_PATH
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return ProxyError::MethodNotAllowed {
            path,
            allowed: "GET",
        }
        .to_response();
    }
    let (status, body) = if path == READY_PATH && gateway.drain().is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
    } else if path == READY_PATH {
        (StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        (StatusCode::OK, r#"{"status":"ok"}"#)
    };
    let mut response = Response::new(if request.method() == Method::HEAD {
        Body::full(bytes::Bytes::new())
    } else {
        Body::full(body)
    });
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
