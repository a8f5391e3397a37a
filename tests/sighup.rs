//! SIGHUP reloads the config file. A binary of its own: the signal goes to
//! the whole test process, and would reload every other test's gateway too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use abgate::proxy::body::Body;
use common::*;
use http::Request;

async fn generation(admin: std::net::SocketAddr) -> u64 {
    let state = send(
        Request::get(format!("http://{admin}/admin/rollout"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    state["config"]["generation"].as_u64().unwrap()
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_file() {
    let (control, treatment) = mocks().await;
    let path = temp_config(
        "sighup",
        &config_toml(&control.url(), &treatment.url(), 0.25, ""),
    );
    let gw = abgate::app::start_from_file(&path, None).await.unwrap();
    let admin = gw.admin_addr.unwrap();
    let before = generation(admin).await;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation(admin).await <= before {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
