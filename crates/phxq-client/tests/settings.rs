//! The operator's per consumer group settings, set in the store through the API, applied by
//! the consumer: against a real 3-node store (every node a full server in this test process).
//!
//! Settings are put the way `phxq topic alter --settings-for` puts them: one `PutTopic`
//! (alter) per replication group at its master, then a wait until every node reports the
//! topic consistent with them. Tests run one at a time, each on a store of its own; every
//! wait is bounded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    Consumer, ConsumerConfig, ConsumerError, Delivery, EffectiveSettings, Outcome, Producer,
    ProducerConfig, RetryTier, queue_of_key,
};
use phxq_proto::api::{self, phxq_client::PhxqClient};
use tokio::sync::oneshot;

mod common;

use common::{
    CONSUMER_GROUPS, DEAD_LETTER_QUEUES, DEAD_LETTER_TOPIC, GROUPS, POLL, QUEUES, Running,
    SETTLE_TIMEOUT, Store, TOPIC, cluster_status, lock, run,
};

/// The group the operator sets settings for.
const GROUP: &str = CONSUMER_GROUPS[1];
/// A group of the topic without settings.
const OTHER_GROUP: &str = CONSUMER_GROUPS[0];
/// How long a test waits for what it expects (the store is up already).
const WAIT: Duration = Duration::from_secs(20);

/// Puts `settings` as the settings of [`TOPIC`] (replacing any), in every replication group,
/// and waits until every node reports them, consistent.
async fn put_settings(store: &Store, settings: Vec<api::ConsumerGroupSettings>) {
    let status = cluster_status(&store.client_addrs[0])
        .await
        .expect("status");
    let mut config = status
        .topics
        .iter()
        .find(|topic| topic.name == TOPIC)
        .and_then(|topic| topic.config.clone())
        .expect("the topic's config");
    config.group_settings = settings;
    let masters = store.wait_masters(false).await;
    for group in 0..GROUPS {
        let mut target = store.client_addrs[masters[group as usize] as usize - 1].clone();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "group {group} refused the settings"
            );
            let request = api::PutTopicRequest {
                group: u64::from(group),
                topic: Some(config.clone()),
                mode: api::PutMode::Alter as i32,
                store_id: 0,
            };
            let answer = match PhxqClient::connect(format!("http://{target}")).await {
                Ok(mut client) => client.put_topic(request).await.ok(),
                Err(_) => None,
            };
            if let Some(answer) = answer.map(tonic::Response::into_inner) {
                match api::check(answer.error.as_ref()) {
                    Ok(()) => break,
                    Err(failure) => {
                        if let Some(master) = failure.master_addr {
                            target = master;
                            continue;
                        }
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    'nodes: loop {
        assert!(
            Instant::now() < deadline,
            "settings not reported everywhere"
        );
        for addr in &store.client_addrs {
            let reported = cluster_status(addr).await.and_then(|status| {
                let topic = status.topics.into_iter().find(|t| t.name == TOPIC)?;
                Some(topic.consistent && topic.config? == config)
            });
            if reported != Some(true) {
                tokio::time::sleep(POLL).await;
                continue 'nodes;
            }
        }
        return;
    }
}

fn tier(attempts: u32, delay_ms: u64) -> api::RetryTier {
    api::RetryTier { attempts, delay_ms }
}

/// Settings of [`GROUP`] with nothing set.
fn settings() -> api::ConsumerGroupSettings {
    api::ConsumerGroupSettings {
        consumer_group: GROUP.to_string(),
        ..Default::default()
    }
}

/// A consumer of [`TOPIC`] for `group` through node 1 only, changed by `change`.
fn consumer(store: &Store, group: &str, change: impl FnOnce(&mut ConsumerConfig)) -> Consumer {
    let mut config = ConsumerConfig::new([store.client_addrs[0].clone()], TOPIC, group);
    config.long_poll = Duration::from_millis(300);
    config.commit_interval = Duration::from_millis(50);
    change(&mut config);
    Consumer::new(config).expect("valid consumer config")
}

async fn send(store: &Store, messages: &[(&str, &str)]) {
    let mut config = ProducerConfig::new(store.client_addrs.clone());
    config.deadline = Duration::from_secs(30);
    let producer = Producer::new(config).expect("producer");
    for (key, value) in messages {
        producer
            .send(TOPIC, key.as_bytes(), *value)
            .await
            .expect("stored");
    }
}

/// Every delivery of a test: (value, delivery count).
type Deliveries = Arc<Mutex<Vec<(String, u32)>>>;

/// Waits until `done` holds of the deliveries (bounded by [`WAIT`]).
async fn wait_for(log: &Deliveries, what: &str, done: impl Fn(&[(String, u32)]) -> bool) {
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

/// Records each delivery in `log`; nacks `poison`, handles the rest.
fn nack_poison(
    log: &Deliveries,
) -> impl Fn(&Delivery) -> std::future::Ready<Outcome> + Send + Sync + 'static {
    let log = log.clone();
    move |msg: &Delivery| {
        let value = String::from_utf8(msg.value.clone()).expect("utf-8");
        let outcome = if value == "poison" {
            Outcome::Nack
        } else {
            Outcome::Handled
        };
        lock(&log).push((value, msg.attempt));
        std::future::ready(outcome)
    }
}

/// Every message of the dead-letter topic as `(queue, key, value)`.
async fn dead_letters(store: &Store) -> Vec<(u32, String, String)> {
    let mut all = Vec::new();
    for queue in 0..DEAD_LETTER_QUEUES {
        let response = store
            .consume_at_master(api::ConsumeRequest {
                topic: DEAD_LETTER_TOPIC.to_string(),
                queue,
                consumer_group: OTHER_GROUP.to_string(),
                from_offset: Some(1),
                max_messages: 1000,
                max_bytes: 1 << 20,
                wait_ms: 0,
                store_id: 0,
            })
            .await;
        for message in response.messages {
            let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
            all.push((queue, text(message.key), text(message.value)));
        }
    }
    all
}

#[test]
fn the_stores_retry_tiers_and_dead_letter_topic_apply_to_a_consumer_configured_with_neither() {
    run(async {
        let store = Store::start(3, false).await;
        put_settings(
            &store,
            vec![api::ConsumerGroupSettings {
                retry_tiers: vec![tier(1, 50), tier(1, 100)],
                dead_letter_topic: Some(DEAD_LETTER_TOPIC.to_string()),
                ..settings()
            }],
        )
        .await;
        send(&store, &[("p", "poison"), ("p", "after-poison")]).await;
        let log = Deliveries::default();
        // The library's defaults: 10 retries then the last delay forever, no dead letters.
        let running = Running::spawn(consumer(&store, GROUP, |_| {}), nack_poison(&log));
        wait_for(&log, "the message after the poison", |log| {
            log.iter().any(|(value, _)| value == "after-poison")
        })
        .await;
        let report = running.drain_within(WAIT).await;
        let poison: Vec<u32> = lock(&log)
            .iter()
            .filter(|(value, _)| value == "poison")
            .map(|&(_, attempt)| attempt)
            .collect();
        assert_eq!(
            poison,
            [1, 2, 3],
            "two tiers of one retry, then dead letter"
        );
        assert_eq!((report.dead_lettered, report.handled), (1, 1), "{report:?}");
        assert!(report.settings.from_store, "{report:?}");
        assert_eq!(
            report.settings.dead_letter_topic.as_deref(),
            Some(DEAD_LETTER_TOPIC)
        );
        let queue = queue_of_key(b"p", DEAD_LETTER_QUEUES);
        assert_eq!(
            dead_letters(&store).await,
            [(queue, "p".to_string(), "poison".to_string())]
        );
        store.stop().await;
    });
}

#[test]
fn the_stores_max_in_flight_of_one_never_lets_two_handlers_run_at_once() {
    run(async {
        let store = Store::start(3, false).await;
        put_settings(
            &store,
            vec![api::ConsumerGroupSettings {
                max_in_flight: Some(1),
                rate_messages_per_s: Some(1000),
                ..settings()
            }],
        )
        .await;
        // Distinct keys over every queue: the library's own limit (64) would run them at once.
        let keys: Vec<String> = (0..16).map(|i| format!("key-{i}")).collect();
        let messages: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), k.as_str())).collect();
        send(&store, &messages).await;
        let log = Deliveries::default();
        let running_now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (log, running_now, most) = (log.clone(), running_now.clone(), most.clone());
            move |msg: &Delivery| {
                let (log, running_now, most) = (log.clone(), running_now.clone(), most.clone());
                let entry = (String::from_utf8(msg.value.clone()).expect("utf-8"), 1);
                async move {
                    let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running_now.fetch_sub(1, Ordering::SeqCst);
                    lock(&log).push(entry);
                    Outcome::Handled
                }
            }
        };
        let running = Running::spawn(consumer(&store, GROUP, |_| {}), handler);
        wait_for(&log, "every message", |log| log.len() >= keys.len()).await;
        let report = running.drain_within(WAIT).await;
        assert_eq!(most.load(Ordering::SeqCst), 1, "handlers at once");
        assert_eq!(report.handled, keys.len() as u64, "{report:?}");
        assert_eq!(report.settings.max_in_flight, 1);
        // A static consumer alone: the group's rate is all its own.
        assert_eq!(report.settings.messages_per_s_max, Some(1000));
        store.stop().await;
    });
}

#[test]
fn a_group_without_store_settings_keeps_its_library_config() {
    run(async {
        let store = Store::start(3, false).await;
        // Settings for the other group only.
        put_settings(
            &store,
            vec![api::ConsumerGroupSettings {
                retry_tiers: vec![tier(1, 50)],
                dead_letter_topic: Some(DEAD_LETTER_TOPIC.to_string()),
                max_in_flight: Some(1),
                rate_messages_per_s: Some(10),
                rate_bytes_per_s: Some(1000),
                ..settings()
            }],
        )
        .await;
        send(&store, &[("k", "fine")]).await;
        let tiers = vec![RetryTier {
            attempts: 5,
            delay: Duration::from_millis(30),
        }];
        let library = |config: &mut ConsumerConfig| {
            config.retry_tiers = tiers.clone();
            config.max_in_flight = 7;
            config.messages_per_s_max = Some(5000);
        };
        let log = Deliveries::default();
        let running = Running::spawn(consumer(&store, OTHER_GROUP, library), nack_poison(&log));
        wait_for(&log, "the message", |log| !log.is_empty()).await;
        let report = running.drain_within(WAIT).await;
        assert_eq!(
            report.settings,
            EffectiveSettings {
                from_store: false,
                retry_tiers: tiers.clone(),
                dead_letter_topic: None,
                max_in_flight: 7,
                messages_per_s_max: Some(5000),
                bytes_per_s_max: None,
                group_messages_per_s_max: None,
                group_bytes_per_s_max: None,
            }
        );
        assert_eq!(report.handled, 1, "{report:?}");
        store.stop().await;
    });
}

#[test]
fn a_store_setting_the_library_cannot_apply_is_refused_at_start_and_nothing_consumed() {
    run(async {
        let store = Store::start(3, false).await;
        // Two hours: the store takes up to a week, the library at most RETRY_DELAY_MAX (1 h).
        put_settings(
            &store,
            vec![api::ConsumerGroupSettings {
                retry_tiers: vec![tier(2, 50), tier(1, 2 * 3600 * 1000)],
                ..settings()
            }],
        )
        .await;
        send(&store, &[("k", "never")]).await;
        let log = Deliveries::default();
        let (_stop, stopped) = oneshot::channel::<()>();
        let ran = tokio::time::timeout(
            WAIT,
            consumer(&store, GROUP, |_| {}).run(nack_poison(&log), async move {
                let _ = stopped.await;
            }),
        )
        .await
        .expect("returns at once");
        match ran {
            Err(ConsumerError::Settings(error)) => {
                assert_eq!(
                    (error.topic.as_str(), error.consumer_group.as_str()),
                    (TOPIC, GROUP)
                );
                assert_eq!(error.error.field, "retry_tiers[1].delay", "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(lock(&log).is_empty(), "nothing handled: {:?}", lock(&log));
        // No cursor of the group moved.
        for queue in 0..QUEUES {
            let response = store
                .consume_at_master(api::ConsumeRequest {
                    topic: TOPIC.to_string(),
                    queue,
                    consumer_group: GROUP.to_string(),
                    from_offset: None,
                    max_messages: 1,
                    max_bytes: 1 << 20,
                    wait_ms: 0,
                    store_id: 0,
                })
                .await;
            let cursor = response
                .messages
                .first()
                .map_or(response.next_offset, |m| m.offset);
            assert_eq!(cursor, 1, "queue {queue}");
        }
        store.stop().await;
    });
}

/// One handler run: when it started and ended, relative to the test's start.
type Interval = (Duration, Duration);

/// Most intervals of `runs` open at once among those starting in `from..to`.
fn most_at_once(runs: &[Interval], from: Duration, to: Duration) -> usize {
    let inside: Vec<&Interval> = runs
        .iter()
        .filter(|(start, _)| (from..to).contains(start))
        .collect();
    inside
        .iter()
        .map(|(start, _)| {
            inside
                .iter()
                .filter(|(other_start, other_end)| other_start <= start && start < other_end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_running_consumer_applies_changed_store_settings_without_losing_or_repeating_a_message() {
    run(async {
        let store = Store::start(3, false).await;
        let wide = api::ConsumerGroupSettings {
            max_in_flight: Some(8),
            ..settings()
        };
        put_settings(&store, vec![wide.clone()]).await;
        // 64 keys over every queue, so up to 64 handlers could run at once.
        let values: Vec<String> = (0..300).map(|i| format!("m{i:03}")).collect();
        let keyed: Vec<(String, &str)> = values
            .iter()
            .enumerate()
            .map(|(i, value)| (format!("key-{}", i % 64), value.as_str()))
            .collect();
        let messages: Vec<(&str, &str)> = keyed.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        send(&store, &messages).await;

        let began = Instant::now();
        let runs: Arc<Mutex<Vec<Interval>>> = Arc::default();
        let log = Deliveries::default();
        let handler = {
            let (runs, log) = (runs.clone(), log.clone());
            move |msg: &Delivery| {
                let (runs, log) = (runs.clone(), log.clone());
                let value = String::from_utf8(msg.value.clone()).expect("utf-8");
                let attempt = msg.attempt;
                async move {
                    let start = began.elapsed();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    lock(&runs).push((start, began.elapsed()));
                    lock(&log).push((value, attempt));
                    Outcome::Handled
                }
            }
        };
        let running = Running::spawn(
            consumer(&store, GROUP, |config| {
                config.settings_refresh = Duration::from_millis(200);
            }),
            handler,
        );
        wait_for(&log, "the first 40 messages", |log| log.len() >= 40).await;

        // One at a time. Applied within a refresh (and the handlers running then finish
        // within 100 ms).
        let one = api::ConsumerGroupSettings {
            max_in_flight: Some(1),
            ..settings()
        };
        put_settings(&store, vec![one]).await;
        let one_from = began.elapsed() + Duration::from_millis(600);
        tokio::time::sleep(Duration::from_millis(600 + 1_000)).await;
        let one_to = one_from + Duration::from_secs(1);
        // 8 at once again, but 5 a second: the rate binds.
        let narrow = api::ConsumerGroupSettings {
            max_in_flight: Some(8),
            rate_messages_per_s: Some(5),
            ..settings()
        };
        put_settings(&store, vec![narrow]).await;
        let applied = began.elapsed() + Duration::from_millis(600);
        tokio::time::sleep(Duration::from_millis(600 + 2_000)).await;
        let window_end = applied + Duration::from_secs(2);
        // A change the library cannot apply (a 2 h delay): ignored, the narrow settings stay
        // (applied, it would lift the rate).
        let refused = api::ConsumerGroupSettings {
            retry_tiers: vec![tier(1, 2 * 3600 * 1000)],
            max_in_flight: Some(8),
            ..settings()
        };
        put_settings(&store, vec![refused]).await;
        let refused_from = began.elapsed() + Duration::from_millis(600);
        tokio::time::sleep(Duration::from_millis(600 + 1_000)).await;
        let refused_to = refused_from + Duration::from_secs(1);
        // Wide again: the rest flows.
        put_settings(&store, vec![wide.clone()]).await;
        wait_for(&log, "every message", |log| log.len() >= values.len()).await;
        let report = running.drain_within(WAIT).await;

        let runs = lock(&runs).clone();
        let before = most_at_once(&runs, Duration::ZERO, one_from - Duration::from_millis(700));
        assert!(before >= 4, "max in flight 8 at first: {before} at once");
        let started = |from: Duration, to: Duration| {
            runs.iter()
                .filter(|(start, _)| (from..to).contains(start))
                .count()
        };
        assert_eq!(
            most_at_once(&runs, one_from, one_to),
            1,
            "max in flight 1 once reloaded"
        );
        let one_count = started(one_from, one_to);
        assert!(
            (5..=11).contains(&one_count),
            "{one_count} handled in 1 s one at a time, 100 ms each"
        );
        // 5/s over 2 s, plus a burst of one and the message that was waiting.
        let narrow_count = started(applied, window_end);
        assert!(
            (5..=12).contains(&narrow_count),
            "{narrow_count} started in 2 s at 5/s"
        );
        let refused_count = started(refused_from, refused_to);
        assert!(
            refused_count <= 7,
            "{refused_count} started in 1 s after the refused change: the rate still holds"
        );
        let mut handled: Vec<String> = lock(&log).iter().map(|(v, _)| v.clone()).collect();
        handled.sort();
        assert_eq!(
            handled, values,
            "every message once: nothing lost or repeated"
        );
        assert_eq!(report.handled, values.len() as u64, "{report:?}");
        assert_eq!(
            (report.settings_reloads, report.settings_refused),
            (3, 1),
            "one, narrow and wide applied, the 2 h delay refused: {report:?}"
        );
        assert_eq!(report.settings.max_in_flight, 8, "{report:?}");
        assert_eq!(report.settings.messages_per_s_max, None, "{report:?}");
        assert!(report.settings.from_store, "{report:?}");
        store.stop().await;
    });
}
