//! The guardrails on real traffic: a treatment that starts failing or
//! slowing down is rolled back on its own; an identical one is left alone.
//! Mock faults are seeded, so every run sees the same requests fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use abgate_mock::MockConfig;
use common::*;

/// Guard settings fast enough for a test: a look every 200 ms, a trip
/// after 3 looks in breach, a verdict from 300 requests per arm, the
/// default alpha (0.001 per stage over the six checks).
const FAST_GUARD: &str = r#"
[admin]
token_env = "T"
[guardrails]
interval_seconds = 0.2
window_seconds = 600
consecutive_breaches = 3
min_requests_per_arm = 300
"#;

async fn report(gw: &abgate::app::Running) -> serde_json::Value {
    admin_call(gw.admin_addr.unwrap(), "GET", "/admin/report", None, "")
        .await
        .json()
}

/// Waits for the fraction to leave `from`; the report when it did.
async fn wait_for_rollback(gw: &abgate::app::Running, from: f64) -> serde_json::Value {
    let found = eventually(Duration::from_secs(10), || async {
        let report = report(gw).await;
        (report["treatment_fraction"] != from).then_some(report)
    })
    .await;
    if found.is_none() {
        panic!("no rollback: {:#}", report(gw).await["guardrails"]);
    }
    found.unwrap()
}

async fn metrics_text(gw: &abgate::app::Running) -> String {
    admin_call(gw.admin_addr.unwrap(), "GET", "/metrics", None, "")
        .await
        .text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_that_fails_ten_percent_is_rolled_back() {
    let control = spawn_mock(MockConfig::named("base")).await;
    let treatment = spawn_mock(MockConfig {
        fault_rate: 0.10,
        seed: 7,
        ..MockConfig::named("fine-tuned")
    })
    .await;
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, FAST_GUARD);
    let gw = gateway_with_env(&toml, token_env()).await;

    let ok = traffic(&gw.url(), "user-", 500, 1600, 16).await;
    assert!(ok > 1400 && ok < 1600, "{ok} of 1600 answered 2xx");

    let report = wait_for_rollback(&gw, 0.5).await;
    assert_eq!(report["treatment_fraction"], 0.0, "{report:#}");
    let trip = &report["last_trip"];
    assert_eq!(
        trip["checks"],
        serde_json::json!(["error_rate"]),
        "{report:#}"
    );
    assert_eq!(
        (trip["from"].as_f64(), trip["to"].as_f64()),
        (Some(0.5), Some(0.0))
    );
    let reason = trip["reason"].as_str().unwrap();
    assert!(
        reason.contains("error rate: treatment 0.") && reason.contains("control 0.0000 (0 of"),
        "{reason}"
    );
    assert!(reason.contains("in breach 3 looks in a row"), "{reason}");
    // The trip names its evidence: an always-valid interval wholly above 0.
    assert!(reason.contains("difference +0."), "{reason}");
    assert!(
        reason.contains("breach (lower bound above +0.0000)"),
        "{reason}"
    );
    assert_eq!(report["stage"]["paused"]["source"], "guardrail");

    let rollout = admin_call(gw.admin_addr.unwrap(), "GET", "/admin/rollout", None, "")
        .await
        .json();
    assert_eq!(rollout["source"], "guardrail");
    assert!(metrics_text(&gw)
        .await
        .contains(r#"abgate_guardrail_trips_total{check="error_rate"} 1"#));
    // Every user is on control now.
    for i in 0..20 {
        assert_eq!(
            chat(&gw.url(), &format!("user-{i}"))
                .await
                .header("x-abgate-variant"),
            "control"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_twice_as_slow_goes_back_one_stage() {
    // Twice as slow, so that a busy machine's queueing, which adds to both
    // arms alike, cannot bring the ratio near the 20% margin.
    let control = spawn_mock(MockConfig {
        latency: Duration::from_millis(200),
        ..MockConfig::named("base")
    })
    .await;
    let treatment = spawn_mock(MockConfig {
        latency: Duration::from_millis(400),
        ..MockConfig::named("fine-tuned")
    })
    .await;
    let extra = format!(
        "{FAST_GUARD}on_breach = \"previous_stage\"\n[rollout]\nstages = [0.25, 0.5, 1.0]\n"
    );
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, &extra);
    let gw = gateway_with_env(&toml, token_env()).await;

    // 600 answers an arm: enough for the p95 confidence sequences to bound
    // both arms at the default alpha.
    assert_eq!(traffic(&gw.url(), "user-", 500, 1200, 100).await, 1200);

    let report = wait_for_rollback(&gw, 0.5).await;
    assert_eq!(report["treatment_fraction"], 0.25, "{report:#}");
    let trip = &report["last_trip"];
    assert_eq!(
        trip["checks"],
        serde_json::json!(["latency_p95"]),
        "{report:#}"
    );
    assert!(trip["reason"]
        .as_str()
        .unwrap()
        .contains("p95 latency: treatment"));
    assert!(metrics_text(&gw)
        .await
        .contains(r#"abgate_guardrail_trips_total{check="latency_p95"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_treatment_is_left_alone() {
    // Both arms fail 5% of requests (seeded) and answer alike.
    let arm = |name: &str, seed| MockConfig {
        fault_rate: 0.05,
        seed,
        latency: Duration::from_millis(2),
        ..MockConfig::named(name)
    };
    let control = spawn_mock(arm("base", 11)).await;
    let treatment = spawn_mock(arm("fine-tuned", 12)).await;
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, FAST_GUARD);
    let gw = gateway_with_env(&toml, token_env()).await;

    traffic(&gw.url(), "user-", 500, 1600, 16).await;

    // The guard has judged (enough data, no "insufficient") ...
    let judged = eventually(Duration::from_secs(5), || async {
        let report = report(&gw).await;
        let verdict = report["guardrails"]["verdict"].clone();
        (verdict == "undecided" || verdict == "non_inferior").then_some(report)
    })
    .await
    .unwrap_or_else(|| panic!("the guard must judge: {:#}", "see the report"));
    let checks = judged["guardrails"]["last_evaluation"]["checks"]
        .as_array()
        .unwrap();
    let error_rate = checks.iter().find(|c| c["check"] == "error_rate").unwrap();
    assert!(
        error_rate["treatment"].as_f64().unwrap() > 0.02,
        "{error_rate:#}"
    );
    // 5% against 5%: an interval around 0, neither a breach nor yet within
    // a point of control.
    let interval = &error_rate["confidence_interval"];
    assert!(
        interval["lower"].as_f64().unwrap() < 0.0 && interval["upper"].as_f64().unwrap() > 0.0,
        "{error_rate:#}"
    );
    assert_eq!(error_rate["decision"], "undecided", "{error_rate:#}");
    assert!(error_rate["more_needed"]["treatment"].as_u64().unwrap() > 0);
    // ... and keeps finding nothing over a dozen more looks.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = report(&gw).await;
    assert_eq!(report["treatment_fraction"], 0.5, "{report:#}");
    assert_eq!(report["last_trip"], serde_json::Value::Null);
    assert_ne!(report["guardrails"]["verdict"], "breach", "{report:#}");
    assert!(report["stage"]["blocked_by"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b
            .as_str()
            .unwrap()
            .starts_with("guardrail error_rate has not shown non-inferiority yet")));
    assert!(!metrics_text(&gw)
        .await
        .contains("abgate_guardrail_trips_total{check=\"error_rate\"} 1"));
}

/// Waits for `check` to hold of `GET /admin/rollout`; the state when it did.
async fn rollout_until(
    gw: &abgate::app::Running,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let found = eventually(Duration::from_secs(10), || async {
        let state = admin_call(gw.admin_addr.unwrap(), "GET", "/admin/rollout", None, "")
            .await
            .json();
        check(&state).then_some(state)
    })
    .await;
    match found {
        Some(state) => state,
        None => panic!(
            "{what}: {:#}",
            admin_call(gw.admin_addr.unwrap(), "GET", "/admin/rollout", None, "")
                .await
                .json()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardrail_rollback_holds_against_the_file_until_resumed() {
    // A file-started gateway reads its secrets from the process: a name
    // of this test's own.
    std::env::set_var("ABGATE_LATCH_TEST_TOKEN", TOKEN);
    let guard = FAST_GUARD.replace(
        "token_env = \"T\"",
        "token_env = \"ABGATE_LATCH_TEST_TOKEN\"",
    );
    let control = spawn_mock(MockConfig::named("base")).await;
    let treatment = spawn_mock(MockConfig {
        fault_rate: 0.10,
        seed: 7,
        ..MockConfig::named("fine-tuned")
    })
    .await;
    let path = temp_config(
        "latch",
        &config_toml(&control.url(), &treatment.url(), 0.5, &guard),
    );
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    traffic(&gw.url(), "user-", 500, 1600, 16).await;
    let report = wait_for_rollback(&gw, 0.5).await;
    assert_eq!(report["treatment_fraction"], 0.0, "{report:#}");

    // The file says 0.25 now: a newer intention, but the trip holds.
    let edited = config_toml(&control.url(), &treatment.url(), 0.25, &guard);
    let aside = path.with_extension("toml.new");
    std::fs::write(&aside, edited).unwrap();
    std::fs::rename(&aside, &path).unwrap();
    let held = rollout_until(&gw, "the edit was read", |state| {
        state["config_fraction"] == 0.25
    })
    .await;
    assert_eq!(held["treatment_fraction"], 0.0, "{held:#}");
    assert_eq!(held["held_by_guardrail"], true, "{held:#}");
    assert_eq!(held["file_fraction_pending"], 0.25, "{held:#}");
    assert_eq!(held["paused"]["source"], "guardrail", "{held:#}");
    for i in 0..20 {
        let answer = chat(&gw.url(), &format!("user-{i}")).await;
        assert_eq!(answer.header("x-abgate-variant"), "control");
    }

    // Promotion does not start the rollout again behind the latch.
    let refused = admin_call(
        gw.admin_addr.unwrap(),
        "POST",
        "/admin/promote",
        Some(TOKEN),
        "{}",
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("a guardrail rollback holds the rollout"),
        "{}",
        refused.text()
    );

    // An operator resumes: the file's fraction applies.
    let resumed = admin_call(
        gw.admin_addr.unwrap(),
        "POST",
        "/admin/resume",
        Some(TOKEN),
        r#"{"reason": "fixed the fine-tune's serving bug"}"#,
    )
    .await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    let state = resumed.json();
    assert_eq!(state["treatment_fraction"], 0.25, "{state:#}");
    assert_eq!(state["held_by_guardrail"], false, "{state:#}");
    assert_eq!(state["file_fraction_pending"], serde_json::Value::Null);
    assert_eq!(state["paused"], serde_json::Value::Null, "{state:#}");
    gw.shutdown().await;
}
