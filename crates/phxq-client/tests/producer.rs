//! The producer against real stores: every node a full server (event loop, write-ahead log,
//! peer TCP, gRPC) running in this test process on 127.0.0.1, on ports picked by the kernel.
//!
//! Tests run one at a time (each starts its own store; several at once on a small machine
//! would make elections, not the producer, the subject). Every wait is bounded and polls
//! `ClusterStatus`; measurements start only once the store's masters are settled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use phxq_client::{ErrorCode, ErrorKind, Producer, ProducerConfig, Receipt, queue_of_key};
use phxq_node::config::ServerConfig;
use phxq_node::server::RunningServer;
use phxq_proto::api::{self, phxq_client::PhxqClient};

/// Replication groups of the test stores.
const GROUPS: u32 = 4;
/// Queues of topic `orders`.
const QUEUES: u32 = 8;
/// The stores' `message_bytes_max`: small, so an oversized message is cheap.
const MESSAGE_BYTES_MAX: usize = 4096;
/// The consumer group reading `orders`.
const CONSUMER_GROUP: &str = "audit";
/// How long a store may take to elect and place its masters (generous: a loaded 2-core
/// machine fsyncing for three nodes).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The producers' deadline in the store tests.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` alone, on a runtime of its own.
fn run(test: impl Future<Output = ()>) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// Ports free right now (the listeners are closed before the ports are used).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr").port())
        .collect()
}

/// A store of `n` nodes; node `id` is `servers[id - 1]`.
struct Store {
    dir: tempfile::TempDir,
    client_addrs: Vec<String>,
    peer_addrs: Vec<String>,
    servers: Vec<Option<RunningServer>>,
}

impl Store {
    /// A store of `nodes` nodes, none started yet.
    fn new(nodes: usize) -> Store {
        let ports = free_ports(2 * nodes);
        let addr = |port: &u16| format!("127.0.0.1:{port}");
        Store {
            dir: tempfile::tempdir().expect("tempdir"),
            client_addrs: ports[..nodes].iter().map(addr).collect(),
            peer_addrs: ports[nodes..].iter().map(addr).collect(),
            servers: (0..nodes).map(|_| None).collect(),
        }
    }

    /// Starts every node and waits until each group's master is its preferred node.
    async fn start(nodes: usize) -> Store {
        let mut store = Store::new(nodes);
        for id in 1..=nodes {
            store.start_node(id).await;
        }
        store.wait_masters(true).await;
        store
    }

    fn config(&self, id: usize) -> ServerConfig {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let mut text = format!(
            "[node]\nid = {id}\ndata_dir = {:?}\n\n[store]\nid = 1\ngroups = {GROUPS}\n\
             message_bytes_max = {MESSAGE_BYTES_MAX}\n\n",
            data_dir.display().to_string()
        );
        for (i, (client, peer)) in self.client_addrs.iter().zip(&self.peer_addrs).enumerate() {
            text += &format!(
                "[[store.nodes]]\nid = {}\nclient_addr = \"{client}\"\npeer_addr = \"{peer}\"\n\n",
                i + 1
            );
        }
        text += &format!(
            "[[store.topics]]\nname = \"orders\"\nqueues = {QUEUES}\n\
             consumer_groups = [\"{CONSUMER_GROUP}\"]\n"
        );
        ServerConfig::parse(&text).expect("valid config")
    }

    async fn start_node(&mut self, id: usize) {
        let server = RunningServer::start(self.config(id))
            .await
            .unwrap_or_else(|error| panic!("node {id} did not start: {error}"));
        self.servers[id - 1] = Some(server);
    }

    /// Stops node `id` gracefully; its groups must elect new masters.
    async fn stop_node(&mut self, id: usize) {
        let server = self.servers[id - 1].take().expect("node running");
        server.run_until(async {}).await.expect("clean stop");
    }

    async fn stop(mut self) {
        for id in 1..=self.servers.len() {
            if self.servers[id - 1].is_some() {
                self.stop_node(id).await;
            }
        }
    }

    /// Client addresses of the running nodes.
    fn running(&self) -> Vec<String> {
        self.servers
            .iter()
            .zip(&self.client_addrs)
            .filter(|(server, _)| server.is_some())
            .map(|(_, addr)| addr.clone())
            .collect()
    }

    /// The node a group settles on when every node runs (`members[g mod n]`).
    fn preferred(&self, group: u32) -> u64 {
        u64::from(group) % self.servers.len() as u64 + 1
    }

    /// Waits until every running node names the same master for every group (the
    /// preferred node, if `placed`), and returns that master per group.
    async fn wait_masters(&self, placed: bool) -> Vec<u64> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let mut views = Vec::new();
            for addr in self.running() {
                views.push(cluster_status(&addr).await);
            }
            let masters: Option<Vec<u64>> = (0..GROUPS)
                .map(|group| {
                    let named: Vec<u64> = views
                        .iter()
                        .map(|view| view.as_ref()?.groups.get(group as usize).map(|g| g.master))
                        .collect::<Option<_>>()?;
                    let master = *named.first()?;
                    let agreed = master != 0 && named.iter().all(|&m| m == master);
                    let in_place = !placed || master == self.preferred(group);
                    (agreed && in_place).then_some(master)
                })
                .collect();
            if let Some(masters) = masters {
                return masters;
            }
            assert!(
                Instant::now() < deadline,
                "masters not settled within {SETTLE_TIMEOUT:?}: {views:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A producer for this store (every node a seed), changed by `change`.
    fn producer(&self, change: impl FnOnce(&mut ProducerConfig)) -> Producer {
        let mut config = ProducerConfig::new(self.client_addrs.clone());
        config.deadline = DEADLINE;
        change(&mut config);
        Producer::new(config).expect("valid producer config")
    }

    /// Every message of `orders` queue `queue`, read from offset 1 at the group's master.
    async fn read_queue(&self, queue: u32) -> Vec<api::StoredMessage> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let nodes = self.running();
        let mut target = nodes[0].clone();
        for turn in 1.. {
            assert!(Instant::now() < deadline, "queue {queue} unreadable");
            let request = api::ConsumeRequest {
                topic: "orders".to_string(),
                queue,
                consumer_group: CONSUMER_GROUP.to_string(),
                from_offset: Some(1),
                max_messages: 10_000,
                max_bytes: 16 << 20,
                wait_ms: 0,
                store_id: 0,
            };
            if let Some(response) = consume(&target, request).await {
                match api::check(response.error.as_ref()) {
                    Ok(()) => {
                        assert_eq!(response.next_offset, response.end_offset, "read it all");
                        return response.messages;
                    }
                    Err(failure) => {
                        if let Some(master) = failure.master_addr {
                            target = master;
                            continue;
                        }
                    }
                }
            }
            target = nodes[turn % nodes.len()].clone();
            tokio::time::sleep(POLL).await;
        }
        unreachable!("the loop returns or panics")
    }
}

async fn client(addr: &str) -> Option<PhxqClient<tonic::transport::Channel>> {
    let connect = PhxqClient::connect(format!("http://{addr}"));
    tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()
}

async fn cluster_status(addr: &str) -> Option<api::ClusterStatusResponse> {
    let mut client = client(addr).await?;
    let call = client.cluster_status(api::ClusterStatusRequest {});
    let status = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()?
        .into_inner();
    api::check(status.error.as_ref()).ok()?;
    Some(status)
}

async fn consume(addr: &str, request: api::ConsumeRequest) -> Option<api::ConsumeResponse> {
    let mut client = client(addr).await?;
    let call = client.consume(request);
    Some(
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()?
            .ok()?
            .into_inner(),
    )
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
        let store = Store::start(3).await;
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
        let store = Store::start(3).await;
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
        let store = Store::start(1).await;
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
        let mut store = Store::start(3).await;
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
