//! What both HTTP/1.1 parsers (the CRM's answers, the clients' requests) note of a head as
//! they check its names: the fields that frame the message, where each kept value lies, and the
//! names a connection's last message had.

use std::ops::Range;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::http1::Error;
use crate::message::{ends_at_hop, strip_hop_by_hop};

/// What a message's fields say of its framing and its connection, noted as its head is parsed
/// (the same for the CRM's answers and the clients' requests).
#[derive(Debug, Default)]
pub(crate) struct Fields {
    /// `Transfer-Encoding` was there.
    pub coded: bool,
    /// Its last coding is `chunked`.
    pub chunked: bool,
    pub length: Option<u64>,
    /// `Connection` names `close`.
    pub close: bool,
    /// `Connection` names `keep-alive`.
    pub keep_alive: bool,
}

impl Fields {
    /// Notes one field; `Ok(true)` for a `Connection` field that only says `keep-alive` or
    /// `close`, which frames the connection alone and need not be kept (it is hop-by-hop and
    /// names no other field). An error names an invalid or conflicting `Content-Length`.
    pub fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<bool, Error> {
        let items = || value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        if *name == CONNECTION {
            // Most say only this, and are not kept.
            let whole = value.trim_ascii();
            if whole.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
                return Ok(true);
            }
            if whole.eq_ignore_ascii_case(b"close") {
                self.close = true;
                return Ok(true);
            }
            for item in items() {
                self.close |= item.eq_ignore_ascii_case(b"close");
                self.keep_alive |= item.eq_ignore_ascii_case(b"keep-alive");
            }
            // Not one of the two above: it names other fields.
            return Ok(false);
        }
        if *name == TRANSFER_ENCODING {
            self.coded = true;
            if let Some(last) = items().rfind(|t| !t.is_empty()) {
                self.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if *name == CONTENT_LENGTH {
            // Most are one number alone; a list of them (equal ones) is read item by item.
            if let Some(n) = parse_decimal(value) {
                return self.length(n).map(|()| false);
            }
            for item in items() {
                let n = parse_decimal(item).ok_or_else(|| {
                    format!(
                        "an invalid Content-Length {:?}",
                        String::from_utf8_lossy(value)
                    )
                })?;
                self.length(n)?;
            }
        }
        Ok(false)
    }

    /// Notes one `Content-Length` number: the same as any noted before it, or an error.
    fn length(&mut self, n: u64) -> Result<(), Error> {
        if self.length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values".into());
        }
        self.length = Some(n);
        Ok(())
    }
}

/// Where `part`, read from the head at the front of `buf`, lies in it (an empty part need not
/// point into it at all).
#[inline]
pub(crate) fn span_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = if part.is_empty() {
        0
    } else {
        part.as_ptr() as usize - buf.as_ptr() as usize
    };
    start..start + part.len()
}

/// Fields whose names are kept from one message to the next, by place, and how long a kept
/// name may be: a few kilobytes per connection at most, whatever a peer sends.
pub(crate) const KEPT_PLACES: usize = 32;
pub(crate) const KEPT_NAME: usize = 64;

/// The names of the first fields of a connection's last messages, by place, each as it was
/// spelled and as checked, with whether it ends at this hop; and the kept fields of the message
/// being parsed. One peer's messages mostly repeat their names, spelled the same, in the same
/// order, so a name spelled as the one at its place last time is taken from here, not checked
/// again (a comparison of a few bytes against a parse). The lists keep their allocations from
/// one message to the next.
#[derive(Default)]
pub(crate) struct Names {
    known: Vec<Option<(Box<[u8]>, Name)>>,
    /// Fields of the message seen so far, kept or not.
    seen: usize,
    /// The message's kept fields: their names and where their values lie in its head.
    kept: Vec<(HeaderName, Range<usize>)>,
    /// A kept `Connection` field names fields that end at this hop.
    names_hops: bool,
}

impl Names {
    /// Starts a new message.
    pub fn clear(&mut self) {
        self.seen = 0;
        self.kept.clear();
        self.names_hops = false;
    }

    /// The name of the message's next field, checked; `Err` when it is not a valid one.
    #[inline]
    pub fn next(&mut self, raw: &str) -> Result<Name, ()> {
        let at = self.seen;
        self.seen += 1;
        if let Some(Some((spelled, name))) = self.known.get(at)
            && **spelled == *raw.as_bytes()
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw.as_bytes()).map_err(|_| ())?;
        let name = Name {
            hop: ends_at_hop(&name),
            name,
        };
        if at < KEPT_PLACES {
            let entry = (raw.len() <= KEPT_NAME).then(|| (Box::from(raw.as_bytes()), name.clone()));
            if at >= self.known.len() {
                self.known.resize(at + 1, None);
            }
            self.known[at] = entry;
        }
        Ok(name)
    }

    /// Keeps a field of the message, its value at `value` in the head, unless it ends at this
    /// hop: so a message's hop-by-hop fields are gone without a pass over its map (whether a
    /// name is one was worked out when it was checked). A `Connection` field that names other
    /// fields is kept all the same, and the map stripped once built: the fields it names may
    /// come before it.
    #[inline]
    pub fn keep(&mut self, name: Name, value: Range<usize>) {
        if name.hop {
            if name.name != CONNECTION {
                return;
            }
            self.names_hops = true;
        }
        self.kept.push((name.name, value));
    }

    /// Moves the kept fields into `headers`, each value a slice of `head` (the head, frozen
    /// into one shared buffer): no copy, no allocation and no second check a value. The map
    /// holds no field that ends at this hop.
    ///
    /// The values must be ones httparse accepted (with its default config): it takes in a
    /// value exactly the bytes a `HeaderValue` may hold (tab, 0x20 to 0x7e, 0x80 to 0xff), which
    /// `httparse_and_http_agree_on_the_bytes_of_a_value` checks byte by byte.
    #[inline]
    pub fn append_to(&mut self, headers: &mut HeaderMap, head: &Bytes) {
        for (name, at) in self.kept.drain(..) {
            // SAFETY: the value's bytes were checked by httparse, which accepts no byte that a
            // `HeaderValue` refuses (see above); debug builds check them again and panic.
            let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(at)) };
            headers.append(name, value);
        }
        if std::mem::take(&mut self.names_hops) {
            strip_hop_by_hop(headers);
        }
    }

    /// How many fields are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}

/// A checked field name, and whether the field ends at this hop ([`ends_at_hop`]).
#[derive(Clone)]
pub(crate) struct Name {
    pub name: HeaderName,
    pub hop: bool,
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Nineteen digits always fit in a u64.
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(fields: &[(HeaderName, &str)]) -> (Fields, Vec<Result<bool, Error>>) {
        let mut f = Fields::default();
        let results = fields
            .iter()
            .map(|(name, value)| f.note(name, value.as_bytes()))
            .collect();
        (f, results)
    }

    #[test]
    fn a_connection_field_that_only_frames_is_not_kept_and_one_naming_fields_is() {
        for value in ["keep-alive", "Keep-Alive ", " close", "keep-alive, close"] {
            let (f, r) = noted(&[(CONNECTION, value)]);
            let only = value.trim().eq_ignore_ascii_case("keep-alive")
                || value.trim().eq_ignore_ascii_case("close");
            assert_eq!(r[0].as_ref().ok(), Some(&only), "{value:?}");
            assert!(f.keep_alive || f.close, "{value:?}");
        }
        let (f, r) = noted(&[(CONNECTION, "Upgrade, close")]);
        assert_eq!(r[0].as_ref().ok(), Some(&false));
        assert!(f.close && !f.keep_alive);
    }

    #[test]
    fn content_length_is_one_number_or_a_list_of_equal_ones() {
        let (f, r) = noted(&[(CONTENT_LENGTH, "42")]);
        assert!(r[0].is_ok());
        assert_eq!(f.length, Some(42));
        let (f, r) = noted(&[(CONTENT_LENGTH, "7, 7"), (CONTENT_LENGTH, "7")]);
        assert!(r.iter().all(Result::is_ok));
        assert_eq!(f.length, Some(7));
        let (_, r) = noted(&[(CONTENT_LENGTH, "42"), (CONTENT_LENGTH, "43")]);
        assert!(r[1].as_ref().unwrap_err().contains("conflicting"));
        for bad in ["", "4 2", "-1", "0x10", "18446744073709551616", "42,"] {
            let (_, r) = noted(&[(CONTENT_LENGTH, bad)]);
            assert!(
                r[0].as_ref()
                    .unwrap_err()
                    .contains("invalid Content-Length"),
                "{bad:?}"
            );
        }
        let (f, _) = noted(&[(CONTENT_LENGTH, "9999999999999999999")]);
        assert_eq!(f.length, Some(9_999_999_999_999_999_999));
    }

    #[test]
    fn transfer_coding_is_chunked_when_its_last_coding_is() {
        let (f, _) = noted(&[(TRANSFER_ENCODING, "gzip, Chunked")]);
        assert!(f.coded && f.chunked);
        let (f, _) = noted(&[(TRANSFER_ENCODING, "chunked, gzip")]);
        assert!(f.coded && !f.chunked);
    }

    #[test]
    fn httparse_and_http_agree_on_the_bytes_of_a_value() {
        // `Names::append_to` takes what httparse accepted as a valid `HeaderValue` unchecked.
        // Each byte alone and in a long value (which httparse scans with SIMD where it can).
        for pad in [1, 70] {
            let around = vec![b'a'; pad];
            for b in 0..=255u8 {
                let value = [&around[..], &[b], &around[..]].concat();
                let head = [b"HTTP/1.1 200 OK\r\nx-v: ", &value[..], b"\r\n\r\n"].concat();
                let mut fields = [httparse::EMPTY_HEADER; 4];
                let mut parsed = httparse::Response::new(&mut fields);
                let by_httparse = matches!(parsed.parse(&head), Ok(httparse::Status::Complete(_)));
                // A bare CR or LF ends or breaks the line: httparse refuses it, and http too.
                let by_http = HeaderValue::from_bytes(&value).is_ok();
                assert_eq!(by_httparse, by_http, "byte {b:#04x} in {pad}");
            }
        }
    }
}
