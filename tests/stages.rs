//! Stages: promotion only when a stage is ready (time, requests per arm, a
//! sound split, no breaching guardrail) unless forced; automatic promotion
//! that pauses and resumes; changes that wait for an instant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;

async fn started(
    fraction: f64,
    extra: &str,
) -> (
    (abgate_mock::MockHandle, abgate_mock::MockHandle),
    abgate::app::Running,
) {
    let (control, treatment) = mocks().await;
    let toml = config_toml(
        &control.url(),
        &treatment.url(),
        fraction,
        &format!("[admin]\ntoken_env = \"T\"\n{extra}"),
    );
    let gw = gateway_with_env(&toml, token_env()).await;
    ((control, treatment), gw)
}

async fn get(gw: &abgate::app::Running, path: &str) -> serde_json::Value {
    admin_call(gw.admin_addr.unwrap(), "GET", path, None, "")
        .await
        .json()
}

async fn post_admin(
    gw: &abgate::app::Running,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    admin_call(gw.admin_addr.unwrap(), "POST", path, token, body).await
}

/// User IDs `{prefix}N` that land in `variant` at `fraction`.
fn users_in(
    prefix: &str,
    variant: abgate::experiment::assign::Variant,
    fraction: f64,
    count: usize,
) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| abgate::experiment::assign::assign(id.as_bytes(), None, fraction) == variant)
        .take(count)
        .collect()
}

#[tokio::test]
async fn promotion_needs_the_token_and_a_ready_stage() {
    let (_mocks, gw) = started(0.05, "[rollout]\nmin_stage_seconds = 0\nmin_requests_per_arm = 20\n[guardrails]\nenabled = false").await;
    assert_eq!(
        post_admin(&gw, "/admin/promote", None, "{}").await.status,
        401
    );
    assert_eq!(
        post_admin(&gw, "/admin/pause", Some("wrong-token-wrong-token"), "{}")
            .await
            .status,
        401
    );

    // Too few requests in the treatment arm: refused, with every reason.
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 409, "{}", answer.text());
    assert_eq!(answer.json()["error"]["code"], "promotion_blocked");
    let blocked = answer.json()["blocked_by"].clone();
    assert!(
        blocked.as_array().unwrap().iter().any(|b| b
            .as_str()
            .unwrap()
            .starts_with("treatment has served 0 of the 20")),
        "{blocked}"
    );
    assert_eq!(get(&gw, "/admin/rollout").await["treatment_fraction"], 0.05);

    traffic(&gw.url(), "user-", 2000, 800, 8).await;
    let answer = post_admin(
        &gw,
        "/admin/promote",
        Some(TOKEN),
        r#"{"reason":"stage 1 clean"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let state = answer.json();
    assert_eq!(
        (
            state["treatment_fraction"].as_f64(),
            state["stage"].as_u64()
        ),
        (Some(0.25), Some(2))
    );
    assert_eq!(
        (state["source"].as_str(), state["reason"].as_str()),
        (Some("api"), Some("stage 1 clean"))
    );
    // A new stage starts its counts over.
    let report = get(&gw, "/admin/report").await;
    assert_eq!(report["stage"]["requests"]["treatment"], 0, "{report:#}");
    assert_eq!(report["stage"]["next"], 0.5);
}

#[tokio::test]
async fn a_broken_split_blocks_promotion_until_forced() {
    let (_mocks, gw) = started(0.5, "[rollout]\nstages = [0.5, 1.0]\nmin_stage_seconds = 0\nmin_requests_per_arm = 10\n[guardrails]\nenabled = false").await;
    // Control users send 20 times what treatment users send: not a 50/50 split.
    let control_users = users_in("c-", abgate::experiment::assign::Variant::Control, 0.5, 200);
    let treatment_users = users_in(
        "t-",
        abgate::experiment::assign::Variant::Treatment,
        0.5,
        20,
    );
    for user in control_users.iter().chain(&treatment_users) {
        assert!(chat(&gw.url(), user).await.status.is_success());
    }
    let report = get(&gw, "/admin/report").await;
    let split = &report["sample_ratio"];
    eprintln!("200 control users, 20 treatment users: {split}");
    assert_eq!(split["mismatch"], true, "{report:#}");
    assert_eq!(
        (split["control"].as_u64(), split["treatment"].as_u64()),
        (Some(200), Some(20))
    );
    assert_eq!(
        (
            split["users"]["control"].as_u64(),
            split["users"]["treatment"].as_u64()
        ),
        (Some(200), Some(20))
    );
    assert_eq!(split["capped"], false);
    assert!(split["p_value"].as_f64().unwrap() < 0.001, "{split}");
    assert!(split["method"].as_str().unwrap().contains("distinct users"));
    assert!(split.get("chi_square").is_none() && split.get("dispersion").is_none());
    let metrics = admin_call(gw.admin_addr.unwrap(), "GET", "/metrics", None, "")
        .await
        .text();
    assert!(metrics.contains(r#"abgate_sample_ratio_mismatch{experiment="test-exp"} 1"#));

    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 409);
    assert!(
        answer
            .text()
            .contains("sample ratio mismatch: 200 control / 20 treatment users"),
        "{}",
        answer.text()
    );
    assert!(answer.text().contains("always-valid p = "));
    let answer = post_admin(
        &gw,
        "/admin/promote",
        Some(TOKEN),
        r#"{"reason":"known bot traffic","force":true}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let state = answer.json();
    assert_eq!(state["treatment_fraction"], 1.0);
    assert!(state["reason"]
        .as_str()
        .unwrap()
        .contains("forced past: sample ratio mismatch"));
    // No stage after the last, forced or not.
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), r#"{"force":true}"#).await;
    assert_eq!(answer.status, 409);
    assert!(answer.text().contains("already the last stage"));
}

/// Sends each `(user, requests)` pair's requests, 8 at a time; all must
/// be answered.
async fn requests_from(gw: &abgate::app::Running, users: Vec<(String, usize)>) {
    let queue: Vec<String> = users
        .into_iter()
        .flat_map(|(user, requests)| std::iter::repeat(user).take(requests))
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (base, queue) = (gw.url(), queue.clone());
        workers.spawn(async move {
            loop {
                let Some(user) = queue.lock().unwrap().pop() else {
                    return;
                };
                let answer = chat(&base, &user).await;
                assert!(answer.status.is_success(), "{user}: {}", answer.status);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_user_does_not_make_a_healthy_split_look_broken() {
    let (_mocks, gw) = started(0.5, "[rollout]\nstages = [0.5, 1.0]\nmin_stage_seconds = 0\nmin_requests_per_arm = 10\n[guardrails]\nenabled = false").await;
    // 300 users in each arm send three requests each, and one control user
    // sends 200: a tenth of the 2,000 requests, all in one arm.
    let control = users_in(
        "hc-",
        abgate::experiment::assign::Variant::Control,
        0.5,
        301,
    );
    let treatment = users_in(
        "ht-",
        abgate::experiment::assign::Variant::Treatment,
        0.5,
        300,
    );
    let mut users: Vec<(String, usize)> = control[1..]
        .iter()
        .chain(&treatment)
        .map(|user| (user.clone(), 3))
        .collect();
    users.push((control[0].clone(), 200));
    requests_from(&gw, users).await;

    let report = get(&gw, "/admin/report").await;
    let split = &report["sample_ratio"];
    eprintln!("one heavy user: {split}");
    // By requests the arms are 1,100 to 900, which a test of requests would
    // flag; by users they are even.
    assert_eq!(
        (split["control"].as_u64(), split["treatment"].as_u64()),
        (Some(1100), Some(900)),
        "{split}"
    );
    assert_eq!(
        (
            split["users"]["control"].as_u64(),
            split["users"]["treatment"].as_u64()
        ),
        (Some(301), Some(300))
    );
    assert_eq!(split["mismatch"], false, "{split}");
    assert!(split["p_value"].as_f64().unwrap() > 0.1, "{split}");
    let metrics = admin_call(gw.admin_addr.unwrap(), "GET", "/metrics", None, "")
        .await
        .text();
    assert!(metrics.contains(r#"abgate_sample_ratio_mismatch{experiment="test-exp"} 0"#));
    // Nothing stands in the way of the next stage.
    assert_eq!(
        report["stage"]["blocked_by"],
        serde_json::json!([]),
        "{report:#}"
    );
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_that_loses_treatment_users_is_flagged() {
    let (_mocks, gw) = started(0.5, "[rollout]\nstages = [0.5, 1.0]\nmin_stage_seconds = 0\nmin_requests_per_arm = 10\n[guardrails]\nenabled = false").await;
    // 400 users in each arm, two requests each, but only every other
    // treatment user's requests arrive (a client that drops them, say).
    let control = users_in(
        "lc-",
        abgate::experiment::assign::Variant::Control,
        0.5,
        400,
    );
    let treatment = users_in(
        "lt-",
        abgate::experiment::assign::Variant::Treatment,
        0.5,
        400,
    );
    let users: Vec<(String, usize)> = control
        .iter()
        .chain(treatment.iter().step_by(2))
        .map(|user| (user.clone(), 2))
        .collect();
    requests_from(&gw, users).await;

    let split = get(&gw, "/admin/stats").await["sample_ratio"].clone();
    eprintln!("half of treatment's users lost: {split}");
    assert_eq!(
        (
            split["users"]["control"].as_u64(),
            split["users"]["treatment"].as_u64()
        ),
        (Some(400), Some(200))
    );
    assert_eq!(
        (split["control"].as_u64(), split["treatment"].as_u64()),
        (Some(800), Some(400))
    );
    assert_eq!(split["mismatch"], true, "{split}");
    assert!(split["p_value"].as_f64().unwrap() < 0.001, "{split}");
    let metrics = admin_call(gw.admin_addr.unwrap(), "GET", "/metrics", None, "")
        .await
        .text();
    assert!(metrics.contains(r#"abgate_sample_ratio_mismatch{experiment="test-exp"} 1"#));

    // The missing users turning up later does not clear it: the p-value is
    // the least over the stage's looks, so the mismatch holds the stage.
    let late: Vec<(String, usize)> = treatment
        .iter()
        .skip(1)
        .step_by(2)
        .map(|user| (user.clone(), 1))
        .collect();
    requests_from(&gw, late).await;
    let report = get(&gw, "/admin/report").await;
    assert_eq!(report["sample_ratio"]["users"]["treatment"], 400);
    assert_eq!(report["sample_ratio"]["mismatch"], true, "{report:#}");
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 409);
    assert!(
        answer
            .text()
            .contains("sample ratio mismatch: 400 control / 400 treatment users"),
        "{}",
        answer.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_promotion_walks_the_stages_and_pauses_on_request() {
    // One check with a wide margin, so that 30 requests an arm show
    // non-inferiority.
    let extra = "[rollout]\nstages = [0.25, 0.5, 1.0]\nmin_stage_seconds = 0.3\nmin_requests_per_arm = 30\nauto_promote = true\n[guardrails]\ninterval_seconds = 0.1\nmin_requests_per_arm = 30\nchecks = [\"error_rate\"]\nalpha = 0.2\nmax_error_rate_increase = 0.5";
    let (_mocks, gw) = started(0.25, extra).await;
    // Batches of 20 requests: after a promotion, the rest of a batch cannot
    // make the next stage ready too (30 requests per arm) before it is seen.
    // Paced, so that the stage's minimum time passes however fast the
    // requests are answered.
    let mut promoted = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        traffic(&gw.url(), "user-", 1000, 20, 4).await;
        let state = get(&gw, "/admin/rollout").await;
        if state["treatment_fraction"] != 0.25 {
            promoted = Some(state);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(promoted) = promoted else {
        panic!(
            "auto promotion to 0.5: {:#}",
            get(&gw, "/admin/report").await
        );
    };
    assert_eq!(promoted["treatment_fraction"], 0.5, "{promoted:#}");
    assert_eq!(promoted["source"], "schedule");

    let answer = post_admin(&gw, "/admin/pause", Some(TOKEN), r#"{"reason":"holiday"}"#).await;
    assert_eq!(answer.json()["paused"]["reason"], "holiday");
    traffic(&gw.url(), "user-", 1000, 400, 8).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let report = get(&gw, "/admin/report").await;
    assert_eq!(report["treatment_fraction"], 0.5, "paused: {report:#}");
    assert_eq!(report["stage"]["promotable"], true, "{report:#}");

    post_admin(&gw, "/admin/resume", Some(TOKEN), "").await;
    eventually(Duration::from_secs(5), || async {
        (get(&gw, "/admin/rollout").await["treatment_fraction"] == 1.0).then_some(())
    })
    .await
    .expect("auto promotion to 1.0 after resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_waits_for_shown_non_inferiority_and_feedback() {
    let extra = "[rollout]\nstages = [0.5, 1.0]\nmin_stage_seconds = 0\nmin_requests_per_arm = 20\n[guardrails]\ninterval_seconds = 0.1\nchecks = [\"error_rate\", \"completion_rate\"]\nmin_requests_per_arm = 100\nmin_feedback_per_arm = 50\nalpha = 0.05\nmax_error_rate_increase = 0.05\nmax_completion_rate_decrease = 0.2";
    let (_mocks, gw) = started(0.5, extra).await;
    let mut ids = Vec::new();
    for i in 0..400 {
        let answer = chat(&gw.url(), &format!("user-{i}")).await;
        assert!(answer.status.is_success());
        ids.push(answer.header("x-abgate-request-id").to_owned());
    }
    // Requests alone show the error rate within its margin; the completion
    // check has no reports, which blocks promotion.
    let blocked = eventually(Duration::from_secs(5), || async {
        let report = get(&gw, "/admin/report").await;
        let checks = report["guardrails"]["last_evaluation"]["checks"].clone();
        let error_rate = checks
            .as_array()?
            .iter()
            .find(|c| c["check"] == "error_rate")?
            .clone();
        (error_rate["decision"] == "non_inferior").then_some(report)
    })
    .await
    .expect("the error rate is shown within 5 points");
    assert_eq!(blocked["stage"]["promotable"], false, "{blocked:#}");
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 409, "{}", answer.text());
    let reasons = answer.json()["blocked_by"].clone();
    assert!(
        reasons.as_array().unwrap().iter().any(|b| {
            let b = b.as_str().unwrap();
            b.starts_with("guardrail completion_rate has too little data")
                && b.contains("needs 50 feedback reports per arm, has 0 treatment")
                && b.contains("require_feedback = false")
        }),
        "{reasons:#}"
    );
    assert!(!reasons.to_string().contains("error_rate"), "{reasons:#}");

    // Every answer completed its task, in both arms: now it may go on.
    for id in &ids {
        let body = format!(r#"{{"request_id":"{id}","outcome":"completed"}}"#);
        assert_eq!(
            post(&gw.url(), "/v1/feedback", &[], &body).await.status,
            200
        );
    }
    let ready = eventually(Duration::from_secs(5), || async {
        let report = get(&gw, "/admin/report").await;
        (report["stage"]["promotable"] == true).then_some(report)
    })
    .await;
    assert!(ready.is_some(), "{:#}", get(&gw, "/admin/report").await);
    let answer = post_admin(&gw, "/admin/promote", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["treatment_fraction"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_feedback_required_requests_alone_can_promote() {
    let extra = "[rollout]\nstages = [0.5, 1.0]\nmin_stage_seconds = 0\nmin_requests_per_arm = 20\nrequire_feedback = false\n[guardrails]\ninterval_seconds = 0.1\nchecks = [\"error_rate\", \"rating\"]\nmin_requests_per_arm = 100\nalpha = 0.05\nmax_error_rate_increase = 0.05";
    let (_mocks, gw) = started(0.5, extra).await;
    traffic(&gw.url(), "user-", 400, 400, 8).await;
    let ready = eventually(Duration::from_secs(5), || async {
        let report = get(&gw, "/admin/report").await;
        (report["stage"]["promotable"] == true).then_some(report)
    })
    .await
    .expect("promotable without feedback");
    let checks = ready["guardrails"]["last_evaluation"]["checks"].clone();
    assert_eq!(checks[1]["check"], "rating");
    assert_eq!(checks[1]["decision"], "insufficient_data");
}

fn in_a_second() -> String {
    abgate::config::clock::format_rfc3339(SystemTime::now() + Duration::from_millis(1200))
}

#[tokio::test]
async fn a_change_with_effective_at_waits_for_its_instant() {
    let (_mocks, gw) = started(0.1, "").await;
    let admin = gw.admin_addr.unwrap();
    let at = in_a_second();
    let body =
        format!(r#"{{"treatment_fraction":0.25,"reason":"fleet step","effective_at":"{at}"}}"#);
    let answer = admin_call(admin, "PUT", "/admin/rollout", Some(TOKEN), &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let state = answer.json();
    assert_eq!(state["treatment_fraction"], 0.1);
    assert_eq!(state["pending"]["effective_at"], at);
    let applied = eventually(Duration::from_secs(5), || async {
        let state = get(&gw, "/admin/rollout").await;
        (state["treatment_fraction"] == 0.25).then_some(state)
    })
    .await
    .expect("applied at its instant");
    assert!(SystemTime::now() >= abgate::config::clock::parse_rfc3339(&at).unwrap());
    assert_eq!(applied["pending"], serde_json::Value::Null);
    assert!(applied["reason"]
        .as_str()
        .unwrap()
        .starts_with("fleet step (effective at"));

    // A rollback cancels a change still waiting.
    let body = format!(
        r#"{{"treatment_fraction":0.5,"effective_at":"{}"}}"#,
        in_a_second()
    );
    admin_call(admin, "PUT", "/admin/rollout", Some(TOKEN), &body).await;
    let state = post_admin(&gw, "/admin/rollback", Some(TOKEN), "")
        .await
        .json();
    assert_eq!(
        (state["treatment_fraction"].as_f64(), &state["pending"]),
        (Some(0.0), &serde_json::Value::Null)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&gw, "/admin/rollout").await["treatment_fraction"], 0.0);

    let answer = admin_call(
        admin,
        "PUT",
        "/admin/rollout",
        Some(TOKEN),
        r#"{"treatment_fraction":0.5,"effective_at":"soon"}"#,
    )
    .await;
    assert_eq!(answer.status, 400);
    assert!(answer.text().contains("not an RFC 3339 time"));
}

#[tokio::test]
async fn scheduled_entries_in_the_file_switch_at_their_instant() {
    let at = in_a_second();
    let (_mocks, gw) = started(
        0.05,
        &format!("[[rollout.scheduled]]\nat = \"{at}\"\ntreatment_fraction = 0.25"),
    )
    .await;
    assert_eq!(get(&gw, "/admin/rollout").await["treatment_fraction"], 0.05);
    let state = eventually(Duration::from_secs(5), || async {
        let state = get(&gw, "/admin/rollout").await;
        (state["treatment_fraction"] == 0.25).then_some(state)
    })
    .await
    .expect("the scheduled entry applies");
    assert!(SystemTime::now() >= abgate::config::clock::parse_rfc3339(&at).unwrap());
    assert_eq!(
        (state["source"].as_str(), state["config_fraction"].as_f64()),
        (Some("schedule"), Some(0.25))
    );
}
