//! The snapshot budget: each structure that grows with legal settings (dedup windows, cursors
//! of many consumer groups × queues, in-flight deliveries) reaches it and is refused there,
//! typed and with the budget named, identically on a replica restored from a snapshot; and
//! the count never under-counts a real encoding (property over random logs with topic
//! changes).

use phxq_types::{DEDUP_WINDOW_MAX, IN_FLIGHT_TRACKED_MAX, SNAPSHOT_BUDGET_BYTES};
use proptest::prelude::*;

use super::*;
use crate::PutMode;
use crate::machine::{IN_FLIGHT_BUDGET_BYTES, STATE_BUDGET_BYTES};

/// A store of `groups` groups and no bootstrap topics; the machine is group 0's.
fn empty_store(groups: u32) -> GroupMachine {
    let layout = StoreLayout {
        groups,
        topics: Vec::new(),
        message_bytes_max: 16,
    };
    GroupMachine::new(GroupId(0), Arc::new(layout))
}

fn topic(name: &str, queues: u32, consumer_groups: &[String], dedup_window: u32) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        queues,
        consumer_groups: consumer_groups.to_vec(),
        retention: NO_RETENTION,
        dedup_window,
        group_settings: Default::default(),
    }
}

fn put(config: TopicConfig, mode: PutMode) -> Command {
    Command::PutTopic { config, mode }
}

/// Consumer group names `c000..`, `count` of them.
fn consumer_groups(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("c{i:03}")).collect()
}

/// A 64-byte message id, distinct per `n` (the largest id: the count charges every id so).
fn long_id(n: u64) -> Vec<u8> {
    let mut id = format!("{n:020}").into_bytes();
    id.resize(64, b'x');
    id
}

fn enqueue_id(topic: &str, queue: u32, id: Vec<u8>) -> Command {
    Command::Enqueue {
        topic: topic.into(),
        queue,
        message_id: id,
        messages: vec![Message {
            key: Vec::new(),
            value: b"v".to_vec(),
        }],
    }
}

/// Applies one entry without the (slow, encoding) validation of every step.
fn apply_fast(machine: &mut GroupMachine, commands: Vec<Command>) -> Vec<Applied> {
    let index = machine.applied_index() + 1;
    machine.apply(index, &entry(1000, commands)).unwrap()
}

fn is_budget_refusal(applied: &Applied) -> bool {
    *applied == Applied::Rejected(ErrorCode::StateBudgetExceeded)
}

/// The snapshot at the applied index is within the count and the budget, and a replica
/// restored from it has the same count.
fn assert_within_budget(machine: &GroupMachine) {
    machine.validate();
    let snapshot = machine.snapshot(machine.applied_index());
    let usage = machine.usage();
    assert!(snapshot.len() as u64 <= usage.total_bytes(), "{usage:?}");
    assert!(usage.state_bytes <= STATE_BUDGET_BYTES, "{usage:?}");
    assert!(usage.in_flight_bytes <= IN_FLIGHT_BUDGET_BYTES, "{usage:?}");
    assert!(usage.total_bytes() <= SNAPSHOT_BUDGET_BYTES, "{usage:?}");
    let restored =
        GroupMachine::restore(machine.group(), machine.layout().clone(), &snapshot).unwrap();
    assert_eq!(restored.usage(), usage);
}

#[test]
fn dedup_windows_fill_the_budget_and_the_next_new_id_is_refused_on_every_replica() {
    let mut machine = empty_store(1);
    let windows = topic("orders", 4, &[], DEDUP_WINDOW_MAX);
    let small = topic("small", 1, &[], 10);
    let applied = apply_fast(
        &mut machine,
        vec![put(windows, PutMode::Create), put(small, PutMode::Create)],
    );
    assert_eq!(applied, vec![Applied::TopicPut { changed: true }; 2]);
    // A full small window before the budget fills: it stays full, so it costs nothing more.
    let fill_small = (0..10)
        .map(|n| enqueue_id("small", 0, long_id(n)))
        .collect();
    apply_fast(&mut machine, fill_small);
    let snapshot_before_the_budget = machine.snapshot(machine.applied_index());
    let first_filling_index = machine.applied_index() + 1;
    // Distinct ids, 1000 per entry over the four queues, until the group's state is full.
    let mut next_id = 100;
    let mut refused_at = None;
    for _ in 0..200 {
        let commands = (0..1000)
            .map(|i| enqueue_id("orders", i % 4, long_id(next_id + u64::from(i))))
            .collect();
        next_id += 1000;
        let applied = apply_fast(&mut machine, commands);
        if let Some(position) = applied.iter().position(is_budget_refusal) {
            // Once refused, every later new id of the entry is refused too: nothing freed.
            assert!(applied[position..].iter().all(is_budget_refusal));
            refused_at = Some(next_id - 1000 + position as u64);
            break;
        }
    }
    let refused_at = refused_at.expect("the dedup windows reach the budget");
    assert_within_budget(&machine);
    let held = machine.usage().state_bytes;
    assert!(held + 95 > STATE_BUDGET_BYTES, "full up to one id: {held}");

    // Admission refuses the next new id with the code; a duplicate of a remembered id, an
    // enqueue without an id and a new id into the full small window still go through.
    let refused = enqueue_id("orders", 0, long_id(refused_at));
    assert_eq!(machine.check(&refused), Err(ErrorCode::StateBudgetExceeded));
    let duplicate = enqueue_id("orders", 0, long_id(100));
    let no_id = enqueue_id("orders", 1, Vec::new());
    let into_full_window = enqueue_id("small", 0, long_id(u64::MAX));
    let before = machine.clone();
    let applied = apply_fast(
        &mut machine,
        vec![refused.clone(), duplicate, no_id, into_full_window],
    );
    assert!(is_budget_refusal(&applied[0]), "{applied:?}");
    assert!(matches!(
        applied[1],
        Applied::Enqueued {
            duplicate: true,
            ..
        }
    ));
    assert!(matches!(
        applied[2],
        Applied::Enqueued {
            duplicate: false,
            ..
        }
    ));
    assert!(matches!(
        applied[3],
        Applied::Enqueued {
            duplicate: false,
            ..
        }
    ));
    assert_eq!(machine.usage(), before.usage(), "nothing grew");
    assert_within_budget(&machine);

    // The reason an operator reads names the budget and what to lower.
    let reason = crate::machine::budget_refusal_reason(Some(&refused));
    assert!(reason.contains("SNAPSHOT_BUDGET_BYTES") && reason.contains("dedup window"));

    // A replica restored from a snapshot taken before the windows filled replays the same log
    // to the same refusals and the same state.
    let mut restored = GroupMachine::restore(
        GroupId(0),
        machine.layout().clone(),
        &snapshot_before_the_budget,
    )
    .unwrap();
    let log = replay_log(&before, first_filling_index);
    for (index, data) in log {
        restored.apply(index, &data).unwrap();
    }
    let applied_again = restored
        .apply(
            restored.applied_index() + 1,
            &entry(1000, vec![refused.clone()]),
        )
        .unwrap();
    assert!(is_budget_refusal(&applied_again[0]));
    assert_eq!(restored.usage(), machine.usage());

    // Lowering the window frees the budget at once: the refused id now goes in.
    let lowered = topic("orders", 4, &[], 1000);
    assert_eq!(
        apply_fast(&mut machine, vec![put(lowered, PutMode::Alter), refused]),
        vec![
            Applied::TopicPut { changed: true },
            Applied::Enqueued {
                first_offset: machine.end_offset("orders", 0).unwrap() - 1,
                count: 1,
                duplicate: false
            }
        ]
    );
    assert_within_budget(&machine);
}

/// The entries `from..` that `machine` applied, rebuilt: the filling loop's entries are
/// deterministic, so they are encoded again from the same ids.
fn replay_log(machine: &GroupMachine, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut next_id = 100;
    (from..=machine.applied_index())
        .map(|index| {
            let commands = (0..1000)
                .map(|i| enqueue_id("orders", i % 4, long_id(next_id + u64::from(i))))
                .collect();
            next_id += 1000;
            (index, entry(1000, commands))
        })
        .collect()
}

#[test]
fn cursors_of_256_consumer_groups_on_4096_queues_do_not_fit_one_group_and_are_refused() {
    let groups = consumer_groups(256);
    let wide = topic("wide", 4096, &groups, 0);
    // Two groups host 2,048 queues each: 524,288 cursors, about 19 MB.
    let mut machine = empty_store(2);
    let before = machine.clone();
    let create = put(wide.clone(), PutMode::Create);
    let (code, reason) = machine.check_topic_change(&create).unwrap_err();
    assert_eq!(code, ErrorCode::StateBudgetExceeded);
    for named in [
        "SNAPSHOT_BUDGET_BYTES",
        "4096 queues",
        "256 consumer groups",
        "fewer",
    ] {
        assert!(reason.contains(named), "{named} in {reason}");
    }
    assert!(is_budget_refusal(
        &apply_fast(&mut machine, vec![create])[0]
    ));
    assert_eq!(machine.topics().count(), 0);
    assert_eq!(machine.usage(), before.usage());

    // The same topic with one consumer group fits; altering it to 256 is refused, changing
    // nothing; 16 groups of 256 queues each take the 256 consumer groups.
    let narrow = topic("wide", 4096, &groups[..1], 0);
    let applied = apply_fast(&mut machine, vec![put(narrow.clone(), PutMode::Create)]);
    assert_eq!(applied, vec![Applied::TopicPut { changed: true }]);
    let altered = put(wide.clone(), PutMode::Alter);
    assert_eq!(
        machine.check_topic_change(&altered).unwrap_err().0,
        ErrorCode::StateBudgetExceeded
    );
    assert!(is_budget_refusal(
        &apply_fast(&mut machine, vec![altered])[0]
    ));
    assert_eq!(machine.topic("wide"), Some(&narrow));
    assert_within_budget(&machine);

    let mut spread = empty_store(16);
    let applied = apply_fast(&mut spread, vec![put(wide, PutMode::Create)]);
    assert_eq!(applied, vec![Applied::TopicPut { changed: true }]);
    assert_within_budget(&spread);
}

/// Enqueues `count` one-byte messages to `queue`, 1000 per command.
fn fill_queue(machine: &mut GroupMachine, queue: u32, count: u64) {
    let commands: Vec<Command> = (0..count.div_ceil(1000))
        .map(|chunk| Command::Enqueue {
            topic: "jobs".into(),
            queue,
            message_id: Vec::new(),
            messages: (0..1000.min(count - chunk * 1000))
                .map(|_| Message {
                    key: Vec::new(),
                    value: b"j".to_vec(),
                })
                .collect(),
        })
        .collect();
    apply_fast(machine, commands);
}

fn deliver(queue: u32, offsets: std::ops::Range<u64>) -> Command {
    Command::Deliver {
        consumer_group: "workers".into(),
        topic: "jobs".into(),
        queue,
        offsets: offsets.collect(),
        ack_timeout_ms: 60_000,
    }
}

#[test]
fn in_flight_deliveries_fill_their_share_and_a_fresh_delivery_is_refused_until_acks_free_it() {
    let mut machine = empty_store(1);
    let mut jobs = topic("jobs", 2, &["workers".to_string()], 0);
    let settings = crate::ConsumerGroupSettings {
        max_in_flight: Some(IN_FLIGHT_TRACKED_MAX),
        ..Default::default()
    };
    jobs.group_settings = [("workers".to_string(), settings)].into();
    apply_fast(&mut machine, vec![put(jobs, PutMode::Create)]);
    for queue in 0..2 {
        fill_queue(&mut machine, queue, u64::from(IN_FLIGHT_TRACKED_MAX));
    }
    // Deliver 1000 at a time, queue 0 then queue 1, until refused.
    let mut delivered = 0u64;
    let mut refusal = None;
    'fill: for queue in 0..2 {
        for first in (1..=u64::from(IN_FLIGHT_TRACKED_MAX)).step_by(1000) {
            let command = deliver(queue, first..first + 1000);
            if let Err(refused) = machine.check_delivery(&command) {
                refusal = Some((queue, first, command, refused));
                break 'fill;
            }
            let applied = apply_fast(&mut machine, vec![command]);
            assert!(
                matches!(&applied[0], Applied::Delivered { deliveries } if deliveries.len() == 1000)
            );
            delivered += 1000;
        }
    }
    let (queue, first, command, (code, reason)) = refusal.expect("deliveries reach the budget");
    assert_eq!(code, ErrorCode::StateBudgetExceeded);
    assert!(reason.contains("SNAPSHOT_BUDGET_BYTES") && reason.contains("max_in_flight"));
    // The share holds about 167,000 offsets: more than one queue's limit, fewer than two.
    assert!((150_000..170_000).contains(&delivered), "{delivered}");
    assert_within_budget(&machine);

    // Applied anyway (admitted before the others filled it): refused alike, nothing changed.
    let before = machine.clone();
    assert!(is_budget_refusal(
        &apply_fast(&mut machine, vec![command.clone()])[0]
    ));
    assert_eq!(
        machine.in_flight("workers", "jobs", queue),
        before.in_flight("workers", "jobs", queue)
    );
    // A redelivery of due offsets adds nothing, so it is not refused: at a time past their
    // deadlines the first 1000 of queue 0 come again.
    let index = machine.applied_index() + 1;
    let applied = machine
        .apply(index, &entry(70_000, vec![deliver(0, 1..1001)]))
        .unwrap();
    assert!(matches!(&applied[0], Applied::Delivered { deliveries } if deliveries.len() == 1000));
    // Acks free the share: the refused delivery now goes through.
    let ack = Command::Ack {
        consumer_group: "workers".into(),
        topic: "jobs".into(),
        queue: 0,
        offsets: (1..1001).collect(),
    };
    assert_eq!(
        apply_fast(&mut machine, vec![ack])[0],
        Applied::Acked { cursor: 1001 }
    );
    let applied = apply_fast(&mut machine, vec![deliver(queue, first..first + 1000)]);
    assert!(matches!(&applied[0], Applied::Delivered { deliveries } if deliveries.len() == 1000));
    assert_within_budget(&machine);
}

/// One step of the under-count property.
#[derive(Clone, Debug)]
enum Step {
    /// An enqueue to queue 0 or 2 of "t" (group 0's) with an id of this length and seed (0: no id).
    Enqueue { queue: u32, id_len: usize, seed: u8 },
    /// Alter "t": its dedup window and how many of three consumer groups read it.
    Alter { window: u32, groups: usize },
    /// To queue 0 or 2: deliver up to three offsets above the group's last delivered, or ack the cursor's.
    Deliver { queue: u32, ack: bool },
    /// Compact at the applied index minus `behind` (not below the last topic change).
    Compact { behind: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..2u32, 0..=64usize, any::<u8>())
            .prop_map(|(half, id_len, seed)| Step::Enqueue { queue: 2 * half, id_len, seed }),
        1 => (0..6u32, 0..=3usize).prop_map(|(window, groups)| Step::Alter { window, groups }),
        3 => (0..2u32, any::<bool>()).prop_map(|(half, ack)| Step::Deliver { queue: 2 * half, ack }),
        1 => (0..6u64).prop_map(|behind| Step::Compact { behind }),
    ]
}

/// The shape of "t" in a run: narrow (4 queues, short consumer group names: dedup ids and
/// deliveries weigh most) or wide (64 queues, 100-byte names: cursors weigh most), so that
/// leaving any one structure out of the count shows against the slack of the others.
#[derive(Clone, Copy, Debug)]
struct Shape {
    queues: u32,
    name_bytes: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape {
            queues: 4,
            name_bytes: 1
        }),
        Just(Shape {
            queues: 64,
            name_bytes: 100
        }),
    ]
}

fn three_groups(shape: Shape, count: usize) -> Vec<String> {
    ["a", "b", "c"][..count]
        .iter()
        .map(|g| g.repeat(shape.name_bytes))
        .collect()
}

/// The command a step applies, if any, at the machine's state.
fn command_of(machine: &GroupMachine, shape: Shape, step: &Step) -> Option<Command> {
    Some(match *step {
        Step::Enqueue {
            queue,
            id_len,
            seed,
        } => {
            // Mostly the longest ids, whose bytes dominate a narrow snapshot.
            let id_len = if seed % 4 == 0 { id_len } else { 64 };
            let id = (0..id_len).map(|i| seed.wrapping_add(i as u8)).collect();
            enqueue_id("t", queue, id)
        }
        Step::Alter { window, groups } => {
            let groups = three_groups(shape, groups);
            put(topic("t", shape.queues, &groups, window), PutMode::Alter)
        }
        Step::Deliver { queue, ack } => {
            let group = machine.topic("t")?.consumer_groups.first()?.clone();
            let in_flight = machine.in_flight(&group, "t", queue)?;
            let offsets: Vec<u64> = match (ack, in_flight.first()) {
                (true, Some(&(offset, _))) => vec![offset],
                (true, None) => return None,
                (false, _) => {
                    let from = in_flight.last().map_or(1, |&(o, _)| o + 1);
                    (from..from + 3).collect()
                }
            };
            match ack {
                true => Command::Ack {
                    consumer_group: group,
                    topic: "t".into(),
                    queue,
                    offsets,
                },
                false => Command::Deliver {
                    consumer_group: group,
                    topic: "t".into(),
                    queue,
                    offsets,
                    ack_timeout_ms: 1000,
                },
            }
        }
        Step::Compact { .. } => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every snapshot the node may take (at any index from the last compaction and topic
    /// change up to the applied one) is within the count, which validation also checks
    /// against a from-scratch count; a replica restored from it and replaying the tail ends
    /// with the same count.
    #[test]
    fn the_count_never_under_counts_a_real_snapshot(
        shape in shape(),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let mut machine = empty_store(2);
        let create = put(topic("t", shape.queues, &three_groups(shape, 3), 5), PutMode::Create);
        apply_fast(&mut machine, vec![create.clone()]);
        let mut log = vec![entry(1000, vec![create])];
        let mut compacted = 0;
        let mut topic_changed = 1;
        for step in &steps {
            if let Step::Compact { behind } = *step {
                let at = machine.applied_index().saturating_sub(behind).max(compacted).max(topic_changed);
                machine.forget_through(at);
                compacted = at;
                continue;
            }
            let Some(command) = command_of(&machine, shape, step) else { continue };
            let data = entry(1000 + log.len() as u64, vec![command]);
            let index = machine.applied_index() + 1;
            let applied = machine.apply(index, &data).unwrap();
            if matches!(applied[0], Applied::TopicPut { changed: true }) {
                topic_changed = index;
            }
            log.push(data);
            machine.validate();
            for at in compacted.max(topic_changed)..=machine.applied_index() {
                let snapshot = machine.snapshot(at);
                prop_assert!(snapshot.len() as u64 <= machine.usage().total_bytes(),
                    "snapshot at {} of {} bytes over {:?}", at, snapshot.len(), machine.usage());
            }
        }
        let at = compacted.max(topic_changed);
        let snapshot = machine.snapshot(at);
        let mut restored = GroupMachine::restore(GroupId(0), machine.layout().clone(), &snapshot).unwrap();
        for index in at + 1..=machine.applied_index() {
            restored.apply(index, &log[index as usize - 1]).unwrap();
        }
        restored.validate();
        prop_assert_eq!(restored.usage(), machine.usage());
    }
}

#[test]
fn bootstrap_topics_whose_cursors_do_not_fit_a_group_are_refused_when_the_layout_is_checked() {
    let layout = |groups| StoreLayout {
        groups,
        topics: vec![topic("wide", 4096, &consumer_groups(256), 0)],
        message_bytes_max: 16,
    };
    let error = layout(2).validate().unwrap_err().to_string();
    assert!(
        error.contains("SNAPSHOT_BUDGET_BYTES") && error.contains("group 0"),
        "{error}"
    );
    assert_eq!(layout(16).validate(), Ok(()));
}
