//! A parked write as the queue holds it: its state, its owner, and its request kept compact.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::sync::oneshot;

use crate::credentials::{Credentials, is_secret_name};
use crate::message::{BufferedResponse, Outbound};
use crate::quota::Grant;
use crate::status::{FailReason, Status};
use crate::store::Commit;

/// Who answers the client of a queued entry.
#[derive(Debug)]
pub(super) enum Owner {
    /// The client is still connected and waiting: a grant hands it the request to send itself,
    /// or its write goes in a batch call and the client waits for the result.
    Client(oneshot::Sender<Handoff>),
    /// The client got a 202: the proxy sends the request and keeps the result.
    Proxy,
}

/// What a waiting client is handed for its write.
// Sent once through a channel and matched at once: boxing the grant would only add an
// allocation to the path of every write that waited.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Handoff {
    /// A slot: the client sends its write itself.
    Send(Outbound, Grant),
    /// Its write went in a batch call: the proxy owns it now (in the log once `commit` is
    /// durable), and its result follows on `result` when the CRM's job tells it.
    Batched {
        commit: Commit,
        result: oneshot::Receiver<Settled>,
    },
}

/// How a write that went in a batch call ended, for its client still waiting.
#[derive(Debug)]
pub enum Settled {
    /// Applied: the answer the CRM's own single call would have given (for a Zendesk create,
    /// the ticket as read back, or its id when it could not be read).
    Answer(BufferedResponse),
    /// Given up: a dead letter.
    Failed(FailReason, String),
}

#[derive(Debug)]
pub(super) enum State {
    Queued(Owner),
    /// Handed to the waiting client, which is sending it now (its resource stays busy until done).
    Live,
    Dispatching,
    Done(Box<BufferedResponse>),
    // Boxed text: a parked write's state stays small (it is rare and never grows).
    Failed(FailReason, Box<str>),
    Expired,
}

impl State {
    pub(super) fn status(&self) -> Status {
        match self {
            State::Queued(_) => Status::Queued,
            State::Live | State::Dispatching => Status::Dispatching,
            State::Done(_) => Status::Done,
            State::Failed(..) => Status::Failed,
            State::Expired => Status::Expired,
        }
    }

    /// Whether the entry still holds its request (and counts against the queue bounds): while
    /// it waits or is sent, and as a dead letter (failed or expired) an operator may retry.
    pub(super) fn holds_request(&self) -> bool {
        matches!(
            self,
            State::Queued(_) | State::Dispatching | State::Failed(..) | State::Expired
        )
    }
}

/// A parked write's request as the queue holds it: its header lines and body in one buffer of
/// their own (not slices of a connection's read buffer, which would keep kilobytes alive per
/// write), rebuilt into an [`Outbound`] when it is sent.
#[derive(Clone)]
pub struct Kept {
    /// `METHOD path-and-query\n`, `name:value\n` per header, then the body.
    data: Bytes,
    /// Where the body starts.
    head: u32,
}

/// Header names requests to a CRM usually carry (the proxy adds the `x-forwarded-*` ones; a
/// `host` is the client's, sent as `x-forwarded-host`), each kept as one byte, `0x80 | index`,
/// in place of `name:`. A name is a token (ASCII), so such a byte opening a line is never the
/// start of a name. About 70 bytes less per parked write.
const KNOWN: [&str; 17] = [
    "authorization",
    "content-type",
    "accept",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "accept-encoding",
    "accept-language",
    "idempotency-key",
    "x-request-id",
    "traceparent",
    "tracestate",
    "cookie",
    "x-zendesk-api-client",
    "x-client-id",
    "host",
];

impl Kept {
    pub fn new(r: &Outbound) -> Kept {
        let known = |name: &HeaderName| KNOWN.iter().position(|k| *k == name.as_str());
        let head: usize = r.method.as_str().len()
            + r.path_and_query.as_str().len()
            + 2
            + r.headers
                .iter()
                .map(|(k, v)| known(k).map_or(k.as_str().len() + 1, |_| 1) + v.len() + 1)
                .sum::<usize>();
        let mut data = BytesMut::with_capacity(head + r.body.len());
        data.put_slice(r.method.as_str().as_bytes());
        data.put_u8(b' ');
        data.put_slice(r.path_and_query.as_str().as_bytes());
        data.put_u8(b'\n');
        for (k, v) in &r.headers {
            match known(k) {
                Some(i) => data.put_u8(0x80 | i as u8),
                None => {
                    data.put_slice(k.as_str().as_bytes());
                    data.put_u8(b':');
                }
            }
            data.put_slice(v.as_bytes());
            data.put_u8(b'\n');
        }
        data.put_slice(&r.body);
        Kept {
            data: data.freeze(),
            head: u32::try_from(head).expect("headers are bounded far below 4 GiB"),
        }
    }

    /// The request line's method and path and query. (A method holds no space, and nothing
    /// kept holds a newline: neither a path nor a header value may. Names hold no colon.)
    fn request_line(&self) -> (&str, &str) {
        let line = self.data[..self.head as usize]
            .split(|b| *b == b'\n')
            .next()
            .unwrap_or_default();
        let line = std::str::from_utf8(line).unwrap_or_default();
        line.split_once(' ').unwrap_or((line, ""))
    }

    /// Header names, and where each value lies in the buffer, in their original order.
    fn header_lines(&self) -> impl Iterator<Item = (&[u8], usize, usize)> {
        let head = &self.data[..self.head as usize];
        let first = head
            .iter()
            .position(|b| *b == b'\n')
            .map_or(head.len(), |n| n + 1);
        let mut at = first;
        head[first..]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(move |line| {
                let start = at;
                at += line.len() + 1;
                if let Some(name) = line
                    .first()
                    .filter(|b| **b >= 0x80)
                    .and_then(|b| KNOWN.get(usize::from(b & 0x7f)))
                {
                    return (name.as_bytes(), start + 1, start + line.len());
                }
                let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
                (&line[..colon], start + colon + 1, start + line.len())
            })
    }

    /// The request to send: its headers rebuilt (values share this buffer, nothing is copied).
    pub fn outbound(&self) -> Outbound {
        let mut headers = HeaderMap::with_capacity(8);
        for (name, from, to) in self.header_lines() {
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.data.slice(from..to)),
            ) else {
                continue; // cannot happen: both were valid when kept
            };
            value.set_sensitive(is_secret_name(&name));
            headers.append(name, value);
        }
        let (method, path_and_query) = self.request_line();
        let path_from = method.len() + 1;
        Outbound {
            method: Method::from_bytes(method.as_bytes())
                .expect("a kept method is a method's own text"),
            path_and_query: PathAndQuery::from_maybe_shared(
                self.data.slice(path_from..path_from + path_and_query.len()),
            )
            .expect("a kept path is the text of the path it was kept from"),
            headers,
            body: self.data.slice(self.head as usize..),
        }
    }
}

impl fmt::Debug for Kept {
    /// Never the header values or the body: they hold credentials and customer data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (method, path_and_query) = self.request_line();
        f.debug_struct("Kept")
            .field("method", &method)
            .field(
                "path_and_query",
                &Credentials::default().query(path_and_query),
            )
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// A dispatching write's place in a batch.
#[derive(Debug, Clone)]
pub(super) enum Batched {
    /// Its batch call is on its way.
    Sending,
    /// Item `index` of this CRM job.
    Job(Arc<str>, u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_request_gives_back_the_same_request_and_never_shows_its_secrets() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b: c"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        // Bytes above 0x7f in values (obs-text), also right after a known name's byte.
        headers.append("x-tag", HeaderValue::from_bytes(b"\xe9t\xe9").unwrap());
        headers.append("accept", HeaderValue::from_bytes(b"\xff/\xff").unwrap());
        let original = Outbound {
            method: Method::PUT,
            path_and_query: "/api/v2/tickets/7.json?api_token=t0k&x=1".parse().unwrap(),
            headers,
            body: Bytes::from_static(b"{\"ticket\":{\"status\":\"open\"}}\n"),
        };
        let kept = Kept::new(&original);
        // Known names take a byte each: `authorization`, `content-type`, `x-forwarded-for`,
        // `accept`.
        let plain: usize = original
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 2)
            .sum();
        assert_eq!(
            kept.head as usize,
            "PUT ".len() + original.path_and_query.as_str().len() + 1 + plain - (13 + 12 + 15 + 6)
        );
        let back = kept.outbound();
        assert_eq!(back.method, original.method);
        assert_eq!(back.path_and_query, original.path_and_query);
        assert_eq!(back.headers, original.headers, "order and repeats too");
        assert_eq!(back.body, original.body);
        assert!(back.headers["authorization"].is_sensitive());
        let shown = format!("{kept:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0k"),
            "{shown}"
        );

        let empty = Outbound {
            method: Method::POST,
            path_and_query: "/".parse().unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let back = Kept::new(&empty).outbound();
        assert_eq!(
            (
                back.path_and_query.as_str(),
                back.headers.len(),
                back.body.len()
            ),
            ("/", 0, 0)
        );
    }
}
