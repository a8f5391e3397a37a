//! Reading a request never panics, and the rewrite changes only `model`:
//! the properties of `tests/properties` over arbitrary bytes and over
//! JSON-like bodies built from the keys the gateway reads. The same
//! properties run under cargo-fuzz in `fuzz/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod properties;

use proptest::prelude::*;

/// A JSON value as text, sometimes malformed on purpose.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|text| serde_json::to_string(&text).unwrap()),
        Just(r#""esc\"aped\\ \u00e9 \ud83d\ude00""#.to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| serde_json::to_string(&n).unwrap()),
        Just("1e400".to_owned()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"unterminated".to_owned()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((key(), inner), 0..4).prop_map(|fields| object(&fields)),
        ]
    })
}

/// Keys the gateway reads, their escaped spellings, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"model\"".to_owned()),
        Just("\"m\\u006fdel\"".to_owned()),
        Just("\"user\"".to_owned()),
        Just("\"safety_identifier\"".to_owned()),
        Just("\"metadata\"".to_owned()),
        Just("\"user_id\"".to_owned()),
        Just("\"stream\"".to_owned()),
        any::<String>().prop_map(|text| serde_json::to_string(&text).unwrap()),
    ]
}

fn object(fields: &[(String, String)]) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{key} : {value}"))
        .collect();
    format!("{{ {} }}", fields.join(",\n"))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec((key(), value()), 0..8)
            .prop_map(|fields| object(&fields).into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn reading_a_request_never_panics_and_rewrites_only_model(
        header in prop::collection::vec(any::<u8>(), 0..80),
        body in body(),
        model in any::<String>(),
    ) {
        properties::check(&header, &body, &model);
    }

    #[test]
    fn fuzz_inputs_split_and_check(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let (header, model, body) = properties::split(&data);
        properties::check(header, body, model);
    }
}

#[test]
fn known_tricky_bodies_hold() {
    for body in [
        r#"{"model":"a","m\u006fdel":"b","user":"u"}"#,
        r#"{"metadata":{"model":"keep","user_id":"m"},"model":"x"}"#,
        r#"{"model":null}"#,
        r#"{"model":"x","stream":null,"user":""}"#,
        "{\"model\" :\n\t\"x\" }",
        r#"{"n":1e400,"model":"x"}"#,
    ] {
        properties::check(b"user-1", body.as_bytes(), "ft:\"model\"\\");
    }
}
