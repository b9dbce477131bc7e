//! Matching requests against config: path patterns (`/api/v2/tickets/{id}.json`, `*`, `**`),
//! IP networks (CIDR) and `*` globs.

use std::fmt;
use std::net::IpAddr;

/// One segment of a path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// `{name}` with optional literal text around it, e.g. `{id}.json`: one non-empty segment.
    Param {
        prefix: String,
        name: String,
        suffix: String,
    },
    /// `*`: any one segment.
    Any,
    /// `**` (last only): zero or more remaining segments.
    Rest,
}

/// A path pattern such as `/api/v2/tickets/{id}.json` or `/api/v2/**`.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with '/'"));
        };
        if text.contains('?') || text.contains('#') {
            return Err(format!(
                "{text:?} must be a path only (queries are not matched)"
            ));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("{text:?}: '**' may only be the last segment")),
                "*" => Segment::Any,
                p if p.contains('{') || p.contains('}') => parse_param(text, p)?,
                p if p.contains('*') => {
                    return Err(format!(
                        "{text:?}: '*' must be a whole segment (use {{name}} to capture part of one)"
                    ));
                }
                p => Segment::Literal(p.to_ascii_lowercase()),
            };
            segments.push(seg);
        }
        Ok(PathPattern {
            text: text.to_string(),
            segments,
        })
    }

    /// The named parameters this path carries, or `None` when the path does not match. Literal
    /// text matches without regard to ASCII case (patterns are kept lower-case); `path` is meant
    /// to be in canonical form (`crate::path`), which is lower-case.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        let mut caps = Vec::new();
        self.walk(path, |name, value| caps.push((name, value)))
            .then_some(caps)
    }

    /// Goes along `path` segment by segment, handing each `{param}`'s name and value to
    /// `param`; whether the whole path matches. Segments are cut at each `/` byte (a plain
    /// loop over a few bytes: `str::split` costs more than the match on paths this short).
    fn walk<'s, 'p>(&'s self, path: &'p str, mut param: impl FnMut(&'s str, &'p str)) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut ended = false;
        for seg in &self.segments {
            if let Segment::Rest = seg {
                return true;
            }
            if ended {
                return false;
            }
            let part = match rest.bytes().position(|b| b == b'/') {
                Some(slash) => {
                    let part = &rest[..slash];
                    rest = &rest[slash + 1..];
                    part
                }
                None => {
                    ended = true;
                    rest
                }
            };
            match seg {
                Segment::Literal(lit) if lit == part => {}
                Segment::Any if !part.is_empty() => {}
                Segment::Param {
                    prefix,
                    name,
                    suffix,
                } => {
                    let Some(value) = part
                        .strip_prefix(prefix.as_str())
                        .and_then(|v| v.strip_suffix(suffix.as_str()))
                        .filter(|v| !v.is_empty())
                    else {
                        return false;
                    };
                    param(name, value);
                }
                _ => return false,
            }
        }
        ended
    }

    /// The names of the `{param}` segments.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param { name, .. } => Some(name.as_str()),
            _ => None,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, |_, _| {})
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

fn parse_param(pattern: &str, part: &str) -> Result<Segment, String> {
    let bad =
        || format!("{pattern:?}: segment {part:?} must hold one {{name}} (letters, digits, '_')");
    let open = part.find('{').ok_or_else(bad)?;
    let close = part.find('}').ok_or_else(bad)?;
    if close < open || part[close + 1..].contains(['{', '}']) || part[..open].contains('}') {
        return Err(bad());
    }
    let name = &part[open + 1..close];
    let valid_name = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid_name {
        return Err(bad());
    }
    Ok(Segment::Param {
        prefix: part[..open].to_ascii_lowercase(),
        name: name.to_string(),
        suffix: part[close + 1..].to_ascii_lowercase(),
    })
}

/// An IP network, e.g. `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not a network (write e.g. 10.0.0.0/8 or 2001:db8::/32)");
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client may reach a dual-stack listener as an IPv4-mapped IPv6 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(u32::from(n)), u128::from(u32::from(i)), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (net >> shift) == (ip >> shift)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn literal_and_param_segments_match_whole_paths() {
        let pat = p("/api/v2/tickets/{id}.json");
        assert_eq!(
            pat.captures("/api/v2/tickets/123.json"),
            Some(vec![("id", "123")])
        );
        assert!(!pat.matches("/api/v2/tickets/.json"));
        assert!(!pat.matches("/api/v2/tickets/123"));
        assert!(!pat.matches("/api/v2/tickets/123.json/comments"));
        assert!(p("/api/v2/tickets").matches("/api/v2/tickets"));
        assert!(!p("/api/v2/tickets").matches("/api/v2/tickets/"));
        assert!(!p("/api/v2/tickets").matches("/api/v2/ticketsX"));
    }

    #[test]
    fn wildcards_match_one_or_the_rest() {
        assert!(p("/api/*/search").matches("/api/v2/search"));
        assert!(!p("/api/*/search").matches("/api//search"));
        let rest = p("/api/v2/**");
        assert!(rest.matches("/api/v2/"));
        assert!(rest.matches("/api/v2"));
        assert!(rest.matches("/api/v2/a/b/c"));
        assert!(!rest.matches("/api/v3/a"));
        assert!(p("/**").matches("/anything/at/all"));
    }

    /// The captures of `pat` on `path` as the pattern reads, cut with `str::split` (the form
    /// the segment walk replaced).
    fn split_captures<'a>(pat: &'a PathPattern, path: &'a str) -> Option<Vec<(&'a str, &'a str)>> {
        let mut caps = Vec::new();
        let mut parts = path.strip_prefix('/')?.split('/');
        for seg in &pat.segments {
            if *seg == Segment::Rest {
                return Some(caps);
            }
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) if lit == part => {}
                Segment::Any if !part.is_empty() => {}
                Segment::Param {
                    prefix,
                    name,
                    suffix,
                } => {
                    let value = part.strip_prefix(prefix.as_str())?;
                    let value = value.strip_suffix(suffix.as_str())?;
                    (!value.is_empty()).then_some(())?;
                    caps.push((name.as_str(), value));
                }
                _ => return None,
            }
        }
        parts.next().is_none().then_some(caps)
    }

    proptest::proptest! {
        #[test]
        fn the_segment_walk_reads_paths_as_split_segments_do(
            path in "/?[a-c/.]{0,12}",
            pattern in proptest::sample::select(vec![
                "/", "/a", "/a/", "/a/b", "/a/*", "/*/b", "/a/**", "/**", "/a/{x}", "/{x}.b/**",
                "/a/{x}/{y}", "/a/b{x}c", "/*/*/*",
            ]),
        ) {
            let pat = p(pattern);
            proptest::prop_assert_eq!(pat.captures(&path), split_captures(&pat, &path));
            proptest::prop_assert_eq!(pat.matches(&path), split_captures(&pat, &path).is_some());
        }
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(
            PathPattern::parse("api")
                .unwrap_err()
                .contains("start with '/'")
        );
        assert!(
            PathPattern::parse("/a/**/b")
                .unwrap_err()
                .contains("last segment")
        );
        assert!(
            PathPattern::parse("/a/x*")
                .unwrap_err()
                .contains("whole segment")
        );
        assert!(PathPattern::parse("/a/{}").unwrap_err().contains("{name}"));
        assert!(PathPattern::parse("/a/{id").unwrap_err().contains("{name}"));
        assert!(
            PathPattern::parse("/a/{a}{b}")
                .unwrap_err()
                .contains("{name}")
        );
        assert!(
            PathPattern::parse("/a?x=1")
                .unwrap_err()
                .contains("path only")
        );
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("192.168.1.7")
                .unwrap()
                .contains("192.168.1.7".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "ten/8", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("UJET/*", "UJET/5.2 (ccai)"));
        assert!(glob("*ccai*", "UJET/5.2 (ccai)"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c-y-b"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("*", ""));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix may not overlap");
    }
}
