//! The live config: what the data path serves now, and every change to
//! it. A file reload, an operator's call, a scheduled entry coming due and
//! the guard all change it here, one at a time, each building the next
//! [`Live`] whole and swapping it in; requests already started finish on
//! the one they started with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::rollout::RuntimeState;
use super::store::{StateStore, Stored, Written};
use crate::config::rollout::ChangeSource;
use crate::config::Snapshot;
use crate::experiment::assign::Fraction;
use crate::experiment::request_id::RequestIds;
use crate::proxy::client::HttpClient;
use crate::proxy::{Gateway, Live};
use crate::telemetry::metrics::{ExperimentMetrics, Metrics};
use crate::telemetry::stage::SplitEpoch;

/// Why a change of the live config did not happen, or did not stick.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Not a treatment fraction: nothing changed.
    #[error("treatment_fraction {0}")]
    InvalidFraction(String),
    /// The change is in force but did not reach the state file.
    #[error("{0}")]
    NotPersisted(#[from] super::rollout::StateError),
    /// A new config's upstream client could not be built (its CA files):
    /// nothing changed.
    #[error("{0}")]
    Client(String),
    /// An earlier change panicked while holding the lock.
    #[error("config lock poisoned")]
    Poisoned,
    /// The fleet's state store could not be reached: nothing changed,
    /// here or anywhere.
    #[error("{0}; nothing changed (the fleet keeps the state it has)")]
    StoreUnavailable(String),
    /// Another change reached the fleet's store first (or the version the
    /// change expected is not the store's): nothing changed.
    #[error("the fleet's rollout state is at version {current}{}; nothing changed: read it again and retry", .expected.map(|v| format!(", not {v}")).unwrap_or_default())]
    Conflict { current: u64, expected: Option<u64> },
}

/// How long the guard's lease lasts unrenewed; the supervisor renews it at
/// every tick (at least every second).
const LEASE_EXPIRY: Duration = Duration::from_secs(5);

/// Logged when a change made here during an outage loses to a newer one.
const OVERTAKEN: &str =
    "a change made here while the store was unreachable was overtaken by a newer one in the store";

/// How often the fleet's store is re-read without a change notice.
const STORE_REREAD: Duration = Duration::from_secs(1);

/// When the running config was applied, and how the last reload went.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ConfigStatus {
    /// Configs applied since start (1 = the one started with).
    pub(crate) generation: u64,
    pub(crate) applied_at: String,
    pub(crate) last_reload_at: Option<String>,
    /// Why the last reload was rejected; cleared by the next good one.
    pub(crate) last_reload_error: Option<String>,
    /// Changes in the applied config that only a restart applies.
    pub(crate) pending_restart: Vec<String>,
}

/// The gateway's data path and the state that changes what it serves.
pub struct LiveConfig {
    gateway: Arc<Gateway>,
    /// Signs request ids when the config names no key; fixed for the
    /// process so ids stay verifiable across reloads.
    process_ids: RequestIds,
    status: Mutex<ConfigStatus>,
    /// Runtime changes to the split and where they are kept.
    runtime: RuntimeState,
    /// Serialises changes of the live config (reloads and API calls).
    changing: Mutex<()>,
    /// The fleet's shared state, with `[state]`.
    store: Option<Arc<StateStore>>,
    /// The store's version the runtime state is at (0: never written).
    store_version: AtomicU64,
    /// One change through the store at a time on this replica.
    transaction: tokio::sync::Mutex<()>,
    /// Woken by the store's change notices.
    store_changed: Arc<tokio::sync::Notify>,
    /// A change was made here while the store could not be reached (a
    /// guardrail rollback does not wait): written once it answers.
    unsynced: std::sync::atomic::AtomicBool,
    /// This replica's name in the guard's lease.
    replica: String,
}

/// The fleet's state store as `/admin/rollout` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StoreStatus {
    pub(crate) url: String,
    pub(crate) up: bool,
    /// The version this replica's state is at.
    pub(crate) version: u64,
}

impl LiveConfig {
    /// A gateway serving `snapshot` (with any runtime change in `runtime`
    /// that still applies), recording into `metrics`.
    pub(crate) fn new(
        mut snapshot: Snapshot,
        metrics: Arc<Metrics>,
        runtime: RuntimeState,
    ) -> Result<Self, String> {
        let store = snapshot
            .state
            .as_ref()
            .map(|settings| StateStore::new(settings, &snapshot.experiment).map(Arc::new))
            .transpose()?;
        let file_fraction = in_force(&runtime, &mut snapshot);
        let client = crate::proxy::client::build(&snapshot)?;
        let process_ids = RequestIds::with_random_key();
        let bound = Arc::new(metrics.bind(&snapshot.experiment, snapshot.treatment_fraction));
        let request_ids = ids_for(&snapshot, &process_ids);
        let epoch = Arc::new(SplitEpoch::begin(
            reading(&metrics, &bound, &snapshot),
            true,
        ));
        let live = Live {
            config: snapshot,
            metrics: bound,
            request_ids,
            client,
            epoch,
            file_fraction,
        };
        let gateway = Arc::new(Gateway::new(live, metrics)?);
        if let Some(store) = &store {
            gateway.share_reports(store.clone());
        }
        Ok(Self {
            gateway,
            process_ids,
            status: Mutex::new(ConfigStatus {
                generation: 1,
                applied_at: crate::config::clock::now_rfc3339(),
                last_reload_at: None,
                last_reload_error: None,
                pending_restart: Vec::new(),
            }),
            runtime,
            changing: Mutex::new(()),
            store,
            store_version: AtomicU64::new(0),
            transaction: tokio::sync::Mutex::new(()),
            store_changed: Arc::new(tokio::sync::Notify::new()),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            replica: format!("{:016x}", fastrand::u64(..)),
        })
    }

    /// Whether this replica runs the guard and automatic promotion now.
    /// Without a store, always. With one, only the holder of the fleet's
    /// lease, taken or renewed here for [`LEASE_EXPIRY`]: a replica that
    /// stops renewing hands it over within that. While the store does not
    /// answer, every replica guards itself: a rollback matters more than
    /// a single one.
    pub(crate) async fn leads_the_guard(&self) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        match store.hold_lease(&self.replica, LEASE_EXPIRY).await {
            Ok(held) => held,
            Err(err) => {
                tracing::warn!("guarding on this replica's own while the store is away: {err}");
                true
            }
        }
    }

    /// Notes that the runtime state changed here without reaching the
    /// store: the next time it answers, this state is written to it (if
    /// nothing newer was written there meanwhile).
    pub(crate) fn write_to_store_later(&self) {
        if self.store.is_some() {
            self.unsynced.store(true, Ordering::Relaxed);
        }
    }

    /// The fleet's store, as `/admin/rollout` shows it; none without one.
    pub(crate) fn store_status(&self) -> Option<StoreStatus> {
        self.store.as_ref().map(|store| StoreStatus {
            url: store.url().to_owned(),
            up: store.is_up(),
            version: self.store_version.load(Ordering::Relaxed),
        })
    }

    /// Makes a change of the runtime state (`change`, the same code with or
    /// without a store) under the fleet's store: the latest state is read
    /// first, the change applied on it, then written by compare-and-set on
    /// the version read (or `expected`, if the caller names one). If the
    /// write does not happen, the change is undone here and the error says
    /// why: the store could not be reached (nothing changed anywhere), or
    /// another change came first. Without a store, `change` alone.
    pub(crate) async fn transact<T, E: From<ChangeError>>(
        &self,
        expected: Option<u64>,
        change: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let Some(store) = self.store.clone() else {
            return change();
        };
        let _one = self.transaction.lock().await;
        let stored = store
            .load()
            .await
            .map_err(|err| ChangeError::StoreUnavailable(err.to_string()))?;
        self.adopt(&stored);
        if expected.is_some_and(|expected| expected != stored.version) {
            return Err(ChangeError::Conflict {
                current: stored.version,
                expected,
            }
            .into());
        }
        let before = self.runtime.snapshot();
        self.runtime.capture_audit(true);
        let result = change();
        let audit = self.runtime.capture_audit(false);
        let after = self.runtime.snapshot();
        let value = result?;
        if after == before {
            return Ok(value);
        }
        let writer = self.writer();
        match store
            .compare_and_set(stored.version, &after, &writer, &audit)
            .await
        {
            Ok(Written::Version(version)) => {
                self.store_version.store(version, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Written::Conflict(current)) => {
                self.adopt(&current);
                Err(ChangeError::Conflict {
                    current: current.version,
                    expected: Some(stored.version),
                }
                .into())
            }
            Err(err) => {
                self.adopt(&Stored {
                    version: stored.version,
                    state: before,
                });
                Err(ChangeError::StoreUnavailable(err.to_string()).into())
            }
        }
    }

    /// How this replica signs what it writes to the store: its proxy
    /// address.
    fn writer(&self) -> String {
        self.gateway.live().config.listen.to_string()
    }

    /// Reads the store and puts its state in force if it is newer than
    /// this replica's (a change another replica made). Returns whether the
    /// store answered.
    pub(crate) async fn sync_from_store(&self) -> bool {
        let Some(store) = self.store.clone() else {
            return true;
        };
        let _one = self.transaction.lock().await;
        match store.load().await {
            Ok(stored) => {
                let local = self.store_version.load(Ordering::Relaxed);
                if self.unsynced.load(Ordering::Relaxed) && stored.version == local {
                    let state = self.runtime.snapshot();
                    let writer = self.writer();
                    let reason = vec![
                        "a change made while the store could not be reached (a guardrail rollback)"
                            .to_owned(),
                    ];
                    match store.compare_and_set(local, &state, &writer, &reason).await {
                        Ok(Written::Version(version)) => {
                            self.store_version.store(version, Ordering::Relaxed);
                            self.unsynced.store(false, Ordering::Relaxed);
                        }
                        Ok(Written::Conflict(current)) => {
                            tracing::error!("{OVERTAKEN}");
                            self.unsynced.store(false, Ordering::Relaxed);
                            self.adopt(&current);
                        }
                        Err(err) => tracing::warn!("{err}"),
                    }
                } else if stored.version > local {
                    if self.unsynced.swap(false, Ordering::Relaxed) {
                        tracing::error!("{OVERTAKEN}");
                    }
                    self.adopt(&stored);
                }
                true
            }
            Err(err) => {
                tracing::warn!("{err}");
                false
            }
        }
    }

    /// Follows the store: its change notices and a re-read every second,
    /// until `stop`.
    pub(crate) async fn follow_store(&self, stop: impl std::future::Future<Output = ()>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let notices = {
            let notify = self.store_changed.clone();
            tokio::spawn(async move { store.changes(&notify).await })
        };
        tokio::pin!(stop);
        loop {
            let up = self.sync_from_store().await;
            self.gateway.metrics().set_state_store_up(up);
            tokio::select! {
                () = &mut stop => break,
                () = self.store_changed.notified() => {}
                () = tokio::time::sleep(STORE_REREAD) => {}
            }
        }
        notices.abort();
    }

    /// Puts a state read from the store in force here: the runtime state
    /// (and its local copy), then the split it implies.
    fn adopt(&self, stored: &Stored) {
        self.store_version.store(stored.version, Ordering::Relaxed);
        if self.runtime.snapshot() == stored.state {
            return;
        }
        if let Err(err) = self.runtime.replace(stored.state.clone()) {
            tracing::error!("the fleet's state is in force but not cached: {err}");
        }
        if let Err(err) = self.follow_file(
            true,
            ChangeSource::Api,
            "the fleet's shared state changed (another replica, or a change undone)",
        ) {
            tracing::error!("the fleet's state: {err}");
        }
    }

    /// The data path this config serves.
    pub(crate) fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The config (and metric children) requests start on now.
    pub(crate) fn live(&self) -> Arc<Live> {
        self.gateway.live()
    }

    /// The process's metric registry.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        self.gateway.metrics()
    }

    /// The runtime change in force, if any.
    pub(crate) fn runtime_override(&self) -> Option<super::rollout::Override> {
        self.runtime.current()
    }

    /// Sets the treatment fraction at run time (`source`: api, guardrail…):
    /// applied at once, then persisted and audited. Returns whether the
    /// change reached disk.
    pub fn set_fraction(
        &self,
        fraction: f64,
        source: ChangeSource,
        reason: &str,
    ) -> Result<bool, ChangeError> {
        Fraction::new(fraction).map_err(ChangeError::InvalidFraction)?;
        let _changing = self.changing.lock().map_err(|_| ChangeError::Poisoned)?;
        let previous = self.gateway.live();
        let old = previous.config.treatment_fraction;
        let mut config = previous.config.clone();
        config.treatment_fraction = fraction;
        let state = super::rollout::Override {
            experiment: config.experiment.clone(),
            treatment_fraction: fraction,
            config_fraction: previous.file_fraction.0,
            source,
            reason: reason.to_owned(),
            at: crate::config::clock::now_rfc3339(),
        };
        // Serve the new split first: a rollback must not wait on a disk.
        let (request_ids, client) = (previous.request_ids.clone(), previous.client.clone());
        self.gateway.swap(self.next_live(
            &previous,
            config,
            request_ids,
            client,
            previous.file_fraction,
        ));
        self.runtime
            .record(state, old)
            .map_err(ChangeError::NotPersisted)
    }

    /// Follows the file's `[[rollout.scheduled]]` entries: when the file's
    /// fraction at this instant differs from the one in force, it applies
    /// (dropping any older runtime change) and the change is audited.
    /// Returns whether the split changed.
    pub(crate) fn follow_file_schedule(&self) -> Result<bool, ChangeError> {
        let latched = self.runtime.latched();
        let reason = if latched {
            "a [[rollout.scheduled]] entry in the config file came due; held by the guardrail trip until an operator resumes"
        } else {
            "a [[rollout.scheduled]] entry in the config file came due"
        };
        self.follow_file(false, ChangeSource::Schedule, reason)
    }

    /// Lifts a pause (`POST /admin/resume`). After a guardrail trip that
    /// is also the end of its latch: a fraction the file came to say
    /// meanwhile (an edit, a scheduled entry) applies now. Returns whether
    /// the pause's end reached disk.
    pub(crate) fn resume(&self, reason: &str) -> Result<bool, ChangeError> {
        let live = self.gateway.live();
        let persisted = self.runtime.set_paused(
            None,
            &live.config.experiment,
            live.config.treatment_fraction,
            ChangeSource::Api,
            reason,
        )?;
        self.follow_file(
            true,
            ChangeSource::Api,
            "resumed: the config file's newer fraction applies",
        )?;
        Ok(persisted)
    }

    /// Puts the file's fraction at this instant in force (unless a runtime
    /// change still applies), when it differs from the last one followed
    /// or when `always`. Returns whether the split changed.
    fn follow_file(
        &self,
        always: bool,
        source: ChangeSource,
        reason: &str,
    ) -> Result<bool, ChangeError> {
        let _changing = self.changing.lock().map_err(|_| ChangeError::Poisoned)?;
        let previous = self.gateway.live();
        let mut config = previous.config.clone();
        let (now_fraction, _) = config.schedule.fraction_at(std::time::SystemTime::now());
        if !always && now_fraction == previous.file_fraction.0 {
            return Ok(false);
        }
        let file_fraction = in_force(&self.runtime, &mut config);
        let old = previous.config.treatment_fraction;
        let new = config.treatment_fraction;
        if always && old == new {
            return Ok(false);
        }
        let (request_ids, client) = (previous.request_ids.clone(), previous.client.clone());
        self.gateway
            .swap(self.next_live(&previous, config, request_ids, client, file_fraction));
        self.runtime.audit(&super::rollout::AuditEntry {
            time: crate::config::clock::now_rfc3339(),
            experiment: &previous.config.experiment,
            action: "set",
            source,
            old,
            new,
            reason,
        });
        Ok(old != new)
    }

    /// Runtime rollout state: pauses and pending changes.
    pub(crate) fn runtime(&self) -> &RuntimeState {
        &self.runtime
    }

    /// The upstream connection pool (also used to query Prometheus).
    pub(crate) fn http_client(&self) -> HttpClient {
        self.gateway.live().client.clone()
    }

    /// Swaps in a validated config. Requests already started finish on the
    /// config they started with; new ones see this one. Listener addresses
    /// and the event sink are bound at start: changes to them are reported
    /// as waiting for a restart.
    pub(crate) fn apply(&self, mut snapshot: Snapshot) -> Result<(), ChangeError> {
        let _changing = self.changing.lock().map_err(|_| ChangeError::Poisoned)?;
        let file_fraction = in_force(&self.runtime, &mut snapshot);
        let previous = self.gateway.live();
        let old = &previous.config;
        let client = if transport(old) == transport(&snapshot) {
            previous.client.clone()
        } else {
            crate::proxy::client::build(&snapshot).map_err(ChangeError::Client)?
        };
        let mut pending_restart = Vec::new();
        if old.listen != snapshot.listen {
            pending_restart.push("server.listen".to_owned());
        }
        if old.admin_listen != snapshot.admin_listen {
            pending_restart.push("server.admin_listen".to_owned());
        }
        if old.limits.max_header_bytes != snapshot.limits.max_header_bytes {
            pending_restart.push("limits.max_header_bytes".to_owned());
        }
        if old.state != snapshot.state
            || old.experiment != snapshot.experiment && old.state.is_some()
        {
            // The store (and its keys, named by the experiment) is bound at start.
            pending_restart.push("state".to_owned());
        }
        if old
            .events
            .as_ref()
            .map(|e| (&e.path, e.user_id, &e.user_id_key_env, e.queue))
            != snapshot
                .events
                .as_ref()
                .map(|e| (&e.path, e.user_id, &e.user_id_key_env, e.queue))
        {
            pending_restart.push("events".to_owned());
        }
        let request_ids = ids_for(&snapshot, &self.process_ids);
        self.gateway
            .swap(self.next_live(&previous, snapshot, request_ids, client, file_fraction));
        self.gateway.metrics().config_reloaded(true);
        if let Ok(mut status) = self.status.lock() {
            let now = crate::config::clock::now_rfc3339();
            status.generation += 1;
            status.applied_at = now.clone();
            status.last_reload_at = Some(now);
            status.last_reload_error = None;
            status.pending_restart = pending_restart;
        }
        Ok(())
    }

    /// The `Live` that follows `previous` for `config`: metric children
    /// bound to it, and the per-arm counts kept only while the split is the
    /// same one (same experiment, salt and fraction); a new split starts
    /// them anew.
    fn next_live(
        &self,
        previous: &Live,
        config: Snapshot,
        request_ids: RequestIds,
        client: HttpClient,
        file_fraction: (f64, ChangeSource),
    ) -> Live {
        let old = &previous.config;
        let same_split = config.treatment_fraction == old.treatment_fraction
            && config.experiment == old.experiment
            && config.salt == old.salt;
        let metrics = Arc::new(
            self.gateway
                .metrics()
                .bind(&config.experiment, config.treatment_fraction),
        );
        Live {
            epoch: if same_split {
                previous.epoch.clone()
            } else {
                Arc::new(SplitEpoch::begin(
                    reading(self.gateway.metrics(), &metrics, &config),
                    false,
                ))
            },
            metrics,
            config,
            request_ids,
            client,
            file_fraction,
        }
    }

    /// Notes a rejected config: the running one stays.
    pub(crate) fn reject(&self, error: &str) {
        self.gateway.metrics().config_reloaded(false);
        if let Ok(mut status) = self.status.lock() {
            status.last_reload_at = Some(crate::config::clock::now_rfc3339());
            status.last_reload_error = Some(error.to_owned());
        }
    }

    /// When the running config was applied and how the last reload went.
    pub(crate) fn config_status(&self) -> Option<ConfigStatus> {
        self.status.lock().ok().map(|status| status.clone())
    }
}

/// Settings baked into the upstream client: a change rebuilds it.
#[allow(clippy::type_complexity)]
fn transport(
    config: &Snapshot,
) -> (
    std::time::Duration,
    [Option<&std::path::PathBuf>; 2],
    [(&http::uri::Scheme, &http::uri::Authority); 2],
) {
    (
        config.connect_timeout,
        [
            config.control.ca_file.as_ref(),
            config.treatment.ca_file.as_ref(),
        ],
        [
            (&config.control.scheme, &config.control.authority),
            (&config.treatment.scheme, &config.treatment.authority),
        ],
    )
}

/// The config's signing key, or the process's own.
fn ids_for(config: &Snapshot, process_ids: &RequestIds) -> RequestIds {
    match &config.feedback_key {
        Some(key) => RequestIds::new(key.0.clone()),
        None => process_ids.clone(),
    }
}

/// Sets `snapshot`'s fraction in force: the file's at this instant, unless
/// a runtime change made against that same file fraction still applies.
/// Returns the file's fraction and where it comes from.
fn in_force(runtime: &RuntimeState, snapshot: &mut Snapshot) -> (f64, ChangeSource) {
    let (file_fraction, file_source) = snapshot.schedule.fraction_at(std::time::SystemTime::now());
    snapshot.treatment_fraction = file_fraction;
    if let Some(state) = runtime.resolve(&snapshot.experiment, file_fraction, file_source) {
        snapshot.treatment_fraction = state.treatment_fraction;
    }
    (file_fraction, file_source)
}

/// The guardrails' reading of `config`'s experiment now.
fn reading(
    metrics: &Metrics,
    bound: &ExperimentMetrics,
    config: &Snapshot,
) -> crate::telemetry::readback::Reading {
    crate::telemetry::readback::Reading::take(
        metrics,
        bound,
        &config.experiment,
        &config.feedback.outcomes,
        &config.guardrails.completion_outcome,
    )
}
