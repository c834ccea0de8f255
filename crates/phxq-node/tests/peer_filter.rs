//! A peer's raft message that raft-rs would panic on, or be misled by, is dropped before it
//! is stepped (phxq-node's `peer_filter`): three real `Node`s over real logs, pumped by hand;
//! each dangerous message is stepped into the node it would hurt, as if from a configured
//! peer (authenticated or not, the node must survive it), and must be counted, change
//! nothing, and leave the store electing and committing as before.

use std::collections::BTreeMap;
use std::sync::Arc;

use phxq_core::{Retention, StoreLayout, TopicConfig};
use phxq_node::{Node, NodeConfig, Output};
use phxq_storage::{Wal, WalOptions};
use phxq_types::{GroupId, NodeId};
use raft::eraftpb::{self, ConfState, Entry, MessageType, Snapshot, SnapshotMetadata};

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

/// A message of `kind` from node `from` to node `to` at `term`.
fn message(kind: MessageType, from: usize, to: usize, term: u64) -> eraftpb::Message {
    let mut message = eraftpb::Message {
        from: from as u64 + 1,
        to: to as u64 + 1,
        term,
        ..Default::default()
    };
    message.set_msg_type(kind);
    message
}

/// Every group state of every node: what a dropped message must not change.
fn states(store: &Store) -> Vec<(u64, u64, u64)> {
    store
        .nodes
        .iter()
        .map(|node| {
            let group = &node.status().groups[0];
            (group.term, group.commit_index, group.last_index)
        })
        .collect()
}

#[test]
fn messages_raft_would_panic_on_or_trust_are_dropped_and_counted() {
    let mut store = Store::new();
    let master = store.elect();
    let (follower, other) = ((master + 1) % 3, (master + 2) % 3);
    let status = store.nodes[master].status().groups[0].clone();
    let (term, last) = (status.term, status.last_index);
    // A fresh store: index 1 is the first master's empty entry, committed everywhere.
    assert_eq!(
        (status.last_index, status.commit_index),
        (1, 1),
        "{status:?}"
    );
    assert_eq!(store.nodes[follower].status().groups[0].commit_index, 1);

    let mut cases: Vec<(&str, usize, eraftpb::Message)> = Vec::new();
    let mut garbage = message(MessageType::MsgPropose, follower, master, 0);
    garbage.entries = vec![Entry {
        data: b"\xffgarbage".to_vec().into(),
        ..Default::default()
    }]
    .into();
    cases.push(("a proposal of garbage", master, garbage));
    cases.push((
        "an empty proposal",
        master,
        message(MessageType::MsgPropose, follower, master, 0),
    ));
    let mut heartbeat = message(MessageType::MsgHeartbeat, master, follower, term);
    heartbeat.commit = last + 100;
    cases.push(("a heartbeat committing past the log", follower, heartbeat));
    let mut answer = message(MessageType::MsgAppendResponse, follower, master, term);
    answer.index = last + 100;
    cases.push(("an append response past the log", master, answer));
    cases.push((
        "an append response without a term",
        master,
        message(MessageType::MsgAppendResponse, follower, master, 0),
    ));
    let mut rewrite = message(MessageType::MsgAppend, master, follower, term);
    rewrite.index = 0; // the log's start, of term 0
    rewrite.entries = vec![Entry {
        index: 1,
        term: 0, // not the committed entry's term: a conflict below the commit
        ..Default::default()
    }]
    .into();
    cases.push(("an append rewriting a committed entry", follower, rewrite));
    let mut gap = message(MessageType::MsgAppend, master, follower, term);
    gap.index = last;
    gap.log_term = term;
    gap.entries = vec![Entry {
        index: last + 5,
        term,
        ..Default::default()
    }]
    .into();
    cases.push(("an append with a gap", follower, gap));
    let mut snapshot = message(MessageType::MsgSnapshot, master, follower, term);
    snapshot.set_snapshot(Snapshot {
        metadata: Some(SnapshotMetadata {
            index: last + 10,
            term,
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3, 4],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    });
    cases.push(("a snapshot of another configuration", follower, snapshot));
    let mut ask = message(MessageType::MsgAppendResponse, follower, master, term);
    ask.reject = true;
    ask.request_snapshot = last;
    cases.push(("a snapshot request", master, ask));
    for kind in [
        MessageType::MsgHup,
        MessageType::MsgBeat,
        MessageType::MsgCheckQuorum,
        MessageType::MsgUnreachable,
        MessageType::MsgSnapStatus,
        MessageType::MsgTransferLeader,
        MessageType::MsgReadIndex,
    ] {
        cases.push((
            "a local-only type",
            master,
            message(kind, other, master, term),
        ));
    }

    for (rejected, (case, to, message)) in cases.into_iter().enumerate() {
        let before = states(&store);
        let from = NodeId(message.from);
        store.nodes[to].step(from, vec![(GroupId(0), message)]);
        let total: u64 = store
            .nodes
            .iter()
            .map(|node| node.status_counters().peer_messages_rejected)
            .sum();
        assert_eq!(total, rejected as u64 + 1, "{case}: counted once");
        assert!(
            store.nodes[to].last_peer_rejection().is_some(),
            "{case}: a reason to log"
        );
        store.drain(to);
        assert_eq!(states(&store), before, "{case}: changed nothing");
    }
    // The store carries on: the same master keeps its lease through heartbeats.
    for _ in 0..20 {
        store.step_all();
    }
    assert!(
        store.lease_ms(master).is_some(),
        "the master kept its lease"
    );
    assert_eq!(states(&store)[master].0, term, "no election");
}
