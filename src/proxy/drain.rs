//! The gateway's state while it shuts down: first draining (`/readyz`
//! answers 503 so load balancers stop sending, while requests are still
//! served), then, past `server.drain_timeout_ms`, cut: what is still
//! running is ended with an error the client can read (see
//! `proxy::observe`). The sequence itself is run by `app::Running::drain`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Notify;

/// Draining and cut flags, shared by the proxy, the admin API and the
/// shutdown sequence.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    draining: AtomicBool,
    cut: Arc<Cut>,
}

/// The cut: a flag, and the requests and bodies waiting for it. Waiting
/// costs a place in the `Notify`'s list, nothing per request before that.
#[derive(Debug, Default)]
struct Cut {
    called: AtomicBool,
    waiters: Notify,
}

impl Cut {
    async fn called(&self) {
        // Made before the flag is read: a `notify_waiters` after this
        // point completes it even before its first poll.
        let notified = self.waiters.notified();
        if self.called.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

impl Drain {
    /// From now on the gateway reports itself not ready.
    pub(crate) fn start(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether draining has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ends every request still running: each [`CutSignal`] fires.
    pub(crate) fn cut(&self) {
        self.start();
        self.cut.called.store(true, Ordering::Release);
        self.cut.waiters.notify_waiters();
    }

    /// Resolves once [`Self::cut`] is called (at once if it was).
    pub(crate) async fn cut_called(&self) {
        self.cut.called().await;
    }

    /// A signal a response body polls to learn of the cut.
    pub(crate) fn signal(&self) -> CutSignal {
        CutSignal {
            cut: Some(Arc::clone(&self.cut)),
            waiting: None,
        }
    }
}

/// The cut, as a body sees it: polled alongside its upstream.
pub(crate) struct CutSignal {
    /// Taken into `waiting` on the first poll that has to wait.
    cut: Option<Arc<Cut>>,
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
    pub(crate) fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(cut) = self.cut.take() {
            self.waiting = Some(Box::pin(async move { cut.called().await }));
        }
        match &mut self.waiting {
            Some(waiting) => waiting.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn within_a_second(wait: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_request_waiting_is_cut() {
        let drain = std::sync::Arc::new(Drain::default());
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { within_a_second(drain.cut_called()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing is cut before the cut");
        drain.cut();
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn a_body_waiting_is_cut() {
        let drain = Drain::default();
        let mut signal = drain.signal();
        let waiting = tokio::spawn(async move {
            within_a_second(std::future::poll_fn(|cx| signal.poll_cut(cx))).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing is cut before the cut");
        drain.cut();
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn a_wait_made_before_the_cut_ends_even_if_first_polled_after() {
        let drain = Drain::default();
        let wait = drain.cut_called();
        drain.cut();
        assert!(within_a_second(wait).await);
        // And one made after the cut ends at once.
        assert!(within_a_second(drain.cut_called()).await);
    }
}
