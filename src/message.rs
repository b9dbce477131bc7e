//! HTTP messages as the proxy keeps and forwards them: a buffered request and response, header
//! hygiene between hops, and `Retry-After`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;

use crate::clock::Time;

/// The header a CRM reads an idempotency key from (Zendesk's Ticketing API among others).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A request ready to go upstream: already buffered, headers already cleaned.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// Path and query as the client sent them (the upstream path prefix is added on send), as
    /// parsed once from the request line.
    pub path_and_query: PathAndQuery,
    /// A `Host` among them is the client's, kept as it came (not moved to another name for
    /// every request): it reaches the CRM as `X-Forwarded-Host`, the CRM getting a `Host` of
    /// its own. A request with an `X-Forwarded-Host` of its own (a front proxy's) holds no
    /// `Host`. One without `X-Forwarded-Proto` is sent with `http` there (the proxy's data
    /// listener speaks plain HTTP). The HTTP/1.1 writer sends both so, with no change to the
    /// map; [`forwarded_fields`] sets them in the map for HTTP/2.
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A path and query the proxy writes itself, from parts it has checked (fixed text, numbers,
/// job ids of letters, digits, `-`, `_` and `.`).
pub fn own_path(text: String) -> PathAndQuery {
    PathAndQuery::from_maybe_shared(Bytes::from(text)).expect("composed of checked parts")
}

/// A fully read CRM response, kept for a parked write's status.
#[derive(Debug, Clone)]
pub struct BufferedResponse {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Bytes of header names and values (what the queue's byte bound counts for headers).
pub fn headers_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

/// Set on a kept CRM answer whose body was too large to keep (its value: the body's bytes, or
/// at least as many as were read before giving up); the status and other headers are the CRM's.
pub const BODY_DROPPED: &str = "crm-proxy-body-dropped";

/// Empties a kept answer's body, marking it with [`BODY_DROPPED`].
pub fn drop_body(r: &mut BufferedResponse, bytes: u64) {
    r.body = Bytes::new();
    r.headers.remove(header::CONTENT_LENGTH);
    r.headers.insert(
        HeaderName::from_static(BODY_DROPPED),
        HeaderValue::from(bytes),
    );
}

/// The furthest a `Retry-After` is read to point (the ledger cuts a pause shorter still).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(7 * 86_400);

/// The instant a `Retry-After` value (delay in seconds, or an HTTP-date) points to, at most
/// [`RETRY_AFTER_MAX`] ahead. Malformed values are `None`: never trusted, never a panic.
pub fn retry_after(headers: &HeaderMap, now: Time) -> Option<Time> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(now + Duration::from_secs(secs).min(RETRY_AFTER_MAX));
    }
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    Some(Time::from_timestamp(at).clamp(now, now + RETRY_AFTER_MAX))
}

/// Headers that describe one hop, never forwarded in either direction. Names, not
/// `HeaderName`s: a constant array of those is built and dropped wherever it is used, which
/// the compiler does not always see through.
const HOP_BY_HOP: [&str; HOP_BY_HOP_LEN] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

const HOP_BY_HOP_LEN: usize = 8;
// `strip_hop_by_hop` marks the fixed names present as bits of one byte.
const _: () = assert!(HOP_BY_HOP_LEN <= u8::BITS as usize);

/// Where `name` stands in [`HOP_BY_HOP`]. Compared as names: a name `http` knows is one
/// number, so most fields are told apart without reading their bytes. The names are listed
/// again here, not searched for in a `static` array of `HeaderName`s: that search cost the
/// stripping 1,002 instructions a request against this match's 378 (a test holds the two
/// lists to each other).
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    let i = match name {
        n if n == header::CONNECTION => 0,
        n if *n == KEEP_ALIVE => 1,
        n if n == header::TRANSFER_ENCODING => 2,
        n if n == header::TE => 3,
        n if n == header::TRAILER => 4,
        n if n == header::UPGRADE => 5,
        n if n == header::PROXY_AUTHENTICATE => 6,
        n if n == header::PROXY_AUTHORIZATION => 7,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], name.as_str());
    Some(i)
}

/// Whether a field ends at this hop: a hop-by-hop name or a `Proxy-*` one (what
/// [`strip_hop_by_hop`] removes, but for the fields a `Connection` field names).
pub fn ends_at_hop(name: &HeaderName) -> bool {
    hop_by_hop(name).is_some() || name.as_str().starts_with("proxy-")
}

/// A `Connection` value that names no header: only the connection's own fate.
pub fn only_framing(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
}

/// `headers` with values of their own. A CRM answer's values are slices of the buffer its
/// connection read them into; an answer kept for a parked write's status (possibly for hours)
/// must not hold that whole buffer.
pub fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut own = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        own.append(name.clone(), copy);
    }
    own
}

/// Removes hop-by-hop headers, including any named in `Connection`, and `Proxy-*` headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass finds the ones present (most messages carry none, or only `Connection:
    // keep-alive`); only those are removed, and a list is made only for names outside the
    // fixed set (rare).
    let mut fixed = 0u8;
    let mut named: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let Some(i) = hop_by_hop(name) else {
            if name.as_str().starts_with("proxy-") && !named.contains(name) {
                named.push(name.clone());
            }
            continue;
        };
        fixed |= 1 << i;
        if name == header::CONNECTION && !only_framing(value.as_bytes()) {
            let tokens = value.to_str().unwrap_or_default().split(',').map(str::trim);
            named.extend(
                tokens
                    .filter(|t| !only_framing(t.as_bytes()))
                    .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
            );
        }
    }
    for (i, name) in HOP_BY_HOP.into_iter().enumerate() {
        if fixed & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
}

/// The client end of a data connection, with its `X-Forwarded-For` entry written once for all
/// of the connection's requests.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The name the client's `Host` reaches the CRM under.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Cleans a client's request headers for the upstream: a buffered body's framing recomputed,
/// the client's address added to `X-Forwarded-For`. The client's `Host` stays, to be sent as
/// `X-Forwarded-Host`, unless a front proxy already set that; the `X-Forwarded-Proto` a front
/// proxy set stays, and a request without one is sent with `http` (see
/// [`Outbound::headers`]). Hop-by-hop fields are already gone: the listeners deliver no
/// request with one (the HTTP/1.1 reader keeps none, and HTTP/2 requests are stripped).
pub fn prepare_request_headers(headers: &mut HeaderMap, peer: &Peer) {
    // One pass over the names: each lookup hashes its name, so absent ones are not looked up.
    let [
        mut length,
        mut expect,
        mut forwarded_for,
        mut forwarded_host,
    ] = [false; 4];
    for name in headers.keys() {
        match name {
            n if n == header::CONTENT_LENGTH => length = true,
            n if n == header::EXPECT => expect = true,
            n if *n == X_FORWARDED_FOR => forwarded_for = true,
            n if *n == X_FORWARDED_HOST => forwarded_host = true,
            _ => {}
        }
    }
    if forwarded_host {
        headers.remove(header::HOST);
    }
    if length {
        headers.remove(header::CONTENT_LENGTH);
    }
    if expect {
        headers.remove(header::EXPECT);
    }
    // A previous list that is not visible ASCII is replaced, not extended.
    let previous = forwarded_for
        .then(|| headers.get(&X_FORWARDED_FOR))
        .flatten()
        .filter(|v| v.to_str().is_ok());
    let forwarded_for = match previous.map(HeaderValue::as_bytes) {
        Some(prev) => {
            let mut list = Vec::with_capacity(prev.len() + 2 + peer.forwarded_for.len());
            list.extend_from_slice(prev);
            list.extend_from_slice(b", ");
            list.extend_from_slice(peer.forwarded_for.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(list)).ok()
        }
        None => Some(peer.forwarded_for.clone()),
    };
    if let Some(v) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// Sets a request's `X-Forwarded-Host` and `-Proto` as the HTTP/1.1 writer sends them (see
/// [`Outbound::headers`]): the client's `Host` moved to the first, `http` in the second.
pub fn forwarded_fields(headers: &mut HeaderMap) {
    if let Some(host) = headers.remove(header::HOST)
        && !headers.contains_key(&X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_headers_hold_copies_not_the_buffer_they_were_read_into() {
        let read = Bytes::from_static(b"application/json1234");
        let mut h = HeaderMap::new();
        h.append(
            header::CONTENT_TYPE,
            HeaderValue::from_maybe_shared(read.slice(0..16)).unwrap(),
        );
        h.append(
            "x-n",
            HeaderValue::from_maybe_shared(read.slice(16..18)).unwrap(),
        );
        h.append(
            "x-n",
            HeaderValue::from_maybe_shared(read.slice(18..20)).unwrap(),
        );
        let mut secret = HeaderValue::from_static("k");
        secret.set_sensitive(true);
        h.append(header::AUTHORIZATION, secret);
        let own = detached(&h);
        assert_eq!(own, h, "the same fields, in order, repeated ones too");
        assert!(own[header::AUTHORIZATION].is_sensitive());
        let within = |v: &HeaderValue| read.as_ptr_range().contains(&v.as_bytes().as_ptr());
        assert!(
            h.values().take(3).all(within),
            "the source values are slices"
        );
        assert!(
            !own.values().any(within),
            "no copy points into the read buffer"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["authorization", "x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_name_is_known_however_it_was_written_and_no_other() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.to_ascii_uppercase();
            for written in [*name, upper.as_str()] {
                let parsed = HeaderName::from_bytes(written.as_bytes()).unwrap();
                assert_eq!(hop_by_hop(&parsed), Some(i), "{written}");
            }
        }
        for other in [
            "keep-alives",
            "connectio",
            "t",
            "tes",
            "host",
            "proxy-status",
            "x-te",
        ] {
            let parsed = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(hop_by_hop(&parsed), None, "{other}");
        }
    }

    #[test]
    fn every_connection_field_is_read_and_a_bare_keep_alive_or_close_names_nothing() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop-a"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("CLOSE, X-Hop-B"),
        );
        for name in ["x-hop-a", "x-hop-b", "x-kept", "closer"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["closer", "x-kept"]);
    }

    #[test]
    fn forwarded_fields_are_set_and_the_clients_host_kept_to_go_as_x_forwarded_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("proxy.local:8080"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        prepare_request_headers(&mut h, &Peer::new("10.0.0.2:4000".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
        assert_eq!(
            h[header::HOST],
            "proxy.local:8080",
            "kept, to go as X-Forwarded-Host"
        );
        assert!(h.get(header::CONTENT_LENGTH).is_none());
        assert!(h.get("x-forwarded-proto").is_none(), "set when sent");
        forwarded_fields(&mut h);
        assert_eq!(h["x-forwarded-host"], "proxy.local:8080");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get(header::HOST).is_none());

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("crm.example"));
        h.insert(header::HOST, HeaderValue::from_static("proxy.local:8080"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        prepare_request_headers(&mut h, &Peer::new("10.0.0.2:4000".parse().unwrap()));
        assert_eq!(
            h["x-forwarded-proto"], "https",
            "a front proxy's value is kept"
        );
        assert_eq!(
            h["x-forwarded-host"], "crm.example",
            "a front proxy's value is kept"
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        assert!(h.get(header::EXPECT).is_none());
        assert!(h.get(header::HOST).is_none(), "the front proxy's host goes");
        forwarded_fields(&mut h);
        assert_eq!(h["x-forwarded-host"], "crm.example");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = Time::from_timestamp("2026-11-24T10:00:00Z".parse().unwrap());
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("93"));
        assert_eq!(retry_after(&h, now), Some(now + Duration::from_secs(93)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Tue, 24 Nov 2026 10:01:30 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(now + Duration::from_secs(90)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Fri, 31 Dec 2100 23:59:59 GMT"),
        );
        assert_eq!(
            retry_after(&h, now),
            Some(now + Duration::from_secs(7 * 86_400)),
            "a date decades ahead is read as the furthest allowed"
        );
        for bad in ["-1", "soon", "1.5", ""] {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(bad));
            assert_eq!(retry_after(&h, now), None, "{bad}");
        }
    }
}
