//! Connections to one plain-HTTP upstream: HTTP/1.1 senders kept idle and
//! reused, the most recently used first.
//!
//! hyper-util's general pool serves any URL: on every request it clones the
//! connector, keys a locked map by scheme and authority, and builds the Host
//! header from the URI. An upstream of the config is known in advance, so
//! its connections sit in a list of their own with its Host value ready.
//! The HTTP/1.1 protocol itself is hyper's.
//!
//! A connection goes back to the list once it can take another request,
//! that is when the previous answer's body has been read to its end. The
//! upstream may close an idle connection at any time: one that is seen
//! closed is dropped, and a request that could not be written to a reused
//! connection is sent again on a new one. A request already written is
//! never resent (a completion costs tokens).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::client::ClientError;
use crate::body::Body;

/// Idle connections older than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream's HTTP/1.1 connections.
pub struct Http1Pool {
    authority: Authority,
    host: HeaderValue,
    connect_timeout: Duration,
    /// Idle senders with the time each became idle; the newest last.
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

impl Http1Pool {
    /// A pool for `authority`, connecting within `connect_timeout`.
    pub fn new(authority: Authority, connect_timeout: Duration) -> Option<Self> {
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        Some(Self {
            authority,
            host,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends `request` (its URI absolute or origin-form) and waits for the
    /// answer's headers.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, ClientError> {
        // HTTP/1.1 wants origin-form and a Host header.
        if let Some(path) = request.uri().path_and_query().cloned() {
            *request.uri_mut() = Uri::from(path);
        }
        request.headers_mut().insert(HOST, self.host.clone());
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin_when_ready(sender);
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // Not written: the idle connection had closed meanwhile.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(ClientError::Http(err.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((sender, _)) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
            // Closed by the upstream (or broken): dropped here.
        }
        None
    }

    /// Puts `sender` back once it can take another request: at once when
    /// the answer had no body left to read, otherwise from a small task.
    fn checkin_when_ready(self: &Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_ready() {
            self.checkin(sender);
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.checkin(sender);
            }
        });
    }

    fn checkin(&self, sender: SendRequest<Body>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        expire(&mut idle, now);
        idle.push((sender, now));
    }

    async fn connect(&self) -> Result<SendRequest<Body>, ClientError> {
        let host = self.authority.host();
        let port = self.authority.port_u16().unwrap_or(80);
        let connect = async {
            // `[::1]` in a URI is `::1` to the resolver.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(ClientError::Connect(err)),
            Err(_) => {
                return Err(ClientError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )))
            }
        };
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Closes the connections idle for longer than [`IDLE_TIMEOUT`]; the
/// oldest are first.
fn expire(idle: &mut Vec<(SendRequest<Body>, Instant)>, now: Instant) {
    let expired = idle
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
        .count();
    idle.drain(..expired);
}

/// Closes `pool`'s expired idle connections every third of
/// [`IDLE_TIMEOUT`], so that they go when traffic stops too; ends with the
/// pool (a config that no longer names its upstream).
pub async fn reap_idle(pool: Weak<Http1Pool>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if let Ok(mut idle) = pool.idle.lock() {
            expire(&mut idle, Instant::now());
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender on an in-memory connection: enough to be kept or expired.
    async fn sender() -> SendRequest<Body> {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let (sender, connection) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_and_the_rest_kept() {
        // Ahead of the clock, so that subtracting cannot go before its start.
        let now = Instant::now() + IDLE_TIMEOUT * 2;
        let mut idle = vec![
            (sender().await, now - IDLE_TIMEOUT - Duration::from_secs(5)),
            (sender().await, now - IDLE_TIMEOUT - Duration::from_secs(1)),
            (sender().await, now - IDLE_TIMEOUT + Duration::from_secs(1)),
            (sender().await, now),
        ];
        expire(&mut idle, now);
        let left: Vec<Instant> = idle.iter().map(|(_, since)| *since).collect();
        assert_eq!(left, [now - IDLE_TIMEOUT + Duration::from_secs(1), now]);
        expire(&mut idle, now + IDLE_TIMEOUT + Duration::from_secs(1));
        assert!(idle.is_empty());
    }
}
