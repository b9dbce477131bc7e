//! The drain task: sends parked writes the moment quota frees, alone or in batch calls, polls the
//! CRM's batch jobs, and hands each attempt's outcome back to the queue. What an attempt comes
//! to is decided by the one retry verdict ([`crate::verdict`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::breaker::Probe;
use crate::clock::Time;
use crate::crm::zendesk_batch;
use crate::ids::QuotaId;
use crate::message::{BufferedResponse, IDEMPOTENCY_KEY, Outbound, retry_after};
use crate::proxy::Proxy;
use crate::queue::{
    BatchDispatch, BatchOutcome, Dispatch, Outcome, PollDispatch, PollOutcome, ReadbackDispatch,
    Step,
};
use crate::quota::Grant;
use crate::route::Route;
use crate::shared_ledger::Admission;
use crate::status::FailReason;
use crate::upstream::ForwardError;
use crate::verdict::{Attempt, Verdict};

/// How long batches wait after Zendesk's `TooManyJobs` answer without a `Retry-After`.
const TOO_MANY_JOBS_PAUSE: Duration = Duration::from_secs(10);

/// How long a job poll that learned nothing waits before it asks again.
const POLL_AGAIN: Duration = Duration::from_secs(5);

/// Runs until `stop` turns true, or until the queue is closed (shutdown) and fully drained.
pub async fn run(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let now = proxy.clock.now();
        // While the CRM fails as a whole, one probe at a time.
        let step = match proxy.breaker.may_send(now) {
            Ok(Probe::No) => proxy.queue.next(&proxy.ledger, now),
            Ok(Probe::Yes) => proxy.queue.probe(&proxy.ledger, now),
            Err(probe_at) => {
                tokio::select! {
                    _ = proxy.clock.sleep_until(probe_at) => {}
                    _ = proxy.breaker.closed() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        match step {
            Step::Send(d) => {
                tokio::spawn(deliver(proxy.clone(), d));
            }
            Step::Batch(b) => {
                tokio::spawn(deliver_batch(proxy.clone(), b));
            }
            Step::Poll(p) => {
                tokio::spawn(deliver_poll(proxy.clone(), p));
            }
            Step::Readback(r) => {
                tokio::spawn(deliver_readback(proxy.clone(), r));
            }
            Step::Idle(wake_at) => {
                proxy.breaker.probe_not_sent(now);
                if !proxy.is_ready() && proxy.queue.is_drained() {
                    return;
                }
                // Sleep exactly until the earliest moment something can change: a lane's quota
                // frees, a retry or TTL falls due, or the queue reports new work.
                let sleep = wake_at.map(|t| proxy.clock.sleep_until(t));
                tokio::select! {
                    _ = proxy.queue.changed() => {}
                    _ = proxy.ledger.released() => {}
                    _ = async { match sleep { Some(s) => s.await, None => std::future::pending().await } } => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// What one call to the CRM came to: the answer (with whether it was a throttle), or no answer.
struct Sent {
    answer: Option<BufferedResponse>,
    throttled: bool,
    /// For the log and a dead letter: what went wrong, if anything did.
    error: String,
    not_sent: bool,
    /// When the call went out.
    sent_at: Time,
}

impl Sent {
    /// Tells the breaker what the call came to, and gives back the quota of a call that never
    /// reached the CRM. While the breaker is open, the time a failed write waits for.
    fn outage(&self, proxy: &Proxy, grant: &Grant, quotas: &[QuotaId], now: Time) -> Option<Time> {
        if self.not_sent {
            proxy.ledger.refund(grant, quotas, now);
        }
        proxy.crm_outcome(self.answer.as_ref().map(|a| a.status), self.sent_at, now)
    }

    fn attempt(&self) -> Attempt<'_> {
        match &self.answer {
            Some(r) => Attempt::Answered {
                status: r.status,
                headers: &r.headers,
                throttled: self.throttled,
            },
            None if self.not_sent => Attempt::NotSent,
            None => Attempt::Lost,
        }
    }
}

/// Sends one request of `route` to the CRM, counting its answer or error.
async fn send(proxy: &Proxy, route: &Route, request: Outbound) -> Sending {
    let sent_at = proxy.clock.now();
    let started = tokio::time::Instant::now();
    let result = proxy
        .upstream()
        .send_buffered(request, proxy.config().max_body_bytes)
        .await;
    match &result {
        Ok(resp) => route
            .series(&proxy.metrics)
            .upstream_response(resp.status, started.elapsed().as_secs_f64()),
        Err(e) => proxy.metrics.upstream_error(&route.name, e.kind()),
    }
    Sending { result, sent_at }
}

/// A call's result and when it went out.
struct Sending {
    result: Result<BufferedResponse, ForwardError>,
    sent_at: Time,
}

impl Sent {
    /// Reads what the CRM said: its headers teach the ledger, a throttle answer pauses the
    /// quotas it names.
    fn read(
        proxy: &Proxy,
        route: &Route,
        grant: &Grant,
        Sending { result, sent_at }: Sending,
        now: Time,
    ) -> Sent {
        match result {
            Ok(resp) => Sent {
                throttled: proxy
                    .learn(route, grant, resp.status, &resp.headers, &resp.body, now)
                    .is_some(),
                error: format!("CRM answered {}", resp.status),
                answer: Some(resp),
                not_sent: false,
                sent_at,
            },
            Err(e) => Sent {
                answer: None,
                throttled: false,
                not_sent: matches!(e, ForwardError::Connect(_)),
                error: e.to_string(),
                sent_at,
            },
        }
    }
}

/// A write's outcome from the verdict on its attempt (`answer` is kept when it is final);
/// `in_batch` when the attempt was a batch call carrying it.
#[allow(clippy::too_many_arguments)]
fn outcome(
    proxy: &Proxy,
    route: &Route,
    verdict: Verdict,
    answer: Option<BufferedResponse>,
    error: &str,
    attempt: u32,
    keyed: bool,
    in_batch: bool,
) -> Outcome {
    match verdict {
        Verdict::Final => match answer {
            Some(resp) => Outcome::Done(resp),
            None => unreachable!("only an answer is final"),
        },
        Verdict::Throttled => Outcome::Throttled,
        Verdict::Retry {
            not_before,
            unknown,
        } => {
            if unknown && keyed {
                proxy.metrics.idempotent_replay(&route.name);
            }
            Outcome::Retry {
                not_before,
                error: error.to_string(),
            }
        }
        Verdict::Wait {
            not_before,
            unknown,
        } => {
            if unknown && keyed {
                proxy.metrics.idempotent_replay(&route.name);
            }
            Outcome::NotSent {
                not_before,
                error: format!("{error} (the CRM is failing as a whole; no attempt spent)"),
            }
        }
        Verdict::Failed(reason) => {
            if reason == FailReason::Ambiguous {
                proxy.metrics.ambiguous(&route.name);
            }
            Outcome::Failed(reason, dead_letter_error(reason, error, attempt, in_batch))
        }
    }
}

/// What a dead letter says about why it was given up.
fn dead_letter_error(reason: FailReason, error: &str, attempt: u32, in_batch: bool) -> String {
    match reason {
        FailReason::AttemptsExhausted => format!("{error} (after {attempt} attempts)"),
        FailReason::Ambiguous if in_batch => format!(
            "{error}; the batch may have been applied, and resending it could apply it twice"
        ),
        FailReason::Ambiguous => {
            format!("{error}; the CRM may have applied it, and resending could apply it twice")
        }
        FailReason::Rejected => error.to_string(),
    }
}

/// One attempt at sending a proxy-owned write; the outcome goes back to the queue.
async fn deliver(proxy: Arc<Proxy>, d: Dispatch) {
    let routes = proxy.routes();
    let route = routes.get(d.route);
    // The log must say "being sent" before the CRM can see it, so a crash is never mistaken
    // for "not sent yet" (which could send a non-idempotent write twice).
    if let Err(e) = d.commit.durable().await {
        let now = proxy.clock.now();
        let outcome = Outcome::NotSent {
            not_before: now + proxy.backoff(d.attempt),
            error: e.to_string(),
        };
        proxy.queue.complete(d.id, outcome, now);
        return;
    }
    let mut grant = d.grant;
    if let Admission::Denied { retry_at, .. } =
        proxy.admit(&route.quotas, &d.keys, &mut grant).await
    {
        // Another replica spent the slot: back in line, no attempt spent.
        let outcome = Outcome::Deferred {
            not_before: retry_at,
        };
        proxy.queue.complete(d.id, outcome, proxy.clock.now());
        return;
    }
    let safe = route.resend_safe(&d.request);
    let keyed = d.request.headers.contains_key(IDEMPOTENCY_KEY);
    proxy.clients().series(d.client, &proxy.metrics).call();
    let result = send(&proxy, route, d.request).await;
    let now = proxy.clock.now();
    let sent = Sent::read(&proxy, route, &grant, result, now);
    let outage = sent.outage(&proxy, &grant, &route.quotas, now);
    let verdict = proxy.verdict(sent.attempt(), safe, Some(d.attempt), outage, now);
    let outcome = outcome(
        &proxy,
        route,
        verdict,
        sent.answer,
        &sent.error,
        d.attempt,
        keyed,
        false,
    );
    proxy.queue.complete(d.id, outcome, now);
}

/// One batch call. The CRM answers with a job (polled later); Zendesk's `TooManyJobs` holds only
/// the batch; a refusal as a whole (another 4xx) sends each write on its own; otherwise each
/// write gets the verdict on the call, under the batch's resend rule: a batch call carries no
/// per-item idempotency key, so an unknown outcome is resent only with `retry_ambiguous`.
async fn deliver_batch(proxy: Arc<Proxy>, b: BatchDispatch) {
    let routes = proxy.routes();
    let route = routes.get(b.route);
    if let Err(e) = b.commit.durable().await {
        let now = proxy.clock.now();
        let each = b
            .members
            .iter()
            .map(|&(_, a)| Outcome::NotSent {
                not_before: now + proxy.backoff(a),
                error: e.to_string(),
            })
            .collect();
        proxy
            .queue
            .complete_batch(b.batch, BatchOutcome::Each(each), now);
        return;
    }
    let mut grant = b.grant;
    if let Admission::Denied { retry_at, .. } = proxy.admit_demand(&b.demand, &mut grant).await {
        let each = b
            .members
            .iter()
            .map(|_| Outcome::Deferred {
                not_before: retry_at,
            })
            .collect();
        let now = proxy.clock.now();
        proxy
            .queue
            .complete_batch(b.batch, BatchOutcome::Each(each), now);
        return;
    }
    proxy.clients().series(b.client, &proxy.metrics).call();
    let result = send(&proxy, route, b.request).await;
    let now = proxy.clock.now();
    // Each write gets the verdict on the call as its own attempt.
    let each = |sent: &Sent, outage: Option<Time>| {
        let members = b.members.iter().map(|&(_, attempt)| {
            let verdict = proxy.verdict(
                sent.attempt(),
                route.retry_ambiguous,
                Some(attempt),
                outage,
                now,
            );
            outcome(
                &proxy,
                route,
                verdict,
                None,
                &sent.error,
                attempt,
                false,
                true,
            )
        });
        BatchOutcome::Each(members.collect())
    };
    let outcome = match &result.result {
        // Before the answer is learned from: it says nothing about the call quotas.
        Ok(resp)
            if resp.status == http::StatusCode::TOO_MANY_REQUESTS
                && zendesk_batch::too_many_jobs(&resp.body) =>
        {
            // Zendesk's limit on open jobs, not on calls: only batches wait (the quotas stay
            // open for everything else) until a job of someone's finishes.
            proxy.metrics.throttled(&route.name, "too_many_jobs");
            let not_before = retry_after(&resp.headers, now).unwrap_or(now + TOO_MANY_JOBS_PAUSE);
            BatchOutcome::Each(
                b.members
                    .iter()
                    .map(|_| Outcome::NotSent {
                        not_before,
                        error: "Zendesk has too many jobs open (TooManyJobs)".into(),
                    })
                    .collect(),
            )
        }
        _ => {
            let mut sent = Sent::read(&proxy, route, &grant, result, now);
            let outage = sent.outage(&proxy, &grant, &route.quotas, now);
            match proxy.verdict(sent.attempt(), route.retry_ambiguous, None, outage, now) {
                Verdict::Final => {
                    let resp = sent.answer.take().expect("only an answer is final");
                    if resp.status.is_success() {
                        match zendesk_batch::parse_job_status(&resp.body) {
                            Some(job) => BatchOutcome::Job(job),
                            None => {
                                proxy.queue.stop_batching(&format!(
                                    "a batch call was answered {} without a job status",
                                    resp.status
                                ));
                                // Taken, but with no job to follow: as if no answer had come.
                                let lost = Sent {
                                    answer: None,
                                    throttled: false,
                                    not_sent: false,
                                    sent_at: sent.sent_at,
                                    error: format!(
                                        "the CRM answered {} without a job status",
                                        resp.status
                                    ),
                                };
                                each(&lost, None)
                            }
                        }
                    } else {
                        if matches!(resp.status.as_u16(), 404 | 405 | 501) {
                            // No such endpoint: not Zendesk's batch API. Nothing was applied.
                            proxy.queue.stop_batching(&format!(
                                "its batch endpoint answered {}",
                                resp.status
                            ));
                        }
                        let text = String::from_utf8_lossy(&resp.body);
                        let snippet: String = text.chars().take(200).collect();
                        BatchOutcome::Refused(format!("CRM answered {}: {snippet}", resp.status))
                    }
                }
                _ => each(&sent, outage),
            }
        }
    };
    proxy.queue.complete_batch(b.batch, outcome, now);
}

/// One poll of job statuses. A failed or throttled poll is simply asked again later; a job the
/// CRM answers 404 for (single poll) or leaves out (`show_many`) is unknown to it.
async fn deliver_poll(proxy: Arc<Proxy>, p: PollDispatch) {
    let routes = proxy.routes();
    let route = routes.get(p.route);
    let single = p.jobs.len() == 1;
    let mut grant = p.grant;
    if let Admission::Denied { retry_at, .. } = proxy.admit(&route.quotas, &[], &mut grant).await {
        proxy
            .queue
            .complete_poll(&p.jobs, PollOutcome::Later(retry_at), proxy.clock.now());
        return;
    }
    let result = send(&proxy, route, p.request).await;
    let now = proxy.clock.now();
    let sent = Sent::read(&proxy, route, &grant, result, now);
    let outage = sent.outage(&proxy, &grant, &route.quotas, now);
    let later = PollOutcome::Later(outage.unwrap_or(now + POLL_AGAIN));
    // A poll reads and changes nothing: always safe to ask again, attempts not counted.
    let outcome = match (
        proxy.verdict(sent.attempt(), true, None, None, now),
        sent.answer,
    ) {
        (Verdict::Throttled, _) => PollOutcome::Later(now),
        (Verdict::Final, Some(resp)) if resp.status.is_success() => {
            let jobs = if single {
                zendesk_batch::parse_job_status(&resp.body).map(|j| vec![j])
            } else {
                zendesk_batch::parse_job_statuses(&resp.body)
            };
            match jobs {
                Some(jobs) => PollOutcome::Jobs(jobs),
                None => {
                    tracing::warn!(status = %resp.status, "a job status poll answered no job status; asking again");
                    later
                }
            }
        }
        (Verdict::Final, Some(resp)) if single && resp.status == http::StatusCode::NOT_FOUND => {
            PollOutcome::Jobs(Vec::new())
        }
        _ => later,
    };
    proxy.queue.complete_poll(&p.jobs, outcome, now);
}

/// One read-back of the tickets a batch created. It is asked once: its clients are waiting,
/// and without it each still gets its ticket's id.
async fn deliver_readback(proxy: Arc<Proxy>, r: ReadbackDispatch) {
    let routes = proxy.routes();
    let route = routes.get(r.route);
    let mut grant = r.grant;
    if let Admission::Denied { .. } = proxy.admit(&route.quotas, &[], &mut grant).await {
        proxy.queue.complete_readback(r.readback, None);
        return;
    }
    let result = send(&proxy, route, r.request).await;
    let now = proxy.clock.now();
    let sent = Sent::read(&proxy, route, &grant, result, now);
    sent.outage(&proxy, &grant, &route.quotas, now);
    let tickets = sent
        .answer
        .filter(|a| a.status.is_success() && !sent.throttled)
        .and_then(|a| zendesk_batch::parse_tickets(&a.body));
    proxy.queue.complete_readback(r.readback, tickets);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_says_why_it_was_given_up() {
        assert_eq!(
            dead_letter_error(FailReason::AttemptsExhausted, "boom", 4, false),
            "boom (after 4 attempts)"
        );
        assert!(
            dead_letter_error(FailReason::Ambiguous, "reset", 1, false)
                .starts_with("reset; the CRM may have applied it")
        );
        assert!(
            dead_letter_error(FailReason::Ambiguous, "reset", 1, true)
                .starts_with("reset; the batch may have been applied")
        );
    }
}
