//! The queue's book: every parked write by id, each client's lanes in arrival order, and the
//! one function that moves a write between states. That function alone changes a write's state,
//! and with it the bounds counters (writes holding a request and their bytes), the count of
//! writes being sent and the index of dead letters, so none can drift from the entries.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::Queue;
use tokio::sync::oneshot;

use super::entry::{Batched, Kept, Owner, Settled, State};
use super::jobs::{Job, Pending, Readback};
use crate::clock::Time;
use crate::crm::zendesk_batch::BatchKind;
use crate::ids::{ClientId, EntryId, Fingerprint, LaneId, QuotaId, RouteId};
use crate::message::{BufferedResponse, headers_bytes};

/// Debug builds recount the aggregates after every change while the book is at most this big
/// (beyond it the check would cost more than everything it checks).
const RECOUNT_UP_TO: usize = 1_000;

/// A parked write.
#[derive(Debug)]
pub(super) struct Entry {
    pub id: EntryId,
    /// Arrival order (across every lane); re-parked writes keep theirs.
    pub seq: u64,
    pub route: RouteId,
    pub lane: LaneId,
    pub client: ClientId,
    /// Keys of the keyed quotas this write consumes.
    pub keys: Box<[(QuotaId, Arc<str>)]>,
    /// Writes to one resource (PUT/PATCH/DELETE on one path) are sent one at a time, in order.
    pub resource: Option<Arc<str>>,
    pub fingerprint: Fingerprint,
    /// What the bounds count for it while it holds its request: body, target and headers
    /// (under `max_body_bytes`, at most 1 GiB, plus a head hyper bounds).
    pub bytes: u32,
    pub created_at: Time,
    pub expires_at: Time,
    pub not_before: Time,
    pub attempts: u32,
    /// Proxy-owned entries are sent only once the log holds them (always, in memory).
    pub durable: bool,
    /// What it would be in a batch call, on a batching route (`None`: it always goes alone).
    pub batchable: Option<BatchKind>,
    /// Never batched again (its batch was refused as a whole, or a second job of it failed).
    pub single: bool,
    /// While dispatching as part of a batch: the call, or the CRM job that holds it.
    // Boxed, like the keys: rare, and every parked write stays smaller without them inline.
    pub batched: Option<Box<Batched>>,
    /// Its state, request and finish time, which only the book changes.
    pub life: Life,
}

/// A write's state, its request while the state holds one, and when it finished. The fields are
/// private to the book: [`Book::insert`] sets them and [`Book::transition`] alone changes them.
#[derive(Debug)]
pub(super) struct Life {
    state: State,
    request: Option<Kept>,
    /// `Time::ZERO` until it finished (a plain time keeps a parked write smaller).
    finished_at: Time,
}

impl Life {
    /// A placeholder for an entry not yet in the book (`insert` gives it its life).
    pub fn unset() -> Life {
        Life {
            state: State::Live,
            request: None,
            finished_at: Time::ZERO,
        }
    }
}

impl Entry {
    pub fn state(&self) -> &State {
        &self.life.state
    }

    /// Its request, while it holds one (waiting, being sent by the proxy, or a dead letter).
    pub fn request(&self) -> Option<&Kept> {
        self.life.request.as_ref()
    }

    /// When it reached its final state (done, failed, expired).
    pub fn finished_at(&self) -> Option<Time> {
        (self.life.finished_at != Time::ZERO).then_some(self.life.finished_at)
    }

    fn is_dead(&self) -> bool {
        matches!(self.life.state, State::Failed(..) | State::Expired)
    }
}

/// One client's parked writes: a lane per set of quotas, each in arrival order `(seq, id)`.
pub(super) struct ClientQueue {
    pub lanes: Vec<VecDeque<(u64, EntryId)>>,
    /// Writes in all its lanes.
    pub queued: usize,
    /// Deficit round robin: sends this client may still make in the current round.
    pub deficit: i64,
}

/// The aggregates scrapes read instead of walking the entries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Counts {
    /// Entries holding a request, and their bytes.
    pub held: usize,
    pub held_bytes: usize,
    /// Delivered writes whose CRM answer is kept for their client, and its bytes. The bounds
    /// (`max_entries`, `max_bytes`) limit these and the held ones together.
    pub done: usize,
    pub done_bytes: usize,
    /// Entries the proxy is sending now (alone or in a batch).
    pub dispatching: usize,
    pub failed: usize,
    pub expired: usize,
}

pub(super) struct Book {
    // Boxed: a table slot stays small, so its growth slack costs little per parked write.
    entries: HashMap<EntryId, Box<Entry>>,
    counts: Counts,
    /// Dead letters by finish time, so the newest are listed without a scan.
    dead: BTreeSet<(Time, EntryId)>,
    pub clients: Vec<ClientQueue>,
    /// Clients with queued writes, in round-robin order.
    pub ring: VecDeque<ClientId>,
    /// Resources with a send in progress (proxy- or client-driven).
    pub busy: HashSet<Arc<str>>,
    /// Done entries by finish time, purged after `result_ttl` (dead letters are kept).
    pub finished: VecDeque<(Time, EntryId)>,
    pub seq: u64,
    /// Sends by the proxy in progress: single writes, batch calls and polls.
    pub in_flight: usize,
    pub closed: bool,
    /// No queued entry expires before this: the expiry scan is skipped until then.
    pub expiry_due: Time,
    /// Batch calls on their way, by number.
    pub sending: HashMap<u64, Pending>,
    pub batch_seq: u64,
    /// CRM jobs holding batches whose results are still to be read.
    pub jobs: HashMap<Arc<str>, Job>,
    /// Clients still waiting for the result of a write that went in a batch call.
    pub watchers: HashMap<EntryId, oneshot::Sender<Settled>>,
    /// Created tickets to read back for the clients waiting on them, one read per batch.
    pub readbacks: Vec<Readback>,
}

impl Book {
    pub fn new(clients: usize, lanes: usize) -> Book {
        Book {
            entries: HashMap::new(),
            counts: Counts::default(),
            dead: BTreeSet::new(),
            clients: (0..clients)
                .map(|_| ClientQueue {
                    lanes: (0..lanes).map(|_| VecDeque::new()).collect(),
                    queued: 0,
                    deficit: 0,
                })
                .collect(),
            ring: VecDeque::new(),
            busy: HashSet::new(),
            finished: VecDeque::new(),
            seq: 0,
            in_flight: 0,
            closed: false,
            expiry_due: Time::MAX,
            sending: HashMap::new(),
            batch_seq: 0,
            jobs: HashMap::new(),
            watchers: HashMap::new(),
            readbacks: Vec::new(),
        }
    }

    /// Whether a batch call or CRM job of this client's lane has not settled yet: until it
    /// has, nothing else of the lane goes, so the CRM applies the lane in arrival order.
    pub fn batch_open(&self, client: ClientId, lane: LaneId) -> bool {
        self.sending
            .values()
            .chain(self.jobs.values().map(|j| &j.batch))
            .any(|p| p.client == client && p.lane == lane)
    }

    pub fn get(&self, id: &EntryId) -> Option<&Entry> {
        self.entries.get(id).map(|e| &**e)
    }

    /// An entry to change anything but its state and request (see [`Book::transition`]).
    pub fn get_mut(&mut self, id: &EntryId) -> Option<&mut Entry> {
        self.entries.get_mut(id).map(|e| &mut **e)
    }

    /// An entry known to exist (it is in a lane, a batch or a job).
    pub fn entry(&self, id: &EntryId) -> &Entry {
        self.get(id).expect("the book holds every entry it lists")
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|e| &**e)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Dead letters, newest first.
    pub fn dead_letters(&self) -> impl Iterator<Item = &Entry> {
        self.dead.iter().rev().map(|(_, id)| self.entry(id))
    }

    /// Adds a write in `state` (with `request` when the state holds one).
    pub fn insert(
        &mut self,
        mut e: Entry,
        state: State,
        request: Option<Kept>,
        finished_at: Option<Time>,
    ) {
        debug_assert_eq!(request.is_some(), state.holds_request());
        e.life = Life {
            state,
            request,
            finished_at: finished_at.unwrap_or(Time::ZERO),
        };
        account(&mut self.counts, &mut self.dead, &e, true);
        if let (State::Done(_), Some(at)) = (e.state(), e.finished_at()) {
            self.finished.push_back((at, e.id));
        }
        self.entries.insert(e.id, Box::new(e));
        self.check();
    }

    /// Takes a write out of the book (withdrawn, purged, discarded). It must not be in a lane.
    pub fn remove(&mut self, id: &EntryId) -> Option<Box<Entry>> {
        let e = self.entries.remove(id)?;
        account(&mut self.counts, &mut self.dead, &e, false);
        self.check();
        Some(e)
    }

    /// The one way a write changes state. Moving to a state that holds no request drops the
    /// request; moving to one that does needs it attached ([`Book::attach`]) or kept. A final
    /// state (done, failed, expired) records `now` as its finish; done writes are scheduled
    /// for purging. Returns the state it left.
    pub fn transition(&mut self, id: &EntryId, state: State, now: Time) -> State {
        let e = self
            .entries
            .get_mut(id)
            .expect("a transition of a known entry");
        account(&mut self.counts, &mut self.dead, e, false);
        let finished = matches!(state, State::Done(_) | State::Failed(..) | State::Expired);
        if finished {
            // A client still waiting hears of the end (if nobody told it) as a closed channel.
            self.watchers.remove(id);
        }
        let life = &mut e.life;
        life.finished_at = if finished { now } else { Time::ZERO };
        if !state.holds_request() {
            life.request = None;
        }
        debug_assert!(
            !state.holds_request() || life.request.is_some(),
            "a state that holds a request needs one"
        );
        let old = std::mem::replace(&mut life.state, state);
        if matches!(life.state, State::Done(_)) {
            self.finished.push_back((now, e.id));
        }
        account(&mut self.counts, &mut self.dead, e, true);
        self.check();
        old
    }

    /// Gives a write that holds no request (one its client was sending) its request back,
    /// before a transition to a state that holds it.
    pub fn attach(&mut self, id: &EntryId, request: Kept) {
        let e = self
            .entries
            .get_mut(id)
            .expect("attaching to a known entry");
        debug_assert!(e.life.request.is_none() && !e.life.state.holds_request());
        e.life.request = Some(request);
    }

    /// The aggregates counted afresh from the entries.
    pub fn recount(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.entries() {
            if e.state().holds_request() {
                c.held += 1;
                c.held_bytes += e.bytes as usize;
            }
            match e.state() {
                State::Done(resp) => {
                    c.done += 1;
                    c.done_bytes += response_bytes(resp);
                }
                State::Dispatching => c.dispatching += 1,
                State::Failed(..) => c.failed += 1,
                State::Expired => c.expired += 1,
                _ => {}
            }
        }
        c
    }

    fn check(&self) {
        if cfg!(debug_assertions) && self.entries.len() <= RECOUNT_UP_TO {
            assert_eq!(
                self.counts,
                self.recount(),
                "the queue's aggregates drifted"
            );
            assert_eq!(
                self.dead.len(),
                self.counts.failed + self.counts.expired,
                "the dead-letter index drifted"
            );
            for e in self.entries() {
                assert_eq!(
                    e.request().is_some(),
                    e.state().holds_request(),
                    "entry {} holds a request exactly while its state says so",
                    e.id
                );
            }
        }
    }

    /// Proxy-owned writes not yet delivered: queued or being sent.
    pub fn undelivered(&self) -> Vec<EntryId> {
        self.entries()
            .filter(|e| matches!(e.state(), State::Queued(Owner::Proxy) | State::Dispatching))
            .map(|e| e.id)
            .collect()
    }

    /// Writes waiting in all lanes.
    pub fn queued(&self) -> usize {
        self.clients.iter().map(|q| q.queued).sum()
    }

    /// Where a write stands in its lane: how many are ahead of it.
    pub fn position(&self, e: &Entry) -> usize {
        // Lanes are sorted by (seq, id): a binary search, not a scan of a deep backlog.
        self.clients[e.client.0].lanes[e.lane.0]
            .binary_search(&(e.seq, e.id))
            .unwrap_or_else(|at| at)
    }
}

/// What a kept CRM answer costs the bounds: its body, header names and values, and its status.
pub(super) fn response_bytes(r: &BufferedResponse) -> usize {
    r.body.len() + headers_bytes(&r.headers) + 3
}

/// Adds (`add`) or removes an entry's share of the aggregates.
fn account(c: &mut Counts, dead: &mut BTreeSet<(Time, EntryId)>, e: &Entry, add: bool) {
    let step = |n: &mut usize, by: usize| {
        if add {
            *n += by;
        } else {
            *n -= by;
        }
    };
    if e.state().holds_request() {
        step(&mut c.held, 1);
        step(&mut c.held_bytes, e.bytes as usize);
    }
    match e.state() {
        State::Done(resp) => {
            step(&mut c.done, 1);
            step(&mut c.done_bytes, response_bytes(resp));
        }
        State::Dispatching => step(&mut c.dispatching, 1),
        State::Failed(..) => step(&mut c.failed, 1),
        State::Expired => step(&mut c.expired, 1),
        _ => {}
    }
    if e.is_dead() {
        let key = (e.finished_at().unwrap_or_default(), e.id);
        if add {
            dead.insert(key);
        } else {
            dead.remove(&key);
        }
    }
}

impl Queue {
    /// Puts an entry into its client's lane at its arrival position; a proxy-owned one is
    /// marked on the ledger's board as drain waiting.
    pub(super) fn link(&self, book: &mut Book, id: EntryId) {
        let e = book.entry(&id);
        let (client, lane, key) = (e.client, e.lane, (e.seq, id));
        let (expires_at, proxy_owned) = (
            e.expires_at,
            matches!(e.state(), State::Queued(Owner::Proxy)),
        );
        book.expiry_due = book.expiry_due.min(expires_at);
        if proxy_owned {
            self.board
                .mark(&self.routes().lane(lane).quotas, client, true);
        }
        let q = &mut book.clients[client.0];
        let lane_q = &mut q.lanes[lane.0];
        if let Err(pos) = lane_q.binary_search(&key) {
            lane_q.insert(pos, key);
            q.queued += 1;
            if q.queued == 1 {
                book.ring.push_back(client);
            }
        }
    }

    /// Takes an entry out of its client's lane (and off the board).
    pub(super) fn unlink(&self, book: &mut Book, id: EntryId) {
        let e = book.entry(&id);
        let (client, lane, key) = (e.client, e.lane, (e.seq, id));
        let proxy_owned = matches!(e.state(), State::Queued(Owner::Proxy));
        let q = &mut book.clients[client.0];
        let lane_q = &mut q.lanes[lane.0];
        if let Ok(pos) = lane_q.binary_search(&key) {
            lane_q.remove(pos);
            q.queued -= 1;
            if q.queued == 0 {
                q.deficit = 0;
                book.ring.retain(|c| *c != client);
            }
            if proxy_owned {
                self.board
                    .mark(&self.routes().lane(lane).quotas, client, false);
            }
        }
    }

    /// Removes a queued entry entirely (withdrawn or given up by its client).
    pub(super) fn remove_queued(&self, book: &mut Book, id: EntryId) {
        self.unlink(book, id);
        book.remove(&id);
    }
}
