//! A validating JSON scanner: the fast path for the few fields the
//! gateway reads from request bodies and answers.
//!
//! serde_json's visitors cost more per key than the reading itself: the
//! usage of a 450-byte answer took about 340 ns through them and 200 ns
//! here (`cargo bench`), where skipping is one loop over a local position
//! and keys are compared as bytes. The scanner is
//! strict RFC 8259 (the caller checks UTF-8 once, for the whole document)
//! and never decides alone that a document is bad: whatever it does not
//! accept goes to the serde_json path, which gives the answer and the
//! error message. So a document the scanner rejects costs both passes, and
//! one it accepts must be one serde_json accepts, with the same fields
//! read (a property test holds it to that).

use std::ops::Range;

/// The scanner does not accept the document; serde_json decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected;

pub(crate) type Scanned<T> = Result<T, Rejected>;

/// A JSON value's first byte told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Object,
    Array,
    String,
    Number,
    True,
    False,
    Null,
}

/// A cursor over one JSON document.
pub(crate) struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// Every byte's high bit, and every byte's low bit, in a word.
const HIGH: u64 = 0x8080_8080_8080_8080;
const LOW: u64 = 0x0101_0101_0101_0101;

impl<'a> Scanner<'a> {
    /// A scanner at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Scanner { bytes, at: 0 }
    }

    fn byte(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// The next byte that is not whitespace, not consumed.
    pub(crate) fn peek(&mut self) -> Option<u8> {
        self.at = whitespace(self.bytes, self.at);
        self.byte()
    }

    fn expect(&mut self, byte: u8) -> Scanned<()> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(Rejected)
        }
    }

    /// The whole document was one value and whitespace.
    pub(crate) fn end(&mut self) -> Scanned<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Rejected),
        }
    }

    /// The next value's kind, not consumed.
    pub(crate) fn kind(&mut self) -> Scanned<Kind> {
        Ok(match self.peek().ok_or(Rejected)? {
            b'{' => Kind::Object,
            b'[' => Kind::Array,
            b'"' => Kind::String,
            b'-' | b'0'..=b'9' => Kind::Number,
            b't' => Kind::True,
            b'f' => Kind::False,
            b'n' => Kind::Null,
            _ => return Err(Rejected),
        })
    }

    /// A string at the cursor (after whitespace): the span of its contents
    /// and whether they hold an escape.
    pub(crate) fn string(&mut self) -> Scanned<(Range<usize>, bool)> {
        self.expect(b'"')?;
        let start = self.at;
        let (end, escaped) = string_end(self.bytes, start)?;
        self.at = end + 1;
        Ok((start..end, escaped))
    }

    /// A number at the cursor: its value when it is a plain non-negative
    /// integer that fits in a `u64`.
    pub(crate) fn number(&mut self) -> Scanned<Option<u64>> {
        self.peek();
        let start = self.at;
        self.at = number_end(self.bytes, start)?;
        let text = self.bytes.get(start..self.at).unwrap_or_default();
        if !text.iter().all(u8::is_ascii_digit) {
            return Ok(None);
        }
        Ok(text.iter().try_fold(0u64, |value, digit| {
            value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        }))
    }

    fn literal(&mut self, word: &[u8]) -> Scanned<()> {
        self.peek();
        self.at = literal_end(self.bytes, self.at, word)?;
        Ok(())
    }

    /// `true`, `false` or `null` at the cursor.
    pub(crate) fn boolean_or_null(&mut self) -> Scanned<Option<bool>> {
        match self.kind()? {
            Kind::True => self.literal(b"true").map(|()| Some(true)),
            Kind::False => self.literal(b"false").map(|()| Some(false)),
            Kind::Null => self.literal(b"null").map(|()| None),
            _ => Err(Rejected),
        }
    }

    /// An object at the cursor, member by member: `member` is given each
    /// key's raw bytes (escapes not decoded) and whether it had any, and
    /// must consume the value.
    pub(crate) fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &[u8], bool) -> Scanned<()>,
    ) -> Scanned<()> {
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            let (key, escaped) = self.string()?;
            self.expect(b':')?;
            let bytes = self.bytes;
            member(self, bytes.get(key).unwrap_or_default(), escaped)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Rejected),
            }
        }
    }

    /// Any value at the cursor, consumed whole.
    pub(crate) fn skip(&mut self) -> Scanned<()> {
        self.at = skip_value(self.bytes, self.at)?;
        Ok(())
    }
}

/// Past whitespace from `at`.
#[inline]
fn whitespace(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = bytes.get(at) {
        at += 1;
    }
    at
}

/// A string's end, from just after its opening quote: the index of its
/// closing quote and whether it holds an escape. Bytes that need no look
/// (not `"`, `\` or a control character) are passed eight at a time.
#[inline]
fn string_end(bytes: &[u8], mut at: usize) -> Scanned<(usize, bool)> {
    let mut escaped = false;
    loop {
        while let Some(chunk) = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>) {
            let word = u64::from_le_bytes(*chunk);
            let quote = word ^ (LOW * u64::from(b'"'));
            let backslash = word ^ (LOW * u64::from(b'\\'));
            // A zero byte in `quote` or `backslash`, or a byte under 0x20.
            let found = (quote.wrapping_sub(LOW) & !quote
                | backslash.wrapping_sub(LOW) & !backslash
                | word.wrapping_sub(LOW * 0x20) & !word)
                & HIGH;
            if found != 0 {
                at += (found.trailing_zeros() / 8) as usize;
                break;
            }
            at += 8;
        }
        // At the byte found, or among the last seven.
        loop {
            match bytes.get(at) {
                Some(b'"') => return Ok((at, escaped)),
                Some(b'\\') => {
                    escaped = true;
                    at = escape_end(bytes, at)?;
                    break;
                }
                Some(0x20..) => at += 1,
                // A control character, or the end.
                _ => return Err(Rejected),
            }
        }
    }
}

/// Past an escape whose backslash is at `at`.
#[inline]
fn escape_end(bytes: &[u8], at: usize) -> Scanned<usize> {
    match bytes.get(at + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 2),
        Some(b'u') => {
            let digits = bytes.get(at + 2..at + 6).ok_or(Rejected)?;
            if digits.iter().all(u8::is_ascii_hexdigit) {
                Ok(at + 6)
            } else {
                Err(Rejected)
            }
        }
        _ => Err(Rejected),
    }
}

/// Past digits from `at`.
#[inline]
fn digits_end(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b'0'..=b'9') = bytes.get(at) {
        at += 1;
    }
    at
}

/// Past one digit or more from `at`.
#[inline]
fn some_digits_end(bytes: &[u8], at: usize) -> Scanned<usize> {
    let end = digits_end(bytes, at);
    if end == at {
        return Err(Rejected);
    }
    Ok(end)
}

/// Past a number whose first byte is at `at`, checked but not read.
#[inline]
fn number_end(bytes: &[u8], mut at: usize) -> Scanned<usize> {
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    match bytes.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => at = digits_end(bytes, at + 1),
        _ => return Err(Rejected),
    }
    if bytes.get(at) == Some(&b'.') {
        at = some_digits_end(bytes, at + 1)?;
    }
    if let Some(b'e' | b'E') = bytes.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = bytes.get(at) {
            at += 1;
        }
        at = some_digits_end(bytes, at)?;
    }
    Ok(at)
}

/// Past `word` (`true`, `false` or `null`) at `at`.
#[inline]
fn literal_end(bytes: &[u8], at: usize, word: &[u8]) -> Scanned<usize> {
    if bytes.get(at..at + word.len()) == Some(word) {
        Ok(at + word.len())
    } else {
        Err(Rejected)
    }
}

/// Past an object's key and its colon, the key's quote at `at`.
#[inline]
fn key_end(bytes: &[u8], at: usize) -> Scanned<usize> {
    if bytes.get(at) != Some(&b'"') {
        return Err(Rejected);
    }
    let (close, _) = string_end(bytes, at + 1)?;
    let at = whitespace(bytes, close + 1);
    if bytes.get(at) != Some(&b':') {
        return Err(Rejected);
    }
    Ok(at + 1)
}

/// Past the value at `at` (whitespace before it included), checked whole.
/// One loop with the position in a local: the skipping of a 360-byte
/// answer is most of its reading. Nesting is followed with a stack of its
/// own, not recursion, so no depth is too deep (as with serde_json's
/// skipping).
fn skip_value(bytes: &[u8], mut at: usize) -> Scanned<usize> {
    // One bit a level, 1 for an object: 64 levels in `levels`, the words
    // of outer levels in `outer`.
    let mut levels: u64 = 0;
    let mut depth: usize = 0;
    let mut outer: Vec<u64> = Vec::new();
    loop {
        at = whitespace(bytes, at);
        let &first = bytes.get(at).ok_or(Rejected)?;
        let mut closed = match first {
            b'"' => {
                at = string_end(bytes, at + 1)?.0 + 1;
                false
            }
            b'-' | b'0'..=b'9' => {
                at = number_end(bytes, at)?;
                false
            }
            b't' => {
                at = literal_end(bytes, at, b"true")?;
                false
            }
            b'f' => {
                at = literal_end(bytes, at, b"false")?;
                false
            }
            b'n' => {
                at = literal_end(bytes, at, b"null")?;
                false
            }
            b'{' | b'[' => {
                let object = first == b'{';
                if depth > 0 && depth % 64 == 0 {
                    outer.push(levels);
                    levels = 0;
                }
                levels = levels << 1 | u64::from(object);
                depth += 1;
                at = whitespace(bytes, at + 1);
                let close = if object { b'}' } else { b']' };
                if bytes.get(at) != Some(&close) {
                    if object {
                        at = key_end(bytes, at)?;
                    }
                    continue;
                }
                // Empty: closed below.
                at += 1;
                true
            }
            _ => return Err(Rejected),
        };
        // After a value: the next one in its container, or the container
        // closes, and those that close with it.
        loop {
            if closed {
                levels >>= 1;
                depth -= 1;
                if depth > 0 && depth % 64 == 0 {
                    levels = outer.pop().unwrap_or_default();
                }
            }
            if depth == 0 {
                return Ok(at);
            }
            at = whitespace(bytes, at);
            let object = levels & 1 == 1;
            match bytes.get(at) {
                Some(b',') => {
                    at += 1;
                    if object {
                        at = key_end(bytes, whitespace(bytes, at))?;
                    }
                    break;
                }
                Some(b'}') if object => {
                    at += 1;
                    closed = true;
                }
                Some(b']') if !object => {
                    at += 1;
                    closed = true;
                }
                _ => return Err(Rejected),
            }
        }
    }
}

/// The bytes of a key as given by [`Scanner::object`], escapes decoded
/// into `buffer` when it has any. `None` for a key with an escape of a
/// non-ASCII character or longer than `buffer`: every key the gateway
/// reads is short ASCII, so such a key is one of the others.
pub(crate) fn key<'k>(raw: &'k [u8], escaped: bool, buffer: &'k mut [u8; 32]) -> Option<&'k [u8]> {
    if !escaped {
        return Some(raw);
    }
    let mut length = 0;
    let mut at = 0;
    while let Some(&byte) = raw.get(at) {
        let (decoded, width) = if byte != b'\\' {
            (byte, 1)
        } else {
            match raw.get(at + 1)? {
                b'u' => {
                    // The scanner checked four hex digits follow.
                    let hex = std::str::from_utf8(raw.get(at + 2..at + 6)?).ok()?;
                    let code = u16::from_str_radix(hex, 16).ok()?;
                    (u8::try_from(code).ok().filter(u8::is_ascii)?, 6)
                }
                b'b' => (0x08, 2),
                b'f' => (0x0c, 2),
                b'n' => (b'\n', 2),
                b'r' => (b'\r', 2),
                b't' => (b'\t', 2),
                &other => (other, 2),
            }
        };
        *buffer.get_mut(length)? = decoded;
        length += 1;
        at += width;
    }
    buffer.get(..length)
}

/// The string whose contents are `span` of `document` (as
/// [`Scanner::string`] gives it), decoded.
pub(crate) fn string_value(document: &[u8], span: Range<usize>, escaped: bool) -> Scanned<String> {
    if escaped {
        // With the quotes: serde_json decodes escapes and refuses lone
        // surrogates, as the serde path does.
        let quoted = document
            .get(span.start.wrapping_sub(1)..span.end + 1)
            .ok_or(Rejected)?;
        return serde_json::from_slice(quoted).map_err(|_| Rejected);
    }
    let bytes = document.get(span).ok_or(Rejected)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| Rejected)
}

/// JSON documents for the property tests of the scanner's readers: valid
/// ones built from the keys those readers look for and values of every
/// kind (escapes, lone surrogates, huge exponents included), and the same
/// with one byte deleted, added or changed.
#[cfg(test)]
pub(super) mod documents {
    use proptest::prelude::*;

    fn string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[a-z ]{1,6}",
            Just(r#"\""#.to_owned()),
            Just(r"\\".to_owned()),
            Just(r"\n\t\/".to_owned()),
            Just(r"\u00e9".to_owned()),
            Just(r"\u0041".to_owned()),
            Just(r"\ud800".to_owned()),
            Just(r"\ud83d\ude00".to_owned()),
            Just("é€".to_owned()),
        ];
        proptest::collection::vec(piece, 0..4).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
    }

    fn key() -> impl Strategy<Value = String> {
        const KNOWN: &[&str] = &[
            "model",
            "user",
            "safety_identifier",
            "metadata",
            "user_id",
            "stream",
            "usage",
            "message",
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            r"m\u006fdel",
            r"us\u0061ge",
            r"user\u005fid",
        ];
        prop_oneof![
            3 => proptest::sample::select(KNOWN).prop_map(|key| format!("\"{key}\"")),
            1 => string(),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..100).prop_map(|n| n.to_string()),
            proptest::sample::select(
                &[
                    "-0",
                    "-12",
                    "1.5",
                    "1e400",
                    "2E+3",
                    "0.0e-1",
                    "18446744073709551616",
                ][..]
            )
            .prop_map(str::to_owned),
            string(),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                object(inner),
            ]
        })
    }

    fn object(value: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        proptest::collection::vec((key(), value), 0..6).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(key, value)| format!("{key}: {value}"))
                .collect();
            format!("{{{}}}", members.join(" ,"))
        })
    }

    /// One byte deleted, added or changed, at `at` (taken modulo the
    /// length), by `edit`.
    fn mutate(mut document: Vec<u8>, at: usize, edit: u8, byte: u8) -> Vec<u8> {
        const BYTES: &[u8] = b"{}[],:\"\\ 0123456789-+.eEtrufalsn\x01\x7f";
        let at = at % (document.len() + 1);
        let byte = BYTES[usize::from(byte) % BYTES.len()];
        match edit % 4 {
            0 => {}
            1 if at < document.len() => {
                document.remove(at);
            }
            2 if at < document.len() => document[at] = byte,
            _ => document.insert(at, byte),
        }
        document
    }

    /// A top-level object, valid or one edit away from it.
    pub(crate) fn top_object() -> impl Strategy<Value = Vec<u8>> {
        (object(value()), any::<usize>(), any::<u8>(), any::<u8>())
            .prop_map(|(document, at, edit, byte)| mutate(document.into_bytes(), at, edit, byte))
    }

    /// What the property tests of the scanner's readers hold: wherever the
    /// fast path `scan` accepts a UTF-8 `document`, the serde_json path
    /// `parse` accepts it too and reads the same.
    pub(crate) fn agree<T: PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
        document: &[u8],
        scan: impl Fn(&[u8]) -> super::Scanned<T>,
        parse: impl Fn(&[u8]) -> Result<T, E>,
    ) -> Result<(), TestCaseError> {
        prop_assume!(std::str::from_utf8(document).is_ok());
        if let Ok(read) = scan(document) {
            let text = String::from_utf8_lossy(document);
            let parsed = parse(document);
            prop_assert!(parsed.is_ok(), "{:?}: {:?}", text, parsed);
            prop_assert_eq!(Some(read), parsed.ok(), "{:?}", text);
        }
        Ok(())
    }

    /// Any value, valid or one edit away from it.
    pub(crate) fn any_value() -> impl Strategy<Value = Vec<u8>> {
        (value(), any::<usize>(), any::<u8>(), any::<u8>())
            .prop_map(|(document, at, edit, byte)| mutate(document.into_bytes(), at, edit, byte))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::IgnoredAny;

    fn skips(document: &[u8]) -> bool {
        let mut scanner = Scanner::new(document);
        scanner.skip().and_then(|()| scanner.end()).is_ok()
    }

    #[test]
    fn json_is_skipped_whole_and_anything_else_is_not() {
        for document in [
            &b"{}"[..],
            b" [ ] ",
            b"0",
            b"-0.5e+10",
            b"1E-0",
            br#""a\"\\\/\b\f\n\r\t\u00Ff""#,
            br#"{"a":[1,{"b":null},true,false,"x"],"c":{}}"#,
            "\"é€😀\"".as_bytes(),
        ] {
            assert!(skips(document), "{document:?}");
        }
        for document in [
            &b""[..],
            b" ",
            b"{",
            b"{}}",
            b"[1,]",
            b"[,1]",
            b"{\"a\"}",
            b"{\"a\":1,}",
            b"{a:1}",
            b"{1:1}",
            b"[1 2]",
            b"01",
            b"-",
            b"1.",
            b".5",
            b"1e",
            b"1e+",
            b"+1",
            b"tru",
            b"nul",
            b"True",
            b"\"a",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"\\u12G4\"",
            b"\"tab\there\"",
            b"[1] [2]",
            b"{}x",
        ] {
            assert!(!skips(document), "{document:?}");
        }
    }

    #[test]
    fn nesting_is_followed_to_any_depth() {
        // Across the 64 levels a word of the stack holds, both ways.
        for depth in [1, 63, 64, 65, 128, 129, 10_000] {
            let open: String = (0..depth)
                .map(|level| if level % 3 == 0 { "{\"k\":[" } else { "[" })
                .collect();
            let close: String = (0..depth)
                .rev()
                .map(|level| if level % 3 == 0 { "]}" } else { "]" })
                .collect();
            let document = format!("{open}1{close}");
            assert!(skips(document.as_bytes()), "depth {depth}");
            // The wrong closer at the deepest level, then at the outermost.
            let swapped = document.replacen("1]", "1}", 1);
            assert!(!skips(swapped.as_bytes()), "depth {depth}");
            let last = document.len() - 1;
            let mut outer = document.into_bytes();
            outer[last] = if outer[last] == b'}' { b']' } else { b'}' };
            assert!(!skips(&outer), "depth {depth}");
        }
    }

    #[test]
    fn escaped_keys_are_decoded_and_others_are_none() {
        let mut buffer = [0; 32];
        assert_eq!(key(b"model", false, &mut buffer), Some(&b"model"[..]));
        let mut buffer = [0; 32];
        assert_eq!(key(br"m\u006Fdel", true, &mut buffer), Some(&b"model"[..]));
        let mut buffer = [0; 32];
        assert_eq!(key(br"a\tb\/\\", true, &mut buffer), Some(&b"a\tb/\\"[..]));
        let mut buffer = [0; 32];
        assert_eq!(key(br"\u00e9", true, &mut buffer), None);
        let mut buffer = [0; 32];
        assert_eq!(key(br"\ud800", true, &mut buffer), None);
        let long = [br"\n".as_slice(); 33].concat();
        let mut buffer = [0; 32];
        assert_eq!(key(&long, true, &mut buffer), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Skipping agrees with serde_json's, both ways, on any UTF-8.
        #[test]
        fn skipping_agrees_with_serde_json(document in documents::any_value()) {
            prop_assume!(std::str::from_utf8(&document).is_ok());
            let serde = serde_json::from_slice::<IgnoredAny>(&document).is_ok();
            prop_assert_eq!(skips(&document), serde, "{:?}", String::from_utf8_lossy(&document));
        }
    }
}
