//! An HTTP/1.1 body's framing, decoded as it arrives, for the CRM's answers and the clients'
//! requests alike: a counted body's pieces, and a chunked body (RFC 9112 §7.1): chunk sizes and
//! their extensions, the data, and the trailer section, which is read and dropped.

use bytes::{Buf, Bytes, BytesMut};

/// What a malformed body is reported as: a message naming the fault.
type Error = String;

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, so many bytes left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailer section (ended by an empty line).
    Trailers,
}

/// Lines of a chunked body's framing (size lines, trailer fields) may take this much.
const MAX_LINE: usize = 8 * 1024;

/// Decodes what `buf` holds of a chunked body: `Some(Some(data))` for a piece of it,
/// `Some(None)` at its end, `None` when more must be read first.
pub fn dechunk(buf: &mut BytesMut, state: &mut Chunk) -> Result<Option<Option<Bytes>>, Error> {
    loop {
        match state {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                // chunk-size [ chunk-ext ]: the extensions mean nothing to a proxy.
                let size = line[..].split(|&b| b == b';').next().unwrap_or_default();
                let size = parse_hex(size.trim_ascii()).ok_or("a chunk size is invalid")?;
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Some(Some(buf.split_to(n).freeze())));
            }
            Chunk::DataEnd => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                if !line.is_empty() {
                    return Err("a chunk's data runs past its size".into());
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                // Trailer fields are read and dropped: none of them matter to the answer.
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                if line.is_empty() {
                    return Ok(Some(None));
                }
            }
        }
    }
}

/// How the rest of a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// So many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (a response's only: a request's body is always delimited).
    Close,
}

/// Decodes what `buf` holds of a body framed by `framing`: `Some(Some(data))` for a piece of
/// it, `Some(None)` at its end, `None` when more must be read first. `framing` is brought up to
/// date.
#[inline]
pub fn decoded(buf: &mut BytesMut, framing: &mut Framing) -> Result<Option<Option<Bytes>>, Error> {
    Ok(match framing {
        Framing::Length(0) => Some(None),
        _ if buf.is_empty() => None,
        Framing::Length(left) => {
            let n = (*left).min(buf.len() as u64) as usize;
            *left -= n as u64;
            Some(Some(buf.split_to(n).freeze()))
        }
        Framing::Close => Some(Some(buf.split().freeze())),
        Framing::Chunked(state) => dechunk(buf, state)?,
    })
}

/// Takes one CRLF-ended line (without its CRLF) off the front of `buf`.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Error> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = buf.split_to(end);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("a line of the chunked body is too long".into()),
        None => Ok(None),
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed `step` bytes at a time, as reads would deliver it.
    fn dechunked(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let (mut buf, mut state, mut body) = (BytesMut::new(), Chunk::Size, Vec::new());
        let mut fed = 0;
        loop {
            match dechunk(&mut buf, &mut state)? {
                Some(Some(piece)) => body.extend_from_slice(&piece),
                Some(None) => return Ok((body, [&buf[..], &wire[fed..]].concat())),
                None if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                None => return Err("incomplete".into()),
            }
        }
    }

    #[test]
    fn a_chunked_body_is_decoded_however_it_is_split() {
        let wire = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = dechunked(wire, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(
                rest, b"NEXT",
                "what follows the body stays for the next answer"
            );
        }
        assert_eq!(dechunked(b"0\r\n\r\n", 1).unwrap().0, b"");
    }

    #[test]
    fn a_bad_chunked_body_is_named() {
        assert!(dechunked(b"zz\r\n", 4).unwrap_err().contains("chunk size"));
        assert!(
            dechunked(b"2\r\nabc\r\n0\r\n\r\n", 64)
                .unwrap_err()
                .contains("past its size")
        );
        assert!(
            dechunked(b"fffffffffffffffff\r\n", 64)
                .unwrap_err()
                .contains("chunk size")
        );
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(
            dechunked(&long, long.len())
                .unwrap_err()
                .contains("too long")
        );
        assert_eq!(dechunked(b"5\r\nhel", 64).unwrap_err(), "incomplete");
    }
}
