//! The batch calls and CRM jobs the queue keeps track of: which writes each holds, and when a
//! job is polled next.

use std::time::Duration;

use http::HeaderMap;

use crate::clock::Time;
use crate::crm::zendesk_batch::BatchKind;
use crate::ids::{ClientId, EntryId, RouteId};

/// A batch call on its way.
pub(super) struct Pending {
    pub kind: BatchKind,
    pub route: RouteId,
    pub client: ClientId,
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
