//! Header rules for forwarding: hop-by-hop headers (RFC 9110 §7.6.1) stay on
//! their own connection, and the client's credentials stay with the client
//! when a variant injects its own.

use http::header::{self, HeaderMap, HeaderName};

use crate::config::{Provider, Upstream};
use abgate_http1::framing::HOP_BY_HOP;

/// What forwarding does with a header, known from its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Passed on as is.
    EndToEnd,
    /// Describes one connection (RFC 9110 §7.6.1): never forwarded in
    /// either direction. `Connection` may name more of them.
    HopByHop,
    /// Carries or scopes the client's credential.
    Credential,
    /// Meant for the gateway's own hop: `Expect` of the client's request.
    Local,
    /// The gateway's `x-abgate-*` namespace: neither a client nor an
    /// upstream can pass off its own values as the gateway's.
    Gateway,
    /// The client's `Host`, which names the gateway: the side that sends
    /// to the upstream writes the upstream's instead.
    Host,
}

/// The prefix of the gateway's own headers.
const GATEWAY_NAMESPACE: &str = "x-abgate-";

fn class(name: &HeaderName) -> Class {
    let name = name.as_str();
    if HOP_BY_HOP.contains(&name) {
        return Class::HopByHop;
    }
    match name {
        "authorization" | "x-api-key" | "api-key" | "openai-organization" | "openai-project" => {
            Class::Credential
        }
        "host" => Class::Host,
        "expect" => Class::Local,
        name if name.starts_with(GATEWAY_NAMESPACE) => Class::Gateway,
        _ => Class::EndToEnd,
    }
}

/// Whether a header name, in any case, is in the gateway's `x-abgate-*`
/// namespace.
pub(crate) fn in_gateway_namespace(name: &[u8]) -> bool {
    name.get(..GATEWAY_NAMESPACE.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(GATEWAY_NAMESPACE.as_bytes()))
}

/// Removes the headers whose class `remove` picks, and with hop-by-hop
/// ones those `Connection` lists. One pass over the names finds them:
/// most requests and answers carry none, and then nothing else is done
/// (looking each name up instead costs a hash per name, on every request).
fn remove_where(headers: &mut HeaderMap, remove: impl Fn(Class) -> bool) {
    let mut doomed = Doomed::default();
    for name in headers.keys() {
        if remove(class(name)) {
            doomed.push(name.clone());
        }
    }
    if doomed.found == 0 {
        return;
    }
    if remove(Class::HopByHop) {
        for value in headers.get_all(header::CONNECTION) {
            let listed = value.to_str().unwrap_or("").split(',').map(str::trim);
            for name in listed {
                // `close` and `keep-alive` are options, or headers already
                // found above: most answers list nothing else.
                let option =
                    name.eq_ignore_ascii_case("close") || name.eq_ignore_ascii_case("keep-alive");
                if option || name.is_empty() {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    doomed.push(name);
                }
            }
        }
    }
    for name in doomed.slots.into_iter().flatten().chain(doomed.more) {
        headers.remove(name);
    }
}

/// Names to remove. A request always has Host, sometimes one or two more:
/// these fit without allocating. Standard names clone without allocating
/// too.
#[derive(Default)]
struct Doomed {
    slots: [Option<HeaderName>; 4],
    more: Vec<HeaderName>,
    found: usize,
}

impl Doomed {
    fn push(&mut self, name: HeaderName) {
        match self.slots.get_mut(self.found) {
            Some(slot) => *slot = Some(name),
            None => self.more.push(name),
        }
        self.found += 1;
    }
}

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// Readies an upstream's answer headers for the client: hop-by-hop
/// headers removed (with any the `Connection` header names), and the
/// gateway's namespace, whose fields on the answer are the gateway's alone.
pub(crate) fn prepare_answer(headers: &mut HeaderMap) {
    remove_where(headers, |class| {
        matches!(class, Class::HopByHop | Class::Gateway)
    });
}

/// Rewrites a client's request headers for `upstream`: hop-by-hop headers,
/// `Expect` and the gateway's `x-abgate-*` namespace removed (a client
/// cannot pass off its own values as the gateway's), and the credential.
/// With `gateway_auth` the client's credential headers held the gateway
/// key, which never leaves the gateway: they are removed whether or not
/// the upstream gets its own.
///
/// `Host` and `Content-Length` are left for the sending side, which
/// replaces both without a lookup in the map: the connection's own writer
/// puts the upstream's Host and a whole body's length in the head instead
/// of the client's, and the general client removes them before hyper sets
/// its own (see `client::HttpClient::request_until`).
pub(crate) fn prepare_upstream_request(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    gateway_auth: bool,
) {
    // Expect: the body is already read (or streamed as is), nothing to
    // wait for.
    let strip_credentials = gateway_auth || upstream.credential.is_some();
    remove_where(headers, |class| match class {
        Class::EndToEnd | Class::Host => false,
        Class::Credential => strip_credentials,
        Class::HopByHop | Class::Local | Class::Gateway => true,
    });
    if let Some(credential) = &upstream.credential {
        match upstream.provider {
            Provider::Openai => {
                headers.insert(header::AUTHORIZATION, credential.clone());
            }
            Provider::Anthropic => {
                headers.insert(X_API_KEY, credential.clone());
                if !headers.contains_key(&ANTHROPIC_VERSION) {
                    headers.insert(ANTHROPIC_VERSION, upstream.anthropic_version.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;
    use http::uri::Scheme;

    /// The names left, sorted (removal does not keep the order).
    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    fn upstream(provider: Provider, credential: Option<&'static str>) -> Upstream {
        Upstream {
            scheme: Scheme::HTTP,
            authority: "127.0.0.1:1".parse().unwrap(),
            path_prefix: String::new(),
            model: None,
            provider,
            credential: credential.map(HeaderValue::from_static),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
            ca_file: None,
        }
    }

    /// Everything a client might send, one header of each kind.
    fn client_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("host", "gateway.internal"),
            ("expect", "100-continue"),
            ("authorization", "Bearer client-key"),
            ("openai-organization", "org-1"),
            ("x-abgate-variant", "treatment"),
            ("content-type", "application/json"),
            ("content-length", "999"),
            ("x-user-id", "user-1"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn connection_listed_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        prepare_answer(&mut headers);
        assert_eq!(names(&headers), ["x-kept"]);

        // More names than fit without allocating, over two fields.
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("close, x-a, x-b"),
        );
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("x-c,x-d , x-e"),
        );
        for name in ["x-a", "x-b", "x-c", "x-d", "x-e", "x-kept"] {
            headers.insert(name, HeaderValue::from_static("1"));
        }
        prepare_answer(&mut headers);
        assert_eq!(names(&headers), ["x-kept"]);
    }

    #[test]
    fn an_answer_without_hop_by_hop_headers_keeps_all_but_the_gateways_namespace() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let before = headers.clone();
        headers.insert(
            "x-abgate-variant",
            HeaderValue::from_static("the upstream's, not the gateway's"),
        );
        prepare_answer(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn the_client_keeps_its_credential_when_the_upstream_has_none() {
        let mut headers = client_headers();
        prepare_upstream_request(&mut headers, &upstream(Provider::Openai, None), false);
        // Host and the length are the sending side's to replace.
        assert_eq!(
            names(&headers),
            [
                "authorization",
                "content-length",
                "content-type",
                "host",
                "openai-organization",
                "x-user-id"
            ]
        );
        assert_eq!(headers["authorization"], "Bearer client-key");
    }

    #[test]
    fn an_injected_key_replaces_every_client_credential() {
        let mut headers = client_headers();
        let openai = upstream(Provider::Openai, Some("Bearer upstream-key"));
        prepare_upstream_request(&mut headers, &openai, false);
        assert_eq!(
            names(&headers),
            [
                "authorization",
                "content-length",
                "content-type",
                "host",
                "x-user-id"
            ]
        );
        assert_eq!(headers["authorization"], "Bearer upstream-key");

        let mut headers = client_headers();
        let anthropic = upstream(Provider::Anthropic, Some("upstream-key"));
        prepare_upstream_request(&mut headers, &anthropic, false);
        assert_eq!(
            names(&headers),
            [
                "anthropic-version",
                "content-length",
                "content-type",
                "host",
                "x-api-key",
                "x-user-id"
            ]
        );
    }

    #[test]
    fn a_gateway_key_never_reaches_an_upstream_without_its_own() {
        let mut headers = client_headers();
        headers.insert("x-api-key", HeaderValue::from_static("gateway-key"));
        headers.insert("api-key", HeaderValue::from_static("gateway-key"));
        prepare_upstream_request(&mut headers, &upstream(Provider::Openai, None), true);
        assert_eq!(
            names(&headers),
            ["content-length", "content-type", "host", "x-user-id"]
        );
    }
}
