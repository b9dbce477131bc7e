//! Client identity: which integration a request belongs to, by config rules on a header, the
//! User-Agent, a credential fingerprint or the source address. Unmatched requests are `default`.

use std::net::IpAddr;
use std::sync::OnceLock;

use http::HeaderMap;
use http::header::USER_AGENT;

use crate::config::{ClientConfig, DEFAULT_CLIENT, Rule};
use crate::ids::{ClientId, Fingerprint};
use crate::matching::glob;
use crate::metrics::{ClientSeries, Metrics};

/// What a request offers for identification.
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub source: IpAddr,
    pub fingerprint: Option<Fingerprint>,
}

/// Whether one rule of a client's `match` holds for the caller.
fn holds(rule: &Rule, caller: &Caller<'_>) -> bool {
    match rule {
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

/// The configured clients, `default` last.
#[derive(Debug, Clone)]
pub struct Clients {
    list: Vec<ClientConfig>,
    /// Each client's metric series in the proxy's registry, looked up at its first request.
    series: Vec<OnceLock<ClientSeries>>,
}

impl Clients {
    /// `list` must end with the `default` client (config validation guarantees it).
    pub fn new(list: Vec<ClientConfig>) -> Clients {
        debug_assert_eq!(list.last().map(|c| c.name.as_str()), Some(DEFAULT_CLIENT));
        let series = list.iter().map(|_| OnceLock::new()).collect();
        Clients { list, series }
    }

    /// The first client whose every rule holds, else `default`.
    pub fn identify(&self, caller: &Caller<'_>) -> ClientId {
        let matched = self
            .list
            .iter()
            .position(|c| !c.rules.is_empty() && c.rules.iter().all(|r| holds(r, caller)));
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

    /// Client `id`'s metric series (looked up in `metrics` the first time).
    pub fn series(&self, id: ClientId, metrics: &Metrics) -> &ClientSeries {
        self.series[id.0].get_or_init(|| metrics.client_series(&self.list[id.0].name))
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
    use crate::matching::Cidr;
    use http::header::HeaderName;

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
