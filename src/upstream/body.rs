//! A CRM's response body as the proxy reads it: over HTTP/1.1 straight off the connection, in
//! the task that reads the body (which then gives the connection back to its pool); over HTTP/2
//! from hyper's stream.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::chunked::Framing;
use super::http1::Conn;
use super::pool::Pool;

/// What reading a body can fail with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub struct UpstreamBody(Inner);

enum Inner {
    /// `None` once the body has been read to its end (or had none).
    Http1(Option<Reading>),
    Http2(Incoming),
}

/// An HTTP/1.1 body being read, and where its connection goes after it.
struct Reading {
    conn: Box<Conn>,
    framing: Framing,
    reusable: bool,
    pool: Pool,
}

impl UpstreamBody {
    /// The body of an HTTP/1.1 answer framed by `framing` (`None`: it has none), arriving on
    /// `conn`, which goes back to `pool` at its end if `reusable`.
    pub(super) fn http1(
        conn: Box<Conn>,
        framing: Option<Framing>,
        reusable: bool,
        pool: &Pool,
    ) -> UpstreamBody {
        // No body reads as an empty one: either way the connection is free at once.
        let framing = framing.unwrap_or(Framing::Length(0));
        let mut reading = Some(Reading {
            conn,
            framing,
            reusable,
            pool: pool.clone(),
        });
        if framing == Framing::Length(0) {
            finish(&mut reading);
        }
        UpstreamBody(Inner::Http1(reading))
    }

    pub(super) fn http2(body: Incoming) -> UpstreamBody {
        UpstreamBody(Inner::Http2(body))
    }
}

/// The body has been read: its connection goes back to the pool when it can take another request.
fn finish(reading: &mut Option<Reading>) {
    if let Some(r) = reading.take()
        && r.reusable
    {
        r.pool.check_in(r.conn);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Inner::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            Inner::Http1(reading) => {
                let Some(r) = reading else {
                    return Poll::Ready(None);
                };
                match ready!(r.conn.poll_body(&mut r.framing, cx)) {
                    Ok(Some(data)) => {
                        if r.framing == Framing::Length(0) {
                            finish(reading);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(None) => {
                        finish(reading);
                        Poll::Ready(None)
                    }
                    Err(e) => {
                        // The connection is closed with it: what is left of the answer is unknown.
                        *reading = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Http1(reading) => reading.is_none(),
            Inner::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Http1(None) => SizeHint::with_exact(0),
            Inner::Http1(Some(Reading {
                framing: Framing::Length(left),
                ..
            })) => SizeHint::with_exact(*left),
            Inner::Http1(Some(_)) => SizeHint::default(),
            Inner::Http2(body) => body.size_hint(),
        }
    }
}
