//! Rolling a fine-tune out: the stages and scheduled changes of
//! `[rollout]`, and the runtime state (API changes, pauses, pending
//! changes) with the rule that decides between it and the config file.

pub mod epoch;
pub mod stages;
pub mod state;

pub use epoch::SplitEpoch;
pub use stages::{FileSchedule, RolloutConfig, ScheduledChange};
pub use state::{AuditEntry, Override, Pause, PendingChange, Persisted, RuntimeState};
