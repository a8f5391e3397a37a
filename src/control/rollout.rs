//! Runtime changes to the rollout, made through the admin API or by the
//! gateway itself, and the rule that decides between them and the config
//! file.
//!
//! The rule: **the newest intention wins.** A change through the API is
//! written atomically (write, fsync, rename) to a state file beside the
//! config (`abgate.toml` → `abgate.state.json`, or in `--state-dir`) and
//! survives restarts and crash loops, even though the file still says
//! otherwise. It records the file's fraction at the time; when the file's
//! fraction later changes (an edit, or a `[[rollout.scheduled]]` entry
//! coming due), that is the newer intention and the runtime value is
//! dropped. Every change is appended to an audit log beside the state file
//! (`abgate.audit.jsonl`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::rollout::ChangeSource;

/// Why the runtime state was not written down (it is in force in
/// memory all the same).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("runtime state lock poisoned")]
    Poisoned,
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A split set at run time, in force over the config file's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Override {
    pub(crate) experiment: String,
    pub(crate) treatment_fraction: f64,
    /// The config file's fraction when the change was made.
    pub(crate) config_fraction: f64,
    /// `api`, `schedule` (automatic promotion) or `guardrail`.
    pub(crate) source: ChangeSource,
    pub(crate) reason: String,
    pub(crate) at: String,
}

/// The automatic schedule is held: no automatic promotion until resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Pause {
    /// `api` or `guardrail`.
    pub(crate) source: ChangeSource,
    pub(crate) reason: String,
    pub(crate) at: String,
}

/// A change requested for a later instant (`effective_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PendingChange {
    pub(crate) experiment: String,
    pub(crate) treatment_fraction: f64,
    /// RFC 3339, as requested.
    pub(crate) effective_at: String,
    pub(crate) reason: String,
    pub(crate) requested_at: String,
}

/// Everything kept in the state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Persisted {
    #[serde(default, rename = "override")]
    pub(crate) fraction: Option<Override>,
    #[serde(default)]
    pub(crate) paused: Option<Pause>,
    #[serde(default)]
    pub(crate) pending: Option<PendingChange>,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditEntry<'a> {
    pub(crate) time: String,
    pub(crate) experiment: &'a str,
    /// `set`, `rollback` (a set to 0 from above it), `pause`, `resume`,
    /// `pending`.
    pub(crate) action: &'a str,
    pub(crate) source: ChangeSource,
    pub(crate) old: f64,
    pub(crate) new: f64,
    pub(crate) reason: &'a str,
}

/// The runtime state, where it is kept, and the audit log.
#[derive(Debug)]
pub(crate) struct RuntimeState {
    state_file: Option<PathBuf>,
    audit_file: Option<PathBuf>,
    current: Mutex<Persisted>,
    /// Audit lines of the change being made, kept for the fleet's store
    /// while a change runs under [`RuntimeState::capture_audit`].
    captured: Mutex<Option<Vec<String>>>,
}

impl RuntimeState {
    /// Kept in memory only (a gateway started without a config file).
    pub(crate) fn in_memory() -> Self {
        Self {
            state_file: None,
            audit_file: None,
            current: Mutex::new(Persisted::default()),
            captured: Mutex::new(None),
        }
    }

    /// Kept in `dir` (beside the config unless `--state-dir` says
    /// otherwise) under the config's file stem, resuming what a previous
    /// run wrote there.
    pub(crate) fn beside(config_path: &Path, dir: Option<&Path>) -> Self {
        let stem = config_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "abgate".to_owned());
        let dir = dir
            .or_else(|| config_path.parent())
            .unwrap_or_else(|| Path::new("."));
        let state_file = dir.join(format!("{stem}.state.json"));
        let current = match std::fs::read(&state_file) {
            Ok(bytes) => read_state(&bytes).unwrap_or_else(|err| {
                tracing::error!("ignoring {}: {err}", state_file.display());
                Persisted::default()
            }),
            Err(_) => Persisted::default(),
        };
        Self {
            state_file: Some(state_file),
            audit_file: Some(dir.join(format!("{stem}.audit.jsonl"))),
            current: Mutex::new(current),
            captured: Mutex::new(None),
        }
    }

    /// The override that applies to `experiment` while the file says
    /// `file_fraction`, if any. An override made against another file
    /// fraction (or experiment) has been superseded by the file: it is
    /// dropped and the drop audited. Except while the guardrail latch
    /// holds (see [`RuntimeState::latched`]): then the file's newer value
    /// waits for an operator's resume.
    pub(crate) fn resolve(
        &self,
        experiment: &str,
        file_fraction: f64,
        file_source: ChangeSource,
    ) -> Option<Override> {
        let state = {
            let mut current = self.current.lock().ok()?;
            let state = current.fraction.clone()?;
            if state.experiment == experiment
                && (state.config_fraction == file_fraction || latched(&current))
            {
                return Some(state);
            }
            current.fraction = None;
            state
        };
        if let Err(err) = self.persist() {
            tracing::error!("{err}");
        }
        self.audit(&AuditEntry {
            time: crate::config::clock::now_rfc3339(),
            experiment,
            action: "set",
            source: file_source,
            old: state.treatment_fraction,
            new: file_fraction,
            reason: "the config file's fraction changed after the runtime change: the newer intention wins",
        });
        None
    }

    /// Whether a guardrail trip holds the split: paused by the guard,
    /// and neither a file edit nor a scheduled entry re-exposes users
    /// until an operator resumes (`POST /admin/resume`).
    pub(crate) fn latched(&self) -> bool {
        self.current.lock().is_ok_and(|current| latched(&current))
    }

    /// Everything in force now.
    pub(crate) fn snapshot(&self) -> Persisted {
        self.current
            .lock()
            .map(|current| current.clone())
            .unwrap_or_default()
    }

    /// Puts `state` in force as a whole (the fleet's store holds it): kept
    /// in the local state file too, so a restart while the store cannot be
    /// reached starts from it.
    pub(crate) fn replace(&self, state: Persisted) -> Result<(), StateError> {
        self.update(|current| *current = state)
    }

    /// Starts (`true`) or ends keeping the audit lines of a change.
    pub(crate) fn capture_audit(&self, on: bool) -> Vec<String> {
        match self.captured.lock() {
            Ok(mut captured) => {
                let lines = captured.take().unwrap_or_default();
                if on {
                    *captured = Some(Vec::new());
                }
                lines
            }
            Err(_) => Vec::new(),
        }
    }

    /// The override in force now, if any.
    pub(crate) fn current(&self) -> Option<Override> {
        self.current.lock().ok()?.fraction.clone()
    }

    /// The pause in force, if any.
    pub(crate) fn paused(&self) -> Option<Pause> {
        self.current.lock().ok()?.paused.clone()
    }

    /// The change waiting for its instant, if any.
    pub(crate) fn pending(&self) -> Option<PendingChange> {
        self.current.lock().ok()?.pending.clone()
    }

    /// Records a runtime change of the fraction: persisted atomically,
    /// then audited. Returns whether it reached disk (memory-only state
    /// never does).
    pub(crate) fn record(&self, state: Override, old: f64) -> Result<bool, StateError> {
        let entry_state = state.clone();
        self.update(|current| current.fraction = Some(state))?;
        let rollback = entry_state.treatment_fraction == 0.0 && old > 0.0;
        self.audit(&AuditEntry {
            time: entry_state.at.clone(),
            experiment: &entry_state.experiment,
            action: if rollback { "rollback" } else { "set" },
            source: entry_state.source,
            old,
            new: entry_state.treatment_fraction,
            reason: &entry_state.reason,
        });
        self.persisted()
    }

    /// Holds or releases the automatic schedule; audited.
    pub(crate) fn set_paused(
        &self,
        pause: Option<Pause>,
        experiment: &str,
        fraction: f64,
        source: ChangeSource,
        reason: &str,
    ) -> Result<bool, StateError> {
        let action = if pause.is_some() { "pause" } else { "resume" };
        self.update(|current| current.paused = pause)?;
        self.audit(&AuditEntry {
            time: crate::config::clock::now_rfc3339(),
            experiment,
            action,
            source,
            old: fraction,
            new: fraction,
            reason,
        });
        self.persisted()
    }

    /// Stores (or clears, once applied) a change waiting for its instant.
    pub(crate) fn set_pending(
        &self,
        pending: Option<PendingChange>,
        old: f64,
    ) -> Result<bool, StateError> {
        if let Some(change) = &pending {
            self.audit(&AuditEntry {
                time: change.requested_at.clone(),
                experiment: &change.experiment,
                action: "pending",
                source: ChangeSource::Api,
                old,
                new: change.treatment_fraction,
                reason: &format!("effective at {}: {}", change.effective_at, change.reason),
            });
        }
        self.update(|current| current.pending = pending)?;
        self.persisted()
    }

    fn persisted(&self) -> Result<bool, StateError> {
        Ok(self.state_file.is_some())
    }

    /// Changes the state in memory, then writes it down.
    fn update(&self, change: impl FnOnce(&mut Persisted)) -> Result<(), StateError> {
        {
            let mut current = self.current.lock().map_err(|_| StateError::Poisoned)?;
            change(&mut current);
        }
        self.persist()
    }

    fn persist(&self) -> Result<(), StateError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let state = self
            .current
            .lock()
            .map_err(|_| StateError::Poisoned)?
            .clone();
        let written = if state == Persisted::default() {
            // Nothing in force: no file, so the config alone decides.
            match std::fs::remove_file(path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
                _ => Ok(()),
            }
        } else {
            write_atomically(path, &state)
        };
        written.map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }

    /// Appends one line to the audit log (and the process log).
    pub(crate) fn audit(&self, entry: &AuditEntry<'_>) {
        tracing::info!(
            action = entry.action,
            source = entry.source.as_str(),
            old = entry.old,
            new = entry.new,
            reason = entry.reason,
            "rollout changed"
        );
        let line = match serde_json::to_string(entry) {
            Ok(line) => line,
            Err(_) => return,
        };
        if let Ok(mut captured) = self.captured.lock() {
            if let Some(lines) = captured.as_mut() {
                lines.push(line.clone());
            }
        }
        let Some(path) = &self.audit_file else { return };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(err) = written {
            tracing::error!("cannot append to {}: {err}", path.display());
        }
    }
}

fn latched(state: &Persisted) -> bool {
    state
        .paused
        .as_ref()
        .is_some_and(|pause| pause.source == ChangeSource::Guardrail)
}

/// The state file, or the bare override an earlier version wrote.
fn read_state(bytes: &[u8]) -> Result<Persisted, serde_json::Error> {
    serde_json::from_slice::<Persisted>(bytes).or_else(|err| {
        serde_json::from_slice::<Override>(bytes)
            .map(|fraction| Persisted {
                fraction: Some(fraction),
                ..Persisted::default()
            })
            .map_err(|_| err)
    })
}

/// Write to a temporary file, fsync it, rename it over the target, fsync
/// the directory: a crash leaves the old state or the new, never half.
fn write_atomically(path: &Path, state: &Persisted) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state)?;
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_set_to_zero_is_audited_as_a_rollback() {
        let runtime = RuntimeState::in_memory();
        let change = |fraction: f64| Override {
            experiment: "exp".into(),
            treatment_fraction: fraction,
            config_fraction: 0.05,
            source: ChangeSource::Api,
            reason: "r".into(),
            at: crate::config::clock::now_rfc3339(),
        };
        runtime.capture_audit(true);
        runtime.record(change(0.25), 0.05).unwrap();
        runtime.record(change(0.0), 0.25).unwrap();
        let lines = runtime.capture_audit(false);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains(r#""action":"set""#), "{}", lines[0]);
        assert!(lines[1].contains(r#""action":"rollback""#), "{}", lines[1]);
    }

    fn rolled_back(runtime: &RuntimeState) {
        let at = crate::config::clock::now_rfc3339();
        let state = Override {
            experiment: "exp".into(),
            treatment_fraction: 0.0,
            config_fraction: 0.5,
            source: ChangeSource::Guardrail,
            reason: "tripped".into(),
            at: at.clone(),
        };
        runtime.record(state, 0.5).unwrap();
        let pause = Pause {
            source: ChangeSource::Guardrail,
            reason: "tripped".into(),
            at,
        };
        runtime
            .set_paused(Some(pause), "exp", 0.0, ChangeSource::Guardrail, "tripped")
            .unwrap();
    }

    #[test]
    fn a_guardrail_trip_holds_against_the_file_until_resumed() {
        let runtime = RuntimeState::in_memory();
        rolled_back(&runtime);
        assert!(runtime.latched());
        // A newer file fraction (an edit, a scheduled entry) waits.
        let held = runtime.resolve("exp", 0.25, ChangeSource::Schedule);
        assert_eq!(held.map(|o| o.treatment_fraction), Some(0.0));
        runtime
            .set_paused(None, "exp", 0.0, ChangeSource::Api, "resume")
            .unwrap();
        assert!(!runtime.latched());
        assert_eq!(runtime.resolve("exp", 0.25, ChangeSource::Schedule), None);
    }

    #[test]
    fn an_operators_pause_does_not_hold_against_the_file() {
        let runtime = RuntimeState::in_memory();
        rolled_back(&runtime);
        let pause = Pause {
            source: ChangeSource::Api,
            reason: "looking".into(),
            at: crate::config::clock::now_rfc3339(),
        };
        runtime
            .set_paused(Some(pause), "exp", 0.0, ChangeSource::Api, "looking")
            .unwrap();
        assert!(!runtime.latched());
        assert_eq!(runtime.resolve("exp", 0.25, ChangeSource::Config), None);
    }
}
