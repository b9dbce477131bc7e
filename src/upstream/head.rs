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

/// The header names of a connection's last message, in order, each as it was spelled and as
/// checked, and where the kept fields of the message being parsed lie in its head. One peer's
/// messages mostly repeat their names, spelled the same, in the same order, so a name spelled
/// as the one at its place last time is taken from here, not checked again (a comparison of a
/// few bytes against a parse); and the list of values keeps its allocation from one message to
/// the next.
#[derive(Default)]
pub(crate) struct Names {
    names: Vec<(Box<[u8]>, HeaderName)>,
    values: Vec<Range<usize>>,
}

impl Names {
    /// Starts a new message.
    pub fn clear(&mut self) {
        self.values.clear();
    }

    /// The name of the message's next field, checked; `Err` when it is not a valid one.
    #[inline]
    pub fn next(&mut self, raw: &str) -> Result<&HeaderName, ()> {
        let at = self.values.len();
        let same = self
            .names
            .get(at)
            .is_some_and(|(spelled, _)| **spelled == *raw.as_bytes());
        if !same {
            let name = HeaderName::from_bytes(raw.as_bytes()).map_err(|_| ())?;
            let entry = (Box::from(raw.as_bytes()), name);
            if at < self.names.len() {
                self.names[at] = entry;
            } else {
                self.names.push(entry);
            }
        }
        Ok(&self.names[at].1)
    }

    /// Keeps the field last named by [`Names::next`], its value at `value` in the head (the
    /// next name takes its place if it is not kept).
    #[inline]
    pub fn keep(&mut self, value: Range<usize>) {
        self.values.push(value);
    }

    /// Appends the kept fields to `headers`, each value a slice of `head` (the head, frozen
    /// into one shared buffer): no copy and no allocation a value. The error names a field
    /// whose value is not a valid one.
    #[inline]
    pub fn append_to(&self, headers: &mut HeaderMap, head: &Bytes) -> Result<(), HeaderName> {
        for ((_, name), at) in self.names.iter().zip(&self.values) {
            match HeaderValue::from_maybe_shared(head.slice(at.clone())) {
                Ok(value) => headers.append(name.clone(), value),
                Err(_) => return Err(name.clone()),
            };
        }
        Ok(())
    }

    /// How many fields are kept.
    pub fn len(&self) -> usize {
        self.values.len()
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}
