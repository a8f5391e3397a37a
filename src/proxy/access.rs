//! Who may use the proxy port, and who may pick an arm instead of the hash.
//!
//! With `[auth] api_keys_env`, every request on the proxy port presents a
//! gateway key the way the SDKs send their API key: `Authorization: Bearer
//! <key>` (OpenAI) or `x-api-key: <key>` (Anthropic). The key is the
//! gateway's, never the upstream's: the headers that carried it are
//! removed before forwarding (see `headers::prepare_upstream_request`).
//!
//! With `[qa] override = true`, a request carrying the admin token in
//! `x-abgate-admin-token` may name its arm in `x-abgate-force-variant`.
//! Such a request is not a random assignment, so it is kept out of the
//! experiment's numbers. The force header on any other request is refused
//! with a 403 rather than ignored, so a tester never mistakes a hashed
//! answer for a forced one.

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};

use crate::config::credentials::KeySet;
use crate::config::Snapshot;
use crate::experiment::assign::Variant;
use crate::proxy::error::ProxyError;

/// Request header naming the arm a QA request wants.
pub(crate) const FORCE_VARIANT_HEADER: HeaderName =
    HeaderName::from_static("x-abgate-force-variant");
/// Request header carrying the admin token that allows a forced arm.
pub(crate) const ADMIN_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-abgate-admin-token");
/// Response header marking an answer whose arm was forced.
pub(crate) const FORCED_HEADER: HeaderName = HeaderName::from_static("x-abgate-forced");

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Phase 2, **authenticate**: the gateway key, if the config asks for
/// one; then the arm the request may force, if any.
#[inline]
pub(crate) fn check(config: &Snapshot, headers: &HeaderMap) -> Result<Option<Variant>, ProxyError> {
    if let Some(keys) = &config.gateway_keys {
        authenticate(keys, headers)?;
    }
    forced_variant(config, headers)
}

/// Checks that the request presents one of `keys`, in either SDK's header.
/// Every key presented is compared (in constant time), so a client that
/// sends both headers is let in if either holds a gateway key.
pub(crate) fn authenticate(keys: &KeySet, headers: &HeaderMap) -> Result<(), ProxyError> {
    let bearer = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|value| bearer_token(value.as_bytes()));
    let api_keys = headers
        .get_all(X_API_KEY)
        .iter()
        .map(|value| value.as_bytes());
    let mut presented = false;
    let mut accepted = false;
    for offered in bearer.chain(api_keys) {
        presented = true;
        accepted |= keys.contains(offered);
    }
    match (presented, accepted) {
        (_, true) => Ok(()),
        (false, false) => Err(ProxyError::MissingApiKey),
        (true, false) => Err(ProxyError::InvalidApiKey),
    }
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
}

/// The arm a request forces, if it asks for one and may: `[qa] override`
/// on and the admin token in [`ADMIN_TOKEN_HEADER`]. Asking without
/// leave is a 403; naming something other than `control` or `treatment`
/// a 400.
pub(crate) fn forced_variant(
    config: &Snapshot,
    headers: &HeaderMap,
) -> Result<Option<Variant>, ProxyError> {
    let Some(asked) = headers.get(FORCE_VARIANT_HEADER) else {
        return Ok(None);
    };
    if !config.qa_override {
        return Err(ProxyError::ForcedVariantRefused {
            reason: "[qa] override is off",
        });
    }
    let token = headers
        .get(ADMIN_TOKEN_HEADER)
        .map_or(&b""[..], |value| value.as_bytes());
    let allowed = config
        .admin_token
        .as_ref()
        .is_some_and(|expected| expected.matches(token));
    if !allowed {
        return Err(ProxyError::ForcedVariantRefused {
            reason: "the x-abgate-admin-token header does not hold the admin token",
        });
    }
    match asked.as_bytes() {
        b"control" => Ok(Some(Variant::Control)),
        b"treatment" => Ok(Some(Variant::Treatment)),
        _ => Err(ProxyError::InvalidForcedVariant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn keys() -> KeySet {
        KeySet::parse("gw-key-aaaaaaaaaaaa,gw-key-bbbbbbbbbbbb").unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn either_sdk_header_carries_the_key() {
        let keys = keys();
        for pairs in [
            [("authorization", "Bearer gw-key-aaaaaaaaaaaa")],
            [("authorization", "bearer gw-key-bbbbbbbbbbbb")],
            [("x-api-key", "gw-key-aaaaaaaaaaaa")],
        ] {
            assert!(authenticate(&keys, &headers(&pairs)).is_ok(), "{pairs:?}");
        }
        let both = headers(&[
            ("authorization", "Bearer sk-provider-key"),
            ("x-api-key", "gw-key-bbbbbbbbbbbb"),
        ]);
        assert!(authenticate(&keys, &both).is_ok());
    }

    #[test]
    fn missing_and_wrong_keys_are_told_apart() {
        let keys = keys();
        assert!(matches!(
            authenticate(&keys, &headers(&[])),
            Err(ProxyError::MissingApiKey)
        ));
        for pairs in [
            [("authorization", "Bearer gw-key-cccccccccccc")],
            [("authorization", "Basic gw-key-aaaaaaaaaaaa")],
            [("x-api-key", "")],
        ] {
            let result = authenticate(&keys, &headers(&pairs));
            assert!(
                matches!(
                    result,
                    Err(ProxyError::InvalidApiKey | ProxyError::MissingApiKey)
                ),
                "{pairs:?}"
            );
        }
        assert!(matches!(
            authenticate(&keys, &headers(&[("x-api-key", "gw-key-cccccccccccc")])),
            Err(ProxyError::InvalidApiKey)
        ));
    }
}
