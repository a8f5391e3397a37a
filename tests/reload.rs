//! Hot reload: the config file changes under steady traffic and no request
//! fails; a broken file is rejected whole while the old config serves; a
//! request in flight finishes on the config it started with.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abgate::proxy::body::Body;
use common::*;
use http::Request;
use http_body_util::BodyExt;

/// Replaces the file the way deploy tools do: write aside, then rename.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("toml.new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

async fn rollout(admin: std::net::SocketAddr) -> serde_json::Value {
    send(
        Request::get(format!("http://{admin}/admin/rollout"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json()
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not happen within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fraction_applies_within_a_second_and_no_request_fails() {
    let (control, treatment) = mocks().await;
    let path = temp_config(
        "steady",
        &config_toml(&control.url(), &treatment.url(), 0.0, ""),
    );
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let url = gw.url();

    // Steady traffic from 50 users until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, treated) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (stop, sent, failed, treated, url) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            treated.clone(),
            url.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = worker;
            while !stop.load(Ordering::SeqCst) {
                let answer = post(
                    &url,
                    "/v1/chat/completions",
                    &[("x-user-id", &format!("user-{}", i % 50))],
                    CHAT,
                )
                .await;
                sent.fetch_add(1, Ordering::SeqCst);
                if answer.status != 200 {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                if answer.header("x-abgate-variant") == "treatment" {
                    treated.fetch_add(1, Ordering::SeqCst);
                }
                i += 4;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        treated.load(Ordering::SeqCst),
        0,
        "nobody is treated at 0.0"
    );

    let changed = Instant::now();
    replace(
        &path,
        &config_toml(&control.url(), &treatment.url(), 1.0, ""),
    );
    until("the new split", async || treated.load(Ordering::SeqCst) > 0).await;
    let took = changed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    println!(
        "new split visible after {took:?}; {} requests sent",
        sent.load(Ordering::SeqCst)
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(sent.load(Ordering::SeqCst) > 20);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed across the swap"
    );

    let state = rollout(gw.admin_addr.unwrap()).await;
    assert_eq!(state["treatment_fraction"], 1.0);
    assert_eq!(state["config"]["generation"], 2);
    let metrics = send(
        Request::get(format!("http://{}/metrics", gw.admin_addr.unwrap()))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .text();
    assert!(metrics.contains("abgate_config_reloads_total{result=\"ok\"} 1"));
    assert!(metrics.contains("abgate_treatment_fraction{experiment=\"test-exp\"} 1"));
}

#[tokio::test]
async fn a_broken_file_is_rejected_whole_and_the_old_config_keeps_serving() {
    let (control, treatment) = mocks().await;
    let good = config_toml(&control.url(), &treatment.url(), 1.0, "");
    let path = temp_config("broken", &good);
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let admin = gw.admin_addr.unwrap();

    // Valid TOML with one bad value next to a good change: nothing applies.
    let bad = good
        .replace("treatment_fraction = 1", "treatment_fraction = 0")
        .replace("model = \"base-model\"", "model = \"\"");
    replace(&path, &bad);
    until("the rejection", async || {
        !rollout(admin).await["config"]["last_reload_error"].is_null()
    })
    .await;
    let state = rollout(admin).await;
    let error = state["config"]["last_reload_error"].as_str().unwrap();
    assert!(error.contains("variants.control.model"), "{error}");
    assert_eq!(
        state["treatment_fraction"], 1.0,
        "the good part of a bad file is not applied either"
    );
    assert_eq!(state["config"]["generation"], 1);
    let answer = chat(&gw.url(), "u").await;
    assert_eq!(
        (answer.status.as_u16(), answer.header("x-abgate-variant")),
        (200, "treatment")
    );

    // Not even TOML.
    replace(&path, "[server\nlisten = ");
    until("the second rejection", async || {
        rollout(admin).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("line"))
    })
    .await;
    let metrics = send(
        Request::get(format!("http://{admin}/metrics"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .text();
    assert!(
        metrics.contains("abgate_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );

    // Fixed: applied, and the error is cleared.
    replace(
        &path,
        &good.replace("treatment_fraction = 1", "treatment_fraction = 0"),
    );
    until("the fix", async || {
        rollout(admin).await["treatment_fraction"] == 0.0
    })
    .await;
    assert!(rollout(admin).await["config"]["last_reload_error"].is_null());
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_config_it_started_with() {
    let (control, treatment) = held_control_mocks().await;
    let path = temp_config(
        "inflight",
        &config_toml(&control.url(), &treatment.url(), 0.0, ""),
    );
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let request = chat_stream_request(&gw.url(), "u");
    let response = bounded(client().request(request)).await.unwrap();
    assert_eq!(response.headers()["x-abgate-variant"], "control");
    let mut stream = response.into_body();
    bounded(stream.frame()).await.unwrap().unwrap();

    replace(
        &path,
        &config_toml(&control.url(), &treatment.url(), 1.0, ""),
    );
    let admin = gw.admin_addr.unwrap();
    until("the reload", async || {
        rollout(admin).await["treatment_fraction"] == 1.0
    })
    .await;
    let after = chat(&gw.url(), "u").await;
    assert_eq!(
        after.header("x-abgate-variant"),
        "treatment",
        "new requests see the new split"
    );

    control.release_streams();
    let rest = bounded(stream.collect()).await.unwrap().to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.trim_end().ends_with("data: [DONE]"),
        "the old stream ran to its end: {rest}"
    );
    assert_eq!(control.streams_finished(), 1);
}

#[tokio::test]
async fn the_bytes_the_watcher_read_are_the_bytes_it_judges() {
    // The watcher compares what it read with the bytes it last judged, then
    // judges what it read. Were the file read a second time, a rewrite in
    // place between the two reads (truncate, then write) would have the
    // half-written file judged and rejected while the watcher remembers the
    // whole new file as judged: the good file would never be applied.
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 1.0, "")).await;
    let admin = gw.admin_addr.unwrap();
    let path = temp_config("judged", "");
    let read = config_toml(&control.url(), &treatment.url(), 0.0, "");

    // The file is empty now (truncated for the rewrite): what was read is
    // judged, not what the file holds.
    abgate::control::reload::reload_bytes(&path, read.as_bytes(), &gw.control).unwrap();
    let state = rollout(admin).await;
    assert_eq!(state["treatment_fraction"], 0.0);
    assert_eq!(state["config"]["generation"], 2);
    assert!(state["config"]["last_reload_error"].is_null());

    // Half a file is judged as half a file: rejected, the running config stays.
    let half = &read.as_bytes()[..read.len() / 2];
    let error = abgate::control::reload::reload_bytes(&path, half, &gw.control).unwrap_err();
    assert!(error.contains("rejected"), "{error}");
    assert_eq!(rollout(admin).await["treatment_fraction"], 0.0);
}
