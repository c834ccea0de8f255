//! The in-process cluster the node tests pump by hand: three real `Node`s over real logs in
//! temporary directories, no threads and no sockets. The test owns the clock (one tick of
//! [`TICK_MS`] at a time, each node with its own offset) and the network (every message
//! between nodes passes a [`Filter`] it can change), so a story about leases, votes or a
//! peer's bad message replays exactly. Shared by `lease.rs`, `peer_filter.rs` and
//! `restart_and_time.rs`; each uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use phxq_core::{Message, Retention, StoreLayout, TopicConfig};
use phxq_node::{Node, NodeConfig, Output, Request, RequestId, Response};
use phxq_storage::{Wal, WalOptions};
use phxq_types::{GroupId, NodeId};
use raft::eraftpb;

/// Raft messages for (or from) one node, each with its group.
pub type Messages = Vec<(GroupId, eraftpb::Message)>;

/// One tick of every node's clock, in milliseconds.
pub const TICK_MS: u64 = 50;
/// Ticks a store may take to elect a master with a lease (the default timing needs a few
/// dozen; a hand-pumped store never waits on a real clock, so this only bounds a bug).
pub const ELECT_TICKS_MAX: usize = 400;

/// What the network does with one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    Drop,
    /// Kept in `Store::held` until the test releases it.
    Hold,
}

/// Decides each message's [`Fate`]: `(from, to, message)`.
pub type Filter = Box<dyn FnMut(NodeId, NodeId, &eraftpb::Message) -> Fate>;

/// The layout of every test store: one group, one topic `t` of one queue read by group `g`.
pub fn layout(retention: Retention) -> Arc<StoreLayout> {
    Arc::new(StoreLayout {
        groups: 1,
        topics: vec![TopicConfig {
            name: "t".to_string(),
            queues: 1,
            consumer_groups: vec!["g".to_string()],
            retention,
            dedup_window: 0,
            group_settings: Default::default(),
        }],
        message_bytes_max: 1 << 20,
    })
}

/// Retention that releases nothing.
pub fn keep_everything() -> Retention {
    Retention {
        replay_count: 0,
        replay_age_ms: 0,
        max_age_ms: None,
        max_bytes: None,
    }
}

/// Node `id` of the three with the default timing, keeping everything.
pub fn default_config(id: NodeId) -> NodeConfig {
    let members: Vec<NodeId> = (1..=3).map(NodeId).collect();
    NodeConfig::new(id, members, layout(keep_everything()), id.0 * 7919)
}

/// Three nodes; node `i` is `nodes[i]`, id `i + 1`.
pub struct Store {
    _dirs: Vec<tempfile::TempDir>,
    pub nodes: Vec<Node>,
    pub wals: Vec<Arc<Wal>>,
    /// The true time; node `i` reads `now_ms + clock_offsets_ms[i]`.
    pub now_ms: u64,
    pub clock_offsets_ms: Vec<i64>,
    pub filter: Filter,
    pub held: Vec<(NodeId, NodeId, Messages)>,
    pub responses: BTreeMap<RequestId, Response>,
    pub next_request: RequestId,
}

impl Store {
    /// Three nodes of [`default_config`], clocks at 0 and agreeing.
    pub fn new() -> Store {
        Store::with(default_config, 0, vec![0; 3])
    }

    /// Three nodes of `config(id)`, the true time at `now_ms`, node `i`'s clock off by
    /// `clock_offsets_ms[i]`; every message delivered until the test sets a filter.
    pub fn with(
        config: impl Fn(NodeId) -> NodeConfig,
        now_ms: u64,
        clock_offsets_ms: Vec<i64>,
    ) -> Store {
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        let mut wals = Vec::new();
        for id in (1..=3).map(NodeId) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open log");
            let wal = Arc::new(wal);
            nodes.push(Node::open(config(id), wal.clone()).expect("open node"));
            wals.push(wal);
            dirs.push(dir);
        }
        Store {
            _dirs: dirs,
            nodes,
            wals,
            now_ms,
            clock_offsets_ms,
            filter: Box::new(|_, _, _| Fate::Deliver),
            held: Vec::new(),
            responses: BTreeMap::new(),
            next_request: 1,
        }
    }

    /// Runs node `i`'s rounds until it has no work, syncing as the server does; returns the
    /// messages it sends, per destination, and keeps its answers.
    pub fn drain(&mut self, i: usize) -> BTreeMap<NodeId, Messages> {
        let mut sent: BTreeMap<NodeId, Messages> = BTreeMap::new();
        for _ in 0..64 {
            let Output {
                messages,
                responses,
                sync,
            } = self.nodes[i].round().expect("round");
            self.responses.extend(responses);
            for (to, batch) in messages {
                sent.entry(to).or_default().extend(batch);
            }
            if let Some(lsn) = sync {
                self.sync(i, lsn);
            }
            if !self.nodes[i].has_work() {
                break;
            }
        }
        sent
    }

    /// Syncs node `i`'s log through `lsn` and tells the node, as the server does.
    pub fn sync(&mut self, i: usize, lsn: u64) {
        let durable = self.wals[i].sync_to(lsn).expect("sync");
        self.nodes[i].synced(durable.max(lsn));
    }

    /// Delivers what the nodes send (through the filter) until nothing moves.
    pub fn pump(&mut self) {
        for _ in 0..16 {
            let mut delivered = false;
            for i in 0..self.nodes.len() {
                let from = NodeId(i as u64 + 1);
                for (to, batch) in self.drain(i) {
                    let mut deliver = Vec::new();
                    for (group, message) in batch {
                        match (self.filter)(from, to, &message) {
                            Fate::Deliver => deliver.push((group, message)),
                            Fate::Drop => {}
                            Fate::Hold => self.held.push((from, to, vec![(group, message)])),
                        }
                    }
                    if !deliver.is_empty() {
                        delivered = true;
                        self.nodes[(to.0 - 1) as usize].step(from, deliver);
                    }
                }
            }
            if !delivered {
                break;
            }
        }
    }

    /// Advances the true time by one tick and ticks node `i` alone, at its own clock.
    pub fn tick_one(&mut self, i: usize) {
        self.now_ms += TICK_MS;
        self.nodes[i].tick(self.now_ms.saturating_add_signed(self.clock_offsets_ms[i]));
    }

    /// One tick everywhere (each node at its own clock), then the messages.
    pub fn step_all(&mut self) {
        self.now_ms += TICK_MS;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.tick(self.now_ms.saturating_add_signed(self.clock_offsets_ms[i]));
        }
        self.pump();
    }

    /// Steps every held message into its node, then lets the store run.
    pub fn release_held(&mut self) {
        for (from, to, batch) in std::mem::take(&mut self.held) {
            self.nodes[(to.0 - 1) as usize].step(from, batch);
        }
        self.pump();
    }

    pub fn lease_ms(&self, i: usize) -> Option<u64> {
        self.nodes[i].status().groups[0].lease_remaining_ms
    }

    /// The master with a lease, once the store has elected one.
    pub fn elect(&mut self) -> usize {
        for _ in 0..ELECT_TICKS_MAX {
            self.step_all();
            if let Some(i) = (0..3).find(|&i| self.lease_ms(i).is_some()) {
                return i;
            }
        }
        panic!("no master with a lease after {ELECT_TICKS_MAX} ticks");
    }

    /// Sends `request` to node `i`, runs the store until it is answered, returns the answer.
    pub fn call(&mut self, i: usize, request: Request) -> Response {
        let id = self.next_request;
        self.next_request += 1;
        self.nodes[i].request(id, request);
        for _ in 0..100 {
            self.pump();
            if let Some(response) = self.responses.remove(&id) {
                return response;
            }
            self.step_all();
        }
        panic!("request {id} unanswered after 100 ticks");
    }

    /// Produces `value` to queue 0 of `t` at node `i` and runs the store until answered.
    pub fn produce(&mut self, i: usize, value: &str) -> Response {
        self.call(i, produce_request(value))
    }
}

/// A produce of one keyless `value` to queue 0 of topic `t`.
pub fn produce_request(value: &str) -> Request {
    Request::Produce {
        topic: "t".to_string(),
        queue: 0,
        message_id: Vec::new(),
        messages: vec![Message {
            key: Vec::new(),
            value: value.as_bytes().to_vec(),
        }],
    }
}
