//! HTTP/1.1 on the wire, as abgate speaks it on both of its sides: to its
//! clients and to its upstreams. Nothing here knows of the gateway: what
//! a gateway decides (which fields to pass on, what to add to an answer)
//! comes in through parameters.
//!
//! - [`framing`] reads into a buffer, notes the fields that frame a
//!   message, and decodes a body framed by its length or by chunks
//!   (RFC 9112 §6, §7.1), in place, from whatever the reads have brought.
//! - [`server`] serves a listener with a [`server::Handler`]: HTTP/1.1
//!   spoken by itself, HTTP/2 by hyper. The handler's policy comes in
//!   through the answer body it returns ([`server::AnswerBody`]).
//! - [`client`] sends requests to a plain-HTTP upstream over a pool of
//!   its connections, and reads the answer's body off the connection as
//!   it is asked for. The caller's policy comes in through
//!   [`client::AnswerFields`] and [`client::OutgoingBody`].
//! - [`body::LocalBody`] is an answer body made by the process itself
//!   (a mock's stream, a test's answers).

pub mod body;
pub mod client;
pub mod framing;
pub mod server;
