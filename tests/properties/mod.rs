//! What must hold for any request the data path reads: shared by the
//! proptest in `tests/request_properties.rs` and the cargo-fuzz target in
//! `fuzz/`, so both check the same properties.
//!
//! For any header value, body and model name:
//! - reading the body and the user ID returns a value or an error, never
//!   a panic;
//! - a body the gateway accepts is valid JSON, and so is its rewrite;
//! - the rewrite changes only the top-level `model` (every other field
//!   parses to the same value), and leaves a body without `model` alone;
//! - a user ID found is the non-empty UTF-8 text that was sent, within the
//!   length limit, and hashes to a bucket below 1000.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use abgate::proxy::identity::{self, IdentityRules};
use abgate::proxy::json::{self, BodyFields};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::IgnoredAny;

/// Longest user ID the checks allow (the gateway's default is 512).
pub const MAX_USER_ID_BYTES: usize = 64;

/// Checks every property for one request; panics on the first violated.
pub fn check(header: &[u8], body: &[u8], model: &str) {
    let user_header = HeaderName::from_static("x-user-id");
    let rules = IdentityRules {
        header: &user_header,
        max_bytes: MAX_USER_ID_BYTES,
    };
    let fields = json::inspect(body).ok();
    if let Some(fields) = &fields {
        check_rewrite(body, fields, model);
    }
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(header) {
        headers.insert(&user_header, value);
    }
    let Ok(from_header) = identity::from_header(&headers, rules) else {
        return;
    };
    if let Some(id) = from_header {
        assert_eq!(id.as_bytes(), header, "the header's ID is what was sent");
    }
    if let Ok(Some(user)) = identity::resolve(from_header, fields.as_ref(), rules) {
        assert!(!user.id.is_empty(), "an empty ID counts as none");
        assert!(user.id.len() <= MAX_USER_ID_BYTES, "an ID over the limit");
        assert!(abgate::experiment::assign::bucket(user.id.as_bytes(), None) < 1000);
        assert!(abgate::experiment::assign::bucket(user.id.as_bytes(), Some("exp")) < 1000);
    }
}

fn check_rewrite(body: &[u8], fields: &BodyFields, model: &str) {
    assert!(
        serde_json::from_slice::<IgnoredAny>(body).is_ok(),
        "an accepted body is JSON"
    );
    let model_json = serde_json::to_vec(model).unwrap();
    let original = Bytes::copy_from_slice(body);
    let rewritten = json::rewrite_model(&original, &fields.model_spans, &model_json);
    if fields.model_spans.is_empty() {
        assert_eq!(rewritten, original, "a body without model is left alone");
        return;
    }
    assert!(
        serde_json::from_slice::<IgnoredAny>(&rewritten).is_ok(),
        "the rewrite is JSON: {}",
        String::from_utf8_lossy(&rewritten)
    );
    let again = json::inspect(&rewritten).expect("the rewrite is accepted again");
    assert_eq!(again.model.as_deref(), Some(model));
    assert_eq!(again.model_spans.len(), fields.model_spans.len());
    assert_eq!(again.user, fields.user);
    assert_eq!(again.safety_identifier, fields.safety_identifier);
    assert_eq!(again.metadata_user_id, fields.metadata_user_id);
    assert_eq!(again.stream, fields.stream);
    // Every other field parses to the same value (numbers serde_json cannot
    // hold, like 1e400, are compared by the checks above only).
    if let (Ok(before), Ok(after)) = (
        serde_json::from_slice::<serde_json::Value>(body),
        serde_json::from_slice::<serde_json::Value>(&rewritten),
    ) {
        let (mut before, mut after) = (before, after);
        let (before, after) = (
            before.as_object_mut().unwrap(),
            after.as_object_mut().unwrap(),
        );
        assert_eq!(after.remove("model"), Some(serde_json::json!(model)));
        before.remove("model");
        assert_eq!(before, after, "only model changed");
    }
}

/// Splits one fuzz input into a header value, a model name and a body:
/// the first byte is the header's length, the next its bytes, then one
/// byte picks the model.
pub fn split(data: &[u8]) -> (&[u8], &'static str, &[u8]) {
    const MODELS: [&str; 4] = ["ft:gpt-4o-mini:acme:v3", "", "q\"uote\\back\u{1}", "モデル"];
    let Some((&length, rest)) = data.split_first() else {
        return (&[], MODELS[0], &[]);
    };
    let length = usize::from(length).min(rest.len());
    let (header, rest) = rest.split_at(length);
    match rest.split_first() {
        Some((&pick, body)) => (header, MODELS[usize::from(pick) % MODELS.len()], body),
        None => (header, MODELS[0], &[]),
    }
}
