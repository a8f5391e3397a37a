//! `abgate demo`: the gateway's main job on an embedded default, with no
//! API keys: two mock model upstreams on loopback and the gateway in front of
//! them. With `--traffic N` it also drives synthetic users through the
//! gateway and prints what each arm saw.
#![allow(clippy::print_stdout)] // the demo talks to a person at a terminal

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, ProcessEnv};
use crate::experiment::assign::Variant;
use crate::proxy::body::Body;
use crate::telemetry::metrics::ExperimentMetrics;
use abgate_mock::{self as mock, MockConfig};

/// The config the demo runs, with placeholder upstreams.
pub(crate) const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Options of `abgate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Send this many requests from N/10 synthetic users, print a summary, exit.
    #[arg(long)]
    pub(crate) traffic: Option<usize>,
    /// Proxy address (default 127.0.0.1:8080; an ephemeral port with --traffic).
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Admin address (default 127.0.0.1:9090; an ephemeral port with --traffic).
    #[arg(long)]
    pub(crate) admin_listen: Option<SocketAddr>,
    /// Share of users on the fine-tuned mock.
    #[arg(long, default_value_t = 0.10)]
    pub(crate) fraction: f64,
    /// Requests in flight at once with --traffic.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
}

/// Runs the demo until Ctrl-C, or until the traffic summary is printed.
pub async fn run(args: DemoArgs) -> Result<(), String> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let ephemeral = args.traffic.is_some();
    let base = mock::spawn(
        loopback(0),
        MockConfig {
            latency: Duration::from_millis(20),
            ..MockConfig::named("base")
        },
    )
    .await
    .map_err(|err| format!("cannot start the base mock: {err}"))?;
    let fine_tuned = mock::spawn(
        loopback(0),
        MockConfig {
            latency: Duration::from_millis(22),
            ..MockConfig::named("fine-tuned")
        },
    )
    .await
    .map_err(|err| format!("cannot start the fine-tuned mock: {err}"))?;

    let mut config = Config::parse(DEMO_CONFIG).map_err(|err| err.to_string())?;
    config.variants.control.upstream = base.url();
    config.variants.treatment.upstream = fine_tuned.url();
    config.experiment.treatment_fraction = args.fraction;
    let default_port = |port| {
        if ephemeral {
            loopback(0)
        } else {
            loopback(port)
        }
    };
    config.server.listen = args.listen.unwrap_or(default_port(8080)).to_string();
    config.server.admin_listen = Some(args.admin_listen.unwrap_or(default_port(9090)).to_string());
    let snapshot = config
        .validate(&ProcessEnv, Path::new("."))
        .map_err(|err| err.to_string())?;
    let (control_model, treatment_model) = (
        config.variants.control.model.clone().unwrap_or_default(),
        config.variants.treatment.model.clone().unwrap_or_default(),
    );
    let running = crate::app::start(snapshot)
        .await
        .map_err(|err| format!("{err} (pick free ports with --listen and --admin-listen)"))?;
    let url = running.url();

    println!(
        "abgate demo: experiment \"demo\", {}% of users on the fine-tuned model",
        args.fraction * 100.0
    );
    println!("  proxy      {url}");
    if let Some(admin) = running.admin_addr {
        println!("  admin      http://{admin}/healthz");
    }
    println!(
        "  control    {} (mock \"base\", model {control_model})",
        base.url()
    );
    println!(
        "  treatment  {} (mock \"fine-tuned\", model {treatment_model})",
        fine_tuned.url()
    );

    match args.traffic {
        None => {
            println!("Try it (change the user to move between arms):");
            println!(
                "  curl -si {url}/v1/chat/completions -H 'content-type: application/json' -H 'x-user-id: alice' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
            );
            println!("Ctrl-C stops it.");
            let _ = tokio::signal::ctrl_c().await;
        }
        Some(requests) => {
            let run = drive_traffic(&url, requests, args.concurrency.max(1)).await;
            // A request is recorded when its last byte has left; give the
            // final few a moment to land before reading the stats.
            let live = running.gateway.live();
            let expected = (requests - run.failed) as u64;
            for _ in 0..100 {
                let seen: u64 = crate::telemetry::metrics::VARIANTS
                    .iter()
                    .map(|v| live.metrics.arm_stats(*v).requests)
                    .sum();
                if seen >= expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            print!("{}", table(&live.metrics, &run));
        }
    }
    running.shutdown().await;
    base.shutdown().await;
    fine_tuned.shutdown().await;
    Ok(())
}

/// What the traffic run saw from the client's side: which users landed in
/// which arm (the gateway counts requests, never users) and transport
/// failures the gateway could not see.
#[derive(Debug, Default)]
pub(crate) struct TrafficRun {
    pub(crate) users: [std::collections::BTreeSet<usize>; 3],
    /// Requests that got no answer at all.
    pub(crate) failed: usize,
}

fn arm_index(variant: Variant) -> usize {
    match variant {
        Variant::Control => 0,
        Variant::Treatment => 1,
        Variant::Unassigned => 2,
    }
}

/// The per-variant table `demo --traffic` prints: the gateway's own stats
/// (the numbers `/admin/stats` serves) beside the users each arm got.
pub(crate) fn table(metrics: &ExperimentMetrics, run: &TrafficRun) -> String {
    let stats =
        crate::telemetry::metrics::VARIANTS.map(|variant| (variant, metrics.arm_stats(variant)));
    let total: u64 = stats.iter().map(|(_, arm)| arm.requests).sum();
    let ms = |seconds: Option<f64>| seconds.map_or(f64::NAN, |s| s * 1000.0);
    let mut out = format!(
        "\n{:<11} {:>8} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>10} {:>11}\n",
        "variant",
        "requests",
        "share",
        "errors",
        "users",
        "mean ms",
        "p50 ms",
        "p95 ms",
        "ttfb p95",
        "out tokens"
    );
    for (variant, arm) in &stats {
        if arm.requests == 0 && *variant == Variant::Unassigned {
            continue;
        }
        let share = if total == 0 {
            0.0
        } else {
            100.0 * arm.requests as f64 / total as f64
        };
        out.push_str(&format!(
            "{:<11} {:>8} {:>6.1}% {:>7} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>11}\n",
            variant.as_str(),
            arm.requests,
            share,
            arm.errors,
            run.users[arm_index(*variant)].len(),
            ms(arm.latency_seconds.mean),
            ms(arm.latency_seconds.p50),
            ms(arm.latency_seconds.p95),
            ms(arm.time_to_first_byte_seconds.p95),
            arm.completion_tokens,
        ));
    }
    if run.failed > 0 {
        out.push_str(&format!("{} request(s) got no answer\n", run.failed));
    }
    out.push_str("Latency quantiles are interpolated from the histogram buckets, as a dashboard shows them.\n");
    out
}

/// Sends `requests` chat completions from `requests / 10` users (each user
/// sends about ten, one in four streamed) with `concurrency` in flight.
pub(crate) async fn drive_traffic(url: &str, requests: usize, concurrency: usize) -> TrafficRun {
    let users = (requests / 10).max(1);
    let client: Client<_, Body> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(requests.max(1)) {
        let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
        workers.spawn(async move {
            let mut run = TrafficRun::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    break run;
                }
                let user = index % users;
                match one_request(&client, &url, user, index % 4 == 3).await {
                    Some(variant) => {
                        run.users[arm_index(variant)].insert(user);
                    }
                    None => run.failed += 1,
                }
            }
        });
    }
    let mut total = TrafficRun::default();
    while let Some(Ok(part)) = workers.join_next().await {
        for (into, from) in total.users.iter_mut().zip(part.users) {
            into.extend(from);
        }
        total.failed += part.failed;
    }
    total
}

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// One request through the gateway, read to the end: the variant it
/// reported, or `None` if no answer came.
async fn one_request(client: &DemoClient, url: &str, user: usize, stream: bool) -> Option<Variant> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"Summarise my last support email, please."}}]}}"#
    );
    let request = Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-user-id", format!("demo-user-{user}"))
        .body(Body::full(Bytes::from(body)))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let variant = match response
        .headers()
        .get(crate::proxy::VARIANT_HEADER)
        .map(|v| v.as_bytes())
    {
        Some(b"treatment") => Variant::Treatment,
        Some(b"control") => Variant::Control,
        _ => Variant::Unassigned,
    };
    response.into_body().collect().await.ok()?;
    Some(variant)
}
