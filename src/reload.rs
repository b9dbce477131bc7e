//! Reloading the config while serving (SIGHUP, `POST /reload`): the file is read and validated
//! again; an invalid one changes nothing. A valid one is applied without dropping a connection
//! or a parked write: quota limits and windows (usage carried over), routes, clients, weights
//! and caps, fairness, the upstream's settings, the queue's, body limits and the log level. What
//! cannot change while running (listen addresses and connection limits, the store and its
//! directory, the ledger backend, credential names, and adding, removing or reordering quotas,
//! routes or clients) keeps its running value and is reported as needing a restart.

use serde::Serialize;

use crate::client::Clients;
use crate::config::{Config, LedgerConfig, Listen};
use crate::proxy::{Proxy, file_hash};
use crate::route::RouteTable;
use crate::upstream::UpstreamClient;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `applied`, `partial` (some changes wait for a restart), `unchanged` or `invalid`.
    pub result: &'static str,
    /// The settings it changed.
    pub changed: Vec<String>,
    /// Changes that apply only after a restart.
    pub needs_restart: Vec<String>,
    /// Why the file was refused, when it was.
    pub problems: Vec<String>,
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<&str> {
    items.iter().map(name).collect()
}

impl Proxy {
    /// Reads the config file again and applies it; the report says what happened.
    pub fn reload_from_file(&self) -> ReloadReport {
        let Some(reloader) = self.reloader() else {
            return ReloadReport {
                result: "invalid",
                changed: Vec::new(),
                needs_restart: Vec::new(),
                problems: vec!["this proxy was not started from a config file".into()],
            };
        };
        let report = match Config::load(&reloader.path) {
            Err(errors) => ReloadReport {
                result: "invalid",
                changed: Vec::new(),
                needs_restart: Vec::new(),
                problems: errors.0.iter().map(|e| e.to_string()).collect(),
            },
            Ok(new) => {
                let level = new.log_filter();
                let report = self.reload(new, file_hash(&reloader.path));
                if let Some(set) = &reloader.log_level
                    && let Err(e) = set(&level)
                {
                    tracing::warn!(error = %e, "log_level not applied");
                }
                report
            }
        };
        self.metrics.config_reload(report.result);
        match report.result {
            "invalid" => {
                tracing::error!(
                    config = %reloader.path.display(),
                    problems = report.problems.len(),
                    "the reloaded config is invalid; still running on the previous one"
                );
                for p in &report.problems {
                    tracing::error!("{p}");
                }
            }
            result => tracing::info!(
                result,
                changed = ?report.changed,
                needs_restart = ?report.needs_restart,
                "config reloaded"
            ),
        }
        report
    }

    /// Applies `new` to the running proxy (see the module's doc); `sha256` is its file's hash.
    pub fn reload(&self, new: Config, sha256: Option<String>) -> ReloadReport {
        let old = self.config();
        let mut restart = Vec::new();
        let mut changed = Vec::new();
        let mut merged = new.clone();

        // What cannot change while running keeps its running value.
        let l = (&old.listen, &new.listen);
        for (field, differs) in [
            ("listen.data", l.0.data != l.1.data),
            ("listen.admin", l.0.admin != l.1.admin),
            (
                "listen.max_connections",
                l.0.max_connections != l.1.max_connections,
            ),
            (
                "listen.max_concurrent_requests",
                l.0.max_concurrent_requests != l.1.max_concurrent_requests,
            ),
            (
                "listen.max_buffered_bytes",
                l.0.max_buffered_bytes != l.1.max_buffered_bytes,
            ),
            (
                "listen.header_timeout",
                l.0.header_timeout != l.1.header_timeout,
            ),
            ("listen.idle_timeout", l.0.idle_timeout != l.1.idle_timeout),
            (
                "listen.h2_max_streams",
                l.0.h2_max_streams != l.1.h2_max_streams,
            ),
            ("listen.data_threads", l.0.data_threads != l.1.data_threads),
            ("queue.data_dir", old.queue.data_dir != new.queue.data_dir),
            ("ledger", old.ledger != new.ledger),
            ("credentials", old.credentials != new.credentials),
        ] {
            if differs {
                restart.push(field.to_string());
            }
        }
        merged.listen = Listen {
            body_timeout: new.listen.body_timeout,
            body_min_rate: new.listen.body_min_rate,
            ..old.listen.clone()
        };
        merged.queue.data_dir = old.queue.data_dir.clone();
        merged.ledger = old.ledger.clone();
        merged.credentials = old.credentials.clone();

        // Quotas, routes and clients are indexed by position everywhere (parked writes, lanes,
        // metrics): they change live only as the same set, in the same order.
        let same_quotas = names(&old.quotas, |q| &q.name) == names(&new.quotas, |q| &q.name)
            && old
                .quotas
                .iter()
                .zip(&new.quotas)
                .all(|(a, b)| a.key.is_empty() == b.key.is_empty());
        let routes = |c: &Config| -> Vec<(String, Vec<String>)> {
            c.routes
                .iter()
                .map(|r| (r.name.clone(), r.quotas.clone()))
                .collect()
        };
        let same_routes = routes(&old) == routes(&new);
        let same_clients = names(&old.clients, |c| &c.name) == names(&new.clients, |c| &c.name);
        let shared = !matches!(old.ledger, LedgerConfig::Local);
        let quotas_changed = old.quotas != new.quotas;
        if !(same_quotas && same_routes && same_clients) || (shared && quotas_changed) {
            for (what, same) in [
                ("quotas", same_quotas),
                ("routes", same_routes),
                ("clients", same_clients),
            ] {
                if !same {
                    restart.push(format!("{what} (added, removed, reordered or re-scoped)"));
                }
            }
            if shared && quotas_changed && same_quotas {
                restart.push("quotas (with the shared ledger, quota changes need a restart of every replica)".into());
            }
            merged.quotas = old.quotas.clone();
            merged.routes = old.routes.clone();
            merged.clients = old.clients.clone();
        } else {
            for (a, b) in old.quotas.iter().zip(&new.quotas) {
                if a != b {
                    changed.push(format!("quotas.{}", a.name));
                }
            }
            for (a, b) in old.routes.iter().zip(&new.routes) {
                if format!("{a:?}") != format!("{b:?}") {
                    changed.push(format!("routes.{}", a.name));
                }
            }
            for (a, b) in old.clients.iter().zip(&new.clients) {
                if format!("{a:?}") != format!("{b:?}") {
                    changed.push(format!("clients.{}", a.name));
                }
            }
        }
        for (what, differs) in [
            ("fairness", old.fairness != new.fairness),
            (
                "upstream",
                format!("{:?}", old.upstream) != format!("{:?}", new.upstream),
            ),
            (
                "queue",
                format!("{:?}", old.queue) != format!("{:?}", merged.queue),
            ),
            ("max_body_bytes", old.max_body_bytes != new.max_body_bytes),
            (
                "default_max_wait",
                old.default_max_wait != new.default_max_wait,
            ),
            ("shutdown_grace", old.shutdown_grace != new.shutdown_grace),
            (
                "listen.body_timeout",
                old.listen.body_timeout != new.listen.body_timeout,
            ),
            (
                "listen.body_min_rate",
                old.listen.body_min_rate != new.listen.body_min_rate,
            ),
            ("log_level", old.log_level != new.log_level),
            ("access_log", old.access_log != new.access_log),
        ] {
            if differs {
                changed.push(what.to_string());
            }
        }

        let upstream = match UpstreamClient::new(&merged.upstream, self.clock.clone()) {
            Ok(u) => u,
            Err(e) => {
                return ReloadReport {
                    result: "invalid",
                    changed: Vec::new(),
                    needs_restart: Vec::new(),
                    problems: vec![format!("upstream: {e}")],
                };
            }
        };
        let now = self.clock.now();
        self.ledger.reconfigure(
            &merged.quotas,
            &merged.clients,
            merged.fairness,
            merged.upstream.pace,
            now,
        );
        self.set_routes(RouteTable::new(&merged));
        self.set_clients(Clients::new(merged.clients.clone()));
        self.set_upstream(upstream);
        self.intake
            .set_limits(&merged.listen, merged.max_body_bytes);
        self.queue.reconfigure(&merged);
        self.set_config(merged, sha256);
        let result = match (changed.is_empty(), restart.is_empty()) {
            (_, false) => "partial",
            (true, true) => "unchanged",
            (false, true) => "applied",
        };
        ReloadReport {
            result,
            changed,
            needs_restart: restart,
            problems: Vec::new(),
        }
    }
}
