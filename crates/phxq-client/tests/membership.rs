//! Live membership against real three-node stores: consumers join through the group
//! coordinator (group 0's master), queues move between them, and no queue is ever handled by
//! two consumers at once.
//!
//! Every handler records an interval `(queue, consumer, start, end)` (the end is taken when
//! the handler's future is dropped, so a killed consumer's handlers end when it dies); the
//! checks are on those intervals, on what was handled, and on the coordinator's view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    Consumer, ConsumerConfig, ConsumerError, Delivery, ErrorCode, Membership, Outcome, Producer,
    ProducerConfig,
};
use phxq_proto::api::{self, phxq_client::PhxqClient};
use tokio::task::JoinHandle;

mod common;

use common::{CONSUMER_GROUPS, POLL, QUEUES, Running, SETTLE_TIMEOUT, Store, TOPIC, lock, run};

/// The session timeout of the tests' members.
const SESSION: Duration = Duration::from_secs(3);
/// Their heartbeat interval.
const INTERVAL: Duration = Duration::from_millis(250);

/// What the handlers of every consumer of a test saw.
#[derive(Default)]
struct Journal {
    /// `(queue, consumer, start, end)`; `end` is `None` while the handler runs.
    intervals: Vec<(u32, usize, Instant, Option<Instant>)>,
    /// Who handled `(queue, offset)` to the end, in order.
    handled: BTreeMap<(u32, u64), Vec<usize>>,
    /// Per consumer and key, the `seq`s started, in order.
    per_key: HashMap<(usize, String), Vec<usize>>,
    /// When each consumer last finished a message, per queue.
    last_handled: HashMap<(usize, u32), Instant>,
}

impl Journal {
    /// Pairs of intervals of one queue by two consumers that overlap in time.
    fn overlaps(&self) -> Vec<String> {
        let now = Instant::now();
        let mut by_queue: BTreeMap<u32, Vec<(Instant, Instant, usize)>> = BTreeMap::new();
        for &(queue, consumer, start, end) in &self.intervals {
            by_queue
                .entry(queue)
                .or_default()
                .push((start, end.unwrap_or(now), consumer));
        }
        let mut found = Vec::new();
        for (queue, mut intervals) in by_queue {
            intervals.sort();
            // The latest end seen so far per consumer.
            let mut ends: HashMap<usize, Instant> = HashMap::new();
            for (start, end, consumer) in intervals {
                for (&other, &other_end) in &ends {
                    if other != consumer && other_end > start {
                        found.push(format!(
                            "queue {queue}: consumer {consumer} started while {other} ran"
                        ));
                    }
                }
                let latest = ends.entry(consumer).or_insert(end);
                *latest = (*latest).max(end);
            }
        }
        found
    }

    /// Asserts each consumer started each key's messages in increasing `seq` order.
    fn assert_key_order_per_consumer(&self) {
        for ((consumer, key), seqs) in &self.per_key {
            assert!(
                seqs.windows(2).all(|pair| pair[0] < pair[1]),
                "consumer {consumer} key {key}: {seqs:?}"
            );
        }
    }
}

/// Ends an interval when dropped (the handler finished or was cut off).
struct IntervalEnd {
    journal: Arc<Mutex<Journal>>,
    index: usize,
}

impl Drop for IntervalEnd {
    fn drop(&mut self) {
        lock(&self.journal).intervals[self.index].3 = Some(Instant::now());
    }
}

/// A handler for consumer `consumer` that journals and sleeps `sleep`.
fn journaling_handler(
    journal: Arc<Mutex<Journal>>,
    consumer: usize,
    sleep: Duration,
) -> impl Fn(&Delivery) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static
{
    move |msg: &Delivery| {
        let journal = journal.clone();
        let value = String::from_utf8(msg.value.clone()).expect("utf-8");
        let (queue, offset) = (msg.queue, msg.offset);
        Box::pin(async move {
            let mut parts = value.split(':');
            let key = parts.next().expect("key").to_string();
            let seq: usize = parts.next().expect("seq").parse().expect("seq");
            let index = {
                let mut journal = lock(&journal);
                journal
                    .intervals
                    .push((queue, consumer, Instant::now(), None));
                journal
                    .per_key
                    .entry((consumer, key))
                    .or_default()
                    .push(seq);
                journal.intervals.len() - 1
            };
            let _end = IntervalEnd {
                journal: journal.clone(),
                index,
            };
            tokio::time::sleep(sleep).await;
            let mut journal = lock(&journal);
            journal
                .handled
                .entry((queue, offset))
                .or_default()
                .push(consumer);
            journal
                .last_handled
                .insert((consumer, queue), Instant::now());
            Outcome::Handled
        })
    }
}

/// Member `name` (consumer number `consumer`) of group `audit`, through `servers`.
fn member(
    servers: &[String],
    name: &str,
    consumer: usize,
    journal: &Arc<Mutex<Journal>>,
    sleep: Duration,
    change: impl FnOnce(&mut ConsumerConfig),
) -> Running {
    let mut config = ConsumerConfig::new(servers.to_vec(), TOPIC, CONSUMER_GROUPS[0]);
    config.long_poll = Duration::from_millis(500);
    config.commit_interval = Duration::from_millis(100);
    config.max_in_flight = 8;
    config.pull_messages_max = 32;
    let mut membership = Membership::new(name);
    membership.session_timeout = SESSION;
    membership.heartbeat_interval = INTERVAL;
    config.membership = Some(membership);
    change(&mut config);
    let consumer_handle = Consumer::new(config).expect("valid consumer config");
    Running::spawn(
        consumer_handle,
        journaling_handler(journal.clone(), consumer, sleep),
    )
}

/// Produces `key-i:seq` messages over 16 keys, `per_tick` every 50 ms, until `stop`; returns
/// how many were acknowledged.
fn spawn_producer(
    servers: Vec<String>,
    per_tick: usize,
    stop: Arc<AtomicBool>,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut config = ProducerConfig::new(servers);
        config.deadline = Duration::from_secs(30);
        // A node stopped under load answers writes in flight INDETERMINATE; their retries
        // must not store a message twice, or "every message handled, nothing phantom"
        // would count the producer's at-least-once against the consumers.
        config.message_ids = true;
        let producer = Producer::new(config).expect("producer");
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<(String, String)> = (sent..sent + per_tick)
                .map(|i| {
                    let key = format!("key-{}", i % 16);
                    let value = format!("{key}:{}", i / 16);
                    (key, value)
                })
                .collect();
            for outcome in producer.send_batch(TOPIC, batch).await {
                outcome.expect("stored");
            }
            sent += per_tick;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    })
}

/// The coordinator's view of `group`: member → reported queues (`describe_only`).
async fn describe(store: &Store, group: &str) -> BTreeMap<String, Vec<u32>> {
    let request = api::HeartbeatRequest {
        topic: TOPIC.to_string(),
        consumer_group: group.to_string(),
        describe_only: true,
        ..Default::default()
    };
    let response = heartbeat_at_coordinator(store, request).await;
    api::check(response.error.as_ref()).expect("answered");
    response
        .member_queues
        .into_iter()
        .map(|member| (member.member_id, member.queues))
        .collect()
}

/// `request` answered by the coordinator (`NOT_MASTER` followed), within the settle time.
async fn heartbeat_at_coordinator(
    store: &Store,
    request: api::HeartbeatRequest,
) -> api::HeartbeatResponse {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let nodes = store.running();
    let mut target = nodes[0].clone();
    for turn in 1.. {
        assert!(Instant::now() < deadline, "no coordinator answered");
        if let Some(response) = heartbeat(&target, request.clone()).await {
            match api::check(response.error.as_ref()) {
                Ok(()) => return response,
                Err(failure) => match (failure.code, failure.master_addr) {
                    (Some(ErrorCode::NotMaster), Some(master)) => {
                        target = master;
                        continue;
                    }
                    (Some(code), _) if !code.is_retryable() => return response,
                    _ => {}
                },
            }
        }
        target = nodes[turn % nodes.len()].clone();
        tokio::time::sleep(POLL).await;
    }
    unreachable!("the loop returns or panics")
}

async fn heartbeat(addr: &str, request: api::HeartbeatRequest) -> Option<api::HeartbeatResponse> {
    let connect = PhxqClient::connect(format!("http://{addr}"));
    let mut client = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    let call = client.heartbeat(request);
    let response = tokio::time::timeout(Duration::from_secs(5), call).await;
    Some(response.ok()?.ok()?.into_inner())
}

/// Waits (bounded by `limit`) until the coordinator's view satisfies `done`; returns how
/// long it took.
async fn wait_view(
    store: &Store,
    limit: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let view = describe(store, CONSUMER_GROUPS[0]).await;
        if done(&view) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}: {view:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `view` gives every queue to exactly one of `members`, all of them owning some.
fn split_among(view: &BTreeMap<String, Vec<u32>>, members: &[&str]) -> bool {
    let names: BTreeSet<&str> = view.keys().map(String::as_str).collect();
    let mut owners = vec![0; QUEUES as usize];
    for queues in view.values() {
        for &queue in queues {
            owners[queue as usize] += 1;
        }
    }
    names == members.iter().copied().collect()
        && owners.iter().all(|&count| count == 1)
        && view.values().all(|queues| !queues.is_empty())
}

/// Waits until every message up to the producer's count was handled by someone.
async fn wait_all_handled(journal: &Arc<Mutex<Journal>>, sent: usize) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let distinct = lock(journal).handled.len();
        if distinct >= sent {
            assert_eq!(distinct, sent, "nothing phantom");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{distinct} of {sent} messages handled"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[test]
fn two_members_split_the_queues_and_never_handle_one_queue_at_once() {
    run(async {
        let store = Store::start(3, false).await;
        let servers = store.client_addrs.clone();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let producing = Arc::new(AtomicBool::new(false));
        let producer = spawn_producer(servers.clone(), 4, producing.clone());
        // Handlers slow enough that a drain outlasts a heartbeat interval.
        let sleep = Duration::from_millis(100);
        let a = member(&servers, "a", 0, &journal, sleep, |_| {});
        // A fresh coordinator grants nothing unreported for one session timeout.
        wait_view(&store, SESSION * 4, "a owns everything", |view| {
            split_among(view, &["a"])
        })
        .await;
        // b joins under load: a hands b's share over queue by queue.
        let b = member(&servers, "b", 1, &journal, sleep, |_| {});
        let took = wait_view(&store, SESSION * 4, "a and b split the queues", |view| {
            split_among(view, &["a", "b"])
        })
        .await;
        assert!(took < SESSION, "the handoff took {took:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        producing.store(true, Ordering::Relaxed);
        let sent = producer.await.expect("producer");
        wait_all_handled(&journal, sent).await;
        let reports = [a.drain().await, b.drain().await];
        let journal = std::mem::take(&mut *lock(&journal));
        assert!(journal.overlaps().is_empty(), "{:?}", journal.overlaps());
        journal.assert_key_order_per_consumer();
        // Both handled something, and b's queues were a's first.
        let by = |consumer: usize| {
            journal
                .intervals
                .iter()
                .filter(|interval| interval.1 == consumer)
                .count()
        };
        assert!(by(0) > 0 && by(1) > 0, "{} and {}", by(0), by(1));
        assert_eq!(
            reports[0].queues.len(),
            QUEUES as usize,
            "a had every queue once"
        );
        store.stop().await;
    });
}

#[test]
fn a_member_killed_mid_batch_has_its_queues_taken_over_and_its_unacknowledged_messages_redelivered()
{
    run(async {
        let store = Store::start(3, false).await;
        let servers = store.client_addrs.clone();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let producing = Arc::new(AtomicBool::new(false));
        let producer = spawn_producer(servers.clone(), 16, producing.clone());
        // Slow handlers and rare commits: a dies with handled but uncommitted messages.
        let slow = |config: &mut ConsumerConfig| {
            config.commit_interval = Duration::from_secs(2);
        };
        let sleep = Duration::from_millis(20);
        let a = member(&servers, "a", 0, &journal, sleep, slow);
        let b = member(&servers, "b", 1, &journal, sleep, slow);
        wait_view(&store, SESSION * 4, "a and b split the queues", |view| {
            split_among(view, &["a", "b"])
        })
        .await;
        let view = describe(&store, CONSUMER_GROUPS[0]).await;
        let a_queues = view["a"].clone();
        // Let a handle a while (more than one commit interval), then kill it mid-batch.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        a.kill().await;
        let killed = Instant::now();
        // b takes a's queues within the session timeout plus a few heartbeats.
        let bound = SESSION + INTERVAL * 4 + Duration::from_secs(1);
        let took = wait_view(&store, SESSION * 4, "b owns everything", |view| {
            split_among(view, &["b"])
        })
        .await;
        assert!(killed.elapsed() <= bound, "takeover after {took:?}");
        assert!(
            took >= SESSION - INTERVAL * 2,
            "not before a's session ended: {took:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        producing.store(true, Ordering::Relaxed);
        let sent = producer.await.expect("producer");
        wait_all_handled(&journal, sent).await;
        b.drain().await;
        let journal = std::mem::take(&mut *lock(&journal));
        assert!(journal.overlaps().is_empty(), "{:?}", journal.overlaps());
        journal.assert_key_order_per_consumer();
        // a's handled-but-uncommitted messages came back to b.
        let redelivered = journal
            .handled
            .iter()
            .filter(|((queue, _), consumers)| {
                a_queues.contains(queue) && consumers.ends_with(&[0, 1])
            })
            .count();
        assert!(
            redelivered > 0,
            "something handled by a was handled again by b"
        );
        store.stop().await;
    });
}

#[test]
fn a_member_that_leaves_hands_its_queues_over_well_under_the_session_timeout() {
    run(async {
        let store = Store::start(3, false).await;
        let servers = store.client_addrs.clone();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let producing = Arc::new(AtomicBool::new(false));
        let producer = spawn_producer(servers.clone(), 16, producing.clone());
        let long_session = |config: &mut ConsumerConfig| {
            let membership = config.membership.as_mut().expect("membership");
            membership.session_timeout = Duration::from_secs(10);
        };
        let sleep = Duration::from_millis(3);
        let a = member(&servers, "a", 0, &journal, sleep, long_session);
        let b = member(&servers, "b", 1, &journal, sleep, long_session);
        wait_view(&store, Duration::from_secs(40), "a and b split", |view| {
            split_among(view, &["a", "b"])
        })
        .await;
        let leaving = Instant::now();
        a.drain().await;
        let took = wait_view(
            &store,
            Duration::from_secs(40),
            "b owns everything",
            |view| split_among(view, &["b"]),
        )
        .await;
        let total = leaving.elapsed();
        assert!(
            total < Duration::from_secs(3),
            "handed over in {total:?} (after the drain: {took:?})"
        );
        producing.store(true, Ordering::Relaxed);
        let sent = producer.await.expect("producer");
        wait_all_handled(&journal, sent).await;
        b.drain().await;
        let journal = std::mem::take(&mut *lock(&journal));
        assert!(journal.overlaps().is_empty(), "{:?}", journal.overlaps());
        journal.assert_key_order_per_consumer();
        // A graceful handoff commits up to the lowest offset not handled: the only messages
        // handled twice are those handled past such a gap in the last batch of a queue
        // (handlers of other keys stop at the drain): part of one batch per handoff, and a
        // queue changes hands at most twice here (a join racing the warm-up, the leave).
        let mut twice: BTreeMap<u32, usize> = BTreeMap::new();
        for ((queue, _), consumers) in &journal.handled {
            assert!(consumers.len() <= 3, "queue {queue}: {consumers:?}");
            if consumers.len() > 1 {
                *twice.entry(*queue).or_default() += 1;
            }
        }
        assert!(
            twice.values().all(|&count| count < 2 * 32),
            "at most part of one batch per handoff: {twice:?}"
        );
        store.stop().await;
    });
}

#[test]
fn a_coordinator_failover_never_gives_one_queue_two_owners() {
    run(async {
        let mut store = Store::start(3, true).await;
        let servers = store.client_addrs.clone();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let producing = Arc::new(AtomicBool::new(false));
        let producer = spawn_producer(servers.clone(), 8, producing.clone());
        let sleep = Duration::from_millis(20);
        let a = member(&servers, "a", 0, &journal, sleep, |_| {});
        let b = member(&servers, "b", 1, &journal, sleep, |_| {});
        wait_view(&store, SESSION * 4, "a and b split", |view| {
            split_among(view, &["a", "b"])
        })
        .await;
        // Stop the coordinator (group 0's master): another node takes over with no state.
        let masters = store.wait_masters(true).await;
        let coordinator = masters[0] as usize;
        store.stop_node(coordinator).await;
        // The members report their queues to the new coordinator and keep them; the split
        // is restored without a queue changing hands twice at once.
        wait_view(&store, SESSION * 6, "a and b split again", |view| {
            split_among(view, &["a", "b"])
        })
        .await;
        tokio::time::sleep(SESSION + Duration::from_secs(1)).await;
        store.start_node(coordinator).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        producing.store(true, Ordering::Relaxed);
        let sent = producer.await.expect("producer");
        wait_all_handled(&journal, sent).await;
        a.drain().await;
        b.drain().await;
        let journal = std::mem::take(&mut *lock(&journal));
        assert!(journal.overlaps().is_empty(), "{:?}", journal.overlaps());
        journal.assert_key_order_per_consumer();
        store.stop().await;
    });
}

#[test]
fn bad_heartbeats_and_memberships_are_refused_with_typed_errors() {
    run(async {
        let store = Store::start(3, false).await;
        let good = api::HeartbeatRequest {
            topic: TOPIC.to_string(),
            consumer_group: CONSUMER_GROUPS[0].to_string(),
            member_id: "m".to_string(),
            session_timeout_ms: 6_000,
            owned_queues: Vec::new(),
            sequence: 1,
            store_id: 0,
            leaving: true,
            describe_only: false,
        };
        let code = |response: api::HeartbeatResponse| {
            api::check(response.error.as_ref())
                .err()
                .and_then(|failure| failure.code)
        };
        let mut bad = good.clone();
        bad.member_id.clear();
        let answer = heartbeat_at_coordinator(&store, bad).await;
        assert_eq!(code(answer), Some(ErrorCode::InvalidName));
        for timeout in [0, 999, 60_001, u32::MAX] {
            let mut bad = good.clone();
            bad.session_timeout_ms = timeout;
            let answer = heartbeat_at_coordinator(&store, bad).await;
            assert_eq!(code(answer), Some(ErrorCode::InvalidArgument), "{timeout}");
        }
        let mut bad = good.clone();
        bad.owned_queues = vec![QUEUES];
        let answer = heartbeat_at_coordinator(&store, bad).await;
        assert_eq!(code(answer), Some(ErrorCode::InvalidArgument));
        let mut bad = good.clone();
        bad.topic = "nope".into();
        let answer = heartbeat_at_coordinator(&store, bad).await;
        assert_eq!(code(answer), Some(ErrorCode::UnknownTopic));
        let mut bad = good.clone();
        bad.consumer_group = "nope".into();
        let answer = heartbeat_at_coordinator(&store, bad).await;
        assert_eq!(code(answer), Some(ErrorCode::UnknownConsumerGroup));
        // A node that is not group 0's master names it.
        let masters = store.wait_masters(false).await;
        let other = (1..=3).find(|&id| id != masters[0]).expect("a follower");
        let answer = heartbeat(&store.client_addrs[other as usize - 1], good.clone())
            .await
            .expect("answer");
        let failure = api::check(answer.error.as_ref()).expect_err("refused");
        assert_eq!(failure.code, Some(ErrorCode::NotMaster));
        assert_eq!(
            failure.master_addr.as_deref(),
            Some(store.client_addrs[masters[0] as usize - 1].as_str())
        );
        // The consumer: bad settings before it runs, an unknown group when it joins.
        let mut config = ConsumerConfig::new(store.client_addrs.clone(), TOPIC, "audit");
        config.membership = Some(Membership::new(""));
        assert_eq!(
            Consumer::new(config.clone()).err().map(|e| e.field),
            Some("membership.member_id".to_string())
        );
        let mut membership = Membership::new("m");
        membership.session_timeout = Duration::from_secs(3_600);
        config.membership = Some(membership);
        assert_eq!(
            Consumer::new(config.clone()).err().map(|e| e.field),
            Some("membership.session_timeout".to_string())
        );
        config.membership = Some(Membership::new("m"));
        config.members = vec!["m".into()];
        config.member = "m".into();
        assert_eq!(
            Consumer::new(config.clone()).err().map(|e| e.field),
            Some("members".to_string())
        );
        config.members.clear();
        config.consumer_group = "nope".into();
        let consumer = Consumer::new(config).expect("valid");
        let outcome = tokio::time::timeout(
            SETTLE_TIMEOUT,
            consumer.run(
                |_: &Delivery| async { Outcome::Handled },
                std::future::pending(),
            ),
        )
        .await
        .expect("stops on its own");
        match outcome {
            Err(ConsumerError::Store { queue: None, error }) => {
                assert_eq!(
                    error.code(),
                    Some(ErrorCode::UnknownConsumerGroup),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        store.stop().await;
    });
}
