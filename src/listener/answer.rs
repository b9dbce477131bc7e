//! Writing an answer to an HTTP/1.1 client: the head with the framing and connection fields
//! the proxy decides and a `Date`, then the body, gathered with the head into one write when it
//! is at hand.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{Response, StatusCode, Version};
use hyper::body::Body as _;
use tokio::io::AsyncWriteExt;

use super::http1::Conn;
use crate::response::Body;
use crate::units::push_decimal;

/// An answer's bytes are gathered up to this much before they are written.
const COALESCE: usize = 16 * 1024;

/// `HTTP/1.1 <code> <reason>`: the proxy answers as HTTP/1.1 whatever version the client spoke
/// (RFC 9110 §2.5: a server sends its own highest version).
pub(super) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes an answer: its head with the framing and connection fields the proxy decides, then
/// its body (gathered with the head into one write when it is at hand). Whether the connection
/// can take another request.
pub(super) async fn write_response(
    conn: &mut Conn,
    response: Response<Body>,
    version: Version,
    head_only: bool,
    mut keep_alive: bool,
) -> Result<bool, String> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || head_only;
    // After HEAD and for a 304 the fields describe the body a GET would have had: kept.
    let framing_kept = head_only || status == StatusCode::NOT_MODIFIED;
    let length = if no_body {
        None
    } else {
        body.size_hint().exact()
    };
    let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
    // An HTTP/1.0 client learns where a body of unknown length ends from the close.
    keep_alive &= no_body || length.is_some() || chunked;
    let out = &mut conn.out;
    out.clear();
    status_line(out, status);
    let mut dated = false;
    for (name, value) in &parts.headers {
        if *name == CONNECTION {
            keep_alive &= !value.as_bytes().eq_ignore_ascii_case(b"close");
            continue;
        }
        if (*name == CONTENT_LENGTH || *name == TRANSFER_ENCODING) && !framing_kept {
            continue;
        }
        dated |= *name == DATE;
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    // The `RateLimit` fields a CRM answer's body carries (see `response::Body`).
    if let Some(fields) = body.take_fields() {
        fields.write(out);
    }
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        push_date(out);
    }
    out.extend_from_slice(b"\r\n");
    parts.headers.clear();
    conn.spare_headers = parts.headers;
    let io_error = |e: io::Error| format!("writing the answer: {e}");
    if no_body {
        conn.write_out().await.map_err(io_error)?;
        return Ok(keep_alive);
    }
    let mut sent: u64 = 0;
    loop {
        // What the body has at hand goes with what is gathered; it is written before waiting.
        let at_hand = Pin::new(&mut body).poll_frame(&mut Context::from_waker(Waker::noop()));
        let frame = match at_hand {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                conn.write_out().await.map_err(io_error)?;
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers are not sent over HTTP/1.1
            },
            Some(Err(e)) => {
                // What was sent cannot be taken back: the client sees the answer cut short.
                let _ = conn.write_out().await;
                return Err(format!("the answer's body failed: {e}"));
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        let out = &mut conn.out;
        if chunked {
            push_hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() > COALESCE {
            conn.write_out().await.map_err(io_error)?;
            conn.io.write_all(&data).await.map_err(io_error)?;
        } else {
            conn.out.extend_from_slice(&data);
        }
        if chunked {
            conn.out.extend_from_slice(b"\r\n");
        }
        if conn.out.len() >= COALESCE {
            conn.write_out().await.map_err(io_error)?;
        }
    }
    if chunked {
        conn.out.extend_from_slice(b"0\r\n\r\n");
    }
    conn.write_out().await.map_err(io_error)?;
    if length.is_some_and(|n| n != sent) {
        return Err(format!(
            "the answer's body was {sent} bytes where {} were announced",
            length.unwrap_or_default()
        ));
    }
    Ok(keep_alive)
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(DIGITS[(n >> (i * 4)) & 0xf]);
    }
}

thread_local! {
    /// The `Date` field for the current second, formatted once a second per thread.
    static DATE_FIELD: RefCell<(i64, Vec<u8>)> = const { RefCell::new((i64::MIN, Vec::new())) };
}

/// Writes a `Date` field for now (RFC 9110 §6.6.1: an origin of an answer says when it was made).
pub(super) fn push_date(out: &mut Vec<u8>) {
    let now = jiff::Timestamp::now();
    DATE_FIELD.with_borrow_mut(|(second, field)| {
        if *second != now.as_second() {
            *second = now.as_second();
            field.clear();
            field.extend_from_slice(b"date: ");
            let mut text = String::with_capacity(29);
            let printer = jiff::fmt::rfc2822::DateTimePrinter::new();
            if printer.print_timestamp_rfc9110(&now, &mut text).is_ok() {
                field.extend_from_slice(text.as_bytes());
            }
            field.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(field);
    });
}
