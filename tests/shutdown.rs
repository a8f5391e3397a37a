//! Graceful shutdown: `/readyz` turns 503 first, requests are still served
//! for `server.drain_delay_ms`, then new connections are refused while
//! requests in flight (streams included) finish within
//! `server.drain_timeout_ms`; what is left then is cut with an error the
//! client can read, and the process exits 0.
//!
//! The binary tests run the real `abgate serve` and send it SIGTERM; the
//! model upstream is a mock in this process that holds its streams after
//! the first event until released, so every step waits for a state, never
//! for a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Stream chunks asked of the mock; the stream has this many content
/// events plus the role, the finish and `[DONE]`.
const CHUNKS: usize = 5;

/// A config with every user on control (the holding mock) and these
/// drain settings.
fn drain_config(control: &str, treatment: &str, delay_ms: u64, timeout_ms: u64) -> String {
    config_toml(control, treatment, 0.0, "").replace(
        "admin_listen = \"127.0.0.1:0\"\n",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\ndrain_delay_ms = {delay_ms}\ndrain_timeout_ms = {timeout_ms}\n"
        ),
    )
}

/// A streamed chat completion of [`CHUNKS`] chunks, its headers received
/// and its first event read (the mock holds the rest).
async fn held_stream(proxy: &str) -> Incoming {
    let mut request = chat_stream_request(proxy, "u");
    request
        .headers_mut()
        .insert("x-mock-chunks", CHUNKS.to_string().parse().unwrap());
    let response = bounded(client().request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = bounded(body.frame()).await.unwrap().unwrap();
    assert!(first
        .data_ref()
        .is_some_and(|data| data.starts_with(b"data: ")));
    body
}

/// Reads the rest of a stream: its text, and whether it ended cleanly.
async fn rest_of(mut body: Incoming) -> (String, bool) {
    let mut text = Vec::new();
    loop {
        match bounded(body.frame()).await {
            None => return (String::from_utf8_lossy(&text).into_owned(), true),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.extend_from_slice(data);
                }
            }
            Some(Err(_)) => return (String::from_utf8_lossy(&text).into_owned(), false),
        }
    }
}

/// The whole stream arrived: every content chunk, the finish, `[DONE]`.
fn assert_complete(rest: &str) {
    assert!(!rest.contains("event: error"), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    // The first event (the role) was read before; the rest follow.
    assert_eq!(rest.matches("data: ").count(), CHUNKS + 2, "{rest}");
}

async fn status_of(url: String) -> u16 {
    get(url).await.status.as_u16()
}

/// Polls until `/readyz` answers 503.
async fn until_not_ready(admin: SocketAddr) {
    eventually(LIMIT, || async {
        (status_of(format!("http://{admin}/readyz")).await == 503).then_some(())
    })
    .await
    .expect("/readyz never turned 503");
}

/// Polls until connecting to `addr` is refused.
async fn until_refused(addr: SocketAddr) {
    eventually(LIMIT, || async {
        TcpStream::connect(addr).await.err().map(|_| ())
    })
    .await
    .expect("the proxy kept accepting connections");
}

/// `abgate serve` as a child process, with the addresses it logged.
struct Serving {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Serving {
    /// Started with `workers` serving threads (one: the single-threaded
    /// runtime), or by default one per CPU.
    async fn start(name: &str, toml: &str, workers: Option<&str>) -> Self {
        let path = temp_config(name, toml);
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_abgate"));
        if let Some(workers) = workers {
            command.args(["--workers", workers]);
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let line = bounded(async {
            loop {
                let line = lines.next_line().await.unwrap().expect("abgate exited");
                if line.contains("abgate serving") {
                    return line;
                }
            }
        })
        .await;
        // Keep reading, so that a full pipe never blocks the gateway.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let after = |marker: &str, end: char| -> SocketAddr {
            let rest =
                &line[line.find(marker).unwrap_or_else(|| panic!("{line}")) + marker.len()..];
            rest[..rest.find(end).unwrap_or(rest.len())]
                .parse()
                .unwrap()
        };
        let (proxy, admin) = (after("proxy=http://", ' '), after("admin=Some(", ')'));
        let serving = Self {
            child,
            proxy,
            admin,
        };
        eventually(LIMIT, || async {
            (status_of(format!("http://{admin}/readyz")).await == 200).then_some(())
        })
        .await
        .expect("never ready");
        serving
    }

    fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn exit_status(mut self) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("abgate did not exit")
            .unwrap()
    }
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_lets_a_stream_finish_refuses_new_connections_and_exits_0() {
    let (control, treatment) = held_control_mocks().await;
    let toml = drain_config(&control.url(), &treatment.url(), 200, 30_000);
    let serving = Serving::start("shutdown-drains", &toml, None).await;
    let stream = held_stream(&serving.url()).await;

    serving.terminate();
    until_not_ready(serving.admin).await;
    let healthz = get(format!("http://{}/healthz", serving.admin)).await;
    assert_eq!(healthz.status, 200, "liveness stays up while draining");
    until_refused(serving.proxy).await;

    control.release_streams();
    let (rest, clean) = rest_of(stream).await;
    assert!(clean, "{rest}");
    assert_complete(&rest);
    let status = serving.exit_status().await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[cfg(unix)]
#[tokio::test]
async fn a_stream_longer_than_the_drain_timeout_is_cut_and_the_process_exits_0() {
    let (control, treatment) = held_control_mocks().await;
    let toml = drain_config(&control.url(), &treatment.url(), 0, 300);
    let serving = Serving::start("shutdown-cuts", &toml, Some("1")).await;
    let stream = held_stream(&serving.url()).await;

    serving.terminate();
    let (rest, clean) = rest_of(stream).await;
    assert!(
        clean,
        "an SSE stream between events ends with an event: {rest}"
    );
    let data = rest
        .strip_prefix("event: error\ndata: ")
        .and_then(|data| data.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one error event: {rest:?}"));
    let error: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["error"]["code"], "shutdown");
    assert_eq!(error["error"]["variant"], "control");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("server.drain_timeout_ms"), "{message}");
    let status = serving.exit_status().await;
    assert_eq!(status.code(), Some(0), "{status}");
    drop(control);
}

#[tokio::test]
async fn the_cut_answers_waiting_requests_503_and_counts_everything_it_ended() {
    let (control, treatment) = held_control_mocks().await;
    let gw = gateway(&drain_config(&control.url(), &treatment.url(), 0, 300)).await;
    let gateway = gw.gateway.clone();
    let stream = held_stream(&gw.url()).await;
    // A completion whose upstream takes longer than the drain allows.
    let url = gw.url();
    let waiting = tokio::spawn(async move {
        post(
            &url,
            "/v1/chat/completions",
            &[("x-user-id", "v"), ("x-mock-latency-ms", "20000")],
            CHAT,
        )
        .await
    });
    eventually(LIMIT, || async {
        (control.request_count() == 2).then_some(())
    })
    .await
    .expect("the second request never reached the upstream");

    let drained = tokio::spawn(gw.drain());
    let (rest, _) = rest_of(stream).await;
    assert!(rest.contains("\"code\":\"shutdown\""), "{rest}");
    let answer = bounded(waiting).await.unwrap();
    assert_error(&answer, 503, "shutdown", "server.drain_timeout_ms");
    assert_eq!(answer.json()["error"]["variant"], "control");
    bounded(drained).await.unwrap();

    let text = String::from_utf8(gateway.metrics().encode().unwrap()).unwrap();
    assert_eq!(
        sample(&text, &upstream_errors("control", "shutdown")),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn draining_closes_idle_keep_alive_connections_and_waits_for_streams() {
    let (control, treatment) = held_control_mocks().await;
    let gw = gateway(&drain_config(&control.url(), &treatment.url(), 0, 30_000)).await;
    let (proxy, admin) = (gw.proxy_addr, gw.admin_addr.unwrap());
    // A keep-alive connection that has had its answer and sits idle.
    let mut idle = TcpStream::connect(proxy).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let stream = held_stream(&gw.url()).await;

    let drained = tokio::spawn(gw.drain());
    until_not_ready(admin).await;
    until_refused(proxy).await;
    // The idle connection is closed while the held stream keeps the
    // gateway draining: its answer is read to the end, then EOF.
    let mut rest = Vec::new();
    bounded(idle.read_to_end(&mut rest)).await.unwrap();
    assert!(!drained.is_finished(), "the held stream is still in flight");

    control.release_streams();
    let (rest, clean) = rest_of(stream).await;
    assert!(clean, "{rest}");
    assert_complete(&rest);
    bounded(drained).await.unwrap();
}
