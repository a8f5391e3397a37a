//! The admin listener: health, metrics, the experiment's numbers, and the
//! rollout's control. A separate port, so that it can be kept off the
//! network clients use.
//!
//! Every route is a row of [`ROUTES`]: its method, its path, whether it
//! needs the admin token, and its action. Every failure is an
//! [`AdminError`], answered in the proxy's JSON shape with a string `code`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::config::rollout::ChangeSource;
use crate::control::live::{ChangeError, LiveConfig};
use crate::control::supervisor::{PromoteError, Supervisor};
use crate::proxy::body::Body;

/// Answers admin requests about one gateway.
pub(crate) struct Admin {
    control: Arc<LiveConfig>,
    supervisor: Arc<Supervisor>,
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Health,
    Ready,
    Metrics,
    Stats,
    Rollout,
    Report,
    Config,
    Set,
    Rollback,
    Promote,
    Pause,
    Resume,
}

/// One admin route.
struct Route {
    method: Method,
    path: &'static str,
    /// Needs `Authorization: Bearer <admin token>`: every change, and the
    /// config (which reveals the topology).
    guarded: bool,
    action: Action,
}

const fn route(method: Method, path: &'static str, guarded: bool, action: Action) -> Route {
    Route {
        method,
        path,
        guarded,
        action,
    }
}

/// Every admin route.
static ROUTES: [Route; 12] = [
    route(Method::GET, "/healthz", false, Action::Health),
    route(Method::GET, "/readyz", false, Action::Ready),
    route(Method::GET, "/metrics", false, Action::Metrics),
    route(Method::GET, "/admin/stats", false, Action::Stats),
    route(Method::GET, "/admin/rollout", false, Action::Rollout),
    route(Method::GET, "/admin/report", false, Action::Report),
    route(Method::GET, "/admin/config", true, Action::Config),
    route(Method::PUT, "/admin/rollout", true, Action::Set),
    route(Method::POST, "/admin/rollback", true, Action::Rollback),
    route(Method::POST, "/admin/promote", true, Action::Promote),
    route(Method::POST, "/admin/pause", true, Action::Pause),
    route(Method::POST, "/admin/resume", true, Action::Resume),
];

/// The route for `method` and `path`, or why there is none.
fn find(method: &Method, path: &str) -> Result<&'static Route, AdminError> {
    let mut allowed = ROUTES.iter().filter(|route| route.path == path).peekable();
    if allowed.peek().is_none() {
        return Err(AdminError::NotFound(path.to_owned()));
    }
    let mut methods = Vec::new();
    for route in allowed {
        if route.method == method {
            return Ok(route);
        }
        methods.push(route.method.as_str());
    }
    Err(AdminError::MethodNotAllowed(methods.join(" or ")))
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// No admin token is configured: nothing may change.
    #[error(
        "admin state changes and GET /admin/config are disabled: no token in {0} (admin.token_env)"
    )]
    Disabled(String),
    #[error("no admin route for {0}")]
    NotFound(String),
    #[error("use {0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("not promoted: {}", .0.join("; "))]
    PromotionBlocked(Vec<String>),
    /// The change is in force but did not reach the state file.
    #[error("applied but not persisted: {0}")]
    NotPersisted(String),
    /// The fleet's state store could not be reached: nothing changed.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Another change reached the fleet's store first.
    #[error("{0}")]
    StateConflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ChangeError> for AdminError {
    fn from(error: ChangeError) -> Self {
        match error {
            ChangeError::InvalidFraction(_) => AdminError::InvalidRequest(error.to_string()),
            ChangeError::NotPersisted(why) => AdminError::NotPersisted(why.to_string()),
            ChangeError::Client(_) | ChangeError::Poisoned => {
                AdminError::Internal(error.to_string())
            }
            ChangeError::StoreUnavailable(_) => AdminError::StoreUnavailable(error.to_string()),
            ChangeError::Conflict { .. } => AdminError::StateConflict(error.to_string()),
        }
    }
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Disabled(_) => StatusCode::FORBIDDEN,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::PromotionBlocked(_) | AdminError::StateConflict(_) => StatusCode::CONFLICT,
            AdminError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::NotPersisted(_) | AdminError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The error's `type` and string `code`, as the proxy's errors have.
    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            AdminError::Unauthorized => ("authentication_error", "unauthorized"),
            AdminError::Disabled(_) => ("permission_error", "forbidden"),
            AdminError::NotFound(_) => ("not_found_error", "not_found"),
            AdminError::MethodNotAllowed(_) => ("invalid_request_error", "method_not_allowed"),
            AdminError::InvalidRequest(_) => ("invalid_request_error", "invalid_request"),
            AdminError::PromotionBlocked(_) => ("conflict", "promotion_blocked"),
            AdminError::NotPersisted(_) => ("api_error", "not_persisted"),
            AdminError::StoreUnavailable(_) => ("api_error", "state_store_unavailable"),
            AdminError::StateConflict(_) => ("conflict", "state_conflict"),
            AdminError::Internal(_) => ("api_error", "internal"),
        }
    }

    /// The answer: OpenAI's `{"error": {...}}` with Anthropic's top-level
    /// `"type": "error"`, and what blocks a promotion.
    fn to_response(&self) -> Response<Body> {
        let (kind, code) = self.kind_and_code();
        let mut body = serde_json::json!({
            "type": "error",
            "error": {"message": self.to_string(), "type": kind, "param": null, "code": code},
        });
        if let (AdminError::PromotionBlocked(blocked_by), Some(object)) =
            (self, body.as_object_mut())
        {
            object.insert("blocked_by".into(), blocked_by.clone().into());
        }
        json(self.status(), body)
    }
}

impl Admin {
    /// An admin API for the gateway `control` changes, whose rollout
    /// `supervisor` runs.
    pub(crate) fn new(control: Arc<LiveConfig>, supervisor: Arc<Supervisor>) -> Self {
        Self {
            control,
            supervisor,
        }
    }

    async fn answer(&self, request: Request<Body>) -> Result<Response<Body>, AdminError> {
        let route = find(request.method(), request.uri().path())?;
        if route.guarded {
            self.authorize(request.headers())?;
        }
        let action = route.action;
        let read = match action {
            Action::Health => serde_json::json!({"status": "ok"}),
            Action::Ready if self.control.gateway().drain().is_draining() => {
                return Ok(json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "draining"}),
                ))
            }
            Action::Ready => {
                let live = self.control.live();
                serde_json::json!({
                    "status": "ready",
                    "experiment": live.config.experiment,
                    "treatment_fraction": live.config.treatment_fraction,
                })
            }
            Action::Metrics => {
                let text = self
                    .encode_metrics()
                    .map_err(|err| AdminError::Internal(format!("metrics: {err}")))?;
                let mut response = Response::new(Body::full(text));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return Ok(response);
            }
            Action::Stats => self.stats(),
            Action::Rollout => self.rollout(),
            Action::Report => self.supervisor.report(),
            Action::Config => crate::control::redact::config_view(&self.control.live().config),
            Action::Set | Action::Rollback | Action::Promote | Action::Pause | Action::Resume => {
                let body = read_body(request).await?;
                let expected = serde_json::from_slice::<Expected>(&body)
                    .ok()
                    .and_then(|expected| expected.expected_version);
                let persisted = self
                    .control
                    .transact(expected, || self.change(action, &body))
                    .await?;
                let mut state = self.rollout();
                if let Some(object) = state.as_object_mut() {
                    object.insert("persisted".into(), persisted.into());
                }
                state
            }
        };
        Ok(json(StatusCode::OK, read))
    }

    /// A state change; whether it reached disk.
    fn change(&self, action: Action, body: &[u8]) -> Result<bool, AdminError> {
        match action {
            Action::Set => self.set(parse(
                body,
                r#"{"treatment_fraction": 0.25, "reason": "...", "effective_at": "2026-12-01T09:00:00Z"}"#,
            )?),
            Action::Rollback => {
                let reason: Reason = parse(body, r#"{"reason": "..."}"#)?;
                // A rollback also cancels any change waiting for its time.
                self.cancel_pending();
                Ok(self
                    .control
                    .set_fraction(0.0, ChangeSource::Api, &reason.reason)?)
            }
            Action::Promote => {
                let promote: Promote = parse(body, r#"{"reason": "...", "force": false}"#)?;
                match self
                    .supervisor
                    .promote(ChangeSource::Api, &promote.reason, promote.force)
                {
                    Ok((_, persisted)) => Ok(persisted),
                    Err(PromoteError::Change(err)) => Err(err.into()),
                    Err(PromoteError::Blocked(blockers)) => {
                        Err(AdminError::PromotionBlocked(blockers))
                    }
                }
            }
            Action::Pause => {
                let reason: Reason = parse(body, r#"{"reason": "..."}"#)?;
                let live = self.control.live();
                let pause = crate::control::rollout::Pause {
                    source: ChangeSource::Api,
                    reason: reason.reason.clone(),
                    at: crate::config::clock::now_rfc3339(),
                };
                self.control
                    .runtime()
                    .set_paused(
                        Some(pause),
                        &live.config.experiment,
                        live.config.treatment_fraction,
                        ChangeSource::Api,
                        &reason.reason,
                    )
                    .map_err(|err| AdminError::NotPersisted(err.to_string()))
            }
            Action::Resume => {
                let reason: Reason = parse(body, r#"{"reason": "..."}"#)?;
                Ok(self.control.resume(&reason.reason)?)
            }
            Action::Health
            | Action::Ready
            | Action::Metrics
            | Action::Stats
            | Action::Rollout
            | Action::Report
            | Action::Config => Err(AdminError::Internal(format!("{action:?} changes nothing"))),
        }
    }

    /// Checks `Authorization: Bearer <token>` against the configured token
    /// in constant time. Without a configured token nothing may change,
    /// and the config cannot be read.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), AdminError> {
        let live = self.control.live();
        let Some(expected) = &live.config.admin_token else {
            return Err(AdminError::Disabled(live.config.admin_token_env.clone()));
        };
        let offered = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        if expected.matches(offered.as_bytes()) {
            Ok(())
        } else {
            Err(AdminError::Unauthorized)
        }
    }

    /// `PUT /admin/rollout`: now, or at `effective_at`; whether it reached
    /// disk.
    fn set(&self, set: SetRollout) -> Result<bool, AdminError> {
        let fraction = set.treatment_fraction;
        crate::experiment::assign::Fraction::new(fraction)
            .map_err(|why| AdminError::InvalidRequest(format!("treatment_fraction {why}")))?;
        let runtime = self.control.runtime();
        let live = self.control.live();
        if let Some(text) = set.effective_at {
            let at =
                crate::config::clock::parse_rfc3339(&text).map_err(AdminError::InvalidRequest)?;
            if at > std::time::SystemTime::now() {
                let pending = crate::control::rollout::PendingChange {
                    experiment: live.config.experiment.clone(),
                    treatment_fraction: fraction,
                    effective_at: text,
                    reason: set.reason,
                    requested_at: crate::config::clock::now_rfc3339(),
                };
                let persisted = runtime
                    .set_pending(Some(pending), live.config.treatment_fraction)
                    .map_err(|err| AdminError::NotPersisted(err.to_string()));
                self.supervisor.notify();
                return persisted;
            }
        }
        self.cancel_pending();
        Ok(self
            .control
            .set_fraction(fraction, ChangeSource::Api, &set.reason)?)
    }

    /// Drops a change waiting for its instant: a newer one replaces it.
    fn cancel_pending(&self) {
        let runtime = self.control.runtime();
        if runtime.pending().is_some() {
            let fraction = self.control.live().config.treatment_fraction;
            if let Err(err) = runtime.set_pending(None, fraction) {
                tracing::error!("{err}");
            }
        }
    }
}

impl Admin {
    /// Per-variant numbers since start, for `GET /admin/stats`.
    pub(crate) fn stats(&self) -> serde_json::Value {
        let live = self.control.live();
        let mut variants = serde_json::Map::new();
        let outcomes = &live.config.feedback.outcomes;
        for variant in crate::telemetry::metrics::VARIANTS {
            let mut stats = serde_json::to_value(live.metrics.arm_stats(variant))
                .unwrap_or(serde_json::Value::Null);
            let feedback =
                self.control
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
        // The current stage beside the lifetime numbers above: what the
        // guard compares, read from per-arm sketches kept since the split
        // last changed.
        let stage_arm = |variant| {
            live.epoch
                .arm(variant)
                .map(|arm| serde_json::to_value(arm.summary()).unwrap_or_default())
        };
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": live.config.treatment_fraction,
            "sample_ratio": self.sample_ratio(),
            "variants": variants,
            "stage": {
                "since": crate::config::clock::format_rfc3339(live.epoch.since_wall),
                "age_seconds": live.epoch.age_seconds(),
                "control": stage_arm(crate::experiment::assign::Variant::Control),
                "treatment": stage_arm(crate::experiment::assign::Variant::Treatment),
            },
        })
    }
}

impl Admin {
    /// The registry as Prometheus text, with the sample ratio test fresh.
    fn encode_metrics(&self) -> Result<Vec<u8>, prometheus::Error> {
        self.sample_ratio();
        self.control.metrics().encode()
    }

    /// Tests the arms' counts against the split and publishes the result.
    fn sample_ratio(&self) -> crate::experiment::srm::SampleRatio {
        let live = self.control.live();
        let result = live.epoch.counts.check(live.config.treatment_fraction);
        self.control
            .metrics()
            .set_sample_ratio(&live.config.experiment, &result);
        result
    }

    /// The running split and where it came from, for `GET /admin/rollout`.
    pub(crate) fn rollout(&self) -> serde_json::Value {
        let live = self.control.live();
        let runtime = self.control.runtime_override();
        let held = self.control.runtime().latched();
        let rollout = &live.config.rollout;
        let fraction = live.config.treatment_fraction;
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": fraction,
            "stage": rollout.stage_number(fraction),
            "stages": rollout.stages,
            "next_stage": rollout.next_stage(fraction),
            "config_fraction": live.file_fraction.0,
            "source": runtime.as_ref().map_or(live.file_fraction.1, |o| o.source),
            "changed_at": runtime.as_ref().map_or_else(
                || crate::config::clock::format_rfc3339(live.epoch.since_wall),
                |o| o.at.clone(),
            ),
            "reason": runtime.as_ref().map(|o| o.reason.clone()),
            // After a guardrail trip the split holds until a resume; a
            // fraction the file came to say meanwhile waits.
            "held_by_guardrail": held,
            "file_fraction_pending": runtime
                .as_ref()
                .filter(|o| held && o.config_fraction != live.file_fraction.0)
                .map(|_| live.file_fraction.0),
            "paused": self.control.runtime().paused(),
            "pending": self.control.runtime().pending(),
            "config": self.control.config_status(),
            // With [state]: where the fleet's state lives, whether it
            // answers, and the version in force here.
            "state_store": self.control.store_status(),
        })
    }
}

/// The version of the fleet's state a change was made against, if the
/// caller names one (`"expected_version": N`): refused with a 409 if the
/// store has moved on.
#[derive(serde::Deserialize)]
struct Expected {
    #[serde(default)]
    expected_version: Option<u64>,
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
    /// Read by [`Expected`].
    #[serde(default, rename = "expected_version")]
    _expected_version: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Promote {
    #[serde(default)]
    reason: String,
    /// Promote even though the stage is not ready (the reasons are audited).
    #[serde(default)]
    force: bool,
    /// Read by [`Expected`].
    #[serde(default, rename = "expected_version")]
    _expected_version: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: String,
    /// Read by [`Expected`].
    #[serde(default, rename = "expected_version")]
    _expected_version: Option<serde::de::IgnoredAny>,
}

/// Reads a change's body, up to [`MAX_ADMIN_BODY`].
async fn read_body(request: Request<Body>) -> Result<bytes::Bytes, AdminError> {
    http_body_util::Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|err| AdminError::InvalidRequest(format!("cannot read the body: {err}")))
}

/// Reads a JSON request body (empty means `{}`), or says what was expected.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, AdminError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|err| AdminError::InvalidRequest(format!("expected {expected}: {err}")))
}

impl abgate_http1::server::Handler for Admin {
    type Answer = Body;

    async fn handle(
        self: Arc<Self>,
        request: Request<abgate_http1::server::RequestBody>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        self.answer(request.map(Body::from))
            .await
            .unwrap_or_else(|err| err.to_response())
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
