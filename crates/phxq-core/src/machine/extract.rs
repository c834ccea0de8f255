//! Reading a queue's messages back out of one raft entry's payload.
//!
//! Offsets are not stored in the log: they are given out when the entry is applied, so
//! reading must walk the batch exactly as applying did. Applying refuses some enqueues of a
//! hosted queue, and a refused enqueue takes no offsets:
//! - an enqueue with no messages (it would take none anyway);
//! - one with a key over [`KEY_BYTES_MAX`] or a message id over [`MESSAGE_ID_BYTES_MAX`]
//!   (constants: easy to redo here);
//! - one with a value over the layout's `message_bytes_max`, which this function does not
//!   know. But the entry reference says how many messages applying accepted, and the
//!   accepted enqueues are exactly those whose largest value is at or under the limit; so
//!   the only limit consistent with that count tells which enqueues took offsets;
//! - none is refused for being a duplicate (its message id was in the dedup window), but it
//!   takes no offsets either: the entry reference lists those ([`EntryRef::skipped`]).

use phxq_types::{KEY_BYTES_MAX, MESSAGE_ID_BYTES_MAX, Offset, QueueId};

use super::queue::message_bytes;
use super::{EntryRef, StoredMessage};
use crate::{Batch, Command, DecodeError, Message, decode_batch};

/// Limits on what one extraction returns.
pub(super) struct Limits {
    /// Messages at offsets below this are skipped.
    pub(super) from: Offset,
    /// At most this many messages.
    pub(super) count_max: u64,
    /// At most this many bytes of keys and values, but always one message if there is one.
    pub(super) bytes_max: u64,
}

/// The messages of `topic`/`queue` in the entry `entry` refers to, within `limits`.
pub(super) fn extract(
    entry: &EntryRef,
    data: &[u8],
    topic: &str,
    queue: QueueId,
    limits: &Limits,
) -> Result<Vec<StoredMessage>, DecodeError> {
    let batch = decode_batch(data)?;
    let accepted = accepted_enqueues(&batch, topic, queue, entry)?;
    let time_ms = batch.time_ms;
    let messages = batch
        .commands
        .into_iter()
        .zip(accepted)
        .filter_map(|(command, accepted)| match command {
            Command::Enqueue { messages, .. } if accepted => Some(messages),
            _ => None,
        })
        .flatten();
    let mut out = Vec::new();
    let mut bytes = 0;
    for (offset, message) in (entry.first_offset..).zip(messages) {
        if offset < limits.from {
            continue;
        }
        let size = message_bytes(&message);
        if out.len() as u64 >= limits.count_max
            || (!out.is_empty() && bytes + size > limits.bytes_max)
        {
            break;
        }
        bytes += size;
        out.push(StoredMessage {
            offset,
            time_ms,
            key: message.key,
            value: message.value,
        });
    }
    Ok(out)
}

/// An enqueue of the queue that applying may have accepted.
struct Candidate {
    /// Its position in the batch.
    position: usize,
    /// How many messages.
    count: u64,
    /// Its largest value, in bytes.
    largest_value: usize,
}

/// For each command of the batch, whether it is an enqueue of `topic`/`queue` that applying
/// accepted and appended, given that those hold `entry.count` messages and that the
/// duplicates at `entry.skipped` took none.
fn accepted_enqueues(
    batch: &Batch,
    topic: &str,
    queue: QueueId,
    entry: &EntryRef,
) -> Result<Vec<bool>, DecodeError> {
    let count = entry.count;
    let candidates: Vec<Candidate> = batch
        .commands
        .iter()
        .enumerate()
        .filter(|(position, _)| !entry.skipped.iter().any(|&p| p as usize == *position))
        .filter_map(|(position, command)| candidate(position, command, topic, queue))
        .collect();
    let mut accepted = vec![false; batch.commands.len()];
    if count == 0 {
        return Ok(accepted);
    }
    let value_bytes_max = value_limit_giving(&candidates, count).ok_or_else(|| {
        DecodeError::Invalid(format!(
            "entry holds no {count} accepted messages of {topic}/{queue}"
        ))
    })?;
    for candidate in candidates {
        accepted[candidate.position] = candidate.largest_value <= value_bytes_max;
    }
    Ok(accepted)
}

fn candidate(position: usize, command: &Command, topic: &str, queue: QueueId) -> Option<Candidate> {
    match command {
        Command::Enqueue {
            topic: command_topic,
            queue: command_queue,
            message_id,
            messages,
        } if command_topic == topic
            && *command_queue == queue
            && !messages.is_empty()
            && message_id.len() <= MESSAGE_ID_BYTES_MAX
            && messages.iter().all(|m| m.key.len() <= KEY_BYTES_MAX) =>
        {
            Some(Candidate {
                position,
                count: messages.len() as u64,
                largest_value: messages.iter().map(|m: &Message| m.value.len()).max()?,
            })
        }
        _ => None,
    }
}

/// A value-size limit under which the candidates accepted hold exactly `count` messages (all
/// such limits accept the same candidates), if there is one.
fn value_limit_giving(candidates: &[Candidate], count: u64) -> Option<usize> {
    let mut by_largest: Vec<(usize, u64)> = candidates
        .iter()
        .map(|c| (c.largest_value, c.count))
        .collect();
    by_largest.sort_unstable();
    let mut accepted_count = 0;
    for (position, &(largest_value, messages)) in by_largest.iter().enumerate() {
        accepted_count += messages;
        let last_of_its_size = by_largest
            .get(position + 1)
            .is_none_or(|&(next, _)| next != largest_value);
        if last_of_its_size && accepted_count == count {
            return Some(largest_value);
        }
    }
    None
}
