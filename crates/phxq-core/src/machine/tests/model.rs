//! A plain model of a group (every message kept in a list) against which random logs are
//! checked: applying, reading back through `read_plan` + `extract`, retention decided per
//! message, seeking by time (batch times are random, so they step back as after a master
//! change), deduplication by producer message id (ids drawn from a few, so retries inside
//! and outside the window and duplicates inside one entry all happen), and snapshots.

use std::collections::{BTreeMap, BTreeSet};

use phxq_types::{ACK_TIMEOUT_MS_MAX, DELIVERY_OFFSETS_MAX, NACK_DELAY_MS_MAX};

use proptest::prelude::*;

use super::*;

/// A message as the model keeps it.
#[derive(Clone, Debug)]
struct Kept {
    offset: u64,
    index: u64,
    time_ms: u64,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Kept {
    fn bytes(&self) -> u64 {
        (self.key.len() + self.value.len()) as u64
    }
}

#[derive(Clone, Debug)]
struct ModelQueue {
    next_offset: u64,
    /// The retained messages, oldest first.
    messages: Vec<Kept>,
    cursors: BTreeMap<String, u64>,
    /// Every enqueue that carried an id and appended, oldest first: `(id, first offset,
    /// count)`. Its window is the last `dedup_window` of them.
    originals: Vec<(Vec<u8>, u64, u64)>,
    /// Per consumer group, the per-message deliveries above its cursor.
    deliveries: BTreeMap<String, ModelDeliveries>,
}

/// Deliveries as the rules say, with the acked offsets listed (the machine keeps only the
/// in-flight ones and infers the acked).
#[derive(Clone, Debug)]
struct ModelDeliveries {
    /// offset → (delivery count, deadline).
    in_flight: BTreeMap<u64, (u32, u64)>,
    /// Acked above the cursor.
    acked: BTreeSet<u64>,
    /// The next fresh offset to deliver.
    next_fresh: u64,
}

impl ModelDeliveries {
    fn at(cursor: u64) -> ModelDeliveries {
        ModelDeliveries {
            in_flight: BTreeMap::new(),
            acked: BTreeSet::new(),
            next_fresh: cursor,
        }
    }
}

/// Group 0 of [`layout`], written from the rules rather than from the machine's code.
#[derive(Clone, Debug)]
struct Model {
    layout: Arc<StoreLayout>,
    queues: BTreeMap<(String, u32), ModelQueue>,
}

impl Model {
    fn new(layout: Arc<StoreLayout>) -> Model {
        let mut queues = BTreeMap::new();
        for topic in &layout.topics {
            for queue in (0..topic.queues).filter(|q| q % layout.groups == 0) {
                let cursors = topic
                    .consumer_groups
                    .iter()
                    .map(|g| (g.clone(), 1))
                    .collect();
                let deliveries = topic
                    .consumer_groups
                    .iter()
                    .map(|g| (g.clone(), ModelDeliveries::at(1)))
                    .collect();
                let state = ModelQueue {
                    next_offset: 1,
                    messages: Vec::new(),
                    cursors,
                    originals: Vec::new(),
                    deliveries,
                };
                queues.insert((topic.name.clone(), queue), state);
            }
        }
        Model { layout, queues }
    }

    fn hosted(&self, topic: &str, queue: u32) -> Result<&ModelQueue, ErrorCode> {
        let config = self.layout.topic(topic).ok_or(ErrorCode::UnknownTopic)?;
        if queue >= config.queues {
            return Err(ErrorCode::UnknownQueue);
        }
        (self.queues.get(&(topic.to_string(), queue))).ok_or(ErrorCode::InvalidArgument)
    }

    fn apply(&mut self, index: u64, batch: &Batch) -> Vec<Applied> {
        let time_ms = batch.time_ms;
        let mut results = Vec::new();
        for command in &batch.commands {
            let result = match command {
                Command::Enqueue {
                    topic,
                    queue,
                    message_id,
                    messages,
                } => self.enqueue(index, time_ms, (topic, *queue), message_id, messages),
                Command::CommitCursor {
                    consumer_group,
                    topic,
                    queue,
                    offset,
                } => self.commit(consumer_group, topic, *queue, *offset),
                Command::Deliver { .. } | Command::Ack { .. } | Command::Nack { .. } => {
                    self.delivery(time_ms, command)
                }
                Command::PutTopic { .. } | Command::DeleteTopic { .. } => {
                    unreachable!("the model's logs change no topic (see tests/topics.rs)")
                }
            };
            results.push(result.unwrap_or_else(Applied::Rejected));
        }
        results
    }

    fn enqueue(
        &mut self,
        index: u64,
        time_ms: u64,
        (topic, queue): (&str, u32),
        message_id: &[u8],
        messages: &[Message],
    ) -> Result<Applied, ErrorCode> {
        self.hosted(topic, queue)?;
        if messages.is_empty() {
            return Err(ErrorCode::EmptyBatch);
        }
        if (messages.iter())
            .any(|m| m.key.len() > KEY_BYTES_MAX || m.value.len() > self.layout.message_bytes_max)
        {
            return Err(ErrorCode::MessageTooLarge);
        }
        if message_id.len() > MESSAGE_ID_BYTES_MAX {
            return Err(ErrorCode::InvalidArgument);
        }
        let window = self.layout.topic(topic).unwrap().dedup_window as usize;
        let state = self.queues.get_mut(&(topic.to_string(), queue)).unwrap();
        let in_window = &state.originals[state.originals.len().saturating_sub(window)..];
        if !message_id.is_empty()
            && let Some((_, first_offset, count)) =
                in_window.iter().find(|(id, ..)| id == message_id)
        {
            return Ok(Applied::Enqueued {
                first_offset: *first_offset,
                count: *count,
                duplicate: true,
            });
        }
        let first_offset = state.next_offset;
        if !message_id.is_empty() {
            let count = messages.len() as u64;
            state
                .originals
                .push((message_id.to_vec(), first_offset, count));
        }
        for message in messages {
            state.messages.push(Kept {
                offset: state.next_offset,
                index,
                time_ms,
                key: message.key.clone(),
                value: message.value.clone(),
            });
            state.next_offset += 1;
        }
        Ok(Applied::Enqueued {
            first_offset,
            count: messages.len() as u64,
            duplicate: false,
        })
    }

    fn commit(
        &mut self,
        consumer_group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<Applied, ErrorCode> {
        let state = self.hosted(topic, queue)?;
        if !state.cursors.contains_key(consumer_group) {
            return Err(ErrorCode::UnknownConsumerGroup);
        }
        if offset == 0 || offset > state.next_offset {
            return Err(ErrorCode::InvalidArgument);
        }
        let state = self.queues.get_mut(&(topic.to_string(), queue)).unwrap();
        let old = state
            .cursors
            .insert(consumer_group.to_string(), offset)
            .unwrap();
        let deliveries = state.deliveries.get_mut(consumer_group).unwrap();
        if offset >= old {
            deliveries.in_flight.retain(|&o, _| o >= offset);
            deliveries.acked.retain(|&o| o >= offset);
            deliveries.next_fresh = deliveries.next_fresh.max(offset);
        } else {
            *deliveries = ModelDeliveries::at(offset);
        }
        Ok(Applied::CursorCommitted { offset })
    }

    /// A `Deliver`, `Ack` or `Nack`, by the rules of the `delivery` module doc.
    fn delivery(&mut self, time_ms: u64, command: &Command) -> Result<Applied, ErrorCode> {
        let (Command::Deliver {
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
        }) = command
        else {
            unreachable!()
        };
        let state = self.hosted(topic, *queue)?;
        if !state.cursors.contains_key(consumer_group.as_str()) {
            return Err(ErrorCode::UnknownConsumerGroup);
        }
        let sorted = offsets.windows(2).all(|w| w[0] < w[1]);
        if offsets.is_empty()
            || offsets.len() > DELIVERY_OFFSETS_MAX
            || offsets.contains(&0)
            || !sorted
        {
            return Err(ErrorCode::InvalidArgument);
        }
        let limit = match self
            .layout
            .topic(topic)
            .unwrap()
            .group_settings
            .get(consumer_group.as_str())
        {
            Some(settings) => settings.max_in_flight.unwrap() as usize,
            None => 1000,
        };
        let state = self.queues.get_mut(&(topic.to_string(), *queue)).unwrap();
        let end = state.next_offset;
        let cursor = state.cursors.get_mut(consumer_group.as_str()).unwrap();
        let deliveries = state.deliveries.get_mut(consumer_group.as_str()).unwrap();
        match command {
            Command::Deliver { ack_timeout_ms, .. } => {
                if *ack_timeout_ms == 0 || *ack_timeout_ms > ACK_TIMEOUT_MS_MAX {
                    return Err(ErrorCode::InvalidArgument);
                }
                let deadline = time_ms + ack_timeout_ms;
                let mut delivered = Vec::new();
                for &offset in offsets {
                    let full = deliveries.in_flight.len() >= limit;
                    if let Some((count, due)) = deliveries.in_flight.get_mut(&offset) {
                        // Batch times here are far below a week apart.
                        if *due <= time_ms {
                            *count += 1;
                            *due = deadline;
                            delivered.push(Delivery {
                                offset,
                                delivery_count: *count,
                                deadline_ms: deadline,
                            });
                        }
                    } else if offset == deliveries.next_fresh && offset < end && !full {
                        deliveries.in_flight.insert(offset, (1, deadline));
                        deliveries.next_fresh += 1;
                        delivered.push(Delivery {
                            offset,
                            delivery_count: 1,
                            deadline_ms: deadline,
                        });
                    }
                }
                Ok(Applied::Delivered {
                    deliveries: delivered,
                })
            }
            Command::Ack { .. } => {
                if offsets.iter().any(|&o| o >= deliveries.next_fresh) {
                    return Err(ErrorCode::InvalidArgument);
                }
                for offset in offsets {
                    if deliveries.in_flight.remove(offset).is_some() {
                        deliveries.acked.insert(*offset);
                    }
                }
                while deliveries.acked.remove(cursor) {
                    *cursor += 1;
                }
                Ok(Applied::Acked { cursor: *cursor })
            }
            Command::Nack { delay_ms, .. } => {
                if *delay_ms > NACK_DELAY_MS_MAX
                    || offsets
                        .iter()
                        .any(|o| !deliveries.in_flight.contains_key(o))
                {
                    return Err(ErrorCode::InvalidArgument);
                }
                for offset in offsets {
                    deliveries.in_flight.get_mut(offset).unwrap().1 = time_ms + delay_ms;
                }
                Ok(Applied::Nacked)
            }
            _ => unreachable!(),
        }
    }

    fn forget_through(&mut self, index: u64) {
        for state in self.queues.values_mut() {
            state.messages.retain(|m| m.index > index);
        }
    }

    /// The retention rules, message by message (see the `retention` module doc).
    fn needed(&self, topic: &str, state: &ModelQueue, message: &Kept, now_ms: u64) -> bool {
        let retention = &self.layout.topic(topic).unwrap().retention;
        let slowest = (state.cursors.values().copied().min())
            .unwrap_or(state.next_offset)
            .min(state.next_offset);
        let in_window = message.offset + retention.replay_count >= slowest
            || message.time_ms + retention.replay_age_ms >= now_ms;
        let too_old = (retention.max_age_ms).is_some_and(|age| message.time_ms + age < now_ms);
        let newer_bytes: u64 = (state.messages.iter())
            .filter(|m| m.offset > message.offset)
            .map(Kept::bytes)
            .sum();
        let beyond_size = retention.max_bytes.is_some_and(|max| newer_bytes >= max);
        in_window && !too_old && !beyond_size
    }

    /// Lowest raft index holding a needed message.
    fn first_needed_index(&self, now_ms: u64) -> Option<u64> {
        (self.queues.iter())
            .flat_map(|((topic, _), state)| {
                (state.messages.iter())
                    .filter(move |m| self.needed(topic, state, m, now_ms))
                    .map(|m| m.index)
            })
            .min()
    }
}

/// Messages taken in order from `messages` while within `count_max` and `bytes_max` (but at
/// least one).
fn limited<'a>(
    messages: impl Iterator<Item = &'a Kept>,
    count_max: u64,
    bytes_max: u64,
) -> Vec<(u64, u64, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for message in messages {
        if out.len() as u64 >= count_max || (!out.is_empty() && bytes + message.bytes() > bytes_max)
        {
            break;
        }
        bytes += message.bytes();
        out.push((
            message.offset,
            message.time_ms,
            message.key.clone(),
            message.value.clone(),
        ));
    }
    out
}

fn flat(messages: Vec<StoredMessage>) -> Vec<(u64, u64, Vec<u8>, Vec<u8>)> {
    (messages.into_iter())
        .map(|m| (m.offset, m.time_ms, m.key, m.value))
        .collect()
}

/// A read of one queue.
#[derive(Clone, Debug)]
struct Read {
    queue: u32,
    from: u64,
    count_max: u64,
    bytes_max: u64,
}

/// Reads the machine the way a node would and compares with the model, entry by entry.
fn check_read(machine: &GroupMachine, model: &Model, log: &[Vec<u8>], read: &Read) {
    for (topic, queue) in [("orders", read.queue), ("logs", read.queue)] {
        let Ok(state) = model.hosted(topic, queue) else {
            assert_eq!(
                machine.read_plan(topic, queue, read.from, read.count_max),
                None
            );
            continue;
        };
        let plan = machine
            .read_plan(topic, queue, read.from, read.count_max)
            .unwrap();
        let oldest = state
            .messages
            .first()
            .map_or(state.next_offset, |m| m.offset);
        assert_eq!(plan.start, read.from.max(oldest));
        assert_eq!(plan.end, state.next_offset);
        let wanted: Vec<&Kept> = (state.messages.iter())
            .filter(|m| m.offset >= plan.start)
            .take(read.count_max as usize)
            .collect();
        let mut indexes: Vec<u64> = wanted.iter().map(|m| m.index).collect();
        indexes.dedup();
        assert_eq!(
            plan.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            indexes
        );
        for entry in &plan.entries {
            let data = &log[entry.index as usize - 1];
            let in_entry = || state.messages.iter().filter(|m| m.index == entry.index);
            assert_eq!(entry.first_offset, in_entry().next().unwrap().offset);
            assert_eq!(entry.count, in_entry().count() as u64);
            let extracted = GroupMachine::extract(
                entry,
                data,
                topic,
                queue,
                plan.start,
                read.count_max,
                read.bytes_max,
            )
            .unwrap();
            let expected = limited(
                in_entry().filter(|m| m.offset >= plan.start),
                read.count_max,
                read.bytes_max,
            );
            assert_eq!(
                flat(extracted),
                expected,
                "{topic}/{queue} entry {}",
                entry.index
            );
        }
    }
}

/// Seeks every queue by `time_ms` and compares with the model: the first retained message
/// stamped at or after it, found by looking at every message.
fn check_offset_for_time(machine: &GroupMachine, model: &Model, time_ms: u64) {
    for ((topic, queue), state) in &model.queues {
        let expected = (state.messages.iter())
            .find(|m| m.time_ms >= time_ms)
            .map_or(state.next_offset, |m| m.offset);
        assert_eq!(
            machine.offset_for_time(topic, *queue, time_ms),
            Some(expected),
            "{topic}/{queue} at {time_ms}"
        );
    }
    assert_eq!(machine.offset_for_time("orders", 1, time_ms), None);
    assert_eq!(machine.offset_for_time("nope", 0, time_ms), None);
}

/// What a random run does.
#[derive(Clone, Debug)]
enum Step {
    /// Apply an entry: a batch, or a raft no-op.
    Apply(Option<Batch>),
    /// Compact the log at the deletable index for this wall time.
    Compact { now_ms: u64 },
    /// Read a queue and compare with the model.
    Read(Read),
    /// Seek every queue by time and compare with the model.
    OffsetForTime { time_ms: u64 },
}

fn message() -> impl Strategy<Value = Message> {
    let key_bytes = prop_oneof![9 => 0..3usize, 1 => Just(KEY_BYTES_MAX + 1)];
    (key_bytes, prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(key_bytes, value)| Message {
        key: vec![b'k'; key_bytes],
        value,
    })
}

/// No id, one of five (the window of "orders" is three), or one of the longest or too long.
fn message_id() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(Vec::new()),
        5 => (b'a'..=b'e').prop_map(|id| vec![id]),
        1 => prop_oneof![Just(MESSAGE_ID_BYTES_MAX), Just(MESSAGE_ID_BYTES_MAX + 1)]
            .prop_map(|bytes| vec![b'z'; bytes]),
    ]
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![6 => Just("orders"), 3 => Just("logs"), 1 => Just("nope")].prop_map(String::from)
}

fn queue() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(2), 0..5u32]
}

fn command() -> impl Strategy<Value = Command> {
    let consumer_group = prop_oneof![Just("billing"), Just("audit"), Just("ghost")];
    prop_oneof![
        3 => (topic(), queue(), message_id(), prop::collection::vec(message(), 0..4)).prop_map(
            |(topic, queue, message_id, messages)| Command::Enqueue {
                topic,
                queue,
                message_id,
                messages,
            }
        ),
        1 => (consumer_group.clone(), topic(), queue(), 0..12u64).prop_map(
            |(consumer_group, topic, queue, offset)| Command::CommitCursor {
                consumer_group: consumer_group.to_string(),
                topic,
                queue,
                offset,
            }
        ),
        3 => (consumer_group, queue(), offsets(), ms(ACK_TIMEOUT_MS_MAX), 0..3u8).prop_map(
            |(consumer_group, queue, offsets, ms, kind)| {
                let (consumer_group, topic) = (consumer_group.to_string(), "orders".to_string());
                match kind {
                    0 => Command::Deliver { consumer_group, topic, queue, offsets, ack_timeout_ms: ms },
                    1 => Command::Ack { consumer_group, topic, queue, offsets },
                    _ => Command::Nack { consumer_group, topic, queue, offsets, delay_ms: ms },
                }
            }
        ),
    ]
}

/// Offsets of a delivery command: mostly ascending and small (so they meet the queue's
/// messages), sometimes unsorted, empty or with a 0.
fn offsets() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0..12u64, 0..5).prop_map(|mut offsets| {
        if offsets.len() % 4 != 3 {
            offsets.sort_unstable();
            offsets.dedup();
        }
        offsets
    })
}

/// An ack timeout or nack delay: short against the batch times (1000..3000), so deadlines
/// pass during a run; sometimes 0 or over `max`.
fn ms(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..1500u64, 1 => Just(max), 1 => Just(max + 1)]
}

fn step() -> impl Strategy<Value = Step> {
    let batch = (1000..3000u64, prop::collection::vec(command(), 0..5))
        .prop_map(|(time_ms, commands)| Batch { time_ms, commands });
    let read =
        (queue(), 0..14u64, 0..6u64, 0..40u64).prop_map(|(queue, from, count_max, bytes_max)| {
            Read {
                queue,
                from,
                count_max,
                bytes_max,
            }
        });
    prop_oneof![
        8 => prop::option::weighted(0.9, batch).prop_map(Step::Apply),
        1 => (0..4000u64).prop_map(|now_ms| Step::Compact { now_ms }),
        2 => read.prop_map(Step::Read),
        2 => seek_time().prop_map(|time_ms| Step::OffsetForTime { time_ms }),
    ]
}

/// Times around and between the batch times (1000..3000), their edges included.
fn seek_time() -> impl Strategy<Value = u64> {
    prop_oneof![990..3010u64, Just(0), Just(u64::MAX)]
}

fn retention() -> impl Strategy<Value = Retention> {
    (
        0..4u64,
        prop_oneof![Just(0), 0..800u64],
        // Caps of 0 are refused by the layout (they would release everything at once).
        prop::option::of(1..2500u64),
        prop::option::of(1..60u64),
    )
        .prop_map(
            |(replay_count, replay_age_ms, max_age_ms, max_bytes)| Retention {
                replay_count,
                replay_age_ms,
                max_age_ms,
                max_bytes,
            },
        )
}

/// The machine, the model and the log after a random run, plus the last compaction point.
struct Run {
    machine: GroupMachine,
    model: Model,
    log: Vec<Vec<u8>>,
    compacted_through: u64,
}

fn run(orders: Retention, logs: Retention, steps: &[Step]) -> Run {
    let layout = layout(orders, logs);
    let mut run = Run {
        machine: GroupMachine::new(GroupId(0), layout.clone()),
        model: Model::new(layout),
        log: Vec::new(),
        compacted_through: 0,
    };
    for step in steps {
        match step {
            Step::Apply(batch) => apply_step(&mut run, batch.as_ref()),
            Step::Compact { now_ms } => compact_step(&mut run, *now_ms),
            Step::Read(read) => check_read(&run.machine, &run.model, &run.log, read),
            Step::OffsetForTime { time_ms } => {
                check_offset_for_time(&run.machine, &run.model, *time_ms);
            }
        }
    }
    run
}

fn apply_step(run: &mut Run, batch: Option<&Batch>) {
    let index = run.log.len() as u64 + 1;
    let data = batch.map(encode_batch).unwrap_or_default();
    let applied = run.machine.apply(index, &data).unwrap();
    let expected = batch.map(|b| run.model.apply(index, b)).unwrap_or_default();
    assert_eq!(applied, expected, "entry {index}");
    run.log.push(data);
    run.machine.validate();
    check_consumers(&run.machine, &run.model);
}

/// Every cursor and every in-flight offset (count and deadline) is the model's.
fn check_consumers(machine: &GroupMachine, model: &Model) {
    for ((topic, queue), state) in &model.queues {
        for (group, &cursor) in &state.cursors {
            assert_eq!(
                machine.cursor(group, topic, *queue),
                Some(cursor),
                "{group} {topic}/{queue}"
            );
            let in_flight: Vec<(u64, u32, u64)> =
                (machine.in_flight(group, topic, *queue).unwrap())
                    .into_iter()
                    .map(|(offset, f)| (offset, f.delivery_count, f.deadline_ms))
                    .collect();
            let expected: Vec<(u64, u32, u64)> = (state.deliveries[group].in_flight.iter())
                .map(|(&offset, &(count, deadline))| (offset, count, deadline))
                .collect();
            assert_eq!(in_flight, expected, "{group} {topic}/{queue}");
        }
    }
}

/// Checks the deletable index against the per-message rules, then compacts there.
fn compact_step(run: &mut Run, now_ms: u64) {
    let deletable = run.machine.deletable_index(now_ms);
    let applied = run.machine.applied_index();
    let expected = run
        .model
        .first_needed_index(now_ms)
        .map_or(applied, |index| index - 1);
    assert_eq!(deletable, expected, "at {now_ms}");
    if deletable > run.compacted_through {
        run.machine.forget_through(deletable);
        run.model.forget_through(deletable);
        run.compacted_through = deletable;
        run.machine.validate();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_machine_agrees_with_the_model_on_offsets_reads_and_retention(
        orders in retention(),
        logs in retention(),
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let run = run(orders, logs, &steps);
        for queue in [0, 2] {
            let read = Read { queue, from: 0, count_max: u64::MAX, bytes_max: u64::MAX };
            check_read(&run.machine, &run.model, &run.log, &read);
        }
    }

    #[test]
    fn seeking_by_time_finds_the_first_message_not_older_than_the_time(
        orders in retention(),
        logs in retention(),
        steps in prop::collection::vec(step(), 0..60),
        times in prop::collection::vec(seek_time(), 1..8),
    ) {
        let run = run(orders, logs, &steps);
        // Every batch time in the log too, and one either side: the edges of each run.
        let stamped = run.model.queues.values().flat_map(|q| q.messages.iter().map(|m| m.time_ms));
        let edges: Vec<u64> = stamped.flat_map(|t| [t - 1, t, t + 1]).collect();
        for time_ms in times.into_iter().chain(edges) {
            check_offset_for_time(&run.machine, &run.model, time_ms);
        }
    }

    #[test]
    fn a_snapshot_plus_the_log_tail_rebuilds_the_state(
        orders in retention(),
        logs in retention(),
        steps in prop::collection::vec(step(), 0..60),
        at in any::<prop::sample::Index>(),
        now_ms in 0..4000u64,
    ) {
        let run = run(orders.clone(), logs.clone(), &steps);
        let applied = run.machine.applied_index();
        // Half the time at the deletable index, as the node does; otherwise anywhere after
        // the last compaction.
        let deletable = run.machine.deletable_index(now_ms).max(run.compacted_through);
        let random = run.compacted_through + at.index((applied - run.compacted_through + 1) as usize) as u64;
        for index in [deletable, random] {
            let snapshot = run.machine.snapshot(index);
            let mut compacted = run.machine.clone();
            compacted.forget_through(index);
            let mut restored =
                GroupMachine::restore(GroupId(0), layout(orders.clone(), logs.clone()), &snapshot).unwrap();
            for replayed in index + 1..=applied {
                restored.apply(replayed, &run.log[replayed as usize - 1]).unwrap();
            }
            restored.validate();
            prop_assert_eq!(restored.applied_index(), applied);
            prop_assert_eq!(&restored.topics, &compacted.topics);
            let mut model = run.model.clone();
            model.forget_through(index);
            for queue in [0, 2] {
                let read = Read { queue, from: 0, count_max: u64::MAX, bytes_max: u64::MAX };
                check_read(&restored, &model, &run.log, &read);
            }
            for time_ms in [0, 1500, 2000, 2500, u64::MAX] {
                check_offset_for_time(&restored, &model, time_ms);
            }
        }
    }

    #[test]
    fn restoring_random_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        let layout = layout(NO_RETENTION, NO_RETENTION);
        let _ = GroupMachine::restore(GroupId(0), layout.clone(), &bytes);
        let mut framed = vec![1, 0];
        framed.extend_from_slice(&bytes);
        let _ = GroupMachine::restore(GroupId(0), layout, &framed);
    }
}
