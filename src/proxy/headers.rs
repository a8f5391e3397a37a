//! Header rules for forwarding: hop-by-hop headers (RFC 9110 §7.6.1) stay on
//! their own connection, and the client's credentials stay with the client
//! when a variant injects its own.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::{Provider, Upstream};

/// Headers that describe one connection, never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Headers that carry or scope the client's credential.
const CLIENT_CREDENTIALS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Removes request headers in the gateway's own namespace, so a client
/// cannot pass off its own `x-abgate-*` values as the gateway's.
pub fn strip_reserved(headers: &mut HeaderMap) {
    if headers.keys().any(is_reserved) {
        let reserved: Vec<HeaderName> =
            headers.keys().filter(|n| is_reserved(n)).cloned().collect();
        for name in reserved {
            headers.remove(name);
        }
    }
}

fn is_reserved(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-abgate-")
}

/// Rewrites a client's request headers for `upstream`: credential, and the
/// body length when the body was rewritten. With `gateway_auth` the
/// client's credential headers held the gateway key, which never leaves
/// the gateway: they are removed whether or not the upstream gets its own.
pub fn prepare_upstream_request(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    content_length: Option<usize>,
    gateway_auth: bool,
) {
    strip_hop_by_hop(headers);
    strip_reserved(headers);
    // The body is already read (or streamed as is): nothing to wait for.
    headers.remove(header::EXPECT);
    // The client sets Host (HTTP/1.1) or :authority (HTTP/2) from the
    // upstream URI; the client's Host names the gateway, not the upstream.
    headers.remove(header::HOST);
    if let Some(length) = content_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if gateway_auth || upstream.credential.is_some() {
        for name in &CLIENT_CREDENTIALS {
            headers.remove(name);
        }
    }
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
        headers.insert("x-abgate-variant", HeaderValue::from_static("treatment"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        strip_reserved(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }
}
