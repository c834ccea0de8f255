//! A peer's raft message that raft-rs would panic on, or be misled by, is dropped before it
//! is stepped (phxq-node's `peer_filter`): three real `Node`s over real logs, pumped by hand;
//! each dangerous message is stepped into the node it would hurt, as if from a configured
//! peer (authenticated or not, the node must survive it), and must be counted, change
//! nothing, and leave the store electing and committing as before.

use phxq_types::{GroupId, NodeId};
use raft::eraftpb::{self, ConfState, Entry, MessageType, Snapshot, SnapshotMetadata};

mod common;

use common::Store;

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
