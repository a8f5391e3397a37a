//! Upstream faults, injected over real sockets: for each, the client gets
//! the documented answer, the gateway counts it under its kind on /metrics,
//! and the next request is served normally (most often by the very
//! upstream that failed, to show no broken connection is reused).
//!
//! Timeouts are set to a few hundred milliseconds so the file runs in
//! seconds; nothing here asserts how long anything took.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abgate::app::Running;
use abgate::proxy::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A gateway sending every user to `treatment`; unassigned requests (no
/// user ID) still go to a working control mock.
async fn gateway_to(treatment: &str, extra: &str) -> (Running, abgate_mock::MockHandle) {
    let control = spawn_mock(abgate_mock::MockConfig::named("base")).await;
    let gw = gateway(&config_toml(&control.url(), treatment, 1.0, extra)).await;
    (gw, control)
}

/// An upstream whose first connection gets `fault`; every later one is
/// answered with a chat completion, as by an upstream that recovered.
async fn failing_once<F, Fut>(fault: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let fault = Arc::new(fault);
    scripted_upstream(move |n, mut socket| {
        let fault = fault.clone();
        async move {
            if n == 0 {
                fault(socket).await;
            } else {
                let _ = socket.write_all(&chat_answer()).await;
            }
        }
    })
    .await
}

/// A (non-streamed) chat completion from `user`, its body left unread.
async fn chat_response(gw: &Running, user: &str) -> http::Response<hyper::body::Incoming> {
    let request = Request::post(format!("{}/v1/chat/completions", gw.url()))
        .header("x-user-id", user)
        .body(Body::full(Bytes::from(CHAT)))
        .unwrap();
    bounded(client().request(request)).await.unwrap()
}

/// The next request from a user is answered 200 by the treatment upstream.
async fn next_is_served(gw: &Running) {
    let answer = chat(&gw.url(), "next-user").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-abgate-variant"), "treatment");
}

/// Streams a chat completion from `user` and reads it to its end: the text
/// received, and whether the body ended cleanly or with an error.
async fn stream_to_end(gw: &Running, user: &str) -> (String, Result<(), String>) {
    let response = bounded(client().request(chat_stream_request(&gw.url(), user)))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = Vec::new();
    loop {
        match bounded(body.frame()).await {
            None => return (String::from_utf8_lossy(&text).into_owned(), Ok(())),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.extend_from_slice(data);
                }
            }
            Some(Err(err)) => {
                return (
                    String::from_utf8_lossy(&text).into_owned(),
                    Err(err.to_string()),
                )
            }
        }
    }
}

/// The `event: error` that ends `text`, parsed.
fn final_error_event(text: &str) -> serde_json::Value {
    let (_, event) = text
        .rsplit_once("event: error\n")
        .unwrap_or_else(|| panic!("no error event in {text:?}"));
    let data = event
        .strip_prefix("data: ")
        .and_then(|data| data.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one final data line: {event:?}"));
    let json: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(json["type"], "error");
    json
}

#[tokio::test]
async fn a_refused_connection_gets_502_connect() {
    // Port 1 (tcpmux) on loopback: nothing listens there, so the connection
    // is refused. (A port freed by the test could be reused by a parallel
    // test's server.)
    let (gw, _control) = gateway_to("http://127.0.0.1:1", "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "connect", "treatment upstream");
    assert_eq!(answer.json()["error"]["variant"], "treatment");
    assert_eq!(answer.header("x-abgate-variant"), "treatment");
    counted(gw.admin_addr.unwrap(), "treatment", "connect", 1.0).await;
    // The gateway is fine: unassigned traffic still flows to control.
    let answer = post(&gw.url(), "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn a_connect_that_hangs_gets_504_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs,
    // so connecting hangs, as it does to a host that is down.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
    {
        queued.push(stream);
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let (gw, _control) =
        gateway_to(&format!("http://{addr}"), "[timeouts]\nconnect_ms = 200").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 504, "connect_timeout", "timeouts.connect_ms");
    assert_eq!(answer.json()["error"]["variant"], "treatment");
    counted(gw.admin_addr.unwrap(), "treatment", "connect_timeout", 1.0).await;

    // The upstream starts accepting: the next request connects and is served.
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_some() {
                    let _ = socket.write_all(&chat_answer()).await;
                }
            });
        }
    });
    drop(queued);
    next_is_served(&gw).await;
}

#[tokio::test]
async fn an_upstream_that_hangs_before_its_headers_gets_504_first_byte_timeout() {
    // Holds the connection, says nothing.
    let upstream = failing_once(|mut socket| async move {
        let _ = socket.read(&mut [0u8; 1]).await;
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "[timeouts]\nfirst_byte_ms = 200").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(
        &answer,
        504,
        "first_byte_timeout",
        "treatment upstream sent no response headers within 200 ms (timeouts.first_byte_ms)",
    );
    assert_eq!(answer.json()["error"]["type"], "timeout_error");
    counted(
        gw.admin_addr.unwrap(),
        "treatment",
        "first_byte_timeout",
        1.0,
    )
    .await;
    next_is_served(&gw).await;
}

#[tokio::test]
async fn a_total_shorter_than_first_byte_ends_the_wait_as_total_timeout() {
    let upstream = scripted_upstream(|_, mut socket| async move {
        let _ = socket.read(&mut [0u8; 1]).await;
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "[timeouts]\ntotal_ms = 200").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 504, "total_timeout", "timeouts.total_ms");
    counted(gw.admin_addr.unwrap(), "treatment", "total_timeout", 1.0).await;
}

#[tokio::test]
async fn an_upstream_that_closes_before_answering_gets_502_reset() {
    let upstream = failing_once(|socket| async move { drop(socket) }).await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "reset", "treatment upstream closed");
    counted(gw.admin_addr.unwrap(), "treatment", "reset", 1.0).await;
    next_is_served(&gw).await;
}

#[tokio::test]
async fn a_stream_reset_midway_ends_with_an_sse_error_event() {
    let upstream = failing_once(one_event_then_reset).await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let (text, ended) = stream_to_end(&gw, "u").await;
    assert_eq!(ended, Ok(()), "the stream ends cleanly");
    assert!(text.starts_with("data: {\"choices\""), "{text}");
    let error = final_error_event(&text);
    assert_eq!(error["error"]["code"], "reset");
    assert_eq!(error["error"]["variant"], "treatment");
    counted(gw.admin_addr.unwrap(), "treatment", "reset", 1.0).await;
    next_is_served(&gw).await;
}

/// An SSE upstream that sends one event, then `piece` every `every`.
async fn dripping_upstream(piece: &'static [u8], every: Duration) -> String {
    failing_once(move |mut socket| async move {
        let _ = socket.write_all(SSE_HEAD).await;
        let _ = socket.write_all(&chunk(b"data: {\"n\":1}\n\n")).await;
        loop {
            tokio::time::sleep(every).await;
            if socket.write_all(&chunk(piece)).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_stream_that_drips_one_byte_a_second_ends_with_an_idle_timeout_event() {
    let upstream = dripping_upstream(b"d", Duration::from_secs(1)).await;
    let (gw, _control) = gateway_to(&upstream, "[timeouts]\nidle_ms = 300").await;
    let (text, ended) = stream_to_end(&gw, "u").await;
    assert_eq!(ended, Ok(()));
    assert!(text.starts_with("data: {\"n\":1}\n\n"), "{text}");
    let error = final_error_event(&text);
    assert_eq!(error["error"]["code"], "idle_timeout");
    assert_eq!(error["error"]["type"], "timeout_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("timeouts.idle_ms"));
    counted(gw.admin_addr.unwrap(), "treatment", "idle_timeout", 1.0).await;
    next_is_served(&gw).await;
}

/// Streams from an upstream that sends `piece` every 20 ms, which never
/// trips idle_ms, until a 400 ms total runs out: what the client read, and
/// how the stream ended. The total timeout is counted either way.
async fn stream_past_the_total(piece: &'static [u8]) -> (Running, String, Result<(), String>) {
    let upstream = dripping_upstream(piece, Duration::from_millis(20)).await;
    let extra = "[timeouts]\nidle_ms = 1000\ntotal_ms = 400";
    let (gw, _control) = gateway_to(&upstream, extra).await;
    let (text, ended) = stream_to_end(&gw, "u").await;
    counted(gw.admin_addr.unwrap(), "treatment", "total_timeout", 1.0).await;
    next_is_served(&gw).await;
    (gw, text, ended)
}

#[tokio::test]
async fn a_stream_that_never_pauses_still_ends_at_the_total_timeout() {
    let (_gw, text, ended) = stream_past_the_total(b"data: {}\n\n").await;
    assert_eq!(ended, Ok(()));
    let error = final_error_event(&text);
    assert_eq!(error["error"]["code"], "total_timeout");
}

#[tokio::test]
async fn a_stream_cut_inside_an_event_is_aborted_rather_than_mended() {
    // Bytes of an event that never ends: an error event added now would be
    // read as the rest of it, so the stream is aborted instead.
    let (_gw, text, ended) = stream_past_the_total(b"d").await;
    assert!(ended.is_err(), "aborted: {text:?}");
    assert!(!text.contains("event: error"), "{text}");
}

#[tokio::test]
async fn a_json_answer_that_stalls_midway_is_aborted() {
    let upstream = failing_once(|mut socket| async move {
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
        let _ = socket.write_all(head.as_bytes()).await;
        let _ = socket.write_all(b"{\"choices\": [").await;
        // Holds the connection, says nothing more.
        let _ = socket.read(&mut [0u8; 1]).await;
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "[timeouts]\nidle_ms = 300").await;
    let response = chat_response(&gw, "u").await;
    assert_eq!(response.status(), 200, "the headers had gone out already");
    let read = bounded(response.into_body().collect()).await;
    assert!(
        read.is_err(),
        "a body that cannot be finished is aborted, never passed off as complete"
    );
    counted(gw.admin_addr.unwrap(), "treatment", "idle_timeout", 1.0).await;
    next_is_served(&gw).await;
}

#[tokio::test]
async fn a_2xx_answer_that_is_not_json_passes_through_and_counts_as_invalid_response() {
    let upstream = failing_once(|mut socket| async move {
        let broken = raw_answer("content-type: application/json\r\n", b"{\"choices\": [tru");
        let _ = socket.write_all(&broken).await;
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_eq!(
        answer.status, 200,
        "the answer passes through as the upstream sent it"
    );
    assert_eq!(answer.text(), "{\"choices\": [tru");
    counted(gw.admin_addr.unwrap(), "treatment", "invalid_response", 1.0).await;
    next_is_served(&gw).await;
}

#[tokio::test]
async fn upstream_500_and_429_pass_through_and_count_under_their_status() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 1.0, "")).await;
    for (status, kind) in [(500u16, "status_5xx"), (429, "status_429")] {
        let answer = post(
            &gw.url(),
            "/v1/chat/completions",
            &[("x-user-id", "u"), ("x-mock-status", &status.to_string())],
            CHAT,
        )
        .await;
        assert_eq!(answer.status, status);
        assert_eq!(
            answer.header("x-mock-name"),
            "fine-tuned",
            "the model's own answer"
        );
        assert!(answer.json()["error"]["message"].is_string());
        counted(gw.admin_addr.unwrap(), "treatment", kind, 1.0).await;
    }
    let answer = chat(&gw.url(), "u").await;
    assert_eq!(
        answer.header("retry-after"),
        "",
        "429's header went with its answer"
    );
    next_is_served(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_slowly_holds_the_upstream_back() {
    const TOTAL: u64 = 128 * 1024 * 1024;
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let upstream = failing_once(move |mut socket| {
        let written = progress.clone();
        async move {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {TOTAL}\r\n\r\n"
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let block = vec![b'x'; 64 * 1024];
            while written.load(Ordering::SeqCst) < TOTAL {
                if socket.write_all(&block).await.is_err() {
                    return;
                }
                written.fetch_add(block.len() as u64, Ordering::SeqCst);
            }
        }
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let response = chat_response(&gw, "slow-reader").await;
    assert_eq!(response.status(), 200);

    // The client reads nothing: the upstream's writes stop once the
    // buffers on the way are full, long before the answer is all sent.
    let mut last = u64::MAX;
    let mut unchanged = 0;
    while unchanged < 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::SeqCst);
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
    }
    assert!(
        last < TOTAL / 2,
        "the upstream wrote {last} of {TOTAL} bytes to a client that read none"
    );

    // Reading resumes: everything arrives.
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = bounded(body.frame()).await {
        received += frame
            .unwrap()
            .data_ref()
            .map_or(0, |data| data.len() as u64);
    }
    assert_eq!(received, TOTAL);
    next_is_served(&gw).await;
}

/// An SSE upstream that sends an event every 20 ms and reports on
/// `closed` when the gateway closes the connection.
async fn streaming_upstream(closed: mpsc::Sender<()>) -> String {
    failing_once(move |mut socket| {
        let closed = closed.clone();
        async move {
            let _ = socket.write_all(SSE_HEAD).await;
            let mut byte = [0u8; 1];
            loop {
                tokio::select! {
                    // The gateway sends nothing more on this connection:
                    // a read returns only when it closes.
                    _ = socket.read(&mut byte) => break,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        if socket.write_all(&chunk(b"data: {}\n\n")).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = closed.send(()).await;
        }
    })
    .await
}

/// Waits for the upstream to see its connection closed and the request to
/// be counted as client_cancelled; returns the metrics then.
async fn closed_and_counted(
    upstream_closed: &mut mpsc::Receiver<()>,
    admin: std::net::SocketAddr,
) -> String {
    bounded(upstream_closed.recv())
        .await
        .expect("the upstream saw its connection closed");
    counted(admin, "treatment", "client_cancelled", 1.0).await;
    scrape(admin).await
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_closes_the_upstream_stream() {
    let (closed, mut upstream_closed) = mpsc::channel(1);
    let upstream = streaming_upstream(closed).await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let admin = gw.admin_addr.unwrap();
    let client = client();
    let response = bounded(client.request(chat_stream_request(&gw.url(), "leaver")))
        .await
        .unwrap();
    let mut body = response.into_body();
    bounded(body.frame()).await.unwrap().unwrap();
    drop(body);
    drop(client);
    let text = closed_and_counted(&mut upstream_closed, admin).await;
    assert_eq!(
        sample(&text, r#"abgate_inflight_requests{variant="treatment"}"#),
        Some(0.0)
    );
    next_is_served(&gw).await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_headers_closes_the_upstream_call() {
    let (received, mut upstream_received) = mpsc::channel(1);
    let (closed, mut upstream_closed) = mpsc::channel(1);
    let upstream = failing_once(move |mut socket| {
        let (received, closed) = (received.clone(), closed.clone());
        async move {
            let _ = received.send(()).await;
            // Never answers; returns when the gateway closes the connection.
            let _ = socket.read(&mut [0u8; 1]).await;
            let _ = closed.send(()).await;
        }
    })
    .await;
    let (gw, _control) = gateway_to(&upstream, "").await;
    let admin = gw.admin_addr.unwrap();
    let url = gw.url();
    let request =
        tokio::spawn(async move { client().request(chat_stream_request(&url, "u")).await });
    bounded(upstream_received.recv()).await.unwrap();
    request.abort();
    let text = closed_and_counted(&mut upstream_closed, admin).await;
    assert_eq!(
        sample(
            &text,
            r#"abgate_requests_total{experiment="test-exp",route="chat",status_class="4xx",variant="treatment"}"#
        ),
        Some(1.0),
        "recorded as 499, the client closed the request"
    );
    next_is_served(&gw).await;
}

#[tokio::test]
async fn a_client_that_sends_its_body_too_slowly_gets_408() {
    let (control, treatment) = mocks().await;
    let extra = "[timeouts]\ntotal_ms = 300";
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 1.0, extra)).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"model\":",
        CHAT.len()
    );
    let answer = raw_exchange(gw.proxy_addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert_eq!(treatment.request_count(), 0, "nothing was forwarded");
    next_is_served(&gw).await;
}

/// User IDs that land in `variant` at `fraction`.
fn users_in(
    variant: abgate::experiment::assign::Variant,
    fraction: f64,
) -> impl Iterator<Item = String> {
    (0..).map(|i| format!("user-{i}")).filter(move |user| {
        abgate::experiment::assign::assign(user.as_bytes(), None, fraction) == variant
    })
}

/// Starts a stream that the held control mock keeps open after its first
/// event; returns its body, to be read on after `release_streams`.
async fn held_stream(gw: &Running, user: &str) -> hyper::body::Incoming {
    let response = bounded(client().request(chat_stream_request(&gw.url(), user)))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    bounded(body.frame()).await.unwrap().unwrap();
    body
}

#[tokio::test]
async fn past_max_inflight_requests_are_shed_with_503_and_retry_after() {
    let (control, treatment) = held_control_mocks().await;
    let extra = "[limits]\nmax_inflight = 2\nretry_after_seconds = 3";
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, extra)).await;
    let first = held_stream(&gw, "a").await;
    let second = held_stream(&gw, "b").await;

    let answer = chat(&gw.url(), "c").await;
    assert_error(
        &answer,
        503,
        "shed",
        "abgate is at its limit of 2 requests in flight",
    );
    assert_eq!(answer.header("retry-after"), "3");
    assert_eq!(answer.json()["error"]["type"], "overloaded_error");
    assert_eq!(
        control.request_count(),
        2,
        "the shed request never went upstream"
    );
    // Shed before anything was read, so before assignment.
    counted(gw.admin_addr.unwrap(), "unassigned", "shed", 1.0).await;

    control.release_streams();
    for body in [first, second] {
        bounded(body.collect()).await.unwrap();
    }
    let answer = chat(&gw.url(), "c").await;
    assert_eq!(answer.status, 200, "places are given back when streams end");
}

#[tokio::test]
async fn past_max_inflight_per_variant_only_that_upstream_sheds() {
    let (control, treatment) = held_control_mocks().await;
    let extra = "[limits]\nmax_inflight_per_variant = 1";
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, extra)).await;
    let mut in_control = users_in(abgate::experiment::assign::Variant::Control, 0.5);
    let (holder, other) = (in_control.next().unwrap(), in_control.next().unwrap());
    let in_treatment = users_in(abgate::experiment::assign::Variant::Treatment, 0.5)
        .next()
        .unwrap();
    let held = held_stream(&gw, &holder).await;

    let answer = chat(&gw.url(), &other).await;
    assert_error(
        &answer,
        503,
        "shed",
        "the control upstream is at its limit of 1 requests in flight",
    );
    assert_eq!(answer.json()["error"]["variant"], "control");
    assert_eq!(answer.header("retry-after"), "1");
    let unassigned = post(&gw.url(), "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(
        unassigned.status, 503,
        "unassigned requests share control's upstream"
    );
    let answer = chat(&gw.url(), &in_treatment).await;
    assert_eq!(answer.status, 200, "treatment's upstream has room");
    counted(gw.admin_addr.unwrap(), "control", "shed", 1.0).await;

    control.release_streams();
    bounded(held.collect()).await.unwrap();
    assert_eq!(chat(&gw.url(), &other).await.status, 200);
}

/// An upstream that streams SSE events as fast as its socket takes them,
/// and says (through `closed`) when the gateway closed its connection.
async fn endless_stream(closed: mpsc::Sender<()>) -> String {
    scripted_upstream(move |_, mut socket| {
        let closed = closed.clone();
        async move {
            let _ = socket.write_all(SSE_HEAD).await;
            let event = chunk(
                &[
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"",
                    &[b'x'; 4000][..],
                    b"\"}}]}\n\n",
                ]
                .concat(),
            );
            // Bounded: 256 MB is far past any socket buffer.
            for _ in 0..64_000 {
                if socket.write_all(&event).await.is_err() {
                    let _ = closed.send(()).await;
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_its_upstream_closed() {
    let (closed, mut upstream_closed) = mpsc::channel(1);
    let upstream = endless_stream(closed).await;
    let (gw, _control) = gateway_to(
        &upstream,
        "[timeouts]\nclient_write_ms = 300\ntotal_ms = 60000",
    )
    .await;
    // A client with a small receive window that sends its request and
    // never reads a byte of the answer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(gw.proxy_addr).await.unwrap();
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nx-user-id: slow\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    // Long before total_ms: the stuck write is cut, and with it the
    // upstream's connection (its own writes fail).
    bounded(upstream_closed.recv()).await.unwrap();
    let admin = gw.admin_addr.unwrap();
    counted(admin, "treatment", "client_write_timeout", 1.0).await;
    metrics_until(admin, |text| {
        sample(text, r#"abgate_inflight_requests{variant="treatment"}"#) == Some(0.0)
    })
    .await;
    // The client's connection is closed: reading what was sent ends.
    let mut sink = vec![0u8; 64 * 1024];
    let ended = bounded(async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended);
}
