//! The HTTP/1.1 server against raw sockets and hyper's clients, on
//! loopback: framing, keep-alive, pipelining, 100-continue, HTTP/1.0,
//! HTTP/2 by preface, a client that leaves, and closing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::{serve, Handler, RequestBody};

use crate::body::LocalBody as Body;

/// Answers by path: `/echo` reads the body and says what it got,
/// `/stream` sends chunks as the test releases them, `/hold` never
/// answers (and says when it is dropped), `/early` answers without
/// reading the body, `/odd-length` has a length header it cannot frame by.
struct TestHandler {
    chunks: tokio::sync::Mutex<Option<mpsc::Receiver<Bytes>>>,
    dropped: mpsc::Sender<()>,
    /// Each request's method and target, as the handler saw them.
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Tells the test when the handler's future is dropped.
struct DropSignal(mpsc::Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

impl Handler for TestHandler {
    type Answer = Body;

    async fn handle(
        self: Arc<Self>,
        request: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        self.seen
            .lock()
            .unwrap()
            .push(format!("{method} {}", request.uri()));
        match path.as_str() {
            "/stream" => {
                let chunks = self.chunks.lock().await.take().unwrap();
                Response::new(Body::Channel(chunks))
            }
            "/hold" => {
                let _signal = DropSignal(self.dropped.clone());
                std::future::pending::<Response<Body>>().await
            }
            "/odd-length" => {
                let mut response = Response::new(Body::full("hello"));
                response.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from_static("5, 5"),
                );
                response
            }
            "/headers" => {
                // Says which fields came, and adds one of its own.
                let fields: Vec<String> = request
                    .headers()
                    .iter()
                    .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
                    .collect();
                let mut response = Response::new(Body::full(fields.join(";")));
                response
                    .headers_mut()
                    .insert("x-answer", http::HeaderValue::from_static("headers"));
                response
            }
            "/early" => {
                let mut response = Response::new(Body::full("too large"));
                *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                response
            }
            _ => {
                let body = request.into_body().collect().await;
                let text = match body {
                    Ok(body) => format!("{method} {path} {}", body.to_bytes().len()),
                    Err(err) => format!("{method} {path} error: {err}"),
                };
                Response::new(Body::full(text))
            }
        }
    }
}

struct Server {
    addr: SocketAddr,
    chunks: mpsc::Sender<Bytes>,
    dropped: mpsc::Receiver<()>,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (chunks, receiver) = mpsc::channel(8);
    let (dropped_sender, dropped) = mpsc::channel(8);
    let seen = Arc::default();
    let handler = Arc::new(TestHandler {
        chunks: tokio::sync::Mutex::new(Some(receiver)),
        dropped: dropped_sender,
        seen: Arc::clone(&seen),
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, handler, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        chunks,
        dropped,
        stop: Some(stop),
        served,
        seen,
    }
}

async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("finished in time")
}

/// Reads one answer with a Content-Length body: its head and body.
async fn read_answer(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            let head = String::from_utf8(buffer[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |value| value.parse().unwrap());
            while buffer.len() < end + 4 + length {
                read_more(socket, buffer).await;
            }
            let body = String::from_utf8(buffer[end + 4..end + 4 + length].to_vec()).unwrap();
            buffer.drain(..end + 4 + length);
            return (head, body);
        }
        read_more(socket, buffer).await;
    }
}

async fn read_more(socket: &mut TcpStream, buffer: &mut Vec<u8>) {
    let mut piece = [0u8; 4096];
    let n = bounded(socket.read(&mut piece)).await.unwrap();
    assert!(
        n > 0,
        "closed early; so far: {}",
        String::from_utf8_lossy(buffer)
    );
    buffer.extend_from_slice(&piece[..n]);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Reads to the close.
async fn read_all(socket: &mut TcpStream) -> String {
    let mut all = Vec::new();
    bounded(socket.read_to_end(&mut all)).await.unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn each_request_on_a_connection_has_its_own_fields_and_answer_fields() {
    // A connection reuses one header map from message to message: nothing
    // of an earlier request or answer may show in a later one.
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut buffer = Vec::new();
    for (request, fields) in [
        (
            &b"GET /headers HTTP/1.1\r\nhost: x\r\nx-first: 1\r\nx-both: a\r\n\r\n"[..],
            "host=x;x-first=1;x-both=a",
        ),
        (
            b"GET /headers HTTP/1.1\r\nx-both: b\r\nHost: y\r\nx-second: 2\r\n\r\n",
            "x-both=b;host=y;x-second=2",
        ),
        (b"GET /headers HTTP/1.1\r\nhost: z\r\n\r\n", "host=z"),
    ] {
        socket.write_all(request).await.unwrap();
        let (head, body) = read_answer(&mut socket, &mut buffer).await;
        assert_eq!(body, fields);
        assert_eq!(head.matches("x-answer: headers").count(), 1, "{head}");
        assert!(
            !head.contains("x-first") && !head.contains("host"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /second HTTP/1.1\r\nhost: x\r\n\r\n\
              POST /third HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let (head, body) = read_answer(&mut socket, &mut buffer).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert_eq!(body, "POST /echo 5");
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "GET /second 0");
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "POST /third 3");
    // Still open for more.
    socket
        .write_all(b"GET /fourth HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "GET /fourth 0");
}

#[tokio::test]
async fn bodies_that_come_after_their_head_are_read_in_pieces() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut buffer = Vec::new();
    // A length: the body trickles in after the head.
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 20000\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        socket.write_all(&[b'a'; 5000]).await.unwrap();
    }
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "POST /echo 20000");
    // Chunks, split mid-size-line and mid-data, then a pipelined request
    // sent with the last chunk.
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    socket.write_all(b"0\r\n0123456789").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    socket
        .write_all(b"abcdef\r\n0\r\n\r\nGET /after HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "POST /echo 16");
    let (_, body) = read_answer(&mut socket, &mut buffer).await;
    assert_eq!(body, "GET /after 0");
}

#[tokio::test]
async fn a_client_that_expects_100_continue_gets_it_when_the_body_is_read() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buffer = Vec::new();
    while find(&buffer, b"\r\n\r\n").is_none() {
        read_more(&mut socket, &mut buffer).await;
    }
    assert_eq!(buffer, b"HTTP/1.1 100 Continue\r\n\r\n");
    buffer.clear();
    socket.write_all(b"body").await.unwrap();
    let (head, body) = read_answer(&mut socket, &mut buffer).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "POST /echo 4");
}

#[tokio::test]
async fn an_answer_that_refuses_an_unread_body_reaches_the_client_and_closes() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    // The handler answers without reading; no 100 is sent, and the body
    // the client sends anyway does not reset the answer away.
    socket
        .write_all(
            b"POST /early HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1000000\r\n\r\n",
        )
        .await
        .unwrap();
    let _ = socket.write_all(&vec![b'x'; 200_000]).await;
    let all = read_all(&mut socket).await;
    assert!(all.starts_with("HTTP/1.1 413 "), "{all}");
    assert!(all.contains("\r\nconnection: close\r\n"), "{all}");
    assert!(all.ends_with("too large"), "{all}");
}

#[tokio::test]
async fn http_1_0_clients_get_http_1_0_answers_and_keep_alive_only_when_asked() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let (head, body) = read_answer(&mut socket, &mut buffer).await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: keep-alive"), "{head}");
    assert_eq!(body, "GET /a 0");
    // Without asking: answered, then closed.
    socket.write_all(b"GET /b HTTP/1.0\r\n\r\n").await.unwrap();
    let rest = read_all(&mut socket).await;
    assert!(rest.starts_with("HTTP/1.0 200 OK\r\n"), "{rest}");
    assert!(rest.ends_with("GET /b 0"), "{rest}");
    // A streamed answer of unknown length ends with the close.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /stream HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    server
        .chunks
        .send(Bytes::from_static(b"one "))
        .await
        .unwrap();
    server
        .chunks
        .send(Bytes::from_static(b"two"))
        .await
        .unwrap();
    drop(server.chunks);
    let all = read_all(&mut socket).await;
    assert!(all.starts_with("HTTP/1.0 200 OK\r\n"), "{all}");
    assert!(!all.contains("transfer-encoding"), "{all}");
    assert!(all.ends_with("\r\n\r\none two"), "{all}");
}

#[tokio::test]
async fn streamed_answers_go_out_chunk_by_chunk_as_they_come() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    // The head goes out before any chunk exists.
    while find(&buffer, b"\r\n\r\n").is_none() {
        read_more(&mut socket, &mut buffer).await;
    }
    let head = String::from_utf8_lossy(&buffer).into_owned();
    assert!(
        head.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{head}"
    );
    buffer.clear();
    // Each chunk arrives while the next is still to be sent.
    server
        .chunks
        .send(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    while buffer.len() < b"9\r\ndata: 1\n\n\r\n".len() {
        read_more(&mut socket, &mut buffer).await;
    }
    assert_eq!(buffer, b"9\r\ndata: 1\n\n\r\n");
    buffer.clear();
    let large = Bytes::from(vec![b'z'; 10_000]);
    server.chunks.send(large).await.unwrap();
    drop(server.chunks);
    while !buffer.ends_with(b"0\r\n\r\n") {
        read_more(&mut socket, &mut buffer).await;
    }
    assert!(buffer.starts_with(b"2710\r\nzzz"));
    assert_eq!(
        buffer.len(),
        "2710\r\n".len() + 10_000 + "\r\n0\r\n\r\n".len()
    );
}

#[tokio::test]
async fn a_client_that_leaves_drops_the_handler() {
    let mut server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server.dropped.try_recv().is_err(), "still held");
    drop(socket);
    bounded(server.dropped.recv()).await.unwrap();
}

#[tokio::test]
async fn heads_over_the_limits_or_not_http_are_refused_bare() {
    let server = start().await;
    let cases: [(&[u8], &str); 2] = [
        (
            b"GET / HTTP/1.1\r\nhost: x\r\nx: \x01\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
        (b"GET / HTTP/1.1\r\nx: 1\r\n", "HTTP/1.1 431 "),
    ];
    for (wire, expected) in cases {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(wire).await.unwrap();
        if expected.contains("431") {
            // A head that never ends: past the limit, refused.
            let filler = format!("x-filler: {}\r\n", "f".repeat(1000));
            for _ in 0..300 {
                if socket.write_all(filler.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
        let all = read_all(&mut socket).await;
        assert!(
            all.starts_with(expected),
            "{:?}: {all}",
            String::from_utf8_lossy(wire)
        );
    }
    // More than 100 fields.
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes())
        .await
        .unwrap();
    let all = read_all(&mut socket).await;
    assert!(all.starts_with("HTTP/1.1 431 "), "{all}");
}

/// What the refusal of `wire` says: its status line's code, and the
/// JSON error's `code`; the connection must be closed after it.
async fn refusal_of(addr: std::net::SocketAddr, wire: &[u8]) -> (String, String) {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    // The server may refuse and close before it has read everything.
    let _ = socket.write_all(wire).await;
    let all = read_all(&mut socket).await;
    let status = all.get(9..12).unwrap_or_default().to_owned();
    let body = all.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let code = serde_json::from_str::<serde_json::Value>(body)
        .map(|json| {
            json["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn a_framing_or_host_two_parsers_could_read_two_ways_is_refused_and_closed() {
    let server = start().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let chunked_smuggle = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    let cases: Vec<(String, &str, &str)> = vec![
        // CL.TE and TE.CL: a length and chunks, in either order.
        (
            format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n{chunked_smuggle}"),
            "400",
            "invalid_framing",
        ),
        (
            format!("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n{chunked_smuggle}"),
            "400",
            "invalid_framing",
        ),
        (
            format!("DELETE /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{chunked_smuggle}"),
            "400",
            "invalid_framing",
        ),
        // TE.TE: codings that one hop reads as chunked and another not.
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: xchunked\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: x\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: \r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(), "501", "unsupported_transfer_coding"),
        ("POST /echo HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".into(), "400", "invalid_framing"),
        // Lengths that are not one number.
        ("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1, 2\r\n\r\nxx".into(), "400", "invalid_framing"),
        // A list of equal lengths: RFC 9110 §8.6 lets a recipient take it,
        // hyper refuses it; a request is read the same way by every hop.
        ("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 2\r\n\r\nxx".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: +1\r\n\r\nx".into(), "400", "invalid_framing"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 0x1\r\n\r\nx".into(), "400", "invalid_framing"),
        // Host: none on HTTP/1.1, or two on any version (RFC 9112 §3.2).
        ("GET /echo HTTP/1.1\r\n\r\n".into(), "400", "invalid_host"),
        ("GET /echo HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n".into(), "400", "invalid_host"),
        ("GET /echo HTTP/1.1\r\nhost: a\r\nHost: a\r\n\r\n".into(), "400", "invalid_host"),
        ("GET /echo HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n".into(), "400", "invalid_host"),
        // What no HTTP/1.1 parser may guess at: obs-fold, a space before
        // the colon, a bare CR, NUL.
        ("GET /echo HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\n\r\n".into(), "400", "malformed_request"),
        ("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\n".into(), "400", "malformed_request"),
        ("GET /echo HTTP/1.1\r\nhost: x\r\nx-a: 1\rx-b: 2\r\n\r\n".into(), "400", "malformed_request"),
        ("GET /echo HTTP/1.1\r\nhost: x\r\nx-a: \0\r\n\r\n".into(), "400", "malformed_request"),
        ("GET /echo HTTP/1.1 x\r\nhost: x\r\n\r\n".into(), "400", "malformed_request"),
    ];
    for (wire, status, code) in &cases {
        assert_eq!(
            refusal_of(server.addr, wire.as_bytes()).await,
            ((*status).to_owned(), (*code).to_owned()),
            "{wire:?}"
        );
    }
    // None of them reached the handler, smuggled or not.
    assert!(server.seen().is_empty(), "{:?}", server.seen());
    // The same fields one at a time are fine.
    for wire in [
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /echo HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: \tChunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        "POST /echo HTTP/1.0\r\ncontent-length: 3\r\n\r\nabc",
    ] {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(wire.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let (head, body) = read_answer(&mut socket, &mut buffer).await;
        assert!(head.contains(" 200 "), "{wire:?}: {head}");
        assert_eq!(body, "POST /echo 3", "{wire:?}");
    }
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    let server = start().await;
    let socket = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(socket),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = Request::post(format!("http://{}/echo", server.addr))
        .body(Body::full("over h2"))
        .unwrap();
    let response = bounded(sender.send_request(request)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST /echo 7");
}

#[tokio::test]
async fn closing_ends_idle_connections_and_lets_answers_in_flight_finish() {
    let mut server = start().await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    read_answer(&mut idle, &mut buffer).await;
    let mut streaming = TcpStream::connect(server.addr).await.unwrap();
    streaming
        .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while find(&head, b"\r\n\r\n").is_none() {
        read_more(&mut streaming, &mut head).await;
    }
    server.stop.take().unwrap().send(()).unwrap();
    // The idle connection is closed; the stream is not cut.
    assert_eq!(read_all(&mut idle).await, "");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!server.served.is_finished(), "waits for the stream");
    server
        .chunks
        .send(Bytes::from_static(b"last"))
        .await
        .unwrap();
    drop(server.chunks);
    let rest = read_all(&mut streaming).await;
    assert_eq!(rest, "4\r\nlast\r\n0\r\n\r\n");
    bounded(server.served).await.unwrap();
}

#[tokio::test]
async fn an_answer_is_framed_by_one_length_it_can_read() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /odd-length HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_all(&mut socket).await;
    assert_eq!(all.matches("content-length").count(), 1, "{all}");
    assert!(all.contains("\r\ncontent-length: 5\r\n"), "{all}");
    assert!(all.ends_with("\r\n\r\nhello"), "{all}");
}
