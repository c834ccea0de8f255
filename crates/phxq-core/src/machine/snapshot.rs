//! The snapshot encoding: what a restored machine needs to replay the log after the
//! snapshot's index.
//!
//! ```text
//! snapshot = version(1) group:varint applied_index:varint topic_count:varint topic*
//! topic    = name:bytes queue_count:varint queue*
//! queue    = queue:varint next_offset:varint cursor_count:varint cursor*
//! cursor   = consumer_group:bytes offset:varint
//! ```
//!
//! Messages are not in it: every message at or below the snapshot's index is forgotten, so a
//! queue is only its next offset (which is also its oldest retained offset) and its cursors.
//! Cursors are the newest ones, not those as of the index: a commit sets an absolute value,
//! so replaying older commits and then the newer ones ends in the same place.

use std::collections::BTreeSet;

use phxq_types::GroupId;

use super::GroupMachine;
use super::queue::QueueState;
use crate::DecodeError;
use crate::codec::{Reader, put_bytes, put_varint};

/// The format version this build writes (and the only one it reads).
const FORMAT_VERSION: u8 = 1;

/// Encodes `machine`'s state as of `index`, with everything at or below `index` forgotten.
pub(super) fn encode(machine: &GroupMachine, index: u64) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_varint(&mut out, machine.group.0);
    put_varint(&mut out, index);
    put_varint(&mut out, machine.topics.len() as u64);
    for (config, topic) in machine.layout.topics.iter().zip(&machine.topics) {
        put_bytes(&mut out, config.name.as_bytes());
        put_varint(&mut out, topic.queues.len() as u64);
        for (slot, queue) in topic.queues.iter().enumerate() {
            put_varint(&mut out, u64::from(machine.queue_of_slot(slot)));
            put_varint(&mut out, queue.next_offset_after(index));
            put_varint(&mut out, queue.cursors.len() as u64);
            for (name, &cursor) in config.consumer_groups.iter().zip(&queue.cursors) {
                put_bytes(&mut out, name.as_bytes());
                put_varint(&mut out, cursor);
            }
        }
    }
    out
}

/// Fills the empty `machine` from `snapshot`. Queues the snapshot does not mention stay empty
/// (a topic added since); names the layout does not know are an error.
pub(super) fn decode_into(machine: &mut GroupMachine, snapshot: &[u8]) -> Result<(), DecodeError> {
    let mut reader = Reader::new(snapshot);
    let version = reader.u8("version")?;
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "snapshot format version {version}; this build reads {FORMAT_VERSION}"
        )));
    }
    let group = GroupId(reader.varint("group")?);
    if group != machine.group {
        return Err(invalid(format!(
            "snapshot of {group} offered to {}",
            machine.group
        )));
    }
    machine.applied_index = reader.varint("applied index")?;
    let mut seen = Seen::default();
    for _ in 0..reader.count("topic count")? {
        decode_topic(machine, &mut reader, &mut seen)?;
    }
    reader.finish("snapshot")
}

/// What the snapshot already set, so that nothing is set twice.
#[derive(Default)]
struct Seen {
    queues: BTreeSet<(usize, usize)>,
}

fn decode_topic(
    machine: &mut GroupMachine,
    reader: &mut Reader<'_>,
    seen: &mut Seen,
) -> Result<(), DecodeError> {
    let name = reader.string("topic")?;
    for _ in 0..reader.count("queue count")? {
        let queue = reader.varint_u32("queue")?;
        let (topic, slot) = machine
            .slot(&name, queue)
            .map_err(|code| invalid(format!("queue {name}/{queue}: {code}")))?;
        if !seen.queues.insert((topic, slot)) {
            return Err(invalid(format!("queue {name}/{queue} appears twice")));
        }
        let state = decode_queue(machine, topic, reader)?;
        machine.topics[topic].queues[slot] = state;
    }
    Ok(())
}

fn decode_queue(
    machine: &GroupMachine,
    topic: usize,
    reader: &mut Reader<'_>,
) -> Result<QueueState, DecodeError> {
    let next_offset = reader.varint("next offset")?;
    if next_offset == 0 {
        return Err(invalid("next offset 0".to_string()));
    }
    let config = &machine.layout.topics[topic];
    let mut cursors = vec![None; config.consumer_groups.len()];
    for _ in 0..reader.count("cursor count")? {
        let name = reader.string("consumer group")?;
        let offset = reader.varint("cursor")?;
        let member = machine.member(topic, &name).ok_or_else(|| {
            invalid(format!(
                "consumer group {name:?} does not read {}",
                config.name
            ))
        })?;
        if offset == 0 || cursors[member].replace(offset).is_some() {
            return Err(invalid(format!("bad or repeated cursor of {name:?}")));
        }
    }
    let cursors = cursors.into_iter().map(|c| c.unwrap_or(1)).collect();
    Ok(QueueState::restored(next_offset, cursors))
}

fn invalid(message: String) -> DecodeError {
    DecodeError::Invalid(message)
}
