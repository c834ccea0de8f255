//! A master's lease counts a peer's answer from when it was heard, not from when it was
//! stepped: answers that waited in a queue while the node was held up (a slow fsync, a
//! descheduled process) must not stretch the lease (ARCHITECTURE, phxq-node invariant 2).
//!
//! Three real `Node`s over real logs, pumped by hand: elect a master, let a follower answer
//! a heartbeat, hold that answer back while the master's ticks run on, then step it with
//! [`Node::step_heard_at`] and with [`Node::step`]. This tests the node's accounting; that the
//! server passes the tick from before its catch-up is a matter of `EventLoop::serve`'s order
//! (read there), not tested here.

use phxq_types::NodeId;
use raft::eraftpb::MessageType;

mod common;

use common::{Messages, Store, TICK_MS, default_config};

/// Ticks the master alone until it sends heartbeats; has both followers answer them, and
/// returns their answers (not yet delivered) and the master's tick when they were heard.
fn heartbeat_answers(store: &mut Store, master: usize) -> (Vec<(NodeId, Messages)>, u64) {
    for _ in 0..16 {
        store.tick_one(master);
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
    let lease_ticks = default_config(NodeId(1)).timing.lease_ticks;

    let (answers, heard_at) = heartbeat_answers(&mut store, master);
    // The master is held up for `lease_ticks - 1` ticks; the answers wait in its queue.
    for _ in 0..lease_ticks - 1 {
        store.tick_one(master);
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
