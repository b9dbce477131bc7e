//! Client identity: which integration a request belongs to, by config rules on a header, the
//! User-Agent, a credential fingerprint or the source address. Unmatched requests are `default`.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{HeaderName, USER_AGENT};

use crate::queue::Fingerprint;

/// Index of a client in the config's `clients` (the built-in `default` is always present).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientId(pub usize);

/// Name of the client that unmatched requests belong to.
pub const DEFAULT_CLIENT: &str = "default";

/// A validated client: how to recognize it and how much of a contended quota it gets.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub weight: u32,
    /// All must hold; no rules (only `default`) matches nothing.
    pub rules: Vec<Rule>,
    /// Quota name → most calls per window.
    pub caps: Vec<(String, u32)>,
}

/// One condition of a client's `match`.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    Header {
        name: HeaderName,
        value: String,
    },
    /// `*` matches any run of characters.
    UserAgent(String),
    /// The credential's fingerprint (32 hex digits), see `crm-quota-proxy fingerprint`.
    Credential(String),
    Source(Cidr),
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

/// What a request offers for identification.
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub source: IpAddr,
    pub fingerprint: Option<Fingerprint>,
}

impl Rule {
    fn holds(&self, caller: &Caller<'_>) -> bool {
        match self {
            Rule::Header { name, value } => caller
                .headers
                .get(name)
                .is_some_and(|v| v.as_bytes() == value.as_bytes()),
            Rule::UserAgent(pattern) => caller
                .headers
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ua| glob(pattern, ua)),
            Rule::Credential(hex) => caller.fingerprint.is_some_and(|f| f.to_hex() == *hex),
            Rule::Source(net) => net.contains(caller.source),
        }
    }
}

/// The configured clients, `default` last.
#[derive(Debug, Clone)]
pub struct Clients {
    list: Vec<ClientConfig>,
}

impl Clients {
    /// `list` must end with the `default` client (config validation guarantees it).
    pub fn new(list: Vec<ClientConfig>) -> Clients {
        debug_assert_eq!(list.last().map(|c| c.name.as_str()), Some(DEFAULT_CLIENT));
        Clients { list }
    }

    /// The first client whose every rule holds, else `default`.
    pub fn identify(&self, caller: &Caller<'_>) -> ClientId {
        let matched = self
            .list
            .iter()
            .position(|c| !c.rules.is_empty() && c.rules.iter().all(|r| r.holds(caller)));
        ClientId(matched.unwrap_or(self.list.len() - 1))
    }

    /// Whether identification needs the credential's fingerprint.
    pub fn needs_fingerprint(&self) -> bool {
        self.list
            .iter()
            .any(|c| c.rules.iter().any(|r| matches!(r, Rule::Credential(_))))
    }

    pub fn get(&self, id: ClientId) -> &ClientConfig {
        &self.list[id.0]
    }

    pub fn all(&self) -> &[ClientConfig] {
        &self.list
    }

    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|c| c.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_first_client_whose_rules_all_hold_wins_else_default() {
        let mut h = HeaderMap::new();
        h.insert("x-client-id", "ccai".parse().unwrap());
        h.insert(USER_AGENT, "Reporting/1.0".parse().unwrap());
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer secret".parse().unwrap(),
        );
        let fp = Fingerprint::of(&h);
        let clients = Clients::new(vec![
            ClientConfig {
                name: "both".into(),
                weight: 1,
                rules: vec![
                    Rule::Header {
                        name: HeaderName::from_static("x-client-id"),
                        value: "ccai".into(),
                    },
                    Rule::Source(Cidr::parse("192.168.0.0/16").unwrap()),
                ],
                caps: vec![],
            },
            ClientConfig {
                name: "ccai".into(),
                weight: 3,
                rules: vec![Rule::Credential(fp.to_hex())],
                caps: vec![],
            },
            ClientConfig {
                name: "default".into(),
                weight: 1,
                rules: vec![],
                caps: vec![],
            },
        ]);
        let caller = |source: &str, fingerprint| Caller {
            headers: &h,
            source: source.parse().unwrap(),
            fingerprint,
        };
        assert_eq!(
            clients.identify(&caller("192.168.3.4", Some(fp))),
            ClientId(0)
        );
        assert_eq!(clients.identify(&caller("10.0.0.1", Some(fp))), ClientId(1));
        assert_eq!(clients.identify(&caller("10.0.0.1", None)), ClientId(2));
        assert!(clients.needs_fingerprint());
    }
}
