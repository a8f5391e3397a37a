//! HTTP/1.1 from clients, spoken by the task that serves the connection.
//!
//! A request's head is parsed with httparse and copied once, with a body
//! that came along with it, into a buffer its header values and path are
//! slices of; the read buffer stays the connection's, reused for every
//! request. A body that did not come whole with its head is read off the
//! socket as the handler asks for it. The answer's head is written from
//! the response's parts, with its first piece of body in the same system
//! call, and each later piece is written the moment the body yields it:
//! nothing is held back, so streams pass through as they come.
//!
//! While a handler runs, the connection is watched: a client that closes
//! it drops the handler's future, as hyper does. Keep-alive, pipelining,
//! HTTP/1.0, `Expect: 100-continue`, chunked request bodies and the limits
//! in [`super::ConnectionLimits`] are handled here.

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::{
    AnswerBody, BoxError, Closing, Handler, Http2, RequestBody, WriteLimits, HEADER_READ_TIMEOUT,
};
use crate::framing::{
    has_token, poll_deadline, poll_fill, request_content_length, step_length, Chunked, HeadScratch,
    Spans, Step, MAX_HEADERS, READ_BUFFER,
};

/// A read buffer grown past this for one large request is let go after it.
const KEPT_READ_BUFFER: usize = 64 * 1024;
/// A piece of body up to this size is copied behind its head or chunk
/// header and the two go out in one plain write; a larger one goes in a
/// vectored write, uncopied.
const COPIED_BODY: usize = 4 * 1024;
/// A write buffer grown past this is let go after the answer.
const KEPT_WRITE_BUFFER: usize = 8 * 1024;
/// Heads (with a body that came whole) up to this size are copied into the
/// connection's own buffer for copies; larger ones get an allocation of
/// their own, so that the buffer a connection keeps stays small.
const KEPT_COPIES: usize = 16 * 1024;
/// The buffer for copies starts this large: a usual head and body.
const COPIES_BUFFER: usize = 1024;
/// How long, and how much of a request body left unread, a connection
/// closed after its answer keeps reading and discarding, so that the
/// client reads the answer before the close resets the connection.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// One client connection's state between requests.
pub(super) struct Connection<H> {
    handler: Arc<H>,
    peer: SocketAddr,
    /// `None` while a request body being streamed holds it.
    reader: Option<Reader>,
    writer: OwnedWriteHalf,
    write: Vec<u8>,
    /// Where the current head's fields sit: kept, not rebuilt per request.
    head: Box<HeadScratch>,
    /// The header names this client sends, parsed once.
    names: Names,
    /// Where heads are copied to: each request's copy is split off it, and
    /// once the request has let go of its copy (its fields are dropped when
    /// they have been sent on) the next copy reuses the same memory, so that
    /// in steady state a head costs a copy and no allocation.
    copies: BytesMut,
    head_bytes: usize,
    /// Each write's time for an answer that does not set its own.
    client_write: Duration,
    closing: Closing,
}

/// The header names a connection's requests carry, parsed the first time
/// and then reused: a client sends the same few names with every request,
/// and a known name costs a comparison instead of a parse (and, for names
/// outside the standard set, an allocation).
#[derive(Default)]
struct Names(Vec<HeaderName>);

impl Names {
    /// Enough for any client's usual set; past it, names are parsed.
    const MOST: usize = 24;

    fn get(&mut self, raw: &[u8]) -> Option<HeaderName> {
        // Names are kept lowercase: a client that sends them so (HTTP/2
        // requires it, most HTTP/1.1 clients do it) finds them by bytes.
        let known = self.0.iter().find(|name| name.as_str().as_bytes() == raw);
        if let Some(name) = known {
            return Some(name.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        if self.0.len() < Self::MOST && raw == name.as_str().as_bytes() {
            self.0.push(name.clone());
        }
        Some(name)
    }
}

/// The socket's read side and what has been read from it.
struct Reader {
    half: OwnedReadHalf,
    buffer: BytesMut,
}

impl Reader {
    /// Reads what the socket has into the buffer: 0 at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.half, &mut self.buffer, cx)
    }

    /// Pending while the client stays; ready once it has closed the
    /// connection (or it failed). What it sends meanwhile (a pipelined
    /// request) is kept, up to `limit` bytes; past that it is no longer
    /// read, and so the client no longer watched.
    fn poll_gone(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        while self.buffer.len() < limit {
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
        Poll::Pending
    }
}

/// Why a request head is refused before any handler sees it. Each is
/// answered with a JSON error in the shape of the gateway's others, and
/// the connection closed: after a head whose framing cannot be trusted,
/// nothing more on the connection can be (RFC 9112 §6.3, §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Over the size or field-count limit: 431.
    TooLarge,
    /// Not an HTTP/1 request head (httparse refused it, or its method or
    /// target do not parse): 400.
    Malformed,
    /// A body's framing that cannot be trusted: Content-Length with
    /// Transfer-Encoding, an invalid or conflicting length, a coding list
    /// that does not end in one `chunked`, chunks from HTTP/1.0: 400.
    Framing,
    /// Codings before `chunked`, which the gateway does not decode: 501.
    Coding,
    /// HTTP/1.1 without Host, or any request with two (RFC 9112 §3.2): 400.
    Host,
}

impl Refusal {
    /// The status line's status, the error's message and its `code`.
    fn parts(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Refusal::TooLarge => (
                "431 Request Header Fields Too Large",
                "the request head is over the gateway's size or field-count limit",
                "headers_too_large",
            ),
            Refusal::Malformed => (
                "400 Bad Request",
                "the request is not a valid HTTP/1.1 request head",
                "malformed_request",
            ),
            Refusal::Framing => (
                "400 Bad Request",
                "the request body's framing is ambiguous or invalid: Content-Length with \
                 Transfer-Encoding, an invalid Content-Length, or a Transfer-Encoding that \
                 does not end in one chunked",
                "invalid_framing",
            ),
            Refusal::Coding => (
                "501 Not Implemented",
                "chunked is the only transfer coding the gateway accepts",
                "unsupported_transfer_coding",
            ),
            Refusal::Host => (
                "400 Bad Request",
                "an HTTP/1.1 request needs exactly one Host header",
                "invalid_host",
            ),
        }
    }

    /// The whole answer: a JSON error (OpenAI's `{"error": {...}}` with
    /// Anthropic's top-level `"type": "error"`) and `connection: close`.
    fn answer(self) -> Vec<u8> {
        let (status, message, code) = self.parts();
        let kind = if status.starts_with('5') {
            "api_error"
        } else {
            "invalid_request_error"
        };
        let body = format!(
            r#"{{"type":"error","error":{{"message":"{message}","type":"{kind}","param":null,"code":"{code}"}}}}"#
        );
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// How a request's body follows its head (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    Length(u64),
    Chunked,
}

/// What the connection must know of a request to answer it.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    /// The request was a HEAD: the answer has no body.
    head_method: bool,
    version: Version,
    keep_alive: bool,
}

/// A parsed head: where its parts sit in the read buffer.
struct Parsed {
    length: usize,
    method: Method,
    version: Version,
    target: (usize, usize),
    fields: usize,
    framing: RequestFraming,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parses a complete request head off the front of `buffer`, noting where
/// its fields sit in `spans`; `None` until it is complete.
fn parse(buffer: &[u8], head_bytes: usize, spans: &mut Spans) -> Result<Option<Parsed>, Refusal> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buffer,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) if length > head_bytes => {
            return Err(Refusal::TooLarge)
        }
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() >= head_bytes => {
            return Err(Refusal::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(_) => return Err(Refusal::Malformed),
    };
    let start = buffer.as_ptr() as usize;
    let offset = |part: &[u8]| part.as_ptr() as usize - start;
    let method = request.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Malformed)?;
    let path = request.path.unwrap_or_default();
    let target = (
        offset(path.as_bytes()),
        offset(path.as_bytes()) + path.len(),
    );
    let version = if request.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut facts = Facts::default();
    let mut fields = 0;
    for (header, span) in request.headers.iter().zip(spans.iter_mut()) {
        let name = offset(header.name.as_bytes());
        let value = offset(header.value);
        *span = (
            name,
            name + header.name.len(),
            value,
            value + header.value.len(),
        );
        facts.note(header.name.as_bytes(), header.value)?;
        fields += 1;
    }
    let framing = facts.framing(version)?;
    let keep_alive = !facts.close && (version == Version::HTTP_11 || facts.keep_alive);
    Ok(Some(Parsed {
        length,
        method,
        version,
        target,
        fields,
        framing,
        keep_alive,
        expect_continue: facts.expect_continue && version == Version::HTTP_11,
    }))
}

/// What the connection-level headers of a request say.
#[derive(Default)]
struct Facts {
    length: Option<u64>,
    /// What the Transfer-Encoding fields, read as one list, say.
    codings: Codings,
    hosts: u8,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

/// A request's transfer codings, read item by item across all of its
/// Transfer-Encoding fields (RFC 9112 §6.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Codings {
    /// No Transfer-Encoding field.
    #[default]
    Absent,
    /// Fields, but no `chunked` in them yet: this many other codings.
    Before(u8),
    /// `chunked` last, after this many other codings.
    Chunked(u8),
    /// A coding after `chunked`, or `chunked` twice, or an empty list:
    /// the body's end cannot be known.
    Unframed,
}

impl Codings {
    fn note(self, value: &[u8]) -> Codings {
        let mut codings = match self {
            Codings::Absent => Codings::Before(0),
            known => known,
        };
        for item in value.split(|byte| *byte == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                continue; // empty list elements are allowed (RFC 9110 §5.6.1)
            }
            let chunked = item.eq_ignore_ascii_case(b"chunked");
            codings = match (codings, chunked) {
                (Codings::Before(before), true) => Codings::Chunked(before),
                (Codings::Before(before), false) => Codings::Before(before.saturating_add(1)),
                _ => Codings::Unframed,
            };
        }
        codings
    }
}

impl Facts {
    fn note(&mut self, name: &[u8], value: &[u8]) -> Result<(), Refusal> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let length =
                request_content_length(value, self.length).map_err(|_| Refusal::Framing)?;
            self.length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.codings = self.codings.note(value);
        } else if name.eq_ignore_ascii_case(b"host") {
            self.hosts = self.hosts.saturating_add(1);
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.close |= has_token(value, b"close");
            self.keep_alive |= has_token(value, b"keep-alive");
        } else if name.eq_ignore_ascii_case(b"expect") {
            self.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }

    /// The body's framing, decided once, here, for both of the gateway's
    /// sides (RFC 9112 §6.3): the upstream side frames from the body it
    /// is given, never from these fields. Whatever two parsers could read
    /// two ways is refused, as nginx does; hyper instead drops the length
    /// and keeps the chunks.
    fn framing(&self, version: Version) -> Result<RequestFraming, Refusal> {
        if self.hosts > 1 || (self.hosts == 0 && version == Version::HTTP_11) {
            return Err(Refusal::Host);
        }
        match (self.codings, self.length) {
            (Codings::Absent, length) => Ok(RequestFraming::Length(length.unwrap_or(0))),
            // Both: one hop reads the length, the next the chunks.
            (_, Some(_)) => Err(Refusal::Framing),
            // Chunks from an HTTP/1.0 client cannot be trusted to end
            // where a 1.1 hop reads their end (RFC 9112 §6.1).
            (Codings::Chunked(0), None) if version == Version::HTTP_11 => {
                Ok(RequestFraming::Chunked)
            }
            (Codings::Chunked(_), None) if version == Version::HTTP_11 => Err(Refusal::Coding),
            _ => Err(Refusal::Framing),
        }
    }
}

/// Builds the request from its head, copied out of the read buffer; its
/// body is set by the caller.
fn request_of(
    parsed: &Parsed,
    scratch: &mut HeadScratch,
    names: &mut Names,
    head: &Bytes,
) -> Result<Request<RequestBody>, Refusal> {
    let (start, end) = parsed.target;
    let uri = Uri::from_maybe_shared(head.slice(start..end)).map_err(|_| Refusal::Malformed)?;
    let mut headers = scratch.headers(parsed.fields);
    for &(name_start, name_end, value_start, value_end) in scratch.spans.iter().take(parsed.fields)
    {
        let name = head
            .get(name_start..name_end)
            .and_then(|name| names.get(name))
            .ok_or(Refusal::Malformed)?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| Refusal::Malformed)?;
        headers.append(name, value);
    }
    let mut request = Request::new(RequestBody::Full(None));
    *request.method_mut() = parsed.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parsed.version;
    *request.headers_mut() = headers;
    Ok(request)
}

impl<H: Handler> Connection<H> {
    pub(super) fn new(
        stream: TcpStream,
        buffer: BytesMut,
        handler: Arc<H>,
        peer: SocketAddr,
        head_bytes: usize,
        client_write: Duration,
        closing: Closing,
    ) -> Self {
        let (half, writer) = stream.into_split();
        Self {
            handler,
            peer,
            reader: Some(Reader { half, buffer }),
            writer,
            write: Vec::with_capacity(1024),
            head: HeadScratch::boxed(),
            names: Names::default(),
            copies: BytesMut::new(),
            head_bytes,
            client_write,
            closing,
        }
    }

    /// Serves requests until the client leaves, a request or answer ends
    /// the connection, or the gateway closes it. A connection that opens
    /// with HTTP/2's preface is handed to hyper.
    pub(super) async fn serve(mut self, started: Instant, http2: Http2) {
        // One timer for the connection's life: it is moved on only when it
        // fires, not for every request.
        let mut timer = pin!(tokio::time::sleep_until(started + HEADER_READ_TIMEOUT));
        let mut first = true;
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return;
            };
            let next = next_head(
                reader,
                self.head_bytes,
                &mut self.head.spans,
                &mut self.closing,
                timer.as_mut(),
                first,
            );
            let parsed = match next.await {
                Ok(Next::Request(parsed)) => parsed,
                Ok(Next::Http2) => return self.into_http2(http2).await,
                Ok(Next::Done) => return,
                Err(refusal) => return self.refuse(refusal).await,
            };
            first = false;
            match self.exchange(parsed).await {
                After::KeepAlive => self.tidy(),
                After::Close => {
                    let _ = self.writer.shutdown().await;
                    return;
                }
                After::Linger => return self.linger().await,
                After::Refuse(refusal) => return self.refuse(refusal).await,
                After::Drop => return,
            }
        }
    }

    /// Answers a head refused before any handler saw it, and closes.
    async fn refuse(mut self, refusal: Refusal) {
        let _ = self.writer.write_all(&refusal.answer()).await;
        self.linger().await;
    }

    /// Serves one request, and says what becomes of the connection.
    async fn exchange(&mut self, parsed: Parsed) -> After {
        let Some(reader) = self.reader.as_mut() else {
            return After::Drop;
        };
        let buffered = reader.buffer.len() - parsed.length;
        let whole = match parsed.framing {
            RequestFraming::Length(length) => usize::try_from(length)
                .ok()
                .filter(|length| *length <= buffered),
            RequestFraming::Chunked => None,
        };
        // The head, and a body that came whole with it, are copied out:
        // the read buffer stays the connection's alone, to be reused.
        let copied = parsed.length + whole.unwrap_or(0);
        let source = reader.buffer.get(..copied).unwrap_or_default();
        let head = if copied <= KEPT_COPIES {
            if self.copies.capacity() == 0 {
                self.copies.reserve(copied.max(COPIES_BUFFER));
            }
            self.copies.extend_from_slice(source);
            self.copies.split_to(copied).freeze()
        } else {
            Bytes::copy_from_slice(source)
        };
        reader.buffer.advance(copied);
        let mut request = match request_of(&parsed, &mut self.head, &mut self.names, &head) {
            Ok(request) => request,
            Err(refusal) => return After::Refuse(refusal),
        };
        let mut streamed = None;
        *request.body_mut() = match (whole, parsed.framing) {
            (Some(0), _) => RequestBody::Full(None),
            (Some(_), _) => RequestBody::Full(Some(head.slice(parsed.length..))),
            (None, framing) => {
                let decoder = match framing {
                    RequestFraming::Length(length) => Decoder::Length(length),
                    RequestFraming::Chunked => Decoder::Chunked(Chunked::START),
                };
                let expect_continue = parsed.expect_continue && reader.buffer.is_empty();
                let shared = Arc::new(Mutex::new(Streamed {
                    reader: self.reader.take(),
                    decoder,
                    done: false,
                    interim: if expect_continue {
                        Interim::Expected
                    } else {
                        Interim::None
                    },
                    connection: None,
                }));
                streamed = Some(shared.clone());
                RequestBody::Http1(Http1Body { shared })
            }
        };
        drop(head);
        let exchange = Exchange {
            head_method: parsed.method == Method::HEAD,
            version: parsed.version,
            keep_alive: parsed.keep_alive,
        };
        let Some(response) = self.respond(request, &streamed).await else {
            return After::Drop;
        };
        let finished = self.reclaim(&streamed, false);
        let keep_alive = exchange.keep_alive && finished && !self.closing.is_closing();
        let Ok(kept) = self.write_response(response, exchange, keep_alive).await else {
            return After::Drop;
        };
        // A body still being read gives the reader back now, at the latest.
        let finished = self.reclaim(&streamed, true);
        match (kept, finished) {
            (true, _) => After::KeepAlive,
            (false, true) => After::Close,
            (false, false) => After::Linger,
        }
    }

    /// Swaps this connection for one served by hyper's HTTP/2, with what
    /// has been read so far read again first.
    async fn into_http2(mut self, http2: Http2) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        let Ok(stream) = reader.half.reunite(self.writer) else {
            return;
        };
        let prefix = reader.buffer.freeze();
        super::serve_http2(
            &http2,
            stream,
            prefix,
            self.handler,
            self.peer,
            self.closing,
        )
        .await;
    }

    /// Runs the handler until it answers, watching the client meanwhile:
    /// `None` if it left first. Sends the interim 100 when a body that
    /// expects it is first read.
    async fn respond(
        &mut self,
        request: Request<RequestBody>,
        streamed: &Option<Arc<Mutex<Streamed>>>,
    ) -> Option<Response<H::Answer>> {
        let mut service = pin!(self.handler.clone().handle(request, self.peer));
        let head_bytes = self.head_bytes;
        let mut interim_sent = 0;
        poll_fn(|cx| {
            if let Poll::Ready(response) = service.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if self.reader.is_none() {
                if let Some(shared) = streamed {
                    let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    // A body read by another task (a TLS upstream's
                    // connection) wakes this one to send the 100.
                    let registered = state
                        .connection
                        .as_ref()
                        .is_some_and(|waker| waker.will_wake(cx.waker()));
                    if state.interim == Interim::Expected && !registered {
                        state.connection = Some(cx.waker().clone());
                    }
                    if state.interim == Interim::Wanted {
                        while interim_sent < CONTINUE.len() {
                            let rest = CONTINUE.get(interim_sent..).unwrap_or_default();
                            match Pin::new(&mut self.writer).poll_write(cx, rest) {
                                Poll::Ready(Ok(n)) if n > 0 => interim_sent += n,
                                Poll::Ready(_) => return Poll::Ready(None),
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                        state.interim = Interim::Sent;
                    }
                }
            }
            // Read to its end: the connection watches the client again.
            self.reclaim(streamed, false);
            match self.reader.as_mut() {
                Some(reader) => reader.poll_gone(cx, head_bytes).map(|()| None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Takes the reader back from a streamed body once it has been read
    /// to its end, or with `unread_too` in any case; whether the request
    /// has been read whole.
    fn reclaim(&mut self, streamed: &Option<Arc<Mutex<Streamed>>>, unread_too: bool) -> bool {
        let Some(shared) = streamed else {
            return true;
        };
        let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if (state.done || unread_too) && self.reader.is_none() {
            self.reader = state.reader.take();
        }
        state.done
    }

    /// Writes the answer: `Ok(keep_alive)` once it is sent whole, `Err` if
    /// the client or the body failed midway.
    async fn write_response(
        &mut self,
        response: Response<H::Answer>,
        exchange: Exchange,
        keep_alive: bool,
    ) -> Result<bool, ()> {
        let (parts, mut body) = response.into_parts();
        let clock = WriteClock::new(body.write_limits(), self.client_write);
        let written = self
            .write_answer(parts, &mut body, &clock, exchange, keep_alive)
            .await;
        if clock.timed_out() {
            body.cut_off();
        }
        written
    }

    /// [`Self::write_response`] of the answer's head and body, each write
    /// bounded by `clock`.
    async fn write_answer(
        &mut self,
        parts: http::response::Parts,
        body: &mut H::Answer,
        clock: &WriteClock,
        exchange: Exchange,
        mut keep_alive: bool,
    ) -> Result<bool, ()> {
        let status = parts.status;
        let bodyless = exchange.head_method
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        let framing = if bodyless {
            Outgoing::Length(0)
        } else if let Some(length) = declared {
            Outgoing::Length(length)
        } else if let Some(length) = body.size_hint().exact() {
            Outgoing::Length(length)
        } else if exchange.version == Version::HTTP_11 {
            Outgoing::Chunked
        } else {
            keep_alive = false;
            Outgoing::UntilClose
        };
        keep_alive &= !parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|value| has_token(value.as_bytes(), b"close"));
        self.write.clear();
        encode_head(
            &mut self.write,
            Fields {
                headers: &parts.headers,
                body,
            },
            status,
            exchange.version,
            framing,
            declared.is_none() && !bodyless,
            keep_alive,
        );
        self.head.recycle(parts.headers);
        if bodyless {
            write_all(&mut self.writer, clock, &self.write, &[])
                .await
                .map_err(|_| ())?;
            return Ok(keep_alive);
        }
        let mut left = match framing {
            Outgoing::Length(length) => Some(length),
            _ => None,
        };
        let mut pending_head = true;
        let mut ended = false;
        loop {
            // The head waits for the first piece only if it is already
            // there: an answer still coming gets its head at once.
            let frame = if pending_head {
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        write_all(&mut self.writer, clock, &self.write, &[])
                            .await
                            .map_err(|_| ())?;
                        self.write.clear();
                        pending_head = false;
                        continue;
                    }
                }
            } else {
                self.next_frame(body).await?
            };
            let data = match frame {
                None => break,
                Some(Err(_)) => return Err(()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers are not sent over HTTP/1.1
                },
            };
            if let Some(left) = &mut left {
                if data.len() as u64 > *left {
                    return Err(()); // more than the declared length
                }
                *left -= data.len() as u64;
            }
            ended = body.is_end_stream();
            self.write_data(clock, &data, framing, ended)
                .await
                .map_err(|_| ())?;
            pending_head = false;
            if ended {
                break;
            }
        }
        if left.is_some_and(|left| left > 0) {
            return Err(()); // the body ended short of its declared length
        }
        if framing == Outgoing::Chunked && !ended {
            write_all(&mut self.writer, clock, &self.write, b"0\r\n\r\n")
                .await
                .map_err(|_| ())?;
        } else if !self.write.is_empty() {
            write_all(&mut self.writer, clock, &self.write, &[])
                .await
                .map_err(|_| ())?;
        }
        Ok(keep_alive)
    }

    /// Waits for the body's next frame while watching the client.
    async fn next_frame(
        &mut self,
        body: &mut H::Answer,
    ) -> Result<Option<Result<Frame<Bytes>, BoxError>>, ()> {
        let head_bytes = self.head_bytes;
        poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                return Poll::Ready(Ok(frame));
            }
            match self.reader.as_mut() {
                Some(reader) => reader.poll_gone(cx, head_bytes).map(|()| Err(())),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Writes one piece of body, behind what the write buffer holds (the
    /// head, before the first), framed as the answer is; the last piece of
    /// a chunked body takes the final chunk with it.
    async fn write_data(
        &mut self,
        clock: &WriteClock,
        data: &[u8],
        framing: Outgoing,
        last: bool,
    ) -> io::Result<()> {
        let chunked = framing == Outgoing::Chunked;
        if chunked && !data.is_empty() {
            let _ = write!(self.write, "{:x}\r\n", data.len());
        }
        let result = if data.len() <= COPIED_BODY {
            self.write.extend_from_slice(data);
            if chunked && !data.is_empty() {
                self.write.extend_from_slice(b"\r\n");
            }
            if chunked && last {
                self.write.extend_from_slice(b"0\r\n\r\n");
            }
            write_all(&mut self.writer, clock, &self.write, &[]).await
        } else {
            let mut after = &b""[..];
            if chunked {
                after = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
            }
            write_slices(&mut self.writer, clock, &[&self.write, data, after]).await
        };
        self.write.clear();
        result
    }

    /// Lets go of buffers one large request or answer grew.
    fn tidy(&mut self) {
        if self.write.capacity() > KEPT_WRITE_BUFFER {
            self.write = Vec::with_capacity(1024);
        }
        if self.copies.capacity() > KEPT_COPIES {
            self.copies = BytesMut::new();
        }
        if let Some(reader) = self.reader.as_mut() {
            if reader.buffer.is_empty() && reader.buffer.capacity() > KEPT_READ_BUFFER {
                reader.buffer = BytesMut::with_capacity(READ_BUFFER);
            }
        }
    }

    /// Closes the connection after an answer that left the request unread
    /// (or was the last): the write side first, then whatever the client
    /// still sends is read and dropped for a while, so that the close does
    /// not reset the connection before the client has read the answer.
    async fn linger(mut self) {
        let _ = self.writer.shutdown().await;
        let Some(mut reader) = self.reader.take() else {
            return;
        };
        let mut discarded = 0;
        let draining = async {
            while discarded < LINGER_BYTES {
                reader.buffer.clear();
                match poll_fn(|cx| reader.poll_fill(cx)).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, draining).await;
    }
}

/// What the connection reads next.
enum Next {
    Request(Parsed),
    /// The connection opened with HTTP/2's preface.
    Http2,
    /// The client closed the connection, took too long to send a head, or
    /// the gateway is closing it while idle.
    Done,
}

/// What becomes of the connection after an exchange.
enum After {
    KeepAlive,
    /// Closed once the answer is sent.
    Close,
    /// Closed once the answer is sent, with the request not read whole.
    Linger,
    /// The request's target is not a URI: a 400 instead of an answer.
    Refuse(Refusal),
    /// The client left, or the answer broke off: closed at once.
    Drop,
}

/// HTTP/2's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until a request head is complete and parses it; on a
/// connection's `first` read, tells HTTP/2's preface from a request.
async fn next_head(
    reader: &mut Reader,
    head_bytes: usize,
    spans: &mut Spans,
    closing: &mut Closing,
    mut timer: Pin<&mut Sleep>,
    first: bool,
) -> Result<Next, Refusal> {
    let mut since = None;
    loop {
        let buffered = &reader.buffer[..];
        let prefix = buffered.len().min(PREFACE.len());
        if first && prefix > 0 && buffered.get(..prefix) == PREFACE.get(..prefix) {
            if prefix == PREFACE.len() {
                return Ok(Next::Http2);
            }
        } else if let Some(parsed) = parse(buffered, head_bytes, spans)? {
            return Ok(Next::Request(parsed));
        }
        let idle = reader.buffer.is_empty();
        if idle && closing.is_closing() {
            return Ok(Next::Done);
        }
        let deadline = *since.get_or_insert_with(Instant::now) + HEADER_READ_TIMEOUT;
        let read = poll_fn(|cx| {
            if let Poll::Ready(read) = reader.poll_fill(cx) {
                return Poll::Ready(Some(read));
            }
            if idle && closing.poll_closing(cx).is_ready() {
                return Poll::Ready(None);
            }
            // The connection's timer, perhaps set for an earlier wait.
            poll_deadline(timer.as_mut(), deadline, cx).map(|()| None)
        })
        .await;
        match read {
            Some(Ok(0)) | Some(Err(_)) | None => return Ok(Next::Done),
            Some(Ok(_)) => {}
        }
    }
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    Length(u64),
    Chunked,
    /// An HTTP/1.0 client's answer of unknown length: ended by the close.
    UntilClose,
}

/// An answer's header fields: its map, and those that ride with its body
/// (see [`AnswerBody::write_fields`]).
struct Fields<'a, B> {
    headers: &'a HeaderMap,
    body: &'a B,
}

/// Writes the status line and headers, with the framing and connection
/// headers the answer needs.
fn encode_head<B: AnswerBody>(
    out: &mut Vec<u8>,
    Fields { headers, body }: Fields<'_, B>,
    status: StatusCode,
    version: Version,
    framing: Outgoing,
    add_length: bool,
    keep_alive: bool,
) {
    out.extend_from_slice(if version == Version::HTTP_11 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_connection = false;
    for (name, value) in headers {
        // The framing is the connection's to choose; a length it could not
        // read is replaced by the body's own.
        if *name == TRANSFER_ENCODING || (add_length && *name == CONTENT_LENGTH) {
            continue;
        }
        has_connection |= *name == CONNECTION;
        crate::framing::write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let date = body.write_fields(out);
    match framing {
        Outgoing::Length(length) if add_length => {
            crate::framing::write_content_length(out, length);
        }
        Outgoing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_connection {
        if !keep_alive && version == Version::HTTP_11 {
            out.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive && version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !date && !headers.contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The time each write of one answer may take (see [`WriteLimits`]), and
/// whether one did not make it.
struct WriteClock {
    limits: WriteLimits,
    timed_out: AtomicBool,
}

impl WriteClock {
    /// The answer's own limits, or `per_write` alone.
    fn new(limits: Option<WriteLimits>, per_write: Duration) -> Self {
        Self {
            limits: limits.unwrap_or(WriteLimits {
                per_write,
                deadline: None,
            }),
            timed_out: AtomicBool::new(false),
        }
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// `write`, failed with `TimedOut` if the client has not taken it in
    /// time. Most writes are taken at once and cost no timer: one is set
    /// only for a write the socket could not take.
    async fn bound<T>(&self, write: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let mut write = pin!(write);
        if let Poll::Ready(done) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            return done;
        }
        let mut limit = Instant::now() + self.limits.per_write;
        if let Some(deadline) = self.limits.deadline {
            limit = limit.min(deadline);
        }
        match tokio::time::timeout_at(limit, write).await {
            Ok(done) => done,
            Err(_) => {
                self.timed_out.store(true, Ordering::Relaxed);
                Err(io::ErrorKind::TimedOut.into())
            }
        }
    }
}

/// Writes `first` then `second` whole, in one vectored write when the
/// socket takes them.
async fn write_all(
    writer: &mut OwnedWriteHalf,
    clock: &WriteClock,
    first: &[u8],
    second: &[u8],
) -> io::Result<()> {
    write_slices(writer, clock, &[first, second]).await
}

/// Writes the slices whole, in as few vectored writes as the socket takes.
async fn write_slices(
    writer: &mut OwnedWriteHalf,
    clock: &WriteClock,
    slices: &[&[u8]],
) -> io::Result<()> {
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut written = 0;
    while written < total {
        let mut skip = written;
        let mut pending = [io::IoSlice::new(&[]); 3];
        let mut count = 0;
        for slice in slices {
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            if let Some(target) = pending.get_mut(count) {
                *target = io::IoSlice::new(slice.get(skip..).unwrap_or_default());
                count += 1;
            }
            skip = 0;
        }
        let sent = match count {
            1 => clock.bound(writer.write(&pending[0])).await?,
            _ => {
                clock
                    .bound(writer.write_vectored(&pending[..count]))
                    .await?
            }
        };
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += sent;
    }
    Ok(())
}

/// Whether the interim 100 is owed to a client that expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interim {
    /// Not asked for, or not needed (the body was already on its way).
    None,
    /// Asked for; the body has not been read yet.
    Expected,
    /// The body is being read: the connection sends the 100.
    Wanted,
    Sent,
}

/// A request body being read off the connection, and the reader it is
/// read from, shared by the body and the connection.
struct Streamed {
    /// `None` once the connection has taken it back.
    reader: Option<Reader>,
    decoder: Decoder,
    done: bool,
    interim: Interim,
    /// The connection's task, woken when the 100 is wanted.
    connection: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
}

/// A client's request body that did not come whole with its head: read
/// off the connection as the handler asks for it.
pub struct Http1Body {
    shared: Arc<Mutex<Streamed>>,
}

impl std::fmt::Debug for Http1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Body").finish_non_exhaustive()
    }
}

/// A request body that could not be read whole.
#[derive(Debug)]
pub enum RequestBodyError {
    /// The client closed the connection before its body ended.
    Closed,
    Io(io::Error),
    /// The chunked framing is broken.
    Invalid(&'static str),
    /// The connection no longer serves this request.
    Gone,
}

impl std::fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBodyError::Closed => {
                f.write_str("the client closed the connection before the body ended")
            }
            RequestBodyError::Io(err) => write!(f, "connection error: {err}"),
            RequestBodyError::Invalid(what) => write!(f, "invalid chunked body: {what}"),
            RequestBodyError::Gone => f.write_str("the request is no longer being served"),
        }
    }
}

impl std::error::Error for RequestBodyError {}

impl http_body::Body for Http1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        if state.done {
            return Poll::Ready(None);
        }
        if state.interim == Interim::Expected {
            // The connection sends the 100 once this poll returns.
            state.interim = Interim::Wanted;
            if let Some(connection) = state.connection.take() {
                connection.wake();
            }
        }
        let Some(reader) = state.reader.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(RequestBodyError::Gone))));
        };
        loop {
            let step = match &mut state.decoder {
                Decoder::Length(left) => Ok(step_length(&mut reader.buffer, left)),
                Decoder::Chunked(chunked) => chunked.step(&mut reader.buffer),
            };
            match step {
                Ok(Step::End) => {
                    state.done = true;
                    return Poll::Ready(None);
                }
                Ok(Step::Data(data)) => {
                    // A length read to its end is the body's end.
                    state.done = state.decoder == Decoder::Length(0);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::More) => {}
                Err(what) => {
                    state.reader = None;
                    return Poll::Ready(Some(Err(Box::new(RequestBodyError::Invalid(what)))));
                }
            }
            match ready!(reader.poll_fill(cx)) {
                Ok(0) => {
                    state.reader = None;
                    return Poll::Ready(Some(Err(Box::new(RequestBodyError::Closed))));
                }
                Ok(_) => {}
                Err(err) => {
                    state.reader = None;
                    return Poll::Ready(Some(Err(Box::new(RequestBodyError::Io(err)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .done
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        match state.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Chunked(_) => SizeHint::default(),
        }
    }
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second || cached.1.is_empty() {
                *cached = (second, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(cached.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod names_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_parsed_once_and_found_by_their_bytes() {
        let mut names = Names::default();
        let first = names.get(b"x-user-id").unwrap();
        assert_eq!(first, "x-user-id");
        assert_eq!(names.0.len(), 1);
        // Found, not parsed again: the very same name.
        let again = names.get(b"x-user-id").unwrap();
        assert_eq!(again.as_str().as_ptr(), first.as_str().as_ptr());
        // Another case is the same name, parsed, and not kept twice.
        assert_eq!(names.get(b"X-User-Id").unwrap(), "x-user-id");
        assert_eq!(names.0.len(), 1);
        assert_eq!(
            names.get(b"content-type").unwrap(),
            http::header::CONTENT_TYPE
        );
        assert!(names.get(b"bad name").is_none());
        assert_eq!(names.0.len(), 2);
        // A client with ever new names is not remembered past the limit.
        for n in 0..100 {
            names.get(format!("x-n{n}").as_bytes()).unwrap();
        }
        assert_eq!(names.0.len(), Names::MOST);
    }
}
