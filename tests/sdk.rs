//! Real clients: the official `openai` and `anthropic` Python SDKs drive the
//! gateway through `base_url` (tests/sdk/test_sdk.py). The SDKs are installed
//! from PyPI into target/sdk-venv by tests/sdk/setup.sh, which this test runs
//! (it does nothing when the venv is already there).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// The key the SDKs are given.
const GATEWAY_KEY: &str = "sdk-gateway-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_work_through_the_gateway() {
    let root = env!("CARGO_MANIFEST_DIR");
    let setup = tokio::process::Command::new("bash")
        .arg(format!("{root}/tests/sdk/setup.sh"))
        .status()
        .await
        .expect("bash runs tests/sdk/setup.sh");
    assert!(
        setup.success(),
        "tests/sdk/setup.sh could not install the SDKs from PyPI"
    );

    let (control, treatment) = mocks().await;
    // A short idle timeout, for the tests of a stream the gateway cuts off,
    // and gateway keys, which the SDKs send as their api_key.
    let extra = "[timeouts]\nidle_ms = 500\n[auth]\napi_keys_env = \"GW_KEYS\"";
    let keys = BTreeMap::from([("GW_KEYS".to_owned(), GATEWAY_KEY.to_owned())]);
    let gw = gateway_with_env(
        &config_toml(&control.url(), &treatment.url(), 0.5, extra),
        keys,
    )
    .await;
    let venv =
        std::env::var("ABGATE_SDK_VENV").unwrap_or_else(|_| format!("{root}/target/sdk-venv"));
    let pytest = tokio::process::Command::new(format!("{venv}/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk"])
        .current_dir(root)
        .env("ABGATE_URL", gw.url())
        .env("ABGATE_FRACTION", "0.5")
        .env("ABGATE_API_KEY", GATEWAY_KEY)
        .env("ABGATE_CONTROL_MODEL", "base-model")
        .env("ABGATE_TREATMENT_MODEL", "ft:base-model:acme:v3")
        .env("ABGATE_CONTROL_NAME", "base")
        .env("ABGATE_TREATMENT_NAME", "fine-tuned")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), pytest)
        .await
        .expect("the SDK tests finish within 3 minutes")
        .expect("the venv's python runs");
    let out = String::from_utf8_lossy(&output.stdout);
    println!("{out}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "SDK tests failed:\n{out}");
    assert!(out.contains(" passed"), "pytest ran no test:\n{out}");
    assert!(control.request_count() > 0 && treatment.request_count() > 0);
    // The SDKs sent the gateway key; no upstream ever saw it.
    for request in control.requests().iter().chain(&treatment.requests()) {
        assert!(request.headers.values().all(|value| !value
            .as_bytes()
            .windows(GATEWAY_KEY.len())
            .any(|w| w == GATEWAY_KEY.as_bytes())));
    }
}
