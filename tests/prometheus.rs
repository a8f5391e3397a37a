//! The dashboard and alert rules, proven against a real Prometheus (Debian's
//! `prometheus`, installed by .ci/run): it scrapes a gateway carrying mixed
//! traffic, then every dashboard expression must parse and return data for
//! both arms, every rule must evaluate cleanly, and the red flags of a
//! treatment that fails and runs slow must be raised.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use abgate::experiment::assign::{assign, Variant};
use abgate::proxy::body::Body;
use abgate_mock::MockConfig;
use common::*;
use http::Request;
use serde_json::Value;

fn find(binary: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| format!("{dir}/{binary}"))
        .find(|path| std::path::Path::new(path).is_file())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn api(prometheus: &str, path: &str) -> Value {
    let answer = send(
        Request::get(format!("{prometheus}{path}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let json = answer.json();
    assert_eq!(json["status"], "success", "{path}: {json}");
    json
}

async fn query(prometheus: &str, expr: &str) -> Vec<Value> {
    let json = api(
        prometheus,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
    .await;
    json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn variants(result: &[Value]) -> Vec<String> {
    let mut found: Vec<String> = result
        .iter()
        .filter(|sample| sample["value"][1].as_str().is_some_and(|v| v != "NaN"))
        .filter_map(|sample| sample["metric"]["variant"].as_str().map(str::to_owned))
        .collect();
    found.sort();
    found.dedup();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_work_against_a_real_prometheus() {
    let (Some(prometheus_bin), Some(promtool)) = (find("prometheus"), find("promtool")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Debian's prometheus (.ci/run does)"
        );
        eprintln!("skipped: install Debian's prometheus package to run this test (.ci/run does)");
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = format!("{root}/dashboards/alerts.yaml");
    let check = std::process::Command::new(&promtool)
        .args(["check", "rules", &rules])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A treatment that fails one request in four and answers 60 ms slower.
    let control = spawn_mock(MockConfig {
        latency: Duration::from_millis(5),
        ..MockConfig::named("base")
    })
    .await;
    let treatment = spawn_mock(MockConfig {
        latency: Duration::from_millis(65),
        fault_rate: 0.25,
        seed: 42,
        ..MockConfig::named("fine-tuned")
    })
    .await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let admin = gw.admin_addr.unwrap();

    let dir = fresh_dir("prometheus");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: abgate\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(&prometheus_bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let prometheus = format!("http://127.0.0.1:{port}");

    // Mixed traffic from users of both arms: JSON, OpenAI and Anthropic
    // streams, feedback; bounded in count and time.
    let users: Vec<String> = (0..40).map(|i| format!("prom-user-{i}")).collect();
    assert!(users
        .iter()
        .any(|u| assign(u.as_bytes(), None, 0.5) == Variant::Treatment));
    let url = gw.url();
    let started = Instant::now();
    let mut round = 0usize;
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(40) {
        for (i, user) in users.iter().enumerate() {
            let headers = [("x-user-id", user.as_str())];
            let answer = match (i + round) % 3 {
                0 => post(&url, "/v1/chat/completions", &headers, CHAT).await,
                1 => post(&url, "/v1/chat/completions", &headers,
                    r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#).await,
                _ => post(&url, "/v1/messages", &headers,
                    r#"{"model":"m","stream":true,"max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#).await,
            };
            let id = answer.header("x-abgate-request-id");
            let outcome = if i % 2 == 0 { "completed" } else { "abandoned" };
            post(
                &url,
                "/v1/feedback",
                &[],
                &format!(r#"{{"request_id":"{id}","outcome":"{outcome}","rating":4}}"#),
            )
            .await;
        }
        round += 1;
        // Ready once Prometheus holds several scrapes and has evaluated the rules.
        if round >= 3 {
            let samples = query(&prometheus, "count_over_time(abgate_build_info[1m])").await;
            let recorded = query(&prometheus, "abgate:completion_ratio:rate30m").await;
            if samples
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                >= 5.0
                && variants(&recorded).len() >= 2
            {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "Prometheus did not scrape and evaluate within 40 s");

    // Every dashboard expression parses and returns data; per-arm panels for both arms.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/dashboards/abgate.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$experiment", "test-exp")
                .replace("$__rate_interval", "1m");
            let result = query(&prometheus, &expr).await;
            assert!(
                !result.is_empty(),
                "panel {:?} returned no data: {expr}",
                panel["title"]
            );
            if expr.contains("by (variant") {
                let found = variants(&result);
                assert!(
                    found.contains(&"control".to_owned())
                        && found.contains(&"treatment".to_owned()),
                    "panel {:?} lacks an arm ({found:?}): {expr}",
                    panel["title"]
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 16, "{checked} expressions checked");

    // Every rule evaluates cleanly; recorded series exist for both arms.
    let rules_state = api(&prometheus, "/api/v1/rules").await;
    let mut rule_count = 0;
    for group in rules_state["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(
                rule["health"], "ok",
                "rule {} failed: {}",
                rule["name"], rule["lastError"]
            );
            if rule["type"] == "recording" {
                let name = rule["name"].as_str().unwrap();
                let found = variants(&query(&prometheus, name).await);
                assert!(found.len() >= 2, "{name} has data for {found:?}");
            }
            rule_count += 1;
        }
    }
    assert_eq!(rule_count, 15);

    // A treatment that fails and is slow raises the error and latency flags
    // (pending: their `for` is minutes), and nothing else.
    let alerts = api(&prometheus, "/api/v1/alerts").await;
    let mut raised: Vec<String> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
        .collect();
    raised.sort();
    raised.dedup();
    for expected in [
        "AbgateTreatmentErrorRateAboveControl",
        "AbgateTreatmentLatencyP95Regression",
    ] {
        assert!(
            raised.contains(&expected.to_owned()),
            "{expected} not raised: {raised:?}"
        );
    }
    assert!(
        !raised.contains(&"AbgateTreatmentResponseLengthShift".to_owned()),
        "{raised:?}"
    );

    // A burst, so that the fleet has enough per arm for the sequential
    // tests at the default alpha, then a scrape or two to record it.
    traffic(&url, "prom-user-", 40, 800, 16).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // A second replica of the same experiment, serving nothing itself,
    // guards on the fleet's numbers from Prometheus and rolls back on them.
    let replica = gateway(&config_toml(
        &control.url(),
        &treatment.url(),
        0.5,
        &format!(
            "[guardrails]\nsource = \"prometheus\"\nprometheus_url = \"{prometheus}\"\ninterval_seconds = 0.5\nwindow_seconds = 120\nconsecutive_breaches = 2\nmin_requests_per_arm = 20"
        ),
    ))
    .await;
    let replica_admin = replica.admin_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let report = loop {
        let report = admin_get(replica_admin, "/admin/report").await;
        if report["treatment_fraction"] == 0.0 {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "no fleet-wide rollback: {report:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        report["guardrails"]["last_evaluation"]["source"],
        "prometheus"
    );
    // It trips on what the treatment really does wrong (errors, latency),
    // never on what it does not (length, feedback).
    let tripped = report["last_trip"]["checks"].as_array().unwrap();
    assert!(!tripped.is_empty(), "{report:#}");
    for check in tripped {
        assert!(
            ["error_rate", "latency_p95", "ttft_p95"].contains(&check.as_str().unwrap()),
            "{check} tripped: {report:#}"
        );
    }
    let fleet_treatment = report["guardrails"]["last_evaluation"]["treatment"]["requests"]
        .as_f64()
        .unwrap();
    assert!(fleet_treatment >= 20.0, "{report:#}");

    server.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Value {
    admin_call(admin, "GET", path, None, "").await.json()
}
