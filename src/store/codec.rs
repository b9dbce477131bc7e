//! The write-ahead log's record format: `len: u32 | crc32c: u32 | payload`, all little-endian,
//! and a small binary encoding for the payload's fields.

/// CRC-32C (Castagnoli), the checksum of every record.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2, checked just above.
        return unsafe { crc32c_sse42(data) };
    }
    crc32c_table(data)
}

/// CRC-32C with the SSE4.2 `crc32` instruction, 8 bytes at a time (recovery reads the whole log).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc = u64::from(!0u32);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut crc = crc as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

/// CRC-32C a byte at a time through a table (any CPU).
fn crc32c_table(data: &[u8]) -> u32 {
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
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Appends one framed record to `out`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
pub const MAX_RECORD: usize = 256 << 20;

/// Splits a log into its valid records; stops at the first torn or corrupt one. Returns the
/// payloads and the length of the valid prefix.
pub fn unframe(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || data.len() - at - 8 < len {
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
            assert_eq!(crc32c(&data[..len]), crc32c_table(&data[..len]), "{len}");
        }
    }

    #[test]
    fn a_torn_or_flipped_tail_stops_reading_at_the_last_good_record() {
        let mut log = Vec::new();
        frame(b"one", &mut log);
        frame(b"two", &mut log);
        let good = log.len();
        frame(b"three", &mut log);
        // Torn: the last record is cut short.
        let (records, valid) = unframe(&log[..log.len() - 2]);
        assert_eq!(records, vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(valid, good);
        // Corrupt: a flipped bit in the last payload.
        let last = log.len() - 1;
        log[last] ^= 0x40;
        let (records, valid) = unframe(&log);
        assert_eq!(records.len(), 2);
        assert_eq!(valid, good);
        // A garbage length does not allocate or panic.
        let (records, valid) = unframe(&[0xFF, 0xFF, 0xFF, 0x7F, 0, 0, 0, 0, 1, 2]);
        assert!(records.is_empty());
        assert_eq!(valid, 0);
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
