//! What validation yields: the config as the gateway reads it, every
//! value parsed and every header value built, so that nothing is checked
//! again per request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use super::raw::*;

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
    /// `[limits]`.
    pub(crate) limits: LimitsConfig,
    /// `[feedback]`: the outcomes reports may name, and their key's env var.
    pub(crate) feedback: FeedbackConfig,
    /// `[guardrails]`, validated.
    pub(crate) guardrails: crate::config::guardrails::GuardrailsConfig,
    /// `[rollout]`, validated (its schedule is [`Snapshot::schedule`]).
    pub(crate) rollout: crate::config::rollout::RolloutConfig,
    /// `[events]`, if on.
    pub(crate) events: Option<crate::config::events::EventsConfig>,
    /// `[state]`, if the fleet shares its rollout state.
    pub(crate) state: Option<crate::config::state::StateStoreSettings>,
    /// The env var the admin token is read from, for messages that say
    /// where to set it.
    pub(crate) admin_token_env: String,
    /// The file as written, rendered once for `GET /admin/config` (which
    /// redacts it further); nothing else reads it. Secrets appear in it
    /// only as the names of their env vars.
    pub(crate) written: std::sync::Arc<serde_json::Value>,
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
    pub(super) fn new(name: &str) -> Option<Self> {
        let json = serde_json::to_vec(name).ok()?;
        Some(Self {
            name: name.to_owned(),
            json: json.into(),
            header: HeaderValue::from_str(name).ok()?,
        })
    }
}
