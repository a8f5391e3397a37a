//! `abgate rollout report` for a person: the stage, what blocks it, and one
//! row per guardrail check with each arm's value, the change, its
//! always-valid interval and the decision. The JSON (`--json`, or
//! `GET /admin/report`) carries the same numbers in full.

use std::fmt::Write;

use serde_json::Value;

/// The report as text.
pub fn render(report: &Value) -> String {
    let mut out = String::new();
    let stage = &report["stage"];
    let fraction = report["treatment_fraction"].as_f64().unwrap_or(0.0);
    let stages = stage["stages"].as_array().map_or(0, Vec::len);
    let position = match stage["current"].as_u64() {
        Some(current) => format!("stage {current} of {stages}"),
        None => "between stages".to_owned(),
    };
    let next = stage["next"]
        .as_f64()
        .map_or("last stage".to_owned(), |next| {
            format!("next {}", percent(next))
        });
    let _ = writeln!(
        out,
        "experiment {}: treatment {} ({position}, {next}), {} in the stage",
        text(&report["experiment"]),
        percent(fraction),
        seconds(stage["seconds_in_stage"].as_f64().unwrap_or(0.0)),
    );
    let split = &report["sample_ratio"];
    let _ = writeln!(
        out,
        "requests: control {}, treatment {}; users: control {}, treatment {}{}; sample ratio {} (always-valid p = {})",
        split["control"],
        split["treatment"],
        split["users"]["control"],
        split["users"]["treatment"],
        if split["capped"] == true {
            " (counted up to the stage's cap)"
        } else {
            ""
        },
        if split["mismatch"] == true {
            "MISMATCH"
        } else {
            "ok"
        },
        split["p_value"].as_f64().map_or("n/a".to_owned(), |p| {
            if p >= 0.01 {
                format!("{p:.2}")
            } else {
                format!("{p:.1e}")
            }
        }),
    );
    if let Some(paused) = stage["paused"].as_object() {
        let _ = writeln!(
            out,
            "paused by {}: {}",
            text(&paused["source"]),
            text(&paused["reason"])
        );
    }
    let blockers = stage["blocked_by"].as_array().cloned().unwrap_or_default();
    if blockers.is_empty() {
        let _ = writeln!(out, "promotable: yes");
    } else {
        let _ = writeln!(out, "promotable: no");
        for blocker in &blockers {
            let _ = writeln!(out, "  - {}", text(blocker));
        }
    }
    let guard = &report["guardrails"];
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "guardrails: {} (alpha {} per stage, {} per check, source {})",
        text(&guard["verdict"]),
        guard["alpha"],
        guard["alpha_per_check"]
            .as_f64()
            .map_or("n/a".to_owned(), |a| format!("{a:.2e}")),
        text(&guard["source"]),
    );
    let evaluation = &guard["last_evaluation"];
    if evaluation.is_object() && guard["of_current_stage"] == false {
        let _ = writeln!(
            out,
            "(the last look, at {}, was at the stage before this one)",
            text(&evaluation["at"])
        );
    }
    if let Some(error) = evaluation["error"].as_str() {
        let _ = writeln!(out, "no numbers: {error}");
    }
    let checks = evaluation["checks"].as_array().cloned().unwrap_or_default();
    if !checks.is_empty() {
        let rows: Vec<[String; 7]> = checks.iter().map(row).collect();
        let header = [
            "check",
            "decision",
            "control",
            "treatment",
            "change",
            "interval",
            "still needs",
        ]
        .map(str::to_owned);
        table(&mut out, &header, &rows);
    }
    match report["last_trip"].as_object() {
        Some(trip) => {
            let _ = writeln!(
                out,
                "\nlast trip {}: {}",
                text(&trip["at"]),
                text(&trip["reason"])
            );
        }
        None => {
            let _ = writeln!(out, "\nlast trip: none");
        }
    }
    out
}

/// One check's row.
fn row(check: &Value) -> [String; 7] {
    let measure = check["measure"].as_str().unwrap_or("");
    let value = |v: &Value| match v.as_f64() {
        None => "-".to_owned(),
        Some(x) if measure.contains("latency") || measure.contains("first token") => {
            format!("{:.1} ms", x * 1000.0)
        }
        Some(x) if measure.contains("rate") => format!("{x:.4}"),
        Some(x) if measure.contains("rating") => format!("{x:.2}"),
        Some(x) if measure.contains("bytes") => format!("{x:.0} B"),
        Some(x) => format!("{x:.1}"),
    };
    let relative = check["scale"] == "relative";
    let on_scale = |v: &Value, none: &str| match v.as_f64() {
        None => none.to_owned(),
        Some(x) if relative => format!("{:+.1}%", x * 100.0),
        Some(x) => format!("{x:+.4}"),
    };
    let interval = &check["confidence_interval"];
    let decided = !matches!(check["decision"].as_str(), Some("insufficient_data"));
    let (change, bounds) = if decided {
        (
            on_scale(&check["estimate"], "-"),
            format!(
                "[{}, {}] at {:.2}%",
                on_scale(&interval["lower"], "-inf"),
                on_scale(&interval["upper"], "+inf"),
                interval["level"].as_f64().unwrap_or(0.0) * 100.0
            ),
        )
    } else {
        ("-".to_owned(), "-".to_owned())
    };
    let needs = match (check["decision"].as_str(), check["more_needed"].as_object()) {
        (Some("undecided"), Some(more)) => {
            let time = more
                .get("seconds")
                .and_then(Value::as_f64)
                .map(|s| format!(", ~{}", seconds(s)))
                .unwrap_or_default();
            format!("{} more treatment{time}", more["treatment"])
        }
        (Some("insufficient_data"), _) => {
            let observations = &check["observations"];
            format!(
                "data (has {} / {})",
                observations["control"], observations["treatment"]
            )
        }
        _ => String::new(),
    };
    [
        text(&check["check"]),
        text(&check["decision"]),
        value(&check["control"]),
        value(&check["treatment"]),
        change,
        bounds,
        needs,
    ]
}

/// Columns padded to their widest cell.
fn table(out: &mut String, header: &[String; 7], rows: &[[String; 7]]) {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn percent(fraction: f64) -> String {
    format!("{}%", (fraction * 1000.0).round() / 10.0)
}

fn seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_as_a_table() {
        let report = serde_json::json!({
            "experiment": "demo",
            "treatment_fraction": 0.05,
            "stage": {"stages": [0.05, 0.25, 0.5, 1.0], "current": 1, "next": 0.25,
                      "seconds_in_stage": 41.2, "paused": null,
                      "blocked_by": ["guardrail latency_p95 has not shown non-inferiority yet: ..."]},
            "sample_ratio": {"control": 7479, "treatment": 521, "mismatch": false, "p_value": 0.31,
                             "users": {"control": 570, "treatment": 30}, "capped": false},
            "guardrails": {"verdict": "undecided", "alpha": 0.05, "alpha_per_check": 0.0083,
                           "source": "local",
                "last_evaluation": {"checks": [
                    {"check": "latency_p95", "decision": "undecided", "measure": "p95 latency",
                     "control": 0.0246, "treatment": 0.0259, "scale": "relative",
                     "estimate": 0.051, "confidence_interval": {"level": 0.9917, "lower": 0.0, "upper": 0.25},
                     "more_needed": {"treatment": 300, "control": 4000, "seconds": 95.0},
                     "observations": {"control": 7479, "treatment": 521}},
                    {"check": "rating", "decision": "insufficient_data", "measure": "mean rating",
                     "control": null, "treatment": null, "scale": "difference",
                     "confidence_interval": {"level": 0.9917, "lower": null, "upper": null},
                     "observations": {"control": 0, "treatment": 0}}
                ]}},
            "last_trip": null
        });
        let text = render(&report);
        assert!(
            text.starts_with(
                "experiment demo: treatment 5% (stage 1 of 4, next 25%), 41 s in the stage\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "users: control 570, treatment 30; sample ratio ok (always-valid p = 0.31)"
            ),
            "{text}"
        );
        assert!(
            text.contains("promotable: no\n  - guardrail latency_p95"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("latency_p95"))
            .unwrap_or_default();
        for cell in [
            "undecided",
            "24.6 ms",
            "25.9 ms",
            "+5.1%",
            "[+0.0%, +25.0%] at 99.17%",
            "300 more treatment, ~95 s",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        let rating = text
            .lines()
            .find(|l| l.starts_with("rating "))
            .unwrap_or_default();
        assert!(rating.contains(" insufficient_data "), "{text}");
        assert!(text.ends_with("last trip: none\n"), "{text}");
    }
}
