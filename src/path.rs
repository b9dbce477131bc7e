//! One canonical form of a request path, so that every spelling of one resource is classified
//! alike, counts against the same keyed quota and waits in the same line. The request itself is
//! forwarded as the client sent it; only counting and ordering use this form.
//!
//! From the path as received: each segment loses its matrix parameters (`;x`); percent-escapes
//! of unreserved characters are decoded (`%31` → `1`) and others upper-cased; `.` and `..`
//! segments are resolved; empty segments (`//`, a trailing `/`) are dropped; ASCII letters are
//! lower-cased; and a segment that is a number, with or without an extension, loses its leading
//! zeros (`01.json` → `1.json`), since CRM ids are compared as numbers. Escapes that would change
//! the path's structure or mean nothing (`%2F`, `%5C`, `%00` and other control characters, a
//! `%` not followed by two hex digits) and raw backslashes are refused: such a path is ambiguous,
//! and the CRM may read it differently from the proxy.

use std::fmt;

/// Why a path has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath(String);

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The canonical form of `path` (which starts with `/`).
pub fn canonical(path: &str) -> Result<String, BadPath> {
    let mut out: Vec<String> = Vec::new();
    for raw in path.split('/') {
        let raw = raw.split_once(';').map_or(raw, |(seg, _)| seg);
        let seg = decode(raw, path)?;
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(numeric(seg)),
        }
    }
    let mut canon = String::with_capacity(path.len());
    for seg in &out {
        canon.push('/');
        canon.push_str(seg);
    }
    if canon.is_empty() {
        canon.push('/');
    }
    Ok(canon)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A segment with unreserved escapes decoded, other escapes upper-cased, letters lower-cased.
fn decode(seg: &str, path: &str) -> Result<String, BadPath> {
    let bad = |why: &str| BadPath(format!("the path {path:?} {why}"));
    let bytes = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad("has a '%' not followed by two hex digits"))?;
                if hex == b'/' || hex == b'\\' || hex.is_ascii_control() {
                    return Err(bad(
                        "escapes a slash, a backslash or a control character, which the CRM may read as structure",
                    ));
                }
                if is_unreserved(hex) {
                    out.push(hex.to_ascii_lowercase() as char);
                } else {
                    out.push_str(&format!("%{hex:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(bad("has a backslash")),
            b => {
                out.push(b.to_ascii_lowercase() as char);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// A segment that is a number (`007`, `01.json`) without its leading zeros.
fn numeric(seg: String) -> String {
    let (stem, ext) = seg.split_at(seg.find('.').unwrap_or(seg.len()));
    if stem.len() < 2 || !stem.starts_with('0') || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return seg;
    }
    let digits = stem.trim_start_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    format!("{digits}{ext}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_one_ticket_has_one_form() {
        for spelling in [
            "/api/v2/tickets/1.json",
            "/api/v2/tickets/%31.json",
            "/api/v2/tickets/01.json",
            "/api/v2/tickets/0001.json",
            "//api/v2//tickets/1.json",
            "/api/v2/./tickets/1.json",
            "/api/v2/users/../tickets/1.json",
            "/api/v2/tickets/1.json/",
            "/api/v2/tickets/1.json;x",
            "/api/v2/tickets;v=1/1.json",
            "/API/V2/Tickets/1.JSON",
            "/api/v2/tickets/%2e/1.json",
            "/api/v2/tickets/1%2Ejson",
            "/../../api/v2/tickets/1.json",
        ] {
            assert_eq!(
                canonical(spelling).as_deref(),
                Ok("/api/v2/tickets/1.json"),
                "{spelling}"
            );
        }
    }

    #[test]
    fn distinct_resources_stay_distinct() {
        assert_ne!(
            canonical("/api/v2/tickets/10.json"),
            canonical("/api/v2/tickets/1.json")
        );
        assert_eq!(
            canonical("/api/v2/tickets/0.json").unwrap(),
            "/api/v2/tickets/0.json"
        );
        assert_eq!(
            canonical("/api/v2/tickets/00").unwrap(),
            "/api/v2/tickets/0"
        );
        assert_eq!(canonical("/v02/x").unwrap(), "/v02/x", "not a number");
        assert_eq!(canonical("/").unwrap(), "/");
        assert_eq!(
            canonical("/a/%c3%a9").unwrap(),
            "/a/%C3%A9",
            "non-ASCII stays escaped"
        );
        assert_eq!(canonical("/a%20b").unwrap(), "/a%20b");
    }

    #[test]
    fn ambiguous_escapes_are_refused() {
        for bad in [
            "/api/v2/tickets%2F1.json",
            "/api/v2/tickets%2f1.json",
            "/a%5Cb",
            "/a\\b",
            "/a%00",
            "/a%0a",
            "/a%",
            "/a%4",
            "/a%zz",
        ] {
            assert!(canonical(bad).is_err(), "{bad}");
        }
    }
}
