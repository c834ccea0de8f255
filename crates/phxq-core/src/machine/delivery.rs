//! Per-message acknowledgements: what a consumer group has been delivered above its cursor.
//!
//! Per consumer group and queue, above the cursor, the machine tracks
//! ([`Deliveries`]): the offsets delivered and not yet acked (*in flight*), each with its
//! delivery count and its deadline, and `next_fresh`, one past the highest offset delivered.
//! Every offset in `cursor..next_fresh` is either in flight or acked, so the acked ones need
//! no list of their own, and memory is bounded by the in-flight limit.
//!
//! The rules, checked the same way at admission (with a reason) and at apply:
//! - [`Command::Deliver`] names offsets in ascending order; each one that is in flight and
//!   *due* at the batch's time (its deadline passed, see below), or that is the next fresh
//!   offset (below the queue's end, under the in-flight limit), gets its count incremented
//!   and the deadline `time_ms + ack_timeout_ms`. Any other offset is skipped, not refused:
//!   it means an ack, a commit or another delivery got there first; the answer lists what
//!   was delivered. The ack timeout is 1 ms to [`ACK_TIMEOUT_MS_MAX`].
//! - [`Command::Ack`]: an offset in flight is acked; one below the cursor or acked already is
//!   an idempotent success; one never delivered (at or past `next_fresh`, the queue's end
//!   included) refuses the whole command with `INVALID_ARGUMENT`. The cursor then moves to
//!   the first offset in flight, or to `next_fresh` if none is: over the acked prefix.
//! - [`Command::Nack`]: every offset must be in flight (`INVALID_ARGUMENT` otherwise: an
//!   offset acked or never delivered cannot be given back); each becomes due at
//!   `time_ms + delay_ms`, its count unchanged (0 to [`NACK_DELAY_MS_MAX`]).
//! - Each command names 1 to [`DELIVERY_OFFSETS_MAX`] offsets, strictly ascending, none 0.
//! - A cursor commit (a seek, or a cursor-mode consumer) that moves the cursor forward drops
//!   the tracking below it (those offsets count as done); one that moves it back (a replay)
//!   drops every offset in flight and delivers again from the new cursor, counts from 1.
//!
//! **Due.** An in-flight offset is due at a batch time `t` if its deadline is at or before
//! `t`, or more than [`NACK_DELAY_MS_MAX`] after it: no deadline is ever set further ahead
//! than that by a clock close to `t`, so such a deadline was stamped by a master whose clock
//! ran far ahead, and waiting for it would hold the message back for as long. Deadlines are
//! times of the proposing master's clock carried in the log, so they survive a master
//! change; a new master whose clock is behind the old one's by `d` redelivers up to `d` late
//! (never early, never more than a week late), one ahead by `d` up to `d` early, once (the
//! redelivery's deadline is stamped by its own clock). The master selects with the same
//! clock it stamps the batch with, so a selection is not undone at apply.
//!
//! Offsets a retention cap released before they were acked are skipped: the master commits
//! the cursor to the oldest retained offset in the entry of its next `Deliver`
//! ([`GroupMachine::released_below`]); replicas may hold different oldest offsets (each
//! compacts on its own), so only the master's selection looks at them, never apply.
//!
//! A `Deliver` that may put more offsets in flight than the group's share of the snapshot
//! budget allows is refused whole (`STATE_BUDGET_EXCEEDED`, see the `budget` module); a
//! redelivery adds nothing, so due offsets are never refused for it.
//!
//! The in-flight limit of a (topic, consumer group) is its `max_in_flight` setting, else
//! [`IN_FLIGHT_TRACKED_DEFAULT`], never above [`IN_FLIGHT_TRACKED_MAX`]; it bounds fresh
//! deliveries only (a redelivery adds nothing).

use std::collections::BTreeMap;

use phxq_types::{
    ACK_TIMEOUT_MS_MAX, DELIVERY_OFFSETS_MAX, ErrorCode, IN_FLIGHT_TRACKED_DEFAULT,
    IN_FLIGHT_TRACKED_MAX, NACK_DELAY_MS_MAX, Offset, QueueId,
};

use super::budget::fresh_at_most;
use super::{Applied, GroupMachine};
use crate::{Command, TopicConfig};

/// An offset delivered and not yet acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// How many times it has been delivered (1 the first time).
    pub delivery_count: u32,
    /// When it is due again, in the masters' clock (ms since the Unix epoch).
    pub deadline_ms: u64,
}

/// One offset a [`Command::Deliver`] delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The offset.
    pub offset: Offset,
    /// Its delivery count now (1 the first time).
    pub delivery_count: u32,
    /// When it is due again unless acked, ms since the Unix epoch.
    pub deadline_ms: u64,
}

/// A consumer group's per-message state on one queue (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Deliveries {
    /// Delivered, not acked, all in `cursor..next_fresh`.
    pub(super) in_flight: BTreeMap<Offset, InFlight>,
    /// One past the highest offset delivered since the cursor last moved back; at least the
    /// cursor.
    pub(super) next_fresh: Offset,
}

impl Deliveries {
    /// Nothing delivered above `cursor`.
    pub(super) fn at(cursor: Offset) -> Deliveries {
        Deliveries {
            in_flight: BTreeMap::new(),
            next_fresh: cursor,
        }
    }

    /// The cursor moved from `old` to `new` by a commit.
    pub(super) fn on_commit(&mut self, old: Offset, new: Offset) {
        if new >= old {
            self.in_flight = self.in_flight.split_off(&new);
            self.next_fresh = self.next_fresh.max(new);
        } else {
            *self = Deliveries::at(new);
        }
    }

    /// The cursor the acked prefix allows: the first offset in flight, or `next_fresh`.
    pub(super) fn cursor(&self) -> Offset {
        self.in_flight
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_fresh)
    }

    /// Panics unless the module doc's invariants hold for a group at `cursor` on a queue
    /// ending at `end` (`None`: a restored machine still replaying, whose consumer state is
    /// newer than its queues).
    pub(super) fn validate(&self, cursor: Offset, end: Option<Offset>) {
        assert!(self.next_fresh >= cursor, "next fresh below the cursor");
        if let Some(end) = end {
            assert!(self.next_fresh <= end, "delivered past the queue's end");
        }
        assert!(
            self.in_flight.len() <= IN_FLIGHT_TRACKED_MAX as usize,
            "in flight over the limit"
        );
        if let (Some(first), Some(last)) =
            (self.in_flight.keys().next(), self.in_flight.keys().last())
        {
            assert!(
                *first >= cursor && *last < self.next_fresh,
                "in flight outside cursor..next_fresh"
            );
        }
        assert!(
            self.in_flight.values().all(|f| f.delivery_count >= 1),
            "a delivery counts 1"
        );
    }
}

/// Whether an in-flight offset with this deadline is due at batch time `time_ms`.
pub fn is_due(deadline_ms: u64, time_ms: u64) -> bool {
    deadline_ms <= time_ms || deadline_ms - time_ms > NACK_DELAY_MS_MAX
}

/// The in-flight limit of `consumer_group` on `config`'s queues.
pub fn in_flight_limit(config: &TopicConfig, consumer_group: &str) -> u32 {
    config
        .group_settings
        .get(consumer_group)
        .and_then(|settings| settings.max_in_flight)
        .unwrap_or(IN_FLIGHT_TRACKED_DEFAULT)
        .min(IN_FLIGHT_TRACKED_MAX)
}

/// A refusal: its code and a reason for people.
type Refusal = (ErrorCode, String);

fn invalid(reason: String) -> Refusal {
    (ErrorCode::InvalidArgument, reason)
}

impl GroupMachine {
    /// Whether a `Deliver`, `Ack` or `Nack` may apply (the rules of the
    /// [module doc](self)); a refusal carries its code and a reason for people.
    pub fn check_delivery(&self, command: &Command) -> Result<(), Refusal> {
        let (consumer_group, topic, queue, offsets) = delivery_parts(command);
        let (topic_position, slot) = self.slot(topic, queue).map_err(|code| {
            (
                code,
                format!(
                    "queue {queue} of topic {topic:?} is not served by {}",
                    self.group
                ),
            )
        })?;
        let member = self.member(topic_position, consumer_group).ok_or_else(|| {
            (
                ErrorCode::UnknownConsumerGroup,
                format!("consumer group {consumer_group:?} does not read topic {topic:?}"),
            )
        })?;
        if offsets.is_empty() || offsets.len() > DELIVERY_OFFSETS_MAX {
            return Err(invalid(format!(
                "{} offsets; name 1 to {DELIVERY_OFFSETS_MAX}",
                offsets.len()
            )));
        }
        if offsets[0] == 0 || offsets.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(invalid(
                "offsets start at 1 and must be strictly ascending".to_string(),
            ));
        }
        let queue_state = &self.topics[topic_position].queues[slot];
        let cursor = queue_state.cursors[member];
        let deliveries = &queue_state.deliveries[member];
        match command {
            Command::Deliver { ack_timeout_ms, .. } => {
                if !(1..=ACK_TIMEOUT_MS_MAX).contains(ack_timeout_ms) {
                    return Err(invalid(format!(
                        "ack timeout {ack_timeout_ms} ms; it must be 1 to {ACK_TIMEOUT_MS_MAX} ms"
                    )));
                }
                let config = &self.topics[topic_position].config;
                let fresh = fresh_at_most(
                    offsets,
                    deliveries.next_fresh,
                    queue_state.next_offset,
                    deliveries.in_flight.len(),
                    in_flight_limit(config, consumer_group) as usize,
                );
                self.check_in_flight_budget(fresh)?;
            }
            Command::Ack { .. } => {
                if let Some(&offset) = offsets.iter().find(|&&o| o >= deliveries.next_fresh) {
                    return Err(invalid(format!(
                        "offset {offset} was not delivered to {consumer_group:?} (the next \
                         offset to deliver is {}, the queue ends at {})",
                        deliveries.next_fresh, queue_state.next_offset
                    )));
                }
            }
            Command::Nack { delay_ms, .. } => {
                if *delay_ms > NACK_DELAY_MS_MAX {
                    return Err(invalid(format!(
                        "nack delay {delay_ms} ms; at most {NACK_DELAY_MS_MAX} ms (a week)"
                    )));
                }
                let not_in_flight = offsets
                    .iter()
                    .find(|o| !deliveries.in_flight.contains_key(o));
                if let Some(offset) = not_in_flight {
                    let why = if *offset < deliveries.next_fresh {
                        format!("acked already (the cursor is at {cursor})")
                    } else {
                        "never delivered".to_string()
                    };
                    return Err(invalid(format!(
                        "offset {offset} is not in flight for {consumer_group:?}: {why}"
                    )));
                }
            }
            other => panic!("not a delivery command: {other:?}"),
        }
        Ok(())
    }

    /// The offsets a `Deliver` for `consumer_group` would deliver at batch time `now_ms`, at
    /// most `count_max`, ascending: the due offsets in flight, then fresh ones from the highest
    /// delivered upward, under the in-flight limit and below the queue's end. Offsets this
    /// replica no longer holds (a retention cap released them) are left out: see
    /// [`GroupMachine::released_below`]. `None` if the queue is not hosted here or the group
    /// does not read it.
    pub fn deliverable(
        &self,
        consumer_group: &str,
        topic: &str,
        queue: QueueId,
        now_ms: u64,
        count_max: usize,
    ) -> Option<Vec<Offset>> {
        let (topic_position, slot) = self.slot(topic, queue).ok()?;
        let member = self.member(topic_position, consumer_group)?;
        let config = &self.topics[topic_position].config;
        let queue_state = &self.topics[topic_position].queues[slot];
        let deliveries = &queue_state.deliveries[member];
        let held = deliveries.in_flight.range(queue_state.oldest_offset..);
        let count_max = count_max.min(DELIVERY_OFFSETS_MAX);
        let mut offsets: Vec<Offset> = held
            .clone()
            .filter(|(_, flight)| is_due(flight.deadline_ms, now_ms))
            .map(|(&offset, _)| offset)
            .take(count_max)
            .collect();
        let room = (in_flight_limit(config, consumer_group) as usize)
            .saturating_sub(held.count())
            .min(count_max - offsets.len());
        let fresh = deliveries.next_fresh.max(queue_state.oldest_offset);
        let fresh_end = queue_state
            .next_offset
            .min(fresh.saturating_add(room as u64));
        offsets.extend(fresh..fresh_end);
        Some(offsets)
    }

    /// The oldest offset this replica holds of a queue, if the consumer group's cursor is
    /// below it: a retention cap (max age or bytes) released messages the group had not acked.
    /// The master then commits the cursor there in the entry of its next `Deliver` (a commit
    /// forward drops the tracking below it), so those offsets are skipped and hold nothing
    /// back.
    pub fn released_below(
        &self,
        consumer_group: &str,
        topic: &str,
        queue: QueueId,
    ) -> Option<Offset> {
        let (topic_position, slot) = self.slot(topic, queue).ok()?;
        let member = self.member(topic_position, consumer_group)?;
        let queue_state = &self.topics[topic_position].queues[slot];
        (queue_state.cursors[member] < queue_state.oldest_offset)
            .then_some(queue_state.oldest_offset)
    }

    /// A consumer group's in-flight offsets on a queue, in order (for status and tests).
    pub fn in_flight(
        &self,
        consumer_group: &str,
        topic: &str,
        queue: QueueId,
    ) -> Option<Vec<(Offset, InFlight)>> {
        let (topic_position, slot) = self.slot(topic, queue).ok()?;
        let member = self.member(topic_position, consumer_group)?;
        let deliveries = &self.topics[topic_position].queues[slot].deliveries[member];
        Some(deliveries.in_flight.iter().map(|(&o, &f)| (o, f)).collect())
    }

    /// Applies a checked `Deliver`, `Ack` or `Nack` at batch time `time_ms`.
    pub(super) fn apply_delivery(&mut self, time_ms: u64, command: &Command) -> Applied {
        let (consumer_group, topic, queue, offsets) = delivery_parts(command);
        let (topic_position, slot) = self.slot(topic, queue).expect("checked");
        let member = self
            .member(topic_position, consumer_group)
            .expect("checked");
        let limit = in_flight_limit(&self.topics[topic_position].config, consumer_group) as usize;
        let queue_state = &mut self.topics[topic_position].queues[slot];
        let end = queue_state.next_offset;
        let cursor = &mut queue_state.cursors[member];
        let deliveries = &mut queue_state.deliveries[member];
        let in_flight_before = deliveries.in_flight.len() as i64;
        let applied = match command {
            Command::Deliver { ack_timeout_ms, .. } => {
                let deadline_ms = time_ms.saturating_add(*ack_timeout_ms);
                let mut delivered = Vec::new();
                for &offset in offsets {
                    let room = deliveries.in_flight.len() < limit;
                    let delivery_count = match deliveries.in_flight.get_mut(&offset) {
                        Some(flight) if is_due(flight.deadline_ms, time_ms) => {
                            flight.delivery_count = flight.delivery_count.saturating_add(1);
                            flight.deadline_ms = deadline_ms;
                            flight.delivery_count
                        }
                        None if offset == deliveries.next_fresh && offset < end && room => {
                            let flight = InFlight {
                                delivery_count: 1,
                                deadline_ms,
                            };
                            deliveries.in_flight.insert(offset, flight);
                            deliveries.next_fresh += 1;
                            1
                        }
                        _ => continue,
                    };
                    delivered.push(Delivery {
                        offset,
                        delivery_count,
                        deadline_ms,
                    });
                }
                Applied::Delivered {
                    deliveries: delivered,
                }
            }
            Command::Ack { .. } => {
                for offset in offsets {
                    deliveries.in_flight.remove(offset);
                }
                let advanced = deliveries.cursor();
                assert!(advanced >= *cursor, "acks never move a cursor back");
                *cursor = advanced;
                Applied::Acked { cursor: advanced }
            }
            Command::Nack { delay_ms, .. } => {
                let deadline_ms = time_ms.saturating_add(*delay_ms);
                for offset in offsets {
                    deliveries
                        .in_flight
                        .get_mut(offset)
                        .expect("checked")
                        .deadline_ms = deadline_ms;
                }
                Applied::Nacked
            }
            other => panic!("not a delivery command: {other:?}"),
        };
        let in_flight = deliveries.in_flight.len() as i64 - in_flight_before;
        self.count_change(0, in_flight);
        applied
    }
}

/// The consumer group, topic, queue and offsets of a delivery command.
fn delivery_parts(command: &Command) -> (&str, &str, QueueId, &[Offset]) {
    match command {
        Command::Deliver {
            consumer_group,
            topic,
            queue,
            offsets,
            ..
        }
        | Command::Ack {
            consumer_group,
            topic,
            queue,
            offsets,
        }
        | Command::Nack {
            consumer_group,
            topic,
            queue,
            offsets,
            ..
        } => (consumer_group, topic, *queue, offsets),
        other => panic!("not a delivery command: {other:?}"),
    }
}
