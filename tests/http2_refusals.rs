//! HTTP/2 (prior knowledge) requests refused before their body is read:
//! with `[auth]` on, a request without a gateway key gets its 401, whole,
//! however big its body and however it is sent, and its connection stays
//! up; never a stream reset with an error or a GOAWAY instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abgate::app::Running;
use abgate::proxy::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;

const KEY: &str = "gw-key-alpha-0123456789";

/// A body larger than HTTP/2's initial flow-control window (65,535 bytes).
const OVER_WINDOW: usize = 100 * 1024;
/// A body larger than the window many times over.
const MIB: usize = 1024 * 1024;

/// A gateway with `[auth]` on. Its upstreams are never to be reached,
/// so their handles are dropped: a request let through gets no 401.
async fn auth_gateway() -> Running {
    let (control, treatment) = mocks().await;
    let toml = config_toml(
        &control.url(),
        &treatment.url(),
        0.5,
        "[admin]\ntoken_env = \"T\"\n[auth]\napi_keys_env = \"GW_KEYS\"",
    );
    let mut env: BTreeMap<String, String> = token_env();
    env.insert("GW_KEYS".to_owned(), KEY.to_owned());
    gateway_with_env(&toml, env).await
}

/// A chat completion body of about `size` bytes.
fn json_of(size: usize) -> Bytes {
    let head = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":""#;
    let tail = r#""}]}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = String::with_capacity(size);
    body.push_str(head);
    body.push_str(&"x".repeat(pad));
    body.push_str(tail);
    Bytes::from(body)
}

/// A body of unknown length sent slowly: `chunks` chunks of `size` bytes
/// of one JSON document, `pause` apart.
fn slow_body(chunks: usize, size: usize, pause: Duration) -> Body {
    let whole = json_of(chunks * size);
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut rest = whole;
        while !rest.is_empty() {
            let chunk = rest.split_to(size.min(rest.len()));
            // The gateway may refuse before it is all sent: then the client
            // stops reading it, and that is fine.
            if sender.send(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    Body::Channel(receiver)
}

/// An HTTP/2 prior-knowledge connection to `addr`, and the task driving
/// it (its result is the connection's).
async fn connect(addr: SocketAddr) -> (SendRequest<Body>, JoinHandle<Result<(), hyper::Error>>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

/// An error and all its sources, on one line (h2's reason is in them).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{err:?}");
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(&format!(" <- {err:?}"));
        source = err.source();
    }
    text
}

/// Sends a keyless chat completion with `body`; `Ok` when the answer is
/// the gateway's 401 `missing_api_key`, read whole, over HTTP/2.
async fn refused_by(
    send: impl std::future::Future<
        Output = Result<
            http::Response<hyper::body::Incoming>,
            Box<dyn std::error::Error + Send + Sync>,
        >,
    >,
) -> Result<(), String> {
    let exchange = async {
        let response = send
            .await
            .map_err(|err| format!("request: {}", chain(&*err)))?;
        let status = response.status();
        let version = response.version();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("answer body: {}", chain(&err)))?
            .to_bytes();
        if version != http::Version::HTTP_2 || status != 401 {
            return Err(format!(
                "{version:?} {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|err| format!("not JSON ({err}): {}", String::from_utf8_lossy(&body)))?;
        if json["error"]["code"] != "missing_api_key" {
            return Err(format!("401 with {json}"));
        }
        Ok(())
    };
    tokio::time::timeout(LIMIT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// A keyless POST of `body` to the gateway at `addr`.
fn keyless(addr: SocketAddr, body: Body) -> Request<Body> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-user-id", "u1")
        .body(body)
        .unwrap()
}

/// One refusal over `sender`.
async fn refused_on(sender: &mut SendRequest<Body>, request: Request<Body>) -> Result<(), String> {
    let mut sender = sender.clone();
    refused_by(async move {
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    })
    .await
}

/// Fails with every failure seen, counted, if there is any.
fn assert_none_failed(what: &str, attempts: usize, failures: &[String]) {
    if !failures.is_empty() {
        let mut shown: Vec<&String> = failures.iter().take(5).collect();
        shown.dedup();
        panic!(
            "{what}: {} of {attempts} requests failed; first ones:\n{}",
            failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Waits for a connection whose last sender is gone to end; an error (a
/// GOAWAY with an error code, a broken socket) is a failure.
async fn ended_cleanly(connection: JoinHandle<Result<(), hyper::Error>>) -> Result<(), String> {
    match tokio::time::timeout(LIMIT, connection).await {
        Err(_) => Err("connection never ended".to_owned()),
        Ok(joined) => match joined.unwrap() {
            Ok(()) => Ok(()),
            Err(err) => Err(format!("connection: {}", chain(&err))),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_on_fresh_connections_get_their_401() {
    let gw = auth_gateway().await;
    let addr = gw.proxy_addr;
    for (size, count) in [(CHAT.len(), 200), (OVER_WINDOW, 100), (MIB, 30)] {
        let mut failures = Vec::new();
        for _ in 0..count {
            let (mut sender, connection) = connect(addr).await;
            let body = if size == CHAT.len() {
                Bytes::from(CHAT)
            } else {
                json_of(size)
            };
            let mut outcome = refused_on(&mut sender, keyless(addr, Body::full(body))).await;
            drop(sender);
            if outcome.is_ok() {
                outcome = ended_cleanly(connection).await;
            }
            failures.extend(outcome.err());
        }
        assert_none_failed(&format!("fresh connections, {size} B"), count, &failures);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_multiplexed_on_one_connection_get_their_401() {
    let gw = auth_gateway().await;
    let addr = gw.proxy_addr;
    let sizes = [CHAT.len(), OVER_WINDOW, 300 * 1024, MIB];
    let (rounds, concurrent) = (4, 50);
    let mut failures = Vec::new();
    for _ in 0..rounds {
        let (sender, connection) = connect(addr).await;
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..concurrent {
            let mut sender = sender.clone();
            let body = json_of(sizes[i % sizes.len()]);
            requests.spawn(async move {
                refused_on(&mut sender, keyless(addr, Body::full(body))).await
            });
        }
        while let Some(outcome) = requests.join_next().await {
            failures.extend(outcome.unwrap().err());
        }
        drop(sender);
        failures.extend(ended_cleanly(connection).await.err());
    }
    assert_none_failed("multiplexed", rounds * concurrent, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_with_slow_bodies_of_unknown_length_get_their_401() {
    let gw = auth_gateway().await;
    let addr = gw.proxy_addr;
    let mut failures = Vec::new();
    // Each on its own connection…
    let fresh = 20;
    for _ in 0..fresh {
        let (mut sender, connection) = connect(addr).await;
        let body = slow_body(8, 16 * 1024, Duration::from_millis(5));
        let mut outcome = refused_on(&mut sender, keyless(addr, body)).await;
        drop(sender);
        if outcome.is_ok() {
            outcome = ended_cleanly(connection).await;
        }
        failures.extend(outcome.err());
    }
    // …and many at once on one.
    let concurrent = 40;
    let (sender, connection) = connect(addr).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..concurrent {
        let mut sender = sender.clone();
        let body = slow_body(8, 16 * 1024, Duration::from_millis(5));
        requests.spawn(async move { refused_on(&mut sender, keyless(addr, body)).await });
    }
    while let Some(outcome) = requests.join_next().await {
        failures.extend(outcome.unwrap().err());
    }
    drop(sender);
    failures.extend(ended_cleanly(connection).await.err());
    assert_none_failed("slow bodies", fresh + concurrent, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_through_a_pooled_http2_client_get_their_401() {
    let gw = auth_gateway().await;
    let addr = gw.proxy_addr;
    let client = Arc::new(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Body>(),
    );
    let sizes = [CHAT.len(), OVER_WINDOW, MIB];
    let (count, concurrency) = (200, 8);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return failures;
                }
                let request = keyless(addr, Body::full(json_of(sizes[i % sizes.len()])));
                let client = client.clone();
                let outcome = refused_by(async move { Ok(client.request(request).await?) }).await;
                failures.extend(outcome.err());
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = workers.join_next().await {
        failures.extend(done.unwrap());
    }
    assert_none_failed("pooled client", count, &failures);
}

/// Sends `count` keyless requests with `size`-byte bodies over one
/// connection, `concurrency` at a time; returns the failures.
async fn refusals_on_one_connection(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    size: usize,
) -> Vec<String> {
    let (sender, connection) = connect(addr).await;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut sender, next) = (sender.clone(), next.clone());
        workers.spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return failures;
                }
                let request = keyless(addr, Body::full(json_of(size)));
                if let Err(err) = refused_on(&mut sender, request).await {
                    failures.push(format!("request {i}: {err}"));
                }
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = workers.join_next().await {
        failures.extend(done.unwrap());
    }
    drop(sender);
    failures.extend(ended_cleanly(connection).await.err());
    failures
}

/// A client that keeps its connection and is refused again and again,
/// each time before the gateway has read its body: the connection stays
/// up. (Each body the gateway dropped unread used to be reset, and DATA
/// still arriving for a reset stream h2 had forgotten drew a
/// STREAM_CLOSED reset, counted against the client; at the 1024th, h2
/// closed the connection with GOAWAY ENHANCE_YOUR_CALM,
/// "too_many_internal_resets", after about a thousand refusals.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_again_and_again_stays_up() {
    let gw = auth_gateway().await;
    let (count, concurrency) = (1500, 1);
    let failures = refusals_on_one_connection(gw.proxy_addr, count, concurrency, MIB).await;
    assert_none_failed("one connection, 1 MiB bodies", count, &failures);
}

/// HTTP/2 spoken by hand, for frames no client library sends on cue.
mod raw {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::LIMIT;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    const WINDOW_UPDATE: u8 = 0x8;
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub struct Connection {
        socket: TcpStream,
        authority: String,
    }

    impl Connection {
        /// Opens a connection: the preface, empty settings and a window
        /// for the answers.
        pub async fn open(addr: SocketAddr) -> Self {
            let mut socket = TcpStream::connect(addr).await.unwrap();
            socket.set_nodelay(true).unwrap();
            socket
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            let mut connection = Self {
                socket,
                authority: addr.to_string(),
            };
            connection.send(SETTINGS, 0, 0, &[]).await;
            // Room for every answer: the connection's window only grows so.
            connection
                .send(WINDOW_UPDATE, 0, 0, &0x3fff_0000u32.to_be_bytes())
                .await;
            connection
        }

        pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
            let mut frame = vec![length[1], length[2], length[3], kind, flags];
            frame.extend_from_slice(&stream.to_be_bytes());
            frame.extend_from_slice(payload);
            self.socket.write_all(&frame).await.unwrap();
        }

        /// Sends the head of a keyless JSON POST to the chat completions
        /// path on `stream`, its body to follow.
        pub async fn post_head(&mut self, stream: u32) {
            // HPACK: `:method: POST` and `:scheme: http` from the static
            // table, the rest literal, never Huffman-coded.
            let mut block = vec![0x83, 0x86];
            literal(&mut block, 4, b"/v1/chat/completions");
            let authority = self.authority.clone();
            literal(&mut block, 1, authority.as_bytes());
            block.push(0x00);
            string(&mut block, b"content-type");
            string(&mut block, b"application/json");
            self.send(HEADERS, END_HEADERS, stream, &block).await;
        }

        /// The next frame, answering the server's settings and pings as
        /// they come; `None` when the server closed the connection.
        pub async fn next(&mut self) -> Option<Frame> {
            loop {
                let mut head = [0u8; 9];
                let read = tokio::time::timeout(LIMIT, self.socket.read_exact(&mut head))
                    .await
                    .expect("the gateway went quiet");
                read.ok()?;
                let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; length];
                self.socket.read_exact(&mut payload).await.ok()?;
                let frame = Frame {
                    kind: head[3],
                    flags: head[4],
                    stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                    payload,
                };
                match (frame.kind, frame.flags & ACK) {
                    (SETTINGS, 0) => self.send(SETTINGS, ACK, 0, &[]).await,
                    (PING, 0) => self.send(PING, ACK, 0, &frame.payload).await,
                    _ => return Some(frame),
                }
            }
        }
    }

    /// A literal field without indexing, its name from the static table.
    fn literal(block: &mut Vec<u8>, name: u8, value: &[u8]) {
        block.push(name);
        string(block, value);
    }

    fn string(block: &mut Vec<u8>, value: &[u8]) {
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value);
    }

    /// An RST_STREAM's or GOAWAY's error code, by name.
    pub fn error_code(frame: &Frame) -> String {
        let at = if frame.kind == GOAWAY { 4 } else { 0 };
        let code = frame
            .payload
            .get(at..at + 4)
            .map_or(u32::MAX, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let name = match code {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x5 => "STREAM_CLOSED",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0xb => "ENHANCE_YOUR_CALM",
            _ => "other",
        };
        let debug = frame.payload.get(8..).filter(|_| frame.kind == GOAWAY);
        match debug {
            Some(debug) if !debug.is_empty() => {
                format!("{name} ({})", String::from_utf8_lossy(debug))
            }
            _ => name.to_owned(),
        }
    }
}

/// The same, frame by frame and with no race: each request's head is
/// sent, its 401 read whole, and only then the rest of its body, DATA the
/// gateway gets after it has answered (as a client does whose body is
/// still on its way). Every request gets its 401, the connection stays
/// up, and no stream is reset with anything but NO_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_sent_after_a_refusal_breaks_neither_the_stream_nor_the_connection() {
    let gw = auth_gateway().await;
    let mut connection = raw::Connection::open(gw.proxy_addr).await;
    let requests = 1200;
    let mut resets = BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    'requests: for i in 0..requests {
        let stream = 2 * i + 1;
        connection.post_head(stream).await;
        connection.send(raw::DATA, 0, stream, b"{\"model\":").await;
        let mut answer = Vec::new();
        loop {
            let Some(frame) = connection.next().await else {
                failures.push(format!("request {i}: the gateway closed the connection"));
                break 'requests;
            };
            match frame.kind {
                raw::GOAWAY => {
                    let code = raw::error_code(&frame);
                    failures.push(format!("request {i}: GOAWAY {code}"));
                    break 'requests;
                }
                raw::RST_STREAM => {
                    *resets.entry(raw::error_code(&frame)).or_default() += 1;
                    if frame.stream == stream {
                        failures.push(format!("request {i}: reset before its answer"));
                        continue 'requests;
                    }
                }
                raw::DATA if frame.stream == stream => {
                    answer.extend_from_slice(&frame.payload);
                    if frame.flags & raw::END_STREAM != 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        if !answer.contains("\"missing_api_key\"") {
            failures.push(format!("request {i}: answered {answer}"));
        }
        // The rest of the body, after the answer.
        connection.send(raw::DATA, 0, stream, b"\"m\",").await;
        connection
            .send(raw::DATA, raw::END_STREAM, stream, b"\"messages\":[]}")
            .await;
    }
    // A ping's answer comes after everything the gateway made of the above.
    connection.send(raw::PING, 0, 0, b"12345678").await;
    loop {
        let Some(frame) = connection.next().await else {
            failures.push("the gateway closed the connection".to_owned());
            break;
        };
        match frame.kind {
            raw::PING if frame.flags & raw::ACK != 0 => break,
            raw::GOAWAY => {
                failures.push(format!("GOAWAY {}", raw::error_code(&frame)));
                break;
            }
            raw::RST_STREAM => *resets.entry(raw::error_code(&frame)).or_default() += 1,
            _ => {}
        }
    }
    assert_none_failed("body after the answer", requests as usize, &failures);
    resets.remove("NO_ERROR");
    assert!(resets.is_empty(), "streams reset: {resets:?}");
}
