//! The guard's report, recomputed offline from the events file by the
//! script shipped for analysts (`tools/recompute_report.py`), agrees with
//! `/admin/report`; and the script notices when it does not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use abgate_mock::MockConfig;
use common::*;

const STREAM: &str = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

fn script(
    events: &std::path::Path,
    config: &std::path::Path,
    report: &std::path::Path,
) -> std::process::Output {
    let root = env!("CARGO_MANIFEST_DIR");
    Command::new("python3")
        .arg(format!("{root}/tools/recompute_report.py"))
        .arg("--events")
        .arg(events)
        .arg("--config")
        .arg(config)
        .arg("--compare")
        .arg(report)
        .arg("--json")
        .output()
        .expect("python3 runs the script")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_recomputed_from_the_events_agrees() {
    let control = spawn_mock(MockConfig::named("base")).await;
    let treatment = spawn_mock(MockConfig {
        fault_rate: 0.08,
        seed: 5,
        ..MockConfig::named("fine-tuned")
    })
    .await;
    let dir = fresh_dir("offline-report");
    let events = dir.join("events.jsonl");
    let extra = format!(
        "[events]\npath = \"{}\"\n[guardrails]\ninterval_seconds = 0.2\nmin_requests_per_arm = 100\nmin_feedback_per_arm = 50\nalpha = 0.05\n",
        events.display()
    );
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, &extra);
    let config = dir.join("abgate.toml");
    std::fs::write(&config, &toml).unwrap();
    let gw = gateway(&toml).await;
    let url = gw.url();

    // 600 requests from 300 users, a third of them streamed; feedback on
    // every answer that has an id, a rating on half of them.
    let mut sent = 0u64;
    let mut reported = 0u64;
    for i in 0..600u64 {
        let user = format!("user-{}", i % 300);
        let headers = [("x-user-id", user.as_str())];
        let body = if i % 3 == 0 {
            STREAM
        } else {
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        };
        let answer = post(&url, "/v1/chat/completions", &headers, body).await;
        sent += 1;
        let id = answer.header("x-abgate-request-id");
        if answer.status.is_success() {
            let outcome = if i % 4 == 0 { "abandoned" } else { "completed" };
            let rating = if i % 2 == 0 {
                format!("{}", 1 + i % 5)
            } else {
                "null".to_owned()
            };
            let report =
                format!(r#"{{"request_id":"{id}","outcome":"{outcome}","rating":{rating}}}"#);
            assert_eq!(post(&url, "/v1/feedback", &[], &report).await.status, 200);
            reported += 1;
        }
    }

    // Wait for the guard to look after the last report, and for the events
    // writer to have written every line.
    let admin = gw.admin_addr.unwrap();
    let report = eventually(Duration::from_secs(10), || async {
        let report = admin_call(admin, "GET", "/admin/report", None, "")
            .await
            .json();
        let evaluation = &report["guardrails"]["last_evaluation"];
        let arms = ["control", "treatment"];
        let requests: u64 = arms
            .iter()
            .map(|a| evaluation[a]["requests"].as_u64().unwrap_or(0))
            .sum();
        let feedback: u64 = arms
            .iter()
            .map(|a| evaluation[a]["feedback_reports"].as_u64().unwrap_or(0))
            .sum();
        let lines = std::fs::read_to_string(&events).map_or(0, |text| text.lines().count() as u64);
        (requests == sent && feedback == reported && lines == sent + reported).then_some(report)
    })
    .await
    .expect("the guard looks at everything, the events hold everything");
    let saved = dir.join("report.json");
    std::fs::write(&saved, report.to_string()).unwrap();

    let output = script(&events, &config, &saved);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let mine: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        mine["counts"]["control"]["requests"].as_u64().unwrap()
            + mine["counts"]["treatment"]["requests"].as_u64().unwrap(),
        sent
    );
    // Enough data for every check but TTFT's streams and the quantiles to
    // judge: the comparison covered real intervals, not only counts.
    for check in ["error_rate", "response_length", "completion_rate", "rating"] {
        assert_ne!(
            mine["checks"][check]["decision"], "insufficient_data",
            "{check}: {mine:#}"
        );
        assert!(mine["checks"][check]["lower"].is_f64(), "{check}: {mine:#}");
    }
    assert!(mine["checks"]["error_rate"]["treatment"].as_f64().unwrap() > 0.03);

    // A report that counts one treatment request too many is caught.
    let mut tampered = report.clone();
    let requests = &mut tampered["guardrails"]["last_evaluation"]["treatment"]["requests"];
    *requests = (requests.as_u64().unwrap() + 1).into();
    std::fs::write(&saved, tampered.to_string()).unwrap();
    let output = script(&events, &config, &saved);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DISAGREES: treatment requests"), "{stderr}");
    // So is an interval wider than the events allow.
    let mut tampered = report.clone();
    let checks = tampered["guardrails"]["last_evaluation"]["checks"]
        .as_array_mut()
        .unwrap();
    let error_rate = checks
        .iter_mut()
        .find(|c| c["check"] == "error_rate")
        .unwrap();
    error_rate["confidence_interval"]["upper"] = 0.9.into();
    std::fs::write(&saved, tampered.to_string()).unwrap();
    let output = script(&events, &config, &saved);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DISAGREES: error_rate upper bound"),
        "{stderr}"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
