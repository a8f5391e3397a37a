//! The idle and total deadlines of a response body that is being streamed.
//!
//! One timer serves both. It is not reset on every frame (that would be a
//! timer-wheel update per SSE chunk): a frame only notes the time, and when
//! the timer fires early because frames came meanwhile, it is moved to the
//! next real deadline. It is made the first time the body has nothing to
//! give: a body that comes whole with its head never needs one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::error::Timeout;

/// When a streamed answer must end, or must next show signs of life.
#[derive(Debug)]
pub(crate) struct Deadlines {
    idle: Duration,
    total: Duration,
    total_at: Instant,
    last_frame: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Deadlines {
    /// A frame at least every `idle` from `headers_at` (when the response
    /// headers arrived), and the last one within `total` of `started`.
    pub(crate) fn new(
        idle: Duration,
        total: Duration,
        started: Instant,
        headers_at: Instant,
    ) -> Self {
        Self {
            idle,
            total,
            total_at: started + total,
            last_frame: headers_at,
            timer: None,
        }
    }

    /// The setting behind a deadline: the idle limit, or the total one.
    pub(crate) fn limit(&self, timeout: Timeout) -> Duration {
        match timeout {
            Timeout::Total => self.total,
            Timeout::Connect | Timeout::FirstByte | Timeout::Idle => self.idle,
        }
    }

    /// Notes that a frame arrived: the idle deadline starts again.
    #[cfg(test)]
    pub(crate) fn frame_arrived(&mut self) {
        self.frame_arrived_at(Instant::now());
    }

    /// Notes that a frame arrived at `now` (read once by the caller for
    /// all it times).
    pub(crate) fn frame_arrived_at(&mut self, now: Instant) {
        self.last_frame = now;
    }

    /// Whether the total deadline had passed when the last frame arrived.
    /// Checked before each frame, because a body that always has a frame
    /// ready never waits on the timer; the last frame's time serves, so a
    /// frame costs one clock read, not two.
    pub(crate) fn total_expired(&self) -> bool {
        self.last_frame >= self.total_at
    }

    /// Ready with the deadline that passed; pending (and woken when one
    /// may have) otherwise. Call only when the body has nothing to give.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Timeout> {
        let first_at = (self.last_frame + self.idle).min(self.total_at);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(first_at)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if now >= self.total_at {
                return Poll::Ready(Timeout::Total);
            }
            let idle_at = self.last_frame + self.idle;
            if now >= idle_at {
                return Poll::Ready(Timeout::Idle);
            }
            // Frames came since the timer was set: wait for the real deadline.
            timer.as_mut().reset(idle_at.min(self.total_at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn expired(deadlines: &mut Deadlines) -> Timeout {
        poll_fn(|cx| deadlines.poll_expired(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_idle_expires_idle() {
        let mut deadlines = Deadlines::new(
            Duration::from_millis(100),
            Duration::from_secs(60),
            Instant::now(),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_millis(80)).await;
        deadlines.frame_arrived();
        let started = Instant::now();
        assert_eq!(expired(&mut deadlines).await, Timeout::Idle);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100),
            "counted from the last frame"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_is_made_only_when_the_body_waits() {
        let mut deadlines = Deadlines::new(
            Duration::from_millis(100),
            Duration::from_secs(60),
            Instant::now(),
            Instant::now(),
        );
        deadlines.frame_arrived();
        assert!(!deadlines.total_expired());
        assert!(
            deadlines.timer.is_none(),
            "a body that never waits needs none"
        );
        assert_eq!(expired(&mut deadlines).await, Timeout::Idle);
        assert!(deadlines.timer.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn frames_keep_idle_away_but_not_total() {
        let total_at = Instant::now() + Duration::from_millis(250);
        let mut deadlines = Deadlines::new(
            Duration::from_millis(100),
            Duration::from_millis(250),
            Instant::now(),
            Instant::now(),
        );
        for _ in 0..4 {
            assert!(!deadlines.total_expired());
            tokio::time::sleep(Duration::from_millis(50)).await;
            deadlines.frame_arrived();
        }
        assert_eq!(expired(&mut deadlines).await, Timeout::Total);
        assert_eq!(Instant::now(), total_at);
        // A body that always has a frame ready is cut at its next frame.
        deadlines.frame_arrived();
        assert!(deadlines.total_expired());
    }
}
