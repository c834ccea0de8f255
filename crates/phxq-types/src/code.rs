//! Stable error codes: the numbers clients see on the wire.
//!
//! A code is data. Once published its number never changes and a retired code is never
//! reused; add new codes at the end.

use std::fmt;

/// Why a request failed, as a stable number with a stable name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// This node is not the master of the request's group; the reply names the master.
    NotMaster = 1,
    /// The group has no master right now (election under way); retry shortly.
    NoMaster = 2,
    /// The topic does not exist in this store.
    UnknownTopic = 3,
    /// The consumer group is not subscribed to the topic.
    UnknownConsumerGroup = 4,
    /// The queue number is not below the topic's queue count.
    UnknownQueue = 5,
    /// A message or key is over the size limit.
    MessageTooLarge = 6,
    /// A batch with no messages.
    EmptyBatch = 7,
    /// A topic, consumer group or other name that breaks the naming rules.
    InvalidName = 8,
    /// The request was meant for another store.
    WrongStore = 9,
    /// An argument is out of range (a limit of zero, an absurd wait, an offset past the end).
    InvalidArgument = 10,
    /// The master lost its term before the request committed: it may or may not have been
    /// applied. Retrying may duplicate (at-least-once).
    Indeterminate = 11,
    /// The node is overloaded (too many requests in flight); retry with backoff.
    Busy = 12,
    /// The node is stopping or its log failed; it serves nothing more.
    Unavailable = 13,
    /// The request did not complete within its deadline.
    Timeout = 14,
    /// A malformed request.
    Malformed = 15,
    /// A topic of that name already exists with another configuration (create); alter it
    /// instead.
    TopicExists = 16,
    /// The call carried no valid token (missing, malformed, forged or expired); the gRPC
    /// status is `UNAUTHENTICATED`. Nothing was done.
    Unauthenticated = 17,
    /// The caller's token is valid but none of its roles allows this call; the gRPC status is
    /// `PERMISSION_DENIED`. Nothing was done.
    PermissionDenied = 18,
    /// The command would take its replication group's replicated state past the snapshot
    /// budget (`SNAPSHOT_BUDGET_BYTES`); nothing changed. Retrying the same command fails the
    /// same way until state is freed (acks, a smaller dedup window, fewer queues or consumer
    /// groups, a deleted topic). The gRPC protocol's `RESOURCE_EXHAUSTED`.
    StateBudgetExceeded = 19,
}

impl ErrorCode {
    /// Every code, in number order.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::NotMaster,
        ErrorCode::NoMaster,
        ErrorCode::UnknownTopic,
        ErrorCode::UnknownConsumerGroup,
        ErrorCode::UnknownQueue,
        ErrorCode::MessageTooLarge,
        ErrorCode::EmptyBatch,
        ErrorCode::InvalidName,
        ErrorCode::WrongStore,
        ErrorCode::InvalidArgument,
        ErrorCode::Indeterminate,
        ErrorCode::Busy,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Malformed,
        ErrorCode::TopicExists,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::StateBudgetExceeded,
    ];

    /// The stable number.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The code with this number, if any.
    pub fn from_number(number: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.number() == number)
    }

    /// The stable name, in SCREAMING_SNAKE_CASE.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NotMaster => "NOT_MASTER",
            ErrorCode::NoMaster => "NO_MASTER",
            ErrorCode::UnknownTopic => "UNKNOWN_TOPIC",
            ErrorCode::UnknownConsumerGroup => "UNKNOWN_CONSUMER_GROUP",
            ErrorCode::UnknownQueue => "UNKNOWN_QUEUE",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::EmptyBatch => "EMPTY_BATCH",
            ErrorCode::InvalidName => "INVALID_NAME",
            ErrorCode::WrongStore => "WRONG_STORE",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Indeterminate => "INDETERMINATE",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Malformed => "MALFORMED",
            ErrorCode::TopicExists => "TOPIC_EXISTS",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::StateBudgetExceeded => "STATE_BUDGET_EXCEEDED",
        }
    }

    /// Whether a client may retry the same request (possibly elsewhere) and expect success.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotMaster
                | ErrorCode::NoMaster
                | ErrorCode::Indeterminate
                | ErrorCode::Busy
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_ascending_and_round_trip() {
        // 17 and 18 are assigned to codes of other changes (authentication); numbers are
        // never reused, so `ALL` is ascending, not necessarily dense.
        let mut previous = 0;
        for code in ErrorCode::ALL {
            assert!(code.number() > previous, "{code} out of order");
            previous = code.number();
            assert_eq!(ErrorCode::from_number(code.number()), Some(code));
        }
        assert_eq!(ErrorCode::StateBudgetExceeded.number(), 19);
        assert_eq!(ErrorCode::from_number(0), None);
        assert_eq!(ErrorCode::NotMaster.to_string(), "NOT_MASTER(1)");
    }
}
