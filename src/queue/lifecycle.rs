//! A parked write's life after admission: what an attempt's outcome does to it, its TTL, the
//! purge of finished results, and the operator's retry and discard of dead letters.

use super::book::{Book, Counts, response_bytes};
use super::entry::{Owner, Settled, State};
use super::persistence::stored_response;
use super::{OpError, Outcome, Queue, earliest};
use crate::clock::Time;
use crate::ids::EntryId;
use crate::message::drop_body;
use crate::store::{Commit, Record};

impl Queue {
    /// Expires queued proxy-owned entries past their TTL, purges old results and compacts the
    /// log when due; returns the next time maintenance is due.
    pub(super) fn maintain(&self, book: &mut Book, now: Time) -> Option<Time> {
        let mut next: Option<Time> = None;
        let mut expired = Vec::new();
        if now < book.expiry_due {
            // Nothing can have expired yet: skip the scan over every lane.
            next = Some(book.expiry_due).filter(|t| *t != Time::MAX);
        } else {
            book.expiry_due = Time::MAX;
        }
        if book.expiry_due == Time::MAX {
            let mut due = Time::MAX;
            for q in &book.clients {
                for lane in &q.lanes {
                    // Expiry times grow along a lane (arrival order, one global TTL), so the
                    // scan stops at the first entry still in time.
                    for &(_, id) in lane {
                        let e = book.entry(&id);
                        if e.expires_at > now {
                            next = earliest(next, e.expires_at);
                            due = due.min(e.expires_at);
                            break;
                        }
                        // Client-owned entries are bounded by their max_wait (< ttl) instead.
                        if matches!(e.state(), State::Queued(Owner::Proxy)) {
                            expired.push(id);
                        }
                    }
                }
            }
            book.expiry_due = due;
        }
        for id in expired {
            self.unlink(book, id);
            let routes = self.routes();
            let route = &routes.get(book.entry(&id).route).name;
            book.transition(&id, State::Expired, now);
            self.log(|| Record::Expired {
                id: id.as_u128(),
                at: now.as_nanos(),
            });
            self.metrics.expired(route);
            tracing::warn!(request_id = %id, route = %route, "parked write expired before quota allowed it");
        }
        // After expiry, so entries that just finished are scheduled for purging too.
        while let Some(&(at, id)) = book.finished.front() {
            if at + self.cfg().result_ttl <= now {
                book.finished.pop_front();
                // Only done writes are listed here, and nothing but this purge removes one.
                if book
                    .get(&id)
                    .is_some_and(|e| matches!(e.state(), State::Done(_)))
                {
                    book.remove(&id);
                    self.log(|| Record::Removed { id: id.as_u128() });
                }
            } else {
                next = earliest(next, at + self.cfg().result_ttl);
                break;
            }
        }
        // Last, so the snapshot leaves out what was just purged.
        self.compact_if_due(book);
        next
    }

    /// Whether `entries` more parked writes of `bytes` more bytes fit `max_entries` and
    /// `max_bytes` (which counts kept answers too), after evicting the oldest kept answers of
    /// delivered writes as needed: a parked write always has priority over a result.
    pub(super) fn make_room(&self, book: &mut Book, entries: usize, bytes: usize) -> bool {
        if book.counts().held + entries > self.cfg().max_entries {
            return false;
        }
        self.evict_results_until(book, |c| {
            c.held_bytes + c.done_bytes + bytes <= self.cfg().max_bytes
        })
    }

    /// Room for one more kept answer of `bytes` more bytes: within `max_results` and
    /// `max_bytes`, evicting the oldest kept answers as needed.
    fn room_for_result(&self, book: &mut Book, bytes: usize) -> bool {
        self.evict_results_until(book, |c| {
            c.done < self.cfg().max_results
                && c.held_bytes + c.done_bytes + bytes <= self.cfg().max_bytes
        })
    }

    /// Evicts kept answers, oldest first, until `fits` holds; whether it does.
    fn evict_results_until(&self, book: &mut Book, fits: impl Fn(&Counts) -> bool) -> bool {
        loop {
            if fits(book.counts()) {
                return true;
            }
            let Some((_, id)) = book.finished.pop_front() else {
                return false;
            };
            if book
                .get(&id)
                .is_some_and(|e| matches!(e.state(), State::Done(_)))
            {
                book.remove(&id);
                self.log(|| Record::Removed { id: id.as_u128() });
                self.metrics.result_evicted();
            }
        }
    }

    /// Records the end of one attempt of a proxy-owned entry.
    pub fn complete(&self, id: EntryId, outcome: Outcome, now: Time) {
        let mut guard = self.lock();
        let book = &mut *guard;
        book.in_flight -= 1;
        self.settle_attempt(book, id, outcome, now);
        drop(guard);
        self.wake();
    }

    /// Where one attempt leaves a dispatching entry: done, back in its lane, or a dead letter.
    pub(super) fn settle_attempt(&self, book: &mut Book, id: EntryId, outcome: Outcome, now: Time) {
        let Some(e) = book.get_mut(&id) else {
            return;
        };
        e.batched = None;
        if let Some(r) = e.resource.clone() {
            book.busy.remove(&r);
        }
        let e = book.get_mut(&id).expect("present");
        let routes = self.routes();
        let route = routes.get(e.route).name.as_str();
        let uid = id.as_u128();
        // Outcomes are logged without waiting: if one is lost, recovery finds the write still
        // marked as being sent and treats it as possibly applied.
        match outcome {
            Outcome::Done(mut resp) => {
                // The answer replaces the request in the bounds: older results make room for
                // it, and when even that is not enough its body is dropped (status and headers
                // kept, marked).
                let request = e.bytes as usize;
                if let Some(tx) = book.watchers.remove(&id) {
                    let _ = tx.send(Settled::Answer(resp.clone()));
                }
                let needed = response_bytes(&resp).saturating_sub(request);
                if !self.room_for_result(book, needed) {
                    let len = resp.body.len() as u64;
                    drop_body(&mut resp, len);
                    tracing::warn!(request_id = %id, route, "the CRM's answer to a parked write does not fit queue.max_bytes; kept without its body");
                }
                self.log(|| Record::Done {
                    id: uid,
                    at: now.as_nanos(),
                    response: stored_response(&resp),
                });
                book.transition(&id, State::Done(Box::new(resp)), now);
                self.metrics.dispatched(route);
            }
            Outcome::Failed(reason, error) => {
                tracing::error!(request_id = %id, route, attempts = e.attempts, reason = reason.name(), %error, "parked write failed; kept as a dead letter");
                if let Some(tx) = book.watchers.remove(&id) {
                    let _ = tx.send(Settled::Failed(reason, error.clone()));
                }
                self.log(|| Record::Failed {
                    id: uid,
                    at: now.as_nanos(),
                    reason,
                    error: error.clone(),
                });
                book.transition(&id, State::Failed(reason, error.into()), now);
                self.metrics.failed(route, reason.name());
            }
            back => {
                match back {
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
                    Outcome::Unbatched => {
                        e.single = true;
                        e.attempts -= 1;
                    }
                    Outcome::Deferred { not_before } => {
                        e.not_before = not_before;
                        e.attempts -= 1;
                    }
                    Outcome::Throttled => e.attempts -= 1,
                    Outcome::Done(_) | Outcome::Failed(..) => unreachable!("matched above"),
                }
                let (attempts, not_before) = (e.attempts, e.not_before);
                book.transition(&id, State::Queued(Owner::Proxy), now);
                self.log(|| Record::Requeued {
                    id: uid,
                    attempts,
                    not_before: not_before.as_nanos(),
                });
                self.link(book, id);
            }
        }
    }

    /// An operator sends a failed or expired write again: fresh attempts and TTL, back in its
    /// lane at its arrival position.
    pub fn retry(&self, id: EntryId, now: Time) -> Result<Commit, OpError> {
        let mut guard = self.lock();
        let book = &mut *guard;
        let e = book.get_mut(&id).ok_or(OpError::NotFound)?;
        if !matches!(e.state(), State::Failed(..) | State::Expired) {
            return Err(OpError::WrongState(e.state().status()));
        }
        e.attempts = 0;
        e.not_before = now;
        e.expires_at = now + self.cfg().ttl;
        let expires_at = e.expires_at;
        book.transition(&id, State::Queued(Owner::Proxy), now);
        let commit = self.log(|| Record::Retried {
            id: id.as_u128(),
            at: now.as_nanos(),
            expires_at: expires_at.as_nanos(),
        });
        self.link(book, id);
        drop(guard);
        self.wake();
        tracing::info!(request_id = %id, "an operator queued a dead letter again");
        Ok(commit)
    }

    /// An operator gives up a failed or expired write for good.
    pub fn discard(&self, id: EntryId) -> Result<Commit, OpError> {
        let mut guard = self.lock();
        let book = &mut *guard;
        let e = book.get(&id).ok_or(OpError::NotFound)?;
        if !matches!(e.state(), State::Failed(..) | State::Expired) {
            return Err(OpError::WrongState(e.state().status()));
        }
        book.remove(&id);
        tracing::warn!(request_id = %id, "an operator discarded a dead letter");
        Ok(self.log(|| Record::Removed { id: id.as_u128() }))
    }
}
