//! `fallback_to_control`: a treatment upstream that fails before answering
//! has the request resent to control, whose answer the client gets, marked
//! `x-abgate-fallback: true`. The failure stays treatment's in the metrics
//! (as without fallback); control's series do not see the resent request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use abgate::app::Running;
use abgate_mock::{MockConfig, MockHandle};
use common::*;

/// Every user in treatment; control is a recording mock. `fallback`
/// sets `fallback_to_control`, and each arm injects its own key.
async fn gateway_over(treatment: &str, fallback: bool, extra: &str) -> (Running, MockHandle) {
    let control = spawn_mock(MockConfig {
        record: true,
        ..MockConfig::named("base")
    })
    .await;
    let extra =
        format!("api_key_env = \"TREATMENT_KEY\"\nfallback_to_control = {fallback}\n{extra}");
    let toml = config_toml(&control.url(), treatment, 1.0, &extra).replace(
        "model = \"base-model\"\n",
        "model = \"base-model\"\napi_key_env = \"CONTROL_KEY\"\n",
    );
    let env = BTreeMap::from([
        ("CONTROL_KEY".to_owned(), "sk-control".to_owned()),
        ("TREATMENT_KEY".to_owned(), "sk-treatment".to_owned()),
    ]);
    (gateway_with_env(&toml, env).await, control)
}

/// A whole answer with this status line and a JSON error body.
fn status_answer(status: &str) -> Vec<u8> {
    let body = br#"{"error":{"message":"upstream trouble","type":"server_error"}}"#;
    let mut answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

fn series(family: &str, labels: &str) -> String {
    format!("{family}{{{labels}}}")
}

fn fallbacks(kind: &str, result: &str) -> String {
    series(
        "abgate_fallbacks_total",
        &format!(
            r#"experiment="test-exp",from="treatment",kind="{kind}",result="{result}",to="control""#
        ),
    )
}

fn requests(variant: &str, class: &str) -> String {
    series(
        "abgate_requests_total",
        &format!(
            r#"experiment="test-exp",route="chat",status_class="{class}",variant="{variant}""#
        ),
    )
}

/// The client got control's answer, marked as a fallback; control's mock
/// saw control's model and key.
fn assert_served_by_control(answer: &Answer, control: &MockHandle) {
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-name"), "base");
    assert_eq!(answer.header("x-abgate-fallback"), "true");
    assert_eq!(answer.header("x-abgate-variant"), "treatment");
    assert_eq!(answer.header("x-abgate-served-by"), "control");
    assert_eq!(answer.header("x-abgate-model"), "base-model");
    assert!(answer.header("x-abgate-request-id").starts_with("abg2_"));
    let seen = control.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], "Bearer sk-control");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body["model"], "base-model");
    assert_eq!(body["messages"][0]["content"], "Hi there");
}

/// Treatment's failure is counted as treatment's, the fallback as a
/// fallback, and control's per-arm series stay empty.
async fn assert_counted(gw: &Running, kind: &str) {
    let admin = gw.admin_addr.unwrap();
    let text = metrics_until(admin, |text| {
        sample(text, &fallbacks(kind, "served")) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, &upstream_errors("treatment", kind)),
        Some(1.0)
    );
    assert_eq!(sample(&text, &requests("treatment", "5xx")), Some(1.0));
    assert_eq!(sample(&text, &requests("treatment", "2xx")), Some(0.0));
    for class in ["2xx", "4xx", "5xx"] {
        assert_eq!(
            sample(&text, &requests("control", class)).unwrap_or(0.0),
            0.0,
            "control counted a fallback as its own request"
        );
    }
    let stats = get(format!("http://{admin}/admin/stats")).await.json();
    let arms = &stats["variants"];
    assert_eq!(arms["treatment"]["errors"], 1, "{stats}");
    assert_eq!(arms["control"]["requests"], 0, "{stats}");
}

#[tokio::test]
async fn a_treatment_that_refuses_connections_is_served_by_control() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let (gw, control) = gateway_over("http://127.0.0.1:1", true, "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_served_by_control(&answer, &control);
    assert_counted(&gw, "connect").await;
}

#[tokio::test]
async fn a_treatment_500_is_served_by_control() {
    let treatment = raw_upstream(status_answer("500 Internal Server Error")).await;
    let (gw, control) = gateway_over(&treatment, true, "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_served_by_control(&answer, &control);
    assert_counted(&gw, "status_5xx").await;
}

#[tokio::test]
async fn a_treatment_that_sends_no_headers_in_time_is_served_by_control() {
    let treatment = scripted_upstream(|_, socket| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(socket);
    })
    .await;
    let (gw, control) = gateway_over(&treatment, true, "[timeouts]\nfirst_byte_ms = 200").await;
    let answer = chat(&gw.url(), "u").await;
    assert_served_by_control(&answer, &control);
    assert_counted(&gw, "first_byte_timeout").await;
}

#[tokio::test]
async fn without_fallback_the_failure_reaches_the_client() {
    let (gw, control) = gateway_over("http://127.0.0.1:1", false, "").await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "connect", "treatment upstream");
    assert_eq!(answer.json()["error"]["variant"], "treatment");
    assert_eq!(answer.header("x-abgate-fallback"), "");
    assert_eq!(control.request_count(), 0);
    let admin = gw.admin_addr.unwrap();
    counted(admin, "treatment", "connect", 1.0).await;
    let text = scrape(admin).await;
    assert_eq!(sample(&text, &fallbacks("connect", "served")), Some(0.0));
}

#[tokio::test]
async fn client_errors_and_throttling_from_treatment_are_not_resent() {
    for (status, kind) in [
        ("400 Bad Request", "status_4xx"),
        ("429 Too Many Requests", "status_429"),
    ] {
        let treatment = raw_upstream(status_answer(status)).await;
        let (gw, control) = gateway_over(&treatment, true, "").await;
        let answer = chat(&gw.url(), "u").await;
        assert_eq!(answer.status.as_u16(), status[..3].parse::<u16>().unwrap());
        assert_eq!(answer.json()["error"]["message"], "upstream trouble");
        assert_eq!(answer.header("x-abgate-fallback"), "");
        assert_eq!(control.request_count(), 0, "{status} was resent");
        counted(gw.admin_addr.unwrap(), "treatment", kind, 1.0).await;
    }
}

#[tokio::test]
async fn a_control_that_fails_too_gets_502_naming_control() {
    let treatment = raw_upstream(status_answer("503 Service Unavailable")).await;
    let toml = config_toml(
        "http://127.0.0.1:1",
        &treatment,
        1.0,
        "fallback_to_control = true",
    );
    let gw = gateway(&toml).await;
    let answer = chat(&gw.url(), "u").await;
    assert_error(&answer, 502, "connect", "control upstream");
    assert_eq!(answer.json()["error"]["variant"], "control");
    assert_eq!(answer.header("x-abgate-variant"), "treatment");
    assert_eq!(answer.header("x-abgate-fallback"), "true");
    let admin = gw.admin_addr.unwrap();
    let text = metrics_until(admin, |text| {
        sample(text, &fallbacks("status_5xx", "failed")) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, &upstream_errors("treatment", "status_5xx")),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, &upstream_errors("control", "connect")),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_stream_that_breaks_midway_is_not_resent() {
    let treatment = scripted_upstream(|_, socket| one_event_then_reset(socket)).await;
    let (gw, control) = gateway_over(&treatment, true, "").await;
    let answer = send(chat_stream_request(&gw.url(), "u")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-abgate-fallback"), "");
    let text = answer.text();
    assert!(text.starts_with("data: {\"choices\""), "{text}");
    assert!(text.contains("event: error\n"), "{text}");
    assert!(text.contains("\"code\":\"reset\""), "{text}");
    assert_eq!(control.request_count(), 0);
    counted(gw.admin_addr.unwrap(), "treatment", "reset", 1.0).await;
}

#[test]
fn only_treatment_may_fall_back() {
    let toml = config_toml("http://a.test", "http://b.test", 0.5, "").replace(
        "model = \"base-model\"",
        "model = \"base-model\"\nfallback_to_control = true",
    );
    let err = abgate::config::Config::parse(&toml)
        .unwrap()
        .validate(&BTreeMap::new(), std::path::Path::new("."))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("variants.control.fallback_to_control: only variants.treatment"),
        "{err}"
    );
}

#[tokio::test]
async fn a_fallback_never_forwards_the_clients_gateway_key() {
    let control = spawn_mock(MockConfig {
        record: true,
        ..MockConfig::named("base")
    })
    .await;
    // Control has no key of its own: the gateway key must still not reach it.
    let toml = config_toml(
        &control.url(),
        "http://127.0.0.1:1",
        1.0,
        "fallback_to_control = true\n[auth]\napi_keys_env = \"GW_KEYS\"",
    );
    let key = "gw-key-fallback-0123456789";
    let gw = gateway_with_env(
        &toml,
        BTreeMap::from([("GW_KEYS".to_owned(), key.to_owned())]),
    )
    .await;
    let bearer = format!("Bearer {key}");
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[
            ("authorization", bearer.as_str()),
            ("x-api-key", key),
            ("x-user-id", "u"),
        ],
        r#"{"model":"m","messages":[{"role":"user","content":"Hi there"}]}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-abgate-fallback"), "true");
    let seen = control.requests();
    assert_eq!(seen.len(), 1);
    for (name, value) in &seen[0].headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(key),
            "the gateway key reached control in {name}"
        );
    }
}
