//! Every metric family abgate exports, defined in one place, on one registry.
//!
//! Labels come only from bounded sets: the experiment name (from config),
//! the variant, the API route family, the status class, the stream flag and
//! the error kind. No user ID, key, prompt or raw path ever becomes a label.
//!
//! Label lookups cost a hash and a lock inside the prometheus crate, so they
//! are done once per experiment ([`Metrics::bind`]) into arrays indexed by
//! enum; recording a request is then a handful of atomic adds.

mod histogram;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub(crate) use histogram::{Histogram, HistogramVec};

use crate::experiment::assign::Variant;
use crate::telemetry::route::Route;

/// Request latency buckets: LLM calls take from milliseconds to minutes.
/// About 1.5x apart, so an interpolated p95 is within a few percent: the
/// guardrails compare arms on a +20% p95 threshold.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
    2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
];
/// Gateway overhead buckets, from 10 µs.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];
/// Response size buckets, 64 B to 4 MiB.
const BYTES_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];

/// Variants in label order.
pub(crate) const VARIANTS: [Variant; 3] =
    [Variant::Control, Variant::Treatment, Variant::Unassigned];
/// Routes in label order.
pub(crate) const ROUTES: [Route; 6] = [
    Route::Chat,
    Route::Messages,
    Route::Completions,
    Route::Embeddings,
    Route::Responses,
    Route::Other,
];

/// Why a request did not get a good answer from its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    /// No connection within `timeouts.connect_ms`.
    ConnectTimeout,
    /// No response headers within `timeouts.first_byte_ms`.
    FirstByteTimeout,
    /// The body paused longer than `timeouts.idle_ms`.
    IdleTimeout,
    /// The whole request took longer than `timeouts.total_ms`.
    TotalTimeout,
    Reset,
    Status429,
    Status4xx,
    Status5xx,
    InvalidResponse,
    ClientCancelled,
    /// The client took no write of its answer within
    /// `timeouts.client_write_ms`, or not all of it by `timeouts.total_ms`:
    /// cut off, its upstream connection closed.
    ClientWriteTimeout,
    /// Refused by the gateway at its in-flight cap, never sent upstream.
    Shed,
    /// Still running when a shutdown's `server.drain_timeout_ms` ran out.
    Shutdown,
}

impl UpstreamErrorKind {
    /// All kinds, in label order.
    pub(crate) const ALL: [UpstreamErrorKind; 14] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::FirstByteTimeout,
        UpstreamErrorKind::IdleTimeout,
        UpstreamErrorKind::TotalTimeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Status429,
        UpstreamErrorKind::Status4xx,
        UpstreamErrorKind::Status5xx,
        UpstreamErrorKind::InvalidResponse,
        UpstreamErrorKind::ClientCancelled,
        UpstreamErrorKind::ClientWriteTimeout,
        UpstreamErrorKind::Shed,
        UpstreamErrorKind::Shutdown,
    ];

    /// The failures of treatment's upstream before it answered that
    /// `fallback_to_control` resends to control. A total timeout leaves no
    /// time to try again; a 429 is a throttle the client should back off
    /// from (or its own quota, with its own key), not a broken upstream.
    pub(crate) const FALLS_BACK: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::FirstByteTimeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Status5xx,
    ];

    /// The `kind` label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::FirstByteTimeout => "first_byte_timeout",
            UpstreamErrorKind::IdleTimeout => "idle_timeout",
            UpstreamErrorKind::TotalTimeout => "total_timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Status429 => "status_429",
            UpstreamErrorKind::Status4xx => "status_4xx",
            UpstreamErrorKind::Status5xx => "status_5xx",
            UpstreamErrorKind::InvalidResponse => "invalid_response",
            UpstreamErrorKind::ClientCancelled => "client_cancelled",
            UpstreamErrorKind::ClientWriteTimeout => "client_write_timeout",
            UpstreamErrorKind::Shed => "shed",
            UpstreamErrorKind::Shutdown => "shutdown",
        }
    }

    /// The kind an upstream answer's status implies, if it is an error.
    pub(crate) fn from_status(status: u16) -> Option<Self> {
        match status {
            429 => Some(UpstreamErrorKind::Status429),
            400..=499 => Some(UpstreamErrorKind::Status4xx),
            500..=599 => Some(UpstreamErrorKind::Status5xx),
            _ => None,
        }
    }

    /// Position in [`Self::ALL`], the index of its metric child.
    fn index(self) -> usize {
        self as usize
    }
}

const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

fn status_class_index(status: u16) -> usize {
    match status {
        400..=499 => 1,
        500..=599 => 2,
        // 1xx and 3xx are rare for API calls; they count with the successes.
        _ => 0,
    }
}

fn variant_index(variant: Variant) -> usize {
    match variant {
        Variant::Control => 0,
        Variant::Treatment => 1,
        Variant::Unassigned => 2,
    }
}

fn route_index(route: Route) -> usize {
    match route {
        Route::Chat => 0,
        Route::Messages => 1,
        Route::Completions => 2,
        Route::Embeddings => 3,
        Route::Responses => 4,
        Route::Other => 5,
    }
}

/// The registry and every family in it.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    time_to_first_byte: HistogramVec,
    upstream_errors: IntCounterVec,
    overhead: HistogramVec,
    response_bytes: HistogramVec,
    tokens: IntCounterVec,
    treatment_fraction: GaugeVec,
    config_reloads: IntCounterVec,
    /// `abgate_state_store_up`, registered once a `[state]` store is
    /// followed (a gateway without one exports none).
    state_store_up: prometheus::IntGauge,
    state_store_registered: std::sync::Once,
    inflight: IntGaugeVec,
    events_dropped: IntCounter,
    feedback: IntCounterVec,
    feedback_rating: HistogramVec,
    sample_ratio_p_value: GaugeVec,
    sample_ratio_mismatch: IntGaugeVec,
    guardrail_trips: IntCounterVec,
    fallbacks: IntCounterVec,
    auth_failures: IntCounterVec,
    forced_requests: IntCounterVec,
}

/// Kinds of `abgate_auth_failures_total`, each an error `code`.
pub(crate) const AUTH_FAILURE_KINDS: [&str; 3] = [
    "missing_api_key",
    "invalid_api_key",
    "forced_variant_refused",
];

/// Seconds, counted in nanoseconds.
const SECONDS: f64 = 1e-9;
/// Counted as they are (bytes, ratings).
const UNITS: f64 = 1.0;

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "abgate_requests_total",
                "Requests answered, by arm, API route and status class.",
            ),
            &["experiment", "variant", "route", "status_class"],
        )?;
        let duration = HistogramVec::new(
            "abgate_request_duration_seconds",
            "Request start to last byte sent to the client.",
            LATENCY_BUCKETS,
            SECONDS,
            &["experiment", "variant", "route", "stream"],
        )?;
        let time_to_first_byte = HistogramVec::new(
            "abgate_time_to_first_byte_seconds",
            "Request start to the first response body byte (time to first token for streams).",
            LATENCY_BUCKETS,
            SECONDS,
            &["experiment", "variant", "route", "stream"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "abgate_upstream_errors_total",
                "Requests whose upstream failed, by kind.",
            ),
            &["experiment", "variant", "kind"],
        )?;
        let overhead = HistogramVec::new(
            "abgate_overhead_seconds",
            "Time spent inside abgate itself, excluding the upstream wait.",
            OVERHEAD_BUCKETS,
            SECONDS,
            &["route"],
        )?;
        let response_bytes = HistogramVec::new(
            "abgate_response_bytes",
            "Response body size sent to the client.",
            BYTES_BUCKETS,
            UNITS,
            &["experiment", "variant", "route"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "abgate_tokens_total",
                "Tokens reported by the upstream's usage, by kind.",
            ),
            &["experiment", "variant", "kind"],
        )?;
        let treatment_fraction = GaugeVec::new(
            Opts::new(
                "abgate_treatment_fraction",
                "Share of buckets served by treatment.",
            ),
            &["experiment"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new("abgate_config_reloads_total", "Config reloads, by result."),
            &["result"],
        )?;
        let inflight = IntGaugeVec::new(
            Opts::new("abgate_inflight_requests", "Requests being served now."),
            &["variant"],
        )?;
        let events_dropped = IntCounter::new(
            "abgate_events_dropped_total",
            "Per-request events dropped because the writer fell behind.",
        )?;
        let feedback = IntCounterVec::new(
            Opts::new(
                "abgate_feedback_total",
                "Outcome reports, by the arm that served the request.",
            ),
            &["experiment", "variant", "outcome"],
        )?;
        let feedback_rating = HistogramVec::new(
            "abgate_feedback_rating",
            "User ratings (1 to 5), by the arm that served the request.",
            &[1.0, 2.0, 3.0, 4.0, 5.0],
            UNITS,
            &["experiment", "variant"],
        )?;
        let sample_ratio_p_value = GaugeVec::new(
            Opts::new(
                "abgate_sample_ratio_p_value",
                "Always-valid p-value of the distinct users per arm against the split (anytime-valid sample ratio test), since the fraction last changed.",
            ),
            &["experiment"],
        )?;
        let sample_ratio_mismatch = IntGaugeVec::new(
            Opts::new(
                "abgate_sample_ratio_mismatch",
                "1 when the arms' distinct users do not fit the split (always-valid p < 0.001).",
            ),
            &["experiment"],
        )?;
        let guardrail_trips = IntCounterVec::new(
            Opts::new(
                "abgate_guardrail_trips_total",
                "Automatic rollbacks by the guardrails, by the check that tripped.",
            ),
            &["check"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "abgate_fallbacks_total",
                "Requests resent to control after treatment's upstream failed before answering, by the failure's kind and whether control then answered without a 5xx (result served) or not (failed). Counted in neither arm's requests.",
            ),
            &["experiment", "from", "to", "kind", "result"],
        )?;
        for check in crate::config::guardrails::Check::ALL {
            guardrail_trips.with_label_values(&[check.as_str()]);
        }
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "abgate_auth_failures_total",
                "Requests refused for their credentials: no gateway key, a wrong one, or a forced variant without leave.",
            ),
            &["kind"],
        )?;
        for kind in AUTH_FAILURE_KINDS {
            auth_failures.with_label_values(&[kind]);
        }
        let forced_requests = IntCounterVec::new(
            Opts::new(
                "abgate_forced_requests_total",
                "Requests whose arm was forced by x-abgate-force-variant; kept out of every other per-arm family.",
            ),
            &["experiment", "variant", "status_class"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "abgate_build_info",
                "Build of the running gateway (always 1).",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(time_to_first_byte.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(overhead.clone()),
            Box::new(response_bytes.clone()),
            Box::new(tokens.clone()),
            Box::new(treatment_fraction.clone()),
            Box::new(config_reloads.clone()),
            Box::new(inflight.clone()),
            Box::new(events_dropped.clone()),
            Box::new(feedback.clone()),
            Box::new(feedback_rating.clone()),
            Box::new(sample_ratio_p_value.clone()),
            Box::new(sample_ratio_mismatch.clone()),
            Box::new(guardrail_trips.clone()),
            Box::new(fallbacks.clone()),
            Box::new(auth_failures.clone()),
            Box::new(forced_requests.clone()),
            Box::new(build_info),
        ] {
            registry.register(collector)?;
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            requests,
            duration,
            time_to_first_byte,
            upstream_errors,
            overhead,
            response_bytes,
            tokens,
            treatment_fraction,
            config_reloads,
            state_store_up: prometheus::IntGauge::new(
                "abgate_state_store_up",
                "Whether the fleet's shared rollout state store answered the last call (1) or not (0).",
            )?,
            state_store_registered: std::sync::Once::new(),
            inflight,
            events_dropped,
            feedback,
            feedback_rating,
            sample_ratio_p_value,
            sample_ratio_mismatch,
            guardrail_trips,
            fallbacks,
            auth_failures,
            forced_requests,
        })
    }

    /// Counts a request refused for its credentials; `kind` is one of
    /// [`AUTH_FAILURE_KINDS`].
    pub(crate) fn auth_failed(&self, kind: &'static str) {
        self.auth_failures.with_label_values(&[kind]).inc();
    }

    /// Counts a request resent from treatment to control after treatment's
    /// upstream failed with `kind`; `served` when control answered without
    /// a 5xx. Rare, so labels are looked up here.
    pub(crate) fn fallback(&self, experiment: &str, kind: UpstreamErrorKind, served: bool) {
        self.fallback_child(experiment, kind, served).inc();
    }

    fn fallback_child(
        &self,
        experiment: &str,
        kind: UpstreamErrorKind,
        served: bool,
    ) -> IntCounter {
        let result = if served { "served" } else { "failed" };
        self.fallbacks.with_label_values(&[
            experiment,
            Variant::Treatment.as_str(),
            Variant::Control.as_str(),
            kind.as_str(),
            result,
        ])
    }

    /// Counts a guardrail trip.
    pub(crate) fn guardrail_tripped(&self, check: crate::config::guardrails::Check) {
        self.guardrail_trips
            .with_label_values(&[check.as_str()])
            .inc();
    }

    /// Trips counted for `check` since start.
    pub(crate) fn guardrail_trips(&self, check: crate::config::guardrails::Check) -> u64 {
        self.guardrail_trips
            .with_label_values(&[check.as_str()])
            .get()
    }

    /// Cumulative feedback of one arm: reports, reports with
    /// `completion_outcome`, and ratings by value (1 to 5).
    pub(crate) fn feedback_totals(
        &self,
        experiment: &str,
        variant: Variant,
        outcomes: &[String],
        completion_outcome: &str,
    ) -> FeedbackTotals {
        let mut totals = FeedbackTotals::default();
        for outcome in outcomes {
            let count = self
                .feedback
                .with_label_values(&[experiment, variant.as_str(), outcome])
                .get();
            totals.reports += count;
            if outcome == completion_outcome {
                totals.completed += count;
            }
        }
        let ratings = Buckets::of([&self
            .feedback_rating
            .with_label_values(&[experiment, variant.as_str()])]);
        let mut below = 0;
        for (value, cumulative) in ratings.cumulative.iter().take(5).enumerate() {
            totals.ratings[value] = cumulative - below;
            below = *cumulative;
        }
        totals
    }

    /// Publishes the latest sample ratio test for `experiment`.
    pub(crate) fn set_sample_ratio(
        &self,
        experiment: &str,
        result: &crate::experiment::srm::SampleRatio,
    ) {
        self.sample_ratio_p_value
            .with_label_values(&[experiment])
            .set(result.p_value);
        self.sample_ratio_mismatch
            .with_label_values(&[experiment])
            .set(i64::from(result.mismatch));
    }

    /// Counts an outcome report (and its rating) for the arm that served it.
    /// Not on the proxy's hot path, so labels are looked up here.
    pub(crate) fn feedback(
        &self,
        experiment: &str,
        variant: Variant,
        outcome: &str,
        rating: Option<u8>,
    ) {
        self.feedback
            .with_label_values(&[experiment, variant.as_str(), outcome])
            .inc();
        if let Some(rating) = rating {
            self.feedback_rating
                .with_label_values(&[experiment, variant.as_str()])
                .observe(u64::from(rating));
        }
    }

    /// Feedback counts by outcome and the mean rating, for one arm.
    pub(crate) fn feedback_stats(
        &self,
        experiment: &str,
        variant: Variant,
        outcomes: &[String],
    ) -> FeedbackStats {
        let counts = outcomes
            .iter()
            .map(|outcome| {
                let count = self
                    .feedback
                    .with_label_values(&[experiment, variant.as_str(), outcome])
                    .get();
                (outcome.clone(), count)
            })
            .collect();
        let ratings = self
            .feedback_rating
            .with_label_values(&[experiment, variant.as_str()]);
        let ratings = ratings.snapshot();
        FeedbackStats {
            outcomes: counts,
            ratings: ratings.count,
            mean_rating: (ratings.count > 0).then(|| ratings.sum / ratings.count as f64),
        }
    }

    /// Resolves every child for one experiment, once, so the request path
    /// never looks a label up.
    pub fn bind(&self, experiment: &str, treatment_fraction: f64) -> ExperimentMetrics {
        // Exported at 0 from the start, so that rate() sees the first one.
        for kind in UpstreamErrorKind::FALLS_BACK {
            for served in [true, false] {
                self.fallback_child(experiment, kind, served);
            }
        }
        self.treatment_fraction
            .with_label_values(&[experiment])
            .set(treatment_fraction);
        let per_variant = |v: Variant| {
            let variant = v.as_str();
            ArmMetrics {
                requests: ROUTES.map(|route| {
                    STATUS_CLASSES.map(|class| {
                        self.requests.with_label_values(&[
                            experiment,
                            variant,
                            route.as_str(),
                            class,
                        ])
                    })
                }),
                duration: ROUTES.map(|route| {
                    ["false", "true"].map(|stream| {
                        self.duration.with_label_values(&[
                            experiment,
                            variant,
                            route.as_str(),
                            stream,
                        ])
                    })
                }),
                time_to_first_byte: ROUTES.map(|route| {
                    ["false", "true"].map(|stream| {
                        self.time_to_first_byte.with_label_values(&[
                            experiment,
                            variant,
                            route.as_str(),
                            stream,
                        ])
                    })
                }),
                response_bytes: ROUTES.map(|route| {
                    self.response_bytes
                        .with_label_values(&[experiment, variant, route.as_str()])
                }),
                upstream_errors: UpstreamErrorKind::ALL.map(|kind| {
                    self.upstream_errors
                        .with_label_values(&[experiment, variant, kind.as_str()])
                }),
                prompt_tokens: self
                    .tokens
                    .with_label_values(&[experiment, variant, "prompt"]),
                completion_tokens: self.tokens.with_label_values(&[
                    experiment,
                    variant,
                    "completion",
                ]),
                inflight: self.inflight.with_label_values(&[variant]),
            }
        };
        let forced = [Variant::Control, Variant::Treatment].map(|variant| {
            STATUS_CLASSES.map(|class| {
                self.forced_requests
                    .with_label_values(&[experiment, variant.as_str(), class])
            })
        });
        ExperimentMetrics {
            arms: VARIANTS.map(per_variant),
            forced,
            overhead: ROUTES.map(|route| self.overhead.with_label_values(&[route.as_str()])),
        }
    }

    /// Counts a config reload.
    /// Whether the fleet's state store answered its last call.
    pub(crate) fn set_state_store_up(&self, up: bool) {
        self.state_store_registered.call_once(|| {
            if let Err(err) = self
                .registry
                .register(Box::new(self.state_store_up.clone()))
            {
                tracing::error!("abgate_state_store_up: {err}");
            }
        });
        self.state_store_up.set(i64::from(up));
    }

    pub(crate) fn config_reloaded(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Counts an event the writer had to drop.
    pub(crate) fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// The children of one arm.
struct ArmMetrics {
    requests: [[IntCounter; 3]; 6],
    duration: [[Arc<Histogram>; 2]; 6],
    time_to_first_byte: [[Arc<Histogram>; 2]; 6],
    response_bytes: [Arc<Histogram>; 6],
    upstream_errors: [IntCounter; UpstreamErrorKind::ALL.len()],
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
    inflight: IntGauge,
}

/// Pre-resolved children for one experiment; recording is atomics only.
pub struct ExperimentMetrics {
    arms: [ArmMetrics; 3],
    /// Forced requests by arm (control, treatment) and status class.
    forced: [[IntCounter; 3]; 2],
    overhead: [Arc<Histogram>; 6],
}

/// Everything measured about one finished request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub variant: Variant,
    pub route: Route,
    pub stream: bool,
    pub status: u16,
    pub duration: Duration,
    pub time_to_first_byte: Option<Duration>,
    pub response_bytes: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub error: Option<UpstreamErrorKind>,
    pub overhead: Duration,
}

/// Decrements the in-flight gauge when the request ends, however it ends.
pub struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ExperimentMetrics {
    /// Marks a request of `variant` in flight until the guard drops.
    pub fn start(&self, variant: Variant) -> InflightGuard {
        let gauge = self.arms[variant_index(variant)].inflight.clone();
        gauge.inc();
        InflightGuard(gauge)
    }

    /// Records a finished request whose arm was forced: counted apart, so
    /// that the arms' numbers hold only randomly assigned requests.
    pub(crate) fn record_forced(&self, variant: Variant, status: u16) {
        let arm = match variant {
            Variant::Treatment => 1,
            Variant::Control | Variant::Unassigned => 0,
        };
        self.forced[arm][status_class_index(status)].inc();
    }

    /// Records a finished request.
    pub fn record(&self, record: &RequestRecord) {
        let arm = &self.arms[variant_index(record.variant)];
        let route = route_index(record.route);
        let stream = usize::from(record.stream);
        arm.requests[route][status_class_index(record.status)].inc();
        arm.duration[route][stream].observe_duration(record.duration);
        if let Some(ttfb) = record.time_to_first_byte {
            arm.time_to_first_byte[route][stream].observe_duration(ttfb);
        }
        arm.response_bytes[route].observe(record.response_bytes);
        if let Some(kind) = record.error {
            arm.upstream_errors[kind.index()].inc();
        }
        if let Some(tokens) = record.prompt_tokens {
            arm.prompt_tokens.inc_by(tokens);
        }
        if let Some(tokens) = record.completion_tokens {
            arm.completion_tokens.inc_by(tokens);
        }
        self.overhead[route].observe_duration(record.overhead);
    }
}

/// Summary of a group of histograms: count, mean and quantiles.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Distribution {
    pub(crate) count: u64,
    pub(crate) mean: Option<f64>,
    pub(crate) p50: Option<f64>,
    pub(crate) p95: Option<f64>,
    pub(crate) p99: Option<f64>,
}

impl Distribution {
    /// Merges histograms with the same buckets and summarises them. The
    /// quantiles interpolate linearly inside a bucket, as PromQL's
    /// `histogram_quantile` does, so they agree with the dashboards.
    fn of<'a>(histograms: impl IntoIterator<Item = &'a Arc<Histogram>>) -> Self {
        Buckets::of(histograms).summary()
    }
}

/// Merged cumulative bucket counts of histograms that share bounds: what
/// quantiles are computed from, and what windows are differences of.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Buckets {
    pub(crate) bounds: Vec<f64>,
    pub(crate) cumulative: Vec<u64>,
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

impl Buckets {
    /// The histograms' buckets, added up.
    pub(crate) fn of<'a>(histograms: impl IntoIterator<Item = &'a Arc<Histogram>>) -> Self {
        let mut merged = Self::default();
        for histogram in histograms {
            let snapshot = histogram.snapshot();
            merged.count += snapshot.count;
            merged.sum += snapshot.sum;
            if merged.bounds.is_empty() {
                merged.bounds = snapshot.bounds.to_vec();
                merged.cumulative = vec![0; snapshot.bounds.len()];
            }
            for (total, cumulative) in merged.cumulative.iter_mut().zip(&snapshot.cumulative) {
                *total += cumulative;
            }
        }
        merged
    }

    /// The `q` quantile, interpolated linearly inside its bucket as
    /// PromQL's `histogram_quantile` does, so it agrees with dashboards.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (bound, cumulative) in self.bounds.iter().zip(&self.cumulative) {
            if *cumulative as f64 >= rank {
                let in_bucket = (*cumulative - lower_count) as f64;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower_count as f64) / in_bucket
                } else {
                    0.0
                };
                return Some(lower_bound + (bound - lower_bound) * fraction);
            }
            lower_bound = *bound;
            lower_count = *cumulative;
        }
        // Beyond the last bucket: the largest finite bound is all we know.
        Some(lower_bound)
    }

    /// Mean of the observations, if any.
    pub(crate) fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Count, mean and quantiles.
    pub(crate) fn summary(&self) -> Distribution {
        Distribution {
            count: self.count,
            mean: self.mean(),
            p50: self.quantile(0.50),
            p95: self.quantile(0.95),
            p99: self.quantile(0.99),
        }
    }
}

/// One arm's feedback, cumulative.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FeedbackTotals {
    pub(crate) reports: u64,
    pub(crate) completed: u64,
    /// Ratings of 1, 2, 3, 4 and 5.
    pub(crate) ratings: [u64; 5],
}

/// One arm's outcome reports.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FeedbackStats {
    pub(crate) outcomes: std::collections::BTreeMap<String, u64>,
    pub(crate) ratings: u64,
    pub(crate) mean_rating: Option<f64>,
}

/// One arm's numbers since start.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ArmStats {
    pub(crate) requests: u64,
    /// Answers with a 5xx status or an upstream 429.
    pub(crate) errors: u64,
    pub(crate) error_rate: Option<f64>,
    pub(crate) latency_seconds: Distribution,
    pub(crate) time_to_first_byte_seconds: Distribution,
    pub(crate) mean_response_bytes: Option<f64>,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// Upstream failures by kind.
    pub(crate) upstream_errors: std::collections::BTreeMap<&'static str, u64>,
}

impl ExperimentMetrics {
    /// One arm's cumulative requests and errors (5xx answers plus
    /// upstream 429s, as in [`ArmStats`]): the guard's counts.
    pub(crate) fn arm_counts(&self, variant: Variant) -> (u64, u64) {
        let arm = &self.arms[variant_index(variant)];
        let requests: u64 = arm.requests.iter().flatten().map(IntCounter::get).sum();
        let server_errors: u64 = arm.requests.iter().map(|classes| classes[2].get()).sum();
        let rate_limited = arm.upstream_errors[UpstreamErrorKind::Status429.index()].get();
        (requests, server_errors + rate_limited)
    }

    /// The numbers of one arm since the gateway started.
    pub(crate) fn arm_stats(&self, variant: Variant) -> ArmStats {
        let arm = &self.arms[variant_index(variant)];
        let (requests, errors) = self.arm_counts(variant);
        ArmStats {
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            latency_seconds: Buckets::of(arm.duration.iter().flatten()).summary(),
            time_to_first_byte_seconds: Distribution::of(arm.time_to_first_byte.iter().flatten()),
            mean_response_bytes: Buckets::of(arm.response_bytes.iter()).mean(),
            prompt_tokens: arm.prompt_tokens.get(),
            completion_tokens: arm.completion_tokens.get(),
            upstream_errors: UpstreamErrorKind::ALL
                .iter()
                .map(|kind| (kind.as_str(), arm.upstream_errors[kind.index()].get()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_child() {
        for (position, kind) in UpstreamErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), position, "{}", kind.as_str());
        }
    }

    #[test]
    fn records_land_in_their_labelled_series() {
        let metrics = Metrics::new().unwrap();
        let bound = metrics.bind("exp", 0.1);
        {
            let _inflight = bound.start(Variant::Treatment);
            bound.record(&RequestRecord {
                variant: Variant::Treatment,
                route: Route::Chat,
                stream: true,
                status: 503,
                duration: Duration::from_millis(120),
                time_to_first_byte: Some(Duration::from_millis(40)),
                response_bytes: 1000,
                prompt_tokens: Some(12),
                completion_tokens: Some(30),
                error: UpstreamErrorKind::from_status(503),
                overhead: Duration::from_micros(30),
            });
        }
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        for line in [
            r#"abgate_requests_total{experiment="exp",route="chat",status_class="5xx",variant="treatment"} 1"#,
            r#"abgate_upstream_errors_total{experiment="exp",kind="status_5xx",variant="treatment"} 1"#,
            r#"abgate_tokens_total{experiment="exp",kind="completion",variant="treatment"} 30"#,
            r#"abgate_inflight_requests{variant="treatment"} 0"#,
            r#"abgate_treatment_fraction{experiment="exp"} 0.1"#,
            r#"abgate_time_to_first_byte_seconds_count{experiment="exp",route="chat",stream="true",variant="treatment"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }
}
