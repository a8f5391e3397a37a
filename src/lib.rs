//! abgate: an A/B inference gateway.
//!
//! Application traffic points at the gateway; each user ID is hashed into a
//! control or treatment bucket ([`assign`]), and the call is forwarded to the
//! base model or the fine-tuned model ([`proxy`]) with streams passed through
//! as they arrive.

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod assign;
pub mod body;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod drain;
pub mod events;
pub mod guardrails;
pub mod hex;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod request_id;
pub mod rollout;
pub mod srm;
pub mod stats;
pub mod supervisor;
