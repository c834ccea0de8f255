//! The snapshot budget on a real three-node store (issue 12, item 2): legal settings once
//! grew a group's snapshot past the log's 32 MiB limit and stopped every replica, again after
//! every restart. Here each structure that grows with legal settings is driven to the budget
//! through the gRPC API:
//! - cursors: a topic of 4,096 queues × 256 consumer groups (long names) is refused when
//!   created, by every group;
//! - dedup windows: distinct 64-byte message ids into two queues of one group, window
//!   100,000, until a produce is refused;
//! - in-flight deliveries: `Receive` with a max in flight of 100,000 on two queues of that
//!   group, nothing acked, until a receive is refused.
//!
//! Each refusal is `STATE_BUDGET_EXCEEDED` naming the budget; meanwhile every node keeps
//! serving and compacting (its compaction counter grows past the fill), a restarted node
//! comes back from its snapshot and refuses the same way, and what does not grow state
//! (produces without ids, duplicates) still goes through.

mod common;

use std::time::{Duration, Instant};

use common::{GROUPS, POLL, SETTLE_TIMEOUT, Store, cluster_status, run};
use phxq_proto::api::{self, phxq_client::PhxqClient};
use phxq_types::ErrorCode;

/// Queues 0 and 4 of a 5-queue topic both live in group 0 (of [`GROUPS`] = 4).
const QUEUES: u32 = 5;
const GROUP_0_QUEUES: [u32; 2] = [0, 4];
/// Appends per `ProduceMany` while filling the dedup windows.
const APPENDS_PER_REQUEST: u64 = 1000;
/// Bounds of the fills (the budget is reached well within them).
const FILL_REQUESTS_MAX: u64 = 400;
const FILL_TIME_MAX: Duration = Duration::from_secs(240);

type Client = PhxqClient<tonic::transport::Channel>;

async fn connect(addr: &str) -> Client {
    PhxqClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// The client address of `group`'s master, as every running node agrees.
async fn master_of(store: &Store, group: u32) -> String {
    let masters = store.wait_masters(false).await;
    store.client_addrs[masters[group as usize] as usize - 1].clone()
}

fn topic(
    name: &str,
    queues: u32,
    consumer_groups: Vec<String>,
    dedup_window: u32,
) -> api::TopicConfig {
    api::TopicConfig {
        name: name.to_string(),
        queues,
        consumer_groups,
        replay_count: 0,
        replay_age_ms: 0,
        max_age_ms: None,
        max_bytes: None,
        dedup_window,
        group_settings: Vec::new(),
    }
}

/// Creates `config` in every group (its master, retrying what may pass); the outcome per
/// group: `Ok` or the refusal.
async fn create_everywhere(
    store: &Store,
    config: &api::TopicConfig,
) -> Vec<Result<(), api::Failure>> {
    let mut outcomes = Vec::new();
    for group in 0..GROUPS {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let outcome = loop {
            assert!(Instant::now() < deadline, "group {group} never answered");
            let mut client = connect(&master_of(store, group).await).await;
            let request = api::PutTopicRequest {
                group: u64::from(group),
                topic: Some(config.clone()),
                mode: api::PutMode::Create as i32,
                store_id: 0,
            };
            let Ok(answer) = client.put_topic(request).await else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            match api::check(answer.into_inner().error.as_ref()) {
                Err(failure) if failure.is_retryable() => tokio::time::sleep(POLL).await,
                outcome => break outcome,
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// A distinct 64-byte message id (the longest: the most the budget counts per id).
fn message_id(n: u64) -> Vec<u8> {
    let mut id = format!("budget-{n:020}").into_bytes();
    id.resize(64, b'.');
    id
}

fn message(value: &[u8]) -> api::Message {
    api::Message {
        key: Vec::new(),
        value: value.to_vec(),
    }
}

/// Whether an answer's error is one to retry (a master change under way).
fn retryable(error: Option<&api::Error>) -> bool {
    api::check(error).is_err_and(|failure| failure.is_retryable())
}

/// Produces `messages` to `queue` of `topic` in group 0 (with `id`, unless empty), at the
/// master, retrying while masters change.
async fn produce_all(
    store: &Store,
    topic: &str,
    queue: u32,
    id: Vec<u8>,
    messages: Vec<api::Message>,
) -> api::ProduceResponse {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut client = connect(&master_of(store, 0).await).await;
        let request = api::ProduceRequest {
            topic: topic.to_string(),
            queue,
            messages: messages.clone(),
            store_id: 0,
            message_id: id.clone(),
        };
        let answer = client.produce(request).await.expect("produce").into_inner();
        if !retryable(answer.error.as_ref()) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn produce(store: &Store, topic: &str, queue: u32, id: Vec<u8>) -> api::ProduceResponse {
    produce_all(store, topic, queue, id, vec![message(b"v")]).await
}

fn assert_budget_refusal(error: Option<&api::Error>, what: &str) {
    let failure = api::check(error).expect_err(what);
    assert_eq!(
        failure.code,
        Some(ErrorCode::StateBudgetExceeded),
        "{what}: {failure}"
    );
    assert_eq!(failure.number, 19);
    assert!(
        failure.message.contains("SNAPSHOT_BUDGET_BYTES"),
        "{what}: the budget named in {failure}"
    );
}

/// Compactions each node reports, in node order.
async fn compactions(store: &Store) -> Vec<u64> {
    let mut counts = Vec::new();
    for addr in &store.client_addrs {
        let status = cluster_status(addr).await.expect("every node serves");
        counts.push(status.counters.expect("counters").compactions);
    }
    counts
}

/// Distinct ids into group 0's two queues of "ids" until a `ProduceMany` is refused for the
/// budget; returns how many ids were stored.
async fn fill_dedup_windows(store: &Store) -> u64 {
    let started = Instant::now();
    let mut client = connect(&master_of(store, 0).await).await;
    let mut request_number = 0;
    while request_number < FILL_REQUESTS_MAX {
        assert!(started.elapsed() < FILL_TIME_MAX, "fill took too long");
        let first = request_number * APPENDS_PER_REQUEST;
        let appends = (first..first + APPENDS_PER_REQUEST)
            .map(|n| api::Append {
                topic: "ids".to_string(),
                queue: GROUP_0_QUEUES[(n % 2) as usize],
                messages: vec![message(b"v")],
                message_id: message_id(n),
            })
            .collect();
        let request = api::ProduceManyRequest {
            appends,
            store_id: 0,
        };
        let answer = client
            .produce_many(request)
            .await
            .expect("produce_many")
            .into_inner();
        if retryable(answer.error.as_ref()) {
            // The same ids again: what was stored is answered as duplicates.
            tokio::time::sleep(POLL).await;
            client = connect(&master_of(store, 0).await).await;
            continue;
        }
        request_number += 1;
        if let Err(failure) = api::check(answer.error.as_ref()) {
            assert_budget_refusal(answer.error.as_ref(), "the dedup fill");
            assert_eq!(failure.code, Some(ErrorCode::StateBudgetExceeded));
            return first;
        }
    }
    panic!("the dedup windows never reached the budget");
}

/// Receives from group 0's two queues of "jobs", acking nothing, until a receive is refused
/// for the budget; returns how many offsets were put in flight.
async fn fill_in_flight(store: &Store) -> u64 {
    let started = Instant::now();
    let mut client = connect(&master_of(store, 0).await).await;
    let mut in_flight = 0;
    for queue in GROUP_0_QUEUES {
        for _ in 0..FILL_REQUESTS_MAX {
            assert!(started.elapsed() < FILL_TIME_MAX, "fill took too long");
            let request = api::ReceiveRequest {
                topic: "jobs".to_string(),
                queue,
                consumer_group: "workers".to_string(),
                max_messages: 1000,
                max_bytes: 1 << 20,
                wait_ms: 0,
                ack_timeout_ms: 24 * 3600 * 1000,
                store_id: 0,
            };
            let answer = client.receive(request).await.expect("receive").into_inner();
            if retryable(answer.error.as_ref()) {
                tokio::time::sleep(POLL).await;
                client = connect(&master_of(store, 0).await).await;
                continue;
            }
            if api::check(answer.error.as_ref()).is_err() {
                assert_budget_refusal(answer.error.as_ref(), "the delivery fill");
                return in_flight;
            }
            if answer.messages.is_empty() {
                break; // this queue is at its max in flight: on to the next
            }
            in_flight += answer.messages.len() as u64;
        }
    }
    panic!("deliveries never reached the budget ({in_flight} in flight)");
}

/// 100,000 one-byte messages into each of group 0's queues of "jobs".
async fn fill_jobs(store: &Store) {
    for queue in GROUP_0_QUEUES {
        for _ in 0..10 {
            let messages = vec![message(b"j"); 10_000];
            let answer = produce_all(store, "jobs", queue, Vec::new(), messages).await;
            api::check(answer.error.as_ref()).expect("jobs stored");
        }
    }
}

#[test]
fn every_structure_reaches_the_snapshot_budget_and_is_refused_while_every_replica_stays_up() {
    run(async {
        let mut store = Store::new(3);
        // Compact often enough that the fills are compacted several times over.
        store.config_extra =
            "\n[timing]\ncompact_ticks = 4\n\n[limits]\ncompact_entries_min = 32\n".to_string();
        for id in 1..=3 {
            store.start_node(id).await;
        }
        store.wait_masters(false).await;

        // Cursors: 1,024 queues per group × 256 consumer groups of 40-byte names.
        let names = (0..256)
            .map(|i| format!("consumer-group-with-a-long-name-{i:07}"))
            .collect();
        let wide = topic("wide", 4096, names, 0);
        for (group, outcome) in create_everywhere(&store, &wide)
            .await
            .into_iter()
            .enumerate()
        {
            let error = outcome
                .map(|()| api::Error::default())
                .unwrap_or_else(|f| (&f).into());
            assert_budget_refusal(Some(&error), &format!("group {group}: the wide topic"));
        }
        let status = cluster_status(&store.client_addrs[0])
            .await
            .expect("status");
        assert!(
            status.topics.iter().all(|t| t.name != "wide"),
            "nothing created"
        );

        // Dedup windows.
        let ids = topic("ids", QUEUES, Vec::new(), 100_000);
        assert!(
            create_everywhere(&store, &ids)
                .await
                .iter()
                .all(Result::is_ok)
        );
        // Both topics first: once group 0's state share is full, no topic fits there either.
        let mut jobs = topic("jobs", QUEUES, vec!["workers".to_string()], 0);
        jobs.group_settings = vec![api::ConsumerGroupSettings {
            consumer_group: "workers".to_string(),
            max_in_flight: Some(100_000),
            ..Default::default()
        }];
        assert!(
            create_everywhere(&store, &jobs)
                .await
                .iter()
                .all(Result::is_ok)
        );
        let before = compactions(&store).await;
        let stored = fill_dedup_windows(&store).await;
        // 12 MiB at 95 bytes an id, less the rest of group 0's state.
        assert!((120_000..=132_451).contains(&stored), "{stored} ids stored");
        let refused = produce(&store, "ids", 0, message_id(10_000_000)).await;
        assert_budget_refusal(refused.error.as_ref(), "a new id");
        let without_id = produce(&store, "ids", 0, Vec::new()).await;
        api::check(without_id.error.as_ref()).expect("no id, no growth");
        let duplicate = produce(&store, "ids", 0, message_id(0)).await;
        api::check(duplicate.error.as_ref()).expect("a duplicate");
        assert!(duplicate.duplicate);

        // In-flight deliveries.
        fill_jobs(&store).await;
        let in_flight = fill_in_flight(&store).await;
        // 4 MiB at 25 bytes an offset in flight.
        assert!(
            (150_000..=167_772).contains(&in_flight),
            "{in_flight} in flight"
        );

        // Every node serves and compacted through the fills (each of its own log).
        let after = compactions(&store).await;
        eprintln!(
            "budget figures: {stored} ids stored, {in_flight} offsets in flight, \
             compactions per node {before:?} -> {after:?}"
        );
        for (node, (before, after)) in before.iter().zip(&after).enumerate() {
            assert!(
                after >= &(before + 2),
                "node {}: {before} -> {after} compactions",
                node + 1
            );
        }

        // A restart of group 0's master: back from its snapshot, the store refuses the same.
        let masters = store.wait_masters(false).await;
        let restarted = masters[0] as usize;
        store.stop_node(restarted).await;
        store.start_node(restarted).await;
        store.wait_masters(false).await;
        let refused = produce(&store, "ids", 4, message_id(10_000_001)).await;
        assert_budget_refusal(refused.error.as_ref(), "a new id after the restart");
        let without_id = produce(&store, "ids", 4, Vec::new()).await;
        api::check(without_id.error.as_ref()).expect("no id after the restart");
        for addr in &store.client_addrs {
            assert!(cluster_status(addr).await.is_some(), "{addr} serves");
        }
        store.stop().await;
    });
}
