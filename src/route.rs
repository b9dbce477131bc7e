//! The route table: classification of a request into a route with its quotas and lane.

use std::sync::OnceLock;
use std::time::Duration;

use http::Method;

use crate::config::{BatchConfig, Class, Config, DEFAULT_ROUTE, KeyPart, OnLimit, QuotaScope};
use crate::ids::{LaneId, QuotaId, RouteId};
use crate::matching::PathPattern;
use crate::message::{IDEMPOTENCY_KEY, Outbound};
use crate::metrics::{Metrics, RouteSeries};

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
    /// `false`: shadow mode (the route's or the whole proxy's `enforce: false`).
    pub enforce: bool,
    /// The route's metric series in the proxy's registry, looked up at its first request.
    series: OnceLock<RouteSeries>,
}

impl Route {
    /// The route's metric series (looked up in `metrics` the first time).
    pub fn series(&self, metrics: &Metrics) -> &RouteSeries {
        self.series.get_or_init(|| metrics.route_series(&self.name))
    }

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

/// A lane: the quota set that orders the parked writes consuming it.
#[derive(Debug)]
pub struct Lane {
    pub id: LaneId,
    /// Quota names joined with `+`, e.g. `minute+day+ticket-updates` (a bounded metric label).
    pub name: String,
    pub quotas: Vec<QuotaId>,
    /// A lane of reads waiting for room: reads never wait behind writes (and take the read
    /// reserve), so they have lanes of their own, named with `/reads`.
    pub read: bool,
}

/// Routes in config order, then the built-in defaults for unmatched requests (a read and a write).
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// How many of `routes` come from the config (the defaults follow them).
    configured: usize,
    default_read: RouteId,
    default_write: RouteId,
    lanes: Vec<Lane>,
}

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
        let mut lane_for = |quotas: &[QuotaId], class: Class| -> LaneId {
            let read = class == Class::Read;
            if let Some(lane) = lanes.iter().find(|l| l.quotas == quotas && l.read == read) {
                return lane.id;
            }
            let id = LaneId(lanes.len());
            let name = quotas
                .iter()
                .map(|q| config.quotas[q.0].name.as_str())
                .collect::<Vec<_>>()
                .join("+");
            let name = if name.is_empty() {
                "unmetered".into()
            } else {
                name
            };
            lanes.push(Lane {
                id,
                name: if read { format!("{name}/reads") } else { name },
                quotas: quotas.to_vec(),
                read,
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
                lane: lane_for(&quotas, rc.class),
                keyed: keyed(&quotas),
                quotas,
                idempotency_key: rc.idempotency_key,
                retry_ambiguous: rc.retry_ambiguous,
                batch: rc.batch,
                enforce: config.enforce && rc.enforce,
                series: OnceLock::new(),
            });
        }
        let configured = routes.len();
        for class in [Class::Read, Class::Write] {
            let default_lane = lane_for(&account, class);
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
                enforce: config.enforce,
                series: OnceLock::new(),
            });
        }
        RouteTable {
            routes,
            configured,
            default_read: RouteId(configured),
            default_write: RouteId(configured + 1),
            lanes,
        }
    }

    fn configured(&self) -> &[Route] {
        &self.routes[..self.configured]
    }

    /// The first configured route that accepts the request, else the default for its method.
    pub fn classify(&self, method: &Method, path: &str) -> &Route {
        self.configured()
            .iter()
            .find(|r| r.accepts(method, path))
            .unwrap_or_else(|| {
                self.get(match Class::for_method(method) {
                    Class::Read => self.default_read,
                    Class::Write => self.default_write,
                })
            })
    }

    /// The route a logged write belongs to: the configured route of that name when it still
    /// accepts the request, else whatever the current table classifies it as (routes may have
    /// been renamed or changed between runs).
    pub fn find(&self, name: &str, method: &Method, path: &str) -> &Route {
        self.configured()
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
