//! The client side of HTTP/1.1, served by the connection's own task: a request's head is read
//! and parsed, the handler is called in place (its future is not moved to a slot of a
//! dispatcher), and its answer is written from one buffer with the head (see the README's
//! benchmarks for what hyper's server cost).
//!
//! A request is framed as RFC 9112 §6 says: `Transfer-Encoding` must end in `chunked` (and
//! comes without `Content-Length`), otherwise a valid `Content-Length` counts the body, and
//! without either there is none. Requests may be pipelined. `Expect: 100-continue` is answered
//! when the handler first reads the body. A connection stays open after an answer unless the
//! request was HTTP/1.0 without `keep-alive`, either side said `Connection: close`, the body
//! was not read to its end, or the listener is closing. A head that cannot be parsed gets a
//! 400, one over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields a 431, and the connection closes.
//! A client that closes its connection while its request is in service cancels the request.
//! A connection that opens with HTTP/2's preface is handed to hyper's HTTP/2 server.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::EXPECT;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Watched;
use super::answer::{push_date, status_line, write_response};
use super::body::{RequestBody, Slot};
use crate::response::Body;
use crate::units::push_decimal;
use crate::upstream::BodyError;
use crate::upstream::chunked::{Chunk, Framing, decoded};
use crate::upstream::head::{Fields, Names, span_in};
use crate::upstream::http1::poll_read;

/// Header fields a request may have (hyper's default limit too); more gets a 431.
const MAX_HEADERS: usize = 100;
/// Bytes a request's head may take; more gets a 431.
const MAX_HEAD: usize = 64 * 1024;
/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Below this much room the buffer is grown (or reclaimed) before a read: a request's head
/// stays referenced by its header values while it is served, so asking for a whole
/// [`READ_CHUNK`] after each head would allocate a new buffer for every request.
const MIN_ROOM: usize = 1024;
/// What an HTTP/2 connection opens with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One client connection, with what it has read and not yet used.
pub(super) struct Conn {
    pub(super) io: Watched,
    buf: BytesMut,
    /// The answer being written, built here to reuse the allocation.
    pub(super) out: Vec<u8>,
    /// The last answer's header map, emptied, for the next request's fields (as hyper does):
    /// it has room for the fields the proxy adds, where a map sized for the request's own would
    /// grow twice.
    pub(super) spare_headers: HeaderMap,
    /// The last request's header names.
    names: Names,
}

/// How a connection's HTTP/1.1 service ended.
pub(super) enum Ended {
    Closed,
    /// It opened with HTTP/2's preface: the connection and what was read of it.
    Http2(Watched, Bytes),
}

/// A request head the proxy refuses, and why.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    why: String,
}

fn refused(status: StatusCode, why: impl Into<String>) -> Refused {
    Refused {
        status,
        why: why.into(),
    }
}

/// A parsed request head and what the connection needs to know of it.
struct Parsed {
    request: Request<()>,
    /// `None`: the request has no body.
    framing: Option<Framing>,
    keep_alive: bool,
    expect_continue: bool,
}

impl Conn {
    pub(super) fn new(io: Watched) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            spare_headers: HeaderMap::new(),
            names: Names::default(),
        })
    }

    /// Reads what the connection has into the buffer: `Ready(Ok(0))` at its end.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.buf.reserve(READ_CHUNK);
        }
        poll_read(&mut self.io, &mut self.buf, cx)
    }

    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    /// The next piece of a body framed by `framing`, from what was read or by reading more:
    /// `None` at the body's end. `framing` is brought up to date.
    pub(super) fn poll_body(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, String>> {
        loop {
            if let Some(piece) = decoded(&mut self.buf, framing)? {
                return Poll::Ready(Ok(piece));
            }
            match ready!(self.poll_more(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(
                        "the client closed the connection before the body's end".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(format!("reading the body: {e}"))),
            }
        }
    }

    /// Resolves when the client closes the connection (or it fails); bytes that arrive first
    /// (a pipelined request) are kept, up to one head's worth.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.buf.len() <= MAX_HEAD {
            match ready!(self.poll_more(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
        Poll::Pending
    }

    pub(super) async fn write_out(&mut self) -> io::Result<()> {
        let written = self.io.write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// Answers a head the proxy refuses (the connection closes after it).
    async fn refuse(&mut self, r: Refused) {
        tracing::debug!(status = r.status.as_u16(), reason = %r.why, "refused a request head");
        let body = format!("{}\n", r.why);
        self.out.clear();
        status_line(&mut self.out, r.status);
        self.out
            .extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncontent-length: ");
        push_decimal(&mut self.out, body.len() as u64);
        self.out.extend_from_slice(b"\r\nconnection: close\r\n");
        push_date(&mut self.out);
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body.as_bytes());
        let _ = self.write_out().await;
    }
}

/// Serves HTTP/1.1 requests on `conn` with `service` until the connection ends, or until
/// `closing` is set while no request is in service.
pub(super) async fn serve<S>(
    mut conn: Box<Conn>,
    service: &S,
    closing: &AtomicBool,
) -> Result<Ended, String>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<Body>>,
    S::Error: Into<BodyError>,
{
    let mut first = true;
    loop {
        let parsed = loop {
            if first && is_preface_start(&conn.buf) {
                if conn.buf.len() >= PREFACE.len() {
                    let read = conn.buf.split().freeze();
                    return Ok(Ended::Http2(conn.io, read));
                }
            } else if !conn.buf.is_empty() {
                match parse_request(&mut conn.buf, &mut conn.names, &mut conn.spare_headers) {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) if conn.buf.len() > MAX_HEAD => {
                        let why = format!("the request head is over {MAX_HEAD} bytes");
                        conn.refuse(refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why))
                            .await;
                        return Ok(Ended::Closed);
                    }
                    Ok(None) => {}
                    Err(r) => {
                        conn.refuse(r).await;
                        return Ok(Ended::Closed);
                    }
                }
            }
            let read = poll_fn(|cx| {
                if closing.load(Relaxed) {
                    return Poll::Ready(Ok(0));
                }
                conn.poll_more(cx)
            })
            .await;
            match read {
                Ok(0) => return Ok(Ended::Closed),
                Ok(_) => {}
                Err(e) => return Err(format!("reading a request: {e}")),
            }
        };
        first = false;
        let Parsed {
            request,
            framing,
            mut keep_alive,
            expect_continue,
        } = parsed;
        let head_only = request.method() == Method::HEAD;
        let version = request.version();
        let streaming = match framing {
            Some(Framing::Length(n)) if conn.buf.len() as u64 >= n => None,
            other => other,
        };
        // The connection, while the loop holds it, and whether the body was read to its end.
        let mut held = None;
        let mut slot = None;
        let body = if let Some(framing) = streaming {
            // The body holds the connection and reads it for the handler; it comes back at
            // the body's end, or when the body is dropped.
            let back: Slot = Arc::new(Mutex::new(None));
            slot = Some(back.clone());
            RequestBody::reading(conn, framing, expect_continue, back)
        } else {
            let body = match framing {
                Some(Framing::Length(n)) => conn.buf.split_to(n as usize).freeze(),
                _ => Bytes::new(),
            };
            held = Some((conn, true));
            RequestBody::whole(body)
        };
        let taken = |slot: &Option<Slot>| {
            let slot = slot.as_ref()?;
            slot.lock().unwrap_or_else(|e| e.into_inner()).take()
        };
        let mut call = pin!(service.call(request.map(|()| body)));
        // Once the whole request is read, the connection is watched for the client's close.
        let answered = poll_fn(|cx| {
            if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(answer.map_err(Into::into)));
            }
            if held.is_none() {
                held = taken(&slot);
            }
            match &mut held {
                Some((conn, true)) => conn.poll_closed(cx).map(|()| None),
                _ => Poll::Pending,
            }
        })
        .await;
        // The client went away: its request is dropped (cancelled) unanswered.
        let Some(answer) = answered else {
            return Ok(Ended::Closed);
        };
        // Kept by the handler past its answer: the connection cannot be written.
        let Some((back, finished)) = held.or_else(|| taken(&slot)) else {
            return Ok(Ended::Closed);
        };
        conn = back;
        keep_alive &= finished;
        let response = answer.map_err(|e: BodyError| format!("the handler failed: {e}"))?;
        keep_alive &= !closing.load(Relaxed);
        if !write_response(&mut conn, response, version, head_only, keep_alive).await? {
            return Ok(Ended::Closed);
        }
    }
}

/// Whether what was read so far may be HTTP/2's preface.
fn is_preface_start(buf: &[u8]) -> bool {
    !buf.is_empty() && PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())])
}

/// Takes a complete request head off the front of `buf`; `None` while it is incomplete.
/// `spare` is an empty header map to fill (its room reused).
fn parse_request(
    buf: &mut BytesMut,
    names: &mut Names,
    spare: &mut HeaderMap,
) -> Result<Option<Parsed>, Refused> {
    let bad = StatusCode::BAD_REQUEST;
    // Left uninitialised: the parser writes the fields it finds (as the CRM side does).
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request has more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => return Err(refused(bad, format!("the request head is malformed: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request head is over {MAX_HEAD} bytes"),
        ));
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| refused(bad, "the request method is invalid"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Names are checked now; the target and the values are kept as where they lie in the
    // head, which becomes one shared buffer they are all slices of.
    let target = span_in(buf, parsed.path.unwrap_or_default().as_bytes());
    // The fields that frame the message are read as the names are checked (no lookups after).
    let mut fields = Fields::default();
    let mut expect_continue = false;
    names.clear();
    for field in parsed.headers.iter() {
        let name = names
            .next(field.name)
            .map_err(|()| refused(bad, format!("the header name {:?} is invalid", field.name)))?;
        let noted = fields.note(&name.name, field.value);
        if noted.map_err(|e| refused(bad, format!("the request has {e}")))? {
            continue;
        }
        expect_continue |= name.name == EXPECT
            && field
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        names.keep(name, span_in(buf, field.value));
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target))
        .map_err(|e| refused(bad, format!("the request target is invalid: {e}")))?;
    let mut headers = std::mem::take(spare);
    headers.reserve(names.len());
    names.append_to(&mut headers, &head);
    let framing = framing(&fields, version)?;
    let keep_alive = match version {
        Version::HTTP_11 => !fields.close,
        _ => fields.keep_alive,
    };
    let expect_continue = version == Version::HTTP_11 && expect_continue;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// How a request's body is delimited (RFC 9112 §6.3); `None` when it has none. What a server
/// could read two ways (a transfer coding with a length, or one that does not end in
/// `chunked`) is refused rather than guessed.
fn framing(fields: &Fields, version: Version) -> Result<Option<Framing>, Refused> {
    let bad = StatusCode::BAD_REQUEST;
    if !fields.coded {
        return Ok(fields.length.filter(|&n| n > 0).map(Framing::Length));
    }
    if version != Version::HTTP_11 {
        return Err(refused(bad, "Transfer-Encoding in an HTTP/1.0 request"));
    }
    if fields.length.is_some() {
        return Err(refused(
            bad,
            "the request has both Transfer-Encoding and Content-Length",
        ));
    }
    if !fields.chunked {
        return Err(refused(
            bad,
            "the request's Transfer-Encoding does not end in chunked",
        ));
    }
    Ok(Some(Framing::Chunked(Chunk::Size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Parsed>, Refused> {
        parse_request(
            &mut BytesMut::from(text),
            &mut Names::default(),
            &mut HeaderMap::new(),
        )
    }

    #[test]
    fn a_head_is_taken_off_the_buffer_into_the_spare_map_and_what_follows_stays() {
        let mut buf = BytesMut::from(
            "POST /a/b?q=1 HTTP/1.1\r\nHost: x\r\nX-N: 1\r\nx-n: two\r\nX-Empty:\r\n\
             Content-Length: 2\r\n\r\n{}GET /next HTTP/1.1\r\n",
        );
        let mut spare = HeaderMap::with_capacity(32);
        let room = spare.capacity();
        let p = parse_request(&mut buf, &mut Names::default(), &mut spare)
            .unwrap()
            .unwrap();
        let (req, headers) = (&p.request, p.request.headers());
        assert_eq!((req.method(), req.uri().path()), (&Method::POST, "/a/b"));
        assert_eq!(req.uri().query(), Some("q=1"));
        let n: Vec<_> = headers.get_all("x-n").iter().collect();
        assert_eq!(n, ["1", "two"]);
        assert_eq!(headers["x-empty"], "");
        assert_eq!(headers.capacity(), room, "the spare map's room is used");
        assert_eq!(p.framing, Some(Framing::Length(2)));
        assert!(p.keep_alive && !p.expect_continue);
        assert_eq!(
            &buf[..],
            b"{}GET /next HTTP/1.1\r\n",
            "the body and the next request stay"
        );
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn a_request_is_framed_and_its_connection_kept_as_rfc_9112_says() {
        let framed = |text: &str| {
            let p = parse(text).unwrap().unwrap();
            (p.framing, p.keep_alive, p.expect_continue)
        };
        let chunked = Some(Framing::Chunked(Chunk::Size));
        assert_eq!(framed("GET / HTTP/1.1\r\n\r\n"), (None, true, false));
        assert_eq!(
            framed("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            (None, true, false)
        );
        assert_eq!(
            framed(
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n"
            ),
            (chunked, true, true)
        );
        assert_eq!(
            framed("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n"),
            (None, false, false)
        );
        assert_eq!(framed("GET / HTTP/1.0\r\n\r\n"), (None, false, false));
        assert_eq!(
            framed("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nExpect: 100-continue\r\n\r\n"),
            (None, true, false),
            "an HTTP/1.0 client is not sent 100 Continue"
        );
        let status = |text: &str| parse(text).err().unwrap().status.as_u16();
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n"),
            400
        );
        assert_eq!(status("GET /\x01 HTTP/1.1\r\n\r\n"), 400);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }
}
