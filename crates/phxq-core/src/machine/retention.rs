//! Which of a queue's entries the log must still keep.
//!
//! A message is *needed* when it is unconsumed by some subscribed consumer group or inside
//! the replay window behind the slowest one (the last `replay_count` offsets before its
//! cursor, or younger than `replay_age_ms`), *unless* a cap releases it: older than
//! `max_age_ms`, or among the oldest messages beyond `max_bytes` of the queue.
//!
//! The log is deleted by whole entries, so all of this is decided per run (a queue's
//! messages in one entry, which share one enqueue time). The byte cap releases a run only
//! when the newer runs alone already hold `max_bytes`: a run straddling the cap is kept.

use phxq_types::Offset;

use super::queue::{QueueState, Run};
use crate::Retention;

/// A queue's retention rules, resolved against its cursors and the time.
struct Window {
    /// Offsets at or above this are unconsumed or in the replay window by count.
    keep_from_offset: Offset,
    /// Runs stamped at or after this are in the replay window by age.
    keep_since_ms: u64,
    /// Runs stamped before this are released by the age cap.
    release_before_ms: Option<u64>,
    /// Runs whose newer runs hold at least this many bytes are released by the size cap.
    bytes_max: Option<u64>,
}

impl Window {
    fn new(queue: &QueueState, retention: &Retention, now_ms: u64) -> Window {
        // With no consumer group, nothing is unconsumed: only the replay window holds data.
        let slowest_cursor = queue
            .cursors
            .iter()
            .copied()
            .min()
            .unwrap_or(queue.next_offset)
            .min(queue.next_offset);
        Window {
            keep_from_offset: slowest_cursor.saturating_sub(retention.replay_count),
            keep_since_ms: now_ms.saturating_sub(retention.replay_age_ms),
            release_before_ms: retention.max_age_ms.map(|age| now_ms.saturating_sub(age)),
            bytes_max: retention.max_bytes,
        }
    }

    /// Whether the log must keep `run`, given the bytes of the queue's newer runs.
    fn needs(&self, run: &Run, newer_bytes: u64) -> bool {
        let kept = run.end_offset() > self.keep_from_offset || run.time_ms >= self.keep_since_ms;
        let released_by_age = self.release_before_ms.is_some_and(|t| run.time_ms < t);
        let released_by_size = self.bytes_max.is_some_and(|max| newer_bytes >= max);
        kept && !released_by_age && !released_by_size
    }
}

/// The raft index of the queue's oldest entry still needed, if any is.
pub(super) fn first_needed_index(
    queue: &QueueState,
    retention: &Retention,
    now_ms: u64,
) -> Option<u64> {
    let window = Window::new(queue, retention, now_ms);
    let mut newer_bytes = queue.retained_bytes;
    queue.runs.iter().find_map(|run| {
        newer_bytes -= run.bytes;
        window.needs(run, newer_bytes).then_some(run.index)
    })
}
