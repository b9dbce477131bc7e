//! Bulk operator actions on dead letters: a filter (status, reason, route, client, when they were
//! given up), the selection it makes, and retrying or discarding all of it at once.

use crate::clock::Time;
use crate::ids::EntryId;
use crate::status::{FailReason, Status};
use crate::store::Commit;

use super::entry::State;
use super::{OpError, Queue};

/// Which dead letters a bulk action takes; every field left unset matches all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `failed` or `expired`.
    pub status: Option<Status>,
    /// Only failed writes given up for this reason.
    pub reason: Option<FailReason>,
    pub route: Option<String>,
    pub client: Option<String>,
    /// Given up at or after this time.
    pub since: Option<Time>,
    /// Given up before this time.
    pub until: Option<Time>,
}

/// The names `Filter::set` knows.
pub const FILTER_KEYS: &str = "status, reason, route, client, since, until";

impl Filter {
    /// Sets one criterion from its text form (a query parameter, a command-line flag).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let time = |v: &str| {
            v.parse::<jiff::Timestamp>()
                .map(Time::from_timestamp)
                .map_err(|e| format!("{key}={v:?} is not an RFC 3339 time ({e})"))
        };
        match key {
            "status" => match value.parse::<Status>()? {
                s @ (Status::Failed | Status::Expired) => self.status = Some(s),
                s => {
                    return Err(format!(
                        "status={s}: only failed or expired writes are dead letters"
                    ));
                }
            },
            "reason" => self.reason = Some(value.parse()?),
            "route" => self.route = Some(value.to_string()),
            "client" => self.client = Some(value.to_string()),
            "since" => self.since = Some(time(value)?),
            "until" => self.until = Some(time(value)?),
            _ => return Err(format!("unknown filter {key:?} ({FILTER_KEYS})")),
        }
        Ok(())
    }
}

/// The dead letters a filter selects, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub ids: Vec<EntryId>,
    /// How many of them the CRM may have applied already (a retry could apply them twice).
    pub ambiguous: usize,
}

/// What a bulk action did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BulkResult {
    /// Acted on.
    pub done: usize,
    /// Selected but no longer dead letters when their turn came (retried or discarded meanwhile).
    pub skipped: usize,
}

impl Queue {
    /// The dead letters `filter` selects; a route or client name that is not configured is an
    /// error (a typo would otherwise select nothing, silently).
    pub fn select(&self, filter: &Filter) -> Result<Selection, String> {
        let routes = self.routes();
        let clients = self.clients();
        let mut problems = Vec::new();
        if let Some(r) = &filter.route
            && !routes.routes().iter().any(|x| &x.name == r)
        {
            problems.push(format!(
                "route {r:?} is not configured ({})",
                routes.names().join(", ")
            ));
        }
        if let Some(c) = &filter.client
            && !clients.iter().any(|x| &x.name == c)
        {
            let names: Vec<&str> = clients.iter().map(|x| x.name.as_str()).collect();
            problems.push(format!(
                "client {c:?} is not configured ({})",
                names.join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let book = self.lock();
        let mut picked: Vec<_> = book
            .dead_letters()
            .filter(|e| {
                let reason = match e.state() {
                    State::Failed(r, _) => Some(*r),
                    _ => None,
                };
                let at = e.finished_at().unwrap_or(e.created_at);
                filter.status.is_none_or(|s| e.state().status() == s)
                    && filter.reason.is_none_or(|r| reason == Some(r))
                    && filter
                        .route
                        .as_ref()
                        .is_none_or(|r| &routes.get(e.route).name == r)
                    && filter
                        .client
                        .as_ref()
                        .is_none_or(|c| &clients[e.client.0].name == c)
                    && filter.since.is_none_or(|t| at >= t)
                    && filter.until.is_none_or(|t| at < t)
            })
            .map(|e| {
                (
                    e.seq,
                    e.id,
                    matches!(e.state(), State::Failed(FailReason::Ambiguous, _)),
                )
            })
            .collect();
        picked.sort_by_key(|&(seq, ..)| seq);
        Ok(Selection {
            ambiguous: picked.iter().filter(|p| p.2).count(),
            ids: picked.into_iter().map(|(_, id, _)| id).collect(),
        })
    }

    /// Queues every selected write again (fresh attempts and TTL). Durable once the commits are.
    pub fn retry_all(&self, ids: &[EntryId], now: Time) -> (BulkResult, Vec<Commit>) {
        self.each(ids, |id| self.retry(id, now))
    }

    /// Gives every selected write up for good.
    pub fn discard_all(&self, ids: &[EntryId]) -> (BulkResult, Vec<Commit>) {
        self.each(ids, |id| self.discard(id))
    }

    fn each(
        &self,
        ids: &[EntryId],
        act: impl Fn(EntryId) -> Result<Commit, OpError>,
    ) -> (BulkResult, Vec<Commit>) {
        let mut result = BulkResult::default();
        let mut commits = Vec::new();
        for &id in ids {
            match act(id) {
                Ok(c) => {
                    result.done += 1;
                    commits.push(c);
                }
                Err(_) => result.skipped += 1,
            }
        }
        (result, commits)
    }
}
