//! Events: one JSON line per finished request (`"event": "request"`) and
//! one per feedback report counted (`"event": "feedback"`), the analytics
//! feed a warehouse joins on, and from which the guard's report can be
//! recomputed offline (`tools/recompute_report.py`).
//!
//! The request path hands an event to a bounded queue with `try_send` and
//! moves on; a writer task serialises and writes. If the writer falls
//! behind (slow disk, blocked stdout) the queue fills and further events
//! are dropped and counted (`abgate_events_dropped_total`), never waited on.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use sha2::Digest;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::config::events::{EventsConfig, UserIdMode};

/// One finished request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    /// Always `"request"`.
    pub(crate) event: &'static str,
    pub(crate) timestamp: String,
    pub(crate) request_id: String,
    pub(crate) experiment: String,
    pub(crate) variant: &'static str,
    pub(crate) model: Option<String>,
    pub(crate) route: &'static str,
    pub(crate) stream: bool,
    pub(crate) status: u16,
    pub(crate) latency_ms: f64,
    pub(crate) time_to_first_byte_ms: Option<f64>,
    pub(crate) response_bytes: u64,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) error_kind: Option<&'static str>,
    pub(crate) user_id: Option<String>,
    /// The arm was forced by a QA request (`x-abgate-force-variant`): not
    /// a random assignment, to be left out of any comparison of the arms.
    pub(crate) forced: bool,
}

/// One feedback report, as counted (a refused one writes no line).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FeedbackEvent {
    /// Always `"feedback"`.
    pub(crate) event: &'static str,
    pub(crate) timestamp: String,
    pub(crate) request_id: String,
    pub(crate) experiment: String,
    pub(crate) variant: &'static str,
    pub(crate) outcome: String,
    pub(crate) rating: Option<u8>,
    /// When the request id was issued (ids of the earlier format: none).
    pub(crate) request_issued_at: Option<String>,
}

/// A line of the events file.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub(crate) enum Line {
    Request(Event),
    Feedback(FeedbackEvent),
}

/// The sending side, cheap to clone into every request's recorder.
#[derive(Clone)]
pub(crate) struct EventSink {
    sender: mpsc::Sender<Line>,
    user_id: UserIdMode,
    /// HMAC key for hashed user IDs; none means plain SHA-256.
    user_id_key: Option<Arc<[u8]>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("user_id", &self.user_id)
            .finish()
    }
}

impl EventSink {
    /// Opens the destination and starts the writer task; `user_id_key` is
    /// the key of `user_id_key_env`, if any.
    pub(crate) fn start(
        config: &EventsConfig,
        user_id_key: Option<&[u8]>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let writer: Box<dyn Write + Send> = if config.path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(PathBuf::from(&config.path))?,
            )
        };
        let (sender, receiver) = mpsc::channel(config.queue.max(1));
        // Writes are blocking I/O: they get a thread of their own, off the
        // runtime the requests run on.
        std::thread::Builder::new()
            .name("abgate-events".into())
            .spawn(move || write_events(receiver, writer))?;
        Ok(Self {
            sender,
            user_id: config.user_id,
            user_id_key: user_id_key.map(Arc::from),
            metrics,
        })
    }

    /// Queues an event; drops and counts it if the writer is behind.
    pub(crate) fn emit(&self, event: Line) {
        if self.sender.try_send(event).is_err() {
            self.metrics.event_dropped();
        }
    }

    /// The user ID as events carry it.
    pub(crate) fn user_id_field(&self, user_id: &str) -> Option<String> {
        match self.user_id {
            UserIdMode::Raw => Some(user_id.to_owned()),
            UserIdMode::Hash => Some(match &self.user_id_key {
                Some(key) => hmac_sha256_hex(key, user_id.as_bytes()),
                None => sha256_hex(user_id.as_bytes()),
            }),
            UserIdMode::Omit => None,
        }
    }
}

fn write_events(mut receiver: mpsc::Receiver<Line>, writer: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(writer);
    while let Some(event) = receiver.blocking_recv() {
        let mut write_one = |event: &Line| -> std::io::Result<()> {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")
        };
        let mut ok = write_one(&event).is_ok();
        // Drain what is queued, then flush once: one syscall per burst.
        while let Ok(event) = receiver.try_recv() {
            ok &= write_one(&event).is_ok();
        }
        if !(ok && out.flush().is_ok()) {
            tracing::warn!("writing request events failed");
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    crate::experiment::hex::encode(&sha2::Sha256::digest(bytes))
}

/// HMAC-SHA256(key, bytes) in hex, as Python's
/// `hmac.new(key, id, "sha256").hexdigest()` computes it.
fn hmac_sha256_hex(key: &[u8], bytes: &[u8]) -> String {
    use hmac::Mac;
    match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(bytes);
            crate::experiment::hex::encode(&mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this branch cannot be reached.
        Err(_) => sha256_hex(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_ids_are_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keyed_ids_are_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
