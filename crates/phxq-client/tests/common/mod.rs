//! The store the client tests run against: every node a full server (event loop, write-ahead
//! log, peer TCP, gRPC) in the test process on 127.0.0.1, on ports picked by the kernel.
//! Shared by the producer, consumer, failure, membership and settings tests (with one
//! `Running` consumer task helper) and the forged-frame test (peer ports, certificates and
//! transport counters); each uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use phxq_client::{Consumer, ConsumerError, ConsumerReport, Handler, StoreCa};
use phxq_node::auth::{Claims, Role, Secret};
use phxq_node::config::ServerConfig;
use phxq_node::server::RunningServer;
use phxq_proto::api;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The store id of every test store.
pub const STORE_ID: u64 = 1;
/// Replication groups of the test stores.
pub const GROUPS: u32 = 4;
/// Queues of the topic.
pub const QUEUES: u32 = 8;
/// The topic every test store has.
pub const TOPIC: &str = "orders";
/// Consumer groups subscribed to the topic.
pub const CONSUMER_GROUPS: [&str; 2] = ["audit", "billing"];
/// A second topic, where consumers of [`TOPIC`] put their dead letters; read by the first of
/// [`CONSUMER_GROUPS`].
pub const DEAD_LETTER_TOPIC: &str = "orders-dead";
/// Queues of the dead-letter topic.
pub const DEAD_LETTER_QUEUES: u32 = 2;
/// The stores' `message_bytes_max`: small, so an oversized message is cheap.
pub const MESSAGE_BYTES_MAX: usize = 4096;
/// How long a store may take to elect and place its masters (generous: a loaded 2-core
/// machine fsyncing for three nodes), and a test to see what it waits for.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two polls of a bounded wait.
pub const POLL: Duration = Duration::from_millis(20);

/// One test at a time: several stores at once on a small machine would make elections, not
/// the client, the subject.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` alone, on a runtime of its own.
pub fn run(test: impl Future<Output = ()>) {
    let _serial = lock(&SERIAL);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// Locks `mutex`, even if a failed test poisoned it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ports free right now (the listeners are closed before the ports are used).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr").port())
        .collect()
}

/// A store of `n` nodes; node `id` is `servers[id - 1]`, serving `client_addrs[id - 1]`.
pub struct Store {
    dir: tempfile::TempDir,
    pub client_addrs: Vec<String>,
    peer_addrs: Vec<String>,
    servers: Vec<Option<RunningServer>>,
    /// Queues of [`TOPIC`] in this store ([`QUEUES`] unless [`Store::start_with_queues`]).
    pub queues: u32,
    /// TOML appended to every node's config (e.g. a `[limits]` section); empty by default.
    pub config_extra: String,
    /// How the harness's own calls reach the nodes (and what a secured store requires).
    pub access: Access,
    /// The store's auth secret ([`Store::start_secured`]), for [`Store::token`].
    secret: Option<Secret>,
}

/// A client's credentials: the store CA to dial over TLS with, and the token to send.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `Some`: the nodes' client ports serve TLS; dial with this CA.
    pub ca: Option<StoreCa>,
    /// Sent on every call (an admin token in a secured store).
    pub token: Option<String>,
}

impl Store {
    /// A store of `nodes` nodes, none started yet.
    pub fn new(nodes: usize) -> Store {
        let ports = free_ports(2 * nodes);
        let addr = |port: &u16| format!("127.0.0.1:{port}");
        Store {
            dir: tempfile::tempdir().expect("tempdir"),
            client_addrs: ports[..nodes].iter().map(addr).collect(),
            peer_addrs: ports[nodes..].iter().map(addr).collect(),
            servers: (0..nodes).map(|_| None).collect(),
            queues: QUEUES,
            config_extra: String::new(),
            access: Access::default(),
            secret: None,
        }
    }

    /// [`Store::start`] with `limits` (TOML lines) as every node's `[limits]` section.
    pub async fn start_with_limits(nodes: usize, placed: bool, limits: &str) -> Store {
        let mut store = Store::new(nodes);
        store.config_extra = format!("\n[limits]\n{limits}\n");
        for id in 1..=nodes {
            store.start_node(id).await;
        }
        store.wait_masters(placed).await;
        store
    }

    /// A store of `nodes` nodes whose client ports serve TLS (`[tls] client_port`, the node
    /// certificates of the store CA) and require tokens (`[auth]`), started, masters placed.
    pub async fn start_secured(nodes: usize) -> Store {
        let mut store = Store::new(nodes);
        let secret_file = store.dir.path().join("store.secret");
        store.secret = Some(Secret::create(&secret_file).expect("store secret"));
        store.config_extra = format!(
            "client_port = true\n\n[auth]\nsecret_file = {:?}\n",
            secret_file.display().to_string()
        );
        // The CA the nodes' certificates come from (made here once, as the nodes do).
        peer_tls_section(&store.tls_dir(), 1, nodes);
        let ca = store.tls_dir().join(phxq_node::tls::CA_CERT_FILE);
        store.access = Access {
            ca: Some(StoreCa::load(&ca).expect("the store CA")),
            token: Some(store.token(&[Role::Admin])),
        };
        for id in 1..=nodes {
            store.start_node(id).await;
        }
        store.wait_masters(true).await;
        store
    }

    /// A token of this secured store with `roles`, valid for an hour.
    pub fn token(&self, roles: &[Role]) -> String {
        let secret = self.secret.as_ref().expect("a secured store");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        let claims = Claims {
            subject: "test".to_string(),
            roles: roles.to_vec(),
            expires_ms: now_ms + 3_600_000,
        };
        phxq_node::auth::issue(secret, &claims).expect("a token")
    }

    /// [`Store::start`] with `queues` queues of [`TOPIC`] (stores of a multi-store producer
    /// differ).
    pub async fn start_with_queues(nodes: usize, placed: bool, queues: u32) -> Store {
        let mut store = Store::new(nodes);
        store.queues = queues;
        for id in 1..=nodes {
            store.start_node(id).await;
        }
        store.wait_masters(placed).await;
        store
    }

    /// Starts every node and waits until every group has a master all of them agree on (its
    /// preferred node, if `placed`).
    pub async fn start(nodes: usize, placed: bool) -> Store {
        let mut store = Store::new(nodes);
        for id in 1..=nodes {
            store.start_node(id).await;
        }
        store.wait_masters(placed).await;
        store
    }

    fn config(&self, id: usize) -> ServerConfig {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let mut text = format!(
            "[node]\nid = {id}\ndata_dir = {:?}\n\n[store]\nid = {STORE_ID}\ngroups = {GROUPS}\n\
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
            "[[store.topics]]\nname = \"{TOPIC}\"\nqueues = {}\n\
             consumer_groups = {CONSUMER_GROUPS:?}\n\n\
             [[store.topics]]\nname = \"{DEAD_LETTER_TOPIC}\"\nqueues = {DEAD_LETTER_QUEUES}\n\
             consumer_groups = [{:?}]\n",
            self.queues, CONSUMER_GROUPS[0]
        );
        text += &peer_tls_section(&self.tls_dir(), id, self.peer_addrs.len());
        text += &self.config_extra;
        ServerConfig::parse(&text).expect("valid config")
    }

    pub async fn start_node(&mut self, id: usize) {
        let server = RunningServer::start(self.config(id))
            .await
            .unwrap_or_else(|error| panic!("node {id} did not start: {error}"));
        self.servers[id - 1] = Some(server);
    }

    /// Stops node `id` gracefully; its groups must elect new masters.
    pub async fn stop_node(&mut self, id: usize) {
        let server = self.servers[id - 1].take().expect("node running");
        server.run_until(async {}).await.expect("clean stop");
    }

    pub async fn stop(mut self) {
        for id in 1..=self.servers.len() {
            if self.servers[id - 1].is_some() {
                self.stop_node(id).await;
            }
        }
    }

    /// Client addresses of the running nodes.
    pub fn running(&self) -> Vec<String> {
        self.servers
            .iter()
            .zip(&self.client_addrs)
            .filter(|(server, _)| server.is_some())
            .map(|(_, addr)| addr.clone())
            .collect()
    }

    /// Node `id`'s server, which must be running.
    pub fn server(&self, id: usize) -> &RunningServer {
        self.servers[id - 1].as_ref().expect("node running")
    }

    /// Where the store's CA and node certificates are (see [`peer_tls_section`]).
    pub fn tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("tls")
    }

    /// Every message of [`TOPIC`] queue `queue`, in offset order, read at its master from
    /// offset 1 (at most 10,000: the read must reach the queue's end).
    pub async fn read_queue(&self, queue: u32) -> Vec<api::StoredMessage> {
        let request = api::ConsumeRequest {
            topic: TOPIC.to_string(),
            queue,
            consumer_group: CONSUMER_GROUPS[0].to_string(),
            from_offset: Some(1),
            max_messages: 10_000,
            max_bytes: 16 << 20,
            wait_ms: 0,
            store_id: 0,
        };
        let response = self.consume_at_master(request).await;
        assert_eq!(response.next_offset, response.end_offset, "read it all");
        response.messages
    }

    /// Every message of [`TOPIC`] in this store, by queue ([`Store::read_queue`]).
    pub async fn read_all(&self) -> BTreeMap<u32, Vec<api::StoredMessage>> {
        let mut queues = BTreeMap::new();
        for queue in 0..self.queues {
            queues.insert(queue, self.read_queue(queue).await);
        }
        queues
    }

    /// The node a group settles on when every node runs (`members[g mod n]`).
    pub fn preferred(&self, group: u32) -> u64 {
        u64::from(group) % self.servers.len() as u64 + 1
    }

    /// Waits until every running node names the same master for every group (the
    /// preferred node, if `placed`), and returns that master per group.
    pub async fn wait_masters(&self, placed: bool) -> Vec<u64> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let mut views = Vec::new();
            for addr in self.running() {
                views.push(cluster_status_with(&addr, &self.access).await);
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

    /// `request` answered by its queue's master (`NOT_MASTER` followed, other nodes tried in
    /// turn), within [`SETTLE_TIMEOUT`].
    pub async fn consume_at_master(&self, request: api::ConsumeRequest) -> api::ConsumeResponse {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let nodes = self.running();
        let mut target = nodes[0].clone();
        for turn in 1.. {
            assert!(
                Instant::now() < deadline,
                "queue {} unreadable",
                request.queue
            );
            if let Some(response) = consume_with(&target, request.clone(), &self.access).await {
                match api::check(response.error.as_ref()) {
                    Ok(()) => return response,
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

/// A client of the node at `addr` with `access`, connected (within 2 s).
async fn client(addr: &str, access: &Access) -> Option<api::Client> {
    let timeout = Duration::from_secs(2);
    let endpoint = phxq_client::connect::endpoint(addr, addr, access.ca.as_ref(), timeout).ok()?;
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .ok()?
        .ok()?;
    let token = api::BearerToken::new(access.token.as_deref()).ok()?;
    Some(api::client(channel, token))
}

pub async fn cluster_status(addr: &str) -> Option<api::ClusterStatusResponse> {
    cluster_status_with(addr, &Access::default()).await
}

pub async fn cluster_status_with(
    addr: &str,
    access: &Access,
) -> Option<api::ClusterStatusResponse> {
    let mut client = client(addr, access).await?;
    let call = client.cluster_status(api::ClusterStatusRequest {});
    let status = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()?
        .into_inner();
    api::check(status.error.as_ref()).ok()?;
    Some(status)
}

pub async fn consume(addr: &str, request: api::ConsumeRequest) -> Option<api::ConsumeResponse> {
    consume_with(addr, request, &Access::default()).await
}

pub async fn consume_with(
    addr: &str,
    request: api::ConsumeRequest,
    access: &Access,
) -> Option<api::ConsumeResponse> {
    let mut client = client(addr, access).await?;
    let call = client.consume(request);
    let response = tokio::time::timeout(Duration::from_secs(5), call).await;
    Some(response.ok()?.ok()?.into_inner())
}

/// A consumer running on its own task until it is drained or killed.
pub struct Running {
    /// The consumer's `run`.
    pub task: JoinHandle<Result<ConsumerReport, ConsumerError>>,
    stop: oneshot::Sender<()>,
}

impl Running {
    /// Runs `consumer` with `handler` on a task of its own.
    pub fn spawn<H: Handler>(consumer: Consumer, handler: H) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(handler, async move {
            let _ = stopped.await;
        }));
        Running { task, stop }
    }

    /// Drains the consumer and returns its report (within [`SETTLE_TIMEOUT`]).
    pub async fn drain(self) -> ConsumerReport {
        self.drain_within(SETTLE_TIMEOUT).await
    }

    /// Drains the consumer and returns its report (within `within`).
    pub async fn drain_within(self, within: Duration) -> ConsumerReport {
        let _ = self.stop.send(());
        tokio::time::timeout(within, self.task)
            .await
            .expect("drained in time")
            .expect("the consumer did not panic")
            .expect("no consumer error")
    }

    /// Kills the consumer: its future is dropped where it stands (no drain, no commit, no
    /// leaving heartbeat), as a crashed process would stop.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The `[tls]` section of node `id` of a store of `nodes` nodes: a store CA and node
/// certificates made in `dir` (once; reused by every node and restart).
pub fn peer_tls_section(dir: &std::path::Path, id: usize, nodes: usize) -> String {
    let ids: Vec<_> = (1..=nodes as u64).map(phxq_types::NodeId).collect();
    let files = phxq_node::tls::ensure_store_certs(dir, STORE_ID, &ids).expect("test certificates");
    phxq_node::tls::config_section(&files[id - 1])
}
