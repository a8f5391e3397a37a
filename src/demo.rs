//! `abgate demo`: the gateway's main job on an embedded default, with no
//! API keys: two mock model upstreams on loopback and the gateway in front of
//! them. With `--traffic N` it also drives synthetic users through the
//! gateway and prints what each arm saw.
#![allow(clippy::print_stdout)] // the demo talks to a person at a terminal

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::assign::Variant;
use crate::body::Body;
use crate::config::{Config, ProcessEnv};
use crate::mock::{self, MockConfig};

/// The config the demo runs, with placeholder upstreams.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Options of `abgate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Send this many requests from N/10 synthetic users, print a summary, exit.
    #[arg(long)]
    pub traffic: Option<usize>,
    /// Proxy address (default 127.0.0.1:8080; an ephemeral port with --traffic).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin address (default 127.0.0.1:9090; an ephemeral port with --traffic).
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Share of users on the fine-tuned mock.
    #[arg(long, default_value_t = 0.10)]
    pub fraction: f64,
    /// Requests in flight at once with --traffic.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
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
            latency: Duration::from_millis(30),
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
            let summary = drive_traffic(&url, requests, args.concurrency.max(1)).await;
            print!("{}", summary.table());
        }
    }
    running.shutdown().await;
    base.shutdown().await;
    fine_tuned.shutdown().await;
    Ok(())
}

/// What one arm saw from the client's side.
#[derive(Debug, Default, Clone)]
pub struct ArmSummary {
    pub requests: usize,
    pub errors: usize,
    latencies: Vec<Duration>,
    users: std::collections::BTreeSet<usize>,
}

/// Per-variant results of a traffic run.
#[derive(Debug, Default)]
pub struct TrafficSummary {
    pub control: ArmSummary,
    pub treatment: ArmSummary,
    pub unassigned: ArmSummary,
    /// Requests that got no answer at all (transport failure).
    pub failed: usize,
}

impl TrafficSummary {
    fn arm(&mut self, variant: Variant) -> &mut ArmSummary {
        match variant {
            Variant::Control => &mut self.control,
            Variant::Treatment => &mut self.treatment,
            Variant::Unassigned => &mut self.unassigned,
        }
    }

    /// The per-variant table `demo --traffic` prints.
    pub fn table(&self) -> String {
        let total: usize = [&self.control, &self.treatment, &self.unassigned]
            .iter()
            .map(|arm| arm.requests)
            .sum();
        let mut out = format!(
            "\n{:<11} {:>8} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9}\n",
            "variant", "requests", "share", "errors", "users", "mean ms", "p50 ms", "p95 ms"
        );
        for (name, arm) in [
            ("control", &self.control),
            ("treatment", &self.treatment),
            ("unassigned", &self.unassigned),
        ] {
            if arm.requests == 0 && name == "unassigned" {
                continue;
            }
            let share = if total == 0 {
                0.0
            } else {
                100.0 * arm.requests as f64 / total as f64
            };
            out.push_str(&format!(
                "{:<11} {:>8} {:>6.1}% {:>7} {:>6} {:>9.1} {:>9.1} {:>9.1}\n",
                name,
                arm.requests,
                share,
                arm.errors,
                arm.users.len(),
                millis(arm.mean()),
                millis(arm.percentile(0.50)),
                millis(arm.percentile(0.95)),
            ));
        }
        if self.failed > 0 {
            out.push_str(&format!("{} request(s) got no answer\n", self.failed));
        }
        out
    }
}

impl ArmSummary {
    fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.latencies.len())
            .ok()
            .filter(|n| *n > 0)?;
        Some(self.latencies.iter().sum::<Duration>() / count)
    }

    /// Nearest-rank percentile.
    fn percentile(&self, quantile: f64) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = (quantile * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.saturating_sub(1)).copied()
    }
}

fn millis(duration: Option<Duration>) -> f64 {
    duration.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// Sends `requests` chat completions from `requests / 10` users (each user
/// sends about ten, one in four streamed) with `concurrency` in flight.
pub async fn drive_traffic(url: &str, requests: usize, concurrency: usize) -> TrafficSummary {
    let users = (requests / 10).max(1);
    let client: Client<_, Body> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(requests.max(1)) {
        let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
        workers.spawn(async move {
            let mut summary = TrafficSummary::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    break summary;
                }
                let user = index % users;
                let stream = index % 4 == 3;
                let started = Instant::now();
                match one_request(&client, &url, user, stream).await {
                    Some((variant, ok)) => {
                        let arm = summary.arm(variant);
                        arm.requests += 1;
                        arm.users.insert(user);
                        if ok {
                            arm.latencies.push(started.elapsed());
                        } else {
                            arm.errors += 1;
                        }
                    }
                    None => summary.failed += 1,
                }
            }
        });
    }
    let mut total = TrafficSummary::default();
    while let Some(Ok(part)) = workers.join_next().await {
        for variant in [Variant::Control, Variant::Treatment, Variant::Unassigned] {
            let (from, into) = match variant {
                Variant::Control => (part.control.clone(), &mut total.control),
                Variant::Treatment => (part.treatment.clone(), &mut total.treatment),
                Variant::Unassigned => (part.unassigned.clone(), &mut total.unassigned),
            };
            into.requests += from.requests;
            into.errors += from.errors;
            into.latencies.extend(from.latencies);
            into.users.extend(from.users);
        }
        total.failed += part.failed;
    }
    total
}

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// One request through the gateway: the variant it reported and whether it
/// succeeded (2xx and the whole body read).
async fn one_request(
    client: &DemoClient,
    url: &str,
    user: usize,
    stream: bool,
) -> Option<(Variant, bool)> {
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
    let ok = response.status().is_success();
    let read = response.into_body().collect().await.is_ok();
    Some((variant, ok && read))
}
