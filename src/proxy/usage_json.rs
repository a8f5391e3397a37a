//! Token usage out of a JSON answer or an SSE event's data, read in one
//! pass without building a tree of the document: `usage` (OpenAI's
//! `prompt_tokens`/`completion_tokens`, Anthropic's
//! `input_tokens`/`output_tokens`) at the top, or inside `message`
//! (Anthropic's `message_start`) or `response` (the Responses API's
//! `response.completed` event). Everything else is checked as JSON and
//! skipped. Of keys given twice, the last wins, as in a parsed tree.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::json_scan::{key, Kind, Rejected, Scanned, Scanner};

/// Token counts as an answer states them; a count that is not a
/// non-negative integer is not read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

/// The usage `document` carries, if any: `Err` when it is not JSON.
pub fn read(document: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    // JSON text is UTF-8 (RFC 8259): checked once for the whole answer, so
    // that keys are then compared as bytes, not each checked again.
    if std::str::from_utf8(document).is_err() {
        return Err(de::Error::custom("the answer is not UTF-8"));
    }
    match scan(document) {
        Ok(usage) => Ok(usage),
        Err(Rejected) => read_parsed(document),
    }
}

/// The fast path: what the scanner reads, when it accepts the document.
fn scan(document: &[u8]) -> Scanned<Option<Usage>> {
    let mut scanner = Scanner::new(document);
    let mut usage = None;
    let mut message = None;
    // Any other top-level value is read by serde_json as a value, which
    // the scanner leaves to it.
    if scanner.kind()? != Kind::Object {
        return Err(Rejected);
    }
    {
        scanner.object(|scanner, raw, escaped| {
            let mut buffer = [0; 32];
            match key(raw, escaped, &mut buffer).map(Key::of) {
                Some(Key::Usage) => usage = scan_usage(scanner)?,
                // One slot for both: an event carries one or the other.
                Some(Key::Message | Key::Response) => message = scan_message(scanner)?,
                _ => scanner.skip()?,
            }
            Ok(())
        })?;
    }
    scanner.end()?;
    Ok(usage.or(message))
}

/// The usage inside `message` (Anthropic's `message_start`) or
/// `response` (the Responses API's `response.completed`).
fn scan_message(scanner: &mut Scanner<'_>) -> Scanned<Option<Usage>> {
    if scanner.kind()? != Kind::Object {
        return skip_any(scanner).map(|()| None);
    }
    let mut usage = None;
    scanner.object(|scanner, raw, escaped| {
        let mut buffer = [0; 32];
        match key(raw, escaped, &mut buffer).map(Key::of) {
            Some(Key::Usage) => usage = scan_usage(scanner)?,
            _ => scanner.skip()?,
        }
        Ok(())
    })?;
    Ok(usage)
}

/// A `usage` value: its counts when it is an object.
fn scan_usage(scanner: &mut Scanner<'_>) -> Scanned<Option<Usage>> {
    if scanner.kind()? != Kind::Object {
        return skip_any(scanner).map(|()| None);
    }
    let mut usage = Usage::default();
    scanner.object(|scanner, raw, escaped| {
        let mut buffer = [0; 32];
        let slot = match key(raw, escaped, &mut buffer).map(Key::of) {
            Some(Key::PromptTokens) => &mut usage.prompt_tokens,
            Some(Key::CompletionTokens) => &mut usage.completion_tokens,
            Some(Key::InputTokens) => &mut usage.input_tokens,
            Some(Key::OutputTokens) => &mut usage.output_tokens,
            _ => return scanner.skip(),
        };
        // serde_json reads a count as any value: what it does with the
        // others (a huge exponent, a string's lone surrogate) is its call.
        *slot = match scanner.kind()? {
            Kind::Number => Some(scanner.number()?.ok_or(Rejected)?),
            _ => skip_any(scanner).map(|()| None)?,
        };
        Ok(())
    })?;
    Ok(Some(usage))
}

/// Skips a value that serde_json would read as any value and the reader
/// drops: when it is one serde_json reads as loosely as the scanner does
/// (a string without escapes, an integer, a literal, an array, whose
/// elements it skips).
fn skip_any(scanner: &mut Scanner<'_>) -> Scanned<()> {
    match scanner.kind()? {
        Kind::String => match scanner.string()? {
            (_, false) => Ok(()),
            (_, true) => Err(Rejected),
        },
        Kind::Number => scanner.number()?.map(drop).ok_or(Rejected),
        Kind::Object => Err(Rejected),
        Kind::Array | Kind::True | Kind::False | Kind::Null => scanner.skip(),
    }
}

/// The reference path, through serde_json: for what the scanner does not
/// accept (an error, or JSON it leaves to serde_json).
fn read_parsed(document: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    let top = serde_json::from_slice::<Shaped<Top>>(document)?;
    Ok(top
        .0
        .and_then(|top| top.usage.or(top.message.and_then(|m| m.usage))))
}

/// The top of an answer: `usage`, and `message` for Anthropic's
/// `message_start`. Of keys given twice, the last wins.
#[derive(Default)]
struct Top {
    usage: Option<Usage>,
    message: Option<Message>,
}

#[derive(Default)]
struct Message {
    usage: Option<Usage>,
}

/// The keys read, matched as bytes (the answer's UTF-8 is checked whole).
enum Key {
    Usage,
    Message,
    Response,
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    Other,
}

impl Key {
    fn of(key: &[u8]) -> Self {
        match key {
            b"usage" => Key::Usage,
            b"message" => Key::Message,
            b"response" => Key::Response,
            b"prompt_tokens" => Key::PromptTokens,
            b"completion_tokens" => Key::CompletionTokens,
            b"input_tokens" => Key::InputTokens,
            b"output_tokens" => Key::OutputTokens,
            _ => Key::Other,
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        super::json::deserialize_key(deserializer, Key::of)
    }
}

/// Reads the values of the keys `T` keeps (the others are skipped).
trait Fields: Default {
    fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error>;
}

impl Fields for Top {
    fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
        match key {
            Key::Usage => self.usage = map.next_value::<Shaped<Usage>>()?.0,
            Key::Message | Key::Response => {
                self.message = map.next_value::<Shaped<Message>>()?.0;
            }
            _ => skip(map)?,
        }
        Ok(())
    }
}

impl Fields for Message {
    fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
        match key {
            Key::Usage => self.usage = map.next_value::<Shaped<Usage>>()?.0,
            _ => skip(map)?,
        }
        Ok(())
    }
}

impl Fields for Usage {
    fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
        let slot = match key {
            Key::PromptTokens => &mut self.prompt_tokens,
            Key::CompletionTokens => &mut self.completion_tokens,
            Key::InputTokens => &mut self.input_tokens,
            Key::OutputTokens => &mut self.output_tokens,
            _ => return skip(map),
        };
        *slot = map.next_value::<CountValue>()?.0;
        Ok(())
    }
}

fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(|_| ())
}

/// A count, or `None` for any other JSON value.
struct CountValue(Option<u64>);

impl<'de> Deserialize<'de> for CountValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Count).map(CountValue)
    }
}

/// `T` when the value is an object, `None` for any other JSON value.
struct Shaped<T>(Option<T>);

impl<'de, T: Fields> Deserialize<'de> for Shaped<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(ObjectOr(PhantomData))
            .map(Shaped)
    }
}

/// Accepts any JSON value; keeps it only when it is an object (read by
/// `T`'s [`Fields`]).
struct ObjectOr<T>(PhantomData<T>);

/// Accepts any JSON value; keeps it only when it is a non-negative integer.
struct Count;

/// What both visitors do with values they do not keep: accept and skip.
macro_rules! skip_other_values {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    };
}

impl<'de, T: Fields> Visitor<'de> for ObjectOr<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = T::default();
        while let Some(key) = map.next_key::<Key>()? {
            fields.read(key, &mut map)?;
        }
        Ok(Some(fields))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    skip_other_values!();
}

impl<'de> Visitor<'de> for Count {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E: de::Error>(self, count: u64) -> Result<Self::Value, E> {
        Ok(Some(count))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    skip_other_values!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: Some(prompt),
            completion_tokens: Some(completion),
            ..Usage::default()
        })
    }

    #[test]
    fn openai_answer() {
        let answer = br#"{"id":"x","choices":[{"message":{"role":"assistant","content":"hi \"there\""}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(read(answer).unwrap(), usage(3, 4));
    }

    #[test]
    fn anthropic_message_start_and_delta() {
        let start = br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,"output_tokens":1}}}"#;
        let read_start = read(start).unwrap().unwrap();
        assert_eq!(
            (read_start.input_tokens, read_start.output_tokens),
            (Some(5), Some(1))
        );
        let delta = br#"{"type":"message_delta","usage":{"output_tokens":42}}"#;
        assert_eq!(read(delta).unwrap().unwrap().output_tokens, Some(42));
    }

    #[test]
    fn any_valid_json_is_accepted_and_odd_counts_are_not_read() {
        for document in [
            &b"[1, 2, 3, {\"usage\": 1}]"[..],
            b"\"text\"",
            b"null",
            b"-4.5",
            b"{\"usage\": null}",
            b"{\"usage\": [1]}",
            b"{\"message\": \"hello\"}",
        ] {
            assert_eq!(read(document).unwrap(), None, "{document:?}");
        }
        let odd = read(br#"{"usage":{"prompt_tokens":-1,"completion_tokens":2.5,"input_tokens":"7","output_tokens":{"n":1}}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(odd, Usage::default());
    }

    #[test]
    fn repeated_keys_are_valid_json_and_the_last_wins() {
        let document =
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"prompt_tokens":3}}"#;
        assert_eq!(read(document).unwrap().unwrap().prompt_tokens, Some(3));
    }

    #[test]
    fn invalid_json_is_an_error() {
        for document in [
            &b"{\"choices\": [tru"[..],
            b"",
            b"{} x",
            b"{\"usage\":{\"prompt_tokens\":1,}}",
            // JSON text is UTF-8, inside strings too.
            b"{\"content\":\"caf\xe9\",\"usage\":{\"prompt_tokens\":1}}",
        ] {
            assert!(read(document).is_err(), "{document:?}");
        }
    }

    #[test]
    fn agrees_with_a_full_parse() {
        let documents = [
            &br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"message":{"usage":{"input_tokens":9}}}"#[..],
            br#"{"message":{"usage":{"input_tokens":9,"output_tokens":8}}}"#,
            br#"{"usage":{"prompt_tokens":18446744073709551615}}"#,
            // The Responses API's stream: usage inside `response`, null
            // until `response.completed`.
            br#"{"type":"response.created","response":{"id":"r","status":"in_progress","usage":null}}"#,
            br#"{"type":"response.completed","sequence_number":9,"response":{"id":"r","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":12,"output_tokens":34,"total_tokens":46,"output_tokens_details":{"reasoning_tokens":0}}}}"#,
        ];
        for document in documents {
            let value: serde_json::Value = serde_json::from_slice(document).unwrap();
            let expected = value
                .get("usage")
                .filter(|u| u.is_object())
                .or_else(|| value.get("message").and_then(|m| m.get("usage")))
                .or_else(|| value.get("response").and_then(|r| r.get("usage")))
                .filter(|u| u.is_object());
            let Some(got) = read(document).unwrap() else {
                assert!(expected.is_none(), "{document:?}");
                continue;
            };
            let field = |name: &str| expected.and_then(|u| u.get(name)).and_then(|v| v.as_u64());
            assert_eq!(got.prompt_tokens, field("prompt_tokens"));
            assert_eq!(got.input_tokens, field("input_tokens"));
            assert_eq!(got.output_tokens, field("output_tokens"));
        }
    }
}

#[cfg(test)]
mod agreement {
    use super::*;
    use crate::proxy::json_scan::documents;
    use proptest::prelude::*;

    #[test]
    fn answers_as_providers_send_them_take_the_fast_path() {
        for document in [
            &br#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":13,"total_tokens":32,"prompt_tokens_details":{"cached_tokens":0}}}"#[..],
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,"output_tokens":1}}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            br#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":12,"output_tokens":34}}}"#,
        ] {
            assert!(scan(document).is_ok(), "{document:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// What the scanner accepts, serde_json accepts and reads the same.
        #[test]
        fn the_fast_path_reads_what_serde_json_reads(document in documents::top_object()) {
            documents::agree(&document, scan, read_parsed)?;
        }
    }
}
