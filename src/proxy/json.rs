//! Reading the few fields the gateway needs from a JSON request body, and
//! replacing `model` without re-serialising anything else.
//!
//! The body is validated as JSON in one pass that visits only the top-level
//! keys; every value the gateway does not need is skipped, and `model` is
//! kept as a borrowed raw slice so its byte span is known. The rewrite then
//! splices the new value into that span: key order, whitespace, number
//! formatting and every other field reach the upstream byte for byte.

use std::fmt;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use super::error::ProxyError;
use super::json_scan::{key, string_value, Kind, Rejected, Scanned, Scanner};

/// What the gateway reads from a request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BodyFields {
    /// Byte spans of every top-level `model` value (duplicates included,
    /// so none of them survives a rewrite). One, almost always: inline.
    pub model_spans: SmallVec<[Range<usize>; 1]>,
    /// The client's `model`, if any (the last one, as JSON parsers take).
    pub model: Option<String>,
    /// OpenAI's top-level `user`.
    pub user: Option<String>,
    /// OpenAI's `safety_identifier`, the successor of `user`.
    pub safety_identifier: Option<String>,
    /// Anthropic's `metadata.user_id`.
    pub metadata_user_id: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
}

/// Validates `body` as a JSON object and reads the fields the gateway uses.
pub fn inspect(body: &[u8]) -> Result<BodyFields, ProxyError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ProxyError::MissingBody),
        Some(b'{') => {}
        Some(_) => {
            // Tell malformed JSON apart from valid JSON of the wrong shape.
            return Err(match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => ProxyError::NotAnObject,
                Err(err) => ProxyError::InvalidJson(err.to_string()),
            });
        }
    }
    // JSON text is UTF-8 (RFC 8259); serde_json does not check the strings
    // it skips, so check the whole body here rather than forward bad bytes.
    if let Err(err) = std::str::from_utf8(body) {
        return Err(ProxyError::InvalidJson(format!(
            "invalid UTF-8 at byte {}",
            err.valid_up_to()
        )));
    }
    match scan(body) {
        Ok(fields) => Ok(fields),
        Err(Rejected) => inspect_parsed(body),
    }
}

/// The fast path: the fields as the scanner reads them, when it accepts
/// the body (an object, its UTF-8 checked) and each field has the type
/// the gateway wants; anything else is left to serde_json.
fn scan(body: &[u8]) -> Scanned<BodyFields> {
    let mut fields = BodyFields::default();
    let mut scanner = Scanner::new(body);
    scanner.object(|scanner, raw, escaped| {
        let mut buffer = [0; 32];
        let Some(key) = key(raw, escaped, &mut buffer) else {
            return scanner.skip();
        };
        match key {
            b"model" => {
                let (span, escaped) = scanner.string()?;
                // With its quotes: the span the rewrite replaces.
                fields
                    .model_spans
                    .push(span.start.wrapping_sub(1)..span.end + 1);
                fields.model = Some(string_value(body, span, escaped)?);
            }
            b"user" => {
                let (span, escaped) = scanner.string()?;
                fields.user = Some(string_value(body, span, escaped)?);
            }
            b"safety_identifier" => {
                let (span, escaped) = scanner.string()?;
                fields.safety_identifier = Some(string_value(body, span, escaped)?);
            }
            b"metadata" => fields.metadata_user_id = scan_metadata(scanner, body)?,
            b"stream" => fields.stream = scanner.boolean_or_null()?.unwrap_or(false),
            _ => scanner.skip()?,
        }
        Ok(())
    })?;
    scanner.end()?;
    Ok(fields)
}

/// Anthropic's `metadata`: `null`, or an object whose `user_id` is a
/// string, `null` or missing (given once: serde_json refuses a field
/// given twice, and the scanner leaves that to it).
fn scan_metadata(scanner: &mut Scanner<'_>, body: &[u8]) -> Scanned<Option<String>> {
    if scanner.kind()? == Kind::Null {
        return scanner.skip().map(|()| None);
    }
    let mut user_id = None;
    let mut seen = false;
    scanner.object(|scanner, raw, escaped| {
        // serde_json reads these keys as strings, strictly: escaped ones
        // are its to read.
        if escaped {
            return Err(Rejected);
        }
        if raw != b"user_id" {
            return scanner.skip();
        }
        if std::mem::replace(&mut seen, true) {
            return Err(Rejected);
        }
        user_id = match scanner.kind()? {
            Kind::Null => scanner.skip().map(|()| None)?,
            _ => {
                let (span, escaped) = scanner.string()?;
                Some(string_value(body, span, escaped)?)
            }
        };
        Ok(())
    })?;
    Ok(user_id)
}

/// The reference path, through serde_json: for what the scanner does not
/// accept, with serde_json's own error.
fn inspect_parsed(body: &[u8]) -> Result<BodyFields, ProxyError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let top = TopLevel::deserialize(&mut deserializer)
        .and_then(|top| deserializer.end().map(|()| top))
        .map_err(|err| ProxyError::InvalidJson(err.to_string()))?;
    top.into_fields(body)
}

/// Returns `body` with every top-level `model` value replaced by
/// `model_json` (a JSON string literal).
pub fn rewrite_model(body: &Bytes, spans: &[Range<usize>], model_json: &[u8]) -> Bytes {
    // Every `model` already written as the arm's, byte for byte (as a
    // client of the base model writes it for control): the body goes on
    // as it came, without a copy.
    if spans
        .iter()
        .all(|span| body.get(span.clone()) == Some(model_json))
    {
        return body.clone();
    }
    let removed: usize = spans.iter().map(|span| span.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() - removed + spans.len() * model_json.len());
    let mut at = 0;
    for span in spans {
        out.extend_from_slice(&body[at..span.start]);
        out.extend_from_slice(model_json);
        at = span.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

/// The top-level keys the gateway cares about, borrowed from the body.
#[derive(Default)]
struct TopLevel<'a> {
    models: SmallVec<[&'a RawValue; 1]>,
    user: Option<&'a RawValue>,
    safety_identifier: Option<&'a RawValue>,
    metadata: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
}

impl<'a> TopLevel<'a> {
    fn deserialize<D: Deserializer<'a>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevelVisitor)
    }

    fn into_fields(self, body: &[u8]) -> Result<BodyFields, ProxyError> {
        let base = body.as_ptr() as usize;
        let mut fields = BodyFields::default();
        for raw in &self.models {
            let text = raw.get();
            // The raw value is a subslice of `body`, so its offset is exact.
            let start = text.as_ptr() as usize - base;
            fields.model_spans.push(start..start + text.len());
            fields.model = Some(string_field(raw, "model")?);
        }
        fields.user = self.user.map(|raw| string_field(raw, "user")).transpose()?;
        fields.safety_identifier = self
            .safety_identifier
            .map(|raw| string_field(raw, "safety_identifier"))
            .transpose()?;
        if let Some(raw) = self.metadata {
            fields.metadata_user_id = metadata_user_id(raw)?;
        }
        fields.stream = match self.stream {
            None => false,
            Some(raw) => match serde_json::from_str::<Option<bool>>(raw.get()) {
                Ok(stream) => stream.unwrap_or(false),
                Err(_) => {
                    return Err(ProxyError::WrongFieldType {
                        field: "stream",
                        expected: "a boolean",
                    })
                }
            },
        };
        Ok(fields)
    }
}

fn string_field(raw: &RawValue, field: &'static str) -> Result<String, ProxyError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| ProxyError::WrongFieldType {
        field,
        expected: "a string",
    })
}

fn metadata_user_id(raw: &RawValue) -> Result<Option<String>, ProxyError> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        #[serde(default)]
        user_id: Option<serde_json::Value>,
    }
    let not_object = ProxyError::WrongFieldType {
        field: "metadata",
        expected: "an object",
    };
    match serde_json::from_str::<Option<Metadata>>(raw.get()) {
        Ok(None) => Ok(None),
        Ok(Some(Metadata { user_id: None })) => Ok(None),
        Ok(Some(Metadata {
            user_id: Some(serde_json::Value::Null),
        })) => Ok(None),
        Ok(Some(Metadata {
            user_id: Some(serde_json::Value::String(id)),
        })) => Ok(Some(id)),
        Ok(Some(Metadata { user_id: Some(_) })) => Err(ProxyError::WrongFieldType {
            field: "metadata.user_id",
            expected: "a string",
        }),
        Err(_) => Err(not_object),
    }
}

/// Which top-level key a map entry is; decided without allocating.
enum Key {
    Model,
    User,
    SafetyIdentifier,
    Metadata,
    Stream,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_key(deserializer, |key| match key {
            b"model" => Key::Model,
            b"user" => Key::User,
            b"safety_identifier" => Key::SafetyIdentifier,
            b"metadata" => Key::Metadata,
            b"stream" => Key::Stream,
            _ => Key::Other,
        })
    }
}

/// An object key told by `key_of` from its bytes (escapes decoded). The
/// document's UTF-8 is checked whole, once, by the caller, so no key is
/// checked again on its own.
pub(super) fn deserialize_key<'de, D: Deserializer<'de>, K>(
    deserializer: D,
    key_of: fn(&[u8]) -> K,
) -> Result<K, D::Error> {
    struct KeyVisitor<K>(fn(&[u8]) -> K);
    impl<K> Visitor<'_> for KeyVisitor<K> {
        type Value = K;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object key")
        }
        fn visit_bytes<E: de::Error>(self, key: &[u8]) -> Result<K, E> {
            Ok((self.0)(key))
        }
        fn visit_str<E: de::Error>(self, key: &str) -> Result<K, E> {
            Ok((self.0)(key.as_bytes()))
        }
    }
    deserializer.deserialize_bytes(KeyVisitor(key_of))
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut top = TopLevel::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Model => top.models.push(map.next_value()?),
                Key::User => top.user = Some(map.next_value()?),
                Key::SafetyIdentifier => top.safety_identifier = Some(map.next_value()?),
                Key::Metadata => top.metadata = Some(map.next_value()?),
                Key::Stream => top.stream = Some(map.next_value()?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str, model: &str) -> String {
        let bytes = Bytes::from(body.to_owned());
        let fields = inspect(&bytes).unwrap();
        let json = serde_json::to_vec(model).unwrap();
        String::from_utf8(rewrite_model(&bytes, &fields.model_spans, &json).to_vec()).unwrap()
    }

    #[test]
    fn rewrite_changes_only_model() {
        let body = r#"{"z": 1.50, "model" :  "gpt-4o",  "messages":[{"role":"user","content":"model"}], "a":true}"#;
        assert_eq!(
            rewrite(body, "ft:x\"y"),
            r#"{"z": 1.50, "model" :  "ft:x\"y",  "messages":[{"role":"user","content":"model"}], "a":true}"#
        );
    }

    #[test]
    fn rewrite_replaces_duplicate_and_escaped_keys() {
        let body = r#"{"model":"a","m\u006fdel":"b"}"#;
        assert_eq!(rewrite(body, "c"), r#"{"model":"c","m\u006fdel":"c"}"#);
    }

    #[test]
    fn a_model_already_the_arms_goes_on_uncopied() {
        let body = Bytes::from_static(br#"{"model":"gpt-4o-mini","model":"gpt-4o-mini"}"#);
        let fields = inspect(&body).unwrap();
        let same = rewrite_model(&body, &fields.model_spans, br#""gpt-4o-mini""#);
        assert_eq!(same, body);
        assert_eq!(same.as_ptr(), body.as_ptr());
        // One of two differs: both are written.
        let body = Bytes::from_static(br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#);
        let fields = inspect(&body).unwrap();
        let rewritten = rewrite_model(&body, &fields.model_spans, br#""gpt-4o-mini""#);
        assert_eq!(
            &rewritten[..],
            br#"{"model":"gpt-4o-mini","model":"gpt-4o-mini"}"#
        );
    }

    #[test]
    fn nested_model_is_not_touched() {
        let body = r#"{"metadata":{"model":"keep"},"model":"x"}"#;
        assert_eq!(
            rewrite(body, "y"),
            r#"{"metadata":{"model":"keep"},"model":"y"}"#
        );
    }

    #[test]
    fn reads_identity_and_stream() {
        let fields =
            inspect(br#"{"user":"u1","metadata":{"user_id":"u2"},"stream":true}"#).unwrap();
        assert_eq!(fields.user.as_deref(), Some("u1"));
        assert_eq!(fields.metadata_user_id.as_deref(), Some("u2"));
        assert!(fields.stream);
        assert_eq!(fields.model, None);
    }

    #[test]
    fn bad_bodies_are_named() {
        assert!(matches!(inspect(b""), Err(ProxyError::MissingBody)));
        assert!(matches!(inspect(b"  \n"), Err(ProxyError::MissingBody)));
        assert!(matches!(inspect(b"[1,2]"), Err(ProxyError::NotAnObject)));
        assert!(matches!(inspect(b"\"s\""), Err(ProxyError::NotAnObject)));
        assert!(matches!(
            inspect(b"{\"a\":"),
            Err(ProxyError::InvalidJson(_))
        ));
        assert!(matches!(inspect(b"{} {}"), Err(ProxyError::InvalidJson(_))));
        assert!(matches!(inspect(b"nope"), Err(ProxyError::InvalidJson(_))));
        assert!(matches!(
            inspect(br#"{"model":5}"#),
            Err(ProxyError::WrongFieldType { field: "model", .. })
        ));
        assert!(matches!(
            inspect(br#"{"user":{}}"#),
            Err(ProxyError::WrongFieldType { field: "user", .. })
        ));
        assert!(matches!(
            inspect(br#"{"metadata":{"user_id":7}}"#),
            Err(ProxyError::WrongFieldType {
                field: "metadata.user_id",
                ..
            })
        ));
        assert!(matches!(
            inspect(br#"{"stream":"yes"}"#),
            Err(ProxyError::WrongFieldType {
                field: "stream",
                ..
            })
        ));
        assert!(matches!(
            inspect(b"{\"a\":\"\xff\"}"),
            Err(ProxyError::InvalidJson(_))
        ));
    }
}

#[cfg(test)]
mod agreement {
    use super::*;
    use crate::proxy::json_scan::documents;
    use proptest::prelude::*;

    #[test]
    fn requests_as_clients_send_them_take_the_fast_path() {
        for body in [
            &br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16,"temperature":0.2,"user":"u-1"}"#[..],
            br#"{"model":"claude","max_tokens":1024,"metadata":{"user_id":"u-2"},"stream":true,"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
            br#"{"model":"m\u006f","safety_identifier":"s\"1","metadata":null,"stream":null}"#,
        ] {
            assert!(scan(body).is_ok(), "{body:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// What the scanner accepts, serde_json accepts and reads the same.
        #[test]
        fn the_fast_path_reads_what_serde_json_reads(body in documents::top_object()) {
            documents::agree(&body, scan, inspect_parsed)?;
        }
    }
}
