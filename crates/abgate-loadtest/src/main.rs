//! `loadtest`: the load generator behind `loadtest/compare.sh`.
//!
//! - `loadtest run`: drives one server with OpenAI chat requests from many
//!   synthetic users, open loop (`--rate`) or closed loop (`--concurrency`),
//!   plain or SSE (`--stream`), and prints (and writes with `--json`) its
//!   latency percentiles, throughput, errors and the watched server
//!   process's CPU and memory.
//! - `loadtest report`: turns several runs into the comparison table.
//! - `loadtest plot`: draws their latency-by-percentile curves as SVG.
#![allow(clippy::print_stdout)] // a CLI's job is to print

mod generate;
mod plot;
mod process;
mod record;
mod report;
mod request;
mod result;
mod wire;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use generate::{Load, Plan};
use process::ProcessUse;
use request::{RequestTemplate, TemplateSpec};
use result::RunResult;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for abgate and its peers: latency percentiles, throughput, server CPU and memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive one server and report what it did.
    Run(RunArgs),
    /// Combine runs (their --json files) into the comparison table.
    Report(ReportArgs),
    /// Draw the runs' latency by percentile as an SVG.
    Plot(PlotArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Where to send: `http://host:port/path`.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/chat/completions")]
    url: String,
    /// Open loop at this many requests per second (`2000` or `2000/s`).
    #[arg(long, value_parser = parse_rate, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop with this many requests in flight, one connection each.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Measurement window (`10s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Load before the window, not recorded (connections warm up here).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Ask for SSE streams and time the first chunk and the gaps.
    #[arg(long)]
    stream: bool,
    /// Distinct synthetic user IDs, picked at random per request.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Header carrying the user ID.
    #[arg(long, default_value = "x-user-id")]
    user_header: String,
    /// `model` in the request body.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Extra request header, `name: value`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Generator threads; default: the CPUs this process may run on.
    #[arg(long)]
    threads: Option<usize>,
    /// Open loop: most connections open at once.
    #[arg(long, default_value_t = 4096)]
    connections: usize,
    /// Longest one request may take once sent.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Name of what is measured, in the table and the JSON.
    #[arg(long, default_value = "target")]
    label: String,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Server process to charge CPU and memory to; repeatable (nginx's
    /// master and worker).
    #[arg(long = "watch-pid")]
    watch_pids: Vec<u32>,
}

#[derive(Args)]
struct ReportArgs {
    /// Run results (`loadtest run --json`), in row order.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The label whose latency the others are compared with.
    #[arg(long, default_value = "direct")]
    baseline: String,
    /// A line describing the machine, written above the tables.
    #[arg(long, default_value = "")]
    machine: String,
    /// Write the tables as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write the comparison (and every run) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct PlotArgs {
    /// Run results to draw, one curve each.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(long)]
    out: PathBuf,
    /// Which distribution: latency, first-chunk or chunk-gap.
    #[arg(long, default_value = "latency")]
    metric: plot::Metric,
    /// Chart title; default: the metric and the first run's load.
    #[arg(long)]
    title: Option<String>,
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Run(args) => run(&args),
        Command::Report(args) => report(&args),
        Command::Plot(args) => plot(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadtest: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> Result<(), String> {
    let load = match (args.rate, args.concurrency) {
        (Some(rate), None) if rate > 0.0 && rate.is_finite() => Load::Open {
            rate,
            max_connections: args.connections.max(1),
        },
        (None, Some(concurrency)) if concurrency > 0 => Load::Closed { concurrency },
        _ => return Err("give either --rate N (> 0) or --concurrency N (> 0)".to_owned()),
    };
    if args.duration.is_zero() {
        return Err("--duration must be more than zero".to_owned());
    }
    let template = Arc::new(RequestTemplate::new(&TemplateSpec {
        url: &args.url,
        users: args.users,
        user_header: &args.user_header,
        stream: args.stream,
        headers: &args.headers,
        model: &args.model,
    })?);
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let plan = Plan {
        load,
        warmup: args.warmup,
        duration: args.duration,
        stream: args.stream,
        threads,
        timeout: args.timeout,
    };
    let running = generate::start(plan, template.clone())?;

    // The server's CPU is read at both ends of the window, from this thread
    // while the generator threads work.
    let watched = !args.watch_pids.is_empty();
    sleep_until(running.window.measure_from);
    let cpu_before = watched
        .then(|| process::cpu_seconds(&args.watch_pids))
        .transpose()?;
    // Memory at the window's start and end: growth under a steady load
    // shows between the two (a soak), where the peak alone cannot.
    let memory_before = watched
        .then(|| process::memory(&args.watch_pids))
        .transpose()?;
    sleep_until(running.window.end);
    let cpu_after = watched
        .then(|| process::cpu_seconds(&args.watch_pids))
        .transpose()?;
    let outcome = running.finish()?;
    let recorder = &outcome.recorder;

    let seconds = args.duration.as_secs_f64();
    let throughput = recorder.ok as f64 / seconds;
    let process = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            let cpu_seconds = (after - before).max(0.0);
            Some(ProcessUse {
                pids: args.watch_pids.clone(),
                cpu_seconds,
                cpu_seconds_per_10k: if recorder.ok > 0 {
                    cpu_seconds * 10_000.0 / recorder.ok as f64
                } else {
                    0.0
                },
                cpu_cores: cpu_seconds / seconds,
                rss_at_start_kib: memory_before.map_or(0, |memory| memory.rss_kib),
                memory: process::memory(&args.watch_pids)?,
            })
        }
        _ => None,
    };
    let (rate, concurrency) = match load {
        Load::Open { rate, .. } => (Some(rate), None),
        Load::Closed { concurrency } => (None, Some(concurrency)),
    };
    let result = RunResult {
        label: args.label.clone(),
        url: args.url.clone(),
        mode: if rate.is_some() { "open" } else { "closed" }.to_owned(),
        rate,
        concurrency,
        stream: args.stream,
        threads,
        users: template.user_count(),
        warmup_seconds: args.warmup.as_secs_f64(),
        duration_seconds: seconds,
        sent: recorder.sent,
        ok: recorder.ok,
        errors: recorder.errors.clone(),
        unanswered: recorder.unanswered,
        throughput_rps: throughput,
        max_inflight: outcome.max_inflight,
        connections: outcome.connections,
        latency_us: recorder.latency.summary(),
        schedule_lag_us: rate.and_then(|_| recorder.schedule_lag.summary()),
        first_chunk_us: recorder.first_chunk.summary(),
        chunk_gap_us: recorder.chunk_gap.summary(),
        events_per_stream: (args.stream && recorder.ok > 0)
            .then(|| recorder.events as f64 / recorder.ok as f64),
        process,
    };
    print!("{}", result.table());
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    Ok(())
}

fn report(args: &ReportArgs) -> Result<(), String> {
    let runs = read_runs(&args.runs)?;
    let comparison = report::Comparison::new(&runs, &args.baseline, &args.machine);
    print!("{}", comparison.text());
    if let Some(path) = &args.markdown {
        std::fs::write(path, comparison.markdown())
            .map_err(|err| format!("{}: {err}", path.display()))?;
    }
    if let Some(path) = &args.json {
        write_json(path, &comparison)?;
    }
    Ok(())
}

fn plot(args: &PlotArgs) -> Result<(), String> {
    let runs = read_runs(&args.runs)?;
    plot::draw(&runs, args.metric, args.title.as_deref(), &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|err| err.to_string())?;
    std::fs::write(path, text + "\n").map_err(|err| format!("{}: {err}", path.display()))
}

fn read_runs(paths: &[PathBuf]) -> Result<Vec<RunResult>, String> {
    paths.iter().map(|path| read_json(path)).collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    serde_json::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))
}

/// `2000` or `2000/s`.
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    number
        .parse::<f64>()
        .ok()
        .filter(|rate| *rate > 0.0 && rate.is_finite())
        .ok_or_else(|| format!("{text:?} is not a rate: write e.g. 2000 or 2000/s"))
}

/// `250ms`, `10s`, `1.5s`, `2m`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit_seconds) = if let Some(number) = text.strip_suffix("ms") {
        (number, 0.001)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60.0)
    } else {
        (text, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|value| *value >= 0.0 && value.is_finite())
        .map(|value| Duration::from_secs_f64(value * unit_seconds))
        .ok_or_else(|| format!("{text:?} is not a duration: write e.g. 500ms, 10s or 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations_read_as_written() {
        assert_eq!(parse_rate("2000/s").unwrap(), 2000.0);
        assert_eq!(parse_rate("12.5").unwrap(), 12.5);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
