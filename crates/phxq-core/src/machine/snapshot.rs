//! The snapshot encoding: what a restored machine needs to replay the log after the
//! snapshot's index.
//!
//! ```text
//! snapshot = version(1) group:varint applied_index:varint [state_index:varint (version 4)]
//!            topic_count:varint topic*
//! topic    = name:bytes queue_count:varint queue*                     (versions 1 and 2)
//!          | topic_config queue_count:varint queue*                   (versions 3 and 4)
//! queue    = queue:varint next_offset:varint cursor_count:varint cursor*
//!            record_count:varint record*                      (record_count: version 2 on)
//! cursor   = consumer_group:bytes offset:varint [deliveries (version 4)]
//! deliveries = next_fresh:varint in_flight_count:varint
//!              (offset:varint delivery_count:varint deadline_ms:varint)*   (ascending offsets)
//! record   = message_id:bytes index:varint first_offset:varint count:varint
//! ```
//!
//! `topic_config` is the command encoding's (`crate::command`). Version 3 carries the whole
//! topic table: a restored machine's table is the snapshot's, whatever the layout's bootstrap
//! topics say. The table is the machine's current one, which is the table as of the index
//! because a snapshot is never taken below the last topic change
//! ([`GroupMachine::deletable_index`]).
//!
//! Versions 1 (before message ids: empty dedup windows), 2 (before topic tables: the
//! layout's topics) and 3 (before per-message deliveries: nothing in flight, `state_index` the
//! snapshot's index) are still read.
//!
//! Messages are not in it: every message at or below the snapshot's index is forgotten, so a
//! queue is only its next offset (which is also its oldest retained offset) and its cursors.
//! Cursors and deliveries are the newest ones, not those as of the index: they are as of
//! `state_index`, the machine's applied index when it was encoded (version 4), and the
//! restored machine leaves them alone while it replays entries up to there (a delivery
//! increments a count, so replaying it on the newer state would count it twice). Versions
//! 1 to 3 held cursors only, which commits set to absolute values, so replaying them ended in
//! the same place. The dedup
//! window, unlike cursors, is the one as of the index (oldest id first): a replayed enqueue
//! must meet the window it met when first applied.

use std::collections::BTreeSet;

use phxq_types::{GroupId, IN_FLIGHT_TRACKED_MAX, MESSAGE_ID_BYTES_MAX, Offset};

use super::dedup::Original;
use super::delivery::{Deliveries, InFlight};
use super::queue::QueueState;
use super::{GroupMachine, TopicState};
use crate::DecodeError;
use crate::codec::{Reader, put_bytes, put_varint};
use crate::command::{put_topic_config, read_topic_config};

/// The format version this build writes.
const FORMAT_VERSION: u8 = 4;
/// The version before per-message deliveries, still read.
const FORMAT_VERSION_NO_DELIVERIES: u8 = 3;
/// The version before topic tables, still read.
const FORMAT_VERSION_NO_TOPICS: u8 = 2;
/// The version before dedup windows, still read.
const FORMAT_VERSION_NO_DEDUP: u8 = 1;

/// Encodes `machine`'s state as of `index`, with everything at or below `index` forgotten.
pub(super) fn encode(machine: &GroupMachine, index: u64) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_varint(&mut out, machine.group.0);
    put_varint(&mut out, index);
    put_varint(&mut out, machine.applied_index);
    put_varint(&mut out, machine.topics.len() as u64);
    for topic in &machine.topics {
        let config = &topic.config;
        put_topic_config(&mut out, config);
        put_varint(&mut out, topic.queues.len() as u64);
        for (slot, queue) in topic.queues.iter().enumerate() {
            put_varint(&mut out, u64::from(machine.queue_of_slot(slot)));
            put_varint(&mut out, queue.next_offset_after(index));
            put_varint(&mut out, queue.cursors.len() as u64);
            let groups = config.consumer_groups.iter().zip(&queue.cursors);
            for ((name, &cursor), deliveries) in groups.zip(&queue.deliveries) {
                put_bytes(&mut out, name.as_bytes());
                put_varint(&mut out, cursor);
                put_varint(&mut out, deliveries.next_fresh);
                put_varint(&mut out, deliveries.in_flight.len() as u64);
                for (&offset, flight) in &deliveries.in_flight {
                    put_varint(&mut out, offset);
                    put_varint(&mut out, u64::from(flight.delivery_count));
                    put_varint(&mut out, flight.deadline_ms);
                }
            }
            let records: Vec<_> = queue.dedup.as_of(index).collect();
            put_varint(&mut out, records.len() as u64);
            for record in records {
                put_bytes(&mut out, &record.id);
                put_varint(&mut out, record.index);
                put_varint(&mut out, record.original.first_offset);
                put_varint(&mut out, record.original.count);
            }
        }
    }
    out
}

/// Fills the empty `machine` from `snapshot`. Version 3 replaces the machine's topic table
/// with the snapshot's (an invalid or repeated topic is an error). Versions 1 and 2 keep the
/// layout's: queues the snapshot does not mention stay empty (a topic added since), names the
/// layout does not know are an error.
pub(super) fn decode_into(machine: &mut GroupMachine, snapshot: &[u8]) -> Result<(), DecodeError> {
    let mut reader = Reader::new(snapshot);
    let version = reader.u8("version")?;
    if ![
        FORMAT_VERSION,
        FORMAT_VERSION_NO_DELIVERIES,
        FORMAT_VERSION_NO_TOPICS,
        FORMAT_VERSION_NO_DEDUP,
    ]
    .contains(&version)
    {
        return Err(invalid(format!(
            "snapshot format version {version}; this build reads versions \
             {FORMAT_VERSION_NO_DEDUP} to {FORMAT_VERSION}"
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
    machine.consumer_state_index = machine.applied_index;
    if version >= FORMAT_VERSION {
        machine.consumer_state_index = reader.varint("state index")?;
        if machine.consumer_state_index < machine.applied_index {
            return Err(invalid(format!(
                "state index {} below the snapshot's index {}",
                machine.consumer_state_index, machine.applied_index
            )));
        }
    }
    let mut seen = Seen {
        dedup: version >= FORMAT_VERSION_NO_TOPICS,
        deliveries: version >= FORMAT_VERSION,
        ..Seen::default()
    };
    let with_table = version >= FORMAT_VERSION_NO_DELIVERIES;
    if with_table {
        machine.topics.clear();
    }
    for _ in 0..reader.count("topic count")? {
        let name = if with_table {
            decode_topic_config(machine, &mut reader)?
        } else {
            reader.string("topic")?
        };
        decode_topic(machine, name, &mut reader, &mut seen)?;
    }
    reader.finish("snapshot")
}

/// Reads a topic's configuration and adds the topic to the table, empty; returns its name.
fn decode_topic_config(
    machine: &mut GroupMachine,
    reader: &mut Reader<'_>,
) -> Result<String, DecodeError> {
    let config = read_topic_config(reader)?;
    if let Err((_, reason)) = config.check() {
        return Err(invalid(format!("topic in snapshot: {reason}")));
    }
    if machine.topic(&config.name).is_some() || machine.topics.len() >= phxq_types::TOPICS_MAX {
        return Err(invalid(format!(
            "topic {:?} repeated or too many",
            config.name
        )));
    }
    let name = config.name.clone();
    let (group, groups) = (machine.group, machine.layout.groups);
    machine.topics.push(TopicState::new(config, group, groups));
    Ok(name)
}

/// What the snapshot already set, so that nothing is set twice.
#[derive(Default)]
struct Seen {
    queues: BTreeSet<(usize, usize)>,
    /// Whether queues carry their dedup window (version 2).
    dedup: bool,
    /// Whether cursors carry their deliveries (version 4).
    deliveries: bool,
}

fn decode_topic(
    machine: &mut GroupMachine,
    name: String,
    reader: &mut Reader<'_>,
    seen: &mut Seen,
) -> Result<(), DecodeError> {
    for _ in 0..reader.count("queue count")? {
        let queue = reader.varint_u32("queue")?;
        let (topic, slot) = machine
            .slot(&name, queue)
            .map_err(|code| invalid(format!("queue {name}/{queue}: {code}")))?;
        if !seen.queues.insert((topic, slot)) {
            return Err(invalid(format!("queue {name}/{queue} appears twice")));
        }
        let state = decode_queue(machine, topic, reader, seen)?;
        machine.topics[topic].queues[slot] = state;
    }
    Ok(())
}

fn decode_queue(
    machine: &GroupMachine,
    topic: usize,
    reader: &mut Reader<'_>,
    seen: &Seen,
) -> Result<QueueState, DecodeError> {
    let next_offset = reader.varint("next offset")?;
    if next_offset == 0 {
        return Err(invalid("next offset 0".to_string()));
    }
    let config = &machine.topics[topic].config;
    let mut cursors = vec![None; config.consumer_groups.len()];
    let mut deliveries: Vec<Option<Deliveries>> = vec![None; config.consumer_groups.len()];
    for _ in 0..reader.count("cursor count")? {
        let name = reader.string("consumer group")?;
        let offset = reader.varint("cursor")?;
        let delivered = match seen.deliveries {
            true => decode_deliveries(reader, offset)?,
            false => Deliveries::at(offset),
        };
        let member = machine.member(topic, &name).ok_or_else(|| {
            invalid(format!(
                "consumer group {name:?} does not read {}",
                config.name
            ))
        })?;
        if offset == 0 || cursors[member].replace(offset).is_some() {
            return Err(invalid(format!("bad or repeated cursor of {name:?}")));
        }
        deliveries[member] = Some(delivered);
    }
    let cursors = cursors.into_iter().map(|c| c.unwrap_or(1)).collect();
    let mut state = QueueState::restored(next_offset, cursors);
    for (member, delivered) in deliveries.into_iter().enumerate() {
        if let Some(delivered) = delivered {
            state.deliveries[member] = delivered;
        }
    }
    if seen.dedup {
        decode_dedup(&mut state, machine.applied_index, reader)?;
    }
    Ok(state)
}

/// Reads a queue's dedup window into `state` (whose next offset and applied index are known).
fn decode_dedup(
    state: &mut QueueState,
    applied_index: u64,
    reader: &mut Reader<'_>,
) -> Result<(), DecodeError> {
    for _ in 0..reader.count("record count")? {
        let id = reader.bytes("message id")?.to_vec();
        let index = reader.varint("record index")?;
        let original = Original {
            first_offset: reader.varint("record first offset")?,
            count: reader.varint("record count")?,
        };
        let end = original.first_offset.checked_add(original.count);
        if id.is_empty()
            || id.len() > MESSAGE_ID_BYTES_MAX
            || index == 0
            || index > applied_index
            || original.first_offset == 0
            || original.count == 0
            || end.is_none_or(|end| end > state.next_offset)
        {
            return Err(invalid(format!("bad dedup record {id:?} at {index}")));
        }
        if !state.dedup.restore(id, index, original) {
            return Err(invalid(
                "dedup records repeated or out of order".to_string(),
            ));
        }
    }
    Ok(())
}

/// Reads a consumer group's deliveries above its cursor `cursor` (version 4).
fn decode_deliveries(reader: &mut Reader<'_>, cursor: Offset) -> Result<Deliveries, DecodeError> {
    let next_fresh = reader.varint("next fresh")?;
    let count = reader.count("in-flight count")?;
    if next_fresh < cursor || count > IN_FLIGHT_TRACKED_MAX as usize {
        return Err(invalid(format!(
            "next fresh {next_fresh} below cursor {cursor}, or {count} in flight"
        )));
    }
    let mut deliveries = Deliveries::at(next_fresh);
    let mut previous = cursor.checked_sub(1);
    for _ in 0..count {
        let offset = reader.varint("in-flight offset")?;
        let delivery_count = reader.varint_u32("delivery count")?;
        let deadline_ms = reader.varint("deadline")?;
        if previous.is_none_or(|p| offset <= p) || offset >= next_fresh || delivery_count == 0 {
            return Err(invalid(format!("bad in-flight offset {offset}")));
        }
        previous = Some(offset);
        let flight = InFlight {
            delivery_count,
            deadline_ms,
        };
        deliveries.in_flight.insert(offset, flight);
    }
    Ok(deliveries)
}

fn invalid(message: String) -> DecodeError {
    DecodeError::Invalid(message)
}
