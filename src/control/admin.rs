//! The admin listener: health now; metrics and rollout control live here too.
//! It is a separate port so that it can be kept off the network clients use.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::control::supervisor::{PromoteError, Supervisor};
use crate::proxy::body::Body;
use crate::proxy::Gateway;

/// Answers admin requests about one gateway.
pub struct Admin {
    gateway: Arc<Gateway>,
    supervisor: Arc<Supervisor>,
}

impl Admin {
    /// An admin API for `gateway`, whose rollout `supervisor` runs.
    pub fn new(gateway: Arc<Gateway>, supervisor: Arc<Supervisor>) -> Self {
        Self {
            gateway,
            supervisor,
        }
    }

    fn answer(&self, request: &Request<Body>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (&Method::GET, "/readyz") if self.gateway.drain().is_draining() => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "draining"}),
            ),
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
            (&Method::GET, "/admin/report") => json(StatusCode::OK, self.supervisor.report()),
            // The config reveals the topology: the admin token is needed.
            (&Method::GET, "/admin/config") => match self.authorize(request.headers()) {
                Ok(()) => json(
                    StatusCode::OK,
                    crate::control::redact::config_view(&self.gateway.live().config),
                ),
                Err((status, message)) => error(status, &message),
            },
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/admin/stats" | "/admin/report"
                | "/admin/config",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            (_, "/admin/rollout") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET, or PUT to change it",
            ),
            (_, "/admin/rollback" | "/admin/promote" | "/admin/pause" | "/admin/resume") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
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
        for variant in crate::telemetry::metrics::VARIANTS {
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
    fn sample_ratio(&self) -> crate::experiment::srm::SampleRatio {
        let live = self.gateway.live();
        let result = live.epoch.counts.check(live.config.treatment_fraction);
        self.gateway
            .metrics()
            .set_sample_ratio(&live.config.experiment, &result);
        result
    }

    /// The running split and where it came from, for `GET /admin/rollout`.
    pub fn rollout(&self) -> serde_json::Value {
        let live = self.gateway.live();
        let runtime = self.gateway.runtime_override();
        let rollout = &live.config.config.rollout;
        let fraction = live.config.treatment_fraction;
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": fraction,
            "stage": rollout.stage_number(fraction),
            "stages": rollout.stages,
            "next_stage": rollout.next_stage(fraction),
            "config_fraction": live.file_fraction.0,
            "source": runtime.as_ref().map_or(live.file_fraction.1, |o| o.source.as_str()),
            "changed_at": runtime.as_ref().map_or_else(
                || crate::config::clock::format_rfc3339(live.epoch.since_wall),
                |o| o.at.clone(),
            ),
            "reason": runtime.as_ref().map(|o| o.reason.clone()),
            "paused": self.gateway.runtime().paused(),
            "pending": self.gateway.runtime().pending(),
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
    /// RFC 3339: apply at this instant rather than now.
    #[serde(default)]
    effective_at: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Promote {
    #[serde(default)]
    reason: String,
    /// Promote even though the stage is not ready (the reasons are audited).
    #[serde(default)]
    force: bool,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: String,
}

impl Admin {
    /// State changes: authorised by the bearer token, then applied.
    async fn change(&self, request: Request<Body>) -> Response<Body> {
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
            (Method::PUT, "/admin/rollout") => match parse::<SetRollout>(
                &body,
                r#"{"treatment_fraction": 0.25, "reason": "...", "effective_at": "2026-12-01T09:00:00Z"}"#,
            ) {
                Ok(set) => match self.set(set) {
                    Ok(result) => result,
                    Err(message) => return error(StatusCode::BAD_REQUEST, &message),
                },
                Err(response) => return *response,
            },
            (Method::POST, "/admin/rollback") => {
                match parse::<Reason>(&body, r#"{"reason": "..."}"#) {
                    Ok(reason) => {
                        // A rollback also cancels any change waiting for its time.
                        self.cancel_pending();
                        self.gateway.set_fraction(0.0, "api", &reason.reason)
                    }
                    Err(response) => return *response,
                }
            }
            (Method::POST, "/admin/promote") => {
                match parse::<Promote>(&body, r#"{"reason": "...", "force": false}"#) {
                    Ok(promote) => {
                        match self
                            .supervisor
                            .promote("api", &promote.reason, promote.force)
                        {
                            Ok((_, persisted)) => Ok(persisted),
                            Err(PromoteError::NotPersisted(err)) => Err(err),
                            Err(PromoteError::Blocked(blockers)) => {
                                return error_json(
                                    StatusCode::CONFLICT,
                                    &format!("not promoted: {}", blockers.join("; ")),
                                    "conflict",
                                    "promotion_blocked",
                                    Some(&blockers),
                                );
                            }
                        }
                    }
                    Err(response) => return *response,
                }
            }
            (Method::POST, action @ ("/admin/pause" | "/admin/resume")) => {
                match parse::<Reason>(&body, r#"{"reason": "..."}"#) {
                    Ok(reason) => {
                        let live = self.gateway.live();
                        let pause =
                            (action == "/admin/pause").then(|| crate::control::rollout::Pause {
                                source: "api".to_owned(),
                                reason: reason.reason.clone(),
                                at: crate::config::clock::now_rfc3339(),
                            });
                        self.gateway.runtime().set_paused(
                            pause,
                            &live.config.experiment,
                            live.config.treatment_fraction,
                            "api",
                            &reason.reason,
                        )
                    }
                    Err(response) => return *response,
                }
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
    /// in constant time. Without a configured token nothing may change,
    /// and the config cannot be read.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), (StatusCode, String)> {
        let live = self.gateway.live();
        let Some(expected) = &live.config.admin_token else {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "admin state changes and GET /admin/config are disabled: no token in {} (admin.token_env)",
                    live.config.config.admin.token_env
                ),
            ));
        };
        let offered = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        if expected.matches(offered.as_bytes()) {
            Ok(())
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".to_owned(),
            ))
        }
    }
}

impl Admin {
    /// `PUT /admin/rollout`: now, or at `effective_at`. The outer error is
    /// a bad request; the inner result is whether the change reached disk.
    fn set(&self, set: SetRollout) -> Result<Result<bool, String>, String> {
        let fraction = set.treatment_fraction;
        crate::experiment::assign::Fraction::new(fraction)
            .map_err(|why| format!("treatment_fraction {why}"))?;
        let runtime = self.gateway.runtime();
        let live = self.gateway.live();
        if let Some(text) = set.effective_at {
            let at = crate::config::clock::parse_rfc3339(&text)?;
            if at > std::time::SystemTime::now() {
                let pending = crate::control::rollout::PendingChange {
                    experiment: live.config.experiment.clone(),
                    treatment_fraction: fraction,
                    effective_at: text,
                    reason: set.reason,
                    requested_at: crate::config::clock::now_rfc3339(),
                };
                let persisted = runtime.set_pending(Some(pending), live.config.treatment_fraction);
                self.supervisor.notify();
                return Ok(persisted);
            }
        }
        self.cancel_pending();
        Ok(self.gateway.set_fraction(fraction, "api", &set.reason))
    }

    /// Drops a change waiting for its instant: a newer one replaces it.
    fn cancel_pending(&self) {
        let runtime = self.gateway.runtime();
        if runtime.pending().is_some() {
            let fraction = self.gateway.live().config.treatment_fraction;
            if let Err(err) = runtime.set_pending(None, fraction) {
                tracing::error!("{err}");
            }
        }
    }
}

/// Reads a JSON request body (empty means `{}`), or the 400 answer saying
/// what was expected.
fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, Box<Response<Body>>> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|err| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("expected {expected}: {err}"),
        ))
    })
}

impl abgate_http1::server::Handler for Admin {
    type Answer = Body;

    async fn handle(
        self: Arc<Self>,
        request: Request<abgate_http1::server::RequestBody>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let request = request.map(Body::from);
        match (request.method(), request.uri().path()) {
            (&Method::PUT, "/admin/rollout")
            | (
                &Method::POST,
                "/admin/rollback" | "/admin/promote" | "/admin/pause" | "/admin/resume",
            ) => self.change(request).await,
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

/// An admin error in the proxy's shape (OpenAI's `{"error": {...}}` with
/// Anthropic's top-level `"type": "error"`), its `code` a string.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "unauthorized"),
        StatusCode::FORBIDDEN => ("permission_error", "forbidden"),
        StatusCode::NOT_FOUND => ("not_found_error", "not_found"),
        StatusCode::METHOD_NOT_ALLOWED => ("invalid_request_error", "method_not_allowed"),
        status if status.is_client_error() => ("invalid_request_error", "invalid_request"),
        _ => ("api_error", "internal"),
    };
    error_json(status, message, kind, code, None)
}

fn error_json(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
    blocked_by: Option<&[String]>,
) -> Response<Body> {
    let mut body = serde_json::json!({
        "type": "error",
        "error": {"message": message, "type": kind, "param": null, "code": code},
    });
    if let (Some(blocked_by), Some(object)) = (blocked_by, body.as_object_mut()) {
        object.insert("blocked_by".into(), blocked_by.into());
    }
    json(status, body)
}
