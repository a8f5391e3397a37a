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
                let live = self.gateway.live();
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "status": "ready",
                        "experiment": live.config.experiment,
                        "treatment_fraction": live.config.treatment_fraction,
                    }),
                )
            }
            (&Method::GET, "/metrics") => match self.gateway.metrics().encode() {
                Ok(text) => {
                    let mut response = Response::new(Body::full(text));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                Err(err) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("metrics: {err}"),
                ),
            },
            (&Method::GET, "/admin/stats") => json(StatusCode::OK, self.stats()),
            (&Method::GET, "/admin/rollout") => json(StatusCode::OK, self.rollout()),
            (_, "/healthz" | "/readyz" | "/metrics" | "/admin/stats" | "/admin/rollout") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
            }
            (_, path) => error(StatusCode::NOT_FOUND, &format!("no admin route for {path}")),
        }
    }
}

impl Admin {
    /// Per-variant numbers since start, for `GET /admin/stats`.
    pub fn stats(&self) -> serde_json::Value {
        let live = self.gateway.live();
        let mut variants = serde_json::Map::new();
        let outcomes = &live.config.config.feedback.outcomes;
        for variant in crate::metrics::VARIANTS {
            let mut stats = serde_json::to_value(live.metrics.arm_stats(variant))
                .unwrap_or(serde_json::Value::Null);
            let feedback =
                self.gateway
                    .metrics()
                    .feedback_stats(&live.config.experiment, variant, outcomes);
            if let Some(object) = stats.as_object_mut() {
                object.insert(
                    "feedback".into(),
                    serde_json::to_value(feedback).unwrap_or(serde_json::Value::Null),
                );
            }
            variants.insert(variant.as_str().to_owned(), stats);
        }
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": live.config.treatment_fraction,
            "variants": variants,
        })
    }
}

impl Admin {
    /// The running split and where it came from, for `GET /admin/rollout`.
    pub fn rollout(&self) -> serde_json::Value {
        let live = self.gateway.live();
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": live.config.treatment_fraction,
            "source": "config",
            "config": self.gateway.config_status(),
        })
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
