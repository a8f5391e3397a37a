//! Changing the split through the admin API: only with the token, applied at
//! once, persisted beside the config so a rollback survives a restart, and
//! superseded by a later edit of the config file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// Two mocks and a gateway at `fraction` whose admin token is [`TOKEN`].
async fn gateway_with_token(
    fraction: f64,
) -> (
    (abgate_mock::MockHandle, abgate_mock::MockHandle),
    abgate::app::Running,
) {
    let (control, treatment) = mocks().await;
    let toml = config_toml(
        &control.url(),
        &treatment.url(),
        fraction,
        "[admin]\ntoken_env = \"T\"",
    );
    let gw = gateway_with_env(&toml, BTreeMap::from([("T".to_owned(), TOKEN.to_owned())])).await;
    ((control, treatment), gw)
}

async fn rollout(admin: std::net::SocketAddr) -> serde_json::Value {
    admin_call(admin, "GET", "/admin/rollout", None, "")
        .await
        .json()
}

#[tokio::test]
async fn without_a_configured_token_nothing_changes() {
    let (control, treatment) = mocks().await;
    let toml = config_toml(
        &control.url(),
        &treatment.url(),
        0.1,
        "[admin]\ntoken_env = \"NO_SUCH_TOKEN_VAR\"",
    );
    let gw = gateway(&toml).await;
    let admin = gw.admin_addr.unwrap();
    let answer = admin_call(admin, "POST", "/admin/rollback", Some("anything"), "{}").await;
    assert_eq!(answer.status, 403);
    assert!(answer.text().contains("NO_SUCH_TOKEN_VAR"));
    // The proxy's error shape: a string code, Anthropic's top-level type.
    assert_eq!(answer.json()["type"], "error");
    assert_eq!(answer.json()["error"]["code"], "forbidden");
    assert_eq!(answer.json()["error"]["type"], "permission_error");
    assert_eq!(rollout(admin).await["treatment_fraction"], 0.1);
}

#[tokio::test]
async fn the_token_is_required_and_changes_apply_at_once() {
    let (_mocks, gw) = gateway_with_token(0.1).await;
    let admin = gw.admin_addr.unwrap();
    let set = r#"{"treatment_fraction": 1.0, "reason": "full rollout"}"#;
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let answer = admin_call(admin, "PUT", "/admin/rollout", token, set).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json()["error"]["code"], "unauthorized");
    }
    assert_eq!(rollout(admin).await["treatment_fraction"], 0.1);

    for bad in [
        r#"{"treatment_fraction": 1.5}"#,
        r#"{"fraction": 0.5}"#,
        "not json",
    ] {
        assert_eq!(
            admin_call(admin, "PUT", "/admin/rollout", Some(TOKEN), bad)
                .await
                .status,
            400,
            "{bad}"
        );
    }

    let answer = admin_call(admin, "PUT", "/admin/rollout", Some(TOKEN), set).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let state = answer.json();
    assert_eq!(
        (
            state["treatment_fraction"].as_f64(),
            state["source"].as_str()
        ),
        (Some(1.0), Some("api"))
    );
    assert_eq!(state["reason"], "full rollout");
    assert_eq!(
        state["persisted"], false,
        "no config file, nothing to persist beside"
    );
    for i in 0..10 {
        assert_eq!(
            chat(&gw.url(), &format!("user-{i}"))
                .await
                .header("x-abgate-variant"),
            "treatment"
        );
    }

    let answer = admin_call(
        admin,
        "POST",
        "/admin/rollback",
        Some(TOKEN),
        r#"{"reason":"error rate"}"#,
    )
    .await;
    assert_eq!(answer.json()["treatment_fraction"], 0.0);
    for i in 0..10 {
        assert_eq!(
            chat(&gw.url(), &format!("user-{i}"))
                .await
                .header("x-abgate-variant"),
            "control"
        );
    }
    let metrics = admin_call(admin, "GET", "/metrics", None, "").await.text();
    assert!(
        metrics.contains("abgate_treatment_fraction{experiment=\"test-exp\"} 0\n"),
        "the gauge follows"
    );
}

#[tokio::test]
async fn a_rollback_survives_a_restart_until_the_config_file_changes() {
    // config::load reads the process environment for the token.
    std::env::set_var("ABGATE_TEST_ROLLOUT_TOKEN", TOKEN);
    let (control, treatment) = mocks().await;
    let dir = fresh_dir("rollout");
    let path = dir.join("abgate.toml");
    let extra = "[admin]\ntoken_env = \"ABGATE_TEST_ROLLOUT_TOKEN\"";
    std::fs::write(
        &path,
        config_toml(&control.url(), &treatment.url(), 0.1, extra),
    )
    .unwrap();

    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let answer = admin_call(
        gw.admin_addr.unwrap(),
        "POST",
        "/admin/rollback",
        Some(TOKEN),
        r#"{"reason":"hallucinations"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["persisted"], true);
    gw.shutdown().await;

    // Restarted with the file still saying 10%: the rollback holds.
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let admin = gw.admin_addr.unwrap();
    let state = rollout(admin).await;
    assert_eq!(state["treatment_fraction"], 0.0, "{state}");
    assert_eq!(state["config_fraction"], 0.1);
    assert_eq!(state["source"], "api");
    assert_eq!(state["reason"], "hallucinations");

    // An edit of the file is the newer intention and wins.
    let edited = config_toml(&control.url(), &treatment.url(), 0.2, extra);
    let aside = dir.join("abgate.toml.new");
    std::fs::write(&aside, edited).unwrap();
    std::fs::rename(&aside, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rollout(admin).await["treatment_fraction"] != 0.2 {
        assert!(Instant::now() < deadline, "the edit did not win within 5 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(rollout(admin).await["source"], "config");
    assert!(!dir.join("abgate.state.json").exists());

    let audit: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("abgate.audit.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(
        (
            audit[0]["source"].as_str(),
            audit[0]["old"].as_f64(),
            audit[0]["new"].as_f64()
        ),
        (Some("api"), Some(0.1), Some(0.0))
    );
    assert_eq!(audit[0]["reason"], "hallucinations");
    assert_eq!(
        (audit[1]["source"].as_str(), audit[1]["new"].as_f64()),
        (Some("config"), Some(0.2))
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_rollout_cli_sets_rolls_back_and_shows_status() {
    let (_mocks, gw) = gateway_with_token(0.1).await;
    let admin_url = format!("http://{}", gw.admin_addr.unwrap());
    let cli = |args: &[&str], token: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_abgate"));
        command.arg("rollout").args(args).args([
            "--admin-url",
            &admin_url,
            "--token-env",
            "CLI_TOKEN",
        ]);
        command.env_remove("CLI_TOKEN").env("ABGATE_LOG", "error");
        if let Some(token) = token {
            command.env("CLI_TOKEN", token);
        }
        async move { bounded(command.output()).await.unwrap() }
    };

    let output = cli(&["set", "0.5", "--reason", "stage 3"], Some(TOKEN)).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (
            state["treatment_fraction"].as_f64(),
            state["reason"].as_str()
        ),
        (Some(0.5), Some("stage 3"))
    );

    let output = cli(&["rollback"], Some("wrong-token-wrong-token")).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
    let output = cli(&["rollback"], None).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains("set CLI_TOKEN"));

    let output = cli(&["rollback", "--reason", "latency"], Some(TOKEN)).await;
    assert!(output.status.success());
    let output = cli(&["status"], None).await;
    assert!(output.status.success());
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (
            state["treatment_fraction"].as_f64(),
            state["source"].as_str()
        ),
        (Some(0.0), Some("api"))
    );
    assert_eq!(state["reason"], "latency");

    // From 0 the first stage needs no evidence; pause and resume are audited.
    let output = cli(&["promote", "--reason", "start"], Some(TOKEN)).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (
            state["treatment_fraction"].as_f64(),
            state["stage"].as_u64()
        ),
        (Some(0.05), Some(1))
    );
    let output = cli(&["promote"], Some(TOKEN)).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("min_stage_seconds"),
        "{stderr}"
    );
    let output = cli(&["pause", "--reason", "weekend"], Some(TOKEN)).await;
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(state["paused"]["reason"], "weekend");
    let output = cli(&["resume"], Some(TOKEN)).await;
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(state["paused"], serde_json::Value::Null);
    let output = cli(&["report", "--json"], None).await;
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["stage"]["current"], 1);
    assert_eq!(report["stage"]["promotable"], false);
    // Without --json, a table a person reads.
    let output = cli(&["report"], None).await;
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("(stage 1 of "), "{table}");
    assert!(table.contains("promotable: no\n  - "), "{table}");
    assert!(
        table.contains("check ") && table.contains(" decision "),
        "{table}"
    );
}
