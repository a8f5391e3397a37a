//! `[state]`: where the rollout's runtime state lives. Without it, a state
//! file beside the config (each replica its own); with it, a Redis every
//! replica of the fleet shares, so a change made on one reaches all.

use serde::{Deserialize, Serialize};

/// `[state]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://HOST:PORT/DB`, or `rediss://` for TLS.
    pub url: String,
    /// Env var holding the store's password, kept out of the file.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Keys are `<key_prefix>:<experiment>:...`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_key_prefix() -> String {
    "abgate".to_owned()
}

/// `[state]`, validated: what the store client connects with.
#[derive(Clone, PartialEq)]
pub(crate) struct StateStoreSettings {
    pub(crate) url: String,
    pub(crate) password: Option<String>,
    pub(crate) key_prefix: String,
}

impl std::fmt::Debug for StateStoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStoreSettings")
            .field("url", &redacted_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// The URL with any password in it replaced, for logs and the admin API.
pub(crate) fn redacted_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            format!(
                "{scheme}://<redacted>@{}",
                &rest[at - scheme.len() - 3 + 1..]
            )
        }
        _ => url.to_owned(),
    }
}

impl StateConfig {
    /// Checks the section; `password` is what `password_env` names.
    pub(crate) fn validate(
        &self,
        password: Option<String>,
        report: &mut dyn FnMut(&str, String),
    ) -> Option<StateStoreSettings> {
        let mut ok = true;
        let rest = self
            .url
            .strip_prefix("redis://")
            .or_else(|| self.url.strip_prefix("rediss://"));
        match rest {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
            _ => {
                report(
                    "state.url",
                    format!(
                        "{:?} must be redis://HOST:PORT/DB or rediss://HOST:PORT/DB",
                        redacted_url(&self.url)
                    ),
                );
                ok = false;
            }
        }
        if let Some(name) = &self.password_env {
            if !password.as_deref().is_some_and(|p| !p.is_empty()) {
                report(
                    "state.password_env",
                    format!("environment variable {name} is not set"),
                );
                ok = false;
            }
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !prefix_ok {
            report(
                "state.key_prefix",
                "must be letters, digits, '-', '_' or '.'".into(),
            );
            ok = false;
        }
        ok.then(|| StateStoreSettings {
            url: self.url.clone(),
            password,
            key_prefix: self.key_prefix.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: &StateConfig, password: Option<&str>) -> Vec<String> {
        let mut found = Vec::new();
        config.validate(password.map(str::to_owned), &mut |p, m| {
            found.push(format!("{p}: {m}"))
        });
        found
    }

    #[test]
    fn urls_passwords_and_prefixes_are_checked() {
        let config = StateConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            password_env: None,
            key_prefix: default_key_prefix(),
        };
        assert!(check(&config, None).is_empty());
        let tls = StateConfig {
            url: "rediss://cache.internal:6380/2".into(),
            password_env: Some("REDIS_PASSWORD".into()),
            ..config.clone()
        };
        assert!(check(&tls, Some("secret")).is_empty());
        assert!(check(&tls, None)[0]
            .starts_with("state.password_env: environment variable REDIS_PASSWORD"));
        let bad = StateConfig {
            url: "http://redis:6379".into(),
            key_prefix: "a b".into(),
            ..config
        };
        let found = check(&bad, None);
        assert!(
            found[0].starts_with("state.url: \"http://redis:6379\" must be"),
            "{found:?}"
        );
        assert!(found[1].starts_with("state.key_prefix:"), "{found:?}");
    }

    #[test]
    fn passwords_in_urls_are_not_shown() {
        assert_eq!(
            redacted_url("redis://:hunter2@cache:6379/0"),
            "redis://<redacted>@cache:6379/0"
        );
        assert_eq!(redacted_url("redis://cache:6379/0"), "redis://cache:6379/0");
    }
}
