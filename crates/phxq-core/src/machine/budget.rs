//! The snapshot budget: replicated state is admitted, never discovered.
//!
//! A group's snapshot must fit one log record and one peer frame, so the machine keeps a
//! count of the bytes its snapshot would take ([`Usage`]) and refuses, with
//! `STATE_BUDGET_EXCEEDED`, any command that would take the count past the budget
//! ([`SNAPSHOT_BUDGET_BYTES`]). The refusal is part of [`GroupMachine::check`], which both
//! admission (on the master) and apply (on every replica) run, so a command the master let
//! through but that no longer fits when applied is refused identically everywhere.
//!
//! **The count never under-counts.** Each encoded item is counted at its largest encoding
//! (every varint at [`VARINT_BYTES_MAX`], every message id at [`MESSAGE_ID_BYTES_MAX`]), so
//! the count depends only on how many items there are, not on their values:
//! - header: [`HEADER_BYTES_MAX`];
//! - per topic: its config's encoding (exact) and a queue count;
//! - per hosted queue: [`QUEUE_BYTES_MAX`]; per (queue, consumer group): the name, a cursor,
//!   `next_fresh` and an in-flight count ([`cursor_bytes_max`]);
//! - per id in a dedup window: [`DEDUP_RECORD_BYTES_MAX`];
//! - per offset in flight: [`IN_FLIGHT_BYTES_MAX`].
//!
//! A snapshot at a compaction point `i` below the applied index holds the topic table and
//! consumer state of now and the dedup windows of `i`. A window only grows between topic
//! changes (an id pushed out is replaced by the new one), an alter that lowers a window trims
//! it at once, and no snapshot is taken below the last topic change: so the windows at `i`
//! hold at most as many ids as now, and the snapshot at `i` is within the count of now.
//!
//! **Two shares.** A restored machine replays the entries up to its consumer state's index
//! over *newer* cursors and deliveries than the ones those entries first met, so a check that
//! replay runs (enqueues, topic changes) must not read the in-flight count, or a replica
//! restored from a snapshot could refuse what the others accepted. Hence the budget is split:
//! in-flight deliveries may take [`IN_FLIGHT_BUDGET_BYTES`] (checked by `Deliver`, which replay
//! skips); everything else the rest, [`STATE_BUDGET_BYTES`]. Their sum is the budget.
//!
//! **Why refuse per command, not reserve the worst case at topic create.** The fixed part
//! (topic config, queues, cursors) is counted in full when a topic is created or altered, so a
//! topic whose queues × consumer groups do not fit is refused then. Dedup windows and
//! deliveries grow with traffic: reserving 4,096 queues × 100,000 ids × 95 bytes would refuse
//! every large window outright, though few queues ever fill theirs. So an enqueue with a new
//! id is refused while its queue's window is still filling and the group has no room left (a
//! full window stays full: each new id pushes one out, so it costs nothing more), and a
//! `Deliver` of fresh offsets is refused past the in-flight share. Commands that do not grow
//! the count are never refused for it.

use phxq_types::{
    ErrorCode, GroupId, MESSAGE_ID_BYTES_MAX, Offset, SNAPSHOT_BUDGET_BYTES, group_of_queue,
};

use super::{GroupMachine, TopicState};
use crate::codec::VARINT_BYTES_MAX;
use crate::command::put_topic_config;
use crate::{Command, TopicConfig};

const VARINT: u64 = VARINT_BYTES_MAX as u64;

/// The snapshot's header: version, group, index, state index, topic count.
pub(super) const HEADER_BYTES_MAX: u64 = 1 + 4 * VARINT;

/// One hosted queue: its number, next offset, cursor count and dedup record count.
pub(super) const QUEUE_BYTES_MAX: u64 = 4 * VARINT;

/// One id of a dedup window: the id (a one-byte length, at most 64 bytes) and its index, first
/// offset and count.
pub(super) const DEDUP_RECORD_BYTES_MAX: u64 = 1 + MESSAGE_ID_BYTES_MAX as u64 + 3 * VARINT;

/// One offset in flight: the offset, its delivery count (a `u32`) and its deadline.
pub(super) const IN_FLIGHT_BYTES_MAX: u64 = VARINT + 5 + VARINT;

/// The share of [`SNAPSHOT_BUDGET_BYTES`] in-flight deliveries may take (4 MiB: about 167,000
/// offsets in flight across the group's consumer groups and queues).
pub const IN_FLIGHT_BUDGET_BYTES: u64 = 4 << 20;

/// The share of [`SNAPSHOT_BUDGET_BYTES`] for everything but in-flight deliveries: the topic
/// table, queues, cursors and dedup windows (12 MiB: e.g. about 132,000 ids of dedup windows
/// beside a few thousand cursors).
pub const STATE_BUDGET_BYTES: u64 = SNAPSHOT_BUDGET_BYTES - IN_FLIGHT_BUDGET_BYTES;

/// What a group's snapshot may take, counted as described in the module doc.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Header, topic table, queues, cursors and dedup windows (share: [`STATE_BUDGET_BYTES`]).
    pub state_bytes: u64,
    /// In-flight deliveries (share: [`IN_FLIGHT_BUDGET_BYTES`]).
    pub in_flight_bytes: u64,
}

impl Usage {
    /// The whole count: never below the bytes of a snapshot of the machine at any index it
    /// may still be taken at.
    pub fn total_bytes(&self) -> u64 {
        self.state_bytes + self.in_flight_bytes
    }
}

/// Bytes of a varint's encoding of `value`.
fn varint_len(value: u64) -> u64 {
    u64::from((64 - value.leading_zeros()).div_ceil(7).max(1))
}

/// One (queue, consumer group) pair: the group's name, its cursor, `next_fresh` and the count
/// of its offsets in flight.
pub(super) fn cursor_bytes_max(consumer_group: &str) -> u64 {
    let name = consumer_group.len() as u64;
    varint_len(name) + name + 3 * VARINT
}

/// The fixed part of a topic whose `hosted` queues live in the group: its config, queue count,
/// queues and cursors (not its dedup windows or deliveries).
pub(super) fn topic_fixed_bytes(config: &TopicConfig, hosted: usize) -> u64 {
    let mut encoded = Vec::new();
    put_topic_config(&mut encoded, config);
    let per_queue = QUEUE_BYTES_MAX
        + (config.consumer_groups.iter())
            .map(|name| cursor_bytes_max(name))
            .sum::<u64>();
    encoded.len() as u64 + VARINT + hosted as u64 * per_queue
}

/// How many of queues `0..queues` live in `group` of `groups`.
pub(super) fn hosted_count(queues: u32, group: GroupId, groups: u32) -> usize {
    (0..queues)
        .filter(|&queue| group_of_queue(queue, groups) == group)
        .count()
}

/// A topic's whole count: fixed part, dedup windows, deliveries.
fn topic_usage(topic: &TopicState) -> Usage {
    let fixed = topic_fixed_bytes(&topic.config, topic.queues.len());
    let ids: u64 = topic
        .queues
        .iter()
        .map(|q| q.dedup.window_len() as u64)
        .sum();
    let in_flight: u64 = (topic.queues.iter())
        .flat_map(|q| q.deliveries.iter())
        .map(|d| d.in_flight.len() as u64)
        .sum();
    Usage {
        state_bytes: fixed + ids * DEDUP_RECORD_BYTES_MAX,
        in_flight_bytes: in_flight * IN_FLIGHT_BYTES_MAX,
    }
}

/// A refusal: its code and a reason for people.
type Refusal = (ErrorCode, String);

impl GroupMachine {
    /// The count of the module doc, as kept up to date on apply.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The count of the module doc, from scratch (after topic changes and restores, and to
    /// check the kept one).
    pub(super) fn usage_from_scratch(&self) -> Usage {
        self.topics.iter().map(topic_usage).fold(
            Usage {
                state_bytes: HEADER_BYTES_MAX,
                in_flight_bytes: 0,
            },
            |sum, topic| Usage {
                state_bytes: sum.state_bytes + topic.state_bytes,
                in_flight_bytes: sum.in_flight_bytes + topic.in_flight_bytes,
            },
        )
    }

    /// Refuses growing the state share from the current count to `after`.
    pub(super) fn check_state_budget(&self, after: u64, what: &str) -> Result<(), Refusal> {
        if after <= self.usage.state_bytes || after <= STATE_BUDGET_BYTES {
            return Ok(());
        }
        Err((
            ErrorCode::StateBudgetExceeded,
            format!(
                "{what} would take {}'s replicated state to {after} bytes, past its \
                 {STATE_BUDGET_BYTES}-byte share of the snapshot budget \
                 (SNAPSHOT_BUDGET_BYTES = {SNAPSHOT_BUDGET_BYTES}) for topics, queues, cursors \
                 and dedup windows ({} bytes in use): {}",
                self.group,
                self.usage.state_bytes,
                advice(what),
            ),
        ))
    }

    /// Refuses a `Deliver` that may put up to `fresh` more offsets in flight, past the
    /// in-flight share.
    pub(super) fn check_in_flight_budget(&self, fresh: u64) -> Result<(), Refusal> {
        let after = self.usage.in_flight_bytes + fresh * IN_FLIGHT_BYTES_MAX;
        if fresh == 0 || after <= IN_FLIGHT_BUDGET_BYTES {
            return Ok(());
        }
        Err((
            ErrorCode::StateBudgetExceeded,
            format!(
                "delivering {fresh} more offsets would take {}'s in-flight deliveries to \
                 {after} bytes, past their {IN_FLIGHT_BUDGET_BYTES}-byte share of the snapshot \
                 budget (SNAPSHOT_BUDGET_BYTES = {SNAPSHOT_BUDGET_BYTES}): ack or nack what \
                 was received, receive fewer at a time, or lower the consumer groups' \
                 max_in_flight",
                self.group
            ),
        ))
    }

    /// The state share after `Enqueue` of `message_id` to queue `slot` of topic
    /// `topic_position`: one id more while the window is still filling, else the same.
    pub(super) fn state_after_enqueue(
        &self,
        topic_position: usize,
        slot: usize,
        message_id: &[u8],
    ) -> u64 {
        let window = self.topics[topic_position].config.dedup_window as usize;
        let dedup = &self.topics[topic_position].queues[slot].dedup;
        let grows = !message_id.is_empty()
            && dedup.window_len() < window
            && dedup.lookup(message_id).is_none();
        self.usage.state_bytes + if grows { DEDUP_RECORD_BYTES_MAX } else { 0 }
    }

    /// The state share after putting `config` (a checked create or alter): the topic's fixed
    /// part replaced, and ids a lowered dedup window pushes out no longer counted.
    pub(super) fn state_after_put(&self, config: &TopicConfig) -> u64 {
        let hosted = hosted_count(config.queues, self.group, self.layout.groups);
        let new = topic_fixed_bytes(config, hosted);
        let Some(topic) = self.topics.iter().find(|t| t.config.name == config.name) else {
            return self.usage.state_bytes + new;
        };
        let old = topic_fixed_bytes(&topic.config, topic.queues.len());
        let window = config.dedup_window as usize;
        let trimmed: u64 = (topic.queues.iter())
            .map(|q| q.dedup.window_len().saturating_sub(window) as u64)
            .sum();
        self.usage.state_bytes - old - trimmed * DEDUP_RECORD_BYTES_MAX + new
    }

    /// Adds to the kept count after a change of `ids` dedup ids and `in_flight` offsets in
    /// flight (each may be negative).
    pub(super) fn count_change(&mut self, ids: i64, in_flight: i64) {
        let add = |total: u64, items: i64, each: u64| {
            total
                .checked_add_signed(items * each as i64)
                .expect("the count covers what it removes")
        };
        self.usage.state_bytes = add(self.usage.state_bytes, ids, DEDUP_RECORD_BYTES_MAX);
        self.usage.in_flight_bytes =
            add(self.usage.in_flight_bytes, in_flight, IN_FLIGHT_BYTES_MAX);
    }

    /// Checks the kept count against one from scratch, and (in debug builds) against a real
    /// encoding of the snapshot at the applied index.
    pub(super) fn validate_usage(&self) {
        assert_eq!(
            self.usage,
            self.usage_from_scratch(),
            "kept count out of step"
        );
        #[cfg(debug_assertions)]
        {
            let encoded = super::snapshot::encode(self, self.applied_index).len() as u64;
            assert!(
                encoded <= self.usage.total_bytes(),
                "snapshot of {encoded} bytes over its count {:?}",
                self.usage
            );
        }
    }
}

/// Refuses bootstrap topics (a store's layout) whose fixed part does not fit some group's
/// state share: the layout is checked when the config is read, so such a store never starts.
pub(crate) fn check_layout(groups: u32, topics: &[TopicConfig]) -> Result<(), String> {
    for group in 0..groups {
        let fixed: u64 = (topics.iter())
            .map(|topic| {
                topic_fixed_bytes(
                    topic,
                    hosted_count(topic.queues, GroupId(group.into()), groups),
                )
            })
            .sum();
        if HEADER_BYTES_MAX + fixed > STATE_BUDGET_BYTES {
            return Err(format!(
                "the topics' queues and cursors need {} bytes of group {group}'s snapshot \
                 state share of {STATE_BUDGET_BYTES} bytes (SNAPSHOT_BUDGET_BYTES = \
                 {SNAPSHOT_BUDGET_BYTES}): fewer queues or consumer groups, or more groups",
                HEADER_BYTES_MAX + fixed
            ));
        }
    }
    Ok(())
}

/// How many of `offsets` a `Deliver` may put in flight: those at or past `next_fresh` and
/// below the queue's `end`, no more than the room under the in-flight `limit`.
pub(super) fn fresh_at_most(
    offsets: &[Offset],
    next_fresh: Offset,
    end: Offset,
    in_flight: usize,
    limit: usize,
) -> u64 {
    let candidates = (offsets.iter())
        .filter(|&&offset| offset >= next_fresh && offset < end)
        .count();
    candidates.min(limit.saturating_sub(in_flight)) as u64
}

/// What the operator can lower, for a refusal of `what`.
fn advice(what: &str) -> &'static str {
    if what.starts_with("a command") {
        "lower a topic's dedup window, send without message ids, create or alter topics with \
         fewer queues or consumer groups, delete a topic, or spread the queues over more groups"
    } else if what.starts_with("enqueue") {
        "lower the topic's dedup window (topic alter --dedup-window), send without message \
         ids, or spread the queues over more groups"
    } else {
        "create or alter the topic with fewer queues, consumer groups or a smaller dedup \
         window, delete a topic, or spread the queues over more groups"
    }
}

/// The reason for people of a `STATE_BUDGET_EXCEEDED` refusal of `command` whose exact
/// figures are not at hand (an answer built after apply).
pub fn budget_refusal_reason(command: Option<&Command>) -> String {
    let what = match command {
        Some(Command::Deliver { .. }) => {
            return format!(
                "the group's in-flight deliveries would pass their {IN_FLIGHT_BUDGET_BYTES}-byte \
                 share of the snapshot budget (SNAPSHOT_BUDGET_BYTES = {SNAPSHOT_BUDGET_BYTES}): \
                 ack or nack what was received, or lower max_in_flight"
            );
        }
        Some(Command::Enqueue { .. }) => "enqueue",
        Some(_) => "the topic change",
        None => "a command",
    };
    format!(
        "{what} would take the group's replicated state past its {STATE_BUDGET_BYTES}-byte \
         share of the snapshot budget (SNAPSHOT_BUDGET_BYTES = {SNAPSHOT_BUDGET_BYTES}): {}",
        advice(what)
    )
}
