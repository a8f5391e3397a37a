//! HTTP/1.1 on the wire to a plain-HTTP upstream, spoken by the task that
//! serves the client.
//!
//! The request head is written straight from the request's parts into a
//! buffer the connection keeps; the answer's head is parsed with httparse,
//! its header values left in the read buffer they arrived in; its body is
//! decoded (a length, chunks, or up to the close) in place, and each piece
//! is passed on the moment it is read. There is no connection task and no
//! channel between it and the request: the bytes go from the upstream's
//! socket to the client's answer, and the connection goes back to its pool
//! when the answer's last byte has been read.

use std::future::poll_fn;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, EXPECT, HOST};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use smallvec::SmallVec;

use super::pool::Pool;
use super::{AnswerFields, OutgoingBody};
use crate::framing::{
    is_hop_by_hop, poll_fill, step_length, write_content_length, write_field, AnswerFraming,
    Chunked, Forwarded, FramingFields, HeadScratch, Step, MAX_HEADERS, READ_BUFFER,
};
use crate::server::BoxError;

/// The longest answer head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A whole request body up to this size is copied behind the head, and
/// the two go out in one plain write; a larger one goes in a vectored
/// write with the head, uncopied.
const COPIED_BODY: usize = 4 * 1024;
/// A connection's write buffer is let go past this size, so that a large
/// request head or body chunk does not stay with it while it idles.
const KEPT_WRITE_BUFFER: usize = 8 * 1024;

/// An open connection to the upstream and its buffers, kept between
/// requests.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: TcpStream,
    /// What the pool's user makes of an answer's fields.
    fields: AnswerFields,
    read: BytesMut,
    write: Vec<u8>,
    /// Where an answer head's fields sit: kept, not rebuilt per answer.
    head: HeadScratch,
    /// The timer that bounds the wait for an answer's head, kept from one
    /// request to the next (see [`super::pool`]).
    pub(super) timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What went wrong on a connection to a plain-HTTP upstream.
#[derive(Debug)]
pub enum WireError {
    /// The socket failed (reset, broken pipe, ...).
    Io(io::Error),
    /// The upstream closed the connection before the answer ended.
    Closed,
    /// The upstream's answer is not valid HTTP/1.1.
    Invalid(&'static str),
    /// The client's request body failed while it was being sent on.
    RequestBody(BoxError),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(err) => write!(f, "connection error: {err}"),
            WireError::Closed => {
                f.write_str("the upstream closed the connection before the answer ended")
            }
            WireError::Invalid(what) => write!(f, "invalid answer from the upstream: {what}"),
            WireError::RequestBody(err) => write!(f, "the request body failed: {err}"),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WireError::Io(err) => Some(err),
            WireError::RequestBody(err) => Some(err.as_ref()),
            WireError::Closed | WireError::Invalid(_) => None,
        }
    }
}

/// A write that failed, and how many bytes of it went out first: none
/// means the request may still be sent on another connection.
pub(crate) struct WriteFailed {
    pub error: io::Error,
    pub written: usize,
}

impl Connection {
    /// Boxed for its life: a request, its answer's body and the pool move
    /// the connection from one to the next, a pointer instead of its
    /// buffers and the head's field positions.
    pub(crate) fn new(stream: TcpStream, fields: AnswerFields) -> Box<Self> {
        Box::new(Self {
            stream,
            fields,
            read: BytesMut::with_capacity(READ_BUFFER),
            write: Vec::with_capacity(1024),
            head: HeadScratch::default(),
            timer: None,
        })
    }

    /// Whether the connection, idle since its last answer, is still open
    /// with nothing unasked-for to read. Costs a system call only when the
    /// socket has signalled something since (tokio tracks readiness).
    pub fn is_reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(err) => err.kind() == io::ErrorKind::WouldBlock,
            // Closed (0), or bytes that answer nothing.
            Ok(_) => false,
        }
    }

    /// Writes the request head, with as much of a whole body as the
    /// socket takes in the same system call: a small body copied behind
    /// the head, a larger one in a vectored write. What of the body is
    /// left stays in `framing`.
    pub async fn write_head(
        &mut self,
        parts: &Parts,
        host: &HeaderValue,
        framing: &mut BodyFraming,
    ) -> Result<(), WriteFailed> {
        self.write.clear();
        encode_head(&mut self.write, parts, host, framing);
        let body = match framing {
            BodyFraming::Whole(Some(bytes)) if bytes.len() <= COPIED_BODY => {
                self.write.extend_from_slice(bytes);
                bytes.clear();
                Bytes::new()
            }
            BodyFraming::Whole(Some(bytes)) => bytes.clone(),
            _ => Bytes::new(),
        };
        let head = self.write.len();
        let mut written = 0;
        while written < head {
            let rest = self.write.get(written..).unwrap_or_default();
            let sent = if body.is_empty() {
                self.stream.write(rest).await
            } else {
                let slices = [io::IoSlice::new(rest), io::IoSlice::new(&body)];
                self.stream.write_vectored(&slices).await
            };
            match sent {
                Ok(0) => {
                    return Err(WriteFailed {
                        error: io::ErrorKind::WriteZero.into(),
                        written,
                    })
                }
                Ok(n) => written += n,
                Err(error) => return Err(WriteFailed { error, written }),
            }
        }
        if let BodyFraming::Whole(Some(bytes)) = framing {
            bytes.advance((written - head).min(bytes.len()));
        }
        if self.write.capacity() > KEPT_WRITE_BUFFER {
            self.write = Vec::new();
        }
        Ok(())
    }

    /// Sends what of the body [`Connection::write_head`] left, while
    /// watching for an answer that comes first: an upstream may refuse a
    /// request on its head (413, 401) and stop reading its body. Such an
    /// answer is returned, on a connection not to be used again; so is one
    /// that came before a failed write.
    pub async fn write_body(
        &mut self,
        framing: BodyFraming,
        body: impl OutgoingBody,
        method: &Method,
    ) -> Result<Option<Head>, WireError> {
        if let BodyFraming::Whole(bytes) = &framing {
            if bytes.as_ref().map_or(true, Bytes::is_empty) {
                return Ok(None); // all sent with the head
            }
        }
        let Connection {
            stream,
            fields,
            read,
            write,
            head,
            ..
        } = self;
        let (mut reader, mut writer) = stream.split();
        let sending = send_body(&mut writer, write, framing, body);
        let answer = read_head(&mut reader, read, head, fields, method);
        tokio::pin!(sending, answer);
        tokio::select! {
            sent = &mut sending => match sent {
                Ok(()) => Ok(None),
                Err(WireError::Io(error)) => match answer.await {
                    Ok(head) => Ok(Some(head.closing())),
                    Err(_) => Err(WireError::Io(error)),
                },
                Err(error) => Err(error),
            },
            head = &mut answer => head.map(|head| Some(head.closing())),
        }
    }

    /// Keeps a sent request's header map for this connection's next
    /// answer (see [`HeadScratch`]).
    pub fn recycle(&mut self, headers: HeaderMap) {
        self.head.recycle(headers);
    }

    /// Reads until the answer's head is complete (informational answers
    /// skipped) and parses it.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, WireError> {
        read_head(
            &mut self.stream,
            &mut self.read,
            &mut self.head,
            &self.fields,
            method,
        )
        .await
    }

    /// Reads what the socket has into the read buffer: 0 at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, WireError>> {
        poll_fill(&mut self.stream, &mut self.read, cx).map_err(WireError::Io)
    }
}

/// Writes a body that follows its head: whole, as it comes with the
/// client's length, or in chunks.
async fn send_body(
    writer: &mut (impl AsyncWrite + Unpin),
    buffer: &mut Vec<u8>,
    framing: BodyFraming,
    mut body: impl OutgoingBody,
) -> Result<(), WireError> {
    // With a declared length, the bytes still owed: the body must give
    // exactly those, or the upstream would read the rest as a request.
    let (chunked, mut owed) = match framing {
        BodyFraming::Whole(Some(bytes)) => {
            return writer.write_all(&bytes).await.map_err(WireError::Io)
        }
        BodyFraming::Whole(None) => return Ok(()),
        BodyFraming::Declared(length) => (false, Some(length)),
        BodyFraming::Chunked => (true, None),
    };
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(WireError::RequestBody)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        if let Some(owed) = &mut owed {
            *owed = owed
                .checked_sub(data.len() as u64)
                .ok_or_else(length_mismatch)?;
        }
        buffer.clear();
        if chunked {
            let _ = write!(buffer, "{:x}\r\n", data.len());
        }
        buffer.extend_from_slice(&data);
        if chunked {
            buffer.extend_from_slice(b"\r\n");
        }
        writer.write_all(buffer).await.map_err(WireError::Io)?;
    }
    if owed.is_some_and(|owed| owed > 0) {
        return Err(length_mismatch());
    }
    if chunked {
        writer
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(WireError::Io)?;
    }
    if buffer.capacity() > KEPT_WRITE_BUFFER {
        *buffer = Vec::new();
    }
    Ok(())
}

/// A streamed body that gave more or fewer bytes than its exact size:
/// the exchange fails and the connection, which the upstream may read
/// as holding part of another request, is not used again.
fn length_mismatch() -> WireError {
    WireError::RequestBody("the request body's length differs from its declared length".into())
}

/// Reads into `buffer` until an answer's head is complete (informational
/// answers skipped) and parses it.
async fn read_head(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    scratch: &mut HeadScratch,
    fields: &AnswerFields,
    method: &Method,
) -> Result<Head, WireError> {
    let mut interim = 0;
    loop {
        // A reused connection's buffer is empty: nothing to parse yet.
        if !buffer.is_empty() {
            if let Some(head) = parse_head_after(buffer, scratch, fields, method, &mut interim)? {
                return Ok(head);
            }
        }
        let read = poll_fn(|cx| poll_fill(reader, buffer, cx))
            .await
            .map_err(WireError::Io)?;
        if read == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// How a request's body follows its head: decided from the body the
/// upstream side is given (held whole, or its exact size), never from a
/// framing header the client sent, which the client's side has already
/// read and the body has already been decoded by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFraming {
    /// A body held whole: its length is in the head.
    Whole(Option<Bytes>),
    /// A streamed body of this exact length: sent with it as
    /// Content-Length, and exactly that many bytes sent.
    Declared(u64),
    /// A streamed body of unknown length, sent in chunks.
    Chunked,
}

impl BodyFraming {
    /// How `body` goes out.
    pub fn of(body: &impl OutgoingBody) -> Self {
        if let Some(bytes) = body.whole() {
            return BodyFraming::Whole((!bytes.is_empty()).then_some(bytes));
        }
        match body.size_hint().exact() {
            Some(0) => BodyFraming::Whole(None),
            Some(length) => BodyFraming::Declared(length),
            None => BodyFraming::Chunked,
        }
    }
}

/// Whether a client's header describes its own hop and its framing, and
/// so is never written into a request to an upstream (RFC 9110 §7.6.1):
/// the upstream side writes its own Host and framing. A proxy removes
/// these already; the wire does not rely on it.
fn is_framing_or_hop(name: &HeaderName) -> bool {
    *name == HOST
        || *name == CONTENT_LENGTH
        || *name == EXPECT
        || is_hop_by_hop(name.as_str().as_bytes())
        || name.as_str().starts_with("proxy-")
}

/// Writes the request line and headers: origin-form target, the
/// upstream's Host, and the body's framing.
fn encode_head(out: &mut Vec<u8>, parts: &Parts, host: &HeaderValue, framing: &BodyFraming) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if !is_framing_or_hop(name) {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    match framing {
        BodyFraming::Whole(bytes) => {
            let length = bytes.as_ref().map_or(0, Bytes::len);
            // A GET or the like without a body says nothing of one.
            if length > 0
                || !matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
                )
            {
                write_content_length(out, length as u64);
            }
        }
        BodyFraming::Declared(length) => write_content_length(out, *length),
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed answer head.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The fields passed on as they came.
    pub forwarded: Forwarded,
    framing: AnswerFraming,
    /// Whether the connection may carry another request after this answer.
    keep_alive: bool,
}

impl Head {
    /// The same answer on a connection that is not to be used again.
    pub fn closing(self) -> Self {
        Self {
            keep_alive: false,
            ..self
        }
    }
}

/// Parses a complete answer head off the front of `buffer`, skipping
/// informational (1xx) answers; `None` until the head is complete.
#[cfg(test)]
fn parse_head(
    buffer: &mut BytesMut,
    scratch: &mut HeadScratch,
    method: &Method,
) -> Result<Option<Head>, WireError> {
    parse_head_after(buffer, scratch, &ANSWER_FIELDS, method, &mut 0)
}

/// A user that reads an answer's content type and encoding and has a
/// namespace of its own, like a gateway.
#[cfg(test)]
const ANSWER_FIELDS: AnswerFields = AnswerFields {
    mapped: &["content-type", "content-encoding"],
    own: |name| {
        name.get(..9)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"x-abgate-"))
    },
};

/// The most informational answers one request may get before its answer:
/// past it, an upstream sending them without end is cut off.
const MAX_INTERIM_ANSWERS: u32 = 32;

/// [`parse_head`], with `interim` answers already skipped for this request.
fn parse_head_after(
    buffer: &mut BytesMut,
    scratch: &mut HeadScratch,
    answer_fields: &AnswerFields,
    method: &Method,
    interim: &mut u32,
) -> Result<Option<Head>, WireError> {
    loop {
        // Where each field sits in the head, to take it from the buffer
        // without copying once parsing lets go of it.
        let (length, code, minor, fields) = {
            // Left uninitialised: httparse writes the fields it finds.
            let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                buffer,
                &mut slots,
            );
            let length = match parsed {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD_BYTES => {
                    return Err(WireError::Invalid("head too large"))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(WireError::Invalid("too many header fields"))
                }
                Err(_) => return Err(WireError::Invalid("malformed head")),
            };
            let start = buffer.as_ptr() as usize;
            let mut fields = 0;
            for (header, span) in response.headers.iter().zip(scratch.spans.iter_mut()) {
                let name = header.name.as_ptr() as usize - start;
                let value = header.value.as_ptr() as usize - start;
                *span = (
                    name,
                    name + header.name.len(),
                    value,
                    value + header.value.len(),
                );
                fields += 1;
            }
            (
                length,
                response.code.unwrap_or(0),
                response.version.unwrap_or(1),
                fields,
            )
        };
        match code {
            101 => return Err(WireError::Invalid("switching protocols was not asked for")),
            100..=199 => {
                *interim += 1;
                if *interim > MAX_INTERIM_ANSWERS {
                    return Err(WireError::Invalid("too many informational answers"));
                }
                buffer.advance(length);
                continue;
            }
            _ => {}
        }
        let status = StatusCode::from_u16(code).map_err(|_| WireError::Invalid("status code"))?;
        let spans = scratch.spans.get(..fields).unwrap_or_default();
        let field_at = |&(name_start, name_end, value_start, value_end): &(_, _, _, _)| {
            let name = buffer.get(name_start..name_end).unwrap_or_default();
            let value = buffer.get(value_start..value_end).unwrap_or_default();
            (name, value)
        };
        // Names a `Connection` field lists are hop-by-hop too: an answer
        // with such a list (rare) is read whole into its map, and the
        // caller strips what the list names.
        let whole = spans
            .iter()
            .map(field_at)
            .any(|(name, value)| name.eq_ignore_ascii_case(b"connection") && lists_fields(value));
        // A map read whole holds slices of the head. Otherwise the head
        // is kept past this parse only if a value in the map is not one of
        // the common ones, which are shared constants.
        let head = if whole {
            buffer.split_to(length).freeze()
        } else {
            Bytes::new()
        };
        let bytes = if whole {
            &head[..]
        } else {
            buffer.get(..length).unwrap_or_default()
        };
        let mut uncommon: SmallVec<[(HeaderName, usize, usize); 2]> = SmallVec::new();
        let mut headers = scratch.headers(if whole { fields } else { READ_FIELDS });
        let mut framing = FramingFields::default();
        let mut date = false;
        // Without a body (RFC 9110 §6.4.1) the client's side adds no
        // length, so the upstream's is passed on; with one, the client's
        // side writes the body's own from its framing.
        let bodyless = *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let (spans, lines) = scratch.spans_and_forwarded(fields, length + 2 * fields);
        for &(name_start, name_end, value_start, value_end) in spans {
            let name = bytes.get(name_start..name_end);
            let value = bytes.get(value_start..value_end);
            let (Some(name), Some(value)) = (name, value) else {
                return Err(WireError::Invalid("header field"));
            };
            let field = AnswerField::of(name, answer_fields);
            note_framing(&mut framing, field, value);
            if whole || field.is_mapped() {
                // httparse has checked the name's and value's bytes.
                let name =
                    HeaderName::from_bytes(name).map_err(|_| WireError::Invalid("header name"))?;
                if whole {
                    headers.append(name, value_in(&head, value_start..value_end)?);
                } else if let Some(common) = common_value(value) {
                    headers.append(name, common);
                } else {
                    uncommon.push((name, value_start, value_end));
                }
            } else if field.is_passed_on(bodyless) {
                date |= field == AnswerField::Date;
                write_field(lines, name, value);
            }
        }
        let (framing_kind, keep_alive) = framing
            .framing(code, *method == Method::HEAD, minor)
            .map_err(WireError::Invalid)?;
        if !whole {
            if uncommon.is_empty() {
                buffer.advance(length);
            } else {
                let head = buffer.split_to(length).freeze();
                for (name, value_start, value_end) in uncommon {
                    headers.append(name, value_in(&head, value_start..value_end)?);
                }
            }
        }
        let forwarded = scratch.take_forwarded(date);
        let version = if minor == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        return Ok(Some(Head {
            status,
            version,
            headers,
            forwarded,
            framing: framing_kind,
            keep_alive,
        }));
    }
}

/// The header value at `span` of `head`, sharing its memory.
fn value_in(head: &Bytes, span: std::ops::Range<usize>) -> Result<HeaderValue, WireError> {
    if head.get(span.clone()).is_none() {
        return Err(WireError::Invalid("header value"));
    }
    HeaderValue::from_maybe_shared(head.slice(span)).map_err(|_| WireError::Invalid("header value"))
}

/// Values of the fields an answer's map holds common enough to keep as
/// constants, so that the map takes no slice of the answer's head (each
/// slice a reference count taken and given back).
fn common_value(value: &[u8]) -> Option<HeaderValue> {
    const COMMON: [HeaderValue; 6] = [
        HeaderValue::from_static("application/json"),
        HeaderValue::from_static("application/json; charset=utf-8"),
        HeaderValue::from_static("text/event-stream"),
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
        HeaderValue::from_static("gzip"),
        HeaderValue::from_static("identity"),
    ];
    COMMON
        .iter()
        .find(|common| common.as_bytes() == value)
        .cloned()
}

/// How many fields of an answer its map usually holds: those the caller
/// reads ([`AnswerFields::mapped`]).
const READ_FIELDS: usize = 4;

/// What an answer's header field is to the caller, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerField {
    /// Read by the caller ([`AnswerFields::mapped`]), kept in the
    /// answer's map; its length, noted for the framing.
    Read { content_length: bool },
    /// In the caller's own namespace ([`AnswerFields::own`]): on an
    /// answer, its fields are the caller's alone.
    Own,
    /// `Date`: passed on, and the client's side then adds none.
    Date,
    /// Describes the upstream's connection (RFC 9110 §7.6.1): not passed
    /// on. Two of them frame the answer or end the connection.
    HopByHop(Option<Framer>),
    /// Anything else: passed on as it came.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framer {
    Connection,
    TransferEncoding,
}

impl AnswerField {
    fn of(name: &[u8], fields: &AnswerFields) -> Self {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        // The caller's fields first: a content type is in almost every
        // answer. None of them frames the answer (`Pool::new` sees to it).
        if fields.is_mapped(name) {
            AnswerField::Read {
                content_length: false,
            }
        } else if is("content-length") {
            AnswerField::Read {
                content_length: true,
            }
        } else if is("date") {
            AnswerField::Date
        } else if is("connection") {
            AnswerField::HopByHop(Some(Framer::Connection))
        } else if is("transfer-encoding") {
            AnswerField::HopByHop(Some(Framer::TransferEncoding))
        } else if is_hop_by_hop(name) {
            AnswerField::HopByHop(None)
        } else if (fields.own)(name) {
            AnswerField::Own
        } else {
            AnswerField::Other
        }
    }

    fn is_mapped(self) -> bool {
        matches!(
            self,
            AnswerField::Read {
                content_length: false
            }
        )
    }

    /// Whether the field goes to the client as it came: a length only
    /// when the answer has no body to frame.
    fn is_passed_on(self, bodyless: bool) -> bool {
        match self {
            AnswerField::Date | AnswerField::Other => true,
            AnswerField::Read { content_length } => content_length && bodyless,
            AnswerField::Own | AnswerField::HopByHop(_) => false,
        }
    }
}

/// Whether a `Connection` value lists anything but its options (`close`,
/// `keep-alive`): the names of more hop-by-hop fields.
fn lists_fields(value: &[u8]) -> bool {
    value.split(|&byte| byte == b',').any(|token| {
        let token = token.trim_ascii();
        !token.is_empty()
            && !token.eq_ignore_ascii_case(b"close")
            && !token.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// Notes `field` in `framing` if it is one that frames the answer, told
/// apart by its kind rather than by its name again.
fn note_framing<'a>(framing: &mut FramingFields<'a>, field: AnswerField, value: &'a [u8]) {
    match field {
        AnswerField::Read {
            content_length: true,
        } => framing.content_length(value),
        AnswerField::HopByHop(Some(Framer::TransferEncoding)) => framing.transfer_encoding(value),
        AnswerField::HopByHop(Some(Framer::Connection)) => framing.connection(value),
        _ => {}
    }
}

/// The answer for `head`, its body read from `connection`, which goes
/// back to `pool` when the body has been read to its end.
pub(crate) fn response(
    head: Head,
    connection: Box<Connection>,
    pool: Arc<Pool>,
) -> Response<ResponseBody> {
    let decoder = match head.framing {
        AnswerFraming::Length(length) => Decoder::Length(length),
        AnswerFraming::Chunked => Decoder::Chunked(Chunked::START),
        AnswerFraming::UntilClose => Decoder::UntilClose,
    };
    let mut body = ResponseBody {
        connection: Some(connection),
        pool: head.keep_alive.then_some(pool),
        decoder,
        forwarded: head.forwarded,
    };
    body.settle();
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    response
}

/// An answer's body, read from the upstream's connection as the client's
/// side asks for it.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once the body has ended or failed.
    connection: Option<Box<Connection>>,
    /// Where the connection goes at the end, if it can be reused.
    pool: Option<Arc<Pool>>,
    decoder: Decoder,
    /// The answer's fields passed on as they came, for the client's side
    /// to write with the head.
    forwarded: Forwarded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl ResponseBody {
    /// The answer's fields passed on as they came (not in its map).
    pub fn forwarded(&self) -> &Forwarded {
        &self.forwarded
    }

    /// Decodes one step from what has been read.
    fn step(&mut self) -> Result<Step, WireError> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(Step::End);
        };
        let buffer = &mut connection.read;
        match &mut self.decoder {
            Decoder::Length(left) => Ok(step_length(buffer, left)),
            Decoder::Chunked(state) => state.step(buffer).map_err(WireError::Invalid),
            Decoder::UntilClose if buffer.is_empty() => Ok(Step::More),
            Decoder::UntilClose => Ok(Step::Data(buffer.split().freeze())),
        }
    }

    /// Ends the body if what is buffered already completes it, handing
    /// the connection back: an answer's end is known as soon as its last
    /// byte is, not at the next read.
    fn settle(&mut self) {
        let complete = match &mut self.decoder {
            Decoder::Length(left) => *left == 0,
            Decoder::Chunked(state) => match self.connection.as_mut() {
                Some(connection) => {
                    state.advance(&mut connection.read).is_ok() && *state == Chunked::Done
                }
                None => false,
            },
            Decoder::UntilClose => false,
        };
        if complete {
            self.finish();
        }
    }

    /// The body has ended: its connection goes back to the pool if it can
    /// carry another request and nothing unasked-for followed the answer.
    fn finish(&mut self) {
        let connection = self.connection.take();
        if let (Some(connection), Some(pool)) = (connection, self.pool.take()) {
            if connection.read.is_empty() {
                pool.checkin(connection);
            }
        }
        self.decoder = Decoder::Length(0);
    }

    fn fail(&mut self, error: WireError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.connection = None;
        self.pool = None;
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.step() {
                Ok(Step::Data(data)) => {
                    this.settle();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(error) => return this.fail(error),
            }
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if this.decoder == Decoder::UntilClose => {
                    // The close is this body's end. Such an answer never
                    // leaves its connection reusable, so none goes back.
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(WireError::Closed),
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() && self.decoder == Decoder::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Chunked(_) | Decoder::UntilClose => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::body::LocalBody as Body;

    fn head(wire: &str, method: Method) -> Result<Option<Head>, WireError> {
        parse_head(
            &mut BytesMut::from(wire),
            &mut HeadScratch::boxed(),
            &method,
        )
    }

    #[test]
    fn heads_are_parsed_with_their_framing_and_reuse() {
        let ok = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx-a: b\r\n\r\n",
            Method::POST,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ok.status, StatusCode::OK);
        // The length frames the body; the client's side writes its own.
        assert!(ok.headers.is_empty());
        assert_eq!(ok.forwarded.lines, "x-a: b\r\n");
        assert_eq!(
            (ok.framing, ok.keep_alive),
            (AnswerFraming::Length(12), true)
        );

        let cases = [
            // Chunked wins over a length, and the connection is not kept.
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::POST,
                AnswerFraming::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                Method::POST,
                AnswerFraming::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::POST,
                AnswerFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                Method::POST,
                AnswerFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(5),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::HEAD,
                AnswerFraming::Length(0),
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(0),
                true,
            ),
            // An informational answer first is skipped, its fields too.
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(0),
                true,
            ),
            (
                "HTTP/1.1 103 Early Hints\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n\
                 HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(2),
                true,
            ),
            // Names in any case; the last coding decides.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: Keep-Alive\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(7),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nCONNECTION: Close\r\n\r\n",
                Method::POST,
                AnswerFraming::Length(7),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Method::POST,
                AnswerFraming::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::POST,
                AnswerFraming::UntilClose,
                false,
            ),
            // Chunks frame the answer even beside a length that is not one.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: nope\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::POST,
                AnswerFraming::Chunked,
                false,
            ),
        ];
        for (wire, method, framing, keep_alive) in cases {
            let parsed = head(wire, method).unwrap().unwrap();
            assert_eq!(
                (parsed.framing, parsed.keep_alive),
                (framing, keep_alive),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn fields_the_caller_reads_are_mapped_its_own_dropped_and_the_rest_passed_on_as_they_came() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Thu, 26 Nov 2026 08:00:00 GMT\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nX-Abgate-Variant: forged\r\nSet-Cookie: a=1\r\n\
             set-cookie: b=2\r\nContent-Encoding: identity\r\nTrailer: x\r\nUpgrade: h2c\r\n\
             x-ratelimit-remaining:7\r\n\r\n",
            Method::POST,
        )
        .unwrap()
        .unwrap();
        let mapped: Vec<(&str, &str)> = parsed
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            mapped,
            [
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
            ]
        );
        assert_eq!(
            parsed.forwarded.lines,
            "Server: up\r\nDate: Thu, 26 Nov 2026 08:00:00 GMT\r\nSet-Cookie: a=1\r\n\
             set-cookie: b=2\r\nx-ratelimit-remaining: 7\r\n"
        );
        assert!(parsed.forwarded.date);
        let fields: Vec<(&[u8], &[u8])> = parsed.forwarded.fields().collect();
        assert_eq!(
            fields[1],
            (&b"Date"[..], &b"Thu, 26 Nov 2026 08:00:00 GMT"[..])
        );
        assert_eq!(fields[4], (&b"x-ratelimit-remaining"[..], &b"7"[..]));
        let mut map = HeaderMap::new();
        parsed.forwarded.add_to(&mut map);
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert_eq!(map.len(), 5);

        // A value that is not one of the common ones is a slice of the
        // head, which outlives the buffer it was read into.
        let mut buffer = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; x=1\r\nContent-Encoding: gzip\r\n\
             Content-Length: 0\r\n\r\nnext",
        );
        let parsed = parse_head(&mut buffer, &mut HeadScratch::boxed(), &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(&buffer[..], b"next", "the head is taken off the buffer");
        buffer.clear();
        buffer.extend_from_slice(b"overwritten, every byte of it");
        assert_eq!(parsed.headers["content-type"], "text/plain; x=1");
        assert_eq!(parsed.headers["content-encoding"], "gzip");
        // With common values only, too.
        let mut buffer = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\nnext",
        );
        let parsed = parse_head(&mut buffer, &mut HeadScratch::boxed(), &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(&buffer[..], b"next", "the head is taken off the buffer");
        assert_eq!(parsed.headers["content-type"], "application/json");

        // A `Connection` that names more hop-by-hop fields: the whole head
        // goes to the map, for the caller to strip what it names.
        let listing = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nServer: up\r\n\
             Content-Length: 0\r\n\r\n",
            Method::POST,
        )
        .unwrap()
        .unwrap();
        assert_eq!(listing.headers.len(), 4);
        assert!(listing.forwarded.lines.is_empty());
        assert!(!listing.forwarded.date);
        assert!(!listing.keep_alive);
    }

    #[test]
    fn incomplete_and_invalid_heads() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
            .unwrap()
            .is_none());
        for wire in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 OK\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                matches!(head(wire, Method::GET), Err(WireError::Invalid(_))),
                "{wire:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let wire = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            head(&wire, Method::GET),
            Err(WireError::Invalid(_))
        ));
        let endless = format!("HTTP/1.1 200 OK\r\nx-long: {}", "v".repeat(MAX_HEAD_BYTES));
        assert!(matches!(
            head(&endless, Method::GET),
            Err(WireError::Invalid(_))
        ));
    }

    /// What `send_body` makes of `pieces` sent as `framing`: the bytes
    /// written, or that the exchange failed.
    async fn sent(framing: BodyFraming, pieces: &[&'static [u8]]) -> Result<Vec<u8>, String> {
        let (sender, receiver) = tokio::sync::mpsc::channel(pieces.len().max(1));
        for piece in pieces {
            sender.send(Bytes::from_static(piece)).await.unwrap();
        }
        drop(sender);
        let mut out = Vec::new();
        let mut buffer = Vec::new();
        send_body(&mut out, &mut buffer, framing, Body::Channel(receiver))
            .await
            .map(|()| out)
            .map_err(|err| err.to_string())
    }

    #[tokio::test]
    async fn a_streamed_body_is_sent_exactly_as_long_as_its_head_says() {
        assert_eq!(
            sent(BodyFraming::Declared(5), &[b"he", b"llo"]).await,
            Ok(b"hello".to_vec())
        );
        // More than declared: the rest would be read upstream as a second
        // request. Fewer: the upstream would wait for the rest, or read
        // the next request as it. Either fails the exchange.
        let longer: &[&'static [u8]] = &[b"hello", b"GET / HTTP/1.1"];
        let shorter: &[&'static [u8]] = &[b"hel"];
        for pieces in [longer, shorter] {
            let result = sent(BodyFraming::Declared(5), pieces).await;
            assert!(
                result
                    .as_ref()
                    .is_err_and(|err| err.contains("declared length")),
                "{pieces:?}: {result:?}"
            );
        }
        assert_eq!(
            sent(BodyFraming::Chunked, &[b"hello", b"!"]).await,
            Ok(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n".to_vec())
        );
    }

    #[test]
    fn request_heads_carry_the_upstreams_host_and_the_bodys_framing() {
        let request = http::Request::post("http://upstream/v1/chat?x=1")
            .header("host", "client.example")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .header("connection", "keep-alive, x-hop")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("trailer", "x-t")
            .header("upgrade", "h2c")
            .header("proxy-authorization", "Basic x")
            .header("proxy-connection", "keep-alive")
            .header("expect", "100-continue")
            .header("x-keep", "yes")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let host = HeaderValue::from_static("127.0.0.1:9");
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &parts,
            &host,
            &BodyFraming::Whole(Some(Bytes::from_static(b"{}"))),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-keep: yes\r\ncontent-length: 2\r\n\r\n"
        );
        let mut out = Vec::new();
        // A streamed body is framed by its own size, never the client's
        // fields: the length the client declared is not the one sent.
        encode_head(&mut out, &parts, &host, &BodyFraming::Declared(7));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-keep: yes\r\ncontent-length: 7\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_head(&mut out, &parts, &host, &BodyFraming::Chunked);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-keep: yes\r\ntransfer-encoding: chunked\r\n\r\n"
        );

        let (parts, ()) = http::Request::get("/models").body(()).unwrap().into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts, &host, &BodyFraming::Whole(None));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /models HTTP/1.1\r\nhost: 127.0.0.1:9\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_large_body_is_sent_whole_and_its_buffers_not_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let body = Bytes::from(vec![b'x'; 4 * 1024 * 1024]);
        let head_value = "v".repeat(20 * 1024);
        let upstream = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.unwrap();
            received
        });
        let stream = TcpStream::connect(address).await.unwrap();
        let mut connection = Connection::new(stream, ANSWER_FIELDS);
        let (parts, ()) = http::Request::post("/v1/chat/completions")
            .header("x-large", head_value.as_str())
            .body(())
            .unwrap()
            .into_parts();
        let host = HeaderValue::from_static("upstream");
        let mut framing = BodyFraming::Whole(Some(body.clone()));
        connection
            .write_head(&parts, &host, &mut framing)
            .await
            .map_err(|failed| failed.error)
            .unwrap();
        assert!(connection.write.capacity() <= KEPT_WRITE_BUFFER);
        let early = connection
            .write_body(framing, Body::empty(), &Method::POST)
            .await
            .unwrap();
        assert!(early.is_none());
        drop(connection);
        let received = upstream.await.unwrap();
        let end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&received[..end]);
        assert!(
            head.contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        assert_eq!(&received[end..], &body[..]);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_from_an_upstream_are_an_answer_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            prefix in proptest::prelude::any::<bool>(),
        ) {
            // Half the cases start like an answer, to get past the status line.
            let wire = if prefix {
                [b"HTTP/1.1 200 OK\r\n".as_slice(), &bytes].concat()
            } else {
                bytes.clone()
            };
            let mut buffer = BytesMut::from(&wire[..]);
            if let Ok(Some(head)) = parse_head(&mut buffer, &mut HeadScratch::boxed(), &Method::POST) {
                // What is left is what followed the head, and a body read
                // to the close never leaves its connection reusable.
                proptest::prop_assert!(wire.ends_with(&buffer));
                proptest::prop_assert!(head.framing != AnswerFraming::UntilClose || !head.keep_alive);
            }
        }
    }
}
