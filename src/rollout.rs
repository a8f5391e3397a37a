//! Runtime changes to the split, made through the admin API, and the rule
//! that decides between them and the config file.
//!
//! The rule: **the newest intention wins.** A change through the API is
//! written atomically (write, fsync, rename) to a state file beside the
//! config (`abgate.toml` → `abgate.state.json`) and survives restarts and
//! crash loops, even though the file still says otherwise. It records the
//! file's fraction at the time; when the file's fraction later changes, the
//! edit is the newer intention and the API value is dropped. Every change is
//! appended to an audit log beside the config (`abgate.audit.jsonl`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::Snapshot;

/// A split set at run time, in force over the config file's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Override {
    pub experiment: String,
    pub treatment_fraction: f64,
    /// The config file's fraction when the change was made.
    pub config_fraction: f64,
    /// `api` (later also `schedule`, `guardrail`).
    pub source: String,
    pub reason: String,
    pub at: String,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry<'a> {
    pub time: String,
    pub experiment: &'a str,
    pub source: &'a str,
    pub old: f64,
    pub new: f64,
    pub reason: &'a str,
}

/// The override in force, where it is kept, and the audit log.
#[derive(Debug)]
pub struct RuntimeState {
    state_file: Option<PathBuf>,
    audit_file: Option<PathBuf>,
    current: Mutex<Option<Override>>,
}

impl RuntimeState {
    /// Kept in memory only (a gateway started without a config file).
    pub fn in_memory() -> Self {
        Self {
            state_file: None,
            audit_file: None,
            current: Mutex::new(None),
        }
    }

    /// Kept beside `config_path`, resuming what a previous run wrote.
    pub fn beside(config_path: &Path) -> Self {
        let stem = config_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "abgate".to_owned());
        let dir = config_path.parent().unwrap_or_else(|| Path::new("."));
        let state_file = dir.join(format!("{stem}.state.json"));
        let current = match std::fs::read(&state_file) {
            Ok(bytes) => match serde_json::from_slice::<Override>(&bytes) {
                Ok(state) => Some(state),
                Err(err) => {
                    tracing::error!("ignoring {}: {err}", state_file.display());
                    None
                }
            },
            Err(_) => None,
        };
        Self {
            state_file: Some(state_file),
            audit_file: Some(dir.join(format!("{stem}.audit.jsonl"))),
            current: Mutex::new(current),
        }
    }

    /// The override that applies to `config`, if any. An override made
    /// against another file fraction (or experiment) has been superseded by
    /// an edit of the file: it is dropped and the drop audited.
    pub fn resolve(&self, config: &Snapshot) -> Option<Override> {
        let mut current = self.current.lock().ok()?;
        let state = current.clone()?;
        let file_fraction = config.config.experiment.treatment_fraction;
        if state.experiment == config.experiment && state.config_fraction == file_fraction {
            return Some(state);
        }
        *current = None;
        drop(current);
        if let Some(path) = &self.state_file {
            let _ = std::fs::remove_file(path);
        }
        self.audit(&AuditEntry {
            time: crate::events::now_rfc3339(),
            experiment: &config.experiment,
            source: "config",
            old: state.treatment_fraction,
            new: file_fraction,
            reason: "the config file changed after the runtime change: the newer intention wins",
        });
        None
    }

    /// The override in force now, if any.
    pub fn current(&self) -> Option<Override> {
        self.current.lock().ok()?.clone()
    }

    /// Records a runtime change: persisted atomically, then audited.
    /// Returns whether it reached disk (memory-only state never does).
    pub fn record(&self, state: Override, old: f64) -> Result<bool, String> {
        let persisted = match &self.state_file {
            Some(path) => {
                write_atomically(path, &state)
                    .map_err(|err| format!("{}: {err}", path.display()))?;
                true
            }
            None => false,
        };
        self.audit(&AuditEntry {
            time: state.at.clone(),
            experiment: &state.experiment,
            source: &state.source,
            old,
            new: state.treatment_fraction,
            reason: &state.reason,
        });
        if let Ok(mut current) = self.current.lock() {
            *current = Some(state);
        }
        Ok(persisted)
    }

    fn audit(&self, entry: &AuditEntry<'_>) {
        tracing::info!(
            source = entry.source,
            old = entry.old,
            new = entry.new,
            reason = entry.reason,
            "treatment fraction changed"
        );
        let Some(path) = &self.audit_file else { return };
        let line = match serde_json::to_string(entry) {
            Ok(line) => line,
            Err(_) => return,
        };
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

/// Write to a temporary file, fsync it, rename it over the target, fsync
/// the directory: a crash leaves the old state or the new, never half.
fn write_atomically(path: &Path, state: &Override) -> std::io::Result<()> {
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
