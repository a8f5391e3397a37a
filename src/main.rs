//! The `abgate` command line. Parsing and printing only; the work is in the
//! library.
#![allow(clippy::print_stdout)] // a CLI's job is to print

use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use abgate::config::{self, ProcessEnv};
use abgate::experiment::assign;

#[derive(Parser)]
#[command(
    name = "abgate",
    version,
    about = "A/B inference gateway: splits users between a base and a fine-tuned model"
)]
struct Cli {
    /// Threads that serve requests; by default one per CPU the process may
    /// use (its affinity and cgroup quota). With one, the runtime is a
    /// single-threaded one, with no work-stealing to pay for.
    #[arg(long, global = true, value_name = "N", env = "ABGATE_WORKERS")]
    workers: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Where runtime changes (state file, audit log) are kept; beside
        /// the config when absent. Use it when the config is read-only.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run the gateway on an embedded default: two mock model upstreams on
    /// loopback and the gateway in front of them at a 10% treatment fraction.
    Demo(abgate::demo::DemoArgs),
    /// Run one mock model upstream alone.
    Mock {
        #[arg(long, default_value = "127.0.0.1:8001")]
        listen: SocketAddr,
        #[arg(long, default_value = "mock")]
        name: String,
        /// Wait before answering, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of requests answered with a 500 error.
        #[arg(long, default_value_t = 0.0)]
        fault_rate: f64,
    },
    /// Print `user_id<TAB>bucket<TAB>variant` for each ID (or each stdin line).
    Assign {
        /// Treatment fraction, 0.0 to 1.0.
        #[arg(long)]
        fraction: f64,
        /// Hash `salt:user_id` instead of `user_id`.
        #[arg(long)]
        salt: Option<String>,
        /// User IDs; with none, one ID per stdin line (exact bytes, without the `\n`).
        ids: Vec<String>,
    },
    /// Validate a config file and print every problem found.
    CheckConfig { file: PathBuf },
    /// Show or change the running split through the admin API.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
        /// The gateway's admin address.
        #[arg(long, default_value = "http://127.0.0.1:9090", global = true)]
        admin_url: String,
        /// Env var holding the admin token.
        #[arg(long, default_value = "ABGATE_ADMIN_TOKEN", global = true)]
        token_env: String,
        /// Why: kept in the audit log.
        #[arg(long, default_value = "", global = true)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Print the running split, its source and the reload status.
    Status,
    /// Set the treatment fraction, e.g. `set 0.25`.
    Set { treatment_fraction: f64 },
    /// Send every user to control at once (and cancel a pending change).
    Rollback,
    /// Move to the next stage, if the current one is ready.
    Promote {
        /// Promote even though the stage is not ready (audited).
        #[arg(long)]
        force: bool,
    },
    /// Hold automatic promotion.
    Pause,
    /// Let automatic promotion go on.
    Resume,
    /// Print the comparison of the arms: stage, sample ratio, guardrails.
    Report {
        /// The report as JSON (what `GET /admin/report` answers).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workers = cli.workers;
    match cli.command {
        Command::Assign {
            fraction,
            salt,
            ids,
        } => run_assign(fraction, salt.as_deref(), &ids),
        Command::CheckConfig { file } => check_config(&file),
        Command::Rollout {
            action,
            admin_url,
            token_env,
            reason,
        } => run_async(workers, rollout(action, admin_url, token_env, reason)),
        Command::Serve { config, state_dir } => run_async(workers, serve(config, state_dir)),
        Command::Demo(args) => run_async(workers, abgate::demo::run(args)),
        Command::Mock {
            listen,
            name,
            latency_ms,
            fault_rate,
        } => {
            let config = abgate_mock::MockConfig {
                latency: Duration::from_millis(latency_ms),
                fault_rate,
                ..abgate_mock::MockConfig::named(&name)
            };
            run_async(workers, async move {
                let listener = abgate_http1::server::bind(listen)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!("mock upstream {name:?} listening on http://{listen}");
                abgate_mock::run(listener, config, shutdown_signal()).await;
                Ok(())
            })
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ABGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_async(
    workers: Option<std::num::NonZeroUsize>,
    job: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    init_logging();
    let workers = workers
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, std::num::NonZeroUsize::get);
    // On one CPU, a multi-threaded runtime only adds its bookkeeping: about
    // a tenth of the CPU per proxied request (loadtest/README.md).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("abgate: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("abgate: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf, state_dir: Option<PathBuf>) -> Result<(), String> {
    let running = abgate::app::start_from_file(&path, state_dir.as_deref()).await?;
    tracing::info!(proxy = %running.url(), admin = ?running.admin_addr, "abgate serving");
    shutdown_signal().await;
    tracing::info!("shutting down");
    tokio::select! {
        () = running.drain() => {}
        // A second signal: the operator does not want to wait.
        () = shutdown_signal() => tracing::warn!("second signal: exiting without waiting"),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn rollout(
    action: RolloutAction,
    admin_url: String,
    token_env: String,
    reason: String,
) -> Result<(), String> {
    use http::Method;
    let token = std::env::var(&token_env).ok();
    let needs_token = !matches!(action, RolloutAction::Status | RolloutAction::Report { .. });
    let as_table = matches!(action, RolloutAction::Report { json: false });
    if needs_token && token.is_none() {
        return Err(format!("set {token_env} to the gateway's admin token"));
    }
    let (method, path, body) = match action {
        RolloutAction::Status => (Method::GET, "/admin/rollout", None),
        RolloutAction::Set { treatment_fraction } => (
            Method::PUT,
            "/admin/rollout",
            Some(serde_json::json!({"treatment_fraction": treatment_fraction, "reason": reason})),
        ),
        RolloutAction::Rollback => (
            Method::POST,
            "/admin/rollback",
            Some(serde_json::json!({"reason": reason})),
        ),
        RolloutAction::Promote { force } => (
            Method::POST,
            "/admin/promote",
            Some(serde_json::json!({"reason": reason, "force": force})),
        ),
        RolloutAction::Pause => (
            Method::POST,
            "/admin/pause",
            Some(serde_json::json!({"reason": reason})),
        ),
        RolloutAction::Resume => (
            Method::POST,
            "/admin/resume",
            Some(serde_json::json!({"reason": reason})),
        ),
        RolloutAction::Report { .. } => (Method::GET, "/admin/report", None),
    };
    let (status, json) =
        abgate::control::admin_client::call(&admin_url, method, path, token.as_deref(), body)
            .await?;
    if !status.is_success() {
        let message = json["error"]["message"].as_str().unwrap_or("no message");
        return Err(format!("{status}: {message}"));
    }
    if as_table {
        print!("{}", abgate::control::report_table::render(&json));
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
    }
    Ok(())
}

fn run_assign(fraction: f64, salt: Option<&str>, ids: &[String]) -> ExitCode {
    if let Err(why) = abgate::experiment::assign::Fraction::new(fraction) {
        eprintln!("abgate assign: --fraction {why}");
        return ExitCode::from(2);
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut write = |id: &[u8]| -> std::io::Result<()> {
        let bucket = assign::bucket(id, salt);
        let variant = if assign::is_treatment(bucket, fraction) {
            assign::Variant::Treatment
        } else {
            assign::Variant::Control
        };
        out.write_all(id)?;
        writeln!(out, "\t{bucket}\t{variant}")
    };
    let result = if ids.is_empty() {
        // Exact bytes of each line: only the trailing `\n` is removed.
        let mut stdin = std::io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) => break Ok(()),
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if let Err(err) = write(&line) {
                        break Err(err);
                    }
                }
                Err(err) => break Err(err),
            }
        }
    } else {
        ids.iter().try_for_each(|id| write(id.as_bytes()))
    };
    match result.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is a normal way for output to end.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("abgate assign: {err}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match config::load(file, &ProcessEnv) {
        Ok(snapshot) => {
            println!(
                "{}: ok (experiment {:?}, treatment_fraction {}, control {}://{}, treatment {}://{})",
                file.display(),
                snapshot.experiment,
                snapshot.treatment_fraction,
                snapshot.control.scheme,
                snapshot.control.authority,
                snapshot.treatment.scheme,
                snapshot.treatment.authority,
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            for problem in &err.problems {
                println!("{}: {problem}", file.display());
            }
            println!("{}: {} problem(s)", file.display(), err.problems.len());
            ExitCode::FAILURE
        }
    }
}
