//! A parked write's status as the world sees it, and why one was given up: each enum with its
//! one encoding (log code, JSON name, metric label), so no two places can disagree.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// What a parked request's lifecycle looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Queued,
    Dispatching,
    Done,
    Failed,
    Expired,
    Withdrawn,
}

impl Status {
    /// The statuses an operator can list by (a withdrawn write is gone, never listed).
    pub const LISTED: [Status; 5] = [
        Status::Queued,
        Status::Dispatching,
        Status::Done,
        Status::Failed,
        Status::Expired,
    ];

    /// Its name in JSON, on the command line and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Dispatching => "dispatching",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Withdrawn => "withdrawn",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Status, String> {
        Status::LISTED
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Status::LISTED.iter().map(|s| s.name()).collect();
                format!("{s:?} is not a status ({})", names.join(", "))
            })
    }
}

/// Why a parked write was given up (kept as a dead letter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// Every attempt failed (connect errors, timeouts, retryable statuses).
    AttemptsExhausted,
    /// The CRM may or may not have applied it (timeout or reset after sending, 500), and a retry
    /// could apply it twice: no idempotency key, not an idempotent method, no `retry_ambiguous`.
    Ambiguous,
    /// The CRM refused this write as an item of a batch (its job reported an error for it).
    Rejected,
}

impl FailReason {
    pub const ALL: [FailReason; 3] = [
        FailReason::AttemptsExhausted,
        FailReason::Ambiguous,
        FailReason::Rejected,
    ];

    /// Its code in the parked-write log's `failed` records.
    pub fn code(self) -> u8 {
        match self {
            FailReason::AttemptsExhausted => 0,
            FailReason::Ambiguous => 1,
            FailReason::Rejected => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<FailReason> {
        FailReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Its name in JSON and its metric label.
    pub fn name(self) -> &'static str {
        match self {
            FailReason::AttemptsExhausted => "attempts_exhausted",
            FailReason::Ambiguous => "ambiguous",
            FailReason::Rejected => "rejected",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FailReason {
    type Err = String;
    fn from_str(s: &str) -> Result<FailReason, String> {
        FailReason::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FailReason::ALL.iter().map(|r| r.name()).collect();
                format!("{s:?} is not a reason ({})", names.join(", "))
            })
    }
}

impl Serialize for FailReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_round_trips_and_is_unique() {
        for r in FailReason::ALL {
            assert_eq!(FailReason::from_code(r.code()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
            assert_eq!(r.name().parse::<FailReason>(), Ok(r));
        }
        assert!(
            "nope"
                .parse::<FailReason>()
                .unwrap_err()
                .contains("ambiguous")
        );
        assert_eq!(FailReason::from_code(3), None);
        for s in Status::LISTED {
            assert_eq!(s.name().parse::<Status>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert!("withdrawn".parse::<Status>().is_err());
        assert!("nope".parse::<Status>().unwrap_err().contains("queued"));
    }
}
