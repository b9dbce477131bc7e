//! The logs' record format and a small binary encoding for the payload's fields.
//!
//! A record is `magic "CQP2" | len: u32 | seq: u64 | crc32c: u32 | payload`, little-endian; the
//! CRC covers the magic, the length, the sequence number and the payload, so no run of zeros
//! (what a power loss can leave) passes for a record, and a reader that meets a damaged record
//! finds the next good one by its magic and continues. Sequence numbers only grow: a record
//! whose number is not above the last one read is a duplicate or out of order, and is skipped.
//! Logs written before this format (`len | crc | payload`) are still read (see [`parse`]).

use std::ops::Range;

/// CRC-32C (Castagnoli), the checksum of every record.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// Runs the CRC-32C register (not inverted) over `data`: several slices checksum as one.
fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2, checked just above.
        return unsafe { crc32c_sse42(crc, data) };
    }
    crc32c_table(crc, data)
}

/// CRC-32C with the SSE4.2 `crc32` instruction, 8 bytes at a time (recovery reads the whole log).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc = u64::from(crc);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut crc = crc as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    crc
}

/// CRC-32C a byte at a time through a table (any CPU).
fn crc32c_table(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// The first bytes of every record.
pub const MAGIC: [u8; 4] = *b"CQP2";

/// Bytes before a record's payload.
pub const HEADER: usize = 20;

/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
pub const MAX_RECORD: usize = 256 << 20;

/// Appends one framed record to `out`.
pub fn frame(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    let crc = record_crc(&out[start..start + 16], payload);
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

fn record_crc(head: &[u8], payload: &[u8]) -> u32 {
    !crc32c_update(crc32c_update(!0, head), payload)
}

/// The record at the start of `data`, if one is whole and intact: its sequence number, its
/// payload and its length with the header.
fn record_at(data: &[u8]) -> Option<(u64, &[u8], usize)> {
    if data.len() < HEADER || data[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(data[4..8].try_into().ok()?) as usize;
    if len > MAX_RECORD || data.len() - HEADER < len {
        return None;
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(data[16..20].try_into().ok()?);
    let payload = &data[HEADER..HEADER + len];
    (record_crc(&data[..16], payload) == crc).then_some((seq, payload, HEADER + len))
}

/// What a log holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The good records in order: sequence number, payload, and where the record starts.
    pub records: Vec<(u64, &'a [u8], usize)>,
    /// Byte ranges that held no good record (damaged, duplicated or out of order) between good
    /// ones: skipped.
    pub damaged: Vec<Range<usize>>,
    /// Where the last good record ends: what follows is a torn tail (a write the crash cut).
    pub end: usize,
    /// The log was in the format before sequence numbers; its records got numbers 1, 2, ...
    pub legacy: bool,
}

impl Parsed<'_> {
    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.0)
    }
}

/// Reads a log: every good record, resynchronising past damaged bytes. A log in the earlier
/// format (no magic) is read up to its first bad record, as that format allows no more.
pub fn parse(data: &[u8]) -> Parsed<'_> {
    if !data.is_empty() && !data.starts_with(&MAGIC) {
        let (payloads, valid) = unframe_legacy(data);
        if valid > 0 {
            let mut at = 0;
            let records = payloads
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let r = (i as u64 + 1, p, at);
                    at += 8 + p.len();
                    r
                })
                .collect();
            return Parsed {
                records,
                damaged: Vec::new(),
                end: valid,
                legacy: true,
            };
        }
    }
    let mut out = Parsed::default();
    let mut at = 0;
    // Where skipped bytes began, while looking for the next good record.
    let mut skipping: Option<usize> = None;
    while at < data.len() {
        match record_at(&data[at..]) {
            Some((seq, payload, len)) if seq > out.last_seq() => {
                if let Some(from) = skipping.take() {
                    out.damaged.push(from..at);
                }
                out.records.push((seq, payload, at));
                at += len;
                out.end = at;
            }
            Some((_, _, len)) => {
                // A duplicate or a record out of order: skipped whole.
                skipping.get_or_insert(at);
                at += len;
            }
            None => {
                skipping.get_or_insert(at);
                at = match find(&data[at + 1..], &MAGIC) {
                    Some(i) => at + 1 + i,
                    None => data.len(),
                };
            }
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The format before sequence numbers: `len | crc | payload`; stops at the first bad record.
fn unframe_legacy(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD || data.len() - at - 8 < len {
            break;
        }
        let payload = &data[at + 8..at + 8 + len];
        if crc32c(payload) != crc {
            break;
        }
        records.push(payload);
        at += 8 + len;
    }
    (records, at)
}

/// Builds a payload field by field.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u8(1).str(s),
            None => self.u8(0),
        }
    }
}

/// Reads a payload field by field; every read fails cleanly on short or malformed input.
pub struct Reader<'a> {
    data: &'a [u8],
}

/// A payload that does not decode (a bug or a foreign file, not a torn write: those fail the CRC).
#[derive(Debug, thiserror::Error)]
#[error("malformed log record")]
pub struct Malformed;

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.data.len() < n {
            return Err(Malformed);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Malformed)
    }
    pub fn opt_str(&mut self) -> Result<Option<&'a str>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err(Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value from RFC 3720 / the CRC catalogue: "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // Every path agrees, on lengths around the 8-byte steps.
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 999, 1000] {
            assert_eq!(
                crc32c(&data[..len]),
                !crc32c_table(!0, &data[..len]),
                "{len}"
            );
            let (a, b) = data[..len].split_at(len / 3);
            assert_eq!(
                crc32c(&data[..len]),
                !crc32c_update(crc32c_update(!0, a), b)
            );
        }
    }

    fn log(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            frame(i as u64 + 1, p, &mut out);
        }
        out
    }

    fn payloads<'a>(p: &Parsed<'a>) -> Vec<&'a [u8]> {
        p.records.iter().map(|r| r.1).collect()
    }

    #[test]
    fn a_damaged_record_is_skipped_and_reading_goes_on() {
        let data = log(&[b"one", b"two", b"three"]);
        let second = HEADER + 3;
        // A flipped bit in the second record's payload: only it is lost.
        let mut flipped = data.clone();
        flipped[second + HEADER] ^= 0x40;
        let p = parse(&flipped);
        assert_eq!(payloads(&p), vec![&b"one"[..], &b"three"[..]]);
        assert_eq!(p.damaged, vec![second..second + HEADER + 3]);
        assert_eq!(p.end, data.len());
        // Its length field garbled: the same.
        let mut garbled = data.clone();
        garbled[second + 4..second + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(payloads(&parse(&garbled)), vec![&b"one"[..], &b"three"[..]]);
        // The very first byte flipped.
        let mut first = data.clone();
        first[0] ^= 1;
        assert_eq!(payloads(&parse(&first)), vec![&b"two"[..], &b"three"[..]]);
    }

    #[test]
    fn torn_tails_and_zeros_end_the_log_without_losing_a_record() {
        let data = log(&[b"one", b"two"]);
        let torn = &data[..data.len() - 2];
        let p = parse(torn);
        assert_eq!(payloads(&p), vec![&b"one"[..]]);
        assert_eq!(p.end, HEADER + 3);
        assert!(p.damaged.is_empty(), "a tail is not damage between records");
        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 8]);
        let p = parse(&zeros);
        assert_eq!(payloads(&p), vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(p.end, data.len());
        assert_eq!(parse(&[0; 64]).records, vec![], "zeros are no record");
    }

    #[test]
    fn duplicated_and_swapped_records_are_skipped() {
        let mut data = Vec::new();
        frame(1, b"a", &mut data);
        frame(2, b"b", &mut data);
        frame(2, b"b", &mut data);
        frame(4, b"d", &mut data);
        frame(3, b"c", &mut data);
        frame(5, b"e", &mut data);
        let p = parse(&data);
        assert_eq!(
            p.records.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 4, 5]
        );
        assert_eq!(p.damaged.len(), 2);
    }

    #[test]
    fn the_format_before_sequence_numbers_is_still_read() {
        let mut old = Vec::new();
        for p in [&b"one"[..], b"two"] {
            old.extend_from_slice(&(p.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32c(p).to_le_bytes());
            old.extend_from_slice(p);
        }
        let p = parse(&old);
        assert!(p.legacy);
        assert_eq!(payloads(&p), vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(p.last_seq(), 2);
        assert_eq!(p.end, old.len());
    }

    #[test]
    fn fields_round_trip_and_short_input_is_an_error() {
        let mut w = Writer::default();
        w.u8(7)
            .u16(300)
            .u32(70_000)
            .u64(1 << 40)
            .str("héllo")
            .opt_str(None)
            .opt_str(Some("x"))
            .bytes(&[0, 1, 2]);
        let mut r = Reader::new(&w.0);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u16().unwrap(), 300);
        assert_eq!(r.u32().unwrap(), 70_000);
        assert_eq!(r.u64().unwrap(), 1 << 40);
        assert_eq!(r.str().unwrap(), "héllo");
        assert_eq!(r.opt_str().unwrap(), None);
        assert_eq!(r.opt_str().unwrap(), Some("x"));
        assert_eq!(r.bytes().unwrap(), &[0, 1, 2]);
        assert!(r.u8().is_err());
        assert!(Reader::new(&[5, 0, 0, 0, 1]).bytes().is_err());
    }
}
