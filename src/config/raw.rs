//! The config file as written: plain serde structs, unknown keys refused,
//! every default in one place. Nothing reads these past validation but
//! the sections that are already fully typed ([`super::Snapshot`] keeps
//! those, not the file).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::ConfigError;

/// Default cap on a request body the gateway reads to rewrite `model`.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default header carrying the user ID.
pub(crate) const DEFAULT_USER_HEADER: &str = "x-user-id";
/// Longest user ID accepted; longer ones are a client bug, answered with 400.
pub(crate) const DEFAULT_MAX_USER_ID_BYTES: usize = 512;
/// Default cap on requests in flight across the gateway.
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 2048;
/// Default cap on a request's line and headers.
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// `anthropic-version` sent when the gateway injects an Anthropic key and the
/// client sent none.
pub(crate) const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// The config file as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub(crate) experiment: ExperimentConfig,
    #[serde(default)]
    pub(crate) identity: IdentityConfig,
    pub variants: VariantsConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-request JSON-lines events; none when absent.
    #[serde(default)]
    pub(crate) events: Option<crate::config::events::EventsConfig>,
    #[serde(default)]
    pub feedback: FeedbackConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub(crate) rollout: crate::config::rollout::RolloutConfig,
    #[serde(default)]
    pub(crate) guardrails: crate::config::guardrails::GuardrailsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub(crate) qa: QaConfig,
    /// The fleet's shared rollout state; none: a state file per replica.
    #[serde(default)]
    pub state: Option<crate::config::state::StateConfig>,
}

/// `[auth]`: who may use the proxy port.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Env var holding the gateway keys clients must present (comma- or
    /// newline-separated). Absent: the proxy port is open.
    #[serde(default)]
    pub api_keys_env: Option<String>,
}

/// `[qa]`: testing aids that bypass the random split.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QaConfig {
    /// Whether `x-abgate-force-variant` may pick the arm, for requests that
    /// also carry the admin token.
    #[serde(default, rename = "override")]
    pub(crate) allow_override: bool,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Env var holding the bearer token that admin state changes need.
    /// Without a token in it, state changes are refused.
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token_env: default_admin_token_env(),
        }
    }
}

fn default_admin_token_env() -> String {
    "ABGATE_ADMIN_TOKEN".to_owned()
}

/// `[feedback]`: outcome reports quoting a request id.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Env var holding the key request ids are signed with. Every replica of
    /// a fleet needs the same key to attribute each other's ids; without
    /// one, a random key per process is used.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Accepted `outcome` values (a metric label, so a fixed set).
    #[serde(default = "default_outcomes")]
    pub(crate) outcomes: Vec<String>,
    /// How long a report is remembered, so that the same request id is
    /// counted once (a second report gets a 409).
    #[serde(default = "default_feedback_max_age_seconds")]
    pub(crate) max_age_seconds: u64,
}

fn default_feedback_max_age_seconds() -> u64 {
    7 * 24 * 3600
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            key_env: None,
            outcomes: default_outcomes(),
            max_age_seconds: default_feedback_max_age_seconds(),
        }
    }
}

fn default_outcomes() -> Vec<String> {
    [
        "completed",
        "abandoned",
        "escalated",
        "thumbs_up",
        "thumbs_down",
    ]
    .map(String::from)
    .to_vec()
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Proxy listener, e.g. `127.0.0.1:8080`.
    pub(crate) listen: String,
    /// Admin listener (health, later metrics and rollout); none if absent.
    #[serde(default)]
    pub(crate) admin_listen: Option<String>,
    /// Largest JSON request body read for rewriting; larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub(crate) max_body_bytes: usize,
    /// On SIGTERM or SIGINT: how long `/readyz` answers 503 while requests
    /// are still accepted, so that load balancers stop sending first.
    #[serde(default = "default_drain_delay_ms")]
    pub drain_delay_ms: u64,
    /// Then: how long requests in flight, streams included, may take to
    /// finish once new connections are refused; what is left is cut.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

/// `[experiment]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExperimentConfig {
    /// Bounded label naming the experiment in headers, metrics and events.
    pub(crate) name: String,
    /// Share of buckets served by treatment, in `[0, 1]`.
    pub(crate) treatment_fraction: f64,
    /// When set, users are hashed as `salt + ":" + user_id`.
    #[serde(default)]
    pub(crate) salt: Option<String>,
}

/// `[identity]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityConfig {
    #[serde(default = "default_user_header")]
    pub(crate) header: String,
    /// Reject requests without a user ID (400) instead of serving them by
    /// control as `unassigned`.
    #[serde(default)]
    pub(crate) require: bool,
    #[serde(default = "default_max_user_id_bytes")]
    pub(crate) max_user_id_bytes: usize,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            header: default_user_header(),
            require: false,
            max_user_id_bytes: DEFAULT_MAX_USER_ID_BYTES,
        }
    }
}

/// `[variants.control]` and `[variants.treatment]`; no other arm exists.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VariantsConfig {
    pub control: VariantConfig,
    pub treatment: VariantConfig,
}

/// One arm's upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// Origin the request path is appended to: `https://api.openai.com`,
    /// optionally with a path prefix (`http://10.0.0.5:8000/openai`).
    pub(crate) upstream: String,
    /// Replaces the body's `model`; absent means pass the client's through.
    #[serde(default)]
    pub(crate) model: Option<String>,
    /// Env var holding the key the gateway injects; absent means the
    /// client's own credentials pass through.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Credential style; inferred from the upstream host when absent.
    #[serde(default)]
    pub(crate) provider: Option<Provider>,
    /// `anthropic-version` to send when the client sends none.
    #[serde(default)]
    pub(crate) anthropic_version: Option<String>,
    /// Extra PEM root certificates trusted for this upstream (private CAs).
    #[serde(default)]
    pub(crate) ca_file: Option<PathBuf>,
    /// Treatment only: when its upstream fails before answering (no
    /// connection, a reset or a timeout before the headers, a 5xx status),
    /// resend the request once to control and serve control's answer.
    /// Off by default, so that a failing fine-tune stays visible to users.
    #[serde(default)]
    pub(crate) fallback_to_control: bool,
}

/// How an upstream expects its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Provider {
    /// `Authorization: Bearer <key>`
    Openai,
    /// `x-api-key: <key>` plus `anthropic-version`
    Anthropic,
}

/// `[timeouts]`, in milliseconds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP + TLS connect to the upstream.
    #[serde(default = "default_connect_ms")]
    pub(crate) connect_ms: u64,
    /// Request sent to response headers received. A non-streaming completion
    /// sends its headers only when generation is done, so this is long.
    #[serde(default = "default_first_byte_ms")]
    pub first_byte_ms: u64,
    /// Longest gap between two pieces of a response body once it started:
    /// a model streaming tokens never pauses this long.
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Request start to the last byte of the answer, streams included.
    #[serde(default = "default_total_ms")]
    pub total_ms: u64,
    /// Longest wait for a client to take one write of its answer: a
    /// client that stops reading is cut off after it, and its upstream
    /// connection closed, instead of holding both (and a stream the
    /// upstream keeps generating) until `total_ms`.
    #[serde(default = "default_client_write_ms")]
    pub(crate) client_write_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            first_byte_ms: default_first_byte_ms(),
            idle_ms: default_idle_ms(),
            total_ms: default_total_ms(),
            client_write_ms: default_client_write_ms(),
        }
    }
}

/// `[limits]`: how much the gateway takes on at once.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in flight (streams until their last byte) across the
    /// gateway; past it, 503 with `Retry-After`.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Requests in flight to one upstream (control's count includes
    /// unassigned requests); none means only `max_inflight` applies.
    #[serde(default)]
    pub max_inflight_per_variant: Option<usize>,
    /// The `Retry-After` sent with a 503 for load shed.
    #[serde(default = "default_retry_after_seconds")]
    pub(crate) retry_after_seconds: u32,
    /// Request line plus headers; larger gets 431. Bound at start.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_inflight: default_max_inflight(),
            max_inflight_per_variant: None,
            retry_after_seconds: default_retry_after_seconds(),
            max_header_bytes: default_max_header_bytes(),
        }
    }
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_drain_delay_ms() -> u64 {
    5_000
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_user_header() -> String {
    DEFAULT_USER_HEADER.to_owned()
}
fn default_max_user_id_bytes() -> usize {
    DEFAULT_MAX_USER_ID_BYTES
}
fn default_connect_ms() -> u64 {
    5_000
}
fn default_first_byte_ms() -> u64 {
    300_000
}
fn default_idle_ms() -> u64 {
    60_000
}
fn default_total_ms() -> u64 {
    900_000
}
fn default_client_write_ms() -> u64 {
    30_000
}
fn default_max_inflight() -> usize {
    DEFAULT_MAX_INFLIGHT
}
fn default_retry_after_seconds() -> u32 {
    1
}
fn default_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}

impl Config {
    /// Parses TOML; unknown keys and wrong types are errors naming the key.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            // toml's own message carries line, column and a snippet.
            let message = inner.message().to_owned();
            let location = inner
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            let path = if path == "." { String::new() } else { path };
            ConfigError::one(path, format!("{message}{location}"))
        })
    }
}
