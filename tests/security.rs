//! Who may use the gateway: gateway keys on the proxy port, the admin
//! token for the config view and for forced variants, and how user IDs
//! appear in events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use abgate::config::Config;
use common::*;

const KEY_A: &str = "gw-key-alpha-0123456789";
const KEY_B: &str = "gw-key-bravo-0123456789";
const UPSTREAM_KEY: &str = "sk-upstream-9876543210";

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = token_env();
    for (name, value) in pairs {
        env.insert((*name).to_owned(), (*value).to_owned());
    }
    env
}

fn auth_section() -> &'static str {
    "[admin]\ntoken_env = \"T\"\n[auth]\napi_keys_env = \"GW_KEYS\""
}

#[tokio::test]
async fn the_proxy_port_needs_a_gateway_key_which_never_reaches_the_upstream() {
    let (control, treatment) = mocks().await;
    // Control injects its own key; treatment has none (a self-hosted model).
    let toml = with_api_key_env(
        &config_toml(&control.url(), &treatment.url(), 0.5, auth_section()),
        &["control"],
        "UP",
    );
    let gw = gateway_with_env(
        &toml,
        env(&[
            ("GW_KEYS", &format!("{KEY_A},\n{KEY_B}\n")),
            ("UP", UPSTREAM_KEY),
        ]),
    )
    .await;
    let url = gw.url();
    let admin = gw.admin_addr.unwrap();

    let missing = chat(&url, "u1").await;
    assert_error(&missing, 401, "missing_api_key", "Authorization: Bearer");
    assert_eq!(missing.json()["error"]["type"], "invalid_request_error");
    let wrong = post(
        &url,
        "/v1/chat/completions",
        &[
            ("x-user-id", "u1"),
            ("authorization", "Bearer gw-key-wrong-0123456789"),
        ],
        CHAT,
    )
    .await;
    assert_error(
        &wrong,
        401,
        "invalid_api_key",
        "not one of the gateway's keys",
    );
    assert!(!wrong.text().contains("gw-key-wrong"));
    assert_eq!(control.request_count() + treatment.request_count(), 0);

    // Both SDK styles get in; find users in each arm.
    for user in 0..40 {
        let user = format!("user-{user}");
        let bearer = format!("Bearer {KEY_A}");
        let headers: [(&str, &str); 2] = if user.ends_with(['0', '2', '4', '6', '8']) {
            [("x-user-id", &user), ("authorization", &bearer)]
        } else {
            [("x-user-id", &user), ("x-api-key", KEY_B)]
        };
        let answer = post(&url, "/v1/chat/completions", &headers, CHAT).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let (to_control, to_treatment) = (control.requests(), treatment.requests());
    assert!(!to_control.is_empty() && !to_treatment.is_empty());
    for request in to_control.iter().chain(&to_treatment) {
        for (name, value) in &request.headers {
            let value = value.to_str().unwrap_or("");
            assert!(
                !value.contains(KEY_A) && !value.contains(KEY_B),
                "the gateway key reached the upstream in {name}"
            );
        }
        assert!(request.headers.get("x-api-key").is_none());
    }
    for request in &to_control {
        assert_eq!(
            request.headers["authorization"],
            format!("Bearer {UPSTREAM_KEY}")
        );
    }
    for request in &to_treatment {
        assert!(request.headers.get("authorization").is_none());
    }

    // Feedback on the proxy port needs the key too.
    let feedback = post(
        &url,
        "/v1/feedback",
        &[],
        r#"{"request_id":"x","outcome":"completed"}"#,
    )
    .await;
    assert_eq!(feedback.status, 401, "{}", feedback.text());
    assert_eq!(feedback.json()["error"]["code"], "missing_api_key");

    let text = metrics_until(admin, |text| {
        sample(
            text,
            r#"abgate_auth_failures_total{kind="missing_api_key"}"#,
        ) == Some(2.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            r#"abgate_auth_failures_total{kind="invalid_api_key"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn keys_named_but_missing_or_empty_refuse_to_start() {
    let toml = config_toml(
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        0.1,
        auth_section(),
    );
    let config = Config::parse(&toml).unwrap();
    for (keys, says) in [
        (None, "is not set"),
        (Some(""), "holds no key"),
        (Some(" ,\n"), "holds no key"),
        (Some("too-short"), "shorter than 16"),
    ] {
        let env = match keys {
            Some(keys) => env(&[("GW_KEYS", keys)]),
            None => token_env(),
        };
        let err = config.validate(&env, Path::new(".")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("auth.api_keys_env: "), "{text}");
        assert!(text.contains(says), "{text}");
    }
}

#[tokio::test]
async fn the_config_view_needs_the_token_and_redacts_every_secret() {
    let (control, treatment) = mocks().await;
    let extra = format!(
        "{}\n[feedback]\nkey_env = \"SIGN\"\n[guardrails]\nsource = \"prometheus\"\nprometheus_url = \"http://scraper:hunter2-password@prom:9090\"",
        auth_section()
    );
    let toml = with_api_key_env(
        &config_toml(&control.url(), &treatment.url(), 0.2, &extra),
        &["treatment"],
        "UP",
    );
    let gw = gateway_with_env(
        &toml,
        env(&[
            ("GW_KEYS", &format!("{KEY_A},{KEY_B}")),
            ("UP", UPSTREAM_KEY),
            ("SIGN", "request-id-signing-key-0123"),
        ]),
    )
    .await;
    let admin = gw.admin_addr.unwrap();

    let anonymous = admin_call(admin, "GET", "/admin/config", None, "").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let wrong = admin_call(admin, "GET", "/admin/config", Some(KEY_A), "").await;
    assert_eq!(wrong.status, 401);

    let view = admin_call(admin, "GET", "/admin/config", Some(TOKEN), "").await;
    assert_eq!(view.status, 200, "{}", view.text());
    let text = view.text();
    for secret in [
        TOKEN,
        KEY_A,
        KEY_B,
        UPSTREAM_KEY,
        "request-id-signing-key",
        "hunter2",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let json = view.json();
    assert_eq!(json["config"]["variants"]["treatment"]["api_key_env"], "UP");
    assert_eq!(json["config"]["auth"]["api_keys_env"], "GW_KEYS");
    assert_eq!(
        json["config"]["guardrails"]["prometheus_url"],
        "http://<redacted>@prom:9090"
    );
    let secrets = &json["secrets"];
    assert_eq!(secrets["admin.token_env"]["env"], "T");
    assert_eq!(secrets["admin.token_env"]["value"], "<redacted>");
    assert_eq!(
        secrets["auth.api_keys_env"]["value"],
        serde_json::json!(["<redacted>", "<redacted>"])
    );
    assert_eq!(secrets["feedback.key_env"]["set"], true);
    assert_eq!(
        secrets["variants.treatment.api_key_env"]["value"],
        "<redacted>"
    );
    assert!(secrets.get("variants.control.api_key_env").is_none());
    assert_eq!(json["treatment_fraction_in_force"], 0.2);
}

#[tokio::test]
async fn without_a_token_the_config_view_is_refused() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.2, "")).await;
    let answer = admin_call(gw.admin_addr.unwrap(), "GET", "/admin/config", None, "").await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert!(answer.text().contains("ABGATE_ADMIN_TOKEN"));
}

/// A chat from `user` asking for `arm`, with `token` as the admin token.
async fn forced_chat(url: &str, user: &str, arm: &str, token: Option<&str>) -> Answer {
    let mut headers = vec![("x-user-id", user), ("x-abgate-force-variant", arm)];
    if let Some(token) = token {
        headers.push(("x-abgate-admin-token", token));
    }
    post(url, "/v1/chat/completions", &headers, CHAT).await
}

#[tokio::test]
async fn forcing_an_arm_needs_qa_override_and_the_token() {
    let (control, treatment) = mocks().await;
    let off = gateway_with_env(
        &config_toml(
            &control.url(),
            &treatment.url(),
            0.0,
            "[admin]\ntoken_env = \"T\"",
        ),
        token_env(),
    )
    .await;
    let refused = forced_chat(&off.url(), "u1", "treatment", Some(TOKEN)).await;
    assert_error(
        &refused,
        403,
        "forced_variant_refused",
        "[qa] override is off",
    );
    assert_eq!(refused.json()["error"]["param"], "x-abgate-force-variant");

    let on = gateway_with_env(
        &config_toml(
            &control.url(),
            &treatment.url(),
            0.0,
            "[admin]\ntoken_env = \"T\"\n[qa]\noverride = true",
        ),
        token_env(),
    )
    .await;
    let url = on.url();
    let admin = on.admin_addr.unwrap();
    for token in [None, Some("not-the-admin-token-000")] {
        let refused = forced_chat(&url, "u1", "treatment", token).await;
        assert_error(
            &refused,
            403,
            "forced_variant_refused",
            "x-abgate-admin-token",
        );
    }
    let bad = forced_chat(&url, "u1", "both", Some(TOKEN)).await;
    assert_error(&bad, 400, "invalid_forced_variant", "control or treatment");
    assert_eq!(control.request_count() + treatment.request_count(), 0);

    // At a fraction of 0 only a forced request reaches treatment.
    let forced = forced_chat(&url, "qa-user", "treatment", Some(TOKEN)).await;
    assert_eq!(forced.status, 200, "{}", forced.text());
    assert_eq!(forced.header("x-abgate-variant"), "treatment");
    assert_eq!(forced.header("x-abgate-forced"), "true");
    assert!(forced.header("x-abgate-request-id").starts_with("abg2_u_"));
    let plain = chat(&url, "qa-user").await;
    assert_eq!(plain.header("x-abgate-variant"), "control");
    assert_eq!(plain.header("x-abgate-forced"), "");

    // The QA headers stay at the gateway.
    let upstream = treatment.requests();
    assert_eq!(upstream.len(), 1);
    assert!(upstream[0]
        .headers
        .keys()
        .all(|name| !name.as_str().starts_with("x-abgate-")));

    // Counted apart: the arms' numbers and the split's counts hold only
    // the hashed request.
    let text = metrics_until(admin, |text| {
        sample(
            text,
            r#"abgate_forced_requests_total{experiment="test-exp",status_class="2xx",variant="treatment"}"#,
        ) == Some(1.0)
    })
    .await;
    let requests = |variant: &str| {
        sample(
            &text,
            &format!(
                r#"abgate_requests_total{{experiment="test-exp",route="chat",status_class="2xx",variant="{variant}"}}"#
            ),
        )
    };
    assert_eq!(requests("treatment"), Some(0.0));
    assert_eq!(requests("control"), Some(1.0));
    let stats = get(format!("http://{admin}/admin/stats")).await.json();
    assert_eq!(stats["sample_ratio"]["treatment"], 0);
    assert_eq!(stats["sample_ratio"]["control"], 1);
    assert_eq!(
        sample(
            &text,
            r#"abgate_auth_failures_total{kind="forced_variant_refused"}"#
        ),
        Some(2.0)
    );
}

#[test]
fn qa_override_without_an_admin_token_is_a_config_error() {
    let toml = config_toml(
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        0.1,
        "[qa]\noverride = true",
    );
    let err = Config::parse(&toml)
        .unwrap()
        .validate(&BTreeMap::new(), Path::new("."))
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("qa.override: needs the admin token"),
        "{err}"
    );
}

#[tokio::test]
async fn events_carry_user_ids_raw_hashed_keyed_or_not_at_all() {
    let (control, treatment) = mocks().await;
    let id = "alice@example.com";
    for (mode, keyed, expected) in [
        ("raw", false, Some(id.to_owned())),
        ("", false, Some(sha256_hex(id))),
        ("hash", false, Some(sha256_hex(id))),
        ("hash", true, Some(hmac_sha256_hex(USER_ID_KEY, id))),
        ("omit", false, None),
    ] {
        let dir = fresh_dir(&format!("user-id-{mode}-{keyed}"));
        let path = dir.join("events.jsonl");
        let mut section = format!("[events]\npath = {:?}", path.display().to_string());
        if !mode.is_empty() {
            section.push_str(&format!("\nuser_id = \"{mode}\""));
        }
        if keyed {
            section.push_str("\nuser_id_key_env = \"UID_KEY\"");
        }
        let toml = config_toml(&control.url(), &treatment.url(), 0.5, &section);
        let gw = gateway_with_env(&toml, env(&[("UID_KEY", USER_ID_KEY)])).await;
        let answer = chat(&gw.url(), id).await;
        assert_eq!(answer.status, 200);
        gw.shutdown().await;
        let line = wait_for_line(&path).await;
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            event["user_id"].as_str().map(str::to_owned),
            expected,
            "{mode:?} keyed: {keyed}"
        );
        assert_eq!(event["forced"], false);
        if mode != "raw" {
            assert!(!line.contains("alice"), "{line}");
        }
        assert!(!line.contains(USER_ID_KEY), "{line}");
    }
}

const USER_ID_KEY: &str = "user-id-hmac-key-0123456789";

fn hmac_sha256_hex(key: &str, text: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(text.as_bytes());
    abgate::experiment::hex::encode(&mac.finalize().into_bytes())
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    abgate::experiment::hex::encode(&sha2::Sha256::digest(text.as_bytes()))
}

async fn wait_for_line(path: &Path) -> String {
    for _ in 0..250 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(line) = text.lines().next() {
                return line.to_owned();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no event written to {}", path.display());
}
