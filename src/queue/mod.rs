//! Parked writes: lanes in arrival order, waiters, bounds, TTL, hand-off of ownership, and the
//! status store behind `GET /_proxy/requests/{id}`.

mod batch;
mod entry;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use crate::client::{ClientConfig, ClientId};
use crate::clock::Time;
use crate::config::Config;
use crate::config::{OnLimit, QueueConfig};
use crate::forward::{BufferedResponse, Outbound};
use crate::metrics::Metrics;
use crate::quota::{Demand, Grant, Ledger, QuotaId, WaitingBoard};
use crate::route::{LaneId, Route, RouteId, RouteTable};
use crate::store::{Commit, Record, RecoveredState, Store, Stored, StoredResponse};
pub use batch::{BatchDispatch, BatchOutcome, PollDispatch, PollOutcome};
use entry::{Batched, Entry, Kept, Owner, State};
pub use entry::{
    EntryDetail, EntryId, EntrySummary, FailReason, Fingerprint, RequestView, ResponseView, Status,
    StatusView,
};

/// How many queued entries of a lane the dispatcher looks past a blocked head.
const SCAN_LIMIT: usize = 64;

/// A write that may be parked: its request plus what the queue needs to order and guard it.
pub struct Parkable {
    pub request: Outbound,
    pub fingerprint: Fingerprint,
    /// Ordering key: writes with the same key are sent one at a time, in arrival order.
    pub record: Option<Arc<str>>,
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
    /// The ticket holds its place (and its record) until the CRM answered; it can re-park it.
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

/// What became of a parked live request when its client's `max_wait` ran out.
pub enum Timeout {
    /// The proxy now owns delivery; answer 202.
    Accepted(Accepted),
    /// `on_limit: wait`: withdrawn; answer with the over-limit response.
    GaveUp { retry_at: Time },
    /// A slot was granted (within `max_wait`): send it.
    Granted(Outbound, Grant),
    /// Shutting down: the write was not accepted (the proxy cannot promise delivery now).
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
    /// Nothing can go now; wake at this time (or on notification).
    Idle(Option<Time>),
}

/// A proxy-owned entry handed to the dispatcher for one attempt.
pub struct Dispatch {
    pub id: EntryId,
    pub route: RouteId,
    pub client: ClientId,
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
    /// The CRM throttled it: back to its lane, no attempt spent.
    Throttled,
    /// A retryable failure: back to its lane, not before this time.
    Retry { not_before: Time, error: String },
    /// Not sent, or refused before anything was applied, through no fault of its own (its
    /// `dispatching` record could not be stored; Zendesk had too many jobs open): back to its
    /// lane, not before this time, no attempt spent.
    NotSent { not_before: Time, error: String },
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
    /// Entries holding a request: queued, being sent, or failed and kept.
    pub entries: usize,
    pub bytes: usize,
    pub queued: usize,
    pub dispatching: usize,
    pub failed: usize,
    pub expired: usize,
    pub lanes: Vec<LaneStatus>,
    /// The most recent failed or expired writes (dead letters), newest first, at most 100.
    pub dead_letters: Vec<EntrySummary>,
}

/// Why an operator action on a parked write was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no parked write has this id")]
    NotFound,
    #[error("the write is {0:?}; only failed or expired writes can be retried or discarded")]
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

/// One client's parked writes: a lane per set of quotas, each in arrival order (`seq`);
/// re-parked entries are put back in order.
struct ClientQueue {
    lanes: Vec<VecDeque<(u64, EntryId)>>,
    queued: usize,
    /// Deficit round robin: sends this client may still make in the current round.
    deficit: i64,
}

struct Inner {
    // Boxed: a table slot stays small, so its growth slack costs little per parked write.
    entries: HashMap<EntryId, Box<Entry>>,
    clients: Vec<ClientQueue>,
    /// Clients with queued writes, in round-robin order.
    ring: VecDeque<ClientId>,
    /// Records with a send in progress (proxy- or client-driven).
    busy: HashSet<Arc<str>>,
    /// Finished entries by finish time, purged after `result_ttl` (failed ones are kept).
    finished: VecDeque<(Time, EntryId)>,
    seq: u64,
    /// Entries holding a request, and their bytes: what the bounds limit.
    held: usize,
    held_bytes: usize,
    in_flight: usize,
    closed: bool,
    /// No queued entry expires before this: the expiry scan is skipped until then.
    expiry_due: Time,
    /// Batch calls on their way, by number.
    sending: HashMap<u64, batch::Pending>,
    batch_seq: u64,
    /// CRM jobs holding batches whose results are still to be read.
    jobs: HashMap<Arc<str>, batch::Job>,
}

/// The queue of parked writes for one upstream.
pub struct Queue {
    cfg: QueueConfig,
    routes: Arc<RouteTable>,
    metrics: Arc<Metrics>,
    clients: Vec<ClientConfig>,
    quota_names: Vec<String>,
    /// The ledger's board, on which proxy-owned waiting writes are marked.
    board: Arc<WaitingBoard>,
    store: Store,
    compact_bytes: u64,
    inner: Mutex<Inner>,
    wake: Notify,
}

/// The first sendable write of one client, found by a scan.
struct Pick {
    id: EntryId,
    grant: Grant,
    /// When it goes as the first of a batch: every member (it included) with its item.
    batch: Option<Vec<(EntryId, crate::batch::Item)>>,
}

/// What a scan of one client's lanes found.
enum Scan {
    Found(Pick),
    Nothing,
    /// A proxy-owned write could go but the in-flight cap is reached: not the client's fault.
    InFlightFull,
}

impl Queue {
    /// The queue a config describes; `board` is the ledger's, `store` where accepted writes are
    /// kept (see [`Store`]).
    pub fn new(
        config: &Config,
        routes: Arc<RouteTable>,
        metrics: Arc<Metrics>,
        board: Arc<WaitingBoard>,
        store: Store,
    ) -> Queue {
        let clients = &config.clients;
        let lanes = routes.lanes().len();
        let queues = clients
            .iter()
            .map(|_| ClientQueue {
                lanes: (0..lanes).map(|_| VecDeque::new()).collect(),
                queued: 0,
                deficit: 0,
            })
            .collect();
        Queue {
            cfg: config.queue.clone(),
            routes,
            metrics,
            clients: clients.to_vec(),
            quota_names: config.quotas.iter().map(|q| q.name.clone()).collect(),
            board,
            store,
            compact_bytes: config.queue.compact_bytes,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                clients: queues,
                ring: VecDeque::new(),
                busy: HashSet::new(),
                finished: VecDeque::new(),
                seq: 0,
                held: 0,
                held_bytes: 0,
                in_flight: 0,
                closed: false,
                expiry_due: Time::MAX,
                sending: HashMap::new(),
                batch_seq: 0,
                jobs: HashMap::new(),
            }),
            wake: Notify::new(),
        }
    }

    /// Logs a record in the disk store; with the memory store none is even built.
    fn log(&self, record: impl FnOnce() -> Record) -> Commit {
        if self.store.is_durable() {
            self.store.append(&record())
        } else {
            Commit::done()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the dispatcher (new work, a freed slot or record, a re-parked entry).
    fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes when something may have changed for the dispatcher.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Puts an entry into its client's lane at its arrival position; a proxy-owned one is
    /// marked on the ledger's board as drain waiting.
    fn link(&self, inner: &mut Inner, id: EntryId) {
        let e = &inner.entries[&id];
        let (client, lane, key) = (e.client, e.lane, (e.seq, id));
        inner.expiry_due = inner.expiry_due.min(e.expires_at);
        if matches!(e.state, State::Queued(Owner::Proxy)) {
            self.board
                .mark(&self.routes.lane(lane).quotas, client, true);
        }
        let q = &mut inner.clients[client.0];
        let lane_q = &mut q.lanes[lane.0];
        if let Err(pos) = lane_q.binary_search(&key) {
            lane_q.insert(pos, key);
            q.queued += 1;
            if q.queued == 1 {
                inner.ring.push_back(client);
            }
        }
    }

    /// Takes an entry out of its client's lane (and off the board).
    fn unlink(&self, inner: &mut Inner, id: EntryId) {
        let e = &inner.entries[&id];
        let (client, lane, key) = (e.client, e.lane, (e.seq, id));
        let q = &mut inner.clients[client.0];
        let lane_q = &mut q.lanes[lane.0];
        if let Ok(pos) = lane_q.binary_search(&key) {
            lane_q.remove(pos);
            q.queued -= 1;
            if q.queued == 0 {
                q.deficit = 0;
                inner.ring.retain(|c| *c != client);
            }
            if matches!(inner.entries[&id].state, State::Queued(Owner::Proxy)) {
                self.board
                    .mark(&self.routes.lane(lane).quotas, client, false);
            }
        }
    }

    /// Removes a queued entry entirely (withdrawn or given up by its client).
    fn remove_queued(&self, inner: &mut Inner, id: EntryId) {
        self.unlink(inner, id);
        if let Some(e) = inner.entries.remove(&id)
            && e.state.holds_request()
        {
            inner.held -= 1;
            inner.held_bytes -= e.bytes;
        }
    }

    /// A live write asks to go: sent now if its lane is empty and quota is free, else parked.
    pub fn enter(
        self: &Arc<Self>,
        ledger: &Ledger,
        route: &Route,
        parkable: Parkable,
        now: Time,
    ) -> Enter {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let lane_empty = inner.clients[parkable.client.0].lanes[route.lane.0].is_empty();
        let record_free = parkable
            .record
            .as_ref()
            .is_none_or(|r| !inner.busy.contains(r));
        let demand = Demand {
            quotas: &route.quotas,
            keys: &parkable.keys,
            client: parkable.client,
            live: true,
        };
        let granted = if lane_empty && record_free {
            ledger.try_acquire(&demand, now).ok()
        } else {
            None
        };
        if granted.is_none() && inner.closed {
            return Enter::Closed;
        }
        let bytes = parkable.request.body.len() + header_bytes(&parkable.request);
        if granted.is_none()
            && (inner.held + 1 > self.cfg.max_entries
                || inner.held_bytes + bytes > self.cfg.max_bytes)
        {
            return Enter::Full;
        }
        inner.seq += 1;
        let seq = inner.seq;
        let id = EntryId::random();
        let mut entry = Entry {
            id,
            seq,
            route: route.id,
            lane: route.lane,
            client: parkable.client,
            keys: parkable.keys,
            request: None,
            record: parkable.record,
            fingerprint: parkable.fingerprint,
            bytes,
            created_at: now,
            expires_at: now + self.cfg.ttl,
            not_before: now,
            attempts: 0,
            state: State::Live,
            finished_at: None,
            durable: false,
            batchable: None,
            single: false,
            batched: None,
        };
        if let Some(grant) = granted {
            // Sent by its client now; tracked so its record stays busy and it can be re-parked.
            if let Some(r) = &entry.record {
                inner.busy.insert(r.clone());
            }
            entry.attempts = 1;
            inner.entries.insert(id, Box::new(entry));
            drop(guard);
            return Enter::Go(self.ticket(id, None), parkable.request, grant);
        }
        // Holding the client is pointless when no slot is expected within its max_wait.
        let ahead = inner.clients[parkable.client.0].lanes[route.lane.0].len() as u64;
        let eta = ledger.estimate(&route.quotas, ahead, now);
        let hopeless = eta > now + route.max_wait;
        if hopeless && route.on_limit == OnLimit::Wait {
            return Enter::Refused { retry_at: eta };
        }
        entry.request = Some(Kept::new(&parkable.request));
        inner.held += 1;
        inner.held_bytes += bytes;
        if hopeless {
            entry.state = State::Queued(Owner::Proxy);
            inner.entries.insert(id, Box::new(entry));
            let accepted = self.take_over(inner, id, ledger, now);
            drop(guard);
            self.wake();
            return Enter::Accepted(accepted);
        }
        let (tx, rx) = oneshot::channel();
        entry.state = State::Queued(Owner::Client(tx));
        inner.entries.insert(id, Box::new(entry));
        self.link(inner, id);
        drop(guard);
        self.wake();
        Enter::Parked(self.ticket(id, Some(rx)))
    }

    fn ticket(
        self: &Arc<Self>,
        id: EntryId,
        rx: Option<oneshot::Receiver<(Outbound, Grant)>>,
    ) -> Ticket {
        Ticket {
            queue: self.clone(),
            id,
            rx,
            settled: false,
        }
    }

    /// Where an entry stands in its lane, and when it should go.
    fn position(&self, inner: &Inner, e: &Entry, ledger: &Ledger, now: Time) -> (usize, Time) {
        // Lanes are sorted by (seq, id): a binary search, not a scan of a deep backlog.
        let position = inner.clients[e.client.0].lanes[e.lane.0]
            .binary_search(&(e.seq, e.id))
            .unwrap_or_else(|at| at);
        let quotas = &self.routes.lane(e.lane).quotas;
        let eta = ledger
            .estimate(quotas, position as u64, now)
            .max(e.not_before);
        (position, eta)
    }

    /// The proxy takes over an entry (already `Queued(Proxy)` in the map): it joins its lane and
    /// is logged; it may be sent, and its client told 202, once the log holds it.
    fn take_over(&self, inner: &mut Inner, id: EntryId, ledger: &Ledger, now: Time) -> Accepted {
        let durable = !self.store.is_durable();
        let e = inner.entries.get_mut(&id).expect("taken-over entry exists");
        e.durable = durable;
        e.batchable = e
            .request
            .as_ref()
            .and_then(|r| self.batchable(self.routes.get(e.route), &r.outbound()));
        let commit = self.log(|| Record::Accepted(Box::new(self.stored(e))));
        self.link(inner, id);
        let (position, estimated_dispatch_at) =
            self.position(inner, &inner.entries[&id], ledger, now);
        Accepted {
            id,
            position,
            estimated_dispatch_at,
            commit,
        }
    }

    /// After a take-over's commit: the entry may be sent; or, when the log could not hold it,
    /// it is dropped (its client gets 503 instead of a 202, so nothing is lost).
    pub fn settle(&self, id: EntryId, durable: bool) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if durable {
            if let Some(e) = inner.entries.get_mut(&id) {
                e.durable = true;
            }
        } else if inner
            .entries
            .get(&id)
            .is_some_and(|e| matches!(e.state, State::Queued(_)))
        {
            self.remove_queued(inner, id);
        }
        drop(guard);
        self.wake();
    }

    /// A parked write as the log keeps it.
    fn stored(&self, e: &Entry) -> Stored {
        let (method, path_and_query, headers, body) = match e.request.as_ref().map(Kept::outbound) {
            Some(r) => (
                r.method.to_string(),
                r.path_and_query.clone(),
                r.headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                r.body.clone(),
            ),
            None => (
                String::new(),
                String::new(),
                Vec::new(),
                bytes::Bytes::new(),
            ),
        };
        Stored {
            id: e.id.as_u128(),
            seq: e.seq,
            route: self.routes.get(e.route).name.clone(),
            client: self.clients[e.client.0].name.clone(),
            method,
            path_and_query,
            headers,
            body,
            record: e.record.as_deref().map(str::to_string),
            keys: e
                .keys
                .iter()
                .map(|(q, k)| (self.quota_names[q.0].clone(), k.to_string()))
                .collect(),
            fingerprint: e.fingerprint.to_bytes(),
            created_at: e.created_at.as_nanos(),
            expires_at: e.expires_at.as_nanos(),
            not_before: e.not_before.as_nanos(),
            attempts: e.attempts,
        }
    }

    /// The client's `max_wait` ran out: hand the entry to the proxy (queue) or withdraw it (wait).
    fn on_timeout(&self, ticket: &mut Ticket, ledger: &Ledger, now: Time) -> Timeout {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let entry = match inner.entries.get(&ticket.id) {
            Some(e) if matches!(e.state, State::Queued(_)) => e,
            _ => {
                // Granted at the same moment: the request is in the channel.
                return match ticket.rx.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    Some((req, grant)) => Timeout::Granted(req, grant),
                    None => {
                        ticket.settled = true;
                        Timeout::Closed
                    }
                };
            }
        };
        let on_limit = self.routes.get(entry.route).on_limit;
        let (_, eta) = self.position(inner, entry, ledger, now);
        if on_limit == OnLimit::Queue && !inner.closed {
            // Out of its lane and back in as proxy-owned (which also marks the board).
            self.unlink(inner, ticket.id);
            let e = inner.entries.get_mut(&ticket.id).expect("entry present");
            e.state = State::Queued(Owner::Proxy);
            ticket.settled = true;
            return Timeout::Accepted(self.take_over(inner, ticket.id, ledger, now));
        }
        self.remove_queued(inner, ticket.id);
        ticket.settled = true;
        drop(guard);
        self.wake();
        if on_limit == OnLimit::Queue {
            Timeout::Closed
        } else {
            Timeout::GaveUp { retry_at: eta }
        }
    }

    /// A live write that the CRM throttled (or that got no answer) becomes a proxy-owned parked
    /// write at its arrival position, or `None` if the queue cannot take it (full, closing).
    fn repark(
        &self,
        ticket: &mut Ticket,
        request: Outbound,
        spent_attempt: bool,
        ledger: &Ledger,
        now: Time,
    ) -> Option<Accepted> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let e = inner.entries.get(&ticket.id)?;
        if !matches!(e.state, State::Live)
            || inner.closed
            || inner.held + 1 > self.cfg.max_entries
            || inner.held_bytes + e.bytes > self.cfg.max_bytes
        {
            return None;
        }
        let e = inner.entries.get_mut(&ticket.id).expect("present");
        if let Some(r) = &e.record {
            inner.busy.remove(r);
        }
        if !spent_attempt {
            e.attempts = e.attempts.saturating_sub(1);
        }
        e.request = Some(Kept::new(&request));
        e.state = State::Queued(Owner::Proxy);
        e.not_before = now;
        inner.held += 1;
        inner.held_bytes += e.bytes;
        ticket.settled = true;
        let accepted = self.take_over(inner, ticket.id, ledger, now);
        drop(guard);
        self.wake();
        Some(accepted)
    }

    /// The client went away before a 202: withdraw its entry; after a send, free its record.
    fn on_drop(&self, ticket: &mut Ticket) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(e) = inner.entries.get(&ticket.id) else {
            return;
        };
        let route = e.route;
        match e.state {
            State::Queued(_) => {
                self.remove_queued(inner, ticket.id);
                self.metrics
                    .request(&self.routes.get(route).name, "withdrawn");
            }
            State::Live => {
                if let Some(r) = inner.entries.remove(&ticket.id).and_then(|e| e.record) {
                    inner.busy.remove(&r);
                }
                // A grant that arrived after the client left: the quota was spent for nothing.
                if ticket.rx.as_mut().is_some_and(|rx| rx.try_recv().is_ok()) {
                    self.metrics
                        .request(&self.routes.get(route).name, "withdrawn");
                }
            }
            _ => return,
        }
        drop(guard);
        self.wake();
    }

    /// Finds the oldest write of `client` that can go now: across its lanes (oldest head first),
    /// past writes waiting to retry, writes whose record is busy and writes whose key is spent,
    /// none of which holds up the others. A lane whose shared quotas are spent, or that meets the
    /// in-flight cap, is passed over whole: nothing behind its head may overtake it.
    fn pick(
        &self,
        inner: &Inner,
        client: ClientId,
        ledger: &Ledger,
        now: Time,
        wake_at: &mut Option<Time>,
    ) -> Scan {
        let queue = &inner.clients[client.0];
        let mut capped = false;
        let mut lanes: Vec<(u64, usize)> = queue
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.front().map(|&(seq, _)| (seq, i)))
            .collect();
        lanes.sort_unstable();
        for (_, lane) in lanes {
            let quotas = &self.routes.lane(LaneId(lane)).quotas;
            let mut held_back: Vec<&Arc<str>> = Vec::new();
            for &(_, id) in queue.lanes[lane].iter().take(SCAN_LIMIT) {
                let e = &inner.entries[&id];
                if matches!(e.state, State::Queued(Owner::Proxy)) {
                    if !e.durable {
                        break; // not in the log yet: nothing behind it may overtake it
                    }
                    if inner.in_flight >= self.cfg.max_in_flight {
                        capped = true;
                        break; // a completion wakes us
                    }
                }
                let record_held = e
                    .record
                    .as_ref()
                    .is_some_and(|r| inner.busy.contains(r) || held_back.contains(&r));
                let key_held = e.keys.iter().any(|(_, k)| held_back.contains(&k));
                if e.not_before > now || record_held || key_held {
                    if e.not_before > now {
                        *wake_at = earliest(*wake_at, e.not_before);
                    }
                    held_back.extend(e.record.iter());
                    held_back.extend(e.keys.iter().map(|(_, k)| k));
                    continue;
                }
                let mut batch = None;
                if matches!(e.state, State::Queued(Owner::Proxy)) {
                    match self.batch_plan(inner, client, lane, e, now) {
                        batch::Plan::Alone => {}
                        batch::Plan::Together(members) => batch = Some(members),
                        batch::Plan::Wait(until) => {
                            if let Some(t) = until {
                                *wake_at = earliest(*wake_at, t);
                            }
                            break; // lingering for company, or for a job slot
                        }
                    }
                }
                let demand = Demand {
                    quotas,
                    keys: &e.keys,
                    client,
                    live: matches!(e.state, State::Queued(Owner::Client(_))),
                };
                match ledger.try_acquire(&demand, now) {
                    Ok(grant) => return Scan::Found(Pick { id, grant, batch }),
                    Err(denied) => {
                        *wake_at = earliest(*wake_at, denied.retry_at);
                        let by_key = denied
                            .binding
                            .is_some_and(|q| !ledger.config(q).key.is_empty());
                        if !by_key {
                            break; // the lane's shared quotas are spent
                        }
                        // Only this write's key is spent: later writes of other keys may go.
                        held_back.extend(e.keys.iter().map(|(_, k)| k));
                    }
                }
            }
        }
        if capped {
            Scan::InFlightFull
        } else {
            Scan::Nothing
        }
    }

    /// The next write to send: clients take turns by deficit round robin (a client of weight w
    /// sends up to w writes per round), each sending its oldest write that can go now. A write
    /// whose client still waits is handed to that client; a proxy-owned one is returned.
    pub fn next(&self, ledger: &Ledger, now: Time) -> Step {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut wake_at = self.maintain(inner, now);
        if let Some(poll) = self.poll_due(inner, ledger, now, &mut wake_at) {
            return Step::Poll(poll);
        }
        let mut idle_turns = 0;
        while idle_turns < inner.ring.len() {
            let client = inner.ring[0];
            let weight = i64::from(self.clients[client.0].weight);
            if inner.clients[client.0].deficit <= 0 {
                inner.clients[client.0].deficit += weight;
            }
            let pick = match self.pick(inner, client, ledger, now, &mut wake_at) {
                Scan::Found(pick) => pick,
                // Sends are capped for everyone: the client keeps its turn and credit.
                Scan::InFlightFull => return Step::Idle(wake_at),
                Scan::Nothing => {
                    // Nothing of this client can go now: its turn passes, unused credit capped.
                    let q = &mut inner.clients[client.0];
                    q.deficit = q.deficit.min(weight);
                    inner.ring.rotate_left(1);
                    idle_turns += 1;
                    continue;
                }
            };
            idle_turns = 0;
            inner.clients[client.0].deficit -= 1;
            if inner.clients[client.0].deficit <= 0 {
                inner.ring.rotate_left(1);
            }
            if pick.batch.is_some() {
                match self.hand_out_batch(inner, pick, ledger, now) {
                    Ok(b) => return Step::Batch(b),
                    Err(alone) => {
                        if let Some(dispatch) = self.hand_out(inner, alone) {
                            return Step::Send(dispatch);
                        }
                    }
                }
            } else if let Some(dispatch) = self.hand_out(inner, pick) {
                return Step::Send(dispatch);
            }
        }
        Step::Idle(wake_at)
    }

    /// Takes a picked write out of its lane: to its waiting client, or as a dispatch.
    fn hand_out(&self, inner: &mut Inner, pick: Pick) -> Option<Dispatch> {
        let Pick { id, grant, .. } = pick;
        self.unlink(inner, id);
        let e = inner.entries.get_mut(&id).expect("picked entry exists");
        e.attempts += 1;
        if let Some(r) = &e.record {
            inner.busy.insert(r.clone());
        }
        match std::mem::replace(&mut e.state, State::Dispatching) {
            State::Queued(Owner::Client(tx)) => {
                // The waiting client sends it itself; the entry stays (Live) to keep its
                // record busy until the client's ticket drops.
                e.state = State::Live;
                let request = e
                    .request
                    .take()
                    .expect("queued entries hold their request")
                    .outbound();
                inner.held -= 1;
                inner.held_bytes -= e.bytes;
                // If the client vanished just now, its ticket's drop frees the record; the
                // quota spent here is lost, which can only under-spend.
                let _ = tx.send((request, grant));
                None
            }
            State::Queued(Owner::Proxy) => {
                inner.in_flight += 1;
                let commit = self.log(|| Record::Dispatching {
                    id: id.as_u128(),
                    attempt: e.attempts,
                });
                Some(Dispatch {
                    id,
                    route: e.route,
                    client: e.client,
                    request: e
                        .request
                        .as_ref()
                        .expect("queued entries hold their request")
                        .outbound(),
                    attempt: e.attempts,
                    grant,
                    commit,
                })
            }
            _ => unreachable!("only queued entries are picked"),
        }
    }

    /// Expires queued proxy-owned entries past their TTL and purges old results; returns the
    /// next time maintenance is due.
    fn maintain(&self, inner: &mut Inner, now: Time) -> Option<Time> {
        let mut next: Option<Time> = None;
        let mut expired = Vec::new();
        if now < inner.expiry_due {
            // Nothing can have expired yet: skip the scan over every lane.
            next = Some(inner.expiry_due).filter(|t| *t != Time::MAX);
        } else {
            inner.expiry_due = Time::MAX;
        }
        let scan = inner.expiry_due == Time::MAX;
        for q in inner.clients.iter().filter(|_| scan) {
            for lane in &q.lanes {
                // Expiry times grow along a lane (arrival order, one global TTL), so the scan
                // stops at the first entry still in time.
                for &(_, id) in lane {
                    let e = &inner.entries[&id];
                    if e.expires_at > now {
                        next = earliest(next, e.expires_at);
                        inner.expiry_due = inner.expiry_due.min(e.expires_at);
                        break;
                    }
                    // Client-owned entries are bounded by their max_wait (< ttl) instead.
                    if matches!(e.state, State::Queued(Owner::Proxy)) {
                        expired.push(id);
                    }
                }
            }
        }
        for id in expired {
            self.unlink(inner, id);
            let route = &self.routes.get(inner.entries[&id].route).name;
            inner.finish(id, State::Expired, now);
            self.log(|| Record::Expired {
                id: id.as_u128(),
                at: now.as_nanos(),
            });
            self.metrics.expired(route);
            tracing::warn!(request_id = %id, route = %route, "parked write expired before quota allowed it");
        }
        // After expiry, so entries that just finished are scheduled for purging too.
        while let Some(&(at, id)) = inner.finished.front() {
            if at + self.cfg.result_ttl <= now {
                inner.finished.pop_front();
                inner.entries.remove(&id);
                self.log(|| Record::Removed { id: id.as_u128() });
            } else {
                next = earliest(next, at + self.cfg.result_ttl);
                break;
            }
        }
        // Last, so the snapshot leaves out what was just purged.
        self.compact_if_due(inner);
        next
    }

    /// Records the end of one attempt of a proxy-owned entry.
    pub fn complete(&self, id: EntryId, outcome: Outcome, now: Time) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.in_flight -= 1;
        self.settle_attempt(inner, id, outcome, now);
        drop(guard);
        self.wake();
    }

    /// Where one attempt leaves a dispatching entry: done, back in its lane, or a dead letter.
    fn settle_attempt(&self, inner: &mut Inner, id: EntryId, outcome: Outcome, now: Time) {
        let Some(e) = inner.entries.get_mut(&id) else {
            return;
        };
        e.batched = None;
        if let Some(r) = &e.record {
            inner.busy.remove(r);
        }
        let route = self.routes.get(e.route).name.as_str();
        let uid = id.as_u128();
        // Outcomes are logged without waiting: if one is lost, recovery finds the write still
        // marked as being sent and treats it as possibly applied.
        match outcome {
            Outcome::Done(resp) => {
                self.log(|| Record::Done {
                    id: uid,
                    at: now.as_nanos(),
                    response: stored_response(&resp),
                });
                inner.finish(id, State::Done(Box::new(resp)), now);
                self.metrics.dispatched(route);
            }
            Outcome::Throttled | Outcome::Retry { .. } | Outcome::NotSent { .. } => {
                match outcome {
                    Outcome::Retry { not_before, error } => {
                        tracing::info!(request_id = %id, route, attempt = e.attempts, %error, "parked write will be retried");
                        e.not_before = not_before;
                        self.metrics.retried(route);
                    }
                    Outcome::NotSent { not_before, error } => {
                        tracing::warn!(request_id = %id, route, %error, "parked write not sent; will try again");
                        e.not_before = not_before;
                        e.attempts -= 1;
                    }
                    _ => e.attempts -= 1,
                }
                e.state = State::Queued(Owner::Proxy);
                self.log(|| Record::Requeued {
                    id: uid,
                    attempts: e.attempts,
                    not_before: e.not_before.as_nanos(),
                });
                self.link(inner, id);
            }
            Outcome::Failed(reason, error) => {
                tracing::error!(request_id = %id, route, attempts = e.attempts, ?reason, %error, "parked write failed; kept as a dead letter");
                self.log(|| Record::Failed {
                    id: uid,
                    at: now.as_nanos(),
                    reason: fail_code(reason),
                    error: error.clone(),
                });
                inner.finish(id, State::Failed(reason, error), now);
                self.metrics.failed(route, reason);
            }
        }
    }

    /// A parked write as the client who sent it may see it; `None` when unknown or when the
    /// credential differs (both answer 404, so ids cannot be probed).
    pub fn status(
        &self,
        id: EntryId,
        fingerprint: Fingerprint,
        ledger: &Ledger,
        now: Time,
    ) -> Option<StatusView> {
        let inner = self.lock();
        let e = inner.entries.get(&id)?;
        // Only a 202 makes an id visible: client-owned and live entries are not reported.
        if e.fingerprint != fingerprint
            || matches!(e.state, State::Queued(Owner::Client(_)) | State::Live)
        {
            return None;
        }
        let queued =
            matches!(e.state, State::Queued(_)).then(|| self.position(&inner, e, ledger, now));
        let (reason, error, stored) = match &e.state {
            State::Failed(reason, err) => (Some(*reason), Some(err.clone()), None),
            State::Expired => (None, Some("expired before quota allowed it".into()), None),
            State::Done(r) => (None, None, Some((**r).clone())),
            _ => (None, None, None),
        };
        Some(StatusView {
            id: id.to_string(),
            status: e.state.status(),
            route: self.routes.get(e.route).name.clone(),
            attempts: e.attempts,
            created_at: e.created_at.to_string(),
            finished_at: e.finished_at.map(|t| t.to_string()),
            position: queued.map(|(p, _)| p),
            estimated_dispatch_at: queued.map(|(_, eta)| eta.to_string()),
            reason,
            error,
            response: stored.as_ref().map(ResponseView::of),
            stored,
        })
    }

    /// Stops accepting new parked writes (shutdown); parked ones keep draining.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake();
    }

    /// Proxy-owned writes not yet delivered: queued or being sent.
    pub fn undelivered(&self) -> Vec<EntryId> {
        let inner = self.lock();
        inner
            .entries
            .values()
            .filter(|e| matches!(e.state, State::Queued(Owner::Proxy) | State::Dispatching))
            .map(|e| e.id)
            .collect()
    }

    /// Whether no parked write is queued or in flight (client-owned ones included).
    pub fn is_drained(&self) -> bool {
        let inner = self.lock();
        inner.in_flight == 0 && inner.ring.is_empty() && inner.jobs.is_empty()
    }

    pub fn snapshot(&self, now: Time) -> QueueStatus {
        let inner = self.lock();
        let mut lanes = Vec::new();
        for (c, q) in inner.clients.iter().enumerate() {
            for (l, lane) in q.lanes.iter().enumerate() {
                // Every lane of the default client is listed; other clients' only when in use.
                if lane.is_empty() && c + 1 != inner.clients.len() {
                    continue;
                }
                lanes.push(LaneStatus {
                    name: self.routes.lane(LaneId(l)).name.clone(),
                    client: self.clients[c].name.clone(),
                    depth: lane.len(),
                    oldest_age_seconds: lane
                        .front()
                        .map(|(_, id)| {
                            now.saturating_since(inner.entries[id].created_at)
                                .as_secs_f64()
                        })
                        .unwrap_or(0.0),
                });
            }
        }
        let mut dead: Vec<&Entry> = inner
            .entries
            .values()
            .map(|e| &**e)
            .filter(|e| matches!(e.state, State::Failed(..) | State::Expired))
            .collect();
        dead.sort_by_key(|e| std::cmp::Reverse(e.finished_at));
        let failed = dead
            .iter()
            .filter(|e| matches!(e.state, State::Failed(..)))
            .count();
        QueueStatus {
            entries: inner.held,
            bytes: inner.held_bytes,
            queued: inner.clients.iter().map(|q| q.queued).sum(),
            dispatching: inner
                .entries
                .values()
                .filter(|e| matches!(e.state, State::Dispatching))
                .count(),
            failed,
            expired: dead.len() - failed,
            dead_letters: dead.iter().take(100).map(|e| self.summary(e)).collect(),
            lanes,
        }
    }

    fn summary(&self, e: &Entry) -> EntrySummary {
        let (reason, error) = match &e.state {
            State::Failed(reason, err) => (Some(*reason), Some(err.clone())),
            State::Expired => (None, Some("expired before quota allowed it".into())),
            _ => (None, None),
        };
        EntrySummary {
            id: e.id.to_string(),
            status: e.state.status(),
            route: self.routes.get(e.route).name.clone(),
            client: self.clients[e.client.0].name.clone(),
            attempts: e.attempts,
            created_at: e.created_at.to_string(),
            finished_at: e.finished_at.map(|t| t.to_string()),
            reason,
            error,
        }
    }

    /// The parked writes the proxy owns, optionally only those in one status, oldest first.
    pub fn list(&self, status: Option<Status>) -> Vec<EntrySummary> {
        let inner = self.lock();
        let mut out: Vec<&Entry> = inner
            .entries
            .values()
            .map(|e| &**e)
            .filter(|e| !matches!(e.state, State::Queued(Owner::Client(_)) | State::Live))
            .filter(|e| status.is_none_or(|s| e.state.status() == s))
            .collect();
        out.sort_by_key(|e| e.seq);
        out.into_iter().map(|e| self.summary(e)).collect()
    }

    /// One parked write in full (credentials redacted), for the operator.
    pub fn inspect(&self, id: EntryId) -> Option<EntryDetail> {
        let inner = self.lock();
        let e = inner
            .entries
            .get(&id)
            .filter(|e| !matches!(e.state, State::Queued(Owner::Client(_)) | State::Live))?;
        Some(EntryDetail {
            summary: self.summary(e),
            request: e.request.as_ref().map(RequestView::of),
            response: match &e.state {
                State::Done(r) => Some(ResponseView::of(r)),
                _ => None,
            },
        })
    }

    /// An operator sends a failed or expired write again: fresh attempts and TTL, back in its
    /// lane at its arrival position.
    pub fn retry(&self, id: EntryId, now: Time) -> Result<Commit, OpError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let e = inner.entries.get_mut(&id).ok_or(OpError::NotFound)?;
        if !matches!(e.state, State::Failed(..) | State::Expired) {
            return Err(OpError::WrongState(e.state.status()));
        }
        e.state = State::Queued(Owner::Proxy);
        e.attempts = 0;
        e.not_before = now;
        e.expires_at = now + self.cfg.ttl;
        e.finished_at = None;
        let commit = self.log(|| Record::Retried {
            id: id.as_u128(),
            at: now.as_nanos(),
            expires_at: e.expires_at.as_nanos(),
        });
        self.link(inner, id);
        drop(guard);
        self.wake();
        tracing::info!(request_id = %id, "an operator queued a dead letter again");
        Ok(commit)
    }

    /// An operator gives up a failed or expired write for good.
    pub fn discard(&self, id: EntryId) -> Result<Commit, OpError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let e = inner.entries.get(&id).ok_or(OpError::NotFound)?;
        if !matches!(e.state, State::Failed(..) | State::Expired) {
            return Err(OpError::WrongState(e.state.status()));
        }
        let e = inner.entries.remove(&id).expect("present");
        inner.held -= 1;
        inner.held_bytes -= e.bytes;
        tracing::warn!(request_id = %id, "an operator discarded a dead letter");
        Ok(self.log(|| Record::Removed { id: id.as_u128() }))
    }

    /// Rebuilds the queue from what the log held: writes back in their lanes in arrival order;
    /// writes that were being sent are resent only when that cannot apply them twice, else
    /// failed as ambiguous; finished ones readable until their result TTL.
    pub fn restore(&self, recovered: Vec<(Stored, RecoveredState)>, now: Time) -> Restored {
        let mut report = Restored::default();
        let mut in_jobs: HashMap<Arc<str>, Vec<(u32, EntryId)>> = HashMap::new();
        let mut guard = self.lock();
        let inner = &mut *guard;
        for (s, state) in recovered {
            let Some(request) = outbound(&s) else {
                tracing::error!(request_id = %EntryId::from_u128(s.id), "a logged write has an unreadable request; skipped");
                continue;
            };
            let path = request.path_and_query.split('?').next().unwrap_or_default();
            let route = self.routes.find(&s.route, &request.method, path);
            let client = self
                .clients
                .iter()
                .position(|c| c.name == s.client)
                .map_or(ClientId(self.clients.len() - 1), ClientId);
            let keys = s
                .keys
                .iter()
                .filter_map(|(q, k)| {
                    let q = self.quota_names.iter().position(|n| n == q)?;
                    route
                        .keyed
                        .iter()
                        .any(|(kq, _)| kq.0 == q)
                        .then(|| (crate::quota::QuotaId(q), Arc::from(k.as_str())))
                })
                .collect();
            let id = EntryId::from_u128(s.id);
            let bytes = request.body.len() + header_bytes(&request);
            // A batch call carries no per-item idempotency key: only retry_ambiguous resends it.
            let safe = match &state {
                RecoveredState::InFlight { batch: true, .. } => route.retry_ambiguous,
                _ => route.resend_safe(&request),
            };
            let batchable = self.batchable(route, &request);
            let mut batched = None;
            let (state, finished_at) = match state {
                RecoveredState::Queued => {
                    report.queued += 1;
                    (State::Queued(Owner::Proxy), None)
                }
                RecoveredState::InJob { job, index, .. } => {
                    report.in_jobs += 1;
                    let job: Arc<str> = Arc::from(job);
                    in_jobs.entry(job.clone()).or_default().push((index, id));
                    batched = Some(Batched::Job(job, index));
                    if let Some(r) = &s.record {
                        inner.busy.insert(Arc::from(r.as_str()));
                    }
                    (State::Dispatching, None)
                }
                RecoveredState::InFlight { .. } if safe => {
                    report.resent += 1;
                    self.log(|| Record::Requeued {
                        id: s.id,
                        attempts: s.attempts,
                        not_before: now.as_nanos(),
                    });
                    (State::Queued(Owner::Proxy), None)
                }
                RecoveredState::InFlight { .. } => {
                    report.ambiguous += 1;
                    let error = "it was being sent when the proxy stopped: the CRM may have applied it, and resending could apply it twice".to_string();
                    self.log(|| Record::Failed {
                        id: s.id,
                        at: now.as_nanos(),
                        reason: fail_code(FailReason::Ambiguous),
                        error: error.clone(),
                    });
                    self.metrics.failed(&route.name, FailReason::Ambiguous);
                    (State::Failed(FailReason::Ambiguous, error), Some(now))
                }
                RecoveredState::Done { at, response } => {
                    if Time::from_nanos(at) + self.cfg.result_ttl <= now {
                        self.log(|| Record::Removed { id: s.id });
                        continue;
                    }
                    report.finished += 1;
                    (
                        State::Done(Box::new(buffered(&response))),
                        Some(Time::from_nanos(at)),
                    )
                }
                RecoveredState::Failed { at, reason, error } => {
                    report.finished += 1;
                    let reason = match reason {
                        1 => FailReason::Ambiguous,
                        2 => FailReason::Rejected,
                        _ => FailReason::AttemptsExhausted,
                    };
                    (State::Failed(reason, error), Some(Time::from_nanos(at)))
                }
                RecoveredState::Expired { at } => {
                    report.finished += 1;
                    (State::Expired, Some(Time::from_nanos(at)))
                }
            };
            let holds = state.holds_request();
            let queued = matches!(state, State::Queued(_));
            if let (State::Done(_), Some(at)) = (&state, finished_at) {
                inner.finished.push_back((at, id));
            }
            inner.seq = inner.seq.max(s.seq);
            inner.entries.insert(
                id,
                Box::new(Entry {
                    id,
                    seq: s.seq,
                    route: route.id,
                    lane: route.lane,
                    client,
                    keys,
                    request: holds.then(|| Kept::new(&request)),
                    record: s.record.map(Arc::from),
                    fingerprint: Fingerprint::from_bytes(s.fingerprint),
                    bytes,
                    created_at: Time::from_nanos(s.created_at),
                    expires_at: Time::from_nanos(s.expires_at),
                    not_before: Time::from_nanos(s.not_before),
                    attempts: s.attempts,
                    state,
                    finished_at,
                    durable: true,
                    batchable,
                    single: false,
                    batched,
                }),
            );
            if holds {
                inner.held += 1;
                inner.held_bytes += bytes;
            }
            if queued {
                self.link(inner, id);
            }
        }
        self.restore_jobs(inner, in_jobs, now);
        drop(guard);
        self.wake();
        report
    }

    /// Rewrites the log as the live state when it has grown far beyond it.
    fn compact_if_due(&self, inner: &Inner) {
        let live = inner.held_bytes as u64 + inner.entries.len() as u64 * 256;
        if !self.store.wants_compaction(self.compact_bytes, live) {
            return;
        }
        let mut snapshot = Vec::with_capacity(inner.entries.len() * 2);
        let mut entries: Vec<&Entry> = inner.entries.values().map(|e| &**e).collect();
        entries.sort_by_key(|e| e.seq);
        for e in entries {
            let uid = e.id.as_u128();
            let mut job = None;
            let state = match &e.state {
                State::Queued(Owner::Client(_)) | State::Live => continue,
                State::Queued(Owner::Proxy) => None,
                State::Dispatching if e.batched.is_some() => {
                    if let Some(Batched::Job(j, index)) = &e.batched {
                        job = Some(Record::Job {
                            id: uid,
                            job: j.to_string(),
                            index: *index,
                        });
                    }
                    Some(Record::BatchSent {
                        id: uid,
                        attempt: e.attempts,
                    })
                }
                State::Dispatching => Some(Record::Dispatching {
                    id: uid,
                    attempt: e.attempts,
                }),
                State::Done(r) => Some(Record::Done {
                    id: uid,
                    at: e.finished_at.unwrap_or_default().as_nanos(),
                    response: stored_response(r),
                }),
                State::Failed(reason, error) => Some(Record::Failed {
                    id: uid,
                    at: e.finished_at.unwrap_or_default().as_nanos(),
                    reason: fail_code(*reason),
                    error: error.clone(),
                }),
                State::Expired => Some(Record::Expired {
                    id: uid,
                    at: e.finished_at.unwrap_or_default().as_nanos(),
                }),
            };
            snapshot.push(Record::Accepted(Box::new(self.stored(e))));
            snapshot.extend(state);
            snapshot.extend(job);
        }
        self.store.compact(&snapshot);
    }

    /// Completes once every record so far is durable (shutdown: finished writes stay finished).
    pub async fn sync(&self) -> Result<(), crate::store::StoreError> {
        self.store.sync().durable().await
    }

    /// The log's counters, for metrics.
    pub fn store_stats(&self) -> Option<&crate::store::StoreStats> {
        self.store.stats()
    }
}

fn fail_code(reason: FailReason) -> u8 {
    match reason {
        FailReason::AttemptsExhausted => 0,
        FailReason::Ambiguous => 1,
        FailReason::Rejected => 2,
    }
}

fn stored_response(r: &BufferedResponse) -> StoredResponse {
    StoredResponse {
        status: r.status.as_u16(),
        headers: r
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: r.body.clone(),
    }
}

fn buffered(r: &StoredResponse) -> BufferedResponse {
    let mut headers = http::HeaderMap::new();
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            headers.append(k, v);
        }
    }
    BufferedResponse {
        status: http::StatusCode::from_u16(r.status).unwrap_or(http::StatusCode::OK),
        headers,
        body: r.body.clone(),
    }
}

/// The request a logged write carries, or `None` if it does not parse.
fn outbound(s: &Stored) -> Option<Outbound> {
    let mut headers = http::HeaderMap::new();
    for (k, v) in &s.headers {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(v).ok()?,
        );
    }
    Some(Outbound {
        method: http::Method::from_bytes(s.method.as_bytes()).ok()?,
        path_and_query: s.path_and_query.clone(),
        headers,
        body: s.body.clone(),
    })
}

impl Inner {
    /// Moves an entry to a final state; drops its request unless it is kept as a dead letter.
    fn finish(&mut self, id: EntryId, state: State, now: Time) {
        let e = self.entries.get_mut(&id).expect("finishing a known entry");
        // Dead letters (failed, expired) keep their request for an operator to retry.
        let keeps = matches!(state, State::Failed(..) | State::Expired);
        if !keeps && e.state.holds_request() {
            self.held -= 1;
            self.held_bytes -= e.bytes;
            e.request = None;
        }
        e.state = state;
        e.finished_at = Some(now);
        if !keeps {
            self.finished.push_back((now, id));
        }
    }
}

fn earliest(a: Option<Time>, b: Time) -> Option<Time> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Approximate memory of a request's headers and target (what the byte bound counts besides the body).
fn header_bytes(r: &Outbound) -> usize {
    r.path_and_query.len()
        + r.headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum::<usize>()
}

/// A live client's claim on its write. While the write waits, dropping the ticket (the client
/// left) withdraws it: a disconnected client's write is never sent later. While the client sends
/// it, the ticket keeps its record busy; `repark` hands it to the proxy instead.
pub struct Ticket {
    queue: Arc<Queue>,
    id: EntryId,
    rx: Option<oneshot::Receiver<(Outbound, Grant)>>,
    /// Ownership passed to the proxy, or the entry is already removed: nothing to undo.
    settled: bool,
}

impl Ticket {
    /// Waits up to `max_wait` for a grant; then the entry is handed to the proxy or withdrawn.
    pub async fn wait(
        &mut self,
        max_wait: std::time::Duration,
        ledger: &Ledger,
        clock: &dyn crate::clock::Clock,
    ) -> Timeout {
        let Some(rx) = self.rx.as_mut() else {
            self.settled = true;
            return Timeout::Closed;
        };
        // With no wait at all, skip the timer: a zero-length tokio sleep still lasts until the
        // timer wheel's next tick (1 ms).
        let waited = if max_wait.is_zero() {
            Err(())
        } else {
            tokio::time::timeout(max_wait, rx).await.map_err(|_| ())
        };
        match waited {
            Ok(Ok((req, grant))) => Timeout::Granted(req, grant),
            Ok(Err(_)) => {
                self.settled = true;
                Timeout::Closed
            }
            Err(()) => {
                let now = clock.now();
                self.queue.clone().on_timeout(self, ledger, now)
            }
        }
    }

    /// Hands a write its client was sending to the proxy (after a CRM throttle, or when no answer
    /// came and a retry is safe). `None`: the queue cannot take it; answer the client instead.
    pub fn repark(
        &mut self,
        request: Outbound,
        spent_attempt: bool,
        ledger: &Ledger,
        now: Time,
    ) -> Option<Accepted> {
        self.queue
            .clone()
            .repark(self, request, spent_attempt, ledger, now)
    }

    pub fn id(&self) -> EntryId {
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.clone().on_drop(self);
        }
    }
}

#[cfg(test)]
mod tests;
