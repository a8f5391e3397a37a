//! Validation: every value of a parsed [`Config`] checked, every problem
//! collected with its key path, and the whole resolved into a
//! [`Snapshot`], or refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};

use super::raw::*;
use super::snapshot::{ModelRewrite, Secret, Snapshot, Upstream};

/// One thing wrong with a config, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub(crate) message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config; it was not applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", display_problems(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn display_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    pub(super) fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Where secrets named by the config are looked up. The process
/// environment in production; a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Config {
    /// Checks every value and resolves it into a [`Snapshot`], or returns
    /// all problems found. `base_dir` anchors relative file paths.
    pub fn validate(&self, env: &dyn Env, base_dir: &Path) -> Result<Snapshot, ConfigError> {
        let mut problems = Vec::new();
        let mut report = |path: &str, message: String| {
            problems.push(Problem {
                path: path.to_owned(),
                message,
            })
        };

        let listen = parse_addr(&self.server.listen)
            .map_err(|m| report("server.listen", m))
            .ok();
        let admin_listen = match &self.server.admin_listen {
            Some(addr) => parse_addr(addr)
                .map_err(|m| report("server.admin_listen", m))
                .ok(),
            None => None,
        };
        if self.server.max_body_bytes == 0 {
            report("server.max_body_bytes", "must be greater than 0".into());
        }

        let experiment = &self.experiment;
        if !is_label_safe(&experiment.name) {
            report(
                "experiment.name",
                format!(
                    "{:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-' (it is a metric label)",
                    experiment.name
                ),
            );
        }
        let fraction = experiment.treatment_fraction;
        if let Err(why) = crate::experiment::assign::Fraction::new(fraction) {
            report("experiment.treatment_fraction", why);
        }
        if let Some(salt) = &experiment.salt {
            if salt.is_empty() {
                report(
                    "experiment.salt",
                    "must not be empty; remove it to hash user IDs unsalted".into(),
                );
            }
        }

        let user_header = match HeaderName::from_bytes(self.identity.header.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                report(
                    "identity.header",
                    format!("{:?} is not a valid HTTP header name", self.identity.header),
                );
                None
            }
        };
        if self.identity.max_user_id_bytes == 0 {
            report(
                "identity.max_user_id_bytes",
                "must be greater than 0".into(),
            );
        }
        if self.timeouts.connect_ms == 0 {
            report("timeouts.connect_ms", "must be greater than 0".into());
        }
        for (key, value) in [
            ("timeouts.first_byte_ms", self.timeouts.first_byte_ms),
            ("timeouts.idle_ms", self.timeouts.idle_ms),
            ("timeouts.total_ms", self.timeouts.total_ms),
            ("timeouts.client_write_ms", self.timeouts.client_write_ms),
        ] {
            if value == 0 {
                report(key, "must be greater than 0".into());
            }
        }
        let limits = &self.limits;
        if limits.max_inflight == 0 {
            report("limits.max_inflight", "must be greater than 0".into());
        }
        if limits.max_inflight_per_variant == Some(0) {
            report(
                "limits.max_inflight_per_variant",
                "must be greater than 0; remove it to cap only max_inflight".into(),
            );
        }
        if limits.max_header_bytes < 1024 {
            report("limits.max_header_bytes", "must be at least 1024".into());
        }
        let feedback_key = self
            .feedback
            .key_env
            .as_deref()
            .and_then(|name| signing_key(env, name, "feedback.key_env", &mut report));
        if self.feedback.outcomes.is_empty() || self.feedback.outcomes.len() > 32 {
            report("feedback.outcomes", "must list 1 to 32 outcomes".into());
        }
        for outcome in &self.feedback.outcomes {
            if !is_label_safe(outcome) {
                report(
                    "feedback.outcomes",
                    format!("{outcome:?} must be letters, digits, '.', '_' or '-' (it is a metric label)"),
                );
            }
        }
        let admin_token = env
            .var(&self.admin.token_env)
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty());
        if let Some(token) = &admin_token {
            if token.len() < 16 {
                report(
                    "admin.token_env",
                    format!(
                        "the token in {} must be at least 16 characters",
                        self.admin.token_env
                    ),
                );
            }
        }
        if self.qa.allow_override && admin_token.is_none() {
            report(
                "qa.override",
                format!(
                    "needs the admin token (in {}), which forced requests must carry",
                    self.admin.token_env
                ),
            );
        }
        let gateway_keys = match &self.auth.api_keys_env {
            None => None,
            Some(name) => match env.var(name) {
                // Refuse to start open when keys were asked for.
                None => {
                    report(
                        "auth.api_keys_env",
                        format!("environment variable {name} is not set"),
                    );
                    None
                }
                Some(text) => match crate::config::credentials::KeySet::parse(&text) {
                    Ok(keys) => Some(std::sync::Arc::new(keys)),
                    Err(message) => {
                        report(
                            "auth.api_keys_env",
                            format!("environment variable {name} {message}"),
                        );
                        None
                    }
                },
            },
        };
        if let Some(events) = &self.events {
            if events.path.is_empty() {
                report("events.path", "must be a file path, or - for stdout".into());
            }
            if events.queue == 0 {
                report("events.queue", "must be greater than 0".into());
            }
        }
        let events_user_id_key = self
            .events
            .as_ref()
            .and_then(|events| events.user_id_key_env.as_deref())
            .and_then(|name| signing_key(env, name, "events.user_id_key_env", &mut report));

        let schedule = self
            .rollout
            .validate(experiment.treatment_fraction, &mut report);
        self.guardrails
            .validate(&self.feedback.outcomes, &mut report);
        let state = self.state.as_ref().and_then(|state| {
            let password = state.password_env.as_deref().and_then(|name| env.var(name));
            state.validate(password, &mut report)
        });

        if self.variants.control.fallback_to_control {
            report(
                "variants.control.fallback_to_control",
                "only variants.treatment can fall back to control".into(),
            );
        }
        let control = resolve_variant(
            "variants.control",
            &self.variants.control,
            env,
            base_dir,
            &mut report,
        );
        let treatment = resolve_variant(
            "variants.treatment",
            &self.variants.treatment,
            env,
            base_dir,
            &mut report,
        );

        match (listen, user_header, control, treatment) {
            (Some(listen), Some(user_header), Some(control), Some(treatment))
                if problems.is_empty() =>
            {
                Ok(Snapshot {
                    listen,
                    admin_listen,
                    max_body_bytes: self.server.max_body_bytes,
                    experiment: experiment.name.clone(),
                    experiment_header: HeaderValue::from_str(&experiment.name)
                        .map_err(|_| ConfigError::one("experiment.name", "not a header value"))?,
                    treatment_fraction: fraction,
                    salt: experiment.salt.clone(),
                    user_header,
                    require_user: self.identity.require,
                    max_user_id_bytes: self.identity.max_user_id_bytes,
                    control,
                    treatment,
                    feedback_key,
                    events_user_id_key,
                    admin_token: admin_token.map(|token| {
                        crate::config::credentials::SecretDigest::of(token.as_bytes())
                    }),
                    gateway_keys,
                    qa_override: self.qa.allow_override,
                    connect_timeout: Duration::from_millis(self.timeouts.connect_ms),
                    first_byte_timeout: Duration::from_millis(self.timeouts.first_byte_ms),
                    idle_timeout: Duration::from_millis(self.timeouts.idle_ms),
                    total_timeout: Duration::from_millis(self.timeouts.total_ms),
                    client_write_timeout: Duration::from_millis(self.timeouts.client_write_ms),
                    fallback_to_control: self.variants.treatment.fallback_to_control,
                    drain_delay: Duration::from_millis(self.server.drain_delay_ms),
                    drain_timeout: Duration::from_millis(self.server.drain_timeout_ms),
                    schedule,
                    limits: self.limits.clone(),
                    feedback: self.feedback.clone(),
                    guardrails: self.guardrails.clone(),
                    rollout: self.rollout.clone(),
                    events: self.events.clone(),
                    state,
                    admin_token_env: self.admin.token_env.clone(),
                    written: std::sync::Arc::new(
                        serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
                    ),
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path, env: &dyn Env) -> Result<Snapshot, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|err| ConfigError::one("", format!("cannot read {}: {err}", path.display())))?;
    load_bytes(path, &bytes, env)
}

/// Parses and validates `bytes`, already read from `path` (paths inside
/// resolve beside it); the file is not read again.
pub(crate) fn load_bytes(
    path: &Path,
    bytes: &[u8],
    env: &dyn Env,
) -> Result<Snapshot, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|err| ConfigError::one("", format!("{} is not UTF-8: {err}", path.display())))?;
    let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
    Config::parse(text)?.validate(env, base_dir)
}

/// The key in env var `name` (at least 16 characters), or a problem at
/// `path`; the key itself is never quoted.
fn signing_key(
    env: &dyn Env,
    name: &str,
    path: &str,
    report: &mut dyn FnMut(&str, String),
) -> Option<Secret<Vec<u8>>> {
    match env.var(name) {
        Some(key) if key.len() >= 16 => Some(Secret(key.into_bytes())),
        Some(_) => {
            report(
                path,
                format!("environment variable {name} must hold at least 16 characters"),
            );
            None
        }
        None => {
            report(path, format!("environment variable {name} is not set"));
            None
        }
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:8080"))
}

fn is_label_safe(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn resolve_variant(
    path: &str,
    variant: &VariantConfig,
    env: &dyn Env,
    base_dir: &Path,
    report: &mut dyn FnMut(&str, String),
) -> Option<Upstream> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        ok = false;
        report(&format!("{path}.{key}"), message);
    };

    let origin = match parse_upstream(&variant.upstream) {
        Ok(origin) => Some(origin),
        Err(message) => {
            fail("upstream", message);
            None
        }
    };

    let model = match &variant.model {
        Some(name) if name.is_empty() => {
            fail(
                "model",
                "must not be empty; remove it to pass the client's model through".into(),
            );
            None
        }
        Some(name) => match ModelRewrite::new(name) {
            Some(rewrite) => Some(rewrite),
            None => {
                fail(
                    "model",
                    format!("{name:?} cannot be sent as an HTTP header value"),
                );
                None
            }
        },
        None => None,
    };

    let provider = variant.provider.unwrap_or_else(|| match &origin {
        Some((_, authority, _)) if authority.host().ends_with("anthropic.com") => {
            Provider::Anthropic
        }
        _ => Provider::Openai,
    });

    let anthropic_version = variant
        .anthropic_version
        .as_deref()
        .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
    let anthropic_version = match HeaderValue::from_str(anthropic_version) {
        Ok(value) => Some(value),
        Err(_) => {
            fail(
                "anthropic_version",
                format!("{anthropic_version:?} is not a valid header value"),
            );
            None
        }
    };

    let credential = match &variant.api_key_env {
        None => None,
        Some(name) => match env.var(name) {
            None => {
                fail(
                    "api_key_env",
                    format!("environment variable {name} is not set"),
                );
                None
            }
            Some(key) if key.trim().is_empty() => {
                fail(
                    "api_key_env",
                    format!("environment variable {name} is empty"),
                );
                None
            }
            Some(key) => {
                let value = match provider {
                    Provider::Openai => HeaderValue::from_str(&format!("Bearer {}", key.trim())),
                    Provider::Anthropic => HeaderValue::from_str(key.trim()),
                };
                match value {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        Some(value)
                    }
                    Err(_) => {
                        // Never echo the key itself.
                        fail(
                            "api_key_env",
                            format!("environment variable {name} holds characters not allowed in a header"),
                        );
                        None
                    }
                }
            }
        },
    };

    let ca_file = variant.ca_file.as_ref().map(|file| {
        if file.is_absolute() {
            file.clone()
        } else {
            base_dir.join(file)
        }
    });
    if let Some(file) = &ca_file {
        if let Err(message) = read_pem_certs(file) {
            fail("ca_file", message);
        }
    }

    let (scheme, authority, path_prefix) = origin?;
    let anthropic_version = anthropic_version?;
    ok.then_some(Upstream {
        scheme,
        authority,
        path_prefix,
        model,
        provider,
        credential,
        anthropic_version,
        ca_file,
    })
}

/// Splits `scheme://authority[/prefix]`, rejecting anything else.
pub(super) fn parse_upstream(text: &str) -> Result<(Scheme, Authority, String), String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL like https://api.openai.com"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{text:?} must not carry credentials; use api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query string"));
    }
    let prefix = uri.path().trim_end_matches('/').to_owned();
    if prefix.ends_with("/v1") {
        return Err(format!(
            "{text:?} ends in /v1, but the client's path (/v1/...) is appended as is; use the origin, e.g. {}://{}",
            scheme, authority
        ));
    }
    Ok((scheme, authority, prefix))
}

/// Reads every certificate in a PEM file; at least one must be there.
pub(crate) fn read_pem_certs(
    file: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(format!("{} holds no PEM certificate", file.display())),
        Err(err) => Err(format!("{} is not valid PEM: {err}", file.display())),
    }
}
