//! HTTP/1.1 to a plain-HTTP upstream: a pool of connections to one
//! authority ([`Pool`]), each spoken on by the task that sends the request
//! ([`connection`]), with the answer's body read off the connection as the
//! caller asks for it ([`ResponseBody`]).
//!
//! What the caller decides comes in as parameters: which answer fields it
//! reads from a map and which are its own ([`AnswerFields`]); how a body
//! it holds whole goes out ([`OutgoingBody`]). The request's framing is
//! always the body's own ([`BodyFraming`]), never a field of the head.

use std::io;

use bytes::Bytes;

use crate::server::BoxError;

mod connection;
mod pool;

pub use connection::{BodyFraming, ResponseBody, WireError};
pub use pool::{reap_idle, Pool};

/// A request body as the client sends it: its frames, and its bytes at
/// once when it is held whole, so that they go out with the head in one
/// write and are framed by their length.
pub trait OutgoingBody: http_body::Body<Data = Bytes, Error = BoxError> + Unpin {
    /// The whole body, if it is held whole (empty bytes for none).
    fn whole(&self) -> Option<Bytes> {
        None
    }
}

impl OutgoingBody for crate::body::LocalBody {
    fn whole(&self) -> Option<Bytes> {
        match self {
            crate::body::LocalBody::Full(bytes) => Some(bytes.clone().unwrap_or_default()),
            crate::body::LocalBody::Channel(_) => None,
        }
    }
}

/// What the caller makes of an answer's header fields. The wire drops the
/// hop-by-hop ones itself (RFC 9110 §7.6.1) and frames the body from its
/// own; of the rest, these are put in the answer's map, or dropped, and
/// every other field is passed on as it came ([`crate::framing::Forwarded`]).
#[derive(Debug, Clone, Copy)]
pub struct AnswerFields {
    /// Fields the caller reads, lower case: put in the answer's map.
    pub mapped: &'static [&'static str],
    /// Fields that are the caller's own (a gateway's namespace): an
    /// upstream's are dropped, so that none can speak for the caller.
    pub own: fn(&[u8]) -> bool,
}

impl AnswerFields {
    /// Every field passed on as it came; none in the map, none dropped.
    pub const PASS_ALL: AnswerFields = AnswerFields {
        mapped: &[],
        own: |_| false,
    };

    fn is_mapped(&self, name: &[u8]) -> bool {
        self.mapped
            .iter()
            .any(|known| name.eq_ignore_ascii_case(known.as_bytes()))
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, unreachable, a name that does not resolve,
    /// or past the connect timeout.
    Connect(io::Error),
    /// The connection failed before the answer's head, or the request's
    /// own body failed ([`WireError::RequestBody`]).
    Wire(WireError),
    /// No answer's head by the deadline the request was sent with.
    TimedOut,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(err) => write!(f, "tcp connect error: {err}"),
            SendError::Wire(err) => write!(f, "{err}"),
            SendError::TimedOut => f.write_str("no answer by the deadline"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(err) => Some(err),
            SendError::Wire(err) => Some(err),
            SendError::TimedOut => None,
        }
    }
}
