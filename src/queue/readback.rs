//! Reading back what a batch created, for the clients still waiting on it: one
//! `tickets/show_many` read per batch, so a client written for the CRM (zenpy, say) gets the
//! ticket itself from its create, as a single call would have given it.

use serde_json::Value;

use super::Queue;
use super::book::Book;
use super::entry::Settled;
use crate::clock::Time;
use crate::crm::zendesk_batch as zendesk;
use crate::ids::RouteId;
use crate::message::Outbound;
use crate::quota::{Grant, Ledger};

/// A read-back handed to the dispatcher.
pub struct ReadbackDispatch {
    /// Hands the answer back: [`Queue::complete_readback`].
    pub readback: u64,
    /// The route the read classifies as (its quotas were charged; metrics use its name).
    pub route: RouteId,
    pub request: Outbound,
    pub grant: Grant,
}

impl Queue {
    /// The next read-back, when quota allows; those whose clients all stopped waiting are
    /// dropped unread.
    pub(super) fn readback_due(
        &self,
        book: &mut Book,
        ledger: &Ledger,
        now: Time,
        cap: usize,
        wake_at: &mut Option<Time>,
    ) -> Option<ReadbackDispatch> {
        book.readbacks.retain_mut(|r| {
            r.members.retain(|(_, _, tx)| !tx.is_closed());
            r.reading || !r.members.is_empty()
        });
        let r = book.readbacks.iter_mut().find(|r| !r.reading)?;
        if book.in_flight >= cap {
            return None; // a completion wakes us
        }
        let ids: Vec<u64> = r.members.iter().map(|(id, _, _)| *id).collect();
        let request = zendesk::show_tickets_request(&ids, &r.headers);
        // Its clients are waiting: it counts as live traffic.
        let (route, grant) =
            self.charge_own_read(&request, r.client, true, ledger, now, wake_at)?;
        r.reading = true;
        book.in_flight += 1;
        Some(ReadbackDispatch {
            readback: r.seq,
            route,
            request,
            grant,
        })
    }

    /// Answers the clients of a read-back: each gets its ticket as Zendesk's single create
    /// returns it, or (when the read failed or left it out) the answer with its id alone.
    pub fn complete_readback(&self, readback: u64, tickets: Option<Vec<(u64, Value)>>) {
        let mut book = self.lock();
        book.in_flight -= 1;
        let Some(at) = book.readbacks.iter().position(|r| r.seq == readback) else {
            return;
        };
        let r = book.readbacks.swap_remove(at);
        drop(book);
        let tickets = tickets.unwrap_or_default();
        for (id, fallback, tx) in r.members {
            let answer = tickets
                .iter()
                .find(|(t, _)| *t == id)
                .and_then(|(_, ticket)| zendesk::created_answer(ticket))
                .unwrap_or(fallback);
            let _ = tx.send(Settled::Answer(answer));
        }
        self.wake();
    }
}
