//! A master's lease counts a peer's answer from when it was heard, not from when it was
//! stepped: answers that waited in a queue while the node was held up (a slow fsync, a
//! descheduled process) must not stretch the lease (ARCHITECTURE, phxq-node invariant 2).
//!
//! Three real `Node`s over real logs, pumped by hand: elect a master, let a follower answer
//! a heartbeat, hold that answer back while the master's ticks run on, then step it with
//! [`Node::step_heard_at`] and with [`Node::step`]. This tests the node's accounting; that the
//! server passes the tick from before its catch-up is a matter of `EventLoop::serve`'s order
//! (read there), not tested here.

use std::collections::BTreeMap;
use std::sync::Arc;

use phxq_core::{Retention, StoreLayout, TopicConfig};
use phxq_node::{Node, NodeConfig, Output};
use phxq_storage::{Wal, WalOptions};
use phxq_types::{GroupId, NodeId};
use raft::eraftpb::{self, MessageType};

type Messages = Vec<(GroupId, eraftpb::Message)>;

const TICK_MS: u64 = 50;

struct Store {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Node>,
    wals: Vec<Arc<Wal>>,
    now_ms: u64,
}

fn layout() -> Arc<StoreLayout> {
    Arc::new(StoreLayout {
        groups: 1,
        topics: vec![TopicConfig {
            name: "t".to_string(),
            queues: 1,
            consumer_groups: vec!["g".to_string()],
            retention: Retention {
                replay_count: 0,
                replay_age_ms: 0,
                max_age_ms: None,
                max_bytes: None,
            },
            dedup_window: 0,
            group_settings: Default::default(),
        }],
        message_bytes_max: 1 << 20,
    })
}

impl Store {
    fn new() -> Store {
        let members: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        let mut wals = Vec::new();
        for &id in &members {
            let dir = tempfile::tempdir().expect("tempdir");
            let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open log");
            let wal = Arc::new(wal);
            let config = NodeConfig::new(id, members.clone(), layout(), id.0 * 7919);
            nodes.push(Node::open(config, wal.clone()).expect("open node"));
            wals.push(wal);
            dirs.push(dir);
        }
        Store {
            _dirs: dirs,
            nodes,
            wals,
            now_ms: 0,
        }
    }

    /// Runs node `i`'s rounds until it has no work, syncing as the server does; returns the
    /// messages it sends, per destination.
    fn drain(&mut self, i: usize) -> BTreeMap<NodeId, Messages> {
        let mut sent: BTreeMap<NodeId, Messages> = BTreeMap::new();
        for _ in 0..64 {
            let Output { messages, sync, .. } = self.nodes[i].round().expect("round");
            for (to, batch) in messages {
                sent.entry(to).or_default().extend(batch);
            }
            if let Some(lsn) = sync {
                let durable = self.wals[i].sync_to(lsn).expect("sync");
                self.nodes[i].synced(durable.max(lsn));
            }
            if !self.nodes[i].has_work() {
                break;
            }
        }
        sent
    }

    /// One tick everywhere, then every node's rounds, delivering everything at once.
    fn step_all(&mut self) {
        self.now_ms += TICK_MS;
        for node in &mut self.nodes {
            node.tick(self.now_ms);
        }
        for _ in 0..8 {
            let mut delivered = false;
            for i in 0..self.nodes.len() {
                let from = NodeId(i as u64 + 1);
                for (to, batch) in self.drain(i) {
                    delivered = true;
                    self.nodes[(to.0 - 1) as usize].step(from, batch);
                }
            }
            if !delivered {
                break;
            }
        }
    }

    fn lease_ms(&self, i: usize) -> Option<u64> {
        self.nodes[i].status().groups[0].lease_remaining_ms
    }

    /// The master with a lease, once the store has elected one.
    fn elect(&mut self) -> usize {
        for _ in 0..400 {
            self.step_all();
            if let Some(i) = (0..3).find(|&i| self.lease_ms(i).is_some()) {
                return i;
            }
        }
        panic!("no master with a lease after 400 ticks");
    }
}

/// Ticks the master alone until it sends heartbeats; has both followers answer them, and
/// returns their answers (not yet delivered) and the master's tick when they were heard.
fn heartbeat_answers(store: &mut Store, master: usize) -> (Vec<(NodeId, Messages)>, u64) {
    for _ in 0..16 {
        store.now_ms += TICK_MS;
        store.nodes[master].tick(store.now_ms);
        let sent = store.drain(master);
        let heartbeats: Vec<(NodeId, Messages)> = sent
            .into_iter()
            .map(|(to, batch)| {
                let only: Messages = batch
                    .into_iter()
                    .filter(|(_, m)| m.get_msg_type() == MessageType::MsgHeartbeat)
                    .collect();
                (to, only)
            })
            .filter(|(_, batch)| !batch.is_empty())
            .collect();
        if heartbeats.is_empty() {
            continue;
        }
        let heard_at = store.nodes[master].now_tick();
        let master_id = NodeId(master as u64 + 1);
        let mut answers = Vec::new();
        for (to, batch) in heartbeats {
            let follower = (to.0 - 1) as usize;
            store.nodes[follower].step(master_id, batch);
            let reply = store.drain(follower).remove(&master_id).unwrap_or_default();
            answers.push((to, reply));
        }
        return (answers, heard_at);
    }
    panic!("the master sent no heartbeat in 16 ticks");
}

#[test]
fn answers_stepped_late_count_from_when_they_were_heard() {
    let mut store = Store::new();
    let master = store.elect();
    let lease_ticks = NodeConfig::new(NodeId(1), vec![], layout(), 0)
        .timing
        .lease_ticks;

    let (answers, heard_at) = heartbeat_answers(&mut store, master);
    // The master is held up for `lease_ticks - 1` ticks; the answers wait in its queue.
    for _ in 0..lease_ticks - 1 {
        store.now_ms += TICK_MS;
        store.nodes[master].tick(store.now_ms);
    }
    let late = store.nodes[master].now_tick() - heard_at;
    assert_eq!(late, lease_ticks - 1);

    // Stepped as heard when they arrived: at most one tick of lease is left.
    let mut held_up = answers.clone();
    for (from, batch) in held_up.drain(..) {
        store.nodes[master].step_heard_at(from, batch, heard_at);
    }
    let left = store.lease_ms(master);
    assert_eq!(
        left,
        Some(TICK_MS),
        "answers heard {late} ticks ago must count, and leave exactly one tick of lease"
    );

    // Stepped as if heard now (what stepping before the clock catch-up amounted to), the
    // same answers give a whole new lease: the stretch the server must not allow.
    for (from, batch) in answers {
        store.nodes[master].step(from, batch);
    }
    let stretched = store.lease_ms(master).unwrap_or(0);
    assert!(
        stretched >= (lease_ticks - 1) * TICK_MS,
        "stepped now, the answers renew the lease: {stretched} ms"
    );
}
