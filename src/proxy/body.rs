//! The one body type that crosses the gateway in both directions.
//!
//! An enum rather than a boxed trait object: a forwarded body stays the
//! upstream's (or client's) `Incoming` and its frames pass through as they
//! arrive, with no allocation per request to box it and no buffering.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

#[cfg(doc)]
use abgate_http1::framing::Forwarded;

use abgate_http1::body::{poll_channel, poll_whole, whole_size};
use abgate_http1::client::OutgoingBody;
/// A body's error: the peer's (`hyper::Error`) or the gateway's own, when it
/// ends an answer that cannot be finished (see `proxy::observe`).
pub(crate) use abgate_http1::server::BoxError;
use abgate_http1::server::{AnswerBody, WriteLimits};

/// A request or response body: a whole buffer, or a stream passed through.
#[derive(Debug)]
pub enum Body {
    /// A body the gateway holds whole (rewritten JSON, errors, mock answers).
    Full(Option<Bytes>),
    /// A body streamed through untouched, frame by frame: the answer of
    /// an upstream reached through hyper's client (TLS).
    Stream(Incoming),
    /// An HTTP/2 client's body, streamed through the same way; what is
    /// left unread of it when it is dropped is drained.
    Http2(abgate_http1::server::Http2Body),
    /// An HTTP/1 client's body that did not come whole with its head, read
    /// off the connection as it is asked for.
    Client(abgate_http1::server::Http1Body),
    /// A plain-HTTP upstream's answer, read off its connection by the
    /// gateway itself and streamed through untouched.
    Upstream(abgate_http1::client::ResponseBody),
    /// A body produced by the gateway itself, chunk by chunk (mock SSE).
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// A response body being measured on its way to the client.
    Observed(Box<crate::proxy::observe::ObservedBody>),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body::Full(None)
    }

    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Body::Full((!bytes.is_empty()).then_some(bytes))
    }
}

/// The server's answer body: the gateway's fields and write limits ride
/// with the body, and the server learns of them only through this.
impl AnswerBody for Body {
    /// The gateway's own fields (`x-abgate-*`) and an upstream answer's
    /// passed on as they came (see [`Forwarded`]).
    fn write_fields(&self, out: &mut Vec<u8>) -> bool {
        match self {
            Body::Upstream(body) => {
                let forwarded = body.forwarded();
                out.extend_from_slice(&forwarded.lines);
                forwarded.date
            }
            Body::Observed(observed) => {
                observed.fields().write(out);
                observed.inner().write_fields(out)
            }
            Body::Full(_)
            | Body::Stream(_)
            | Body::Http2(_)
            | Body::Client(_)
            | Body::Channel(_) => false,
        }
    }

    fn add_fields_to(&self, headers: &mut HeaderMap) {
        match self {
            Body::Upstream(body) => body.forwarded().add_to(headers),
            Body::Observed(observed) => {
                observed.fields().add_to(headers);
                observed.inner().add_fields_to(headers);
            }
            Body::Full(_)
            | Body::Stream(_)
            | Body::Http2(_)
            | Body::Client(_)
            | Body::Channel(_) => {}
        }
    }

    /// A measured answer's own: the gateway's live timeouts.
    fn write_limits(&self) -> Option<WriteLimits> {
        match self {
            Body::Observed(observed) => observed.write_limits(),
            _ => None,
        }
    }

    /// A measured answer counts it when it is dropped.
    fn cut_off(&mut self) {
        if let Body::Observed(observed) = self {
            observed.cut_off();
        }
    }
}

/// A body the gateway holds whole goes out with its request's head.
impl OutgoingBody for Body {
    fn whole(&self) -> Option<Bytes> {
        match self {
            Body::Full(bytes) => Some(bytes.clone().unwrap_or_default()),
            _ => None,
        }
    }
}

impl From<abgate_http1::server::RequestBody> for Body {
    fn from(body: abgate_http1::server::RequestBody) -> Self {
        use abgate_http1::server::RequestBody;
        match body {
            RequestBody::Full(bytes) => Body::Full(bytes),
            RequestBody::Http1(body) => Body::Client(body),
            RequestBody::Http2(body) => Body::Http2(body),
        }
    }
}

impl From<Incoming> for Body {
    fn from(incoming: Incoming) -> Self {
        Body::Stream(incoming)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => poll_whole(bytes),
            Body::Stream(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map_err(|err| Box::new(err) as BoxError),
            Body::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|err| Box::new(err) as BoxError),
            Body::Upstream(body) => Pin::new(body).poll_frame(cx),
            Body::Client(body) => Pin::new(body).poll_frame(cx),
            Body::Channel(receiver) => poll_channel(receiver, cx),
            Body::Observed(observed) => Pin::new(observed.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Stream(incoming) => incoming.is_end_stream(),
            Body::Http2(body) => body.is_end_stream(),
            Body::Upstream(body) => body.is_end_stream(),
            Body::Client(body) => body.is_end_stream(),
            Body::Channel(_) => false,
            Body::Observed(observed) => observed.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => whole_size(bytes),
            Body::Stream(incoming) => incoming.size_hint(),
            Body::Http2(body) => body.size_hint(),
            Body::Upstream(body) => body.size_hint(),
            Body::Client(body) => body.size_hint(),
            Body::Channel(_) => SizeHint::default(),
            Body::Observed(observed) => observed.size_hint(),
        }
    }
}
