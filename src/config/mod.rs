//! Typed configuration: TOML parsed into plain serde structs, then validated
//! whole into a [`Snapshot`] the data path reads without further checks.
//!
//! Two phases, so that every problem is reported at once with its key path
//! (`variants.treatment.upstream: ...`): serde rejects unknown keys and wrong
//! types (it stops at the first), then [`Config::validate`] checks every
//! value and collects all that are wrong. A config that fails either phase
//! never reaches the proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use serde::{Deserialize, Serialize};

pub mod clock;
pub(crate) mod credentials;
pub(crate) mod events;
pub(crate) mod guardrails;
pub mod rollout;

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
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            key_env: None,
            outcomes: default_outcomes(),
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

/// One thing wrong with a config, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub(crate) message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config; it was not applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", display_problems(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn display_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Where secrets named by the config are looked up. The process
/// environment in production; a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
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

    /// Checks every value and resolves it into a [`Snapshot`], or returns
    /// all problems found. `base_dir` anchors relative file paths.
    pub fn validate(&self, env: &dyn Env, base_dir: &Path) -> Result<Snapshot, ConfigError> {
        let mut problems = Vec::new();
        let mut report = |path: &str, message: String| {
            problems.push(Problem {
                path: path.to_owned(),
                message,
            })
        };

        let listen = parse_addr(&self.server.listen)
            .map_err(|m| report("server.listen", m))
            .ok();
        let admin_listen = match &self.server.admin_listen {
            Some(addr) => parse_addr(addr)
                .map_err(|m| report("server.admin_listen", m))
                .ok(),
            None => None,
        };
        if self.server.max_body_bytes == 0 {
            report("server.max_body_bytes", "must be greater than 0".into());
        }

        let experiment = &self.experiment;
        if !is_label_safe(&experiment.name) {
            report(
                "experiment.name",
                format!(
                    "{:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-' (it is a metric label)",
                    experiment.name
                ),
            );
        }
        let fraction = experiment.treatment_fraction;
        if let Err(why) = crate::experiment::assign::Fraction::new(fraction) {
            report("experiment.treatment_fraction", why);
        }
        if let Some(salt) = &experiment.salt {
            if salt.is_empty() {
                report(
                    "experiment.salt",
                    "must not be empty; remove it to hash user IDs unsalted".into(),
                );
            }
        }

        let user_header = match HeaderName::from_bytes(self.identity.header.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                report(
                    "identity.header",
                    format!("{:?} is not a valid HTTP header name", self.identity.header),
                );
                None
            }
        };
        if self.identity.max_user_id_bytes == 0 {
            report(
                "identity.max_user_id_bytes",
                "must be greater than 0".into(),
            );
        }
        if self.timeouts.connect_ms == 0 {
            report("timeouts.connect_ms", "must be greater than 0".into());
        }
        for (key, value) in [
            ("timeouts.first_byte_ms", self.timeouts.first_byte_ms),
            ("timeouts.idle_ms", self.timeouts.idle_ms),
            ("timeouts.total_ms", self.timeouts.total_ms),
            ("timeouts.client_write_ms", self.timeouts.client_write_ms),
        ] {
            if value == 0 {
                report(key, "must be greater than 0".into());
            }
        }
        let limits = &self.limits;
        if limits.max_inflight == 0 {
            report("limits.max_inflight", "must be greater than 0".into());
        }
        if limits.max_inflight_per_variant == Some(0) {
            report(
                "limits.max_inflight_per_variant",
                "must be greater than 0; remove it to cap only max_inflight".into(),
            );
        }
        if limits.max_header_bytes < 1024 {
            report("limits.max_header_bytes", "must be at least 1024".into());
        }
        let feedback_key = self
            .feedback
            .key_env
            .as_deref()
            .and_then(|name| signing_key(env, name, "feedback.key_env", &mut report));
        if self.feedback.outcomes.is_empty() || self.feedback.outcomes.len() > 32 {
            report("feedback.outcomes", "must list 1 to 32 outcomes".into());
        }
        for outcome in &self.feedback.outcomes {
            if !is_label_safe(outcome) {
                report(
                    "feedback.outcomes",
                    format!("{outcome:?} must be letters, digits, '.', '_' or '-' (it is a metric label)"),
                );
            }
        }
        let admin_token = env
            .var(&self.admin.token_env)
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty());
        if let Some(token) = &admin_token {
            if token.len() < 16 {
                report(
                    "admin.token_env",
                    format!(
                        "the token in {} must be at least 16 characters",
                        self.admin.token_env
                    ),
                );
            }
        }
        if self.qa.allow_override && admin_token.is_none() {
            report(
                "qa.override",
                format!(
                    "needs the admin token (in {}), which forced requests must carry",
                    self.admin.token_env
                ),
            );
        }
        let gateway_keys = match &self.auth.api_keys_env {
            None => None,
            Some(name) => match env.var(name) {
                // Refuse to start open when keys were asked for.
                None => {
                    report(
                        "auth.api_keys_env",
                        format!("environment variable {name} is not set"),
                    );
                    None
                }
                Some(text) => match crate::config::credentials::KeySet::parse(&text) {
                    Ok(keys) => Some(std::sync::Arc::new(keys)),
                    Err(message) => {
                        report(
                            "auth.api_keys_env",
                            format!("environment variable {name} {message}"),
                        );
                        None
                    }
                },
            },
        };
        if let Some(events) = &self.events {
            if events.path.is_empty() {
                report("events.path", "must be a file path, or - for stdout".into());
            }
            if events.queue == 0 {
                report("events.queue", "must be greater than 0".into());
            }
        }
        let events_user_id_key = self
            .events
            .as_ref()
            .and_then(|events| events.user_id_key_env.as_deref())
            .and_then(|name| signing_key(env, name, "events.user_id_key_env", &mut report));

        let schedule = self
            .rollout
            .validate(experiment.treatment_fraction, &mut report);
        self.guardrails
            .validate(&self.feedback.outcomes, &mut report);

        if self.variants.control.fallback_to_control {
            report(
                "variants.control.fallback_to_control",
                "only variants.treatment can fall back to control".into(),
            );
        }
        let control = resolve_variant(
            "variants.control",
            &self.variants.control,
            env,
            base_dir,
            &mut report,
        );
        let treatment = resolve_variant(
            "variants.treatment",
            &self.variants.treatment,
            env,
            base_dir,
            &mut report,
        );

        match (listen, user_header, control, treatment) {
            (Some(listen), Some(user_header), Some(control), Some(treatment))
                if problems.is_empty() =>
            {
                Ok(Snapshot {
                    listen,
                    admin_listen,
                    max_body_bytes: self.server.max_body_bytes,
                    experiment: experiment.name.clone(),
                    experiment_header: HeaderValue::from_str(&experiment.name)
                        .map_err(|_| ConfigError::one("experiment.name", "not a header value"))?,
                    treatment_fraction: fraction,
                    salt: experiment.salt.clone(),
                    user_header,
                    require_user: self.identity.require,
                    max_user_id_bytes: self.identity.max_user_id_bytes,
                    control,
                    treatment,
                    feedback_key,
                    events_user_id_key,
                    admin_token: admin_token.map(|token| {
                        crate::config::credentials::SecretDigest::of(token.as_bytes())
                    }),
                    gateway_keys,
                    qa_override: self.qa.allow_override,
                    connect_timeout: Duration::from_millis(self.timeouts.connect_ms),
                    first_byte_timeout: Duration::from_millis(self.timeouts.first_byte_ms),
                    idle_timeout: Duration::from_millis(self.timeouts.idle_ms),
                    total_timeout: Duration::from_millis(self.timeouts.total_ms),
                    client_write_timeout: Duration::from_millis(self.timeouts.client_write_ms),
                    fallback_to_control: self.variants.treatment.fallback_to_control,
                    drain_delay: Duration::from_millis(self.server.drain_delay_ms),
                    drain_timeout: Duration::from_millis(self.server.drain_timeout_ms),
                    schedule,
                    config: self.clone(),
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path, env: &dyn Env) -> Result<Snapshot, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|err| ConfigError::one("", format!("cannot read {}: {err}", path.display())))?;
    load_bytes(path, &bytes, env)
}

/// Parses and validates `bytes`, already read from `path` (paths inside
/// resolve beside it); the file is not read again.
pub(crate) fn load_bytes(
    path: &Path,
    bytes: &[u8],
    env: &dyn Env,
) -> Result<Snapshot, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|err| ConfigError::one("", format!("{} is not UTF-8: {err}", path.display())))?;
    let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
    Config::parse(text)?.validate(env, base_dir)
}

/// The key in env var `name` (at least 16 characters), or a problem at
/// `path`; the key itself is never quoted.
fn signing_key(
    env: &dyn Env,
    name: &str,
    path: &str,
    report: &mut dyn FnMut(&str, String),
) -> Option<Secret<Vec<u8>>> {
    match env.var(name) {
        Some(key) if key.len() >= 16 => Some(Secret(key.into_bytes())),
        Some(_) => {
            report(
                path,
                format!("environment variable {name} must hold at least 16 characters"),
            );
            None
        }
        None => {
            report(path, format!("environment variable {name} is not set"));
            None
        }
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:8080"))
}

fn is_label_safe(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn resolve_variant(
    path: &str,
    variant: &VariantConfig,
    env: &dyn Env,
    base_dir: &Path,
    report: &mut dyn FnMut(&str, String),
) -> Option<Upstream> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        ok = false;
        report(&format!("{path}.{key}"), message);
    };

    let origin = match parse_upstream(&variant.upstream) {
        Ok(origin) => Some(origin),
        Err(message) => {
            fail("upstream", message);
            None
        }
    };

    let model = match &variant.model {
        Some(name) if name.is_empty() => {
            fail(
                "model",
                "must not be empty; remove it to pass the client's model through".into(),
            );
            None
        }
        Some(name) => match ModelRewrite::new(name) {
            Some(rewrite) => Some(rewrite),
            None => {
                fail(
                    "model",
                    format!("{name:?} cannot be sent as an HTTP header value"),
                );
                None
            }
        },
        None => None,
    };

    let provider = variant.provider.unwrap_or_else(|| match &origin {
        Some((_, authority, _)) if authority.host().ends_with("anthropic.com") => {
            Provider::Anthropic
        }
        _ => Provider::Openai,
    });

    let anthropic_version = variant
        .anthropic_version
        .as_deref()
        .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
    let anthropic_version = match HeaderValue::from_str(anthropic_version) {
        Ok(value) => Some(value),
        Err(_) => {
            fail(
                "anthropic_version",
                format!("{anthropic_version:?} is not a valid header value"),
            );
            None
        }
    };

    let credential = match &variant.api_key_env {
        None => None,
        Some(name) => match env.var(name) {
            None => {
                fail(
                    "api_key_env",
                    format!("environment variable {name} is not set"),
                );
                None
            }
            Some(key) if key.trim().is_empty() => {
                fail(
                    "api_key_env",
                    format!("environment variable {name} is empty"),
                );
                None
            }
            Some(key) => {
                let value = match provider {
                    Provider::Openai => HeaderValue::from_str(&format!("Bearer {}", key.trim())),
                    Provider::Anthropic => HeaderValue::from_str(key.trim()),
                };
                match value {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        Some(value)
                    }
                    Err(_) => {
                        // Never echo the key itself.
                        fail(
                            "api_key_env",
                            format!("environment variable {name} holds characters not allowed in a header"),
                        );
                        None
                    }
                }
            }
        },
    };

    let ca_file = variant.ca_file.as_ref().map(|file| {
        if file.is_absolute() {
            file.clone()
        } else {
            base_dir.join(file)
        }
    });
    if let Some(file) = &ca_file {
        if let Err(message) = read_pem_certs(file) {
            fail("ca_file", message);
        }
    }

    let (scheme, authority, path_prefix) = origin?;
    let anthropic_version = anthropic_version?;
    ok.then_some(Upstream {
        scheme,
        authority,
        path_prefix,
        model,
        provider,
        credential,
        anthropic_version,
        ca_file,
    })
}

/// Splits `scheme://authority[/prefix]`, rejecting anything else.
fn parse_upstream(text: &str) -> Result<(Scheme, Authority, String), String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL like https://api.openai.com"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{text:?} must not carry credentials; use api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query string"));
    }
    let prefix = uri.path().trim_end_matches('/').to_owned();
    if prefix.ends_with("/v1") {
        return Err(format!(
            "{text:?} ends in /v1, but the client's path (/v1/...) is appended as is; use the origin, e.g. {}://{}",
            scheme, authority
        ));
    }
    Ok((scheme, authority, prefix))
}

/// Reads every certificate in a PEM file; at least one must be there.
pub(crate) fn read_pem_certs(
    file: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(format!("{} holds no PEM certificate", file.display())),
        Err(err) => Err(format!("{} is not valid PEM: {err}", file.display())),
    }
}

/// A value that must not reach logs: `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(pub T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The validated config the data path reads: everything parsed, every
/// header value built, no further checks needed per request.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub(crate) max_body_bytes: usize,
    pub experiment: String,
    pub(crate) experiment_header: HeaderValue,
    pub treatment_fraction: f64,
    pub(crate) salt: Option<String>,
    pub(crate) user_header: HeaderName,
    pub(crate) require_user: bool,
    pub(crate) max_user_id_bytes: usize,
    pub control: Upstream,
    pub treatment: Upstream,
    /// Key request ids are signed with, from `feedback.key_env`.
    pub feedback_key: Option<Secret<Vec<u8>>>,
    /// HMAC key for hashed user IDs in events, from
    /// `events.user_id_key_env`.
    pub(crate) events_user_id_key: Option<Secret<Vec<u8>>>,
    /// Digest of the bearer token for admin calls (and forced variants),
    /// from `admin.token_env`.
    pub admin_token: Option<crate::config::credentials::SecretDigest>,
    /// Keys clients must present on the proxy port, from
    /// `auth.api_keys_env`; none means the port is open.
    pub gateway_keys: Option<std::sync::Arc<crate::config::credentials::KeySet>>,
    /// `[qa] override`: forced variants allowed (with the admin token).
    pub(crate) qa_override: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) first_byte_timeout: Duration,
    /// Longest gap between response body frames.
    pub(crate) idle_timeout: Duration,
    /// Request start to the answer's last byte.
    pub(crate) total_timeout: Duration,
    /// Longest wait for the client to take one write of the answer.
    pub(crate) client_write_timeout: Duration,
    /// Resend to control what treatment's upstream failed before answering.
    pub(crate) fallback_to_control: bool,
    /// On shutdown: not ready, still serving, for this long.
    pub(crate) drain_delay: Duration,
    /// On shutdown: in-flight requests get this long, then are cut.
    pub(crate) drain_timeout: Duration,
    /// The file's split over time: `treatment_fraction`, then any
    /// `[[rollout.scheduled]]` entries.
    pub(crate) schedule: crate::config::rollout::FileSchedule,
    /// The config as written (secrets appear only as env var names).
    pub(crate) config: Config,
}

impl Snapshot {
    /// The upstream serving a variant; unassigned users go to control.
    pub(crate) fn upstream(&self, variant: crate::experiment::assign::Variant) -> &Upstream {
        match variant {
            crate::experiment::assign::Variant::Treatment => &self.treatment,
            crate::experiment::assign::Variant::Control
            | crate::experiment::assign::Variant::Unassigned => &self.control,
        }
    }
}

/// One arm's resolved upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix without a trailing slash; usually empty.
    pub(crate) path_prefix: String,
    pub model: Option<ModelRewrite>,
    pub(crate) provider: Provider,
    /// Header value of the injected credential, marked sensitive.
    pub credential: Option<HeaderValue>,
    pub(crate) anthropic_version: HeaderValue,
    pub(crate) ca_file: Option<PathBuf>,
}

/// A model name prepared once for the body splice and the response header.
#[derive(Debug, Clone)]
pub struct ModelRewrite {
    pub name: String,
    /// The name as a JSON string literal, quotes and escapes included.
    pub(crate) json: bytes::Bytes,
    pub(crate) header: HeaderValue,
}

impl ModelRewrite {
    fn new(name: &str) -> Option<Self> {
        let json = serde_json::to_vec(name).ok()?;
        Some(Self {
            name: name.to_owned(),
            json: json.into(),
            header: HeaderValue::from_str(name).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([("KEY".to_owned(), "sk-test".to_owned())])
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
[experiment]
name = "exp"
treatment_fraction = 0.1
[variants.control]
upstream = "https://api.openai.com"
model = "gpt-4o-mini"
api_key_env = "KEY"
[variants.treatment]
upstream = "https://api.anthropic.com/"
"#;

    #[test]
    fn good_config_resolves() {
        let snapshot = Config::parse(GOOD)
            .and_then(|c| c.validate(&env(), Path::new(".")))
            .unwrap();
        assert_eq!(snapshot.control.provider, Provider::Openai);
        assert_eq!(snapshot.treatment.provider, Provider::Anthropic);
        assert_eq!(snapshot.treatment.path_prefix, "");
        assert!(snapshot.control.credential.as_ref().unwrap().is_sensitive());
        assert_eq!(snapshot.user_header.as_str(), "x-user-id");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = GOOD.replace("model = \"gpt-4o-mini\"", "modle = \"gpt-4o-mini\"");
        let err = Config::parse(&text).unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("variants.control"), "{line}");
        assert!(line.contains("modle"), "{line}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = GOOD
            .replace("0.1", "1.5")
            .replace("https://api.openai.com", "ftp://x")
            .replace("KEY", "MISSING_KEY");
        let err = Config::parse(&text)
            .unwrap()
            .validate(&env(), Path::new("."))
            .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "experiment.treatment_fraction",
                "variants.control.upstream",
                "variants.control.api_key_env"
            ]
        );
    }

    #[test]
    fn upstream_ending_in_v1_is_refused() {
        let err = parse_upstream("https://api.openai.com/v1").unwrap_err();
        assert!(err.contains("appended"), "{err}");
        let (_, authority, prefix) = parse_upstream("http://10.0.0.5:8000/openai/").unwrap();
        assert_eq!(
            (authority.as_str(), prefix.as_str()),
            ("10.0.0.5:8000", "/openai")
        );
    }
}
