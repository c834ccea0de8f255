//! Topics created, altered and deleted through the log: the table, the queues that come and
//! go with it, what reading and retention make of that, snapshots; then a property over random
//! logs that mix topic changes with enqueues and commits.

use phxq_types::{QUEUES_PER_TOPIC_MAX, TOPICS_MAX};
use proptest::prelude::*;

use super::*;
use crate::PutMode;

fn config(name: &str, queues: u32, consumer_groups: &[&str]) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        queues,
        consumer_groups: consumer_groups.iter().map(|g| g.to_string()).collect(),
        retention: NO_RETENTION,
        dedup_window: 0,
        group_settings: Default::default(),
    }
}

fn create(config: TopicConfig) -> Command {
    Command::PutTopic {
        config,
        mode: PutMode::Create,
    }
}

fn alter(config: TopicConfig) -> Command {
    Command::PutTopic {
        config,
        mode: PutMode::Alter,
    }
}

fn delete(name: &str) -> Command {
    Command::DeleteTopic { name: name.into() }
}

const PUT: Applied = Applied::TopicPut { changed: true };
const SAME: Applied = Applied::TopicPut { changed: false };

fn enqueued(first_offset: u64, count: u64) -> Applied {
    Applied::Enqueued {
        first_offset,
        count,
        duplicate: false,
    }
}

/// Applies `commands` as one entry and asserts that each was refused with `code` and that
/// nothing changed but the applied index.
fn assert_refused(machine: &mut GroupMachine, commands: Vec<Command>, code: ErrorCode) {
    let before = machine.clone();
    for command in &commands {
        let (checked, reason) = machine.check_topic_change(command).unwrap_err();
        assert_eq!(checked, code, "{reason}");
        assert!(!reason.is_empty());
    }
    let count = commands.len();
    assert_eq!(
        apply(machine, 1, commands),
        vec![Applied::Rejected(code); count]
    );
    assert_eq!(machine.topics, before.topics);
    assert_eq!(machine.topics_changed_index, before.topics_changed_index);
}

#[test]
fn a_created_topic_takes_messages_and_creating_it_again_changes_nothing() {
    let mut machine = machine();
    let events = config("events", 4, &["reader"]);
    let log = vec![
        entry(1, vec![enqueue("events", 0, &["early"])]),
        entry(2, vec![create(events.clone())]),
        entry(3, vec![enqueue("events", 0, &["a", "b"])]),
        entry(4, vec![create(events.clone())]),
    ];
    let results: Vec<Vec<Applied>> = (log.iter().enumerate())
        .map(|(i, data)| machine.apply(i as u64 + 1, data).unwrap())
        .collect();
    machine.validate();
    assert_eq!(
        results,
        [
            vec![Applied::Rejected(ErrorCode::UnknownTopic)],
            vec![PUT],
            vec![enqueued(1, 2)],
            vec![SAME],
        ]
    );
    assert_eq!(machine.topic("events"), Some(&events));
    assert_eq!(machine.topics_changed_index, 2, "the re-run is no change");
    assert_eq!(
        read(&machine, &log, ("events", 0), 1, 10),
        [(1, "a".into()), (2, "b".into())]
    );
    assert_eq!(
        machine.end_offset("events", 1),
        None,
        "queue 1 is group 1's"
    );
    assert_eq!(machine.cursor("reader", "events", 2), Some(1));
}

#[test]
fn bad_topic_changes_are_refused_with_their_code_and_change_nothing() {
    let mut machine = machine();
    let orders = machine.topic("orders").unwrap().clone();
    let refusals = [
        (
            vec![create(config("bad name", 1, &[]))],
            ErrorCode::InvalidName,
        ),
        (
            vec![create(config("t", 1, &["bad group"]))],
            ErrorCode::InvalidName,
        ),
        (
            vec![create(config("t", 0, &[]))],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![create(config("t", QUEUES_PER_TOPIC_MAX + 1, &[]))],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![create(config("t", 1, &["g", "g"]))],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![create(config("orders", 8, &["billing"]))],
            ErrorCode::TopicExists,
        ),
        (vec![alter(config("nope", 8, &[]))], ErrorCode::UnknownTopic),
        (
            vec![alter(TopicConfig {
                queues: 3,
                ..orders.clone()
            })],
            ErrorCode::InvalidArgument,
        ),
        (vec![delete("nope")], ErrorCode::UnknownTopic),
    ];
    for (commands, code) in refusals {
        assert_refused(&mut machine, commands, code);
    }
    let mut absurd = orders.clone();
    absurd.retention.max_age_ms = Some(0);
    assert_refused(
        &mut machine,
        vec![alter(absurd)],
        ErrorCode::InvalidArgument,
    );
}

#[test]
fn the_table_holds_at_most_topics_max() {
    let mut machine = machine();
    let creates = (machine.topics.len()..TOPICS_MAX)
        .map(|i| create(config(&format!("t{i}"), 1, &[])))
        .collect();
    apply(&mut machine, 1, creates);
    assert_eq!(machine.topics.len(), TOPICS_MAX);
    assert_refused(
        &mut machine,
        vec![create(config("one-more", 1, &[]))],
        ErrorCode::InvalidArgument,
    );
}

#[test]
fn an_alter_grows_queues_and_moves_cursors_with_their_consumer_group() {
    let mut machine = machine();
    // Group 0 of 2 hosts orders/0 and orders/2; growing to 6 queues adds orders/4.
    apply(
        &mut machine,
        1,
        vec![enqueue("orders", 0, &["a", "b", "c"])],
    );
    apply(
        &mut machine,
        1,
        vec![
            commit("audit", "orders", 0, 3),
            commit("billing", "orders", 0, 2),
        ],
    );
    assert_eq!(
        apply(&mut machine, 1, vec![enqueue("orders", 4, &["x"])]),
        [Applied::Rejected(ErrorCode::UnknownQueue)]
    );
    let mut grown = machine.topic("orders").unwrap().clone();
    grown.queues = 6;
    grown.consumer_groups = vec!["audit".into(), "search".into()];
    assert_eq!(apply(&mut machine, 1, vec![alter(grown.clone())]), [PUT]);
    assert_eq!(
        apply(&mut machine, 1, vec![enqueue("orders", 4, &["x"])]),
        [enqueued(1, 1)]
    );
    assert_eq!(machine.cursor("audit", "orders", 0), Some(3), "kept");
    assert_eq!(
        machine.cursor("search", "orders", 0),
        Some(1),
        "a new group starts at 1"
    );
    assert_eq!(machine.cursor("search", "orders", 4), Some(1));
    assert_eq!(machine.cursor("billing", "orders", 0), None, "removed");
    assert_eq!(
        apply(&mut machine, 1, vec![commit("billing", "orders", 0, 3)]),
        [Applied::Rejected(ErrorCode::UnknownConsumerGroup)]
    );
    assert_eq!(
        machine.end_offset("orders", 0),
        Some(4),
        "the old queue keeps its messages"
    );
    assert_eq!(apply(&mut machine, 1, vec![alter(grown)]), [SAME]);
}

#[test]
fn a_deleted_topic_is_unknown_and_no_longer_holds_back_the_log() {
    let mut machine = machine();
    apply(&mut machine, 1, vec![enqueue("orders", 0, &["unread"])]);
    apply(&mut machine, 1, vec![enqueue("logs", 0, &["x"])]);
    assert_eq!(
        machine.deletable_index(10),
        0,
        "billing has not read orders/0"
    );
    assert_eq!(
        apply(&mut machine, 1, vec![delete("orders")]),
        [Applied::TopicDeleted]
    );
    assert_eq!(
        machine.deletable_index(10),
        3,
        "nothing needs entries 1 to 3 now"
    );
    assert_eq!(
        apply(&mut machine, 1, vec![enqueue("orders", 0, &["late"])]),
        [Applied::Rejected(ErrorCode::UnknownTopic)]
    );
    assert_eq!(machine.end_offset("orders", 0), None);
    assert_eq!(machine.topic("orders"), None);
    machine.forget_through(3);
    machine.validate();
}

#[test]
fn compaction_waits_for_the_last_topic_change() {
    let mut machine = machine();
    let read_to = |offset| {
        vec![
            commit("billing", "orders", 0, offset),
            commit("audit", "orders", 0, offset),
        ]
    };
    apply(&mut machine, 1, vec![enqueue("orders", 0, &["a"])]);
    apply(&mut machine, 1, read_to(2));
    apply(&mut machine, 1, vec![enqueue("orders", 0, &["b"])]);
    assert_eq!(machine.deletable_index(10), 2, "entry 3 is unread");
    apply(&mut machine, 1, vec![create(config("events", 1, &[]))]);
    assert_eq!(
        machine.deletable_index(10),
        0,
        "2 is below the topic change at 4"
    );
    apply(&mut machine, 1, read_to(3));
    assert_eq!(machine.deletable_index(10), 5);
}

#[test]
fn a_queue_created_inside_an_entry_does_not_claim_the_entrys_earlier_enqueues() {
    let mut machine = machine();
    let commands = vec![
        enqueue("events", 0, &["refused"]),
        enqueue("orders", 0, &["old"]),
        delete("orders"),
        create(config("events", 2, &[])),
        create(config("orders", 4, &["billing"])),
        enqueue("events", 0, &["new"]),
        enqueue("orders", 0, &["reborn"]),
    ];
    let log = vec![entry(1, commands)];
    let applied = machine.apply(1, &log[0]).unwrap();
    machine.validate();
    assert_eq!(
        applied,
        [
            Applied::Rejected(ErrorCode::UnknownTopic),
            enqueued(1, 1),
            Applied::TopicDeleted,
            PUT,
            PUT,
            enqueued(1, 1),
            enqueued(1, 1),
        ]
    );
    assert_eq!(
        read(&machine, &log, ("events", 0), 1, 10),
        [(1, "new".into())]
    );
    assert_eq!(
        read(&machine, &log, ("orders", 0), 1, 10),
        [(1, "reborn".into())]
    );
}

#[test]
fn a_snapshot_carries_created_altered_and_deleted_topics() {
    let mut machine = machine();
    let log = applied_log(
        &mut machine,
        vec![
            (1, vec![create(config("events", 2, &["reader"]))]),
            (2, vec![enqueue("events", 0, &["a", "b"]), delete("logs")]),
            (3, vec![commit("reader", "events", 0, 2)]),
            (
                4,
                vec![alter(with_settings(config(
                    "events",
                    4,
                    &["reader", "late"],
                )))],
            ),
            (5, vec![enqueue("events", 2, &["c"])]),
        ],
    );
    let index = 4;
    assert_eq!(
        machine.deletable_index(10),
        0,
        "events/0 is unread below the change at 4"
    );
    let snapshot = machine.snapshot(index);
    let mut restored =
        GroupMachine::restore(GroupId(0), layout(NO_RETENTION, NO_RETENTION), &snapshot).unwrap();
    restored.apply(5, &log[4]).unwrap();
    restored.validate();
    let mut compacted = machine.clone();
    compacted.forget_through(index);
    assert_eq!(restored.topics, compacted.topics);
    assert_eq!(restored.topic("logs"), None, "deleted stays deleted");
    assert_eq!(
        restored.topic("events").unwrap().group_settings,
        with_settings(config("events", 4, &["reader", "late"])).group_settings
    );
    assert_eq!(restored.cursor("reader", "events", 0), Some(2));
    assert_eq!(
        read(&restored, &log, ("events", 2), 1, 10),
        [(1, "c".into())]
    );
}

/// `config` with settings for its first consumer group.
fn with_settings(mut config: TopicConfig) -> TopicConfig {
    let settings = crate::ConsumerGroupSettings {
        retry_tiers: vec![crate::RetryTier {
            attempts: 2,
            delay_ms: 500,
        }],
        dead_letter_topic: Some("dead".into()),
        rate_messages_per_s: Some(10),
        rate_bytes_per_s: None,
        max_in_flight: Some(4),
    };
    config
        .group_settings
        .insert(config.consumer_groups[0].clone(), settings);
    config
}

#[test]
fn removing_a_consumer_group_that_has_settings_needs_its_settings_removed_too() {
    let mut machine = machine();
    let events = with_settings(config("events", 2, &["reader", "other"]));
    apply(&mut machine, 1, vec![create(events.clone())]);
    let mut without_reader = events.clone();
    without_reader.consumer_groups = vec!["other".into()];
    assert_refused(
        &mut machine,
        vec![alter(without_reader.clone())],
        ErrorCode::InvalidArgument,
    );
    without_reader.group_settings.clear();
    assert_eq!(
        apply(&mut machine, 1, vec![alter(without_reader.clone())]),
        [PUT]
    );
    assert_eq!(machine.topic("events"), Some(&without_reader));
}

#[test]
#[should_panic(expected = "before the topic change")]
fn a_snapshot_below_the_last_topic_change_is_a_bug() {
    let mut machine = machine();
    apply(&mut machine, 1, vec![enqueue("logs", 0, &["x"])]);
    apply(&mut machine, 1, vec![delete("logs")]);
    machine.snapshot(1);
}

// Random logs mixing topic changes with queue commands, on names and counts drawn from a
// few so that creates, alters, deletes, refusals and same-entry re-creations all happen.

fn small_config() -> impl Strategy<Value = TopicConfig> {
    (
        prop::sample::select(vec!["orders", "logs", "events"]),
        1..5u32,
        prop::sample::subsequence(vec!["billing", "audit", "reader"], 0..3),
        0..3u32,
    )
        .prop_map(|(name, queues, groups, dedup_window)| TopicConfig {
            dedup_window,
            ..config(name, queues, &groups)
        })
}

fn any_command() -> impl Strategy<Value = Command> {
    let topic = || prop::sample::select(vec!["orders", "logs", "events"]);
    let group = prop::sample::select(vec!["billing", "audit", "reader"]);
    prop_oneof![
        4 => (topic(), 0..5u32, prop::sample::select(vec!["", "i1", "i2"]), 1..3usize).prop_map(
            |(topic, queue, id, count)| enqueue_with_id(topic, queue, id, &vec!["v"; count])
        ),
        2 => (group, topic(), 0..5u32, 1..6u64)
            .prop_map(|(group, topic, queue, offset)| commit(group, topic, queue, offset)),
        1 => small_config().prop_map(create),
        1 => small_config().prop_map(alter),
        1 => topic().prop_map(delete),
    ]
}

fn entries() -> impl Strategy<Value = Vec<Vec<Command>>> {
    prop::collection::vec(prop::collection::vec(any_command(), 0..5), 0..30)
}

/// A queue and its messages.
type QueueRead = (String, u32, Vec<(u64, String)>);

/// Every hosted queue's messages as read through `read_plan` and `extract`.
fn everything(machine: &GroupMachine, log: &[Vec<u8>]) -> Vec<QueueRead> {
    let hosted: Vec<(String, u32)> = machine
        .topics()
        .flat_map(|t| {
            (0..t.queues)
                .filter(|q| q % 2 == 0)
                .map(|q| (t.name.clone(), q))
        })
        .collect();
    hosted
        .into_iter()
        .map(|(topic, queue)| {
            let values = read(machine, log, (&topic, queue), 1, u64::MAX);
            (topic, queue, values)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn replicas_agree_and_a_snapshot_at_the_deletable_index_plus_the_tail_rebuilds_the_state(
        entries in entries(),
        now_ms in 0..3u64,
    ) {
        let mut machine = machine();
        let mut replica = machine.clone();
        let mut log = Vec::new();
        for (i, commands) in entries.into_iter().enumerate() {
            let data = entry(i as u64, commands.clone());
            let index = i as u64 + 1;
            // Admission agrees with apply on every topic change.
            let admitted: Vec<Option<ErrorCode>> = commands
                .iter()
                .map(|c| machine.check(c).err())
                .collect();
            let applied = machine.apply(index, &data).unwrap();
            prop_assert_eq!(&replica.apply(index, &data).unwrap(), &applied);
            if let Some(Command::PutTopic { .. } | Command::DeleteTopic { .. }) = commands.first() {
                let first = match &applied[0] { Applied::Rejected(code) => Some(*code), _ => None };
                prop_assert_eq!(admitted[0], first);
            }
            machine.validate();
            log.push(data);
        }
        prop_assert_eq!(&replica.topics, &machine.topics);
        let reads = everything(&machine, &log);
        // Each read value is one of the entry's: nothing refused or orphaned is served.
        for (_, _, values) in &reads {
            let offsets: Vec<u64> = values.iter().map(|(offset, _)| *offset).collect();
            let dense: Vec<u64> = (offsets.first().copied().unwrap_or(1)..).take(offsets.len()).collect();
            prop_assert_eq!(offsets, dense);
        }
        let applied = machine.applied_index();
        let deletable = machine.deletable_index(now_ms);
        if deletable < machine.topics_changed_index {
            prop_assert_eq!(deletable, 0);
            return Ok(());
        }
        let snapshot = machine.snapshot(deletable);
        let mut restored =
            GroupMachine::restore(GroupId(0), layout(NO_RETENTION, NO_RETENTION), &snapshot).unwrap();
        for index in deletable + 1..=applied {
            restored.apply(index, &log[index as usize - 1]).unwrap();
        }
        restored.validate();
        let mut compacted = machine.clone();
        compacted.forget_through(deletable);
        prop_assert_eq!(&restored.topics, &compacted.topics);
        prop_assert_eq!(everything(&restored, &log), everything(&compacted, &log));
    }
}
