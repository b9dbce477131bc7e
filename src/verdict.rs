//! The one retry verdict: what a write's attempt at the CRM came to, and what happens next. Every
//! path that sends to the CRM asks it (a live request, a parked write, a batch call, a job poll),
//! so the four failure classes of the README cannot drift apart:
//!
//! | class | what happened | verdict |
//! |---|---|---|
//! | throttled | the CRM's throttle answer | [`Verdict::Throttled`]: back in line, no attempt spent |
//! | retryable | nothing was sent (connect error), or a status in `retry_status` | [`Verdict::Retry`] after backoff (a later `Retry-After` wins), until attempts run out |
//! | unknown outcome | no answer after sending (timeout, reset), or another 5xx | retried as above when a resend is safe, else [`Verdict::Failed`] `ambiguous` |
//! | final | any other answer | [`Verdict::Final`] |
//!
//! While the CRM fails as a whole (the breaker is open), a failure that would be retried waits
//! for the next probe instead ([`Verdict::Wait`]), spending no attempt: an outage does not turn a
//! backlog into dead letters.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::clock::Time;
use crate::message::retry_after;
use crate::status::FailReason;

/// What one attempt at the CRM came to.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// The CRM answered; `throttled` when the answer is its throttle signal (read by the CRM's
    /// dialect, which may need the body).
    Answered {
        status: StatusCode,
        headers: &'a HeaderMap,
        throttled: bool,
    },
    /// The connection could not be opened: the request was certainly not sent.
    NotSent,
    /// Sent, but no answer came (timeout or reset): the CRM may have applied it.
    Lost,
    /// A CRM job holding the write failed as a whole: it applied nothing of it.
    JobFailed,
}

/// What the verdict weighs besides what happened.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// A resend cannot apply the write twice: an idempotent method, an idempotency key the CRM
    /// honours, or the route's `retry_ambiguous`.
    pub resend_safe: bool,
    /// CRM statuses after which a request is resent (`upstream.retry_status`).
    pub retry_status: &'a [u16],
    /// This attempt's number and the most there may be; `None` when attempts are not counted
    /// (a job poll, asked again until it learns something).
    pub attempts: Option<(u32, u32)>,
    /// The wait before a retry (exponential, jittered by the caller).
    pub backoff: Duration,
    /// Set while the CRM fails as a whole: the time of the breaker's next probe.
    pub outage: Option<Time>,
    pub now: Time,
}

/// What happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The CRM's final answer (2xx, 3xx, a 4xx other than a throttle): keep it.
    Final,
    /// The CRM throttled it: back in line at its position, no attempt spent (the quotas the
    /// answer names are paused by the caller, who read the answer).
    Throttled,
    /// Send again, not before `not_before`; `unknown` when the CRM may have applied it already
    /// (a safe resend of an unknown outcome).
    Retry { not_before: Time, unknown: bool },
    /// The CRM is failing as a whole: send again, not before `not_before` (the next probe), with
    /// no attempt spent; `unknown` as for [`Verdict::Retry`].
    Wait { not_before: Time, unknown: bool },
    /// Give up: kept as a dead letter.
    Failed(FailReason),
}

/// The verdict on one attempt.
pub fn verdict(attempt: Attempt<'_>, policy: &Policy<'_>) -> Verdict {
    let retry = |hint: Option<Time>, unknown: bool| match (policy.outage, policy.attempts) {
        (Some(probe), _) => Verdict::Wait {
            not_before: probe.max(hint.unwrap_or(probe)),
            unknown,
        },
        (None, Some((n, max))) if n >= max => Verdict::Failed(FailReason::AttemptsExhausted),
        (None, _) => Verdict::Retry {
            not_before: (policy.now + policy.backoff).max(hint.unwrap_or(policy.now)),
            unknown,
        },
    };
    let unknown = || {
        if policy.resend_safe {
            retry(None, true)
        } else {
            Verdict::Failed(FailReason::Ambiguous)
        }
    };
    match attempt {
        Attempt::Answered {
            throttled: true, ..
        } => Verdict::Throttled,
        Attempt::Answered {
            status, headers, ..
        } if policy.retry_status.contains(&status.as_u16()) => {
            retry(retry_after(headers, policy.now), false)
        }
        Attempt::Answered { status, .. } if status.is_server_error() => unknown(),
        Attempt::Answered { .. } => Verdict::Final,
        Attempt::NotSent | Attempt::JobFailed => retry(None, false),
        Attempt::Lost => unknown(),
    }
}

/// Exponential backoff before attempt `attempt + 1`: `initial` doubled per attempt, capped at
/// `max`, with equal jitter (half fixed, half `random`, a number in `[0, 1]`).
pub fn backoff(initial: Duration, max: Duration, attempt: u32, random: f64) -> Duration {
    let step = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let half = step / 2;
    half + half.mul_f64(random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Time = Time::from_nanos(1_000_000_000_000);

    fn policy(resend_safe: bool, attempt: u32) -> Policy<'static> {
        Policy {
            resend_safe,
            retry_status: &[502, 503, 504],
            attempts: Some((attempt, 4)),
            backoff: Duration::from_secs(2),
            outage: None,
            now: NOW,
        }
    }

    fn answered(status: u16, headers: &HeaderMap, throttled: bool) -> Attempt<'_> {
        Attempt::Answered {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            throttled,
        }
    }

    fn retry_at(secs: u64, unknown: bool) -> Verdict {
        Verdict::Retry {
            not_before: NOW + Duration::from_secs(secs),
            unknown,
        }
    }

    /// The README's failure classes, row by row.
    #[test]
    fn each_failure_class_gets_its_verdict() {
        let none = HeaderMap::new();
        let mut later = HeaderMap::new();
        later.insert(http::header::RETRY_AFTER, "30".parse().unwrap());
        for safe in [false, true] {
            // throttled: back in line, whatever else holds.
            assert_eq!(
                verdict(answered(429, &none, true), &policy(safe, 4)),
                Verdict::Throttled
            );
            assert_eq!(
                verdict(answered(403, &none, true), &policy(safe, 1)),
                Verdict::Throttled
            );
            // retryable: nothing was sent, or a retry status; a later Retry-After wins.
            assert_eq!(
                verdict(Attempt::NotSent, &policy(safe, 1)),
                retry_at(2, false)
            );
            assert_eq!(
                verdict(answered(503, &none, false), &policy(safe, 1)),
                retry_at(2, false)
            );
            assert_eq!(
                verdict(answered(503, &later, false), &policy(safe, 1)),
                retry_at(30, false)
            );
            assert_eq!(
                verdict(Attempt::NotSent, &policy(safe, 4)),
                Verdict::Failed(FailReason::AttemptsExhausted)
            );
            // final: any other answer, a throttle-less 429 included.
            for status in [200, 201, 302, 404, 422, 429] {
                assert_eq!(
                    verdict(answered(status, &none, false), &policy(safe, 4)),
                    Verdict::Final,
                    "{status}"
                );
            }
        }
        // unknown outcome: resent only when that is safe.
        for unknown in [Attempt::Lost, answered(500, &none, false)] {
            assert_eq!(verdict(unknown, &policy(true, 1)), retry_at(2, true));
            assert_eq!(
                verdict(unknown, &policy(true, 4)),
                Verdict::Failed(FailReason::AttemptsExhausted)
            );
            assert_eq!(
                verdict(unknown, &policy(false, 1)),
                Verdict::Failed(FailReason::Ambiguous)
            );
        }
        // A failed job applied nothing: retried until attempts run out.
        assert_eq!(
            verdict(Attempt::JobFailed, &policy(false, 1)),
            retry_at(2, false)
        );
        // Uncounted attempts (polls) never run out.
        let poll = Policy {
            attempts: None,
            ..policy(true, 99)
        };
        assert_eq!(verdict(Attempt::NotSent, &poll), retry_at(2, false));
    }

    /// While the CRM fails as a whole, what would be retried waits for the next probe without
    /// spending an attempt, the last one included; what may not be resent is still given up.
    #[test]
    fn an_outage_spends_no_attempts() {
        let none = HeaderMap::new();
        let probe = NOW + Duration::from_millis(400);
        let down = |safe, attempt| Policy {
            outage: Some(probe),
            ..policy(safe, attempt)
        };
        let wait = |unknown| Verdict::Wait {
            not_before: probe,
            unknown,
        };
        for attempt in [1, 4] {
            assert_eq!(
                verdict(Attempt::NotSent, &down(false, attempt)),
                wait(false)
            );
            assert_eq!(
                verdict(answered(503, &none, false), &down(false, attempt)),
                wait(false)
            );
            assert_eq!(verdict(Attempt::Lost, &down(true, attempt)), wait(true));
        }
        assert_eq!(
            verdict(Attempt::Lost, &down(false, 1)),
            Verdict::Failed(FailReason::Ambiguous)
        );
        assert_eq!(
            verdict(answered(201, &none, false), &down(false, 1)),
            Verdict::Final
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(5));
        for (attempt, step) in [(1u32, 1u64), (2, 2), (3, 4), (4, 5), (9, 5)] {
            let step = Duration::from_secs(step);
            assert_eq!(backoff(initial, max, attempt, 0.0), step / 2);
            assert_eq!(backoff(initial, max, attempt, 1.0), step);
            let d = backoff(initial, max, attempt, 0.3);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
    }
}
