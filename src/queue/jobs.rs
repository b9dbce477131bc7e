//! The batch calls and CRM jobs the queue keeps track of: which writes each holds, and when a
//! job is polled next.

use std::time::Duration;

use http::HeaderMap;
use tokio::sync::oneshot;

use super::entry::Settled;
use crate::clock::Time;
use crate::crm::zendesk_batch::BatchKind;
use crate::ids::{ClientId, EntryId, LaneId, RouteId};
use crate::message::BufferedResponse;

/// A batch call on its way.
pub(super) struct Pending {
    pub kind: BatchKind,
    pub route: RouteId,
    pub client: ClientId,
    /// Nothing else of this client's lane goes until the batch's job has settled, so the CRM
    /// applies the lane's writes in arrival order.
    pub lane: LaneId,
    pub members: Vec<EntryId>,
    /// Updates: each member's ticket id (results are matched by it).
    pub tickets: Vec<Option<u64>>,
    pub headers: HeaderMap,
}

/// A CRM job holding a batch whose results are still to be read.
pub(super) struct Job {
    pub batch: Pending,
    pub next_poll: Time,
    pub interval: Duration,
    pub polling: bool,
}

/// Tickets a finished job created for clients still waiting on them: read back in one call.
pub(super) struct Readback {
    pub seq: u64,
    pub client: ClientId,
    pub headers: HeaderMap,
    /// Each waiting client's ticket id, the answer it gets should the read fail (the id alone),
    /// and where its answer goes.
    pub members: Vec<(u64, BufferedResponse, oneshot::Sender<Settled>)>,
    pub reading: bool,
}
