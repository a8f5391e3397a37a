//! abgate: an A/B inference gateway.
//!
//! Application traffic points at the gateway; each user ID is hashed into a
//! control or treatment bucket ([`assign`]), and the call is forwarded to the
//! base model or the fine-tuned model ([`proxy`]) with streams passed through
//! as they arrive.

pub mod app;
pub mod config;
pub mod control;
pub mod demo;
pub mod experiment;
pub mod proxy;
pub mod telemetry;
