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
    // Built in one buffer: each kept segment is `/` and its decoded text, so `..` drops back to
    // the last `/` (a decoded segment never holds one: an escaped slash is refused).
    let mut canon = String::with_capacity(path.len() + 1);
    for raw in path.split('/') {
        let raw = raw.split_once(';').map_or(raw, |(seg, _)| seg);
        let start = canon.len();
        canon.push('/');
        decode_into(&mut canon, raw, path)?;
        match &canon[start + 1..] {
            "" | "." => canon.truncate(start),
            ".." => {
                canon.truncate(start);
                let parent = canon.rfind('/').unwrap_or(0);
                canon.truncate(parent);
            }
            _ => drop_leading_zeros(&mut canon, start + 1),
        }
    }
    if canon.is_empty() {
        canon.push('/');
    }
    Ok(canon)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends a segment with unreserved escapes decoded, other escapes upper-cased, letters
/// lower-cased.
fn decode_into(out: &mut String, seg: &str, path: &str) -> Result<(), BadPath> {
    let bad = |why: &str| BadPath(format!("the path {path:?} {why}"));
    let bytes = seg.as_bytes();
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
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.push('%');
                    out.push(HEX[usize::from(hex >> 4)] as char);
                    out.push(HEX[usize::from(hex & 0xf)] as char);
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
    Ok(())
}

/// A segment (from `start` to the end of `canon`) that is a number (`007`, `01.json`) loses
/// its leading zeros.
fn drop_leading_zeros(canon: &mut String, start: usize) {
    let seg = &canon.as_bytes()[start..];
    let stem = &seg[..seg.iter().position(|&b| b == b'.').unwrap_or(seg.len())];
    if stem.len() < 2 || stem[0] != b'0' || !stem.iter().all(u8::is_ascii_digit) {
        return;
    }
    // One digit stays: `000` is `0`.
    let zeros = stem
        .iter()
        .take_while(|&&b| b == b'0')
        .count()
        .min(stem.len() - 1);
    canon.replace_range(start..start + zeros, "");
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
        assert_eq!(
            canonical("/a/%7E/%3a/0007.JSON").unwrap(),
            "/a/~/%3A/7.json"
        );
        assert_eq!(canonical("/a/b/../../..").unwrap(), "/");
        assert_eq!(canonical("/a/000.x/0.0").unwrap(), "/a/0.x/0.0");
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
