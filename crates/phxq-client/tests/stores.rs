//! One producer over two stores: every key's messages in the store weighted rendezvous
//! hashing names, in the queue its hash names there, in order; the split near the weights;
//! and a store that stops entirely, with and without store-change retry.
//!
//! The stores are of one node each (a valid store: its own Raft groups, its own topic
//! table), with different queue counts, so that a message routed by the wrong store's
//! queue count lands in the wrong queue.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use phxq_client::{
    ErrorKind, Outgoing, Producer, ProducerConfig, StoreConfig, StoreWeight, Stored, queue_of_key,
    store_of_key,
};

mod common;

use common::{Store, TOPIC, run};

/// The stores' names, weights and queue counts: `b` takes three keys in four.
const STORES: [(&str, u32, u32); 2] = [("a", 1, 8), ("b", 3, 5)];
/// Keys sent in the spread test, and messages per key.
const KEYS: usize = 1_000;
const MESSAGES_PER_KEY: usize = 4;

fn weights() -> Vec<StoreWeight<'static>> {
    STORES
        .iter()
        .map(|&(name, weight, _)| StoreWeight { name, weight })
        .collect()
}

/// The store (index into [`STORES`]) `key` belongs to.
fn store_index(key: &str) -> usize {
    store_of_key(&weights(), key.as_bytes())
}

/// Both stores, started.
async fn start_stores() -> Vec<Store> {
    let mut stores = Vec::new();
    for &(_, _, queues) in &STORES {
        stores.push(Store::start_with_queues(1, true, queues).await);
    }
    stores
}

fn producer_of(stores: &[Store], change: impl FnOnce(&mut ProducerConfig)) -> Producer {
    let mut config =
        ProducerConfig::with_stores(stores.iter().zip(STORES).map(|(store, (name, weight, _))| {
            StoreConfig::new(name, store.client_addrs.clone(), weight)
        }));
    config.deadline = Duration::from_secs(20);
    change(&mut config);
    Producer::new(config).expect("valid producer config")
}

/// Where each value was found: (store index, queue, offset).
async fn locate(stores: &[Store]) -> HashMap<Vec<u8>, (usize, u32, u64)> {
    let mut found = HashMap::new();
    for (index, store) in stores.iter().enumerate() {
        for (queue, messages) in store.read_all().await {
            for message in messages {
                let place = (index, queue, message.offset);
                assert!(
                    found.insert(message.value.clone(), place).is_none(),
                    "{:?} stored twice",
                    String::from_utf8_lossy(&message.value)
                );
            }
        }
    }
    found
}

#[test]
fn every_key_lives_in_the_store_its_hash_names_in_order_split_by_weight() {
    run(async {
        let stores = start_stores().await;
        let producer = producer_of(&stores, |_| {});
        let key = |k: usize| format!("user-{k}");
        // Round `r` sends every key's messages 2r and 2r + 1, both in one batch; each batch
        // spans both stores.
        for round in 0..MESSAGES_PER_KEY / 2 {
            for chunk in (0..KEYS).collect::<Vec<_>>().chunks(250) {
                let messages: Vec<(usize, usize)> = [2 * round, 2 * round + 1]
                    .into_iter()
                    .flat_map(|n| chunk.iter().map(move |&k| (k, n)))
                    .collect();
                let batch = messages
                    .iter()
                    .map(|&(k, n)| Outgoing::new(key(k), format!("{}/{n}", key(k))));
                let results = producer.send_messages(TOPIC, batch).await;
                for (&(k, _), result) in messages.iter().zip(results) {
                    let stored: Stored = result.expect("stored");
                    let (name, _, queues) = STORES[store_index(&key(k))];
                    assert_eq!(&*stored.store, name, "{}", key(k));
                    assert_eq!(stored.queue, queue_of_key(key(k).as_bytes(), queues));
                }
            }
        }
        // A single send of a key goes the same way.
        let receipt = producer.send(TOPIC, b"user-0", "user-0/4").await.unwrap();
        let queues = STORES[store_index("user-0")].2;
        assert_eq!(receipt.queue, queue_of_key(b"user-0", queues));
        // Keyless messages spread by weight.
        let keyless: Vec<(Vec<u8>, String)> = (0..1_000)
            .map(|i| (Vec::new(), format!("keyless/{i}")))
            .collect();
        let results = producer.send_batch(TOPIC, keyless).await;
        assert!(results.iter().all(Result::is_ok));

        // Keyless messages with ids are routed by their ids: sent again (by any producer),
        // each meets its first copy's dedup window and is answered as a duplicate.
        let with_ids =
            || (0..40).map(|i| Outgoing::new("", format!("id/{i}")).with_id(format!("id-{i}")));
        let first: Vec<Stored> = producer
            .send_messages(TOPIC, with_ids())
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let again = producer_of(&stores, |_| {});
        let second: Vec<Stored> = again
            .send_messages(TOPIC, with_ids())
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert!(first.iter().all(|s| !s.duplicate));
        for (one, two) in first.iter().zip(&second) {
            assert!(two.duplicate, "{two:?}");
            assert_eq!(
                (&one.store, one.queue, one.offset),
                (&two.store, two.queue, two.offset)
            );
        }
        assert!(first.iter().any(|s| &*s.store == "a") && first.iter().any(|s| &*s.store == "b"));

        let found = locate(&stores).await;
        assert_eq!(
            found.len(),
            KEYS * MESSAGES_PER_KEY + 1 + 1_000 + 40,
            "all stored, once"
        );
        let mut keys_in = [0usize; 2];
        for k in 0..KEYS {
            let index = store_index(&key(k));
            keys_in[index] += 1;
            let queues = STORES[index].2;
            let count = MESSAGES_PER_KEY + usize::from(k == 0);
            let places: Vec<(usize, u32, u64)> = (0..count)
                .map(|n| found[format!("{}/{n}", key(k)).as_bytes()])
                .collect();
            for (n, &(store, queue, _)) in places.iter().enumerate() {
                assert_eq!(store, index, "{}/{n} in the wrong store", key(k));
                assert_eq!(
                    queue,
                    queue_of_key(key(k).as_bytes(), queues),
                    "{}/{n}",
                    key(k)
                );
            }
            assert!(
                places.windows(2).all(|pair| pair[0].2 < pair[1].2),
                "{}: out of order: {places:?}",
                key(k)
            );
        }
        let share_b = keys_in[1] as f64 / KEYS as f64;
        assert!(
            (share_b - 0.75).abs() < 0.05,
            "store b has {share_b} of the keys"
        );
        let keyless_b = (0..1_000)
            .filter(|i| found[format!("keyless/{i}").as_bytes()].0 == 1)
            .count() as f64
            / 1_000.0;
        assert!(
            (keyless_b - 0.75).abs() < 0.05,
            "store b has {keyless_b} of the keyless messages"
        );
        assert_eq!(producer.stats().store_changes, 0);
        for store in stores {
            store.stop().await;
        }
    });
}

/// Keys whose store is `a` and keys whose store is `b`.
fn keys_by_store(count: usize) -> [Vec<String>; 2] {
    let mut by_store: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for k in 0.. {
        let key = format!("order-{k}");
        let index = store_index(&key);
        if by_store[index].len() < count {
            by_store[index].push(key);
        }
        if by_store.iter().all(|keys| keys.len() == count) {
            break;
        }
    }
    by_store
}

#[test]
fn a_stopped_store_fails_its_keys_naming_it_unless_store_change_retry_moves_them() {
    run(async {
        let mut stores = start_stores().await;
        let [keys_a, keys_b] = keys_by_store(20);
        // A producer that knew store a's master before it stopped, and one that never did.
        let warm = producer_of(&stores, |config| {
            config.store_change_retry = true;
            config.store_change_after = Duration::from_millis(300);
            config.deadline = Duration::from_secs(5);
        });
        warm.send(TOPIC, keys_a[0].as_bytes(), "before")
            .await
            .unwrap();
        stores[0].stop_node(1).await;
        let cold = producer_of(&stores, |config| {
            config.store_change_retry = true;
            config.store_change_after = Duration::from_millis(300);
            config.deadline = Duration::from_secs(5);
        });
        let plain = producer_of(&stores, |config| {
            config.deadline = Duration::from_millis(1_500)
        });

        // Without store-change retry: a's keys fail naming a; b's keys of the same batch are
        // stored.
        let batch: Vec<Outgoing> = keys_a
            .iter()
            .chain(&keys_b)
            .map(|key| Outgoing::new(key.clone(), format!("plain/{key}")))
            .collect();
        let results = plain.send_messages(TOPIC, batch).await;
        for (result, key) in results.iter().zip(keys_a.iter().chain(&keys_b)) {
            if store_index(key) == 0 {
                let error = result.as_ref().expect_err("store a is down");
                assert_eq!(error.store(), Some("a"), "{error}");
                assert_eq!(error.kind(), ErrorKind::Unreachable, "{error}");
                assert!(error.to_string().starts_with("store \"a\": "), "{error}");
            } else {
                assert_eq!(&*result.as_ref().expect("store b is up").store, "b");
            }
        }
        assert_eq!(plain.stats().store_changes, 0);

        // With it: every key is stored, a's keys in b (the rest of their ranking), a's
        // keys after a's budget of 300 ms, well before the 5 s deadline.
        for (name, producer) in [("warm", &warm), ("cold", &cold)] {
            let started = Instant::now();
            let batch: Vec<Outgoing> = keys_a
                .iter()
                .chain(&keys_b)
                .map(|key| Outgoing::new(key.clone(), format!("{name}/{key}")))
                .collect();
            for result in producer.send_messages(TOPIC, batch).await {
                assert_eq!(&*result.expect("moved to b").store, "b");
            }
            let receipt = producer
                .send(TOPIC, keys_a[1].as_bytes(), format!("{name}/single"))
                .await
                .expect("a single send moves too");
            assert_eq!(
                receipt.queue,
                queue_of_key(keys_a[1].as_bytes(), STORES[1].2)
            );
            assert!(producer.stats().store_changes >= 2, "{name}");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(3), "{name}: {took:?}");
        }

        let found = locate(&stores[1..]).await;
        for key in &keys_a {
            for name in ["warm", "cold"] {
                let (_, queue, _) = found[format!("{name}/{key}").as_bytes()];
                assert_eq!(queue, queue_of_key(key.as_bytes(), STORES[1].2), "{key}");
            }
            assert!(!found.contains_key(format!("plain/{key}").as_bytes()));
        }
        for key in &keys_b {
            assert!(found.contains_key(format!("plain/{key}").as_bytes()));
        }
        for store in stores {
            store.stop().await;
        }
    });
}
