//! Where a request's user ID comes from.
//!
//! In order: the configured header (default `x-user-id`), OpenAI's top-level
//! `user`, OpenAI's `safety_identifier` (the field OpenAI now recommends in
//! place of `user`), Anthropic's `metadata.user_id`. The first one present wins. An
//! empty value counts as absent: hashing "" would put every such client into
//! one bucket and bias whichever arm it lands in.

use http::header::HeaderName;
use http::HeaderMap;

use crate::proxy::error::ProxyError;
use crate::proxy::json::BodyFields;

/// A user ID and where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserId<'a> {
    pub id: &'a str,
    pub(crate) source: Source,
}

/// Where a user ID was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Header,
    OpenAiUser,
    OpenAiSafetyIdentifier,
    AnthropicMetadata,
}

/// Rules for finding a user ID, taken from the config.
#[derive(Debug, Clone, Copy)]
pub struct IdentityRules<'a> {
    pub header: &'a HeaderName,
    pub max_bytes: usize,
}

/// Reads the user ID header. Header values are bytes; IDs are hashed as
/// UTF-8, so a value that is not UTF-8 is refused rather than guessed at.
pub fn from_header<'a>(
    headers: &'a HeaderMap,
    rules: IdentityRules<'_>,
) -> Result<Option<&'a str>, ProxyError> {
    let Some(value) = headers.get(rules.header) else {
        return Ok(None);
    };
    let id = std::str::from_utf8(value.as_bytes()).map_err(|_| ProxyError::UserIdNotUtf8 {
        header: rules.header.to_string(),
    })?;
    check_length(id, rules).map(|()| (!id.is_empty()).then_some(id))
}

/// Picks the user ID by precedence: header, OpenAI `user`, OpenAI
/// `safety_identifier`, Anthropic `metadata.user_id`. `None` means the
/// request is unassigned.
pub fn resolve<'a>(
    header: Option<&'a str>,
    body: Option<&'a BodyFields>,
    rules: IdentityRules<'_>,
) -> Result<Option<UserId<'a>>, ProxyError> {
    let found = header
        .map(|id| UserId {
            id,
            source: Source::Header,
        })
        .or_else(|| {
            let body = body?;
            non_empty(body.user.as_deref())
                .map(|id| UserId {
                    id,
                    source: Source::OpenAiUser,
                })
                .or_else(|| {
                    non_empty(body.safety_identifier.as_deref()).map(|id| UserId {
                        id,
                        source: Source::OpenAiSafetyIdentifier,
                    })
                })
                .or_else(|| {
                    non_empty(body.metadata_user_id.as_deref()).map(|id| UserId {
                        id,
                        source: Source::AnthropicMetadata,
                    })
                })
        });
    if let Some(user) = found {
        check_length(user.id, rules)?;
    }
    Ok(found)
}

fn non_empty(id: Option<&str>) -> Option<&str> {
    id.filter(|id| !id.is_empty())
}

fn check_length(id: &str, rules: IdentityRules<'_>) -> Result<(), ProxyError> {
    if id.len() > rules.max_bytes {
        return Err(ProxyError::UserIdTooLong {
            len: id.len(),
            max: rules.max_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rules(header: &HeaderName) -> IdentityRules<'_> {
        IdentityRules {
            header,
            max_bytes: 16,
        }
    }

    #[test]
    fn header_wins_then_user_then_metadata() {
        let name = HeaderName::from_static("x-user-id");
        let body = BodyFields {
            user: Some("openai".into()),
            metadata_user_id: Some("anthropic".into()),
            ..BodyFields::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert(&name, HeaderValue::from_static("hdr"));
        let header = from_header(&headers, rules(&name)).unwrap();
        let found = resolve(header, Some(&body), rules(&name)).unwrap().unwrap();
        assert_eq!((found.id, found.source), ("hdr", Source::Header));

        let found = resolve(None, Some(&body), rules(&name)).unwrap().unwrap();
        assert_eq!((found.id, found.source), ("openai", Source::OpenAiUser));

        let safety = BodyFields {
            safety_identifier: Some("safe".into()),
            metadata_user_id: Some("anthropic".into()),
            ..BodyFields::default()
        };
        let found = resolve(None, Some(&safety), rules(&name)).unwrap().unwrap();
        assert_eq!(
            (found.id, found.source),
            ("safe", Source::OpenAiSafetyIdentifier)
        );

        let only_metadata = BodyFields {
            user: Some(String::new()),
            metadata_user_id: Some("anthropic".into()),
            ..BodyFields::default()
        };
        let found = resolve(None, Some(&only_metadata), rules(&name))
            .unwrap()
            .unwrap();
        assert_eq!(found.source, Source::AnthropicMetadata);
        assert_eq!(resolve(None, None, rules(&name)).unwrap(), None);
    }

    #[test]
    fn utf8_header_is_accepted_and_invalid_refused() {
        let name = HeaderName::from_static("x-user-id");
        let mut headers = HeaderMap::new();
        headers.insert(&name, HeaderValue::from_bytes("ユーザ".as_bytes()).unwrap());
        assert_eq!(from_header(&headers, rules(&name)).unwrap(), Some("ユーザ"));
        headers.insert(&name, HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert!(matches!(
            from_header(&headers, rules(&name)),
            Err(ProxyError::UserIdNotUtf8 { .. })
        ));
        headers.insert(&name, HeaderValue::from_static(""));
        assert_eq!(from_header(&headers, rules(&name)).unwrap(), None);
        headers.insert(&name, HeaderValue::from_static("0123456789abcdefX"));
        assert!(matches!(
            from_header(&headers, rules(&name)),
            Err(ProxyError::UserIdTooLong { len: 17, max: 16 })
        ));
    }
}
