//! Connections to one plain-HTTP upstream: HTTP/1.1 connections kept idle
//! and reused, the most recently used first.
//!
//! hyper-util's general pool serves any URL: on every request it clones the
//! connector, keys a locked map by scheme and authority, and builds the Host
//! header from the URI; each of hyper's connections is a task of its own,
//! fed through channels. An upstream of the config is known in advance, so
//! its connections sit in a list of their own with its Host value ready,
//! and the request's own task speaks HTTP/1.1 on them ([`super::connection`]).
//!
//! A connection goes back to the list once it can take another request,
//! that is when the previous answer's body has been read to its end. The
//! upstream may close an idle connection at any time: one that is seen
//! closed is dropped, and a request that could not be written to a reused
//! connection is sent again on a new one. A request already written is
//! never resent (a completion costs tokens).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use http::header::HeaderValue;
use http::request::Parts;
use http::uri::Authority;
use http::{Response, Uri};
use tokio::net::TcpStream;

use super::connection::{
    self as wire, BodyFraming, Connection, ResponseBody, WireError, WriteFailed,
};
use super::{AnswerFields, OutgoingBody, SendError};
use crate::framing::{is_hop_by_hop, poll_deadline};

/// Idle connections older than this are closed (by the next reaper tick
/// after it, so within a third more).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the reaper ticks: an idle connection's age is counted in its
/// ticks, so that handing a connection back reads no clock.
const REAP_EVERY: Duration = Duration::from_secs(30);
/// Ticks after which an idle connection is closed: it has then been idle
/// for at least [`IDLE_TIMEOUT`] and at most a tick more.
const IDLE_TICKS: u64 = IDLE_TIMEOUT.as_secs() / REAP_EVERY.as_secs() + 1;

/// One upstream's HTTP/1.1 connections.
#[derive(Debug)]
pub struct Pool {
    authority: Authority,
    host: HeaderValue,
    fields: AnswerFields,
    connect_timeout: Duration,
    /// Idle connections with the reaper's tick at which each became idle;
    /// the newest last.
    idle: Mutex<Vec<(Box<Connection>, u64)>>,
    /// The reaper's ticks so far.
    ticks: AtomicU64,
}

impl Pool {
    /// A pool for `authority`, connecting within `connect_timeout`, its
    /// answers' fields sorted by `fields`; none if the authority is no
    /// Host value, or `fields` maps one that frames an answer (its
    /// length, `Date`, a hop-by-hop field), which the wire reads itself.
    pub fn new(
        authority: Authority,
        connect_timeout: Duration,
        fields: AnswerFields,
    ) -> Option<Self> {
        let frames = |name: &&str| {
            is_hop_by_hop(name.as_bytes())
                || name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("date")
        };
        if fields.mapped.iter().any(frames) {
            return None;
        }
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        Some(Self {
            authority,
            host,
            fields,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            ticks: AtomicU64::new(0),
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends `request` (its URI absolute or origin-form: only the path and
    /// query are used) and waits for the answer's headers, until
    /// `deadline` if one is given ([`SendError::TimedOut`] then).
    pub async fn send(
        self: &Arc<Self>,
        parts: &mut Parts,
        body: impl OutgoingBody,
        deadline: Option<Instant>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let mut framing = BodyFraming::of(&body);
        let mut timer = None;
        let mut connection = loop {
            let (mut connection, reused) = match self.checkout() {
                Some(connection) => (connection, true),
                None => (self.connect(deadline).await?, false),
            };
            arm(&mut timer, &mut connection, deadline);
            let written = connection.write_head(parts, &self.host, &mut framing);
            match within(&mut timer, deadline, written).await? {
                Ok(()) => break connection,
                // Not a byte written: the idle connection had closed
                // meanwhile, and the request can go on another one.
                Err(WriteFailed { written: 0, .. }) if reused => continue,
                Err(WriteFailed { error, .. }) => {
                    return Err(SendError::Wire(WireError::Io(error)))
                }
            }
        };
        // The client's header values and path are slices of the buffer its
        // connection reads into: let go of them now, so that the buffer can
        // be read into again while the answer is awaited, not replaced. The
        // emptied map serves the answer's head.
        let method = std::mem::take(&mut parts.method);
        connection.recycle(std::mem::take(&mut parts.headers));
        parts.uri = Uri::default();
        parts.extensions.clear();
        let answer = async {
            match connection.write_body(framing, body, &method).await {
                Ok(None) => connection.read_head(&method).await,
                Ok(Some(early)) => Ok(early),
                Err(error) => Err(error),
            }
        };
        let head = within(&mut timer, deadline, answer)
            .await?
            .map_err(SendError::Wire)?;
        connection.timer = timer;
        Ok(wire::response(head, connection, Arc::clone(self)))
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Box<Connection>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((connection, _)) = idle.pop() {
            if connection.is_reusable() {
                return Some(connection);
            }
            // Closed by the upstream (or broken): dropped here.
        }
        None
    }

    /// Keeps `connection`, whose last answer has been read to its end, for
    /// the next request.
    pub(crate) fn checkin(&self, connection: Box<Connection>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = self.ticks.load(Ordering::Relaxed);
        expire(&mut idle, now);
        idle.push((connection, now));
    }

    async fn connect(&self, deadline: Option<Instant>) -> Result<Box<Connection>, SendError> {
        let host = self.authority.host();
        let port = self.authority.port_u16().unwrap_or(80);
        let connect = async {
            // `[::1]` in a URI is `::1` to the resolver.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let connect_at = Instant::now() + self.connect_timeout;
        let limit = deadline.map_or(connect_at, |deadline| deadline.min(connect_at));
        match tokio::time::timeout_at(limit, connect).await {
            Ok(Ok(stream)) => Ok(Connection::new(stream, self.fields)),
            Ok(Err(err)) => Err(SendError::Connect(err)),
            // The answer's deadline came first.
            Err(_) if limit < connect_at => Err(SendError::TimedOut),
            Err(_) => Err(SendError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            ))),
        }
    }
}

/// Readies `timer` for a request that must have its answer's head by
/// `deadline`, taking the connection's own timer when there is none yet.
///
/// The timer is kept with the connection from one request to the next and
/// is set again only when it must fire sooner: a timer still set for an
/// earlier request's (earlier) deadline fires early at worst, and is then
/// moved on ([`poll_deadline`]). Requests follow each other on a connection, so
/// that happens at most once a timeout, not once a request: no timer-wheel
/// update per request.
fn arm(
    timer: &mut Option<Pin<Box<Sleep>>>,
    connection: &mut Connection,
    deadline: Option<Instant>,
) {
    let Some(deadline) = deadline else {
        return;
    };
    if timer.is_none() {
        *timer = connection.timer.take();
    }
    match timer {
        Some(timer) if timer.deadline() > deadline => timer.as_mut().reset(deadline),
        Some(_) => {}
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
}

/// `step`'s output, or [`SendError::TimedOut`] once `deadline` passes.
async fn within<T>(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Option<Instant>,
    step: impl Future<Output = T>,
) -> Result<T, SendError> {
    let mut step = pin!(step);
    poll_fn(|cx| {
        if let Poll::Ready(output) = step.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match (deadline, timer.as_mut()) {
            // The connection's timer, perhaps set for an earlier request.
            (Some(deadline), Some(timer)) => {
                poll_deadline(timer.as_mut(), deadline, cx).map(|()| Err(SendError::TimedOut))
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// Closes the connections idle for [`IDLE_TICKS`] reaper ticks or more at
/// tick `now`; the oldest are first.
fn expire<C>(idle: &mut Vec<(C, u64)>, now: u64) {
    let expired = idle
        .iter()
        .take_while(|(_, since)| now.saturating_sub(*since) >= IDLE_TICKS)
        .count();
    idle.drain(..expired);
}

/// Ticks `pool`'s idle clock every [`REAP_EVERY`] and closes its expired
/// idle connections, so that they go when traffic stops too; ends with the
/// pool (a config that no longer names its upstream).
pub async fn reap_idle(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = pool.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut idle) = pool.idle.lock() {
            expire(&mut idle, now);
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::body::LocalBody as Body;
    use bytes::Bytes;
    use http::Request;
    use http_body::Body as _;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn idle_count(pool: &Pool) -> usize {
        pool.idle.lock().unwrap().len()
    }

    /// Reads from `socket` until `buffer` holds `end`.
    async fn read_until(socket: &mut TcpStream, buffer: &mut Vec<u8>, end: &[u8]) {
        while !buffer.windows(end.len()).any(|window| window == end) {
            let mut bytes = [0u8; 1024];
            let read = socket.read(&mut bytes).await.unwrap();
            assert!(
                read > 0,
                "closed after {:?}",
                String::from_utf8_lossy(buffer)
            );
            buffer.extend_from_slice(&bytes[..read]);
        }
    }

    async fn listener() -> (TcpListener, Arc<Pool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        let pool = Pool::new(authority, Duration::from_secs(5), AnswerFields::PASS_ALL).unwrap();
        (listener, Arc::new(pool))
    }

    /// Sends `request` through `pool`, its head lent as the proxy lends it.
    async fn send(
        pool: &Arc<Pool>,
        request: Request<Body>,
        deadline: Option<Instant>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let (mut parts, body) = request.into_parts();
        pool.send(&mut parts, body, deadline).await
    }

    fn post(body: Body) -> Request<Body> {
        Request::post("http://upstream/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }

    #[test]
    fn a_policy_that_maps_a_framing_field_gets_no_pool() {
        let authority = Authority::from_static("upstream:80");
        for framing in ["Content-Length", "transfer-encoding", "connection", "date"] {
            let fields = AnswerFields {
                mapped: Box::leak(Box::new([framing])),
                own: |_| false,
            };
            assert!(
                Pool::new(authority.clone(), Duration::from_secs(1), fields).is_none(),
                "{framing}"
            );
        }
        let fields = AnswerFields {
            mapped: &["content-type"],
            own: |_| false,
        };
        assert!(Pool::new(authority, Duration::from_secs(1), fields).is_some());
    }

    #[tokio::test]
    async fn each_exchange_on_a_connection_has_only_its_own_fields() {
        // A connection reuses a request's header map for its next answer:
        // nothing of an earlier request or answer may show in a later one.
        let (listener, pool) = listener().await;
        let answers: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-First: 1\r\nX-Both: a\r\n\r\n1",
            b"HTTP/1.1 200 OK\r\nX-Both: b\r\nx-second: 2\r\ncontent-length: 1\r\n\r\n2",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            for answer in answers {
                let mut request = Vec::new();
                read_until(&mut socket, &mut request, b"\r\n\r\n").await;
                heads.push(String::from_utf8(request).unwrap());
                socket.write_all(answer).await.unwrap();
            }
            heads
        });
        // The map holds what the gateway reads; the rest is passed on as
        // it came, in memory the connection reuses from answer to answer.
        let expected: [(&[&str], &str); 3] = [
            (&[], "X-First: 1\r\nX-Both: a\r\n"),
            (&[], "X-Both: b\r\nx-second: 2\r\n"),
            (&[], ""),
        ];
        for (n, (names, forwarded)) in expected.iter().enumerate() {
            let request = Request::get("http://upstream/")
                .header(format!("x-request-{n}"), "v")
                .body(Body::empty())
                .unwrap();
            let response = send(&pool, request, None).await.unwrap();
            let got: Vec<&str> = response
                .headers()
                .keys()
                .map(|name| name.as_str())
                .collect();
            assert_eq!(got, *names, "answer {n}");
            let lines = &response.body().forwarded().lines;
            assert_eq!(String::from_utf8_lossy(lines), *forwarded, "answer {n}");
            response.into_body().collect().await.unwrap();
        }
        let heads = upstream.await.unwrap();
        for (n, head) in heads.iter().enumerate() {
            let fields: Vec<&str> = head
                .lines()
                .skip(1)
                .filter(|line| !line.is_empty() && !line.starts_with("host:"))
                .collect();
            assert_eq!(fields, [format!("x-request-{n}: v")], "request {n}: {head}");
        }
    }

    #[tokio::test]
    async fn a_connection_goes_back_only_once_its_answer_has_ended_cleanly() {
        let (listener, pool) = listener().await;
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            read_until(&mut socket, &mut request, b"\r\n\r\n{}").await;
            let head = String::from_utf8(request).unwrap();
            assert!(
                head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(head.contains(&format!("host: {}\r\n", socket.local_addr().unwrap())));
            assert!(head.contains("content-length: 2\r\n"), "{head}");
            // The body in two writes, the second after a pause.
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello";
            socket.write_all(answer).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            socket.write_all(b"world").await.unwrap();
            // The same connection carries the next request; its chunked
            // answer is followed by bytes nobody asked for.
            let mut request = Vec::new();
            read_until(&mut socket, &mut request, b"\r\n\r\n{}").await;
            let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                5\r\nagain\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n";
            socket.write_all(answer).await.unwrap();
            // So a third request comes on a new connection.
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            read_until(&mut socket, &mut request, b"\r\n\r\n{}").await;
            socket
                .write_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
                .await
                .unwrap();
            let mut rest = Vec::new();
            // The gateway drops that connection after its last request.
            socket.read_to_end(&mut rest).await.unwrap();
        });

        let response = send(&pool, post(Body::full("{}")), None).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(idle_count(&pool), 0, "lent out while its body is unread");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"helloworld");
        assert_eq!(idle_count(&pool), 1);

        let response = send(&pool, post(Body::full("{}")), None).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"again");
        assert_eq!(idle_count(&pool), 0, "not reused after stray bytes");

        let response = send(&pool, post(Body::full("{}")), None).await.unwrap();
        assert_eq!(response.status(), 503);
        // Dropped before its end: the connection is closed, not kept.
        drop(response);
        assert_eq!(idle_count(&pool), 0);
        tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .unwrap()
            .unwrap();
    }

    /// An upstream that answers 413 on a request's head and never reads
    /// its body; with `hold`, it keeps the connection open after.
    fn refuse_on_the_head(listener: TcpListener, hold: bool) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // The head, and whatever of the body came with it.
            read_until(&mut socket, &mut Vec::new(), b"\r\n\r\n").await;
            socket
                .write_all(b"HTTP/1.1 413 Too Large\r\ncontent-length: 4\r\n\r\nbig!")
                .await
                .unwrap();
            if hold {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        })
    }

    #[tokio::test]
    async fn a_connection_keeps_its_timer_and_each_request_gets_its_own_deadline() {
        let (listener, pool) = listener().await;
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            // At once; then after the first request's deadline has passed;
            // then never.
            for pause in [0, 400] {
                let mut request = Vec::new();
                read_until(&mut socket, &mut request, b"\r\n\r\n{}").await;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                socket.write_all(answer).await.unwrap();
            }
            let mut request = Vec::new();
            read_until(&mut socket, &mut request, b"\r\n\r\n{}").await;
            let mut rest = Vec::new();
            socket.read_to_end(&mut rest).await.unwrap();
        });
        let within = |millis| Some(Instant::now() + Duration::from_millis(millis));

        let response = send(&pool, post(Body::full("{}")), within(200))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(idle_count(&pool), 1);
        // The timer, still set for 200 ms after the first request, fires
        // while the second waits: it is moved on, not taken as a timeout.
        let started = Instant::now();
        let response = send(&pool, post(Body::full("{}")), within(2_000))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        response.into_body().collect().await.unwrap();
        // The third is never answered: it ends at its own deadline.
        let started = Instant::now();
        let outcome = send(&pool, post(Body::full("{}")), within(300)).await;
        assert!(matches!(outcome, Err(SendError::TimedOut)), "{outcome:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        upstream.await.unwrap();
    }

    #[tokio::test]
    async fn an_answer_given_before_the_whole_body_was_read_is_passed_on() {
        for hold in [false, true] {
            let (listener, pool) = listener().await;
            let upstream = refuse_on_the_head(listener, hold);
            let body = Body::full(vec![b'x'; 16 * 1024 * 1024]);
            let response =
                tokio::time::timeout(Duration::from_secs(10), send(&pool, post(body), None))
                    .await
                    .expect("the early answer, not a wait for the body to be read")
                    .unwrap();
            assert_eq!(response.status(), 413, "hold: {hold}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"big!");
            assert_eq!(
                idle_count(&pool),
                0,
                "a connection cut mid-request is not kept"
            );
            upstream.abort();
        }
    }

    #[tokio::test]
    async fn a_streamed_body_of_unknown_length_goes_in_chunks() {
        let (listener, pool) = listener().await;
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            read_until(&mut socket, &mut request, b"0\r\n\r\n").await;
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        sender.send(Bytes::from_static(b"first")).await.unwrap();
        sender
            .send(Bytes::from_static(b"and a second piece"))
            .await
            .unwrap();
        drop(sender);
        let response = send(&pool, post(Body::Channel(receiver)), None)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.body().is_end_stream());
        assert_eq!(idle_count(&pool), 1, "an empty answer ends at once");
        let request = tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .unwrap()
            .unwrap();
        assert!(
            request.ends_with("transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n12\r\nand a second piece\r\n0\r\n\r\n"),
            "{request}"
        );
    }

    #[test]
    fn connections_idle_past_the_timeout_are_closed_and_the_rest_kept() {
        // Four ticks of 30 s: idle 90 s at least, 120 s at most.
        assert_eq!(IDLE_TICKS, 4);
        let mut idle = vec![
            ("connection", 3),
            ("connection", 6),
            ("connection", 7),
            ("connection", 10),
        ];
        expire(&mut idle, 10);
        let left: Vec<u64> = idle.iter().map(|(_, since)| *since).collect();
        assert_eq!(left, [7, 10]);
        expire(&mut idle, 14);
        assert!(idle.is_empty());
    }
}
