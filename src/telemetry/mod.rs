//! What the gateway measures: the metric families (bounded labels only),
//! the read-back of their counters for the guard, the stage's own counts,
//! and the per-request events.

pub(crate) mod events;
pub(crate) mod evidence;
pub mod metrics;
pub(crate) mod readback;
pub mod route;
pub(crate) mod stage;
