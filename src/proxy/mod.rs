//! The data path: one request in, one variant chosen, one upstream call out,
//! the answer streamed back.
//!
//! Phases, in order (each a function below):
//! 1. **route**: only `/v1/...` is proxied; anything else is a 404. Methods
//!    no API uses (TRACE, CONNECT, …) get a 405, oversized headers a 431.
//! 2. **authenticate**: with `[auth]`, no gateway key is a 401; a forced
//!    arm without leave (`[qa] override` and the admin token) is a 403
//!    (see `access`).
//! 3. **admit**: past `limits.max_inflight` requests in flight, a 503 with
//!    `Retry-After`, before anything is read.
//! 4. **read**: JSON bodies are read whole (up to `max_body_bytes`, within
//!    `timeouts.total_ms`) because `model` is rewritten and the user ID may
//!    be in them; other bodies (multipart uploads) stream through untouched.
//! 5. **assign**: the user ID picks the variant; none means `unassigned`,
//!    served by control; a forced arm replaces the hashed one and is
//!    counted apart. Past `limits.max_inflight_per_variant` requests to
//!    that upstream, a 503 naming the variant.
//! 6. **rewrite**: `model` spliced in, host and credentials set; the
//!    client's credentials dropped when the upstream gets the gateway's
//!    own or they held a gateway key; every `x-abgate-*` header dropped.
//! 7. **forward**: sent on a kept-alive upstream connection (`client`, and
//!    `abgate_http1::client` for plain HTTP), waiting for the headers
//!    (`timeouts.first_byte_ms`, within `timeouts.total_ms`); the response
//!    body is the upstream's own stream, so SSE chunks reach the client as
//!    they arrive, watched by the idle and total deadlines.
//! 8. **answer**: `x-abgate-*` headers added; errors become JSON answers here
//!    and only here. A request whose client leaves before the answer starts
//!    is recorded as `client_cancelled` when its future is dropped, which
//!    also drops the upstream call.

pub mod access;
pub mod admission;
pub mod answer_fields;
pub mod body;
pub mod client;
pub mod deadline;
pub mod drain;
pub mod error;
pub mod fallback;
pub mod feedback;
pub mod headers;
pub mod identity;
pub mod json;
pub mod json_scan;
pub mod observe;
pub mod path;
pub mod usage_json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::uri::{self, PathAndQuery, Uri};
use http::{Method, Request, Response, Version};
use http_body_util::{BodyExt, Limited};

use crate::config::{Snapshot, Upstream};
use crate::experiment::assign::{self, Variant};
use crate::experiment::request_id::RequestIds;
use crate::proxy::body::Body;
use crate::telemetry::events::EventSink;
use crate::telemetry::metrics::{ExperimentMetrics, InflightGuard, Metrics, UpstreamErrorKind};
use crate::telemetry::route::Route;
use crate::telemetry::stage::SplitEpoch;
use admission::{Inflight, Places};
use client::HttpClient;
use deadline::Deadlines;
use error::{ProxyError, Timeout};
use identity::IdentityRules;
use json::BodyFields;
use observe::{EventDraft, Observation, ObservedBody, UsageFormat};

/// Response header naming the arm that served the request.
pub const VARIANT_HEADER: HeaderName = HeaderName::from_static("x-abgate-variant");
/// Response header naming the model sent upstream.
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-abgate-model");
/// Response header carrying the gateway's request id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-abgate-request-id");
/// Response header naming the experiment.
pub const EXPERIMENT_HEADER: HeaderName = HeaderName::from_static("x-abgate-experiment");
/// Response header present (`true`) when treatment's upstream failed and
/// control's answer is served instead.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-abgate-fallback");
/// Response header naming the arm whose upstream answered, on fallbacks.
pub const SERVED_BY_HEADER: HeaderName = HeaderName::from_static("x-abgate-served-by");

/// The proxy: the current config with its metric children, the registry,
/// and the upstream connection pool.
pub struct Gateway {
    live: ArcSwap<Live>,
    metrics: Arc<Metrics>,
    events: Option<EventSink>,
    /// Requests in flight, against the `[limits]` caps.
    inflight: Arc<Inflight>,
    /// Shutdown: not ready, then cut.
    drain: crate::proxy::drain::Drain,
}

/// A config and what is derived from it, swapped as one.
pub struct Live {
    pub config: Snapshot,
    /// Metric children bound to this config's experiment.
    pub metrics: Arc<ExperimentMetrics>,
    /// Signs and verifies request ids.
    pub request_ids: RequestIds,
    /// The upstream pool; kept across reloads that leave transport settings alone.
    pub(crate) client: HttpClient,
    /// The current split since it began: stage age, per-arm counts, and
    /// the guardrails' baseline.
    pub epoch: Arc<SplitEpoch>,
    /// What the config file says now (its fraction, or a scheduled entry's)
    /// and which of the two (`config` or `schedule`).
    pub file_fraction: (f64, crate::config::rollout::ChangeSource),
}

/// What the gateway decided about a request, for headers and metrics.
struct Decision {
    variant: Option<Variant>,
    model: Option<HeaderValue>,
    route: Route,
    stream: bool,
    inflight: Option<InflightGuard>,
    /// Time spent waiting for the upstream's response headers.
    upstream_wait: Duration,
    /// When the (last) upstream's response headers arrived.
    headers_at: Option<Instant>,
    /// The user ID as events carry it (only when events are on).
    event_user_id: Option<String>,
    /// Places taken under the in-flight caps.
    places: Places,
    /// Served by control after treatment's upstream failed; the failure is
    /// already recorded as treatment's.
    fallback: bool,
    /// The request id, when it was issued before the answer (fallbacks).
    request_id: Option<String>,
    /// The arm was forced (`x-abgate-force-variant`), not hashed.
    forced: bool,
}

impl Decision {
    /// The arm a request id names. A forced request's id says
    /// `unassigned`, so feedback quoting it stays out of both arms.
    fn id_variant(&self) -> Variant {
        match self.variant {
            Some(variant) if !self.forced => variant,
            _ => Variant::Unassigned,
        }
    }
}

impl Default for Decision {
    fn default() -> Self {
        Self {
            variant: None,
            model: None,
            route: Route::Other,
            stream: false,
            inflight: None,
            upstream_wait: Duration::ZERO,
            headers_at: None,
            event_user_id: None,
            places: Places::default(),
            fallback: false,
            request_id: None,
            forced: false,
        }
    }
}

/// nginx's status for a request whose client closed the connection before
/// the answer: what such requests are recorded with.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A request on its way to an answer. Dropped before it is answered, the
/// client went away: the request is recorded as `client_cancelled`.
struct Unanswered<'a> {
    gateway: &'a Gateway,
    live: &'a Arc<Live>,
    started: Instant,
    decision: Decision,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut decision = std::mem::take(&mut self.decision);
        let request_id = self
            .live
            .request_ids
            .issue(decision.id_variant(), &self.live.config.experiment);
        tracing::debug!(variant = ?decision.variant, "the client left before the answer");
        ObservedBody::record_unanswered(self.gateway.observation(
            self.live,
            &mut decision,
            CLIENT_CLOSED_REQUEST,
            Some(UpstreamErrorKind::ClientCancelled),
            self.started,
            &request_id,
        ));
    }
}

impl Gateway {
    /// A gateway serving `first`, recording into `metrics`. The config
    /// changes from above: the control plane builds each next [`Live`]
    /// and swaps it in ([`Gateway::swap`]).
    pub(crate) fn new(first: Live, metrics: Arc<Metrics>) -> Result<Self, String> {
        let events = match &first.config.config.events {
            Some(config) => Some(
                EventSink::start(
                    config,
                    first
                        .config
                        .events_user_id_key
                        .as_ref()
                        .map(|key| key.0.as_slice()),
                    metrics.clone(),
                )
                .map_err(|err| format!("events.path {:?}: {err}", config.path))?,
            ),
            None => None,
        };
        Ok(Self {
            live: ArcSwap::from_pointee(first),
            metrics,
            events,
            inflight: Arc::default(),
            drain: crate::proxy::drain::Drain::default(),
        })
    }

    /// Serves `live` to requests that start from now on.
    pub(crate) fn swap(&self, live: Live) {
        self.live.store(Arc::new(live));
    }

    /// The config (and metric children) requests start on now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The process's metric registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Its shutdown state: draining (not ready), then cut.
    pub fn drain(&self) -> &crate::proxy::drain::Drain {
        &self.drain
    }

    /// Proxies one request. Every failure becomes a JSON error answer.
    pub async fn proxy(&self, request: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        // One config per request, start to finish, whatever swaps meanwhile.
        let live = self.live.load_full();
        if request.uri().path() == feedback::PATH {
            // Boxed, like `fall_back`: a rare path kept out of the
            // request's future, which is moved by value.
            return Box::pin(self.feedback(&live, request)).await;
        }
        let config = &live.config;
        let mut pending = Unanswered {
            gateway: self,
            live: &live,
            started,
            decision: Decision::default(),
            answered: false,
        };
        // A shutdown's cut ends a request still waiting for its answer.
        let forwarded = tokio::select! {
            // In order, not at random: an answer that is ready is taken
            // even as the cut comes, and no random draw per poll.
            biased;
            result = self.forward(&live, request, &mut pending.decision, started) => Some(result),
            () = self.drain.cut_called() => None,
        };
        let result = forwarded.unwrap_or_else(|| {
            Err(ProxyError::ShuttingDown {
                variant: pending.decision.variant,
                drain_timeout_ms: config.drain_timeout.as_millis(),
            })
        });
        pending.answered = true;
        let mut decision = std::mem::take(&mut pending.decision);
        let (response, error, deadlines) = match result {
            Ok(response) => {
                // The headers are here; from now on the body is watched.
                let headers_at = decision.headers_at.unwrap_or_else(Instant::now);
                let deadlines = Deadlines::new(
                    config.idle_timeout,
                    config.total_timeout,
                    started.into(),
                    headers_at.into(),
                );
                (response, None, Some(deadlines))
            }
            Err(err) => {
                if err.is_auth_failure() {
                    self.metrics.auth_failed(err.kind());
                }
                if err.status().is_server_error() {
                    tracing::warn!(kind = err.kind(), variant = ?decision.variant, "{err}");
                } else {
                    tracing::debug!(kind = err.kind(), "{err}");
                }
                (err.to_response(), err.upstream_kind(), None)
            }
        };
        let status = response.status().as_u16();
        let (usage_format, error_event) = answer_content(&response);
        let request_id = decision.request_id.take().unwrap_or_else(|| {
            live.request_ids
                .issue(decision.id_variant(), &config.experiment)
        });
        // The upstream's own error answers count against its arm.
        let error = error.or_else(|| decision.variant.and(UpstreamErrorKind::from_status(status)));
        let cut = deadlines
            .is_some()
            .then(|| (self.drain.signal(), config.drain_timeout));
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
            ..self.observation(&live, &mut decision, status, error, started, &request_id)
        };
        let fields = answer_fields::GatewayFields {
            forced: decision.forced,
            variant: decision.variant,
            fallback: decision.fallback,
            model: decision.model.take(),
            experiment: Some(config.experiment_header.clone()),
            // The id's own bytes become the value, not a copy of them.
            request_id: HeaderValue::from_maybe_shared(Bytes::from(request_id)).ok(),
        };
        response.map(|body| Body::Observed(Box::new(ObservedBody::new(body, observation, fields))))
    }

    /// What is known about a request when its answer starts (or when it
    /// ends without one); the caller adds what the answer adds.
    fn observation(
        &self,
        live: &Arc<Live>,
        decision: &mut Decision,
        status: u16,
        error: Option<UpstreamErrorKind>,
        started: Instant,
        request_id: &str,
    ) -> Observation {
        let config = &live.config;
        let event = self.events.as_ref().map(|sink| {
            let draft = EventDraft {
                request_id: request_id.to_owned(),
                experiment: config.experiment.clone(),
                model: decision
                    .model
                    .as_ref()
                    .and_then(|m| m.to_str().ok())
                    .map(str::to_owned),
                user_id: decision.event_user_id.take(),
                forced: decision.forced,
            };
            (sink.clone(), draft)
        });
        Observation {
            metrics: live.metrics.clone(),
            // Requests refused before assignment belong to neither arm.
            variant: decision.variant.unwrap_or(Variant::Unassigned),
            route: decision.route,
            stream: decision.stream,
            forced: decision.forced,
            status,
            started,
            overhead: started.elapsed().saturating_sub(decision.upstream_wait),
            error,
            usage_format: UsageFormat::None,
            inflight: decision.inflight.take(),
            places: std::mem::take(&mut decision.places),
            event,
            deadlines: None,
            cut: None,
            error_event: false,
            write_limits: None,
            fallback: decision.fallback,
        }
    }

    /// Answers `POST /v1/feedback`; never forwarded.
    async fn feedback(&self, live: &Live, request: Request<Body>) -> Response<Body> {
        let answer = async {
            if request.method() != Method::POST {
                return Err(ProxyError::MethodNotAllowed {
                    path: feedback::PATH,
                    allowed: "POST",
                });
            }
            let (parts, body) = request.into_parts();
            if let Some(keys) = &live.config.gateway_keys {
                access::authenticate(keys, &parts.headers)?;
            }
            let body = read_body(body, &parts, feedback::MAX_BODY_BYTES).await?;
            let outcomes = &live.config.config.feedback.outcomes;
            let (attribution, outcome) =
                feedback::record(&body, &live.request_ids, outcomes, &self.metrics)?;
            Ok(serde_json::json!({
                "recorded": true,
                "experiment": attribution.experiment,
                "variant": attribution.variant.as_str(),
                "outcome": outcome,
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
                    self.metrics.auth_failed(err.kind());
                }
                err.to_response()
            }
        }
    }

    async fn forward(
        &self,
        live: &Arc<Live>,
        request: Request<Body>,
        decision: &mut Decision,
        started: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let config = &live.config;
        let limits = &config.config.limits;
        let (mut parts, body) = request.into_parts();
        check_method(&parts.method)?;
        check_header_size(&parts, limits.max_header_bytes)?;
        path::check_path(parts.uri.path()).map_err(|reason| ProxyError::InvalidPath { reason })?;
        let route = Route::classify(parts.uri.path()).ok_or_else(|| ProxyError::NotFound {
            path: truncate(parts.uri.path(), 200),
        })?;
        decision.route = route;

        // Authenticate: the gateway key, and leave to force an arm.
        if let Some(keys) = &config.gateway_keys {
            access::authenticate(keys, &parts.headers)?;
        }
        let forced = access::forced_variant(config, &parts.headers)?;

        // Admit: shed load before reading anything, while it is cheap.
        decision.places.gateway = Some(self.inflight.admit(limits.max_inflight).ok_or(
            ProxyError::Shed {
                variant: None,
                limit: limits.max_inflight,
                retry_after_seconds: limits.retry_after_seconds,
            },
        )?);
        let total_at = started + config.total_timeout;

        // Read: JSON bodies whole, everything else streamed.
        let body = if carries_json(&parts, route) {
            let whole = matches!(body, Body::Full(_));
            let reading = read_body(body, &parts, config.max_body_bytes);
            let bytes = if whole {
                // Came with its head: no timer to set for it.
                reading.await?
            } else {
                tokio::time::timeout_at(total_at.into(), reading)
                    .await
                    .map_err(|_| ProxyError::RequestTimeout {
                        timeout_ms: config.total_timeout.as_millis(),
                    })??
            };
            let fields = json::inspect(&bytes)?;
            ClientBody::Json(bytes, fields)
        } else {
            check_declared_length(&parts, config.max_body_bytes)?;
            ClientBody::Stream(body)
        };

        // Assign.
        let fields = match &body {
            ClientBody::Json(_, fields) => Some(fields),
            ClientBody::Stream(_) => None,
        };
        decision.stream = fields.is_some_and(|fields| fields.stream);
        let (hashed, bucket, user_id) = choose_variant(config, &parts, fields)?;
        if let (Some(sink), Some(user_id)) = (&self.events, user_id) {
            decision.event_user_id = sink.user_id_field(user_id);
        }
        // A forced arm is no random assignment: the split's counts skip it.
        let variant = match forced {
            Some(forced) => {
                decision.forced = true;
                forced
            }
            None => {
                if let Some(bucket) = bucket {
                    live.epoch.counts.count(hashed, bucket);
                }
                hashed
            }
        };
        decision.variant = Some(variant);
        if let Some(max) = limits.max_inflight_per_variant {
            decision.places.upstream = Some(self.inflight.admit_to(variant, max).ok_or(
                ProxyError::Shed {
                    variant: Some(variant),
                    limit: max,
                    retry_after_seconds: limits.retry_after_seconds,
                },
            )?);
        }
        decision.inflight = Some(live.metrics.start(variant));
        let upstream = config.upstream(variant);

        // Rewrite.
        let mut resend = None;
        let body = match body {
            ClientBody::Json(bytes, fields) => {
                let (rewritten, model) = fallback::rewrite_for(upstream, &bytes, &fields);
                decision.model = model;
                if variant == Variant::Treatment && config.fallback_to_control {
                    // Kept as the client sent it: control gets its own
                    // model and credentials.
                    resend = Some(fallback::Resend {
                        method: parts.method.clone(),
                        uri: parts.uri.clone(),
                        headers: parts.headers.clone(),
                        body: bytes,
                        fields,
                    });
                }
                Body::full(rewritten)
            }
            ClientBody::Stream(body) => body,
        };
        parts.uri = upstream_uri(upstream, &parts.uri)?;
        parts.version = Version::HTTP_11;
        headers::prepare_upstream_request(
            &mut parts.headers,
            upstream,
            config.gateway_keys.is_some(),
        );

        // Forward, and fall back to control if treatment fails before answering.
        // The request's head stays here, lent to the sending: a future that
        // owned it would copy it at each step down.
        let attempt = self
            .send(live, &mut parts, body, variant, total_at, decision)
            .await;
        let response = match (resend, fallback::failure(&attempt)) {
            (Some(resend), Some(failure)) => {
                // Boxed: inline, this rare path would make every request's
                // future 7.6 KiB instead of 4.6, held by each request that
                // waits for its model (thousands at a time are normal).
                Box::pin(
                    self.fall_back(live, resend, attempt, failure, decision, started, total_at),
                )
                .await?
            }
            _ => attempt?,
        };

        // Answer: the upstream's status, headers and body stream, as is.
        let (mut parts, body) = response.into_parts();
        headers::prepare_answer(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

impl Gateway {
    /// Sends `request` to `variant`'s upstream and waits for the response
    /// headers: within `timeouts.first_byte_ms`, unless `total_at` comes
    /// sooner. The wait is added to the decision's upstream wait.
    async fn send(
        &self,
        live: &Live,
        parts: &mut http::request::Parts,
        body: Body,
        variant: Variant,
        total_at: Instant,
        decision: &mut Decision,
    ) -> Result<Response<Body>, ProxyError> {
        let config = &live.config;
        let waiting = Instant::now();
        let first_byte_at = waiting + config.first_byte_timeout;
        let (deadline, timeout, limit) = if total_at < first_byte_at {
            (total_at, Timeout::Total, config.total_timeout)
        } else {
            (first_byte_at, Timeout::FirstByte, config.first_byte_timeout)
        };
        let response = live
            .client
            .request_until(parts, body, Some(deadline.into()))
            .await;
        let headers_at = Instant::now();
        decision.upstream_wait += headers_at.saturating_duration_since(waiting);
        decision.headers_at = Some(headers_at);
        match response {
            Ok(response) => Ok(response),
            Err(client::ClientError::TimedOut) => Err(ProxyError::UpstreamTimeout {
                variant,
                timeout,
                timeout_ms: limit.as_millis(),
            }),
            Err(err) => Err(classify_client_error(&err, variant, config)),
        }
    }

    /// Treatment's upstream failed before answering (`failure`: the status
    /// its client would get, and the kind): records that as treatment's
    /// answer, exactly as without fallback, then sends the request once
    /// to control, whose answer (or failure) the client gets. Past
    /// control's in-flight cap, treatment's `attempt` stands.
    #[allow(clippy::too_many_arguments)]
    async fn fall_back(
        &self,
        live: &Arc<Live>,
        resend: fallback::Resend,
        attempt: Result<Response<Body>, ProxyError>,
        (status, kind): (u16, UpstreamErrorKind),
        decision: &mut Decision,
        started: Instant,
        total_at: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let config = &live.config;
        if let Some(max) = config.config.limits.max_inflight_per_variant {
            match self.inflight.admit_to(Variant::Control, max) {
                // Treatment's place is given back as control's is taken.
                Some(place) => decision.places.upstream = Some(place),
                None => return attempt,
            }
        }
        match &attempt {
            Ok(response) => tracing::warn!(
                status = response.status().as_u16(),
                "the treatment upstream answered with a server error; falling back to control"
            ),
            Err(err) => tracing::warn!(kind = err.kind(), "{err}; falling back to control"),
        }
        // Its body (a 5xx answer) is dropped unread, closing its connection.
        drop(attempt);
        let request_id = live
            .request_ids
            .issue(decision.id_variant(), &config.experiment);
        let mut failed = Decision {
            variant: Some(Variant::Treatment),
            // A forced request stays out of treatment's series, failed or not.
            forced: decision.forced,
            model: decision.model.clone(),
            route: decision.route,
            stream: decision.stream,
            upstream_wait: decision.upstream_wait,
            event_user_id: decision.event_user_id.clone(),
            ..Decision::default()
        };
        ObservedBody::record_unanswered(self.observation(
            live,
            &mut failed,
            status,
            Some(kind),
            started,
            &request_id,
        ));
        decision.request_id = Some(request_id);
        decision.fallback = true;
        let (request, model) =
            resend.request_for(&config.control, config.gateway_keys.is_some())?;
        decision.model = model;
        let (mut parts, body) = request.into_parts();
        let answer = self
            .send(live, &mut parts, body, Variant::Control, total_at, decision)
            .await;
        let served = answer
            .as_ref()
            .is_ok_and(|response| !response.status().is_server_error());
        self.metrics.fallback(&config.experiment, kind, served);
        answer
    }
}

impl abgate_http1::server::Handler for Gateway {
    type Answer = Body;

    async fn handle(
        self: Arc<Self>,
        request: Request<abgate_http1::server::RequestBody>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let request = request.map(Body::from);
        self.proxy(request).await
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

/// Refuses methods no model API uses (TRACE, CONNECT, extensions): they
/// are never forwarded.
fn check_method(method: &Method) -> Result<(), ProxyError> {
    match *method {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => Ok(()),
        _ => Err(ProxyError::MethodNotForwarded {
            method: truncate(method.as_str(), 32),
        }),
    }
}

/// Refuses a request whose line and headers, as HTTP/1.1 writes them, are
/// over `limit` bytes. (The HTTP layer refuses far larger ones itself,
/// before they reach the gateway: see `server::ConnectionLimits`.)
fn check_header_size(parts: &Parts, limit: usize) -> Result<(), ProxyError> {
    let line = parts.method.as_str().len()
        + parts
            .uri
            .path_and_query()
            .map_or(1, |path| path.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let size = parts.headers.iter().fold(line, |size, (name, value)| {
        size + name.as_str().len() + value.len() + ": \r\n".len()
    });
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { size, limit });
    }
    Ok(())
}

/// A client's request body as the gateway holds it.
enum ClientBody {
    /// Read whole and inspected.
    Json(Bytes, BodyFields),
    /// Not the gateway's business: streamed to the upstream as is.
    Stream(Body),
}

/// Whether the request body is JSON the gateway must read: always on the
/// API routes whose bodies are JSON by definition (whatever the content type
/// claims: `curl -d` says form-urlencoded), elsewhere when it says JSON.
fn carries_json(parts: &Parts, route: Route) -> bool {
    if !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        return false;
    }
    if route.takes_json() {
        return true;
    }
    parts.headers.get(CONTENT_TYPE).is_some_and(|value| {
        let media_type = value.to_str().unwrap_or("");
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        media_type.eq_ignore_ascii_case("application/json")
            || media_type.to_ascii_lowercase().ends_with("+json")
    })
}

/// Reads a JSON body up to `limit` bytes.
async fn read_body(body: Body, parts: &Parts, limit: usize) -> Result<Bytes, ProxyError> {
    check_declared_length(parts, limit)?;
    if let Body::Full(bytes) = body {
        // Came whole with its head: nothing to wait for.
        let bytes = bytes.unwrap_or_default();
        if bytes.len() > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        return Ok(bytes);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(err) => Err(ProxyError::ClientBody(err.to_string())),
    }
}

/// Refuses a body whose declared length is over the limit before reading it.
fn check_declared_length(parts: &Parts, limit: usize) -> Result<(), ProxyError> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(ProxyError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

/// Finds the user ID and hashes it into an arm.
fn choose_variant<'a>(
    config: &Snapshot,
    parts: &'a Parts,
    fields: Option<&'a BodyFields>,
) -> Result<(Variant, Option<u32>, Option<&'a str>), ProxyError> {
    let rules = IdentityRules {
        header: &config.user_header,
        max_bytes: config.max_user_id_bytes,
    };
    let header = identity::from_header(&parts.headers, rules)?;
    match identity::resolve(header, fields, rules)? {
        Some(user) => {
            let bucket = assign::bucket(user.id.as_bytes(), config.salt.as_deref());
            let variant = assign::variant_of(bucket, config.treatment_fraction);
            Ok((variant, Some(bucket), Some(user.id)))
        }
        None if config.require_user => Err(ProxyError::UserIdRequired {
            header: config.user_header.to_string(),
        }),
        None => Ok((Variant::Unassigned, None, None)),
    }
}

/// The upstream URI: its origin and prefix, then the client's path and query.
fn upstream_uri(upstream: &Upstream, original: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path_and_query = if upstream.path_prefix.is_empty() {
        path_and_query
    } else {
        let joined = format!("{}{}", upstream.path_prefix, path_and_query);
        PathAndQuery::try_from(joined)
            .map_err(|err| ProxyError::Internal(format!("upstream path: {err}")))?
    };
    // From its parts, each already valid: no builder steps to pass through.
    let mut parts = uri::Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|err| ProxyError::Internal(format!("upstream URI: {err}")))
}

/// Maps a client failure to connect, timeout or reset, naming the variant.
fn classify_client_error(
    err: &client::ClientError,
    variant: Variant,
    config: &Snapshot,
) -> ProxyError {
    let detail = error_chain(err);
    if err.is_request_body() {
        return ProxyError::ClientBody(detail);
    }
    if err.is_connect() {
        if has_io_kind(err, std::io::ErrorKind::TimedOut) {
            return ProxyError::UpstreamTimeout {
                variant,
                timeout: Timeout::Connect,
                timeout_ms: config.connect_timeout.as_millis(),
            };
        }
        return ProxyError::UpstreamConnect { variant, detail };
    }
    ProxyError::UpstreamReset { variant, detail }
}

fn has_io_kind(err: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == kind {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// "outer: inner: innermost", the way operators want to read an error.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}
