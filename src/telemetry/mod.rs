//! What the gateway measures: the metric families (bounded labels only),
//! the read-back of their counters for the guard, the stage's own counts,
//! and the per-request events.

pub mod events;
pub mod metrics;
pub mod readback;
pub mod route;
pub mod stage;
