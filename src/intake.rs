//! What a client request may hold before the proxy works on it: its body, read under a deadline
//! that grows with a minimum rate and inside a budget of buffered bytes shared by every
//! connection; then one of `max_concurrent_requests` processing slots. A slow client waits on
//! its own body and never holds a slot while it does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Listen;

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeError {
    /// More than `max_body_bytes`.
    TooLarge,
    /// The client sent too slowly (408).
    TimedOut,
    /// The buffered-bytes budget stayed spent until the body's deadline (503).
    Busy,
    /// The connection failed or the body was malformed.
    Broken(String),
}

/// A read body and its share of the buffered-bytes budget, given back when dropped.
pub struct Received {
    pub body: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Bodies being read and requests waiting for a processing slot.
pub struct Intake {
    budget: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    /// `max_body_bytes`, `listen.body_timeout` (ms) and `listen.body_min_rate`: a reload sets them.
    max_body: AtomicUsize,
    body_timeout_ms: AtomicU64,
    min_rate: AtomicU64,
    base: Instant,
    /// Requests waiting for a slot.
    waiting: AtomicUsize,
    /// Milliseconds after `base` when requests began to wait for a slot (none waited before),
    /// or when one was last handed out while others waited: kept only while someone waits, so
    /// a request that finds a slot free reads no clock for it.
    last_slot: AtomicU64,
}

/// A request's processing slot, held until dropped.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Intake {
    pub fn new(listen: &Listen, max_body: usize) -> Intake {
        let budget = usize::try_from(listen.max_buffered_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Intake {
            budget: Arc::new(Semaphore::new(budget)),
            slots: Arc::new(Semaphore::new(listen.max_concurrent_requests)),
            max_body: AtomicUsize::new(max_body),
            body_timeout_ms: AtomicU64::new(listen.body_timeout.as_millis() as u64),
            min_rate: AtomicU64::new(listen.body_min_rate.max(1)),
            base: Instant::now(),
            waiting: AtomicUsize::new(0),
            last_slot: AtomicU64::new(0),
        }
    }

    /// Takes a reloaded config's body limits (the slots and the budget keep their sizes).
    pub fn set_limits(&self, listen: &Listen, max_body: usize) {
        self.max_body.store(max_body, Relaxed);
        self.body_timeout_ms
            .store(listen.body_timeout.as_millis() as u64, Relaxed);
        self.min_rate.store(listen.body_min_rate.max(1), Relaxed);
    }

    /// Reads a request body whole: at most `max_body` bytes, within `body_timeout` plus one
    /// second per `body_min_rate` bytes received, each chunk taken from the budget first.
    pub async fn read<B>(&self, body: B, declared: Option<u64>) -> Result<Received, IntakeError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let max_body = self.max_body.load(Relaxed);
        let body_timeout = Duration::from_millis(self.body_timeout_ms.load(Relaxed));
        let min_rate = self.min_rate.load(Relaxed);
        if declared.is_some_and(|n| n > max_body as u64) {
            return Err(IntakeError::TooLarge);
        }
        if body.is_end_stream() {
            return Ok(Received {
                body: Bytes::new(),
                _budget: None,
            });
        }
        let start = Instant::now();
        let mut buf = BytesMut::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        loop {
            let deadline =
                start + body_timeout + Duration::from_secs_f64(buf.len() as f64 / min_rate as f64);
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(IntakeError::TimedOut),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(IntakeError::Broken(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers: nothing to keep
            };
            if buf.len() + data.len() > max_body {
                return Err(IntakeError::TooLarge);
            }
            if data.is_empty() {
                continue;
            }
            let n = u32::try_from(data.len()).map_err(|_| IntakeError::TooLarge)?;
            // Wait for the budget only when it is spent, and never past the body's deadline.
            let permit = match Arc::clone(&self.budget).try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => match tokio::time::timeout_at(
                    deadline,
                    Arc::clone(&self.budget).acquire_many_owned(n),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(IntakeError::Busy),
                },
            };
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            buf.extend_from_slice(&data);
        }
        Ok(Received {
            body: buf.freeze(),
            _budget: held,
        })
    }

    /// Waits for a processing slot.
    pub async fn slot(&self) -> Slot {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                if self.waiting.load(Relaxed) > 0 {
                    self.slot_moved();
                }
                p
            }
            Err(_) => {
                if self.waiting.fetch_add(1, Relaxed) == 0 {
                    // The first to wait: a stall is timed from now.
                    self.slot_moved();
                }
                let p = self.slots.clone().acquire_owned().await;
                self.waiting.fetch_sub(1, Relaxed);
                self.slot_moved();
                p.expect("the slot semaphore is never closed")
            }
        };
        Slot(permit)
    }

    fn slot_moved(&self) {
        self.last_slot
            .store(self.base.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long requests have waited for a slot with none handed out: a data plane that has
    /// stopped moving (every slot held by requests that do not finish).
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        if self.waiting.load(Relaxed) == 0 || self.slots.available_permits() > 0 {
            return None;
        }
        let last = self.base + Duration::from_millis(self.last_slot.load(Relaxed));
        Some(now.saturating_duration_since(last))
    }

    /// Bytes of request bodies held now (being read, or read and not yet done with).
    pub fn buffered(&self, budget: u64) -> u64 {
        budget.saturating_sub(self.budget.available_permits() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn intake(slots: usize) -> Intake {
        let yaml = format!(
            "listen: {{ max_concurrent_requests: {slots} }}\nupstream: {{ url: http://crm }}\nquotas:\n  - {{ name: m, limit: 1, window: 1m }}\n"
        );
        let config = Config::from_yaml(&yaml, None).unwrap();
        Intake::new(&config.listen, config.max_body_bytes)
    }

    #[tokio::test(start_paused = true)]
    async fn slots_that_stop_moving_are_reported_with_how_long() {
        let intake = Arc::new(intake(1));
        assert_eq!(intake.stalled_for(Instant::now()), None, "idle");
        let held = intake.slot().await;
        assert_eq!(
            intake.stalled_for(Instant::now()),
            None,
            "all slots held, but nobody waits"
        );
        let waiter = tokio::spawn({
            let intake = intake.clone();
            async move { intake.slot().await }
        });
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert_eq!(
            intake.stalled_for(Instant::now()),
            Some(Duration::from_secs(45))
        );
        drop(held);
        let _next = waiter.await.unwrap();
        assert_eq!(intake.stalled_for(Instant::now()), None, "moving again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_timed_from_when_requests_began_to_wait_or_were_last_served() {
        let intake = Arc::new(intake(1));
        let held = intake.slot().await;
        // Held for a long time with nobody waiting: not a stall yet.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let wait = |intake: &Arc<Intake>| {
            let intake = intake.clone();
            tokio::spawn(async move { intake.slot().await })
        };
        let first = wait(&intake);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let second = wait(&intake);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            intake.stalled_for(Instant::now()),
            Some(Duration::from_secs(10)),
            "since the first began to wait"
        );
        drop(held);
        let served = first.await.unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(
            intake.stalled_for(Instant::now()),
            Some(Duration::from_secs(7)),
            "since the first was served, the second still waiting"
        );
        drop(served);
        let _last = second.await.unwrap();
        assert_eq!(intake.stalled_for(Instant::now()), None);
    }
}
