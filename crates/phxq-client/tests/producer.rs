//! The producer against real stores: every node a full server (event loop, write-ahead log,
//! peer TCP, gRPC) running in this test process on 127.0.0.1, on ports picked by the kernel.
//!
//! Tests run one at a time (each starts its own store; several at once on a small machine
//! would make elections, not the producer, the subject). Every wait is bounded and polls
//! `ClusterStatus`; measurements start only once the store's masters are settled.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use phxq_client::{ErrorCode, ErrorKind, Producer, ProducerConfig, Receipt, queue_of_key};

mod common;

use common::{GROUPS, MESSAGE_BYTES_MAX, QUEUES, Store, free_ports, run};

/// The producers' deadline in the store tests.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the producer tests ask of a store.
trait ProducerStore {
    /// A producer for this store (every node a seed), changed by `change`.
    fn producer(&self, change: impl FnOnce(&mut ProducerConfig)) -> Producer;
}

impl ProducerStore for Store {
    fn producer(&self, change: impl FnOnce(&mut ProducerConfig)) -> Producer {
        let mut config = ProducerConfig::new(self.client_addrs.clone());
        config.deadline = DEADLINE;
        change(&mut config);
        Producer::new(config).expect("valid producer config")
    }
}

/// A key whose `orders` queue is in replication group `group`.
fn key_in_group(group: u32) -> String {
    (0..1_000)
        .map(|i| format!("user-{i}"))
        .find(|key| queue_of_key(key.as_bytes(), QUEUES) % GROUPS == group)
        .expect("some key maps to every group")
}

#[test]
fn keyed_messages_keep_their_queue_and_their_order() {
    run(async {
        let store = Store::start(3, true).await;
        let producer = store.producer(|_| {});
        let keys: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
        let mut receipts: HashMap<&str, Vec<Receipt>> = HashMap::new();
        for round in 0..5 {
            for key in &keys {
                let value = format!("{key}#{round}");
                let receipt = producer
                    .send("orders", key.as_bytes(), value)
                    .await
                    .expect("acknowledged");
                assert_eq!(receipt.queue, queue_of_key(key.as_bytes(), QUEUES), "{key}");
                receipts.entry(key).or_default().push(receipt);
            }
        }
        for (key, receipts) in &receipts {
            assert!(
                receipts.windows(2).all(|w| w[0].offset < w[1].offset),
                "{key}: offsets not increasing: {receipts:?}"
            );
        }

        // Without a key, messages go round the queues: 16 sends, two per queue.
        let mut per_queue = BTreeMap::new();
        for i in 0..2 * QUEUES {
            let receipt = producer
                .send("orders", b"", format!("keyless-{i}"))
                .await
                .expect("acknowledged");
            *per_queue.entry(receipt.queue).or_insert(0) += 1;
        }
        assert_eq!(per_queue, (0..QUEUES).map(|q| (q, 2)).collect());

        // Consumers see each key's messages in the order they were sent, at their receipts.
        for queue in 0..QUEUES {
            let mut rounds: HashMap<Vec<u8>, Vec<u32>> = HashMap::new();
            for message in store.read_queue(queue).await {
                if message.key.is_empty() {
                    continue;
                }
                let key = String::from_utf8(message.key.clone()).expect("utf-8 key");
                let receipt = Receipt {
                    queue,
                    offset: message.offset,
                };
                let round = receipts[key.as_str()]
                    .iter()
                    .position(|r| *r == receipt)
                    .expect("every stored keyed message was acknowledged");
                assert_eq!(message.value, format!("{key}#{round}").into_bytes());
                rounds.entry(message.key).or_default().push(round as u32);
            }
            for (key, rounds) in rounds {
                assert_eq!(rounds, [0, 1, 2, 3, 4], "key {key:?} in queue {queue}");
            }
        }
        store.stop().await;
    });
}

#[test]
fn a_master_that_moved_is_followed_through_not_master() {
    run(async {
        // Nodes 1 and 2 master everything; the producer learns that.
        let mut store = Store::new(3);
        store.start_node(1).await;
        store.start_node(2).await;
        store.wait_masters(false).await;
        let group = 2; // node 3's group once it runs
        assert_eq!(store.preferred(group), 3);
        let key = key_in_group(group);
        let producer = store.producer(|_| {});
        let first = producer
            .send("orders", key.as_bytes(), "before")
            .await
            .expect("acknowledged");

        // Node 3 comes up and takes its group over: the producer's master is stale.
        store.start_node(3).await;
        let masters = store.wait_masters(true).await;
        assert_eq!(masters[group as usize], 3);
        let before = producer.stats();
        let second = producer
            .send("orders", key.as_bytes(), "after")
            .await
            .expect("acknowledged through the redirect");
        let after = producer.stats();
        assert!(
            after.redirects > before.redirects,
            "no NOT_MASTER was followed: {before:?} then {after:?}"
        );
        assert_eq!(second.queue, first.queue);
        assert_eq!(second.offset, first.offset + 1);
        store.stop().await;
    });
}

#[test]
fn a_batch_is_one_call_per_group_and_every_message_is_where_its_receipt_says() {
    run(async {
        let store = Store::start(3, true).await;
        let producer = store.producer(|_| {});
        // Warm the layout so the counts below are the batch's alone.
        producer
            .send("orders", b"warm-up", "x")
            .await
            .expect("acknowledged");
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..400)
            .map(|i| {
                let key = if i % 10 == 9 {
                    Vec::new()
                } else {
                    format!("k{}", i % 37).into_bytes()
                };
                (key, format!("v{i}").into_bytes())
            })
            .collect();
        let before = producer.stats();
        let results = producer.send_batch("orders", batch.clone()).await;
        let after = producer.stats();
        assert_eq!(results.len(), batch.len());
        let receipts: Vec<Receipt> = results
            .into_iter()
            .map(|result| result.expect("acknowledged"))
            .collect();
        // One call per group; any extra attempt is a redirect or a retry.
        let calls = after.produce_calls - before.produce_calls;
        let extra = (after.redirects - before.redirects) + (after.retries - before.retries);
        assert_eq!(
            calls - extra,
            u64::from(GROUPS),
            "{before:?} then {after:?}"
        );

        for ((key, _), receipt) in batch.iter().zip(&receipts) {
            if !key.is_empty() {
                assert_eq!(receipt.queue, queue_of_key(key, QUEUES));
            }
        }
        // Within a queue, input order is offset order.
        let mut last: HashMap<u32, u64> = HashMap::new();
        for receipt in &receipts {
            let previous = last.insert(receipt.queue, receipt.offset).unwrap_or(0);
            assert!(
                previous < receipt.offset,
                "{receipt:?} after offset {previous}"
            );
        }

        let mut stored: HashMap<Receipt, (Vec<u8>, Vec<u8>)> = HashMap::new();
        for queue in 0..QUEUES {
            for message in store.read_queue(queue).await {
                let receipt = Receipt {
                    queue,
                    offset: message.offset,
                };
                stored.insert(receipt, (message.key, message.value));
            }
        }
        assert_eq!(
            stored.len(),
            batch.len() + 1,
            "the batch and the warm-up, nothing else"
        );
        for (message, receipt) in batch.iter().zip(&receipts) {
            assert_eq!(stored.get(receipt), Some(message), "at {receipt:?}");
        }

        assert!(
            producer
                .send_batch("orders", Vec::<(Vec<u8>, Vec<u8>)>::new())
                .await
                .is_empty()
        );
        store.stop().await;
    });
}

#[test]
fn bad_input_is_refused_at_once_with_its_code_and_stores_nothing() {
    run(async {
        let store = Store::start(1, true).await;
        let producer = store.producer(|_| {});
        let code = |error: &phxq_client::ProduceError| (error.kind(), error.code());

        // A cold producer learns the layout with its one call, and the topic is not there.
        let error = producer.send("nope", b"k", "v").await.unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::UnknownTopic))
        );
        assert_eq!(error.attempts(), 1, "{error}");
        assert!(!error.maybe_stored());
        // A warm one asks again once (the store may have changed), then refuses.
        producer
            .send("orders", b"warm-up", "x")
            .await
            .expect("acknowledged");
        let error = producer.send("nope", b"k", "v").await.unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::UnknownTopic))
        );
        assert_eq!(error.attempts(), 1, "{error}");
        for result in producer.send_batch("nope", [("a", "1"), ("b", "2")]).await {
            assert_eq!(result.unwrap_err().code(), Some(ErrorCode::UnknownTopic));
        }

        // Refused by the producer before any call.
        let error = producer.send("no spaces", b"k", "v").await.unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::InvalidName))
        );
        assert_eq!(error.attempts(), 0);
        let long_key = vec![b'k'; phxq_client::KEY_BYTES_MAX + 1];
        let error = producer.send("orders", &long_key, "v").await.unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::MessageTooLarge))
        );
        assert_eq!(error.attempts(), 0);

        // Over this store's own limit: the node refuses, once.
        let calls = producer.stats().produce_calls;
        let error = producer
            .send("orders", b"big", vec![0u8; MESSAGE_BYTES_MAX + 1])
            .await
            .unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::MessageTooLarge))
        );
        assert_eq!(error.attempts(), 1, "{error}");
        assert_eq!(producer.stats().produce_calls, calls + 1);
        let big_queue = queue_of_key(b"big", QUEUES);
        let stored = store.read_queue(big_queue).await;
        assert!(
            stored.iter().all(|m| m.key != b"big"),
            "a refused message was stored"
        );

        // A producer meant for another store.
        let wrong = store.producer(|config| config.store_id = 99);
        let error = wrong.send("orders", b"k", "v").await.unwrap_err();
        assert_eq!(
            code(&error),
            (ErrorKind::Refused, Some(ErrorCode::WrongStore))
        );
        assert_eq!(error.attempts(), 1);
        store.stop().await;
    });
}

#[test]
fn with_no_node_listening_a_send_gives_up_at_its_deadline() {
    run(async {
        let addrs: Vec<String> = free_ports(2)
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let mut config = ProducerConfig::new(addrs);
        config.deadline = Duration::from_secs(1);
        let producer = Producer::new(config).expect("valid config");

        let started = Instant::now();
        let error = producer.send("orders", b"k", "v").await.unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(
            (error.kind(), error.code()),
            (ErrorKind::Unreachable, None),
            "{error}"
        );
        assert!(error.attempts() >= 3, "{error}");
        assert!(!error.maybe_stored(), "nothing was sent: {error}");
        assert!(
            Duration::from_millis(800) <= elapsed && elapsed <= Duration::from_secs(4),
            "gave up after {elapsed:?}"
        );

        let started = Instant::now();
        let results = producer
            .send_batch("orders", [("a", "1"), ("b", "2")])
            .await;
        assert!(started.elapsed() <= Duration::from_secs(4));
        for result in results {
            assert_eq!(result.unwrap_err().kind(), ErrorKind::Unreachable);
        }
    });
}

#[test]
fn a_stopped_master_is_waited_for_unless_queue_change_retry_moves_on() {
    run(async {
        let mut store = Store::start(3, true).await;
        let group = 2; // mastered by node 3
        let key = key_in_group(group);
        let queue = queue_of_key(key.as_bytes(), QUEUES);
        let keeping = store.producer(|_| {});
        let moving = store.producer(|config| config.queue_change_retry = true);
        for producer in [&keeping, &moving] {
            let receipt = producer
                .send("orders", key.as_bytes(), "before")
                .await
                .expect("acknowledged");
            assert_eq!(receipt.queue, queue);
        }

        store.stop_node(3).await;
        let moved = moving
            .send("orders", key.as_bytes(), "moved")
            .await
            .expect("acknowledged on the next queue");
        assert_eq!(
            moved.queue,
            (queue + 1) % QUEUES,
            "the next queue, in a mastered group"
        );
        assert!(moving.stats().queue_changes >= 1);

        let kept = keeping
            .send("orders", key.as_bytes(), "kept")
            .await
            .expect("acknowledged once the group elected a master");
        assert_eq!(kept.queue, queue, "order per key: the key's own queue");
        let stats = keeping.stats();
        assert!(stats.retries >= 1, "{stats:?}");
        assert_eq!(stats.queue_changes, 0);
        store.stop().await;
    });
}
