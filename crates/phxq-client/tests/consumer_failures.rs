//! The consumer when handling fails, and moving cursors, against a real 3-node store (every
//! node a full server in this test process on 127.0.0.1, on ports picked by the kernel).
//!
//! Handlers that hang past the ack timeout, panic or nack; retry tiers and the dead-letter
//! topic; per-key order while a message is retried; the library's seek; producer message ids
//! of the caller's. Tests run one at a time, each on a store of its own; every wait is
//! bounded. Handlers record each delivery (offset, delivery count, time) in a [`Deliveries`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phxq_client::{
    Consumer, ConsumerConfig, ConsumerError, Delivery, ErrorCode, Outcome, Producer,
    ProducerConfig, RetryTier, SeekError, SeekMove, SeekTo, queue_of_key, seek,
};
use phxq_proto::api;
use tokio::sync::oneshot;

mod common;

use common::{
    CONSUMER_GROUPS, DEAD_LETTER_QUEUES, DEAD_LETTER_TOPIC, POLL, QUEUES, Running, Store, TOPIC,
    lock, run,
};

/// The group the consumers of these tests read [`TOPIC`] with.
const GROUP: &str = CONSUMER_GROUPS[1];
/// How long a test waits for what it expects (the store is up already).
const WAIT: Duration = Duration::from_secs(20);

/// One delivery as a handler saw it.
#[derive(Clone, Debug)]
struct Seen {
    value: String,
    offset: u64,
    attempt: u32,
    at: Instant,
    /// When the handler answered (`None`: it never did).
    done: Option<Instant>,
}

/// Every delivery of a test, in the order handlers started.
type Deliveries = Arc<Mutex<Vec<Seen>>>;

/// A handler that records each delivery in `log`, then acts as `act` says for it.
fn handler<F>(
    log: &Deliveries,
    act: F,
) -> impl Fn(&Delivery) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static
where
    F: Fn(&str, u32) -> Act + Send + Sync + 'static,
{
    let log = log.clone();
    let act = Arc::new(act);
    move |msg: &Delivery| {
        let value = String::from_utf8(msg.value.clone()).expect("utf-8");
        let index = {
            let mut log = lock(&log);
            log.push(Seen {
                value: value.clone(),
                offset: msg.offset,
                attempt: msg.attempt,
                at: Instant::now(),
                done: None,
            });
            log.len() - 1
        };
        let (log, act, attempt) = (log.clone(), act.clone(), msg.attempt);
        Box::pin(async move {
            let outcome = match act(&value, attempt) {
                Act::Answer(outcome, after) => {
                    tokio::time::sleep(after).await;
                    outcome
                }
                Act::Hang(dropped) => {
                    let _guard = DropFlag(dropped);
                    std::future::pending::<()>().await;
                    unreachable!("pending forever")
                }
                Act::Panic => panic!("planted handler panic on {value}"),
            };
            lock(&log)[index].done = Some(Instant::now());
            outcome
        })
    }
}

/// What a test handler does with one delivery.
enum Act {
    /// Answer this after sleeping that long.
    Answer(Outcome, Duration),
    /// Never answer; set the flag when the future is dropped.
    Hang(Arc<AtomicBool>),
    Panic,
}

fn handled() -> Act {
    Act::Answer(Outcome::Handled, Duration::ZERO)
}

/// Sets its flag when dropped: shows a handler's future was cancelled.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A consumer of [`TOPIC`] for [`GROUP`] through node 1 only, changed by `change`.
fn consumer(store: &Store, change: impl FnOnce(&mut ConsumerConfig)) -> Consumer {
    let mut config = ConsumerConfig::new([store.client_addrs[0].clone()], TOPIC, GROUP);
    config.long_poll = Duration::from_millis(300);
    config.commit_interval = Duration::from_millis(50);
    change(&mut config);
    Consumer::new(config).expect("valid consumer config")
}

fn producer(store: &Store) -> Producer {
    let mut config = ProducerConfig::new(store.client_addrs.clone());
    config.deadline = Duration::from_secs(30);
    Producer::new(config).expect("producer")
}

/// Sends `(key, value)` pairs one by one (in order); returns their offsets.
async fn send(producer: &Producer, messages: &[(&str, &str)]) -> Vec<u64> {
    let mut offsets = Vec::new();
    for (key, value) in messages {
        let receipt = producer
            .send(TOPIC, key.as_bytes(), *value)
            .await
            .expect("stored");
        offsets.push(receipt.offset);
    }
    offsets
}

/// Waits until `done` holds of the deliveries (bounded by [`WAIT`]).
async fn wait_for(log: &Deliveries, what: &str, done: impl Fn(&[Seen]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(&lock(log)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            lock(log)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The deliveries of `value`, in order.
fn of(log: &Deliveries, value: &str) -> Vec<Seen> {
    lock(log)
        .iter()
        .filter(|seen| seen.value == value)
        .cloned()
        .collect()
}

/// `group`'s committed cursor on every queue of `topic`, read at the queues' masters.
async fn cursors(store: &Store, topic: &str, queues: u32, group: &str) -> BTreeMap<u32, u64> {
    let mut cursors = BTreeMap::new();
    for queue in 0..queues {
        let response = store
            .consume_at_master(read(topic, queue, group, None))
            .await;
        let cursor = response
            .messages
            .first()
            .map_or(response.next_offset, |m| m.offset);
        cursors.insert(queue, cursor);
    }
    cursors
}

/// Every message of `topic` (all `queues` queues) as `(queue, key, value)`, read from offset 1.
async fn everything(store: &Store, topic: &str, queues: u32) -> Vec<(u32, String, String)> {
    let mut all = Vec::new();
    for queue in 0..queues {
        let response = store
            .consume_at_master(read(topic, queue, CONSUMER_GROUPS[0], Some(1)))
            .await;
        for message in response.messages {
            let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
            all.push((queue, text(message.key), text(message.value)));
        }
    }
    all
}

fn read(topic: &str, queue: u32, group: &str, from: Option<u64>) -> api::ConsumeRequest {
    api::ConsumeRequest {
        topic: topic.to_string(),
        queue,
        consumer_group: group.to_string(),
        from_offset: from,
        max_messages: 1000,
        max_bytes: 1 << 20,
        wait_ms: 0,
        store_id: 0,
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn a_handler_hung_past_the_ack_timeout_is_cancelled_and_the_message_redelivered_counted() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        let offsets = send(&producer, &[("k", "hangs-once")]).await;
        let dropped = Arc::new(AtomicBool::new(false));
        let log = Deliveries::default();
        let hang = dropped.clone();
        let act = move |_: &str, attempt: u32| match attempt {
            1 => Act::Hang(hang.clone()),
            _ => handled(),
        };
        let running = Running::spawn(
            consumer(&store, |config| {
                config.ack_timeout = ms(400);
                config.retry_tiers = vec![RetryTier {
                    attempts: 5,
                    delay: ms(100),
                }];
            }),
            handler(&log, act),
        );
        wait_for(&log, "a second delivery handled", |log| {
            log.iter()
                .any(|seen| seen.attempt == 2 && seen.done.is_some())
        })
        .await;
        let report = running.drain_within(WAIT).await;
        let seen = of(&log, "hangs-once");
        assert_eq!(
            seen.iter()
                .map(|s| (s.offset, s.attempt))
                .collect::<Vec<_>>(),
            [(offsets[0], 1), (offsets[0], 2)],
            "delivered again with the count incremented"
        );
        assert!(seen[0].done.is_none(), "the first delivery never answered");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the hung future was dropped"
        );
        let gap = seen[1].at - seen[0].at;
        assert!(
            gap >= ms(500),
            "ack timeout (400 ms) + tier delay (100 ms): {gap:?}"
        );
        assert_eq!(
            (
                report.timeouts,
                report.retries,
                report.handled,
                report.panics
            ),
            (1, 1, 1, 0),
            "{report:?}"
        );
        let queue = queue_of_key(b"k", QUEUES);
        assert_eq!(
            cursors(&store, TOPIC, QUEUES, GROUP).await[&queue],
            offsets[0] + 1,
            "the cursor passed it once handled"
        );
        store.stop().await;
    });
}

#[test]
fn a_panicking_handler_is_redelivered_and_the_consumer_keeps_running() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        send(&producer, &[("a", "panics-once"), ("b", "fine")]).await;
        let log = Deliveries::default();
        let act = |value: &str, attempt: u32| match (value, attempt) {
            ("panics-once", 1) => Act::Panic,
            _ => handled(),
        };
        let running = Running::spawn(
            consumer(&store, |config| {
                config.retry_tiers = vec![RetryTier {
                    attempts: 3,
                    delay: ms(50),
                }];
            }),
            handler(&log, act),
        );
        wait_for(&log, "the panicked message handled", |log| {
            log.iter()
                .any(|s| s.value == "panics-once" && s.attempt == 2 && s.done.is_some())
        })
        .await;
        // Still consuming after the panic.
        send(&producer, &[("a", "after")]).await;
        wait_for(&log, "a message sent after the panic", |log| {
            log.iter().any(|s| s.value == "after" && s.done.is_some())
        })
        .await;
        assert!(!running.task.is_finished(), "the consumer kept running");
        let report = running.drain_within(WAIT).await;
        let attempts: Vec<u32> = of(&log, "panics-once").iter().map(|s| s.attempt).collect();
        assert_eq!(attempts, [1, 2]);
        assert_eq!(of(&log, "fine").len(), 1);
        assert_eq!(
            (report.panics, report.retries, report.handled),
            (1, 1, 3),
            "a panic is a failed delivery, not a handled one: {report:?}"
        );
        let cursors = cursors(&store, TOPIC, QUEUES, GROUP).await;
        assert_eq!(
            cursors.values().map(|c| c - 1).sum::<u64>(),
            3,
            "{cursors:?}"
        );
        store.stop().await;
    });
}

#[test]
fn retry_tiers_then_the_dead_letter_topic_receives_the_message_exactly_once() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        send(
            &producer,
            &[("p", "poison"), ("p", "after-poison"), ("q", "fine")],
        )
        .await;
        let tiers = vec![
            RetryTier {
                attempts: 2,
                delay: ms(150),
            },
            RetryTier {
                attempts: 1,
                delay: ms(400),
            },
        ];
        let nack_poison = |value: &str, _: u32| match value {
            "poison" => Act::Answer(Outcome::Nack, Duration::ZERO),
            _ => handled(),
        };
        let with_tiers = |config: &mut ConsumerConfig| {
            config.retry_tiers = tiers.clone();
            config.dead_letter_topic = Some(DEAD_LETTER_TOPIC.to_string());
        };
        let log = Deliveries::default();
        let running = Running::spawn(consumer(&store, with_tiers), handler(&log, nack_poison));
        wait_for(&log, "the message after the poison", |log| {
            log.iter()
                .any(|s| s.value == "after-poison" && s.done.is_some())
        })
        .await;
        let report = running.drain_within(WAIT).await;
        // Delivered 1 + 3 times, 150, 150 and 400 ms apart at least, then dead-lettered.
        let poison = of(&log, "poison");
        let attempts: Vec<u32> = poison.iter().map(|s| s.attempt).collect();
        assert_eq!(attempts, [1, 2, 3, 4]);
        for (i, least) in [150, 150, 400].into_iter().enumerate() {
            let gap = poison[i + 1].at - poison[i].at;
            assert!(gap >= ms(least), "failure {}: {gap:?} < {least} ms", i + 1);
        }
        // Its key's next message waited for it.
        let after = &of(&log, "after-poison")[0];
        assert!(after.at >= poison[3].done.expect("answered"));
        assert_eq!(
            (
                report.nacks,
                report.retries,
                report.dead_lettered,
                report.handled
            ),
            (4, 3, 1, 2),
            "{report:?}"
        );
        let dead = everything(&store, DEAD_LETTER_TOPIC, DEAD_LETTER_QUEUES).await;
        let queue = queue_of_key(b"p", DEAD_LETTER_QUEUES);
        assert_eq!(dead, [(queue, "p".to_string(), "poison".to_string())]);
        // The cursor passed every message, the dead-lettered one included.
        let cursors = cursors(&store, TOPIC, QUEUES, GROUP).await;
        assert_eq!(
            cursors.values().map(|c| c - 1).sum::<u64>(),
            3,
            "{cursors:?}"
        );

        // Replayed (as after a crash before the commit): dead-lettered again with the same
        // message id, so the store keeps one copy.
        let moves = consumer(&store, with_tiers)
            .seek(None, SeekTo::Earliest)
            .await
            .expect("seek");
        assert_eq!(moves.iter().map(|m| m.to).sum::<u64>(), u64::from(QUEUES));
        let again = Deliveries::default();
        let running = Running::spawn(consumer(&store, with_tiers), handler(&again, nack_poison));
        wait_for(&again, "the replay", |log| {
            log.iter()
                .any(|s| s.value == "after-poison" && s.done.is_some())
        })
        .await;
        let report = running.drain_within(WAIT).await;
        assert_eq!(report.dead_lettered, 1, "{report:?}");
        assert_eq!(
            everything(&store, DEAD_LETTER_TOPIC, DEAD_LETTER_QUEUES).await,
            dead,
            "the repeated dead-letter produce was deduplicated"
        );
        store.stop().await;
    });
}

/// Two keys of one queue of [`TOPIC`].
fn two_keys_of_one_queue() -> (String, String) {
    let first = "key-0".to_string();
    let queue = queue_of_key(first.as_bytes(), QUEUES);
    let second = (1..)
        .map(|i| format!("key-{i}"))
        .find(|key| queue_of_key(key.as_bytes(), QUEUES) == queue)
        .expect("some key shares the queue");
    (first, second)
}

#[test]
fn a_key_waits_while_one_of_its_messages_is_retried_and_other_keys_go_on() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        let (a, b) = two_keys_of_one_queue();
        let messages = [
            (a.as_str(), "a0"),
            (b.as_str(), "b0"),
            (a.as_str(), "a1"),
            (b.as_str(), "b1"),
            (a.as_str(), "a2"),
            (b.as_str(), "b2"),
        ];
        send(&producer, &messages).await;
        let log = Deliveries::default();
        // a0 fails twice with an explicit delay; b's messages are slowish.
        let act = |value: &str, attempt: u32| match (value, attempt) {
            ("a0", 1 | 2) => Act::Answer(Outcome::Retry(ms(300)), Duration::ZERO),
            ("b0" | "b1" | "b2", _) => Act::Answer(Outcome::Handled, ms(20)),
            _ => handled(),
        };
        let running = Running::spawn(
            consumer(&store, |config| config.pull_messages_max = 100),
            handler(&log, act),
        );
        wait_for(&log, "every message handled", |log| {
            ["a0", "a1", "a2", "b0", "b1", "b2"]
                .iter()
                .all(|v| log.iter().any(|s| s.value == *v && s.done.is_some()))
        })
        .await;
        let report = running.drain_within(WAIT).await;
        let a0 = of(&log, "a0");
        assert_eq!(a0.iter().map(|s| s.attempt).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(a0[2].at - a0[0].at >= ms(600), "two explicit 300 ms delays");
        let a0_done = a0[2].done.expect("handled");
        // Later messages of the key waited, in order.
        let a1 = &of(&log, "a1")[0];
        let a2 = &of(&log, "a2")[0];
        assert!(a1.at >= a0_done && a2.at >= a1.done.expect("handled"));
        // The other key did not wait for the retries.
        let b2 = &of(&log, "b2")[0];
        assert!(
            b2.done.expect("handled") < a0[1].at,
            "b finished before a0's second delivery: {:?}",
            lock(&log)
        );
        assert_eq!(
            (report.nacks, report.retries, report.handled),
            (2, 2, 6),
            "{report:?}"
        );
        store.stop().await;
    });
}

/// Wall-clock ms since the Unix epoch (the nodes stamp messages with the same clock).
fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

#[test]
fn seek_by_offset_and_by_time_through_the_library_and_bad_seeks_move_nothing() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        let queue = queue_of_key(b"s", QUEUES);
        // Key "e" fills queue 0, ahead of the empty queues in a seek's order.
        let (first, first_end) = (queue_of_key(b"e", QUEUES), 3);
        assert!(
            first == 0 && queue > 1,
            "the keys' queues: {first}, {queue}"
        );
        send(
            &producer,
            &[
                ("s", "early-1"),
                ("s", "early-2"),
                ("s", "early-3"),
                ("e", "early-e1"),
                ("e", "early-e2"),
            ],
        )
        .await;
        tokio::time::sleep(ms(100)).await;
        let between = now_ms();
        tokio::time::sleep(ms(100)).await;
        send(&producer, &[("s", "late-1"), ("s", "late-2")]).await;
        let connection = ProducerConfig::new([store.client_addrs[1].clone()]);
        let before = cursors(&store, TOPIC, QUEUES, GROUP).await;
        assert!(before.values().all(|&c| c == 1), "{before:?}");

        // By offset, one queue.
        let moved = seek(&connection, TOPIC, GROUP, Some(queue), SeekTo::Offset(3))
            .await
            .expect("seek to offset 3");
        assert_eq!(
            moved,
            [SeekMove {
                queue,
                from: 1,
                to: 3
            }]
        );
        let mut expected = before.clone();
        expected.insert(queue, 3);
        assert_eq!(cursors(&store, TOPIC, QUEUES, GROUP).await, expected);

        // By time, every queue: the first late message; the other queues' ends.
        let moved = seek(&connection, TOPIC, GROUP, None, SeekTo::Time(between))
            .await
            .expect("seek by time");
        assert_eq!(moved.len(), QUEUES as usize);
        expected.insert(queue, 4);
        expected.insert(first, first_end);
        let targets: BTreeMap<u32, u64> = moved.iter().map(|m| (m.queue, m.to)).collect();
        assert_eq!(targets, expected);
        assert_eq!(cursors(&store, TOPIC, QUEUES, GROUP).await, expected);

        // Refused, and nothing moves: past the end; past the end of the empty queue 1 although
        // within queue 0, before it; unknown queue, topic and group; offset 0.
        let refusals: [(Option<u32>, SeekTo, &str, &str, ErrorCode); 6] = [
            (
                Some(queue),
                SeekTo::Offset(7),
                TOPIC,
                GROUP,
                ErrorCode::InvalidArgument,
            ),
            (
                None,
                SeekTo::Offset(2),
                TOPIC,
                GROUP,
                ErrorCode::InvalidArgument,
            ),
            (
                Some(QUEUES),
                SeekTo::Latest,
                TOPIC,
                GROUP,
                ErrorCode::UnknownQueue,
            ),
            (
                None,
                SeekTo::Latest,
                "nowhere",
                GROUP,
                ErrorCode::UnknownTopic,
            ),
            (
                None,
                SeekTo::Earliest,
                TOPIC,
                "nobody",
                ErrorCode::UnknownConsumerGroup,
            ),
            (
                Some(queue),
                SeekTo::Offset(0),
                TOPIC,
                GROUP,
                ErrorCode::InvalidArgument,
            ),
        ];
        for (on, to, topic, group, code) in refusals {
            let refused: SeekError = seek(&connection, topic, group, on, to)
                .await
                .expect_err("refused");
            assert_eq!(refused.code(), Some(code), "{on:?} {to:?}: {refused}");
            assert_eq!(
                cursors(&store, TOPIC, QUEUES, GROUP).await,
                expected,
                "{on:?} {to:?} moved a cursor"
            );
        }

        // Earliest and latest.
        seek(&connection, TOPIC, GROUP, None, SeekTo::Latest)
            .await
            .expect("latest");
        expected.insert(queue, 6);
        assert_eq!(cursors(&store, TOPIC, QUEUES, GROUP).await, expected);
        seek(&connection, TOPIC, GROUP, Some(queue), SeekTo::Earliest)
            .await
            .expect("earliest");
        expected.insert(queue, 1);
        assert_eq!(cursors(&store, TOPIC, QUEUES, GROUP).await, expected);
        store.stop().await;
    });
}

#[test]
fn a_message_id_of_the_callers_stores_a_message_once() {
    run(async {
        let store = Store::start(3, false).await;
        let producer = producer(&store);
        let first = producer
            .send_with_id(TOPIC, b"k", "once", "order-17")
            .await
            .expect("stored");
        let again = producer
            .send_with_id(TOPIC, b"k", "once", "order-17")
            .await
            .expect("answered");
        assert_eq!(
            again, first,
            "the duplicate is answered with the first offset"
        );
        assert_eq!(producer.stats().duplicates, 1);
        let stored = everything(&store, TOPIC, QUEUES).await;
        assert_eq!(stored, [(first.queue, "k".to_string(), "once".to_string())]);
        for bad in [Vec::new(), vec![b'x'; 65]] {
            let refused = producer
                .send_with_id(TOPIC, b"k", "bad", bad)
                .await
                .expect_err("refused");
            assert_eq!(refused.code(), Some(ErrorCode::InvalidArgument));
        }
        store.stop().await;
    });
}

#[test]
fn a_dead_letter_topic_the_store_lacks_is_refused_at_the_start() {
    run(async {
        let store = Store::start(3, false).await;
        let log = Deliveries::default();
        let consumer = consumer(&store, |config| {
            config.dead_letter_topic = Some("no-such-topic".to_string());
        });
        let (_stop, stopped) = oneshot::channel::<()>();
        let ran = tokio::time::timeout(
            WAIT,
            consumer.run(handler(&log, |_: &str, _: u32| handled()), async move {
                let _ = stopped.await;
            }),
        )
        .await
        .expect("returns at once");
        match ran {
            Err(ConsumerError::Store { queue: None, error }) => {
                assert_eq!(error.code(), Some(ErrorCode::UnknownTopic), "{error}");
            }
            other => panic!("{other:?}"),
        }
        store.stop().await;
    });
}
