//! Batching in the queue: which parked writes share a call, the CRM jobs holding them, and the
//! polls that read those jobs' results back onto each write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::book::{Book, Entry};
use super::entry::{Batched, Kept, Owner, State};
use super::jobs::{Job, Pending, Readback};
use super::{Outcome, Queue, SCAN_LIMIT, earliest};
use crate::clock::Time;
use crate::crm::zendesk_batch::{self as zendesk, BatchKind, Item, ItemResult, JobState};
use crate::ids::{ClientId, EntryId, QuotaId, RouteId};
use crate::message::Outbound;
use crate::quota::{Demand, Grant, Ledger};
use crate::route::Route;
use crate::status::FailReason;
use crate::store::{Commit, Record};
use crate::verdict::{Attempt, Policy, Verdict, verdict};

/// First wait before a new job is polled; doubled per poll that finds it still running.
const FIRST_POLL: Duration = Duration::from_secs(1);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// A batch call handed to the dispatcher: one call on the quota, many writes.
pub struct BatchDispatch {
    /// Hands the outcome back: [`Queue::complete_batch`].
    pub batch: u64,
    pub route: RouteId,
    pub client: ClientId,
    /// The writes in batch order, with this attempt's number each.
    pub members: Vec<(EntryId, u32)>,
    /// What the call consumes: the route's quotas once, and each keyed quota once per member
    /// (with that member's key).
    pub demand: Vec<(QuotaId, Option<Arc<str>>)>,
    pub request: Outbound,
    pub grant: Grant,
    /// The members' `batch sent` records: the call may go only once this is durable.
    pub commit: Commit,
}

/// A poll of some jobs' statuses handed to the dispatcher.
pub struct PollDispatch {
    pub jobs: Vec<Arc<str>>,
    /// The route the poll request classifies as (its quotas were charged; metrics use its name).
    pub route: RouteId,
    pub request: Outbound,
    pub grant: Grant,
}

/// How a batch call ended.
pub enum BatchOutcome {
    /// The CRM took it as this job (maybe already finished).
    Job(zendesk::Job),
    /// The CRM refused the call as a whole (a 4xx other than a throttle): nothing was applied,
    /// and each write goes back to be sent on its own, so one bad write cannot sink the others.
    Refused(String),
    /// One outcome per member, in batch order (throttled, retry, not sent, failed).
    Each(Vec<Outcome>),
}

/// How a poll ended.
pub enum PollOutcome {
    /// The statuses the CRM returned; a polled job missing here is unknown to it.
    Jobs(Vec<zendesk::Job>),
    /// The poll failed or was throttled: ask again, not before this time.
    Later(Time),
}

/// What the dispatcher does with a batchable write that could go now.
pub(super) enum Plan {
    /// Send it on its own.
    Alone,
    /// Send these together (it first).
    Together(Vec<(EntryId, Item)>),
    /// Hold its lane: until this time (lingering for company), or until a job slot frees.
    Wait(Option<Time>),
}

impl Queue {
    /// What a write of `route` would be in a batch call, when the route batches.
    pub(super) fn batchable(&self, route: &Route, request: &Outbound) -> Option<BatchKind> {
        route.batch?;
        zendesk::item(request).map(|i| i.kind)
    }

    /// The upstream does not answer like Zendesk's batch endpoints: says so once, and from now
    /// on every write goes on its own (a reload or restart tries batching again).
    pub fn stop_batching(&self, why: &str) {
        if !self
            .batching_off
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(
                why,
                "the upstream does not answer like Zendesk's batch endpoints; batching is off, every write goes on its own (a reload or restart tries again)"
            );
        }
        self.wake();
    }

    fn jobs_full(&self, book: &Book) -> bool {
        book.jobs.len() + book.sending.len() >= self.cfg().max_jobs
    }

    /// Whether `first`, a proxy-owned write that may go now, goes alone, with others, or waits
    /// a little for others to join (`max_linger` after it became ready, unless the batch is
    /// full already).
    pub(super) fn batch_plan(
        &self,
        book: &Book,
        client: ClientId,
        lane: usize,
        first: &Entry,
        now: Time,
    ) -> Plan {
        let routes = self.routes();
        let route = routes.get(first.route);
        let (Some(cfg), Some(kind)) = (route.batch, first.batchable) else {
            return Plan::Alone;
        };
        if first.single || self.batching_off.load(std::sync::atomic::Ordering::Relaxed) {
            return Plan::Alone;
        }
        let jobs_full = self.jobs_full(book);
        let limit = if jobs_full { 2 } else { cfg.max_size };
        let members = self.batch_members(book, client, lane, first, kind, limit, now);
        if jobs_full && members.len() >= 2 {
            return Plan::Wait(None);
        }
        let ready = first.created_at.max(first.not_before);
        if members.len() < cfg.max_size && now < ready + cfg.max_linger {
            return Plan::Wait(Some(ready + cfg.max_linger));
        }
        if members.len() < 2 {
            return Plan::Alone;
        }
        Plan::Together(members)
    }

    /// `first` and the writes after it in its lane that may share its call, in arrival order:
    /// same route and kind, same credential and headers, ready now, in the log (or with their
    /// client still waiting), never
    /// two updates of one ticket, and nothing overtaking an earlier write of the same record or
    /// key that cannot go.
    #[allow(clippy::too_many_arguments)]
    fn batch_members(
        &self,
        book: &Book,
        client: ClientId,
        lane: usize,
        first: &Entry,
        kind: BatchKind,
        max: usize,
        now: Time,
    ) -> Vec<(EntryId, Item)> {
        let Some(req) = first.request().map(Kept::outbound) else {
            return Vec::new();
        };
        let Some(item) = zendesk::item(&req) else {
            return Vec::new();
        };
        let mut tickets: Vec<u64> = item.ticket_id.into_iter().collect();
        let mut taken: Vec<&Arc<str>> = first.resource.iter().collect();
        let mut members = vec![(first.id, item)];
        let mut held: Vec<&Arc<str>> = Vec::new();
        let lane_q = &book.clients[client.0].lanes[lane];
        let start = lane_q
            .binary_search(&(first.seq, first.id))
            .map_or(0, |i| i + 1);
        for &(_, id) in lane_q.iter().skip(start).take(SCAN_LIMIT + max) {
            if members.len() >= max {
                break;
            }
            let e = book.entry(&id);
            let blocked =
                e.resource.as_ref().is_some_and(|r| {
                    book.busy.contains(r) || held.contains(&r) || taken.contains(&r)
                }) || e.keys.iter().any(|(_, k)| held.contains(&k));
            // A write whose client still waits rides along too: its client gets the result.
            let waiting = match e.state() {
                State::Queued(Owner::Proxy) => e.durable,
                State::Queued(Owner::Client(_)) => true,
                _ => false,
            };
            let eligible = !blocked
                && waiting
                && !e.single
                && e.route == first.route
                && e.batchable == Some(kind)
                && e.not_before <= now;
            let joined = eligible
                .then_some(e.request())
                .flatten()
                .map(Kept::outbound)
                .filter(|r| zendesk::compatible(&req.headers, &r.headers))
                .and_then(|r| zendesk::item(&r))
                .filter(|it| it.ticket_id.is_none_or(|t| !tickets.contains(&t)));
            match joined {
                Some(it) => {
                    tickets.extend(it.ticket_id);
                    taken.extend(e.resource.iter());
                    members.push((id, it));
                }
                None => {
                    held.extend(e.resource.iter());
                    held.extend(e.keys.iter().map(|(_, k)| k));
                }
            }
        }
        members
    }

    /// Records how a batch call ended.
    pub fn complete_batch(&self, batch: u64, outcome: BatchOutcome, now: Time) {
        let mut guard = self.lock();
        let book = &mut *guard;
        book.in_flight -= 1;
        let Some(pending) = book.sending.remove(&batch) else {
            return;
        };
        let routes = self.routes();
        let route = routes.get(pending.route).name.clone();
        match outcome {
            BatchOutcome::Job(job) => {
                let id: Arc<str> = Arc::from(job.id.as_str());
                for (index, m) in pending.members.iter().enumerate() {
                    let index = index as u32;
                    if let Some(e) = book.get_mut(m) {
                        e.batched = Some(Box::new(Batched::Job(id.clone(), index)));
                    }
                    self.log(|| Record::Job {
                        id: m.as_u128(),
                        job: job.id.clone(),
                        index,
                    });
                }
                tracing::info!(job = %id, route, writes = pending.members.len(), "batch accepted as a CRM job");
                book.jobs.insert(
                    id.clone(),
                    Job {
                        batch: pending,
                        next_poll: now + FIRST_POLL,
                        interval: FIRST_POLL,
                        polling: false,
                    },
                );
                if job.state != JobState::Running {
                    self.resolve_job(book, &id, Some(&job), now);
                }
            }
            BatchOutcome::Refused(error) => {
                tracing::warn!(route, writes = pending.members.len(), %error, "the CRM refused a batch; its writes go one by one");
                self.metrics.batch_failure(&route, "batch");
                for m in &pending.members {
                    self.settle_attempt(book, *m, Outcome::Unbatched, now);
                }
            }
            BatchOutcome::Each(outcomes) => {
                for (m, outcome) in pending.members.iter().zip(outcomes) {
                    self.settle_attempt(book, *m, outcome, now);
                }
            }
        }
        drop(guard);
        self.wake();
    }

    /// A poll when a job is due: one call for every pending job sharing the first due job's
    /// credential (up to [`zendesk::MAX_POLL`]), so jobs not yet due ride along for free.
    pub(super) fn poll_due(
        &self,
        book: &mut Book,
        ledger: &Ledger,
        now: Time,
        cap: usize,
        wake_at: &mut Option<Time>,
    ) -> Option<PollDispatch> {
        let idle = book.jobs.iter().filter(|(_, j)| !j.polling);
        let (first, job) = idle.min_by_key(|(_, j)| j.next_poll)?;
        if job.next_poll > now {
            *wake_at = earliest(*wake_at, job.next_poll);
            return None;
        }
        if book.in_flight >= cap {
            return None; // a completion wakes us
        }
        let headers = job.batch.headers.clone();
        let client = job.batch.client;
        let mut ids: Vec<(Time, Arc<str>)> = book
            .jobs
            .iter()
            .filter(|(_, j)| !j.polling && zendesk::compatible(&headers, &j.batch.headers))
            .map(|(id, j)| (j.next_poll, id.clone()))
            .collect();
        ids.sort();
        ids.truncate(zendesk::MAX_POLL);
        let first = first.clone();
        let ids: Vec<Arc<str>> = ids.into_iter().map(|(_, id)| id).collect();
        debug_assert!(ids.contains(&first));
        let names: Vec<&str> = ids.iter().map(|i| &**i).collect();
        let request = zendesk::poll_request(&names, &headers);
        let (route, grant) = self.charge_own_read(&request, client, false, ledger, now, wake_at)?;
        for id in &ids {
            if let Some(j) = book.jobs.get_mut(id) {
                j.polling = true;
            }
        }
        book.in_flight += 1;
        self.metrics.job_poll();
        Some(PollDispatch {
            jobs: ids,
            route,
            request,
            grant,
        })
    }

    /// Charges a GET the proxy makes itself (a job poll, a read-back) as the route it classifies
    /// as; `None` when the quotas have no room (`wake_at` then says when they may).
    pub(super) fn charge_own_read(
        &self,
        request: &Outbound,
        client: ClientId,
        live: bool,
        ledger: &Ledger,
        now: Time,
        wake_at: &mut Option<Time>,
    ) -> Option<(RouteId, Grant)> {
        let path = request.path_and_query.path();
        let routes = self.routes();
        let route = routes.classify(&Method::GET, path);
        let demand = Demand {
            quotas: &route.quotas,
            keys: &[],
            client,
            live,
            read: false,
            deferrable: false,
        };
        match ledger.try_acquire(&demand, now) {
            Ok(grant) => Some((route.id, grant)),
            Err(denied) => {
                *wake_at = earliest(*wake_at, denied.retry_at);
                None
            }
        }
    }

    /// Records what a poll learned: finished jobs settle their writes; running ones are polled
    /// again later (backing off); a job the CRM no longer knows leaves its writes ambiguous.
    pub fn complete_poll(&self, jobs: &[Arc<str>], outcome: PollOutcome, now: Time) {
        let mut guard = self.lock();
        let book = &mut *guard;
        book.in_flight -= 1;
        match outcome {
            PollOutcome::Later(at) => {
                for id in jobs {
                    if let Some(j) = book.jobs.get_mut(id) {
                        j.polling = false;
                        j.next_poll = at.max(now + j.interval);
                    }
                }
            }
            PollOutcome::Jobs(found) => {
                for id in jobs {
                    match found.iter().find(|j| *j.id == **id) {
                        Some(job) if job.state == JobState::Running => {
                            if let Some(j) = book.jobs.get_mut(id) {
                                j.polling = false;
                                j.interval = (j.interval * 2).min(MAX_POLL_INTERVAL);
                                j.next_poll = now + j.interval;
                            }
                        }
                        Some(job) => self.resolve_job(book, id, Some(job), now),
                        None => self.resolve_job(book, id, None, now),
                    }
                }
            }
        }
        drop(guard);
        self.wake();
    }

    /// Settles every write of a finished job from its results: applied ones are done (with an
    /// answer shaped like the CRM's), refused items fail with the CRM's error. A write without
    /// a result in a failed job is sent again (the job applied nothing for it); in a
    /// job that completed, or one the CRM no longer knows (`None`), it may have been applied:
    /// ambiguous.
    fn resolve_job(&self, book: &mut Book, id: &Arc<str>, job: Option<&zendesk::Job>, now: Time) {
        let Some(Job { batch, .. }) = book.jobs.remove(id) else {
            return;
        };
        let routes = self.routes();
        let route = routes.get(batch.route).name.clone();
        let Some(job) = job else {
            tracing::error!(job = %id, route, "the CRM no longer knows a batch job; its writes are marked ambiguous");
            self.metrics.batch_failure(&route, "job");
            for m in &batch.members {
                let error = format!(
                    "the CRM no longer knows job {id}; check whether this write was applied"
                );
                self.settle_attempt(book, *m, Outcome::Failed(FailReason::Ambiguous, error), now);
            }
            return;
        };
        let results = zendesk::item_results(batch.kind, job, &batch.tickets);
        if job.state == JobState::Failed {
            self.metrics.batch_failure(&route, "job");
            tracing::warn!(job = %id, route, message = job.message.as_deref().unwrap_or(""), "a CRM batch job failed");
        }
        let mut read_back = Vec::new();
        for (index, (m, result)) in batch.members.iter().zip(results).enumerate() {
            let outcome = match result {
                ItemResult::Applied(ticket) => {
                    let answer = zendesk::member_response(batch.kind, ticket, id, index);
                    // A client still waiting on a create gets the ticket itself, read back
                    // with the others of its batch in one call.
                    if batch.kind == BatchKind::Create
                        && let Some(tx) = book.watchers.remove(m)
                        && !tx.is_closed()
                    {
                        read_back.push((ticket, answer.clone(), tx));
                    }
                    Outcome::Done(answer)
                }
                ItemResult::Rejected(error) => {
                    self.metrics.batch_failure(&route, "item");
                    Outcome::Failed(FailReason::Rejected, error)
                }
                ItemResult::Missing if job.state == JobState::Failed => {
                    let attempts = book.get(m).map_or(0, |e| e.attempts);
                    // Batched again once (a job can fail for passing reasons); a write whose
                    // second job fails too goes alone, so one bad write cannot sink others.
                    if let Some(e) = book.get_mut(m) {
                        e.single = attempts >= 2;
                    }
                    let error = format!(
                        "CRM job {id} failed: {}",
                        job.message.as_deref().unwrap_or("no message")
                    );
                    // The job applied nothing: batched again at once, while attempts remain.
                    let policy = Policy {
                        resend_safe: false,
                        retry_status: &[],
                        attempts: Some((attempts, self.cfg().max_attempts)),
                        backoff: Duration::ZERO,
                        outage: None,
                        now,
                    };
                    match verdict(Attempt::JobFailed, &policy) {
                        Verdict::Retry { not_before, .. } => Outcome::Retry { not_before, error },
                        Verdict::Failed(reason) => {
                            Outcome::Failed(reason, format!("{error} (after {attempts} attempts)"))
                        }
                        Verdict::Final | Verdict::Throttled | Verdict::Wait { .. } => {
                            unreachable!("a failed job is retried or given up")
                        }
                    }
                }
                ItemResult::Missing => Outcome::Failed(
                    FailReason::Ambiguous,
                    format!(
                        "CRM job {id} gave no result for this write ({}); check whether it was applied",
                        job.message.as_deref().unwrap_or("no message")
                    ),
                ),
            };
            self.settle_attempt(book, *m, outcome, now);
        }
        if !read_back.is_empty() {
            book.batch_seq += 1;
            book.readbacks.push(Readback {
                seq: book.batch_seq,
                client: batch.client,
                headers: batch.headers,
                members: read_back,
                reading: false,
            });
        }
    }

    /// After recovery: the jobs the log says hold writes, polled again at once.
    pub(super) fn restore_jobs(
        &self,
        book: &mut Book,
        jobs: HashMap<Arc<str>, Vec<(u32, EntryId)>>,
        now: Time,
    ) {
        for (id, mut indexed) in jobs {
            indexed.sort_unstable();
            // Results are matched by position: a member missing from the log keeps its slot.
            let size = indexed.last().map_or(0, |(i, _)| *i as usize + 1);
            let mut members = vec![EntryId::from_u128(0); size];
            for (i, m) in &indexed {
                members[*i as usize] = *m;
            }
            let Some(first) = indexed.first().and_then(|(_, m)| book.get(m)) else {
                continue;
            };
            let Some(req) = first.request() else {
                continue;
            };
            let (route, client, lane) = (first.route, first.client, first.lane);
            let headers = req.outbound().headers;
            let items: Vec<Option<Item>> = members
                .iter()
                .map(|m| {
                    book.get(m)
                        .and_then(|e| e.request())
                        .and_then(|r| zendesk::item(&r.outbound()))
                })
                .collect();
            let Some(kind) = items.iter().flatten().map(|i| i.kind).next() else {
                continue;
            };
            book.jobs.insert(
                id,
                Job {
                    batch: Pending {
                        kind,
                        route,
                        client,
                        lane,
                        members,
                        tickets: items
                            .iter()
                            .map(|i| i.as_ref().and_then(|i| i.ticket_id))
                            .collect(),
                        headers,
                    },
                    next_poll: now,
                    interval: FIRST_POLL,
                    polling: false,
                },
            );
        }
    }
}
