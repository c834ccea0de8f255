//! Stories about per-message deliveries, acks and nacks (the `delivery` module).

use phxq_types::{ACK_TIMEOUT_MS_MAX, NACK_DELAY_MS_MAX};

use super::*;
use crate::machine::{InFlight, is_due};

fn deliver(group: &str, queue: u32, offsets: &[u64], ack_timeout_ms: u64) -> Command {
    Command::Deliver {
        consumer_group: group.into(),
        topic: "orders".into(),
        queue,
        offsets: offsets.to_vec(),
        ack_timeout_ms,
    }
}

fn ack(group: &str, queue: u32, offsets: &[u64]) -> Command {
    Command::Ack {
        consumer_group: group.into(),
        topic: "orders".into(),
        queue,
        offsets: offsets.to_vec(),
    }
}

fn nack(group: &str, queue: u32, offsets: &[u64], delay_ms: u64) -> Command {
    Command::Nack {
        consumer_group: group.into(),
        topic: "orders".into(),
        queue,
        offsets: offsets.to_vec(),
        delay_ms,
    }
}

/// `(offset, delivery count, deadline)` of each delivery.
fn delivered(applied: &[Applied]) -> Vec<(u64, u32, u64)> {
    match applied {
        [Applied::Delivered { deliveries }] => deliveries
            .iter()
            .map(|d| (d.offset, d.delivery_count, d.deadline_ms))
            .collect(),
        other => panic!("not one delivery: {other:?}"),
    }
}

/// "orders" queue 0 with `count` messages, nothing delivered.
fn with_messages(count: usize) -> GroupMachine {
    let mut machine = machine();
    let values: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    apply(&mut machine, 900, vec![enqueue("orders", 0, &values)]);
    machine
}

#[test]
fn acks_move_the_cursor_over_the_acked_prefix_only() {
    let mut machine = with_messages(3);
    let got = apply(
        &mut machine,
        1000,
        vec![deliver("billing", 0, &[1, 2, 3], 100)],
    );
    assert_eq!(delivered(&got), [(1, 1, 1100), (2, 1, 1100), (3, 1, 1100)]);
    assert_eq!(machine.cursor("billing", "orders", 0), Some(1));
    let got = apply(&mut machine, 1010, vec![ack("billing", 0, &[2])]);
    assert_eq!(got, [Applied::Acked { cursor: 1 }], "1 is still in flight");
    let got = apply(&mut machine, 1020, vec![ack("billing", 0, &[1])]);
    assert_eq!(
        got,
        [Applied::Acked { cursor: 3 }],
        "over 1 and the acked 2"
    );
    let got = apply(&mut machine, 1030, vec![ack("billing", 0, &[3])]);
    assert_eq!(got, [Applied::Acked { cursor: 4 }]);
    // Acking again is an idempotent success; the other group is untouched.
    let got = apply(&mut machine, 1040, vec![ack("billing", 0, &[1, 2, 3])]);
    assert_eq!(got, [Applied::Acked { cursor: 4 }]);
    assert_eq!(machine.cursor("billing", "orders", 0), Some(4));
    assert_eq!(machine.cursor("audit", "orders", 0), Some(1));
    assert_eq!(machine.in_flight("billing", "orders", 0), Some(vec![]));
}

#[test]
fn an_unacked_offset_is_delivered_again_once_due_with_its_count_incremented() {
    let mut machine = with_messages(2);
    apply(&mut machine, 1000, vec![deliver("billing", 0, &[1], 100)]);
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1099, 10),
        Some(vec![2])
    );
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1100, 10),
        Some(vec![1, 2])
    );
    // Not yet due at the batch's time: skipped, nothing changes.
    let got = apply(&mut machine, 1099, vec![deliver("billing", 0, &[1], 100)]);
    assert_eq!(delivered(&got), []);
    let got = apply(&mut machine, 1100, vec![deliver("billing", 0, &[1, 2], 50)]);
    assert_eq!(delivered(&got), [(1, 2, 1150), (2, 1, 1150)]);
    let got = apply(&mut machine, 1200, vec![deliver("billing", 0, &[1], 50)]);
    assert_eq!(delivered(&got), [(1, 3, 1250)]);
}

#[test]
fn a_nack_makes_the_offset_due_after_its_delay_and_keeps_its_count() {
    let mut machine = with_messages(1);
    apply(
        &mut machine,
        1000,
        vec![deliver("billing", 0, &[1], 60_000)],
    );
    assert_eq!(
        apply(&mut machine, 1010, vec![nack("billing", 0, &[1], 500)]),
        [Applied::Nacked]
    );
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1509, 10),
        Some(vec![])
    );
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1510, 10),
        Some(vec![1])
    );
    let got = apply(&mut machine, 1510, vec![deliver("billing", 0, &[1], 100)]);
    assert_eq!(delivered(&got), [(1, 2, 1610)]);
    // A nack with no delay: due at once.
    apply(&mut machine, 1520, vec![nack("billing", 0, &[1], 0)]);
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1520, 10),
        Some(vec![1])
    );
}

#[test]
fn fresh_deliveries_stop_at_the_in_flight_limit_and_the_queues_end() {
    let mut machine = with_messages(4);
    assert_eq!(
        machine.deliverable("audit", "orders", 0, 1000, 10),
        Some(vec![1, 2]),
        "audit tracks {AUDIT_IN_FLIGHT_MAX}"
    );
    let got = apply(
        &mut machine,
        1000,
        vec![deliver("audit", 0, &[1, 2, 3], 100)],
    );
    assert_eq!(delivered(&got), [(1, 1, 1100), (2, 1, 1100)]);
    apply(&mut machine, 1010, vec![ack("audit", 0, &[1])]);
    assert_eq!(
        machine.deliverable("audit", "orders", 0, 1010, 10),
        Some(vec![3])
    );
    // Billing (default limit) reads to the end, and a count limit cuts the list.
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1010, 10),
        Some(vec![1, 2, 3, 4])
    );
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1010, 2),
        Some(vec![1, 2])
    );
    let got = apply(
        &mut machine,
        1020,
        vec![deliver("billing", 0, &[1, 2, 3, 4, 5], 100)],
    );
    assert_eq!(delivered(&got).len(), 4, "5 is past the end");
}

#[test]
fn a_commit_forward_drops_the_tracking_below_it_and_one_back_starts_over() {
    let mut machine = with_messages(5);
    apply(
        &mut machine,
        1000,
        vec![deliver("billing", 0, &[1, 2, 3], 100)],
    );
    apply(&mut machine, 1010, vec![commit("billing", "orders", 0, 3)]);
    let in_flight = machine.in_flight("billing", "orders", 0).unwrap();
    assert_eq!(in_flight.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [3]);
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1010, 10),
        Some(vec![4, 5])
    );
    // Past what was delivered: the next fresh offset follows the cursor.
    apply(&mut machine, 1020, vec![commit("billing", "orders", 0, 5)]);
    assert_eq!(machine.in_flight("billing", "orders", 0), Some(vec![]));
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 1020, 10),
        Some(vec![5])
    );
    // Back (a replay): everything from there is fresh again, counts from 1.
    apply(&mut machine, 1030, vec![deliver("billing", 0, &[5], 100)]);
    apply(&mut machine, 1040, vec![commit("billing", "orders", 0, 2)]);
    assert_eq!(machine.in_flight("billing", "orders", 0), Some(vec![]));
    let got = apply(
        &mut machine,
        1050,
        vec![deliver("billing", 0, &[2, 3, 4, 5], 100)],
    );
    assert_eq!(
        delivered(&got).iter().map(|d| d.1).collect::<Vec<_>>(),
        [1, 1, 1, 1]
    );
}

#[test]
fn a_deadline_more_than_a_week_ahead_is_due_at_once() {
    // Stamped by a master whose clock ran far ahead of this one's.
    let mut machine = with_messages(1);
    let ahead = 1000 + 30 * 24 * 3600 * 1000;
    apply(&mut machine, ahead, vec![deliver("billing", 0, &[1], 100)]);
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 2000, 10),
        Some(vec![1])
    );
    let got = apply(&mut machine, 2000, vec![deliver("billing", 0, &[1], 100)]);
    assert_eq!(delivered(&got), [(1, 2, 2100)]);
    // Within a week ahead it waits (a clock behind redelivers late, never early).
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 2099, 10),
        Some(vec![])
    );
    assert!(!is_due(2100 + NACK_DELAY_MS_MAX, 2100));
    assert!(is_due(2101 + NACK_DELAY_MS_MAX, 2100));
}

#[test]
fn bad_deliveries_acks_and_nacks_are_refused_with_a_reason_and_change_nothing() {
    let mut machine = with_messages(3);
    apply(
        &mut machine,
        1000,
        vec![deliver("billing", 0, &[1, 2], 100)],
    );
    apply(&mut machine, 1010, vec![ack("billing", 0, &[2])]);
    let before = machine.clone();
    let refused = [
        (
            deliver("billing", 0, &[3], 0),
            ErrorCode::InvalidArgument,
            "ack timeout 0",
        ),
        (
            deliver("billing", 0, &[3], ACK_TIMEOUT_MS_MAX + 1),
            ErrorCode::InvalidArgument,
            "ack timeout",
        ),
        (
            deliver("billing", 0, &[], 100),
            ErrorCode::InvalidArgument,
            "0 offsets",
        ),
        (
            deliver("billing", 0, &[0], 100),
            ErrorCode::InvalidArgument,
            "start at 1",
        ),
        (
            ack("billing", 0, &[3, 1]),
            ErrorCode::InvalidArgument,
            "ascending",
        ),
        (
            ack("billing", 0, &[1, 1]),
            ErrorCode::InvalidArgument,
            "ascending",
        ),
        (
            ack("billing", 0, &[1, 3]),
            ErrorCode::InvalidArgument,
            "offset 3 was not delivered",
        ),
        (
            ack("billing", 0, &[99]),
            ErrorCode::InvalidArgument,
            "offset 99 was not delivered",
        ),
        (
            nack("billing", 0, &[2], 10),
            ErrorCode::InvalidArgument,
            "acked already",
        ),
        (
            nack("billing", 0, &[3], 10),
            ErrorCode::InvalidArgument,
            "never delivered",
        ),
        (
            nack("billing", 0, &[1], NACK_DELAY_MS_MAX + 1),
            ErrorCode::InvalidArgument,
            "a week",
        ),
        (
            ack("ghost", 0, &[1]),
            ErrorCode::UnknownConsumerGroup,
            "does not read",
        ),
        (ack("billing", 9, &[1]), ErrorCode::UnknownQueue, "queue 9"),
        (
            ack("billing", 1, &[1]),
            ErrorCode::InvalidArgument,
            "not served by",
        ),
    ];
    let offsets = vec![1; phxq_types::DELIVERY_OFFSETS_MAX + 1];
    let too_many = Command::Ack {
        consumer_group: "billing".into(),
        topic: "orders".into(),
        queue: 0,
        offsets,
    };
    let refused =
        refused
            .into_iter()
            .chain([(too_many, ErrorCode::InvalidArgument, "1001 offsets")]);
    for (command, code, reason) in refused {
        let refusal = machine.check_delivery(&command).unwrap_err();
        assert_eq!(refusal.0, code, "{command:?}");
        assert!(refusal.1.contains(reason), "{command:?}: {}", refusal.1);
        assert_eq!(
            apply(&mut machine, 1020, vec![command]),
            [Applied::Rejected(code)]
        );
        assert_eq!(machine.topics, before.topics, "nothing changed");
    }
}

#[test]
fn a_snapshot_keeps_counts_and_deadlines_and_replay_does_not_count_twice() {
    let mut machine = with_messages(3);
    let mut log = vec![entry(900, vec![enqueue("orders", 0, &["m0", "m1", "m2"])])];
    let entries = vec![
        (1000, vec![deliver("billing", 0, &[1, 2], 100)]),
        (1100, vec![deliver("billing", 0, &[1], 100)]),
        (1110, vec![ack("billing", 0, &[2])]),
        // A new master whose clock is 60 ms behind: offset 1 is due at 1050, before the
        // delivery at 1100 that a replay on the restored state must not apply again.
        (1050, vec![nack("billing", 0, &[1], 0)]),
        (1120, vec![commit("audit", "orders", 0, 2)]),
    ];
    log.extend(applied_log(&mut machine, entries));
    machine.validate();
    let applied = machine.applied_index();
    for index in 0..=applied {
        let snapshot = machine.snapshot(index);
        let mut restored =
            GroupMachine::restore(GroupId(0), machine.layout().clone(), &snapshot).unwrap();
        for replayed in index + 1..=applied {
            restored
                .apply(replayed, &log[replayed as usize - 1])
                .unwrap();
            restored.validate();
        }
        let mut compacted = machine.clone();
        compacted.forget_through(index);
        assert_eq!(restored.topics, compacted.topics, "snapshot at {index}");
        let in_flight = restored.in_flight("billing", "orders", 0).unwrap();
        assert_eq!(
            in_flight,
            [(
                1,
                InFlight {
                    delivery_count: 2,
                    deadline_ms: 1050
                }
            )]
        );
    }
}

#[test]
fn offsets_a_retention_cap_released_are_skipped_by_committing_past_them() {
    let mut machine = machine();
    apply(&mut machine, 900, vec![enqueue("orders", 0, &["old"])]);
    apply(&mut machine, 950, vec![enqueue("orders", 0, &["new"])]);
    apply(&mut machine, 1000, vec![deliver("billing", 0, &[1], 10)]);
    assert_eq!(machine.released_below("billing", "orders", 0), None);
    // As if an age cap released entry 1 (this replica compacted it away).
    machine.forget_through(1);
    assert_eq!(machine.released_below("billing", "orders", 0), Some(2));
    assert_eq!(machine.released_below("audit", "orders", 0), Some(2));
    // Offset 1 is due but gone: only 2 is selected, and the master commits past 1 first.
    assert_eq!(
        machine.deliverable("billing", "orders", 0, 2000, 10),
        Some(vec![2])
    );
    let got = apply(
        &mut machine,
        2000,
        vec![
            commit("billing", "orders", 0, 2),
            deliver("billing", 0, &[2], 10),
        ],
    );
    assert_eq!(
        got[1],
        Applied::Delivered {
            deliveries: vec![Delivery {
                offset: 2,
                delivery_count: 1,
                deadline_ms: 2010
            }]
        }
    );
    let in_flight = machine.in_flight("billing", "orders", 0).unwrap();
    assert_eq!(in_flight.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [2]);
    assert_eq!(machine.released_below("billing", "orders", 0), None);
}
