//! Guardrails: the red flags of a fine-tune rollout, checked on treatment
//! against control every interval, and acted on when one holds.
//!
//! - [`config`]: `[guardrails]` as written and validated.
//! - [`checks`]: the checks themselves, pure functions of two arms' numbers.
//! - [`local`]: the numbers from this replica's own metrics.
//! - [`prometheus`]: the fleet's numbers, from a Prometheus server.

pub mod checks;
pub mod config;
pub mod local;
pub mod prometheus;

pub use checks::{ArmWindow, CheckResult, Status, Streaks};
pub use config::{Check, GuardrailsConfig, OnBreach, Source};
