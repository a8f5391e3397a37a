//! `[events]`: where per-request events go and how they name the user.

use serde::{Deserialize, Serialize};

/// How the user ID appears in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UserIdMode {
    /// As sent.
    Raw,
    /// SHA-256 hex of the UTF-8 ID, joinable without storing the ID
    /// itself; HMAC-SHA256 with the key in `user_id_key_env` when set.
    #[default]
    Hash,
    /// Left out.
    Omit,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsConfig {
    /// File to append JSON lines to; `-` for stdout.
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) user_id: UserIdMode,
    /// Env var holding a key that makes `hash` an HMAC-SHA256: a dictionary
    /// of likely IDs (emails, sequential numbers) no longer reverses it, and
    /// only holders of the key can compute the same value from their user
    /// table. Absent: plain SHA-256, which anyone can recompute.
    #[serde(default)]
    pub(crate) user_id_key_env: Option<String>,
    /// Events held while the writer catches up; more are dropped.
    #[serde(default = "default_queue")]
    pub(crate) queue: usize,
}

fn default_queue() -> usize {
    8192
}
