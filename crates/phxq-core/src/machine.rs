//! A replication group's queues and cursors, as its committed log leaves them.
//!
//! Applying an entry gives the messages of each queue the next offsets, in command order;
//! the machine then only remembers which entry holds which offsets (a *run* per queue and
//! entry) and reads messages back from the log ([`GroupMachine::read_plan`], then
//! [`GroupMachine::extract`] on each entry's bytes). Every command is checked again when
//! applied, with the same outcome on every replica: a refused command changes nothing.
//!
//! State worth naming (see [`GroupMachine::validate`]):
//! - per hosted queue, offsets are dense from 1 and never reused; the runs cover the
//!   retained offsets `oldest..next_offset` exactly, in raft index order, each with its
//!   batch's time and the running maximum of those times (so a seek by time is a binary
//!   search: [`GroupMachine::offset_for_time`]);
//! - per hosted queue, a dedup window: the newest `dedup_window` producer message ids and
//!   where their enqueues went. An enqueue whose id is in it appends nothing and is answered
//!   with the original offsets ([`Applied::Enqueued`] with `duplicate`); reading skips it
//!   ([`EntryRef::skipped`]). The window is replicated state, in snapshots as of their index;
//! - per consumer group and queue, a cursor: the next offset the group reads (1 until it
//!   commits). Commits set absolute values and may move a cursor back (replay);
//! - per consumer group and queue, above the cursor, the offsets delivered for per-message
//!   acknowledgement and not yet acked, with their delivery counts and deadlines; acks move
//!   the cursor over the acked prefix ([`delivery`](self::delivery) module);
//! - a topic table: the layout's (bootstrap) topics at first, then changed only by applying
//!   `PutTopic` and `DeleteTopic` ([`topics`](self::topics) module). Each topic holds the
//!   state of its queues hosted here; a deleted topic's state is gone, so it pins no log;
//! - a count of the bytes its snapshot may take ([`Usage`]), kept on apply, never below a
//!   real encoding; a command that would take it past the snapshot budget is refused
//!   ([`budget`](self::budget) module);
//! - the log may drop entries at or below [`GroupMachine::deletable_index`]; the node then
//!   calls [`GroupMachine::forget_through`], and a snapshot at that index plus the log's
//!   tail rebuilds the same state. That index is never below the last topic change: the
//!   snapshot carries the topic table as it is now, which is the table as of its index only
//!   if no change came after it.

mod budget;
mod dedup;
mod delivery;
mod extract;
mod queue;
mod retention;
mod snapshot;
#[cfg(test)]
mod tests;
mod topics;

use std::sync::Arc;

use phxq_types::{
    ErrorCode, GroupId, KEY_BYTES_MAX, MESSAGE_ID_BYTES_MAX, Offset, QueueId, group_of_queue,
};

pub(crate) use self::budget::check_layout;
pub use self::budget::{IN_FLIGHT_BUDGET_BYTES, STATE_BUDGET_BYTES, Usage, budget_refusal_reason};
use self::dedup::Original;
pub use self::delivery::{Delivery, InFlight, in_flight_limit, is_due};
use self::queue::QueueState;
use crate::{Command, DecodeError, Message, StoreLayout, TopicConfig, decode_batch};

/// What applying one command did, in command order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The messages got offsets `first_offset..first_offset + count`; or, with `duplicate`,
    /// the enqueue's message id was in the queue's dedup window: nothing was appended and
    /// these are the offsets the original enqueue got.
    Enqueued {
        /// Offset of the first message.
        first_offset: Offset,
        /// How many.
        count: u64,
        /// Whether this was a duplicate answered with the original's offsets.
        duplicate: bool,
    },
    /// The cursor now stands at `offset`.
    CursorCommitted {
        /// The next offset the consumer group reads.
        offset: Offset,
    },
    /// A `PutTopic` was applied; `changed` is false when the topic already had exactly that
    /// configuration (a re-run).
    TopicPut {
        /// Whether the topic table changed.
        changed: bool,
    },
    /// A `DeleteTopic` removed the topic and its queues.
    TopicDeleted,
    /// A `Deliver` delivered these offsets (the others it named were no longer deliverable).
    Delivered {
        /// In offset order.
        deliveries: Vec<Delivery>,
    },
    /// An `Ack` was applied; the consumer group's cursor now stands at `cursor`.
    Acked {
        /// The next offset the group reads.
        cursor: Offset,
    },
    /// A `Nack` was applied.
    Nacked,
    /// Refused, deterministically on every replica; nothing changed.
    Rejected(ErrorCode),
}

/// Where some of a queue's messages live: one raft entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRef {
    /// The raft index of the entry.
    pub index: u64,
    /// The offset of the queue's first message in that entry.
    pub first_offset: Offset,
    /// How many of the queue's messages the entry holds.
    pub count: u64,
    /// Positions (in the entry's batch) of the queue's enqueues that were duplicates and took
    /// no offsets; usually empty.
    pub skipped: Vec<u32>,
}

/// What to read to serve a dequeue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    /// Where reading actually starts: `from`, or the oldest retained offset if `from` was
    /// deleted.
    pub start: Offset,
    /// The entries holding offsets `start..`, in order, as many as `count_max` needs.
    pub entries: Vec<EntryRef>,
    /// The queue's next offset to be assigned (one past its last message).
    pub end: Offset,
}

/// One message as a consumer receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its offset in the queue.
    pub offset: Offset,
    /// When the master accepted it, ms since the Unix epoch.
    pub time_ms: u64,
    /// The routing key.
    pub key: Vec<u8>,
    /// The payload.
    pub value: Vec<u8>,
}

/// A replication group's state machine.
#[derive(Clone, Debug)]
pub struct GroupMachine {
    group: GroupId,
    layout: Arc<StoreLayout>,
    applied_index: u64,
    /// The topic table: the layout's topics at first, in layout order; a created topic goes
    /// last, a deleted one is removed.
    topics: Vec<TopicState>,
    /// The index of the last entry that changed the topic table (0: none since the state
    /// this machine started from). Compaction never goes below it.
    topics_changed_index: u64,
    /// The newest time a master stamped on a batch applied here (ms since the Unix epoch; 0
    /// before the first one since this machine was created or restored): the clock
    /// retention by age is decided with, so every replica releases the same entries.
    log_time_ms: u64,
    /// The index the cursors and delivery state are as of, when a snapshot restored them
    /// newer than its own index: replaying entries up to here leaves them alone (their
    /// cursor commits, deliveries, acks and nacks are in that state already).
    consumer_state_index: u64,
    /// What the snapshot may take (see the `budget` module), kept as commands apply.
    usage: Usage,
}

/// One topic and the queues of it that this group hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TopicState {
    /// Its configuration.
    config: TopicConfig,
    /// Queue `q` (with `q mod groups` = this group) at slot `q / groups`.
    queues: Vec<QueueState>,
}

impl TopicState {
    /// A topic whose hosted queues are all empty.
    fn new(config: TopicConfig, group: GroupId, groups: u32) -> TopicState {
        let queues = (0..config.queues)
            .filter(|&queue| group_of_queue(queue, groups) == group)
            .map(|_| QueueState::new(config.consumer_groups.len()))
            .collect();
        TopicState { config, queues }
    }
}

impl GroupMachine {
    /// The empty state of `group`, before index 1.
    ///
    /// Panics if the layout is invalid or has no such group (a bug in the caller).
    pub fn new(group: GroupId, layout: Arc<StoreLayout>) -> GroupMachine {
        if let Err(error) = layout.validate() {
            panic!("invalid layout: {error}");
        }
        assert!(
            group.0 < u64::from(layout.groups),
            "{group} is not in the layout"
        );
        let topics = (layout.topics.iter())
            .map(|config| TopicState::new(config.clone(), group, layout.groups))
            .collect();
        let mut machine = GroupMachine {
            group,
            layout,
            applied_index: 0,
            topics,
            topics_changed_index: 0,
            log_time_ms: 0,
            consumer_state_index: 0,
            usage: Usage::default(),
        };
        machine.usage = machine.usage_from_scratch();
        machine
    }

    /// The newest batch time applied (see the field): pass it to
    /// [`GroupMachine::deletable_index`] so that retention by age is a function of the log.
    pub fn log_time_ms(&self) -> u64 {
        self.log_time_ms
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The highest raft index applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The store-wide settings (groups, message size limit) and the bootstrap topics.
    pub fn layout(&self) -> &Arc<StoreLayout> {
        &self.layout
    }

    /// The topic table as applied so far, in table order.
    pub fn topics(&self) -> impl Iterator<Item = &TopicConfig> {
        self.topics.iter().map(|topic| &topic.config)
    }

    /// The topic called `name`, if the table has it.
    pub fn topic(&self, name: &str) -> Option<&TopicConfig> {
        self.topics().find(|config| config.name == name)
    }

    /// Checks a command as the master would before proposing it: the topic exists, the queue
    /// exists and lives in this group, the consumer group reads the topic, the batch is not
    /// empty, no message is over the limits, the message id is not over
    /// [`MESSAGE_ID_BYTES_MAX`], the cursor is not past the end, the replicated state stays
    /// within the snapshot budget (`STATE_BUDGET_EXCEEDED`: see [`budget_refusal_reason`]).
    pub fn check(&self, command: &Command) -> Result<(), ErrorCode> {
        match command {
            Command::Enqueue {
                topic,
                queue,
                message_id,
                messages,
            } => {
                let (topic_position, slot) = self.slot(topic, *queue)?;
                check_messages(messages, self.layout.message_bytes_max)?;
                if message_id.len() > MESSAGE_ID_BYTES_MAX {
                    return Err(ErrorCode::InvalidArgument);
                }
                let after = self.state_after_enqueue(topic_position, slot, message_id);
                (self.check_state_budget(after, "enqueue")).map_err(|(code, _)| code)
            }
            Command::CommitCursor {
                consumer_group,
                topic,
                queue,
                offset,
            } => {
                let (topic_position, slot) = self.slot(topic, *queue)?;
                self.member(topic_position, consumer_group)
                    .ok_or(ErrorCode::UnknownConsumerGroup)?;
                let next_offset = self.topics[topic_position].queues[slot].next_offset;
                if *offset == 0 || *offset > next_offset {
                    return Err(ErrorCode::InvalidArgument);
                }
                Ok(())
            }
            Command::PutTopic { .. } | Command::DeleteTopic { .. } => self
                .check_topic_change(command)
                .map(|_| ())
                .map_err(|(code, _)| code),
            Command::Deliver { .. } | Command::Ack { .. } | Command::Nack { .. } => {
                self.check_delivery(command).map_err(|(code, _)| code)
            }
        }
    }

    /// Applies entry `index` (one past the applied index). Empty `data` is a raft no-op entry
    /// and applies nothing. Bytes that do not decode are an error and change nothing: the log
    /// checksums every record, so this means a bug, and the node stops.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<Applied>, DecodeError> {
        assert_eq!(
            index,
            self.applied_index + 1,
            "{}: entries apply in order",
            self.group
        );
        if data.is_empty() {
            self.applied_index = index;
            return Ok(Vec::new());
        }
        let batch = decode_batch(data)?;
        self.applied_index = index;
        // The newest, not the last: a new master whose clock is behind never moves it back.
        self.log_time_ms = self.log_time_ms.max(batch.time_ms);
        Ok((0..batch.commands.len())
            .map(|position| self.apply_command(index, position, batch.time_ms, &batch.commands))
            .collect())
    }

    /// Applies command `position` of entry `index` (whose commands are `commands`), unless
    /// the checks refuse it.
    fn apply_command(
        &mut self,
        index: u64,
        position: usize,
        time_ms: u64,
        commands: &[Command],
    ) -> Applied {
        let command = &commands[position];
        if index <= self.consumer_state_index
            && let Some(replayed) = self.replayed(command)
        {
            return replayed;
        }
        if let Err(code) = self.check(command) {
            return Applied::Rejected(code);
        }
        match command {
            Command::Enqueue {
                topic,
                queue,
                message_id,
                messages,
            } => {
                let window = self.topic(topic).expect("checked").dedup_window;
                let state = self.queue_mut(topic, *queue);
                if message_id.is_empty() {
                    let first_offset = state.append(index, time_ms, messages);
                    return enqueued(first_offset, messages.len() as u64, false);
                }
                if let Some(original) = state.dedup.lookup(message_id) {
                    state.skip(index, position);
                    return enqueued(original.first_offset, original.count, true);
                }
                let original = Original {
                    first_offset: state.append(index, time_ms, messages),
                    count: messages.len() as u64,
                };
                let ids_before = state.dedup.window_len();
                state.dedup.record(message_id, index, original, window);
                let ids = state.dedup.window_len() as i64 - ids_before as i64;
                self.count_change(ids, 0);
                enqueued(original.first_offset, original.count, false)
            }
            Command::CommitCursor {
                consumer_group,
                topic,
                queue,
                offset,
            } => {
                let (topic_position, slot) = self.slot(topic, *queue).expect("checked");
                let member = self
                    .member(topic_position, consumer_group)
                    .expect("checked");
                let state = &mut self.topics[topic_position].queues[slot];
                let old = std::mem::replace(&mut state.cursors[member], *offset);
                let deliveries = &mut state.deliveries[member];
                let in_flight_before = deliveries.in_flight.len();
                deliveries.on_commit(old, *offset);
                let in_flight = deliveries.in_flight.len() as i64 - in_flight_before as i64;
                self.count_change(0, in_flight);
                Applied::CursorCommitted { offset: *offset }
            }
            Command::Deliver { .. } | Command::Ack { .. } | Command::Nack { .. } => {
                self.apply_delivery(time_ms, command)
            }
            Command::PutTopic { config, .. } => {
                let predicted = self.state_after_put(config);
                let changed = self.put_topic(index, config, &commands[..position]);
                self.usage = self.usage_from_scratch();
                assert!(
                    !changed || self.usage.state_bytes == predicted,
                    "the check predicts a topic change's count exactly"
                );
                Applied::TopicPut { changed }
            }
            Command::DeleteTopic { name } => {
                self.delete_topic(index, name);
                self.usage = self.usage_from_scratch();
                Applied::TopicDeleted
            }
        }
    }

    /// What a consumer-state command (cursor commit, delivery, ack, nack) of an entry at or
    /// below `consumer_state_index` answers: its effect is in the restored state already, so
    /// it changes nothing. `None` for other commands, which replay as usual. Nobody waits for
    /// these answers (a replaying replica has no clients of those entries).
    fn replayed(&self, command: &Command) -> Option<Applied> {
        Some(match command {
            Command::CommitCursor { offset, .. } => Applied::CursorCommitted { offset: *offset },
            Command::Deliver { .. } => Applied::Delivered {
                deliveries: Vec::new(),
            },
            Command::Ack {
                consumer_group,
                topic,
                queue,
                ..
            } => Applied::Acked {
                cursor: self.cursor(consumer_group, topic, *queue).unwrap_or(1),
            },
            Command::Nack { .. } => Applied::Nacked,
            Command::Enqueue { .. } | Command::PutTopic { .. } | Command::DeleteTopic { .. } => {
                return None;
            }
        })
    }

    /// The next offset `queue` of `topic` will assign, if the queue lives here.
    pub fn end_offset(&self, topic: &str, queue: QueueId) -> Option<Offset> {
        self.queue(topic, queue).map(|state| state.next_offset)
    }

    /// The offset of the first retained message of `queue` of `topic` whose time (its batch's
    /// `time_ms`, the master's clock when it accepted it) is at or after `time_ms`, like
    /// Kafka's `offsetsForTimes`: the oldest retained offset when `time_ms` is before every
    /// retained message, the end offset when every one is older. `None` if the queue does not
    /// live here.
    ///
    /// The answer depends only on the applied log and the compaction point, never on a clock.
    /// Times may step back along a queue (a new master's clock behind the old one's): the
    /// answer is then the first message not older than `time_ms`, and a later one may be.
    /// A binary search over the queue's runs (one per entry), not a scan of its messages.
    pub fn offset_for_time(&self, topic: &str, queue: QueueId, time_ms: u64) -> Option<Offset> {
        Some(self.queue(topic, queue)?.offset_for_time(time_ms))
    }

    /// A consumer group's cursor on a queue: the next offset it reads (1 if never committed).
    pub fn cursor(&self, consumer_group: &str, topic: &str, queue: QueueId) -> Option<Offset> {
        let (topic_position, slot) = self.slot(topic, queue).ok()?;
        let member = self.member(topic_position, consumer_group)?;
        Some(self.topics[topic_position].queues[slot].cursors[member])
    }

    /// The entries to read for up to `count_max` messages of a queue from offset `from`.
    pub fn read_plan(
        &self,
        topic: &str,
        queue: QueueId,
        from: Offset,
        count_max: u64,
    ) -> Option<ReadPlan> {
        Some(self.queue(topic, queue)?.plan(from, count_max))
    }

    /// The messages of `queue` of `topic` at offsets `from..` in the entry `entry` refers to,
    /// whose payload is `data`: at most `count_max`, and at most `bytes_max` of keys and values
    /// (but always at least one).
    pub fn extract(
        entry: &EntryRef,
        data: &[u8],
        topic: &str,
        queue: QueueId,
        from: Offset,
        count_max: u64,
        bytes_max: u64,
    ) -> Result<Vec<StoredMessage>, DecodeError> {
        let limits = extract::Limits {
            from,
            count_max,
            bytes_max,
        };
        extract::extract(entry, data, topic, queue, &limits)
    }

    /// The highest raft index (at most the applied index) whose entries no queue of the group
    /// still needs at time `now_ms` (the node passes [`GroupMachine::log_time_ms`], so that
    /// every replica decides alike whatever its own clock says): every subscribed consumer group has passed them, they
    /// are outside the replay window, or the age and size caps release them. Never below the
    /// last topic change unless that leaves nothing to compact: then 0 (see the module doc).
    pub fn deletable_index(&self, now_ms: u64) -> u64 {
        let queues = (self.topics.iter())
            .flat_map(|topic| (topic.queues.iter()).map(|queue| (&topic.config.retention, queue)));
        let deletable = queues
            .filter_map(|(retention, queue)| {
                retention::first_needed_index(queue, retention, now_ms)
            })
            .map(|index| index - 1)
            .fold(self.applied_index, u64::min);
        if deletable < self.topics_changed_index {
            0
        } else {
            deletable
        }
    }

    /// The state as of raft index `index` (deletable and at most the applied index), with every
    /// message at or below it forgotten, encoded for a raft snapshot. Replaying the entries
    /// after `index` on [`GroupMachine::restore`]d state gives back this state.
    pub fn snapshot(&self, index: u64) -> Vec<u8> {
        assert!(
            index <= self.applied_index,
            "{}: snapshot at {index} is past the applied index {}",
            self.group,
            self.applied_index
        );
        assert!(
            index >= self.topics_changed_index,
            "{}: snapshot at {index} is before the topic change at {}",
            self.group,
            self.topics_changed_index
        );
        snapshot::encode(self, index)
    }

    /// Forgets messages in entries at or below `index` (after the log was compacted there).
    pub fn forget_through(&mut self, index: u64) {
        assert!(
            index <= self.applied_index,
            "{}: cannot forget through {index}, past the applied index {}",
            self.group,
            self.applied_index
        );
        for topic in &mut self.topics {
            for queue in &mut topic.queues {
                queue.forget_through(index);
            }
        }
    }

    /// The state a [`GroupMachine::snapshot`] encoded.
    pub fn restore(
        group: GroupId,
        layout: Arc<StoreLayout>,
        snapshot: &[u8],
    ) -> Result<GroupMachine, DecodeError> {
        let mut machine = GroupMachine::new(group, layout);
        snapshot::decode_into(&mut machine, snapshot)?;
        machine.usage = machine.usage_from_scratch();
        machine.validate();
        Ok(machine)
    }

    /// Checks the invariants of the module doc; panics (a bug) if one does not hold.
    pub fn validate(&self) {
        assert!(
            self.topics.len() <= phxq_types::TOPICS_MAX,
            "too many topics"
        );
        assert!(self.topics_changed_index <= self.applied_index);
        // While a restored machine replays up to its consumer state's index, that state is
        // newer than its queues: deliveries may then stand past a queue's end.
        let consumer_state_current = self.consumer_state_index <= self.applied_index;
        for (position, topic) in self.topics.iter().enumerate() {
            let config = &topic.config;
            assert_eq!(config.check(), Ok(()), "a table topic is valid");
            assert!(
                self.topics[..position]
                    .iter()
                    .all(|other| other.config.name != config.name),
                "topic {} listed twice",
                config.name
            );
            let hosted = (0..config.queues)
                .filter(|&queue| group_of_queue(queue, self.layout.groups) == self.group)
                .count();
            assert_eq!(
                topic.queues.len(),
                hosted,
                "hosted queues of {}",
                config.name
            );
            for queue in &topic.queues {
                queue.validate(
                    self.applied_index,
                    config.consumer_groups.len(),
                    consumer_state_current,
                );
            }
        }
        self.validate_usage();
    }

    /// Where `topic`/`queue` lives in `self.topics`, or why it is not hosted here.
    fn slot(&self, topic: &str, queue: QueueId) -> Result<(usize, usize), ErrorCode> {
        let topic_position = (self.topics.iter())
            .position(|state| state.config.name == topic)
            .ok_or(ErrorCode::UnknownTopic)?;
        if queue >= self.topics[topic_position].config.queues {
            return Err(ErrorCode::UnknownQueue);
        }
        if group_of_queue(queue, self.layout.groups) != self.group {
            return Err(ErrorCode::InvalidArgument);
        }
        Ok((topic_position, (queue / self.layout.groups) as usize))
    }

    /// The queue number at `slot` of a topic's hosted queues.
    fn queue_of_slot(&self, slot: usize) -> QueueId {
        let queue = slot as u64 * u64::from(self.layout.groups) + self.group.0;
        QueueId::try_from(queue).expect("slots come from queue numbers")
    }

    /// The position of `consumer_group` among the consumer groups of topic `topic_position`.
    fn member(&self, topic_position: usize, consumer_group: &str) -> Option<usize> {
        (self.topics[topic_position].config.consumer_groups.iter())
            .position(|name| name == consumer_group)
    }

    fn queue(&self, topic: &str, queue: QueueId) -> Option<&QueueState> {
        let (topic_position, slot) = self.slot(topic, queue).ok()?;
        Some(&self.topics[topic_position].queues[slot])
    }

    /// A queue the checks accepted.
    fn queue_mut(&mut self, topic: &str, queue: QueueId) -> &mut QueueState {
        let (topic_position, slot) = self.slot(topic, queue).expect("checked");
        &mut self.topics[topic_position].queues[slot]
    }
}

fn enqueued(first_offset: Offset, count: u64, duplicate: bool) -> Applied {
    Applied::Enqueued {
        first_offset,
        count,
        duplicate,
    }
}

/// Refuses an empty enqueue or one with a message over the limits.
fn check_messages(messages: &[Message], value_bytes_max: usize) -> Result<(), ErrorCode> {
    if messages.is_empty() {
        return Err(ErrorCode::EmptyBatch);
    }
    let too_large = |m: &Message| m.key.len() > KEY_BYTES_MAX || m.value.len() > value_bytes_max;
    if messages.iter().any(too_large) {
        return Err(ErrorCode::MessageTooLarge);
    }
    Ok(())
}
