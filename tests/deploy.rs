//! The Kubernetes manifests in deploy/kubernetes/ agree with the gateway and
//! with each other: the PrometheusRule carries dashboards/alerts.yaml's groups
//! unchanged, the ConfigMap's abgate.toml is a valid config, and every secret
//! that config names reaches the container through the Deployment.
//!
//! The manifests are read as text, with just enough YAML understanding for
//! the shapes written there (block scalars, an `env:` list), so that no YAML
//! library is needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use abgate::config::Config;

/// A file of this repository, by its path from the root.
fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Everything after the one line that is exactly `marker`.
fn after_line<'a>(text: &'a str, file: &str, marker: &str) -> &'a str {
    let needle = format!("\n{marker}\n");
    let found: Vec<usize> = text.match_indices(&needle).map(|(at, _)| at).collect();
    match found[..] {
        [at] => &text[at + needle.len()..],
        _ => panic!(
            "{file}: expected exactly one line {marker:?}, found {}",
            found.len()
        ),
    }
}

/// `text` with `indent` spaces removed from every line; blank lines must be
/// empty, and every other line at least that deep.
fn dedent(text: &str, file: &str, indent: usize) -> String {
    let prefix = " ".repeat(indent);
    text.split_inclusive('\n')
        .map(|line| {
            if line == "\n" {
                line
            } else {
                line.strip_prefix(&prefix).unwrap_or_else(|| {
                    panic!("{file}: line {line:?} is not indented {indent} spaces")
                })
            }
        })
        .collect()
}

/// The literal block scalar (`key: |`) that starts after the line
/// `key_line`, its content indented `indent` spaces: the lines up to the
/// first one less indented, with the indentation removed.
fn block_scalar(text: &str, file: &str, key_line: &str, indent: usize) -> String {
    let prefix = " ".repeat(indent);
    let block: String = after_line(text, file, key_line)
        .split_inclusive('\n')
        .take_while(|line| line.trim().is_empty() || line.starts_with(&prefix))
        .collect();
    // Clip chomping: trailing blank lines are not part of the value.
    let content = dedent(block.trim_end(), file, indent);
    format!("{content}\n")
}

/// Where the container's environment variables come from.
#[derive(Debug, PartialEq, Eq)]
enum EnvSource {
    /// `value: ...`, written in the manifest.
    Literal,
    /// `valueFrom.secretKeyRef`: the Secret's name and key.
    Secret { name: String, key: String },
}

/// The container's `env:` list in deployment.yaml, by variable name.
fn deployment_env(deployment: &str) -> BTreeMap<String, EnvSource> {
    let lines: Vec<&str> = deployment.lines().collect();
    let env_at = lines
        .iter()
        .position(|line| line.trim() == "env:")
        .expect("deployment.yaml: no env: list");
    let env_indent = indent_of(lines[env_at]);
    // The list ends at the next key as shallow as `env:` itself.
    let list: Vec<&str> = lines[env_at + 1..]
        .iter()
        .take_while(|line| line.trim().is_empty() || indent_of(line) > env_indent)
        .copied()
        .collect();
    let mut items: Vec<Vec<&str>> = Vec::new();
    for line in list {
        if line.trim_start().starts_with("- ") {
            items.push(vec![line.trim_start().trim_start_matches("- ")]);
        } else if let Some(item) = items.last_mut() {
            item.push(line.trim());
        }
    }
    items
        .into_iter()
        .map(|item| {
            let field = |key: &str| {
                item.iter()
                    .find_map(|line| line.strip_prefix(key))
                    .map(|value| value.trim().trim_matches('"').to_owned())
            };
            let name = field("name: ").expect("deployment.yaml: env item without a name");
            let source = if item.contains(&"secretKeyRef:") {
                // The first `name:` is the variable's, the one after
                // secretKeyRef the Secret's.
                let secret_part = item
                    .iter()
                    .skip_while(|line| **line != "secretKeyRef:")
                    .copied()
                    .collect::<Vec<_>>();
                let secret_field = |key: &str| {
                    secret_part
                        .iter()
                        .find_map(|line| line.strip_prefix(key))
                        .map(|value| value.trim().to_owned())
                        .unwrap_or_else(|| {
                            panic!("deployment.yaml: {name}: secretKeyRef without {key}")
                        })
                };
                EnvSource::Secret {
                    name: secret_field("name: "),
                    key: secret_field("key: "),
                }
            } else {
                EnvSource::Literal
            };
            (name, source)
        })
        .collect()
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The abgate.toml that configmap.yaml holds.
fn configmap_toml() -> String {
    let configmap = repo_file("deploy/kubernetes/configmap.yaml");
    block_scalar(&configmap, "configmap.yaml", "  abgate.toml: |", 4)
}

/// Every env var the config reads a secret from, with the key naming it.
fn secrets_named(config: &Config) -> Vec<(&'static str, String)> {
    let mut named = vec![("admin.token_env", config.admin.token_env.clone())];
    named.extend(
        config
            .auth
            .api_keys_env
            .clone()
            .map(|name| ("auth.api_keys_env", name)),
    );
    named.extend(
        config
            .feedback
            .key_env
            .clone()
            .map(|name| ("feedback.key_env", name)),
    );
    named.extend(
        config
            .state
            .as_ref()
            .and_then(|state| state.password_env.clone())
            .map(|name| ("state.password_env", name)),
    );
    named.extend(
        config
            .variants
            .control
            .api_key_env
            .clone()
            .map(|name| ("variants.control.api_key_env", name)),
    );
    named.extend(
        config
            .variants
            .treatment
            .api_key_env
            .clone()
            .map(|name| ("variants.treatment.api_key_env", name)),
    );
    named
}

#[test]
fn prometheus_rule_carries_the_alert_groups_unchanged() {
    let alerts = repo_file("dashboards/alerts.yaml");
    let rule = repo_file("deploy/kubernetes/prometheusrule.yaml");
    assert!(rule.contains("\nkind: PrometheusRule\n"), "{rule}");
    assert!(
        rule.contains("\nspec:\n  groups:\n"),
        "prometheusrule.yaml: groups must sit directly under spec"
    );

    let groups = after_line(&alerts, "alerts.yaml", "groups:");
    let rule_groups = dedent(
        after_line(&rule, "prometheusrule.yaml", "  groups:"),
        "prometheusrule.yaml",
        2,
    );
    assert!(groups.contains("- name: abgate-red-flags"), "{groups}");
    assert!(
        rule_groups == groups,
        "deploy/kubernetes/prometheusrule.yaml has drifted from dashboards/alerts.yaml; \
         run deploy/kubernetes/gen-prometheusrule.sh"
    );
}

#[test]
fn configmap_config_is_valid_with_the_deployments_secrets() {
    let toml = configmap_toml();
    let config = Config::parse(&toml)
        .unwrap_or_else(|err| panic!("configmap.yaml's abgate.toml does not parse:\n{err}"));
    // Each variable the Deployment sets, holding a value of the shape its
    // Secret holds (hex keys of 32 bytes).
    let env: BTreeMap<String, String> =
        deployment_env(&repo_file("deploy/kubernetes/deployment.yaml"))
            .into_keys()
            .map(|name| (name, "0123456789abcdef".repeat(4)))
            .collect();
    let snapshot = config
        .validate(&env, Path::new("/etc/abgate"))
        .unwrap_or_else(|err| panic!("configmap.yaml's abgate.toml is not valid:\n{err}"));

    assert_eq!(snapshot.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(
        snapshot
            .admin_listen
            .map(|addr| addr.to_string())
            .as_deref(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(snapshot.control.authority.as_str(), "api.openai.com");
    assert_eq!(snapshot.treatment.authority.as_str(), "api.openai.com");
    assert_eq!(
        snapshot.treatment.model.as_ref().map(|m| m.name.as_str()),
        Some("ft:gpt-4o-mini-2024-07-18:acme:support-v3:abc123")
    );
    assert!(snapshot.control.credential.is_some());
    assert!(snapshot.treatment.credential.is_some());
    // A fleet needs a shared key: with none, each replica signs request ids
    // with a random key of its own and cannot verify the others'.
    assert!(snapshot.feedback_key.is_some());
    assert!(snapshot.admin_token.is_some());
    // The proxy port is reachable from the whole cluster: it takes keys.
    assert!(snapshot.gateway_keys.is_some());
    // The fleet shares its rollout state, through the example Redis.
    let state = config.state.as_ref().expect("the fleet's [state]");
    assert!(
        state.url.starts_with("redis://abgate-redis:"),
        "{}",
        state.url
    );
    let redis = repo_file("deploy/kubernetes/redis.yaml");
    assert!(
        redis.contains("name: abgate-redis"),
        "redis.yaml names its Service"
    );
    assert!(
        redis.contains("key: ABGATE_STATE_PASSWORD"),
        "redis.yaml takes its password from the Secret the gateway reads"
    );
}

#[test]
fn every_secret_the_config_names_is_given_by_the_deployment() {
    let config = Config::parse(&configmap_toml()).unwrap_or_else(|err| panic!("{err}"));
    let env = deployment_env(&repo_file("deploy/kubernetes/deployment.yaml"));
    let secret_example = repo_file("deploy/kubernetes/secret.example.yaml");

    let named = secrets_named(&config);
    assert_eq!(named.len(), 6, "{named:?}");
    for (key, name) in named {
        match env.get(&name) {
            Some(EnvSource::Secret {
                name: secret,
                key: secret_key,
            }) => {
                assert_eq!(secret, "abgate", "{key} = {name:?}");
                // The example Secret and the command creating it list the key.
                assert!(
                    secret_example.contains(&format!("#   {secret_key}: "))
                        && secret_example.contains(&format!("--from-literal={secret_key}=")),
                    "secret.example.yaml does not show {secret_key} (for {key})"
                );
            }
            Some(EnvSource::Literal) => {
                panic!("{key} = {name:?} is written into deployment.yaml; take it from the Secret")
            }
            None => panic!(
                "{key} = {name:?} but deployment.yaml does not set {name}; found {:?}",
                env.keys().collect::<Vec<_>>()
            ),
        }
    }
}

/// The whole number after `key: ` on the line following the line
/// `after` (or on the first line `key: ` itself when `after` is empty).
fn yaml_number(text: &str, after: &str, key: &str) -> u64 {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let from = match after {
        "" => 0,
        _ => lines
            .iter()
            .position(|line| *line == after)
            .unwrap_or_else(|| panic!("deployment.yaml: no {after:?} line")),
    };
    lines[from..]
        .iter()
        .find_map(|line| line.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("deployment.yaml: no {key} after {after:?}"))
        .parse()
        .unwrap()
}

#[test]
fn the_gateways_drain_ends_before_kubernetes_kills_the_pod() {
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    let grace = yaml_number(&deployment, "", "terminationGracePeriodSeconds");
    let pre_stop = yaml_number(&deployment, "sleep:", "seconds");
    let config = Config::parse(&configmap_toml()).unwrap();
    let server = &config.server;
    let drain_ms = pre_stop * 1000
        + server.drain_delay_ms
        + server.drain_timeout_ms
        + abgate::app::CUT_GRACE.as_millis() as u64;
    assert!(
        drain_ms < grace * 1000,
        "preStop {pre_stop} s + drain_delay_ms {} + drain_timeout_ms {} (+ {:?}) must be less than terminationGracePeriodSeconds {grace}",
        server.drain_delay_ms,
        server.drain_timeout_ms,
        abgate::app::CUT_GRACE,
    );
    assert!(
        server.drain_timeout_ms >= config.timeouts.first_byte_ms,
        "a completion waiting for its headers would be cut before first_byte_ms"
    );
}

#[test]
fn deployment_serves_the_configmap_it_mounts() {
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    let configmap = repo_file("deploy/kubernetes/configmap.yaml");
    let args: Vec<&str> = deployment.lines().map(str::trim).collect();
    let arg_after = |flag: &str| {
        let at = args
            .iter()
            .position(|line| *line == format!("- {flag}"))
            .unwrap_or_else(|| panic!("deployment.yaml: no {flag} argument"));
        args[at + 1].trim_start_matches("- ")
    };
    assert_eq!(arg_after("--config"), "/etc/abgate/abgate.toml");
    assert_eq!(arg_after("--state-dir"), "/var/lib/abgate");
    // A directory mount: a subPath mount would never see ConfigMap updates.
    assert!(deployment.contains("mountPath: /etc/abgate\n"));
    assert!(!args.iter().any(|line| line.starts_with("subPath:")));
    assert!(deployment.contains("name: abgate-config\n"));
    assert!(configmap.contains("\n  name: abgate-config\n"));

    // The probes and Services name the ports; the ports match the config.
    for (port, number) in [("proxy", 8080), ("admin", 9090)] {
        let at = args
            .iter()
            .position(|line| *line == format!("- name: {port}"))
            .unwrap_or_else(|| panic!("deployment.yaml: no port named {port}"));
        assert_eq!(args[at + 1], format!("containerPort: {number}"));
    }
}
