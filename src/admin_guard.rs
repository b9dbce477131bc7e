//! Who may use the admin listener: an optional bearer token for everything that reveals request
//! data or changes state (probes and scrapers keep what `listen.admin_open` lists), and no
//! cross-origin browser request may change state, token or not. The status page's own files
//! (no data in them) are always served.

use http::header::{self, AsHeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::config::{ADMIN_TOKEN_ENV, Listen};
use crate::response::{self, Body};
use crate::status_page;

/// The admin listener's access rule.
pub struct AdminGuard {
    token: Option<String>,
    open: Vec<String>,
}

impl AdminGuard {
    /// The rule `listen` describes; the token comes from `CRM_PROXY_ADMIN_TOKEN` or, when that is
    /// unset, from `listen.admin_token_file` (read once, at start).
    pub fn new(listen: &Listen) -> Result<AdminGuard, String> {
        let from_env = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty());
        let token = match (from_env, &listen.admin_token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "listen.admin_token_file: cannot read {}: {e}",
                        file.display()
                    )
                })?;
                match text.trim() {
                    "" => {
                        return Err(format!(
                            "listen.admin_token_file: {} is empty",
                            file.display()
                        ));
                    }
                    t => Some(t.to_string()),
                }
            }
            (None, None) => None,
        };
        Ok(AdminGuard {
            token,
            open: listen.admin_open.clone(),
        })
    }

    /// Whether a token is required.
    pub fn protected(&self) -> bool {
        self.token.is_some()
    }

    /// `None` when the request may go on, else the refusal to answer with.
    pub fn check<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        let reads = matches!(*req.method(), Method::GET | Method::HEAD);
        if !reads && let Some(refusal) = cross_origin(req.headers()) {
            return Some(refusal);
        }
        let path = req.uri().path();
        if reads && (self.open.iter().any(|p| p == path) || status_page::is_page(path)) {
            return None;
        }
        let token = self.token.as_deref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return None;
        }
        let mut resp = response::problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "this admin endpoint needs the admin token: send `Authorization: Bearer <token>` (the token is in listen.admin_token_file or {ADMIN_TOKEN_ENV}); open without it: {}",
                self.open.join(", ")
            ),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"crm-quota-proxy admin\""),
        );
        Some(resp)
    }
}

/// A state change a browser could have been made to send from another site: an `Origin` other
/// than the admin's own, a `Sec-Fetch-Site` that is not `same-origin` or `none`, or a body of a
/// kind a cross-origin form may send without asking first.
fn cross_origin(headers: &HeaderMap) -> Option<Response<Body>> {
    let host = text(headers, header::HOST).unwrap_or_default();
    if let Some(origin) = text(headers, header::ORIGIN) {
        let own = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !own {
            return Some(response::problem(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("state-changing admin requests from another origin ({origin}) are refused"),
            ));
        }
    }
    if let Some(site) = text(headers, "sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some(response::problem(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!("state-changing admin requests from a {site} page are refused"),
        ));
    }
    let simple = text(headers, header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.split(';').next().unwrap_or_default().trim();
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
        .iter()
        .any(|s| ct.eq_ignore_ascii_case(s))
    });
    simple.then(|| {
        response::problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "simple_body",
            "admin actions take their parameters in the query; a form or text body (what a page on another site can send) is refused",
        )
    })
}

/// Compares in time independent of where the two differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
