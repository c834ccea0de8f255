//! Votes after a restart, leases around a leader transfer, and retention by age under skewed
//! clocks (issue 12, items 3 and 6), on real `Node`s over real logs, pumped by hand by the
//! shared harness (`common`): every message between nodes goes through a filter the test
//! controls, and each node's wall clock carries a test-only offset.

use std::sync::Arc;

use phxq_core::Retention;
use phxq_node::{Node, NodeConfig, Response, Timing};
use phxq_storage::{Wal, WalOptions};
use phxq_types::{ErrorCode, GroupId, NodeId};
use raft::eraftpb::{self, MessageType};

mod common;

use common::{Fate, Messages, Store, TICK_MS, keep_everything, layout, produce_request};

/// Node `id` compacting as early as it can, so retention shows in what it retains.
fn node_config(id: NodeId, retention: Retention) -> NodeConfig {
    let members: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut config = NodeConfig::new(id, members, layout(retention), id.0 * 7919);
    config.compact_entries_min = 1;
    config.timing.compact_ticks = 2;
    config
}

/// Three nodes of [`node_config`] at a realistic wall-clock time.
fn compacting_store(retention: Retention, clock_offsets_ms: Vec<i64>) -> Store {
    Store::with(
        |id| node_config(id, retention.clone()),
        1_700_000_000_000,
        clock_offsets_ms,
    )
}

/// The offsets of queue 0 that node `i` retains.
fn retained(store: &Store, i: usize) -> Vec<u64> {
    store.nodes[i]
        .read_all("t", 0)
        .iter()
        .map(|m| m.offset)
        .collect()
}

/// A request for node 1's vote in `term` from node 2, whose log is as long as anyone's.
fn vote_request(kind: MessageType, term: u64) -> Messages {
    let mut message = eraftpb::Message::default();
    message.set_msg_type(kind);
    message.from = 2;
    message.to = 1;
    message.term = term;
    message.index = 100;
    message.log_term = 100;
    vec![(GroupId(0), message)]
}

/// Steps a vote request into `node`, runs its rounds, and returns its answers to node 2.
fn answers_to_vote(node: &mut Node, wal: &Wal, kind: MessageType, term: u64) -> Vec<bool> {
    node.step(NodeId(2), vote_request(kind, term));
    let mut granted = Vec::new();
    for _ in 0..8 {
        let output = node.round().expect("round");
        for (_, message) in output.messages.into_values().flatten() {
            if matches!(
                message.get_msg_type(),
                MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse
            ) {
                granted.push(!message.reject);
            }
        }
        if let Some(lsn) = output.sync {
            node.synced(wal.sync_to(lsn).expect("sync").max(lsn));
        }
    }
    granted
}

#[test]
fn a_restarted_voter_grants_no_vote_for_one_election_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open log");
    let wal = Arc::new(wal);
    let config = node_config(NodeId(1), keep_everything());
    let election_ticks = config.timing.election_ticks as u64;
    let mut node = Node::open(config, wal.clone()).expect("open node");
    let mut now_ms = 0;
    let mut tick = |node: &mut Node| {
        now_ms += TICK_MS;
        node.tick(now_ms);
    };

    // Just restarted (it may have voted in any earlier term before): no answer at all, to a
    // pre-vote or a vote, until one election timeout passed.
    for kind in [MessageType::MsgRequestPreVote, MessageType::MsgRequestVote] {
        assert_eq!(
            answers_to_vote(&mut node, &wal, kind, 5),
            Vec::<bool>::new()
        );
    }
    for _ in 0..election_ticks - 1 {
        tick(&mut node);
    }
    assert_eq!(node.now_tick(), election_ticks - 1);
    let late = answers_to_vote(&mut node, &wal, MessageType::MsgRequestVote, 6);
    assert_eq!(late, Vec::<bool>::new(), "one tick before the timeout");

    tick(&mut node);
    let granted = answers_to_vote(&mut node, &wal, MessageType::MsgRequestVote, 7);
    assert_eq!(
        granted,
        [true],
        "after one election timeout the vote is granted"
    );
}

#[test]
fn a_master_that_sent_timeout_now_holds_no_lease_for_an_election_timeout() {
    let mut store = compacting_store(keep_everything(), vec![0; 3]);
    let timing = Timing::default();
    // Node 1 (the group's preferred node) is cut off, so another node is elected; then it
    // comes back and catches up.
    store.filter = Box::new(|from, to, _| {
        if from == NodeId(1) || to == NodeId(1) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    let master = store.elect();
    assert_ne!(master, 0);
    let master_id = NodeId(master as u64 + 1);
    assert!(matches!(
        store.produce(master, "a"),
        Response::Produced { .. }
    ));
    // Node 1's append answers are held: the master sees it alive (heartbeat answers) but
    // behind, so when placement hands it the group, raft-rs first sends it an append and
    // sends `MsgTimeoutNow` only when the answer comes, late in the transfer's window.
    store.filter = Box::new(move |from, to, message| {
        if from == NodeId(1)
            && to == master_id
            && message.get_msg_type() == MessageType::MsgAppendResponse
        {
            Fate::Hold
        } else {
            Fate::Deliver
        }
    });
    for _ in 0..4 {
        store.step_all();
    }
    assert!(matches!(
        store.produce(master, "b"),
        Response::Produced { .. }
    ));
    // The transfer starts at a placement check: the master stops admitting requests.
    let mut started = false;
    for _ in 0..2 * timing.rebalance_ticks {
        store.step_all();
        if matches!(produce_now(&mut store, master), Response::Error { .. }) {
            started = true;
            break;
        }
    }
    assert!(started, "placement never handed the group to node 1");
    // Late in the window, the answers arrive and the master sends `MsgTimeoutNow`; the
    // network loses it (or delays it past the transfer's abort).
    for _ in 0..timing.election_ticks - 3 {
        store.step_all();
    }
    let sent_at = std::rc::Rc::new(std::cell::Cell::new(None));
    let seen = sent_at.clone();
    store.filter = Box::new(move |_, _, message| {
        if message.get_msg_type() == MessageType::MsgTimeoutNow {
            seen.set(Some(()));
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    store.release_held();
    assert!(
        sent_at.get().is_some(),
        "the caught-up answer made it send MsgTimeoutNow"
    );

    // From then on, for one election timeout, the master holds no lease and serves nothing,
    // also after raft-rs aborted the transfer (its window began earlier) and while node 3
    // keeps answering its heartbeats.
    for tick in 0..timing.election_ticks {
        assert_eq!(
            store.lease_ms(master),
            None,
            "tick {tick} after MsgTimeoutNow: the target may still be elected by it"
        );
        let refused = produce_now(&mut store, master);
        assert!(
            matches!(&refused, Response::Error { code, .. } if matches!(code, ErrorCode::NotMaster | ErrorCode::NoMaster)),
            "tick {tick}: {refused:?}"
        );
        store.step_all();
    }
}

/// A produce admitted or refused by node `i` now (without running the store): the refusal,
/// or `Produced` standing for "admitted".
fn produce_now(store: &mut Store, i: usize) -> Response {
    let id = store.next_request;
    store.next_request += 1;
    store.nodes[i].request(id, produce_request("probe"));
    let output = store.nodes[i].round().expect("round");
    let answer = output.responses.iter().find(|(r, _)| *r == id).cloned();
    store.responses.extend(output.responses);
    if let Some(lsn) = output.sync {
        store.sync(i, lsn);
    }
    answer.map_or(
        Response::Produced {
            first_offset: 0,
            count: 0,
            duplicate: false,
        },
        |(_, response)| response,
    )
}

#[test]
fn retention_by_age_releases_the_same_offsets_on_every_replica_with_skewed_clocks() {
    const MINUTE_MS: u64 = 60_000;
    let retention = Retention {
        replay_count: 0,
        replay_age_ms: 0,
        max_age_ms: Some(MINUTE_MS),
        max_bytes: None,
    };
    // Node 3's clock is ten minutes ahead: were each replica to judge age by its own clock,
    // it would release everything the others keep (or, as master, stamp times the others
    // think are in the future).
    let mut store = compacting_store(retention, vec![0, -30_000, 10 * MINUTE_MS as i64]);
    let master = store.elect();
    for value in ["old-1", "old-2"] {
        assert!(matches!(
            store.produce(master, value),
            Response::Produced { .. }
        ));
    }
    // Batches carry the clock read at the last tick: tick once at the new time.
    store.now_ms += 40_000;
    store.step_all();
    for value in ["new-1", "new-2"] {
        assert!(matches!(
            store.produce(master, value),
            Response::Produced { .. }
        ));
    }
    for _ in 0..10 {
        store.step_all();
    }
    let all = vec![1, 2, 3, 4];
    for i in 0..3 {
        assert_eq!(
            retained(&store, i),
            all,
            "node {}: nothing is a minute old yet",
            i + 1
        );
    }
    // 30 s later by the master's clock the old ones are 70 s old, the new ones 30 s: an idle
    // group, so the master writes the time into the log and every replica releases alike.
    store.now_ms += 30_000;
    for _ in 0..10 {
        store.step_all();
    }
    for i in 0..3 {
        assert_eq!(retained(&store, i), [3, 4], "node {}", i + 1);
    }
}
