//! Admission: a live write asks to go; it is sent at once, parked with its client waiting on a
//! ticket, or handed to the proxy (a 202). The ticket is the client's claim on its write.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::book::{Book, Entry, Life};
use super::entry::{Handoff, Kept, Owner, Settled, State};
use super::{Accepted, Enter, Parkable, Queue};
use crate::clock::{Clock, Time};
use crate::config::{Class, OnLimit};
use crate::crm::zendesk_batch::BatchKind;
use crate::ids::EntryId;
use crate::message::{Outbound, headers_bytes};
use crate::quota::{Demand, Grant, Ledger};
use crate::route::Route;
use crate::store::{Commit, Record};

/// What became of a parked live request when its client's `max_wait` ran out (or a slot came).
pub enum WaitEnd {
    /// A slot was granted within `max_wait`: send it.
    Granted(Outbound, Grant),
    /// It went in a batch call, and how that ended came within `max_wait`.
    Settled(EntryId, Settled),
    /// The proxy now owns delivery; answer 202.
    Accepted(Accepted),
    /// `on_limit: wait`: withdrawn; answer with the over-limit response.
    GaveUp { retry_at: Time },
    /// Shutting down: the write was not accepted (the proxy cannot promise delivery now).
    Closed,
}

/// Approximate memory of a request's headers and target (what the byte bound counts besides the body).
pub(super) fn header_bytes(r: &Outbound) -> usize {
    r.path_and_query.as_str().len() + headers_bytes(&r.headers)
}

impl Queue {
    /// A live write asks to go: sent now if its lane is empty and quota is free, else parked.
    pub fn enter(
        self: &Arc<Self>,
        ledger: &Ledger,
        route: &Route,
        parkable: Parkable,
        now: Time,
    ) -> Enter {
        let mut book = self.lock();
        let book = &mut *book;
        // A new write never overtakes its lane: parked writes, or a batch whose job the CRM
        // has not finished (it applies the batch later than a single call sent now).
        let lane_empty = book.clients[parkable.client.0].lanes[route.lane.0].is_empty()
            && !book.batch_open(parkable.client, route.lane);
        let resource_free = parkable
            .resource
            .as_ref()
            .is_none_or(|r| !book.busy.contains(r));
        let demand = Demand {
            quotas: &route.quotas,
            keys: &parkable.keys,
            client: parkable.client,
            live: true,
            read: route.class == Class::Read,
            deferrable: route.max_wait.is_zero(),
        };
        let granted = if lane_empty && resource_free {
            ledger.try_acquire(&demand, now).ok()
        } else {
            None
        };
        if granted.is_none() && book.closed {
            return Enter::Closed;
        }
        let bytes = parkable.request.body.len() + header_bytes(&parkable.request);
        if granted.is_none() && !self.make_room(book, 1, bytes) {
            return Enter::Full;
        }
        book.seq += 1;
        let id = EntryId::random();
        let new = Entry {
            id,
            seq: book.seq,
            route: route.id,
            lane: route.lane,
            client: parkable.client,
            keys: parkable.keys.into_boxed_slice(),
            resource: parkable.resource,
            fingerprint: parkable.fingerprint,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
            created_at: now,
            expires_at: now + self.cfg().ttl,
            not_before: now,
            attempts: 0,
            durable: false,
            batchable: None,
            single: false,
            batched: None,
            life: Life::unset(),
        };
        if let Some(grant) = granted {
            // Sent by its client now; tracked so its resource stays busy and it can be re-parked.
            if let Some(r) = &new.resource {
                book.busy.insert(r.clone());
            }
            let new = Entry { attempts: 1, ..new };
            book.insert(new, State::Live, None, None);
            return Enter::Go(self.ticket(id, None), parkable.request, grant);
        }
        // Holding the client is pointless when no slot is expected within its max_wait.
        let batchable = self.batchable(route, &parkable.request);
        let ahead = book.clients[parkable.client.0].lanes[route.lane.0].len();
        let eta = ledger.estimate(&route.quotas, calls_ahead(route, batchable, ahead), now);
        let hopeless = eta > now + route.max_wait;
        if hopeless && route.on_limit == OnLimit::Wait {
            return Enter::Refused { retry_at: eta };
        }
        let kept = Some(Kept::new(&parkable.request));
        if hopeless {
            book.insert(new, State::Queued(Owner::Proxy), kept, None);
            let accepted = self.take_over(book, id, ledger, now);
            self.wake();
            return Enter::Accepted(accepted);
        }
        let (tx, rx) = oneshot::channel();
        let new = Entry { batchable, ..new };
        book.insert(new, State::Queued(Owner::Client(tx)), kept, None);
        self.link(book, id);
        self.wake();
        Enter::Parked(self.ticket(id, Some(rx)))
    }

    fn ticket(self: &Arc<Self>, id: EntryId, rx: Option<oneshot::Receiver<Handoff>>) -> Ticket {
        Ticket {
            queue: self.clone(),
            id,
            rx,
            settled: false,
        }
    }

    /// Where an entry stands in its lane, and when it should go.
    pub(super) fn eta(&self, book: &Book, e: &Entry, ledger: &Ledger, now: Time) -> (usize, Time) {
        let position = book.position(e);
        let routes = self.routes();
        let route = routes.get(e.route);
        let eta = ledger
            .estimate(
                &routes.lane(e.lane).quotas,
                calls_ahead(route, e.batchable, position),
                now,
            )
            .max(e.not_before);
        (position, eta)
    }

    /// The proxy takes over an entry (already `Queued(Proxy)` in the book): it joins its lane
    /// and is logged; it may be sent, and its client told 202, once the log holds it.
    fn take_over(&self, book: &mut Book, id: EntryId, ledger: &Ledger, now: Time) -> Accepted {
        let durable = !self.store.is_durable();
        let e = book.entry(&id);
        let batchable = e
            .request()
            .and_then(|r| self.batchable(self.routes().get(e.route), &r.outbound()));
        let e = book.get_mut(&id).expect("taken-over entry exists");
        e.durable = durable;
        e.batchable = batchable;
        let e = book.entry(&id);
        let commit = self.log(|| Record::Accepted(Box::new(self.stored(e))));
        self.link(book, id);
        let (position, estimated_dispatch_at) = self.eta(book, book.entry(&id), ledger, now);
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
        let mut book = self.lock();
        let book = &mut *book;
        if durable {
            if let Some(e) = book.get_mut(&id) {
                e.durable = true;
            }
        } else if book
            .get(&id)
            .is_some_and(|e| matches!(e.state(), State::Queued(_)))
        {
            self.remove_queued(book, id);
        }
        self.wake();
    }

    /// The client's `max_wait` ran out: hand the entry to the proxy (queue) or withdraw it (wait).
    fn on_timeout(&self, ticket: &mut Ticket, ledger: &Ledger, now: Time) -> WaitEnd {
        let mut book = self.lock();
        let book = &mut *book;
        let entry = match book.get(&ticket.id) {
            Some(e) if matches!(e.state(), State::Queued(_)) => e,
            _ => {
                // Granted at the same moment: the request is in the channel.
                return match ticket.rx.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    Some(Handoff::Send(req, grant)) => WaitEnd::Granted(req, grant),
                    Some(Handoff::Batched { commit, result }) => {
                        ticket.settled = true;
                        self.batched_end(book, ticket.id, commit, result, ledger, now)
                    }
                    None => {
                        ticket.settled = true;
                        WaitEnd::Closed
                    }
                };
            }
        };
        let routes = self.routes();
        let on_limit = routes.get(entry.route).on_limit;
        let (_, eta) = self.eta(book, entry, ledger, now);
        if on_limit == OnLimit::Queue && !book.closed {
            // Out of its lane and back in as proxy-owned (which also marks the board).
            self.unlink(book, ticket.id);
            book.transition(&ticket.id, State::Queued(Owner::Proxy), now);
            ticket.settled = true;
            return WaitEnd::Accepted(self.take_over(book, ticket.id, ledger, now));
        }
        self.remove_queued(book, ticket.id);
        ticket.settled = true;
        self.wake();
        if on_limit == OnLimit::Queue {
            WaitEnd::Closed
        } else {
            WaitEnd::GaveUp { retry_at: eta }
        }
    }

    /// A write that went in a batch call, its client's wait over: how it ended if known by
    /// now, else the proxy keeps it (202; it is in the log once `commit` is durable).
    fn batched_end(
        &self,
        book: &Book,
        id: EntryId,
        commit: Commit,
        mut result: oneshot::Receiver<Settled>,
        ledger: &Ledger,
        now: Time,
    ) -> WaitEnd {
        if let Ok(settled) = result.try_recv() {
            return WaitEnd::Settled(id, settled);
        }
        let (position, estimated_dispatch_at) = match book.get(&id) {
            Some(e) => match e.state() {
                State::Done(resp) => {
                    return WaitEnd::Settled(id, Settled::Answer((**resp).clone()));
                }
                State::Failed(reason, error) => {
                    return WaitEnd::Settled(id, Settled::Failed(*reason, error.to_string()));
                }
                // Back in line (throttled, or to be retried).
                State::Queued(_) => self.eta(book, e, ledger, now),
                // In its batch call or job.
                _ => (0, now),
            },
            None => (0, now),
        };
        WaitEnd::Accepted(Accepted {
            id,
            position,
            estimated_dispatch_at,
            commit,
        })
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
        let mut book = self.lock();
        let book = &mut *book;
        let e = book.get(&ticket.id)?;
        let bytes = e.bytes as usize;
        if !matches!(e.state(), State::Live) || book.closed || !self.make_room(book, 1, bytes) {
            return None;
        }
        let e = book.get_mut(&ticket.id).expect("present");
        if !spent_attempt {
            e.attempts = e.attempts.saturating_sub(1);
        }
        e.not_before = now;
        if let Some(r) = e.resource.clone() {
            book.busy.remove(&r);
        }
        book.attach(&ticket.id, Kept::new(&request));
        book.transition(&ticket.id, State::Queued(Owner::Proxy), now);
        ticket.settled = true;
        let accepted = self.take_over(book, ticket.id, ledger, now);
        self.wake();
        Some(accepted)
    }

    /// The shared ledger had no room for a write its client was about to send: it goes back to
    /// its place in line, its attempt not spent, and its client waits on. `false` when the
    /// queue cannot take it back (shutting down).
    fn back_in_line(&self, ticket: &mut Ticket, request: Outbound, now: Time) -> bool {
        let mut guard = self.lock();
        let book = &mut *guard;
        if book.closed
            || !book
                .get(&ticket.id)
                .is_some_and(|e| matches!(e.state(), State::Live))
        {
            return false;
        }
        let e = book.get_mut(&ticket.id).expect("present");
        e.attempts = e.attempts.saturating_sub(1);
        if let Some(r) = e.resource.clone() {
            book.busy.remove(&r);
        }
        book.attach(&ticket.id, Kept::new(&request));
        let (tx, rx) = oneshot::channel();
        book.transition(&ticket.id, State::Queued(Owner::Client(tx)), now);
        ticket.rx = Some(rx);
        self.link(book, ticket.id);
        drop(guard);
        self.wake();
        true
    }

    /// The client went away before a 202: withdraw its entry; after a send, free its resource.
    fn on_drop(&self, ticket: &mut Ticket) {
        let mut book = self.lock();
        let book = &mut *book;
        let Some(e) = book.get(&ticket.id) else {
            return;
        };
        let route = e.route;
        match e.state() {
            State::Queued(_) => {
                self.remove_queued(book, ticket.id);
                self.metrics
                    .request(&self.routes().get(route).name, "withdrawn");
            }
            State::Live => {
                if let Some(r) = book.remove(&ticket.id).and_then(|e| e.resource.clone()) {
                    book.busy.remove(&r);
                }
                // A grant that arrived after the client left: the quota was spent for nothing.
                if ticket.rx.as_mut().is_some_and(|rx| rx.try_recv().is_ok()) {
                    self.metrics
                        .request(&self.routes().get(route).name, "withdrawn");
                }
            }
            _ => return,
        }
        self.wake();
    }
}

/// A live client's claim on its write. While the write waits, dropping the ticket (the client
/// left) withdraws it: a disconnected client's write is never sent later. While the client sends
/// it, the ticket keeps its resource busy; `repark` hands it to the proxy instead.
pub struct Ticket {
    queue: Arc<Queue>,
    id: EntryId,
    rx: Option<oneshot::Receiver<Handoff>>,
    /// Ownership passed to the proxy, or the entry is already removed: nothing to undo.
    settled: bool,
}

impl Ticket {
    /// Waits up to `max_wait` for a grant; then the entry is handed to the proxy or withdrawn.
    pub async fn wait(
        &mut self,
        max_wait: Duration,
        ledger: &Ledger,
        clock: &dyn Clock,
    ) -> WaitEnd {
        let deadline = tokio::time::Instant::now() + max_wait;
        let Some(rx) = self.rx.as_mut() else {
            self.settled = true;
            return WaitEnd::Closed;
        };
        // With no wait at all, skip the timer: a zero-length tokio sleep still lasts until the
        // timer wheel's next tick (1 ms).
        let waited = if max_wait.is_zero() {
            Err(())
        } else {
            tokio::time::timeout(max_wait, rx).await.map_err(|_| ())
        };
        match waited {
            Ok(Ok(Handoff::Send(req, grant))) => WaitEnd::Granted(req, grant),
            Ok(Ok(Handoff::Batched { commit, mut result })) => {
                // The proxy owns the write now; the client waits on for its result.
                self.settled = true;
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Ok(Ok(settled)) = tokio::time::timeout(left, &mut result).await {
                    return WaitEnd::Settled(self.id, settled);
                }
                let book = self.queue.lock();
                self.queue
                    .batched_end(&book, self.id, commit, result, ledger, clock.now())
            }
            Ok(Err(_)) => {
                self.settled = true;
                WaitEnd::Closed
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

    /// The shared ledger had no room for the write this client was about to send: back to its
    /// place in line, the client waiting on (`false`: the queue is closing).
    pub fn back_in_line(&mut self, request: Outbound, now: Time) -> bool {
        self.queue.clone().back_in_line(self, request, now)
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

/// How many calls go before a write `ahead` places back in its lane: one per write, or one per
/// batch of `max_size` on a route that batches it.
pub(super) fn calls_ahead(route: &Route, batchable: Option<BatchKind>, ahead: usize) -> u64 {
    match (route.batch, batchable) {
        (Some(b), Some(_)) => (ahead / b.max_size.max(1)) as u64,
        _ => ahead as u64,
    }
}
