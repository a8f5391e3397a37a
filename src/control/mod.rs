//! The control plane: everything that changes what the data path serves.
//! Config reloads, the rollout's runtime state and its supervisor, the
//! guardrails, and the admin API (and its client, for the CLI).

pub(crate) mod admin;
pub mod admin_client;
pub(crate) mod guardrails;
pub(crate) mod live;
pub(crate) mod redact;
pub mod reload;
pub mod report_table;
pub(crate) mod rollout;
pub(crate) mod store;
pub(crate) mod supervisor;
