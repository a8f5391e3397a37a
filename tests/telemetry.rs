//! Both arms measured: /metrics and /admin/stats after real traffic, bounded
//! label sets, and requests recorded however they end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use abgate::config::rollout::ChangeSource;
use std::time::Duration;

use abgate::experiment::assign::{assign, Variant};
use abgate::proxy::body::Body;
use common::*;
use http::Request;
use http_body_util::BodyExt;

#[tokio::test]
async fn both_arms_are_counted_with_latency_tokens_and_errors() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let admin = gw.admin_addr.unwrap();
    let url = gw.url();
    let mut sent = [0u64; 2];
    for i in 0..40 {
        let user = format!("user-{i}");
        let arm = usize::from(assign(user.as_bytes(), None, 0.5) == Variant::Treatment);
        sent[arm] += 1;
        let answer = match i % 4 {
            0 => post(&url, "/v1/chat/completions", &[("x-user-id", &user)], CHAT).await,
            1 => {
                let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a b c"}]}"#;
                post(&url, "/v1/chat/completions", &[("x-user-id", &user)], body).await
            }
            2 => {
                let body = r#"{"model":"m","stream":true,"max_tokens":9,"messages":[{"role":"user","content":"a b"}]}"#;
                post(&url, "/v1/messages", &[("x-user-id", &user)], body).await
            }
            _ => {
                post(
                    &url,
                    "/v1/chat/completions",
                    &[("x-user-id", &user), ("x-mock-status", "500")],
                    CHAT,
                )
                .await
            }
        };
        assert!(answer.status == 200 || answer.status == 500);
    }
    let (c, t) = (sent[0], sent[1]);
    let total = |text: &str, variant: &str| -> f64 {
        ["chat", "messages"]
            .iter()
            .flat_map(|route| ["2xx", "5xx"].map(move |class| (route, class)))
            .filter_map(|(route, class)| {
                sample(
                    text,
                    &format!(r#"abgate_requests_total{{experiment="test-exp",route="{route}",status_class="{class}",variant="{variant}"}}"#),
                )
            })
            .sum()
    };
    let text = metrics_until(admin, |text| {
        total(text, "control") == c as f64 && total(text, "treatment") == t as f64
    })
    .await;

    for variant in ["control", "treatment"] {
        let errors = sample(&text, &format!(r#"abgate_upstream_errors_total{{experiment="test-exp",kind="status_5xx",variant="{variant}"}}"#)).unwrap();
        assert!(errors >= 1.0, "{variant} upstream 5xx counted");
        let completion = sample(&text, &format!(r#"abgate_tokens_total{{experiment="test-exp",kind="completion",variant="{variant}"}}"#)).unwrap();
        assert!(
            completion > 0.0,
            "{variant} tokens read from JSON and streams"
        );
        let streamed = sample(&text, &format!(r#"abgate_time_to_first_byte_seconds_count{{experiment="test-exp",route="messages",stream="true",variant="{variant}"}}"#)).unwrap();
        assert!(streamed >= 1.0, "{variant} Anthropic stream TTFB recorded");
    }
    assert_eq!(
        sample(&text, r#"abgate_treatment_fraction{experiment="test-exp"}"#),
        Some(0.5)
    );
    assert_eq!(
        sample(&text, r#"abgate_inflight_requests{variant="control"}"#),
        Some(0.0)
    );
    assert!(sample(&text, r#"abgate_overhead_seconds_count{route="chat"}"#).unwrap() > 0.0);
    assert!(text.contains(&format!(
        r#"abgate_build_info{{version="{}"}} 1"#,
        env!("CARGO_PKG_VERSION")
    )));

    let stats = get(format!("http://{admin}/admin/stats")).await.json();
    assert_eq!(stats["variants"]["control"]["requests"], c);
    assert_eq!(stats["variants"]["treatment"]["requests"], t);
    let control_stats = &stats["variants"]["control"];
    assert!(control_stats["errors"].as_u64().unwrap() >= 1);
    assert!(control_stats["error_rate"].as_f64().unwrap() > 0.0);
    let p95 = control_stats["latency_seconds"]["p95"].as_f64().unwrap();
    let p50 = control_stats["latency_seconds"]["p50"].as_f64().unwrap();
    assert!(p95 >= p50 && p50 > 0.0);
    assert!(control_stats["completion_tokens"].as_u64().unwrap() > 0);
    assert!(control_stats["mean_response_bytes"].as_f64().unwrap() > 100.0);
    assert_eq!(stats["variants"]["unassigned"]["requests"], 0);
}

#[tokio::test]
async fn series_do_not_grow_with_users_and_never_name_them() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let admin = gw.admin_addr.unwrap();
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    for i in 0..20 {
        post(
            &gw.url(),
            "/v1/chat/completions",
            &[("x-user-id", &format!("warmup-{i}"))],
            CHAT,
        )
        .await;
    }
    let before = series(&metrics_until(admin, |_| true).await);
    // 2000 more distinct users, 16 at a time.
    let mut batch = tokio::task::JoinSet::new();
    let url = gw.url();
    for i in 0..2000 {
        let url = url.clone();
        batch.spawn(async move {
            post(
                &url,
                "/v1/chat/completions",
                &[("x-user-id", &format!("distinct-user-{i}"))],
                CHAT,
            )
            .await
            .status
        });
        if batch.len() >= 16 {
            assert_eq!(batch.join_next().await.unwrap().unwrap(), 200);
        }
    }
    while let Some(status) = batch.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let text = metrics_until(admin, |text| {
        let done: f64 = ["control", "treatment"]
            .iter()
            .filter_map(|v| sample(text, &format!(r#"abgate_requests_total{{experiment="test-exp",route="chat",status_class="2xx",variant="{v}"}}"#)))
            .sum();
        done == 2020.0
    })
    .await;
    assert_eq!(
        series(&text),
        before,
        "the series count is fixed by config, not by users"
    );
    assert!(!text.contains("distinct-user"), "no user ID in any label");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_counted_as_cancelled() {
    let (control, treatment) = held_control_mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let admin = gw.admin_addr.unwrap();
    let request = chat_stream_request(&gw.url(), "leaver");
    let client = client();
    let response = bounded(client.request(request)).await.unwrap();
    let mut body = response.into_body();
    bounded(body.frame()).await.unwrap().unwrap();
    assert_eq!(
        sample(
            &scrape(admin).await,
            r#"abgate_inflight_requests{variant="control"}"#
        ),
        Some(1.0)
    );
    drop(body);
    drop(client);
    let text = metrics_until(admin, |text| {
        sample(text, r#"abgate_upstream_errors_total{experiment="test-exp",kind="client_cancelled",variant="control"}"#) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, r#"abgate_inflight_requests{variant="control"}"#),
        Some(0.0)
    );
    control.release_streams();
}

#[tokio::test]
async fn every_request_becomes_one_event_line_joinable_by_request_id() {
    let (control, treatment) = mocks().await;
    let dir = fresh_dir("events");
    let path = dir.join("events.jsonl");
    let extra = format!(
        "[events]\npath = {:?}\nuser_id = \"hash\"",
        path.display().to_string()
    );
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, &extra)).await;
    let url = gw.url();
    let mut expected = Vec::new();
    for (i, user) in ["alice", "bob", "carol"].iter().enumerate() {
        let body = if i == 1 {
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#
        } else {
            CHAT
        };
        let answer = post(&url, "/v1/chat/completions", &[("x-user-id", user)], body).await;
        expected.push((
            answer.header("x-abgate-request-id").to_owned(),
            user.to_string(),
            answer.header("x-abgate-variant").to_owned(),
        ));
    }
    let bad = post(&url, "/v1/chat/completions", &[], "{oops").await;
    assert_eq!(bad.status, 400);

    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (request_id, user, variant) in &expected {
        let event = events
            .iter()
            .find(|e| e["request_id"] == request_id.as_str())
            .expect("event for every request id");
        assert_eq!(event["variant"], variant.as_str());
        assert_eq!(event["experiment"], "test-exp");
        assert_eq!(event["status"], 200);
        assert!(event["completion_tokens"].as_u64().unwrap() > 0);
        assert!(event["latency_ms"].as_f64().unwrap() > 0.0);
        let model = if variant == "treatment" {
            "ft:base-model:acme:v3"
        } else {
            "base-model"
        };
        assert_eq!(event["model"], model);
        // Hashed: SHA-256 of the ID, never the ID itself.
        let hashed = event["user_id"].as_str().unwrap();
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(user.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hashed, sha);
        assert!(event["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(events.iter().filter(|e| e["stream"] == true).count(), 1);
    let refused = events.iter().find(|e| e["status"] == 400).unwrap();
    assert_eq!(refused["variant"], "unassigned");
    assert!(refused["user_id"].is_null());
    assert!(!std::fs::read_to_string(&path).unwrap().contains("alice"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn feedback_is_attributed_by_the_signed_request_id_on_any_replica() {
    let (control, treatment) = mocks().await;
    let extra = "[feedback]\nkey_env = \"FLEET_KEY\"";
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, extra);
    let env = std::collections::BTreeMap::from([(
        "FLEET_KEY".to_owned(),
        "0123456789abcdef-fleet".to_owned(),
    )]);
    let first = gateway_with_env(&toml, env.clone()).await;
    let second = gateway_with_env(&toml, env).await;
    let (control_user, treatment_user) =
        ["user-0", "user-1", "user-2", "user-3", "user-4", "user-5"]
            .iter()
            .fold((None, None), |(c, t), u| {
                match assign(u.as_bytes(), None, 0.5) {
                    Variant::Control => (c.or(Some(*u)), t),
                    _ => (c, t.or(Some(*u))),
                }
            });
    let id_of = |answer: &Answer| answer.header("x-abgate-request-id").to_owned();
    let control_id = id_of(
        &post(
            &first.url(),
            "/v1/chat/completions",
            &[("x-user-id", control_user.unwrap())],
            CHAT,
        )
        .await,
    );
    let treatment_id = id_of(
        &post(
            &first.url(),
            "/v1/chat/completions",
            &[("x-user-id", treatment_user.unwrap())],
            CHAT,
        )
        .await,
    );
    assert!(treatment_id.starts_with("abg2_t_") && treatment_id.ends_with("_test-exp"));

    // Reported to the other replica: no shared state, same attribution.
    let report = |id: &str, outcome: &str, rating: &str| {
        format!(r#"{{"request_id":"{id}","outcome":"{outcome}","rating":{rating}}}"#)
    };
    let answer = post(
        &second.url(),
        "/v1/feedback",
        &[],
        &report(&treatment_id, "completed", "4"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["variant"], "treatment");
    let answer = post(
        &second.url(),
        "/v1/feedback",
        &[],
        &report(&control_id, "abandoned", "null"),
    )
    .await;
    assert_eq!(answer.json()["variant"], "control");

    // A report is counted once: replayed, even with another outcome, it
    // is refused (and the counts below stay at one).
    for outcome in ["completed", "completed", "abandoned", "completed"] {
        let replay = post(
            &second.url(),
            "/v1/feedback",
            &[],
            &report(&treatment_id, outcome, "1"),
        )
        .await;
        assert_eq!(replay.status, 409, "{}", replay.text());
        assert_eq!(replay.json()["error"]["code"], "duplicate_feedback");
    }

    // A client cannot move its report to the other arm, or invent labels.
    let forged = treatment_id.replacen("abg2_t_", "abg2_c_", 1);
    for (body, mentions) in [
        (report(&forged, "completed", "5"), "request_id"),
        (report("abg-123", "completed", "5"), "request_id"),
        (report(&control_id, "delighted", "5"), "not one of"),
        (report(&control_id, "completed", "7"), "1 to 5"),
        ("{\"request_id\": 5}".to_owned(), "feedback must be"),
    ] {
        let answer = post(&second.url(), "/v1/feedback", &[], &body).await;
        assert_eq!(answer.status, 400, "{body}");
        assert_eq!(answer.json()["error"]["code"], "invalid_feedback");
        assert!(
            answer.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(mentions),
            "{}",
            answer.text()
        );
    }
    let get = send(
        Request::get(format!("{}/v1/feedback", second.url()))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 405);
    assert_eq!(
        control.request_count() + treatment.request_count(),
        2,
        "feedback is never forwarded"
    );

    let text = scrape(second.admin_addr.unwrap()).await;
    assert_eq!(
        sample(
            &text,
            r#"abgate_feedback_total{experiment="test-exp",outcome="completed",variant="treatment"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"abgate_feedback_total{experiment="test-exp",outcome="abandoned",variant="control"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"abgate_feedback_rating_sum{experiment="test-exp",variant="treatment"}"#
        ),
        Some(4.0)
    );
    let stats = get_stats(second.admin_addr.unwrap()).await;
    assert_eq!(
        stats["variants"]["treatment"]["feedback"]["outcomes"]["completed"],
        1
    );
    assert_eq!(
        stats["variants"]["treatment"]["feedback"]["mean_rating"],
        4.0
    );
}

async fn get_stats(admin: std::net::SocketAddr) -> serde_json::Value {
    get(format!("http://{admin}/admin/stats")).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_event_writer_drops_events_and_never_slows_requests() {
    let (control, treatment) = mocks().await;
    let dir = fresh_dir("fifo");
    let fifo = dir.join("events.pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader that opens the pipe and never reads: the writer fills the
    // pipe's buffer, then blocks for good.
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::File::open(reader_path).unwrap());
    let extra = format!(
        "[events]\npath = {:?}\nqueue = 4",
        fifo.display().to_string()
    );
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, &extra)).await;
    let _reader = reader.join().unwrap();
    // ~500 bytes an event: 600 of them are far beyond a 64 KiB pipe.
    for i in 0..600 {
        let answer = post(
            &gw.url(),
            "/v1/chat/completions",
            &[("x-user-id", &format!("u{i}"))],
            CHAT,
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    let text = metrics_until(gw.admin_addr.unwrap(), |text| {
        sample(text, "abgate_events_dropped_total").is_some_and(|dropped| dropped > 0.0)
    })
    .await;
    let dropped = sample(&text, "abgate_events_dropped_total").unwrap();
    assert!(
        dropped < 600.0,
        "events were written until the pipe filled: {dropped}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_sample_that_does_not_fit_the_split_is_flagged() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let admin = gw.admin_addr.unwrap();
    let stats = || async { get_stats(admin).await["sample_ratio"].clone() };

    // 400 distinct users, as hashed: fits the 50% split.
    for i in 0..400 {
        chat(&gw.url(), &format!("srm-user-{i}")).await;
    }
    let fair = stats().await;
    assert_eq!(
        fair["control"].as_u64().unwrap() + fair["treatment"].as_u64().unwrap(),
        400
    );
    assert_eq!(fair["expected_treatment_share"], 0.5);
    assert_eq!(fair["mismatch"], false, "{fair}");

    // Then 300 requests that all land in control, as when a client drops
    // the treatment arm's traffic: the split no longer fits.
    let control_users: Vec<String> = (0..)
        .map(|i| format!("other-user-{i}"))
        .filter(|u| assign(u.as_bytes(), None, 0.5) == Variant::Control)
        .take(300)
        .collect();
    for user in &control_users {
        chat(&gw.url(), user).await;
    }
    let skewed = stats().await;
    assert_eq!(skewed["mismatch"], true, "{skewed}");
    assert!(skewed["p_value"].as_f64().unwrap() < 0.001);
    let text = scrape(admin).await;
    assert_eq!(
        sample(
            &text,
            r#"abgate_sample_ratio_mismatch{experiment="test-exp"}"#
        ),
        Some(1.0)
    );

    // A new fraction is a new comparison: the counts start again.
    gw.control
        .set_fraction(0.25, ChangeSource::Api, "stage change")
        .unwrap();
    let fresh = stats().await;
    assert_eq!(
        (fresh["control"].as_u64(), fresh["treatment"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(fresh["mismatch"], false);
}

#[tokio::test]
async fn tokens_are_read_from_gzip_answers_that_pass_through_compressed() {
    use std::io::Write;
    let (control, _) = mocks().await;
    let json = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":21,"completion_tokens":55}}"#;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(json).unwrap();
    let compressed = encoder.finish().unwrap();
    let upstream = raw_upstream(raw_answer(
        "content-type: application/json\r\ncontent-encoding: gzip\r\n",
        &compressed,
    ))
    .await;
    let gw = gateway(&config_toml(&control.url(), &upstream, 1.0, "")).await;
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-user-id", "u"), ("accept-encoding", "gzip")],
        CHAT,
    )
    .await;
    assert_eq!(answer.header("content-encoding"), "gzip");
    assert_eq!(
        answer.body.as_ref(),
        compressed.as_slice(),
        "the client gets the bytes as sent"
    );
    metrics_until(gw.admin_addr.unwrap(), |text| {
        sample(
            text,
            r#"abgate_tokens_total{experiment="test-exp",kind="completion",variant="treatment"}"#,
        ) == Some(55.0)
            && sample(
                text,
                r#"abgate_tokens_total{experiment="test-exp",kind="prompt",variant="treatment"}"#,
            ) == Some(21.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_stats_shows_the_stage_from_each_arms_own_sketch() {
    let control = spawn_mock(abgate_mock::MockConfig {
        latency: std::time::Duration::from_millis(20),
        ..abgate_mock::MockConfig::named("base")
    })
    .await;
    let treatment = spawn_mock(abgate_mock::MockConfig {
        latency: std::time::Duration::from_millis(60),
        ..abgate_mock::MockConfig::named("fine-tuned")
    })
    .await;
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, "");
    let gw = gateway(&toml).await;
    assert_eq!(traffic(&gw.url(), "user-", 200, 120, 8).await, 120);

    let stats = get_stats(gw.admin_addr.unwrap()).await;
    let stage = &stats["stage"];
    let (c, t) = (&stage["control"], &stage["treatment"]);
    let answers = c["answers"].as_u64().unwrap() + t["answers"].as_u64().unwrap();
    assert_eq!(answers, 120, "{stage:#}");
    // The mocks' own latencies, read within the sketch's 1% (plus the
    // gateway's and the machine's own time).
    let p95 = |arm: &serde_json::Value| arm["latency_p95_seconds"].as_f64().unwrap();
    assert!((0.0198..0.05).contains(&p95(c)), "{stage:#}");
    assert!((0.0594..0.10).contains(&p95(t)), "{stage:#}");
    assert!(
        c["mean_completion_tokens"].as_f64().unwrap() > 0.0,
        "{stage:#}"
    );
    assert_eq!(c["answers_with_usage"], c["answers"], "{stage:#}");

    // A new split is a new stage: its sketches start empty.
    gw.control
        .set_fraction(0.25, ChangeSource::Api, "next stage")
        .unwrap();
    let fresh = get_stats(gw.admin_addr.unwrap()).await;
    assert_eq!(fresh["stage"]["treatment"]["answers"], 0, "{fresh:#}");
    assert_eq!(
        fresh["stage"]["treatment"]["latency_p95_seconds"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn tokens_are_read_from_responses_api_streams() {
    let (control, _) = mocks().await;
    let events = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"r\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"r\",\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":34,\"total_tokens\":46}}}\n\n",
    );
    let upstream = raw_upstream(raw_answer(
        "content-type: text/event-stream\r\n",
        events.as_bytes(),
    ))
    .await;
    let gw = gateway(&config_toml(&control.url(), &upstream, 1.0, "")).await;
    let answer = post(
        &gw.url(),
        "/v1/responses",
        &[("x-user-id", "u")],
        r#"{"model":"m","input":"hi","stream":true}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.as_ref(), events.as_bytes(), "streamed as sent");
    metrics_until(gw.admin_addr.unwrap(), |text| {
        sample(
            text,
            r#"abgate_tokens_total{experiment="test-exp",kind="completion",variant="treatment"}"#,
        ) == Some(34.0)
            && sample(
                text,
                r#"abgate_tokens_total{experiment="test-exp",kind="prompt",variant="treatment"}"#,
            ) == Some(12.0)
    })
    .await;
}
