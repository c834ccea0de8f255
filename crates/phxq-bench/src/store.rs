//! Producers against a running store: the measuring behind `phxq bench produce` and
//! `phxq bench failover`.
//!
//! * **Producers** are tasks on the caller's tokio runtime. Producer `i` writes queue
//!   `i mod queues` of the topic (as a producer with a fixed key would), sends one `Produce`
//!   call of `batch` messages, waits for its answer, and only then sends the next. Nothing is
//!   pipelined, so with `batch = 1` there is no client batching at all: whatever batching
//!   happens is the store's group commit. With a `qps` target each producer is paced at
//!   `qps / producers` calls/s; one that falls behind sends at once but never bursts to catch
//!   up.
//! * **Routing**: the store's nodes, groups and masters come from `ClusterStatus` asked of
//!   `server`; a call goes to the cached master of its queue's group (`queue mod groups`).
//!   `NOT_MASTER` with an address moves the cache (followed even with retries off: it is
//!   routing, not a retry). With retries on, `NO_MASTER`, the other retryable refusals, lost
//!   connections and attempts with no answer are retried with exponential backoff, on the
//!   next node, until the call's deadline. One connection per producer per node, like the
//!   peer brokers' benchmark client.
//! * **What is measured**, per call: its outcome (the final answer, after retries) and its
//!   latency from the first attempt to the final answer. Retried attempts are counted by
//!   reason. Reports count only calls started after the warmup and finished before the end.
//! * **Reports** follow PhxQueue's benchmark: total, time(ms), qps, a table of return codes
//!   with counts and percentages, and latency buckets (<1, <2, <5, ... , >=1000 ms) with
//!   counts and percentages; plus p50/p99/p99.9 from an HDR histogram.
//! * **Failover**: a per-second timeline of every call (warmup included) and, once told which
//!   groups lost their master and when ([`Load::watch_failover`]), the time from then to the
//!   first successful call on each of those groups answered by another node.
//!
//! The routing (`Routes`, the generic `call` that any of the protocol's queue calls goes
//! through), the pacing, the statistics and [`Report`] are shared with [`crate::consume`]
//! (`phxq bench consume`), whose consumers poll and commit through the same `call`.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use phxq_client::StoreCa;
use phxq_proto::api;
use phxq_types::ErrorCode;
use serde::Serialize;

/// Most producers one run may start.
pub const PRODUCERS_MAX: usize = 4096;
/// Largest message value the benchmark sends, in bytes (a store's default limit).
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;
/// Most messages in one call (the server's own limit per Produce).
pub const BATCH_MESSAGES_MAX: usize = 10_000;
/// Most bytes of values in one call.
pub const BATCH_BYTES_MAX: usize = 16 << 20;
/// Longest warmup plus measured time, in seconds; also the length of the failover timeline.
pub const RUN_SECONDS_MAX: u64 = 3600;
/// Shortest interval between periodic reports, in milliseconds.
pub const REPORT_EVERY_MS_MIN: u64 = 1_000;
/// How long one attempt may wait for its answer, in milliseconds.
pub const ATTEMPT_TIMEOUT_MS: u64 = 5_000;
/// How long connecting to a node may take, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// First retry delay, in milliseconds; delays double up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_MIN_MS: u64 = 10;
/// Longest retry delay, in milliseconds. Kept short so that the failover figure measures the
/// store rather than the client: a group's first success comes at most this long after its
/// new master can serve (with 500 ms, the figures clustered at the backoff's steps).
pub const BACKOFF_MAX_MS: u64 = 100;
/// Redirects followed in a row before the next one waits like a retry.
pub const REDIRECTS_IN_A_ROW_MAX: u32 = 3;
/// How long discovery may keep asking `server` for the store's layout, in milliseconds.
pub const DISCOVER_TIMEOUT_MS: u64 = 10_000;
/// Upper bounds of the latency buckets, in milliseconds (PhxQueue's); one more bucket holds
/// everything at or above the last.
pub const BUCKET_BOUNDS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
/// Bytes the fsync probe appends before each `fdatasync` (the peer scripts' probe: 4 KB).
pub const FSYNC_PROBE_BLOCK_BYTES: usize = 4096;
/// Bytes the fsync probe writes at most, whatever its duration.
pub const FSYNC_PROBE_FILE_BYTES_MAX: u64 = 256 << 20;
/// Most server processes whose CPU time is measured.
pub const PIDS_MAX: usize = 64;
/// Clock ticks per second of the CPU times in `/proc` (`USER_HZ`, 100 on Linux).
const PROC_TICKS_PER_SEC: f64 = 100.0;
/// Latencies above this are recorded as this, in microseconds (the histograms' bound).
const LATENCY_US_MAX: u64 = 600_000_000;
/// Latency buckets: one per bound, plus `>=` the last.
const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

/// What can stop a store benchmark.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options make no sense; nothing was run.
    #[error("invalid benchmark options: {0}")]
    InvalidOptions(String),
    /// The store could not be used (not reachable, unknown topic, an empty layout).
    #[error("the store at {server}: {detail}")]
    Store {
        /// The node asked.
        server: String,
        /// What went wrong.
        detail: String,
    },
    /// The fsync probe's file could not be written.
    #[error("fsync probe in {path}: {source}")]
    Probe {
        /// The probe's file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of store benchmark operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Any node of the store (HOST:PORT of its client API).
    pub server: String,
    /// The topic written; it must exist.
    pub topic: String,
    /// Concurrent producers, each waiting for its own acknowledgement.
    pub producers: usize,
    /// Bytes of each message value.
    pub message_bytes: usize,
    /// Messages per call (1: no client batching).
    pub batch: usize,
    /// Send the calls over one `ProduceStream` per producer and node instead of one unary
    /// `Produce` each (still one call at a time, each waiting for its own answer).
    pub stream: bool,
    /// Target calls/s over all producers; 0: as fast as acknowledgements come.
    pub qps: u64,
    /// Time before measuring starts (connections, masters learnt, caches warm).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// How often [`run`] hands out a report of the interval just ended.
    pub report_every: Duration,
    /// Whether failed attempts are retried (redirects are followed either way).
    pub retries: bool,
    /// A call's deadline, retries included.
    pub call_timeout: Duration,
    /// Processes of the store whose CPU time reports include (`server cores`).
    pub server_pids: Vec<u32>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            server: "127.0.0.1:7100".to_string(),
            topic: "test".to_string(),
            producers: 16,
            message_bytes: 1024,
            batch: 1,
            stream: false,
            qps: 0,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            report_every: Duration::from_secs(10),
            retries: true,
            call_timeout: Duration::from_secs(10),
            server_pids: Vec::new(),
        }
    }
}

impl Options {
    /// Checks every limit; an error names the offending option.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidOptions(reason));
        if self.producers == 0 || self.producers > PRODUCERS_MAX {
            return invalid(format!(
                "producers {} is not in 1..={PRODUCERS_MAX}",
                self.producers
            ));
        }
        if self.message_bytes > MESSAGE_BYTES_MAX {
            return invalid(format!(
                "message bytes {} is over {MESSAGE_BYTES_MAX}",
                self.message_bytes
            ));
        }
        if self.batch == 0 || self.batch > BATCH_MESSAGES_MAX {
            return invalid(format!(
                "batch {} is not in 1..={BATCH_MESSAGES_MAX}",
                self.batch
            ));
        }
        if self.batch.saturating_mul(self.message_bytes) > BATCH_BYTES_MAX {
            return invalid(format!(
                "a batch of {} × {} bytes is over {BATCH_BYTES_MAX} bytes",
                self.batch, self.message_bytes
            ));
        }
        if self.duration.is_zero() || (self.warmup + self.duration).as_secs() >= RUN_SECONDS_MAX {
            return invalid(format!(
                "duration {:?} must be above zero and, with the warmup, under {RUN_SECONDS_MAX} s",
                self.duration
            ));
        }
        if self.report_every < Duration::from_millis(REPORT_EVERY_MS_MIN) {
            return invalid(format!(
                "reports every {:?}: at least {REPORT_EVERY_MS_MIN} ms",
                self.report_every
            ));
        }
        if self.call_timeout.is_zero() || self.call_timeout.as_secs() >= RUN_SECONDS_MAX {
            return invalid(format!("call timeout {:?}", self.call_timeout));
        }
        if self.server_pids.len() > PIDS_MAX {
            return invalid(format!("more than {PIDS_MAX} server processes"));
        }
        if self.topic.is_empty() || self.server.is_empty() {
            return invalid("server and topic must be given".to_string());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The store's layout

/// The store as the benchmark found it.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The store's id.
    pub store_id: u64,
    /// `(node id, client address)` of every node, ordered by id.
    pub nodes: Vec<(u64, String)>,
    /// Replication groups of the store.
    pub groups: u32,
    /// Queues of the benchmark's topic.
    pub queues: u32,
}

impl Topology {
    /// The client address of node `id`.
    pub fn addr(&self, id: u64) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(node, _)| *node == id)
            .map(|(_, addr)| addr.as_str())
    }
}

/// Asks `server` for the store's layout, retrying until [`DISCOVER_TIMEOUT_MS`]; fails if
/// `topic` does not exist.
pub async fn discover(server: &str, topic: &str) -> Result<(Topology, api::ClusterStatusResponse)> {
    let fail = |detail: String| Error::Store {
        server: server.to_string(),
        detail,
    };
    let deadline = Instant::now() + Duration::from_millis(DISCOVER_TIMEOUT_MS);
    let status = loop {
        match cluster_status(server).await {
            Ok(status) => break status,
            Err(detail) if Instant::now() >= deadline => return Err(fail(detail)),
            Err(_) => tokio::time::sleep(Duration::from_millis(BACKOFF_MAX_MS)).await,
        }
    };
    let Some(found) = status.topics.iter().find(|t| t.name == topic) else {
        let known: Vec<&str> = status.topics.iter().map(|t| t.name.as_str()).collect();
        return Err(fail(format!(
            "no topic {topic:?} (topics: {})",
            known.join(", ")
        )));
    };
    if status.nodes.is_empty() || status.groups_count == 0 || found.queues == 0 {
        return Err(fail("an empty store description".to_string()));
    }
    let topology = Topology {
        store_id: status.store_id,
        nodes: status
            .nodes
            .iter()
            .map(|n| (n.id, n.client_addr.clone()))
            .collect(),
        groups: status.groups_count,
        queues: found.queues,
    };
    Ok((topology, status))
}

/// One node's own `ClusterStatus`, or why there is none (one attempt, bounded).
pub async fn cluster_status(addr: &str) -> Result<api::ClusterStatusResponse, String> {
    let mut client = connect(addr)?;
    let call = client.cluster_status(api::ClusterStatusRequest {});
    match tokio::time::timeout(Duration::from_millis(ATTEMPT_TIMEOUT_MS), call).await {
        Ok(Ok(response)) => {
            let response = response.into_inner();
            api::check(response.error.as_ref()).map_err(|failure| failure.to_string())?;
            Ok(response)
        }
        Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT_MS} ms")),
    }
}

/// Every node's own view, asked concurrently; `None` for a node that did not answer.
pub async fn cluster_views(addrs: &[String]) -> Vec<Option<api::ClusterStatusResponse>> {
    let mut calls = tokio::task::JoinSet::new();
    for (index, addr) in addrs.iter().cloned().enumerate() {
        calls.spawn(async move { (index, cluster_status(&addr).await.ok()) });
    }
    let mut views = vec![None; addrs.len()];
    while let Some(joined) = calls.join_next().await {
        if let Ok((index, view)) = joined {
            views[index] = view;
        }
    }
    views
}

/// Every answering node's counters right now, by node id.
pub async fn node_counters(addrs: &[String]) -> BTreeMap<u64, api::NodeCounters> {
    cluster_views(addrs)
        .await
        .into_iter()
        .flatten()
        .filter_map(|view| Some((view.node_id, view.counters?)))
        .collect()
}

/// The store's figures between two readings of [`node_counters`], `seconds` apart; only
/// nodes read both times count (a node restarted in between starts from zero, so it is left
/// out when its counters went down).
pub fn store_figures(
    before: &BTreeMap<u64, api::NodeCounters>,
    after: &BTreeMap<u64, api::NodeCounters>,
    seconds: f64,
) -> Option<StoreFigures> {
    let (mut nodes, mut rounds, mut syncs, mut proposals, mut messages) = (0, 0, 0, 0, 0);
    for (node, now) in after {
        let Some(then) = before.get(node) else {
            continue;
        };
        if now.rounds < then.rounds || now.syncs < then.syncs {
            continue;
        }
        nodes += 1;
        rounds += now.rounds - then.rounds;
        syncs += now.syncs - then.syncs;
        proposals += now.proposals.saturating_sub(then.proposals);
        messages += now.messages.saturating_sub(then.messages);
    }
    let seconds = seconds.max(1e-9);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    (nodes > 0).then(|| StoreFigures {
        nodes,
        rounds_per_sec: rounds as f64 / seconds,
        syncs_per_sec: syncs as f64 / seconds,
        proposals_per_sec: proposals as f64 / seconds,
        messages_per_proposal: ratio(messages, proposals),
        message_copies_per_sync: ratio(messages * nodes as u64, syncs),
    })
}

/// The groups each answering node masters with a lease, by its own answer.
pub fn masters_by_node(views: &[Option<api::ClusterStatusResponse>]) -> BTreeMap<u64, Vec<u64>> {
    let mut masters = BTreeMap::new();
    for view in views.iter().flatten() {
        let groups = view
            .groups
            .iter()
            .filter(|g| g.master == view.node_id && g.lease_remaining_ms > 0)
            .map(|g| g.group)
            .collect();
        masters.insert(view.node_id, groups);
    }
    masters
}

fn connect(addr: &str) -> Result<api::Client, String> {
    let (token, ca) = CREDENTIALS.get().cloned().unwrap_or_default();
    let connect_timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
    let endpoint = phxq_client::connect::endpoint(addr, addr, ca.as_ref(), connect_timeout)?;
    Ok(api::client(endpoint.connect_lazy(), token))
}

/// The token every benchmark client sends (stores with auth on) and the store CA it dials
/// with (stores with client TLS); set once per process.
static CREDENTIALS: std::sync::OnceLock<(api::BearerToken, Option<StoreCa>)> =
    std::sync::OnceLock::new();

/// Sets the token the benchmark clients send (`None`: none) and the CA they verify nodes
/// with (`None`: plaintext), before the first connection; `Err` for a token that cannot be
/// sent, or a second setting.
pub fn set_credentials(token: Option<&str>, ca: Option<StoreCa>) -> Result<(), String> {
    let token = api::BearerToken::new(token)?;
    CREDENTIALS
        .set((token, ca))
        .map_err(|_| "the benchmark credentials are set once".to_string())
}

// ---------------------------------------------------------------------------------------------
// Routing

/// Masters learnt per group, shared by the producers (and by `bench consume`'s consumers).
pub(crate) struct Routes {
    nodes: Vec<String>,
    masters: Mutex<HashMap<u64, String>>,
    /// Rotates over `nodes` when a group's master is unknown.
    next: AtomicU64,
}

impl Routes {
    pub(crate) fn new(topology: &Topology, status: &api::ClusterStatusResponse) -> Routes {
        let mut masters = HashMap::new();
        for group in &status.groups {
            if let Some(addr) = topology.addr(group.master).filter(|_| group.master != 0) {
                masters.insert(group.group, addr.to_string());
            }
        }
        Routes {
            nodes: topology.nodes.iter().map(|(_, a)| a.clone()).collect(),
            masters: Mutex::new(masters),
            next: AtomicU64::new(0),
        }
    }

    fn target(&self, group: u64) -> String {
        if let Some(master) = self.masters.lock().expect("routes lock").get(&group) {
            return master.clone();
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.nodes[(turn % self.nodes.len() as u64) as usize].clone()
    }

    fn learn(&self, group: u64, master: String) {
        self.masters
            .lock()
            .expect("routes lock")
            .insert(group, master);
    }

    fn forget(&self, group: u64) {
        self.masters.lock().expect("routes lock").remove(&group);
    }
}

/// The final answer to one call.
pub(crate) struct Answer {
    /// "OK", an error code's name, `TRANSPORT` (a gRPC-level failure: no connection) or
    /// `CLIENT_TIMEOUT` (no answer within the attempt's time).
    pub(crate) label: &'static str,
    /// The node that gave the final answer.
    pub(crate) node: String,
    /// Reasons of the attempts that were retried or redirected, in order.
    pub(crate) retried: Vec<&'static str>,
}

impl Answer {
    pub(crate) fn ok(&self) -> bool {
        self.label == LABEL_OK
    }
}

pub(crate) const LABEL_OK: &str = "OK";
const LABEL_TRANSPORT: &str = "TRANSPORT";
const LABEL_CLIENT_TIMEOUT: &str = "CLIENT_TIMEOUT";
const LABEL_UNKNOWN_CODE: &str = "UNKNOWN_CODE";

/// One producer's (or consumer's) connections, one per node.
pub(crate) type Connections = HashMap<String, api::Client>;

/// What one attempt returns: the response and its `error` field, or a gRPC status.
pub(crate) type Attempt<T> = std::result::Result<(T, Option<api::Error>), tonic::Status>;

/// How [`call`] treats failed attempts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallPolicy {
    /// Whether failed attempts are retried (redirects are followed either way).
    pub(crate) retries: bool,
    /// The call's deadline from its first attempt, retries included.
    pub(crate) timeout: Duration,
    /// How long one attempt may wait for its answer: [`ATTEMPT_TIMEOUT_MS`], plus the wait
    /// of a long poll.
    pub(crate) attempt_timeout: Duration,
}

impl CallPolicy {
    /// The policy of `options`' producers.
    fn of(options: &Options) -> CallPolicy {
        CallPolicy {
            retries: options.retries,
            timeout: options.call_timeout,
            attempt_timeout: Duration::from_millis(ATTEMPT_TIMEOUT_MS),
        }
    }
}

/// Calls `attempt` on the master of `group` until it is answered, as the module documentation
/// says: the final answer and, when it is a success, the response; `None` when `stop` was
/// raised while waiting to retry. `attempt` is any of the protocol's calls about a queue
/// (`Produce`, `Consume`, `Commit`).
pub(crate) async fn call<T, F, Fut>(
    routes: &Routes,
    connections: &mut Connections,
    group: u64,
    policy: &CallPolicy,
    stop: &AtomicBool,
    mut attempt: F,
) -> Option<(Answer, Option<T>)>
where
    F: FnMut(api::Client, &str) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let deadline = Instant::now() + policy.timeout;
    let mut backoff = Duration::from_millis(BACKOFF_MIN_MS);
    let mut redirects = 0;
    let mut retried = Vec::new();
    loop {
        let node = routes.target(group);
        let client = match connections.get(&node) {
            Some(client) => client.clone(),
            None => match connect(&node) {
                Ok(client) => connections.entry(node.clone()).or_insert(client).clone(),
                Err(_) => {
                    let answer = Answer {
                        label: LABEL_TRANSPORT,
                        node,
                        retried,
                    };
                    return Some((answer, None));
                }
            },
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait = remaining.min(policy.attempt_timeout);
        let (label, retryable) = match tokio::time::timeout(wait, attempt(client, &node)).await {
            Ok(Ok((response, error))) => match api::check(error.as_ref()) {
                Ok(()) => {
                    let answer = Answer {
                        label: LABEL_OK,
                        node,
                        retried,
                    };
                    return Some((answer, Some(response)));
                }
                Err(failure) => {
                    let label = failure.code.map_or(LABEL_UNKNOWN_CODE, ErrorCode::name);
                    if failure.code == Some(ErrorCode::NotMaster)
                        && let Some(master) = failure.master_addr.clone()
                        && redirects < REDIRECTS_IN_A_ROW_MAX
                        && Instant::now() < deadline
                    {
                        redirects += 1;
                        retried.push(label);
                        routes.learn(group, master);
                        continue;
                    }
                    (label, failure.is_retryable())
                }
            },
            Ok(Err(_)) => (LABEL_TRANSPORT, true),
            Err(_) => (LABEL_CLIENT_TIMEOUT, true),
        };
        routes.forget(group);
        if !retryable || !policy.retries || Instant::now() + backoff >= deadline {
            let answer = Answer {
                label,
                node,
                retried,
            };
            return Some((answer, None));
        }
        retried.push(label);
        redirects = 0;
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(BACKOFF_MAX_MS));
    }
}

// ---------------------------------------------------------------------------------------------
// Recording

/// Counters of a set of calls.
#[derive(Clone)]
pub(crate) struct Stats {
    calls: u64,
    messages_acked: u64,
    outcomes: BTreeMap<&'static str, u64>,
    retried: BTreeMap<&'static str, u64>,
    buckets: [u64; BUCKETS],
    latency_us: Histogram<u64>,
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            calls: 0,
            messages_acked: 0,
            outcomes: BTreeMap::new(),
            retried: BTreeMap::new(),
            buckets: [0; BUCKETS],
            latency_us: new_histogram(3),
        }
    }

    pub(crate) fn add(&mut self, answer: &Answer, latency: Duration, messages: u64) {
        self.add_outcome(answer.label, &answer.retried, latency, messages);
    }

    /// Counts one outcome labelled `label` (`OK`: `messages` count as acknowledged) and its
    /// latency.
    pub(crate) fn add_outcome(
        &mut self,
        label: &'static str,
        retried: &[&'static str],
        latency: Duration,
        messages: u64,
    ) {
        self.calls += 1;
        if label == LABEL_OK {
            self.messages_acked += messages;
        }
        *self.outcomes.entry(label).or_default() += 1;
        for reason in retried {
            *self.retried.entry(reason).or_default() += 1;
        }
        let millis = latency.as_secs_f64() * 1000.0;
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|bound| millis < *bound as f64)
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket] += 1;
        record(&mut self.latency_us, latency);
    }
}

/// Calls that completed in one second of the run (warmup included).
struct Second {
    ok: u64,
    failed: u64,
    messages_acked: u64,
    latency_us: Histogram<u64>,
}

/// A group whose master was killed, waiting for its first success elsewhere.
struct Watch {
    since: Instant,
    excluded_node: String,
}

/// Everything recorded, behind one lock (a few tens of thousands of calls a second at most).
struct Recorder {
    /// When measuring started; `None` during the warmup.
    measure_from: Option<Instant>,
    /// When measuring stopped.
    measure_until: Option<Instant>,
    interval: Stats,
    interval_from: Instant,
    interval_counters: Counters,
    total: Stats,
    total_counters: Counters,
    timeline: Vec<Second>,
    events: Vec<(Duration, String)>,
    watches: BTreeMap<u64, Watch>,
    watched_since: Option<Instant>,
    first_success: BTreeMap<u64, Option<Duration>>,
}

struct Shared {
    started: Instant,
    recorder: Mutex<Recorder>,
}

impl Shared {
    fn record(&self, group: u64, started: Instant, answer: &Answer, messages: u64) {
        let finished = Instant::now();
        let latency = finished - started;
        let mut recorder = self.recorder.lock().expect("recorder lock");
        let second = (finished - self.started).as_secs();
        if second < RUN_SECONDS_MAX {
            let second = second as usize;
            while recorder.timeline.len() <= second {
                recorder.timeline.push(Second {
                    ok: 0,
                    failed: 0,
                    messages_acked: 0,
                    latency_us: new_histogram(2),
                });
            }
            let slot = &mut recorder.timeline[second];
            if answer.ok() {
                slot.ok += 1;
                slot.messages_acked += messages;
            } else {
                slot.failed += 1;
            }
            record(&mut slot.latency_us, latency);
        }
        if answer.ok()
            && let Some(watch) = recorder.watches.get(&group)
            && finished >= watch.since
            && answer.node != watch.excluded_node
        {
            let took = finished - watch.since;
            recorder.watches.remove(&group);
            recorder.first_success.insert(group, Some(took));
        }
        let measured = recorder.measure_from.is_some_and(|from| started >= from)
            && recorder.measure_until.is_none_or(|until| finished <= until);
        if measured {
            recorder.interval.add(answer, latency, messages);
            recorder.total.add(answer, latency, messages);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reports

/// One latency bucket of a report.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    /// `<1`, `<2`, ... `>=1000` (milliseconds).
    pub label: String,
    /// Calls whose latency fell in it.
    pub count: u64,
}

/// What a set of calls did, in PhxQueue's terms plus HDR percentiles.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `interval` or `total` (`bench consume` adds what is timed: `total end-to-end`).
    pub what: &'static str,
    /// What `messages_acked` counts, as the summary line says it (`acked msgs`; `consumed
    /// msgs` for end-to-end latency, where each "call" is a message's first delivery).
    #[serde(skip)]
    pub messages_are: &'static str,
    /// Wall time covered, in milliseconds.
    pub time_ms: u64,
    /// Calls finished (each waited for its answer, retries included).
    pub total: u64,
    /// `total / time`.
    pub qps: f64,
    /// Messages acknowledged.
    pub messages_acked: u64,
    /// Acknowledged messages per second.
    pub msgs_per_sec: f64,
    /// Acknowledged value bytes per second, in 10^6 bytes.
    pub mb_per_sec: f64,
    /// Final outcome of each call: `OK`, an error code's name, `TRANSPORT`, `CLIENT_TIMEOUT`.
    pub return_codes: BTreeMap<String, u64>,
    /// Attempts retried or redirected before their call's final answer, by reason.
    pub retried_attempts: BTreeMap<String, u64>,
    /// Latency buckets, PhxQueue's bounds.
    pub buckets: Vec<Bucket>,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, in milliseconds.
    pub p999_ms: f64,
    /// Slowest call, in milliseconds.
    pub max_ms: f64,
    /// The machine meanwhile.
    pub usage: Usage,
    /// Acknowledged messages per disk flush (every replica's fsyncs count: a lower bound on
    /// the store's group-commit batch per fsync, divided by the replicas).
    pub messages_per_flush: Option<f64>,
    /// The store's own counters over the report's time (total reports of [`run`] only).
    pub store: Option<StoreFigures>,
}

/// What the store's nodes did, from the counters in their `ClusterStatus` answers.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StoreFigures {
    /// Nodes whose counters were read before and after.
    pub nodes: usize,
    /// Event-loop rounds per second, all nodes.
    pub rounds_per_sec: f64,
    /// `fdatasync`s per second, all nodes.
    pub syncs_per_sec: f64,
    /// Raft entries proposed by masters per second, all nodes.
    pub proposals_per_sec: f64,
    /// Messages per proposed entry: how much the masters' rounds batch.
    pub messages_per_proposal: f64,
    /// Messages proposed per sync of one node (each message is synced on every replica):
    /// `messages × nodes / syncs`.
    pub message_copies_per_sync: f64,
}

impl Report {
    pub(crate) fn of(
        what: &'static str,
        stats: &Stats,
        elapsed: Duration,
        message_bytes: usize,
        usage: Usage,
    ) -> Report {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let quantile = |q: f64| {
            if stats.latency_us.is_empty() {
                0.0
            } else {
                stats.latency_us.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let mut labels: Vec<String> = BUCKET_BOUNDS_MS.iter().map(|b| format!("<{b}")).collect();
        labels.push(format!(">={}", BUCKET_BOUNDS_MS[BUCKETS - 2]));
        Report {
            what,
            messages_are: "acked msgs",
            time_ms: elapsed.as_millis() as u64,
            total: stats.calls,
            qps: stats.calls as f64 / seconds,
            messages_acked: stats.messages_acked,
            msgs_per_sec: stats.messages_acked as f64 / seconds,
            mb_per_sec: (stats.messages_acked as f64 * message_bytes as f64) / seconds / 1e6,
            return_codes: stats
                .outcomes
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            retried_attempts: stats
                .retried
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            buckets: labels
                .into_iter()
                .zip(stats.buckets)
                .map(|(label, count)| Bucket { label, count })
                .collect(),
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            p999_ms: quantile(0.999),
            max_ms: if stats.latency_us.is_empty() {
                0.0
            } else {
                stats.latency_us.max() as f64 / 1000.0
            },
            messages_per_flush: if usage.disk_flushes_per_sec > 0.0 {
                Some(stats.messages_acked as f64 / seconds / usage.disk_flushes_per_sec)
            } else {
                None
            },
            usage,
            store: None,
        }
    }

    /// PhxQueue's report: a summary line, the return codes, the latency buckets, then the
    /// HDR percentiles and retried attempts.
    pub fn render(&self) -> String {
        let percent = |count: u64| {
            if self.total == 0 {
                0.0
            } else {
                count as f64 * 100.0 / self.total as f64
            }
        };
        let mut out = format!(
            "{}: total {} time(ms) {} qps {:.0} ({}/s {:.0}, {:.1} MB/s)\n",
            self.what,
            self.total,
            self.time_ms,
            self.qps,
            self.messages_are,
            self.msgs_per_sec,
            self.mb_per_sec
        );
        out += &format!("  {:<22} {:>10} {:>9}\n", "retcode", "count", "percent");
        for (code, count) in &self.return_codes {
            out += &format!("  {code:<22} {count:>10} {:>8.2}%\n", percent(*count));
        }
        out += &format!("  {:<22} {:>10} {:>9}\n", "latency(ms)", "count", "percent");
        for bucket in &self.buckets {
            out += &format!(
                "  {:<22} {:>10} {:>8.2}%\n",
                bucket.label,
                bucket.count,
                percent(bucket.count)
            );
        }
        out += &format!(
            "  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        );
        out += &format!(
            "  machine: {:.2} cores busy (client {:.2}, server {}), {:.0} disk flushes/s{}\n",
            self.usage.busy_cores,
            self.usage.client_cores,
            self.usage
                .server_cores
                .map_or("not measured".to_string(), |cores| format!("{cores:.2}")),
            self.usage.disk_flushes_per_sec,
            self.messages_per_flush.map_or(String::new(), |m| format!(
                " ({m:.1} {} per flush)",
                self.messages_are
            ))
        );
        if let Some(store) = &self.store {
            out += &format!(
                "  store ({} nodes): {:.0} rounds/s, {:.0} fsyncs/s, {:.0} entries proposed/s, \
                 {:.2} msgs per entry, {:.2} message copies per fsync\n",
                store.nodes,
                store.rounds_per_sec,
                store.syncs_per_sec,
                store.proposals_per_sec,
                store.messages_per_proposal,
                store.message_copies_per_sync
            );
        }
        if !self.retried_attempts.is_empty() {
            let retried: Vec<String> = self
                .retried_attempts
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect();
            out += &format!("  retried or redirected attempts: {}\n", retried.join(", "));
        }
        out
    }
}

/// One second of a failover run.
#[derive(Clone, Debug, Serialize)]
pub struct SecondFigures {
    /// Seconds since the producers started (warmup included).
    pub second: u64,
    /// Calls that succeeded in this second.
    pub ok: u64,
    /// Calls that failed in this second (after their retries).
    pub failed: u64,
    /// `ok / (ok + failed)`, in percent (100 when no call finished).
    pub success_percent: f64,
    /// Messages acknowledged in this second.
    pub acked: u64,
    /// Median latency of the calls that finished in this second, in milliseconds.
    pub p50_ms: f64,
    /// Their 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// The slowest of them, in milliseconds.
    pub max_ms: f64,
    /// What the caller marked in this second (`kill -9 node 2`, ...).
    pub events: Vec<String>,
}

/// The timeline of a run and, after a master was killed, how long each of its groups went
/// without a successful call.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    /// Every second of the run.
    pub seconds: Vec<SecondFigures>,
    /// Per watched group: milliseconds from the kill to its first success on another node
    /// (`None`: no success before the end).
    pub first_success_ms: BTreeMap<u64, Option<f64>>,
    /// Median of `first_success_ms` over the groups that recovered.
    pub median_ms: Option<f64>,
    /// Largest of `first_success_ms` (`None` if a group never recovered).
    pub max_ms: Option<f64>,
}

impl FailoverReport {
    /// The per-second table, one line per second.
    pub fn render_seconds(&self) -> String {
        let mut out = format!(
            "  {:>6} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}  events\n",
            "second", "ok", "failed", "success%", "acked", "p50_ms", "p99_ms", "max_ms"
        );
        for s in &self.seconds {
            out += &format!(
                "  {:>6} {:>8} {:>7} {:>9.2} {:>8} {:>8.1} {:>8.1} {:>8.1}  {}\n",
                s.second,
                s.ok,
                s.failed,
                s.success_percent,
                s.acked,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.events.join("; ")
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// A running load

/// Producers running against a store until [`Load::finish`].
pub struct Load {
    options: Arc<Options>,
    topology: Topology,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    producers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Discovers the store and starts the producers (warming up: nothing is measured until
    /// [`Load::begin_measuring`]). Must be called within a tokio runtime.
    pub async fn start(options: Options) -> Result<Load> {
        options.validate()?;
        let (topology, status) = discover(&options.server, &options.topic).await?;
        let routes = Arc::new(Routes::new(&topology, &status));
        let now = Instant::now();
        let shared = Arc::new(Shared {
            started: now,
            recorder: Mutex::new(Recorder {
                measure_from: None,
                measure_until: None,
                interval: Stats::new(),
                interval_from: now,
                interval_counters: Counters::now(&options.server_pids),
                total: Stats::new(),
                total_counters: Counters::now(&options.server_pids),
                timeline: Vec::new(),
                events: Vec::new(),
                watches: BTreeMap::new(),
                watched_since: None,
                first_success: BTreeMap::new(),
            }),
        });
        let options = Arc::new(options);
        let stop = Arc::new(AtomicBool::new(false));
        let producers = (0..options.producers)
            .map(|index| {
                let queue = (index as u64 % u64::from(topology.queues)) as u32;
                let group = u64::from(queue % topology.groups);
                tokio::spawn(producer(
                    topology.store_id,
                    queue,
                    group,
                    routes.clone(),
                    shared.clone(),
                    options.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Ok(Load {
            options,
            topology,
            shared,
            stop,
            producers,
        })
    }

    /// The store as found at the start.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The groups that carry load: those of the queues some producer writes.
    pub fn loaded_groups(&self) -> Vec<u64> {
        let written = (self.options.producers as u64).min(u64::from(self.topology.queues));
        let mut groups: Vec<u64> = (0..written)
            .map(|queue| queue % u64::from(self.topology.groups))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Ends the warmup: reports count calls started from now on.
    pub fn begin_measuring(&self) {
        let now = Instant::now();
        let mut recorder = self.shared.recorder.lock().expect("recorder lock");
        let counters = Counters::now(&self.options.server_pids);
        recorder.measure_from = Some(now);
        recorder.interval = Stats::new();
        recorder.interval_from = now;
        recorder.interval_counters = counters.clone();
        recorder.total = Stats::new();
        recorder.total_counters = counters;
    }

    /// The report of the calls measured since the previous interval report, and a new
    /// interval.
    pub fn take_interval(&self) -> Report {
        let now = Instant::now();
        let counters = Counters::now(&self.options.server_pids);
        let mut recorder = self.shared.recorder.lock().expect("recorder lock");
        let interval = std::mem::replace(&mut recorder.interval, Stats::new());
        let elapsed = now - std::mem::replace(&mut recorder.interval_from, now);
        let usage = counters.usage_since(&recorder.interval_counters);
        recorder.interval_counters = counters;
        Report::of(
            "interval",
            &interval,
            elapsed,
            self.options.message_bytes,
            usage,
        )
    }

    /// Notes an event in the timeline at this second.
    pub fn mark(&self, event: impl Into<String>) {
        let at = self.shared.started.elapsed();
        let mut recorder = self.shared.recorder.lock().expect("recorder lock");
        recorder.events.push((at, event.into()));
    }

    /// From now on, times each of `groups` until a call on it succeeds on a node other than
    /// `lost_node` (the client address of the node just killed).
    pub fn watch_failover(&self, groups: &[u64], lost_node: &str) {
        let since = Instant::now();
        let mut recorder = self.shared.recorder.lock().expect("recorder lock");
        recorder.watched_since = Some(since);
        for group in groups {
            recorder.first_success.insert(*group, None);
            recorder.watches.insert(
                *group,
                Watch {
                    since,
                    excluded_node: lost_node.to_string(),
                },
            );
        }
    }

    /// The timeline so far and the failover times of the watched groups.
    pub fn failover_report(&self) -> FailoverReport {
        let recorder = self.shared.recorder.lock().expect("recorder lock");
        let seconds = recorder
            .timeline
            .iter()
            .enumerate()
            .map(|(second, s)| {
                let calls = s.ok + s.failed;
                let quantile = |q: f64| {
                    if s.latency_us.is_empty() {
                        0.0
                    } else {
                        s.latency_us.value_at_quantile(q) as f64 / 1000.0
                    }
                };
                SecondFigures {
                    second: second as u64,
                    ok: s.ok,
                    failed: s.failed,
                    success_percent: if calls == 0 {
                        100.0
                    } else {
                        s.ok as f64 * 100.0 / calls as f64
                    },
                    acked: s.messages_acked,
                    p50_ms: quantile(0.5),
                    p99_ms: quantile(0.99),
                    max_ms: if s.latency_us.is_empty() {
                        0.0
                    } else {
                        s.latency_us.max() as f64 / 1000.0
                    },
                    events: recorder
                        .events
                        .iter()
                        .filter(|(at, _)| at.as_secs() == second as u64)
                        .map(|(_, event)| event.clone())
                        .collect(),
                }
            })
            .collect();
        let first_success_ms: BTreeMap<u64, Option<f64>> = recorder
            .first_success
            .iter()
            .map(|(group, took)| (*group, took.map(|t| t.as_secs_f64() * 1000.0)))
            .collect();
        let mut recovered: Vec<f64> = first_success_ms.values().flatten().copied().collect();
        recovered.sort_by(f64::total_cmp);
        let median_ms = (!recovered.is_empty()).then(|| median(&recovered));
        let all_recovered = first_success_ms.values().all(Option::is_some);
        FailoverReport {
            seconds,
            first_success_ms,
            median_ms,
            max_ms: recovered.last().copied().filter(|_| all_recovered),
        }
    }

    /// Stops the producers (a call in flight finishes or is abandoned while waiting to retry)
    /// and returns the report of everything measured and the timeline.
    pub async fn finish(mut self) -> (Report, FailoverReport) {
        let until = Instant::now();
        let counters = Counters::now(&self.options.server_pids);
        let from = {
            let mut recorder = self.shared.recorder.lock().expect("recorder lock");
            recorder.measure_until = Some(until);
            recorder.measure_from.unwrap_or(until)
        };
        self.stop.store(true, Ordering::SeqCst);
        let limit = self.options.call_timeout + Duration::from_millis(ATTEMPT_TIMEOUT_MS);
        for producer in self.producers.drain(..) {
            // A producer stuck past its own deadline is abandoned: its call is not counted.
            let abort = producer.abort_handle();
            if tokio::time::timeout(limit, producer).await.is_err() {
                abort.abort();
            }
        }
        let report = {
            let recorder = self.shared.recorder.lock().expect("recorder lock");
            let usage = counters.usage_since(&recorder.total_counters);
            Report::of(
                "total",
                &recorder.total,
                until - from,
                self.options.message_bytes,
                usage,
            )
        };
        (report, self.failover_report())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for producer in &self.producers {
            producer.abort();
        }
    }
}

/// One producer: calls on `queue` of store `store_id`, one at a time, until `stop`.
async fn producer(
    store_id: u64,
    queue: u32,
    group: u64,
    routes: Arc<Routes>,
    shared: Arc<Shared>,
    options: Arc<Options>,
    stop: Arc<AtomicBool>,
) {
    let value = payload(options.message_bytes);
    let request = api::ProduceRequest {
        store_id,
        message_id: Vec::new(),
        topic: options.topic.clone(),
        queue,
        messages: vec![
            api::Message {
                key: Vec::new(),
                value,
            };
            options.batch
        ],
    };
    let mut pacing = (options.qps > 0).then(|| pacing(options.producers, options.qps));
    let policy = CallPolicy::of(&options);
    let mut connections = Connections::new();
    // This producer's open `ProduceStream`s, by node (with `options.stream`).
    let streams = Arc::new(tokio::sync::Mutex::new(
        HashMap::<String, ProduceStream>::new(),
    ));
    while !stop.load(Ordering::Relaxed) {
        if let Some(interval) = &mut pacing {
            interval.tick().await;
        }
        let started = Instant::now();
        let produce = |mut client: api::Client, node: &str| {
            let request = request.clone();
            let (streams, node) = (streams.clone(), node.to_string());
            let stream = options.stream;
            async move {
                let response = if stream {
                    ProduceStream::produce(&streams, client, node, request).await?
                } else {
                    client.produce(request).await?.into_inner()
                };
                let error = response.error.clone();
                Ok((response, error))
            }
        };
        let Some((answer, _)) =
            call(&routes, &mut connections, group, &policy, &stop, produce).await
        else {
            break;
        };
        shared.record(group, started, &answer, options.batch as u64);
    }
}

/// One producer's `ProduceStream` to one node: a request is sent, then its answer awaited.
struct ProduceStream {
    requests: tokio::sync::mpsc::Sender<api::ProduceStreamRequest>,
    answers: tonic::Streaming<api::ProduceStreamResponse>,
    next_id: u64,
}

impl ProduceStream {
    /// Sends `request` on the producer's stream to `node` (opened first if need be) and waits
    /// for its answer. A failed stream is dropped, so the next attempt opens a new one.
    async fn produce(
        streams: &tokio::sync::Mutex<HashMap<String, ProduceStream>>,
        mut client: api::Client,
        node: String,
        request: api::ProduceRequest,
    ) -> std::result::Result<api::ProduceResponse, tonic::Status> {
        let mut streams = streams.lock().await;
        if !streams.contains_key(&node) {
            let (requests, outgoing) = tokio::sync::mpsc::channel(1);
            let outgoing = tokio_stream::wrappers::ReceiverStream::new(outgoing);
            let answers = client.produce_stream(outgoing).await?.into_inner();
            let stream = ProduceStream {
                requests,
                answers,
                next_id: 1,
            };
            streams.insert(node.clone(), stream);
        }
        let stream = streams.get_mut(&node).expect("inserted above");
        let answer = stream.round_trip(request).await;
        if answer.is_err() {
            streams.remove(&node);
        }
        answer
    }

    async fn round_trip(
        &mut self,
        request: api::ProduceRequest,
    ) -> std::result::Result<api::ProduceResponse, tonic::Status> {
        let id = self.next_id;
        self.next_id += 1;
        let request = api::ProduceStreamRequest {
            id,
            request: Some(request),
        };
        if self.requests.send(request).await.is_err() {
            return Err(tonic::Status::unavailable("the produce stream closed"));
        }
        loop {
            match self.answers.message().await? {
                // The answer to an attempt given up on (its time ran out): skipped.
                Some(answer) if answer.id < id => continue,
                Some(answer) if answer.id == id => {
                    return answer
                        .response
                        .ok_or_else(|| tonic::Status::internal("an answer without a response"));
                }
                Some(answer) => {
                    return Err(tonic::Status::internal(format!(
                        "answer {} to request {id}",
                        answer.id
                    )));
                }
                None => return Err(tonic::Status::unavailable("the produce stream ended")),
            }
        }
    }
}

/// The pace of one of `producers` producers sharing `qps` calls/s (above zero): a tick every
/// `producers / qps` seconds; a producer that falls behind sends at once but never bursts to
/// catch up.
pub(crate) fn pacing(producers: usize, qps: u64) -> tokio::time::Interval {
    assert!(
        qps > 0 && producers > 0,
        "pacing needs a rate and producers"
    );
    let period = Duration::from_secs_f64(producers as f64 / qps as f64);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// Runs `options` to the end: the warmup, then the measured time, handing `on_interval` a
/// report every `report_every`; returns the report of the whole measured time.
pub async fn run(options: &Options, mut on_interval: impl FnMut(&Report)) -> Result<Report> {
    let load = Load::start(options.clone()).await?;
    let addrs: Vec<String> = load
        .topology()
        .nodes
        .iter()
        .map(|(_, a)| a.clone())
        .collect();
    tokio::time::sleep(options.warmup).await;
    load.begin_measuring();
    let counters_before = node_counters(&addrs).await;
    let counted_from = Instant::now();
    let end = Instant::now() + options.duration;
    let intervals_max = options.duration.as_millis() / options.report_every.as_millis() + 1;
    for _ in 0..intervals_max {
        let next = (Instant::now() + options.report_every).min(end);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= end {
            break;
        }
        on_interval(&load.take_interval());
    }
    let (mut report, _) = load.finish().await;
    let counters_after = node_counters(&addrs).await;
    let seconds = counted_from.elapsed().as_secs_f64();
    report.store = store_figures(&counters_before, &counters_after, seconds);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The disk yardstick

/// The raw disk's fsync rate right now: one thread appending [`FSYNC_PROBE_BLOCK_BYTES`] to a
/// new file in `dir` and `fdatasync`ing after each, for `duration` (the peer scripts' probe).
/// Returns syncs per second. Blocking; the file is removed.
pub fn fsync_probe(dir: &Path, duration: Duration) -> Result<f64> {
    let path = dir.join(format!(".phxq-fsync-probe-{}", std::process::id()));
    let fail = |source| Error::Probe {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(fail)?;
    let block = payload(FSYNC_PROBE_BLOCK_BYTES);
    let start = Instant::now();
    let mut offset = 0u64;
    let mut syncs = 0u64;
    let outcome = loop {
        if start.elapsed() >= duration || offset >= FSYNC_PROBE_FILE_BYTES_MAX {
            break Ok(());
        }
        if let Err(error) = file
            .write_all_at(&block, offset)
            .and_then(|()| file.sync_data())
        {
            break Err(error);
        }
        offset += block.len() as u64;
        syncs += 1;
    };
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    let removed = std::fs::remove_file(&path);
    outcome.map_err(fail)?;
    removed.map_err(fail)?;
    Ok(syncs as f64 / seconds.max(1e-9))
}

// ---------------------------------------------------------------------------------------------
// Where time goes

/// What the machine did over a report's time, from `/proc` counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// CPU cores busy over the whole machine (user, system, interrupts, steal).
    pub busy_cores: f64,
    /// CPU cores used by this process (the producers).
    pub client_cores: f64,
    /// CPU cores used by the server processes given, if any.
    pub server_cores: Option<f64>,
    /// Flush requests completed by whole disks per second (`/proc/diskstats` field 19): every
    /// `fdatasync` that reaches the device issues at least one.
    pub disk_flushes_per_sec: f64,
}

/// A snapshot of the counters behind [`Usage`]; a counter that cannot be read counts zero.
#[derive(Clone, Debug)]
pub(crate) struct Counters {
    at: Instant,
    busy_ticks: f64,
    own_ticks: f64,
    server_ticks: Option<f64>,
    disk_flushes: f64,
    pids: Vec<u32>,
}

impl Counters {
    pub(crate) fn now(pids: &[u32]) -> Counters {
        Counters {
            at: Instant::now(),
            busy_ticks: machine_busy_ticks(),
            own_ticks: process_ticks("self"),
            server_ticks: (!pids.is_empty())
                .then(|| pids.iter().map(|pid| process_ticks(&pid.to_string())).sum()),
            disk_flushes: disk_flushes(),
            pids: pids.to_vec(),
        }
    }

    pub(crate) fn usage_since(&self, earlier: &Counters) -> Usage {
        let seconds = (self.at - earlier.at).as_secs_f64().max(1e-9);
        let cores = |ticks: f64| ticks / PROC_TICKS_PER_SEC / seconds;
        Usage {
            busy_cores: cores(self.busy_ticks - earlier.busy_ticks),
            client_cores: cores(self.own_ticks - earlier.own_ticks),
            server_cores: match (self.server_ticks, earlier.server_ticks) {
                (Some(now), Some(then)) if self.pids == earlier.pids => Some(cores(now - then)),
                _ => None,
            },
            disk_flushes_per_sec: (self.disk_flushes - earlier.disk_flushes) / seconds,
        }
    }
}

/// Busy clock ticks of every CPU since boot: the first line of `/proc/stat` minus idle and
/// iowait.
fn machine_busy_ticks() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    if ticks.len() < 8 {
        return 0.0;
    }
    ticks.iter().sum::<f64>() - ticks[3] - ticks[4]
}

/// User plus system clock ticks of process `pid` (`self` for this one), from
/// `/proc/PID/stat` fields 14 and 15 (after the parenthesised command name).
fn process_ticks(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0)
}

/// Flush requests completed by whole disks (`vdX`, `sdX`, `xvdX`, `nvmeXnY`), summed.
fn disk_flushes() -> f64 {
    let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    stats
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let device = *fields.get(2)?;
            let whole_disk = ((device.starts_with("vd")
                || device.starts_with("sd")
                || device.starts_with("xvd"))
                && !device.ends_with(|c: char| c.is_ascii_digit()))
                || (device.starts_with("nvme") && !device.contains('p'));
            whole_disk.then(|| fields.get(18)?.parse::<f64>().ok())?
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn new_histogram(significant_figures: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, significant_figures)
        .expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// Message contents: a fixed, non-zero pattern.
pub(crate) fn payload(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| b'a' + (i % 26) as u8).collect()
}

/// The median of sorted, non-empty `values`.
fn median(values: &[f64]) -> f64 {
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(label: &'static str) -> Answer {
        Answer {
            label,
            node: "n".to_string(),
            retried: vec!["NOT_MASTER"],
        }
    }

    #[test]
    fn calls_land_in_phxqueues_buckets_and_codes_are_counted() {
        let mut stats = Stats::new();
        for (ms, label) in [
            (0.5, LABEL_OK),
            (1.0, LABEL_OK),
            (999.0, "NO_MASTER"),
            (1000.0, LABEL_OK),
        ] {
            stats.add(&answer(label), Duration::from_secs_f64(ms / 1000.0), 2);
        }
        assert_eq!(stats.buckets, [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        let report = Report::of(
            "total",
            &stats,
            Duration::from_secs(2),
            1000,
            Usage::default(),
        );
        assert_eq!(report.total, 4);
        assert_eq!(report.messages_acked, 6);
        assert_eq!(report.return_codes["OK"], 3);
        assert_eq!(report.return_codes["NO_MASTER"], 1);
        assert_eq!(report.retried_attempts["NOT_MASTER"], 4);
        assert!((report.qps - 2.0).abs() < 1e-9);
        assert!((report.msgs_per_sec - 3.0).abs() < 1e-9);
        assert_eq!(report.buckets[10].label, ">=1000");
        let text = report.render();
        assert!(
            text.contains("total: total 4 time(ms) 2000 qps 2"),
            "{text}"
        );
        assert!(text.contains("75.00%"), "{text}");
    }

    #[test]
    fn options_are_bounded() {
        assert!(Options::default().validate().is_ok());
        for bad in [
            Options {
                producers: 0,
                ..Options::default()
            },
            Options {
                batch: BATCH_MESSAGES_MAX + 1,
                ..Options::default()
            },
            Options {
                message_bytes: MESSAGE_BYTES_MAX + 1,
                ..Options::default()
            },
            Options {
                duration: Duration::ZERO,
                ..Options::default()
            },
            Options {
                report_every: Duration::from_millis(10),
                ..Options::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn proc_counters_move() {
        let before = Counters::now(&[std::process::id()]);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(machine_busy_ticks());
        }
        let usage = Counters::now(&[std::process::id()]).usage_since(&before);
        assert!(usage.client_cores > 0.0, "{usage:?}");
        assert!(usage.server_cores.is_some());
        assert!(usage.busy_cores > 0.0, "{usage:?}");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
    }

    #[test]
    fn the_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rate = fsync_probe(dir.path(), Duration::from_millis(50)).expect("probe");
        assert!(rate > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
    }
}
