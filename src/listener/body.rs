//! A client request's body as the handler reads it: bytes that came whole with the head, bytes
//! read off the client's HTTP/1.1 connection as the handler asks for them (the connection goes
//! back to its loop at the body's end, or when the body is dropped unread), or an HTTP/2
//! stream's body from hyper.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::http1::Conn;
use crate::upstream::BodyError;
use crate::upstream::chunked::Framing;

/// The interim answer to `Expect: 100-continue`, sent when the handler first reads the body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Where a body that reads its connection leaves it: the connection, and whether the body was
/// read to its end (otherwise the connection cannot take another request).
pub(super) type Slot = Arc<Mutex<Option<(Box<Conn>, bool)>>>;

pub struct RequestBody(Kind);

enum Kind {
    /// No body, or all of it arrived with the head (`None` once taken).
    Whole(Option<Bytes>),
    Reading(Box<Reading>),
    Http2(Incoming),
}

pub(super) struct Reading {
    /// `None` once given back.
    conn: Option<Box<Conn>>,
    framing: Framing,
    /// Bytes of the `100 Continue` answer still to write before the first read.
    continue_left: usize,
    slot: Slot,
}

impl RequestBody {
    pub(super) fn whole(bytes: Bytes) -> RequestBody {
        RequestBody(Kind::Whole((!bytes.is_empty()).then_some(bytes)))
    }

    /// A body still arriving on `conn`, framed by `framing`; the connection goes to `slot` at
    /// its end or when the body is dropped.
    pub(super) fn reading(
        conn: Box<Conn>,
        framing: Framing,
        expect_continue: bool,
        slot: Slot,
    ) -> RequestBody {
        RequestBody(Kind::Reading(Box::new(Reading {
            conn: Some(conn),
            framing,
            continue_left: if expect_continue { CONTINUE.len() } else { 0 },
            slot,
        })))
    }

    /// An HTTP/2 request's body.
    pub fn http2(body: Incoming) -> RequestBody {
        RequestBody(Kind::Http2(body))
    }
}

impl Reading {
    /// Gives the connection back, saying whether the body was read to its end.
    fn give_back(&mut self, finished: bool) {
        if let Some(conn) = self.conn.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((conn, finished));
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        while self.continue_left > 0 {
            let sent = CONTINUE.len() - self.continue_left;
            match ready!(conn.poll_write(cx, &CONTINUE[sent..])) {
                Ok(n) => self.continue_left -= n,
                Err(e) => {
                    self.give_back(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
        match ready!(conn.poll_body(&mut self.framing, cx)) {
            Ok(Some(data)) => {
                if self.framing == Framing::Length(0) {
                    self.give_back(true);
                }
                Poll::Ready(Some(Ok(data)))
            }
            Ok(None) => {
                self.give_back(true);
                Poll::Ready(None)
            }
            Err(e) => {
                self.give_back(false);
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.give_back(false);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Reading(r) => r
                .poll_next(cx)
                .map(|next| next.map(|piece| piece.map(Frame::data))),
            Kind::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Whole(bytes) => bytes.is_none(),
            Kind::Reading(r) => r.conn.is_none(),
            Kind::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Reading(r) => match (&r.conn, r.framing) {
                (None, _) => SizeHint::with_exact(0),
                (Some(_), Framing::Length(left)) => SizeHint::with_exact(left),
                (Some(_), Framing::Chunked(_) | Framing::Close) => SizeHint::default(),
            },
            Kind::Http2(body) => body.size_hint(),
        }
    }
}
