//! Secrets never leave the gateway. The real binary runs with distinctive
//! secrets in its environment (admin token, gateway keys, upstream keys,
//! request id key, user ID key), is driven through successes and failures
//! (an upstream that is down, an upstream 401, bad input, wrong keys,
//! admin calls, reloads of broken files), and then everything it said is
//! searched: every answer's headers and body, the admin API, /metrics, its
//! stdout and stderr at debug level, the events file, the state and audit
//! files. No secret may appear anywhere; neither may a user ID outside the
//! answers, nor a prompt or a completion in the logs and events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abgate::proxy::body::Body;
use bytes::Bytes;
use common::*;
use http::Request;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const ADMIN_TOKEN: &str = "LEAKCHECK-admin-token-1111";
const GATEWAY_KEY: &str = "LEAKCHECK-gateway-key-2222";
const SPARE_GATEWAY_KEY: &str = "LEAKCHECK-gateway-key-3333";
const UPSTREAM_KEY: &str = "LEAKCHECK-upstream-key-4444";
const REQUEST_ID_KEY: &str = "LEAKCHECK-request-id-key-5555";
const USER_ID_KEY: &str = "LEAKCHECK-user-id-key-6666";
/// Only a broken reload names these variables.
const BAD_HEADER_KEY: &str = "LEAKCHECK-bad\u{1}header-key-7777";
const SHORT_KEY: &str = "LEAKCHECK-88";
/// What a client sends that is not a gateway key.
const WRONG_KEY: &str = "LEAKCHECK-wrong-key-9999";

const SECRETS: [&str; 9] = [
    ADMIN_TOKEN,
    GATEWAY_KEY,
    SPARE_GATEWAY_KEY,
    UPSTREAM_KEY,
    REQUEST_ID_KEY,
    USER_ID_KEY,
    "LEAKCHECK-bad",
    SHORT_KEY,
    WRONG_KEY,
];

const PROMPT: &str = "LEAKCHECK-prompt-please-keep-this-private";
const USER_PREFIX: &str = "leakcheck-user-";

/// The gateway's config: control on a mock, treatment on a port nobody
/// listens on (an upstream that is down). `broken` names variables whose
/// values are unusable, as a bad reload might.
fn config(control: &str, dir: &Path, broken: bool) -> String {
    let (gateway_keys, treatment_key, signing_key) = if broken {
        ("SHORT_KEY", "BAD_HEADER_KEY", "SHORT_KEY")
    } else {
        ("GATEWAY_KEYS", "UPSTREAM_KEY", "REQUEST_ID_KEY")
    };
    let extra = format!(
        "[auth]\napi_keys_env = {gateway_keys:?}\n[feedback]\nkey_env = {signing_key:?}\n[events]\npath = {:?}\nuser_id_key_env = \"USER_ID_KEY\"",
        dir.join("events.jsonl").display().to_string(),
    );
    let toml = config_toml(control, "http://127.0.0.1:1", 0.5, &extra);
    let toml = with_api_key_env(&toml, &["control"], "UPSTREAM_KEY");
    with_api_key_env(&toml, &["treatment"], treatment_key)
}

/// Everything the gateway said, collected for the search at the end.
#[derive(Default)]
struct Transcript {
    said: Vec<(String, String)>,
}

impl Transcript {
    fn answer(&mut self, what: &str, answer: &Answer) -> String {
        let mut text = format!("{}\n", answer.status);
        for (name, value) in &answer.headers {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        text.push_str(&answer.text());
        self.said.push((what.to_owned(), text.clone()));
        text
    }

    fn text(&mut self, what: &str, text: String) {
        self.said.push((what.to_owned(), text));
    }
}

struct Spawned {
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    proxy: String,
    admin: std::net::SocketAddr,
}

/// Starts `abgate serve` on `path` and waits for its "serving" line.
async fn spawn_gateway(path: &Path) -> Spawned {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_abgate"))
        .args(["serve", "--config"])
        .arg(path)
        .env("ABGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env(
            "GATEWAY_KEYS",
            format!("{GATEWAY_KEY},\n{SPARE_GATEWAY_KEY}"),
        )
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .env("REQUEST_ID_KEY", REQUEST_ID_KEY)
        .env("USER_ID_KEY", USER_ID_KEY)
        .env("BAD_HEADER_KEY", BAD_HEADER_KEY)
        .env("SHORT_KEY", SHORT_KEY)
        .env("ABGATE_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (found, mut serving) = tokio::sync::mpsc::channel::<String>(1);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let collected = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("abgate serving") {
                let _ = found.send(line.clone()).await;
            }
            let mut text = collected.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    let line = bounded(serving.recv())
        .await
        .expect("the gateway did not start");
    let field = |name: &str| {
        let start = line.find(name).unwrap() + name.len();
        line[start..]
            .split(|c: char| c.is_whitespace() || c == ')')
            .next()
            .unwrap()
            .to_owned()
    };
    Spawned {
        proxy: field("proxy="),
        admin: field("admin=Some(").parse().unwrap(),
        child,
        stderr,
    }
}

fn with_key(key: &str) -> String {
    format!("Bearer {key}")
}

async fn chat_as(base: &str, user: &str, extra: &[(&str, &str)]) -> Answer {
    let body =
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#);
    let bearer = with_key(GATEWAY_KEY);
    let mut headers = vec![("x-user-id", user), ("authorization", bearer.as_str())];
    headers.extend_from_slice(extra);
    post(base, "/v1/chat/completions", &headers, &body).await
}

async fn reload_error_changes(admin: std::net::SocketAddr, before: &serde_json::Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = get(format!("http://{admin}/admin/rollout")).await.json();
        let error = &state["config"]["last_reload_error"];
        if !error.is_null() && error != before {
            return error.as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the broken file was not judged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_an_answer_a_log_a_metric_or_a_file() {
    let control = spawn_mock(abgate_mock::MockConfig::named("base")).await;
    let dir = fresh_dir("secrets");
    let path = dir.join("abgate.toml");
    std::fs::write(&path, config(&control.url(), &dir, false)).unwrap();
    let mut gateway = spawn_gateway(&path).await;
    let (url, admin) = (gateway.proxy.clone(), gateway.admin);
    let mut said = Transcript::default();

    // Successes in control, failures in treatment (its upstream is down).
    let mut completion = String::new();
    let (mut ok, mut down) = (0, 0);
    for i in 0..16 {
        let answer = chat_as(&url, &format!("{USER_PREFIX}{i}"), &[]).await;
        match answer.status.as_u16() {
            200 => {
                ok += 1;
                completion = answer.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
            502 => down += 1,
            other => panic!("unexpected {other}: {}", answer.text()),
        }
        said.answer("chat", &answer);
    }
    assert!(ok > 0 && down > 0, "{ok} served, {down} failed");
    let stream = send(
        Request::post(format!("{url}/v1/chat/completions"))
            .header("authorization", with_key(SPARE_GATEWAY_KEY))
            .header("x-user-id", format!("{USER_PREFIX}stream"))
            .body(Body::full(Bytes::from(format!(
                r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#
            ))))
            .unwrap(),
    )
    .await;
    said.answer("stream", &stream);

    // The upstream's own 401, and the gateway's refusals.
    let unauthorized = chat_as(
        &url,
        &format!("{USER_PREFIX}0"),
        &[("x-mock-status", "401")],
    )
    .await;
    said.answer("upstream 401", &unauthorized);
    let bearer = with_key(GATEWAY_KEY);
    let wrong = with_key(WRONG_KEY);
    for (what, headers, path, body) in [
        (
            "no key",
            vec![("x-user-id", "u")],
            "/v1/chat/completions",
            CHAT,
        ),
        (
            "wrong key",
            vec![("authorization", wrong.as_str())],
            "/v1/chat/completions",
            CHAT,
        ),
        (
            "wrong x-api-key",
            vec![("x-api-key", WRONG_KEY)],
            "/v1/messages",
            CHAT,
        ),
        (
            "bad json",
            vec![("authorization", bearer.as_str())],
            "/v1/chat/completions",
            "{\"model\":",
        ),
        (
            "not found",
            vec![("authorization", bearer.as_str())],
            "/admin/config",
            CHAT,
        ),
        (
            "forced",
            vec![
                ("authorization", bearer.as_str()),
                ("x-abgate-force-variant", "treatment"),
                ("x-abgate-admin-token", ADMIN_TOKEN),
            ],
            "/v1/chat/completions",
            CHAT,
        ),
        (
            "feedback",
            vec![("authorization", bearer.as_str())],
            "/v1/feedback",
            r#"{"request_id":"abg2_c_0_0_0_x","outcome":"completed"}"#,
        ),
    ] {
        let answer = post(&url, path, &headers, body).await;
        assert!(answer.status.is_client_error(), "{what}: {}", answer.status);
        said.answer(what, &answer);
    }
    let too_long = "x".repeat(600);
    said.answer("long user id", &chat_as(&url, &too_long, &[]).await);

    // The admin API, with and without the token.
    for route in [
        "/admin/config",
        "/admin/rollout",
        "/admin/stats",
        "/admin/report",
        "/readyz",
    ] {
        let answer = admin_call(admin, "GET", route, Some(ADMIN_TOKEN), "").await;
        assert_eq!(answer.status, 200, "{route}: {}", answer.text());
        said.answer(route, &answer);
    }
    said.answer(
        "config, wrong token",
        &admin_call(admin, "GET", "/admin/config", Some(WRONG_KEY), "").await,
    );
    let set = admin_call(
        admin,
        "PUT",
        "/admin/rollout",
        Some(ADMIN_TOKEN),
        r#"{"treatment_fraction": 0.25, "reason": "leak check"}"#,
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());
    said.answer("set", &set);
    said.answer(
        "rollback, wrong token",
        &admin_call(admin, "POST", "/admin/rollback", Some(WRONG_KEY), "{}").await,
    );

    // Broken reloads: bad TOML, then a file whose secrets are unusable.
    let before = get(format!("http://{admin}/admin/rollout")).await.json()["config"]
        ["last_reload_error"]
        .clone();
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    let syntax = reload_error_changes(admin, &before).await;
    said.text("reload error (syntax)", syntax.clone());
    let unusable = config(&control.url(), &dir, true);
    std::fs::write(&path, unusable).unwrap();
    let invalid = reload_error_changes(admin, &serde_json::json!(syntax)).await;
    assert!(invalid.contains("auth.api_keys_env"), "{invalid}");
    assert!(
        invalid.contains("variants.treatment.api_key_env"),
        "{invalid}"
    );
    said.text("reload error (secrets)", invalid);
    // Still serving on the config it had.
    said.answer(
        "after reloads",
        &chat_as(&url, &format!("{USER_PREFIX}1"), &[]).await,
    );
    said.answer(
        "rollout after reloads",
        &admin_call(admin, "GET", "/admin/rollout", None, "").await,
    );
    said.text("metrics", scrape(admin).await);

    // Stop it, and collect what it wrote.
    let pid = gateway.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .expect("the gateway did not stop on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut stdout = String::new();
    gateway
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    // The stderr reader ends with the process; give it a moment to drain.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stderr = gateway.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("rejected"),
        "the reloads were logged:\n{stderr}"
    );
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events.lines().count() >= 16, "{events}");
    let audit = std::fs::read_to_string(dir.join("abgate.audit.jsonl")).unwrap();
    assert!(audit.contains("leak check"), "{audit}");
    let state = std::fs::read_to_string(dir.join("abgate.state.json")).unwrap();
    let written = [
        ("stdout", stdout),
        ("stderr", stderr),
        ("events", events),
        ("audit", audit),
        ("state", state),
    ];

    let everything = said
        .said
        .iter()
        .map(|(what, text)| (what.as_str(), text))
        .chain(written.iter().map(|(what, text)| (*what, text)));
    for (what, text) in everything {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} leaked in {what}:\n{text}");
        }
        // A key's tail would do as much harm as the key.
        for secret in [
            ADMIN_TOKEN,
            GATEWAY_KEY,
            UPSTREAM_KEY,
            REQUEST_ID_KEY,
            USER_ID_KEY,
        ] {
            let tail = &secret[secret.len() - 12..];
            assert!(!text.contains(tail), "{tail} leaked in {what}");
        }
    }
    for (what, text) in &written {
        assert!(
            !text.contains(USER_PREFIX),
            "a raw user ID in {what}:\n{text}"
        );
        assert!(!text.contains(PROMPT), "the prompt in {what}");
        assert!(!text.contains(&completion), "the completion in {what}");
    }
}
