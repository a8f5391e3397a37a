//! An HTTP/2 client's request body, and what becomes of the part of it a
//! handler leaves unread.
//!
//! A handler may answer before it has read a request's body (a 401 for a
//! missing gateway key, a 413 for a declared length over the limit, a 503
//! when shedding) and drop it. hyper then resets the stream once the
//! answer is sent (RST_STREAM NO_ERROR, as RFC 9113 §8.1 allows), but the
//! client has DATA frames for it in flight, and h2 remembers only the last
//! 10 streams it reset: DATA for one it has forgotten is answered with
//! RST_STREAM STREAM_CLOSED, which h2 counts as an error of the client's,
//! and after 1024 of those on one connection it closes the connection
//! (GOAWAY ENHANCE_YOUR_CALM, "too_many_internal_resets"), failing every
//! request in flight on it. A client that keeps its connection and is
//! refused often saw it break after about a thousand refusals.
//!
//! So what a handler leaves unread is read and discarded in the
//! background, as the HTTP/1.1 side lingers: up to [`DRAIN_BYTES`], each
//! frame within [`DRAIN_IDLE`] and all within [`DRAIN_TIME`]. The stream
//! then ends with the client's END_STREAM and no reset at all; only a
//! larger or slower body is still reset.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Longest wait for each frame of an unread request body being drained.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// Longest an unread request body is drained in all.
const DRAIN_TIME: Duration = Duration::from_secs(10);
/// Most of an unread request body read after it was dropped: past it the
/// stream is reset.
const DRAIN_BYTES: usize = 1024 * 1024;

/// An HTTP/2 client's request body: hyper's stream, passed through frame
/// by frame; what is left of it when it is dropped is drained (see the
/// module's doc).
#[derive(Debug)]
pub struct Http2Body {
    /// `None` once dropped.
    incoming: Option<Incoming>,
}

impl Http2Body {
    pub(super) fn new(incoming: Incoming) -> Self {
        Self {
            incoming: Some(incoming),
        }
    }
}

impl http_body::Body for Http2Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut().incoming.as_mut() {
            Some(incoming) => Pin::new(incoming).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.as_ref().map_or(true, Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for Http2Body {
    fn drop(&mut self) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        if incoming.is_end_stream() {
            return;
        }
        // Dropped outside a runtime (never on the gateway's paths): reset.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(incoming));
        }
    }
}

/// Reads and discards the rest of `incoming` within the drain's bounds;
/// dropping it then resets the stream if it has not ended.
async fn drain(mut incoming: Incoming) {
    let draining = async {
        let mut discarded = 0;
        while discarded <= DRAIN_BYTES {
            match tokio::time::timeout(DRAIN_IDLE, incoming.frame()).await {
                Ok(Some(Ok(frame))) => discarded += frame.data_ref().map_or(0, Bytes::len),
                Ok(Some(Err(_)) | None) | Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, draining).await;
}
