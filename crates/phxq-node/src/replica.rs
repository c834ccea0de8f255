//! One replication group on one node: its raft-rs `RawNode`, its queue state machine, the
//! client requests waiting on it, and its master lease.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use phxq_core::machine::budget_refusal_reason;
use phxq_core::{Applied, Batch, Command, GroupMachine, StoredMessage, encode_batch};
use phxq_storage::raft_storage::{conf_state_from_raft, entry_from_raft, hard_state_from_raft};
use phxq_storage::{GroupStorage, Wal, WriteBatch};
use phxq_types::{ErrorCode, GroupId, NodeId, Offset, QueueId};
use raft::eraftpb::{self, MessageType};
use raft::{RawNode, Ready, StateRole};

use crate::node::{NodeConfig, NodeCounters, NodeError, Output, RequestId, Response, push_message};
use crate::{GroupStatus, node};

/// Entries a master proposes per group per round at most. The rest of a backlog waits for
/// the next round (after this round's sync), so a backlog of admitted produces costs one
/// round at most this many full entries of write and fsync, never the whole backlog at once:
/// a round that long would hold heartbeats back past the lease.
pub(crate) const ENTRIES_PER_ROUND_MAX: usize = 2;

/// A consume request parked until messages arrive or its deadline passes.
#[derive(Clone, Debug)]
pub(crate) struct Consume {
    pub topic: String,
    pub queue: QueueId,
    pub consumer_group: String,
    pub from: Option<Offset>,
    pub count_max: u64,
    pub bytes_max: u64,
    pub deadline: u64,
}

/// A receive request parked until something is deliverable or its deadline passes.
#[derive(Clone, Debug)]
pub(crate) struct Receive {
    pub topic: String,
    pub queue: QueueId,
    pub consumer_group: String,
    pub count_max: u64,
    pub bytes_max: u64,
    /// The tick the long poll ends at.
    pub deadline: u64,
    pub ack_timeout_ms: u64,
}

/// (consumer group, topic, queue): what at most one proposed `Deliver` at a time is for.
type DeliveryKey = (String, String, QueueId);

impl Receive {
    /// What at most one proposed `Deliver` at a time may be for.
    fn key(&self) -> DeliveryKey {
        (self.consumer_group.clone(), self.topic.clone(), self.queue)
    }
}

/// An admitted request's commands, proposed together in one entry (never split: a request
/// for several queues is applied all at once or not at all).
struct Proposal {
    id: RequestId,
    commands: Vec<Command>,
    bytes: usize,
    answer: AnswerAs,
}

/// How a request's applied commands are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AnswerAs {
    /// One command: `Produced` or `Committed`.
    One,
    /// Enqueues to several queues: `ProducedMany`, one range per command.
    Many,
    /// One `Deliver` of a receive: `Received`, with the messages read before proposing.
    Deliver,
}

/// Marks a follower's append rejection sent while it rejoins with an empty log
/// (`--rejoin-empty`): the master then forgets how much of its log it believed this node had
/// (raft-rs never lowers a peer's `matched`, so it would wait forever for entries the node
/// lost, and its heartbeats would carry a commit past the node's log).
pub(crate) const REJOIN_CONTEXT: &[u8] = b"phxq-rejoin-empty";

/// A group of a node started with `--rejoin-empty`, until it caught up.
#[derive(Clone, Copy, Debug, Default)]
struct Rejoin {
    /// The highest commit index a master sent this node.
    target: u64,
    /// Whether a master's append or snapshot reached it (only those carry the master's commit).
    heard: bool,
}

/// Requests proposed in one entry, in command order: whose, how many commands, how answered.
struct InFlight {
    term: u64,
    requests: Vec<(RequestId, usize, AnswerAs)>,
}

pub(crate) struct Replica {
    group: GroupId,
    me: NodeId,
    members: Vec<NodeId>,
    raw: RawNode<GroupStorage>,
    machine: GroupMachine,
    /// Admitted requests not yet proposed.
    proposals: VecDeque<Proposal>,
    /// Proposed entries by raft index.
    in_flight: BTreeMap<u64, InFlight>,
    waiters: Vec<(RequestId, Consume)>,
    /// The applied index at which `waiters[..n]` were last read and found empty: while
    /// nothing new is applied they stay empty, so a round reads only the waiters after them
    /// (new ones, or ones a spent read budget put off). Without it every round re-read every
    /// parked long poll, and thousands of them cost more CPU than the produces.
    waiters_seen: (u64, usize),
    /// Receives waiting for something to deliver.
    receivers: Vec<(RequestId, Receive)>,
    /// Receives whose `Deliver` is proposed: for what, and the messages read for it (offsets
    /// below a queue's end never change, so they are read before proposing). At most one
    /// per (consumer group, topic, queue), so a selection is not raced by another one.
    delivering: BTreeMap<RequestId, (DeliveryKey, Vec<StoredMessage>)>,
    /// Per peer, the tick of the last answer received in the current term (lease).
    acks: BTreeMap<u64, u64>,
    /// The term of the last entry applied: a master serves only once it applied an entry of
    /// its own term (its state is then complete).
    applied_term: u64,
    leader_since: u64,
    /// The term and vote last written, to know when a `Ready` changes them.
    written_term_vote: (u64, u64),
    /// The number of the newest ready that changed the term or vote, until it is durable.
    term_vote_unsynced: Option<u64>,
    /// When a snapshot was last sent to each peer (to retry a lost one).
    snapshot_sent: BTreeMap<u64, u64>,
    timing: node::Timing,
    layout: Arc<phxq_core::StoreLayout>,
    now_tick: u64,
    /// The last committed entry applied from the ready being handled.
    applied_from_ready: Option<u64>,
    /// A snapshot installed by a ready (its number) at an index, applied once durable.
    snapshot_pending: Option<(u64, u64)>,
    /// The deletable index of the last compaction refused for a snapshot over the log's
    /// limit (0: none).
    compaction_refused_at: u64,
    /// The index of the last entry this node proposed as master.
    last_proposed: u64,
    /// No vote is granted before this tick: one election timeout after start, so a restarted
    /// node that forgot whom it voted for cannot vote twice in a term a master is still
    /// known in (raft-rs's followers refuse votes within a lease of hearing a master; a
    /// restarted one has heard none).
    votes_from_tick: u64,
    /// While the group rejoins with an empty log (`--rejoin-empty`).
    rejoin: Option<Rejoin>,
    /// A marked rejection to send to a master whose heartbeat claimed more than this
    /// rejoining node has (an idle group's master sends no append that could be rejected).
    rejoin_reply: Option<eraftpb::Message>,
    /// No lease before this tick: set when this master sends `MsgTimeoutNow`, whose target
    /// may be elected (transfer votes ignore followers' leases) as late as the message
    /// arrives, even after the transfer was aborted here.
    lease_void_until: u64,
}

/// Why a peer's message was not stepped.
#[derive(Debug)]
pub(crate) enum StepRefusal {
    /// Dropped: a type a peer never sends, or fields raft-rs would panic on or be misled by.
    Dropped(crate::peer_filter::Rejection),
    /// The message shows this node lost its log: the node must stop.
    Fatal(NodeError),
}

impl Replica {
    pub(crate) fn open(
        config: &NodeConfig,
        group: GroupId,
        wal: Arc<Wal>,
    ) -> Result<Replica, NodeError> {
        let info = wal.group(group)?;
        let machine = if info.snapshot.is_empty() {
            GroupMachine::new(group, config.layout.clone())
        } else {
            GroupMachine::restore(group, config.layout.clone(), &info.snapshot).map_err(|e| {
                NodeError::BadEntry {
                    group,
                    index: info.first_index - 1,
                    reason: format!("snapshot: {e}"),
                }
            })?
        };
        let timing = &config.timing;
        let raft_config = raft::Config {
            id: config.id.0,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            min_election_tick: timing.election_ticks,
            max_election_tick: timing.election_ticks + 1,
            applied: info.first_index - 1,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 256 << 20,
            // Off: raft-rs 0.7's append batching merged a later append into an earlier message
            // with the wrong previous index (the simulator caught a follower acknowledging
            // entries it did not have).
            batch_append: false,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, GroupStorage::new(wal, group), &logger)
            .map_err(|source| NodeError::Raft { group, source })?;
        let hs = &info.hard_state;
        Ok(Replica {
            group,
            me: config.id,
            members: config.members.clone(),
            raw,
            machine,
            proposals: VecDeque::new(),
            in_flight: BTreeMap::new(),
            waiters: Vec::new(),
            waiters_seen: (0, 0),
            receivers: Vec::new(),
            delivering: BTreeMap::new(),
            acks: BTreeMap::new(),
            applied_term: 0,
            leader_since: 0,
            written_term_vote: (hs.term, hs.vote),
            term_vote_unsynced: None,
            snapshot_sent: BTreeMap::new(),
            timing: config.timing.clone(),
            layout: config.layout.clone(),
            now_tick: 0,
            applied_from_ready: None,
            snapshot_pending: None,
            compaction_refused_at: 0,
            last_proposed: 0,
            votes_from_tick: timing.election_ticks as u64,
            rejoin: config.rejoin_empty.then(Rejoin::default),
            rejoin_reply: None,
            lease_void_until: 0,
        })
    }

    pub(crate) fn group(&self) -> GroupId {
        self.group
    }

    /// The group's state as applied here.
    pub(crate) fn machine(&self) -> &GroupMachine {
        &self.machine
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub(crate) fn set_now(&mut self, now_tick: u64) {
        self.now_tick = now_tick;
    }

    pub(crate) fn tick(&mut self) {
        self.end_rejoin_if_caught_up();
        // A rejoining group never campaigns: its log is not one a store may be led from.
        if self.rejoin.is_none() {
            self.raw.tick();
        }
    }

    /// The highest term this group wrote to the log.
    pub(crate) fn written_term(&self) -> u64 {
        self.written_term_vote.0
    }

    pub(crate) fn is_rejoining(&self) -> bool {
        self.rejoin.is_some()
    }

    /// Whether this group may grant a vote now (see `votes_from_tick` and `rejoin`).
    fn may_vote(&self) -> bool {
        self.now_tick >= self.votes_from_tick && self.rejoin.is_none()
    }

    fn end_rejoin_if_caught_up(&mut self) {
        if let Some(rejoin) = self.rejoin
            && rejoin.heard
            && self.raw.raft.raft_log.committed >= rejoin.target
            && self.now_tick >= self.votes_from_tick
        {
            self.rejoin = None;
        }
    }

    /// Steps a peer's message. Vote requests are dropped while this group may not vote. A
    /// heartbeat whose commit is past an empty log (raft-rs would panic) means this node's
    /// log was lost: an error, unless the operator said so (`--rejoin-empty`). Everything
    /// else passes [`crate::peer_filter::check`] first, or is dropped with the reason.
    pub(crate) fn step(
        &mut self,
        mut message: eraftpb::Message,
        now_tick: u64,
    ) -> Result<(), StepRefusal> {
        let from = message.from;
        let term = message.term;
        let kind = message.get_msg_type();
        let vote = matches!(
            kind,
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        // A transfer to a rejoining node (a master's stale view of its log) would make it
        // campaign on a log it lost.
        let campaign = kind == MessageType::MsgTimeoutNow && self.rejoin.is_some();
        if (vote && !self.may_vote()) || campaign {
            return Ok(());
        }
        // A node with a log of its own that hears of a commit past it is misled (a buggy
        // peer): the filter drops that. An empty one was wiped (see `check_heartbeat_commit`).
        if kind == MessageType::MsgHeartbeat
            && (self.rejoin.is_some() || self.raw.raft.raft_log.last_index() == 0)
        {
            self.check_heartbeat_commit(&mut message)
                .map_err(StepRefusal::Fatal)?;
        }
        let mut voters: Vec<u64> = self.members.iter().map(|m| m.0).collect();
        voters.sort_unstable();
        crate::peer_filter::check(&self.raw.raft, &voters, &message)
            .map_err(StepRefusal::Dropped)?;
        self.note_rejoin_progress(&message);
        if kind == MessageType::MsgAppendResponse && message.reject {
            self.forget_lost_progress(&message);
        }
        let answer = matches!(
            kind,
            MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
        );
        // Errors here are a peer's message raft does not take (a stale or local-only type):
        // dropping it is what raft expects.
        let _ = self.raw.step(message);
        if answer
            && term == self.raw.raft.term
            && self.is_leader()
            && now_tick >= self.lease_void_until
        {
            self.acks.insert(from, now_tick);
        }
        self.end_rejoin_if_caught_up();
        Ok(())
    }

    /// A heartbeat carries `min(matched, committed)` for this node: past its last index only
    /// if the master saw it hold entries it no longer has.
    fn check_heartbeat_commit(&mut self, message: &mut eraftpb::Message) -> Result<(), NodeError> {
        let log = &self.raw.raft.raft_log;
        if message.term < self.raw.raft.term {
            return Ok(());
        }
        if message.commit <= log.last_index() {
            // An idle master sends heartbeats only, which do not say how far its log is
            // committed: ask it for an append (see `forget_lost_progress`), which does.
            if self.rejoin.is_some_and(|rejoin| !rejoin.heard) {
                self.rejoin_reply = Some(self.rejoin_rejection(message));
            }
            return Ok(());
        }
        let Some(rejoin) = &mut self.rejoin else {
            return Err(NodeError::LostLog {
                group: self.group,
                master: message.from,
                term: message.term,
                commit: message.commit,
                last_index: log.last_index(),
            });
        };
        rejoin.target = rejoin.target.max(message.commit);
        // Tell the master it holds less than it believes (it then starts over from what this
        // node has: `forget_lost_progress`), and claim nothing new in the answer.
        self.rejoin_reply = Some(self.rejoin_rejection(message));
        message.commit = self.raw.raft.raft_log.committed;
        Ok(())
    }

    /// The marked append rejection a rejoining group answers a heartbeat with: "I hold up to
    /// my last index; send from there".
    fn rejoin_rejection(&self, heartbeat: &eraftpb::Message) -> eraftpb::Message {
        let mut reply = eraftpb::Message::default();
        reply.set_msg_type(MessageType::MsgAppendResponse);
        reply.to = heartbeat.from;
        reply.from = self.me.0;
        reply.term = heartbeat.term;
        reply.index = heartbeat.commit;
        reply.reject = true;
        reply.reject_hint = self.raw.raft.raft_log.last_index();
        reply.context = REJOIN_CONTEXT.to_vec().into();
        reply
    }

    fn note_rejoin_progress(&mut self, message: &eraftpb::Message) {
        let Some(rejoin) = &mut self.rejoin else {
            return;
        };
        if matches!(
            message.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgSnapshot
        ) && message.term >= self.raw.raft.term
        {
            rejoin.heard = true;
            rejoin.target = rejoin.target.max(message.commit);
        }
    }

    /// On a master: a rejoining follower (marked rejection) holds less than the master
    /// believed; start its progress over from nothing (lowering `matched` only delays
    /// commits, never makes one unsafe), so it is probed and sent a snapshot if need be.
    fn forget_lost_progress(&mut self, message: &eraftpb::Message) {
        if !self.is_leader()
            || message.context.as_ref() != REJOIN_CONTEXT
            || message.term != self.raw.raft.term
        {
            return;
        }
        let Some(progress) = self.raw.raft.mut_prs().get_mut(message.from) else {
            return;
        };
        if progress.matched > message.reject_hint {
            progress.matched = 0;
            progress.become_probe();
        }
        // An append, even an empty one, carries the commit index the follower must reach
        // before it votes again; an idle group would otherwise send heartbeats only.
        self.raw.raft.send_append(message.from);
    }

    /// Marks what this node sends while rejoining; voids the lease when it hands mastership
    /// over.
    fn note_outgoing(&mut self, message: &mut eraftpb::Message) {
        match message.get_msg_type() {
            MessageType::MsgAppendResponse if message.reject && self.rejoin.is_some() => {
                message.context = REJOIN_CONTEXT.to_vec().into();
            }
            MessageType::MsgTimeoutNow => {
                // The target may be elected whenever this arrives; until then plus the time
                // its votes take, a lease here could overlap its mastership.
                self.acks.clear();
                self.lease_void_until = self.now_tick + self.timing.election_ticks as u64;
            }
            _ => {}
        }
    }

    /// Requests admitted and not yet answered, long polls left out: they have their own
    /// limit ([`Replica::long_polls_parked`]), so parked reads never make a produce `BUSY`.
    pub(crate) fn requests_pending(&self) -> usize {
        self.proposals.len()
            + self
                .in_flight
                .values()
                .map(|f| f.requests.len())
                .sum::<usize>()
    }

    /// Consumes and receives parked (waiting for messages), or proposed (a receive's
    /// `Deliver`).
    pub(crate) fn long_polls_parked(&self) -> usize {
        self.waiters.len() + self.receivers.len() + self.delivering.len()
    }

    pub(crate) fn has_work(&self) -> bool {
        self.raw.has_ready()
            || (!self.proposals.is_empty() && self.is_leader() && !self.writing_proposal())
    }

    /// True while this master's last proposed entry is not yet on its own disk. New
    /// proposals wait for it and then go together in one entry: adaptive group commit, with
    /// no timer. Waiting costs no latency, since a proposal written during a sync could only
    /// be covered by the next sync anyway.
    fn writing_proposal(&self) -> bool {
        self.last_proposed > self.raw.raft.raft_log.persisted
    }

    /// Ticks left on this master's lease, if it is master and holds one: a majority (itself
    /// included) answered within `lease_ticks`.
    fn lease_left(&self, now_tick: u64) -> Option<u64> {
        if !self.is_leader() || now_tick < self.lease_void_until {
            return None;
        }
        // Peers never heard from in this term count as None, which sorts last.
        let mut heard: Vec<Option<u64>> = self
            .members
            .iter()
            .map(|m| {
                if *m == self.me {
                    Some(now_tick)
                } else {
                    self.acks.get(&m.0).copied()
                }
            })
            .collect();
        heard.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_heard = heard[self.members.len() / 2]?;
        (quorum_heard + self.timing.lease_ticks)
            .checked_sub(now_tick)
            .filter(|&left| left > 0)
    }

    pub(crate) fn lease_remaining(&self, now_tick: u64) -> Option<u64> {
        self.lease_left(now_tick)
            .filter(|_| self.applied_term == self.raw.raft.term)
    }

    fn master_hint(&self) -> Response {
        let leader = self.raw.raft.leader_id;
        if leader != 0 && leader != self.me.0 {
            Response::Error {
                code: ErrorCode::NotMaster,
                message: format!("{} is not the master of {}", self.me, self.group),
                master: Some(NodeId(leader)),
            }
        } else {
            Response::error(
                ErrorCode::NoMaster,
                format!("{} has no master with a valid lease right now", self.group),
            )
        }
    }

    /// Ok if this node may serve the group: master, lease valid, its term's state applied.
    pub(crate) fn check_master(&self, now_tick: u64) -> Result<(), Response> {
        if self.raw.raft.lead_transferee.is_none() && self.lease_remaining(now_tick).is_some() {
            Ok(())
        } else {
            Err(self.master_hint())
        }
    }

    /// Queues a request's commands for the next entry, if the state allows every one of
    /// them; otherwise nothing is queued.
    pub(crate) fn admit_commands(
        &mut self,
        id: RequestId,
        commands: Vec<Command>,
        answer: AnswerAs,
    ) -> Result<(), Response> {
        for command in &commands {
            if let Command::PutTopic { .. } | Command::DeleteTopic { .. } = command {
                (self.machine.check_topic_change(command))
                    .map_err(|(code, reason)| Response::error(code, reason))?;
                continue;
            }
            if let Command::Deliver { .. } | Command::Ack { .. } | Command::Nack { .. } = command {
                (self.machine.check_delivery(command))
                    .map_err(|(code, reason)| Response::error(code, reason))?;
                continue;
            }
            self.machine
                .check(command)
                .map_err(|code| Response::error(code, describe_refusal(code, command)))?;
        }
        let bytes = commands.iter().map(command_bytes).sum();
        self.proposals.push_back(Proposal {
            id,
            commands,
            bytes,
            answer,
        });
        Ok(())
    }

    pub(crate) fn admit_consume(&mut self, id: RequestId, consume: Consume) {
        self.waiters.push((id, consume));
    }

    pub(crate) fn admit_receive(&mut self, id: RequestId, receive: Receive) {
        self.receivers.push((id, receive));
    }

    /// Where `queue` of `topic` reaches `time_ms`, from the applied state. The caller checked
    /// the lease ([`Replica::check_master`]): every write acknowledged by any master is
    /// applied here, so the answer is as fresh as a read at the cursor would be.
    pub(crate) fn offset_for_time(
        &self,
        topic: &str,
        queue: QueueId,
        time_ms: u64,
    ) -> Result<Response, Response> {
        let not_hosted = || Response::error(ErrorCode::UnknownQueue, "queue not hosted here");
        let offset = (self.machine)
            .offset_for_time(topic, queue, time_ms)
            .ok_or_else(not_hosted)?;
        let end_offset = self
            .machine
            .end_offset(topic, queue)
            .ok_or_else(not_hosted)?;
        Ok(Response::OffsetForTime { offset, end_offset })
    }

    /// Packs admitted commands into entries (bounded by count and bytes) and proposes them.
    pub(crate) fn propose_pending(
        &mut self,
        config: &NodeConfig,
        now_ms: u64,
        responses: &mut Vec<(RequestId, Response)>,
        counters: &mut NodeCounters,
    ) {
        if self.proposals.is_empty() {
            return;
        }
        if !self.is_leader() {
            let hint = self.master_hint();
            responses.extend(self.proposals.drain(..).map(|p| (p.id, hint.clone())));
            return;
        }
        if self.writing_proposal() {
            return;
        }
        for _ in 0..ENTRIES_PER_ROUND_MAX {
            if self.proposals.is_empty() {
                break;
            }
            let mut batch = Batch {
                time_ms: now_ms,
                commands: Vec::new(),
            };
            let mut requests = Vec::new();
            let mut bytes = 0;
            while let Some(next) = self.proposals.front() {
                if !batch.commands.is_empty()
                    && (batch.commands.len() + next.commands.len() > config.batch_commands_max
                        || bytes + next.bytes > config.batch_bytes_max)
                {
                    break;
                }
                let proposal = self.proposals.pop_front().expect("front exists");
                bytes += proposal.bytes;
                requests.push((proposal.id, proposal.commands.len(), proposal.answer));
                batch.commands.extend(proposal.commands);
            }
            let term = self.raw.raft.term;
            let commands = batch.commands.len() as u64;
            let messages: u64 = batch
                .commands
                .iter()
                .map(|c| match c {
                    Command::Enqueue { messages, .. } => messages.len() as u64,
                    Command::CommitCursor { .. }
                    | Command::PutTopic { .. }
                    | Command::DeleteTopic { .. }
                    | Command::Deliver { .. }
                    | Command::Ack { .. }
                    | Command::Nack { .. } => 0,
                })
                .sum();
            match self.raw.propose(Vec::new(), encode_batch(&batch)) {
                Ok(()) => {
                    self.last_proposed = self.raw.raft.raft_log.last_index();
                    counters.proposals += 1;
                    counters.commands += commands;
                    counters.messages += messages;
                    let index = self.raw.raft.raft_log.last_index();
                    self.in_flight.insert(index, InFlight { term, requests });
                }
                Err(error) => {
                    let response = Response::error(
                        ErrorCode::NoMaster,
                        format!("{} dropped the proposal: {error}", self.group),
                    );
                    for (id, ..) in requests {
                        self.delivering.remove(&id);
                        responses.push((id, response.clone()));
                    }
                }
            }
        }
    }

    /// Takes the group's `Ready`, if any: its writes go into `batch`, messages that may go
    /// now into `out`, messages that claim durability into `held`, and committed entries
    /// (already durable here) are applied. Returns the ready to [`Replica::advance`] once the
    /// batch is written.
    pub(crate) fn collect_ready(
        &mut self,
        batch: &mut WriteBatch,
        out: &mut Output,
        held: &mut Vec<(GroupId, eraftpb::Message)>,
        counters: &mut NodeCounters,
    ) -> Result<Option<Ready>, NodeError> {
        if !self.raw.has_ready() {
            return Ok(None);
        }
        let mut ready = self.raw.ready();
        let group = self.group;
        if let Some(soft) = ready.ss() {
            let leader = soft.raft_state == StateRole::Leader;
            self.on_role(leader, &mut out.responses);
        }
        if let Some(reply) = self.rejoin_reply.take() {
            push_message(out, group, reply);
        }
        for mut message in ready.take_messages() {
            self.note_snapshot_sent(&message);
            self.note_outgoing(&mut message);
            push_message(out, group, message);
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot(), batch)?;
            counters.snapshots_installed += 1;
            self.snapshot_pending = Some((ready.number(), ready.snapshot().get_metadata().index));
        }
        if !ready.entries().is_empty() {
            batch.append(group, ready.entries().iter().map(entry_from_raft));
        }
        if let Some(hs) = ready.hs() {
            if (hs.term, hs.vote) != self.written_term_vote {
                self.term_vote_unsynced = Some(ready.number());
            }
            self.written_term_vote = (hs.term, hs.vote);
            batch.hard_state(group, hard_state_from_raft(hs));
        }
        let committed = ready.take_committed_entries();
        if let Some(last) = committed.last() {
            self.applied_from_ready = Some(last.index);
        }
        self.apply(committed, &mut out.responses)?;
        for mut message in ready.take_persisted_messages() {
            self.note_outgoing(&mut message);
            // A heartbeat answer claims nothing about this node's log; while the term and vote
            // it speaks for are durable (this ready's and every earlier one's), it may go before
            // the sync, which keeps masters' leases alive while a slow fsync is in flight.
            if message.get_msg_type() == MessageType::MsgHeartbeatResponse
                && self.term_vote_unsynced.is_none()
            {
                push_message(out, group, message);
            } else {
                held.push((group, message));
            }
        }
        Ok(Some(ready))
    }

    /// After the round's write: the ready's data is readable through `Storage`.
    pub(crate) fn advance(&mut self, ready: Ready) -> u64 {
        let number = ready.number();
        self.raw.advance_append_async(ready);
        if let Some(applied) = self.applied_from_ready.take() {
            self.raw.advance_apply_to(applied);
        }
        number
    }

    /// The ready numbered `number` (and every earlier one) is durable.
    pub(crate) fn persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        if self.term_vote_unsynced.is_some_and(|ready| ready <= number) {
            self.term_vote_unsynced = None;
        }
        // A snapshot counts as applied only once it is durable: raft-rs checks that nothing
        // is applied beyond what is persisted.
        if let Some((ready, index)) = self.snapshot_pending
            && ready <= number
        {
            self.snapshot_pending = None;
            self.raw.advance_apply_to(index);
        }
    }

    fn on_role(&mut self, leader: bool, responses: &mut Vec<(RequestId, Response)>) {
        self.last_proposed = 0;
        if leader {
            self.acks.clear();
            self.leader_since = self.now_tick;
            return;
        }
        // Lost mastership: proposed entries may still commit under the next master, so
        // their fate is unknown; waiting reads go elsewhere.
        let hint = self.master_hint();
        for (_, flight) in std::mem::take(&mut self.in_flight) {
            responses.extend(flight.requests.into_iter().map(|(id, ..)| {
                (
                    id,
                    Response::error(
                        ErrorCode::Indeterminate,
                        "the master changed before the request committed; it may or may not \
                         have been applied",
                    ),
                )
            }));
        }
        responses.extend(self.waiters.drain(..).map(|(id, _)| (id, hint.clone())));
        responses.extend(self.receivers.drain(..).map(|(id, _)| (id, hint.clone())));
        self.delivering.clear();
    }

    fn note_snapshot_sent(&mut self, message: &eraftpb::Message) {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshot_sent.insert(message.to, 0);
        }
    }

    fn install_snapshot(
        &mut self,
        snapshot: &eraftpb::Snapshot,
        batch: &mut WriteBatch,
    ) -> Result<(), NodeError> {
        let metadata = snapshot.get_metadata();
        let machine = GroupMachine::restore(self.group, self.layout.clone(), &snapshot.data)
            .map_err(|e| NodeError::BadEntry {
                group: self.group,
                index: metadata.index,
                reason: format!("snapshot: {e}"),
            })?;
        self.machine = machine;
        self.applied_term = metadata.term;
        batch.install_snapshot(
            self.group,
            metadata.index,
            metadata.term,
            conf_state_from_raft(metadata.get_conf_state()),
            snapshot.data.to_vec(),
        );
        Ok(())
    }

    fn apply(
        &mut self,
        entries: Vec<eraftpb::Entry>,
        responses: &mut Vec<(RequestId, Response)>,
    ) -> Result<(), NodeError> {
        for entry in entries {
            if entry.index <= self.machine.applied_index() {
                continue;
            }
            let data: &[u8] = if entry.get_entry_type() == eraftpb::EntryType::EntryNormal {
                &entry.data
            } else {
                &[]
            };
            let results =
                self.machine
                    .apply(entry.index, data)
                    .map_err(|e| NodeError::BadEntry {
                        group: self.group,
                        index: entry.index,
                        reason: e.to_string(),
                    })?;
            self.applied_term = entry.term;
            let Some(flight) = self.in_flight.remove(&entry.index) else {
                continue;
            };
            if flight.term != entry.term {
                let response = Response::error(
                    ErrorCode::NotMaster,
                    "the entry was replaced by a new master's; it was not applied",
                );
                for (id, ..) in flight.requests {
                    self.delivering.remove(&id);
                    responses.push((id, response.clone()));
                }
                continue;
            }
            assert_eq!(
                results.len(),
                flight.requests.iter().map(|(_, n, _)| n).sum::<usize>(),
                "one result per command"
            );
            let mut results = results.into_iter();
            for (id, commands, answer) in flight.requests {
                let applied: Vec<Applied> = results.by_ref().take(commands).collect();
                let response = match answer {
                    AnswerAs::Deliver => {
                        let (_, messages) = self.delivering.remove(&id).expect("read before");
                        answer_delivered(applied, messages)
                    }
                    _ => answer_applied(answer, applied),
                };
                responses.push((id, response));
            }
        }
        Ok(())
    }

    /// Answers parked consumes that can be answered: messages arrived, or (on the master) the
    /// wait is zero. Non-masters have no waiters (they are failed over in `on_role`). Reads
    /// at most `read_budget` bytes of log (counted down); the waiters it does not reach stay
    /// parked, unseen, for a later round.
    pub(crate) fn serve_waiters(
        &mut self,
        wal: &Wal,
        now_tick: u64,
        read_budget: &mut u64,
        responses: &mut Vec<(RequestId, Response)>,
    ) {
        if self.waiters.is_empty() {
            return;
        }
        if self.check_master(now_tick).is_err() {
            let hint = self.master_hint();
            responses.extend(self.waiters.drain(..).map(|(id, _)| (id, hint.clone())));
            return;
        }
        let applied = self.machine.applied_index();
        let (seen_at, seen) = self.waiters_seen;
        let start = if seen_at == applied {
            seen.min(self.waiters.len())
        } else {
            0
        };
        let mut unseen = self.waiters.split_off(start);
        let mut rest = unseen.drain(..);
        let mut put_off = None;
        for (id, consume) in rest.by_ref() {
            if *read_budget == 0 {
                put_off = Some((id, consume));
                break;
            }
            match self.read(wal, &consume, read_budget) {
                Ok(response) => {
                    let empty = matches!(&response, Response::Consumed { messages, .. } if messages.is_empty());
                    if empty && consume.deadline > now_tick {
                        self.waiters.push((id, consume));
                    } else {
                        responses.push((id, response));
                    }
                }
                Err(response) => responses.push((id, response)),
            }
        }
        // Waiters up to here were read at `applied` and found empty; the ones the budget did
        // not reach come after them.
        self.waiters_seen = (applied, self.waiters.len());
        self.waiters.extend(put_off);
        self.waiters.extend(rest);
    }

    /// Proposes a `Deliver` for each parked receive that has something to deliver at
    /// `now_ms` (the time the next batch is stamped with, so the selection holds at apply)
    /// and no `Deliver` of its (consumer group, queue) in flight; the others keep waiting.
    pub(crate) fn serve_receivers(
        &mut self,
        wal: &Wal,
        now_tick: u64,
        now_ms: u64,
        read_budget: &mut u64,
        responses: &mut Vec<(RequestId, Response)>,
    ) {
        if self.receivers.is_empty() {
            return;
        }
        if self.check_master(now_tick).is_err() {
            let hint = self.master_hint();
            responses.extend(self.receivers.drain(..).map(|(id, _)| (id, hint.clone())));
            return;
        }
        for (id, receive) in std::mem::take(&mut self.receivers) {
            let key = receive.key();
            // Busy, or the round's read budget spent: wait for a later round.
            if *read_budget == 0 || self.delivering.values().any(|(busy, _)| *busy == key) {
                self.receivers.push((id, receive));
                continue;
            }
            match self.read_deliverable(wal, &receive, now_ms, read_budget) {
                // Nothing yet: wait, unless the wait is over (zero: answer at once).
                Ok(messages) if messages.is_empty() && receive.deadline > now_tick => {
                    self.receivers.push((id, receive));
                }
                Ok(messages) if messages.is_empty() => {
                    responses.push((
                        id,
                        Response::Received {
                            messages: Vec::new(),
                        },
                    ));
                }
                Ok(messages) => {
                    let mut commands = Vec::with_capacity(2);
                    let (group, topic, queue) =
                        (&receive.consumer_group, &receive.topic, receive.queue);
                    if let Some(oldest) = self.machine.released_below(group, topic, queue) {
                        commands.push(Command::CommitCursor {
                            consumer_group: group.clone(),
                            topic: topic.clone(),
                            queue,
                            offset: oldest,
                        });
                    }
                    let deliver = Command::Deliver {
                        consumer_group: receive.consumer_group,
                        topic: receive.topic,
                        queue: receive.queue,
                        offsets: messages.iter().map(|m| m.offset).collect(),
                        ack_timeout_ms: receive.ack_timeout_ms,
                    };
                    // Admitted like any command: one past the snapshot budget is refused now,
                    // with its reason, rather than when applied.
                    if let Err((code, reason)) = self.machine.check_delivery(&deliver) {
                        responses.push((id, Response::error(code, reason)));
                        continue;
                    }
                    commands.push(deliver);
                    self.proposals.push_back(Proposal {
                        id,
                        bytes: commands.iter().map(command_bytes).sum(),
                        commands,
                        answer: AnswerAs::Deliver,
                    });
                    self.delivering.insert(id, (key, messages));
                }
                Err(response) => responses.push((id, response)),
            }
        }
    }

    /// The messages a `Deliver` for `receive` would deliver at `now_ms`, read from the log:
    /// in offset order, within the count and bytes limits (at least one).
    fn read_deliverable(
        &self,
        wal: &Wal,
        receive: &Receive,
        now_ms: u64,
        read_budget: &mut u64,
    ) -> Result<Vec<StoredMessage>, Response> {
        let count_max = usize::try_from(receive.count_max).unwrap_or(usize::MAX);
        let offsets = (self.machine)
            .deliverable(
                &receive.consumer_group,
                &receive.topic,
                receive.queue,
                now_ms,
                count_max,
            )
            .ok_or_else(|| gone(&self.machine, receive))?;
        let mut messages: Vec<StoredMessage> = Vec::new();
        let mut bytes_left = receive.bytes_max;
        let mut rest = offsets.as_slice();
        while let Some(&first) = rest.first() {
            if bytes_left == 0 {
                break;
            }
            // A run of consecutive offsets is one read.
            let run = 1 + rest.windows(2).take_while(|w| w[1] == w[0] + 1).count();
            let consume = Consume {
                topic: receive.topic.clone(),
                queue: receive.queue,
                consumer_group: String::new(),
                from: Some(first),
                count_max: run as u64,
                bytes_max: bytes_left,
                deadline: 0,
            };
            if *read_budget == 0 && !messages.is_empty() {
                break;
            }
            let Response::Consumed { messages: got, .. } = self.read(wal, &consume, read_budget)?
            else {
                unreachable!("a read answers Consumed");
            };
            let wanted = first..first + run as u64;
            // Offsets below the oldest retained are not selected (`released_below`).
            for message in got.into_iter().filter(|m| wanted.contains(&m.offset)) {
                let bytes = (message.key.len() + message.value.len()) as u64;
                if !messages.is_empty() && bytes > bytes_left {
                    return Ok(messages);
                }
                bytes_left = bytes_left.saturating_sub(bytes);
                messages.push(message);
            }
            rest = &rest[run..];
        }
        Ok(messages)
    }

    pub(crate) fn expire_waiters(
        &mut self,
        now_tick: u64,
        responses: &mut Vec<(RequestId, Response)>,
    ) {
        self.receivers.retain(|(id, receive)| {
            if receive.deadline > now_tick {
                return true;
            }
            responses.push((
                *id,
                Response::Received {
                    messages: Vec::new(),
                },
            ));
            false
        });
        let machine = &self.machine;
        // Expired waiters leave the read-and-empty prefix too; keep its count exact.
        let (seen_at, seen_before) = self.waiters_seen;
        let mut seen = seen_before;
        let mut position = 0;
        self.waiters.retain(|(id, consume)| {
            position += 1;
            if consume.deadline > now_tick {
                return true;
            }
            if position <= seen_before {
                seen -= 1;
            }
            let end = machine
                .end_offset(&consume.topic, consume.queue)
                .unwrap_or(1);
            let next = consume.from.unwrap_or_else(|| {
                machine
                    .cursor(&consume.consumer_group, &consume.topic, consume.queue)
                    .unwrap_or(1)
            });
            responses.push((
                *id,
                Response::Consumed {
                    messages: Vec::new(),
                    next_offset: next,
                    end_offset: end,
                },
            ));
            false
        });
        self.waiters_seen = (seen_at, seen);
    }

    /// Reads what `consume` asks for, at most about `read_budget` bytes of log entries
    /// (counted down; at least one entry is read, so the first message always comes).
    fn read(
        &self,
        wal: &Wal,
        consume: &Consume,
        read_budget: &mut u64,
    ) -> Result<Response, Response> {
        let from = match consume.from {
            Some(from) => from,
            None => self
                .machine
                .cursor(&consume.consumer_group, &consume.topic, consume.queue)
                .ok_or_else(|| {
                    Response::error(ErrorCode::UnknownConsumerGroup, "no such cursor")
                })?,
        };
        let plan = self
            .machine
            .read_plan(&consume.topic, consume.queue, from, consume.count_max)
            .ok_or_else(|| Response::error(ErrorCode::UnknownQueue, "queue not hosted here"))?;
        let mut messages = Vec::new();
        let mut bytes_left = consume.bytes_max;
        for entry in &plan.entries {
            let count_left = consume.count_max - messages.len() as u64;
            if count_left == 0 || bytes_left == 0 || (*read_budget == 0 && !messages.is_empty()) {
                break;
            }
            let stored = wal
                .entries(self.group, entry.index, entry.index + 1, None)
                .map_err(|e| Response::error(ErrorCode::Unavailable, e.to_string()))?;
            let Some(stored) = stored.into_iter().next() else {
                break;
            };
            *read_budget = read_budget.saturating_sub(stored.data.len() as u64);
            let got = GroupMachine::extract(
                entry,
                &stored.data,
                &consume.topic,
                consume.queue,
                plan.start,
                count_left,
                bytes_left,
            )
            .map_err(|e| Response::error(ErrorCode::Unavailable, e.to_string()))?;
            for m in got {
                bytes_left = bytes_left.saturating_sub((m.key.len() + m.value.len()) as u64);
                messages.push(m);
            }
        }
        let next_offset = messages.last().map_or(plan.start, |m| m.offset + 1);
        Ok(Response::Consumed {
            messages,
            next_offset,
            end_offset: plan.end,
        })
    }

    /// Every retained message of a queue in this replica's log, in order.
    pub(crate) fn read_all(&self, wal: &Wal, topic: &str, queue: QueueId) -> Vec<StoredMessage> {
        let consume = Consume {
            topic: topic.to_string(),
            queue,
            consumer_group: String::new(),
            from: Some(1),
            count_max: u64::MAX,
            bytes_max: u64::MAX,
            deadline: 0,
        };
        let mut unbounded = u64::MAX;
        match self.read(wal, &consume, &mut unbounded) {
            Ok(Response::Consumed { messages, .. }) => messages,
            _ => Vec::new(),
        }
    }

    /// Hands mastership to the group's preferred node (members[g mod n]) once it is caught
    /// up, so masters spread evenly and a returning node gets its share back.
    pub(crate) fn rebalance(&mut self, config: &NodeConfig, now_tick: u64) {
        self.retry_lost_snapshots(now_tick);
        if !self.is_leader() || self.raw.raft.lead_transferee.is_some() {
            return;
        }
        let preferred = self.members[(self.group.0 % self.members.len() as u64) as usize];
        if preferred == self.me || now_tick < self.leader_since + config.timing.rebalance_ticks {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        let caught_up = self
            .raw
            .raft
            .prs()
            .get(preferred.0)
            .is_some_and(|p| p.matched + 64 >= last);
        let alive = self
            .acks
            .get(&preferred.0)
            .is_some_and(|&t| t + self.timing.lease_ticks >= now_tick);
        if caught_up && alive {
            self.raw.transfer_leader(preferred.0);
        }
    }

    fn retry_lost_snapshots(&mut self, now_tick: u64) {
        let timeout = 4 * self.timing.election_ticks as u64;
        let mut failed = Vec::new();
        for (peer, sent) in &mut self.snapshot_sent {
            if *sent == 0 {
                *sent = now_tick;
            }
            let still = self
                .raw
                .raft
                .prs()
                .get(*peer)
                .is_some_and(|p| p.state == raft::ProgressState::Snapshot);
            if !still {
                failed.push((*peer, false));
            } else if now_tick > *sent + timeout {
                failed.push((*peer, true));
            }
        }
        for (peer, lost) in failed {
            self.snapshot_sent.remove(&peer);
            if lost {
                self.raw
                    .report_snapshot(peer, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// Compacts the log behind every consumer group (and outside the replay window), when
    /// enough is deletable; the state machine at the compaction point goes with it so that a
    /// restart or a lagging follower can start from there.
    pub(crate) fn compact(
        &mut self,
        config: &NodeConfig,
        now_ms: u64,
        batch: &mut WriteBatch,
        counters: &mut NodeCounters,
    ) {
        let first = self.raw.raft.raft_log.first_index();
        let enough = first.saturating_sub(1) + config.compact_entries_min;
        // Retention by age runs on the time masters stamped in the log, never this node's
        // clock, so every replica releases the same entries.
        let deletable = self
            .machine
            .deletable_index(self.machine.log_time_ms())
            .min(self.raw.raft.raft_log.persisted);
        if deletable < enough {
            self.propose_time_if_it_releases(now_ms, enough);
            return;
        }
        if self.compaction_refused_at + config.compact_entries_min > deletable {
            return;
        }
        let snapshot = self.machine.snapshot(deletable);
        debug_assert!(snapshot.len() as u64 <= self.machine.usage().total_bytes());
        if snapshot.len() > phxq_storage::SNAPSHOT_BYTES_MAX {
            // The budget keeps snapshots far below the log's limit; only a state grown before
            // it was kept can be this large. Keeping the log (and serving) beats stopping on
            // every replica; retried once more entries are deletable. Growth is refused.
            self.compaction_refused_at = deletable;
            counters.compactions_refused += 1;
            return;
        }
        batch.compact(self.group, deletable, snapshot);
        self.machine.forget_through(deletable);
        counters.compactions += 1;
    }

    /// On a master of an idle group, the log's time stands still: when the time now would
    /// let a compaction happen that the log's time does not, propose an entry of no commands
    /// that carries the time (at most one per compaction check).
    fn propose_time_if_it_releases(&mut self, now_ms: u64, enough: u64) {
        if self.check_master(self.now_tick).is_err()
            || !self.proposals.is_empty()
            || self.writing_proposal()
            || now_ms <= self.machine.log_time_ms()
            || self.machine.deletable_index(now_ms) < enough
        {
            return;
        }
        let batch = Batch {
            time_ms: now_ms,
            commands: Vec::new(),
        };
        if self.raw.propose(Vec::new(), encode_batch(&batch)).is_ok() {
            self.last_proposed = self.raw.raft.raft_log.last_index();
        }
    }

    pub(crate) fn status(&self, now_tick: u64, tick_ms: u64) -> GroupStatus {
        let raft = &self.raw.raft;
        GroupStatus {
            group: self.group,
            master: (raft.leader_id != 0).then_some(NodeId(raft.leader_id)),
            term: raft.term,
            lease_remaining_ms: self.lease_remaining(now_tick).map(|t| t * tick_ms),
            commit_index: raft.raft_log.committed,
            applied_index: self.machine.applied_index(),
            last_index: raft.raft_log.last_index(),
            topics: self.machine.topics().cloned().collect(),
        }
    }
}

/// The answer to a request whose commands were applied with these results.
fn answer_applied(answer: AnswerAs, applied: Vec<Applied>) -> Response {
    // A command that passed admission is refused when applied only if a topic change
    // admitted before it applied first (deleted its topic, say); the request's other
    // commands in the entry still stand, and the error says so.
    if let Some(code) = applied.iter().find_map(|a| match a {
        Applied::Rejected(code) => Some(*code),
        _ => None,
    }) {
        return Response::error(code, refused_when_applied(code, None));
    }
    match (answer, applied.as_slice()) {
        (
            AnswerAs::One,
            [
                Applied::Enqueued {
                    first_offset,
                    count,
                    duplicate,
                },
            ],
        ) => Response::Produced {
            first_offset: *first_offset,
            count: *count,
            duplicate: *duplicate,
        },
        (AnswerAs::One, [Applied::CursorCommitted { .. }]) => Response::Committed,
        (AnswerAs::One, [Applied::TopicPut { changed }]) => {
            Response::TopicChanged { changed: *changed }
        }
        (AnswerAs::One, [Applied::TopicDeleted]) => Response::TopicChanged { changed: true },
        (AnswerAs::One, [Applied::Acked { cursor }]) => Response::Acked { cursor: *cursor },
        (AnswerAs::One, [Applied::Nacked]) => Response::Nacked,
        (AnswerAs::Many, _) => Response::ProducedMany {
            ranges: applied
                .iter()
                .filter_map(|a| match a {
                    Applied::Enqueued {
                        first_offset,
                        count,
                        duplicate,
                    } => Some((*first_offset, *count, *duplicate)),
                    _ => None,
                })
                .collect(),
        },
        (AnswerAs::One | AnswerAs::Deliver, other) => unreachable!("one command gave {other:?}"),
    }
}

/// Why a parked receive's topic or consumer group is no longer there (a topic change applied
/// while it waited).
fn gone(machine: &GroupMachine, receive: &Receive) -> Response {
    match machine.topic(&receive.topic) {
        None => Response::error(
            ErrorCode::UnknownTopic,
            format!("topic {:?} was deleted", receive.topic),
        ),
        Some(_) => Response::error(
            ErrorCode::UnknownConsumerGroup,
            format!(
                "consumer group {:?} no longer reads topic {:?}",
                receive.consumer_group, receive.topic
            ),
        ),
    }
}

/// The answer to a receive whose `Deliver` was applied: the messages read for it that it
/// delivered (an ack or commit applied first may have taken some), with their counts.
fn answer_delivered(applied: Vec<Applied>, messages: Vec<StoredMessage>) -> Response {
    if let Some(code) = applied.iter().find_map(|a| match a {
        Applied::Rejected(code) => Some(*code),
        _ => None,
    }) {
        let deliver = Command::Deliver {
            consumer_group: String::new(),
            topic: String::new(),
            queue: 0,
            offsets: Vec::new(),
            ack_timeout_ms: 0,
        };
        return Response::error(code, refused_when_applied(code, Some(&deliver)));
    }
    // A commit past released offsets may come first.
    let deliveries = match applied.as_slice() {
        [Applied::Delivered { deliveries }]
        | [
            Applied::CursorCommitted { .. },
            Applied::Delivered { deliveries },
        ] => deliveries,
        other => unreachable!("a Deliver gave {other:?}"),
    };
    let mut deliveries = deliveries.iter().peekable();
    let mut received = Vec::with_capacity(messages.len());
    for message in messages {
        if let Some(delivery) = deliveries.next_if(|d| d.offset == message.offset) {
            received.push(node::Received {
                message,
                delivery_count: delivery.delivery_count,
                deadline_ms: delivery.deadline_ms,
            });
        }
    }
    assert!(deliveries.next().is_none(), "delivered only what was read");
    Response::Received { messages: received }
}

fn command_bytes(command: &Command) -> usize {
    match command {
        Command::Enqueue { messages, .. } => messages
            .iter()
            .map(|m| m.key.len() + m.value.len() + 16)
            .sum(),
        Command::CommitCursor { .. } => 64,
        Command::PutTopic { config, .. } => {
            256 + config
                .consumer_groups
                .iter()
                .map(String::len)
                .sum::<usize>()
        }
        Command::DeleteTopic { name } => 16 + name.len(),
        Command::Deliver { offsets, .. }
        | Command::Ack { offsets, .. }
        | Command::Nack { offsets, .. } => 64 + 10 * offsets.len(),
    }
}

/// The message of a command refused when applied (admitted before another command of the
/// entry took what it needed).
fn refused_when_applied(code: ErrorCode, command: Option<&Command>) -> String {
    match code {
        ErrorCode::StateBudgetExceeded => {
            format!("refused when applied: {}", budget_refusal_reason(command))
        }
        _ => "refused when applied".to_string(),
    }
}

fn describe_refusal(code: ErrorCode, command: &Command) -> String {
    if code == ErrorCode::StateBudgetExceeded {
        return budget_refusal_reason(Some(command));
    }
    match command {
        Command::Enqueue { topic, queue, .. } => format!("enqueue to {topic}/{queue}: {code}"),
        Command::CommitCursor {
            consumer_group,
            topic,
            queue,
            offset,
        } => format!("commit {consumer_group} on {topic}/{queue} at {offset}: {code}"),
        Command::PutTopic { config, .. } => format!("put topic {}: {code}", config.name),
        Command::DeleteTopic { name } => format!("delete topic {name}: {code}"),
        Command::Deliver { topic, queue, .. }
        | Command::Ack { topic, queue, .. }
        | Command::Nack { topic, queue, .. } => format!("delivery on {topic}/{queue}: {code}"),
    }
}
