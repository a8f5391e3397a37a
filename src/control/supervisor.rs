//! The rollout supervisor: one background task per gateway that, on its
//! own clock, applies changes that come due (`effective_at`, scheduled file
//! entries), runs the guardrails every interval and rolls back when one
//! trips, and promotes to the next stage when `auto_promote` allows it.
//! It also answers what the admin API asks about stages and guardrails.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;

use crate::config::guardrails::{Check, GuardrailsConfig, OnBreach, Source};
use crate::config::rollout::ChangeSource;
use abgate_sequential::decision::Verdict;

use crate::control::guardrails::checks::{CheckResult, StageTests, Streaks};
use crate::control::live::{ChangeError, LiveConfig};
use crate::control::rollout::Pause;
use crate::proxy::Live;
use crate::telemetry::evidence::{EvidenceSummary, StageEvidence};
use crate::telemetry::stage::SplitEpoch;

/// The longest the task sleeps between looks, so a reload that changes
/// the guard's interval is noticed soon.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// One look of the guardrails at the stage.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Evaluation {
    pub(crate) at: String,
    pub(crate) source: Source,
    /// Span of the numbers judged: the stage so far.
    pub(crate) stage_seconds: f64,
    /// Each arm's evidence.
    pub(crate) control: EvidenceSummary,
    pub(crate) treatment: EvidenceSummary,
    pub(crate) checks: Vec<CheckResult>,
    /// Why there are no numbers (Prometheus unreachable, …).
    pub(crate) error: Option<String>,
    #[serde(skip)]
    epoch: Option<Arc<SplitEpoch>>,
}

/// An automatic rollback, with the numbers that caused it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Trip {
    pub(crate) at: String,
    pub(crate) checks: Vec<Check>,
    pub(crate) from: f64,
    pub(crate) to: f64,
    pub(crate) reason: String,
}

#[derive(Default)]
struct GuardState {
    /// The stage's sequential tests; built at its first look.
    tests: Option<StageTests>,
    epoch: Option<Arc<SplitEpoch>>,
    streaks: Streaks,
    last: Option<Evaluation>,
    last_trip: Option<Trip>,
    next_check: Option<Instant>,
    /// Whether this replica ran the guard at its last tick (always,
    /// without a fleet store).
    leader: bool,
}

/// Runs the rollout on its own; shared with the admin API.
pub(crate) struct Supervisor {
    control: Arc<LiveConfig>,
    state: Mutex<GuardState>,
    wake: Notify,
}

/// Why a promotion did not happen.
#[derive(Debug)]
pub(crate) enum PromoteError {
    /// Not ready: every reason.
    Blocked(Vec<String>),
    /// The change failed, or was applied but not written down.
    Change(ChangeError),
}

impl Supervisor {
    /// A supervisor for `gateway`; start it with [`Supervisor::run`].
    pub(crate) fn new(control: Arc<LiveConfig>) -> Arc<Self> {
        Arc::new(Self {
            control,
            state: Mutex::new(GuardState::default()),
            wake: Notify::new(),
        })
    }

    /// Looks again now (a pending change was added, or a test asks).
    pub(crate) fn notify(&self) {
        self.wake.notify_one();
    }

    /// The task: ticks until `stop` resolves.
    pub(crate) async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            self.tick().await;
            let sleep = self.until_next();
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// How long until something may be due.
    fn until_next(&self) -> Duration {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut next = now + MAX_SLEEP;
        let live = self.control.live();
        let due = |at: SystemTime| now + at.duration_since(wall).unwrap_or_default();
        if let Some(at) = live.config.schedule.next_after(wall) {
            next = next.min(due(at));
        }
        if let Some(pending) = self.control.runtime().pending() {
            if let Ok(at) = crate::config::clock::parse_rfc3339(&pending.effective_at) {
                next = next.min(due(at));
            }
        }
        if let Some(check) = self.state.lock().ok().and_then(|state| state.next_check) {
            next = next.min(check);
        }
        next.saturating_duration_since(now)
    }

    /// One look: due changes, then the guard, then promotion.
    pub(crate) async fn tick(&self) {
        // With [state], changes the supervisor makes go through the fleet's
        // store like an operator's (see LiveConfig::transact).
        if self.control.runtime().pending().is_some() {
            let due = self
                .control
                .transact(None, || {
                    self.apply_due_pending();
                    Ok::<(), ChangeError>(())
                })
                .await;
            if let Err(err) = due {
                tracing::warn!("a due change waits: {err}");
            }
        }
        // One replica of a fleet guards and promotes: the lease's holder.
        let leader = self.control.leads_the_guard().await;
        if let Ok(mut state) = self.state.lock() {
            state.leader = leader;
        }
        if let Err(err) = self.control.follow_file_schedule() {
            tracing::error!("scheduled change: {err}");
        }
        let live = self.control.live();
        let guard = &live.config.guardrails;
        let due = self
            .state
            .lock()
            .ok()
            .map(|state| state.next_check.map_or(true, |at| Instant::now() >= at))
            .unwrap_or(false);
        if guard.enabled && due {
            // Every replica judges (its report and blockers need it); only
            // the lease's holder acts on a trip.
            self.guard(&live, leader).await;
        }
        if leader && live.config.rollout.auto_promote {
            if let Err(err) = self
                .control
                .transact(None, || {
                    self.auto_promote();
                    Ok::<(), ChangeError>(())
                })
                .await
            {
                tracing::warn!("automatic promotion waits: {err}");
            }
        }
    }

    fn apply_due_pending(&self) {
        let runtime = self.control.runtime();
        let Some(pending) = runtime.pending() else {
            return;
        };
        let live = self.control.live();
        let due = crate::config::clock::parse_rfc3339(&pending.effective_at)
            .map(|at| at <= SystemTime::now())
            .unwrap_or(true);
        if !due {
            return;
        }
        if pending.experiment == live.config.experiment {
            let reason = format!("{} (effective at {})", pending.reason, pending.effective_at);
            if let Err(err) =
                self.control
                    .set_fraction(pending.treatment_fraction, ChangeSource::Api, &reason)
            {
                tracing::error!("pending change: {err}");
            }
        }
        if let Err(err) = runtime.set_pending(None, live.config.treatment_fraction) {
            tracing::error!("pending change: {err}");
        }
    }

    /// Looks at the stage once and acts on a trip.
    async fn guard(&self, live: &Arc<Live>, act: bool) {
        let config = &live.config.guardrails;
        let interval = Duration::from_secs_f64(config.interval_seconds);
        let epoch = live.epoch.clone();
        let evidence = match config.source {
            Source::Local => {
                let latest = crate::telemetry::readback::Reading::take(
                    self.control.metrics(),
                    &live.metrics,
                    &live.config.experiment,
                    &live.config.feedback.outcomes,
                    &config.completion_outcome,
                );
                Ok(StageEvidence::local(&epoch, &latest))
            }
            Source::Prometheus => {
                // The fleet's numbers since the stage began: the split
                // change this replica saw, or, if the split was in force
                // when it started, `window_seconds` before that.
                let before = if epoch.at_start {
                    config.window_seconds
                } else {
                    0.0
                };
                let span = Duration::from_secs_f64((epoch.age_seconds() + before).max(1.0));
                let base = config
                    .prometheus_url
                    .as_deref()
                    .map(crate::config::guardrails::parse_base_url)
                    .unwrap_or_else(|| Err("no prometheus_url".to_owned()));
                match base {
                    Ok(base) => crate::control::guardrails::prometheus::fetch(
                        &self.control.http_client(),
                        &base,
                        &live.config.experiment,
                        span,
                        config,
                        interval.max(Duration::from_secs(1)),
                    )
                    .await
                    .map(|(control, treatment)| StageEvidence {
                        control,
                        treatment,
                        seconds: span.as_secs_f64(),
                    }),
                    Err(err) => Err(err),
                }
            }
        };
        let tripped = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            let state = &mut *state;
            let same_stage = state.epoch.as_ref().is_some_and(|e| Arc::ptr_eq(e, &epoch));
            let same_tests = state.tests.as_ref().is_some_and(|t| t.fits(config));
            if !same_stage || !same_tests {
                state.epoch = Some(epoch.clone());
                state.tests = Some(StageTests::new(config));
                state.streaks.reset();
            }
            state.next_check = Some(Instant::now() + interval);
            let (evidence, error) = match evidence {
                Ok(evidence) => (evidence, None),
                Err(err) => {
                    tracing::warn!("guardrails have no numbers: {err}");
                    (StageEvidence::default(), Some(err))
                }
            };
            let mut results = match (&error, state.tests.as_mut()) {
                (None, Some(tests)) => tests.evaluate(&evidence),
                _ => Vec::new(),
            };
            let tripped = state
                .streaks
                .observe(&mut results, config.consecutive_breaches);
            state.last = Some(Evaluation {
                at: crate::config::clock::now_rfc3339(),
                source: config.source,
                stage_seconds: evidence.seconds,
                control: evidence.control.summary(),
                treatment: evidence.treatment.summary(),
                checks: results,
                error,
                epoch: Some(epoch),
            });
            tripped
        };
        if !tripped.is_empty() && act {
            let through_store = self
                .control
                .transact(None, || {
                    self.trip(live, config, &tripped);
                    Ok::<(), ChangeError>(())
                })
                .await;
            if let Err(err) = through_store {
                // A rollback does not wait for the store: it applies here
                // now and is written to the store once it answers.
                tracing::error!("guardrail rollback applied on this replica only for now: {err}");
                self.trip(live, config, &tripped);
                self.control.write_to_store_later();
            }
        }
    }

    /// Rolls back after a trip: the fraction, a pause of the schedule, the
    /// audit entry with the numbers, the trip counters.
    fn trip(&self, live: &Live, config: &GuardrailsConfig, tripped: &[Check]) {
        let from = live.config.treatment_fraction;
        let to = match config.on_breach {
            OnBreach::Rollback => 0.0,
            OnBreach::PreviousStage => live.config.rollout.previous_stage(from),
        };
        let details: Vec<String> = self
            .state
            .lock()
            .ok()
            .and_then(|state| state.last.clone())
            .map(|evaluation| {
                evaluation
                    .checks
                    .iter()
                    .filter(|result| tripped.contains(&result.check))
                    .map(|result| {
                        format!(
                            "{} (in breach {} looks in a row): {}",
                            result.check.as_str(),
                            result.consecutive,
                            result.detail
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let reason = format!(
            "guardrail tripped, treatment {from} -> {to}: {}",
            details.join("; ")
        );
        for check in tripped {
            self.control.metrics().guardrail_tripped(*check);
        }
        tracing::error!("{reason}");
        if from > to {
            if let Err(err) = self
                .control
                .set_fraction(to, ChangeSource::Guardrail, &reason)
            {
                tracing::error!("guardrail rollback not persisted: {err}");
            }
        }
        let pause = Pause {
            source: ChangeSource::Guardrail,
            reason: reason.clone(),
            at: crate::config::clock::now_rfc3339(),
        };
        if let Err(err) = self.control.runtime().set_paused(
            Some(pause),
            &live.config.experiment,
            to,
            ChangeSource::Guardrail,
            &reason,
        ) {
            tracing::error!("pause not persisted: {err}");
        }
        if let Ok(mut state) = self.state.lock() {
            state.streaks.reset();
            state.last_trip = Some(Trip {
                at: crate::config::clock::now_rfc3339(),
                checks: tripped.to_vec(),
                from,
                to,
                reason,
            });
        }
    }

    fn auto_promote(&self) {
        let live = self.control.live();
        let rollout = &live.config.rollout;
        if !rollout.auto_promote
            || live.config.treatment_fraction <= 0.0
            || self.control.runtime().paused().is_some()
        {
            return;
        }
        let reason = if live.config.guardrails.enabled {
            "automatic promotion: the stage met its minimums and every guardrail showed non-inferiority"
        } else {
            "automatic promotion: the stage met its minimums (guardrails off)"
        };
        match self.promote(ChangeSource::Schedule, reason, false) {
            Ok(_) | Err(PromoteError::Blocked(_)) => {}
            Err(PromoteError::Change(err)) => {
                tracing::error!("promotion not persisted: {err}")
            }
        }
    }

    /// Why the current stage may not be promoted now (empty: it may).
    pub(crate) fn blockers(&self) -> Vec<String> {
        let live = self.control.live();
        let rollout = &live.config.rollout;
        let current = live.config.treatment_fraction;
        let mut blockers = Vec::new();
        if rollout.next_stage(current).is_none() {
            blockers.push(format!("{current} is already the last stage"));
            return blockers;
        }
        if self.control.runtime().latched() {
            blockers.push(
                "a guardrail rollback holds the rollout until an operator resumes it (abgate rollout resume)"
                    .to_owned(),
            );
            return blockers;
        }
        if current <= 0.0 {
            // Starting the rollout needs no evidence from the treatment arm.
            return blockers;
        }
        let age = live.epoch.age_seconds();
        if age < rollout.min_stage_seconds {
            blockers.push(format!(
                "the stage has run {age:.0} s of the {} s it needs (rollout.min_stage_seconds)",
                rollout.min_stage_seconds
            ));
        }
        let split = live.epoch.counts.check(current);
        for (arm, count) in [("control", split.control), ("treatment", split.treatment)] {
            if count < rollout.min_requests_per_arm {
                blockers.push(format!(
                    "{arm} has served {count} of the {} requests a stage needs (rollout.min_requests_per_arm)",
                    rollout.min_requests_per_arm
                ));
            }
        }
        if split.mismatch {
            blockers.push(format!(
                "sample ratio mismatch: {} control / {} treatment users{} do not fit a {:.1}% split (always-valid p = {:.1e}); a broken split invalidates every comparison",
                split.users.control,
                split.users.treatment,
                if split.capped {
                    " (counted up to the stage's cap)"
                } else {
                    ""
                },
                split.expected_treatment_share * 100.0,
                split.p_value
            ));
        }
        if live.config.guardrails.enabled {
            self.guard_blockers(&live, &mut blockers);
        }
        blockers
    }

    /// What the guard says against promotion: it has not looked at this
    /// stage, it has no numbers, or a check has not shown non-inferiority
    /// (a breach, too little data, or an interval still wider than its
    /// margin). A feedback check without reports blocks only while
    /// `[rollout] require_feedback` holds; the TTFT check does not block a
    /// stage that served no stream.
    fn guard_blockers(&self, live: &Live, blockers: &mut Vec<String>) {
        let Ok(state) = self.state.lock() else { return };
        let evaluation = state.last.as_ref().filter(|evaluation| {
            evaluation
                .epoch
                .as_ref()
                .is_some_and(|epoch| Arc::ptr_eq(epoch, &live.epoch))
        });
        let Some(evaluation) = evaluation else {
            blockers.push("the guardrails have not looked at this stage yet".to_owned());
            return;
        };
        if let Some(err) = &evaluation.error {
            blockers.push(format!("the guardrails have no numbers: {err}"));
        }
        let require_feedback = live.config.rollout.require_feedback;
        for result in &evaluation.checks {
            let feedback = matches!(result.check, Check::CompletionRate | Check::Rating);
            let name = result.check.as_str();
            let detail = &result.detail;
            match result.decision {
                Verdict::NonInferior => {}
                Verdict::Breach => {
                    blockers.push(format!("guardrail {name} is breaching: {detail}"))
                }
                Verdict::Undecided => blockers.push(format!(
                    "guardrail {name} has not shown non-inferiority yet: {detail}"
                )),
                Verdict::InsufficientData if feedback && !require_feedback => {}
                // A stage that served no stream has no first tokens to
                // compare, and nothing a stream could regress.
                Verdict::InsufficientData
                    if result.check == Check::TtftP95
                        && result.observations.control == 0
                        && result.observations.treatment == 0 => {}
                Verdict::InsufficientData => blockers.push(format!(
                    "guardrail {name} has too little data to show non-inferiority: {detail}{}",
                    if feedback {
                        " (or set [rollout] require_feedback = false)"
                    } else {
                        ""
                    }
                )),
            }
        }
    }

    /// Moves to the next stage unless something blocks it (`force`
    /// overrides the blockers, not the end of the stages). Returns the new
    /// fraction and whether it reached disk.
    pub(crate) fn promote(
        &self,
        source: ChangeSource,
        reason: &str,
        force: bool,
    ) -> Result<(f64, bool), PromoteError> {
        let live = self.control.live();
        let current = live.config.treatment_fraction;
        let Some(next) = live.config.rollout.next_stage(current) else {
            return Err(PromoteError::Blocked(vec![format!(
                "{current} is already the last stage"
            )]));
        };
        let blockers = self.blockers();
        if !blockers.is_empty() && !force {
            return Err(PromoteError::Blocked(blockers));
        }
        let reason = if force && !blockers.is_empty() {
            format!("{reason} (forced past: {})", blockers.join("; "))
        } else {
            reason.to_owned()
        };
        self.control
            .set_fraction(next, source, &reason)
            .map(|persisted| (next, persisted))
            .map_err(PromoteError::Change)
    }

    /// The stage, the sample ratio, the guardrails and the last trip, for
    /// `GET /admin/report`.
    pub(crate) fn report(&self) -> serde_json::Value {
        let live = self.control.live();
        let rollout = &live.config.rollout;
        let guard = &live.config.guardrails;
        let current = live.config.treatment_fraction;
        let split = live.epoch.counts.check(current);
        self.control
            .metrics()
            .set_sample_ratio(&live.config.experiment, &split);
        let blockers = self.blockers();
        let (last, last_trip) = self
            .state
            .lock()
            .map(|state| (state.last.clone(), state.last_trip.clone()))
            .unwrap_or_default();
        let verdict = match &last {
            None if !guard.enabled => "disabled",
            None => "not_evaluated",
            Some(evaluation) if evaluation.error.is_some() => "no_data",
            Some(evaluation) => {
                let all = |verdict| evaluation.checks.iter().all(|r| r.decision == verdict);
                if evaluation
                    .checks
                    .iter()
                    .any(|r| r.decision == Verdict::Breach)
                {
                    "breach"
                } else if all(Verdict::InsufficientData) {
                    "insufficient_data"
                } else if all(Verdict::NonInferior) {
                    "non_inferior"
                } else {
                    "undecided"
                }
            }
        };
        let checks_run = Check::ALL.iter().filter(|c| guard.runs(**c)).count();
        let trips: serde_json::Map<String, serde_json::Value> = Check::ALL
            .iter()
            .map(|check| {
                (
                    check.as_str().to_owned(),
                    self.control.metrics().guardrail_trips(*check).into(),
                )
            })
            .collect();
        serde_json::json!({
            "experiment": live.config.experiment,
            "treatment_fraction": current,
            "stage": {
                "stages": rollout.stages,
                "current": rollout.stage_number(current),
                "next": rollout.next_stage(current),
                "since": crate::config::clock::format_rfc3339(live.epoch.since_wall),
                "seconds_in_stage": live.epoch.age_seconds(),
                "requests": {"control": split.control, "treatment": split.treatment},
                "min_stage_seconds": rollout.min_stage_seconds,
                "min_requests_per_arm": rollout.min_requests_per_arm,
                "auto_promote": rollout.auto_promote,
                "paused": self.control.runtime().paused(),
                "promotable": blockers.is_empty(),
                "blocked_by": blockers,
            },
            "pending": self.control.runtime().pending(),
            "sample_ratio": split,
            "guardrails": {
                "enabled": guard.enabled,
                "source": guard.source,
                "interval_seconds": guard.interval_seconds,
                "consecutive_breaches": guard.consecutive_breaches,
                "alpha": guard.alpha,
                "alpha_per_check": abgate_sequential::decision::split_alpha(guard.alpha, checks_run),
                "alpha_split": format!(
                    "Bonferroni: alpha {} over {checks_run} checks; identical arms trip any check during a stage with probability at most alpha, however often the guard looks",
                    guard.alpha
                ),
                "require_feedback": rollout.require_feedback,
                "on_breach": guard.on_breach,
                "verdict": verdict,
                // With [state]: whether this replica holds the fleet's
                // guard lease (the others leave the guard to it).
                "leader": self.state.lock().map(|state| state.leader).unwrap_or(false),
                // Whether the last look was at this stage (a change of the
                // split starts a new one, judged from its first look).
                "of_current_stage": last.as_ref().is_some_and(|evaluation| {
                    evaluation
                        .epoch
                        .as_ref()
                        .is_some_and(|epoch| Arc::ptr_eq(epoch, &live.epoch))
                }),
                "last_evaluation": last,
                "trips_total": trips,
            },
            "last_trip": last_trip,
        })
    }
}
