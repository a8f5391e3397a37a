//! `abgate demo --traffic N`, the README's first command, run as a process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// Parses the demo's table into (variant, requests, errors, users).
fn rows(table: &str) -> Vec<(String, usize, usize, usize)> {
    table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            match cells.first() {
                Some(&("control" | "treatment" | "unassigned")) if cells.len() == 10 => Some((
                    cells[0].to_owned(),
                    cells[1].parse().ok()?,
                    cells[3].parse().ok()?,
                    cells[4].parse().ok()?,
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn demo_traffic_prints_a_per_variant_table_matching_the_split() {
    let output = Command::new(env!("CARGO_BIN_EXE_abgate"))
        .args(["demo", "--traffic", "400", "--fraction", "0.5"])
        .env("ABGATE_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows = rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    let total: usize = rows.iter().map(|r| r.1).sum();
    assert_eq!(total, 400, "{out}");
    assert!(rows.iter().all(|r| r.2 == 0), "no errors expected: {out}");
    assert!(out.contains("out tokens"), "{out}");

    // 40 users, each sending ten requests: the users per arm must be
    // exactly what the reference assignment says.
    let treated_users = (0..40)
        .filter(|i| {
            abgate::experiment::assign::assign(format!("demo-user-{i}").as_bytes(), None, 0.5)
                == abgate::experiment::assign::Variant::Treatment
        })
        .count();
    let treatment = rows.iter().find(|r| r.0 == "treatment").unwrap();
    let control = rows.iter().find(|r| r.0 == "control").unwrap();
    assert_eq!(treatment.3, treated_users, "{out}");
    assert_eq!(control.3, 40 - treated_users, "{out}");
    assert_eq!(treatment.1, treated_users * 10, "{out}");
}

/// The README's first command is `cargo run --release -- demo …`: with more
/// than one binary in the package, that only works while `default-run`
/// names the gateway.
#[test]
fn the_readmes_cargo_run_reaches_the_gateway() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let first = readme
        .lines()
        .find(|line| line.starts_with("cargo "))
        .expect("a command in the README");
    assert!(first.starts_with("cargo run --release -- demo"), "{first}");
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap()).unwrap();
    // Binaries come from [[bin]] and from src/bin/ alike, so this holds
    // whether or not a second one exists today.
    assert_eq!(
        manifest["package"]
            .get("default-run")
            .and_then(|v| v.as_str()),
        Some("abgate"),
        "`cargo run` must know which binary is the gateway"
    );
}
