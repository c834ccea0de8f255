//! [`Node`]: every replication group of one node, driven in rounds over one write-ahead log.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use phxq_core::{Command, GroupMachine, Message, PutMode, StoredMessage, TopicConfig};
use phxq_storage::{Lsn, Wal, WriteBatch};
use phxq_types::{
    ACK_TIMEOUT_MS_MAX, DELIVERY_OFFSETS_MAX, ErrorCode, GroupId, KEY_BYTES_MAX,
    MESSAGE_ID_BYTES_MAX, NACK_DELAY_MS_MAX, NodeId, Offset, QueueId, Rng, TIME_MS_MAX,
    group_of_queue,
};
use raft::eraftpb;

use crate::replica::{AnswerAs, Replica, StepRefusal};

/// A client request's number, chosen by the caller; answers carry it back.
pub type RequestId = u64;

/// Time, in ticks. The shell turns wall time into ticks; the simulator owns them.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Milliseconds per tick (for converting waits and leases in answers).
    pub tick_ms: u64,
    /// A follower that hears nothing from its master for this many ticks campaigns; a master
    /// that hears from no majority for this long steps down (check-quorum).
    pub election_ticks: usize,
    /// A master sends heartbeats every this many ticks.
    pub heartbeat_ticks: usize,
    /// A master serves only while a majority answered it within this many ticks. Must stay
    /// below `election_ticks` by more than the network delay: followers refuse to elect
    /// another master for `election_ticks` after hearing from this one.
    pub lease_ticks: u64,
    /// Followers skip one tick in this many, at random: spreads election timeouts without
    /// ever shortening them below `election_ticks`, so a master's lease stays valid.
    pub skip_tick_one_in: u64,
    /// How often masters check placement and hand groups to their preferred node.
    pub rebalance_ticks: u64,
    /// How often groups compact their log behind consumers.
    pub compact_ticks: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick_ms: 50,
            // 600 ms; the lease margin is 5 ticks = 250 ms (see `config::LEASE_MARGIN_MS_MIN`).
            election_ticks: 12,
            heartbeat_ticks: 2,
            lease_ticks: 7,
            skip_tick_one_in: 3,
            rebalance_ticks: 20,
            compact_ticks: 40,
        }
    }
}

/// Everything a node needs to know at start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node.
    pub id: NodeId,
    /// Every node of the store, this one included.
    pub members: Vec<NodeId>,
    /// Groups, limits and the bootstrap topics; the same on every node of the store.
    pub layout: Arc<phxq_core::StoreLayout>,
    /// Ticks.
    pub timing: Timing,
    /// Most commands packed into one entry.
    pub batch_commands_max: usize,
    /// Most bytes of messages packed into one entry.
    pub batch_bytes_max: usize,
    /// Client requests accepted and not yet answered, over all groups, long polls left out;
    /// beyond, `BUSY`.
    pub requests_pending_max: usize,
    /// Long polls (`Consume`, `Receive`) parked at once, over all groups; beyond, `BUSY`.
    /// A limit of their own, so that parked reads never make a produce `BUSY`.
    pub long_polls_parked_max: usize,
    /// Bytes of keys and values in one `Consume` or `Receive` answer at most, whatever the
    /// request asks (the first message always comes, so a consumer always progresses).
    pub consume_answer_bytes_max: u64,
    /// Bytes of log entries a round reads for parked consumes and receives at most (at
    /// least one entry is read). Reads happen on the event loop; this keeps each round's
    /// share of them short, because on a busy machine a round's CPU time is stretched many
    /// times over by the scheduler (16 MiB at once, 10–20 ms of CPU, took 50–180 ms of wall
    /// time under a client flood on two shared cores), and peer messages and ticks are
    /// served only between rounds. Reads a round does not reach run in the next one, at
    /// once (`has_work`), and an answer is cut where the budget ran out.
    pub read_bytes_per_round_max: u64,
    /// A group compacts only when at least this many entries are deletable.
    pub compact_entries_min: u64,
    /// Seeds every random choice of the node.
    pub seed: u64,
    /// The operator says this node's log was lost (`phxq node --rejoin-empty`): every group
    /// neither votes nor campaigns until it has caught up with its master's commit index
    /// (and one election timeout has passed), and asks masters that remember more of its
    /// log than it has to forget it (see `Replica::step`).
    pub rejoin_empty: bool,
    /// Plants the durability bug the simulator must catch: follower acks are released and
    /// groups are told their entries are persisted before the fsync.
    #[cfg(feature = "canary")]
    pub canary_ack_before_sync: bool,
}

impl NodeConfig {
    /// A config with the usual limits.
    pub fn new(
        id: NodeId,
        members: Vec<NodeId>,
        layout: Arc<phxq_core::StoreLayout>,
        seed: u64,
    ) -> Self {
        NodeConfig {
            id,
            members,
            layout,
            timing: Timing::default(),
            batch_commands_max: 4096,
            batch_bytes_max: 4 << 20,
            requests_pending_max: 100_000,
            long_polls_parked_max: 100_000,
            consume_answer_bytes_max: 8 << 20,
            read_bytes_per_round_max: 1 << 20,
            compact_entries_min: 1024,
            seed,
            rejoin_empty: false,
            #[cfg(feature = "canary")]
            canary_ack_before_sync: false,
        }
    }
}

/// What a client asks a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Append messages to one queue; answered once committed and applied.
    Produce {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// The producer's id for this batch (empty: none), deduplicated within the queue's
        /// dedup window (see `phxq_core::Command::Enqueue`).
        message_id: Vec<u8>,
        /// Messages, in order.
        messages: Vec<Message>,
    },
    /// Append messages to several queues of one replication group at once: one entry, so all
    /// of them are appended or none. Every queue must live in the same group (queue `q` is in
    /// group `q mod groups`, whatever its topic); answered once committed and applied.
    ProduceMany {
        /// The appends, in order; the same queue may appear more than once.
        appends: Vec<Append>,
    },
    /// Read a queue from a consumer group's cursor (or from `from`).
    Consume {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Consumer group.
        consumer_group: String,
        /// Where to start; `None`: the group's cursor.
        from: Option<Offset>,
        /// Most messages returned.
        count_max: u64,
        /// Most bytes of keys and values returned (at least one message is).
        bytes_max: u64,
        /// Ticks to wait for a message if there is none yet (long poll).
        wait_ticks: u64,
    },
    /// Move a consumer group's cursor; answered once committed.
    Commit {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Consumer group.
        consumer_group: String,
        /// The next offset the group reads.
        offset: Offset,
    },
    /// The first offset of a queue whose message time is at or after `time_ms` (see
    /// [`phxq_core::GroupMachine::offset_for_time`]); answered at once by the master.
    OffsetForTime {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Ms since the Unix epoch, at most [`TIME_MS_MAX`].
        time_ms: u64,
    },
    /// Create or alter a topic in one replication group (the caller sends it to every
    /// group); answered once committed and applied.
    PutTopic {
        /// The group.
        group: GroupId,
        /// The topic's whole new configuration.
        config: TopicConfig,
        /// Create or alter.
        mode: PutMode,
    },
    /// Delete a topic from one replication group; answered once committed and applied.
    DeleteTopic {
        /// The group.
        group: GroupId,
        /// The topic.
        name: String,
    },
    /// Receive messages of a queue for per-message acknowledgement (see
    /// `phxq_core::machine::delivery`): the master picks the due offsets, then fresh ones,
    /// proposes one `Deliver` and answers once it is applied; waits up to `wait_ticks` for
    /// something to deliver (long poll).
    Receive {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Consumer group.
        consumer_group: String,
        /// Most messages returned (at most `DELIVERY_OFFSETS_MAX` are delivered at once).
        count_max: u64,
        /// Most bytes of keys and values returned (at least one message is).
        bytes_max: u64,
        /// Ticks to wait for a message if there is none to deliver yet (long poll).
        wait_ticks: u64,
        /// Ms after delivery before an unacked message is delivered again: 1 to
        /// `ACK_TIMEOUT_MS_MAX`.
        ack_timeout_ms: u64,
    },
    /// Acknowledge delivered offsets; answered once committed.
    Ack {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Consumer group.
        consumer_group: String,
        /// The offsets, in any order (duplicates are merged), 1 to `DELIVERY_OFFSETS_MAX`.
        offsets: Vec<Offset>,
    },
    /// Give delivered offsets back, to be delivered again after `delay_ms`; answered once
    /// committed.
    Nack {
        /// Topic.
        topic: String,
        /// Queue.
        queue: QueueId,
        /// Consumer group.
        consumer_group: String,
        /// The offsets, in any order (duplicates are merged), 1 to `DELIVERY_OFFSETS_MAX`.
        offsets: Vec<Offset>,
        /// 0 to `NACK_DELAY_MS_MAX`.
        delay_ms: u64,
    },
    /// This node's view of its groups.
    Status,
}

/// A message delivered by a [`Request::Receive`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The message.
    pub message: StoredMessage,
    /// How many times it has been delivered to the consumer group, this time included.
    pub delivery_count: u32,
    /// When it will be delivered again unless acked, ms since the Unix epoch (the master's
    /// clock).
    pub deadline_ms: u64,
}

/// Messages for one queue, part of a [`Request::ProduceMany`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Append {
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: QueueId,
    /// The producer's id for this append (empty: none), as in [`Request::Produce`].
    pub message_id: Vec<u8>,
    /// Messages, in order.
    pub messages: Vec<Message>,
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The messages were committed at `first_offset..first_offset + count`; with
    /// `duplicate`, by an earlier request with the same message id (nothing appended now).
    Produced {
        /// First offset assigned.
        first_offset: Offset,
        /// Messages.
        count: u64,
        /// Whether the message id was in the queue's dedup window.
        duplicate: bool,
    },
    /// Every append of a [`Request::ProduceMany`] was committed: per append, in request
    /// order, the first offset assigned, the count and whether it was a duplicate.
    ProducedMany {
        /// `(first_offset, count, duplicate)` per append.
        ranges: Vec<(Offset, u64, bool)>,
    },
    /// Messages read.
    Consumed {
        /// The messages, in offset order.
        messages: Vec<StoredMessage>,
        /// The offset after the last message returned (where the next read starts).
        next_offset: Offset,
        /// The queue's next offset to be assigned.
        end_offset: Offset,
    },
    /// The cursor was committed.
    Committed,
    /// Messages delivered by a [`Request::Receive`], in offset order (empty when the wait
    /// ended with nothing to deliver).
    Received {
        /// The messages with their delivery counts.
        messages: Vec<Received>,
    },
    /// An ack was applied; the consumer group's cursor now stands at `cursor`.
    Acked {
        /// The next offset the group reads.
        cursor: Offset,
    },
    /// A nack was applied.
    Nacked,
    /// A `PutTopic` or `DeleteTopic` was applied; `changed` is false when the group already
    /// had that configuration.
    TopicChanged {
        /// Whether the group's topic table changed.
        changed: bool,
    },
    /// Where a queue reaches a time.
    OffsetForTime {
        /// The first retained offset stamped at or after the time, or `end_offset`.
        offset: Offset,
        /// The queue's next offset to be assigned.
        end_offset: Offset,
    },
    /// The node's view.
    Status(NodeStatus),
    /// Refused or failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// For people.
        message: String,
        /// With `NOT_MASTER`: the master.
        master: Option<NodeId>,
    },
}

impl Response {
    pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
            master: None,
        }
    }
}

/// One group as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// Its master as far as this node knows.
    pub master: Option<NodeId>,
    /// Raft term.
    pub term: u64,
    /// If this node is the master with a valid lease: milliseconds left on it.
    pub lease_remaining_ms: Option<u64>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied.
    pub applied_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// The group's topic table as this node applied it.
    pub topics: Vec<TopicConfig>,
}

/// A node's view of its groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The answering node.
    pub node: NodeId,
    /// Every group it hosts.
    pub groups: Vec<GroupStatus>,
    /// What the node has done since it started.
    pub counters: NodeCounters,
}

/// Counters since the node started: how well group commit batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Rounds run.
    pub rounds: u64,
    /// Log writes (at most one per round).
    pub writes: u64,
    /// Syncs reported by the shell.
    pub syncs: u64,
    /// Entries this node proposed as master (`ENTRIES_PER_ROUND_MAX` per group per round at
    /// most).
    pub proposals: u64,
    /// Client commands packed into those entries.
    pub commands: u64,
    /// Messages enqueued through those entries.
    pub messages: u64,
    /// Snapshots installed from a master (this replica had fallen behind a compaction).
    pub snapshots_installed: u64,
    /// Log compactions.
    pub compactions: u64,
    /// Compactions not written because the snapshot was over the log's limit (a state grown
    /// before the snapshot budget; see `Replica::compact`).
    pub compactions_refused: u64,
    /// Peer raft messages dropped before stepping (see `peer_filter`): types a peer never
    /// sends, or fields raft-rs would panic on or be misled by.
    pub peer_messages_rejected: u64,
}

/// What a round hands the shell.
#[derive(Debug, Default)]
pub struct Output {
    /// Raft messages to send, per destination node, in order.
    pub messages: BTreeMap<NodeId, Vec<(GroupId, eraftpb::Message)>>,
    /// Answers for clients.
    pub responses: Vec<(RequestId, Response)>,
    /// The log position to make durable, then report with [`Node::synced`].
    pub sync: Option<Lsn>,
}

impl Output {
    /// True if the round produced nothing.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.responses.is_empty() && self.sync.is_none()
    }
}

/// A failure that voids the node's durability promise: the node must stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The write-ahead log failed.
    #[error("write-ahead log: {0}")]
    Log(#[from] phxq_storage::Error),
    /// Raft refused to start a group or hit an internal error.
    #[error("raft, {group}: {source}")]
    Raft {
        /// The group.
        group: GroupId,
        /// raft-rs's error.
        source: raft::Error,
    },
    /// The log's voters of a group are not the configured members: the config was edited
    /// (membership changes go through raft, not the config file) or belongs to another store.
    #[error(
        "{group}: the log's voters are {log:?} but the config's members are {configured:?}; \
         restore the config the store was created with (membership changes are not made by \
         editing it)"
    )]
    Members {
        /// The group.
        group: GroupId,
        /// Voters in the log's conf state.
        log: Vec<u64>,
        /// Configured members.
        configured: Vec<u64>,
    },
    /// A master remembers this node holding entries its log does not have: the log was lost
    /// (a wiped data directory) after the node acknowledged them. raft-rs would panic.
    #[error(
        "{group}: master {master} (term {term}) says this node holds the log up to index \
         {commit}, but its log ends at {last_index}: this node lost entries it acknowledged \
         (was its data directory wiped?). It stopped rather than vote or acknowledge on a \
         log it no longer has. If the disk was lost, restart it with `phxq node \
         --rejoin-empty` (safe only while the other members hold a majority of the old \
         voters' data; see README, \"A node that lost its disk\")"
    )]
    LostLog {
        /// The group.
        group: GroupId,
        /// The master that said so.
        master: u64,
        /// Its term.
        term: u64,
        /// The index it believes this node has.
        commit: u64,
        /// This node's last index.
        last_index: u64,
    },
    /// A committed entry does not decode: a bug or undetected damage.
    #[error("{group}: committed entry {index} does not decode: {reason}")]
    BadEntry {
        /// The group.
        group: GroupId,
        /// The entry.
        index: u64,
        /// Why.
        reason: String,
    },
}

/// A round written to the log and not yet known durable.
struct PendingRound {
    /// Durable once the log is synced to here.
    lsn: Lsn,
    /// The readies of the round, per group, to report persisted.
    readies: Vec<(usize, u64)>,
    /// Messages that claim the round is durable.
    held: Vec<(GroupId, eraftpb::Message)>,
}

/// Every replication group of one node. See the crate documentation.
pub struct Node {
    config: NodeConfig,
    wal: Arc<Wal>,
    replicas: Vec<Replica>,
    rng: Rng,
    now_tick: u64,
    now_ms: u64,
    /// Highest Lsn this node has written.
    written_lsn: Lsn,
    /// Highest Lsn reported durable.
    synced_lsn: Lsn,
    rounds: VecDeque<PendingRound>,
    out: Output,
    compact_due: bool,
    counters: NodeCounters,
    /// A failure seen while stepping a peer's message, returned by the next round.
    fatal: Option<NodeError>,
    /// Why the last peer message was dropped, for the shell's (rate-limited) log.
    last_peer_rejection: Option<String>,
    /// Bytes of log reads left in this round (`read_bytes_per_round_max`); 0 after a round
    /// means reads were put off, so another round is due.
    read_budget: u64,
}

impl Node {
    /// Starts the node's groups from its log: every group this node hosts resumes from its
    /// last compaction point (state machine snapshot) and re-applies its committed entries.
    /// A group never seen before is created with every member as a voter.
    pub fn open(config: NodeConfig, wal: Arc<Wal>) -> Result<Node, NodeError> {
        assert!(
            config.members.contains(&config.id),
            "{} is not a member of its store",
            config.id
        );
        assert!(config.timing.lease_ticks < config.timing.election_ticks as u64);
        let rng = Rng::new(config.seed);
        let mut bootstrap = WriteBatch::new();
        let mut configured: Vec<u64> = config.members.iter().map(|n| n.0).collect();
        configured.sort_unstable();
        for g in 0..config.layout.groups {
            let group = GroupId(u64::from(g));
            let mut log = wal.group(group)?.conf_state.voters;
            log.sort_unstable();
            if !log.is_empty() && log != configured {
                return Err(NodeError::Members {
                    group,
                    log,
                    configured,
                });
            }
            if log.is_empty() {
                bootstrap.conf_state(
                    group,
                    phxq_storage::ConfState {
                        voters: config.members.iter().map(|n| n.0).collect(),
                        ..Default::default()
                    },
                );
            }
        }
        if !bootstrap.is_empty() {
            let lsn = wal.write(&bootstrap)?;
            wal.sync_to(lsn)?;
        }
        let replicas = (0..config.layout.groups)
            .map(|g| Replica::open(&config, GroupId(u64::from(g)), wal.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Node {
            config,
            wal,
            replicas,
            rng,
            now_tick: 0,
            now_ms: 0,
            written_lsn: 0,
            synced_lsn: 0,
            rounds: VecDeque::new(),
            out: Output::default(),
            compact_due: false,
            read_budget: u64::MAX,
            counters: NodeCounters::default(),
            fatal: None,
            last_peer_rejection: None,
        })
    }

    /// This node.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The node's log.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Ticks since open.
    pub fn now_tick(&self) -> u64 {
        self.now_tick
    }

    /// The highest term any group wrote to the log (the shell keeps it durable outside the
    /// log, so a node whose log goes missing knows it ran before: see `server.rs`).
    pub fn term_max(&self) -> u64 {
        self.replicas
            .iter()
            .map(Replica::written_term)
            .max()
            .unwrap_or(0)
    }

    /// Groups still catching up after `--rejoin-empty` (they neither vote nor campaign).
    pub fn rejoining_groups(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_rejoining()).count()
    }

    /// One tick of time; `now_ms` is the wall clock (ms since the Unix epoch), stamped on
    /// batches this node proposes as master.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_tick += 1;
        // Never backwards: a wall clock stepped back must not make a new batch older than
        // the last one this node stamped.
        self.now_ms = self.now_ms.max(now_ms);
        let timing = &self.config.timing;
        for replica in &mut self.replicas {
            replica.set_now(self.now_tick);
            let skip = !replica.is_leader() && self.rng.chance(1, timing.skip_tick_one_in);
            if !skip {
                replica.tick();
            }
            replica.expire_waiters(self.now_tick, &mut self.out.responses);
        }
        if self.now_tick.is_multiple_of(timing.rebalance_ticks) {
            for replica in &mut self.replicas {
                replica.rebalance(&self.config, self.now_tick);
            }
        }
        if self.now_tick.is_multiple_of(timing.compact_ticks) {
            self.compact_due = true;
        }
    }

    /// Raft messages from peer `from`. Messages for unknown groups or not addressed to this
    /// node are dropped (a peer of another store, or a bug there).
    pub fn step(&mut self, from: NodeId, messages: Vec<(GroupId, eraftpb::Message)>) {
        self.step_heard_at(from, messages, self.now_tick);
    }

    /// [`Node::step`] for messages that arrived at tick `heard_tick` or later but are stepped
    /// only now (the shell was held up, then caught its ticks up first): a master counts a
    /// peer's answer toward its lease as heard at `heard_tick`, never later, so a stall never
    /// stretches a lease; everything else (a follower's election timer reset by a heartbeat)
    /// happens now, which is the safe side for a follower.
    pub fn step_heard_at(
        &mut self,
        from: NodeId,
        messages: Vec<(GroupId, eraftpb::Message)>,
        heard_tick: u64,
    ) {
        let heard_tick = heard_tick.min(self.now_tick);
        for (group, message) in messages {
            if message.to != self.config.id.0 || message.from != from.0 {
                continue;
            }
            if let Some(replica) = usize::try_from(group.0)
                .ok()
                .and_then(|g| self.replicas.get_mut(g))
                && let Err(refusal) = replica.step(message, heard_tick)
            {
                match refusal {
                    StepRefusal::Fatal(error) => {
                        self.fatal.get_or_insert(error);
                    }
                    StepRefusal::Dropped(reason) => {
                        self.counters.peer_messages_rejected += 1;
                        self.last_peer_rejection = Some(format!("{from}, {group}: {reason}"));
                    }
                }
            }
        }
    }

    /// The counters so far (what [`Node::status`] reports, without building the rest).
    pub fn status_counters(&self) -> NodeCounters {
        self.counters
    }

    /// Why the last peer message was dropped before stepping, if any was (counted in
    /// [`NodeCounters::peer_messages_rejected`]).
    pub fn last_peer_rejection(&self) -> Option<&str> {
        self.last_peer_rejection.as_deref()
    }

    /// A client request; its answer comes out of a later round (or this one's `tick`s for a
    /// long poll that times out).
    pub fn request(&mut self, id: RequestId, request: Request) {
        if let Err(response) = self.admit(id, request) {
            self.out.responses.push((id, response));
        }
    }

    fn admit(&mut self, id: RequestId, request: Request) -> Result<(), Response> {
        let request = match request {
            Request::ProduceMany { appends } => return self.admit_appends(id, appends),
            Request::PutTopic {
                group,
                config,
                mode,
            } => {
                return self.admit_topic_change(id, group, Command::PutTopic { config, mode });
            }
            Request::DeleteTopic { group, name } => {
                return self.admit_topic_change(id, group, Command::DeleteTopic { name });
            }
            other => other,
        };
        let (topic, queue) = match &request {
            Request::Status => {
                self.out
                    .responses
                    .push((id, Response::Status(self.status())));
                return Ok(());
            }
            Request::ProduceMany { .. }
            | Request::PutTopic { .. }
            | Request::DeleteTopic { .. } => {
                unreachable!("admitted above")
            }
            Request::Produce { topic, queue, .. }
            | Request::Consume { topic, queue, .. }
            | Request::Commit { topic, queue, .. }
            | Request::Receive { topic, queue, .. }
            | Request::Ack { topic, queue, .. }
            | Request::Nack { topic, queue, .. }
            | Request::OffsetForTime { topic, queue, .. } => (topic.clone(), *queue),
        };
        check_arguments(&request)?;
        if let Request::Consume { .. } | Request::Receive { .. } = request {
            self.check_long_polls()?;
        } else {
            self.check_pending()?;
        }
        let group = group_of_queue(queue, self.config.layout.groups);
        let tick_ms = self.config.timing.tick_ms;
        let replica = &mut self.replicas[group.0 as usize];
        replica.check_master(self.now_tick)?;
        // Against the group's topic table as applied here, under the lease: every topic
        // change any master acknowledged is in it.
        check_request(replica.machine(), &request)?;
        match request {
            Request::Produce {
                message_id,
                messages,
                ..
            } => replica.admit_commands(
                id,
                vec![Command::Enqueue {
                    topic,
                    queue,
                    message_id,
                    messages,
                }],
                AnswerAs::One,
            ),
            Request::Commit {
                consumer_group,
                offset,
                ..
            } => replica.admit_commands(
                id,
                vec![Command::CommitCursor {
                    consumer_group,
                    topic,
                    queue,
                    offset,
                }],
                AnswerAs::One,
            ),
            Request::Consume {
                consumer_group,
                from,
                count_max,
                bytes_max,
                wait_ticks,
                ..
            } => {
                let deadline = self.now_tick + wait_ticks;
                replica.admit_consume(
                    id,
                    crate::replica::Consume {
                        topic,
                        queue,
                        consumer_group,
                        from,
                        count_max,
                        bytes_max: bytes_max.min(self.config.consume_answer_bytes_max),
                        deadline,
                    },
                );
                Ok(())
            }
            Request::Receive {
                consumer_group,
                count_max,
                bytes_max,
                wait_ticks,
                ack_timeout_ms,
                ..
            } => {
                let receive = crate::replica::Receive {
                    topic,
                    queue,
                    consumer_group,
                    count_max,
                    bytes_max: bytes_max.min(self.config.consume_answer_bytes_max),
                    deadline: self.now_tick + wait_ticks,
                    ack_timeout_ms: stretched(ack_timeout_ms, ACK_TIMEOUT_MS_MAX, tick_ms),
                };
                replica.admit_receive(id, receive);
                Ok(())
            }
            Request::Ack {
                consumer_group,
                mut offsets,
                ..
            } => {
                offsets.sort_unstable();
                offsets.dedup();
                let command = Command::Ack {
                    consumer_group,
                    topic,
                    queue,
                    offsets,
                };
                replica.admit_commands(id, vec![command], AnswerAs::One)
            }
            Request::Nack {
                consumer_group,
                mut offsets,
                delay_ms,
                ..
            } => {
                offsets.sort_unstable();
                offsets.dedup();
                let command = Command::Nack {
                    consumer_group,
                    topic,
                    queue,
                    offsets,
                    delay_ms: stretched(delay_ms, NACK_DELAY_MS_MAX, tick_ms),
                };
                replica.admit_commands(id, vec![command], AnswerAs::One)
            }
            Request::OffsetForTime { time_ms, .. } => {
                // A read of the applied state under the lease, like a Consume that finds
                // messages at once: every acknowledged write is applied here already.
                let answer = replica.offset_for_time(&topic, queue, time_ms)?;
                self.out.responses.push((id, answer));
                Ok(())
            }
            Request::Status
            | Request::ProduceMany { .. }
            | Request::PutTopic { .. }
            | Request::DeleteTopic { .. } => unreachable!("handled above"),
        }
    }

    /// Admits a [`Request::ProduceMany`]: every append checked, all in one group, one proposal.
    fn admit_appends(&mut self, id: RequestId, appends: Vec<Append>) -> Result<(), Response> {
        let Some(first) = appends.first() else {
            return Err(Response::error(ErrorCode::EmptyBatch, "no appends"));
        };
        let group = group_of_queue(first.queue, self.config.layout.groups);
        self.check_pending()?;
        let replica = &mut self.replicas[group.0 as usize];
        replica.check_master(self.now_tick)?;
        check_appends(replica.machine(), &appends)?;
        let commands = appends
            .into_iter()
            .map(|a| Command::Enqueue {
                topic: a.topic,
                queue: a.queue,
                message_id: a.message_id,
                messages: a.messages,
            })
            .collect();
        replica.admit_commands(id, commands, AnswerAs::Many)
    }

    /// Admits a topic change for one group: the group exists, this node masters it, and the
    /// group's table as applied here accepts the change.
    fn admit_topic_change(
        &mut self,
        id: RequestId,
        group: GroupId,
        command: Command,
    ) -> Result<(), Response> {
        let groups = self.config.layout.groups;
        if group.0 >= u64::from(groups) {
            return Err(Response::error(
                ErrorCode::InvalidArgument,
                format!(
                    "the store has groups g0 to g{}; there is no {group}",
                    groups - 1
                ),
            ));
        }
        self.check_pending()?;
        let replica = &mut self.replicas[group.0 as usize];
        replica.check_master(self.now_tick)?;
        replica.admit_commands(id, vec![command], AnswerAs::One)
    }

    /// `BUSY` if the node already holds as many requests as it may.
    fn check_pending(&self) -> Result<(), Response> {
        let pending = self.count_pending();
        if pending >= self.config.requests_pending_max {
            return Err(Response::error(
                ErrorCode::Busy,
                format!("{pending} requests are waiting; retry later"),
            ));
        }
        Ok(())
    }

    /// `BUSY` if as many long polls are parked as may be.
    fn check_long_polls(&self) -> Result<(), Response> {
        let parked: usize = self.replicas.iter().map(Replica::long_polls_parked).sum();
        if parked >= self.config.long_polls_parked_max {
            return Err(Response::error(
                ErrorCode::Busy,
                format!("{parked} long polls are parked; retry later"),
            ));
        }
        Ok(())
    }

    /// The log is durable up to `lsn` (a sync the shell ran for [`Output::sync`]).
    pub fn synced(&mut self, lsn: Lsn) {
        self.counters.syncs += 1;
        self.synced_lsn = self.synced_lsn.max(lsn);
        self.release_durable_rounds();
    }

    fn release_durable_rounds(&mut self) {
        #[allow(unused_mut)]
        let mut durable = self.synced_lsn;
        #[cfg(feature = "canary")]
        if self.config.canary_ack_before_sync {
            durable = self.written_lsn;
        }
        while let Some(round) = self.rounds.front() {
            if round.lsn > durable {
                break;
            }
            let round = self.rounds.pop_front().expect("front exists");
            for (g, number) in round.readies {
                self.replicas[g].persisted(number);
            }
            for (group, message) in round.held {
                push_message(&mut self.out, group, message);
            }
        }
    }

    /// Runs one round: proposes what clients sent to the groups this node masters, collects
    /// every group's `Ready`, writes all of them to the log with one write, applies what is
    /// committed and durable, and returns what to send. Call it after every input.
    pub fn round(&mut self) -> Result<Output, NodeError> {
        if let Some(error) = self.fatal.take() {
            return Err(error);
        }
        self.counters.rounds += 1;
        for replica in &mut self.replicas {
            replica.propose_pending(
                &self.config,
                self.now_ms,
                &mut self.out.responses,
                &mut self.counters,
            );
        }
        let mut batch = WriteBatch::new();
        if std::mem::take(&mut self.compact_due) {
            for replica in &mut self.replicas {
                replica.compact(&self.config, self.now_ms, &mut batch, &mut self.counters);
            }
        }
        let mut readies = Vec::new();
        let mut held = Vec::new();
        for (g, replica) in self.replicas.iter_mut().enumerate() {
            if let Some(ready) =
                replica.collect_ready(&mut batch, &mut self.out, &mut held, &mut self.counters)?
            {
                readies.push((g, ready));
            }
        }
        if !batch.is_empty() {
            self.written_lsn = self.wal.write(&batch)?;
            self.counters.writes += 1;
        }
        let mut numbers = Vec::with_capacity(readies.len());
        for (g, ready) in readies {
            numbers.push((g, self.replicas[g].advance(ready)));
        }
        if !numbers.is_empty() || !held.is_empty() {
            self.rounds.push_back(PendingRound {
                lsn: self.written_lsn,
                readies: numbers,
                held,
            });
        }
        self.release_durable_rounds();
        if self.written_lsn > self.synced_lsn {
            self.out.sync = Some(self.written_lsn);
        }
        self.read_budget = self.config.read_bytes_per_round_max;
        // The read budget goes round the groups from a different one each round, so a group
        // with many large reads cannot starve the others' reads.
        let groups = self.replicas.len();
        let first = (self.counters.rounds % groups as u64) as usize;
        for g in (first..groups).chain(0..first) {
            let replica = &mut self.replicas[g];
            let budget = &mut self.read_budget;
            replica.serve_waiters(&self.wal, self.now_tick, budget, &mut self.out.responses);
            replica.serve_receivers(
                &self.wal,
                self.now_tick,
                self.now_ms,
                budget,
                &mut self.out.responses,
            );
        }
        Ok(std::mem::take(&mut self.out))
    }

    /// True if a round would do something now (a group has a `Ready` or proposals wait).
    pub fn has_work(&self) -> bool {
        self.compact_due
            || self.fatal.is_some()
            || !self.out.is_empty()
            || self.read_budget == 0
            || self.replicas.iter().any(Replica::has_work)
    }

    /// This node's view of every group.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.config.id,
            groups: self
                .replicas
                .iter()
                .map(|r| r.status(self.now_tick, self.config.timing.tick_ms))
                .collect(),
            counters: self.counters,
        }
    }

    /// Groups this node masters with a valid lease.
    pub fn mastered_groups(&self) -> Vec<GroupId> {
        self.replicas
            .iter()
            .filter(|r| r.lease_remaining(self.now_tick).is_some())
            .map(Replica::group)
            .collect()
    }

    /// The messages of `queue` of `topic` this node holds, read from its own log without
    /// regard to mastership (for checkers and operators): every retained message, in order.
    pub fn read_all(&self, topic: &str, queue: QueueId) -> Vec<StoredMessage> {
        let group = group_of_queue(queue, self.config.layout.groups);
        self.replicas[group.0 as usize].read_all(&self.wal, topic, queue)
    }

    fn count_pending(&self) -> usize {
        self.replicas.iter().map(Replica::requests_pending).sum()
    }
}

pub(crate) fn push_message(out: &mut Output, group: GroupId, message: eraftpb::Message) {
    out.messages
        .entry(NodeId(message.to))
        .or_default()
        .push((group, message));
}

/// An ack timeout or nack delay (at most `max`) stretched by one tick, as far as `max`
/// allows: batches are stamped with the clock read at the last tick, up to a tick before the
/// request arrived, so without it a message could come back up to a tick early.
fn stretched(ms: u64, max: u64, tick_ms: u64) -> u64 {
    ms.saturating_add(tick_ms).min(max.max(ms))
}

/// The checks of a request's arguments that need no topic table.
fn check_arguments(request: &Request) -> Result<(), Response> {
    let refusal = match request {
        Request::Consume {
            count_max,
            bytes_max,
            from,
            ..
        } if *count_max == 0 || *bytes_max == 0 || *from == Some(0) => {
            "count and bytes limits must be positive and offsets start at 1".to_string()
        }
        Request::Commit { offset: 0, .. } => "offsets start at 1".to_string(),
        Request::Receive {
            count_max,
            bytes_max,
            ..
        } if *count_max == 0 || *bytes_max == 0 => {
            "count and bytes limits must be positive".to_string()
        }
        Request::Receive { ack_timeout_ms, .. }
            if !(1..=ACK_TIMEOUT_MS_MAX).contains(ack_timeout_ms) =>
        {
            format!(
                "ack timeout {ack_timeout_ms} ms; it must be 1 to {ACK_TIMEOUT_MS_MAX} ms (a day)"
            )
        }
        Request::Ack { offsets, .. } | Request::Nack { offsets, .. }
            if offsets.is_empty() || offsets.len() > DELIVERY_OFFSETS_MAX =>
        {
            format!(
                "{} offsets; name 1 to {DELIVERY_OFFSETS_MAX}",
                offsets.len()
            )
        }
        Request::Ack { offsets, .. } | Request::Nack { offsets, .. } if offsets.contains(&0) => {
            "offsets start at 1".to_string()
        }
        Request::Nack { delay_ms, .. } if *delay_ms > NACK_DELAY_MS_MAX => {
            format!("nack delay {delay_ms} ms; at most {NACK_DELAY_MS_MAX} ms (a week)")
        }
        Request::OffsetForTime { time_ms, .. } if *time_ms > TIME_MS_MAX => format!(
            "time {time_ms} ms is after 9999-12-31T23:59:59.999Z ({TIME_MS_MAX} ms); times \
             are milliseconds since the Unix epoch"
        ),
        _ => return Ok(()),
    };
    Err(Response::error(ErrorCode::InvalidArgument, refusal))
}

/// The checks of a queue request against the group's topic table (`machine`, as applied on
/// the master): the topic and queue exist, the consumer group reads the topic, the messages
/// fit. Applying checks again (the deterministic backstop).
fn check_request(machine: &GroupMachine, request: &Request) -> Result<(), Response> {
    let (topic, queue, consumer_group) = match request {
        Request::Produce {
            topic,
            queue,
            message_id,
            messages,
        } => return check_append(machine, topic, *queue, message_id, messages),
        Request::Consume {
            topic,
            queue,
            consumer_group,
            ..
        }
        | Request::Commit {
            topic,
            queue,
            consumer_group,
            ..
        }
        | Request::Receive {
            topic,
            queue,
            consumer_group,
            ..
        }
        | Request::Ack {
            topic,
            queue,
            consumer_group,
            ..
        }
        | Request::Nack {
            topic,
            queue,
            consumer_group,
            ..
        } => (topic, *queue, Some(consumer_group)),
        Request::OffsetForTime { topic, queue, .. } => (topic, *queue, None),
        _ => return Ok(()),
    };
    let config = check_queue(machine, topic, queue)?;
    if let Some(group) = consumer_group
        && !config.consumer_groups.contains(group)
    {
        return Err(Response::error(
            ErrorCode::UnknownConsumerGroup,
            format!("consumer group {group:?} does not read topic {topic:?}"),
        ));
    }
    Ok(())
}

/// The topic's config if `queue` of `topic` exists.
fn check_queue<'a>(
    machine: &'a GroupMachine,
    topic: &str,
    queue: QueueId,
) -> Result<&'a TopicConfig, Response> {
    let Some(config) = machine.topic(topic) else {
        return Err(Response::error(
            ErrorCode::UnknownTopic,
            format!("no topic {topic:?} in this store"),
        ));
    };
    if queue >= config.queues {
        return Err(Response::error(
            ErrorCode::UnknownQueue,
            format!(
                "topic {topic:?} has {} queues; there is no queue {queue}",
                config.queues
            ),
        ));
    }
    Ok(config)
}

/// Checks one queue's append: the queue exists, the batch is not empty, no message is too
/// large, the message id is not too long.
fn check_append(
    machine: &GroupMachine,
    topic: &str,
    queue: QueueId,
    message_id: &[u8],
    messages: &[Message],
) -> Result<(), Response> {
    check_queue(machine, topic, queue)?;
    if message_id.len() > MESSAGE_ID_BYTES_MAX {
        return Err(Response::error(
            ErrorCode::InvalidArgument,
            format!(
                "message id of {} bytes; at most {MESSAGE_ID_BYTES_MAX}",
                message_id.len()
            ),
        ));
    }
    if messages.is_empty() {
        return Err(Response::error(ErrorCode::EmptyBatch, "no messages"));
    }
    let message_bytes_max = machine.layout().message_bytes_max;
    for (i, m) in messages.iter().enumerate() {
        if m.value.len() > message_bytes_max || m.key.len() > KEY_BYTES_MAX {
            return Err(Response::error(
                ErrorCode::MessageTooLarge,
                format!(
                    "message {i}: value {} bytes (limit {message_bytes_max}), key {} bytes \
                     (limit {KEY_BYTES_MAX})",
                    m.value.len(),
                    m.key.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks every append of a [`Request::ProduceMany`] against the table of the first one's
/// group (`machine`), and that they all share that group. The first bad append is named by
/// its position.
fn check_appends(machine: &GroupMachine, appends: &[Append]) -> Result<(), Response> {
    let Some(first) = appends.first() else {
        return Err(Response::error(ErrorCode::EmptyBatch, "no appends"));
    };
    let groups = machine.layout().groups;
    let group = machine.group();
    for (i, append) in appends.iter().enumerate() {
        let other = group_of_queue(append.queue, groups);
        if other != group {
            return Err(Response::error(
                ErrorCode::InvalidArgument,
                format!(
                    "append {i}: queue {} is in {other}, append 0's queue {} in {group}; \
                     one request writes one replication group (queue q is in group q mod \
                     {groups})",
                    append.queue, first.queue
                ),
            ));
        }
        let checked = check_append(
            machine,
            &append.topic,
            append.queue,
            &append.message_id,
            &append.messages,
        );
        checked.map_err(|refusal| match refusal {
            Response::Error { code, message, .. } => {
                Response::error(code, format!("append {i}: {message}"))
            }
            other => other,
        })?;
    }
    Ok(())
}
