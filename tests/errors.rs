//! Every failure is a clear answer: bad input gets a 4xx JSON error naming
//! what was wrong (more in bad_input.rs; upstream trouble is in faults.rs),
//! and a bad config file gets every problem listed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use abgate::proxy::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;

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

#[test]
fn zero_timeouts_and_limits_are_refused_with_their_keys() {
    let extra = "[timeouts]\nidle_ms = 0\ntotal_ms = 0\n[limits]\nmax_inflight = 0\nmax_inflight_per_variant = 0\nmax_header_bytes = 10";
    let text = config_toml("http://127.0.0.1:1", "http://127.0.0.1:2", 0.1, extra);
    let err = abgate::config::Config::parse(&text)
        .unwrap()
        .validate(
            &std::collections::BTreeMap::new(),
            std::path::Path::new("."),
        )
        .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "timeouts.idle_ms",
            "timeouts.total_ms",
            "limits.max_inflight",
            "limits.max_inflight_per_variant",
            "limits.max_header_bytes"
        ]
    );
    let defaults =
        abgate::config::Config::parse(&config_toml("http://a", "http://b", 0.1, "")).unwrap();
    assert_eq!(
        (defaults.timeouts.idle_ms, defaults.timeouts.total_ms),
        (60_000, 900_000)
    );
    assert_eq!(
        (
            defaults.limits.max_inflight,
            defaults.limits.max_header_bytes
        ),
        (2048, 65_536)
    );
    assert_eq!(defaults.limits.max_inflight_per_variant, None);
}
