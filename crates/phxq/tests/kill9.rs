//! Real processes, real `SIGKILL`: three `phxq node` processes on 127.0.0.1 under load from
//! concurrent gRPC producers; the node that masters the most replication groups is killed with
//! `SIGKILL` mid-run and restarted a couple of seconds later, while the producers keep going
//! (following `NOT_MASTER` and retrying through the election).
//!
//! Afterwards every queue is read from offset 1 through its master, and:
//!
//! * every acknowledged enqueue is at its acknowledged offset with its value (none lost);
//! * offsets are dense from 1 on every queue;
//! * one producer's acknowledgements on a queue are in offset order (each producer waits for
//!   its ack before sending the next message, so the master must have applied them in order);
//! * every stored value was sent by some producer (no phantom), and a value stored twice was
//!   retried after an uncertain outcome (`INDETERMINATE`, `TIMEOUT`, `UNAVAILABLE`, a lost
//!   connection): `NOT_MASTER` and `NO_MASTER` promise nothing was written;
//! * the killed node, restarted, catches up and, once placement gives it groups back, serves
//!   exactly the same messages as the masters did.
//!
//! Every wait has a deadline; ports come from a range below the kernel's ephemeral range so
//! outgoing connections cannot take them; data lives in a temporary directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_proto::api::{self, phxq_client::PhxqClient};
use phxq_types::ErrorCode;
use tonic::transport::{Channel, Endpoint};

/// The test store's id; requests name it, so a node of another store would refuse them.
const STORE_ID: u64 = 1;
/// Replication groups of the test store; with as many queues, every group carries load.
const GROUPS: u32 = 6;
/// Queues of topic `test` (queue q lives in group q mod GROUPS).
const QUEUES: u32 = 6;
/// Concurrent producers; each sends one message at a time and waits for its ack.
const PRODUCERS: usize = 12;
/// Bytes of each message value (a unique prefix, padded).
const VALUE_BYTES: usize = 200;
/// Load before the kill.
const LOAD_BEFORE_KILL: Duration = Duration::from_millis(2_500);
/// How long the killed node stays down, under load.
const DOWN: Duration = Duration::from_millis(2_500);
/// Load after the restart.
const LOAD_AFTER_RESTART: Duration = Duration::from_millis(2_500);
/// How long every group may take to have a master at start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one enqueue may take, retries included, before the test fails: far above a
/// failover (about a second), so only a store that stays unavailable trips it.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// How long one attempt may take before it counts as lost.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// First retry delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// Redirects followed in a row without a pause.
const REDIRECTS_IN_A_ROW_MAX: u32 = 3;
/// How long the restarted node may take to catch up with every group's master.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the restarted node may take to master groups again (placement promises 10 s).
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long producers may take to finish their last call after being told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages asked for per Consume call.
const READ_BATCH_MESSAGES: u32 = 5_000;
/// Bytes asked for per Consume call.
const READ_BATCH_BYTES: u32 = 4 << 20;
/// Consume calls per queue at most (bounds the read loop).
const READ_CALLS_MAX: usize = 10_000;
/// First port tried; ports stay below the kernel's ephemeral range (32768 and up).
const PORT_RANGE_START: u16 = 21_000;
/// Ports in the range tried.
const PORT_RANGE_LEN: u16 = 8_000;
/// Port blocks tried before giving up.
const PORT_TRIES_MAX: u32 = 50;
/// Lines of each node's log shown when the test fails.
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------------
// The store's processes

/// Three `phxq node` processes; killed when dropped.
struct Store {
    dir: tempfile::TempDir,
    client_ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

impl Store {
    fn start() -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = unusual_ports(6);
        let (client_ports, peer_ports) = ports.split_at(3);
        let mut store = Store {
            dir,
            client_ports: client_ports.to_vec(),
            nodes: Vec::new(),
        };
        for id in 1..=3 {
            let text = store.config_text(id, peer_ports);
            std::fs::write(store.config_path(id), text).expect("write config");
            let child = store.spawn(id);
            store.nodes.push(Some(child));
        }
        store
    }

    fn config_text(&self, id: usize, peer_ports: &[u16]) -> String {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let mut text = format!(
            "[node]\nid = {id}\ndata_dir = {:?}\n\n[store]\nid = 1\ngroups = {GROUPS}\n\n",
            data_dir.display().to_string()
        );
        for (n, (client, peer)) in self.client_ports.iter().zip(peer_ports).enumerate() {
            text += &format!(
                "[[store.nodes]]\nid = {}\nclient_addr = \"127.0.0.1:{client}\"\n\
                 peer_addr = \"127.0.0.1:{peer}\"\n\n",
                n + 1
            );
        }
        text += &format!(
            "[[store.topics]]\nname = \"test\"\nqueues = {QUEUES}\nconsumer_groups = [\"g1\"]\n"
        );
        let ids: Vec<_> = (1..=peer_ports.len() as u64)
            .map(phxq_types::NodeId)
            .collect();
        let files = phxq_node::tls::ensure_store_certs(&self.dir.path().join("tls"), 1, &ids)
            .expect("test certificates");
        text += &phxq_node::tls::config_section(&files[id - 1]);
        text
    }

    fn config_path(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}.toml"))
    }

    fn log_path(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}.log"))
    }

    fn spawn(&self, id: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("log file");
        Command::new(env!("CARGO_BIN_EXE_phxq"))
            .args(["node", "--config"])
            .arg(self.config_path(id))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn phxq node")
    }

    /// Sends SIGKILL to node `id` (what `Child::kill` sends on Unix) and reaps it.
    fn kill9(&mut self, id: usize) {
        let mut child = self.nodes[id - 1].take().expect("node is running");
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("reap the killed node");
        assert!(!status.success(), "node {id} was killed: {status:?}");
    }

    fn restart(&mut self, id: usize) {
        assert!(self.nodes[id - 1].is_none(), "node {id} is down");
        self.nodes[id - 1] = Some(self.spawn(id));
    }

    fn addr(&self, id: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[id - 1])
    }

    fn addrs(&self) -> Vec<String> {
        (1..=3).map(|id| self.addr(id)).collect()
    }

    /// The last lines of every node's log, for failure messages.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for id in 1..=3 {
            let log = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            out += &format!("--- node {id} log (last {} lines) ---\n", tail.len());
            for line in tail {
                out += line;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `count` consecutive ports on 127.0.0.1 that nobody listens on right now, from a block
/// chosen by process id (parallel test processes start in different places).
fn unusual_ports(count: u16) -> Vec<u16> {
    let blocks = PORT_RANGE_LEN / count;
    let first_block = (std::process::id() % u32::from(blocks)) as u16;
    for attempt in 0..PORT_TRIES_MAX {
        let block = (first_block + attempt as u16 * 7) % blocks;
        let base = PORT_RANGE_START + block * count;
        let ports: Vec<u16> = (base..base + count).collect();
        let free = ports
            .iter()
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", *port)))
            .collect::<Result<Vec<_>, _>>();
        if free.is_ok() {
            return ports;
        }
    }
    panic!("no {count} free ports found in {PORT_TRIES_MAX} tries");
}

// ---------------------------------------------------------------------------------------------
// Asking the store about itself

/// Each node's own answer to `ClusterStatus` (`None`: no answer in time).
async fn views(addrs: &[String]) -> Vec<Option<api::ClusterStatusResponse>> {
    let mut answers = Vec::new();
    for addr in addrs {
        let answer = async {
            let mut client = connect(addr).ok()?;
            let call = client.cluster_status(api::ClusterStatusRequest {});
            let response = tokio::time::timeout(ATTEMPT_TIMEOUT, call)
                .await
                .ok()?
                .ok()?
                .into_inner();
            api::check(response.error.as_ref()).ok()?;
            Some(response)
        };
        answers.push(answer.await);
    }
    answers
}

/// The groups each node masters with a lease, by its own answer (node ids from 1).
fn mastered(views: &[Option<api::ClusterStatusResponse>]) -> BTreeMap<u64, Vec<u64>> {
    let mut masters = BTreeMap::new();
    for view in views.iter().flatten() {
        let groups: Vec<u64> = view
            .groups
            .iter()
            .filter(|g| g.master == view.node_id && g.lease_remaining_ms > 0)
            .map(|g| g.group)
            .collect();
        masters.insert(view.node_id, groups);
    }
    masters
}

/// Waits until every node answers and every group has exactly one master with a lease.
async fn wait_ready(store: &Store) -> BTreeMap<u64, Vec<u64>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let views = views(&store.addrs()).await;
        let masters = mastered(&views);
        let mut groups: Vec<u64> = masters.values().flatten().copied().collect();
        groups.sort_unstable();
        if views.iter().all(Option::is_some) && groups == (0..u64::from(GROUPS)).collect::<Vec<_>>()
        {
            return masters;
        }
        assert!(
            Instant::now() < deadline,
            "no master for every group within {READY_TIMEOUT:?} (masters: {masters:?})\n{}",
            store.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn connect(addr: &str) -> Result<PhxqClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| format!("bad address {addr}: {error}"))?
        .connect_timeout(ATTEMPT_TIMEOUT)
        .tcp_nodelay(true);
    Ok(PhxqClient::new(endpoint.connect_lazy()))
}

// ---------------------------------------------------------------------------------------------
// Producers

/// One acknowledged enqueue.
#[derive(Clone, Debug)]
struct Ack {
    queue: u32,
    offset: u64,
    value: String,
}

/// What one producer did.
#[derive(Default)]
struct ProducerLog {
    /// Acknowledgements, in the order they arrived.
    acks: Vec<Ack>,
    /// Every value sent at least once.
    sent: HashSet<String>,
    /// Values with an attempt whose outcome is unknown (they may be stored more than once).
    uncertain: HashSet<String>,
    /// Attempts refused or lost, by reason, for the failure report.
    retries: BTreeMap<String, u64>,
}

/// Masters learnt by the producers, per group, and the nodes to rotate over when unknown.
struct Routes {
    nodes: Vec<String>,
    masters: Mutex<HashMap<u32, String>>,
    next: AtomicU64,
}

impl Routes {
    fn target(&self, group: u32) -> String {
        if let Some(master) = self.masters.lock().expect("routes").get(&group) {
            return master.clone();
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.nodes[turn % self.nodes.len()].clone()
    }

    fn learn(&self, group: u32, master: String) {
        self.masters.lock().expect("routes").insert(group, master);
    }

    fn forget(&self, group: u32) {
        self.masters.lock().expect("routes").remove(&group);
    }
}

/// The value of message `seq` of `producer`: unique, and padded to [`VALUE_BYTES`].
fn value_of(producer: usize, seq: u64) -> String {
    let mut value = format!("p{producer:02}-{seq:07}-");
    while value.len() < VALUE_BYTES {
        value.push((b'a' + (value.len() % 26) as u8) as char);
    }
    value
}

/// Sends one message at a time, each to the next queue in turn, until `stop`; fails (with what
/// it did so far) if one enqueue cannot be acknowledged within [`CALL_DEADLINE`].
async fn producer(
    index: usize,
    routes: Arc<Routes>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> (ProducerLog, Result<(), String>) {
    let mut log = ProducerLog::default();
    let mut clients: HashMap<String, PhxqClient<Channel>> = HashMap::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let queue = ((index as u64 + seq) % u64::from(QUEUES)) as u32;
        let value = value_of(index, seq);
        seq += 1;
        log.sent.insert(value.clone());
        match produce_one(&routes, &mut clients, &mut log, queue, &value).await {
            Ok(offset) => {
                acked.fetch_add(1, Ordering::Relaxed);
                log.acks.push(Ack {
                    queue,
                    offset,
                    value,
                });
            }
            Err(error) => {
                let error = format!("producer {index}, queue {queue}, value {value}: {error}");
                return (log, Err(error));
            }
        }
    }
    (log, Ok(()))
}

/// Enqueues `value` on `queue`, following redirects and retrying retryable refusals and lost
/// connections; returns the acknowledged offset.
async fn produce_one(
    routes: &Routes,
    clients: &mut HashMap<String, PhxqClient<Channel>>,
    log: &mut ProducerLog,
    queue: u32,
    value: &str,
) -> Result<u64, String> {
    let group = queue % GROUPS;
    let request = api::ProduceRequest {
        topic: "test".to_string(),
        queue,
        message_id: Vec::new(),
        messages: vec![api::Message {
            key: Vec::new(),
            value: value.as_bytes().to_vec(),
        }],
        store_id: STORE_ID,
    };
    let deadline = Instant::now() + CALL_DEADLINE;
    let mut backoff = BACKOFF_MIN;
    let mut redirects = 0;
    let mut last = String::new();
    while Instant::now() < deadline {
        let addr = routes.target(group);
        if !clients.contains_key(&addr) {
            clients.insert(addr.clone(), connect(&addr)?);
        }
        let mut client = clients[&addr].clone();
        let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, client.produce(request.clone())).await;
        let reason = match outcome {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                match api::check(response.error.as_ref()) {
                    Ok(()) => {
                        if response.count != 1 || response.first_offset == 0 {
                            return Err(format!("a success with no offset: {response:?}"));
                        }
                        return Ok(response.first_offset);
                    }
                    Err(failure) => {
                        let code = failure.code.map_or("UNKNOWN", ErrorCode::name);
                        if !failure.is_retryable() {
                            return Err(format!("refused by {addr}: {failure}"));
                        }
                        if !matches!(
                            failure.code,
                            Some(ErrorCode::NotMaster | ErrorCode::NoMaster)
                        ) {
                            log.uncertain.insert(value.to_string());
                        }
                        *log.retries.entry(code.to_string()).or_default() += 1;
                        match failure.master_addr.clone() {
                            Some(master)
                                if failure.code == Some(ErrorCode::NotMaster)
                                    && redirects < REDIRECTS_IN_A_ROW_MAX =>
                            {
                                redirects += 1;
                                routes.learn(group, master);
                                continue;
                            }
                            _ => routes.forget(group),
                        }
                        format!("{addr}: {failure}")
                    }
                }
            }
            Ok(Err(status)) => {
                log.uncertain.insert(value.to_string());
                *log.retries.entry("TRANSPORT".to_string()).or_default() += 1;
                routes.forget(group);
                format!("{addr}: {}: {}", status.code(), status.message())
            }
            Err(_) => {
                log.uncertain.insert(value.to_string());
                *log.retries
                    .entry("ATTEMPT_TIMEOUT".to_string())
                    .or_default() += 1;
                routes.forget(group);
                format!("{addr}: no answer within {ATTEMPT_TIMEOUT:?}")
            }
        };
        last = reason;
        redirects = 0;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    Err(format!(
        "not acknowledged within {CALL_DEADLINE:?}; last: {last}"
    ))
}

// ---------------------------------------------------------------------------------------------
// Reading back

/// Reads `queue` from offset 1 to its end at `addr`; with `follow`, `NOT_MASTER` redirects are
/// followed (and retryable refusals retried), otherwise any refusal is an error.
async fn read_queue(
    addrs: &[String],
    addr: &str,
    queue: u32,
    follow: bool,
) -> Result<Vec<api::StoredMessage>, String> {
    let deadline = Instant::now() + CALL_DEADLINE;
    let mut addr = addr.to_string();
    let mut messages: Vec<api::StoredMessage> = Vec::new();
    let mut turn = 0;
    for _ in 0..READ_CALLS_MAX {
        if Instant::now() > deadline {
            return Err(format!(
                "queue {queue}: not read to its end within {CALL_DEADLINE:?}"
            ));
        }
        let request = api::ConsumeRequest {
            topic: "test".to_string(),
            queue,
            consumer_group: "g1".to_string(),
            from_offset: Some(messages.len() as u64 + 1),
            max_messages: READ_BATCH_MESSAGES,
            max_bytes: READ_BATCH_BYTES,
            wait_ms: 0,
            store_id: STORE_ID,
        };
        let mut client = connect(&addr)?;
        let response = match tokio::time::timeout(ATTEMPT_TIMEOUT, client.consume(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(_)) if follow => {
                // Lost connection (a node restarting): ask another node.
                turn += 1;
                addr = addrs[turn % addrs.len()].clone();
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
            Ok(Err(status)) => return Err(format!("queue {queue} at {addr}: {status}")),
            Err(_) => return Err(format!("queue {queue} at {addr}: no answer in time")),
        };
        if let Err(failure) = api::check(response.error.as_ref()) {
            if !follow || !failure.is_retryable() {
                return Err(format!("queue {queue} at {addr}: {failure}"));
            }
            match failure.master_addr {
                Some(master) if failure.code == Some(ErrorCode::NotMaster) => addr = master,
                _ => {
                    turn += 1;
                    addr = addrs[turn % addrs.len()].clone();
                    tokio::time::sleep(BACKOFF_MAX).await;
                }
            }
            continue;
        }
        let done = response.messages.is_empty() && response.next_offset == response.end_offset;
        messages.extend(response.messages);
        if done {
            return Ok(messages);
        }
    }
    Err(format!(
        "queue {queue}: more than {READ_CALLS_MAX} reads to reach its end"
    ))
}

// ---------------------------------------------------------------------------------------------
// Checking

/// Checks the stored queues against what producers were told; returns every violation found.
fn violations(
    queues: &BTreeMap<u32, Vec<api::StoredMessage>>,
    logs: &[ProducerLog],
) -> Vec<String> {
    let mut found = Vec::new();
    let sent: HashSet<&String> = logs.iter().flat_map(|log| &log.sent).collect();
    let uncertain: HashSet<&String> = logs.iter().flat_map(|log| &log.uncertain).collect();
    let mut copies: HashMap<&[u8], u64> = HashMap::new();
    for (queue, messages) in queues {
        for (position, message) in messages.iter().enumerate() {
            if message.offset != position as u64 + 1 {
                found.push(format!(
                    "queue {queue}: offset {} at position {} (offsets must be dense from 1)",
                    message.offset,
                    position + 1
                ));
                break;
            }
            *copies.entry(&message.value).or_default() += 1;
            let value = String::from_utf8_lossy(&message.value).into_owned();
            if !sent.contains(&value) {
                found.push(format!(
                    "queue {queue} offset {}: phantom value {value:?}",
                    message.offset
                ));
            }
        }
    }
    for (value, count) in &copies {
        let value = String::from_utf8_lossy(value).into_owned();
        if *count > 1 && !uncertain.contains(&value) {
            found.push(format!(
                "{value:?} stored {count} times, but no attempt of it had an uncertain outcome"
            ));
        }
    }
    for (producer, log) in logs.iter().enumerate() {
        let mut last_offset: BTreeMap<u32, u64> = BTreeMap::new();
        for ack in &log.acks {
            let stored = queues
                .get(&ack.queue)
                .and_then(|messages| messages.get(ack.offset as usize - 1));
            match stored {
                None => found.push(format!(
                    "LOST: producer {producer}'s ack of {:?} at queue {} offset {}: the queue \
                     ends at offset {}",
                    ack.value,
                    ack.queue,
                    ack.offset,
                    queues.get(&ack.queue).map_or(0, Vec::len)
                )),
                Some(message) if message.value != ack.value.as_bytes() => found.push(format!(
                    "LOST: producer {producer}'s ack of {:?} at queue {} offset {}: the offset \
                     holds {:?}",
                    ack.value,
                    ack.queue,
                    ack.offset,
                    String::from_utf8_lossy(&message.value)
                )),
                Some(_) => {}
            }
            let last = last_offset.entry(ack.queue).or_default();
            if ack.offset <= *last {
                found.push(format!(
                    "ORDER: producer {producer} was acked {:?} at queue {} offset {} after an \
                     earlier message at offset {}",
                    ack.value, ack.queue, ack.offset, *last
                ));
            }
            *last = ack.offset;
        }
    }
    found
}

/// A readable summary of a run, for failure messages.
fn summary(logs: &[ProducerLog], queues: &BTreeMap<u32, Vec<api::StoredMessage>>) -> String {
    let acks: usize = logs.iter().map(|log| log.acks.len()).sum();
    let uncertain: usize = logs.iter().map(|log| log.uncertain.len()).sum();
    let mut retries: BTreeMap<&str, u64> = BTreeMap::new();
    for log in logs {
        for (reason, count) in &log.retries {
            *retries.entry(reason).or_default() += count;
        }
    }
    let lengths: Vec<String> = queues
        .iter()
        .map(|(queue, messages)| format!("q{queue}: {}", messages.len()))
        .collect();
    format!(
        "{acks} acks, {uncertain} values with an uncertain attempt, retried attempts {retries:?}, \
         queue lengths [{}]",
        lengths.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// The scenario

#[test]
fn the_master_of_the_most_groups_killed_under_load_loses_no_acknowledged_enqueue() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut store = Store::start();
    runtime.block_on(wait_ready(&store));

    let routes = Arc::new(Routes {
        nodes: store.addrs(),
        masters: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|index| runtime.spawn(producer(index, routes.clone(), stop.clone(), acked.clone())))
        .collect();

    std::thread::sleep(LOAD_BEFORE_KILL);
    let before = runtime.block_on(views(&store.addrs()));
    let masters = mastered(&before);
    let (&victim, victim_groups) = masters
        .iter()
        .max_by_key(|(node, groups)| (groups.len(), std::cmp::Reverse(**node)))
        .expect("some node answers");
    let victim_groups = victim_groups.clone();
    let victim = victim as usize;
    let acked_at_kill = acked.load(Ordering::Relaxed);
    assert!(
        acked_at_kill > 0,
        "no enqueue acknowledged before the kill\n{}",
        store.log_tails()
    );
    store.kill9(victim);
    let killed_at = Instant::now();
    eprintln!(
        "killed node {victim} (master of groups {victim_groups:?}) after {acked_at_kill} acks"
    );

    std::thread::sleep(DOWN);
    let acked_while_down = acked.load(Ordering::Relaxed) - acked_at_kill;
    store.restart(victim);
    eprintln!(
        "restarted node {victim} {:?} after the kill; {acked_while_down} acks meanwhile",
        killed_at.elapsed()
    );
    std::thread::sleep(LOAD_AFTER_RESTART);
    stop.store(true, Ordering::SeqCst);

    let mut logs = Vec::new();
    let mut errors = Vec::new();
    for joined in producers {
        let (log, outcome) = runtime
            .block_on(async { tokio::time::timeout(STOP_TIMEOUT, joined).await })
            .expect("a producer did not stop in time")
            .expect("a producer panicked");
        logs.push(log);
        errors.extend(outcome.err());
    }
    assert!(
        errors.is_empty(),
        "enqueues failed:\n{}\n{}",
        errors.join("\n"),
        store.log_tails()
    );
    assert!(
        acked_while_down > 0,
        "no enqueue was acknowledged while node {victim} was down\n{}",
        store.log_tails()
    );

    let addrs = store.addrs();
    runtime.block_on(wait_caught_up(&store, victim));
    let mut queues = BTreeMap::new();
    for queue in 0..QUEUES {
        let messages = runtime
            .block_on(read_queue(&addrs, &addrs[0], queue, true))
            .unwrap_or_else(|error| panic!("{error}\n{}", store.log_tails()));
        queues.insert(queue, messages);
    }
    let found = violations(&queues, &logs);
    assert!(
        found.is_empty(),
        "{} violation(s) after killing node {victim} (groups {victim_groups:?}):\n{}\n{}\n{}",
        found.len(),
        found
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        summary(&logs, &queues),
        store.log_tails()
    );
    eprintln!("checked: {}", summary(&logs, &queues));

    // The restarted node, once it masters groups again, serves the very same messages.
    let regained = runtime.block_on(wait_masters_again(&store, victim));
    for group in regained {
        for queue in (0..QUEUES).filter(|q| u64::from(q % GROUPS) == group) {
            let direct = runtime
                .block_on(read_queue(&addrs, &addrs[victim - 1], queue, false))
                .unwrap_or_else(|error| {
                    panic!(
                        "reading queue {queue} from the restarted node {victim}: {error}\n{}",
                        store.log_tails()
                    )
                });
            let expected = &queues[&queue];
            assert!(
                direct.len() >= expected.len() && direct[..expected.len()] == expected[..],
                "queue {queue} read from the restarted node {victim} differs from the \
                 masters' read ({} vs {} messages)\n{}",
                direct.len(),
                expected.len(),
                store.log_tails()
            );
        }
    }
}

/// Waits until the restarted node has applied every group's commit index, as its master
/// reports it.
async fn wait_caught_up(store: &Store, node: usize) {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    let mut behind = Vec::new();
    while Instant::now() < deadline {
        let views = views(&store.addrs()).await;
        if let Some(Some(mine)) = views.get(node - 1) {
            behind.clear();
            for group in 0..u64::from(GROUPS) {
                let master_commit = views
                    .iter()
                    .flatten()
                    .flat_map(|view| view.groups.iter().map(move |g| (view.node_id, g)))
                    .filter(|(id, g)| g.group == group && g.master == *id)
                    .map(|(_, g)| g.commit_index)
                    .max();
                let applied = mine
                    .groups
                    .iter()
                    .find(|g| g.group == group)
                    .map_or(0, |g| g.applied_index);
                match master_commit {
                    Some(commit) if applied >= commit => {}
                    _ => behind.push((group, applied, master_commit)),
                }
            }
            if behind.is_empty() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "node {node} did not catch up within {CATCH_UP_TIMEOUT:?}: (group, applied, master's \
         commit) {behind:?}\n{}",
        store.log_tails()
    );
}

/// Waits until `node` masters, with a lease, at least one of the groups placement prefers it
/// for (group g prefers node g mod 3 + 1, so it keeps them); returns those groups.
async fn wait_masters_again(store: &Store, node: usize) -> Vec<u64> {
    let deadline = Instant::now() + PLACEMENT_TIMEOUT;
    while Instant::now() < deadline {
        let views = views(&store.addrs()).await;
        let preferred: Vec<u64> = mastered(&views)
            .remove(&(node as u64))
            .unwrap_or_default()
            .into_iter()
            .filter(|group| group % 3 + 1 == node as u64)
            .collect();
        if !preferred.is_empty() {
            return preferred;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the restarted node {node} mastered no group within {PLACEMENT_TIMEOUT:?}\n{}",
        store.log_tails()
    );
}

/// The checker itself: a planted loss, reorder, phantom and unexplained duplicate are caught.
#[test]
fn the_checker_catches_a_lost_ack_a_reorder_a_phantom_and_a_silent_duplicate() {
    let stored = |offset: u64, value: &str| api::StoredMessage {
        offset,
        time_ms: 1,
        key: Vec::new(),
        value: value.as_bytes().to_vec(),
    };
    let ack = |queue: u32, offset: u64, value: &str| Ack {
        queue,
        offset,
        value: value.to_string(),
    };
    let log = |acks: Vec<Ack>, sent: &[&str], uncertain: &[&str]| ProducerLog {
        acks,
        sent: sent.iter().map(|v| v.to_string()).collect(),
        uncertain: uncertain.iter().map(|v| v.to_string()).collect(),
        retries: BTreeMap::new(),
    };
    let queues = BTreeMap::from([(0, vec![stored(1, "a"), stored(2, "b"), stored(3, "a")])]);
    let clean = [log(
        vec![ack(0, 1, "a"), ack(0, 2, "b")],
        &["a", "b"],
        &["a"],
    )];
    assert_eq!(violations(&queues, &clean), Vec::<String>::new());

    let lost = [log(
        vec![ack(0, 1, "a"), ack(0, 2, "b"), ack(0, 4, "c")],
        &["a", "b", "c"],
        &["a"],
    )];
    assert!(violations(&queues, &lost)[0].starts_with("LOST"));
    let moved = [log(vec![ack(0, 2, "a")], &["a", "b"], &["a"])];
    assert!(violations(&queues, &moved)[0].starts_with("LOST"));
    let reordered = [log(
        vec![ack(0, 2, "b"), ack(0, 1, "a")],
        &["a", "b"],
        &["a"],
    )];
    assert!(violations(&queues, &reordered)[0].starts_with("ORDER"));
    let phantom = [log(vec![ack(0, 1, "a")], &["a"], &["a"])];
    assert!(violations(&queues, &phantom)[0].contains("phantom"));
    let silent = [log(vec![ack(0, 1, "a"), ack(0, 2, "b")], &["a", "b"], &[])];
    assert!(violations(&queues, &silent)[0].contains("stored 2 times"));
    let holes = BTreeMap::from([(0, vec![stored(1, "a"), stored(3, "b")])]);
    assert!(violations(&holes, &clean)[0].contains("dense"));
}
