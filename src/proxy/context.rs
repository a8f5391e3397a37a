//! One request's context: what the phases learn about it, from its
//! arrival to its record.
//!
//! It records itself exactly once. Answered, it becomes the answer's
//! [`Observation`], and the answer's body records it when it ends
//! ([`observe`]). Dropped before any answer (the client left, and the
//! request's future with it), it records itself as `client_cancelled`.
//! A treatment attempt that fails and falls back to control is recorded
//! as treatment's request at that moment; control's answer is then
//! recorded in no arm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;

use super::admission::Places;
use super::observe::{self, EventDraft, Measured, Observation, UsageFormat};
use super::{Gateway, Live};
use crate::experiment::assign::Variant;
use crate::telemetry::metrics::{InflightGuard, UpstreamErrorKind};
use crate::telemetry::route::Route;

/// nginx's status for a request whose client closed the connection before
/// the answer: what such requests are recorded with.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One request on its way through the phases.
pub(crate) struct RequestContext<'a> {
    pub(crate) gateway: &'a Gateway,
    /// The config the request started on: it keeps it to the end,
    /// whatever swaps meanwhile.
    pub(crate) live: &'a Arc<Live>,
    pub(crate) started: Instant,
    /// The arm, once assigned; none for a request refused before.
    pub(crate) variant: Option<Variant>,
    /// The arm was forced (`x-abgate-force-variant`), not hashed.
    pub(crate) forced: bool,
    /// The model sent upstream, for `x-abgate-model` and events.
    pub(crate) model: Option<HeaderValue>,
    pub(crate) route: Route,
    pub(crate) stream: bool,
    /// The arm's in-flight gauge, held while the request runs.
    pub(crate) inflight: Option<InflightGuard>,
    /// Places taken under the in-flight caps.
    pub(crate) places: Places,
    /// Time spent waiting for upstreams' answer heads.
    pub(crate) upstream_wait: Duration,
    /// When the (last) upstream's answer head arrived.
    pub(crate) headers_at: Option<Instant>,
    /// The user ID as events carry it (only when events are on).
    pub(crate) event_user_id: Option<String>,
    /// Served by control after treatment's upstream failed; the failure is
    /// already recorded as treatment's.
    pub(crate) fallback: bool,
    /// The request id, when it was issued before the answer (fallbacks).
    pub(crate) request_id: Option<String>,
    /// Recorded, or handed to the answer that records it.
    recorded: bool,
}

impl<'a> RequestContext<'a> {
    /// A request that arrived at `started`, served on `live`.
    pub(crate) fn new(gateway: &'a Gateway, live: &'a Arc<Live>, started: Instant) -> Self {
        Self {
            gateway,
            live,
            started,
            variant: None,
            forced: false,
            model: None,
            route: Route::Other,
            stream: false,
            inflight: None,
            places: Places::default(),
            upstream_wait: Duration::ZERO,
            headers_at: None,
            event_user_id: None,
            fallback: false,
            request_id: None,
            recorded: false,
        }
    }

    /// The arm a request id names. A forced request's id says
    /// `unassigned`, so feedback quoting it stays out of both arms.
    fn id_variant(&self) -> Variant {
        match self.variant {
            Some(variant) if !self.forced => variant,
            _ => Variant::Unassigned,
        }
    }

    /// The request's id: the one issued already, or a new one.
    pub(crate) fn take_request_id(&mut self) -> String {
        self.request_id
            .take()
            .unwrap_or_else(|| self.issue_request_id())
    }

    fn issue_request_id(&self) -> String {
        self.live
            .request_ids
            .issue(self.id_variant(), &self.live.config.experiment)
    }

    /// What is known of the request when its answer starts (or when it
    /// ends without one), for the one record; the answer adds the rest.
    /// From here on the answer records it.
    pub(crate) fn observation(
        &mut self,
        status: u16,
        error: Option<UpstreamErrorKind>,
        request_id: &str,
    ) -> Observation {
        self.recorded = true;
        let config = &self.live.config;
        let event = self.gateway.events.as_ref().map(|sink| {
            let draft = EventDraft {
                request_id: request_id.to_owned(),
                experiment: config.experiment.clone(),
                model: self
                    .model
                    .as_ref()
                    .and_then(|m| m.to_str().ok())
                    .map(str::to_owned),
                user_id: self.event_user_id.take(),
                forced: self.forced,
            };
            (sink.clone(), draft)
        });
        Observation {
            metrics: self.live.metrics.clone(),
            stage: self.live.epoch.clone(),
            // Requests refused before assignment belong to neither arm.
            variant: self.variant.unwrap_or(Variant::Unassigned),
            route: self.route,
            stream: self.stream,
            forced: self.forced,
            status,
            started: self.started,
            overhead: self.started.elapsed().saturating_sub(self.upstream_wait),
            error,
            usage_format: UsageFormat::None,
            inflight: self.inflight.take(),
            places: std::mem::take(&mut self.places),
            event,
            deadlines: None,
            cut: None,
            error_event: false,
            write_limits: None,
            fallback: self.fallback,
        }
    }

    /// Records the request now, with no answer body.
    fn record(&mut self, status: u16, error: Option<UpstreamErrorKind>, request_id: &str) {
        let mut observation = self.observation(status, error, request_id);
        observe::record(&mut observation, Measured::default());
    }

    /// Records treatment's failed attempt (`status`, `kind`) as the
    /// request, exactly as it would be without fallback, and marks the
    /// context as falling back: the answer that follows is control's, and
    /// is recorded in no arm's series.
    pub(crate) fn record_failed_attempt(&mut self, status: u16, kind: UpstreamErrorKind) {
        let request_id = self.issue_request_id();
        let mut attempt = RequestContext::new(self.gateway, self.live, self.started);
        attempt.variant = Some(Variant::Treatment);
        // A forced request stays out of treatment's series, failed or not.
        attempt.forced = self.forced;
        attempt.model = self.model.clone();
        attempt.route = self.route;
        attempt.stream = self.stream;
        attempt.upstream_wait = self.upstream_wait;
        attempt.event_user_id = self.event_user_id.clone();
        attempt.record(status, Some(kind), &request_id);
        self.request_id = Some(request_id);
        self.fallback = true;
    }
}

impl Drop for RequestContext<'_> {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        tracing::debug!(variant = ?self.variant, "the client left before the answer");
        let request_id = self.take_request_id();
        self.record(
            CLIENT_CLOSED_REQUEST,
            Some(UpstreamErrorKind::ClientCancelled),
            &request_id,
        );
    }
}
