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
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use abgate_http1::body::LocalBody;
use abgate_http1::server::{self, Handler, RequestBody};

/// Most SSE content chunks one request may ask for: every event is built
/// up front, so an absurd `x-mock-chunks` must not exhaust memory.
const MAX_CHUNKS: usize = 10_000;

/// Draw streams, so the fault and the slowness of one request are independent.
const FAULT_STREAM: u64 = 0xfa17;
const SLOW_STREAM: u64 = 0x5104;
const EMBEDDING_STREAM: u64 = 0xe3b;

/// Behaviour of one mock model upstream.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Appears in every answer's text and in `x-mock-name`.
    pub name: String,
    /// Wait before response headers.
    pub latency: Duration,
    /// SSE content chunks per stream.
    pub chunk_count: usize,
    /// Gap between SSE events.
    pub chunk_delay: Duration,
    /// Share of requests answered 500 with an OpenAI-shaped error.
    pub fault_rate: f64,
    /// Share of requests whose headers wait an extra `slow_latency`.
    pub slow_rate: f64,
    /// Extra wait of a slow request.
    pub slow_latency: Duration,
    /// With the request sequence number, decides faults and slowness.
    pub seed: u64,
    /// Hold every stream after its first event until `MockHandle::release_streams`.
    pub hold_streams: bool,
    /// Keep every request received, for `MockHandle::requests`.
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
    /// The request method.
    pub method: Method,
    /// Path and query exactly as sent (`/v1/models?limit=2`).
    pub path_and_query: String,
    /// Every header as received.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// A mock serving in the background; dropping it stops the mock too.
pub struct MockHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    mock: Arc<Mock>,
    release: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far, oldest first (empty unless `record`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        match self.mock.recorded.lock() {
            Ok(recorded) => recorded.clone(),
            // A test that panicked mid-push poisoned it; the list is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Requests received so far, whatever their answer; counted always.
    pub fn request_count(&self) -> u64 {
        self.mock.sequence.load(Ordering::SeqCst)
    }

    /// Streaming answers begun.
    pub fn streams_started(&self) -> u64 {
        self.mock.streams_started.load(Ordering::SeqCst)
    }

    /// Streams whose final event was handed to the connection.
    pub fn streams_finished(&self) -> u64 {
        self.mock.streams_finished.load(Ordering::SeqCst)
    }

    /// Lets held streams go on; idempotent, and later streams are not held.
    pub fn release_streams(&self) {
        // A watch keeps the value, so a stream that checks after this call
        // still sees it: no wakeup can be lost.
        self.release.send_replace(true);
    }

    /// Stops listening and waits for open connections to finish.
    pub async fn shutdown(self) {
        // A held stream would otherwise keep its connection, and this, waiting forever.
        self.release.send_replace(true);
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` (127.0.0.1:0 in tests) and serves the mock in a background task.
pub async fn spawn(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockHandle> {
    let listener = server::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (release, released) = watch::channel(false);
    let (stop, mut stopped) = watch::channel(false);
    let mock = Arc::new(Mock::new(config, released));
    // Resolves on `shutdown` or when the handle is dropped (the sender closes).
    let stop_signal = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let task = tokio::spawn(server::serve(listener, mock.clone(), stop_signal));
    Ok(MockHandle {
        addr,
        mock,
        release,
        stop,
        task,
    })
}

/// Serves a mock on `listener` until `shutdown` resolves (the `abgate mock`
/// CLI); `hold_streams` is ignored, as nothing could release the streams.
pub async fn run(listener: TcpListener, config: MockConfig, shutdown: impl Future<Output = ()>) {
    let (_release, released) = watch::channel(true);
    server::serve(listener, Arc::new(Mock::new(config, released)), shutdown).await;
}

/// The state shared by every request to one mock.
struct Mock {
    config: MockConfig,
    sequence: AtomicU64,
    streams_started: AtomicU64,
    streams_finished: AtomicU64,
    recorded: Mutex<Vec<RecordedRequest>>,
    released: watch::Receiver<bool>,
}

/// What one request's `x-mock-*` headers (or the config) ask for.
struct Controls {
    status: Option<StatusCode>,
    latency: Duration,
    chunks: usize,
    chunk_delay: Duration,
}

impl Controls {
    fn read(headers: &HeaderMap, config: &MockConfig) -> Self {
        let number =
            |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
        Self {
            // Only error statuses: the answer is an error body.
            status: number("x-mock-status")
                .and_then(|status| u16::try_from(status).ok())
                .and_then(|status| StatusCode::from_u16(status).ok())
                .filter(|status| status.is_client_error() || status.is_server_error()),
            latency: number("x-mock-latency-ms").map_or(Duration::ZERO, Duration::from_millis),
            chunks: number("x-mock-chunks")
                .and_then(|chunks| usize::try_from(chunks).ok())
                .unwrap_or(config.chunk_count)
                .clamp(1, MAX_CHUNKS),
            chunk_delay: number("x-mock-chunk-delay-ms")
                .map_or(config.chunk_delay, Duration::from_millis),
        }
    }
}

/// The routes the mock serves.
#[derive(Clone, Copy)]
enum Route {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
    Models,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Self> {
        match (method, path) {
            (&Method::POST, "/v1/chat/completions") => Some(Route::Chat),
            (&Method::POST, "/v1/completions") => Some(Route::Completions),
            (&Method::POST, "/v1/embeddings") => Some(Route::Embeddings),
            (&Method::POST, "/v1/responses") => Some(Route::Responses),
            (&Method::POST, "/v1/messages") => Some(Route::Messages),
            (&Method::GET, "/v1/models") => Some(Route::Models),
            _ => None,
        }
    }
}

/// One request's answer in the making.
struct Ask {
    n: u64,
    model: Value,
    text: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Handler for Mock {
    type Answer = LocalBody;

    async fn handle(
        self: Arc<Self>,
        request: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<LocalBody> {
        let n = self.sequence.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = request.into_parts();
        // A body cut off mid-way reads as empty, which the JSON routes refuse.
        let body = body
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        if self.config.record {
            self.record(&parts, &body);
        }
        let controls = Controls::read(&parts.headers, &self.config);

        let mut wait = self.config.latency + controls.latency;
        if draw(self.config.seed, n, SLOW_STREAM) < self.config.slow_rate {
            wait += self.config.slow_latency;
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }

        let mut response = if let Some(status) = controls.status {
            self.error(status, None, "forced by x-mock-status")
        } else if draw(self.config.seed, n, FAULT_STREAM) < self.config.fault_rate {
            tracing::debug!(mock = %self.config.name, n, "injecting a fault");
            self.error(StatusCode::INTERNAL_SERVER_ERROR, None, "injected fault")
        } else {
            match Route::of(&parts.method, parts.uri.path()) {
                Some(route) => self.clone().answer(route, n, &body, &controls),
                None => self.error(
                    StatusCode::NOT_FOUND,
                    Some("not_found"),
                    &format!("no mock route for {} {}", parts.method, parts.uri.path()),
                ),
            }
        };
        if let Ok(name) = HeaderValue::from_str(&self.config.name) {
            response.headers_mut().insert("x-mock-name", name);
        }
        response
    }
}

impl Mock {
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

    fn record(&self, parts: &http::request::Parts, body: &Bytes) {
        let request = RecordedRequest {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        match self.recorded.lock() {
            Ok(mut recorded) => recorded.push(request),
            Err(poisoned) => poisoned.into_inner().push(request),
        }
    }

    fn answer(
        self: Arc<Self>,
        route: Route,
        n: u64,
        body: &[u8],
        controls: &Controls,
    ) -> Response<LocalBody> {
        let request: Value = match route {
            Route::Models => Value::Null,
            _ => match serde_json::from_slice(body) {
                Ok(value) => value,
                Err(err) => {
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        Some("invalid_json"),
                        &format!("the body is not JSON: {err}"),
                    )
                }
            },
        };
        let model = match request.get("model") {
            Some(model) if !model.is_null() => model.clone(),
            _ => json!("mock-model"),
        };
        let text = format!(
            "Hello from {}! You asked {}. This answer is written by a mock model upstream.",
            self.config.name,
            model
                .as_str()
                .map_or_else(|| model.to_string(), str::to_owned),
        );
        let ask = Ask {
            n,
            prompt_tokens: prompt_words(&request).max(1),
            completion_tokens: words(&text),
            model,
            text,
        };
        let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
        match route {
            Route::Chat if stream => {
                let include_usage = request
                    .pointer("/stream_options/include_usage")
                    .and_then(Value::as_bool)
                    == Some(true);
                let events = chat_events(&ask, include_usage, controls.chunks);
                self.stream(events, controls.chunk_delay)
            }
            Route::Chat => json_response(chat_completion(&ask)),
            Route::Completions => json_response(text_completion(&ask)),
            Route::Embeddings => json_response(self.embeddings(&ask, &request)),
            Route::Responses => json_response(response_object(&ask)),
            Route::Messages if stream => {
                let events = message_events(&ask, controls.chunks);
                self.stream(events, controls.chunk_delay)
            }
            Route::Messages => json_response(message(&ask)),
            Route::Models => json_response(json!({
                "object": "list",
                "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": self.config.name}],
            })),
        }
    }

    /// An OpenAI-shaped error naming this mock.
    fn error(&self, status: StatusCode, code: Option<&str>, why: &str) -> Response<LocalBody> {
        let kind = if status.is_server_error() {
            "server_error"
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_error"
        } else {
            "invalid_request_error"
        };
        let mut response = json_response(json!({"error": {
            "message": format!("mock {} answered {}: {why}", self.config.name, status.as_u16()),
            "type": kind,
            "param": null,
            "code": code,
        }}));
        *response.status_mut() = status;
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// One vector per input, from the mock's name and the input, so two
    /// mocks answer the same input differently and each always alike.
    fn embeddings(&self, ask: &Ask, request: &Value) -> Value {
        let input = request.get("input").unwrap_or(&Value::Null);
        let inputs: Vec<String> = match input {
            Value::String(text) => vec![text.clone()],
            // An array of token IDs is one input.
            Value::Array(items) if items.iter().all(Value::is_number) => vec![input.to_string()],
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_owned)
                })
                .collect(),
            other => vec![other.to_string()],
        };
        let name = fnv(self.config.name.as_bytes());
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let seed = name ^ fnv(input.as_bytes()).rotate_left(17);
                let embedding: Vec<f64> = (0..8u64)
                    .map(|k| draw(seed, k, EMBEDDING_STREAM) * 2.0 - 1.0)
                    .collect();
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        json!({
            "object": "list",
            "data": data,
            "model": ask.model,
            "usage": {"prompt_tokens": ask.prompt_tokens, "total_tokens": ask.prompt_tokens},
        })
    }

    /// Sends `events` from a task, `delay` apart, holding after the first
    /// if configured; stops as soon as the client goes away.
    fn stream(self: Arc<Self>, events: Vec<Bytes>, delay: Duration) -> Response<LocalBody> {
        let (sender, receiver) = mpsc::channel(4);
        self.streams_started.fetch_add(1, Ordering::SeqCst);
        let hold = self.config.hold_streams;
        tokio::spawn(async move {
            let mut released = self.released.clone();
            for (i, event) in events.into_iter().enumerate() {
                if i == 1 && hold {
                    tokio::select! {
                        // Err: the handle is gone, so nothing will release; go on.
                        _ = released.wait_for(|released| *released) => {}
                        () = sender.closed() => return,
                    }
                }
                if i > 0 && !delay.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = sender.closed() => return,
                    }
                }
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            self.streams_finished.fetch_add(1, Ordering::SeqCst);
        });
        let mut response = Response::new(LocalBody::Channel(receiver));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

fn chat_completion(ask: &Ask) -> Value {
    json!({
        "id": format!("chatcmpl-mock-{}", ask.n),
        "object": "chat.completion",
        "created": now(),
        "model": ask.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ask.text, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage_openai(ask),
    })
}

fn text_completion(ask: &Ask) -> Value {
    json!({
        "id": format!("cmpl-mock-{}", ask.n),
        "object": "text_completion",
        "created": now(),
        "model": ask.model,
        "choices": [{"index": 0, "text": ask.text, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage_openai(ask),
    })
}

fn response_object(ask: &Ask) -> Value {
    json!({
        "id": format!("resp_mock_{}", ask.n),
        "object": "response",
        "created_at": now(),
        "status": "completed",
        "error": null,
        "incomplete_details": null,
        "model": ask.model,
        "output": [{
            "type": "message",
            "id": format!("msg_mock_{}", ask.n),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": ask.text, "annotations": []}],
        }],
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": ask.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": ask.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": ask.prompt_tokens + ask.completion_tokens,
        },
    })
}

fn message(ask: &Ask) -> Value {
    json!({
        "id": format!("msg_mock_{}", ask.n),
        "type": "message",
        "role": "assistant",
        "model": ask.model,
        "content": [{"type": "text", "text": ask.text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": ask.prompt_tokens, "output_tokens": ask.completion_tokens},
    })
}

/// `chat.completion.chunk` events as OpenAI sends them: the role, the
/// content in `chunks` pieces, the finish reason, usage if asked, `[DONE]`.
fn chat_events(ask: &Ask, include_usage: bool, chunks: usize) -> Vec<Bytes> {
    let id = format!("chatcmpl-mock-{}", ask.n);
    let created = now();
    let chunk = |delta: Value, finish_reason: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ask.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        // OpenAI marks every chunk but the last `usage: null` when usage was asked for.
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        sse(None, &chunk)
    };
    let mut events = Vec::with_capacity(chunks + 4);
    events.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ));
    events.extend(
        split(&ask.text, chunks)
            .into_iter()
            .map(|piece| chunk(json!({"content": piece}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(sse(
            None,
            &json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": ask.model,
                "choices": [],
                "usage": usage_openai(ask),
            }),
        ));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// Anthropic Messages stream events, in the order the API sends them.
fn message_events(ask: &Ask, chunks: usize) -> Vec<Bytes> {
    let mut events = Vec::with_capacity(chunks + 6);
    events.push(sse(
        Some("message_start"),
        &json!({"type": "message_start", "message": {
            "id": format!("msg_mock_{}", ask.n),
            "type": "message",
            "role": "assistant",
            "model": ask.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": ask.prompt_tokens, "output_tokens": 1},
        }}),
    ));
    events.push(sse(
        Some("content_block_start"),
        &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(sse(Some("ping"), &json!({"type": "ping"})));
    for piece in split(&ask.text, chunks) {
        events.push(sse(
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(sse(
        Some("content_block_stop"),
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(sse(
        Some("message_delta"),
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": ask.completion_tokens},
        }),
    ));
    events.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
    events
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(event) => Bytes::from(format!("event: {event}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

fn json_response(value: Value) -> Response<LocalBody> {
    let mut response = Response::new(LocalBody::full(value.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn usage_openai(ask: &Ask) -> Value {
    json!({
        "prompt_tokens": ask.prompt_tokens,
        "completion_tokens": ask.completion_tokens,
        "total_tokens": ask.prompt_tokens + ask.completion_tokens,
    })
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Words in everything the client wrote (messages, system, prompt, input):
/// a stand-in for prompt tokens.
fn prompt_words(request: &Value) -> u64 {
    ["messages", "system", "prompt", "input"]
        .iter()
        .filter_map(|key| request.get(key))
        .map(text_words)
        .sum()
}

/// Words in a string, in the strings of an array, or in an object's `text`
/// or `content` (message and content-block shapes of both APIs).
fn text_words(value: &Value) -> u64 {
    match value {
        Value::String(text) => words(text),
        Value::Array(items) => items.iter().map(text_words).sum(),
        Value::Object(object) => object
            .get("text")
            .or_else(|| object.get("content"))
            .map_or(0, text_words),
        _ => 0,
    }
}

/// Splits `text` into exactly `parts` pieces of about as many words each,
/// keeping every character, so the pieces concatenate back to `text`;
/// with fewer words than parts, some pieces are empty.
fn split(text: &str, parts: usize) -> Vec<String> {
    let parts = parts.max(1);
    let tokens: Vec<&str> = text.split_inclusive(' ').collect();
    (0..parts)
        .map(|i| tokens[i * tokens.len() / parts..(i + 1) * tokens.len() / parts].concat())
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A number in [0, 1) from (seed, n, stream): splitmix64, so draws are
/// repeatable and independent per purpose, with no global RNG.
fn draw(seed: u64, n: u64, stream: u64) -> f64 {
    let mut z = (seed ^ n)
        .wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // The top 53 bits fill an f64 mantissa exactly.
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// Every await is bounded, so a hang fails the test instead of stalling it.
    const LIMIT: Duration = Duration::from_secs(5);

    async fn bounded<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(LIMIT, future)
            .await
            .expect("test step timed out")
    }

    async fn start(config: MockConfig) -> MockHandle {
        spawn("127.0.0.1:0".parse().unwrap(), config).await.unwrap()
    }

    fn client() -> Client<HttpConnector, LocalBody> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn request(
        mock: &MockHandle,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<LocalBody> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", mock.url()));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(LocalBody::full(body.to_owned())).unwrap()
    }

    /// A whole answer: status, headers, body.
    async fn call(
        mock: &MockHandle,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let request = request(mock, method, path, headers, body);
        let response = bounded(client().request(request)).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = bounded(body.collect()).await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    async fn post(mock: &MockHandle, path: &str, body: &str) -> (StatusCode, HeaderMap, String) {
        call(mock, Method::POST, path, &[], body).await
    }

    /// SSE events as (event name, data) pairs; every event must end in a blank line.
    fn events(text: &str) -> Vec<(Option<String>, String)> {
        assert!(text.ends_with("\n\n"), "unterminated event in {text:?}");
        text.split_terminator("\n\n")
            .map(|event| {
                let mut name = None;
                let mut data = None;
                for line in event.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        name = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        assert!(data.is_none(), "one data line per event: {event:?}");
                        data = Some(value.to_owned());
                    } else {
                        panic!("unexpected SSE line {line:?}");
                    }
                }
                (name, data.expect("every event carries data"))
            })
            .collect()
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"))
    }

    const TEXT_BASE: &str =
        "Hello from base! You asked gpt-4o-mini. This answer is written by a mock model upstream.";
    const CHAT: &str =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi there you"}]}"#;
    const CHAT_STREAM: &str =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

    fn assert_error(status: StatusCode, body: &str, want: StatusCode, name: &str) {
        assert_eq!(status, want, "{body}");
        let error = &json(body)["error"];
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(name), "{message}");
        assert!(error["type"].is_string());
        assert!(error["param"].is_null());
        assert!(error.get("code").is_some());
    }

    #[tokio::test]
    async fn chat_json_echoes_the_model_and_names_the_mock() {
        let mock = start(MockConfig::named("base")).await;
        let (status, headers, body) = post(&mock, "/v1/chat/completions", CHAT).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-mock-name"], "base");
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        let answer = json(&body);
        assert_eq!(answer["id"], "chatcmpl-mock-0");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], "gpt-4o-mini");
        assert!(answer["created"].is_u64());
        let choice = &answer["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], TEXT_BASE);
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(answer["usage"]["prompt_tokens"], 3);
        assert_eq!(answer["usage"]["completion_tokens"], 15);
        assert_eq!(answer["usage"]["total_tokens"], 18);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn chat_stream_is_well_formed_sse_that_spells_the_text() {
        let mock = start(MockConfig::named("base")).await;
        let (status, headers, body) = post(&mock, "/v1/chat/completions", CHAT_STREAM).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream");
        assert_eq!(headers[CACHE_CONTROL], "no-cache");
        assert_eq!(headers["x-mock-name"], "base");
        let events = events(&body);
        let (done, chunks) = events.split_last().unwrap();
        assert_eq!(done, &(None, "[DONE]".to_owned()));
        // Role, 8 content chunks, finish; no usage chunk unless asked.
        assert_eq!(chunks.len(), 1 + 8 + 1);
        let chunks: Vec<Value> = chunks
            .iter()
            .map(|(name, data)| {
                assert!(name.is_none());
                json(data)
            })
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "gpt-4o-mini");
            assert_eq!(chunk["id"], chunks[0]["id"]);
            assert!(chunk.get("usage").is_none());
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        let text: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, TEXT_BASE);
        assert_eq!((mock.streams_started(), mock.streams_finished()), (1, 1));
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn chat_stream_ends_with_usage_when_asked() {
        let mock = start(MockConfig::named("base")).await;
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"one two"}]}"#;
        let (_, _, body) = post(&mock, "/v1/chat/completions", body).await;
        let events = events(&body);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let usage = json(&events[events.len() - 2].1);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 2);
        let completion = usage["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(completion > 0);
        assert_eq!(usage["usage"]["total_tokens"], 2 + completion);
        let finish = json(&events[events.len() - 3].1);
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn chunk_headers_shape_one_stream() {
        let mock = start(MockConfig::named("base")).await;
        let (_, _, body) = call(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "0")],
            CHAT_STREAM,
        )
        .await;
        // Role, 3 content chunks, finish, [DONE].
        assert_eq!(events(&body).len(), 6);
        // More chunks than words: some are empty, the text is still whole.
        let (_, _, body) = call(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-chunks", "40"), ("x-mock-chunk-delay-ms", "0")],
            CHAT_STREAM,
        )
        .await;
        let events = events(&body);
        assert_eq!(events.len(), 43);
        let text: String = events[..events.len() - 1]
            .iter()
            .filter_map(|(_, data)| {
                json(data)["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, TEXT_BASE);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn anthropic_stream_follows_the_messages_event_sequence() {
        let mock = start(MockConfig::named("fine-tuned")).await;
        let body = r#"{"model":"claude-x","stream":true,"max_tokens":64,"system":"Be brief","messages":[{"role":"user","content":[{"type":"text","text":"Hi you"}]}]}"#;
        let (status, headers, body) = post(&mock, "/v1/messages", body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream");
        let events = events(&body);
        let names: Vec<&str> = events
            .iter()
            .map(|(name, _)| name.as_deref().expect("every event is named"))
            .collect();
        let mut want = vec!["message_start", "content_block_start", "ping"];
        want.extend(["content_block_delta"; 8]);
        want.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, want);
        let data: Vec<Value> = events.iter().map(|(_, data)| json(data)).collect();
        for (name, data) in names.iter().zip(&data) {
            assert_eq!(data["type"], *name, "the data's type names its event");
        }
        let start = &data[0]["message"];
        assert_eq!(start["model"], "claude-x");
        assert_eq!(start["role"], "assistant");
        assert_eq!(start["content"], json!([]));
        assert_eq!(start["usage"]["input_tokens"], 4);
        assert_eq!(start["usage"]["output_tokens"], 1);
        assert_eq!(
            data[1]["content_block"],
            json!({"type": "text", "text": ""})
        );
        let text: String = data[3..11]
            .iter()
            .map(|delta| {
                assert_eq!(delta["index"], 0);
                assert_eq!(delta["delta"]["type"], "text_delta");
                delta["delta"]["text"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            text,
            "Hello from fine-tuned! You asked claude-x. This answer is written by a mock model upstream."
        );
        let delta = &data[12];
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert!(delta["delta"]["stop_sequence"].is_null());
        assert_eq!(delta["usage"]["output_tokens"], 15);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn anthropic_json_is_a_message() {
        let mock = start(MockConfig::named("base")).await;
        let body =
            r#"{"model":"claude-x","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#;
        let (status, headers, body) = post(&mock, "/v1/messages", body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-mock-name"], "base");
        let message = json(&body);
        assert_eq!(message["id"], "msg_mock_0");
        assert_eq!(message["type"], "message");
        assert_eq!(message["model"], "claude-x");
        assert!(message["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello from base! You asked claude-x."));
        assert_eq!(message["stop_reason"], "end_turn");
        assert_eq!(message["usage"]["input_tokens"], 1);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn held_streams_wait_for_release() {
        let (mock, response) = open_held_stream().await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = bounded(body.frame()).await.unwrap().unwrap();
        let first = String::from_utf8(first.into_data().unwrap().to_vec()).unwrap();
        assert!(
            first.starts_with("data: ") && first.ends_with("\n\n"),
            "{first}"
        );
        assert_eq!(mock.streams_started(), 1);

        // Nothing more comes while held.
        let more = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(more.is_err(), "a held stream sent {more:?}");
        assert_eq!(mock.streams_finished(), 0);

        mock.release_streams();
        mock.release_streams();
        let rest = bounded(body.collect()).await.unwrap().to_bytes();
        let all = first + std::str::from_utf8(&rest).unwrap();
        assert!(all.ends_with("data: [DONE]\n\n"), "{all}");
        assert_eq!(mock.streams_finished(), 1);

        // Streams begun after the release are not held.
        let (_, _, body) = post(&mock, "/v1/chat/completions", CHAT_STREAM).await;
        assert!(body.ends_with("data: [DONE]\n\n"));
        assert_eq!((mock.streams_started(), mock.streams_finished()), (2, 2));
        mock.shutdown().await;
    }

    /// A mock that holds its streams, and a stream opened on it.
    async fn open_held_stream() -> (MockHandle, Response<hyper::body::Incoming>) {
        let mock = start(MockConfig {
            hold_streams: true,
            ..MockConfig::named("base")
        })
        .await;
        let request = request(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[],
            CHAT_STREAM,
        );
        let response = bounded(client().request(request)).await.unwrap();
        (mock, response)
    }

    #[tokio::test]
    async fn a_stream_whose_client_left_stops_unfinished() {
        let (mock, response) = open_held_stream().await;
        let mut body = response.into_body();
        bounded(body.frame()).await.unwrap().unwrap();
        drop(body);
        mock.release_streams();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((mock.streams_started(), mock.streams_finished()), (1, 0));
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_held_stream() {
        let (mock, response) = open_held_stream().await;
        let reader = tokio::spawn(response.into_body().collect());
        bounded(mock.shutdown()).await;
        let body = bounded(reader).await.unwrap().unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn x_mock_status_forces_an_error_on_any_route() {
        let mock = start(MockConfig::named("base")).await;
        let (status, headers, body) = call(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-status", "429")],
            CHAT,
        )
        .await;
        assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "base");
        assert_eq!(headers[RETRY_AFTER], "1");
        assert_eq!(headers["x-mock-name"], "base");
        for (path, want) in [
            ("/v1/messages", StatusCode::SERVICE_UNAVAILABLE),
            ("/nowhere", StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let (status, headers, body) =
                call(&mock, Method::POST, path, &[("x-mock-status", "503")], "{}").await;
            assert_error(status, &body, want, "base");
            assert!(headers.get(RETRY_AFTER).is_none());
        }
        // Unparsable or non-error values are ignored.
        for value in ["soon", "200", "99999"] {
            let (status, _, _) = call(
                &mock,
                Method::POST,
                "/v1/chat/completions",
                &[("x-mock-status", value)],
                CHAT,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "x-mock-status: {value}");
        }
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn fault_rate_one_always_fails_and_zero_never() {
        let faulty = start(MockConfig {
            fault_rate: 1.0,
            ..MockConfig::named("flaky")
        })
        .await;
        let healthy = start(MockConfig::named("steady")).await;
        for _ in 0..10 {
            let (status, headers, body) = post(&faulty, "/v1/chat/completions", CHAT).await;
            assert_error(status, &body, StatusCode::INTERNAL_SERVER_ERROR, "flaky");
            assert_eq!(json(&body)["error"]["type"], "server_error");
            assert_eq!(headers["x-mock-name"], "flaky");
            let (status, _, _) = post(&healthy, "/v1/chat/completions", CHAT).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!((faulty.request_count(), healthy.request_count()), (10, 10));
        faulty.shutdown().await;
        healthy.shutdown().await;
    }

    #[tokio::test]
    async fn slow_requests_wait_for_slow_latency() {
        let mock = start(MockConfig {
            slow_rate: 1.0,
            slow_latency: Duration::from_secs(30),
            ..MockConfig::named("slow")
        })
        .await;
        let request = request(&mock, Method::GET, "/v1/models", &[], "");
        let answered = tokio::time::timeout(Duration::from_millis(100), client().request(request));
        assert!(answered.await.is_err(), "a slow request answered at once");
        // Dropping the handle stops the mock; a waiting request does not block it.
        drop(mock);
    }

    #[test]
    fn faults_follow_the_seed_and_the_rate() {
        let pattern = |seed| {
            (0..64)
                .map(|n| draw(seed, n, FAULT_STREAM) < 0.5)
                .collect::<Vec<_>>()
        };
        assert_eq!(pattern(7), pattern(7));
        assert_ne!(pattern(7), pattern(8));
        let slow: Vec<bool> = (0..64).map(|n| draw(7, n, SLOW_STREAM) < 0.5).collect();
        assert_ne!(pattern(7), slow, "faults and slowness are drawn apart");
        for (rate, low, high) in [(0.1, 800, 1200), (0.5, 4700, 5300)] {
            let hits = (0..10_000)
                .filter(|n| draw(3, *n, FAULT_STREAM) < rate)
                .count();
            assert!((low..high).contains(&hits), "{hits} hits at {rate}");
        }
        assert!((0..10_000).all(|n| draw(3, n, FAULT_STREAM) < 1.0));
    }

    #[tokio::test]
    async fn unknown_paths_get_a_json_404() {
        let mock = start(MockConfig::named("base")).await;
        for (method, path) in [
            (Method::GET, "/v1/nowhere"),
            (Method::POST, "/v1/files"),
            (Method::GET, "/v1/chat/completions"),
        ] {
            let (status, headers, body) = call(&mock, method, path, &[], "not json").await;
            assert_error(status, &body, StatusCode::NOT_FOUND, "base");
            assert_eq!(headers[CONTENT_TYPE], "application/json");
            let error = &json(&body)["error"];
            assert_eq!(error["type"], "invalid_request_error");
            assert_eq!(error["code"], "not_found");
        }
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn bad_json_gets_a_json_400() {
        let mock = start(MockConfig::named("base")).await;
        for path in ["/v1/chat/completions", "/v1/messages", "/v1/embeddings"] {
            let (status, _, body) = post(&mock, path, "{bad").await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "base");
            assert_eq!(json(&body)["error"]["type"], "invalid_request_error");
        }
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn other_routes_answer_in_their_api_shape() {
        let mock = start(MockConfig::named("base")).await;
        let (status, _, body) = post(
            &mock,
            "/v1/completions",
            r#"{"model":"davinci","prompt":"Say hi"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let completion = json(&body);
        assert_eq!(completion["object"], "text_completion");
        assert_eq!(completion["model"], "davinci");
        assert!(completion["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello from base!"));
        assert_eq!(completion["usage"]["prompt_tokens"], 2);

        let (status, _, body) = post(
            &mock,
            "/v1/responses",
            r#"{"model":"gpt-4.1","input":"Tell me"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let response = json(&body);
        assert_eq!(response["object"], "response");
        assert_eq!(response["model"], "gpt-4.1");
        assert_eq!(response["output"][0]["content"][0]["type"], "output_text");
        assert!(response["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Hello from base!"));
        assert_eq!(response["usage"]["input_tokens"], 2);
        assert_eq!(
            response["usage"]["total_tokens"],
            2 + response["usage"]["output_tokens"].as_u64().unwrap()
        );

        let (status, headers, body) = call(&mock, Method::GET, "/v1/models?limit=2", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-mock-name"], "base");
        let models = json(&body);
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "mock-model");
        assert_eq!(models["data"].as_array().unwrap().len(), 1);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn embeddings_depend_on_the_mock_and_the_input() {
        let base = start(MockConfig::named("base")).await;
        let tuned = start(MockConfig::named("fine-tuned")).await;
        let embed = |mock, input: &'static str| async move {
            let body = format!(r#"{{"model":"text-embedding-3-small","input":{input}}}"#);
            let (status, _, body) = post(mock, "/v1/embeddings", &body).await;
            assert_eq!(status, StatusCode::OK);
            json(&body)
        };
        let many = embed(&base, r#"["a b","c","d"]"#).await;
        assert_eq!(many["object"], "list");
        assert_eq!(many["model"], "text-embedding-3-small");
        assert_eq!(many["usage"]["prompt_tokens"], 4);
        let data = many["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            let vector = item["embedding"].as_array().unwrap();
            assert_eq!(vector.len(), 8);
            assert!(vector.iter().all(|x| x.as_f64().unwrap().abs() <= 1.0));
        }
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);

        let one = embed(&base, r#""c""#).await;
        assert_eq!(one["data"].as_array().unwrap().len(), 1);
        assert_eq!(
            one["data"][0]["embedding"], data[1]["embedding"],
            "repeatable"
        );
        let other = embed(&tuned, r#""c""#).await;
        assert_ne!(other["data"][0]["embedding"], one["data"][0]["embedding"]);
        base.shutdown().await;
        tuned.shutdown().await;
    }

    #[tokio::test]
    async fn requests_are_recorded_only_when_asked_and_always_counted() {
        let recording = start(MockConfig {
            record: true,
            ..MockConfig::named("base")
        })
        .await;
        let plain = start(MockConfig::named("plain")).await;
        for mock in [&recording, &plain] {
            call(
                mock,
                Method::POST,
                "/v1/chat/completions?x=1",
                &[("x-user-id", "u-1")],
                CHAT,
            )
            .await;
            call(mock, Method::GET, "/v1/models", &[], "").await;
            assert_eq!(mock.request_count(), 2);
        }
        assert!(plain.requests().is_empty());
        let seen = recording.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(seen[0].path_and_query, "/v1/chat/completions?x=1");
        assert_eq!(seen[0].headers["x-user-id"], "u-1");
        assert_eq!(seen[0].body.as_ref(), CHAT.as_bytes());
        assert_eq!(seen[1].method, Method::GET);
        assert!(seen[1].body.is_empty());
        recording.shutdown().await;
        plain.shutdown().await;
    }

    #[tokio::test]
    async fn run_serves_until_its_shutdown_future() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            listener,
            MockConfig {
                hold_streams: true,
                ..MockConfig::named("cli")
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let request = Request::post(format!("http://{addr}/v1/chat/completions"))
            .body(LocalBody::full(CHAT_STREAM))
            .unwrap();
        let response = bounded(client().request(request)).await.unwrap();
        assert_eq!(response.headers()["x-mock-name"], "cli");
        let body = bounded(response.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"), "not held under run");
        stop.send(()).unwrap();
        bounded(server).await.unwrap();
    }

    #[test]
    fn split_keeps_every_character_in_exactly_the_asked_pieces() {
        let text = "Hello from base! You asked m.";
        for parts in [1, 2, 3, 6, 8, 40] {
            let pieces = split(text, parts);
            assert_eq!(pieces.len(), parts);
            assert_eq!(pieces.concat(), text);
        }
        let sizes: Vec<usize> = split(text, 3)
            .iter()
            .map(|piece| piece.split_whitespace().count())
            .collect();
        assert_eq!(sizes, [2, 2, 2]);
        assert_eq!(split("", 2), ["", ""]);
    }
}
