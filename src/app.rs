//! Starting a gateway: bind its listeners, serve until told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Snapshot;
use crate::control::admin::Admin;
use crate::control::live::LiveConfig;
use crate::control::supervisor::Supervisor;
use crate::proxy::Gateway;
use crate::telemetry::metrics::Metrics;
use abgate_http1::server;

/// A gateway serving in background tasks.
pub struct Running {
    /// Where the proxy listens (the real port when the config said 0).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The gateway's data path.
    pub gateway: Arc<Gateway>,
    /// What changes it: reloads, the admin API, the supervisor.
    pub control: Arc<LiveConfig>,
    /// Closes the proxy listener; its connections finish what they have.
    stop_accepting: watch::Sender<bool>,
    proxy: JoinHandle<()>,
    /// Stops everything else: the admin listener, supervisor, reloads.
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// After the cut, how long answers get to send their last event and
/// connections to close before the gateway stops waiting for them: a
/// shutdown takes at most `drain_delay_ms + drain_timeout_ms` plus this.
pub const CUT_GRACE: Duration = Duration::from_secs(1);

impl Running {
    /// The proxy's base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// Stops accepting, lets in-flight requests finish, and returns when
    /// every listener is closed.
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        let _ = self.stop.send(true);
        let _ = self.proxy.await;
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// The graceful shutdown, with the `server.drain_*` settings of the
    /// config in force: `/readyz` answers 503 while requests are still
    /// served for `drain_delay_ms`; then the proxy listener closes (idle
    /// keep-alive connections too) and requests in flight, streams
    /// included, get `drain_timeout_ms` to finish; what is left is cut
    /// (an SSE stream between events gets an error event, counted as
    /// `kind="shutdown"`). Returns when everything has stopped.
    pub async fn drain(self) {
        let config = &self.gateway.live().config;
        let (delay, timeout) = (config.drain_delay, config.drain_timeout);
        let drain = self.gateway.drain();
        drain.start();
        tracing::info!(
            delay_ms = delay.as_millis(),
            "draining: /readyz answers 503, requests are still served"
        );
        tokio::time::sleep(delay).await;
        tracing::info!(
            timeout_ms = timeout.as_millis(),
            "no longer accepting connections; finishing requests in flight"
        );
        let _ = self.stop_accepting.send(true);
        let mut proxy = self.proxy;
        if tokio::time::timeout(timeout, &mut proxy).await.is_err() {
            tracing::warn!(
                timeout_ms = timeout.as_millis(),
                "requests still in flight after server.drain_timeout_ms: cutting them"
            );
            drain.cut();
            if tokio::time::timeout(CUT_GRACE, &mut proxy).await.is_err() {
                // Clients that stopped reading: their connections end
                // with the process.
                tracing::warn!("connections still open after the cut; leaving them");
                proxy.abort();
            }
        }
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!("drained");
    }
}

/// Loads `path`, serves it, and reloads it when it changes or on SIGHUP.
/// Runtime changes are kept beside the file, or in `state_dir`.
pub async fn start_from_file(
    path: &std::path::Path,
    state_dir: Option<&std::path::Path>,
) -> Result<Running, String> {
    let snapshot = crate::config::load(path, &crate::config::ProcessEnv)
        .map_err(|err| format!("{} is not valid:\n{err}", path.display()))?;
    let runtime = crate::control::rollout::RuntimeState::beside(path, state_dir);
    let mut running = start_with(snapshot, runtime).await?;
    let watcher = crate::control::reload::watch(
        path.to_path_buf(),
        running.control.clone(),
        stop_signal(running.stop.subscribe()),
    );
    running.tasks.push(tokio::spawn(watcher));
    Ok(running)
}

/// Binds the proxy and admin listeners of `snapshot` and serves them;
/// runtime changes are kept in memory only.
pub async fn start(snapshot: Snapshot) -> Result<Running, String> {
    start_with(snapshot, crate::control::rollout::RuntimeState::in_memory()).await
}

async fn start_with(
    snapshot: Snapshot,
    runtime: crate::control::rollout::RuntimeState,
) -> Result<Running, String> {
    let proxy_listener = server::bind(snapshot.listen)
        .await
        .map_err(|e| e.to_string())?;
    let admin_listener = match snapshot.admin_listen {
        Some(addr) => Some(server::bind(addr).await.map_err(|e| e.to_string())?),
        None => None,
    };
    let proxy_addr = proxy_listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = match &admin_listener {
        Some(listener) => Some(listener.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let limits = server::ConnectionLimits::for_max_header_bytes(snapshot.limits.max_header_bytes);
    let metrics = Arc::new(Metrics::new().map_err(|e| format!("metrics: {e}"))?);
    let control = Arc::new(LiveConfig::new(snapshot, metrics, runtime)?);
    let gateway = control.gateway().clone();
    let (stop, stopped) = watch::channel(false);
    let (stop_accepting, accepting_stopped) = watch::channel(false);
    let supervisor = Supervisor::new(control.clone());
    let proxy = tokio::spawn(server::serve_with(
        proxy_listener,
        gateway.clone(),
        stop_signal(accepting_stopped),
        limits,
    ));
    let mut tasks = vec![tokio::spawn(
        supervisor.clone().run(stop_signal(stopped.clone())),
    )];
    // With [state]: follow the fleet's store (a no-op without one).
    let follower = control.clone();
    let store_stop = stop_signal(stopped.clone());
    tasks.push(tokio::spawn(async move {
        follower.follow_store(store_stop).await;
    }));
    if let Some(listener) = admin_listener {
        let admin = Arc::new(Admin::new(control.clone(), supervisor.clone()));
        tasks.push(tokio::spawn(server::serve(
            listener,
            admin,
            stop_signal(stopped),
        )));
    }
    Ok(Running {
        proxy_addr,
        admin_addr,
        gateway,
        control,
        stop_accepting,
        proxy,
        stop,
        tasks,
    })
}

async fn stop_signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
