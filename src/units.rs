//! Human units in config: durations (`250ms`, `10s`, `1m`, `1h30m`, `1d`) and sizes (`64MiB`).

use std::time::Duration;

/// Parses a duration written as one or more `<number><unit>` parts: `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{text:?} is not a duration (write a number and a unit: 250ms, 10s, 1m, 1h30m, 1d)")
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad)?,
            "h" => n
                .checked_mul(3_600)
                .map(Duration::from_secs)
                .ok_or_else(bad)?,
            "d" => n
                .checked_mul(86_400)
                .map(Duration::from_secs)
                .ok_or_else(bad)?,
            "" => {
                return Err(format!(
                    "{text:?} has no unit: write it with one, e.g. \"{n}s\" (units: ms, s, m, h, d)"
                ));
            }
            _ => {
                let hint = match unit.trim().to_ascii_lowercase().as_str() {
                    "sec" | "secs" | "second" | "seconds" => format!(" (write {n}s)"),
                    "mins" | "minute" | "minutes" => format!(" (write {n}m)"),
                    "hr" | "hrs" | "hour" | "hours" => format!(" (write {n}h)"),
                    "day" | "days" => format!(" (write {n}d)"),
                    _ => String::new(),
                };
                return Err(format!(
                    "{text:?} is not a duration: unknown unit {:?}{hint}; units: ms, s, m (or min), h, d, e.g. 250ms, 10s, 1m, 1h30m, 1d",
                    unit.trim()
                ));
            }
        };
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Formats a duration in the largest units that represent it exactly (`90s` → `1m30s`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

/// Parses a byte size: a plain integer, or a number with `B`, `KB`, `MB`, `GB`, `KiB`, `MiB`,
/// `GiB`, `TiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad =
        || format!("{text:?} is not a size (write bytes or a number and a unit: 512KiB, 10MiB)");
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = s[..digits].parse().map_err(|_| bad())?;
    let factor: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

/// A byte size as written in a config: the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// Appends `n` in decimal (on paths that run for every request: no `format!`), two digits a
/// step: a count of millions takes four divisions instead of seven.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 10 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    // The first digit when the count of digits is odd, or zero itself.
    if n > 0 || at == digits.len() {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_full() {
        // Every number below 100,000, each power of ten and the numbers either side of it, and
        // the largest.
        let tens = (0..20).map(|i| 10u64.pow(i));
        let around = tens.flat_map(|t| [t - 1, t, t + 1]);
        for n in (0..100_000).chain(around).chain([u64::MAX]) {
            let mut s = b"x".to_vec();
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn durations_parse_in_every_unit_and_combination() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_explain_the_expected_form() {
        for bad in [
            "1 dya",
            "",
            "10",
            "m",
            "1x",
            "-1s",
            "1.5s",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(
                err.contains("is not a duration") || err.contains("has no unit: write it with one"),
                "{bad}: {err}"
            );
        }
        assert!(
            parse_duration("1 dya")
                .unwrap_err()
                .starts_with("\"1 dya\"")
        );
    }

    #[test]
    fn durations_format_round_trip() {
        for text in ["1m30s", "1d", "250ms", "2h", "0s", "1d1h1m1s1ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn sizes_format_in_the_largest_unit_that_divides_them() {
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(3 << 20), "3MiB");
        assert_eq!(parse_size(&format_size(5 << 40)), Ok(5 << 40));
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10 parsecs").is_err());
    }
}
