//! A parked request: its id, owner, state, and the views the status endpoints show of it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::batch::BatchKind;
use crate::client::ClientId;
use crate::clock::Time;
use crate::forward::{BufferedResponse, Outbound};
use crate::quota::Grant;
use crate::quota::QuotaId;
use crate::route::{LaneId, RouteId};

/// An unguessable request id: 128 random bits, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(u128);

impl EntryId {
    pub fn from_u128(v: u128) -> EntryId {
        EntryId(v)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    pub fn random() -> EntryId {
        let mut bytes = [0u8; 16];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random source is available");
        EntryId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for EntryId {
    type Err = String;
    fn from_str(s: &str) -> Result<EntryId, String> {
        let bad = || format!("{s:?} is not a request id (32 lowercase hex digits)");
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        u128::from_str_radix(s, 16).map(EntryId).map_err(|_| bad())
    }
}

/// A one-way digest of a request's credential (`Authorization`), never the credential itself.
/// A status read must present the same credential as the parked request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    pub fn from_bytes(b: [u8; 16]) -> Fingerprint {
        Fingerprint(b)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// 32 lowercase hex digits: what client `credential` rules are written with.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn of(headers: &HeaderMap) -> Fingerprint {
        let cred = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let d = digest::digest(&digest::SHA256, cred);
        let mut out = [0u8; 16];
        out.copy_from_slice(&d.as_ref()[..16]);
        Fingerprint(out)
    }
}

/// What a parked request's lifecycle looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Dispatching,
    Done,
    Failed,
    Expired,
    Withdrawn,
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Status, String> {
        Ok(match s {
            "queued" => Status::Queued,
            "dispatching" => Status::Dispatching,
            "done" => Status::Done,
            "failed" => Status::Failed,
            "expired" => Status::Expired,
            _ => {
                return Err(format!(
                    "{s:?} is not a status (queued, dispatching, done, failed or expired)"
                ));
            }
        })
    }
}

/// Why a parked write was given up (kept as a dead letter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// Every attempt failed (connect errors, timeouts, retryable statuses).
    AttemptsExhausted,
    /// The CRM may or may not have applied it (timeout or reset after sending, 500), and a retry
    /// could apply it twice: no idempotency key, not an idempotent method, no `retry_ambiguous`.
    Ambiguous,
    /// The CRM refused this write as an item of a batch (its job reported an error for it).
    Rejected,
}

/// Who answers the client of a queued entry.
#[derive(Debug)]
pub(super) enum Owner {
    /// The client is still connected and waiting; a grant hands it the request to send itself.
    Client(oneshot::Sender<(Outbound, Grant)>),
    /// The client got a 202: the proxy sends the request and keeps the result.
    Proxy,
}

#[derive(Debug)]
pub(super) enum State {
    Queued(Owner),
    /// Handed to the waiting client, which is sending it now (its record stays busy until done).
    Live,
    Dispatching,
    Done(Box<BufferedResponse>),
    Failed(FailReason, String),
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

impl Kept {
    pub fn new(r: &Outbound) -> Kept {
        let head: usize = r.method.as_str().len()
            + r.path_and_query.len()
            + 2
            + r.headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 2)
                .sum::<usize>();
        let mut data = BytesMut::with_capacity(head + r.body.len());
        data.put_slice(r.method.as_str().as_bytes());
        data.put_u8(b' ');
        data.put_slice(r.path_and_query.as_bytes());
        data.put_u8(b'\n');
        for (k, v) in &r.headers {
            data.put_slice(k.as_str().as_bytes());
            data.put_u8(b':');
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
            value.set_sensitive(is_secret(name.as_str()));
            headers.append(name, value);
        }
        let (method, path_and_query) = self.request_line();
        Outbound {
            method: Method::from_bytes(method.as_bytes())
                .expect("a kept method is a method's own text"),
            path_and_query: path_and_query.to_string(),
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
            .field("path_and_query", &redact_query(path_and_query))
            .field("bytes", &self.data.len())
            .finish()
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub id: EntryId,
    pub seq: u64,
    pub route: RouteId,
    pub lane: LaneId,
    pub client: ClientId,
    /// Keys of the keyed quotas this write consumes.
    pub keys: Vec<(QuotaId, Arc<str>)>,
    pub request: Option<Kept>,
    /// Writes to the same record (PUT/PATCH/DELETE on one path) are sent one at a time, in order.
    pub record: Option<Arc<str>>,
    pub fingerprint: Fingerprint,
    pub bytes: usize,
    pub created_at: Time,
    pub expires_at: Time,
    pub not_before: Time,
    pub attempts: u32,
    pub state: State,
    pub finished_at: Option<Time>,
    /// Proxy-owned entries are sent only once the log holds them (always, in memory).
    pub durable: bool,
    /// What it would be in a batch call, on a batching route (`None`: it always goes alone).
    pub batchable: Option<BatchKind>,
    /// Never batched again (its batch was refused as a whole, or a second job of it failed).
    pub single: bool,
    /// While dispatching as part of a batch: the call, or the CRM job that holds it.
    pub batched: Option<Batched>,
}

/// A dispatching write's place in a batch.
#[derive(Debug, Clone)]
pub(super) enum Batched {
    /// Its batch call is on its way.
    Sending,
    /// Item `index` of this CRM job.
    Job(Arc<str>, u32),
}

/// `GET /_proxy/requests/{id}`: a parked write as its client may see it.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub id: String,
    pub status: Status,
    pub route: String,
    pub attempts: u32,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Parked writes ahead of this one in its lane (queued only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_dispatch_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The CRM's answer (done only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseView>,
    #[serde(skip)]
    pub stored: Option<BufferedResponse>,
}

/// A stored CRM response in JSON: the body as text when it is UTF-8, else base64.
#[derive(Debug, Serialize)]
pub struct ResponseView {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl ResponseView {
    pub fn of(r: &BufferedResponse) -> ResponseView {
        let headers = r
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let (body, body_base64) = match std::str::from_utf8(&r.body) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(base64(&r.body))),
        };
        ResponseView {
            status: r.status.as_u16(),
            headers,
            body,
            body_base64,
        }
    }
}

/// Standard base64 with padding (binary CRM bodies are rare; not worth a crate).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A parked write as the operator tools list it.
#[derive(Debug, Serialize)]
pub struct EntrySummary {
    pub id: String,
    pub status: Status,
    pub route: String,
    pub client: String,
    pub attempts: u32,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One parked write in full for the operator: its request with credentials redacted.
#[derive(Debug, Serialize)]
pub struct EntryDetail {
    #[serde(flatten)]
    pub summary: EntrySummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseView>,
}

#[derive(Debug, Serialize)]
pub struct RequestView {
    pub method: String,
    pub path_and_query: String,
    /// Header values; credentials (see [`is_secret`]) show as `<redacted>`.
    pub headers: Vec<(String, String)>,
    pub body_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Whether a header or query parameter (lowercase name) carries a credential, whose value never
/// leaves the proxy in a view: `authorization`, cookies, and any name with `token`, `secret`,
/// `password`, `api-key`/`api_key`/`apikey` in it (HubSpot's legacy `hapikey` included).
pub fn is_secret(name: &str) -> bool {
    matches!(name, "authorization" | "proxy-authorization" | "cookie")
        || [
            "token", "secret", "password", "api-key", "api_key", "apikey",
        ]
        .iter()
        .any(|s| name.contains(s))
}

/// A path and query with the values of credential parameters replaced by `<redacted>`.
pub fn redact_query(path_and_query: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret(&k.to_ascii_lowercase()) => format!("{k}=<redacted>"),
            _ => p.to_string(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

impl RequestView {
    pub fn of(r: &Kept) -> RequestView {
        let r = &r.outbound();
        RequestView {
            method: r.method.to_string(),
            path_and_query: redact_query(&r.path_and_query),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| {
                    let value = if is_secret(k.as_str()) {
                        "<redacted>".to_string()
                    } else {
                        String::from_utf8_lossy(v.as_bytes()).into_owned()
                    };
                    (k.to_string(), value)
                })
                .collect(),
            body_bytes: r.body.len(),
            body: std::str::from_utf8(&r.body).ok().map(str::to_string),
        }
    }
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
        let original = Outbound {
            method: Method::PUT,
            path_and_query: "/api/v2/tickets/7.json?api_token=t0k&x=1".into(),
            headers,
            body: Bytes::from_static(b"{\"ticket\":{\"status\":\"open\"}}\n"),
        };
        let kept = Kept::new(&original);
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
            path_and_query: "/".into(),
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

    #[test]
    fn ids_are_32_hex_digits_and_parse_back() {
        let id = EntryId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<EntryId>(), Ok(id));
        assert_ne!(EntryId::random(), id);
        assert!("xyz".parse::<EntryId>().is_err());
        assert!(
            "0123456789ABCDEF0123456789abcdef"
                .parse::<EntryId>()
                .is_err()
        );
    }

    #[test]
    fn fingerprints_differ_by_credential_and_hide_it() {
        let mut a = HeaderMap::new();
        a.insert(http::header::AUTHORIZATION, "Bearer one".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert(http::header::AUTHORIZATION, "Bearer two".parse().unwrap());
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&b));
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&a.clone()));
        assert!(!format!("{:?}", Fingerprint::of(&a)).contains("one"));
    }

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }
}
