//! Every failure is a clear answer: bad input gets a 4xx JSON error naming
//! what was wrong, upstream trouble a 502/504 naming the variant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use abgate::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn assert_error(answer: &Answer, status: u16, code: &str, mentions: &str) {
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
    assert!(answer.header("x-abgate-request-id").starts_with("abg1_"));
}

#[tokio::test]
async fn bad_request_bodies_get_400_naming_the_problem() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let url = gw.url();
    let cases = [
        ("{\"model\": ", "invalid_json", "not valid JSON"),
        ("[1, 2]", "not_an_object", "JSON object"),
        (
            "{\"model\": 42}",
            "wrong_field_type",
            "\"model\" must be a string",
        ),
        (
            "{\"model\":\"m\",\"user\":7}",
            "wrong_field_type",
            "\"user\"",
        ),
        ("{\"stream\":\"yes\"}", "wrong_field_type", "\"stream\""),
        ("", "missing_body", "empty"),
    ];
    for (body, code, mentions) in cases {
        let answer = post(&url, "/v1/chat/completions", &[("x-user-id", "u")], body).await;
        assert_error(&answer, 400, code, mentions);
        assert_eq!(answer.json()["error"]["type"], "invalid_request_error");
    }
    let answer = post(&url, "/v1/chat/completions", &[], "{\"model\":5}").await;
    assert_eq!(answer.json()["error"]["param"], "model");
    assert_eq!(
        control.request_count() + treatment.request_count(),
        0,
        "nothing bad was forwarded"
    );
    let good = post(&url, "/v1/chat/completions", &[("x-user-id", "u")], CHAT).await;
    assert_eq!(good.status, 200);
}

#[tokio::test]
async fn bad_user_ids_get_400() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let request = Request::post(format!("{}/v1/chat/completions", gw.url()))
        .header("content-type", "application/json")
        .header(
            "x-user-id",
            http::HeaderValue::from_bytes(b"\xff\xfeuser").unwrap(),
        )
        .body(Body::full(Bytes::from(CHAT)))
        .unwrap();
    assert_error(
        &send(request).await,
        400,
        "invalid_user_id",
        "not valid UTF-8",
    );

    let long = "u".repeat(513);
    let answer = chat(&gw.url(), &long).await;
    assert_error(&answer, 400, "invalid_user_id", "513 bytes");
    let body = format!(r#"{{"model":"m","user":"{long}"}}"#);
    let answer = post(&gw.url(), "/v1/chat/completions", &[], &body).await;
    assert_error(&answer, 400, "invalid_user_id", "at most 512");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (control, treatment) = mocks().await;
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, "")
        .replace("admin_listen", "max_body_bytes = 1024\nadmin_listen");
    let gw = gateway(&toml).await;
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(2048));
    let answer = post(&gw.url(), "/v1/chat/completions", &[], &big).await;
    assert_error(&answer, 413, "body_too_large", "1024 bytes");

    // Chunked, with no length declared: the limit holds while reading.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let request = Request::post(format!("{}/v1/chat/completions", gw.url()))
        .header("content-type", "application/json")
        .body(Body::Channel(receiver))
        .unwrap();
    tokio::spawn(async move {
        for _ in 0..4 {
            if sender.send(Bytes::from(vec![b' '; 512])).await.is_err() {
                break;
            }
        }
    });
    assert_error(&send(request).await, 413, "body_too_large", "limit");
    assert_eq!(control.request_count(), 0);
}

#[tokio::test]
async fn paths_outside_v1_get_404() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    for path in ["/", "/v2/chat/completions", "/admin/rollout", "/v1"] {
        let answer = send(
            Request::get(format!("{}{path}", gw.url()))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_error(&answer, 404, "not_found", path);
    }
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_naming_the_variant() {
    let (control, _) = mocks().await;
    // Port 1 (tcpmux) on loopback: nothing listens there, so the connection
    // is refused. (A port freed by the test could be reused by a parallel
    // test's server.)
    let dead = "http://127.0.0.1:1".to_owned();
    let gw = gateway(&config_toml(&control.url(), &dead, 1.0, "")).await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "connect", "treatment upstream");
    assert_eq!(answer.json()["error"]["variant"], "treatment");
    assert_eq!(answer.header("x-abgate-variant"), "treatment");
    // The gateway is fine; unassigned traffic still flows to control.
    let answer = post(&gw.url(), "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn an_upstream_that_resets_gets_502() {
    let (control, _) = mocks().await;
    // Reads the request, then closes without a response.
    let rude = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude_url = format!("http://{}", rude.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = rude.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await;
            drop(socket);
        }
    });
    let gw = gateway(&config_toml(&control.url(), &rude_url, 1.0, "")).await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "reset", "treatment upstream closed");
}

#[tokio::test]
async fn a_slow_upstream_gets_504_naming_the_variant() {
    let (control, treatment) = mocks().await;
    let extra = "[timeouts]\nfirst_byte_ms = 200";
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, extra)).await;
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-user-id", "u"), ("x-mock-latency-ms", "3000")],
        CHAT,
    )
    .await;
    assert_error(
        &answer,
        504,
        "timeout",
        "control upstream did not answer within 200 ms",
    );
    assert_eq!(answer.json()["error"]["type"], "timeout_error");
    let answer = chat(&gw.url(), "u").await;
    assert_eq!(answer.status, 200, "the next request is served normally");
}

#[tokio::test]
async fn check_config_prints_every_problem() {
    let dir = fresh_dir("check");
    let file = dir.join("bad.toml");
    let text = config_toml("ftp://nowhere", "http://127.0.0.1:1", 2.0, "")
        .replace("name = \"test-exp\"", "name = \"has spaces\"");
    std::fs::write(&file, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_abgate"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let out = String::from_utf8_lossy(&output.stdout);
    for path in [
        "experiment.name",
        "experiment.treatment_fraction",
        "variants.control.upstream",
    ] {
        assert!(out.contains(path), "{out}");
    }
    assert!(out.contains("3 problem(s)"), "{out}");

    std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_abgate"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("server") && out.contains("lisen"), "{out}");

    let good = config_toml("http://127.0.0.1:1", "http://127.0.0.1:2", 0.1, "");
    std::fs::write(&file, good).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_abgate"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
