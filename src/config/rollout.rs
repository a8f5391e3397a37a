//! `[rollout]`: the stages a fine-tune walks through, what a stage must
//! show before it is promoted, and scheduled changes of the file's split.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `[rollout]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutConfig {
    /// Treatment fractions promotion walks through, ascending.
    #[serde(default = "default_stages")]
    pub(crate) stages: Vec<f64>,
    /// Time a stage must have run before it may be promoted.
    #[serde(default = "default_min_stage_seconds")]
    pub(crate) min_stage_seconds: f64,
    /// Requests each arm must have served in the stage before promotion.
    #[serde(default = "default_min_requests_per_arm")]
    pub(crate) min_requests_per_arm: u64,
    /// Promote by itself once a stage is ready and healthy; otherwise
    /// promotion waits for `POST /admin/promote`.
    #[serde(default)]
    pub(crate) auto_promote: bool,
    /// A feedback check (completion rate, rating) that has no reports yet
    /// blocks promotion; `false` lets a stage go on without feedback.
    #[serde(default = "yes")]
    pub(crate) require_feedback: bool,
    /// Changes of the file's split at fixed instants, the same for every
    /// replica that reads the file.
    #[serde(default)]
    pub(crate) scheduled: Vec<ScheduledChange>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            stages: default_stages(),
            min_stage_seconds: default_min_stage_seconds(),
            min_requests_per_arm: default_min_requests_per_arm(),
            auto_promote: false,
            require_feedback: true,
            scheduled: Vec::new(),
        }
    }
}

/// `[[rollout.scheduled]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduledChange {
    /// RFC 3339 instant.
    pub(crate) at: String,
    pub(crate) treatment_fraction: f64,
}

fn yes() -> bool {
    true
}
fn default_stages() -> Vec<f64> {
    vec![0.05, 0.25, 0.5, 1.0]
}
fn default_min_stage_seconds() -> f64 {
    3600.0
}
fn default_min_requests_per_arm() -> u64 {
    1000
}

/// Who or what changed the split: a label in the audit log, the state
/// file and the admin API, so a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeSource {
    /// The config file's own fraction.
    Config,
    /// A `[[rollout.scheduled]]` entry of the file, or the automatic
    /// promotion of `[rollout] auto_promote`.
    Schedule,
    /// An operator, through the admin API (or `abgate rollout`).
    Api,
    /// The guard, on a tripped check.
    Guardrail,
}

impl ChangeSource {
    /// The label, as written in the audit log and shown by the admin API.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeSource::Config => "config",
            ChangeSource::Schedule => "schedule",
            ChangeSource::Api => "api",
            ChangeSource::Guardrail => "guardrail",
        }
    }
}

/// The validated schedule of the file's split.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FileSchedule {
    /// `[experiment] treatment_fraction`: in force before any entry.
    pub(crate) base: f64,
    /// Ascending instants and the fraction from each on.
    pub(crate) entries: Vec<(SystemTime, f64)>,
}

impl FileSchedule {
    /// The file's fraction at `now`, and where it comes from (its own
    /// fraction, or a scheduled entry).
    pub(crate) fn fraction_at(&self, now: SystemTime) -> (f64, ChangeSource) {
        self.entries
            .iter()
            .rev()
            .find(|(at, _)| *at <= now)
            .map_or((self.base, ChangeSource::Config), |(_, fraction)| {
                (*fraction, ChangeSource::Schedule)
            })
    }

    /// The first entry still to come after `now`.
    pub(crate) fn next_after(&self, now: SystemTime) -> Option<SystemTime> {
        self.entries.iter().map(|(at, _)| *at).find(|at| *at > now)
    }
}

impl RolloutConfig {
    /// Checks the section; `report(path, message)` collects problems.
    pub(crate) fn validate(&self, base: f64, report: &mut dyn FnMut(&str, String)) -> FileSchedule {
        if self.stages.is_empty() {
            report("rollout.stages", "must list at least one stage".into());
        }
        for (i, stage) in self.stages.iter().enumerate() {
            if !(stage.is_finite() && *stage > 0.0 && *stage <= 1.0) {
                report(
                    "rollout.stages",
                    format!("stage {stage} must be above 0.0 and at most 1.0"),
                );
            } else if i > 0 && *stage <= self.stages[i - 1] {
                report(
                    "rollout.stages",
                    format!("stages must ascend: {stage} follows {}", self.stages[i - 1]),
                );
            }
        }
        if !(self.min_stage_seconds.is_finite() && self.min_stage_seconds >= 0.0) {
            report(
                "rollout.min_stage_seconds",
                "must be a number of seconds, 0 or more".into(),
            );
        }
        let mut entries: Vec<(SystemTime, f64)> = Vec::new();
        for (i, change) in self.scheduled.iter().enumerate() {
            let path = format!("rollout.scheduled[{i}]");
            let fraction = change.treatment_fraction;
            if let Err(why) = crate::experiment::assign::Fraction::new(fraction) {
                report(&format!("{path}.treatment_fraction"), why);
            }
            match crate::config::clock::parse_rfc3339(&change.at) {
                Ok(at) => {
                    if entries.last().is_some_and(|(previous, _)| *previous >= at) {
                        report(
                            &format!("{path}.at"),
                            "entries must be in time order".into(),
                        );
                    }
                    entries.push((at, fraction));
                }
                Err(message) => report(&format!("{path}.at"), message),
            }
        }
        FileSchedule { base, entries }
    }

    /// The stage after `fraction`: the first stage above it.
    pub(crate) fn next_stage(&self, fraction: f64) -> Option<f64> {
        self.stages.iter().copied().find(|stage| *stage > fraction)
    }

    /// The stage before `fraction`: the last stage below it, else 0.
    pub(crate) fn previous_stage(&self, fraction: f64) -> f64 {
        self.stages
            .iter()
            .copied()
            .rev()
            .find(|stage| *stage < fraction)
            .unwrap_or(0.0)
    }

    /// Position of `fraction` among the stages (1-based), if it is one.
    pub(crate) fn stage_number(&self, fraction: f64) -> Option<usize> {
        self.stages
            .iter()
            .position(|stage| *stage == fraction)
            .map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &RolloutConfig) -> Vec<String> {
        let mut found = Vec::new();
        config.validate(0.1, &mut |path, message| {
            found.push(format!("{path}: {message}"))
        });
        found
    }

    #[test]
    fn stages_walk_up_and_back() {
        let config = RolloutConfig::default();
        assert_eq!(config.next_stage(0.0), Some(0.05));
        assert_eq!(config.next_stage(0.05), Some(0.25));
        assert_eq!(config.next_stage(0.1), Some(0.25));
        assert_eq!(config.next_stage(1.0), None);
        assert_eq!(config.previous_stage(0.5), 0.25);
        assert_eq!(config.previous_stage(0.05), 0.0);
        assert_eq!(config.stage_number(0.25), Some(2));
        assert_eq!(config.stage_number(0.1), None);
        assert!(problems(&config).is_empty());
    }

    #[test]
    fn bad_sections_say_where() {
        let config = RolloutConfig {
            stages: vec![0.25, 0.05, 1.5],
            min_stage_seconds: -1.0,
            scheduled: vec![
                ScheduledChange {
                    at: "2026-12-02T00:00:00Z".into(),
                    treatment_fraction: 0.5,
                },
                ScheduledChange {
                    at: "2026-12-01T00:00:00Z".into(),
                    treatment_fraction: 2.0,
                },
                ScheduledChange {
                    at: "tomorrow".into(),
                    treatment_fraction: 0.5,
                },
            ],
            ..RolloutConfig::default()
        };
        let found = problems(&config);
        for expected in [
            "rollout.stages: stages must ascend: 0.05 follows 0.25",
            "rollout.stages: stage 1.5 must be above 0.0 and at most 1.0",
            "rollout.min_stage_seconds:",
            "rollout.scheduled[1].treatment_fraction: 2 must be",
            "rollout.scheduled[1].at: entries must be in time order",
            "rollout.scheduled[2].at: \"tomorrow\" is not an RFC 3339 time",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
    }

    #[test]
    fn the_file_fraction_follows_the_schedule() {
        let at = |text| crate::config::clock::parse_rfc3339(text).unwrap();
        let config = RolloutConfig {
            scheduled: vec![
                ScheduledChange {
                    at: "2026-12-01T09:00:00Z".into(),
                    treatment_fraction: 0.25,
                },
                ScheduledChange {
                    at: "2026-12-02T09:00:00Z".into(),
                    treatment_fraction: 0.5,
                },
            ],
            ..RolloutConfig::default()
        };
        let schedule = config.validate(0.05, &mut |_, _| panic!("valid"));
        assert_eq!(
            schedule.fraction_at(at("2026-11-30T00:00:00Z")),
            (0.05, ChangeSource::Config)
        );
        assert_eq!(
            schedule.fraction_at(at("2026-12-01T09:00:00Z")),
            (0.25, ChangeSource::Schedule)
        );
        assert_eq!(
            schedule.fraction_at(at("2026-12-03T00:00:00Z")),
            (0.5, ChangeSource::Schedule)
        );
        assert_eq!(
            schedule.next_after(at("2026-12-01T10:00:00Z")),
            Some(at("2026-12-02T09:00:00Z"))
        );
        assert_eq!(schedule.next_after(at("2026-12-03T00:00:00Z")), None);
    }
}
