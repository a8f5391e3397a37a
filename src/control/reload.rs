//! Hot reload: the config file is re-read when its bytes change (checked
//! every 250 ms, so a change applies within a second) or on SIGHUP. A new
//! config is parsed and validated whole, then swapped in; a bad one is
//! rejected with its reasons, counted, shown by `GET /admin/rollout`, and
//! the running config keeps serving.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, ProcessEnv};
use crate::control::live::LiveConfig;

/// How often the file is looked at.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Reads the file once, then validates and applies what it read; the
/// error says why not.
pub(crate) fn reload(path: &Path, control: &LiveConfig) -> Result<(), String> {
    match std::fs::read(path) {
        Ok(bytes) => reload_bytes(path, &bytes, control),
        Err(err) => settle(
            Err(format!(
                "{} rejected: cannot read it: {err}",
                path.display()
            )),
            control,
        ),
    }
}

/// Validates and applies `bytes`, the content just read from `path`,
/// without reading the file again: the watcher judges exactly the bytes it
/// compared with the last ones seen. Read twice, a file rewritten in place
/// between the reads could be judged half-written while the watcher
/// remembers the whole bytes as judged, and the good file would never be
/// applied.
pub fn reload_bytes(path: &Path, bytes: &[u8], control: &LiveConfig) -> Result<(), String> {
    let result = config::load_bytes(path, bytes, &ProcessEnv)
        .map_err(|err| format!("{} rejected:\n{err}", path.display()))
        .and_then(|snapshot| control.apply(snapshot).map_err(|err| err.to_string()));
    settle(result, control)
}

/// Logs the outcome of a reload and records a rejection.
fn settle(result: Result<(), String>, control: &LiveConfig) -> Result<(), String> {
    match &result {
        Ok(()) => {
            let live = control.live();
            tracing::info!(
                experiment = %live.config.experiment,
                treatment_fraction = live.config.treatment_fraction,
                "config reloaded"
            );
        }
        Err(err) => {
            tracing::error!("{err}; the running config keeps serving");
            control.reject(err);
        }
    }
    result
}

/// Watches `path` until `stop` resolves. The SIGHUP handler is installed
/// now, before the returned future first runs, so a HUP sent once this
/// returns is never taken for the default (terminate).
pub(crate) fn watch(
    path: PathBuf,
    control: Arc<LiveConfig>,
    stop: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    let hangup = hangup_signal();
    let seen = std::fs::read(&path).ok();
    watch_loop(path, control, stop, hangup, seen)
}

async fn watch_loop(
    path: PathBuf,
    control: Arc<LiveConfig>,
    stop: impl Future<Output = ()>,
    mut hangup: Hangup,
    mut seen: Option<Vec<u8>>,
) {
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => false,
            () = next_hangup(&mut hangup) => true,
        };
        let current = std::fs::read(&path).ok();
        if forced || (current.is_some() && current != seen) {
            if forced {
                tracing::info!("SIGHUP: reloading {}", path.display());
            }
            // Whatever the outcome, these bytes have been judged.
            let _ = match &current {
                Some(bytes) => reload_bytes(&path, bytes, &control),
                None => reload(&path, &control),
            };
            seen = current;
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) {
    match hangup {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) {
    std::future::pending().await
}
