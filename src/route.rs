//! The route table: path patterns, and classification of a request into a route with its quotas and lane.

use std::fmt;
use std::time::Duration;

use http::Method;

use crate::config::{BatchConfig, Class, Config, KeyPart, OnLimit, QuotaScope};
use crate::forward::Outbound;
use crate::quota::QuotaId;

/// Index of a route in the table; `RouteTable::DEFAULT_*` are the two built-in defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteId(pub usize);

/// A lane is the set of quotas a request consumes; parked writes of one lane leave in arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneId(pub usize);

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
                p => Segment::Literal(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(PathPattern {
            text: text.to_string(),
            segments,
        })
    }

    /// The named parameters this path carries, or `None` when the path does not match.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        let mut caps = Vec::new();
        let rest = path.strip_prefix('/')?;
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return Some(caps),
                _ => {
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
                            if value.is_empty() {
                                return None;
                            }
                            caps.push((name.as_str(), value));
                        }
                        _ => return None,
                    }
                }
            }
        }
        parts.next().is_none().then_some(caps)
    }

    /// The names of the `{param}` segments.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param { name, .. } => Some(name.as_str()),
            _ => None,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.captures(path).is_some()
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
        prefix: part[..open].to_string(),
        name: name.to_string(),
        suffix: part[close + 1..].to_string(),
    })
}

/// A classified route: what a request of this kind may spend and what happens when it cannot.
#[derive(Debug)]
pub struct Route {
    pub id: RouteId,
    pub name: String,
    pub methods: Vec<Method>,
    pub paths: Vec<PathPattern>,
    pub class: Class,
    pub on_limit: OnLimit,
    pub max_wait: Duration,
    /// Every quota this route consumes (account-wide ones plus its own), sorted.
    pub quotas: Vec<QuotaId>,
    pub lane: LaneId,
    /// Send an `Idempotency-Key` (generated when the client sent none).
    pub idempotency_key: bool,
    /// Resend writes of unknown outcome even without an idempotency key.
    pub retry_ambiguous: bool,
    /// The keyed quotas among `quotas`, with the parts of their keys.
    pub keyed: Vec<(QuotaId, Vec<KeyPart>)>,
    /// Parked writes of this route share the CRM's batch calls (Zendesk).
    pub batch: Option<BatchConfig>,
}

impl Route {
    fn accepts(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.paths.iter().any(|p| p.matches(path))
    }

    /// Whether a request may be parked (its body is then buffered and it can wait in a lane).
    pub fn parks(&self) -> bool {
        self.on_limit != OnLimit::Reject
    }

    /// Whether resending a request whose outcome is unknown cannot apply it twice: an idempotent
    /// method, an idempotency key the CRM honours, or the operator accepting the risk.
    pub fn resend_safe(&self, req: &Outbound) -> bool {
        !matches!(req.method, Method::POST | Method::PATCH)
            || req.headers.contains_key(IDEMPOTENCY_KEY)
            || self.retry_ambiguous
    }
}

/// The header a CRM reads an idempotency key from (Zendesk's Ticketing API among others).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A lane: the quota set that orders the parked writes consuming it.
#[derive(Debug)]
pub struct Lane {
    pub id: LaneId,
    /// Quota names joined with `+`, e.g. `minute+day+ticket-updates` (a bounded metric label).
    pub name: String,
    pub quotas: Vec<QuotaId>,
}

/// Routes in config order plus the built-in defaults for unmatched requests.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    lanes: Vec<Lane>,
}

/// Name of the built-in route used by requests that match no configured route.
pub const DEFAULT_ROUTE: &str = "default";

impl RouteTable {
    pub fn new(config: &Config) -> RouteTable {
        let account: Vec<QuotaId> = config
            .quotas
            .iter()
            .enumerate()
            .filter(|(_, q)| q.scope == QuotaScope::Account)
            .map(|(i, _)| QuotaId(i))
            .collect();
        let mut lanes: Vec<Lane> = Vec::new();
        let mut lane_for = |quotas: &[QuotaId]| -> LaneId {
            if let Some(lane) = lanes.iter().find(|l| l.quotas == quotas) {
                return lane.id;
            }
            let id = LaneId(lanes.len());
            let name = quotas
                .iter()
                .map(|q| config.quotas[q.0].name.as_str())
                .collect::<Vec<_>>()
                .join("+");
            lanes.push(Lane {
                id,
                name: if name.is_empty() {
                    "unmetered".into()
                } else {
                    name
                },
                quotas: quotas.to_vec(),
            });
            id
        };
        let keyed = |quotas: &[QuotaId]| -> Vec<(QuotaId, Vec<KeyPart>)> {
            quotas
                .iter()
                .filter(|q| !config.quotas[q.0].key.is_empty())
                .map(|&q| (q, config.quotas[q.0].key.clone()))
                .collect()
        };
        let mut routes = Vec::with_capacity(config.routes.len() + 2);
        for rc in &config.routes {
            let mut quotas = account.clone();
            for name in &rc.quotas {
                if let Some(i) = config.quotas.iter().position(|q| &q.name == name) {
                    quotas.push(QuotaId(i));
                }
            }
            quotas.sort();
            quotas.dedup();
            routes.push(Route {
                id: RouteId(routes.len()),
                name: rc.name.clone(),
                methods: rc.methods.clone(),
                paths: rc.paths.clone(),
                class: rc.class,
                on_limit: rc.on_limit,
                max_wait: rc.max_wait,
                lane: lane_for(&quotas),
                keyed: keyed(&quotas),
                quotas,
                idempotency_key: rc.idempotency_key,
                retry_ambiguous: rc.retry_ambiguous,
                batch: rc.batch,
            });
        }
        let default_lane = lane_for(&account);
        for class in [Class::Read, Class::Write] {
            let on_limit = class.default_on_limit();
            routes.push(Route {
                id: RouteId(routes.len()),
                name: DEFAULT_ROUTE.to_string(),
                methods: Vec::new(),
                paths: Vec::new(),
                class,
                on_limit,
                max_wait: if on_limit == OnLimit::Reject {
                    Duration::ZERO
                } else {
                    config.default_max_wait
                },
                quotas: account.clone(),
                lane: default_lane,
                idempotency_key: false,
                retry_ambiguous: false,
                keyed: keyed(&account),
                batch: None,
            });
        }
        RouteTable { routes, lanes }
    }

    /// The first configured route that accepts the request, else the default for its method.
    pub fn classify(&self, method: &Method, path: &str) -> &Route {
        let configured = &self.routes[..self.routes.len() - 2];
        configured
            .iter()
            .find(|r| r.accepts(method, path))
            .unwrap_or_else(|| {
                let class = Class::for_method(method);
                &self.routes[self.routes.len() - if class == Class::Read { 2 } else { 1 }]
            })
    }

    /// The route a logged write belongs to: the configured route of that name when it still
    /// accepts the request, else whatever the current table classifies it as (routes may have
    /// been renamed or changed between runs).
    pub fn find(&self, name: &str, method: &Method, path: &str) -> &Route {
        let configured = &self.routes[..self.routes.len() - 2];
        configured
            .iter()
            .find(|r| r.name == name && r.accepts(method, path))
            .unwrap_or_else(|| self.classify(method, path))
    }

    pub fn get(&self, id: RouteId) -> &Route {
        &self.routes[id.0]
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    pub fn lane(&self, id: LaneId) -> &Lane {
        &self.lanes[id.0]
    }

    /// Route names as metric labels: configured names plus `default`, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for r in &self.routes {
            if !names.contains(&r.name.as_str()) {
                names.push(&r.name);
            }
        }
        names
    }
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
}
