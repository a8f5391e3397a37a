//! Per-request costs on the data path: assignment, identity, body
//! inspection and model rewrite, usage reading, request ids, metric
//! recording. Run with `cargo bench --bench hot_path`;
//! results are recorded in loadtest/README.md, never asserted.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use abgate::experiment::assign::{self, Variant};
use abgate::experiment::request_id::RequestIds;
use abgate::proxy::identity::{self, IdentityRules};
use abgate::proxy::{json, usage_json};
use abgate::telemetry::metrics::{Metrics, RequestRecord, UpstreamErrorKind};
use abgate::telemetry::route::Route;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn chat_body(bytes: usize) -> Bytes {
    let filler = "lorem ipsum dolor sit amet ".repeat(bytes / 27 + 1);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","user":"user-123","temperature":0.2,"messages":[{{"role":"system","content":"You answer support emails."}},{{"role":"user","content":"{}"}}]}}"#,
        &filler[..bytes.saturating_sub(160)]
    );
    Bytes::from(body)
}

fn assignment(c: &mut Criterion) {
    c.bench_function("assign/bucket+variant", |b| {
        b.iter(|| assign::assign(std::hint::black_box(b"user-1234567890"), None, 0.1))
    });
    c.bench_function("assign/salted", |b| {
        b.iter(|| {
            assign::assign(
                std::hint::black_box(b"user-1234567890"),
                Some("exp-42"),
                0.1,
            )
        })
    });
}

fn body(c: &mut Criterion) {
    let model = serde_json::to_vec("ft:gpt-4o-mini:acme:support-email:abc123").unwrap();
    let mut group = c.benchmark_group("body");
    for size in [1024, 100 * 1024] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("inspect", size), &body, |b, body| {
            b.iter(|| json::inspect(body).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("inspect+rewrite", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let fields = json::inspect(body).unwrap();
                    json::rewrite_model(body, &fields.model_spans, &model)
                })
            },
        );
    }
    group.finish();
}

fn identity(c: &mut Criterion) {
    let header = http::HeaderName::from_static("x-user-id");
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("host", "gateway:8080"),
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-client"),
        ("user-agent", "OpenAI/Python 1.55.0"),
        ("x-user-id", "user-1234567890"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    let rules = IdentityRules {
        header: &header,
        max_bytes: 256,
    };
    c.bench_function("identity/header", |b| {
        b.iter(|| identity::from_header(std::hint::black_box(&headers), rules).unwrap())
    });
}

fn answer(c: &mut Criterion) {
    let answer = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1767225600,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the upstream! This answer is the same for every request.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":14,"total_tokens":26,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
    c.bench_function("usage/read_answer", |b| {
        b.iter(|| usage_json::read(std::hint::black_box(answer)).unwrap())
    });
    // What reading it cost before: the whole answer as a JSON tree.
    c.bench_function("usage/read_answer_as_tree", |b| {
        b.iter(|| {
            let tree: serde_json::Value =
                serde_json::from_slice(std::hint::black_box(answer)).unwrap();
            tree.get("usage")
                .and_then(|u| u.get("prompt_tokens"))
                .and_then(|v| v.as_u64())
        })
    });
    let ids = RequestIds::new(b"fleet-key".to_vec());
    c.bench_function("request_id/issue", |b| {
        b.iter(|| ids.issue(Variant::Treatment, std::hint::black_box("support-ft")))
    });
}

fn metrics(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let bound = metrics.bind("bench", 0.1);
    let record = RequestRecord {
        variant: Variant::Treatment,
        route: Route::Chat,
        stream: true,
        status: 200,
        duration: Duration::from_millis(850),
        time_to_first_byte: Some(Duration::from_millis(120)),
        response_bytes: 4096,
        prompt_tokens: Some(120),
        completion_tokens: Some(300),
        error: None::<UpstreamErrorKind>,
        overhead: Duration::from_micros(40),
    };
    c.bench_function("metrics/record_request", |b| {
        b.iter(|| {
            let _inflight = bound.start(Variant::Treatment);
            bound.record(std::hint::black_box(&record));
        })
    });
}

criterion_group!(benches, assignment, identity, body, answer, metrics);
criterion_main!(benches);
