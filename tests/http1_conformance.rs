//! HTTP/1.1 conformance over real loopback sockets: for each request
//! smuggling and framing class of RFC 9112 and of PortSwigger's
//! catalogue, raw bytes go to the gateway on each route class, and both
//! what the client gets back and the exact bytes the upstream received
//! are checked.
//!
//! The route classes are the ways the gateway handles a body: read whole
//! and parsed as JSON (`POST /v1/chat/completions`), streamed through
//! (`POST /v1/files`, its body sent after its head so that it is streamed
//! rather than read with the head, and `DELETE /v1/files/f1` with a body),
//! and `GET /v1/models`. Each table test runs every case on every route,
//! each route on a gateway and recording upstream of its own (the routes
//! side by side, the cases one after another), a fresh client connection
//! per case, and reports every failing case at once.
//!
//! The last test has upstreams that answer wrongly; how kept-alive
//! upstream connections are reused and replaced is in
//! upstream_connections.rs, which this complements.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abgate::app::Running;
use abgate_mock::{MockConfig, MockHandle};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The longest a client waits for what it expects from the gateway.
const READ_LIMIT: Duration = Duration::from_secs(2);
/// How long a client keeps reading once it has the answers it expects:
/// long enough for one it should not get (a smuggled request's).
const QUIET: Duration = Duration::from_millis(60);
/// The pause between a head and a body sent after it, so that the
/// gateway has handled the head before the body comes.
const BODY_DELAY: Duration = Duration::from_millis(30);
/// The request smuggling cases try to slip past the gateway.
const SMUGGLED: &[u8] = b"GET /v1/smuggled HTTP/1.1\r\nhost: x\r\nx-user-id: u1\r\n\r\n";
const SMUGGLED_PATH: &[u8] = b"/v1/smuggled";
/// The recording upstream's answer body: a chat completion.
const ANSWER_BODY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
/// Marks bytes a hostile upstream sends that no client may ever see.
const STRAY: &[u8] = b"STRAY";

// ---------------------------------------------------------------------
// Route classes and the requests sent on them.

/// A route class: where a request goes and the body it carries.
#[derive(Debug, Clone, Copy)]
struct Route {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    /// What the cases put in the body; each length's hex has a letter,
    /// so that cases about the hex digits' case mean something.
    payload: &'static [u8],
    /// The body goes in a second write, after the head: it is streamed
    /// to the upstream, not read with the head.
    body_later: bool,
}

const JSON: Route = Route {
    name: "json POST /v1/chat/completions",
    method: "POST",
    path: "/v1/chat/completions",
    content_type: Some("application/json"),
    payload: br#"{"n":"hello"}"#,
    body_later: false,
};
const UPLOAD: Route = Route {
    name: "streamed POST /v1/files",
    method: "POST",
    path: "/v1/files",
    content_type: Some("application/octet-stream"),
    payload: b"upload bytes 0123456789abc",
    body_later: true,
};
const DELETE: Route = Route {
    name: "streamed DELETE /v1/files/f1",
    method: "DELETE",
    path: "/v1/files/f1",
    content_type: None,
    payload: b"delete: why.",
    body_later: false,
};
const GET: Route = Route {
    name: "GET /v1/models",
    method: "GET",
    path: "/v1/models",
    content_type: None,
    payload: b"a GET's body..",
    body_later: false,
};

/// A request as bytes on the wire, built field by field.
#[derive(Debug, Clone)]
struct Wire {
    route: Route,
    request_line: Vec<u8>,
    hosts: Vec<&'static str>,
    fields: Vec<u8>,
    body: Vec<u8>,
    /// Bytes after the body on the same connection (a pipelined request).
    after: Vec<u8>,
    /// Sent in one write even on a route whose body comes later.
    one_write: bool,
}

impl Wire {
    /// The route's request line, one Host, `x-user-id: u1` and the
    /// route's content type; no body.
    fn to(route: &Route) -> Self {
        Self {
            route: *route,
            request_line: format!("{} {} HTTP/1.1", route.method, route.path).into_bytes(),
            hosts: vec!["gateway.test"],
            fields: Vec::new(),
            body: Vec::new(),
            after: Vec::new(),
            one_write: false,
        }
    }

    fn line(mut self, line: impl AsRef<[u8]>) -> Self {
        self.request_line = line.as_ref().to_vec();
        self
    }

    fn target(self, target: &str) -> Self {
        let line = format!("{} {target} HTTP/1.1", self.route.method);
        self.line(line)
    }

    fn version(self, version: &str) -> Self {
        let line = format!("{} {} {version}", self.route.method, self.route.path);
        self.line(line)
    }

    fn hosts(mut self, hosts: &[&'static str]) -> Self {
        self.hosts = hosts.to_vec();
        self
    }

    /// One more header line, exactly these bytes, then CRLF.
    fn field(mut self, field: impl AsRef<[u8]>) -> Self {
        self.fields.extend_from_slice(field.as_ref());
        self.fields.extend_from_slice(b"\r\n");
        self
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = body.as_ref().to_vec();
        self
    }

    fn then(mut self, bytes: &[u8]) -> Self {
        self.after.extend_from_slice(bytes);
        self
    }

    fn in_one_write(mut self) -> Self {
        self.one_write = true;
        self
    }

    fn head(&self) -> Vec<u8> {
        let mut head = self.request_line.clone();
        head.extend_from_slice(b"\r\n");
        for host in &self.hosts {
            head.extend_from_slice(format!("host: {host}\r\n").as_bytes());
        }
        head.extend_from_slice(b"x-user-id: u1\r\n");
        if let Some(content_type) = self.route.content_type {
            head.extend_from_slice(format!("content-type: {content_type}\r\n").as_bytes());
        }
        head.extend_from_slice(&self.fields);
        head.extend_from_slice(b"\r\n");
        head
    }

    fn bytes(&self) -> Vec<u8> {
        [self.head(), self.body.clone(), self.after.clone()].concat()
    }

    /// The writes to send it in: the head alone first on a route whose
    /// body comes later.
    fn pieces(&self) -> Vec<Vec<u8>> {
        if self.route.body_later && !self.one_write {
            vec![
                self.head(),
                [self.body.clone(), self.after.clone()].concat(),
            ]
        } else {
            vec![self.bytes()]
        }
    }
}

/// The route's payload, framed by its length.
fn sized(route: &Route) -> Wire {
    Wire::to(route)
        .field(format!("content-length: {}", route.payload.len()))
        .body(route.payload)
}

/// The route's payload in one chunk.
fn chunked(route: &Route) -> Wire {
    Wire::to(route)
        .field("transfer-encoding: chunked")
        .body(one_chunk(route.payload))
}

/// `data` as a chunked body: one chunk and the last chunk.
fn one_chunk(data: &[u8]) -> Vec<u8> {
    [chunk(data), b"0\r\n\r\n".to_vec()].concat()
}

/// A chunked body of the payload whose size line is `size_line` (hex of
/// the payload's length, as the case writes it) and whose rest follows
/// the data.
fn chunked_as(route: &Route, size_line: String, rest: &[u8]) -> Wire {
    let body = [size_line.as_bytes(), route.payload, rest].concat();
    Wire::to(route)
        .field("transfer-encoding: chunked")
        .body(body)
}

// ---------------------------------------------------------------------
// What each case expects.

/// One request as the upstream must receive it.
#[derive(Debug, Clone)]
struct Forward {
    method: &'static str,
    /// Origin-form.
    target: String,
    body: Vec<u8>,
    /// Header names (lower case) that must not reach the upstream,
    /// besides the framing and hop-by-hop ones every head is checked for.
    absent: Vec<&'static str>,
}

impl Forward {
    /// The route's request with its payload.
    fn of(route: &Route) -> Self {
        Self {
            method: route.method,
            target: route.path.to_owned(),
            body: route.payload.to_vec(),
            absent: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum Expect {
    /// Refused by the HTTP layer before any handler: this status and
    /// JSON `code`, `connection: close`, the connection closed, and
    /// nothing sent upstream.
    Refused(u16, &'static str),
    /// A JSON error from the proxy (with its request id): this status and
    /// code, and nothing sent upstream.
    Answered(u16, &'static str),
    /// These requests reach the upstream, each answered 200, in order.
    Forwarded(Vec<Forward>),
    /// A body whose framing breaks midway: a 4xx JSON answer or none, the
    /// connection closed, no whole request upstream, and every upstream
    /// connection that carried part of it closed by the gateway.
    BrokenBody,
}

fn forwarded(route: &Route) -> Expect {
    Expect::Forwarded(vec![Forward::of(route)])
}

/// One row of a table: a name, the request per route, the expectation
/// per route.
struct Case {
    name: String,
    wire: Box<dyn Fn(&Route) -> Wire>,
    expect: Box<dyn Fn(&Route) -> Expect>,
}

fn case(
    name: impl Into<String>,
    wire: impl Fn(&Route) -> Wire + 'static,
    expect: impl Fn(&Route) -> Expect + 'static,
) -> Case {
    Case {
        name: name.into(),
        wire: Box::new(wire),
        expect: Box::new(expect),
    }
}

// ---------------------------------------------------------------------
// The recording upstream.

/// One request as the upstream parsed it.
#[derive(Debug, Clone)]
struct Recorded {
    connection: usize,
    /// The request line and header lines, without the blank line.
    head: String,
    /// De-chunked if the gateway sent it in chunks.
    body: Vec<u8>,
}

impl Recorded {
    fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }

    /// Header lines as they came.
    fn lines(&self) -> impl Iterator<Item = &str> {
        self.head.split("\r\n").skip(1)
    }

    /// Lower-case names and trimmed values.
    fn fields(&self) -> Vec<(String, String)> {
        fields_of(&self.head)
    }
}

#[derive(Debug, Default)]
struct UpstreamConnection {
    /// Bytes received that are not (yet) part of a whole request.
    unparsed: usize,
    /// The gateway closed it (or it failed).
    closed: bool,
    /// Why the upstream could not parse what the gateway sent.
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Log {
    /// Every read, in the order they came, with its connection.
    reads: Vec<(usize, Vec<u8>)>,
    requests: Vec<Recorded>,
    connections: Vec<UpstreamConnection>,
}

/// Where the log stood before a case.
#[derive(Debug, Clone, Copy)]
struct Mark {
    reads: usize,
    requests: usize,
}

/// What reached the upstream since a mark.
#[derive(Debug, Default)]
struct Seen {
    bytes: Vec<u8>,
    requests: Vec<Recorded>,
    /// Connections that got any of those bytes.
    connections: BTreeSet<usize>,
    /// Of those, the ones still open with part of a request.
    partial_open: Vec<usize>,
    /// Of those, the ones holding part of a request, open or not.
    partial: Vec<usize>,
    errors: Vec<String>,
}

/// An upstream that records every byte it gets, per connection, parses
/// requests (head, then a body by its length or its chunks) and answers
/// each with a kept-alive chat completion that names the target it got.
struct RecordingUpstream {
    url: String,
    log: Arc<Mutex<Log>>,
}

impl RecordingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = log.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(record_connection(shared.clone(), socket));
            }
        });
        Self { url, log }
    }

    fn mark(&self) -> Mark {
        let log = self.log.lock().unwrap();
        Mark {
            reads: log.reads.len(),
            requests: log.requests.len(),
        }
    }

    fn since(&self, mark: Mark) -> Seen {
        let log = self.log.lock().unwrap();
        let mut seen = Seen::default();
        for (connection, bytes) in &log.reads[mark.reads..] {
            seen.connections.insert(*connection);
            seen.bytes.extend_from_slice(bytes);
        }
        seen.requests = log.requests[mark.requests..].to_vec();
        for &id in &seen.connections {
            let connection = &log.connections[id];
            if connection.unparsed > 0 {
                seen.partial.push(id);
                if !connection.closed {
                    seen.partial_open.push(id);
                }
            }
            if let Some(error) = &connection.error {
                seen.errors.push(format!("connection {id}: {error}"));
            }
        }
        seen
    }
}

async fn record_connection(log: Arc<Mutex<Log>>, mut socket: TcpStream) {
    let id = {
        let mut log = log.lock().unwrap();
        log.connections.push(UpstreamConnection::default());
        log.connections.len() - 1
    };
    let mut pending = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        pending.extend_from_slice(&buffer[..read]);
        let mut answers = Vec::new();
        let failed = {
            let mut log = log.lock().unwrap();
            log.reads.push((id, buffer[..read].to_vec()));
            let failed = loop {
                match parse_request(&pending) {
                    Ok(Some((head, body, used))) => {
                        pending.drain(..used);
                        answers.push(recorder_answer(&head));
                        log.requests.push(Recorded {
                            connection: id,
                            head,
                            body,
                        });
                    }
                    Ok(None) => break false,
                    Err(why) => {
                        log.connections[id].error = Some(why);
                        break true;
                    }
                }
            };
            log.connections[id].unparsed = pending.len();
            failed
        };
        for answer in answers {
            if socket.write_all(&answer).await.is_err() {
                break;
            }
        }
        if failed {
            break;
        }
    }
    log.lock().unwrap().connections[id].closed = true;
}

/// The answer to a request: names the target it came for, so that a
/// client can tell its answers apart and check their order.
fn recorder_answer(head: &str) -> Vec<u8> {
    let target = head.split(' ').nth(1).unwrap_or("");
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-recorded-target: {target}\r\ncontent-length: {}\r\n\r\n{ANSWER_BODY}",
        ANSWER_BODY.len()
    )
    .into_bytes()
}

/// A whole request off the front of `bytes`: its head, its body
/// (de-chunked) and how many bytes it took; `None` while incomplete.
/// Strict: what the gateway sends upstream must be plain HTTP/1.1.
#[allow(clippy::type_complexity)]
fn parse_request(bytes: &[u8]) -> Result<Option<(String, Vec<u8>, usize)>, String> {
    let Some(end) = position(bytes, b"\r\n\r\n") else {
        return if bytes.len() > 1 << 20 {
            Err("a head longer than 1 MiB".to_owned())
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8(bytes[..end].to_vec())
        .map_err(|_| format!("a head that is not UTF-8: {}", shown(&bytes[..end])))?;
    let fields = fields_of(&head);
    let start = end + 4;
    let codings: Vec<&String> = fields
        .iter()
        .filter(|(name, _)| name == "transfer-encoding")
        .map(|(_, value)| value)
        .collect();
    if let Some(coding) = codings.iter().find(|coding| coding.as_str() != "chunked") {
        return Err(format!("transfer-encoding {coding:?}"));
    }
    if !codings.is_empty() {
        return Ok(dechunk(&bytes[start..])?.map(|(body, used)| (head, body, start + used)));
    }
    let length = match fields.iter().find(|(name, _)| name == "content-length") {
        Some((_, value)) => value
            .parse::<usize>()
            .map_err(|_| format!("content-length {value:?}"))?,
        None => 0,
    };
    if bytes.len() < start + length {
        return Ok(None);
    }
    let body = bytes[start..start + length].to_vec();
    Ok(Some((head, body, start + length)))
}

/// A chunked body off the front of `bytes`, strictly by RFC 9112 §7.1:
/// the data and how many bytes it took; `None` while incomplete.
fn dechunk(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(end) = position(&bytes[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = &bytes[at..at + end];
        let size = line.split(|byte| *byte == b';').next().unwrap_or_default();
        let size = size.trim_ascii_end();
        let valid = !size.is_empty()
            && size.iter().all(u8::is_ascii_hexdigit)
            && !line.contains(&b'\n')
            && !line.contains(&b'\r');
        let size = std::str::from_utf8(size)
            .ok()
            .filter(|_| valid)
            .and_then(|size| usize::from_str_radix(size, 16).ok())
            .ok_or_else(|| format!("chunk size line {}", shown(line)))?;
        at += end + 2;
        if size == 0 {
            loop {
                let Some(end) = position(&bytes[at..], b"\r\n") else {
                    return Ok(None);
                };
                let line = &bytes[at..at + end];
                at += end + 2;
                if line.is_empty() {
                    return Ok(Some((body, at)));
                }
                if !line.contains(&b':') || line.contains(&b'\n') {
                    return Err(format!("trailer line {}", shown(line)));
                }
            }
        }
        if bytes.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[at..at + size]);
        if &bytes[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_owned());
        }
        at += size + 2;
    }
}

/// A head's header fields: lower-case names, trimmed values.
fn fields_of(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect()
}

fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    position(haystack, needle).is_some()
}

/// Bytes for a message: escaped, and cut short past 240.
fn shown(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .take(240)
        .flat_map(|byte| std::ascii::escape_default(*byte))
        .map(char::from)
        .collect();
    if bytes.len() > 240 {
        format!("\"{text}...\" ({} bytes)", bytes.len())
    } else {
        format!("\"{text}\"")
    }
}

/// What is wrong with a request head the gateway sent upstream: framing
/// that is not the gateway's own for this body, or a field that belongs
/// to the client's connection.
fn head_faults(request: &Recorded) -> Vec<String> {
    let mut faults = Vec::new();
    let fields = request.fields();
    let lengths: Vec<&String> = fields
        .iter()
        .filter(|(name, _)| name == "content-length")
        .map(|(_, value)| value)
        .collect();
    match lengths.as_slice() {
        [] => {}
        [length] if **length == request.body.len().to_string() => {}
        [length] => faults.push(format!(
            "content-length {length:?} for a body of {} bytes",
            request.body.len()
        )),
        many => faults.push(format!("{} content-length fields {many:?}", many.len())),
    }
    let codings: Vec<&str> = request
        .lines()
        .filter(|line| {
            line.split(':')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("transfer-encoding")
        })
        .collect();
    match codings.as_slice() {
        [] | ["transfer-encoding: chunked"] => {}
        other => faults.push(format!("the client's transfer-encoding {other:?}")),
    }
    if !codings.is_empty() && !lengths.is_empty() {
        faults.push("both transfer-encoding and content-length".to_owned());
    }
    for (name, value) in &fields {
        let hop = [
            "connection",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "expect",
        ];
        if hop.contains(&name.as_str()) || name.starts_with("proxy-") {
            faults.push(format!("`{name}: {value}` forwarded"));
        }
    }
    let hosts = fields.iter().filter(|(name, _)| name == "host").count();
    if hosts != 1 {
        faults.push(format!("{hosts} host fields"));
    }
    faults
}

// ---------------------------------------------------------------------
// The client side.

/// One answer as a client parsed it.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map_or("", |(_, value)| value.as_str())
    }

    fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The JSON error's `code`, if the body is one.
    fn code(&self) -> Option<String> {
        Some(self.json()?["error"]["code"].as_str()?.to_owned())
    }

    fn describe(&self) -> String {
        let mut text = self.status.to_string();
        if let Some(code) = self.code() {
            text.push_str(&format!(" code={code}"));
        } else if !self.body.is_empty() && self.status != 200 {
            text.push_str(&format!(" body={}", shown(&self.body)));
        }
        let connection = self.header("connection");
        if !connection.is_empty() {
            text.push_str(&format!(" connection:{connection}"));
        }
        text
    }
}

/// What a client read on one connection.
#[derive(Debug, Default)]
struct Client {
    bytes: Vec<u8>,
    /// Interim and final answers, in order.
    replies: Vec<Reply>,
    /// The gateway closed the connection (or reset it).
    closed: bool,
}

impl Client {
    fn finals(&self) -> Vec<&Reply> {
        self.replies
            .iter()
            .filter(|reply| reply.status >= 200)
            .collect()
    }

    fn interim(&self) -> usize {
        self.replies.len() - self.finals().len()
    }
}

/// Every whole answer at the front of `bytes`; one framed by the close
/// only when the connection is `closed`.
fn parse_replies(bytes: &[u8], closed: bool) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut at = 0;
    while let Some((reply, used)) = parse_reply(&bytes[at..], closed) {
        replies.push(reply);
        at += used;
    }
    replies
}

fn parse_reply(bytes: &[u8], closed: bool) -> Option<(Reply, usize)> {
    let end = position(bytes, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let fields = fields_of(&head);
    let start = end + 4;
    let reply = |body: &[u8]| Reply {
        status,
        fields: fields.clone(),
        body: body.to_vec(),
    };
    if status < 200 || status == 204 || status == 304 {
        return Some((reply(b""), start));
    }
    let field = |name: &str| fields.iter().find(|(field, _)| field == name);
    if field("transfer-encoding").is_some() {
        let (body, used) = dechunk(&bytes[start..]).ok()??;
        return Some((reply(&body), start + used));
    }
    if let Some((_, length)) = field("content-length") {
        let length: usize = length.parse().ok()?;
        let body = bytes.get(start..start + length)?;
        return Some((reply(body), start + length));
    }
    closed.then(|| (reply(&bytes[start..]), bytes.len()))
}

/// Sends `pieces` on a fresh connection (a pause between them), then
/// reads until the gateway closes it, or until `expected` final answers
/// have come and nothing more follows for a moment, or [`READ_LIMIT`].
async fn converse(addr: SocketAddr, pieces: &[Vec<u8>], expected: usize) -> Client {
    bounded(async {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        for (n, piece) in pieces.iter().enumerate() {
            if n > 0 {
                tokio::time::sleep(BODY_DELAY).await;
            }
            // The gateway may have answered and closed already.
            if socket.write_all(piece).await.is_err() {
                break;
            }
        }
        read_replies(&mut socket, expected, Vec::new()).await
    })
    .await
}

/// Reads as [`converse`] does, after what was read already.
async fn read_replies(socket: &mut TcpStream, expected: usize, mut bytes: Vec<u8>) -> Client {
    let deadline = Instant::now() + READ_LIMIT;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut closed = false;
    loop {
        let finals = parse_replies(&bytes, false)
            .iter()
            .filter(|reply| reply.status >= 200)
            .count();
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = if finals >= expected {
            QUIET.min(deadline - now)
        } else {
            deadline - now
        };
        match tokio::time::timeout(wait, socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(read)) => bytes.extend_from_slice(&buffer[..read]),
            Err(_) => break,
        }
    }
    Client {
        replies: parse_replies(&bytes, closed),
        bytes,
        closed,
    }
}

// ---------------------------------------------------------------------
// Running cases and judging them.

/// A gateway whose control is a recording upstream; every request goes
/// to control (fraction 0).
struct Rig {
    gw: Running,
    upstream: RecordingUpstream,
    _treatment: MockHandle,
}

async fn rig() -> Rig {
    let upstream = RecordingUpstream::start().await;
    let treatment = spawn_mock(MockConfig::named("fine-tuned")).await;
    let gw = gateway(&config_toml(&upstream.url, &treatment.url(), 0.0, "")).await;
    Rig {
        gw,
        upstream,
        _treatment: treatment,
    }
}

/// Every failing case of one test, reported together.
#[derive(Default)]
struct Report {
    cases: usize,
    failures: Vec<String>,
}

impl Report {
    fn add(&mut self, label: &str, problems: Vec<String>, observed: String) {
        self.cases += 1;
        if !problems.is_empty() {
            self.failures.push(format!(
                "{label}\n      wrong: {}\n      observed: {observed}",
                problems.join("; ")
            ));
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed:\n  {}",
            self.failures.len(),
            self.cases,
            self.failures.join("\n  ")
        );
    }
}

impl Rig {
    /// Sends one case's bytes, judges what the client and the upstream
    /// got, and adds the verdict to `report`.
    async fn check(&self, label: &str, pieces: Vec<Vec<u8>>, expect: &Expect, report: &mut Report) {
        let expected = match expect {
            Expect::Forwarded(forwards) => forwards.len(),
            _ => 1,
        };
        let mark = self.upstream.mark();
        let client = converse(self.gw.proxy_addr, &pieces, expected).await;
        if matches!(expect, Expect::BrokenBody) {
            // The gateway closes an upstream connection left with part of
            // a request as it gives up on the body: give it a moment, and
            // the recorder a moment more to have read what was sent (a
            // head it reads late would be counted in the next case).
            let upstream = &self.upstream;
            for _ in 0..2 {
                eventually(READ_LIMIT, || async move {
                    upstream.since(mark).partial_open.is_empty().then_some(())
                })
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let seen = self.upstream.since(mark);
        report.add(
            label,
            judge(expect, &client, &seen),
            observed(&client, &seen),
        );
    }
}

/// Runs every case on one route, on a rig of its own.
async fn on_route(cases: &[Case], route: Route) -> Report {
    let rig = rig().await;
    let mut report = Report::default();
    for case in cases {
        let wire = (case.wire)(&route);
        let label = format!("[{}] {}", route.name, case.name);
        rig.check(&label, wire.pieces(), &(case.expect)(&route), &mut report)
            .await;
    }
    report
}

/// Runs every case on every route, the routes side by side (each case
/// on a route waits for the one before it, so that the recorder tells
/// cases apart), and fails with every failing case.
async fn run_table(cases: &[Case]) {
    let (json, upload, delete, get) = tokio::join!(
        on_route(cases, JSON),
        on_route(cases, UPLOAD),
        on_route(cases, DELETE),
        on_route(cases, GET),
    );
    let mut report = Report::default();
    for part in [json, upload, delete, get] {
        report.cases += part.cases;
        report.failures.extend(part.failures);
    }
    report.finish();
}

/// What the client and the upstream got, for a failure's message.
fn observed(client: &Client, seen: &Seen) -> String {
    let answers: Vec<String> = client
        .finals()
        .iter()
        .map(|reply| reply.describe())
        .collect();
    let mut text = format!(
        "client got [{}]{}, connection {}; upstream parsed {} requests {:?}, {} bytes",
        answers.join(", "),
        match client.interim() {
            0 => String::new(),
            n => format!(" after {n} interim"),
        },
        if client.closed { "closed" } else { "open" },
        seen.requests.len(),
        seen.requests
            .iter()
            .map(|request| format!(
                "{} ({} body bytes, connection {})",
                request.request_line(),
                request.body.len(),
                request.connection
            ))
            .collect::<Vec<_>>(),
        seen.bytes.len(),
    );
    if !seen.bytes.is_empty() && seen.requests.is_empty() {
        text.push_str(&format!(": {}", shown(&seen.bytes)));
    }
    if !seen.partial.is_empty() {
        text.push_str(&format!(
            "; connections {:?} hold part of a request ({:?} still open)",
            seen.partial, seen.partial_open
        ));
    }
    if client.finals().is_empty() && !client.bytes.is_empty() {
        text.push_str(&format!("; client bytes {}", shown(&client.bytes)));
    }
    text
}

/// Everything wrong with what the client and the upstream got.
fn judge(expect: &Expect, client: &Client, seen: &Seen) -> Vec<String> {
    let mut problems = Vec::new();
    if seen
        .requests
        .iter()
        .any(|request| request.request_line().contains("/v1/smuggled"))
    {
        problems.push("a request to /v1/smuggled reached the upstream".to_owned());
    }
    for error in &seen.errors {
        problems.push(format!(
            "the upstream could not parse the gateway's bytes: {error}"
        ));
    }
    let finals = client.finals();
    match expect {
        Expect::Refused(status, code) | Expect::Answered(status, code) => {
            if finals.len() != 1 {
                problems.push(format!("{} answers instead of one", finals.len()));
            }
            if let Some(answer) = finals.first() {
                if answer.status != *status {
                    problems.push(format!("status {} instead of {status}", answer.status));
                }
                if answer.code().as_deref() != Some(*code) {
                    problems.push(format!("code {:?} instead of {code:?}", answer.code()));
                }
                if matches!(expect, Expect::Refused(..)) {
                    if answer.header("connection") != "close" {
                        problems.push("no `connection: close`".to_owned());
                    }
                } else if !answer.header("x-abgate-request-id").starts_with("abg2_") {
                    problems.push("no x-abgate-request-id".to_owned());
                }
            }
            if matches!(expect, Expect::Refused(..)) && !client.closed {
                problems.push("the gateway left the connection open".to_owned());
            }
            if !seen.bytes.is_empty() {
                problems.push(format!("the upstream got {} bytes", seen.bytes.len()));
            }
        }
        Expect::Forwarded(forwards) => {
            if finals.len() != forwards.len() {
                problems.push(format!(
                    "{} answers instead of {}",
                    finals.len(),
                    forwards.len()
                ));
            }
            for (n, (answer, forward)) in finals.iter().zip(forwards).enumerate() {
                if answer.status != 200 {
                    problems.push(format!("answer {n} has status {}", answer.status));
                } else if answer.header("x-recorded-target") != forward.target {
                    problems.push(format!(
                        "answer {n} is the upstream's answer to {:?}, not {:?}",
                        answer.header("x-recorded-target"),
                        forward.target
                    ));
                }
            }
            if seen.requests.len() != forwards.len() {
                problems.push(format!(
                    "the upstream parsed {} requests instead of {}",
                    seen.requests.len(),
                    forwards.len()
                ));
            }
            for (n, (request, forward)) in seen.requests.iter().zip(forwards).enumerate() {
                let line = format!("{} {} HTTP/1.1", forward.method, forward.target);
                if request.request_line() != line {
                    problems.push(format!(
                        "upstream request {n} is {:?}, not {line:?}",
                        request.request_line()
                    ));
                }
                if request.body != forward.body {
                    problems.push(format!(
                        "upstream request {n} has body {} instead of {}",
                        shown(&request.body),
                        shown(&forward.body)
                    ));
                }
                for fault in head_faults(request) {
                    problems.push(format!("upstream request {n}: {fault}"));
                }
                for name in &forward.absent {
                    if request.fields().iter().any(|(field, _)| field == name) {
                        problems.push(format!("upstream request {n} has `{name}`"));
                    }
                }
            }
            if !seen.partial.is_empty() {
                problems.push("the upstream was left with part of a request".to_owned());
            }
        }
        Expect::BrokenBody => {
            if finals.len() > 1 {
                problems.push(format!("{} answers to one request", finals.len()));
            }
            if let Some(answer) = finals.first() {
                if !(400..500).contains(&answer.status) || answer.code().is_none() {
                    problems.push(format!(
                        "answered {} instead of a 4xx JSON error or nothing",
                        answer.describe()
                    ));
                }
            }
            if !client.closed {
                problems.push("the gateway left the connection open".to_owned());
            }
            if !seen.requests.is_empty() {
                problems.push(format!(
                    "the upstream parsed {} whole requests",
                    seen.requests.len()
                ));
            }
            if contains(&seen.bytes, SMUGGLED_PATH) {
                problems.push("the pipelined request's bytes reached the upstream".to_owned());
            }
            // A request whose body was partly sent cannot be sent again.
            let heads = seen
                .bytes
                .windows(b" HTTP/1.1\r\n".len())
                .filter(|window| window == b" HTTP/1.1\r\n")
                .count();
            if heads > 1 {
                problems.push(format!(
                    "the request's head reached the upstream {heads} times"
                ));
            }
            if !seen.partial_open.is_empty() {
                problems.push(format!(
                    "upstream connections {:?} with part of the request were left open",
                    seen.partial_open
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------
// The tables.

fn framing_refusals() -> Vec<Case> {
    let invalid = |_: &Route| Expect::Refused(400, "invalid_framing");
    vec![
        case(
            "CL.TE: content-length, then transfer-encoding: chunked",
            |r| {
                let body = one_chunk(r.payload);
                Wire::to(r)
                    .field(format!("content-length: {}", body.len()))
                    .field("transfer-encoding: chunked")
                    .body(body)
            },
            invalid,
        ),
        case(
            "TE.CL: transfer-encoding: chunked, then content-length",
            |r| {
                let body = one_chunk(r.payload);
                Wire::to(r)
                    .field("transfer-encoding: chunked")
                    .field(format!("content-length: {}", body.len()))
                    .body(body)
            },
            invalid,
        ),
        case(
            "content-length: +N",
            |r| {
                Wire::to(r)
                    .field(format!("content-length: +{}", r.payload.len()))
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "content-length: N N",
            |r| {
                let n = r.payload.len();
                Wire::to(r)
                    .field(format!("content-length: {n} {n}"))
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "content-length: 0xN",
            |r| {
                Wire::to(r)
                    .field(format!("content-length: 0x{:x}", r.payload.len()))
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "content-length: -1",
            |r| Wire::to(r).field("content-length: -1").body(r.payload),
            invalid,
        ),
        case(
            "content-length: (empty)",
            |r| Wire::to(r).field("content-length: ").body(r.payload),
            invalid,
        ),
        case(
            "two content-length fields, N and N+1",
            |r| {
                let n = r.payload.len();
                Wire::to(r)
                    .field(format!("content-length: {n}"))
                    .field(format!("content-length: {}", n + 1))
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "content-length list N, N+1",
            |r| {
                let n = r.payload.len();
                Wire::to(r)
                    .field(format!("content-length: {n}, {}", n + 1))
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "transfer-encoding: identity",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: identity")
                    .body(r.payload)
            },
            invalid,
        ),
        case(
            "transfer-encoding: xchunked",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: xchunked")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: chunked, identity",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: chunked, identity")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: chunked, then a second field x",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: chunked")
                    .field("transfer-encoding: x")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: chunked, chunked",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: chunked, chunked")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: chunked in two fields",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: chunked")
                    .field("transfer-encoding: chunked")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: chunked on HTTP/1.0",
            |r| {
                Wire::to(r)
                    .version("HTTP/1.0")
                    .field("transfer-encoding: chunked")
                    .body(one_chunk(r.payload))
            },
            invalid,
        ),
        case(
            "transfer-encoding: gzip, chunked",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding: gzip, chunked")
                    .body(one_chunk(r.payload))
            },
            |_| Expect::Refused(501, "unsupported_transfer_coding"),
        ),
    ]
}

#[tokio::test]
async fn framing_fields_that_disagree_or_do_not_parse_are_refused_before_any_handler() {
    run_table(&framing_refusals()).await;
}

#[tokio::test]
async fn framing_fields_that_mean_one_thing_are_accepted_and_the_gateway_frames_the_body_itself() {
    let cases = [
        case("one content-length", sized, forwarded),
        case(
            "two identical content-length fields",
            |r| sized(r).field(format!("content-length: {}", r.payload.len())),
            forwarded,
        ),
        case("transfer-encoding: chunked", chunked, forwarded),
        case(
            "transfer-encoding:<HTAB>chunked",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding:\tchunked")
                    .body(one_chunk(r.payload))
            },
            forwarded,
        ),
        case(
            "Transfer-Encoding: Chunked (another case)",
            |r| {
                Wire::to(r)
                    .field("Transfer-Encoding: Chunked")
                    .body(one_chunk(r.payload))
            },
            forwarded,
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn malformed_heads_bad_hosts_and_oversized_heads_are_refused_before_any_handler() {
    let malformed = |_: &Route| Expect::Refused(400, "malformed_request");
    let bad_host = |_: &Route| Expect::Refused(400, "invalid_host");
    let cases = [
        case(
            "obs-fold: a line starting with SP continues a field",
            |r| sized(r).field("x-note: a").field(" folded"),
            malformed,
        ),
        case(
            "obs-fold: a line starting with HTAB continues a field",
            |r| sized(r).field("x-note: a").field("\tfolded"),
            malformed,
        ),
        case(
            "obs-fold: transfer-encoding's value on the next line",
            |r| {
                Wire::to(r)
                    .field("transfer-encoding:")
                    .field(" chunked")
                    .body(one_chunk(r.payload))
            },
            malformed,
        ),
        case(
            "bare CR inside a header line",
            |r| sized(r).field("x-note: a\rx-abgate-variant: treatment"),
            malformed,
        ),
        case(
            "NUL in a header value",
            |r| sized(r).field("x-note: a\0b"),
            malformed,
        ),
        case(
            "control byte 0x01 in a header value",
            |r| sized(r).field("x-note: a\u{1}b"),
            malformed,
        ),
        case(
            "DEL in a header value",
            |r| sized(r).field("x-note: a\u{7f}b"),
            malformed,
        ),
        case(
            "space before the colon: `Transfer-Encoding : chunked`",
            |r| {
                Wire::to(r)
                    .field("Transfer-Encoding : chunked")
                    .body(one_chunk(r.payload))
            },
            malformed,
        ),
        case(
            "space before the colon: `x-note : a`",
            |r| sized(r).field("x-note : a"),
            malformed,
        ),
        case(
            "request line with an extra token",
            |r| {
                let line = format!("{} {} HTTP/1.1 extra", r.method, r.path);
                sized(r).line(line)
            },
            malformed,
        ),
        case(
            "request line with two spaces",
            |r| {
                let line = format!("{}  {} HTTP/1.1", r.method, r.path);
                sized(r).line(line)
            },
            malformed,
        ),
        case(
            "request line without a version",
            |r| {
                let line = format!("{} {}", r.method, r.path);
                sized(r).line(line)
            },
            malformed,
        ),
        case(
            "request line with a lower-case version",
            |r| {
                let line = format!("{} {} http/1.1", r.method, r.path);
                sized(r).line(line)
            },
            malformed,
        ),
        case("HTTP/1.1 without host", |r| sized(r).hosts(&[]), bad_host),
        case(
            "two host fields, different",
            |r| sized(r).hosts(&["gateway.test", "other.test"]),
            bad_host,
        ),
        case(
            "two host fields, the same",
            |r| sized(r).hosts(&["gateway.test", "gateway.test"]),
            bad_host,
        ),
        case(
            "HTTP/1.0 with two host fields",
            |r| {
                sized(r)
                    .version("HTTP/1.0")
                    .hosts(&["gateway.test", "other.test"])
            },
            bad_host,
        ),
        case(
            "a head over the 64 KiB limit",
            |r| sized(r).field(format!("x-big: {}", "a".repeat(70_000))),
            |_| Expect::Refused(431, "headers_too_large"),
        ),
        // The HTTP layer's own bound is four times the limit
        // (`ConnectionLimits::for_max_header_bytes`).
        case(
            "a head over 4 x the 64 KiB limit",
            |r| sized(r).field(format!("x-big: {}", "a".repeat(300_000))),
            |_| Expect::Refused(431, "headers_too_large"),
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn chunked_bodies_follow_the_rfc_9112_grammar_and_broken_ones_never_complete_upstream() {
    // A broken body is followed by a pipelined request: a gateway that
    // lost its place in the framing would forward it.
    let broken = |_: &Route| Expect::BrokenBody;
    let cases = [
        case("one chunk, lower-case hex", chunked, forwarded),
        case(
            "upper-case hex size",
            |r| chunked_as(r, format!("{:X}\r\n", r.payload.len()), b"\r\n0\r\n\r\n"),
            forwarded,
        ),
        case(
            "leading zeros in the size",
            |r| chunked_as(r, format!("{:04x}\r\n", r.payload.len()), b"\r\n0\r\n\r\n"),
            forwarded,
        ),
        case(
            "extension name=token",
            |r| {
                let line = format!("{:x};name=value\r\n", r.payload.len());
                chunked_as(r, line, b"\r\n0\r\n\r\n")
            },
            forwarded,
        ),
        case(
            "extension with a quoted value",
            |r| {
                let line = format!("{:x};name=\"a b;c\"\r\n", r.payload.len());
                chunked_as(r, line, b"\r\n0\r\n\r\n")
            },
            forwarded,
        ),
        case(
            "extension without a value",
            |r| {
                chunked_as(
                    r,
                    format!("{:x};flag\r\n", r.payload.len()),
                    b"\r\n0\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "two extensions",
            |r| {
                chunked_as(
                    r,
                    format!("{:x};a=1;b=2\r\n", r.payload.len()),
                    b"\r\n0\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "BWS (SP) before an extension",
            |r| {
                chunked_as(
                    r,
                    format!("{:x} ;a=1\r\n", r.payload.len()),
                    b"\r\n0\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "BWS (HTAB) before an extension",
            |r| {
                chunked_as(
                    r,
                    format!("{:x}\t;a=1\r\n", r.payload.len()),
                    b"\r\n0\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "several chunks",
            |r| {
                let (first, rest) = r.payload.split_at(3);
                let (second, third) = rest.split_at(5);
                let body = [
                    chunk(first),
                    chunk(second),
                    chunk(third),
                    b"0\r\n\r\n".to_vec(),
                ];
                Wire::to(r)
                    .field("transfer-encoding: chunked")
                    .body(body.concat())
            },
            forwarded,
        ),
        case(
            "a trailer field",
            |r| {
                chunked_as(
                    r,
                    format!("{:x}\r\n", r.payload.len()),
                    b"\r\n0\r\nx-t: 1\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "last chunk with an extension",
            |r| {
                chunked_as(
                    r,
                    format!("{:x}\r\n", r.payload.len()),
                    b"\r\n0;done\r\n\r\n",
                )
            },
            forwarded,
        ),
        case(
            "junk after the size digits (`2azz`)",
            |r| {
                chunked_as(r, format!("{:x}zz\r\n", r.payload.len()), b"\r\n0\r\n\r\n")
                    .then(SMUGGLED)
            },
            broken,
        ),
        case(
            "0x prefix on the size",
            |r| {
                chunked_as(r, format!("0x{:x}\r\n", r.payload.len()), b"\r\n0\r\n\r\n")
                    .then(SMUGGLED)
            },
            broken,
        ),
        case(
            "bare LF after the size",
            |r| chunked_as(r, format!("{:x}\n", r.payload.len()), b"\r\n0\r\n\r\n").then(SMUGGLED),
            broken,
        ),
        case(
            "bare CR inside an extension",
            |r| {
                chunked_as(
                    r,
                    format!("{:x};a\rb\r\n", r.payload.len()),
                    b"\r\n0\r\n\r\n",
                )
                .then(SMUGGLED)
            },
            broken,
        ),
        case(
            "chunk data not followed by CRLF",
            |r| chunked_as(r, format!("{:x}\r\n", r.payload.len()), b"XX0\r\n\r\n").then(SMUGGLED),
            broken,
        ),
        case(
            "SP before the size",
            |r| {
                chunked_as(r, format!(" {:x}\r\n", r.payload.len()), b"\r\n0\r\n\r\n")
                    .then(SMUGGLED)
            },
            broken,
        ),
        case(
            "a size past 64 bits",
            |r| chunked_as(r, "10000000000000000\r\n".to_owned(), b"\r\n0\r\n\r\n").then(SMUGGLED),
            broken,
        ),
        case(
            "a trailer line without a colon",
            |r| {
                chunked_as(
                    r,
                    format!("{:x}\r\n", r.payload.len()),
                    b"\r\n0\r\nno colon\r\n\r\n",
                )
                .then(SMUGGLED)
            },
            broken,
        ),
        case(
            "a trailer line ended by a bare LF",
            |r| {
                chunked_as(
                    r,
                    format!("{:x}\r\n", r.payload.len()),
                    b"\r\n0\r\nx-t: 1\n\r\n",
                )
                .then(SMUGGLED)
            },
            broken,
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn smuggled_second_requests_never_reach_the_upstream() {
    // The smuggled request is a chunk's data or a body that one reading of
    // the framing skips and another takes for the next request.
    fn in_one_chunk(route: &Route) -> Wire {
        Wire::to(route).body(one_chunk(SMUGGLED))
    }
    let invalid = |_: &Route| Expect::Refused(400, "invalid_framing");
    let malformed = |_: &Route| Expect::Refused(400, "malformed_request");
    let cases = [
        case(
            "CL.TE: content-length 0, the chunk's data a whole request",
            |r| {
                in_one_chunk(r)
                    .field("content-length: 0")
                    .field("transfer-encoding: chunked")
            },
            invalid,
        ),
        case(
            "TE.CL: chunked, content-length covering only the size line",
            |r| {
                let size_line = format!("{:x}\r\n", SMUGGLED.len()).len();
                in_one_chunk(r)
                    .field("transfer-encoding: chunked")
                    .field(format!("content-length: {size_line}"))
            },
            invalid,
        ),
        case(
            "TE.TE: chunked and an obfuscated second transfer-encoding, with CL",
            |r| {
                in_one_chunk(r)
                    .field("transfer-encoding: chunked")
                    .field("transfer-encoding: cow")
                    .field("content-length: 0")
            },
            invalid,
        ),
        case(
            "transfer-encoding after a bare LF inside another field, with CL",
            |r| {
                in_one_chunk(r)
                    .field("content-length: 0")
                    .field("x-note: a\ntransfer-encoding: chunked")
            },
            invalid,
        ),
        case(
            "`Transfer-Encoding : chunked` (space before colon), with CL",
            |r| {
                in_one_chunk(r)
                    .field("content-length: 0")
                    .field("Transfer-Encoding : chunked")
            },
            malformed,
        ),
        case(
            "transfer-encoding folded onto the next line, with CL",
            |r| {
                in_one_chunk(r)
                    .field("content-length: 0")
                    .field("transfer-encoding:")
                    .field(" chunked")
            },
            malformed,
        ),
        case(
            "CL.CL: content-length 0, then the request's length",
            |r| {
                Wire::to(r)
                    .field("content-length: 0")
                    .field(format!("content-length: {}", SMUGGLED.len()))
                    .body(SMUGGLED)
            },
            invalid,
        ),
        case(
            "content-length list 0, the request's length",
            |r| {
                Wire::to(r)
                    .field(format!("content-length: 0, {}", SMUGGLED.len()))
                    .body(SMUGGLED)
            },
            invalid,
        ),
        case(
            "CL.0: a whole request as a body framed by its length",
            |r| {
                Wire::to(r)
                    .field(format!("content-length: {}", SMUGGLED.len()))
                    .body(SMUGGLED)
            },
            // The body is the upstream's to read as a body, framed by the
            // gateway's own length; the JSON route finds it is no JSON.
            |r| match r.content_type {
                Some("application/json") => Expect::Answered(400, "invalid_json"),
                _ => Expect::Forwarded(vec![Forward {
                    body: SMUGGLED.to_vec(),
                    ..Forward::of(r)
                }]),
            },
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn paths_with_dot_segments_or_encoded_separators_are_refused() {
    fn refused_path(target: &'static str) -> Case {
        case(
            target,
            move |r| sized(r).target(target),
            |_| Expect::Answered(400, "invalid_path"),
        )
    }
    let mut cases: Vec<Case> = [
        "/v1/../x",
        "/v1/%2e%2e/x",
        "/v1/%2E%2e/x",
        "/v1/./../x",
        "/v1/.%2e/x",
        "/v1/..",
        "/v1/a%2fb",
        "/v1/a%2Fb",
        "/v1/a%5cb",
        "/v1/a\\b",
        "/v1/a%00b",
    ]
    .into_iter()
    .map(refused_path)
    .collect();
    cases.extend([
        case("the route's own path", sized, forwarded),
        case(
            "absolute-form target, sent upstream in origin-form",
            |r| {
                let line = format!("{} http://example.com{} HTTP/1.1", r.method, r.path);
                sized(r).line(line).hosts(&["example.com"])
            },
            forwarded,
        ),
        // Dots and encoded slashes in the query are not the path's.
        case(
            "dots and %2F in the query",
            |r| {
                let target = format!("{}?after=../x%2Fy", r.path);
                sized(r).target(&target)
            },
            |r| {
                Expect::Forwarded(vec![Forward {
                    target: format!("{}?after=../x%2Fy", r.path),
                    ..Forward::of(r)
                }])
            },
        ),
    ]);
    run_table(&cases).await;
}

#[tokio::test]
async fn hop_by_hop_fields_stay_on_the_clients_connection() {
    fn without(route: &Route, absent: &[&'static str]) -> Expect {
        Expect::Forwarded(vec![Forward {
            absent: absent.to_vec(),
            ..Forward::of(route)
        }])
    }
    let cases = [
        case(
            "connection: x-drop-me names a field",
            |r| {
                sized(r)
                    .field("connection: x-drop-me")
                    .field("x-drop-me: 1")
            },
            |r| without(r, &["x-drop-me"]),
        ),
        case(
            "connection: close, x-drop-me",
            |r| {
                sized(r)
                    .field("connection: close, x-drop-me")
                    .field("x-drop-me: 1")
            },
            |r| without(r, &["x-drop-me"]),
        ),
        case(
            "connection: keep-alive and keep-alive: timeout=5",
            |r| {
                sized(r)
                    .field("connection: keep-alive")
                    .field("keep-alive: timeout=5")
            },
            forwarded,
        ),
        case(
            "te: trailers",
            |r| sized(r).field("te: trailers"),
            forwarded,
        ),
        case(
            "trailer: x-t",
            |r| sized(r).field("trailer: x-t"),
            forwarded,
        ),
        case(
            "upgrade: websocket with connection: upgrade",
            |r| {
                sized(r)
                    .field("connection: upgrade")
                    .field("upgrade: websocket")
            },
            forwarded,
        ),
        case(
            "proxy-connection: keep-alive",
            |r| sized(r).field("proxy-connection: keep-alive"),
            forwarded,
        ),
        case(
            "proxy-authorization",
            |r| sized(r).field("proxy-authorization: Basic dTpw"),
            forwarded,
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_forwarded_once_each() {
    /// The route's request to `?n={n}`, framed by its length or chunked.
    fn numbered(route: &Route, n: usize, in_chunks: bool) -> Wire {
        let wire = if in_chunks {
            chunked(route)
        } else {
            sized(route)
        };
        wire.target(&format!("{}?n={n}", route.path))
    }
    /// Two requests, both in one write.
    fn two(route: &Route, first_chunked: bool, second_chunked: bool) -> Wire {
        let second = numbered(route, 2, second_chunked).bytes();
        numbered(route, 1, first_chunked)
            .then(&second)
            .in_one_write()
    }
    fn both_forwarded(route: &Route) -> Expect {
        let numbered = |n: usize| Forward {
            target: format!("{}?n={n}", route.path),
            ..Forward::of(route)
        };
        Expect::Forwarded(vec![numbered(1), numbered(2)])
    }
    let cases = [
        case(
            "content-length, then content-length",
            |r| two(r, false, false),
            both_forwarded,
        ),
        case(
            "content-length, then chunked",
            |r| two(r, false, true),
            both_forwarded,
        ),
        case(
            "chunked, then content-length",
            |r| two(r, true, false),
            both_forwarded,
        ),
        case(
            "chunked, then chunked",
            |r| two(r, true, true),
            both_forwarded,
        ),
    ];
    run_table(&cases).await;
}

#[tokio::test]
async fn expect_100_continue_is_the_gateways_to_answer_and_never_forwarded() {
    let rig = rig().await;
    let mut report = Report::default();
    for route in [JSON, UPLOAD, DELETE] {
        let wire = sized(&route).field("expect: 100-continue");
        let mark = rig.upstream.mark();
        let client = bounded(async {
            let mut socket = TcpStream::connect(rig.gw.proxy_addr).await.unwrap();
            socket.write_all(&wire.head()).await.unwrap();
            // The body waits for the 100, as a client that expects it does
            // (for a while: RFC 9110 §10.1.1 lets it send on without).
            let mut bytes = Vec::new();
            let mut buffer = [0u8; 4096];
            let waited = tokio::time::timeout(READ_LIMIT, async {
                while parse_replies(&bytes, false).is_empty() {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => bytes.extend_from_slice(&buffer[..read]),
                    }
                }
            });
            let _ = waited.await;
            let _ = socket.write_all(&wire.body).await;
            read_replies(&mut socket, 1, bytes).await
        })
        .await;
        let seen = rig.upstream.since(mark);
        let mut problems = judge(&forwarded(&route), &client, &seen);
        match client.replies.first() {
            Some(first) if first.status == 100 => {
                if !client.bytes.starts_with(b"HTTP/1.1 100 Continue\r\n") {
                    problems.push("the interim answer is not `HTTP/1.1 100 Continue`".to_owned());
                }
            }
            _ => problems.push("no 100 Continue before the answer".to_owned()),
        }
        if client.interim() > 1 {
            problems.push(format!("{} interim answers", client.interim()));
        }
        let label = format!("[{}] expect: 100-continue", route.name);
        report.add(&label, problems, observed(&client, &seen));
    }
    report.finish();
}

// ---------------------------------------------------------------------
// Upstreams that answer wrongly.

/// Ways an upstream's answer oversteps its request.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    /// The answer's body runs past its length, into what looks like a
    /// second answer, in the same write.
    LongerThanItsLength,
    /// Two whole answers to one request, in one write.
    TwoAnswers,
    /// An answer, then, while the connection idles, bytes nobody asked for.
    BytesWhileIdle,
    /// 1000 `100 Continue` interim answers before the answer.
    InterimFlood,
    /// An answer whose head is over 64 KiB.
    HeadOver64KiB,
}

const HOSTILE: [Hostile; 5] = [
    Hostile::LongerThanItsLength,
    Hostile::TwoAnswers,
    Hostile::BytesWhileIdle,
    Hostile::InterimFlood,
    Hostile::HeadOver64KiB,
];

/// A kept-alive answer with `body`.
fn kept_alive(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// An upstream whose first connection misbehaves as `hostile` says and
/// whose later connections answer every request well.
async fn hostile_upstream(hostile: Hostile) -> String {
    scripted_upstream(move |number, socket| async move {
        if number == 0 {
            misbehave(hostile, socket).await;
        } else {
            serve_well(socket).await;
        }
    })
    .await
}

/// Answers the request already read, then every next one, until the
/// gateway closes the connection (or 3 s pass).
async fn serve_well(mut socket: TcpStream) {
    let answer = kept_alive(ANSWER_BODY.as_bytes());
    let _ = socket.write_all(&answer).await;
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_secs(3), read_request(&mut socket)).await
    {
        let _ = socket.write_all(&answer).await;
    }
}

async fn misbehave(hostile: Hostile, mut socket: TcpStream) {
    let good = kept_alive(ANSWER_BODY.as_bytes());
    let stray_answer = kept_alive(br#"{"stray":"STRAY"}"#);
    match hostile {
        Hostile::LongerThanItsLength => {
            let extra = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nSTRAY";
            let _ = socket.write_all(&[&good[..], extra].concat()).await;
        }
        Hostile::TwoAnswers => {
            let _ = socket.write_all(&[good, stray_answer].concat()).await;
        }
        Hostile::BytesWhileIdle => {
            let _ = socket.write_all(&good).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = socket.write_all(&stray_answer).await;
        }
        Hostile::InterimFlood => {
            let flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1000);
            let _ = socket.write_all(&flood).await;
            // The answer that follows leaves a clean connection behind.
            return serve_well(socket).await;
        }
        Hostile::HeadOver64KiB => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: {}\r\ncontent-length: {}\r\n\r\n",
                "a".repeat(70_000),
                ANSWER_BODY.len()
            );
            let _ = socket
                .write_all(&[head.as_bytes(), ANSWER_BODY.as_bytes()].concat())
                .await;
            // A whole answer, however large: a gateway that took it may
            // reuse the connection, and it answers well from then on.
            return serve_well(socket).await;
        }
    }
    // Held open without answering more: a request sent on this
    // connection again would be answered by the stray bytes.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buffer = [0u8; 4096];
        while matches!(socket.read(&mut buffer).await, Ok(read) if read > 0) {}
    })
    .await;
}

/// One client request on `route` to a gateway whose control upstream
/// misbehaves as `hostile` says on its first connection, then a second
/// client's: the problems found and what the two clients got.
async fn after_hostile(hostile: Hostile, route: Route, treatment: String) -> (Vec<String>, String) {
    let upstream = hostile_upstream(hostile).await;
    let gw = gateway(&config_toml(&upstream, &treatment, 0.0, "")).await;
    let mut problems = Vec::new();
    let first = converse(gw.proxy_addr, &sized(&route).pieces(), 1).await;
    match first.finals().as_slice() {
        [answer] if answer.status == 200 && answer.body == ANSWER_BODY.as_bytes() => {}
        [answer] if answer.status == 502 => {
            let json = answer.json().unwrap_or_default();
            if !json["error"]["code"]
                .as_str()
                .is_some_and(|code| !code.is_empty())
            {
                problems.push("the first client's 502 has no code".to_owned());
            }
            if json["error"]["variant"] != "control" {
                problems.push("the first client's 502 does not name control".to_owned());
            }
        }
        other => problems.push(format!(
            "the first client got [{}], not the answer or a 502",
            described(other)
        )),
    }
    if contains(&first.bytes, STRAY) {
        problems.push("the first client got the stray bytes".to_owned());
    }
    // Time for bytes sent on an idle connection to arrive first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = converse(gw.proxy_addr, &sized(&route).pieces(), 1).await;
    match second.finals().as_slice() {
        [answer] if answer.status == 200 && answer.body == ANSWER_BODY.as_bytes() => {}
        other => problems.push(format!(
            "the second client got [{}], not the answer",
            described(other)
        )),
    }
    if contains(&second.bytes, STRAY) {
        problems.push("the second client got the stray bytes".to_owned());
    }
    let observed = format!(
        "first client [{}] after {} interim: {}; second client [{}]",
        described(&first.finals()),
        first.interim(),
        shown(&first.bytes),
        described(&second.finals()),
    );
    (problems, observed)
}

fn described(replies: &[&Reply]) -> String {
    replies
        .iter()
        .map(|reply| reply.describe())
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn what_an_upstream_sends_past_its_answer_never_reaches_a_later_client() {
    let treatment = spawn_mock(MockConfig::named("fine-tuned")).await;
    // Each pair on a gateway and upstream of its own, all side by side.
    let mut runs = tokio::task::JoinSet::new();
    for hostile in HOSTILE {
        for route in [JSON, UPLOAD, GET] {
            let treatment = treatment.url();
            runs.spawn(async move {
                let label = format!("[{}] {hostile:?}", route.name);
                (label, after_hostile(hostile, route, treatment).await)
            });
        }
    }
    let mut verdicts = Vec::new();
    while let Some(verdict) = bounded(runs.join_next()).await {
        verdicts.push(verdict.unwrap());
    }
    verdicts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut report = Report::default();
    for (label, (problems, observed)) in verdicts {
        report.add(&label, problems, observed);
    }
    report.finish();
}
