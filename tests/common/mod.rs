//! Shared test fixtures: real mock upstreams and a real gateway on
//! 127.0.0.1:0, and a plain HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use abgate::app::Running;
use abgate::config::Config;
use abgate::proxy::body::Body;
use abgate_mock::{self as mock, MockConfig, MockHandle};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Every await in a test is bounded by this, so a hang fails instead of stalling CI.
pub const LIMIT: Duration = Duration::from_secs(10);

pub async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("test step timed out")
}

/// Two recording mocks named "base" and "fine-tuned".
pub async fn mocks() -> (MockHandle, MockHandle) {
    let control = spawn_mock(MockConfig {
        record: true,
        ..MockConfig::named("base")
    })
    .await;
    let treatment = spawn_mock(MockConfig {
        record: true,
        ..MockConfig::named("fine-tuned")
    })
    .await;
    (control, treatment)
}

pub async fn spawn_mock(config: MockConfig) -> MockHandle {
    mock::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// A config for two upstreams; `extra` is appended (more keys, sections).
pub fn config_toml(control: &str, treatment: &str, fraction: f64, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[experiment]
name = "test-exp"
treatment_fraction = {fraction}
[variants.control]
upstream = "{control}"
model = "base-model"
[variants.treatment]
upstream = "{treatment}"
model = "ft:base-model:acme:v3"
{extra}
"#
    )
}

/// `toml` from [`config_toml`] with `api_key_env = "{env}"` added to the
/// named variants (`control`, `treatment`).
pub fn with_api_key_env(toml: &str, variants: &[&str], env: &str) -> String {
    let mut toml = toml.to_owned();
    for variant in variants {
        let model = match *variant {
            "control" => r#"model = "base-model""#,
            _ => r#"model = "ft:base-model:acme:v3""#,
        };
        toml = toml.replace(model, &format!("{model}\napi_key_env = \"{env}\""));
    }
    toml
}

pub async fn gateway(toml: &str) -> Running {
    gateway_with_env(toml, BTreeMap::new()).await
}

pub async fn gateway_with_env(toml: &str, env: BTreeMap<String, String>) -> Running {
    let snapshot = Config::parse(toml)
        .unwrap()
        .validate(&env, Path::new("."))
        .unwrap_or_else(|err| panic!("test config invalid: {err}"));
    abgate::app::start(snapshot).await.unwrap()
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An answer read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}", String::from_utf8_lossy(&self.body))
        })
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(request: Request<Body>) -> Answer {
    bounded(async {
        let response = client().request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
}

/// POST a JSON body to `base + path` with extra headers.
pub async fn post(base: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut request =
        Request::post(format!("{base}{path}")).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(
        request
            .body(Body::full(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
}

pub const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi there"}]}"#;

/// A chat completion from `user` (the body is [`CHAT`]).
pub async fn chat(base: &str, user: &str) -> Answer {
    post(base, "/v1/chat/completions", &[("x-user-id", user)], CHAT).await
}

/// A control mock that holds its streams after the first event (until
/// `release_streams`) and a plain treatment mock.
pub async fn held_control_mocks() -> (MockHandle, MockHandle) {
    let control = spawn_mock(MockConfig {
        hold_streams: true,
        ..MockConfig::named("base")
    })
    .await;
    let treatment = spawn_mock(MockConfig::named("fine-tuned")).await;
    (control, treatment)
}

/// An upstream that reads each request and answers every one with the same
/// bytes (status line, headers, body), then closes: for answers the mock
/// does not give.
pub async fn raw_upstream(answer: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = vec![0u8; 16 * 1024];
            let _ = socket.read(&mut buffer).await;
            let _ = socket.write_all(&answer).await;
        }
    });
    url
}

/// A 200 answer with these headers and body, `connection: close`.
pub fn raw_answer(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

/// An empty directory for one test, named after it and this process.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("abgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config file `abgate.toml` holding `text`, in a fresh directory.
pub fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = fresh_dir(name).join("abgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A streamed chat completion request from `user`.
pub fn chat_stream_request(base: &str, user: &str) -> Request<Body> {
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-user-id", user)
        .body(Body::full(Bytes::from(body)))
        .unwrap()
}

/// Asserts a JSON error answer from the gateway: status, `code`, and a
/// message that mentions `mentions`.
pub fn assert_error(answer: &Answer, status: u16, code: &str, mentions: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.header("content-type"), "application/json");
    let json = answer.json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["code"], code, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message:?} should mention {mentions:?}"
    );
    assert!(answer.header("x-abgate-request-id").starts_with("abg2_"));
}

pub async fn get(url: String) -> Answer {
    send(Request::get(url).body(Body::empty()).unwrap()).await
}

/// The admin listener's /metrics text.
pub async fn scrape(admin: std::net::SocketAddr) -> String {
    let answer = get(format!("http://{admin}/metrics")).await;
    assert_eq!(answer.status, 200);
    assert!(answer.header("content-type").starts_with("text/plain"));
    answer.text()
}

/// The value of one exposition line, `name{labels} value`, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls /metrics until `check` holds: a request is recorded when its last
/// byte has left, which can be a moment after the client has it.
pub async fn metrics_until(admin: std::net::SocketAddr, check: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let text = scrape(admin).await;
        if check(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "metrics never reached the expected state:\n{}",
        scrape(admin).await
    );
}

/// The series of `abgate_upstream_errors_total` for one arm and kind.
pub fn upstream_errors(variant: &str, kind: &str) -> String {
    format!(
        r#"abgate_upstream_errors_total{{experiment="test-exp",kind="{kind}",variant="{variant}"}}"#
    )
}

/// Waits until `variant` has `count` upstream errors of `kind`.
pub async fn counted(admin: std::net::SocketAddr, variant: &str, kind: &str, count: f64) {
    let series = upstream_errors(variant, kind);
    metrics_until(admin, |text| sample(text, &series) == Some(count)).await;
}

/// Reads one HTTP/1.1 request, head and `content-length` body; `None` when
/// the peer closed first.
pub async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut request = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&request, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Some(request);
            }
        }
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => request.extend_from_slice(&buffer[..read]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// An upstream that reads each request, then hands the connection and its
/// number (0 for the first) to `script`: for faults no mock gives.
pub async fn scripted_upstream<F, Fut>(script: F) -> String
where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let script = std::sync::Arc::new(script);
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            let (script, number) = (script.clone(), connections);
            connections += 1;
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_some() {
                    script(number, socket).await;
                }
            });
        }
    });
    url
}

/// The head of a chunked SSE answer.
pub const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Starts an SSE answer on `socket`, sends one event, then resets the
/// connection (RST, not a clean close): a stream that breaks midway.
pub async fn one_event_then_reset(mut socket: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = socket.write_all(SSE_HEAD).await;
    let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let _ = socket.write_all(&chunk(event)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    socket.set_zero_linger().unwrap();
    drop(socket);
}

/// One chunk of a chunked body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// A chat completion as an upstream answers it, `connection: close`.
pub fn chat_answer() -> Vec<u8> {
    raw_answer(
        "content-type: application/json\r\n",
        br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
    )
}

/// Sends `bytes` on a fresh connection to `addr` and reads until the
/// gateway closes it (or 5 s pass): for requests no HTTP client will send.
pub async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before it has read everything.
    let _ = socket.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The admin token test gateways are given (as env var `T`).
pub const TOKEN: &str = "test-admin-token-0123456789";

/// The env that gives a gateway configured with `token_env = "T"` [`TOKEN`].
pub fn token_env() -> BTreeMap<String, String> {
    BTreeMap::from([("T".to_owned(), TOKEN.to_owned())])
}

/// One admin API call, with a bearer token if given.
pub async fn admin_call(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    send(
        request
            .body(Body::full(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
}

/// Sends `count` chat completions from users `{prefix}0..{users}` in turn,
/// `concurrency` at a time; returns how many answered 2xx.
pub async fn traffic(
    base: &str,
    prefix: &str,
    users: usize,
    count: usize,
    concurrency: usize,
) -> usize {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (base, prefix, next) = (base.to_owned(), prefix.to_owned(), next.clone());
        workers.spawn(async move {
            let mut ok = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return ok;
                }
                let answer = chat(&base, &format!("{prefix}{}", i % users)).await;
                ok += usize::from(answer.status.is_success());
            }
        });
    }
    let mut ok = 0;
    while let Some(done) = workers.join_next().await {
        ok += done.unwrap();
    }
    ok
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
