//! Scheduling: which parked write goes next. Clients take turns by deficit round robin; each
//! sends its oldest write that can go now, past writes waiting to retry or for a busy resource.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::batching::{BatchDispatch, Plan};
use super::book::Book;
use super::entry::{Batched, Handoff, Owner, State};
use super::jobs::Pending;
use super::{Dispatch, Queue, SCAN_LIMIT, Step, earliest};
use crate::clock::Time;
use crate::crm::zendesk_batch;
use crate::ids::{ClientId, EntryId, LaneId, QuotaId};
use crate::quota::{Demand, Grant, Ledger};
use crate::store::{Commit, Record};

/// The first sendable write of one client, found by a scan.
pub(super) struct Pick {
    pub id: EntryId,
    pub grant: Grant,
    /// When it goes as the first of a batch: every member (it included) with its item.
    pub batch: Option<Vec<(EntryId, crate::crm::zendesk_batch::Item)>>,
}

/// What a scan of one client's lanes found.
enum Scan {
    Found(Pick),
    Nothing,
    /// A proxy-owned write could go but the in-flight cap is reached: not the client's fault.
    InFlightFull,
}

impl Queue {
    /// Finds the oldest write of `client` that can go now: across its lanes (oldest head first),
    /// past writes waiting to retry, writes whose resource is busy and writes whose key is spent,
    /// none of which holds up the others. A lane whose shared quotas are spent, or that meets the
    /// in-flight cap, is passed over whole: nothing behind its head may overtake it.
    fn pick(
        &self,
        book: &Book,
        client: ClientId,
        ledger: &Ledger,
        now: Time,
        cap: usize,
        wake_at: &mut Option<Time>,
    ) -> Scan {
        let queue = &book.clients[client.0];
        let mut capped = false;
        let mut lanes: Vec<(u64, usize)> = queue
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.front().map(|&(seq, _)| (seq, i)))
            .collect();
        lanes.sort_unstable();
        let routes = self.routes();
        for (_, lane) in lanes {
            if book.batch_open(client, LaneId(lane)) {
                continue; // its batch's job settles first (a completion wakes us)
            }
            let quotas = &routes.lane(LaneId(lane)).quotas;
            let mut held_back: Vec<&Arc<str>> = Vec::new();
            for &(_, id) in queue.lanes[lane].iter().take(SCAN_LIMIT) {
                let e = book.entry(&id);
                if matches!(e.state(), State::Queued(Owner::Proxy)) {
                    if !e.durable {
                        break; // not in the log yet: nothing behind it may overtake it
                    }
                    if book.in_flight >= cap {
                        capped = true;
                        break; // a completion wakes us
                    }
                }
                let resource_held = e
                    .resource
                    .as_ref()
                    .is_some_and(|r| book.busy.contains(r) || held_back.contains(&r));
                let key_held = e.keys.iter().any(|(_, k)| held_back.contains(&k));
                if e.not_before > now || resource_held || key_held {
                    if e.not_before > now {
                        *wake_at = earliest(*wake_at, e.not_before);
                    }
                    held_back.extend(e.resource.iter());
                    held_back.extend(e.keys.iter().map(|(_, k)| k));
                    continue;
                }
                let mut batch = None;
                if matches!(e.state(), State::Queued(_)) {
                    match self.batch_plan(book, client, lane, e, now) {
                        Plan::Alone => {}
                        Plan::Together(members) => batch = Some(members),
                        Plan::Wait(until) => {
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
                    live: matches!(e.state(), State::Queued(Owner::Client(_))),
                    read: routes.lane(LaneId(lane)).read,
                    // A client that does not wait (`max_wait: 0s`) is served by a 202 as well.
                    deferrable: routes.get(e.route).max_wait.is_zero(),
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
        self.step(ledger, now, self.cfg().max_in_flight)
    }

    /// The next write to send as the circuit breaker's probe: as [`Queue::next`], past the
    /// in-flight cap (calls hung in a CRM that stopped answering hold it until their timeout,
    /// and the probe must still find out within a second that the CRM is back).
    pub fn probe(&self, ledger: &Ledger, now: Time) -> Step {
        self.step(ledger, now, usize::MAX)
    }

    fn step(&self, ledger: &Ledger, now: Time, cap: usize) -> Step {
        let mut guard = self.lock();
        let book = &mut *guard;
        let mut wake_at = self.maintain(book, now);
        if let Some(read) = self.readback_due(book, ledger, now, cap, &mut wake_at) {
            return Step::Readback(read);
        }
        if let Some(poll) = self.poll_due(book, ledger, now, cap, &mut wake_at) {
            return Step::Poll(poll);
        }
        let mut idle_turns = 0;
        while idle_turns < book.ring.len() {
            let client = book.ring[0];
            let weight = i64::from(self.clients()[client.0].weight);
            if book.clients[client.0].deficit <= 0 {
                book.clients[client.0].deficit += weight;
            }
            let pick = match self.pick(book, client, ledger, now, cap, &mut wake_at) {
                Scan::Found(pick) => pick,
                // Sends are capped for everyone: the client keeps its turn and credit.
                Scan::InFlightFull => return Step::Idle(wake_at),
                Scan::Nothing => {
                    // Nothing of this client can go now: its turn passes, unused credit capped.
                    let q = &mut book.clients[client.0];
                    q.deficit = q.deficit.min(weight);
                    book.ring.rotate_left(1);
                    idle_turns += 1;
                    continue;
                }
            };
            idle_turns = 0;
            book.clients[client.0].deficit -= 1;
            if book.clients[client.0].deficit <= 0 {
                book.ring.rotate_left(1);
            }
            if pick.batch.is_some() {
                match self.hand_out_batch(book, pick, ledger, now) {
                    Ok(b) => return Step::Batch(b),
                    Err(alone) => {
                        if let Some(dispatch) = self.hand_out(book, alone, now) {
                            return Step::Send(dispatch);
                        }
                    }
                }
            } else if let Some(dispatch) = self.hand_out(book, pick, now) {
                return Step::Send(dispatch);
            }
        }
        Step::Idle(wake_at)
    }

    /// Takes a picked write out of its lane: to its waiting client, or as a dispatch.
    fn hand_out(&self, book: &mut Book, pick: Pick, now: Time) -> Option<Dispatch> {
        let Pick { id, grant, .. } = pick;
        self.unlink(book, id);
        let e = book.get_mut(&id).expect("picked entry exists");
        e.attempts += 1;
        if let Some(r) = e.resource.clone() {
            book.busy.insert(r);
        }
        let proxy_owned = matches!(book.entry(&id).state(), State::Queued(Owner::Proxy));
        if proxy_owned {
            let request = book
                .entry(&id)
                .request()
                .expect("queued entries hold their request")
                .outbound();
            book.transition(&id, State::Dispatching, now);
            book.in_flight += 1;
            let e = book.entry(&id);
            let commit = self.log(|| Record::Dispatching {
                id: id.as_u128(),
                attempt: e.attempts,
            });
            return Some(Dispatch {
                id,
                route: e.route,
                client: e.client,
                keys: e.keys.to_vec(),
                request,
                attempt: e.attempts,
                grant,
                commit,
            });
        }
        // The waiting client sends it itself; the entry stays (live) to keep its resource busy
        // until the client's ticket drops.
        let request = book
            .entry(&id)
            .request()
            .expect("queued entries hold their request")
            .outbound();
        let State::Queued(Owner::Client(tx)) = book.transition(&id, State::Live, now) else {
            unreachable!("only queued entries are picked");
        };
        // If the client vanished just now, its ticket's drop frees the resource; the quota spent
        // here is lost, which can only under-spend.
        let _ = tx.send(Handoff::Send(request, grant));
        None
    }

    /// Takes a planned batch out of its lane as one call. Members beyond the first are charged
    /// their keyed quotas (per ticket, per user: each item counts); one whose key is spent stays.
    /// `Err` gives the first back to go alone when fewer than two remain.
    // The pick comes back to go alone at once (moved once, matched at once): boxing it would
    // only add an allocation.
    #[allow(clippy::result_large_err)]
    pub(super) fn hand_out_batch(
        &self,
        book: &mut Book,
        pick: Pick,
        ledger: &Ledger,
        now: Time,
    ) -> Result<BatchDispatch, Pick> {
        let Pick { id, grant, batch } = pick;
        let members = batch.unwrap_or_default();
        let first = book.entry(&id);
        let routes = self.routes();
        let (route, client) = (routes.get(first.route), first.client);
        let keyed: Vec<QuotaId> = route.keyed.iter().map(|(q, _)| *q).collect();
        let mut chosen = Vec::with_capacity(members.len());
        for (i, (mid, item)) in members.into_iter().enumerate() {
            if i > 0 && !keyed.is_empty() {
                let e = book.entry(&mid);
                let demand = Demand {
                    quotas: &keyed,
                    keys: &e.keys,
                    client,
                    live: false,
                    read: false,
                    deferrable: false,
                };
                if ledger.try_acquire(&demand, now).is_err() {
                    continue;
                }
            }
            chosen.push((mid, item));
        }
        if chosen.len() < 2 {
            return Err(Pick {
                id,
                grant,
                batch: None,
            });
        }
        let kind = chosen[0].1.kind;
        let headers = book
            .entry(&id)
            .request()
            .map(|r| r.outbound().headers)
            .unwrap_or_default();
        let mut commit = Commit::done();
        let mut out = Vec::with_capacity(chosen.len());
        let mut tickets = Vec::with_capacity(chosen.len());
        let mut items = Vec::with_capacity(chosen.len());
        let key_of = |keys: &[(QuotaId, Arc<str>)], q: QuotaId| {
            keys.iter().find(|(k, _)| *k == q).map(|(_, k)| k.clone())
        };
        let mut demand: Vec<(QuotaId, Option<Arc<str>>)> = route
            .quotas
            .iter()
            .filter(|q| !keyed.contains(q))
            .map(|&q| (q, None))
            .collect();
        for (mid, _) in &chosen {
            let e = book.entry(mid);
            demand.extend(keyed.iter().map(|&q| (q, key_of(&e.keys, q))));
        }
        for (mid, item) in chosen {
            self.unlink(book, mid);
            let e = book.get_mut(&mid).expect("a batch member exists");
            e.attempts += 1;
            e.batched = Some(Box::new(Batched::Sending));
            // The batch can go only once its records are durable, this write's with them.
            e.durable = true;
            let attempt = e.attempts;
            if let Some(r) = e.resource.clone() {
                book.busy.insert(r);
            }
            let client_waits = matches!(book.entry(&mid).state(), State::Queued(Owner::Client(_)));
            // A write whose client still waits is the proxy's from here: logged as accepted
            // (before its `batch sent`), its client told to wait for the result.
            let accepted = client_waits
                .then(|| self.log(|| Record::Accepted(Box::new(self.stored(book.entry(&mid))))));
            if let (State::Queued(Owner::Client(tx)), Some(commit)) =
                (book.transition(&mid, State::Dispatching, now), accepted)
            {
                let (result_tx, result) = oneshot::channel();
                if tx.send(Handoff::Batched { commit, result }).is_ok() {
                    book.watchers.insert(mid, result_tx);
                }
            }
            // Records reach the log in order: the last one durable means all are.
            commit = self.log(|| Record::BatchSent {
                id: mid.as_u128(),
                attempt,
            });
            out.push((mid, attempt));
            tickets.push(item.ticket_id);
            items.push(item.ticket);
        }
        book.batch_seq += 1;
        let batch = book.batch_seq;
        book.in_flight += 1;
        book.sending.insert(
            batch,
            Pending {
                kind,
                route: route.id,
                client,
                lane: route.lane,
                members: out.iter().map(|(m, _)| *m).collect(),
                tickets,
                headers: headers.clone(),
            },
        );
        self.metrics.batch_sent(&route.name, out.len());
        Ok(BatchDispatch {
            batch,
            route: route.id,
            client,
            members: out,
            demand,
            request: zendesk_batch::request(kind, items, &headers),
            grant,
            commit,
        })
    }
}
