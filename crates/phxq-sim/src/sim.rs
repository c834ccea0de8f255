//! The event loop of one simulated run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phxq_core::{Message, Retention, StoreLayout, TopicConfig};
use phxq_node::{Append, Node, NodeConfig, Output, Request, RequestId, Response};
use phxq_storage::{Lsn, Wal, WalOptions};
use phxq_types::{ErrorCode, GroupId, NodeId, QueueId, Rng};
use raft::eraftpb;

use crate::disk::{CrashKind, DurableImage};
use crate::history::{Ack, History, ReplicaView, check};

const TOPIC: &str = "t";
const TICK_US: u64 = 50_000;
/// A client gives up on an answer after this long and retries (the outcome is unknown).
const CLIENT_TIMEOUT_US: u64 = 1_500_000;
/// The ack timeout of the simulated receivers (ms): what a receiver does not ack (a lost
/// answer, a nack, a crash of its node) comes back after it.
const RECEIVE_ACK_TIMEOUT_MS: u64 = 400;
/// Rounds one input may cause before the node is considered live-locked.
const ROUNDS_PER_INPUT_MAX: usize = 1_000;
/// Events one run may process (a bound on everything).
const EVENTS_MAX: u64 = 5_000_000;
/// Wall-clock epoch of simulated time, so batches carry plausible timestamps.
const EPOCH_MS: u64 = 1_800_000_000_000;
/// The topic's dedup window. Every enqueue carries its message's value as its producer
/// message id, and a retry reuses it: within this many enqueues of a queue, a retry appends
/// nothing (checked by `history::check_duplicates`). Small, so that ids also leave the
/// window during a run and retries after that append again.
const DEDUP_WINDOW: u32 = 64;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Fixes every random choice.
    pub seed: u64,
    /// Nodes in the store (3 or 5).
    pub nodes: usize,
    /// Replication groups.
    pub groups: u32,
    /// Queues of the one topic.
    pub queues: u32,
    /// Concurrent producers (each sends one message at a time to its own queue).
    pub producers: usize,
    /// Simulated milliseconds of load with faults.
    pub fault_ms: u64,
    /// Simulated milliseconds after the faults heal, for the consumers to drain.
    pub heal_ms: u64,
    /// Plant the ack-before-sync bug in every node.
    pub canary: bool,
}

impl SimConfig {
    /// The configuration a seed chooses: 3 or 5 nodes, a few groups and queues.
    pub fn for_seed(seed: u64) -> SimConfig {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let nodes = if rng.chance(1, 3) { 5 } else { 3 };
        let groups = 2 + rng.below(5) as u32;
        SimConfig {
            seed,
            nodes,
            groups,
            queues: groups * 2,
            producers: 4 + rng.below(5) as usize,
            fault_ms: 8_000,
            heal_ms: 8_000,
            canary: false,
        }
    }
}

/// What a clean run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub events: u64,
    /// Enqueues acknowledged.
    pub acked: usize,
    /// Requests whose outcome was unknown to the client.
    pub indeterminate: u64,
    /// Enqueues answered as duplicates (a retry whose id was in the dedup window).
    pub duplicates: u64,
    /// Deliveries to consumers.
    pub delivered: usize,
    /// Node crashes.
    pub crashes: u64,
    /// Messages dropped by the network.
    pub dropped: u64,
    /// Every node's counters, summed over every life.
    pub counters: phxq_node::NodeCounters,
}

fn add_counters(sum: &mut phxq_node::NodeCounters, c: &phxq_node::NodeCounters) {
    sum.rounds += c.rounds;
    sum.writes += c.writes;
    sum.syncs += c.syncs;
    sum.proposals += c.proposals;
    sum.commands += c.commands;
    sum.messages += c.messages;
    sum.snapshots_installed += c.snapshots_installed;
    sum.compactions += c.compactions;
}

/// A run whose checkers found violations (or whose node failed).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed that replays it.
    pub seed: u64,
    /// What went wrong, first ones first.
    pub violations: Vec<String>,
    /// The counters of the run.
    pub report: Box<Report>,
}

enum Event {
    Tick(usize),
    Deliver {
        from: usize,
        to: usize,
        messages: Vec<(GroupId, eraftpb::Message)>,
    },
    SyncDone {
        node: usize,
        epoch: u64,
    },
    Crash(usize),
    Restart(usize),
    Weather,
    Arrive {
        node: usize,
        epoch: u64,
        id: RequestId,
        request: Request,
    },
    Reply {
        id: RequestId,
        response: Response,
    },
    ClientTimeout {
        id: RequestId,
    },
    ClientGo(usize),
}

struct SimNode {
    dir: PathBuf,
    node: Option<Node>,
    /// Bumped at every crash: events of an earlier life are ignored.
    epoch: u64,
    image: DurableImage,
    sync_in_flight: bool,
    sync_wanted: Lsn,
    /// Tick period, skewed per node.
    tick_us: u64,
    /// Panicked: never restarted.
    dead: bool,
}

#[derive(Clone, Debug)]
enum ClientKind {
    Producer {
        index: usize,
        queue: QueueId,
        seq: u64,
    },
    Consumer {
        group: String,
        queue: QueueId,
    },
    /// Reads with per-message acknowledgement (`Receive`, then `Ack` or now and then `Nack`);
    /// what it leaves unacked comes back after the ack timeout.
    Receiver {
        group: String,
        queue: QueueId,
    },
}

struct Client {
    kind: ClientKind,
    /// The node it will ask next.
    target: usize,
    /// The request it waits on.
    waiting: Option<RequestId>,
    /// A consumer that read messages commits `next_offset` next.
    commit: Option<u64>,
    /// A receiver that received messages acks (or nacks) these next.
    received: Vec<u64>,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: BTreeMap<u64, Event>,
    nodes: Vec<SimNode>,
    layout: Arc<StoreLayout>,
    clients: Vec<Client>,
    requests: BTreeMap<RequestId, (usize, Request)>,
    next_request: RequestId,
    /// Directed links that drop everything.
    cut: BTreeSet<(usize, usize)>,
    history: History,
    report: Report,
    violations: Vec<String>,
    panics: Vec<String>,
    _root: TempRoot,
}

/// The run's directory, removed at the end.
struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_root(seed: u64) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let root = base.join(format!("phxq-sim-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create sim dir");
    root
}

/// Runs one simulation; `Err` lists the checkers' findings.
pub fn run(config: &SimConfig) -> Result<Report, Failure> {
    let mut sim = Sim::new(config.clone());
    sim.run();
    let mut violations = std::mem::take(&mut sim.violations);
    if violations.is_empty() {
        violations = sim.check();
    }
    violations.append(&mut sim.panics);
    sim.report.acked = sim.history.acks.len();
    sim.report.indeterminate = sim.history.indeterminate;
    sim.report.delivered = sim.history.deliveries.values().map(Vec::len).sum();
    sim.report.seed = config.seed;
    if violations.is_empty() {
        Ok(sim.report.clone())
    } else {
        Err(Failure {
            seed: config.seed,
            violations,
            report: Box::new(sim.report.clone()),
        })
    }
}

impl Event {
    /// The node an event runs on, if any.
    fn node(&self) -> Option<usize> {
        match self {
            Event::Tick(i) | Event::Crash(i) | Event::Restart(i) => Some(*i),
            Event::Deliver { to, .. } => Some(*to),
            Event::SyncDone { node, .. } | Event::Arrive { node, .. } => Some(*node),
            Event::Weather
            | Event::Reply { .. }
            | Event::ClientTimeout { .. }
            | Event::ClientGo(_) => None,
        }
    }
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = Rng::new(config.seed);
        let root = temp_root(config.seed);
        let consumer_groups = vec!["g1".to_string(), "g2".to_string()];
        let layout = Arc::new(StoreLayout {
            groups: config.groups,
            topics: vec![TopicConfig {
                name: TOPIC.to_string(),
                queues: config.queues,
                consumer_groups: consumer_groups.clone(),
                retention: Retention {
                    replay_count: 4,
                    replay_age_ms: 0,
                    max_age_ms: None,
                    max_bytes: None,
                },
                dedup_window: DEDUP_WINDOW,
                group_settings: Default::default(),
            }],
            message_bytes_max: 1 << 20,
        });
        layout.validate().expect("sim layout is valid");
        let nodes = (0..config.nodes)
            .map(|i| {
                let dir = root.join(format!("n{}", i + 1));
                std::fs::create_dir_all(&dir).expect("create node dir");
                // Skew: each node's tick runs up to 2% fast or slow.
                let skew = rng.below(401) as i64 - 200;
                SimNode {
                    dir,
                    node: None,
                    epoch: 0,
                    image: DurableImage::default(),
                    sync_in_flight: false,
                    sync_wanted: 0,
                    tick_us: (TICK_US as i64 + TICK_US as i64 * skew / 10_000) as u64,
                    dead: false,
                }
            })
            .collect();
        let mut clients = Vec::new();
        for index in 0..config.producers {
            clients.push(Client {
                kind: ClientKind::Producer {
                    index,
                    queue: (index as u32) % config.queues,
                    seq: 0,
                },
                target: rng.below(config.nodes as u64) as usize,
                waiting: None,
                commit: None,
                received: Vec::new(),
            });
        }
        for (g, group) in consumer_groups.iter().enumerate() {
            for queue in 0..config.queues {
                // The first group reads with cursors, the second with per-message acks.
                let group = group.clone();
                clients.push(Client {
                    kind: match g {
                        0 => ClientKind::Consumer { group, queue },
                        _ => ClientKind::Receiver { group, queue },
                    },
                    target: rng.below(config.nodes as u64) as usize,
                    waiting: None,
                    commit: None,
                    received: Vec::new(),
                });
            }
        }
        let mut sim = Sim {
            config,
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            nodes,
            layout,
            clients,
            requests: BTreeMap::new(),
            next_request: 1,
            cut: BTreeSet::new(),
            history: History::default(),
            report: Report::default(),
            violations: Vec::new(),
            panics: Vec::new(),
            _root: TempRoot(root),
        };
        for i in 0..sim.nodes.len() {
            sim.start_node(i);
        }
        for c in 0..sim.clients.len() {
            let at = sim.rng.below(500_000);
            sim.schedule(at, Event::ClientGo(c));
        }
        let at = 1_000_000 + sim.rng.below(1_000_000);
        sim.schedule(at, Event::Weather);
        sim
    }

    fn schedule(&mut self, after_us: u64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now + after_us, self.seq)));
        self.payloads.insert(self.seq, event);
    }

    fn faulty(&self) -> bool {
        self.now < self.config.fault_ms * 1000
    }

    fn run(&mut self) {
        let end = (self.config.fault_ms + self.config.heal_ms) * 1000;
        while let Some(Reverse((at, seq))) = self.events.pop() {
            let event = self.payloads.remove(&seq).expect("event payload");
            if at > end || !self.violations.is_empty() {
                break;
            }
            self.now = at;
            self.report.events += 1;
            if self.report.events > EVENTS_MAX {
                self.violations
                    .push(format!("more than {EVENTS_MAX} events: a busy loop"));
                break;
            }
            let node = event.node();
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(event)));
            if let Err(payload) = outcome {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let Some(i) = node else {
                    std::panic::resume_unwind(payload);
                };
                // A node that panics is gone for good (raft-rs panics when a peer's log
                // lost entries it had acknowledged); the run goes on so the checkers can say
                // what the clients lost.
                self.nodes[i].node = None;
                self.nodes[i].dead = true;
                self.panics
                    .push(format!("node {} panicked: {message}", i + 1));
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(i) => {
                let now_ms = EPOCH_MS + self.now / 1000;
                if let Some(node) = self.nodes[i].node.as_mut() {
                    node.tick(now_ms);
                    self.drive(i);
                    let period = self.nodes[i].tick_us;
                    self.schedule(period, Event::Tick(i));
                }
            }
            Event::Deliver { from, to, messages } => {
                if let Some(node) = self.nodes[to].node.as_mut() {
                    node.step(NodeId(from as u64 + 1), messages);
                    self.drive(to);
                }
            }
            Event::SyncDone { node, epoch } => self.sync_done(node, epoch),
            Event::Crash(i) => self.crash(i),
            Event::Restart(i) => {
                if self.nodes[i].node.is_none() && !self.nodes[i].dead {
                    self.start_node(i);
                }
            }
            Event::Weather => self.weather(),
            Event::Arrive {
                node,
                epoch,
                id,
                request,
            } => {
                if self.nodes[node].epoch == epoch
                    && let Some(n) = self.nodes[node].node.as_mut()
                {
                    n.request(id, request);
                    self.drive(node);
                }
            }
            Event::Reply { id, response } => self.client_reply(id, response),
            Event::ClientTimeout { id } => {
                if let Some((c, _)) = self.requests.remove(&id) {
                    self.history.indeterminate += 1;
                    self.clients[c].waiting = None;
                    self.clients[c].target = self.rng.below(self.nodes.len() as u64) as usize;
                    self.schedule(10_000, Event::ClientGo(c));
                }
            }
            Event::ClientGo(c) => self.client_go(c),
        }
    }

    fn start_node(&mut self, i: usize) {
        let sim_node = &mut self.nodes[i];
        // Small runs of zeros ahead, so crashes meet zero tails and the runs' extensions.
        let options = WalOptions {
            preallocate_bytes: 16 << 10,
            ..WalOptions::default()
        };
        let (wal, _report) = match Wal::open(&sim_node.dir, options) {
            Ok(opened) => opened,
            Err(e) => {
                self.violations
                    .push(format!("node {} does not reopen its log: {e}", i + 1));
                return;
            }
        };
        sim_node.image = DurableImage::capture(&sim_node.dir);
        let members = (1..=self.config.nodes as u64).map(NodeId).collect();
        let mut config = NodeConfig::new(
            NodeId(i as u64 + 1),
            members,
            self.layout.clone(),
            self.rng.next_u64(),
        );
        config.compact_entries_min = 32;
        config.canary_ack_before_sync = self.config.canary;
        match Node::open(config, Arc::new(wal)) {
            Ok(node) => sim_node.node = Some(node),
            Err(e) => {
                self.violations
                    .push(format!("node {} does not start: {e}", i + 1));
                return;
            }
        }
        sim_node.sync_in_flight = false;
        sim_node.sync_wanted = 0;
        let first = self.rng.below(TICK_US);
        self.schedule(first, Event::Tick(i));
    }

    /// Runs rounds until the node has nothing more to do, dispatching their output.
    fn drive(&mut self, i: usize) {
        for _ in 0..ROUNDS_PER_INPUT_MAX {
            let Some(node) = self.nodes[i].node.as_mut() else {
                return;
            };
            match node.round() {
                Ok(output) => self.dispatch(i, output),
                Err(e) => {
                    self.violations.push(format!("node {} failed: {e}", i + 1));
                    return;
                }
            }
            if !self.nodes[i].node.as_ref().is_some_and(Node::has_work) {
                return;
            }
        }
        self.violations.push(format!(
            "node {} still has work after {ROUNDS_PER_INPUT_MAX} rounds",
            i + 1
        ));
    }

    fn dispatch(&mut self, from: usize, output: Output) {
        for (to, messages) in output.messages {
            let to = (to.0 - 1) as usize;
            self.send(from, to, messages);
        }
        for (id, response) in output.responses {
            let delay = 100 + self.rng.below(900);
            self.schedule(delay, Event::Reply { id, response });
        }
        if let Some(lsn) = output.sync {
            let node = &mut self.nodes[from];
            node.sync_wanted = node.sync_wanted.max(lsn);
            if !node.sync_in_flight {
                self.start_sync(from);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, messages: Vec<(GroupId, eraftpb::Message)>) {
        if self.cut.contains(&(from, to)) || (self.faulty() && self.rng.chance(1, 100)) {
            self.report.dropped += 1;
            return;
        }
        let copies = if self.faulty() && self.rng.chance(1, 100) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.chance(1, 50) {
                5_000 + self.rng.below(30_000)
            } else {
                100 + self.rng.below(2_000)
            };
            self.schedule(
                delay,
                Event::Deliver {
                    from,
                    to,
                    messages: messages.clone(),
                },
            );
        }
    }

    /// A sync takes a while: from 50 us to 2 ms, and now and then a 40 ms stall.
    fn start_sync(&mut self, i: usize) {
        let delay = if self.rng.chance(1, 50) {
            40_000
        } else {
            50 + self.rng.below(2_000)
        };
        let node = &mut self.nodes[i];
        node.sync_in_flight = true;
        let epoch = node.epoch;
        self.schedule(delay, Event::SyncDone { node: i, epoch });
    }

    /// The sync happens now: everything written so far becomes durable.
    fn sync_done(&mut self, i: usize, epoch: u64) {
        let sim_node = &mut self.nodes[i];
        if sim_node.epoch != epoch {
            return;
        }
        let Some(node) = sim_node.node.as_mut() else {
            return;
        };
        sim_node.sync_in_flight = false;
        match node.wal().sync() {
            Ok(lsn) => {
                sim_node.image = DurableImage::capture(&sim_node.dir);
                node.synced(lsn);
            }
            Err(e) => {
                self.violations
                    .push(format!("node {} sync failed: {e}", i + 1));
                return;
            }
        }
        self.drive(i);
    }

    fn crash(&mut self, i: usize) {
        let sim_node = &mut self.nodes[i];
        let Some(node) = sim_node.node.take() else {
            return;
        };
        add_counters(&mut self.report.counters, &node.status().counters);
        self.report.crashes += 1;
        sim_node.epoch += 1;
        let kind = match self.rng.below(3) {
            0 => CrashKind::Tear,
            1 => CrashKind::LoseSectors,
            _ => CrashKind::LoseUnsynced,
        };
        sim_node.image.crash(&sim_node.dir, kind, &mut self.rng);
        let down = 200_000 + self.rng.below(3_000_000);
        self.schedule(down, Event::Restart(i));
    }

    /// Changes the weather every second or two while faults run: crashes, partitions, heals.
    fn weather(&mut self) {
        if !self.faulty() {
            self.cut.clear();
            for i in 0..self.nodes.len() {
                if self.nodes[i].node.is_none() && !self.nodes[i].dead {
                    self.schedule(0, Event::Restart(i));
                }
            }
            return;
        }
        let n = self.nodes.len();
        match self.rng.below(7) {
            6 => {
                // Power failure: every node crashes at the same instant.
                for i in 0..n {
                    self.schedule(0, Event::Crash(i));
                }
            }
            0 | 1 => {
                let i = self.rng.below(n as u64) as usize;
                let down = self.nodes.iter().filter(|s| s.node.is_none()).count();
                if down < n / 2 {
                    self.schedule(0, Event::Crash(i));
                }
            }
            2 => {
                // Isolate one node both ways.
                let i = self.rng.below(n as u64) as usize;
                self.cut.clear();
                for j in 0..n {
                    if j != i {
                        self.cut.insert((i, j));
                        self.cut.insert((j, i));
                    }
                }
            }
            3 => {
                // One-way: a node stops hearing one peer.
                let a = self.rng.below(n as u64) as usize;
                let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.cut.insert((a, b));
            }
            _ => self.cut.clear(),
        }
        let next = 800_000 + self.rng.below(1_500_000);
        self.schedule(next, Event::Weather);
    }

    fn client_go(&mut self, c: usize) {
        if self.clients[c].waiting.is_some() {
            return;
        }
        let request = match self.clients[c].kind.clone() {
            ClientKind::Producer { index, queue, seq } => {
                if !self.faulty() {
                    return; // producers stop when the faults do; consumers drain
                }
                let mut message = |seq: u64| {
                    let value = format!("p{index}-{seq}").into_bytes();
                    self.history.attempted.insert(value.clone());
                    vec![Message {
                        key: format!("k{index}").into_bytes(),
                        value,
                    }]
                };
                // One request in four appends two messages as two appends to the same queue
                // (one entry, several commands of one request).
                if self.rng.below(4) == 0 {
                    let appends = [seq, seq + 1]
                        .map(|seq| {
                            let messages = message(seq);
                            Append {
                                topic: TOPIC.to_string(),
                                queue,
                                message_id: messages[0].value.clone(),
                                messages,
                            }
                        })
                        .to_vec();
                    Request::ProduceMany { appends }
                } else {
                    let messages = message(seq);
                    Request::Produce {
                        topic: TOPIC.to_string(),
                        queue,
                        message_id: messages[0].value.clone(),
                        messages,
                    }
                }
            }
            ClientKind::Consumer { group, queue } => match self.clients[c].commit {
                Some(offset) => Request::Commit {
                    topic: TOPIC.to_string(),
                    queue,
                    consumer_group: group,
                    offset,
                },
                None => Request::Consume {
                    topic: TOPIC.to_string(),
                    queue,
                    consumer_group: group,
                    from: None,
                    count_max: 16,
                    bytes_max: 1 << 20,
                    wait_ticks: 4,
                },
            },
            ClientKind::Receiver { group, queue } => {
                let offsets = std::mem::take(&mut self.clients[c].received);
                match (offsets.is_empty(), self.rng.below(8)) {
                    (true, _) => Request::Receive {
                        topic: TOPIC.to_string(),
                        queue,
                        consumer_group: group,
                        count_max: 16,
                        bytes_max: 1 << 20,
                        wait_ticks: 4,
                        ack_timeout_ms: RECEIVE_ACK_TIMEOUT_MS,
                    },
                    (false, 0) => Request::Nack {
                        topic: TOPIC.to_string(),
                        queue,
                        consumer_group: group,
                        offsets,
                        delay_ms: 100,
                    },
                    (false, _) => Request::Ack {
                        topic: TOPIC.to_string(),
                        queue,
                        consumer_group: group,
                        offsets,
                    },
                }
            }
        };
        let id = self.next_request;
        self.next_request += 1;
        let node = self.clients[c].target;
        self.clients[c].waiting = Some(id);
        self.requests.insert(id, (c, request.clone()));
        let epoch = self.nodes[node].epoch;
        let delay = 100 + self.rng.below(900);
        self.schedule(
            delay,
            Event::Arrive {
                node,
                epoch,
                id,
                request,
            },
        );
        self.schedule(CLIENT_TIMEOUT_US, Event::ClientTimeout { id });
    }

    fn client_reply(&mut self, id: RequestId, response: Response) {
        let Some((c, request)) = self.requests.remove(&id) else {
            return; // answered after the client gave up
        };
        self.clients[c].waiting = None;
        let mut pause = 0;
        match (response, request) {
            (
                Response::Produced {
                    first_offset,
                    count,
                    duplicate,
                },
                Request::Produce {
                    queue, messages, ..
                },
            ) => {
                assert_eq!(count, 1, "one message per produce");
                self.report.duplicates += u64::from(duplicate);
                let ClientKind::Producer { index, seq, .. } = &mut self.clients[c].kind else {
                    unreachable!("producers produce");
                };
                self.history.acks.push(Ack {
                    producer: *index,
                    seq: *seq,
                    queue,
                    offset: first_offset,
                    value: messages[0].value.clone(),
                });
                *seq += 1;
                pause = self.rng.below(3_000);
            }
            (Response::ProducedMany { ranges }, Request::ProduceMany { appends }) => {
                assert_eq!(ranges.len(), appends.len(), "one range per append");
                let ClientKind::Producer { index, seq, .. } = &mut self.clients[c].kind else {
                    unreachable!("producers produce");
                };
                for ((first_offset, count, duplicate), append) in ranges.into_iter().zip(appends) {
                    assert_eq!(count, 1, "one message per append");
                    self.report.duplicates += u64::from(duplicate);
                    self.history.acks.push(Ack {
                        producer: *index,
                        seq: *seq,
                        queue: append.queue,
                        offset: first_offset,
                        value: append.messages[0].value.clone(),
                    });
                    *seq += 1;
                }
                pause = self.rng.below(3_000);
            }
            (
                Response::Consumed {
                    messages,
                    next_offset,
                    ..
                },
                Request::Consume {
                    queue,
                    consumer_group,
                    ..
                },
            ) => {
                let log = self
                    .history
                    .deliveries
                    .entry((consumer_group, queue))
                    .or_default();
                log.extend(messages.iter().map(|m| (m.offset, m.value.clone())));
                if !messages.is_empty() {
                    self.clients[c].commit = Some(next_offset);
                }
            }
            (Response::Committed, _) => self.clients[c].commit = None,
            (
                Response::Received { messages },
                Request::Receive {
                    queue,
                    consumer_group,
                    ..
                },
            ) => {
                let log = self
                    .history
                    .deliveries
                    .entry((consumer_group, queue))
                    .or_default();
                log.extend((messages.iter()).map(|r| (r.message.offset, r.message.value.clone())));
                self.clients[c].received = messages.iter().map(|r| r.message.offset).collect();
            }
            (Response::Acked { .. } | Response::Nacked, _) => {}
            (Response::Error { code, master, .. }, _) => {
                if code == ErrorCode::Indeterminate {
                    self.history.indeterminate += 1;
                }
                match (code, master) {
                    (ErrorCode::NotMaster, Some(master)) => {
                        self.clients[c].target = (master.0 - 1) as usize;
                    }
                    (code, _) if code.is_retryable() => {
                        self.clients[c].target = self.rng.below(self.nodes.len() as u64) as usize;
                        pause = 20_000;
                    }
                    (code, _) => {
                        // Only lost data explains this (a cursor past the end of the queue);
                        // note it and let the consumer read again, so the run goes on to the
                        // checkers.
                        self.panics
                            .push(format!("client {c} got a non-retryable {code}"));
                        self.clients[c].commit = None;
                    }
                }
            }
            (response, request) => self.violations.push(format!(
                "answer {response:?} does not match request {request:?}"
            )),
        }
        self.schedule(pause, Event::ClientGo(c));
    }

    /// With every node up at the end, masters are spread evenly (placement).
    fn check_placement(&self) -> Vec<String> {
        let n = self.nodes.len() as u32;
        let groups = self.config.groups;
        let mut masters = vec![0u32; self.nodes.len()];
        for sim_node in &self.nodes {
            let Some(node) = sim_node.node.as_ref() else {
                return Vec::new(); // a node panicked: reported elsewhere
            };
            masters[(node.id().0 - 1) as usize] = node.mastered_groups().len() as u32;
        }
        let (low, high) = (groups / n, groups.div_ceil(n));
        if masters.iter().all(|m| (low..=high).contains(m)) {
            Vec::new()
        } else {
            vec![format!(
                "placement: masters per node {masters:?}, expected {low} or {high} each"
            )]
        }
    }

    fn check(&mut self) -> Vec<String> {
        let mut views: BTreeMap<QueueId, Vec<ReplicaView>> = BTreeMap::new();
        for (i, sim_node) in self.nodes.iter().enumerate() {
            let Some(node) = sim_node.node.as_ref() else {
                continue;
            };
            add_counters(&mut self.report.counters, &node.status().counters);
            for queue in 0..self.config.queues {
                views.entry(queue).or_default().push(ReplicaView {
                    node: i + 1,
                    messages: node.read_all(TOPIC, queue),
                });
            }
        }
        let groups: Vec<String> = self.layout.topics[0].consumer_groups.clone();
        let mut violations = check(
            &self.history,
            self.config.queues,
            &groups,
            u64::from(DEDUP_WINDOW),
            &views,
        );
        violations.extend(self.check_placement());
        violations
    }
}
