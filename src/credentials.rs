//! Which request and response parts carry credentials: they are redacted wherever the proxy
//! shows a request or an answer, and they say who owns a parked write (only the same
//! credential, or the write's own status token, reads it back).
//!
//! A header or query parameter carries a credential when its name is one of the configured
//! `credentials`, or when a word of it (split at `-`, `_`, `.`) starts with `auth`, ends with
//! `key`, `token` or `secret`, or is one of `password`, `passwd`, `pwd`, `pass`, `cookie`,
//! `session`, `sessionid`, `jwt`, `sig`, `signature`, `credential`, `credentials`:
//! `Authorization`, `Proxy-Authorization`, `Authentication`, `X-Auth`, `Cookie`, `Set-Cookie`,
//! `X-Api-Key`, `X-Access-Key`, `hapikey`, `access_token`, `client_secret`, `sig`, `jwt`, ...
//! (`Idempotency-Key` is not one: it names a write, and the operator needs to see it.)

use http::HeaderMap;
use http::header::{self, HeaderName};
use ring::digest;

use crate::ids::{EntryId, Fingerprint};

/// What shows in place of a credential.
pub const REDACTED: &str = "<redacted>";

/// The names that carry credentials: the built-in rule and the configured extras.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Extra names (lower-case) from `credentials` in the config.
    extra: Vec<String>,
}

const WORDS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "cookie",
    "session",
    "sessionid",
    "jwt",
    "sig",
    "signature",
    "credential",
    "credentials",
];

impl Credentials {
    pub fn new(extra: &[String]) -> Credentials {
        Credentials {
            extra: extra.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether a header or query parameter of this name carries a credential.
    pub fn is_secret(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        if self.extra.contains(&name) {
            return true;
        }
        if name == "idempotency-key" {
            return false;
        }
        name.split(['-', '_', '.']).any(|w| {
            w.starts_with("auth")
                || w.ends_with("key")
                || w.ends_with("token")
                || w.ends_with("secret")
                || WORDS.contains(&w)
        })
    }

    /// Header values as shown to anyone: credentials replaced by [`REDACTED`].
    pub fn headers(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| {
                let value = if self.is_secret(k.as_str()) {
                    REDACTED.to_string()
                } else {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                };
                (k.to_string(), value)
            })
            .collect()
    }

    /// A path and query with the values of credential parameters replaced by [`REDACTED`];
    /// parameters are split at `&` and at `;`.
    pub fn query(&self, path_and_query: &str) -> String {
        let Some((path, query)) = path_and_query.split_once('?') else {
            return path_and_query.to_string();
        };
        let mut out = String::with_capacity(path_and_query.len());
        out.push_str(path);
        out.push('?');
        let mut rest = query;
        while !rest.is_empty() {
            let end = rest.find(['&', ';']).unwrap_or(rest.len());
            let (param, tail) = rest.split_at(end);
            match param.split_once('=') {
                Some((k, _)) if self.is_secret(k) => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(param),
            }
            if let Some(sep) = tail.chars().next() {
                out.push(sep);
                rest = &tail[1..];
            } else {
                rest = tail;
            }
        }
        out
    }

    /// Who owns a parked write: its `Authorization` (as [`Fingerprint::of`], so a credential
    /// rule matches too), else every other credential it carries (headers such as `Cookie` or
    /// `X-Api-Key`, query parameters); `None` when it carries none.
    pub fn owner(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Fingerprint> {
        if headers.contains_key(header::AUTHORIZATION) {
            return Some(Fingerprint::of(headers));
        }
        let mut parts: Vec<(String, Vec<u8>)> = headers
            .iter()
            .filter(|(k, _)| self.is_secret(k.as_str()))
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        for param in query.unwrap_or_default().split(['&', ';']) {
            if let Some((k, v)) = param.split_once('=')
                && self.is_secret(k)
            {
                parts.push((format!("?{k}"), v.as_bytes().to_vec()));
            }
        }
        if parts.is_empty() {
            return None;
        }
        parts.sort();
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"credentials\0");
        for (k, v) in &parts {
            ctx.update(k.as_bytes());
            ctx.update(b"\0");
            ctx.update(v);
            ctx.update(b"\0");
        }
        Some(fingerprint(ctx))
    }
}

/// A parked write's own status token, for a write that carries no credential: 128 random
/// bits, given to the client once (in the 202), kept by the proxy only as a digest.
pub fn status_token() -> (String, Fingerprint) {
    let token = EntryId::random().to_string();
    let owner = token_owner(&token);
    (token, owner)
}

/// The owner a status token stands for.
pub fn token_owner(token: &str) -> Fingerprint {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"status-token\0");
    ctx.update(token.as_bytes());
    fingerprint(ctx)
}

fn fingerprint(ctx: digest::Context) -> Fingerprint {
    let d = ctx.finish();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    Fingerprint::from_bytes(out)
}

/// Whether a header name is one the built-in rule calls a credential (for places that have no
/// config at hand, such as marking header values sensitive).
pub fn is_secret_name(name: &HeaderName) -> bool {
    Credentials::default().is_secret(name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn credential_names_are_recognised_and_ordinary_ones_are_not() {
        let c = Credentials::new(&["X-Tenant-Pin".into()]);
        for secret in [
            "authorization",
            "Proxy-Authorization",
            "authentication",
            "x-auth",
            "cookie",
            "set-cookie",
            "x-api-key",
            "X-Access-Key",
            "api_key",
            "apikey",
            "hapikey",
            "access_token",
            "x-csrf-token",
            "client_secret",
            "key",
            "auth",
            "pwd",
            "jwt",
            "sig",
            "x-amz-signature",
            "sessionid",
            "x-tenant-pin",
        ] {
            assert!(c.is_secret(secret), "{secret}");
        }
        for plain in [
            "content-type",
            "idempotency-key",
            "x-request-id",
            "assignee_id",
            "query",
            "page",
            "keep-alive",
            "x-zendesk-api-version",
        ] {
            assert!(!c.is_secret(plain), "{plain}");
        }
    }

    #[test]
    fn queries_are_redacted_at_both_separators() {
        let c = Credentials::default();
        assert_eq!(
            c.query("/api/v2/search.json?query=ada&api_key=s3&page=2;sig=abc;x=1&pwd"),
            "/api/v2/search.json?query=ada&api_key=<redacted>&page=2;sig=<redacted>;x=1&pwd"
        );
        assert_eq!(c.query("/plain"), "/plain");
    }

    #[test]
    fn the_owner_is_the_authorization_else_every_other_credential_else_none() {
        let c = Credentials::default();
        let mut h = HeaderMap::new();
        assert_eq!(c.owner(&h, None), None);
        assert_eq!(c.owner(&h, Some("query=ada")), None, "no credential in it");
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        let by_key = c.owner(&h, None).unwrap();
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_ne!(c.owner(&h, None).unwrap(), by_key);
        let by_query = c.owner(&HeaderMap::new(), Some("a=1;api_key=s3")).unwrap();
        assert_ne!(
            c.owner(&HeaderMap::new(), Some("a=1;api_key=s4")),
            Some(by_query)
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert_eq!(c.owner(&h, None), Some(Fingerprint::of(&h)));
        let (token, owner) = status_token();
        assert_eq!(token.len(), 32);
        assert_eq!(token_owner(&token), owner);
        assert_ne!(token_owner("other"), owner);
    }
}
