//! Mock model upstreams for the demo, the tests and load tests: OpenAI chat
//! completions (JSON and SSE), completions, embeddings, responses, models,
//! and Anthropic messages (JSON and SSE). Every answer names the mock and
//! echoes the model it was asked for, so a test can tell who answered.
//!
//! Faults are one header away (`x-mock-status`, `x-mock-latency-ms`,
//! `x-mock-chunks`, `x-mock-chunk-delay-ms`) or drawn at a configured rate
//! from a seeded sequence, so a run is repeatable.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::body::Body;
use crate::server::{self, Handler};

/// Behaviour of one mock model upstream.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Appears in every answer's text and in `x-mock-name`.
    pub name: String,
    /// Wait before response headers.
    pub latency: Duration,
    /// SSE content chunks per stream.
    pub chunk_count: usize,
    /// Gap between SSE chunks.
    pub chunk_delay: Duration,
    /// Share of requests answered 500.
    pub fault_rate: f64,
    /// Share of requests whose headers wait an extra `slow_latency`.
    pub slow_rate: f64,
    /// Extra wait of a slow request.
    pub slow_latency: Duration,
    /// Seeds the fault and slowness draws.
    pub seed: u64,
    /// Hold every stream after its first event until `release_streams`.
    pub hold_streams: bool,
    /// Keep every request received, for inspection.
    pub record: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            name: "mock".to_owned(),
            latency: Duration::ZERO,
            chunk_count: 8,
            chunk_delay: Duration::from_millis(2),
            fault_rate: 0.0,
            slow_rate: 0.0,
            slow_latency: Duration::from_secs(2),
            seed: 0,
            hold_streams: false,
            record: false,
        }
    }
}

impl MockConfig {
    /// The default behaviour under another name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct MockState {
    config: MockConfig,
    sequence: AtomicU64,
    streams_started: AtomicU64,
    streams_finished: AtomicU64,
    recorded: Mutex<Vec<RecordedRequest>>,
    released: watch::Receiver<bool>,
}

/// A mock serving in the background.
pub struct MockHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<MockState>,
    release: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Requests received so far (empty unless `record`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .recorded
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
    /// Requests received so far, counted always.
    pub fn request_count(&self) -> u64 {
        self.state.sequence.load(Ordering::SeqCst)
    }
    /// Streams whose first event was produced.
    pub fn streams_started(&self) -> u64 {
        self.state.streams_started.load(Ordering::SeqCst)
    }
    /// Streams whose final event was sent.
    pub fn streams_finished(&self) -> u64 {
        self.state.streams_finished.load(Ordering::SeqCst)
    }
    /// Lets held streams go on; later streams are not held.
    pub fn release_streams(&self) {
        let _ = self.release.send(true);
    }
    /// Stops listening and waits for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves the mock in a background task.
pub async fn spawn(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockHandle> {
    let listener = server::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (release, released) = watch::channel(false);
    let (stop, mut stopped) = watch::channel(false);
    let state = Arc::new(MockState::new(config, released));
    let task = tokio::spawn(server::serve(listener, state.clone(), async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    }));
    Ok(MockHandle {
        addr,
        state,
        release,
        stop,
        task,
    })
}

/// Serves a mock on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: MockConfig, shutdown: impl Future<Output = ()>) {
    let (_release, released) = watch::channel(false);
    server::serve(
        listener,
        Arc::new(MockState::new(config, released)),
        shutdown,
    )
    .await;
}

impl MockState {
    fn new(config: MockConfig, released: watch::Receiver<bool>) -> Self {
        Self {
            config,
            sequence: AtomicU64::new(0),
            streams_started: AtomicU64::new(0),
            streams_finished: AtomicU64::new(0),
            recorded: Mutex::new(Vec::new()),
            released,
        }
    }
}

impl Handler for MockState {
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let n = self.sequence.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if self.config.record {
            if let Ok(mut recorded) = self.recorded.lock() {
                recorded.push(RecordedRequest {
                    method: parts.method.clone(),
                    path_and_query: parts
                        .uri
                        .path_and_query()
                        .map(|pq| pq.to_string())
                        .unwrap_or_default(),
                    headers: parts.headers.clone(),
                    body: body.clone(),
                });
            }
        }
        let control =
            |name: &str| -> Option<u64> { parts.headers.get(name)?.to_str().ok()?.parse().ok() };
        let mut wait =
            self.config.latency + Duration::from_millis(control("x-mock-latency-ms").unwrap_or(0));
        if draw(self.config.seed, n, 0x5157) < self.config.slow_rate {
            wait += self.config.slow_latency;
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let mut response = if let Some(status) = control("x-mock-status") {
            self.error(
                u16::try_from(status).unwrap_or(500),
                "forced by x-mock-status",
            )
        } else if draw(self.config.seed, n, 0xfa17) < self.config.fault_rate {
            self.error(500, "injected fault")
        } else {
            let shape = Shape {
                chunks: control("x-mock-chunks").map_or(self.config.chunk_count, |c| c as usize),
                delay: control("x-mock-chunk-delay-ms")
                    .map_or(self.config.chunk_delay, Duration::from_millis),
            };
            self.clone()
                .answer(&parts.method, parts.uri.path(), &body, n, shape)
        };
        if let Ok(name) = HeaderValue::from_str(&self.config.name) {
            response.headers_mut().insert("x-mock-name", name);
        }
        response
    }
}

/// How a stream is cut.
#[derive(Clone, Copy)]
struct Shape {
    chunks: usize,
    delay: Duration,
}

impl MockState {
    fn answer(
        self: Arc<Self>,
        method: &Method,
        path: &str,
        body: &[u8],
        n: u64,
        shape: Shape,
    ) -> Response<Body> {
        let request: Value = if method == Method::POST {
            match serde_json::from_slice(body) {
                Ok(value) => value,
                Err(err) => return self.error(400, &format!("body is not JSON: {err}")),
            }
        } else {
            Value::Null
        };
        let model = request["model"].as_str().unwrap_or("unknown").to_owned();
        let stream = request["stream"].as_bool().unwrap_or(false);
        let text = format!(
            "Hello from {}! You asked {model}. This answer is written by a mock model upstream.",
            self.config.name
        );
        let prompt_tokens = count_prompt_words(&request).max(1);
        match (method, path) {
            (&Method::POST, "/v1/chat/completions") if stream => {
                let include_usage =
                    request["stream_options"]["include_usage"].as_bool() == Some(true);
                self.chat_stream(n, model, text, prompt_tokens, include_usage, shape)
            }
            (&Method::POST, "/v1/chat/completions") => json_response(json!({
                "id": format!("chatcmpl-mock-{n}"),
                "object": "chat.completion",
                "created": now(),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage_openai(prompt_tokens, words(&text)),
            })),
            (&Method::POST, "/v1/completions") => json_response(json!({
                "id": format!("cmpl-mock-{n}"),
                "object": "text_completion",
                "created": now(),
                "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage_openai(prompt_tokens, words(&text)),
            })),
            (&Method::POST, "/v1/embeddings") => {
                let inputs: Vec<String> = match &request["input"] {
                    Value::Array(items) => items.iter().map(|i| i.to_string()).collect(),
                    other => vec![other.to_string()],
                };
                let data: Vec<Value> = inputs
                    .iter()
                    .enumerate()
                    .map(|(index, input)| {
                        let seed = fnv(self.config.name.as_bytes()) ^ fnv(input.as_bytes());
                        let embedding: Vec<f64> = (0..8u64)
                            .map(|k| draw(seed, k, 0xe3b) * 2.0 - 1.0)
                            .collect();
                        json!({"object": "embedding", "index": index, "embedding": embedding})
                    })
                    .collect();
                json_response(json!({
                    "object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                }))
            }
            (&Method::POST, "/v1/responses") => json_response(json!({
                "id": format!("resp_mock_{n}"),
                "object": "response",
                "created_at": now(),
                "status": "completed",
                "model": model,
                "output": [{"type": "message", "id": format!("msg_mock_{n}"), "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": prompt_tokens, "output_tokens": words(&text), "total_tokens": prompt_tokens + words(&text)},
            })),
            (&Method::POST, "/v1/messages") if stream => {
                self.messages_stream(n, model, text, prompt_tokens, shape)
            }
            (&Method::POST, "/v1/messages") => json_response(json!({
                "id": format!("msg_mock_{n}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": words(&text)},
            })),
            (&Method::GET, "/v1/models") => json_response(json!({
                "object": "list",
                "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": self.config.name}],
            })),
            _ => self.error(404, &format!("no mock route for {method} {path}")),
        }
    }

    fn error(&self, status: u16, why: &str) -> Response<Body> {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = json_response(json!({"error": {
            "message": format!("mock {} answered {}: {why}", self.config.name, status.as_u16()),
            "type": if status.is_client_error() { "invalid_request_error" } else { "server_error" },
            "param": null,
            "code": if status == StatusCode::NOT_FOUND { json!("not_found") } else { Value::Null },
        }}));
        *response.status_mut() = status;
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }

    fn chat_stream(
        self: Arc<Self>,
        n: u64,
        model: String,
        text: String,
        prompt_tokens: u64,
        include_usage: bool,
        shape: Shape,
    ) -> Response<Body> {
        let id = format!("chatcmpl-mock-{n}");
        let created = now();
        let chunk = move |delta: Value, finish: Value| {
            sse(
                None,
                &json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
            )
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        events.extend(
            split(&text, shape.chunks)
                .into_iter()
                .map(|piece| chunk(json!({"content": piece}), Value::Null)),
        );
        events.push(chunk(json!({}), json!("stop")));
        if include_usage {
            let usage = json!({"id": format!("chatcmpl-mock-{n}"), "object": "chat.completion.chunk", "created": created,
                "model": events_model(&events), "choices": [], "usage": usage_openai(prompt_tokens, words(&text))});
            events.push(sse(None, &usage));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        self.stream(events, shape.delay)
    }

    fn messages_stream(
        self: Arc<Self>,
        n: u64,
        model: String,
        text: String,
        prompt_tokens: u64,
        shape: Shape,
    ) -> Response<Body> {
        let mut events = vec![sse(
            Some("message_start"),
            &json!({"type": "message_start", "message": {
            "id": format!("msg_mock_{n}"), "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}),
        )];
        events.push(sse(Some("content_block_start"), &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
        events.push(sse(Some("ping"), &json!({"type": "ping"})));
        for piece in split(&text, shape.chunks) {
            events.push(sse(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})));
        }
        events.push(sse(
            Some("content_block_stop"),
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(sse(Some("message_delta"), &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": words(&text)}})));
        events.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
        self.stream(events, shape.delay)
    }

    /// Sends `events` one by one from a task; stops if the client goes away.
    fn stream(self: Arc<Self>, events: Vec<Bytes>, delay: Duration) -> Response<Body> {
        let (sender, receiver) = mpsc::channel(4);
        self.streams_started.fetch_add(1, Ordering::SeqCst);
        let hold = self.config.hold_streams;
        tokio::spawn(async move {
            let mut released = self.released.clone();
            for (i, event) in events.into_iter().enumerate() {
                if i > 0 {
                    if hold && i == 1 {
                        let _ = released.wait_for(|r| *r).await;
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            self.streams_finished.fetch_add(1, Ordering::SeqCst);
        });
        let mut response = Response::new(Body::Channel(receiver));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert("cache-control", HeaderValue::from_static("no-cache"));
        response
    }
}

fn events_model(events: &[Bytes]) -> Value {
    events
        .first()
        .and_then(|e| std::str::from_utf8(e).ok())
        .and_then(|e| e.strip_prefix("data: "))
        .and_then(|e| serde_json::from_str::<Value>(e.trim()).ok())
        .map(|v| v["model"].clone())
        .unwrap_or(Value::Null)
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(event) => Bytes::from(format!("event: {event}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

fn json_response(value: Value) -> Response<Body> {
    let mut response = Response::new(Body::full(value.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn usage_openai(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Words in every message's string content, a stand-in for prompt tokens.
fn count_prompt_words(request: &Value) -> u64 {
    let mut total = 0;
    if let Some(messages) = request["messages"].as_array() {
        for message in messages {
            if let Some(content) = message["content"].as_str() {
                total += words(content);
            }
        }
    }
    for key in ["prompt", "input"] {
        if let Some(text) = request[key].as_str() {
            total += words(text);
        }
    }
    total
}

/// Splits `text` into `parts` pieces at word boundaries, keeping every
/// character, so the pieces concatenate back to `text`.
fn split(text: &str, parts: usize) -> Vec<String> {
    let parts = parts.max(1);
    let tokens: Vec<&str> = text.split_inclusive(' ').collect();
    let per = tokens.len().div_ceil(parts).max(1);
    let mut pieces: Vec<String> = tokens.chunks(per).map(|c| c.concat()).collect();
    pieces.resize(parts.max(pieces.len()), String::new());
    pieces
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A number in [0, 1) from (seed, n, stream): splitmix64, so draws are
/// repeatable and independent per purpose.
fn draw(seed: u64, n: u64, stream: u64) -> f64 {
    let mut z =
        seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_character() {
        let text = "Hello from base! You asked m.";
        for parts in [1, 2, 3, 8, 40] {
            let pieces = split(text, parts);
            assert_eq!(pieces.len(), parts.max(pieces.len()));
            assert_eq!(pieces.concat(), text);
        }
    }

    #[test]
    fn draws_are_repeatable_and_spread() {
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        let hits = (0..10_000).filter(|n| draw(7, *n, 0xfa17) < 0.1).count();
        assert!((800..1200).contains(&hits), "{hits}");
    }
}
