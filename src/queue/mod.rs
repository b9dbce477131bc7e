//! Parked writes: the queue of one upstream, split by responsibility.
//!
//! - [`book`]: the entries and lanes, and the one function that moves an entry between states
//!   (keeping the bounds counters, the dead-letter index and the lanes in step);
//! - [`admission`]: a live write asks to go, parks, waits on its ticket, or is handed to the proxy;
//! - [`scheduling`]: which parked write goes next (deficit round robin over clients, oldest first);
//! - [`lifecycle`]: what an attempt's outcome does to a write, TTL and purging, operator actions;
//! - [`bulk`]: operator actions on every dead letter a filter selects;
//! - [`persistence`]: writes and states as the log keeps them, recovery and compaction;
//! - [`views`]: what clients, operators and `/status` see;
//! - [`batching`]: which parked writes share a Zendesk batch call, its jobs and their polls;
//! - [`readback`]: the tickets a batch created, read back for the clients still waiting.

mod admission;
mod batching;
mod book;
mod bulk;
mod entry;
mod jobs;
mod lifecycle;
mod persistence;
mod readback;
mod scheduling;
mod views;

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::Time;
use crate::config::{ClientConfig, Config, QueueConfig};
use crate::credentials::Credentials;
use crate::ids::{ClientId, EntryId, Fingerprint, QuotaId, RouteId};
use crate::live::Live;
use crate::message::{BufferedResponse, Outbound};
use crate::metrics::Metrics;
use crate::quota::{Grant, WaitingBoard};
use crate::route::RouteTable;
use crate::status::{FailReason, Status};
use crate::store::{Commit, Record, Store, StoreError, StoreStats};
pub use admission::{Ticket, WaitEnd};
pub use batching::{BatchDispatch, BatchOutcome, PollDispatch, PollOutcome};
use book::Book;
pub use bulk::{BulkResult, FILTER_KEYS, Filter, Selection};
pub use entry::Settled;
pub use readback::ReadbackDispatch;
pub use views::{EntryDetail, EntrySummary, RequestView, ResponseView, StatusView};

/// A write that may be parked: its request plus what the queue needs to order and guard it.
pub struct Parkable {
    pub request: Outbound,
    pub fingerprint: Fingerprint,
    /// Writes that change one resource (PUT, PATCH, DELETE on one path) share this key: they
    /// are sent one at a time, in arrival order.
    pub resource: Option<Arc<str>>,
    pub client: ClientId,
    /// Keys of the keyed quotas it consumes.
    pub keys: Vec<(QuotaId, Arc<str>)>,
}

/// The answer to a live write asking to go through.
// Returned once per request and destructured at once: boxing the large variant would only add
// an allocation to the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Enter {
    /// Quota was free and nothing of its lane is parked: send it now (quota already charged).
    /// The ticket holds its place (and its resource) until the CRM answered; it can re-park it.
    Go(Ticket, Outbound, Grant),
    /// Parked; wait on the ticket.
    Parked(Ticket),
    /// No slot is expected within the route's `max_wait`: a `queue` write was handed to the
    /// proxy at once (answer 202) ...
    Accepted(Accepted),
    /// ... and a `wait` request was not parked (answer over-limit now).
    Refused { retry_at: Time },
    /// The queue is at `max_entries` or `max_bytes`: refused before acceptance.
    Full,
    /// The proxy is shutting down and takes no new parked writes.
    Closed,
}

/// A write the proxy took over: what its client's 202 says, once `commit` is durable.
pub struct Accepted {
    pub id: EntryId,
    pub position: usize,
    pub estimated_dispatch_at: Time,
    /// The 202 may be sent only after this completes; on error the write was not accepted.
    pub commit: Commit,
}

/// The next thing the dispatcher should do.
// As for `Enter`: moved once, matched at once.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Send this proxy-owned entry now (quota already charged).
    Send(Dispatch),
    /// Send these proxy-owned entries as one batch call (quota for one call charged).
    Batch(BatchDispatch),
    /// Ask the CRM how some batch jobs are doing (quota for one call charged).
    Poll(PollDispatch),
    /// Read back the tickets a batch created for the clients waiting on them (one call charged).
    Readback(ReadbackDispatch),
    /// Nothing can go now; wake at this time (or on notification).
    Idle(Option<Time>),
}

/// A proxy-owned entry handed to the dispatcher for one attempt.
pub struct Dispatch {
    pub id: EntryId,
    pub route: RouteId,
    pub client: ClientId,
    /// Keys of the keyed quotas it consumes.
    pub keys: Vec<(QuotaId, Arc<str>)>,
    pub request: Outbound,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub grant: Grant,
    /// The `dispatching` record: the request may be sent only once this is durable.
    pub commit: Commit,
}

/// How one attempt of a proxy-owned entry ended.
#[derive(Clone)]
pub enum Outcome {
    /// The CRM's final answer (2xx-4xx other than a throttle).
    Done(BufferedResponse),
    /// The CRM throttled it: back to its lane at its position, no attempt spent.
    Throttled,
    /// A retryable failure: back to its lane, not before this time.
    Retry { not_before: Time, error: String },
    /// Not sent through no fault of its own (its `dispatching` record could not be stored;
    /// Zendesk had too many jobs open): back to its lane, not before this time, no attempt spent.
    NotSent { not_before: Time, error: String },
    /// Its batch call was refused as a whole, so nothing of it was applied: back to its lane, no
    /// attempt spent, to be sent on its own from now on.
    Unbatched,
    /// The shared ledger had no room (another replica spent it): back to its lane, no attempt
    /// spent, not before this time.
    Deferred { not_before: Time },
    /// Given up: kept as a dead letter.
    Failed(FailReason, String),
}

/// A lane's backlog for `/status`: one client's parked writes on one set of quotas.
#[derive(Debug, Serialize)]
pub struct LaneStatus {
    pub name: String,
    pub client: String,
    pub depth: usize,
    pub oldest_age_seconds: f64,
}

/// Totals for `/status` and metrics.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    /// Entries holding a request: queued, being sent, or failed and kept (`max_entries`).
    pub entries: usize,
    /// Bytes of those requests and of the kept answers of delivered writes (`max_bytes`).
    pub bytes: usize,
    /// Delivered writes whose CRM answer is kept (evicted oldest first when room is needed).
    pub results: usize,
    pub queued: usize,
    pub dispatching: usize,
    pub failed: usize,
    pub expired: usize,
    pub lanes: Vec<LaneStatus>,
    /// Seconds until every write waiting now would have been sent if only the drain spent the
    /// quotas (live requests and other replicas make it later); 0 when none wait. Filled by
    /// [`Queue::overview`].
    pub drain_eta_seconds: f64,
    /// The most recent failed or expired writes (dead letters), newest first, at most 100.
    pub dead_letters: Vec<EntrySummary>,
}

/// Why an operator action on a parked write was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no parked write has this id")]
    NotFound,
    #[error("the write is {0}; only failed or expired writes can be retried or discarded")]
    WrongState(Status),
}

/// What recovery found in the log.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Restored {
    /// Writes waiting again in their lanes.
    pub queued: usize,
    /// Writes that were being sent and are resent safely (idempotent or keyed).
    pub resent: usize,
    /// Writes that were being sent and could have been applied: failed as ambiguous.
    pub ambiguous: usize,
    /// Finished writes whose status and result are readable again.
    pub finished: usize,
    /// Writes in batch jobs the CRM had accepted: their jobs are polled again.
    pub in_jobs: usize,
}

/// The queue of parked writes for one upstream.
pub struct Queue {
    /// The queue's settings, route table and clients in force (a reload replaces them).
    cfg: Live<QueueConfig>,
    route_table: Arc<Live<RouteTable>>,
    metrics: Arc<Metrics>,
    client_configs: Live<Vec<ClientConfig>>,
    quota_names: Vec<String>,
    /// The ledger's board, on which proxy-owned waiting writes are marked.
    board: Arc<WaitingBoard>,
    store: Store,
    /// One lock over the whole book: every decision about parked writes sees one state. Held
    /// for microseconds; scrapes read running aggregates under it, never every entry.
    book: Mutex<Book>,
    wake: Notify,
    /// What is redacted in views of requests and answers.
    credentials: Credentials,
    /// Set when the upstream turned out not to answer like Zendesk's batch endpoints: writes
    /// go one by one (until a restart or reload).
    batching_off: std::sync::atomic::AtomicBool,
}

impl Queue {
    /// The queue a config describes; `board` is the ledger's, `store` where accepted writes are
    /// kept (see [`Store`]).
    pub fn new(
        config: &Config,
        routes: Arc<Live<RouteTable>>,
        metrics: Arc<Metrics>,
        board: Arc<WaitingBoard>,
        store: Store,
    ) -> Queue {
        Queue {
            cfg: Live::new(config.queue.clone()),
            book: Mutex::new(Book::new(config.clients.len(), routes.get().lanes().len())),
            route_table: routes,
            metrics,
            client_configs: Live::new(config.clients.clone()),
            quota_names: config.quotas.iter().map(|q| q.name.clone()).collect(),
            board,
            store,
            wake: Notify::new(),
            credentials: Credentials::new(&config.credentials),
            batching_off: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn cfg(&self) -> Arc<QueueConfig> {
        self.cfg.get()
    }

    fn routes(&self) -> Arc<RouteTable> {
        self.route_table.get()
    }

    fn clients(&self) -> Arc<Vec<ClientConfig>> {
        self.client_configs.get()
    }

    /// Takes a reloaded config's queue settings and clients (the same clients, in the same
    /// order; the route table is the proxy's, shared).
    pub fn reconfigure(&self, config: &Config) {
        self.cfg.set(config.queue.clone());
        self.client_configs.set(config.clients.clone());
        self.batching_off
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.wake();
    }

    /// Logs a record in the disk store; with the memory store none is even built.
    fn log(&self, record: impl FnOnce() -> Record) -> Commit {
        if self.store.is_durable() {
            self.store.append(&record())
        } else {
            Commit::done()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the dispatcher (new work, a freed slot or resource, a re-parked entry, a lifted
    /// pause).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes when something may have changed for the dispatcher.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Stops accepting new parked writes (shutdown); parked ones keep draining.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake();
    }

    /// Proxy-owned writes not yet delivered: queued or being sent.
    pub fn undelivered(&self) -> Vec<EntryId> {
        self.lock().undelivered()
    }

    /// Whether no parked write is queued or in flight (client-owned ones included).
    pub fn is_drained(&self) -> bool {
        let book = self.lock();
        book.in_flight == 0 && book.ring.is_empty() && book.jobs.is_empty()
    }

    /// Completes once every record so far is durable (shutdown: finished writes stay finished).
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.store.sync().durable().await
    }

    /// The log's counters, for metrics.
    pub fn store_stats(&self) -> Option<&StoreStats> {
        self.store.stats()
    }
}

/// How many queued entries of a lane the dispatcher looks past a blocked head.
const SCAN_LIMIT: usize = 64;

fn earliest(a: Option<Time>, b: Time) -> Option<Time> {
    Some(a.map_or(b, |a| a.min(b)))
}

#[cfg(test)]
mod tests;
