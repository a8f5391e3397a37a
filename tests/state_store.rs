//! The fleet's shared rollout state: three gateways on one real Redis
//! (Debian's `redis-server`, started here on a loopback port). A change
//! on one reaches the others within a second; concurrent changes are
//! settled by version; with the store stopped, traffic goes on, changes
//! are refused, and the replicas resync once it returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A redis-server on a free loopback port, stopped when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn fleet(redis: &Redis, count: usize) -> Fleet {
    let (control, treatment) = mocks().await;
    fleet_of(redis, count, control, treatment, "").await
}

type Fleet = (
    Vec<abgate::app::Running>,
    abgate_mock::MockHandle,
    abgate_mock::MockHandle,
);

async fn fleet_of(
    redis: &Redis,
    count: usize,
    control: abgate_mock::MockHandle,
    treatment: abgate_mock::MockHandle,
    more: &str,
) -> Fleet {
    let extra = format!(
        "[admin]\ntoken_env = \"T\"\n[feedback]\nkey_env = \"FLEET_KEY\"\n[state]\nurl = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let toml = config_toml(
        &control.url(),
        &treatment.url(),
        0.05,
        &format!("{extra}{more}"),
    );
    let mut replicas = Vec::new();
    for _ in 0..count {
        let mut env = token_env();
        env.insert("FLEET_KEY".into(), "fleet-feedback-key-0123456789".into());
        replicas.push(gateway_with_env(&toml, env).await);
    }
    (replicas, control, treatment)
}

/// An admin API error: its status, string code, and a message that
/// mentions `mentions`.
fn admin_error(answer: &Answer, status: u16, code: &str, mentions: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let error = &answer.json()["error"];
    assert_eq!(error["code"], code, "{}", answer.text());
    assert!(
        error["message"].as_str().unwrap().contains(mentions),
        "{}",
        answer.text()
    );
}

async fn rollout(replica: &abgate::app::Running) -> Value {
    admin_call(
        replica.admin_addr.unwrap(),
        "GET",
        "/admin/rollout",
        None,
        "",
    )
    .await
    .json()
}

async fn put(replica: &abgate::app::Running, body: &str) -> Answer {
    admin_call(
        replica.admin_addr.unwrap(),
        "PUT",
        "/admin/rollout",
        Some(TOKEN),
        body,
    )
    .await
}

/// Waits until every replica shows `fraction`; how long the last took.
async fn all_at(replicas: &[abgate::app::Running], fraction: f64, since: Instant) -> Duration {
    let mut slowest = Duration::ZERO;
    for replica in replicas {
        let seen = eventually(Duration::from_secs(3), || async {
            (rollout(replica).await["treatment_fraction"] == fraction).then(|| since.elapsed())
        })
        .await;
        let Some(seen) = seen else {
            panic!(
                "a replica did not apply {fraction}: {:#}",
                rollout(replica).await
            );
        };
        slowest = slowest.max(seen);
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_reaches_every_replica_within_a_second() {
    let redis = Redis::start();
    let (replicas, _control, _treatment) = fleet(&redis, 3).await;
    let started = Instant::now();
    let answer = put(
        &replicas[0],
        r#"{"treatment_fraction": 0.25, "reason": "stage 2"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let took = all_at(&replicas, 0.25, started).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    eprintln!("set on one replica: every replica applied it within {took:?}");
    let state = rollout(&replicas[2]).await;
    assert_eq!(state["state_store"]["up"], true, "{state:#}");
    assert_eq!(state["state_store"]["version"], 1, "{state:#}");
    assert_eq!(
        (state["source"].as_str(), state["reason"].as_str()),
        (Some("api"), Some("stage 2"))
    );

    // A rollback on another replica reaches the first.
    let started = Instant::now();
    let answer = admin_call(
        replicas[2].admin_addr.unwrap(),
        "POST",
        "/admin/rollback",
        Some(TOKEN),
        r#"{"reason": "errors"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let took = all_at(&replicas, 0.0, started).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    eprintln!("rollback on another: every replica applied it within {took:?}");
    for i in 0..20 {
        let answer = chat(&replicas[0].url(), &format!("user-{i}")).await;
        assert_eq!(answer.header("x-abgate-variant"), "control");
    }
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_are_settled_by_version_and_the_loser_is_told() {
    let redis = Redis::start();
    let (replicas, _control, _treatment) = fleet(&redis, 2).await;
    let version = rollout(&replicas[0]).await["state_store"]["version"]
        .as_u64()
        .unwrap();
    // Two operators read the same version and each changes the split.
    let first = put(
        &replicas[0],
        &format!(r#"{{"treatment_fraction": 0.25, "expected_version": {version}}}"#),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = put(
        &replicas[1],
        &format!(r#"{{"treatment_fraction": 0.5, "expected_version": {version}}}"#),
    )
    .await;
    admin_error(
        &second,
        409,
        "state_conflict",
        &format!("version {}", version + 1),
    );
    // The loser's replica shows the winner's change, not its own.
    all_at(&replicas, 0.25, Instant::now()).await;
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_stopped_traffic_goes_on_and_changes_wait() {
    let redis = Redis::start();
    let (replicas, _control, _treatment) = fleet(&redis, 2).await;
    let answer = put(&replicas[0], r#"{"treatment_fraction": 0.25}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    all_at(&replicas, 0.25, Instant::now()).await;

    redis.signal("STOP");
    // Every request is answered, on the state the replicas had.
    let ok = traffic(&replicas[1].url(), "user-", 200, 400, 8).await;
    assert_eq!(ok, 400);
    let refused = put(&replicas[0], r#"{"treatment_fraction": 0.5}"#).await;
    admin_error(&refused, 503, "state_store_unavailable", "nothing changed");
    let state = rollout(&replicas[0]).await;
    assert_eq!(state["treatment_fraction"], 0.25, "{state:#}");
    assert_eq!(state["state_store"]["up"], false, "{state:#}");
    let admin = replicas[1].admin_addr.unwrap();
    let gauge = |up: &'static str| async move {
        eventually(Duration::from_secs(6), || async {
            scrape(admin)
                .await
                .contains(&format!("abgate_state_store_up {up}"))
                .then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("abgate_state_store_up never read {up}"));
    };
    gauge("0").await;

    redis.signal("CONT");
    // Back: the replicas resync on their own, and changes go through.
    gauge("1").await;
    let started = Instant::now();
    let answer = put(&replicas[1], r#"{"treatment_fraction": 0.5}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    all_at(&replicas, 0.5, started).await;
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_replayed_to_another_replica_is_refused() {
    let redis = Redis::start();
    let (replicas, _control, _treatment) = fleet(&redis, 2).await;
    let answer = chat(&replicas[0].url(), "user-1").await;
    let id = answer.header("x-abgate-request-id").to_owned();
    let report = format!(r#"{{"request_id":"{id}","outcome":"completed","rating":5}}"#);
    let first = post(&replicas[1].url(), "/v1/feedback", &[], &report).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // The same report to the replica that served it, and to the first
    // again: the fleet has counted it.
    for replica in [&replicas[0], &replicas[1]] {
        let replay = post(&replica.url(), "/v1/feedback", &[], &report).await;
        assert_eq!(replay.status, 409, "{}", replay.text());
        assert_eq!(replay.json()["error"]["code"], "duplicate_feedback");
    }
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_guards_the_fleet_and_hands_the_lease_over() {
    let redis = Redis::start();
    let control = spawn_mock(abgate_mock::MockConfig::named("base")).await;
    let treatment = spawn_mock(abgate_mock::MockConfig {
        fault_rate: 0.10,
        seed: 7,
        ..abgate_mock::MockConfig::named("fine-tuned")
    })
    .await;
    let guard = "[guardrails]\ninterval_seconds = 0.2\nmin_requests_per_arm = 150\n";
    let (mut replicas, _control, _treatment) = fleet_of(&redis, 3, control, treatment, guard).await;
    let answer = put(&replicas[0], r#"{"treatment_fraction": 0.5}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    all_at(&replicas, 0.5, Instant::now()).await;
    let leaders = |replicas: &[abgate::app::Running]| {
        let admins: Vec<_> = replicas.iter().map(|r| r.admin_addr.unwrap()).collect();
        async move {
            let mut found = Vec::new();
            for (i, admin) in admins.into_iter().enumerate() {
                let report = admin_call(admin, "GET", "/admin/report", None, "")
                    .await
                    .json();
                if report["guardrails"]["leader"] == true {
                    found.push(i);
                }
            }
            found
        }
    };
    let one = eventually(Duration::from_secs(3), || async {
        let found = leaders(&replicas).await;
        (found.len() == 1).then_some(found)
    })
    .await;
    assert!(one.is_some(), "exactly one replica holds the guard's lease");

    // Every replica sees the failing treatment; one trips, all roll back.
    for replica in &replicas {
        traffic(&replica.url(), "user-", 500, 800, 16).await;
    }
    all_at(&replicas, 0.0, Instant::now()).await;
    let mut trips = 0.0;
    for replica in &replicas {
        let text = scrape(replica.admin_addr.unwrap()).await;
        trips +=
            sample(&text, r#"abgate_guardrail_trips_total{check="error_rate"}"#).unwrap_or(0.0);
        let state = rollout(replica).await;
        assert_eq!(state["held_by_guardrail"], true, "{state:#}");
    }
    assert_eq!(trips, 1.0, "one trip for the fleet");

    // The leader goes away: another takes the lease within its expiry.
    let leader = leaders(&replicas).await[0];
    let gone = replicas.remove(leader);
    gone.shutdown().await;
    let started = Instant::now();
    let took = eventually(Duration::from_secs(8), || async {
        (leaders(&replicas).await.len() == 1).then(|| started.elapsed())
    })
    .await
    .expect("a replica takes the lease over");
    eprintln!("the lease moved to another replica within {took:?}");
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_while_the_store_is_down_keeps_the_fleets_rollback() {
    std::env::set_var("ABGATE_STORE_TEST_TOKEN", TOKEN);
    let redis = Redis::start();
    let (control, treatment) = mocks().await;
    let extra = format!(
        "[admin]\ntoken_env = \"ABGATE_STORE_TEST_TOKEN\"\n[state]\nurl = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let path = temp_config(
        "store-restart",
        &config_toml(&control.url(), &treatment.url(), 0.05, &extra),
    );
    let dir = fresh_dir("store-restart-state");
    let start = || abgate::app::start_from_file(&path, Some(&dir));
    let replica = start().await.unwrap();
    let other = gateway_with_env(
        &std::fs::read_to_string(&path).unwrap(),
        BTreeMap::from([("ABGATE_STORE_TEST_TOKEN".to_owned(), TOKEN.to_owned())]),
    )
    .await;
    // A rollout, then a fleet rollback made on the other replica.
    let answer = put(&other, r#"{"treatment_fraction": 0.25}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    all_at(std::slice::from_ref(&replica), 0.25, Instant::now()).await;
    let answer = admin_call(
        other.admin_addr.unwrap(),
        "POST",
        "/admin/rollback",
        Some(TOKEN),
        r#"{"reason":"errors"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    all_at(std::slice::from_ref(&replica), 0.0, Instant::now()).await;

    // The store goes away, and the replica restarts meanwhile: it starts
    // from the state it cached, not from the file's 5%.
    redis.signal("STOP");
    replica.shutdown().await;
    let replica = start().await.unwrap();
    let state = rollout(&replica).await;
    assert_eq!(state["treatment_fraction"], 0.0, "{state:#}");
    assert_eq!(state["config_fraction"], 0.05, "{state:#}");
    for i in 0..20 {
        let answer = chat(&replica.url(), &format!("user-{i}")).await;
        assert_eq!(answer.header("x-abgate-variant"), "control");
    }
    redis.signal("CONT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let state = rollout(&replica).await;
    assert_eq!(state["treatment_fraction"], 0.0, "{state:#}");
    assert_eq!(state["state_store"]["version"], 2, "{state:#}");
    replica.shutdown().await;
    other.shutdown().await;
}
