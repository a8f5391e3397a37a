//! The `loadtest` binary against a real mock upstream on loopback: it sends
//! what it is told, counts what comes back, and its report and plot are
//! built from its own JSON. Runs last well under a second; no timing is
//! asserted, only counts and shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::Path;

use abgate_mock::MockConfig;
use common::{
    bounded, chunk, config_toml, fresh_dir, gateway, scripted_upstream, spawn_mock, SSE_HEAD,
};
use serde_json::Value;

/// Runs `loadtest ARGS...`; returns its stdout, failing on a non-zero exit.
async fn loadtest(args: &[&str]) -> String {
    let output = bounded(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "loadtest {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A 200 ms open loop at `rate` against `url`, no warm-up, with `extra`
/// arguments: its table and its JSON result.
async fn open_loop(name: &str, url: &str, rate: &str, extra: &[&str]) -> (String, Value) {
    let json = fresh_dir(&format!("loadtest-{name}")).join(format!("{name}.json"));
    let json_path = json.to_str().unwrap();
    let mut args = vec!["run", "--url", url, "--rate", rate, "--warmup", "0s"];
    args.extend(["--duration", "200ms", "--json", json_path]);
    args.extend_from_slice(extra);
    let table = loadtest(&args).await;
    (table, read_json(&json))
}

/// Every request started in the window ended once: answered, failed or
/// (never here) left unanswered.
fn assert_accounted(result: &Value) {
    let failed: u64 = result["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum();
    let sent = result["sent"].as_u64().unwrap();
    assert_eq!(result["unanswered"], 0, "{result}");
    assert_eq!(sent, result["ok"].as_u64().unwrap() + failed, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_sends_exactly_its_schedule_and_charges_the_server() {
    let mock = spawn_mock(MockConfig::named("base")).await;
    let dir = fresh_dir("loadtest-open");
    let json = dir.join("open.json");
    let url = format!("{}/v1/chat/completions", mock.url());
    let me = std::process::id().to_string();
    let table = loadtest(&[
        "run",
        "--url",
        &url,
        "--rate",
        "200/s",
        "--warmup",
        "100ms",
        "--duration",
        "500ms",
        "--users",
        "50",
        "--label",
        "mock",
        "--watch-pid",
        &me,
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    assert!(table.starts_with("mock · open loop 200/s"), "{table}");
    assert!(table.contains("latency"), "{table}");

    let result = read_json(&json);
    // 200/s for 0.5 s: 100 requests inside the window, all answered.
    let ok = result["ok"].as_u64().unwrap();
    assert!((99..=101).contains(&ok), "{result}");
    assert_eq!(result["errors"], serde_json::json!({}));
    assert_eq!(result["sent"], ok);
    assert_accounted(&result);
    assert_eq!(result["mode"], "open");
    assert_eq!(result["users"], 50);
    assert_eq!(result["latency_us"]["count"], ok);
    assert_eq!(result["schedule_lag_us"]["count"], ok);
    assert!(result["first_chunk_us"].is_null());
    // The mock counted the warm-up too.
    assert!(mock.request_count() >= ok);
    let process = &result["process"];
    assert_eq!(process["pids"][0].as_u64().unwrap().to_string(), me);
    assert!(process["peak_rss_kib"].as_u64().unwrap() > 0);
    assert!(process["rss_at_start_kib"].as_u64().unwrap() > 0);
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_of_streams_counts_every_event() {
    let mock = spawn_mock(MockConfig::named("base")).await;
    let dir = fresh_dir("loadtest-stream");
    let json = dir.join("stream.json");
    let url = format!("{}/v1/chat/completions", mock.url());
    loadtest(&[
        "run",
        "--url",
        &url,
        "--concurrency",
        "4",
        "--stream",
        "-H",
        "x-mock-chunks: 5",
        "-H",
        "x-mock-chunk-delay-ms: 1",
        "--warmup",
        "100ms",
        "--duration",
        "300ms",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let result = read_json(&json);
    assert_eq!(result["mode"], "closed");
    assert_eq!(result["concurrency"], 4);
    assert_eq!(result["max_inflight"], 4);
    assert_eq!(result["connections"], 4, "one keep-alive connection each");
    assert!(result["ok"].as_u64().unwrap() > 0, "{result}");
    assert_accounted(&result);
    // The role, five content chunks, the finish reason and [DONE].
    assert_eq!(result["events_per_stream"], 8.0);
    assert_eq!(result["first_chunk_us"]["count"], result["ok"]);
    assert!(result["chunk_gap_us"]["count"].as_u64().unwrap() > 0);
    assert!(result["schedule_lag_us"].is_null());
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_kind() {
    let mock = spawn_mock(MockConfig::named("base")).await;
    let url = format!("{}/v1/chat/completions", mock.url());
    let refused = {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        )
    };
    for (name, url, header) in [
        ("status", url.as_str(), "x-mock-status: 503"),
        ("refused", refused.as_str(), "x-nothing: 1"),
    ] {
        let (table, result) = open_loop(name, url, "100", &["-H", header]).await;
        assert_eq!(result["ok"], 0, "{name}: {result}");
        let errors = result["errors"].as_object().unwrap();
        let kind = if name == "status" {
            "status_503"
        } else {
            "connect"
        };
        assert_eq!(errors.len(), 1, "{name}: {result}");
        assert!(errors[kind].as_u64().unwrap() >= 19, "{name}: {result}");
        assert_accounted(&result);
        assert!(table.contains(&format!("({kind} ")), "{table}");
    }
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_the_server_closed_while_idle_is_replaced() {
    // Each connection answers one request as keep-alive, then the server
    // hangs up: the next request finds its idle connection closed and goes
    // again on a new one, as a real client's would.
    let upstream = scripted_upstream(|_, mut socket| async move {
        use tokio::io::AsyncWriteExt;
        let _ = socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await;
    })
    .await;
    let url = format!("{upstream}/v1/chat/completions");
    let (_, result) = open_loop("idle-close", &url, "100", &["--connections", "1"]).await;
    assert_eq!(result["errors"], serde_json::json!({}), "{result}");
    let ok = result["ok"].as_u64().unwrap();
    assert!((19..=21).contains(&ok), "{result}");
    assert_accounted(&result);
    // One connection per request: every one after the first was replaced.
    assert_eq!(result["connections"].as_u64().unwrap(), ok, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_off_after_its_200_is_a_failure() {
    // The upstream sends one event and hangs up: the gateway has already
    // answered 200 and ends the stream with an SSE error event.
    let upstream = scripted_upstream(|_, mut socket| async move {
        use tokio::io::AsyncWriteExt;
        let mut answer = SSE_HEAD.to_vec();
        answer.extend(chunk(b"data: {\"choices\":[]}\n\n"));
        let _ = socket.write_all(&answer).await;
    })
    .await;
    let gw = gateway(&config_toml(&upstream, &upstream, 0.0, "")).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let (table, result) = open_loop("broken-stream", &url, "50", &["--stream"]).await;
    assert_eq!(result["ok"], 0, "{result}");
    let errors = result["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{result}");
    assert!(errors["stream_error"].as_u64().unwrap() >= 9, "{result}");
    assert_accounted(&result);
    assert!(table.contains("(stream_error "), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_become_a_comparison_table_and_a_percentile_plot() {
    let mock = spawn_mock(MockConfig::named("base")).await;
    let dir = fresh_dir("loadtest-report");
    let url = format!("{}/v1/chat/completions", mock.url());
    let mut files = Vec::new();
    for label in ["direct", "abgate"] {
        for (mode, load) in [
            ("closed", ["--concurrency", "2"]),
            ("open", ["--rate", "100"]),
        ] {
            let json = dir.join(format!("{label}-{mode}.json"));
            loadtest(&[
                "run",
                "--url",
                &url,
                load[0],
                load[1],
                "--warmup",
                "50ms",
                "--duration",
                "200ms",
                "--label",
                label,
                "--json",
                json.to_str().unwrap(),
            ])
            .await;
            files.push(json.to_str().unwrap().to_owned());
        }
    }
    let markdown = dir.join("compare.md");
    let json = dir.join("compare.json");
    let mut args = vec![
        "report",
        "--machine",
        "Machine: a test",
        "--markdown",
        markdown.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend(files.iter().map(String::as_str));
    let text = loadtest(&args).await;
    assert!(text.starts_with("Machine: a test"), "{text}");
    let markdown = std::fs::read_to_string(&markdown).unwrap();
    assert!(markdown.contains("| direct | "), "{markdown}");
    assert!(markdown.contains("(baseline)"), "{markdown}");
    let comparison = read_json(&json);
    assert_eq!(comparison["rows"].as_array().unwrap().len(), 2);
    assert_eq!(comparison["rows"][1]["label"], "abgate");
    assert!(comparison["rows"][1]["added_p50_us"].is_i64());
    assert_eq!(comparison["runs"].as_array().unwrap().len(), 4);

    let svg = dir.join("latency.svg");
    let mut args = vec!["plot", "--out", svg.to_str().unwrap()];
    args.extend(files.iter().map(String::as_str));
    loadtest(&args).await;
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    // One legend entry per label.
    assert!(svg.contains("abgate") && svg.contains("direct"));
    mock.shutdown().await;
}
