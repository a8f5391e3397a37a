//! The accept loop shared by the proxy, admin and mock listeners.
//!
//! HTTP/1.1 (spoken by [`h1`]) and HTTP/2 with prior knowledge (hyper's)
//! on one port. When `shutdown` resolves the listener closes, connections
//! finish the requests they have in flight, and the future returned
//! completes.
//!
//! The HTTP layer bounds what a client can make it hold before a handler
//! runs: the request head (line and headers) within [`ConnectionLimits`]
//! and at most 100 header fields over HTTP/1.1 (past either: a 431), a
//! head that is not HTTP or whose framing or Host is ambiguous (a 400, see
//! `h1`), and a head sent within [`HEADER_READ_TIMEOUT`] (past it: the
//! connection is closed). Each refusal is a JSON error and closes the
//! connection. What the client is sent is bounded too: each write within
//! [`WriteLimits`]' time, or the connection is cut.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod h1;
mod h2_body;
#[cfg(test)]
mod tests;

pub use h1::{Http1Body, RequestBodyError};
pub use h2_body::Http2Body;

/// Something that answers requests; every failure is already a response.
pub trait Handler: Send + Sync + 'static {
    /// The body of its answers.
    type Answer: AnswerBody;

    /// Answers one request from `peer`.
    fn handle(
        self: Arc<Self>,
        request: Request<RequestBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Self::Answer>> + Send + 'static;
}

/// An error of a body, the peer's or the handler's own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server asks of an answer's body beyond its frames: the
/// handler's policy comes in through it (fields that ride with the body,
/// how long the client may take to read it), so that the server names no
/// type of the handler's.
pub trait AnswerBody:
    http_body::Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static
{
    /// Writes header fields that ride with the body rather than in the
    /// answer's map, as `name: value` lines; `true` when `Date` is among
    /// them (the server then adds none).
    fn write_fields(&self, _out: &mut Vec<u8>) -> bool {
        false
    }

    /// Adds the same fields to `headers`, for HTTP/2, whose heads are
    /// written from the map alone.
    fn add_fields_to(&self, _headers: &mut http::HeaderMap) {}

    /// How long the client may take to take each write, and all of it.
    fn write_limits(&self) -> Option<WriteLimits> {
        None
    }

    /// The server cut the client off for not reading this answer (it is
    /// dropped next).
    fn cut_off(&mut self) {}
}

/// A request's body as the server hands it to its handler.
#[derive(Debug)]
pub enum RequestBody {
    /// None, or one that came whole with its head.
    Full(Option<Bytes>),
    /// An HTTP/1.1 body still being read off its connection.
    Http1(Http1Body),
    /// An HTTP/2 body, streamed by hyper.
    Http2(Http2Body),
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Full(bytes) => crate::body::poll_whole(bytes),
            RequestBody::Http1(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|err| Box::new(err) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(bytes) => bytes.is_none(),
            RequestBody::Http1(body) => body.is_end_stream(),
            RequestBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            RequestBody::Full(bytes) => crate::body::whole_size(bytes),
            RequestBody::Http1(body) => body.size_hint(),
            RequestBody::Http2(body) => body.size_hint(),
        }
    }
}

/// Longest a client may take to take one write of an answer, unless the
/// handler says otherwise (`timeouts.client_write_ms`'s default).
pub const DEFAULT_CLIENT_WRITE: Duration = Duration::from_secs(30);

/// The head size [`ConnectionLimits::default`] is made for (a quarter of
/// what it takes: see [`ConnectionLimits::for_max_header_bytes`]).
pub const DEFAULT_HEAD_BYTES: usize = 64 * 1024;

/// Longest a client may take to send a request's line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the client may take to read an answer, as its body says
/// ([`AnswerBody::write_limits`]: a gateway's live timeouts); an answer
/// without them gets [`ConnectionLimits::client_write`] per write. When a
/// write is not taken in time, the connection is cut, the body told so
/// ([`AnswerBody::cut_off`], for the handler to count) and dropped, and an
/// upstream connection it holds closes with it. Carried by the body, not
/// in the answer's extensions: no map and no shared flag per request.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    /// Longest wait for one write to be taken.
    pub per_write: Duration,
    /// When the whole answer must have been taken.
    pub deadline: Option<tokio::time::Instant>,
}

/// What one connection may make the HTTP layer buffer, and wait for.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head (HTTP/1.1 line and headers; HTTP/2 header list).
    pub head_bytes: usize,
    /// Longest wait for a client to take one write, for answers that do
    /// carry no [`WriteLimits`].
    pub client_write: Duration,
}

impl ConnectionLimits {
    /// Limits for a handler that answers heads over `max_header_bytes`
    /// itself (with a JSON 431): the HTTP layer lets through up to four
    /// times that, so only grossly oversized heads get its bare 431.
    pub fn for_max_header_bytes(max_header_bytes: usize) -> Self {
        Self {
            head_bytes: max_header_bytes.saturating_mul(4),
            client_write: DEFAULT_CLIENT_WRITE,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::for_max_header_bytes(DEFAULT_HEAD_BYTES)
    }
}

/// Binds `addr`, reporting a clear error on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

/// Serves `handler` on `listener` until `shutdown` resolves, then waits for
/// open connections to finish their in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, handler, shutdown, ConnectionLimits::default()).await;
}

/// [`serve`] with these connection limits.
pub async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    limits: ConnectionLimits,
) {
    // A head of 8 KiB is always taken: one read buffer's worth.
    let head_bytes = limits.head_bytes.max(8192);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX));
    let http2 = Arc::new(http2);
    // Each connection holds a receiver: closing is sent to all, and the
    // sender learns when the last of them has ended.
    let (close, closing) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small SSE chunks must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let started = tokio::time::Instant::now();
        let connection = h1::Connection::new(
            stream,
            BytesMut::with_capacity(8 * 1024),
            handler.clone(),
            peer,
            head_bytes,
            limits.client_write,
            Closing::new(closing.clone()),
        );
        tokio::spawn(connection.serve(started, http2.clone()));
    }
    drop(listener);
    let _ = close.send(true);
    drop(closing);
    close.closed().await;
}

/// hyper's HTTP/2 server, as configured for a listener.
type Http2 = Arc<hyper::server::conn::http2::Builder<TokioExecutor>>;

/// Serves an HTTP/2 connection with hyper; `prefix` is what was read off
/// it before it was known to be HTTP/2.
async fn serve_http2<H: Handler>(
    http2: &Http2,
    stream: TcpStream,
    prefix: Bytes,
    handler: Arc<H>,
    peer: SocketAddr,
    mut closing: Closing,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            let request = request.map(|body| RequestBody::Http2(Http2Body::new(body)));
            let (mut parts, body) = handler.handle(request, peer).await.into_parts();
            body.add_fields_to(&mut parts.headers);
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    });
    let io = TokioIo::new(Prefixed { prefix, stream });
    let mut connection = pin!(http2.serve_connection(io, service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = poll_fn(|cx| closing.poll_closing(cx)) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, %peer, "connection ended with an error");
    }
}

/// Whether the listener is closing, as one connection sees it.
pub(crate) struct Closing {
    receiver: watch::Receiver<bool>,
    /// The wait for it, made on the first idle wait that needs it.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The waker the wait is registered with: while it is the one asking
    /// and nothing changed, the wait needs no poll (a poll of a waiting
    /// `Notify` takes its lock, once per request on a kept-alive
    /// connection).
    registered: Option<Waker>,
    closed: bool,
}

impl Closing {
    fn new(receiver: watch::Receiver<bool>) -> Self {
        Self {
            receiver,
            waiting: None,
            registered: None,
            closed: false,
        }
    }

    /// Whether the listener is closing: the value only ever changes to
    /// `true`, so a change is enough (an atomic load, no lock).
    fn is_closing(&self) -> bool {
        self.closed || self.receiver.has_changed().unwrap_or(true)
    }

    /// Ready once the listener is closing; otherwise wakes `cx` then.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed {
            return Poll::Ready(());
        }
        let asking = cx.waker();
        let registered = self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(asking));
        if registered && !self.is_closing() {
            return Poll::Pending;
        }
        let receiver = &self.receiver;
        let waiting = self.waiting.get_or_insert_with(|| {
            let mut receiver = receiver.clone();
            Box::pin(async move {
                let _ = receiver.wait_for(|closing| *closing).await;
            })
        });
        let poll = waiting.as_mut().poll(cx);
        if poll.is_ready() {
            self.closed = true;
            self.waiting = None;
            self.registered = None;
        } else if !registered {
            self.registered = Some(asking.clone());
        }
        poll
    }
}

/// A stream read again from what was read of it before.
struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let length = self.prefix.len().min(buf.remaining());
            buf.put_slice(self.prefix.get(..length).unwrap_or_default());
            self.prefix.advance(length);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
