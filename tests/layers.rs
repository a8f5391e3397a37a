//! The gateway's modules are layered, each importing only those below it:
//! experiment → config → telemetry → proxy → control → app, demo. Cargo
//! enforces the arrows between crates; inside the gateway this test does,
//! reading every source file for a `crate::` path that points up.

use std::path::{Path, PathBuf};

/// The layers, lowest first; a module may use its own layer and those
/// before it.
const LAYERS: [&[&str]; 6] = [
    &["experiment"],
    &["config"],
    &["telemetry"],
    &["proxy"],
    &["control"],
    &["app", "demo"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`src/proxy/read.rs` →
/// `proxy`, `src/app.rs` → `app`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

/// Every `crate::<module>` named in `text`, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let module: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((number + 1, module));
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            continue; // lib.rs, main.rs (the command line, above all)
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        // A unit test may reach anywhere in the crate.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for (line, target) in crate_paths(code) {
            checked += 1;
            if layer_of(&target).is_some_and(|layer| layer > own) {
                upward.push(format!("{}:{line}: {module} -> {target}", file.display()));
            }
        }
    }
    assert!(checked > 100, "only {checked} crate:: paths read");
    assert!(
        upward.is_empty(),
        "imports up the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let paths = crate_paths("use crate::control::live::LiveConfig; x(crate::proxy::Gateway)");
    let names: Vec<&str> = paths.iter().map(|(_, module)| module.as_str()).collect();
    assert_eq!(names, ["control", "proxy"]);
    assert!(layer_of("control") > layer_of("proxy"));
    assert_eq!(layer_of("lib"), None);
}
