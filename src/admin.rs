//! The admin listener: health now; metrics and rollout control live here too.
//! It is a separate port so that it can be kept off the network clients use.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
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
            (&Method::GET, "/metrics") => match self.encode_metrics() {
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
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/admin/stats" | "/admin/rollout"
                | "/admin/rollback",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
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
            "sample_ratio": self.sample_ratio(),
            "variants": variants,
        })
    }
}

impl Admin {
    /// The registry as Prometheus text, with the sample ratio test fresh.
    fn encode_metrics(&self) -> Result<Vec<u8>, prometheus::Error> {
        self.sample_ratio();
        self.gateway.metrics().encode()
    }

    /// Tests the arms' counts against the split and publishes the result.
    fn sample_ratio(&self) -> crate::srm::SampleRatio {
        let live = self.gateway.live();
        let result = live.arm_counts.check(live.config.treatment_fraction);
        self.gateway
            .metrics()
            .set_sample_ratio(&live.config.experiment, &result);
        result
    }

    /// The running split and where it came from, for `GET /admin/rollout`.
    pub fn rollout(&self) -> serde_json::Value {
        let live = self.gateway.live();
        let runtime = self.gateway.runtime_override();
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": live.config.treatment_fraction,
            "config_fraction": live.config.config.experiment.treatment_fraction,
            "source": runtime.as_ref().map_or("config", |o| o.source.as_str()),
            "changed_at": runtime.as_ref().map(|o| o.at.clone()),
            "reason": runtime.as_ref().map(|o| o.reason.clone()),
            "config": self.gateway.config_status(),
        })
    }
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRollout {
    treatment_fraction: f64,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: String,
}

impl Admin {
    /// State changes: authorised by the bearer token, then applied.
    async fn change(&self, request: Request<Incoming>) -> Response<Body> {
        if let Err((status, message)) = self.authorize(request.headers()) {
            return error(status, &message);
        }
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let body = match http_body_util::Limited::new(request.into_body(), MAX_ADMIN_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(err) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the body: {err}"),
                )
            }
        };
        let result = match (method, path.as_str()) {
            (Method::PUT, "/admin/rollout") => match serde_json::from_slice::<SetRollout>(&body) {
                Ok(set) if !(0.0..=1.0).contains(&set.treatment_fraction) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "treatment_fraction {} must be from 0.0 to 1.0",
                            set.treatment_fraction
                        ),
                    )
                }
                Ok(set) => self
                    .gateway
                    .set_fraction(set.treatment_fraction, "api", &set.reason),
                Err(err) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "expected {{\"treatment_fraction\": 0.25, \"reason\": \"...\"}}: {err}"
                        ),
                    )
                }
            },
            (Method::POST, "/admin/rollback") => {
                let reason = if body.iter().all(u8::is_ascii_whitespace) {
                    Reason::default()
                } else {
                    match serde_json::from_slice::<Reason>(&body) {
                        Ok(reason) => reason,
                        Err(err) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                &format!("expected {{\"reason\": \"...\"}}: {err}"),
                            )
                        }
                    }
                };
                self.gateway.set_fraction(0.0, "api", &reason.reason)
            }
            (_, path) => {
                return error(StatusCode::NOT_FOUND, &format!("no admin route for {path}"))
            }
        };
        match result {
            Ok(persisted) => {
                let mut state = self.rollout();
                if let Some(object) = state.as_object_mut() {
                    object.insert("persisted".into(), persisted.into());
                }
                json(StatusCode::OK, state)
            }
            // Applied, but not written down: say so loudly.
            Err(err) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("applied but not persisted: {err}"),
            ),
        }
    }

    /// Checks `Authorization: Bearer <token>` against the configured token
    /// in constant time. Without a configured token nothing may change.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), (StatusCode, String)> {
        let live = self.gateway.live();
        let Some(expected) = &live.config.admin_token else {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "admin state changes are disabled: no token in {} (admin.token_env)",
                    live.config.config.admin.token_env
                ),
            ));
        };
        let offered = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(offered.as_bytes(), expected.0.as_bytes()) {
            Ok(())
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".to_owned(),
            ))
        }
    }
}

/// Compares digests, so neither the content nor the length of the token
/// shows in how long a wrong guess takes.
fn constant_time_eq(offered: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (
        sha2::Sha256::digest(offered),
        sha2::Sha256::digest(expected),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl crate::server::Handler for Admin {
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::PUT, "/admin/rollout") | (&Method::POST, "/admin/rollback") => {
                self.change(request).await
            }
            _ => self.answer(&request),
        }
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
