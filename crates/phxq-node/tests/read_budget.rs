//! A round reads at most `read_bytes_per_round_max` bytes of log for parked consumes, and
//! the reads it did not reach run in the next round at once (`has_work`), not a tick later.
//!
//! Why per round and not per tick: reads run on the event loop, and on a busy machine the
//! scheduler stretches a round's CPU time many times over; peer messages and ticks are
//! served only between rounds (ARCHITECTURE, the server's invariants).
//!
//! One real `Node` over a real log, alone in its store, pumped by hand.

mod common;

use std::sync::Arc;

use phxq_core::{Message, Retention, StoreLayout};
use phxq_node::{Node, NodeConfig, Request, Response};
use phxq_storage::{Wal, WalOptions};
use phxq_types::NodeId;

/// The budget under test, and the entries read against it: one message each.
const READ_BYTES_PER_ROUND_MAX: u64 = 10_000;
const ENTRIES: usize = 20;
const VALUE_BYTES: usize = 1_000;

fn layout() -> Arc<StoreLayout> {
    common::layout(Retention {
        replay_count: 1_000,
        replay_age_ms: 3_600_000,
        max_age_ms: None,
        max_bytes: None,
    })
}

/// One round, synced as the server does; its answers.
fn round(node: &mut Node, wal: &Wal) -> Vec<(u64, Response)> {
    let output = node.round().expect("round");
    if let Some(lsn) = output.sync {
        let durable = wal.sync_to(lsn).expect("sync");
        node.synced(durable.max(lsn));
    }
    output.responses
}

/// Rounds until the node has no work; every answer.
fn settle(node: &mut Node, wal: &Wal) -> Vec<(u64, Response)> {
    let mut answers = Vec::new();
    for _ in 0..64 {
        answers.extend(round(node, wal));
        if !node.has_work() {
            return answers;
        }
    }
    panic!("still working after 64 rounds");
}

fn consume(wait_ticks: u64) -> Request {
    Request::Consume {
        topic: "t".to_string(),
        queue: 0,
        consumer_group: "g".to_string(),
        from: Some(1),
        count_max: 1_000,
        bytes_max: u64::MAX,
        wait_ticks,
    }
}

fn count(response: &Response) -> usize {
    match response {
        Response::Consumed { messages, .. } => messages.len(),
        other => panic!("not a consume answer: {other:?}"),
    }
}

#[test]
fn a_round_reads_at_most_its_budget_and_the_next_round_reads_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open log");
    let wal = Arc::new(wal);
    let mut config = NodeConfig::new(NodeId(1), vec![NodeId(1)], layout(), 7);
    config.read_bytes_per_round_max = READ_BYTES_PER_ROUND_MAX;
    let mut node = Node::open(config, wal.clone()).expect("open node");
    let mut now_ms = 0;
    while node.status().groups[0].lease_remaining_ms.is_none() {
        assert!(now_ms < 100_000, "no master after 2,000 ticks");
        now_ms += 50;
        node.tick(now_ms);
        settle(&mut node, &wal);
    }
    // One entry per message: each produce is committed before the next is made.
    for i in 0..ENTRIES {
        let messages = vec![Message {
            key: Vec::new(),
            value: vec![b'v'; VALUE_BYTES],
        }];
        let produce = Request::Produce {
            topic: "t".to_string(),
            queue: 0,
            message_id: Vec::new(),
            messages,
        };
        node.request(i as u64, produce);
        let answers = settle(&mut node, &wal);
        assert!(
            matches!(answers[..], [(_, Response::Produced { .. })]),
            "{answers:?}"
        );
    }

    // Two long polls parked, each wanting every message.
    node.request(100, consume(1_000));
    node.request(101, consume(1_000));
    let first = round(&mut node, &wal);
    let read: usize = first.iter().map(|(_, r)| count(r)).sum();
    let budget_entries = (READ_BYTES_PER_ROUND_MAX as usize).div_ceil(VALUE_BYTES);
    assert!(
        (1..=budget_entries + 1).contains(&read),
        "one round read {read} messages of {VALUE_BYTES} bytes against a budget of \
         {READ_BYTES_PER_ROUND_MAX} bytes: {first:?}"
    );
    assert!(
        first.len() < 2,
        "both polls answered in one round: {first:?}"
    );
    assert!(node.has_work(), "reads were put off, yet no round is due");

    // The next rounds, with no tick between them, answer the rest.
    let rest = settle(&mut node, &wal);
    let mut answered: Vec<u64> = first.iter().chain(&rest).map(|(id, _)| *id).collect();
    answered.sort_unstable();
    assert_eq!(answered, vec![100, 101], "{rest:?}");
    for (_, response) in first.iter().chain(&rest) {
        assert!(count(response) >= 1 && count(response) <= budget_entries + 1);
    }
}
