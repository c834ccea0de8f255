//! Stories about applying, reading, retention and snapshots; then model-based properties.

use std::sync::Arc;

use phxq_types::{ErrorCode, GroupId, KEY_BYTES_MAX, MESSAGE_ID_BYTES_MAX};

use super::{Applied, Delivery, EntryRef, GroupMachine, ReadPlan, StoredMessage};
use crate::{Batch, Command, Message, Retention, StoreLayout, TopicConfig, encode_batch};

mod budget;
mod delivery;
mod model;
mod topics;

const NO_RETENTION: Retention = Retention {
    replay_count: 0,
    replay_age_ms: 0,
    max_age_ms: None,
    max_bytes: None,
};

/// The dedup window of "orders" ("logs" has none).
const ORDERS_DEDUP_WINDOW: u32 = 3;

/// Two groups; this test's machine is group 0, so it hosts queues 0 and 2 of "orders" and
/// queue 0 of "logs". Values are at most 16 bytes.
fn layout(orders: Retention, logs: Retention) -> Arc<StoreLayout> {
    Arc::new(StoreLayout {
        groups: 2,
        topics: vec![
            TopicConfig {
                name: "orders".into(),
                queues: 4,
                consumer_groups: vec!["billing".into(), "audit".into()],
                retention: orders,
                dedup_window: ORDERS_DEDUP_WINDOW,
                group_settings: [("audit".to_string(), audit_settings())].into(),
            },
            TopicConfig {
                name: "logs".into(),
                queues: 2,
                consumer_groups: vec![],
                retention: logs,
                dedup_window: 0,
                group_settings: Default::default(),
            },
        ],
        message_bytes_max: 16,
    })
}

/// "audit" tracks at most [`AUDIT_IN_FLIGHT_MAX`] offsets in flight per queue.
fn audit_settings() -> crate::ConsumerGroupSettings {
    crate::ConsumerGroupSettings {
        max_in_flight: Some(AUDIT_IN_FLIGHT_MAX),
        ..Default::default()
    }
}

/// The in-flight limit of "audit" on "orders" ("billing" has the default).
const AUDIT_IN_FLIGHT_MAX: u32 = 2;

fn machine() -> GroupMachine {
    GroupMachine::new(GroupId(0), layout(NO_RETENTION, NO_RETENTION))
}

fn enqueue(topic: &str, queue: u32, values: &[&str]) -> Command {
    enqueue_with_id(topic, queue, "", values)
}

/// An enqueue carrying producer message id `id` (none if empty).
fn enqueue_with_id(topic: &str, queue: u32, id: &str, values: &[&str]) -> Command {
    Command::Enqueue {
        topic: topic.into(),
        queue,
        message_id: id.as_bytes().to_vec(),
        messages: values
            .iter()
            .map(|value| Message {
                key: Vec::new(),
                value: value.as_bytes().to_vec(),
            })
            .collect(),
    }
}

fn commit(consumer_group: &str, topic: &str, queue: u32, offset: u64) -> Command {
    Command::CommitCursor {
        consumer_group: consumer_group.into(),
        topic: topic.into(),
        queue,
        offset,
    }
}

fn entry(time_ms: u64, commands: Vec<Command>) -> Vec<u8> {
    encode_batch(&Batch { time_ms, commands })
}

/// Applies the next entry and checks the invariants.
fn apply(machine: &mut GroupMachine, time_ms: u64, commands: Vec<Command>) -> Vec<Applied> {
    let index = machine.applied_index() + 1;
    let applied = machine.apply(index, &entry(time_ms, commands)).unwrap();
    machine.validate();
    applied
}

/// Reads up to `count_max` values of a queue from `from` the way a node serves a dequeue,
/// with `log` the payloads by raft index (index 1 at position 0).
fn read(
    machine: &GroupMachine,
    log: &[Vec<u8>],
    (topic, queue): (&str, u32),
    from: u64,
    count_max: u64,
) -> Vec<(u64, String)> {
    let plan = machine.read_plan(topic, queue, from, count_max).unwrap();
    let mut out: Vec<StoredMessage> = Vec::new();
    for entry in &plan.entries {
        let data = &log[entry.index as usize - 1];
        let left = count_max - out.len() as u64;
        out.extend(
            GroupMachine::extract(entry, data, topic, queue, plan.start, left, u64::MAX).unwrap(),
        );
    }
    out.into_iter()
        .map(|m| (m.offset, String::from_utf8(m.value).unwrap()))
        .collect()
}

fn applied_log(machine: &mut GroupMachine, entries: Vec<(u64, Vec<Command>)>) -> Vec<Vec<u8>> {
    entries
        .into_iter()
        .map(|(time_ms, commands)| {
            let data = entry(time_ms, commands);
            let index = machine.applied_index() + 1;
            machine.apply(index, &data).unwrap();
            data
        })
        .collect()
}

#[test]
fn two_enqueues_for_one_queue_in_one_batch_get_consecutive_offsets() {
    let mut machine = machine();
    let applied = apply(
        &mut machine,
        100,
        vec![
            enqueue("orders", 0, &["a", "b"]),
            enqueue("orders", 2, &["x"]),
            enqueue("orders", 0, &["c"]),
        ],
    );
    assert_eq!(
        applied,
        [
            Applied::Enqueued {
                first_offset: 1,
                count: 2,
                duplicate: false
            },
            Applied::Enqueued {
                first_offset: 1,
                count: 1,
                duplicate: false
            },
            Applied::Enqueued {
                first_offset: 3,
                count: 1,
                duplicate: false
            },
        ]
    );
    assert_eq!(machine.end_offset("orders", 0), Some(4));
    let plan = machine.read_plan("orders", 0, 1, 10).unwrap();
    let one_run = EntryRef {
        index: 1,
        first_offset: 1,
        count: 3,
        skipped: Vec::new(),
    };
    assert_eq!(
        plan,
        ReadPlan {
            start: 1,
            entries: vec![one_run],
            end: 4
        }
    );
}

#[test]
fn offsets_continue_across_entries_and_reads_span_them() {
    let mut machine = machine();
    let log = applied_log(
        &mut machine,
        vec![
            (100, vec![enqueue("orders", 0, &["a", "b"])]),
            (101, vec![enqueue("logs", 0, &["l"])]),
            (102, vec![enqueue("orders", 0, &["c"])]),
        ],
    );
    assert_eq!(
        read(&machine, &log, ("orders", 0), 2, 10),
        [(2, "b".to_string()), (3, "c".to_string())]
    );
    assert_eq!(
        read(&machine, &log, ("orders", 0), 1, 1),
        [(1, "a".to_string())]
    );
    assert_eq!(read(&machine, &log, ("orders", 0), 4, 10), []);
    assert_eq!(
        read(&machine, &log, ("logs", 0), 1, 10),
        [(1, "l".to_string())]
    );
}

#[test]
fn a_rejected_command_changes_nothing_and_its_neighbours_still_apply() {
    let mut machine = machine();
    let too_large = "seventeen bytes!!";
    let applied = apply(
        &mut machine,
        100,
        vec![
            enqueue("orders", 0, &["a"]),
            enqueue("orders", 0, &["b", too_large]),
            commit("billing", "orders", 0, 3),
            enqueue("orders", 0, &["c"]),
        ],
    );
    assert_eq!(
        applied,
        [
            Applied::Enqueued {
                first_offset: 1,
                count: 1,
                duplicate: false
            },
            Applied::Rejected(ErrorCode::MessageTooLarge),
            Applied::Rejected(ErrorCode::InvalidArgument),
            Applied::Enqueued {
                first_offset: 2,
                count: 1,
                duplicate: false
            },
        ]
    );
    assert_eq!(machine.end_offset("orders", 0), Some(3));
    assert_eq!(machine.cursor("billing", "orders", 0), Some(1));
}

#[test]
fn reading_skips_an_oversized_enqueue_exactly_as_applying_refused_it() {
    // extract does not know the layout's value limit; the entry's count tells it.
    let mut machine = machine();
    let log = applied_log(
        &mut machine,
        vec![(
            100,
            vec![
                enqueue("orders", 0, &["a", &"x".repeat(17)]),
                enqueue("orders", 0, &["b", "cc"]),
                enqueue("orders", 0, &[]),
                enqueue("orders", 0, &[&"y".repeat(16)]),
            ],
        )],
    );
    assert_eq!(
        read(&machine, &log, ("orders", 0), 1, 10),
        [
            (1, "b".to_string()),
            (2, "cc".to_string()),
            (3, "y".repeat(16))
        ]
    );
}

#[test]
fn a_key_over_the_limit_is_refused_and_skipped_on_read() {
    let mut machine = machine();
    let long_key = Command::Enqueue {
        topic: "orders".into(),
        queue: 0,
        message_id: Vec::new(),
        messages: vec![Message {
            key: vec![b'k'; KEY_BYTES_MAX + 1],
            value: b"v".to_vec(),
        }],
    };
    assert_eq!(machine.check(&long_key), Err(ErrorCode::MessageTooLarge));
    let log = applied_log(
        &mut machine,
        vec![(100, vec![long_key, enqueue("orders", 0, &["ok"])])],
    );
    assert_eq!(
        read(&machine, &log, ("orders", 0), 1, 10),
        [(1, "ok".to_string())]
    );
}

#[test]
fn check_names_the_reason_for_each_refusal() {
    let mut machine = machine();
    apply(&mut machine, 100, vec![enqueue("orders", 0, &["a", "b"])]);
    let check = |command| machine.check(&command);
    assert_eq!(check(enqueue("orders", 0, &["a"])), Ok(()));
    assert_eq!(
        check(enqueue("nope", 0, &["a"])),
        Err(ErrorCode::UnknownTopic)
    );
    assert_eq!(
        check(enqueue("orders", 4, &["a"])),
        Err(ErrorCode::UnknownQueue)
    );
    assert_eq!(
        check(enqueue("orders", 1, &["a"])),
        Err(ErrorCode::InvalidArgument),
        "queue 1 lives in group 1"
    );
    assert_eq!(check(enqueue("orders", 0, &[])), Err(ErrorCode::EmptyBatch));
    assert_eq!(
        check(enqueue("orders", 0, &[&"x".repeat(17)])),
        Err(ErrorCode::MessageTooLarge)
    );
    assert_eq!(
        check(commit("billing", "orders", 0, 3)),
        Ok(()),
        "end is fine"
    );
    assert_eq!(
        check(commit("billing", "orders", 0, 4)),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        check(commit("billing", "orders", 0, 0)),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        check(commit("ghost", "orders", 0, 1)),
        Err(ErrorCode::UnknownConsumerGroup)
    );
    assert_eq!(
        check(commit("billing", "logs", 0, 1)),
        Err(ErrorCode::UnknownConsumerGroup)
    );
    assert_eq!(
        check(commit("billing", "orders", 9, 1)),
        Err(ErrorCode::UnknownQueue)
    );
}

#[test]
fn an_undecodable_entry_is_an_error_and_changes_nothing() {
    let mut machine = machine();
    apply(&mut machine, 100, vec![enqueue("orders", 0, &["a"])]);
    assert!(machine.apply(2, &[7, 7, 7]).is_err());
    assert_eq!(machine.applied_index(), 1);
    assert_eq!(machine.end_offset("orders", 0), Some(2));
    apply(&mut machine, 100, vec![enqueue("orders", 0, &["b"])]);
    assert_eq!(machine.end_offset("orders", 0), Some(3));
}

#[test]
fn a_raft_no_op_entry_only_advances_the_applied_index() {
    let mut machine = machine();
    assert_eq!(machine.apply(1, &[]), Ok(vec![]));
    assert_eq!(machine.applied_index(), 1);
    assert_eq!(machine.end_offset("orders", 0), Some(1));
    assert_eq!(machine.deletable_index(0), 1);
}

#[test]
#[should_panic(expected = "entries apply in order")]
fn applying_out_of_order_is_a_bug() {
    let mut machine = machine();
    let _ = machine.apply(2, &[]);
}

#[test]
fn cursors_start_at_one_and_a_commit_may_move_them_back_for_replay() {
    let mut machine = machine();
    assert_eq!(machine.cursor("billing", "orders", 0), Some(1));
    apply(
        &mut machine,
        100,
        vec![enqueue("orders", 0, &["a", "b", "c"])],
    );
    apply(&mut machine, 100, vec![commit("billing", "orders", 0, 4)]);
    let applied = apply(&mut machine, 100, vec![commit("billing", "orders", 0, 2)]);
    assert_eq!(applied, [Applied::CursorCommitted { offset: 2 }]);
    assert_eq!(machine.cursor("billing", "orders", 0), Some(2));
    assert_eq!(
        machine.cursor("audit", "orders", 0),
        Some(1),
        "groups are independent"
    );
    assert_eq!(
        machine.cursor("billing", "orders", 1),
        None,
        "hosted by group 1"
    );
    assert_eq!(machine.cursor("ghost", "orders", 0), None);
    assert_eq!(machine.end_offset("nope", 0), None);
}

#[test]
fn extract_honours_count_and_bytes_limits_but_returns_at_least_one() {
    let mut machine = machine();
    let log = applied_log(
        &mut machine,
        vec![(100, vec![enqueue("orders", 0, &["aaaa", "bbbb", "cccc"])])],
    );
    let entry = machine.read_plan("orders", 0, 1, 10).unwrap().entries[0].clone();
    let values = |from, count_max, bytes_max| {
        GroupMachine::extract(&entry, &log[0], "orders", 0, from, count_max, bytes_max)
            .unwrap()
            .into_iter()
            .map(|m| (m.offset, m.time_ms, String::from_utf8(m.value).unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(values(2, 10, 8).len(), 2);
    assert_eq!(values(1, 10, 7), [(1, 100, "aaaa".to_string())]);
    assert_eq!(
        values(1, 10, 0),
        [(1, 100, "aaaa".to_string())],
        "at least one"
    );
    assert_eq!(values(3, 1, 100), [(3, 100, "cccc".to_string())]);
    assert_eq!(values(1, 0, 100), []);
    assert!(GroupMachine::extract(&entry, &[9], "orders", 0, 1, 1, 1).is_err());
}

#[test]
fn read_plan_starts_at_the_oldest_retained_offset_once_older_entries_are_forgotten() {
    let mut machine = machine();
    let log = applied_log(
        &mut machine,
        vec![
            (100, vec![enqueue("orders", 0, &["a", "b"])]),
            (101, vec![enqueue("orders", 0, &["c"])]),
            (102, vec![enqueue("orders", 0, &["d"])]),
        ],
    );
    machine.forget_through(1);
    machine.validate();
    let plan = machine.read_plan("orders", 0, 1, 1).unwrap();
    assert_eq!(plan.start, 3);
    assert_eq!(plan.entries.len(), 1, "count_max 1 needs one entry");
    assert_eq!(plan.end, 5);
    assert_eq!(
        read(&machine, &log, ("orders", 0), 1, 5),
        [(3, "c".into()), (4, "d".into())]
    );
    assert_eq!(machine.read_plan("orders", 0, 9, 5).unwrap().start, 9);
    assert_eq!(machine.read_plan("orders", 1, 1, 5), None);
}

mod seek_by_time {
    use super::*;

    /// `orders/0` at the times given, one entry per time, `count` messages each.
    fn stamped(entries: &[(u64, usize)]) -> GroupMachine {
        let mut machine = machine();
        for &(time_ms, count) in entries {
            let values = vec!["m"; count];
            apply(&mut machine, time_ms, vec![enqueue("orders", 0, &values)]);
        }
        machine
    }

    #[test]
    fn the_first_offset_stamped_at_or_after_the_time_or_the_end() {
        // Offsets 1-2 at 1000, 3 at 2000, 4-5 at 3000; the end is 6.
        let machine = stamped(&[(1000, 2), (2000, 1), (3000, 2)]);
        let seek = |time_ms| machine.offset_for_time("orders", 0, time_ms);
        assert_eq!(seek(0), Some(1), "before everything: the oldest");
        assert_eq!(
            seek(1000),
            Some(1),
            "exactly a batch's time: its first message"
        );
        assert_eq!(seek(1001), Some(3));
        assert_eq!(seek(2000), Some(3));
        assert_eq!(seek(2999), Some(4));
        assert_eq!(seek(3000), Some(4));
        assert_eq!(seek(3001), Some(6), "after everything: the end");
        assert_eq!(seek(u64::MAX), Some(6));
        assert_eq!(
            machine.offset_for_time("orders", 2, 0),
            Some(1),
            "empty queue"
        );
        assert_eq!(
            machine.offset_for_time("orders", 1, 0),
            None,
            "hosted by group 1"
        );
        assert_eq!(machine.offset_for_time("nope", 0, 0), None);
    }

    #[test]
    fn messages_of_one_entry_share_its_time_whatever_their_command() {
        let mut machine = machine();
        apply(&mut machine, 1000, vec![enqueue("orders", 0, &["a"])]);
        apply(
            &mut machine,
            2000,
            vec![enqueue("orders", 0, &["b"]), enqueue("orders", 0, &["c"])],
        );
        assert_eq!(machine.offset_for_time("orders", 0, 1500), Some(2));
        assert_eq!(machine.offset_for_time("orders", 0, 2001), Some(4));
    }

    #[test]
    fn after_a_clock_step_back_the_first_message_not_older_is_found() {
        // A new master's clock 1 s behind: offsets 1..=4 stamped 1000, 3000, 2000, 4000.
        let mut machine = stamped(&[(1000, 1), (3000, 1), (2000, 1), (4000, 1)]);
        let seek = |machine: &GroupMachine, time_ms| machine.offset_for_time("orders", 0, time_ms);
        assert_eq!(
            seek(&machine, 2000),
            Some(2),
            "3000 is the first at or after 2000"
        );
        assert_eq!(seek(&machine, 2500), Some(2));
        assert_eq!(seek(&machine, 3001), Some(4), "2000 at offset 3 is older");
        // Entries 1 and 2 compacted: 3000 no longer holds the maximum, 2000 is the oldest.
        machine.forget_through(2);
        machine.validate();
        assert_eq!(seek(&machine, 1500), Some(3), "the oldest retained");
        assert_eq!(seek(&machine, 2500), Some(4), "offset 3 (2000) is older");
        machine.forget_through(4);
        machine.validate();
        assert_eq!(seek(&machine, 0), Some(5), "nothing retained: the end");
    }
}

mod retention {
    use super::*;

    fn machine_with(orders: Retention) -> GroupMachine {
        GroupMachine::new(GroupId(0), layout(orders, NO_RETENTION))
    }

    /// Entries 1..=4 each hold one message of orders/0, stamped 1000, 2000, 3000, 4000.
    fn four_entries(machine: &mut GroupMachine) {
        for time_ms in [1000, 2000, 3000, 4000] {
            apply(machine, time_ms, vec![enqueue("orders", 0, &["m"])]);
        }
    }

    #[test]
    fn nothing_is_deletable_while_a_consumer_group_has_not_read_it() {
        let mut machine = machine_with(NO_RETENTION);
        four_entries(&mut machine);
        assert_eq!(machine.deletable_index(10_000), 0);
        apply(&mut machine, 5000, vec![commit("billing", "orders", 0, 4)]);
        assert_eq!(machine.deletable_index(10_000), 0, "audit has read nothing");
        apply(&mut machine, 5000, vec![commit("audit", "orders", 0, 3)]);
        assert_eq!(
            machine.deletable_index(10_000),
            2,
            "the slowest group is at 3"
        );
        apply(&mut machine, 5000, vec![commit("audit", "orders", 0, 5)]);
        assert_eq!(
            machine.deletable_index(10_000),
            3,
            "entry 4 is still unread by billing"
        );
        apply(&mut machine, 5000, vec![commit("billing", "orders", 0, 5)]);
        assert_eq!(
            machine.deletable_index(10_000),
            8,
            "all read: up to the applied index"
        );
    }

    #[test]
    fn retention_keeps_the_replay_window_behind_the_slowest_group() {
        let mut machine = machine_with(Retention {
            replay_count: 2,
            ..NO_RETENTION
        });
        four_entries(&mut machine);
        apply(&mut machine, 5000, vec![commit("billing", "orders", 0, 5)]);
        apply(&mut machine, 5000, vec![commit("audit", "orders", 0, 4)]);
        // The slowest group reads 4 next: offsets 2 and 3 are the replay window.
        assert_eq!(machine.deletable_index(10_000), 1);
    }

    #[test]
    fn retention_keeps_recent_messages_for_replay_by_age() {
        let mut machine = machine_with(Retention {
            replay_age_ms: 1500,
            ..NO_RETENTION
        });
        four_entries(&mut machine);
        apply(&mut machine, 5000, vec![commit("billing", "orders", 0, 5)]);
        apply(&mut machine, 5000, vec![commit("audit", "orders", 0, 5)]);
        // At 4000, entries stamped 2500 and later are in the window.
        assert_eq!(machine.deletable_index(4000), 2);
        assert_eq!(
            machine.deletable_index(4500),
            2,
            "stamped exactly 1500 ago: kept"
        );
        assert_eq!(machine.deletable_index(4501), 3);
        assert_eq!(machine.deletable_index(6000), 6);
    }

    #[test]
    fn the_age_cap_releases_messages_nobody_read() {
        let mut machine = machine_with(Retention {
            max_age_ms: Some(2500),
            ..NO_RETENTION
        });
        four_entries(&mut machine);
        assert_eq!(
            machine.deletable_index(3500),
            0,
            "exactly the cap's age: kept"
        );
        assert_eq!(
            machine.deletable_index(4000),
            1,
            "only entry 1 is older than 1500"
        );
        assert_eq!(machine.deletable_index(5600), 3);
    }

    #[test]
    fn the_size_cap_keeps_only_the_newest_bytes() {
        let mut machine = machine_with(Retention {
            max_bytes: Some(2),
            ..NO_RETENTION
        });
        four_entries(&mut machine);
        // One byte per entry: entries 3 and 4 already hold the 2 bytes.
        assert_eq!(machine.deletable_index(0), 2);
    }

    #[test]
    fn a_topic_without_consumer_groups_keeps_only_its_replay_window() {
        let mut machine = GroupMachine::new(
            GroupId(0),
            layout(
                NO_RETENTION,
                Retention {
                    replay_count: 1,
                    ..NO_RETENTION
                },
            ),
        );
        for _ in 0..3 {
            apply(&mut machine, 1000, vec![enqueue("logs", 0, &["l"])]);
        }
        assert_eq!(machine.deletable_index(10_000), 2);
    }

    #[test]
    fn the_slowest_queue_holds_back_the_whole_group() {
        let mut machine = machine_with(NO_RETENTION);
        apply(&mut machine, 1000, vec![enqueue("orders", 2, &["old"])]);
        four_entries(&mut machine);
        for group in ["billing", "audit"] {
            apply(&mut machine, 5000, vec![commit(group, "orders", 0, 5)]);
        }
        assert_eq!(machine.deletable_index(10_000), 0, "orders/2 is unread");
    }
}

mod dedup {
    use super::*;

    fn enqueued(first_offset: u64, count: u64, duplicate: bool) -> Applied {
        Applied::Enqueued {
            first_offset,
            count,
            duplicate,
        }
    }

    fn values(machine: &GroupMachine, log: &[Vec<u8>], queue: u32) -> Vec<(u64, String)> {
        read(machine, log, ("orders", queue), 1, 100)
    }

    #[test]
    fn a_retry_inside_the_window_appends_nothing_and_gets_the_original_offsets() {
        let mut machine = machine();
        let log = applied_log(
            &mut machine,
            vec![
                (100, vec![enqueue_with_id("orders", 0, "a", &["x", "y"])]),
                (101, vec![enqueue("orders", 0, &["plain"])]),
            ],
        );
        let retry = vec![
            enqueue_with_id("orders", 0, "a", &["x", "y"]),
            enqueue_with_id("orders", 0, "b", &["z"]),
            enqueue_with_id("orders", 0, "b", &["z"]),
        ];
        let data = entry(102, retry);
        assert_eq!(
            machine.apply(3, &data).unwrap(),
            [
                enqueued(1, 2, true),
                enqueued(4, 1, false),
                enqueued(4, 1, true)
            ]
        );
        machine.validate();
        let log = [log, vec![data]].concat();
        assert_eq!(machine.end_offset("orders", 0), Some(5));
        assert_eq!(
            values(&machine, &log, 0),
            [
                (1, "x".into()),
                (2, "y".into()),
                (3, "plain".into()),
                (4, "z".into())
            ],
            "reading skips the duplicates, before and after the original in one entry"
        );
    }

    #[test]
    fn an_id_pushed_out_of_the_window_appends_again() {
        let mut machine = machine();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let applied = apply(
                &mut machine,
                100,
                vec![enqueue_with_id("orders", 0, id, &[id])],
            );
            assert_eq!(applied, [enqueued(i as u64 + 1, 1, false)]);
        }
        // The window holds the newest three: b, c, d.
        let applied = apply(
            &mut machine,
            100,
            vec![
                enqueue_with_id("orders", 0, "b", &["b"]),
                enqueue_with_id("orders", 0, "a", &["a"]),
            ],
        );
        assert_eq!(applied, [enqueued(2, 1, true), enqueued(5, 1, false)]);
        // a came back in and pushed b out.
        let applied = apply(
            &mut machine,
            100,
            vec![enqueue_with_id("orders", 0, "b", &["b"])],
        );
        assert_eq!(applied, [enqueued(6, 1, false)]);
    }

    #[test]
    fn ids_are_per_queue_and_ignored_where_the_window_is_zero() {
        let mut machine = machine();
        let applied = apply(
            &mut machine,
            100,
            vec![
                enqueue_with_id("orders", 0, "a", &["x"]),
                enqueue_with_id("orders", 2, "a", &["x"]),
                enqueue_with_id("logs", 0, "a", &["x"]),
                enqueue_with_id("logs", 0, "a", &["x"]),
            ],
        );
        assert_eq!(
            applied,
            [
                enqueued(1, 1, false),
                enqueued(1, 1, false),
                enqueued(1, 1, false),
                enqueued(2, 1, false)
            ]
        );
    }

    #[test]
    fn an_id_over_the_limit_is_refused_and_changes_nothing() {
        let mut machine = machine();
        let longest = "i".repeat(MESSAGE_ID_BYTES_MAX);
        let too_long = "i".repeat(MESSAGE_ID_BYTES_MAX + 1);
        let bad = enqueue_with_id("orders", 0, &too_long, &["x"]);
        assert_eq!(machine.check(&bad), Err(ErrorCode::InvalidArgument));
        let good = enqueue_with_id("orders", 0, &longest, &["x"]);
        assert_eq!(machine.check(&good), Ok(()));
        let applied = apply(&mut machine, 100, vec![bad, good.clone(), good]);
        assert_eq!(
            applied,
            [
                Applied::Rejected(ErrorCode::InvalidArgument),
                enqueued(1, 1, false),
                enqueued(1, 1, true)
            ]
        );
        assert_eq!(machine.end_offset("orders", 0), Some(2));
    }

    #[test]
    fn a_snapshot_holds_the_window_as_of_its_index_so_replayed_retries_stay_duplicates() {
        let mut machine = machine();
        let entries = ["a", "b", "c", "d"]
            .map(|id| (100, vec![enqueue_with_id("orders", 0, id, &[id])]))
            .into_iter()
            // A retry of a, still inside the window at entry 5? No: d pushed it out at 4.
            // A retry of b is: a duplicate when first applied, so it must stay one.
            .chain([(100, vec![enqueue_with_id("orders", 0, "b", &["b"])])])
            .collect();
        let log = applied_log(&mut machine, entries);
        for index in 0..=5 {
            let snapshot = machine.snapshot(index);
            let mut compacted = machine.clone();
            compacted.forget_through(index);
            let mut restored =
                GroupMachine::restore(GroupId(0), machine.layout.clone(), &snapshot).unwrap();
            for replayed in index + 1..=5 {
                restored
                    .apply(replayed, &log[replayed as usize - 1])
                    .unwrap();
            }
            restored.validate();
            assert_eq!(restored.topics, compacted.topics, "snapshot at {index}");
            assert_eq!(restored.end_offset("orders", 0), Some(5));
        }
    }
}

mod snapshots {
    use super::*;

    #[test]
    fn snapshot_restore_and_replay_give_back_the_state_without_the_old_messages() {
        let mut machine = machine();
        let log = applied_log(
            &mut machine,
            vec![
                (100, vec![enqueue("orders", 0, &["a", "b"])]),
                (101, vec![commit("billing", "orders", 0, 3)]),
                (
                    102,
                    vec![enqueue("orders", 0, &["c"]), enqueue("orders", 2, &["x"])],
                ),
                (103, vec![commit("billing", "orders", 0, 4)]),
            ],
        );
        let snapshot = machine.snapshot(2);
        machine.forget_through(2);
        let mut restored =
            GroupMachine::restore(GroupId(0), layout(NO_RETENTION, NO_RETENTION), &snapshot)
                .unwrap();
        assert_eq!(restored.applied_index(), 2);
        assert_eq!(restored.end_offset("orders", 0), Some(3));
        assert_eq!(
            restored.cursor("billing", "orders", 0),
            Some(4),
            "the newest cursor, ahead of the end until the tail is replayed"
        );
        for (position, data) in log.iter().enumerate().skip(2) {
            restored.apply(position as u64 + 1, data).unwrap();
        }
        restored.validate();
        assert_eq!(restored.topics, machine.topics);
        assert_eq!(
            read(&restored, &log, ("orders", 0), 1, 10),
            [(3, "c".into())]
        );
    }

    #[test]
    fn restore_refuses_garbage_another_group_and_unknown_names() {
        let layout = layout(NO_RETENTION, NO_RETENTION);
        let snapshot = machine().snapshot(0);
        assert!(GroupMachine::restore(GroupId(0), layout.clone(), &snapshot).is_ok());
        assert!(GroupMachine::restore(GroupId(1), layout.clone(), &snapshot).is_err());
        assert!(GroupMachine::restore(GroupId(0), layout.clone(), &[]).is_err());
        let mut unknown_version = snapshot.clone();
        unknown_version[0] = 5;
        assert!(GroupMachine::restore(GroupId(0), layout.clone(), &unknown_version).is_err());
        for length in 0..snapshot.len() {
            let layout = layout.clone();
            assert!(GroupMachine::restore(GroupId(0), layout, &snapshot[..length]).is_err());
        }
    }

    #[test]
    fn a_version_3_snapshot_brings_its_own_topic_table_whatever_the_layout_says() {
        let layout = layout(NO_RETENTION, NO_RETENTION);
        let snapshot = machine().snapshot(0);
        let other = Arc::new(StoreLayout {
            topics: vec![layout.topics[1].clone()],
            ..(*layout).clone()
        });
        let restored = GroupMachine::restore(GroupId(0), other, &snapshot).unwrap();
        let names: Vec<&str> = restored.topics().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["orders", "logs"]);
    }

    #[test]
    fn a_version_2_snapshot_is_read_against_the_layouts_topics() {
        // Version 2, group 0, applied 5, one topic "orders" with queue 0 at next offset 3,
        // no cursor, no dedup record. "logs" is not in it: it starts empty.
        let mut v2 = vec![2, 0, 5, 1, 6];
        v2.extend_from_slice(b"orders");
        v2.extend_from_slice(&[1, 0, 3, 0, 0]);
        let layout = layout(NO_RETENTION, NO_RETENTION);
        let restored = GroupMachine::restore(GroupId(0), layout.clone(), &v2).unwrap();
        assert_eq!(restored.end_offset("orders", 0), Some(3));
        assert_eq!(
            restored.end_offset("logs", 0),
            Some(1),
            "a new topic starts empty"
        );
        let other = Arc::new(StoreLayout {
            topics: vec![layout.topics[1].clone()],
            ..(*layout).clone()
        });
        assert!(
            GroupMachine::restore(GroupId(0), other, &v2).is_err(),
            "the snapshot has a topic the layout lacks"
        );
    }
}
