//! The CRM call's deadline on a data thread: timers kept and reused call after call, where
//! `tokio::time::timeout` registers a timer in the runtime's wheel for each call and removes
//! it after. Moving a kept timer's deadline later is a store the wheel sees only when the old
//! deadline comes (then it files the timer again), so a call pays neither the insert nor the
//! removal, nor the timer's allocation.
//!
//! Only for the data threads (each runs one runtime for its whole life): a timer belongs to the
//! runtime it was made in, and a thread that runs several in turn (the shared runtime's
//! workers, tests) could otherwise hand one to a runtime it does not belong to.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Spare timers a thread keeps (one is in use for each CRM call in flight on it).
const KEPT: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// The limit passed before the call ended.
#[derive(Debug)]
pub struct Elapsed;

/// Runs `call` for at most `limit` on a timer from this thread's spares.
pub async fn within<F: Future>(limit: Duration, call: F) -> Result<F::Output, Elapsed> {
    let mut timer = Kept::take(Instant::now() + limit);
    let mut call = pin!(call);
    poll_fn(|cx| {
        // The call first, as `tokio::time::timeout` does: an answer that came with the
        // deadline counts.
        if let Poll::Ready(out) = call.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        timer.sleep().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// A timer in use; back to the spares when dropped.
struct Kept(Option<Pin<Box<Sleep>>>);

impl Kept {
    fn take(at: Instant) -> Kept {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        Kept(Some(match spare {
            Some(mut timer) => {
                timer.as_mut().reset(at);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        }))
    }

    fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.0
            .as_mut()
            .expect("a kept timer until dropped")
            .as_mut()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(timer) = self.0.take() {
            SPARE.with(|s| {
                let mut spare = s.borrow_mut();
                if spare.len() < KEPT {
                    spare.push(timer);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_ends_in_time_gives_its_output_and_its_timer_is_kept() {
        SPARE.with(|s| s.borrow_mut().clear());
        let out = within(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            7
        })
        .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(SPARE.with(|s| s.borrow().len()), 1);
        // The kept timer, reset later and again, still ends the next call on time.
        let started = Instant::now();
        let late = within(Duration::from_secs(2), std::future::pending::<()>()).await;
        assert!(late.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(SPARE.with(|s| s.borrow().len()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fired_is_reset_for_the_next_call() {
        SPARE.with(|s| s.borrow_mut().clear());
        assert!(
            within(Duration::from_secs(1), std::future::pending::<()>())
                .await
                .is_err()
        );
        let out = within(Duration::from_secs(3), async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "answered"
        })
        .await;
        assert_eq!(out.unwrap(), "answered");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_at_once_each_have_a_timer_and_keep_them_after() {
        SPARE.with(|s| s.borrow_mut().clear());
        let short = within(Duration::from_secs(1), std::future::pending::<()>());
        let long = within(Duration::from_secs(10), async {
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        let (short, long) = tokio::join!(short, long);
        assert!(short.is_err());
        assert!(long.is_ok());
        assert_eq!(SPARE.with(|s| s.borrow().len()), 2);
    }
}
