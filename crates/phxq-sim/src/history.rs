//! What the clients saw, and the read-only checks of it against the replicas' final state.

use std::collections::{BTreeMap, BTreeSet};

use phxq_core::StoredMessage;
use phxq_types::{Offset, QueueId};

/// An acknowledged enqueue.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The producer.
    pub producer: usize,
    /// Its sequence number for the message.
    pub seq: u64,
    /// The queue.
    pub queue: QueueId,
    /// The offset the master assigned.
    pub offset: Offset,
    /// The message's unique value.
    pub value: Vec<u8>,
}

/// What one consumer group received from one queue, in delivery order: (offset, value).
pub type Deliveries = Vec<(Offset, Vec<u8>)>;

/// Everything the clients recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every value a producer ever sent (acknowledged or not).
    pub attempted: BTreeSet<Vec<u8>>,
    /// Acknowledged enqueues, in acknowledgement order.
    pub acks: Vec<Ack>,
    /// Per (consumer group, queue): every delivery, offset and value, in delivery order.
    pub deliveries: BTreeMap<(String, QueueId), Deliveries>,
    /// Requests that ended without an answer (timeouts) or with INDETERMINATE.
    pub indeterminate: u64,
}

/// One replica's final view of one queue.
pub struct ReplicaView {
    /// Which node.
    pub node: usize,
    /// Every retained message, in offset order.
    pub messages: Vec<StoredMessage>,
}

/// Runs every checker; returns the violations found (empty: all good). `dedup_window` is the
/// topic's: every enqueue carried its message's value as its id.
pub fn check(
    history: &History,
    queues: QueueId,
    consumer_groups: &[String],
    dedup_window: u64,
    views: &BTreeMap<QueueId, Vec<ReplicaView>>,
) -> Vec<String> {
    let mut violations = Vec::new();
    for queue in 0..queues {
        let views = views.get(&queue).map(Vec::as_slice).unwrap_or(&[]);
        check_replicas(queue, views, history, &mut violations);
    }
    check_acks(history, views, &mut violations);
    check_producer_order(history, &mut violations);
    check_deliveries(history, consumer_groups, views, &mut violations);
    check_duplicates(history, dedup_window, views, &mut violations);
    violations
}

/// A retry reuses its enqueue's id (the message's value), and within the queue's dedup window
/// a second enqueue with an id appends nothing. So no value is stored twice less than
/// `dedup_window + 1` offsets apart: when the second copy was applied, the first was among
/// the queue's newest `dedup_window` ids (each enqueue holds one message). Copies further
/// apart are allowed (the id had left the window: at least once). Replicas and every
/// consumer group's deliveries testify, so compaction hides little.
fn check_duplicates(
    history: &History,
    dedup_window: u64,
    views: &BTreeMap<QueueId, Vec<ReplicaView>>,
    violations: &mut Vec<String>,
) {
    let mut seen: BTreeMap<(QueueId, &[u8]), BTreeSet<Offset>> = BTreeMap::new();
    for (queue, views) in views {
        for m in views.iter().flat_map(|view| &view.messages) {
            seen.entry((*queue, &m.value)).or_default().insert(m.offset);
        }
    }
    for ((_, queue), deliveries) in &history.deliveries {
        for (offset, value) in deliveries {
            seen.entry((*queue, value)).or_default().insert(*offset);
        }
    }
    for ((queue, value), offsets) in &seen {
        let offsets: Vec<Offset> = offsets.iter().copied().collect();
        for pair in offsets.windows(2) {
            if pair[1] - pair[0] <= dedup_window {
                violations.push(format!(
                    "duplicate: {:?} stored at queue {queue} offsets {} and {}, within the dedup window of {dedup_window}",
                    String::from_utf8_lossy(value),
                    pair[0],
                    pair[1]
                ));
            }
        }
    }
}

/// Dense offsets on every replica, the same message at the same offset everywhere, and no
/// message nobody sent.
fn check_replicas(
    queue: QueueId,
    views: &[ReplicaView],
    history: &History,
    violations: &mut Vec<String>,
) {
    let mut by_offset: BTreeMap<Offset, (usize, &[u8])> = BTreeMap::new();
    for view in views {
        for pair in view.messages.windows(2) {
            if pair[1].offset != pair[0].offset + 1 {
                violations.push(format!(
                    "queue {queue} on node {}: offsets jump from {} to {}",
                    view.node, pair[0].offset, pair[1].offset
                ));
            }
        }
        for m in &view.messages {
            if !history.attempted.contains(&m.value) {
                violations.push(format!(
                    "phantom: queue {queue} offset {} on node {} holds {:?}, which no producer sent",
                    m.offset,
                    view.node,
                    String::from_utf8_lossy(&m.value)
                ));
            }
            match by_offset.get(&m.offset) {
                Some((node, value)) if *value != m.value.as_slice() => violations.push(format!(
                    "replicas disagree: queue {queue} offset {}: node {node} has {:?}, node {} has {:?}",
                    m.offset,
                    String::from_utf8_lossy(value),
                    view.node,
                    String::from_utf8_lossy(&m.value)
                )),
                Some(_) => {}
                None => {
                    by_offset.insert(m.offset, (view.node, &m.value));
                }
            }
        }
    }
}

/// Every acknowledged enqueue is on every replica that holds its offset, and some replica
/// holds it unless every consumer group passed it and it was compacted. A replica may lag
/// (a shorter log is not a loss); a different message at the offset is.
fn check_acks(
    history: &History,
    views: &BTreeMap<QueueId, Vec<ReplicaView>>,
    violations: &mut Vec<String>,
) {
    for ack in &history.acks {
        let views = views.get(&ack.queue).map(Vec::as_slice).unwrap_or(&[]);
        let mut held = false;
        let mut compacted = false;
        for view in views {
            let Some(first) = view.messages.first() else {
                continue;
            };
            if ack.offset < first.offset {
                compacted = true;
                continue;
            }
            let Some(found) = view.messages.get((ack.offset - first.offset) as usize) else {
                continue; // this replica lags
            };
            held = true;
            if found.value != ack.value {
                violations.push(format!(
                    "lost acknowledged enqueue: {:?} acked at queue {} offset {}, node {} has {:?} there",
                    String::from_utf8_lossy(&ack.value),
                    ack.queue,
                    ack.offset,
                    view.node,
                    String::from_utf8_lossy(&found.value)
                ));
            }
        }
        // Compacted replicas cannot testify; consumers can: a different message delivered at
        // the acknowledged offset means the acknowledged one was lost.
        for ((group, queue), deliveries) in &history.deliveries {
            if *queue != ack.queue {
                continue;
            }
            if let Some((_, other)) = deliveries
                .iter()
                .find(|(o, v)| *o == ack.offset && *v != ack.value)
            {
                violations.push(format!(
                    "lost acknowledged enqueue: {:?} acked at queue {} offset {}, {group} received {:?} there",
                    String::from_utf8_lossy(&ack.value),
                    ack.queue,
                    ack.offset,
                    String::from_utf8_lossy(other)
                ));
                break;
            }
        }
        if !held && !compacted {
            violations.push(format!(
                "lost acknowledged enqueue: {:?} acked at queue {} offset {}, no replica holds it",
                String::from_utf8_lossy(&ack.value),
                ack.queue,
                ack.offset
            ));
        }
    }
}

/// One producer's acknowledged messages to a queue have increasing offsets: the master's
/// acceptance order is the producer's order.
fn check_producer_order(history: &History, violations: &mut Vec<String>) {
    let mut last: BTreeMap<(usize, QueueId), (u64, Offset)> = BTreeMap::new();
    for ack in &history.acks {
        if let Some((seq, offset)) = last.get(&(ack.producer, ack.queue))
            && ack.offset <= *offset
        {
            violations.push(format!(
                "order: producer {} message {} got offset {} after message {seq} got {offset}",
                ack.producer, ack.seq, ack.offset
            ));
        }
        last.insert((ack.producer, ack.queue), (ack.seq, ack.offset));
    }
}

/// Every acknowledged message reached every consumer group, with the value at its offset.
fn check_deliveries(
    history: &History,
    consumer_groups: &[String],
    views: &BTreeMap<QueueId, Vec<ReplicaView>>,
    violations: &mut Vec<String>,
) {
    for group in consumer_groups {
        for ack in &history.acks {
            let delivered = history
                .deliveries
                .get(&(group.clone(), ack.queue))
                .is_some_and(|d| d.iter().any(|(o, v)| *o == ack.offset && *v == ack.value));
            if !delivered {
                violations.push(format!(
                    "undelivered: {group} never received {:?} (queue {} offset {})",
                    String::from_utf8_lossy(&ack.value),
                    ack.queue,
                    ack.offset
                ));
            }
        }
        for ((g, queue), deliveries) in &history.deliveries {
            if g != group {
                continue;
            }
            for (offset, value) in deliveries {
                let held = views.get(queue).into_iter().flatten().find_map(|v| {
                    v.messages
                        .iter()
                        .find(|m| m.offset == *offset)
                        .map(|m| m.value.clone())
                });
                if let Some(held) = held
                    && held != *value
                {
                    violations.push(format!(
                        "{group} received {:?} at queue {queue} offset {offset}, the log holds {:?}",
                        String::from_utf8_lossy(value),
                        String::from_utf8_lossy(&held)
                    ));
                }
            }
        }
    }
}
