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

use std::borrow::Cow;
use std::fmt;

/// Why a path has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath(String);

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The canonical form of `path` (which starts with `/`): `path` itself when it is already
/// canonical (most are), so no copy is made for it.
pub fn canonical(path: &str) -> Result<Cow<'_, str>, BadPath> {
    match plain(path.as_bytes()) {
        Some(Case::Lower) => Ok(Cow::Borrowed(path)),
        Some(Case::Mixed) => Ok(Cow::Owned(path.to_ascii_lowercase())),
        None => rebuilt(path).map(Cow::Owned),
    }
}

/// The letters of a plain path.
#[derive(Debug, PartialEq, Eq)]
enum Case {
    /// No ASCII upper-case letter: the path is its own canonical form.
    Lower,
    Mixed,
}

/// What [`plain`] needs to know of each byte value, as bits: one pass over a path ORs them.
const NEVER_PLAIN: u8 = 1;
const UPPER: u8 = 2;
/// A `0` right after a `/`, which may lead a number (looked at again).
const ZERO: u8 = 4;

/// A byte's class anywhere in a path.
static CLASS: [u8; 256] = table(
    &[
        (b'%', NEVER_PLAIN),
        (b'\\', NEVER_PLAIN),
        (b';', NEVER_PLAIN),
    ],
    true,
);
/// What a byte right after a `/` says: an empty segment or one that starts with `.` is never
/// plain.
static START: [u8; 256] = table(
    &[(b'/', NEVER_PLAIN), (b'.', NEVER_PLAIN), (b'0', ZERO)],
    false,
);

/// A class for each byte value: `marked` bytes have theirs, ASCII upper-case letters [`UPPER`]
/// if `upper`, the rest none.
const fn table(marked: &[(u8, u8)], upper: bool) -> [u8; 256] {
    let mut class = [0u8; 256];
    let mut b = b'A';
    while upper && b <= b'Z' {
        class[b as usize] = UPPER;
        b += 1;
    }
    let mut i = 0;
    while i < marked.len() {
        class[marked[i].0 as usize] = marked[i].1;
        i += 1;
    }
    class
}

/// Whether `path` needs no more than lower-casing (most do): no escape, backslash or matrix
/// parameter, no empty segment or trailing `/`, no segment that starts with `.`, and no number
/// with a leading zero; and if so, whether it has upper-case letters. One pass over the bytes
/// with table look-ups and no branch; a second only for a segment that starts with `0`.
fn plain(path: &[u8]) -> Option<Case> {
    let (&first, rest) = path.split_first()?;
    if first != b'/' || rest.last() == Some(&b'/') {
        return None;
    }
    // Each byte's class, and what it says as a segment's first byte when it follows a `/`.
    let (seen, _) = path.iter().fold((0, 0), |(seen, after_slash), &b| {
        let class = CLASS[usize::from(b)] | (START[usize::from(b)] & after_slash);
        (seen | class, u8::from(b == b'/').wrapping_neg())
    });
    if seen & NEVER_PLAIN != 0 {
        return None;
    }
    if seen & ZERO != 0
        && path
            .windows(3)
            .any(|w| w[0] == b'/' && w[1] == b'0' && w[2].is_ascii_digit())
    {
        return None;
    }
    Some(if seen & UPPER != 0 {
        Case::Mixed
    } else {
        Case::Lower
    })
}

/// The canonical form of a path that needs more than lower-casing.
fn rebuilt(path: &str) -> Result<String, BadPath> {
    // Built in one buffer of bytes: each kept segment is `/` and its decoded text, so `..` drops
    // back to the last `/` (a decoded segment never holds one: an escaped slash is refused).
    // Only ASCII bytes are changed, added or dropped, so the result stays UTF-8.
    let mut canon = Vec::with_capacity(path.len() + 1);
    for raw in path.as_bytes().split(|&b| b == b'/') {
        let raw = raw.split(|&b| b == b';').next().unwrap_or_default();
        let start = canon.len();
        canon.push(b'/');
        decode_into(&mut canon, raw, path)?;
        match &canon[start + 1..] {
            b"" | b"." => canon.truncate(start),
            b".." => {
                canon.truncate(start);
                let parent = canon.iter().rposition(|&b| b == b'/').unwrap_or(0);
                canon.truncate(parent);
            }
            _ => drop_leading_zeros(&mut canon, start + 1),
        }
    }
    if canon.is_empty() {
        canon.push(b'/');
    }
    String::from_utf8(canon).map_err(|_| BadPath(format!("the path {path:?} is not UTF-8")))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends a segment with unreserved escapes decoded, other escapes upper-cased, letters
/// lower-cased.
fn decode_into(out: &mut Vec<u8>, seg: &[u8], path: &str) -> Result<(), BadPath> {
    let bad = |why: &str| BadPath(format!("the path {path:?} {why}"));
    let mut i = 0;
    loop {
        // A run of plain bytes goes in at once, letters lower-cased.
        let run = seg[i..]
            .iter()
            .position(|&b| b == b'%' || b == b'\\')
            .unwrap_or(seg.len() - i);
        out.extend(seg[i..i + run].iter().map(u8::to_ascii_lowercase));
        i += run;
        match seg.get(i) {
            None => break,
            Some(b'%') => {
                let hex = seg
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
                    out.push(hex.to_ascii_lowercase());
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend_from_slice(&[
                        b'%',
                        HEX[usize::from(hex >> 4)],
                        HEX[usize::from(hex & 0xf)],
                    ]);
                }
                i += 3;
            }
            Some(_) => return Err(bad("has a backslash")),
        }
    }
    Ok(())
}

/// A segment (from `start` to the end of `canon`) that is a number (`007`, `01.json`) loses
/// its leading zeros.
fn drop_leading_zeros(canon: &mut Vec<u8>, start: usize) {
    let seg = &canon[start..];
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
    canon.drain(start..start + zeros);
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

    proptest::proptest! {
        /// The quick form of a plain path is the one the full rules build.
        #[test]
        fn a_plain_path_lower_cased_is_its_canonical_form(
            path in "/[a-zA-Z0-9./;%\\\\é_-]{0,24}"
        ) {
            if let Some(case) = plain(path.as_bytes()) {
                proptest::prop_assert_eq!(Ok(path.to_ascii_lowercase()), rebuilt(&path));
                let lower = path.bytes().all(|b| !b.is_ascii_uppercase());
                proptest::prop_assert_eq!(case == Case::Lower, lower);
                proptest::prop_assert_eq!(matches!(canonical(&path), Ok(Cow::Borrowed(_))), lower);
            }
        }
    }

    #[test]
    fn a_canonical_path_is_taken_as_it_is_and_others_are_copied() {
        for path in [
            "/",
            "/api/v2/tickets/1.json",
            "/api/v2/users/search.json",
            "/a/10/0.x",
        ] {
            assert!(
                matches!(canonical(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        for (path, canon) in [("/API/v2", "/api/v2"), ("/a//b", "/a/b"), ("/a/01", "/a/1")] {
            assert!(
                matches!(canonical(path), Ok(Cow::Owned(c)) if c == canon),
                "{path}"
            );
        }
        assert!(
            canonical("").is_ok_and(|c| c == "/"),
            "a path that is not one yet"
        );
    }

    #[test]
    fn letters_beyond_ascii_are_kept_as_sent() {
        // Only ASCII letters are lower-cased; UTF-8 text passes through unchanged.
        assert_eq!(
            canonical("/api/v2/Users/Zoë/Ärger.json").as_deref(),
            Ok("/api/v2/users/zoë/Ärger.json")
        );
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
