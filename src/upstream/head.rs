//! What both HTTP/1.1 parsers (the CRM's answers, the clients' requests) note of a head as
//! they check its names: the fields that frame the message, where each kept value lies, and the
//! names a connection's last message had.

use std::ops::Range;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::http1::Error;
use crate::message::only_framing;

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
            for item in items() {
                self.close |= item.eq_ignore_ascii_case(b"close");
                self.keep_alive |= item.eq_ignore_ascii_case(b"keep-alive");
            }
            return Ok(only_framing(value.trim_ascii()));
        }
        if *name == TRANSFER_ENCODING {
            self.coded = true;
            if let Some(last) = items().rfind(|t| !t.is_empty()) {
                self.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if *name == CONTENT_LENGTH {
            for item in items() {
                let n = parse_decimal(item).ok_or_else(|| {
                    format!(
                        "an invalid Content-Length {:?}",
                        String::from_utf8_lossy(value)
                    )
                })?;
                if self.length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length values".into());
                }
                self.length = Some(n);
            }
        }
        Ok(false)
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
/// spelled and as checked; and the kept fields of the message being parsed. One peer's
/// messages mostly repeat their names, spelled the same, in the same order, so a name spelled
/// as the one at its place last time is taken from here, not checked again (a comparison of a
/// few bytes against a parse). The lists keep their allocations from one message to the next.
#[derive(Default)]
pub(crate) struct Names {
    known: Vec<Option<(Box<[u8]>, HeaderName)>>,
    /// Fields of the message seen so far, kept or not.
    seen: usize,
    /// The message's kept fields: their names and where their values lie in its head.
    kept: Vec<(HeaderName, Range<usize>)>,
}

impl Names {
    /// Starts a new message.
    pub fn clear(&mut self) {
        self.seen = 0;
        self.kept.clear();
    }

    /// The name of the message's next field, checked; `Err` when it is not a valid one.
    #[inline]
    pub fn next(&mut self, raw: &str) -> Result<HeaderName, ()> {
        let at = self.seen;
        self.seen += 1;
        if let Some(Some((spelled, name))) = self.known.get(at)
            && **spelled == *raw.as_bytes()
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw.as_bytes()).map_err(|_| ())?;
        if at < KEPT_PLACES {
            let entry = (raw.len() <= KEPT_NAME).then(|| (Box::from(raw.as_bytes()), name.clone()));
            if at >= self.known.len() {
                self.known.resize(at + 1, None);
            }
            self.known[at] = entry;
        }
        Ok(name)
    }

    /// Keeps a field of the message, its value at `value` in the head.
    #[inline]
    pub fn keep(&mut self, name: HeaderName, value: Range<usize>) {
        self.kept.push((name, value));
    }

    /// Moves the kept fields into `headers`, each value a slice of `head` (the head, frozen
    /// into one shared buffer): no copy and no allocation a value. The error names a field
    /// whose value is not a valid one.
    #[inline]
    pub fn append_to(&mut self, headers: &mut HeaderMap, head: &Bytes) -> Result<(), HeaderName> {
        for (name, at) in self.kept.drain(..) {
            match HeaderValue::from_maybe_shared(head.slice(at)) {
                Ok(value) => headers.append(name, value),
                Err(_) => return Err(name),
            };
        }
        Ok(())
    }

    /// How many fields are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}
