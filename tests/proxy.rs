//! The data path end to end over real loopback sockets: who goes where,
//! what reaches the upstream, and how streams come back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use abgate::experiment::assign::{assign, Variant};
use abgate::proxy::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;

#[tokio::test]
async fn users_are_routed_by_their_hash_and_the_model_is_rewritten() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let mut seen = BTreeMap::new();
    for i in 0..60 {
        let user = format!("user-{i}");
        let answer = chat(&gw.url(), &user).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let expected = assign(user.as_bytes(), None, 0.5);
        assert_eq!(
            answer.header("x-abgate-variant"),
            expected.as_str(),
            "{user}"
        );
        let (model, mock_name) = match expected {
            Variant::Treatment => ("ft:base-model:acme:v3", "fine-tuned"),
            _ => ("base-model", "base"),
        };
        assert_eq!(answer.header("x-abgate-model"), model);
        assert!(answer.header("x-abgate-request-id").starts_with("abg2_"));
        assert_eq!(answer.header("x-abgate-experiment"), "test-exp");
        let json = answer.json();
        assert_eq!(json["model"], model, "the upstream saw the rewritten model");
        let content = json["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            content.contains(&format!("Hello from {mock_name}")),
            "{content}"
        );
        *seen.entry(expected.as_str()).or_insert(0) += 1;
    }
    // Both arms were exercised, and each mock got exactly its users.
    assert_eq!(control.request_count() + treatment.request_count(), 60);
    assert_eq!(treatment.request_count(), seen["treatment"]);
    assert!(seen["control"] > 0 && seen["treatment"] > 0);
}

#[tokio::test]
async fn a_user_stays_in_the_same_arm() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    for user in ["alice", "bob", "ユーザー", "carol@example.com"] {
        let first = chat(&gw.url(), user).await;
        for _ in 0..5 {
            let again = chat(&gw.url(), user).await;
            assert_eq!(
                again.header("x-abgate-variant"),
                first.header("x-abgate-variant")
            );
        }
    }
}

#[tokio::test]
async fn only_model_changes_in_the_forwarded_body() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let body = "{ \"temperature\": 0.70,\n  \"model\" : \"gpt-4o-mini\", \"messages\":[{\"role\":\"user\",\"content\":\"model\"}],\"z\":1e3}";
    let answer = post(
        &gw.url(),
        "/v1/chat/completions?trace=1",
        &[("x-user-id", "u1")],
        body,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = control.requests();
    let last = seen.last().unwrap();
    assert_eq!(last.path_and_query, "/v1/chat/completions?trace=1");
    assert_eq!(
        String::from_utf8_lossy(&last.body),
        body.replace("\"gpt-4o-mini\"", "\"base-model\""),
        "every byte but the model value passes through"
    );
    assert_eq!(
        last.headers["content-length"].to_str().unwrap(),
        last.body.len().to_string()
    );
}

#[tokio::test]
async fn the_user_id_comes_from_header_then_openai_user_then_anthropic_metadata() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    // Pick IDs whose arms differ, so the answer shows which one was used.
    let (a, b) = distinct_arms(0.5);

    let body = format!(r#"{{"model":"m","user":"{b}","messages":[]}}"#);
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-user-id", &a)],
        &body,
    )
    .await;
    assert_eq!(
        answer.header("x-abgate-variant"),
        assign(a.as_bytes(), None, 0.5).as_str()
    );

    let answer = post(&gw.url(), "/v1/chat/completions", &[], &body).await;
    assert_eq!(
        answer.header("x-abgate-variant"),
        assign(b.as_bytes(), None, 0.5).as_str()
    );

    let body =
        format!(r#"{{"model":"m","max_tokens":5,"metadata":{{"user_id":"{a}"}},"messages":[]}}"#);
    let answer = post(&gw.url(), "/v1/messages", &[], &body).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("x-abgate-variant"),
        assign(a.as_bytes(), None, 0.5).as_str()
    );
    assert_eq!(answer.json()["type"], "message");
}

#[tokio::test]
async fn without_a_user_id_control_serves_it_as_unassigned() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 1.0, "")).await;
    let answer = post(&gw.url(), "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-abgate-variant"), "unassigned");
    assert_eq!(answer.json()["model"], "base-model");
    assert_eq!((control.request_count(), treatment.request_count()), (1, 0));
    // An empty header is no ID either.
    let answer = chat(&gw.url(), "").await;
    assert_eq!(answer.header("x-abgate-variant"), "unassigned");
}

#[tokio::test]
async fn requiring_a_user_id_refuses_requests_without_one() {
    let (control, treatment) = mocks().await;
    let extra = "[identity]\nrequire = true\nheader = \"x-end-user\"";
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, extra)).await;
    let answer = chat(&gw.url(), "ignored").await;
    assert_eq!(answer.status, 400);
    let json = answer.json();
    assert_eq!(json["error"]["code"], "missing_user_id");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-end-user"));
    assert_eq!(control.request_count() + treatment.request_count(), 0);
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-end-user", "u")],
        CHAT,
    )
    .await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn injected_keys_replace_the_clients_credentials() {
    let (control, treatment) = mocks().await;
    let toml = config_toml(&control.url(), &treatment.url(), 0.5, "")
        .replace(
            "model = \"base-model\"",
            "model = \"base-model\"\napi_key_env = \"OPENAI_KEY\"",
        )
        .replace(
            "model = \"ft:base-model:acme:v3\"",
            "model = \"ft:base-model:acme:v3\"\napi_key_env = \"ANTHROPIC_KEY\"\nprovider = \"anthropic\"",
        );
    let env = BTreeMap::from([
        ("OPENAI_KEY".to_owned(), "sk-control".to_owned()),
        ("ANTHROPIC_KEY".to_owned(), "sk-ant-treatment".to_owned()),
    ]);
    let gw = gateway_with_env(&toml, env).await;
    let (control_user, treatment_user) = arms_of(0.5);
    let client_headers = [
        ("authorization", "Bearer client-key"),
        ("x-api-key", "client-key"),
        ("openai-organization", "org-client"),
    ];
    fn with<'a>(base: &[(&'a str, &'a str)], user: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut headers = base.to_vec();
        headers.push(("x-user-id", user));
        headers
    }
    post(
        &gw.url(),
        "/v1/chat/completions",
        &with(&client_headers, &control_user),
        CHAT,
    )
    .await;
    post(
        &gw.url(),
        "/v1/messages",
        &with(&client_headers, &treatment_user),
        CHAT,
    )
    .await;

    let seen = &control.requests()[0].headers;
    assert_eq!(seen["authorization"], "Bearer sk-control");
    assert!(seen.get("x-api-key").is_none());
    assert!(seen.get("openai-organization").is_none());

    let seen = &treatment.requests()[0].headers;
    assert_eq!(seen["x-api-key"], "sk-ant-treatment");
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert!(seen.get("authorization").is_none());
}

#[tokio::test]
async fn without_an_injected_key_the_clients_credentials_pass_and_hop_by_hop_headers_stop() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let headers = [
        ("authorization", "Bearer client-key"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("x-abgate-variant", "treatment"),
        ("x-custom", "kept"),
    ];
    let answer = post(&gw.url(), "/v1/chat/completions", &headers, CHAT).await;
    assert_eq!(
        answer.header("x-abgate-variant"),
        "unassigned",
        "clients cannot pick an arm"
    );
    let seen = &control.requests()[0].headers;
    assert_eq!(seen["authorization"], "Bearer client-key");
    assert_eq!(seen["x-custom"], "kept");
    assert!(seen.get("x-hop").is_none());
    assert!(seen.get("x-abgate-variant").is_none());
    assert_eq!(seen["host"], control.addr.to_string());
}

#[tokio::test]
async fn other_v1_paths_and_methods_are_forwarded_as_they_are() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let answer = send(
        Request::get(format!("{}/v1/models?limit=2", gw.url()))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(control.requests()[0].path_and_query, "/v1/models?limit=2");
    assert_eq!(answer.header("x-mock-name"), "base");

    let answer = post(
        &gw.url(),
        "/v1/embeddings",
        &[("x-user-id", "u")],
        r#"{"model":"e","input":["a","b"]}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn an_upstream_path_prefix_is_kept() {
    let (control, treatment) = mocks().await;
    let prefixed = format!("{}/openai", control.url());
    let gw = gateway(&config_toml(&prefixed, &treatment.url(), 0.0, "")).await;
    let answer = post(&gw.url(), "/v1/chat/completions?x=1", &[], CHAT).await;
    // The mock does not serve the prefix; what matters is what it was asked.
    assert_eq!(answer.status, 404);
    assert_eq!(
        control.requests()[0].path_and_query,
        "/openai/v1/chat/completions?x=1"
    );
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    for status in [429u16, 500, 503, 400] {
        let answer = post(
            &gw.url(),
            "/v1/chat/completions",
            &[("x-mock-status", &status.to_string())],
            CHAT,
        )
        .await;
        assert_eq!(answer.status, status);
        assert_eq!(
            answer.header("x-mock-name"),
            "base",
            "the model's own answer"
        );
        assert!(answer.json()["error"]["message"].is_string());
        assert_eq!(answer.header("x-abgate-variant"), "unassigned");
    }
}

#[tokio::test]
async fn stream_chunks_reach_the_client_before_the_upstream_finishes() {
    let (control, treatment) = held_control_mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let request = Request::post(format!("{}/v1/chat/completions", gw.url()))
        .header("content-type", "application/json")
        .body(Body::full(Bytes::from(body)))
        .unwrap();
    let response = bounded(client().request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    // The mock holds the rest of the stream until released: whatever
    // arrives now was forwarded while the upstream was still going.
    let first = bounded(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.starts_with("data: "), "{first}");
    assert_eq!(control.streams_started(), 1);
    assert_eq!(
        control.streams_finished(),
        0,
        "the upstream has not finished"
    );

    control.release_streams();
    let rest = bounded(body.collect()).await.unwrap().to_bytes();
    let all = first + &String::from_utf8_lossy(&rest);
    assert!(all.trim_end().ends_with("data: [DONE]"), "{all}");
    assert!(all.contains("\"model\":\"base-model\""));
    assert_eq!(control.streams_finished(), 1);
}

#[tokio::test]
async fn anthropic_streams_pass_through_event_by_event() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let body = r#"{"model":"claude","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"Hi"}]}"#;
    let answer = post(&gw.url(), "/v1/messages", &[], body).await;
    assert_eq!(answer.status, 200);
    let text = answer.text();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    assert!(events.contains(&"content_block_delta"));
}

/// A chat call to the gateway at `base` over HTTP/2 (prior knowledge).
async fn http2_chat(base: &str) -> http::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let request = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Body::full(Bytes::from(CHAT)))
        .unwrap();
    let response = bounded(client.request(request)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    response
}

#[tokio::test]
async fn http2_clients_are_served() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    let response = http2_chat(&gw.url()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-abgate-model"], "base-model");
}

#[tokio::test]
async fn an_upstreams_answer_fields_reach_the_client_once_each_and_hop_by_hop_ones_do_not() {
    // The first `Connection` has options only; the second names a field,
    // which the gateway reads through the whole head's map instead.
    for (connection, hop) in [("keep-alive", &["1"][..]), ("close, X-Hop", &[])] {
        let body = br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\
             Content-Type: application/json\r\nKeep-Alive: timeout=5\r\nConnection: {connection}\r\n\
             X-Hop: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Abgate-Variant: forged\r\n\
             X-Abgate-Upstream: 1\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let upstream = raw_upstream([head.as_bytes(), body].concat()).await;
        let gw = gateway(&config_toml(&upstream, &upstream, 0.0, "")).await;
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
             x-user-id: u\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        );
        let answer = raw_exchange(gw.proxy_addr, request.as_bytes()).await;
        let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
        let fields: Vec<(String, &str)> = head
            .lines()
            .skip(1)
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim())
            })
            .collect();
        let values = |name: &str| -> Vec<&str> {
            fields
                .iter()
                .filter(|(field, _)| field == name)
                .map(|(_, value)| *value)
                .collect()
        };
        assert_eq!(
            values("date"),
            ["Thu, 01 Jan 2026 00:00:00 GMT"],
            "{answer}"
        );
        assert_eq!(values("server"), ["up"], "{answer}");
        assert_eq!(values("set-cookie"), ["a=1", "b=2"], "{answer}");
        assert_eq!(values("content-type"), ["application/json"], "{answer}");
        assert_eq!(
            values("content-length"),
            [body.len().to_string()],
            "{answer}"
        );
        // The gateway's namespace on an answer is the gateway's alone.
        assert_eq!(values("x-abgate-variant"), ["control"], "{answer}");
        assert!(values("x-abgate-upstream").is_empty(), "{answer}");
        assert_eq!(values("x-abgate-experiment"), ["test-exp"], "{answer}");
        assert_eq!(values("connection"), ["close"], "{answer}");
        assert!(values("keep-alive").is_empty(), "{answer}");
        assert_eq!(values("x-hop"), hop, "{answer}");
        assert_eq!(rest.as_bytes(), body);
    }
}

#[tokio::test]
async fn a_head_answer_keeps_the_upstreams_length_and_a_body_gets_its_own() {
    let upstream = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 123\r\n\r\n"
            .to_vec(),
    )
    .await;
    let gw = gateway(&config_toml(&upstream, &upstream, 0.0, "")).await;
    let answer = raw_exchange(
        gw.proxy_addr,
        b"HEAD /v1/models HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    let lengths: Vec<&str> = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim())
        .collect();
    assert_eq!(lengths, ["123"], "{answer}");
    assert!(rest.is_empty(), "{answer}");
}

#[tokio::test]
async fn http2_clients_get_an_upstreams_answer_fields() {
    let body = br#"{"id":"x"}"#;
    let head = format!(
        "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\
         Content-Type: application/json\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\
         X-Abgate-Variant: forged\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let upstream = raw_upstream([head.as_bytes(), body].concat()).await;
    let gw = gateway(&config_toml(&upstream, &upstream, 0.0, "")).await;
    let response = http2_chat(&gw.url()).await;
    let headers = response.headers();
    let all = |name: &str| -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("server"), ["up"]);
    assert_eq!(all("date"), ["Thu, 01 Jan 2026 00:00:00 GMT"]);
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(all("content-type"), ["application/json"]);
    assert_eq!(all("x-abgate-variant"), ["unassigned"]);
    assert_eq!(all("x-abgate-model"), ["base-model"]);
    assert!(headers.get("connection").is_none());
    let got = bounded(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&got[..], body);
}

/// A user in control and a user in treatment at `fraction`.
fn arms_of(fraction: f64) -> (String, String) {
    let find = |want: Variant| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|id| assign(id.as_bytes(), None, fraction) == want)
            .unwrap()
    };
    (find(Variant::Control), find(Variant::Treatment))
}

/// Two user IDs in different arms.
fn distinct_arms(fraction: f64) -> (String, String) {
    let (control, treatment) = arms_of(fraction);
    (treatment, control)
}

#[tokio::test]
async fn api_bodies_are_json_whatever_their_content_type_says() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.0, "")).await;
    // `curl -d` labels its body application/x-www-form-urlencoded.
    let form = |body: &'static str| {
        Request::post(format!("{}/v1/messages", gw.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::full(Bytes::from(body)))
            .unwrap()
    };
    let answer = send(form(r#"{"model":"c","max_tokens":5,"messages":[]}"#)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["model"], "base-model");
    let answer = send(form("{bad")).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"]["code"], "invalid_json");
    assert_eq!(
        control.request_count(),
        1,
        "the malformed body never reached the upstream"
    );

    // Elsewhere a non-JSON body is not the gateway's business: it streams through.
    let upload = Request::post(format!("{}/v1/files", gw.url()))
        .header("content-type", "multipart/form-data; boundary=x")
        .body(Body::full(Bytes::from_static(
            b"--x\r\nnot json\r\n--x--\r\n",
        )))
        .unwrap();
    send(upload).await;
    let seen = control.requests();
    assert_eq!(
        seen.last().unwrap().body.as_ref(),
        b"--x\r\nnot json\r\n--x--\r\n"
    );
}

#[tokio::test]
async fn health_is_answered_on_the_traffic_port_and_never_forwarded() {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    let health = get(format!("{}/healthz", gw.url())).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let ready = get(format!("{}/readyz", gw.url())).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    let posted = post(&gw.url(), "/healthz", &[], "{}").await;
    assert_eq!(posted.status, 405, "{}", posted.text());
    // Neither upstream saw them, and no arm counted them.
    let metrics = scrape(gw.admin_addr.unwrap()).await;
    let requests: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("abgate_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 0.0, "{metrics}");
    gw.shutdown().await;
}
