//! Message framing, the pieces both sides of an HTTP/1.1 intermediary use
//! (the gateway's server and its upstream connections, and the load
//! generator): reads into a buffer, the framing headers, and a body framed
//! by its length or by chunks (RFC 9112 §6, §7.1), decoded in place from
//! whatever the reads have brought so far.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use tokio::io::AsyncRead;
use tokio::time::{Instant, Sleep};

/// The most header fields a head may have (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// Where each header field's name and value sit in a head: kept with a
/// connection rather than built for every head.
pub type Spans = [(usize, usize, usize, usize); MAX_HEADERS];
/// What a connection keeps from one head to the next (boxed, or in a boxed
/// connection, so that what moves stays small): where the fields sit, and
/// a header map emptied for reuse. Each message a connection reads takes a
/// map and each one it writes gives its map back, so in steady state no
/// head allocates one.
#[derive(Debug)]
pub struct HeadScratch {
    pub spans: Spans,
    spare: Option<HeaderMap>,
    /// Where the fields an answer passes on as they came are written (see
    /// [`Forwarded`]): split off per answer, its memory reused once the
    /// answer's head has been written.
    forwarded: BytesMut,
}

impl Default for HeadScratch {
    fn default() -> Self {
        Self {
            spans: [(0, 0, 0, 0); MAX_HEADERS],
            spare: None,
            forwarded: BytesMut::new(),
        }
    }
}

impl HeadScratch {
    /// A map past this capacity (a head with many fields) is let go rather
    /// than kept with an idle connection.
    const KEPT_CAPACITY: usize = 32;
    /// Forwarded fields' memory past this size is let go with its answer.
    const KEPT_FORWARDED: usize = 16 * 1024;

    pub fn boxed() -> Box<Self> {
        Box::default()
    }

    /// An empty map with room for `fields`: the kept one if there is one.
    pub fn headers(&mut self, fields: usize) -> HeaderMap {
        match self.spare.take() {
            Some(mut headers) => {
                headers.reserve(fields);
                headers
            }
            None => HeaderMap::with_capacity(fields),
        }
    }

    /// Keeps `headers`, emptied (its values let go now), for the next head.
    pub fn recycle(&mut self, mut headers: HeaderMap) {
        if headers.capacity() <= Self::KEPT_CAPACITY {
            headers.clear();
            self.spare = Some(headers);
        }
    }

    /// The first `fields` spans, and room for `bytes` of forwarded
    /// fields: the last answer's memory when its head has been written,
    /// fresh memory when not, and none kept from a head that needed more
    /// than a large one.
    pub fn spans_and_forwarded(
        &mut self,
        fields: usize,
        bytes: usize,
    ) -> (&[(usize, usize, usize, usize)], &mut BytesMut) {
        if self.forwarded.capacity() > Self::KEPT_FORWARDED {
            self.forwarded = BytesMut::new();
        }
        self.forwarded.reserve(bytes);
        let spans = self.spans.get(..fields).unwrap_or_default();
        (spans, &mut self.forwarded)
    }

    /// The forwarded fields written since the last call.
    pub fn take_forwarded(&mut self, date: bool) -> Forwarded {
        let lines = if self.forwarded.is_empty() {
            Bytes::new()
        } else {
            self.forwarded.split().freeze()
        };
        Forwarded { lines, date }
    }
}

/// An upstream answer's header fields that the gateway neither reads nor
/// removes, passed on to the client as they came (names in their case,
/// as `name: value` lines ending in CRLF) instead of each being parsed
/// into the answer's header map and written out of it again. The map
/// holds what the gateway reads (the content's type and encoding); the
/// length frames the body and the client's side writes the body's own;
/// hop-by-hop fields and the upstream's `x-abgate-*` are in neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The fields' lines.
    pub lines: Bytes,
    /// Whether `Date` is one of them.
    pub date: bool,
}

impl Forwarded {
    /// Each field's name and value.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&byte| byte == b'\n')
            .filter_map(|line| line.strip_suffix(b"\r"))
            .filter_map(|line| {
                let colon = line.iter().position(|&byte| byte == b':')?;
                let (name, value) = line.split_at(colon);
                Some((name, value.get(2..).unwrap_or_default()))
            })
    }

    /// Adds the fields to `headers`, for a side that writes heads from a
    /// map (HTTP/2, where names are lower case).
    pub fn add_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.fields() {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name),
                http::HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// A fresh read buffer's size: the typical head and body.
pub const READ_BUFFER: usize = 8 * 1024;
/// Read buffers keep at least this much room before each read.
const READ_ROOM: usize = 4 * 1024;
/// The longest chunk-size line (with extensions) or trailer section.
pub const MAX_FRAMING_BYTES: usize = 16 * 1024;

/// Reads what `reader` has into `buffer`: 0 at its end.
pub fn poll_fill(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buffer.capacity() - buffer.len() < READ_ROOM {
        buffer.reserve(READ_BUFFER);
    }
    // tokio-util's reader marks the socket not ready after a short read,
    // so that the next read waits for data instead of trying first.
    tokio_util::io::poll_read_buf(Pin::new(reader), cx, buffer)
}

/// Whether a comma-separated header value lists `token` (any case).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|byte| *byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a `Transfer-Encoding` value's last coding is chunked.
pub fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|byte| *byte == b',')
        .next()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The length a `Content-Length` value gives, agreeing with the one
/// `known` from the fields before it: each comma-separated item must be
/// digits only, and all must be equal.
pub fn content_length(value: &[u8], known: Option<u64>) -> Result<u64, &'static str> {
    // The usual value, one number alone: read in one pass.
    if let Some(parsed) = digits(value) {
        return match known {
            Some(length) if length != parsed => Err("conflicting content-length values"),
            _ => Ok(parsed),
        };
    }
    let mut length = known;
    for item in value.split(|byte| *byte == b',') {
        let parsed = digits(item.trim_ascii()).ok_or("content-length")?;
        if length.is_some_and(|length| length != parsed) {
            return Err("conflicting content-length values");
        }
        length = Some(parsed);
    }
    length.ok_or("content-length")
}

/// The length a request's `Content-Length` value gives, agreeing with
/// the one `known` from the fields before it: digits only, one number.
/// A list (`5, 5`), which RFC 9110 §8.6 lets a recipient take, is refused
/// as hyper refuses it: a request is read one way by every hop or not at
/// all. Answers keep [`content_length`]'s reading.
pub fn request_content_length(value: &[u8], known: Option<u64>) -> Result<u64, &'static str> {
    let parsed = digits(value).ok_or("content-length")?;
    match known {
        Some(length) if length != parsed => Err("conflicting content-length values"),
        _ => Ok(parsed),
    }
}

/// `value` as a decimal number when it is digits only, not empty and fits
/// in a `u64`.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |number, &byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        number.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// One step of decoding what a read buffer holds.
#[derive(Debug)]
pub enum Step {
    /// A piece of the body.
    Data(Bytes),
    /// The body has ended.
    End,
    /// More must be read first.
    More,
}

/// One step of a body with `left` bytes still to come.
pub fn step_length(buffer: &mut BytesMut, left: &mut u64) -> Step {
    if *left == 0 {
        Step::End
    } else if buffer.is_empty() {
        Step::More
    } else {
        Step::Data(take(buffer, left))
    }
}

/// Where a chunked body's decoding stands (RFC 9112 §7.1). The grammar
/// is read exactly, as hyper and nginx read it: a byte two parsers could
/// read two ways (a bare CR or LF, junk after the size, `0x`) is an
/// error, never skipped over.
///
/// ```text
/// chunk      = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-size = 1*HEXDIG
/// chunk-ext  = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
/// ext-val    = token / quoted-string
/// trailer    = *( field-name ":" OWS field-value OWS CRLF ) CRLF
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Reading a chunk's size, in hex.
    Size { size: u64, digits: u8 },
    /// Past the size, in its extensions, up to the line's CR; `read`
    /// bytes of them so far.
    SizeLine {
        size: u64,
        at: Extension,
        read: usize,
    },
    /// The size line's CR has been read: its LF must follow.
    SizeLf { size: u64 },
    /// This many bytes of the chunk's data still to come.
    Data(u64),
    /// The CRLF after a chunk's data (`cr`: its CR has been read).
    DataEnd { cr: bool },
    /// The trailer section after the last chunk: where in its current
    /// line, and `read` bytes in all.
    Trailers { at: TrailerLine, read: usize },
    /// The last chunk and its trailers have been read.
    Done,
}

/// Where in a chunk's extensions the size line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// After the size, or after a whole extension: whitespace, `;` or CR.
    Between,
    /// After `;`: whitespace, or a name's first byte.
    NameStart,
    Name,
    /// After a name and whitespace: `=`, `;` or CR.
    AfterName,
    /// After `=`: whitespace, a token, or a quoted string's `"`.
    ValueStart,
    Token,
    Quoted,
    /// After a backslash in a quoted string.
    Escaped,
}

/// Where in a trailer section's line the decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerLine {
    /// At a line's start: a field name, or the section's closing CRLF.
    Start,
    Name,
    Value,
    /// A field line's CR has been read.
    Lf,
    /// The closing CR has been read.
    EndLf,
}

/// Whether `byte` may be in a token (RFC 9110 §5.6.2).
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Whether `byte` may be in a field value or quoted string: visible
/// ASCII, space, tab, and obs-text (RFC 9110 §5.5).
fn is_field_byte(byte: u8) -> bool {
    byte == b'\t' || byte == b' ' || (0x21..=0x7e).contains(&byte) || byte >= 0x80
}

impl Chunked {
    /// Where a chunked body's decoding starts.
    pub const START: Chunked = Chunked::Size { size: 0, digits: 0 };

    /// One step of the body: framing consumed, then data or the end.
    pub fn step(&mut self, buffer: &mut BytesMut) -> Result<Step, &'static str> {
        self.advance(buffer)?;
        Ok(match self {
            Chunked::Done => Step::End,
            Chunked::Data(left) if !buffer.is_empty() => Step::Data(take(buffer, left)),
            _ => Step::More,
        })
    }

    /// Consumes framing bytes from the front of `buffer` until data or
    /// the end is reached, or the buffer runs out.
    pub fn advance(&mut self, buffer: &mut BytesMut) -> Result<(), &'static str> {
        let mut used = 0;
        let result = loop {
            match *self {
                Chunked::Done => break Ok(()),
                Chunked::Data(0) => {
                    *self = Chunked::DataEnd { cr: false };
                    continue;
                }
                Chunked::Data(_) => break Ok(()),
                _ => {}
            }
            let Some(&byte) = buffer.get(used) else {
                break Ok(());
            };
            used += 1;
            match self.next(byte) {
                Ok(next) => *self = next,
                Err(error) => break Err(error),
            }
        };
        buffer.advance(used);
        result
    }

    /// The state after one more framing byte.
    fn next(self, byte: u8) -> Result<Chunked, &'static str> {
        Ok(match self {
            Chunked::DataEnd { cr: false } if byte == b'\r' => Chunked::DataEnd { cr: true },
            Chunked::DataEnd { cr: true } if byte == b'\n' => Chunked::START,
            Chunked::DataEnd { .. } => return Err("chunk data not followed by CRLF"),
            Chunked::Size { size, digits } => match byte {
                _ if byte.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err("chunk size too large");
                    }
                    let value = (byte as char).to_digit(16).unwrap_or(0);
                    Chunked::Size {
                        size: size * 16 + u64::from(value),
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err("chunk size missing"),
                b'\r' => Chunked::SizeLf { size },
                b' ' | b'\t' | b';' => Chunked::SizeLine {
                    size,
                    at: Extension::Between,
                    read: 0,
                }
                .next(byte)?,
                _ => return Err("invalid byte after chunk size"),
            },
            Chunked::SizeLine { read, .. } if read >= MAX_FRAMING_BYTES => {
                return Err("chunk size line too long")
            }
            Chunked::SizeLine { size, at, read } => {
                if byte == b'\r' && !matches!(at, Extension::Quoted | Extension::Escaped) {
                    return match at {
                        Extension::NameStart | Extension::ValueStart => {
                            Err("chunk extension incomplete")
                        }
                        _ => Ok(Chunked::SizeLf { size }),
                    };
                }
                Chunked::SizeLine {
                    size,
                    at: at.next(byte)?,
                    read: read + 1,
                }
            }
            Chunked::SizeLf { size } if byte == b'\n' => Self::after_size_line(size),
            Chunked::SizeLf { .. } => return Err("chunk size line not ended by CRLF"),
            Chunked::Trailers { read, .. } if read >= MAX_FRAMING_BYTES => {
                return Err("trailer section too long")
            }
            Chunked::Trailers { at, read } => {
                let at = match (at, byte) {
                    (TrailerLine::EndLf, b'\n') => return Ok(Chunked::Done),
                    (TrailerLine::Start, b'\r') => TrailerLine::EndLf,
                    (TrailerLine::Start | TrailerLine::Name, _) if is_tchar(byte) => {
                        TrailerLine::Name
                    }
                    (TrailerLine::Name, b':') => TrailerLine::Value,
                    (TrailerLine::Value, b'\r') => TrailerLine::Lf,
                    (TrailerLine::Value, _) if is_field_byte(byte) => TrailerLine::Value,
                    (TrailerLine::Lf, b'\n') => TrailerLine::Start,
                    _ => return Err("invalid trailer section"),
                };
                Chunked::Trailers { at, read: read + 1 }
            }
            state @ (Chunked::Data(_) | Chunked::Done) => state,
        })
    }

    fn after_size_line(size: u64) -> Chunked {
        if size == 0 {
            Chunked::Trailers {
                at: TrailerLine::Start,
                read: 0,
            }
        } else {
            Chunked::Data(size)
        }
    }
}

impl Extension {
    /// Where the extensions are after `byte` (not the line's CR, which
    /// [`Chunked::next`] handles).
    fn next(self, byte: u8) -> Result<Extension, &'static str> {
        let whitespace = byte == b' ' || byte == b'\t';
        Ok(match self {
            Extension::Between | Extension::AfterName if whitespace => self,
            Extension::NameStart | Extension::ValueStart if whitespace => self,
            Extension::Between | Extension::AfterName | Extension::Token if byte == b';' => {
                Extension::NameStart
            }
            Extension::NameStart | Extension::Name if is_tchar(byte) => Extension::Name,
            Extension::Name if whitespace => Extension::AfterName,
            Extension::Name if byte == b';' => Extension::NameStart,
            Extension::Name | Extension::AfterName if byte == b'=' => Extension::ValueStart,
            Extension::ValueStart | Extension::Token if is_tchar(byte) => Extension::Token,
            Extension::Token if whitespace => Extension::Between,
            Extension::ValueStart if byte == b'"' => Extension::Quoted,
            Extension::Quoted if byte == b'"' => Extension::Between,
            Extension::Quoted if byte == b'\\' => Extension::Escaped,
            Extension::Quoted | Extension::Escaped if is_field_byte(byte) => Extension::Quoted,
            _ => return Err("invalid chunk extension"),
        })
    }
}

/// How an answer's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFraming {
    /// After this many bytes.
    Length(u64),
    /// After the last chunk.
    Chunked,
    /// When the server closes the connection.
    UntilClose,
}

/// What an answer's fields say of its framing, noted as they are read:
/// the gateway's upstream side and the load generator read answers by the
/// same rules.
#[derive(Debug, Default)]
pub struct FramingFields<'a> {
    /// The last `Transfer-Encoding` field's value.
    transfer_encoding: Option<&'a [u8]>,
    /// The length the `Content-Length` fields agree on, or why they do not.
    content_length: Option<Result<u64, &'static str>>,
    /// Whether a `Connection` field has `close`.
    closes: bool,
}

impl<'a> FramingFields<'a> {
    /// A `Content-Length` field's value.
    pub fn content_length(&mut self, value: &[u8]) {
        self.content_length = match self.content_length {
            None => Some(content_length(value, None)),
            Some(Ok(known)) => Some(content_length(value, Some(known))),
            error @ Some(Err(_)) => error,
        };
    }

    /// A `Transfer-Encoding` field's value.
    pub fn transfer_encoding(&mut self, value: &'a [u8]) {
        self.transfer_encoding = Some(value);
    }

    /// A `Connection` field's value.
    pub fn connection(&mut self, value: &[u8]) {
        self.closes |= has_token(value, b"close");
    }

    /// Notes the field if it is one of the three that frame an answer
    /// (for a reader that has not told its fields apart already).
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.connection(value);
        }
    }

    /// The body's framing for an answer with `status` to a request that
    /// was (`head_request`) or was not HEAD, and whether the connection
    /// may carry another request after it: HTTP/1.1 (`minor_version` 1),
    /// no `Connection: close`, and a framing that does not run to the
    /// close.
    pub fn framing(
        &self,
        status: u16,
        head_request: bool,
        minor_version: u8,
    ) -> Result<(AnswerFraming, bool), &'static str> {
        let (framing, reusable) = self.framing_alone(status, head_request)?;
        Ok((framing, reusable && minor_version == 1 && !self.closes))
    }

    fn framing_alone(
        &self,
        status: u16,
        head_request: bool,
    ) -> Result<(AnswerFraming, bool), &'static str> {
        if head_request || status == 204 || status == 304 {
            return Ok((AnswerFraming::Length(0), true));
        }
        if let Some(last) = self.transfer_encoding {
            let chunked = ends_chunked(last);
            // With a Content-Length too, the connection is not to be
            // trusted again (RFC 9112 §6.3).
            let reusable = chunked && self.content_length.is_none();
            let framing = if chunked {
                AnswerFraming::Chunked
            } else {
                AnswerFraming::UntilClose
            };
            return Ok((framing, reusable));
        }
        match self.content_length {
            Some(Ok(length)) => Ok((AnswerFraming::Length(length), true)),
            Some(Err(why)) => Err(why),
            None => Ok((AnswerFraming::UntilClose, false)),
        }
    }
}

/// Fields that describe one connection (RFC 9110 §7.6.1), lower case:
/// never passed from one hop to the next. `Connection` may name more.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a field name, in any case, is hop-by-hop ([`HOP_BY_HOP`]).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|known| name.eq_ignore_ascii_case(known.as_bytes()))
}

/// Writes one header field line: `name: value` and CRLF.
pub fn write_field(out: &mut impl BufMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes a head's Content-Length line, the length in decimal, without the
/// formatting machinery (or, through `to_string`, an allocation) per
/// message.
pub fn write_content_length(out: &mut Vec<u8>, length: u64) {
    // Filled from the end: a u64 has at most 20 digits.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = length;
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
        at -= 1;
        if rest == 0 {
            break;
        }
    }
    write_field(out, b"content-length", digits.get(at..).unwrap_or_default());
}

/// Takes up to `left` bytes off the front of `buffer`, counting them off
/// `left`.
fn take(buffer: &mut BytesMut, left: &mut u64) -> Bytes {
    let length = usize::try_from(*left)
        .unwrap_or(usize::MAX)
        .min(buffer.len());
    *left -= length as u64;
    buffer.split_to(length).freeze()
}

/// Ready once `deadline` has passed, on a timer kept from one wait to the
/// next (a connection's): a timer still set for an earlier, sooner
/// deadline fires early and is moved on to this one, so a kept timer is
/// set again at most once a timeout, not once a wait. The timer must not
/// be set later than `deadline`.
pub fn poll_deadline(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    while timer.as_mut().poll(cx).is_ready() {
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
    Poll::Pending
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_length_field_is_written_in_decimal() {
        for length in [0, 7, 10, 360, 4096, 1_000_000, u64::MAX] {
            let mut out = b"x".to_vec();
            write_content_length(&mut out, length);
            assert_eq!(out, format!("xcontent-length: {length}\r\n").into_bytes());
        }
    }

    /// Decodes `wire` as a chunked body fed `piece` bytes at a time:
    /// the data, and whether the decoder reached the end.
    fn decode_chunked(wire: &[u8], piece: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut state = Chunked::START;
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        for bytes in wire.chunks(piece) {
            buffer.extend_from_slice(bytes);
            while let Step::Data(piece) = state.step(&mut buffer)? {
                data.extend_from_slice(&piece);
            }
        }
        Ok((data, state == Chunked::Done && buffer.is_empty()))
    }

    #[test]
    fn header_maps_come_back_empty_with_their_room() {
        let mut scratch = HeadScratch::boxed();
        let mut headers = scratch.headers(4);
        assert!(headers.is_empty());
        for n in 0..6 {
            headers.append(
                http::HeaderName::from_bytes(format!("x-{n}").as_bytes()).unwrap(),
                http::HeaderValue::from_static("v"),
            );
        }
        let capacity = headers.capacity();
        let value = Bytes::from_static(b"kept");
        headers.insert(
            "x-held",
            http::HeaderValue::from_maybe_shared(value).unwrap(),
        );
        scratch.recycle(headers);
        let again = scratch.headers(2);
        assert!(again.is_empty(), "{again:?}");
        assert!(again.capacity() >= capacity);
        // Taken: the next map is a new one, until one is given back.
        assert!(scratch.spare.is_none());
        // A map grown past the kept size is let go.
        let mut large = scratch.headers(200);
        large.insert("x-a", http::HeaderValue::from_static("b"));
        scratch.recycle(large);
        assert!(scratch.spare.is_none());
    }

    #[test]
    fn content_lengths_are_digits_and_agree() {
        assert_eq!(content_length(b"360", None), Ok(360));
        assert_eq!(content_length(b"0", Some(0)), Ok(0));
        assert_eq!(content_length(b"18446744073709551615", None), Ok(u64::MAX));
        assert_eq!(content_length(b"12, 12 ,12", None), Ok(12));
        assert_eq!(content_length(b"12", Some(12)), Ok(12));
        assert_eq!(
            content_length(b"12", Some(13)),
            Err("conflicting content-length values")
        );
        assert_eq!(
            content_length(b"12,13", None),
            Err("conflicting content-length values")
        );
        for bad in [
            &b""[..],
            b" ",
            b"+1",
            b"-1",
            b"1a",
            b"0x10",
            b"1 2",
            b"12,",
            b",12",
            b"18446744073709551616",
            "\u{0661}".as_bytes(),
        ] {
            assert_eq!(content_length(bad, None), Err("content-length"), "{bad:?}");
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_split() {
        let wire: &[u8] = b"5\r\nhello\r\n1A;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n\
            3 ; a ; b = \"q\\\"; x\" ;c=d\t\r\n, w\r\n0\r\nx-trailer: 1\r\nx-b:\r\n\r\n";
        for piece in 1..=wire.len() {
            let (data, ended) = decode_chunked(wire, piece).unwrap();
            assert_eq!(
                data, b"helloabcdefghijklmnopqrstuvwxyz, w",
                "pieces of {piece}"
            );
            assert!(ended, "pieces of {piece}");
        }
        // Stopped short of the last chunk: not ended.
        let (data, ended) = decode_chunked(b"5\r\nhello\r\n", 4).unwrap();
        assert_eq!(data, b"hello");
        assert!(!ended);
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for wire in [
            &b"\r\nhello"[..],
            b"zz\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            // Junk after the size, read by some as an extension.
            b"2azz\r\nhi\r\n0\r\n\r\n",
            // `0x3a` is 58 to a parser that takes C's prefix, 0 to one
            // that stops at the x: neither may be guessed.
            b"0x3a\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            // Bare LF or CR where CRLF belongs.
            b"5\nhello\r\n0\r\n\r\n",
            b"5\rhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r0\r\n\r\n",
            b"5\r\nhello\r\n0\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            // Extensions that are not token or quoted-string.
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;a=b c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"unended\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"b\"c\r\nhello\r\n0\r\n\r\n",
            b"5;a=b\0\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;@\r\nhello\r\n0\r\n\r\n",
            // Trailer lines that are not field lines.
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
            b"0\r\nx-t: 1\n\r\n",
            b"0\r\nx-t: a\rb\r\n\r\n",
            b"0\r\nx-t: \0\r\n\r\n",
            b"0\r\n x-folded: 1\r\n\r\n",
        ] {
            let err = decode_chunked(wire, wire.len()).err();
            assert!(
                err.is_some(),
                "{:?}: {err:?}",
                String::from_utf8_lossy(wire)
            );
            // The same, a byte at a time: no state lets it through.
            assert!(decode_chunked(wire, 1).is_err(), "{wire:?} by bytes");
        }
        let endless = [b"1;".as_slice(), &[b'x'; MAX_FRAMING_BYTES + 1]].concat();
        assert!(decode_chunked(&endless, 1000).is_err());
    }

    #[test]
    fn chunk_extensions_and_trailers_of_every_allowed_form_are_read() {
        for wire in [
            &b"5 \r\nhello\r\n0\r\n\r\n"[..],
            b"5\t;a\r\nhello\r\n0\r\n\r\n",
            b"5;a=b;c\r\nhello\r\n0;z\r\n\r\n",
            b"5;a=\"\"\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\\\\y;z=\\\"\"\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"caf\xc3\xa9\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx-a: 1\r\nx-b:2 \r\n\r\n",
        ] {
            let (data, ended) = decode_chunked(wire, 1)
                .unwrap_or_else(|err| panic!("{:?}: {err}", String::from_utf8_lossy(wire)));
            assert_eq!(data, b"hello");
            assert!(ended, "{wire:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_of_any_body_decodes_to_that_body(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..90, 1..20),
            piece in 1usize..64,
            extensions in proptest::prelude::any::<bool>(),
        ) {
            let mut wire = Vec::new();
            let mut rest = &data[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, left) = rest.split_at((*size).min(rest.len()));
                let extension = if extensions { ";a=b" } else { "" };
                wire.extend_from_slice(format!("{:X}{extension}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                rest = left;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let (decoded, ended) = decode_chunked(&wire, piece).unwrap();
            proptest::prop_assert_eq!(decoded, data);
            proptest::prop_assert!(ended);
        }

        #[test]
        fn any_bytes_decode_to_less_than_themselves_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            if let Ok((decoded, _)) = decode_chunked(&bytes, 7) {
                proptest::prop_assert!(decoded.len() < bytes.len().max(1));
            }
        }
    }
}
