//! Identifiers, error codes, names and limits shared by every phxq layer.
//!
//! This crate sits at the bottom of the dependency graph: it holds plain data and no I/O, no
//! clock and no ambient randomness ([`Rng`] is seeded by its caller), so the sans-IO core and
//! the simulator can use it freely.

use std::fmt;

mod assign;
mod code;
mod name;
mod rng;

pub use assign::queue_owner;
pub use code::ErrorCode;
pub use name::{NameError, validate_name};
pub use rng::Rng;

/// A replication group: one consensus group inside a store.
///
/// A store runs many groups so that masters spread over its nodes; queue `q` of a topic lives
/// in group `q mod groups`. Every node of the store hosts every group, and all the groups of a
/// node share that node's write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A node of a store, numbered from 1 (raft-rs reserves 0 for "nobody").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A queue's number inside its topic, from 0.
pub type QueueId = u32;

/// A message's position in its queue: dense, from 1, never reused.
pub type Offset = u64;

/// The replication group that hosts queue `queue` in a store of `groups` groups.
pub fn group_of_queue(queue: QueueId, groups: u32) -> GroupId {
    assert!(groups > 0, "a store has at least one group");
    GroupId(u64::from(queue % groups))
}

/// Largest message value accepted by default (1 MiB); configurable per store.
pub const MESSAGE_BYTES_MAX_DEFAULT: usize = 1 << 20;

/// Largest message key.
pub const KEY_BYTES_MAX: usize = 1024;

/// Longest producer message id (`Command::Enqueue::message_id`): ids are random tokens or
/// (producer, sequence) pairs, never payloads, and a queue remembers a window of them.
pub const MESSAGE_ID_BYTES_MAX: usize = 64;

/// How many message ids a queue remembers for deduplication unless its topic says otherwise.
pub const DEDUP_WINDOW_DEFAULT: u32 = 1000;

/// Most message ids a queue may remember (bounds the dedup table: at most this many ids of at
/// most [`MESSAGE_ID_BYTES_MAX`] bytes per queue).
pub const DEDUP_WINDOW_MAX: u32 = 100_000;

/// Most queues a topic may have.
pub const QUEUES_PER_TOPIC_MAX: u32 = 4096;

/// Most topics a store may have (each replication group keeps a table of them).
pub const TOPICS_MAX: usize = 1024;

/// Most consumer groups one topic may have (each hosted queue keeps a cursor per group).
pub const CONSUMER_GROUPS_PER_TOPIC_MAX: usize = 256;

/// Longest retention or replay age a topic may name, in ms (100 years): more is a unit
/// mistake, refused.
pub const RETENTION_AGE_MS_MAX: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Most offsets one delivery, ack or nack command names (per-message acknowledgements).
pub const DELIVERY_OFFSETS_MAX: usize = 1000;

/// Longest ack timeout a receive may ask for, in ms (one day): a message received and not
/// acked within it is delivered again.
pub const ACK_TIMEOUT_MS_MAX: u64 = 24 * 3600 * 1000;

/// Longest delay a nack may ask for before the message is delivered again, in ms (one week).
pub const NACK_DELAY_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// How many delivered, unacknowledged offsets a queue tracks per consumer group unless the
/// topic's consumer group settings say `max_in_flight`.
pub const IN_FLIGHT_TRACKED_DEFAULT: u32 = 1000;

/// Most delivered, unacknowledged offsets a queue tracks per consumer group, whatever the
/// settings say (bounds the replicated state of per-message acknowledgements).
pub const IN_FLIGHT_TRACKED_MAX: u32 = 100_000;

/// Most bytes one replication group's replicated state may take in its snapshot (16 MiB).
///
/// Every structure a snapshot carries (topic table, queues, cursors, in-flight deliveries,
/// dedup windows) is counted against it, conservatively, as it changes, and a command that
/// would take the count past it is refused on every replica alike (`STATE_BUDGET_EXCEEDED`):
/// see `phxq-core`'s `machine/budget.rs`. The count is never below the encoded size, so a
/// snapshot is at most this many bytes: half the log's `SNAPSHOT_BYTES_MAX` (32 MiB), and a
/// raft `MsgSnapshot` carrying it is at most this plus its metadata (a peer frame cap must
/// allow `SNAPSHOT_BUDGET_BYTES + 1 MiB`).
pub const SNAPSHOT_BUDGET_BYTES: u64 = 16 << 20;

/// The latest time a request may name, in ms since the Unix epoch: 9999-12-31T23:59:59.999Z.
/// Message times are the master's clock, so a later one is a mistake (seconds or
/// microseconds taken for milliseconds), refused rather than answered with "the end".
pub const TIME_MS_MAX: u64 = 253_402_300_799_999;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_print_with_a_prefix_and_order_numerically() {
        assert_eq!(GroupId(7).to_string(), "g7");
        assert!(GroupId(2) < GroupId(10));
        assert_eq!(NodeId(3).to_string(), "n3");
    }

    #[test]
    fn queues_map_to_groups_by_modulo() {
        assert_eq!(group_of_queue(0, 24), GroupId(0));
        assert_eq!(group_of_queue(25, 24), GroupId(1));
        assert_eq!(group_of_queue(7, 1), GroupId(0));
    }
}
