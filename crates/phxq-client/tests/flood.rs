//! A client flood must not cost a master its lease (issue 12, item 5).
//!
//! A real 3-node store of the harness; honest producers (`Producer::send`, one message at a
//! time) run alone for [`CALM`], then for [`FLOOD`] while another client floods every node:
//! thousands of parked long polls, max-size consumes in a loop, and `ProduceStream`s pushing
//! as fast as the nodes take them. Asserted: no group changes master or term on any node,
//! no node dropped a peer frame (`peer_frames_dropped` in `ClusterStatus`), every node still
//! answers, every honest produce succeeds within its deadline (BUSY only within its budget),
//! and the flood really happened (polls parked and met BUSY, so the client queues were full;
//! consumes read; stream produces answered). Produce p99 with and without the flood is
//! printed (BENCHMARKS.md).
//!
//! Why peer frames dropped and not only masters and terms: raft retransmits, so a few
//! heartbeats lost to a full shared queue rarely cost a lease within the test's seconds; with
//! peer frames planted back on the client queue, the frames dropped fail the test every time
//! (3 runs of 3); the test's first version, which asserted masters and terms alone, passed
//! with that plant.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use phxq_client::{ErrorCode, Producer, ProducerConfig};
use phxq_proto::api::{self, phxq_client::PhxqClient};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

mod common;

use common::{CONSUMER_GROUPS, GROUPS, QUEUES, Store, TOPIC, cluster_status, run};

/// How long the honest producers run alone, then under the flood.
const CALM: Duration = Duration::from_secs(3);
const FLOOD: Duration = Duration::from_secs(5);
/// Honest producers, each sending one message at a time.
const PRODUCERS: usize = 8;
/// Client requests each node queues at most (`limits.inputs_queued_max`): small, so the
/// flood fills the queue for sure on any machine (asserted: the flood met `BUSY`), and peer
/// frames sharing it would be dropped.
const INPUTS_QUEUED_MAX: usize = 64;
/// Long polls kept parked per node (parked polls never make a produce BUSY).
const PARKED_PER_NODE: usize = 1_000;
/// HTTP/2 connections per node for the parked polls (a connection carries 1,024 calls).
const POLL_CONNECTIONS: usize = 2;
/// Tasks consuming a full queue with the largest `max_bytes`, one call after the other.
const BIG_CONSUMERS: usize = 4;
/// Messages stored before the flood in the queue the big consumes read, and their size.
const BIG_QUEUE_MESSAGES: usize = 2_000;
const BIG_MESSAGE_BYTES: usize = 4_000;
/// `ProduceStream`s per node, requests per stream at most, messages per request and bytes.
const STREAMS_PER_NODE: usize = 2;
const STREAM_REQUESTS_MAX: u64 = 5_000;
const STREAM_MESSAGES: usize = 1;
const STREAM_MESSAGE_BYTES: usize = 100;
/// The honest producers' deadline: a produce that is BUSY longer fails the test.
const PRODUCE_DEADLINE: Duration = Duration::from_secs(10);

/// What the flood did, counted by its tasks.
#[derive(Default)]
struct Flooded {
    parked_now: AtomicU64,
    /// Long polls answered `BUSY`: the client queue was full.
    poll_busy: AtomicU64,
    big_consumes: AtomicU64,
    big_bytes: AtomicU64,
    stream_answers: AtomicU64,
    stream_busy: AtomicU64,
}

/// How long a node may take to answer `ClusterStatus` (retried: right after the flood its
/// input queue may still be full, and a full queue answers `BUSY`).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// What one node says of itself: per group (master, term), and the peer frames it dropped.
#[derive(Debug, PartialEq)]
struct NodeView {
    masters_and_terms: Vec<(u64, u64)>,
    peer_frames_dropped: u64,
}

/// Every node's view.
async fn views(store: &Store) -> Vec<NodeView> {
    let mut views = Vec::new();
    for addr in &store.client_addrs {
        let deadline = Instant::now() + STATUS_TIMEOUT;
        let status = loop {
            if let Some(status) = cluster_status(addr).await {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "node {addr} does not answer ClusterStatus"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        views.push(NodeView {
            masters_and_terms: status.groups.iter().map(|g| (g.master, g.term)).collect(),
            peer_frames_dropped: status.counters.expect("counters").peer_frames_dropped,
        });
    }
    views
}

/// The node (index into the client addresses) mastering `queue` in a placed store.
fn master_of(store: &Store, queue: u32) -> usize {
    (store.preferred(queue % GROUPS) - 1) as usize
}

async fn connect(addr: &str) -> PhxqClient<Channel> {
    PhxqClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(usize::MAX)
}

fn consume_request(queue: u32, from: u64, max_bytes: u32, wait_ms: u32) -> api::ConsumeRequest {
    api::ConsumeRequest {
        topic: TOPIC.to_string(),
        queue,
        consumer_group: CONSUMER_GROUPS[0].to_string(),
        from_offset: Some(from),
        max_messages: 10_000,
        max_bytes,
        wait_ms,
        ..Default::default()
    }
}

/// Keeps one long poll parked at its queue's master until `until`: past the end of the
/// queue, waiting a minute; parked again whenever it is answered (`BUSY` while the input
/// queue is full).
async fn park(mut client: PhxqClient<Channel>, queue: u32, until: Instant, flooded: Arc<Flooded>) {
    while Instant::now() < until {
        let request = consume_request(queue, u64::MAX / 2, 1 << 20, 60_000);
        flooded.parked_now.fetch_add(1, Ordering::Relaxed);
        let call = tokio::time::timeout_at(until.into(), client.consume(request)).await;
        flooded.parked_now.fetch_sub(1, Ordering::Relaxed);
        let Ok(answer) = call else {
            return; // Still parked when the flood ended.
        };
        let error = answer.ok().and_then(|a| a.into_inner().error);
        if error
            .and_then(|e| e.failure())
            .is_some_and(|f| f.code == Some(ErrorCode::Busy))
        {
            flooded.poll_busy.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the big queue from its start with the largest `max_bytes`, again and again.
async fn consume_big(mut client: PhxqClient<Channel>, until: Instant, flooded: Arc<Flooded>) {
    while Instant::now() < until {
        let request = consume_request(0, 1, 64 << 20, 0);
        if let Ok(response) = client.consume(request).await {
            let response = response.into_inner();
            let bytes: usize = response.messages.iter().map(|m| m.value.len()).sum();
            flooded.big_consumes.fetch_add(1, Ordering::Relaxed);
            flooded.big_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Pushes produces to `queue` over one `ProduceStream` as fast as the node takes them.
async fn stream(
    mut client: PhxqClient<Channel>,
    queue: u32,
    until: Instant,
    flooded: Arc<Flooded>,
) {
    let value = vec![b's'; STREAM_MESSAGE_BYTES];
    let requests = tokio_stream::iter(0..STREAM_REQUESTS_MAX).map(move |id| {
        let messages = (0..STREAM_MESSAGES)
            .map(|_| api::Message {
                key: Vec::new(),
                value: value.clone(),
            })
            .collect();
        api::ProduceStreamRequest {
            id,
            request: Some(api::ProduceRequest {
                topic: TOPIC.to_string(),
                queue,
                messages,
                ..Default::default()
            }),
        }
    });
    let Ok(answers) = client.produce_stream(requests).await else {
        return;
    };
    let mut answers = answers.into_inner();
    while let Ok(Some(Ok(answer))) = tokio::time::timeout_at(until.into(), answers.next()).await {
        flooded.stream_answers.fetch_add(1, Ordering::Relaxed);
        let failure = answer.response.and_then(|r| r.error?.failure());
        if failure.is_some_and(|f| f.code == Some(ErrorCode::Busy)) {
            flooded.stream_busy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the flood against every node until `until`.
async fn flood(store: &Store, until: Instant, flooded: &Arc<Flooded>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for (node, addr) in store.client_addrs.iter().enumerate() {
        let queues: Vec<u32> = (0..QUEUES)
            .filter(|&q| master_of(store, q) == node)
            .collect();
        for connection in 0..POLL_CONNECTIONS {
            let client = connect(addr).await;
            for i in 0..PARKED_PER_NODE / POLL_CONNECTIONS {
                let queue = queues[(connection + i) % queues.len()];
                tasks.spawn(park(client.clone(), queue, until, flooded.clone()));
            }
        }
        for i in 0..STREAMS_PER_NODE {
            let client = connect(addr).await;
            let queue = queues[i % queues.len()];
            tasks.spawn(stream(client, queue, until, flooded.clone()));
        }
    }
    let big_master = &store.client_addrs[master_of(store, 0)];
    for _ in 0..BIG_CONSUMERS {
        let client = connect(big_master).await;
        tasks.spawn(consume_big(client, until, flooded.clone()));
    }
    tasks
}

/// Fills queue 0 for the big consumes.
async fn fill_big_queue(store: &Store) {
    let mut client = connect(&store.client_addrs[master_of(store, 0)]).await;
    for _ in 0..BIG_QUEUE_MESSAGES / 100 {
        let messages = (0..100)
            .map(|_| api::Message {
                key: Vec::new(),
                value: vec![b'b'; BIG_MESSAGE_BYTES],
            })
            .collect();
        let request = api::ProduceRequest {
            topic: TOPIC.to_string(),
            queue: 0,
            messages,
            ..Default::default()
        };
        let answer = client.produce(request).await.expect("produce").into_inner();
        api::check(answer.error.as_ref()).expect("stored");
    }
}

/// One honest producer until `until`: one message at a time, each latency recorded.
async fn produce_until(producer: Arc<Producer>, me: usize, until: Instant) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        let key = format!("p{me}-{}", i % 64);
        let started = Instant::now();
        producer
            .send(TOPIC, key.as_bytes(), format!("m{i}"))
            .await
            .unwrap_or_else(|error| panic!("producer {me}, message {i}: {error}"));
        latencies.push(started.elapsed());
        i += 1;
    }
    latencies
}

/// Runs the honest producers until `until`; every latency, sorted.
async fn honest(producer: &Arc<Producer>, until: Instant) -> Vec<Duration> {
    let mut tasks = JoinSet::new();
    for me in 0..PRODUCERS {
        tasks.spawn(produce_until(producer.clone(), me, until));
    }
    let mut all = Vec::new();
    while let Some(latencies) = tasks.join_next().await {
        all.extend(latencies.expect("a producer panicked"));
    }
    all.sort_unstable();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[test]
fn a_client_flood_costs_no_master_its_lease() {
    run(async {
        let limits = format!("inputs_queued_max = {INPUTS_QUEUED_MAX}\n");
        let store = Store::start_with_limits(3, true, &limits).await;
        fill_big_queue(&store).await;
        let mut config = ProducerConfig::new(store.client_addrs.clone());
        config.deadline = PRODUCE_DEADLINE;
        let producer = Arc::new(Producer::new(config).expect("producer"));
        let before = views(&store).await;

        let calm = honest(&producer, Instant::now() + CALM).await;
        let flooded = Arc::new(Flooded::default());
        let until = Instant::now() + FLOOD;
        let mut flood_tasks = flood(&store, until, &flooded).await;
        // Polls parked shortly before the flood ends (at its end their calls are dropped).
        let counted = flooded.clone();
        let parked = tokio::spawn(async move {
            tokio::time::sleep_until((until - Duration::from_millis(500)).into()).await;
            counted.parked_now.load(Ordering::Relaxed)
        });
        let under_flood = honest(&producer, until).await;
        let parked_at_end = parked.await.expect("sampler");
        flood_tasks.abort_all();
        while flood_tasks.join_next().await.is_some() {}

        let after = views(&store).await;
        let (p50, p99) = (percentile(&calm, 0.5), percentile(&calm, 0.99));
        let (f50, f99) = (
            percentile(&under_flood, 0.5),
            percentile(&under_flood, 0.99),
        );
        println!(
            "flood: calm {} produces p50 {p50:?} p99 {p99:?}; under flood {} produces p50 \
             {f50:?} p99 {f99:?}; parked at end {parked_at_end}, big consumes {} ({} MB), \
             stream answers {} ({} BUSY), polls BUSY {}; peer frames dropped {:?}",
            calm.len(),
            under_flood.len(),
            flooded.big_consumes.load(Ordering::Relaxed),
            flooded.big_bytes.load(Ordering::Relaxed) >> 20,
            flooded.stream_answers.load(Ordering::Relaxed),
            flooded.stream_busy.load(Ordering::Relaxed),
            flooded.poll_busy.load(Ordering::Relaxed),
            after
                .iter()
                .map(|v| v.peer_frames_dropped)
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            before, after,
            "per node, per group (master, term) and peer frames dropped: a master changed, a \
             term moved or a peer frame was dropped for want of room"
        );
        assert!(
            parked_at_end >= (3 * PARKED_PER_NODE as u64) * 9 / 10,
            "only {parked_at_end} long polls parked: the flood did not happen"
        );
        assert!(flooded.big_consumes.load(Ordering::Relaxed) >= BIG_CONSUMERS as u64);
        let busy = flooded.poll_busy.load(Ordering::Relaxed);
        assert!(
            busy > 0,
            "no poll met BUSY: the client queues were never full"
        );
        assert!(flooded.stream_answers.load(Ordering::Relaxed) >= 1_000);
        assert!(
            !under_flood.is_empty(),
            "the honest producers stored nothing"
        );
        store.stop().await;
    });
}
