//! The control plane: everything that changes what the data path serves.
//! Config reloads, the rollout's runtime state and its supervisor, the
//! guardrails, and the admin API (and its client, for the CLI).

pub mod admin;
pub mod admin_client;
pub mod guardrails;
pub mod live;
pub mod redact;
pub mod reload;
pub mod rollout;
pub mod supervisor;
