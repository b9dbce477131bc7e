//! The upstream client: pooled HTTP/1.1 (and HTTP/2 by ALPN) over rustls, header hygiene, timeouts.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config;

/// Why a request to the CRM produced no response.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The connection (TCP or TLS) could not be opened: the request was certainly not sent.
    #[error("cannot connect to the CRM: {0}")]
    Connect(String),
    /// No response head within the request timeout: the CRM may or may not have acted on it.
    #[error("the CRM sent no response within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (possibly) sent.
    #[error("the connection to the CRM failed: {0}")]
    Io(String),
}

impl ForwardError {
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::Io(_) => "io",
        }
    }
}

/// A request ready to go upstream: already buffered, headers already cleaned.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// Path and query as the client sent them (the upstream path prefix is added on send).
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A fully read CRM response, kept for a parked write's status.
#[derive(Debug, Clone)]
pub struct BufferedResponse {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Pooled client for one upstream.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
    request_timeout: Duration,
    health: Mutex<Health>,
}

/// What the last requests to the CRM looked like, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    /// Base URL of the CRM (no credentials: they are refused in config).
    pub url: String,
    pub last_response_at: Option<String>,
    pub last_error_at: Option<String>,
    pub last_error: Option<String>,
    /// Requests in a row that got no response; 0 while the CRM answers.
    pub consecutive_errors: u32,
}

/// Reads a PEM file of CA certificates; an error names the file and the problem.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

impl Upstream {
    pub fn new(cfg: &config::Upstream) -> Result<Upstream, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            for cert in load_ca_file(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .build(connector);
        let scheme = cfg
            .url
            .scheme()
            .cloned()
            .ok_or("upstream URL has no scheme")?;
        let authority = cfg
            .url
            .authority()
            .cloned()
            .ok_or("upstream URL has no host")?;
        Ok(Upstream {
            client,
            scheme,
            authority,
            prefix: cfg.path_prefix().to_string(),
            request_timeout: cfg.request_timeout,
            health: Mutex::new(Health {
                url: cfg.url.to_string(),
                ..Health::default()
            }),
        })
    }

    /// The upstream URI for a client's path and query.
    fn uri_for(&self, path_and_query: &str) -> Result<Uri, ForwardError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.prefix, path_and_query))
            .build()
            .map_err(|e| ForwardError::Io(format!("cannot build upstream URI: {e}")))
    }

    /// Sends a request and returns the response head with its streaming body.
    pub async fn send(&self, out: Outbound) -> Result<Response<Incoming>, ForwardError> {
        let mut req = Request::builder()
            .method(out.method)
            .uri(self.uri_for(&out.path_and_query)?)
            .body(Full::new(out.body))
            .map_err(|e| ForwardError::Io(format!("cannot build request: {e}")))?;
        *req.headers_mut() = out.headers;
        let result =
            match tokio::time::timeout(self.request_timeout, self.client.request(req)).await {
                Err(_) => Err(ForwardError::Timeout(self.request_timeout)),
                Ok(Err(e)) if e.is_connect() => Err(ForwardError::Connect(error_chain(&e))),
                Ok(Err(e)) => Err(ForwardError::Io(error_chain(&e))),
                Ok(Ok(resp)) => Ok(resp),
            };
        self.record(&result);
        result
    }

    fn record(&self, result: &Result<Response<Incoming>, ForwardError>) {
        let now = jiff::Timestamp::now().to_string();
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => {
                h.last_response_at = Some(now);
                h.consecutive_errors = 0;
            }
            Err(e) => {
                h.last_error_at = Some(now);
                h.last_error = Some(e.to_string());
                h.consecutive_errors += 1;
            }
        }
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a request and reads the whole response (at most `max_body` bytes) within the timeout.
    pub async fn send_buffered(
        &self,
        out: Outbound,
        max_body: usize,
    ) -> Result<BufferedResponse, ForwardError> {
        let started = tokio::time::Instant::now();
        let resp = self.send(out).await?;
        let (parts, body) = resp.into_parts();
        let left = self.request_timeout.saturating_sub(started.elapsed());
        let body = match tokio::time::timeout(left, Limited::new(body, max_body).collect()).await {
            Err(_) => return Err(ForwardError::Timeout(self.request_timeout)),
            Ok(Err(e)) => return Err(ForwardError::Io(format!("reading the response: {e}"))),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        Ok(BufferedResponse {
            status: parts.status,
            headers,
            body,
        })
    }
}

/// The instant a `Retry-After` value (delay in seconds, or an HTTP-date) points to.
/// Malformed values are `None`: never trusted, never a panic.
pub fn retry_after(headers: &HeaderMap, now: crate::clock::Time) -> Option<crate::clock::Time> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(now + Duration::from_secs(secs.min(7 * 86_400)));
    }
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    Some(crate::clock::Time::from_timestamp(at).max(now))
}

/// An error and its sources on one line (hyper's top-level messages alone are vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Headers that describe one hop, never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including any named in `Connection`, and `Proxy-*` headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Cleans a client's request headers for the upstream: hop-by-hop removed, `Host` left for the
/// client to set from the upstream URI, a buffered body's framing recomputed, and the
/// `X-Forwarded-*` trio added (`-Proto` and `-Host` kept when a front proxy already set them).
pub fn prepare_request_headers(headers: &mut HeaderMap, client_ip: IpAddr) {
    strip_hop_by_hop(headers);
    let host = headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::EXPECT);
    let xff = HeaderName::from_static("x-forwarded-for");
    let forwarded_for = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(xff, v);
    }
    headers
        .entry(HeaderName::from_static("x-forwarded-proto"))
        .or_insert(HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers
            .entry(HeaderName::from_static("x-forwarded-host"))
            .or_insert(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept", "authorization"]);
    }

    #[test]
    fn forwarded_headers_are_added_and_host_moved() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("proxy.local:8080"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        prepare_request_headers(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "proxy.local:8080");
        assert!(h.get(header::HOST).is_none());
        assert!(h.get(header::CONTENT_LENGTH).is_none());

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request_headers(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(
            h["x-forwarded-proto"], "https",
            "a front proxy's value is kept"
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = crate::clock::Time::from_timestamp("2026-11-24T10:00:00Z".parse().unwrap());
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("93"));
        assert_eq!(retry_after(&h, now), Some(now + Duration::from_secs(93)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Tue, 24 Nov 2026 10:01:30 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(now + Duration::from_secs(90)));
        for bad in ["-1", "soon", "1.5", ""] {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(bad));
            assert_eq!(retry_after(&h, now), None, "{bad}");
        }
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(load_ca_file(&missing).unwrap_err().contains("missing.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(load_ca_file(&empty).unwrap_err().contains("no certificate"));
    }
}
