//! A body a process makes itself: whole, or chunk by chunk as it sends
//! them (a mock model's SSE stream, a test's answers). What a gateway
//! passes through has a body type of its own; this one is for answers
//! that are made, not forwarded.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use crate::server::{AnswerBody, BoxError};

/// The frames of a body held whole: its bytes once, then its end.
pub fn poll_whole(bytes: &mut Option<Bytes>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes))))
}

/// The exact size of a body held whole.
pub fn whole_size(bytes: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
}

/// The frames of a body sent chunk by chunk: it ends when the sender is
/// dropped.
pub fn poll_channel(
    receiver: &mut mpsc::Receiver<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    receiver
        .poll_recv(cx)
        .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
}

/// A body held whole, or sent chunk by chunk through a channel: it ends
/// when the sender is dropped.
#[derive(Debug)]
pub enum LocalBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl LocalBody {
    /// An empty body.
    pub fn empty() -> Self {
        LocalBody::Full(None)
    }

    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        LocalBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl http_body::Body for LocalBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            LocalBody::Full(bytes) => poll_whole(bytes),
            LocalBody::Channel(receiver) => poll_channel(receiver, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, LocalBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LocalBody::Full(bytes) => whole_size(bytes),
            LocalBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// Carries no fields and no limits of its own.
impl AnswerBody for LocalBody {}
