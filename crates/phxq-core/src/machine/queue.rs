//! One hosted queue: its offsets, the raft entries holding them, and its consumer groups'
//! cursors.
//!
//! Invariants (checked by [`QueueState::validate`]):
//! - the runs cover `oldest_offset..next_offset` exactly, in order, without gaps;
//! - run raft indexes strictly increase (one run per entry) and none is above the applied index;
//! - `retained_bytes` is the sum of the runs' bytes;
//! - each run's `time_max_ms` is the latest `time_ms` of it and the retained runs before it,
//!   so it never decreases along the runs (what [`QueueState::offset_for_time`] searches).
//!   Batch times usually grow with offsets, but not always: a new master's clock may be behind
//!   the old one's, or a clock may step back;
//! - `skipped` (the enqueues applying answered as duplicates, which took no offsets) are in
//!   raft index order, none above the applied index, and cover only entries the log holds;
//! - every cursor is at least 1. A cursor may stand above `next_offset` while a restored
//!   machine replays its log tail (the snapshot holds the cursors of its newest state).

use std::collections::VecDeque;

use phxq_types::Offset;

use super::dedup::DedupTable;
use super::delivery::Deliveries;
use super::{EntryRef, ReadPlan};
use crate::Message;

/// The messages of one queue held by one raft entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Run {
    /// The raft index of the entry.
    pub(super) index: u64,
    /// The offset of the queue's first message in the entry.
    pub(super) first_offset: Offset,
    /// How many of the queue's messages the entry holds (at least 1).
    pub(super) count: u64,
    /// The batch's time: the enqueue time of all these messages.
    pub(super) time_ms: u64,
    /// The latest `time_ms` of this run and of every retained run before it.
    pub(super) time_max_ms: u64,
    /// Bytes of keys and values of these messages.
    pub(super) bytes: u64,
}

impl Run {
    /// One past the run's last offset.
    pub(super) fn end_offset(&self) -> Offset {
        self.first_offset + self.count
    }

    fn entry_ref(&self, skipped: Vec<u32>) -> EntryRef {
        EntryRef {
            index: self.index,
            first_offset: self.first_offset,
            count: self.count,
            skipped,
        }
    }
}

/// A hosted queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct QueueState {
    /// The offset the next message gets.
    pub(super) next_offset: Offset,
    /// The oldest offset still held in the log (`next_offset` when none is).
    pub(super) oldest_offset: Offset,
    /// The entries holding `oldest_offset..next_offset`, oldest first.
    pub(super) runs: VecDeque<Run>,
    /// Bytes of keys and values in `runs`.
    pub(super) retained_bytes: u64,
    /// The next offset each consumer group of the topic reads, in the topic's order.
    pub(super) cursors: Vec<Offset>,
    /// Each consumer group's per-message deliveries above its cursor, in the topic's order.
    pub(super) deliveries: Vec<Deliveries>,
    /// The producer message ids in the dedup window.
    pub(super) dedup: DedupTable,
    /// `(raft index, command position)` of each enqueue of this queue that applying answered
    /// as a duplicate, oldest first: reading skips them (they took no offsets).
    pub(super) skipped: VecDeque<(u64, u32)>,
}

/// Bytes a message counts for, in retention and in dequeue limits.
pub(super) fn message_bytes(message: &Message) -> u64 {
    (message.key.len() + message.value.len()) as u64
}

impl QueueState {
    /// An empty queue read by `consumer_groups` groups, none of which has committed.
    pub(super) fn new(consumer_groups: usize) -> QueueState {
        QueueState::restored(1, vec![1; consumer_groups])
    }

    /// A queue whose messages before `next_offset` are all forgotten, nothing delivered above
    /// its cursors.
    pub(super) fn restored(next_offset: Offset, cursors: Vec<Offset>) -> QueueState {
        let deliveries = cursors.iter().map(|&c| Deliveries::at(c)).collect();
        QueueState {
            deliveries,
            next_offset,
            oldest_offset: next_offset,
            runs: VecDeque::new(),
            retained_bytes: 0,
            cursors,
            dedup: DedupTable::default(),
            skipped: VecDeque::new(),
        }
    }

    /// Notes that command `position` of entry `index` was a duplicate and took no offsets.
    pub(super) fn skip(&mut self, index: u64, position: usize) {
        let position = u32::try_from(position).expect("batches hold far fewer commands");
        assert!(
            self.skipped.back().is_none_or(|&(last, _)| last <= index),
            "entries apply in order"
        );
        self.skipped.push_back((index, position));
    }

    /// The positions of the duplicates skipped in entry `index`.
    fn skipped_in(&self, index: u64) -> Vec<u32> {
        let first = self.skipped.partition_point(|&(at, _)| at < index);
        (self.skipped.range(first..))
            .take_while(|&&(at, _)| at == index)
            .map(|&(_, position)| position)
            .collect()
    }

    /// Gives `messages` (at least one) the next offsets, held by entry `index`; returns the
    /// first. Messages of several commands of one entry join that entry's run.
    pub(super) fn append(&mut self, index: u64, time_ms: u64, messages: &[Message]) -> Offset {
        assert!(!messages.is_empty(), "an accepted enqueue has messages");
        let first_offset = self.next_offset;
        let count = messages.len() as u64;
        let bytes: u64 = messages.iter().map(message_bytes).sum();
        match self.runs.back_mut() {
            Some(run) if run.index == index => {
                debug_assert_eq!(run.time_ms, time_ms, "one entry, one batch time");
                run.count += count;
                run.bytes += bytes;
            }
            last => {
                assert!(
                    last.as_ref().is_none_or(|run| run.index < index),
                    "entries apply in order"
                );
                let time_max_ms = last.map_or(time_ms, |run| run.time_max_ms.max(time_ms));
                self.runs.push_back(Run {
                    index,
                    first_offset,
                    count,
                    time_ms,
                    time_max_ms,
                    bytes,
                });
            }
        }
        self.next_offset += count;
        self.retained_bytes += bytes;
        first_offset
    }

    /// The entries holding up to `count_max` messages from `from` (or from the oldest retained
    /// offset, if `from` is gone).
    pub(super) fn plan(&self, from: Offset, count_max: u64) -> ReadPlan {
        let start = from.max(self.oldest_offset);
        let limit = start.saturating_add(count_max).min(self.next_offset);
        let entries = if start < limit {
            let first = self.runs.partition_point(|run| run.end_offset() <= start);
            (self.runs.range(first..))
                .take_while(|run| run.first_offset < limit)
                .map(|run| run.entry_ref(self.skipped_in(run.index)))
                .collect()
        } else {
            Vec::new()
        };
        ReadPlan {
            start,
            entries,
            end: self.next_offset,
        }
    }

    /// The offset of the first retained message stamped at or after `time_ms`: the oldest
    /// retained offset when every retained message is, `next_offset` when none is (or nothing
    /// is retained). Batch times may step back (see the module doc), so a later message may
    /// still be older than `time_ms`; the answer is the first that is not. O(log runs).
    pub(super) fn offset_for_time(&self, time_ms: u64) -> Offset {
        // The first run whose `time_max_ms` reaches `time_ms` is the first whose own time
        // does: the running maximum only rises at a run that sets it.
        let first = self.runs.partition_point(|run| run.time_max_ms < time_ms);
        self.runs
            .get(first)
            .map_or(self.next_offset, |run| run.first_offset)
    }

    /// Drops the runs of entries at or below `index`.
    pub(super) fn forget_through(&mut self, index: u64) {
        let mut dropped = false;
        while let Some(run) = self.runs.front() {
            if run.index > index {
                break;
            }
            self.retained_bytes -= run.bytes;
            self.runs.pop_front();
            dropped = true;
        }
        while self.skipped.front().is_some_and(|&(at, _)| at <= index) {
            self.skipped.pop_front();
        }
        self.dedup.forget_through(index);
        self.oldest_offset = self.next_offset_after(index);
        if dropped {
            self.recompute_time_max();
        }
    }

    /// Restores `time_max_ms` over the retained runs after older runs were dropped (one of
    /// them may have held the maximum). Once a run's value is unchanged, so is every later
    /// one's: with times that never step back, this looks at one run.
    fn recompute_time_max(&mut self) {
        let mut latest = 0;
        for run in &mut self.runs {
            let time_max_ms = latest.max(run.time_ms);
            if run.time_max_ms == time_max_ms {
                break;
            }
            run.time_max_ms = time_max_ms;
            latest = time_max_ms;
        }
    }

    /// The queue's next offset right after entry `index` was applied, if that is still known
    /// (the oldest retained offset otherwise).
    pub(super) fn next_offset_after(&self, index: u64) -> Offset {
        let first_later = self.runs.partition_point(|run| run.index <= index);
        self.runs
            .get(first_later)
            .map_or(self.next_offset, |run| run.first_offset)
    }

    /// Panics if an invariant of the module doc does not hold.
    pub(super) fn validate(
        &self,
        applied_index: u64,
        consumer_groups: usize,
        consumer_state_current: bool,
    ) {
        assert!(self.oldest_offset >= 1, "offsets start at 1");
        let mut offset = self.oldest_offset;
        let mut previous_index = 0;
        let mut bytes = 0;
        let mut time_max_ms = 0;
        for run in &self.runs {
            assert!(run.count >= 1, "empty run {run:?}");
            assert_eq!(run.first_offset, offset, "runs leave a gap or overlap");
            assert!(run.index > previous_index, "run indexes must increase");
            assert!(run.index <= applied_index, "run above the applied index");
            time_max_ms = time_max_ms.max(run.time_ms);
            assert_eq!(run.time_max_ms, time_max_ms, "running time maximum {run:?}");
            offset = run.end_offset();
            previous_index = run.index;
            bytes += run.bytes;
        }
        assert_eq!(offset, self.next_offset, "runs must end at next_offset");
        assert_eq!(bytes, self.retained_bytes, "retained bytes out of step");
        assert_eq!(self.cursors.len(), consumer_groups, "one cursor per group");
        assert!(self.cursors.iter().all(|&c| c >= 1), "cursors start at 1");
        assert_eq!(
            self.deliveries.len(),
            consumer_groups,
            "one delivery state per group"
        );
        let end = consumer_state_current.then_some(self.next_offset);
        for (deliveries, &cursor) in self.deliveries.iter().zip(&self.cursors) {
            deliveries.validate(cursor, end);
        }
        assert!(
            (self.skipped.iter().zip(self.skipped.iter().skip(1))).all(|(a, b)| a.0 <= b.0),
            "skipped duplicates out of order"
        );
        assert!(
            self.skipped
                .back()
                .is_none_or(|&(at, _)| at <= applied_index),
            "skipped duplicate above the applied index"
        );
        self.dedup.validate(applied_index);
    }
}
