//! The data path: one request in, one arm chosen, one upstream call out,
//! the answer streamed back.
//!
//! A request is a [`RequestContext`] taken through the phases of
//! [`Gateway::forward`], each in a file of its own; the first failure is
//! the answer. In order:
//! 1. [`routing`]: only `/v1/...` is proxied (a 404 otherwise); methods no
//!    API uses get a 405, oversized heads a 431, ambiguous paths a 400.
//! 2. [`access`]: with `[auth]`, no gateway key is a 401; a forced arm
//!    without leave (`[qa] override` and the admin token) is a 403.
//! 3. [`admission`]: past `limits.max_inflight` requests in flight, a 503
//!    with `Retry-After`, before anything is read.
//! 4. [`read`]: JSON bodies are read whole (`model` is rewritten and the
//!    user ID may be in them); other bodies stream through untouched.
//! 5. [`assign`]: the user ID picks the arm; a forced arm replaces it.
//! 6. [`rewrite`]: `model`, URI, host and credentials for the upstream.
//! 7. [`forward`]: the upstream's answer head, or control's after a
//!    failed treatment attempt ([`fallback`]).
//! 8. [`answer`]: the gateway's fields added, failures made JSON errors,
//!    and the body measured on its way ([`observe`]), which records the
//!    request once it ends. A request whose client leaves first is
//!    recorded by its context as `client_cancelled`.

pub(crate) mod access;
pub(crate) mod admission;
pub(crate) mod answer;
pub(crate) mod answer_fields;
pub(crate) mod assign;
pub mod body;
pub(crate) mod client;
pub(crate) mod context;
pub(crate) mod deadline;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod fallback;
pub(crate) mod feedback;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod health;
pub mod identity;
pub mod json;
pub(crate) mod json_scan;
pub(crate) mod observe;
pub(crate) mod path;
pub(crate) mod read;
pub(crate) mod rewrite;
pub(crate) mod routing;
pub mod usage_json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::HeaderName;
use http::{Request, Response};

use crate::config::Snapshot;
use crate::experiment::request_id::RequestIds;
use crate::telemetry::events::EventSink;
use crate::telemetry::metrics::{ExperimentMetrics, Metrics};
use crate::telemetry::stage::SplitEpoch;
use admission::Inflight;
use body::Body;
use client::HttpClient;
use context::RequestContext;
use error::ProxyError;

/// Response header naming the arm that served the request.
pub(crate) const VARIANT_HEADER: HeaderName = HeaderName::from_static("x-abgate-variant");
/// Response header naming the model sent upstream.
pub(crate) const MODEL_HEADER: HeaderName = HeaderName::from_static("x-abgate-model");
/// Response header carrying the gateway's request id.
pub(crate) const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-abgate-request-id");
/// Response header naming the experiment.
pub(crate) const EXPERIMENT_HEADER: HeaderName = HeaderName::from_static("x-abgate-experiment");
/// Response header present (`true`) when treatment's upstream failed and
/// control's answer is served instead.
pub(crate) const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-abgate-fallback");
/// Response header naming the arm whose upstream answered, on fallbacks.
pub(crate) const SERVED_BY_HEADER: HeaderName = HeaderName::from_static("x-abgate-served-by");

/// The proxy: the current config with its metric children, the registry,
/// and the upstream connection pool.
pub struct Gateway {
    live: ArcSwap<Live>,
    metrics: Arc<Metrics>,
    events: Option<EventSink>,
    /// Requests in flight, against the `[limits]` caps.
    inflight: Arc<Inflight>,
    /// The request ids feedback was reported on, to count each once.
    reported: feedback::Reported,
    /// The fleet's memory of them, when the control plane has one.
    shared_reports: std::sync::OnceLock<Arc<dyn feedback::SharedReports>>,
    /// Shutdown: not ready, then cut.
    drain: crate::proxy::drain::Drain,
}

/// A config and what is derived from it, swapped as one.
pub(crate) struct Live {
    pub(crate) config: Snapshot,
    /// Metric children bound to this config's experiment.
    pub(crate) metrics: Arc<ExperimentMetrics>,
    /// Signs and verifies request ids.
    pub(crate) request_ids: RequestIds,
    /// The upstream pool; kept across reloads that leave transport settings alone.
    pub(crate) client: HttpClient,
    /// The current split since it began: stage age, per-arm counts, and
    /// the guardrails' baseline.
    pub(crate) epoch: Arc<SplitEpoch>,
    /// What the config file says now (its fraction, or a scheduled entry's)
    /// and which of the two (`config` or `schedule`).
    pub(crate) file_fraction: (f64, crate::config::rollout::ChangeSource),
}

impl Gateway {
    /// A gateway serving `first`, recording into `metrics`. The config
    /// changes from above: the control plane builds each next [`Live`]
    /// and swaps it in ([`Gateway::swap`]).
    pub(crate) fn new(first: Live, metrics: Arc<Metrics>) -> Result<Self, String> {
        let events = match &first.config.events {
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
            reported: feedback::Reported::default(),
            shared_reports: std::sync::OnceLock::new(),
            drain: crate::proxy::drain::Drain::default(),
        })
    }

    /// Counts feedback once per request id across the fleet, through
    /// `shared` (set once, at start).
    pub(crate) fn share_reports(&self, shared: Arc<dyn feedback::SharedReports>) {
        let _ = self.shared_reports.set(shared);
    }

    /// Serves `live` to requests that start from now on.
    pub(crate) fn swap(&self, live: Live) {
        self.live.store(Arc::new(live));
    }

    /// The config (and metric children) requests start on now.
    pub(crate) fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The process's metric registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Its shutdown state: draining (not ready), then cut.
    pub(crate) fn drain(&self) -> &crate::proxy::drain::Drain {
        &self.drain
    }

    /// Proxies one request. Every failure becomes a JSON error answer.
    pub(crate) async fn proxy(&self, request: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        // One config per request, start to finish, whatever swaps meanwhile.
        let live = self.live.load_full();
        if health::is_health(request.uri().path()) {
            return health::answer(self, &request);
        }
        if request.uri().path() == feedback::PATH {
            // Boxed, like the fallback: a rare path kept out of the
            // request's future, which is moved by value.
            return Box::pin(feedback::answer(self, &live, request)).await;
        }
        let mut ctx = RequestContext::new(self, &live, started);
        // A shutdown's cut ends a request still waiting for its answer.
        let forwarded = tokio::select! {
            // In order, not at random: an answer that is ready is taken
            // even as the cut comes, and no random draw per poll.
            biased;
            result = self.forward(&mut ctx, request) => Some(result),
            () = self.drain.cut_called() => None,
        };
        let result = forwarded.unwrap_or_else(|| {
            Err(ProxyError::ShuttingDown {
                variant: ctx.variant,
                drain_timeout_ms: live.config.drain_timeout.as_millis(),
            })
        });
        ctx.answer(result)
    }

    /// The phases, in order.
    async fn forward(
        &self,
        ctx: &mut RequestContext<'_>,
        request: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let config = &ctx.live.config;
        let limits = &config.limits;
        let (mut parts, body) = request.into_parts();
        ctx.route = routing::route(&parts, limits.max_header_bytes)?;
        let forced = access::check(config, &parts.headers)?;
        ctx.places.gateway = Some(admission::admit(&self.inflight, limits)?);
        let total_at = ctx.started + config.total_timeout;
        let body = read::read(body, &parts, ctx.route, config, total_at).await?;
        let variant = assign::assign(ctx, &parts, body.fields(), forced)?;
        // What is kept to resend to control stays here, lent to the
        // phases: moved into their futures, it would be copied at each.
        let mut resend = None;
        let body = rewrite::rewrite(ctx, &mut parts, body, variant, &mut resend)?;
        forward::forward(ctx, &mut parts, body, variant, &mut resend, total_at).await
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
