//! Shared test fixtures: real mock upstreams and a real gateway on
//! 127.0.0.1:0, and a plain HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use abgate::app::Running;
use abgate::body::Body;
use abgate::config::Config;
use abgate::mock::{self, MockConfig, MockHandle};
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
