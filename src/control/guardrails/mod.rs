//! Guardrails: the red flags of a fine-tune rollout, checked on treatment
//! against control every interval, and acted on when one holds.
//!
//! - [`checks`]: the checks themselves, pure functions of two arms' numbers
//!   (`[guardrails]` as written is in [`crate::config::guardrails`]).
//! - [`crate::telemetry::readback`]: the numbers from this replica's own
//!   metrics.
//! - [`prometheus`]: the fleet's numbers, from a Prometheus server.

pub(crate) mod checks;
pub(crate) mod prometheus;
