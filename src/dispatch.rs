//! The drain task: sends parked writes the moment quota frees, retries failures with backoff and
//! jitter, and re-parks writes the CRM throttled.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::batch;
use crate::clock::Time;
use crate::config::QueueConfig;
use crate::forward::ForwardError;
use crate::proxy::Proxy;
use crate::queue::{
    BatchDispatch, BatchOutcome, Dispatch, FailReason, Outcome, PollDispatch, PollOutcome, Step,
};
use crate::route::IDEMPOTENCY_KEY;

/// Runs until `stop` turns true, or until the queue is closed (shutdown) and fully drained.
pub async fn run(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let now = proxy.clock.now();
        match proxy.queue.next(&proxy.ledger, now) {
            Step::Send(d) => {
                tokio::spawn(deliver(proxy.clone(), d));
            }
            Step::Batch(b) => {
                tokio::spawn(deliver_batch(proxy.clone(), b));
            }
            Step::Poll(p) => {
                tokio::spawn(deliver_poll(proxy.clone(), p));
            }
            Step::Idle(wake_at) => {
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

/// One attempt at sending a proxy-owned write; the outcome goes back to the queue.
///
/// Error classes: a CRM throttle answer re-parks without spending an attempt; connect errors and
/// `retry_status` answers (502/503/504 by default, honouring `Retry-After`) are retried with
/// backoff; an unknown outcome (timeout or reset after sending, other 5xx) is retried only when a
/// resend cannot apply the write twice, else it fails as `ambiguous`; any other answer is final.
async fn deliver(proxy: Arc<Proxy>, d: Dispatch) {
    let route = proxy.routes.get(d.route);
    let cfg = &proxy.config.queue;
    // The log must say "being sent" before the CRM can see it, so a crash is never mistaken
    // for "not sent yet" (which could send a non-idempotent write twice).
    if let Err(e) = d.commit.durable().await {
        let now = proxy.clock.now();
        let outcome = Outcome::NotSent {
            not_before: now + backoff(cfg, d.attempt),
            error: e.to_string(),
        };
        proxy.queue.complete(d.id, outcome, now);
        return;
    }
    let safe = route.resend_safe(&d.request);
    let keyed = d.request.headers.contains_key(IDEMPOTENCY_KEY);
    let started = tokio::time::Instant::now();
    proxy.metrics.client_call(&proxy.clients.get(d.client).name);
    let result = proxy
        .upstream
        .send_buffered(d.request, proxy.config.max_body_bytes)
        .await;
    let now = proxy.clock.now();
    let unknown = |error: String| {
        if safe {
            if keyed {
                proxy.metrics.idempotent_replay(&route.name);
            }
            retry_or_fail(cfg, d.attempt, error, now, None)
        } else {
            proxy.metrics.ambiguous(&route.name);
            Outcome::Failed(
                FailReason::Ambiguous,
                format!("{error}; the CRM may have applied it, and resending could apply it twice"),
            )
        }
    };
    let outcome = match result {
        Ok(resp) => {
            proxy.metrics.upstream_response(
                &route.name,
                resp.status,
                started.elapsed().as_secs_f64(),
            );
            let code = resp.status.as_u16();
            if proxy
                .learn(route, &d.grant, resp.status, &resp.headers, &resp.body, now)
                .is_some()
            {
                Outcome::Throttled
            } else if proxy.config.upstream.retry_status.contains(&code) {
                let hint = crate::forward::retry_after(&resp.headers, now);
                retry_or_fail(
                    cfg,
                    d.attempt,
                    format!("CRM answered {}", resp.status),
                    now,
                    hint,
                )
            } else if resp.status.is_server_error() {
                unknown(format!("CRM answered {}", resp.status))
            } else {
                Outcome::Done(resp)
            }
        }
        Err(e @ ForwardError::Connect(_)) => {
            proxy.metrics.upstream_error(&route.name, e.kind());
            retry_or_fail(cfg, d.attempt, e.to_string(), now, None)
        }
        Err(e) => {
            proxy.metrics.upstream_error(&route.name, e.kind());
            unknown(e.to_string())
        }
    };
    proxy.queue.complete(d.id, outcome, now);
}

/// One batch call. The CRM answers with a job (polled later), a throttle (every write back in
/// its lane, no attempt spent), a retryable failure (each write retried with backoff), another
/// 4xx (nothing was applied: each write goes on its own), or nothing after the call left: the
/// batch may have been applied and carries no idempotency key, so each write is ambiguous
/// unless the route has `retry_ambiguous`.
/// How long batches wait after Zendesk's `TooManyJobs` answer without a `Retry-After`.
const TOO_MANY_JOBS_PAUSE: Duration = Duration::from_secs(10);

async fn deliver_batch(proxy: Arc<Proxy>, b: BatchDispatch) {
    let route = proxy.routes.get(b.route);
    let cfg = &proxy.config.queue;
    let attempts: Vec<u32> = b.members.iter().map(|(_, a)| *a).collect();
    let each =
        |f: &dyn Fn(u32) -> Outcome| BatchOutcome::Each(attempts.iter().map(|a| f(*a)).collect());
    if let Err(e) = b.commit.durable().await {
        let now = proxy.clock.now();
        let outcome = each(&|a| Outcome::NotSent {
            not_before: now + backoff(cfg, a),
            error: e.to_string(),
        });
        proxy.queue.complete_batch(b.batch, outcome, now);
        return;
    }
    let started = tokio::time::Instant::now();
    proxy.metrics.client_call(&proxy.clients.get(b.client).name);
    let result = proxy
        .upstream
        .send_buffered(b.request, proxy.config.max_body_bytes)
        .await;
    let now = proxy.clock.now();
    let unknown = |error: String| {
        if route.retry_ambiguous {
            return each(&|a| retry_or_fail(cfg, a, error.clone(), now, None));
        }
        for _ in &attempts {
            proxy.metrics.ambiguous(&route.name);
        }
        each(&|_| {
            Outcome::Failed(
                FailReason::Ambiguous,
                format!(
                    "{error}; the batch may have been applied, and resending it could apply it twice"
                ),
            )
        })
    };
    let outcome = match result {
        Ok(resp) => {
            proxy.metrics.upstream_response(
                &route.name,
                resp.status,
                started.elapsed().as_secs_f64(),
            );
            let code = resp.status.as_u16();
            if resp.status == http::StatusCode::TOO_MANY_REQUESTS
                && batch::too_many_jobs(&resp.body)
            {
                // Zendesk's limit on open jobs, not on calls: only batches wait (the quotas
                // stay open for everything else) until a job of someone's finishes.
                proxy.metrics.throttled(&route.name, "too_many_jobs");
                let not_before = crate::forward::retry_after(&resp.headers, now)
                    .unwrap_or(now + TOO_MANY_JOBS_PAUSE);
                each(&|_| Outcome::NotSent {
                    not_before,
                    error: "Zendesk has too many jobs open (TooManyJobs)".into(),
                })
            } else if proxy
                .learn(route, &b.grant, resp.status, &resp.headers, &resp.body, now)
                .is_some()
            {
                each(&|_| Outcome::Throttled)
            } else if resp.status.is_success() {
                match batch::parse_job_status(&resp.body) {
                    Some(job) => BatchOutcome::Job(job),
                    None => unknown(format!(
                        "the CRM answered {} without a job status",
                        resp.status
                    )),
                }
            } else if proxy.config.upstream.retry_status.contains(&code) {
                let hint = crate::forward::retry_after(&resp.headers, now);
                let error = format!("CRM answered {}", resp.status);
                each(&|a| retry_or_fail(cfg, a, error.clone(), now, hint))
            } else if resp.status.is_server_error() {
                unknown(format!("CRM answered {}", resp.status))
            } else {
                let text = String::from_utf8_lossy(&resp.body);
                let snippet: String = text.chars().take(200).collect();
                BatchOutcome::Refused(format!("CRM answered {}: {snippet}", resp.status))
            }
        }
        Err(e @ ForwardError::Connect(_)) => {
            proxy.metrics.upstream_error(&route.name, e.kind());
            each(&|a| retry_or_fail(cfg, a, e.to_string(), now, None))
        }
        Err(e) => {
            proxy.metrics.upstream_error(&route.name, e.kind());
            unknown(e.to_string())
        }
    };
    proxy.queue.complete_batch(b.batch, outcome, now);
}

/// One poll of job statuses. A failed or throttled poll is simply asked again later; a job the
/// CRM answers 404 for (single poll) or leaves out (`show_many`) is unknown to it.
async fn deliver_poll(proxy: Arc<Proxy>, p: PollDispatch) {
    let route = proxy.routes.get(p.route);
    let single = p.jobs.len() == 1;
    let started = tokio::time::Instant::now();
    let result = proxy
        .upstream
        .send_buffered(p.request, proxy.config.max_body_bytes)
        .await;
    let now = proxy.clock.now();
    let later = now + Duration::from_secs(5);
    let outcome = match result {
        Ok(resp) => {
            proxy.metrics.upstream_response(
                &route.name,
                resp.status,
                started.elapsed().as_secs_f64(),
            );
            if proxy
                .learn(route, &p.grant, resp.status, &resp.headers, &resp.body, now)
                .is_some()
            {
                PollOutcome::Later(now)
            } else if resp.status.is_success() {
                let jobs = if single {
                    batch::parse_job_status(&resp.body).map(|j| vec![j])
                } else {
                    batch::parse_job_statuses(&resp.body)
                };
                match jobs {
                    Some(jobs) => PollOutcome::Jobs(jobs),
                    None => {
                        tracing::warn!(status = %resp.status, "a job status poll answered no job status; asking again");
                        PollOutcome::Later(later)
                    }
                }
            } else if single && resp.status == http::StatusCode::NOT_FOUND {
                PollOutcome::Jobs(Vec::new())
            } else {
                PollOutcome::Later(later)
            }
        }
        Err(e) => {
            proxy.metrics.upstream_error(&route.name, e.kind());
            PollOutcome::Later(later)
        }
    };
    proxy.queue.complete_poll(&p.jobs, outcome, now);
}

fn retry_or_fail(
    cfg: &QueueConfig,
    attempt: u32,
    error: String,
    now: Time,
    hint: Option<Time>,
) -> Outcome {
    if attempt >= cfg.max_attempts {
        return Outcome::Failed(
            FailReason::AttemptsExhausted,
            format!("{error} (after {attempt} attempts)"),
        );
    }
    let not_before = (now + backoff(cfg, attempt)).max(hint.unwrap_or(now));
    Outcome::Retry { not_before, error }
}

/// Exponential backoff with equal jitter: half the step fixed, half random, capped.
fn backoff(cfg: &QueueConfig, attempt: u32) -> Duration {
    let step = cfg
        .backoff_initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(cfg.backoff_max);
    let half = step / 2;
    let mut bytes = [0u8; 8];
    let jitter = if SystemRandom::new().fill(&mut bytes).is_ok() {
        half.mul_f64(u64::from_le_bytes(bytes) as f64 / u64::MAX as f64)
    } else {
        Duration::ZERO
    };
    half + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> QueueConfig {
        QueueConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(3600),
            result_ttl: Duration::from_secs(3600),
            max_attempts: 4,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
            max_in_flight: 1,
            max_jobs: 10,
            data_dir: None,
            compact_bytes: 1 << 20,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = cfg();
        for (attempt, step) in [(1u32, 1u64), (2, 2), (3, 4), (4, 5), (9, 5)] {
            for _ in 0..50 {
                let d = backoff(&c, attempt);
                let step = Duration::from_secs(step);
                assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn retries_stop_at_max_attempts_and_respect_a_later_hint() {
        let c = cfg();
        let now = Time::from_nanos(1_000_000_000_000);
        match retry_or_fail(&c, 4, "boom".into(), now, None) {
            Outcome::Failed(reason, msg) => {
                assert_eq!(reason, FailReason::AttemptsExhausted);
                assert_eq!(msg, "boom (after 4 attempts)");
            }
            _ => panic!("expected failure"),
        }
        let hint = now + Duration::from_secs(30);
        match retry_or_fail(&c, 1, "boom".into(), now, Some(hint)) {
            Outcome::Retry { not_before, .. } => assert_eq!(not_before, hint),
            _ => panic!("expected retry"),
        }
    }
}
