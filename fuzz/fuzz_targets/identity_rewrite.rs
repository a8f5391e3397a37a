//! User ID extraction and the `model` rewrite on arbitrary input: the first
//! byte is the length of an `x-user-id` header value, then its bytes, one
//! byte picking the model name, and the rest is the request body. The
//! properties checked are the ones `cargo test` checks with proptest.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (header, model, body) = properties::split(data);
    properties::check(header, body, model);
});
