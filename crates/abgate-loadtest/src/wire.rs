//! The generator's side of HTTP/1.1: each request written whole in one
//! write, the answer's head parsed in place (httparse, no header map), its
//! body framed by length or chunks with the gateway's own framing pieces
//! (`abgate_http1::framing`) and handed over as it arrives.
//!
//! Why not a general client: the generator shares its CPU with the
//! upstream, and near saturation that CPU is the limit of every run. A
//! client that builds a header map per answer spends more on a server that
//! sends more fields (abgate's `x-abgate-*`, nginx's `Server` and `Date`),
//! and that cost would be charged to the server as lower throughput. Here
//! an answer costs a read and a scan whatever its fields, as in wrk.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;

use abgate_http1::framing::{self as http1, AnswerFraming, Chunked, FramingFields};
use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Why an exchange failed, as counted in the results.
pub type Kind = &'static str;

/// The server closed the connection before any byte of the answer: on a
/// connection that has carried an answer before, the server may simply
/// have ended it while idle, and the request is tried again on a new one.
pub const CLOSED: Kind = "closed";
/// The answer broke off before its end.
const RESET: Kind = "reset";
/// Not an HTTP/1.x answer, or one whose framing is broken.
const BAD_RESPONSE: Kind = "bad_response";
/// Any other failure of the socket.
const IO: Kind = "io";

/// The most fields an answer's head may have.
const MAX_FIELDS: usize = 64;
/// The longest head read before giving up on it.
const MAX_HEAD: usize = 64 * 1024;

/// A keep-alive connection to the server under test.
pub struct Connection {
    stream: TcpStream,
    buffer: BytesMut,
    /// What the next request is written into (kept: no allocation per
    /// request).
    pub request: Vec<u8>,
    /// An answer has been read whole on it.
    used: bool,
}

/// What a finished exchange tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub status: u16,
    /// The connection can carry the next request.
    pub reusable: bool,
}

impl Connection {
    /// Connects to `addr`, without Nagle: requests are small and latency is
    /// the measurement.
    pub async fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buffer: BytesMut::with_capacity(http1::READ_BUFFER),
            request: Vec::new(),
            used: false,
        })
    }

    /// Whether an answer has been read whole on this connection before.
    pub fn used(&self) -> bool {
        self.used
    }

    /// Sends `self.request` and reads the whole answer, handing each piece
    /// of its body to `on_data` as it arrives.
    pub async fn exchange(&mut self, mut on_data: impl FnMut(&[u8])) -> Result<Answered, Kind> {
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|err| before_answer(&err))?;
        let (status, framing, keep_alive) = self.read_head().await?;
        match framing {
            AnswerFraming::Length(mut left) => {
                while left > 0 {
                    if self.buffer.is_empty() && self.fill(true).await? == 0 {
                        return Err(RESET);
                    }
                    let piece = self
                        .buffer
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.hand_over(piece, &mut on_data);
                    left -= piece as u64;
                }
            }
            AnswerFraming::Chunked => {
                let mut chunked = Chunked::START;
                loop {
                    chunked
                        .advance(&mut self.buffer)
                        .map_err(|_| BAD_RESPONSE)?;
                    match chunked {
                        Chunked::Done => break,
                        Chunked::Data(left) if !self.buffer.is_empty() => {
                            let piece = self
                                .buffer
                                .len()
                                .min(usize::try_from(left).unwrap_or(usize::MAX));
                            self.hand_over(piece, &mut on_data);
                            chunked = Chunked::Data(left - piece as u64);
                        }
                        _ => {
                            if self.fill(true).await? == 0 {
                                return Err(RESET);
                            }
                        }
                    }
                }
            }
            AnswerFraming::UntilClose => loop {
                let piece = self.buffer.len();
                self.hand_over(piece, &mut on_data);
                if self.fill(true).await? == 0 {
                    break;
                }
            },
        }
        // Bytes past the answer were never asked for: the connection is
        // not trusted with another request.
        let reusable = keep_alive && self.buffer.is_empty();
        self.used = true;
        Ok(Answered { status, reusable })
    }

    /// Reads up to the end of a final (non-1xx) answer's head and consumes
    /// it: its status, framing and whether it keeps the connection open.
    async fn read_head(&mut self) -> Result<(u16, AnswerFraming, bool), Kind> {
        // A 1xx head read: the answer has begun, even on an empty buffer.
        let mut interim = false;
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let mut head = httparse::Response::new(&mut fields);
            match head.parse(&self.buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let status = head.code.unwrap_or(0);
                    // 100 Continue and friends come before the answer.
                    if (100..200).contains(&status) && status != 101 {
                        self.buffer.advance(length);
                        interim = true;
                        continue;
                    }
                    // The same rules as the gateway's upstream side.
                    let mut framing_fields = FramingFields::default();
                    for field in head.headers.iter() {
                        framing_fields.note(field.name.as_bytes(), field.value);
                    }
                    let minor_version = head.version.unwrap_or(0);
                    let (framing, keep_alive) = framing_fields
                        .framing(status, false, minor_version)
                        .map_err(|_| BAD_RESPONSE)?;
                    self.buffer.advance(length);
                    return Ok((status, framing, keep_alive));
                }
                Ok(httparse::Status::Partial) if self.buffer.len() < MAX_HEAD => {}
                _ => return Err(BAD_RESPONSE),
            }
            // A new exchange starts on an empty buffer (see `reusable`).
            let answering = interim || !self.buffer.is_empty();
            if self.fill(answering).await? == 0 {
                return Err(if answering { RESET } else { CLOSED });
            }
        }
    }

    /// Passes the first `piece` bytes of the buffer to `on_data`.
    fn hand_over(&mut self, piece: usize, on_data: &mut impl FnMut(&[u8])) {
        if let Some(data) = self.buffer.get(..piece) {
            if !data.is_empty() {
                on_data(data);
            }
        }
        self.buffer.advance(piece);
    }

    /// Reads what the socket has: 0 at its end. `answering`: some of the
    /// answer has arrived already.
    async fn fill(&mut self, answering: bool) -> Result<usize, Kind> {
        let Self { stream, buffer, .. } = self;
        poll_fn(|cx| http1::poll_fill(stream, buffer, cx))
            .await
            .map_err(|err| {
                if answering {
                    RESET
                } else {
                    before_answer(&err)
                }
            })
    }
}

/// A failure before any byte of the answer: a reset or a closed pipe is the
/// server having closed the connection.
fn before_answer(err: &io::Error) -> Kind {
    match err.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => CLOSED,
        _ => IO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server on loopback that, for each request it reads on one
    /// connection, writes the next of `answers` in the pieces given, then
    /// closes the connection once they are all sent.
    async fn server(answers: Vec<Vec<&'static [u8]>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let mut request = [0u8; 4096];
            for pieces in answers {
                if socket.read(&mut request).await.unwrap_or(0) == 0 {
                    return;
                }
                for piece in pieces {
                    socket.write_all(piece).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        });
        addr
    }

    /// One exchange: the answer's status, whether the connection may be
    /// reused, and its body as handed over.
    async fn exchange(connection: &mut Connection) -> Result<(u16, bool, Vec<u8>), Kind> {
        connection.request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".to_vec();
        let mut body = Vec::new();
        let answered = connection
            .exchange(|data| body.extend_from_slice(data))
            .await?;
        Ok((answered.status, answered.reusable, body))
    }

    #[tokio::test]
    async fn answers_framed_by_length_and_by_chunks_are_read_whole_on_one_connection() {
        let addr = server(vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhel", b"lo"],
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r",
                b"\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n",
            ],
            vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
        ])
        .await;
        let mut connection = Connection::open(addr).await.unwrap();
        assert!(!connection.used());
        let answer = exchange(&mut connection).await;
        assert_eq!(answer, Ok((200, true, b"hello".to_vec())));
        assert!(connection.used());
        let answer = exchange(&mut connection).await;
        assert_eq!(answer, Ok((201, true, b"abcde".to_vec())));
        let answer = exchange(&mut connection).await;
        assert_eq!(answer, Ok((204, true, Vec::new())));
        // The server has hung up: the next request finds it closed.
        assert_eq!(exchange(&mut connection).await, Err(CLOSED));
    }

    #[tokio::test]
    async fn answers_that_end_the_connection_are_not_reused() {
        for (pieces, status, body) in [
            // No length: the body runs to the close.
            (
                vec![
                    &b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst "[..],
                    b"second",
                ],
                200,
                &b"first second"[..],
            ),
            (
                vec![b"HTTP/1.1 503 Busy\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno"],
                503,
                b"no",
            ),
            (
                vec![b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n."],
                200,
                b".",
            ),
        ] {
            let mut connection = Connection::open(server(vec![pieces]).await).await.unwrap();
            let answer = exchange(&mut connection).await;
            assert_eq!(answer, Ok((status, false, body.to_vec())));
        }
    }

    #[tokio::test]
    async fn broken_answers_are_told_apart() {
        let cases: [(&'static [u8], Kind); 4] = [
            // Cut off in the body, in the head, in the chunks.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", RESET),
            (b"HTTP/1.1 200 OK\r\ncontent-len", RESET),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                RESET,
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", BAD_RESPONSE),
        ];
        for (answer, kind) in cases {
            let mut connection = Connection::open(server(vec![vec![answer]]).await)
                .await
                .unwrap();
            let answer_text = String::from_utf8_lossy(answer);
            assert_eq!(exchange(&mut connection).await, Err(kind), "{answer_text}");
        }
        let addr = server(vec![vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ]])
        .await;
        let mut connection = Connection::open(addr).await.unwrap();
        assert_eq!(exchange(&mut connection).await, Err(BAD_RESPONSE));
    }
}
