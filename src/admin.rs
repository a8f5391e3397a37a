//! The admin listener: health now; metrics and rollout control live here too.
//! It is a separate port so that it can be kept off the network clients use.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::proxy::Gateway;

/// Answers admin requests about one gateway.
pub struct Admin {
    gateway: Arc<Gateway>,
}

impl Admin {
    /// An admin API for `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    fn answer(&self, request: &Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let config = self.gateway.snapshot();
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "status": "ready",
                        "experiment": config.experiment,
                        "treatment_fraction": config.treatment_fraction,
                    }),
                )
            }
            (_, "/healthz" | "/readyz") => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            (_, path) => error(StatusCode::NOT_FOUND, &format!("no admin route for {path}")),
        }
    }
}

impl crate::server::Handler for Admin {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
        let response = self.answer(&request);
        async move { response }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": status.as_u16()}}),
    )
}
