//! The config in force as an operator may see it: `GET /admin/config`.
//!
//! The file holds only the names of the env vars that carry secrets, never
//! the secrets, and the names are kept: they say where to look. Each secret
//! the config loaded is listed under `secrets` with its env var, whether it
//! is set, and its value as `<redacted>`. As a second line of defence any
//! string under a secret-like key (`token`, `secret`, `password`, `key`,
//! other than an `..._env` name) and the user part of any URL
//! (`https://user:pass@host`) are redacted too, so a key added to the
//! config later cannot leak through this view by mistake.
//!
//! `experiment.salt` is shown: it is not a secret, since anyone analysing
//! the experiment must be able to recompute the split.

use serde_json::{json, Map, Value};

use crate::config::Snapshot;

/// What every secret value is shown as.
pub(crate) const REDACTED: &str = "<redacted>";

/// The config of `snapshot` with every secret redacted.
pub(crate) fn config_view(snapshot: &Snapshot) -> Value {
    let mut config = Value::clone(&snapshot.written);
    redact_value(&mut config, false);
    // The env var names the file gives, read from it as written.
    let file: &Value = &snapshot.written;
    let env_name = |path: &[&str]| {
        path.iter()
            .try_fold(file, |value, key| value.get(key))
            .and_then(Value::as_str)
    };
    let loaded = |set: bool| if set { json!(REDACTED) } else { Value::Null };
    let mut secrets = Map::new();
    let mut add = |path: &str, env: Option<&str>, value: Value| {
        if let Some(env) = env {
            secrets.insert(
                path.to_owned(),
                json!({"env": env, "set": !value.is_null(), "value": value}),
            );
        }
    };
    add(
        "admin.token_env",
        Some(&snapshot.admin_token_env),
        loaded(snapshot.admin_token.is_some()),
    );
    add(
        "auth.api_keys_env",
        env_name(&["auth", "api_keys_env"]),
        match &snapshot.gateway_keys {
            Some(keys) => json!(vec![REDACTED; keys.len()]),
            None => Value::Null,
        },
    );
    add(
        "feedback.key_env",
        env_name(&["feedback", "key_env"]),
        loaded(snapshot.feedback_key.is_some()),
    );
    add(
        "events.user_id_key_env",
        snapshot
            .events
            .as_ref()
            .and_then(|events| events.user_id_key_env.as_deref()),
        loaded(snapshot.events_user_id_key.is_some()),
    );
    add(
        "state.password_env",
        env_name(&["state", "password_env"]),
        loaded(
            snapshot
                .state
                .as_ref()
                .is_some_and(|state| state.password.is_some()),
        ),
    );
    add(
        "variants.control.api_key_env",
        env_name(&["variants", "control", "api_key_env"]),
        loaded(snapshot.control.credential.is_some()),
    );
    add(
        "variants.treatment.api_key_env",
        env_name(&["variants", "treatment", "api_key_env"]),
        loaded(snapshot.treatment.credential.is_some()),
    );
    json!({
        "config": config,
        "secrets": secrets,
        "treatment_fraction_in_force": snapshot.treatment_fraction,
    })
}

/// Redacts, in place, strings under secret-like keys and URL credentials.
fn redact_value(value: &mut Value, secret_key: bool) {
    match value {
        Value::String(text) if secret_key => *text = REDACTED.to_owned(),
        Value::String(text) => {
            if let Some(redacted) = redact_url_credentials(text) {
                *text = redacted;
            }
        }
        Value::Array(items) => {
            for item in items {
                redact_value(item, secret_key);
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                redact_value(field, secret_key || is_secret_key(key));
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Whether a config key names a secret value (rather than where one is).
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.ends_with("_env") {
        return false;
    }
    ["token", "secret", "password", "passwd", "credential"]
        .iter()
        .any(|word| key.contains(word))
        || key == "key"
        || key == "keys"
        || key.ends_with("_key")
        || key.ends_with("_keys")
}

/// `scheme://<redacted>@host/...` when `text` is a URL with a user part.
fn redact_url_credentials(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{scheme}://{REDACTED}{}", &rest[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_and_url_credentials_are_redacted() {
        let mut value = json!({
            "admin": {"token_env": "ABGATE_ADMIN_TOKEN", "token": "t0ps3cret"},
            "x": {"api_key": "sk-1", "keys": ["a"], "signing_key": "k", "api_keys_env": "KEYS"},
            "guardrails": {"prometheus_url": "https://u:p@prom:9090/x", "max": 1},
            "list": [{"password": "p"}],
        });
        redact_value(&mut value, false);
        assert_eq!(value["admin"]["token_env"], "ABGATE_ADMIN_TOKEN");
        assert_eq!(value["admin"]["token"], REDACTED);
        assert_eq!(value["x"]["api_key"], REDACTED);
        assert_eq!(value["x"]["signing_key"], REDACTED);
        assert_eq!(value["x"]["api_keys_env"], "KEYS");
        assert_eq!(value["x"]["keys"], json!([REDACTED]));
        assert_eq!(
            value["guardrails"]["prometheus_url"],
            "https://<redacted>@prom:9090/x"
        );
        assert_eq!(value["list"][0]["password"], REDACTED);
        assert_eq!(redact_url_credentials("http://host/a@b"), None);
    }
}
