//! The consumer against real stores: every node a full server (event loop, write-ahead log,
//! peer TCP, gRPC) in this test process on 127.0.0.1, on ports picked by the kernel.
//!
//! Tests run one at a time, each on a store of its own. Every wait is bounded. Handlers
//! record what they saw in a [`Log`]; the assertions are on that log and on the cursors the
//! store holds afterwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    Consumer, ConsumerConfig, Delivery, Outcome, Producer, ProducerConfig, assigned_queues,
};
use phxq_proto::api;
use phxq_types::Rng;

mod common;

use common::{
    CONSUMER_GROUPS, POLL, QUEUES, Running, SETTLE_TIMEOUT, Store, TOPIC, consume, lock, run,
};

/// What the consumer tests ask of a store.
trait ConsumerStore {
    /// Sends `count` messages `key:seq` over `keys` keys (each key's `seq` from 0 up, in
    /// order), in batches; returns every `(key, seq)` sent.
    async fn produce(&self, keys: usize, count: usize, from: usize) -> Vec<(String, usize)>;
    /// A consumer config for `group` through node 1 only (the others are reached by
    /// `NOT_MASTER`), changed by `change`.
    fn consumer(&self, group: &str, change: impl FnOnce(&mut ConsumerConfig)) -> Consumer;
    /// The committed cursor of `group` on every queue, read at the queues' masters.
    async fn cursors(&self, group: &str) -> BTreeMap<u32, u64>;
}

impl ConsumerStore for Store {
    async fn produce(&self, keys: usize, count: usize, from: usize) -> Vec<(String, usize)> {
        let mut config = ProducerConfig::new(self.client_addrs.clone());
        config.deadline = Duration::from_secs(30);
        let producer = Producer::new(config).expect("producer");
        let sent: Vec<(String, usize)> = (from..from + count)
            .map(|i| (format!("key-{}", i % keys), i / keys))
            .collect();
        for chunk in sent.chunks(200) {
            let batch = chunk
                .iter()
                .map(|(key, seq)| (key.clone(), format!("{key}:{seq}:{}", "x".repeat(100))));
            for outcome in producer.send_batch(TOPIC, batch).await {
                outcome.expect("stored");
            }
        }
        sent
    }

    fn consumer(&self, group: &str, change: impl FnOnce(&mut ConsumerConfig)) -> Consumer {
        let mut config = ConsumerConfig::new([self.client_addrs[0].clone()], TOPIC, group);
        config.long_poll = Duration::from_millis(500);
        config.commit_interval = Duration::from_millis(50);
        change(&mut config);
        Consumer::new(config).expect("valid consumer config")
    }

    async fn cursors(&self, group: &str) -> BTreeMap<u32, u64> {
        let mut cursors = BTreeMap::new();
        for queue in 0..QUEUES {
            let request = api::ConsumeRequest {
                topic: TOPIC.to_string(),
                queue,
                consumer_group: group.to_string(),
                from_offset: None,
                max_messages: 1,
                max_bytes: 1 << 20,
                wait_ms: 0,
                store_id: 0,
            };
            let response = self.consume_at_master(request).await;
            let cursor = response
                .messages
                .first()
                .map_or(response.next_offset, |m| m.offset);
            cursors.insert(queue, cursor);
        }
        cursors
    }
}

/// What handlers saw, shared by every handler of a test.
#[derive(Default)]
struct Log {
    /// `(key, seq)` in the order handlers started them, per key.
    per_key: HashMap<String, Vec<usize>>,
    /// `(queue, offset)` of every message handled to the end.
    handled: BTreeSet<(u32, u64)>,
    /// Keys being handled right now.
    in_flight_keys: BTreeSet<String>,
    in_flight: usize,
    in_flight_max: usize,
    /// Two messages of one key handled at once (should never happen).
    overlaps: Vec<String>,
    /// When each message was handled, and its bytes (key and value).
    times: Vec<(Instant, usize)>,
}

/// A handler that records into `log` and sleeps `0..=sleep_ms_max` ms (seeded by `seed`).
fn recording_handler(
    log: Arc<Mutex<Log>>,
    sleep_ms_max: u64,
    seed: u64,
) -> impl Fn(&Delivery) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static
{
    let rng = Arc::new(Mutex::new(Rng::new(seed)));
    move |msg: &Delivery| {
        let log = log.clone();
        let value = String::from_utf8(msg.value.clone()).expect("utf-8");
        let (queue, offset) = (msg.queue, msg.offset);
        let bytes = msg.key.len() + msg.value.len();
        let sleep = Duration::from_millis(lock(&rng).below(sleep_ms_max + 1));
        Box::pin(async move {
            let mut parts = value.split(':');
            let key = parts.next().expect("key").to_string();
            let seq: usize = parts.next().expect("seq").parse().expect("seq");
            {
                let mut log = lock(&log);
                if !log.in_flight_keys.insert(key.clone()) {
                    log.overlaps.push(format!("{key}:{seq}"));
                }
                log.per_key.entry(key.clone()).or_default().push(seq);
                log.in_flight += 1;
                log.in_flight_max = log.in_flight_max.max(log.in_flight);
            }
            tokio::time::sleep(sleep).await;
            let mut log = lock(&log);
            log.in_flight_keys.remove(&key);
            log.in_flight -= 1;
            log.handled.insert((queue, offset));
            log.times.push((Instant::now(), bytes));
            Outcome::Handled
        })
    }
}

/// Runs `consumer` with a handler recording into `log`.
fn spawn(consumer: Consumer, log: &Arc<Mutex<Log>>, sleep_ms_max: u64, seed: u64) -> Running {
    Running::spawn(consumer, recording_handler(log.clone(), sleep_ms_max, seed))
}

/// Waits until `done` holds of the log (bounded).
async fn wait_for(log: &Arc<Mutex<Log>>, what: &str, done: impl Fn(&Log) -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !done(&lock(log)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Asserts each key's messages were started in `seq` order, each once, all of them.
fn assert_key_order(log: &Log, sent: &[(String, usize)]) {
    let mut expected: HashMap<&str, Vec<usize>> = HashMap::new();
    for (key, seq) in sent {
        expected.entry(key).or_default().push(*seq);
    }
    for (key, seqs) in &expected {
        assert_eq!(log.per_key.get(*key), Some(seqs), "key {key}");
    }
    assert!(
        log.overlaps.is_empty(),
        "one key twice at once: {:?}",
        log.overlaps
    );
}

#[test]
fn two_members_handle_every_message_once_in_key_order_with_parallel_handlers() {
    run(async {
        // Three nodes: the consumers know node 1 only and follow NOT_MASTER to the others.
        let store = Store::start(3, false).await;
        let members = vec!["a".to_string(), "b".to_string()];
        let mut sent = store.produce(24, 300, 0).await;
        let log = Arc::new(Mutex::new(Log::default()));
        let consumers: Vec<Running> = members
            .iter()
            .enumerate()
            .map(|(i, member)| {
                let consumer = store.consumer("audit", |config| {
                    config.members.clone_from(&members);
                    config.member.clone_from(member);
                    config.max_in_flight = 8;
                    config.pull_messages_max = 64;
                });
                spawn(consumer, &log, 4, i as u64)
            })
            .collect();
        // More while they run: long polls must wake up.
        sent.extend(store.produce(24, 300, 300).await);
        wait_for(&log, "every message", |log| log.handled.len() == sent.len()).await;
        let mut reports = Vec::new();
        for consumer in consumers {
            reports.push(consumer.drain().await);
        }
        let log = std::mem::take(&mut *lock(&log)); // every handler is done
        assert_key_order(&log, &sent);
        assert!(
            (2..=16).contains(&log.in_flight_max),
            "parallel, within max_in_flight: {}",
            log.in_flight_max
        );
        // The members split the queues between them, consistently.
        let a = &reports[0].queues;
        let b = &reports[1].queues;
        assert_eq!(a, &assigned_queues(TOPIC, QUEUES, &members, "a"));
        let all: BTreeSet<u32> = a.iter().chain(b).copied().collect();
        assert_eq!(
            (all.len(), a.len() + b.len()),
            (QUEUES as usize, QUEUES as usize)
        );
        // Cursors are at the queues' ends.
        let cursors = store.cursors("audit").await;
        let handled: u64 = reports.iter().map(|report| report.handled).sum();
        assert_eq!(handled, sent.len() as u64);
        for report in &reports {
            for (queue, cursor) in &report.cursors {
                assert_eq!(cursors[queue], *cursor, "queue {queue}");
            }
            assert!(
                report.commits < report.handled,
                "commits are batched: {report:?}"
            );
        }
        let total: u64 = cursors.values().map(|cursor| cursor - 1).sum();
        assert_eq!(total, sent.len() as u64, "{cursors:?}");
        store.stop().await;
    });
}

#[test]
fn a_consumer_dropped_mid_batch_is_resumed_from_the_cursor_without_losing_a_message() {
    run(async {
        let store = Store::start(1, false).await;
        let sent = store.produce(16, 400, 0).await;
        let first = Arc::new(Mutex::new(Log::default()));
        let slow = |config: &mut ConsumerConfig| {
            config.max_in_flight = 4;
            config.pull_messages_max = 100;
        };
        let running = spawn(store.consumer("audit", slow), &first, 10, 1);
        wait_for(&first, "some handled", |log| log.handled.len() >= 120).await;
        // A crash: no drain, handlers cut short, nothing more committed.
        running.kill().await;
        // A commit sent just before the abort may still land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = lock(&first).handled.clone();
        assert!(first.len() < sent.len(), "dropped mid-way");
        let cursors = store.cursors("audit").await;
        for (&queue, &cursor) in &cursors {
            for offset in 1..cursor {
                assert!(
                    first.contains(&(queue, offset)),
                    "queue {queue}: cursor {cursor} passed unhandled offset {offset}"
                );
            }
        }
        assert!(
            cursors.values().any(|&cursor| cursor > 1),
            "something committed"
        );
        // A new consumer resumes from the cursors: together they handled everything.
        let second = Arc::new(Mutex::new(Log::default()));
        let running = spawn(store.consumer("audit", slow), &second, 2, 2);
        let ends = store_ends(&store).await;
        assert_eq!(
            ends.values().map(|end| end - 1).sum::<u64>(),
            sent.len() as u64
        );
        let every_one_handled = |log: &Log| {
            ends.iter().all(|(&queue, &end)| {
                (1..end).all(|o| first.contains(&(queue, o)) || log.handled.contains(&(queue, o)))
            })
        };
        wait_for(&second, "the rest", every_one_handled).await;
        running.drain().await;
        let second = std::mem::take(&mut *lock(&second));
        assert!(second.overlaps.is_empty(), "{:?}", second.overlaps);
        // Nothing below the committed cursors came back.
        for &(queue, offset) in &second.handled {
            assert!(
                offset >= cursors[&queue],
                "queue {queue}: {offset} redelivered"
            );
        }
        store.stop().await;
    });
}

/// One past the last message of each queue.
async fn store_ends(store: &Store) -> BTreeMap<u32, u64> {
    let mut ends = BTreeMap::new();
    for queue in 0..QUEUES {
        // A group that never commits: its cursor reads the whole queue.
        let request = api::ConsumeRequest {
            topic: TOPIC.to_string(),
            queue,
            consumer_group: CONSUMER_GROUPS[1].to_string(),
            from_offset: Some(1),
            max_messages: 1,
            max_bytes: 1,
            wait_ms: 0,
            store_id: 0,
        };
        let response = consume(&store.client_addrs[0], request)
            .await
            .expect("answer");
        api::check(response.error.as_ref()).expect("one node masters all");
        ends.insert(queue, response.end_offset);
    }
    ends
}

#[test]
fn a_graceful_drain_finishes_running_handlers_and_commits_exactly_what_was_handled() {
    run(async {
        let store = Store::start(1, false).await;
        let sent = store.produce(16, 400, 0).await;
        let log = Arc::new(Mutex::new(Log::default()));
        let consumer = store.consumer("audit", |config| {
            config.max_in_flight = 6;
            config.commit_interval = Duration::from_secs(10); // only the drain commits
        });
        let running = spawn(consumer, &log, 20, 3);
        wait_for(&log, "some handled", |log| log.handled.len() >= 60).await;
        let report = running.drain().await;
        let log = std::mem::take(&mut *lock(&log)); // every handler is done
        assert_eq!(log.in_flight, 0, "every running handler finished");
        assert!(log.handled.len() < sent.len(), "stopped mid-way");
        assert_eq!(report.handled, log.handled.len() as u64);
        let cursors = store.cursors("audit").await;
        for (&queue, &cursor) in &cursors {
            // The cursor is the lowest offset not handled: all before it were, it was not.
            let lowest = (1..)
                .find(|&o| !log.handled.contains(&(queue, o)))
                .expect("some");
            assert_eq!(cursor, lowest, "queue {queue}");
            assert_eq!(report.cursors.get(&queue).copied().unwrap_or(1), cursor);
        }
        assert!(cursors.values().any(|&cursor| cursor > 1), "{cursors:?}");
        store.stop().await;
    });
}

/// Messages and bytes handled per second over `span` from the first handled message.
fn measured_rates(log: &Log, span: Duration) -> (f64, f64) {
    let start = log
        .times
        .iter()
        .map(|&(t, _)| t)
        .min()
        .expect("some handled");
    let within: Vec<usize> = log
        .times
        .iter()
        .filter(|&&(t, _)| t <= start + span)
        .map(|&(_, bytes)| bytes)
        .collect();
    let seconds = span.as_secs_f64();
    (
        within.len() as f64 / seconds,
        within.iter().sum::<usize>() as f64 / seconds,
    )
}

#[test]
fn the_rate_limits_hold_within_ten_percent() {
    run(async {
        let store = Store::start(1, false).await;
        store.produce(16, 2_000, 0).await;
        let span = Duration::from_secs(3);
        // Messages/s: 250.
        let log = Arc::new(Mutex::new(Log::default()));
        let running = spawn(
            store.consumer("audit", |config| config.messages_per_s_max = Some(250)),
            &log,
            0,
            4,
        );
        wait_for(&log, "the span", |log| {
            log.times.first().is_some_and(|(t, _)| t.elapsed() > span)
        })
        .await;
        running.drain().await;
        let (rate, _) = measured_rates(&lock(&log), span);
        assert!((225.0..=275.0).contains(&rate), "{rate} messages/s for 250");
        // Bytes/s: about 120 bytes a message, so about 100 messages/s.
        let log = Arc::new(Mutex::new(Log::default()));
        let running = spawn(
            store.consumer("billing", |config| config.bytes_per_s_max = Some(12_200)),
            &log,
            0,
            5,
        );
        wait_for(&log, "the span", |log| {
            log.times.first().is_some_and(|(t, _)| t.elapsed() > span)
        })
        .await;
        running.drain().await;
        let (_, rate) = measured_rates(&lock(&log), span);
        assert!(
            (10_980.0..=13_420.0).contains(&rate),
            "{rate} bytes/s for 12,200"
        );
        store.stop().await;
    });
}
