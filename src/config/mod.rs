//! Typed configuration: TOML parsed into plain serde structs, then validated
//! whole into a [`Snapshot`] the data path reads without further checks.
//!
//! Two phases, so that every problem is reported at once with its key path
//! (`variants.treatment.upstream: ...`): serde rejects unknown keys and wrong
//! types (it stops at the first), then [`Config::validate`] checks every
//! value and collects all that are wrong. A config that fails either phase
//! never reaches the proxy.
//!
//! - [`raw`]: the file as written ([`Config`] and its sections);
//! - [`validate`]: the checks, and [`load`];
//! - [`snapshot`]: the result, [`Snapshot`], with no copy of the file.

pub mod clock;
pub(crate) mod credentials;
pub(crate) mod events;
pub(crate) mod guardrails;
mod raw;
pub mod rollout;
mod snapshot;
pub mod state;
mod validate;

pub use raw::*;
pub use snapshot::*;
pub use validate::*;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::validate::parse_upstream;
    use super::*;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([("KEY".to_owned(), "sk-test".to_owned())])
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
[experiment]
name = "exp"
treatment_fraction = 0.1
[variants.control]
upstream = "https://api.openai.com"
model = "gpt-4o-mini"
api_key_env = "KEY"
[variants.treatment]
upstream = "https://api.anthropic.com/"
"#;

    #[test]
    fn good_config_resolves() {
        let snapshot = Config::parse(GOOD)
            .and_then(|c| c.validate(&env(), Path::new(".")))
            .unwrap();
        assert_eq!(snapshot.control.provider, Provider::Openai);
        assert_eq!(snapshot.treatment.provider, Provider::Anthropic);
        assert_eq!(snapshot.treatment.path_prefix, "");
        assert!(snapshot.control.credential.as_ref().unwrap().is_sensitive());
        assert_eq!(snapshot.user_header.as_str(), "x-user-id");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = GOOD.replace("model = \"gpt-4o-mini\"", "modle = \"gpt-4o-mini\"");
        let err = Config::parse(&text).unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("variants.control"), "{line}");
        assert!(line.contains("modle"), "{line}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = GOOD
            .replace("0.1", "1.5")
            .replace("https://api.openai.com", "ftp://x")
            .replace("KEY", "MISSING_KEY");
        let err = Config::parse(&text)
            .unwrap()
            .validate(&env(), Path::new("."))
            .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "experiment.treatment_fraction",
                "variants.control.upstream",
                "variants.control.api_key_env"
            ]
        );
    }

    #[test]
    fn upstream_ending_in_v1_is_refused() {
        let err = parse_upstream("https://api.openai.com/v1").unwrap_err();
        assert!(err.contains("appended"), "{err}");
        let (_, authority, prefix) = parse_upstream("http://10.0.0.5:8000/openai/").unwrap();
        assert_eq!(
            (authority.as_str(), prefix.as_str()),
            ("10.0.0.5:8000", "/openai")
        );
    }
}
