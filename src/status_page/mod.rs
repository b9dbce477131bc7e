//! The admin status page at `/`: one HTML page, its script and its style, compiled into the
//! binary (no external assets). It carries no data of its own, so it is served without the
//! admin token; the script reads `/status` with the token the operator gives it.

use http::{HeaderValue, Response, StatusCode, header};

use crate::response::{self, Body};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// Only this page's own script, style and `/status` calls: no inline code, no other origin, no
/// framing (its buttons change state).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the page's files.
pub fn is_page(path: &str) -> bool {
    asset(path).is_some()
}

fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" => Some((PAGE, "text/html; charset=utf-8")),
        "/ui/page.js" => Some((SCRIPT, "text/javascript; charset=utf-8")),
        "/ui/page.css" => Some((STYLE, "text/css; charset=utf-8")),
        _ => None,
    }
}

/// The page's file at `path`, if it is one; the page says whether the admin needs a token, so
/// it asks for one before reading `/status`.
pub fn serve(path: &str, token_required: bool) -> Option<Response<Body>> {
    let (body, content_type) = asset(path)?;
    let body = if path == "/" {
        let token = if token_required { "required" } else { "none" };
        body.replace("{admin_token}", token)
    } else {
        body.to_string()
    };
    let mut resp = Response::new(response::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(resp)
}
