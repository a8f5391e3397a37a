//! The fleet's shared rollout state in Redis (`[state] url`).
//!
//! One hash per experiment, `<prefix>:<experiment>:rollout`, holds the
//! runtime state every replica applies (the override, the pause, the
//! change waiting for its instant) with a version; a change is written by
//! a Lua script that compares the version the writer started from and
//! refuses if another write came first (compare-and-set), appends the
//! change's audit lines to the stream `<prefix>:<experiment>:audit`, and
//! publishes the new version on `<prefix>:<experiment>:changes`. Replicas
//! subscribe to that channel, and re-read every second as a safety net, so
//! a change reaches each of them within about a second.
//!
//! Every call is bounded in time; nothing on the request path waits on the
//! store. When it cannot be reached, replicas go on with the state they
//! last applied (cached in their local state file, so a restart keeps it),
//! and changes are refused rather than applied on one replica only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::config::state::{redacted_url, StateStoreSettings};
use crate::control::rollout::Persisted;
use crate::proxy::feedback::SharedReports;

/// The longest any call to the store may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(1000);

/// Compare-and-set: KEYS = state hash, audit stream, channel; ARGV =
/// expected version, state JSON, writer, time, audit lines...
/// Returns {1, new version, ""} or {0, current version, current state}.
const COMPARE_AND_SET: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current, redis.call('HGET', KEYS[1], 'state') or ''}
end
local version = current + 1
redis.call('HSET', KEYS[1], 'version', version, 'state', ARGV[2], 'written_by', ARGV[3], 'written_at', ARGV[4])
for i = 5, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*', 'version', version, 'entry', ARGV[i])
end
redis.call('PUBLISH', KEYS[3], version)
return {1, version, ''}
";

/// Takes or renews the guard's lease: KEYS = lease; ARGV = this replica,
/// expiry in ms. 1 if this replica holds it now.
const HOLD_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Why the store did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store {url}: {why}")]
pub(crate) struct StoreError {
    url: String,
    why: String,
}

/// The state as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    /// 0: never written.
    pub(crate) version: u64,
    pub(crate) state: Persisted,
}

/// How a compare-and-set came out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Written {
    /// Written as this version.
    Version(u64),
    /// Another write came first: what the store holds now.
    Conflict(Box<Stored>),
}

/// A connection to the fleet's store for one experiment.
pub(crate) struct StateStore {
    client: redis::Client,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    url: String,
    /// `<prefix>:<experiment>`.
    base: String,
    state_key: String,
    audit_key: String,
    channel: String,
    up: AtomicBool,
    script: redis::Script,
    lease_script: redis::Script,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("url", &self.url)
            .field("state_key", &self.state_key)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// A store for `experiment`; connects on first use.
    pub(crate) fn new(settings: &StateStoreSettings, experiment: &str) -> Result<Self, String> {
        let url = redacted_url(&settings.url);
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|err| format!("state.url {url}: {err}"))?;
        if let Some(password) = &settings.password {
            info.redis.password = Some(password.clone());
        }
        let client = redis::Client::open(info).map_err(|err| format!("state.url {url}: {err}"))?;
        let base = format!("{}:{experiment}", settings.key_prefix);
        Ok(Self {
            client,
            manager: tokio::sync::Mutex::new(None),
            url,
            state_key: format!("{base}:rollout"),
            audit_key: format!("{base}:audit"),
            channel: format!("{base}:changes"),
            base,
            up: AtomicBool::new(false),
            script: redis::Script::new(COMPARE_AND_SET),
            lease_script: redis::Script::new(HOLD_LEASE),
        })
    }

    /// The URL, password redacted.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether the last call reached the store.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn error(&self, why: impl std::fmt::Display) -> StoreError {
        self.up.store(false, Ordering::Relaxed);
        StoreError {
            url: self.url.clone(),
            why: why.to_string(),
        }
    }

    /// A connection, made if there is none yet.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut manager = self.manager.lock().await;
        if let Some(existing) = manager.as_ref() {
            return Ok(existing.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(CALL_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            CALL_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| self.error("no connection within 1 s"))?
        .map_err(|err| self.error(err))?;
        *manager = Some(made.clone());
        Ok(made)
    }

    /// Runs `call` on a connection within [`CALL_TIMEOUT`], noting whether
    /// the store answered.
    async fn call<T, F>(&self, call: impl FnOnce(ConnectionManager) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let connection = self.connection().await?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, call(connection))
            .await
            .map_err(|_| self.error("no answer within 1 s"))?
            .map_err(|err| self.error(err))?;
        self.up.store(true, Ordering::Relaxed);
        Ok(answer)
    }

    /// The state the store holds (version 0 and nothing in force if it
    /// was never written).
    pub(crate) async fn load(&self) -> Result<Stored, StoreError> {
        let key = self.state_key.clone();
        let (version, state): (Option<u64>, Option<String>) = self
            .call(|mut connection| async move {
                let fields: (Option<u64>, Option<String>) =
                    connection.hget(&key, &["version", "state"]).await?;
                Ok(fields)
            })
            .await?;
        Ok(Stored {
            version: version.unwrap_or(0),
            state: self.parse(state.as_deref())?,
        })
    }

    fn parse(&self, state: Option<&str>) -> Result<Persisted, StoreError> {
        match state {
            None | Some("") => Ok(Persisted::default()),
            Some(text) => serde_json::from_str(text)
                .map_err(|err| self.error(format!("the stored state is not valid: {err}"))),
        }
    }

    /// Writes `state` if the store is still at `expected`, with the
    /// change's audit lines.
    pub(crate) async fn compare_and_set(
        &self,
        expected: u64,
        state: &Persisted,
        writer: &str,
        audit: &[String],
    ) -> Result<Written, StoreError> {
        let text = serde_json::to_string(state).map_err(|err| self.error(err))?;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&self.state_key)
            .key(&self.audit_key)
            .key(&self.channel)
            .arg(expected)
            .arg(text)
            .arg(writer)
            .arg(crate::config::clock::now_rfc3339());
        for line in audit {
            invocation.arg(line);
        }
        let (written, version, current): (u8, u64, String) = self
            .call(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if written == 1 {
            Ok(Written::Version(version))
        } else {
            Ok(Written::Conflict(Box::new(Stored {
                version,
                state: self.parse(Some(&current))?,
            })))
        }
    }

    /// Takes the guard's lease for `replica`, or renews it if it holds it
    /// already, for `expiry`: whether `replica` holds it now.
    pub(crate) async fn hold_lease(
        &self,
        replica: &str,
        expiry: Duration,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.lease_script.prepare_invoke();
        invocation
            .key(format!("{}:guard", self.base))
            .arg(replica)
            .arg(u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX));
        let held: u8 = self
            .call(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await?;
        Ok(held == 1)
    }

    /// Notes a feedback report on the request id whose MAC is `mac`, for
    /// `remember` (set-if-absent with an expiry): whether it is the first.
    pub(crate) async fn note_feedback(
        &self,
        mac: u64,
        remember: Duration,
    ) -> Result<bool, StoreError> {
        let key = format!("{}:feedback:{mac:016x}", self.base);
        let millis = u64::try_from(remember.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let set: Option<String> = self
            .call(|mut connection| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// Forwards every change notice on the channel to `notify`, for as
    /// long as it runs; resubscribes when the subscription is lost (and
    /// notifies then too, so that a change missed meanwhile is read).
    pub(crate) async fn changes(&self, notify: &tokio::sync::Notify) {
        use futures_util::StreamExt;
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(CALL_TIMEOUT, subscribed).await {
                Ok(Ok(pubsub)) => {
                    let mut messages = pubsub.into_on_message();
                    while messages.next().await.is_some() {
                        notify.notify_one();
                    }
                }
                Ok(Err(err)) => tracing::debug!("state store subscription: {err}"),
                Err(_) => tracing::debug!("state store subscription: no answer within 1 s"),
            }
            // Lost: the periodic re-read covers the gap; try again soon.
            notify.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Feedback counted once per request id across the fleet.
impl SharedReports for StateStore {
    fn note(
        &self,
        mac: u64,
        remember: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + '_>>
    {
        Box::pin(async move {
            self.note_feedback(mac, remember)
                .await
                .map_err(|err| err.to_string())
        })
    }
}
