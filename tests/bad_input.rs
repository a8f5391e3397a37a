//! Bad input never gets a 5xx and never stops the gateway: each request
//! below gets a 4xx saying what was wrong (a JSON error from the gateway,
//! or, for bytes that are not HTTP at all, the HTTP layer's bare 400/431),
//! nothing bad reaches an upstream, and the next good request is served.
//! (The basic cases, one per error code, are in errors.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use abgate::app::Running;
use abgate::proxy::body::Body;
use abgate_mock::MockHandle;
use bytes::Bytes;
use common::*;
use http::Request;

async fn setup() -> (Running, MockHandle, MockHandle) {
    let (control, treatment) = mocks().await;
    let gw = gateway(&config_toml(&control.url(), &treatment.url(), 0.5, "")).await;
    (gw, control, treatment)
}

async fn post_bytes(gw: &Running, body: Vec<u8>) -> Answer {
    send(
        Request::post(format!("{}/v1/chat/completions", gw.url()))
            .header("content-type", "application/json")
            .header("x-user-id", "u")
            .body(Body::full(body))
            .unwrap(),
    )
    .await
}

/// The gateway still serves a good request.
async fn still_serves(gw: &Running) {
    let answer = chat(&gw.url(), "good-user").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// A raw HTTP/1.1 request to the gateway, closing after the answer.
async fn raw(gw: &Running, head: &str, body: &[u8]) -> String {
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(body);
    raw_exchange(gw.proxy_addr, &bytes).await
}

#[tokio::test]
async fn json_bodies_of_every_wrong_shape_get_400() {
    let (gw, control, treatment) = setup().await;
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"\"text\"".to_vec(), "not_an_object", "JSON object"),
        (b"null".to_vec(), "not_an_object", "JSON object"),
        (b"42".to_vec(), "not_an_object", "JSON object"),
        (b"true".to_vec(), "not_an_object", "JSON object"),
        (b"{\"model\":\"m\"} {}".to_vec(), "invalid_json", "trailing"),
        (
            b"{\"model\":\"m\",}".to_vec(),
            "invalid_json",
            "not valid JSON",
        ),
        (b"{\"n\": NaN}".to_vec(), "invalid_json", "not valid JSON"),
        (b"{'model': 'm'}".to_vec(), "invalid_json", "not valid JSON"),
        (b"{\"x\":\"\xff\xfe\"}".to_vec(), "invalid_json", "UTF-8"),
        (
            b"{\"model\":[\"m\"]}".to_vec(),
            "wrong_field_type",
            "\"model\" must be a string",
        ),
        (
            b"{\"model\":{\"id\":\"m\"}}".to_vec(),
            "wrong_field_type",
            "\"model\"",
        ),
        (
            b"{\"model\":null}".to_vec(),
            "wrong_field_type",
            "\"model\"",
        ),
        (
            b"{\"model\":true}".to_vec(),
            "wrong_field_type",
            "\"model\"",
        ),
        (
            b"{\"metadata\":\"u\"}".to_vec(),
            "wrong_field_type",
            "\"metadata\"",
        ),
        (b"   \n ".to_vec(), "missing_body", "empty"),
    ];
    for (body, code, mentions) in cases {
        let answer = post_bytes(&gw, body).await;
        assert_error(&answer, 400, code, mentions);
    }
    assert_eq!(control.request_count() + treatment.request_count(), 0);

    // 100 000 levels deep is still JSON: the gateway skips what it does not
    // read without recursing (no stack to overflow) and forwards it; the
    // upstream's own answer (the mock's depth limit) passes through.
    let answer = post_bytes(&gw, deep.into_bytes()).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.text().contains("recursion limit"),
        "{}",
        answer.text()
    );
    assert_eq!(answer.header("x-mock-name"), "fine-tuned");
    still_serves(&gw).await;
}

#[tokio::test]
async fn a_post_with_no_body_at_all_gets_400_missing_body() {
    let (gw, control, treatment) = setup().await;
    // No content-length, no transfer-encoding: HTTP/1.1 says the body is empty.
    let answer = raw(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\nhost: x\nconnection: close\n\n",
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("\"code\":\"missing_body\""), "{answer}");
    assert_eq!(control.request_count() + treatment.request_count(), 0);
    still_serves(&gw).await;
}

#[tokio::test]
async fn a_10_mb_body_gets_413_under_the_default_limit() {
    let (gw, control, treatment) = setup().await;
    let ten_mb = 10 * 1024 * 1024;
    let mut body = br#"{"model":"m","pad":""#.to_vec();
    body.resize(ten_mb, b'x');
    body.extend_from_slice(b"\"}");
    // Declared: refused from the content-length, before it is read.
    let answer = post_bytes(&gw, body).await;
    assert_error(&answer, 413, "body_too_large", "8388608 bytes");
    assert_eq!(answer.json()["error"]["type"], "request_too_large");

    // Chunked, no length: refused once the limit is passed while reading.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let block = Bytes::from(vec![b' '; 64 * 1024]);
        for _ in 0..160 {
            if sender.send(block.clone()).await.is_err() {
                break;
            }
        }
    });
    let answer = send(
        Request::post(format!("{}/v1/chat/completions", gw.url()))
            .header("content-type", "application/json")
            .body(Body::Channel(receiver))
            .unwrap(),
    )
    .await;
    assert_error(&answer, 413, "body_too_large", "limit");
    assert_eq!(control.request_count() + treatment.request_count(), 0);
    still_serves(&gw).await;
}

#[tokio::test]
async fn long_user_ids_get_400_or_431_never_5xx() {
    let (gw, control, treatment) = setup().await;
    // Within the header limit: the user ID's own limit answers.
    let answer = chat(&gw.url(), &"u".repeat(10 * 1024)).await;
    assert_error(&answer, 400, "invalid_user_id", "10240 bytes");
    // In the body, 1 MB: the same.
    let body = format!(r#"{{"model":"m","user":"{}"}}"#, "u".repeat(1024 * 1024));
    let answer = post(&gw.url(), "/v1/chat/completions", &[], &body).await;
    assert_error(&answer, 400, "invalid_user_id", "at most 512");
    // Over limits.max_header_bytes (64 KiB): a JSON 431.
    let answer = chat(&gw.url(), &"u".repeat(200 * 1024)).await;
    assert_error(&answer, 431, "headers_too_large", "at most 65536");
    // Over four times that: the HTTP layer refuses it before the gateway
    // sees it, with a bare 431, and closes the connection.
    let head = format!(
        "GET /v1/models HTTP/1.1\nhost: x\nx-user-id: {}\n\n",
        "u".repeat(1024 * 1024)
    );
    let answer = raw(&gw, &head, b"").await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // More than 100 header fields: the same.
    let many: String = (0..150).map(|i| format!("x-h{i}: v\n")).collect();
    let answer = raw(
        &gw,
        &format!("GET /v1/models HTTP/1.1\nhost: x\n{many}\n"),
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(control.request_count() + treatment.request_count(), 0);
    still_serves(&gw).await;
}

#[tokio::test]
async fn header_injection_attempts_reach_neither_a_response_nor_an_upstream() {
    let (control, treatment) = mocks().await;
    // Control passes the client's model through (no rewrite).
    let toml = config_toml(&control.url(), &treatment.url(), 0.0, "").replacen(
        "model = \"base-model\"\n",
        "",
        1,
    );
    let gw = gateway(&toml).await;
    let body = r#"{"model":"m"}"#;
    let post_head = |headers: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\nhost: x\nconnection: close\n{headers}content-length: {}\n\n",
            body.len()
        )
    };
    // A bare CR, a NUL or a folded line in a header value is not HTTP: the
    // HTTP layer answers a bare 400 and closes.
    for bad in [
        "x-user-id: alice\rx-abgate-variant: treatment\n",
        "x-user-id: al\0ice\n",
        "x-user-id: alice\n x-abgate-variant: treatment\n",
    ] {
        let answer = raw(&gw, &post_head(bad), body.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{bad:?}: {answer}");
    }
    assert_eq!(control.request_count() + treatment.request_count(), 0);

    // A bare LF ends a header line, as HTTP/1.1 parsers allow: the client
    // sent two headers of its own, and the ID is "alice", nothing more.
    let answer = raw(
        &gw,
        &post_head("x-user-id: alice\nx-extra: 1\n"),
        body.as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let seen = &control.requests()[0].headers;
    assert_eq!(seen["x-extra"], "1");
    assert_eq!(seen["x-user-id"], "alice");

    // CR LF inside the body's model never becomes a response header.
    let sneaky = r#"{"model":"m\r\nx-injected: 1","messages":[]}"#;
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-user-id", "u")],
        sneaky,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-injected"), "");
    assert_eq!(
        answer.header("x-abgate-model"),
        "",
        "no header from that model"
    );

    // Two framings: refused, as nginx does, and nothing forwarded: a
    // length and chunks are read one way by one hop and the other way by
    // the next (RFC 9112 §6.3).
    let before = control.request_count();
    let smuggle = "POST /v1/chat/completions HTTP/1.1\nhost: x\ncontent-length: 4\ntransfer-encoding: chunked\n\n";
    let chunked = format!(
        "{:x}\r\n{body}\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
        body.len()
    );
    let answer = raw(&gw, smuggle, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains(r#""code":"invalid_framing""#), "{answer}");
    assert_eq!(control.request_count(), before, "nothing forwarded");
    // Two different lengths: refused.
    let answer = raw(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\nhost: x\ncontent-length: 13\ncontent-length: 5\n\n",
        body.as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    still_serves(&gw).await;
}

#[tokio::test]
async fn methods_no_api_uses_get_405_and_the_rest_reach_the_upstream() {
    let (gw, control, treatment) = setup().await;
    for head in [
        "TRACE /v1/chat/completions HTTP/1.1\nhost: x\nconnection: close\n\n",
        "CONNECT api.openai.com:443 HTTP/1.1\nhost: api.openai.com:443\nconnection: close\n\n",
        "BREW /v1/chat/completions HTTP/1.1\nhost: x\nconnection: close\n\n",
    ] {
        let answer = raw(&gw, head, b"").await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(
            answer.contains("\"code\":\"method_not_allowed\""),
            "{answer}"
        );
        assert!(answer.contains("allow: GET, POST"), "{answer}");
    }
    assert_eq!(control.request_count() + treatment.request_count(), 0);

    // A method the API itself does not serve on a path is the API's to
    // answer: the upstream's 4xx JSON passes through.
    let answer = get(format!("{}/v1/embeddings", gw.url())).await;
    assert_eq!(answer.status, 404);
    assert!(answer.json()["error"]["message"].is_string());
    let answer = send(
        Request::delete(format!("{}/v1/feedback", gw.url()))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.json()["error"]["code"], "method_not_allowed");
    still_serves(&gw).await;
}

#[tokio::test]
async fn odd_targets_and_non_http_bytes_get_4xx() {
    let (gw, control, _treatment) = setup().await;
    // A 10 KB path outside /v1/: a 404 whose message is cut short.
    let long = format!("/{}", "p".repeat(10 * 1024));
    let answer = get(format!("{}{long}", gw.url())).await;
    assert_error(&answer, 404, "not_found", "ppp...");
    assert!(answer.text().len() < 1024);

    // An absolute-form target naming another host is not followed: the
    // gateway is not an open proxy, the configured upstream answers.
    let answer = raw(
        &gw,
        "GET http://127.0.0.1:1/v1/models HTTP/1.1\nhost: 127.0.0.1:1\nconnection: close\n\n",
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("x-mock-name: base"), "{answer}");
    assert_eq!(control.requests()[0].path_and_query, "/v1/models");

    // A TLS ClientHello on the plain-HTTP port.
    let answer = raw(&gw, "\u{16}\u{3}\u{1}\u{0}\u{a5}hello\n\n", b"").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    still_serves(&gw).await;
}
