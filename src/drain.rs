//! The gateway's state while it shuts down: first draining (`/readyz`
//! answers 503 so load balancers stop sending, while requests are still
//! served), then, past `server.drain_timeout_ms`, cut: what is still
//! running is ended with an error the client can read (see
//! `proxy::observe`). The sequence itself is run by `app::Running::drain`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::watch;

/// Draining and cut flags, shared by the proxy, the admin API and the
/// shutdown sequence.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            cut: watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// From now on the gateway reports itself not ready.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ends every request still running: each [`CutSignal`] fires.
    pub fn cut(&self) {
        self.start();
        self.cut.send_replace(true);
    }

    /// Resolves once [`Self::cut`] is called (at once if it was).
    pub async fn cut_called(&self) {
        let mut cut = self.cut.subscribe();
        let _ = cut.wait_for(|cut| *cut).await;
    }

    /// A signal a response body polls to learn of the cut.
    pub fn signal(&self) -> CutSignal {
        CutSignal {
            cut: Some(self.cut.subscribe()),
            waiting: None,
        }
    }
}

/// The cut, as a body sees it: polled alongside its upstream.
pub struct CutSignal {
    /// Taken into `waiting` on the first poll that has to wait.
    cut: Option<watch::Receiver<bool>>,
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for CutSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutSignal").finish_non_exhaustive()
    }
}

impl CutSignal {
    /// Ready once the gateway cuts what is left; otherwise registers `cx`
    /// to be woken then. The wait is allocated only when a body first has
    /// to wait for its upstream, so answers read in one go cost nothing.
    pub fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(mut cut) = self.cut.take() {
            self.waiting = Some(Box::pin(async move {
                if cut.wait_for(|cut| *cut).await.is_err() {
                    // The gateway is gone without a cut: nothing will cut.
                    std::future::pending::<()>().await;
                }
            }));
        }
        match &mut self.waiting {
            Some(waiting) => waiting.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}
