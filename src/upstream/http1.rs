//! The CRM side of HTTP/1.1, spoken by the request's own task: a request is written and its
//! answer read on one connection held by that task alone, with no connection task in between
//! and no channel to hand the request and the answer across (see the README's benchmarks).
//!
//! A response is framed as RFC 9112 §6.3 says: no body after `HEAD`, a 1xx, a 204 or a 304;
//! `Transfer-Encoding` ending in `chunked` is decoded, any other transfer coding is read until
//! the connection closes; otherwise a valid `Content-Length` counts the body and its absence
//! means the body runs until the connection closes. Interim 1xx answers are skipped (a 101 is an
//! error: the proxy never asks for an upgrade). A connection goes back to its pool once an
//! answer was read to its end, when the answer was HTTP/1.1 without `Connection: close` and
//! was not delimited by the close.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::chunked::{Chunk, Framing, decoded};
use super::head::{Fields, Names, span_in};
use crate::message::{X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::units::push_decimal;

/// Header fields a response may have; more is an error (hyper's default limit too).
const MAX_HEADERS: usize = 100;
/// Bytes a response's head (status line and header fields) may take.
const MAX_HEAD: usize = 64 * 1024;
/// A request body up to this size goes in one write with its head.
const COALESCE: usize = 16 * 1024;
/// How much is read at a time.
const READ_CHUNK: usize = 16 * 1024;

pub type Io = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// One HTTP/1.1 connection to the CRM, with what it has read and not yet used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// The next request's head, built here to reuse the allocation.
    out: Vec<u8>,
    /// The last answer's header names.
    names: Names,
}

/// The answer's head, and how its body is framed (`None`: it has none).
pub struct Head {
    pub response: Response<()>,
    pub framing: Option<Framing>,
    /// The connection can take another request once the body has been read.
    pub reusable: bool,
}

/// Why an exchange failed; the message names the first thing that went wrong.
pub type Error = String;

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            names: Names::default(),
        }
    }

    /// Whether a kept connection can take a request: nothing arrived while it was idle, neither
    /// bytes nor the CRM's close. Looks once, without waiting: a socket the runtime has seen
    /// nothing arrive on since its last read is not read again (no system call either way).
    pub fn idle_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.buf.reserve(1);
        if let MaybeHttpsStream::Http(tcp) = self.io.inner() {
            // Plain TCP: a read that registers no waker (the connection has no task now).
            return match tcp.inner().try_read_buf(&mut self.buf) {
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            };
        }
        // TLS: a record may carry no data (a ticket) or the CRM's close_notify.
        let mut cx = Context::from_waker(Waker::noop());
        poll_read(&mut self.io, &mut self.buf, &mut cx).is_pending()
    }

    /// Writes a request and reads its answer's head. The request's header map, emptied once
    /// written, takes the answer's fields (its room is used again, not freed and asked for).
    pub async fn exchange(
        &mut self,
        method: &Method,
        target: &str,
        host: &HeaderValue,
        headers: &mut HeaderMap,
        body: &Bytes,
    ) -> Result<Head, Error> {
        self.write_head(method, target, host, headers, body.len());
        headers.clear();
        let io_error = |e: std::io::Error| format!("writing the request: {e}");
        if body.len() <= COALESCE {
            self.out.extend_from_slice(body);
            self.io.write_all(&self.out).await.map_err(io_error)?;
        } else {
            self.io.write_all(&self.out).await.map_err(io_error)?;
            self.io.write_all(body).await.map_err(io_error)?;
        }
        // Nothing for plain TCP; a TLS stream may hold the last record until flushed.
        self.io.flush().await.map_err(io_error)?;
        let head_only = *method == Method::HEAD;
        loop {
            if let Some(head) = parse_head(&mut self.buf, &mut self.names, head_only, headers)? {
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(format!("the response head is over {MAX_HEAD} bytes"));
            }
            if self.read().await? == 0 {
                return Err(if self.buf.is_empty() {
                    "the CRM closed the connection before answering".to_string()
                } else {
                    "the CRM closed the connection within the response head".to_string()
                });
            }
        }
    }

    /// The request line and header fields: `Host` first, then the request's own fields but
    /// `Host`, `Content-Length` and `Transfer-Encoding` (the body is whole: its length is
    /// written instead).
    fn write_head(
        &mut self,
        method: &Method,
        target: &str,
        host: &HeaderValue,
        headers: &HeaderMap,
        len: usize,
    ) {
        let out = &mut self.out;
        out.clear();
        for part in [method.as_str().as_bytes(), b" ", target.as_bytes()] {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        // The client's `Host` goes as `X-Forwarded-Host` unless the request has one already,
        // and a request without `X-Forwarded-Proto` says `http` (`Outbound::headers`).
        let mut client_host = None;
        let (mut forwarded_host, mut forwarded_proto) = (false, false);
        for (name, value) in headers {
            if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
                continue;
            }
            if name == HOST {
                client_host = Some(value);
                continue;
            }
            forwarded_host |= name == X_FORWARDED_HOST;
            forwarded_proto |= name == X_FORWARDED_PROTO;
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
        if let Some(client_host) = client_host.filter(|_| !forwarded_host) {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(client_host.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !forwarded_proto {
            out.extend_from_slice(b"x-forwarded-proto: http\r\n");
        }
        // A body, or a method whose request has one by meaning, is counted; GET, HEAD, DELETE
        // and OPTIONS without one carry no length (as HTTP clients send them).
        if len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, len as u64);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    async fn read(&mut self) -> Result<usize, Error> {
        std::future::poll_fn(|cx| self.poll_more(cx)).await
    }

    /// Reads what the connection has into the buffer: `Ready(Ok(0))` at its end.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        self.buf.reserve(READ_CHUNK);
        poll_read(&mut self.io, &mut self.buf, cx).map_err(|e| format!("reading the response: {e}"))
    }

    /// The next piece of a body framed by `framing`, from what was read or by reading more:
    /// `None` at the body's end. `framing` is brought up to date.
    pub fn poll_body(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            if let Some(piece) = decoded(&mut self.buf, framing)? {
                return Poll::Ready(Ok(piece));
            }
            if ready!(self.poll_more(cx))? == 0 {
                return Poll::Ready(match framing {
                    Framing::Close => Ok(None),
                    _ => Err("the CRM closed the connection before the body's end".into()),
                });
            }
        }
    }
}

/// Reads what `io` has into the spare room of `buf` (reserved by the caller); `Ready(Ok(0))` at
/// its end.
pub(crate) fn poll_read<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    let n = read.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Takes a complete response head off the front of `buf`, skipping interim (1xx) answers;
/// `None` while it is incomplete. `spare` is an empty header map for the answer's fields (its
/// room reused).
fn parse_head(
    buf: &mut BytesMut,
    names: &mut Names,
    head_only: bool,
    spare: &mut HeaderMap,
) -> Result<Option<Head>, Error> {
    loop {
        // Left uninitialised: the parser writes the fields it finds (100 blank ones cost more
        // than the parse).
        let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!(
                    "the response has more than {MAX_HEADERS} header fields"
                ));
            }
            Err(e) => return Err(format!("the response head is malformed: {e}")),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or("the response has no valid status code")?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("the CRM switched protocols, which the proxy never asks for".into());
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Names are checked now; values are kept as where they lie in the head, which becomes
        // one shared buffer they are all slices of (no copy and no allocation a value). The
        // fields that frame the answer are read on the way (no lookups after); those that end
        // at this hop are not kept.
        let mut fields = Fields::default();
        names.clear();
        for field in parsed.headers.iter() {
            let name = names.next(field.name).map_err(|()| {
                format!("the response has an invalid header name {:?}", field.name)
            })?;
            if fields
                .note(&name.name, field.value)
                .map_err(|e| format!("the response has {e}"))?
            {
                continue;
            }
            names.keep(name, span_in(buf, field.value));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = std::mem::take(spare);
        headers.reserve(names.len());
        names.append_to(&mut headers, &head);
        let framing = framing(status, &fields, head_only);
        let reusable =
            version == Version::HTTP_11 && framing != Some(Framing::Close) && !fields.close;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            reusable,
        }));
    }
}

/// How a final response's body is delimited (RFC 9112 §6.3); `None` when it has none.
fn framing(status: StatusCode, fields: &Fields, head_only: bool) -> Option<Framing> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return None;
    }
    Some(match (fields.coded, fields.chunked, fields.length) {
        (true, true, _) => Framing::Chunked(Chunk::Size),
        (true, false, _) | (false, _, None) => Framing::Close,
        (false, _, Some(n)) => Framing::Length(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::head::{KEPT_NAME, KEPT_PLACES};

    fn head(text: &str, head_only: bool) -> Result<Option<Head>, Error> {
        parse_head(
            &mut BytesMut::from(text),
            &mut Names::default(),
            head_only,
            &mut HeaderMap::new(),
        )
    }

    /// The head at the front of `buf`, which keeps what follows it.
    fn parsed(buf: &mut BytesMut) -> Head {
        let mut spare = HeaderMap::new();
        parse_head(buf, &mut Names::default(), false, &mut spare)
            .unwrap()
            .unwrap()
    }

    fn framed(text: &str) -> (Option<Framing>, bool) {
        let h = head(text, false).unwrap().unwrap();
        (h.framing, h.reusable)
    }

    #[test]
    fn fields_that_end_at_this_hop_are_not_kept_and_those_connection_names_go_too() {
        let names_of = |text: &str, names: &mut Names| -> Vec<String> {
            let mut buf = BytesMut::from(text);
            let h = parse_head(&mut buf, names, false, &mut HeaderMap::new());
            let h = h.unwrap().unwrap();
            h.response.headers().keys().map(|n| n.to_string()).collect()
        };
        let mut names = Names::default();
        // Twice: the second answer's names come from what the first left.
        for _ in 0..2 {
            let kept = names_of(
                "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nServer: s\r\n\
                 Transfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: x\r\n\
                 Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nProxy-Connection: close\r\n\
                 Connection: keep-alive\r\nX-Rate: 1\r\n\r\n",
                &mut names,
            );
            assert_eq!(kept, ["server", "x-rate"]);
        }
        // A `Connection` field naming others: they go, before it or after it, and it too.
        let kept = names_of(
            "HTTP/1.1 200 OK\r\nX-Before: 1\r\nConnection: x-before, X-After, close\r\n\
             X-After: 2\r\nX-Rate: 3\r\nContent-Length: 0\r\n\r\n",
            &mut names,
        );
        assert_eq!(kept, ["x-rate", "content-length"]);
        // And the next answer on the connection is not stripped of its own fields by it.
        let kept = names_of(
            "HTTP/1.1 200 OK\r\nX-Before: 1\r\nX-After: 2\r\nContent-Length: 0\r\n\r\n",
            &mut names,
        );
        assert_eq!(kept, ["x-before", "x-after", "content-length"]);
    }

    #[test]
    fn names_kept_from_the_last_answer_are_used_only_where_spelled_the_same() {
        let mut names = Names::default();
        let mut next = |text: &str| {
            let mut buf = BytesMut::from(text);
            parse_head(&mut buf, &mut names, false, &mut HeaderMap::new()).map(|h| {
                let h = h.unwrap();
                let fields: Vec<(String, String)> = h
                    .response
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                    .collect();
                fields
            })
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let first = next("HTTP/1.1 200 OK\r\nServer: a\r\nX-Rate: 1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            first.unwrap(),
            pairs(&[("server", "a"), ("x-rate", "1"), ("content-length", "0")])
        );
        // The same names again, then others in their places, a longer and a shorter list, a
        // skipped `Connection` in the middle, and a name that is not a token where a valid
        // one was kept: each answer has its own fields.
        let again = next("HTTP/1.1 200 OK\r\nServer: b\r\nX-Rate: 2\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            again.unwrap(),
            pairs(&[("server", "b"), ("x-rate", "2"), ("content-length", "0")])
        );
        let moved = next(
            "HTTP/1.1 200 OK\r\nx-rate: 3\r\nConnection: keep-alive\r\nSERVER: c\r\n\
             Content-Length: 0\r\nX-New: d\r\n\r\n",
        );
        assert_eq!(
            moved.unwrap(),
            pairs(&[
                ("x-rate", "3"),
                ("server", "c"),
                ("content-length", "0"),
                ("x-new", "d")
            ])
        );
        let shorter = next("HTTP/1.1 204 No Content\r\nX-Rate: 4\r\n\r\n");
        assert_eq!(shorter.unwrap(), pairs(&[("x-rate", "4")]));
        // More fields than places are kept, and a name longer than is kept: read alike twice.
        let long = format!("x-{}", "l".repeat(KEPT_NAME));
        let many: Vec<String> = (0..KEPT_PLACES + 8)
            .map(|i| {
                if i == 3 {
                    long.clone()
                } else {
                    format!("x-f{i}")
                }
            })
            .collect();
        let text: String = many.iter().map(|n| format!("{n}: v\r\n")).collect();
        let want: Vec<(String, String)> = many.iter().map(|n| (n.clone(), "v".into())).collect();
        for _ in 0..2 {
            let got = next(&format!("HTTP/1.1 204 No Content\r\n{text}\r\n"));
            assert_eq!(got.unwrap(), want);
        }
        let bad = next("HTTP/1.1 200 OK\r\nX-R\u{e9}te: 5\r\n\r\n");
        assert!(bad.is_err(), "{bad:?}");
    }

    #[test]
    fn header_values_are_read_whole_empty_and_repeated_ones_too() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:   \r\nx-n: 1\r\nX-N:  two  \r\n\
             Content-Length: 2\r\n\r\nok",
        );
        let h = parsed(&mut buf);
        let headers = h.response.headers();
        assert_eq!(headers["x-empty"], "");
        assert_eq!(headers["x-blank"], "");
        let n: Vec<_> = headers.get_all("x-n").iter().collect();
        assert_eq!(n, ["1", "two"]);
        assert_eq!(h.framing, Some(Framing::Length(2)));
        assert_eq!(&buf[..], b"ok", "the body stays in the buffer");
    }

    #[test]
    fn a_response_is_framed_as_rfc_9112_says() {
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framed(&format!("{ok}content-length: 12\r\n\r\n")),
            (Some(Framing::Length(12)), true)
        );
        assert_eq!(
            framed(&format!(
                "{ok}Content-Length: 7, 7\r\ncontent-length: 7\r\n\r\n"
            )),
            (Some(Framing::Length(7)), true)
        );
        assert_eq!(
            framed(&format!(
                "{ok}transfer-encoding: gzip, Chunked\r\ncontent-length: 3\r\n\r\n"
            )),
            (Some(Framing::Chunked(Chunk::Size)), true)
        );
        // A transfer coding other than chunked last: the body runs to the close.
        assert_eq!(
            framed(&format!("{ok}transfer-encoding: chunked, gzip\r\n\r\n")),
            (Some(Framing::Close), false)
        );
        assert_eq!(framed(&format!("{ok}\r\n")), (Some(Framing::Close), false));
        assert_eq!(
            framed("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            (None, true)
        );
        assert_eq!(framed("HTTP/1.1 304 Not Modified\r\n\r\n"), (None, true));
        let h = head(&format!("{ok}content-length: 99\r\n\r\n"), true)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.reusable), (None, true), "no body after HEAD");
    }

    #[test]
    fn a_connection_is_reused_only_after_an_http_1_1_answer_without_close() {
        assert!(
            !framed(
                "HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\ncontent-length: 0\r\n\r\n"
            )
            .1
        );
        assert!(!framed("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").1);
        assert!(framed("HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n").1);
    }

    #[test]
    fn interim_answers_are_skipped_and_the_final_head_keeps_what_follows() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
             HTTP/1.1 201 Created\r\ncontent-length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\n{}",
        );
        let h = parsed(&mut buf);
        assert_eq!(h.response.status(), StatusCode::CREATED);
        let values: Vec<_> = h.response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"{}");
    }

    #[test]
    fn an_incomplete_head_waits_and_a_bad_one_is_named() {
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-le", false)
                .unwrap()
                .is_none()
        );
        let bad = |text: &str| head(text, false).err().unwrap();
        assert!(bad("HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n").contains("Content-Length"));
        assert!(
            bad("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .contains("conflicting")
        );
        assert!(bad("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").contains("Content-Length"));
        assert!(bad("HTTP/1.1 101 Switching Protocols\r\n\r\n").contains("switched"));
        assert!(bad("HTTP/1.1 2000 OK\r\n\r\n").contains("malformed"));
        assert!(bad("HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n").contains("malformed"));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(bad(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("more than 100"));
    }
}
