//! The accept loop shared by the proxy, admin and mock listeners.
//!
//! HTTP/1.1 and HTTP/2 (prior knowledge) on one port. When `shutdown`
//! resolves the listener closes, connections finish the requests they have
//! in flight, and the future returned completes.
//!
//! The HTTP layer bounds what a client can make it hold before a handler
//! runs: the request head (line and headers) within [`ConnectionLimits`]
//! and at most 100 header fields over HTTP/1.1 (past either: a 431 with an
//! empty body), a head that is not HTTP (a 400 with an empty body), and a
//! head sent within [`HEADER_READ_TIMEOUT`] (past it: the connection is
//! closed). Each of these closes the connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::body::Body;

/// Something that answers requests; every failure is already a response.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from `peer`.
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static;
}

/// Longest a client may take to send a request's line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What one connection may make the HTTP layer buffer.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head (HTTP/1.1 read buffer; HTTP/2 header list).
    pub head_bytes: usize,
}

impl ConnectionLimits {
    /// Limits for a handler that answers heads over `max_header_bytes`
    /// itself (with a JSON 431): the HTTP layer lets through up to four
    /// times that, so only grossly oversized heads get its bare 431.
    pub fn for_max_header_bytes(max_header_bytes: usize) -> Self {
        Self {
            head_bytes: max_header_bytes.saturating_mul(4),
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::for_max_header_bytes(crate::config::DEFAULT_MAX_HEADER_BYTES)
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's smallest HTTP/1 buffer is 8 KiB.
    let head_bytes = limits.head_bytes.max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(head_bytes);
    builder
        .http2()
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small SSE chunks must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request, peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
