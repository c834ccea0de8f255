//! Routing and retries: which node to call for a replication group, and what to do with its
//! answer.
//!
//! * **The layout** (groups, topics and their queue counts, the nodes' client addresses) and
//!   a first guess of every group's master come from `ClusterStatus`, asked of one node
//!   after another (the configured servers until the store's own node list is known).
//! * **Masters are cached** per group. A call about a queue goes to its group's cached
//!   master, or, when none is known, to the next node in turn (which redirects). `NOT_MASTER`
//!   with an address moves the cache and is followed at once ([`REDIRECTS_IN_A_ROW_MAX`] in a
//!   row, then like a retry); an unreachable node, `NOT_MASTER` without an address,
//!   `NO_MASTER`, `UNAVAILABLE` and `INDETERMINATE` clear the group's entry; `BUSY` and
//!   `TIMEOUT` keep it (a working master answered them).
//! * **Retries** (`NO_MASTER`, `BUSY`, `UNAVAILABLE`, `INDETERMINATE`, `TIMEOUT`, transport
//!   failures, attempts with no answer in time) wait a jittered exponential backoff and stop
//!   when the next wait would pass the request's deadline. After an unreachable node (or
//!   `UNAVAILABLE`, a node stopping) the layout and masters are asked again of another node,
//!   at most one such refresh in flight per producer.
//! * **Every request is bounded**: by its deadline (each attempt's timeout is capped by what
//!   is left of it) and so in attempts; channels are cached per address, at most
//!   [`CHANNELS_MAX`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phxq_proto::api::{self, Failure};
use phxq_types::{ErrorCode, GroupId, Rng};

use crate::backoff::Backoff;
use crate::config::{ProducerConfig, check_address};
use crate::connect::{endpoint, tls_mismatch};
use crate::error::{ErrorKind, ProduceError};

/// Redirects (`NOT_MASTER` with an address) followed in a row without a pause: masters can
/// move while we chase them, and two confused nodes must not bounce us forever.
pub const REDIRECTS_IN_A_ROW_MAX: u32 = 3;
/// How long connecting to a node may take (a refused connection fails at once).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Channels kept at most (one per node address met); beyond, the cache starts over, which
/// only drops connections to addresses no longer in use.
pub const CHANNELS_MAX: usize = 64;

/// The longest a long poll extends an attempt's timeout and its request's deadline here.
const SERVER_WAIT_MAX: Duration = Duration::from_secs(3600);

/// What one attempt returns: the response and its `error` field, or a gRPC status.
pub(crate) type Attempt<T> = Result<(T, Option<api::Error>), tonic::Status>;

/// The store as learnt from `ClusterStatus`.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Replication groups of the store (queue `q` is in group `q mod groups`).
    pub(crate) groups: u32,
    /// Queue count per topic name.
    pub(crate) topics: HashMap<String, u32>,
    /// Per topic name, the operator's per consumer group settings from the topic's config
    /// (`TopicConfig::group_settings`; topics without any are absent). Consumers apply them
    /// (`consumer_settings.rs`); the store only validates and replicates them.
    pub(crate) group_settings: HashMap<String, Vec<api::ConsumerGroupSettings>>,
    /// Client addresses of the store's nodes, ordered by node id.
    pub(crate) nodes: Vec<String>,
    /// When it was learnt.
    pub(crate) learnt_at: Instant,
}

impl Layout {
    /// The store's settings of `consumer_group` for `topic`, if the operator set any.
    pub(crate) fn group_settings(
        &self,
        topic: &str,
        consumer_group: &str,
    ) -> Option<&api::ConsumerGroupSettings> {
        self.group_settings
            .get(topic)?
            .iter()
            .find(|settings| settings.consumer_group == consumer_group)
    }
}

/// What the producer currently believes about the store.
#[derive(Default)]
struct Routes {
    layout: Option<Arc<Layout>>,
    /// The client address of each group's master, as last learnt.
    masters: HashMap<GroupId, String>,
}

/// Counters behind [`crate::ProducerStats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) produce_calls: AtomicU64,
    pub(crate) status_calls: AtomicU64,
    pub(crate) redirects: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) queue_changes: AtomicU64,
    pub(crate) uncertain_attempts: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why [`Router::call`] stopped without a value.
pub(crate) enum Halt {
    /// Give up with this error.
    Error(ProduceError),
    /// The group has no reachable master and the caller asked to hear of it (queue-change
    /// retry): the caller pauses ([`Progress::pause`]) and tries elsewhere.
    MasterMissing,
}

/// What a retry should know about the failed attempt.
#[derive(Clone, Copy, Debug)]
struct Verdict {
    /// The group looks masterless (no master, or the one tried cannot be reached): a reason
    /// for queue-change retry.
    masterless: bool,
    /// The node tried is unreachable or stopping: ask another for the layout and masters.
    refresh: bool,
}

/// The last retryable trouble of a request, reported if its deadline passes.
#[derive(Clone, Debug)]
enum Trouble {
    Refused(Failure),
    Transport(String),
}

/// One request's way through its retries: deadline, attempts, backoff, uncertainty.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    started: Instant,
    /// When this attempt series gives up: the request's deadline, or earlier while a
    /// store-change retry limits the time spent in one store ([`Progress::limit_to`]).
    deadline: Instant,
    /// The request's own deadline.
    request_deadline: Instant,
    attempts: u32,
    backoff: Backoff,
    /// An attempt to write ended without a known outcome.
    maybe_stored: bool,
    redirects_in_a_row: u32,
    last: Option<Trouble>,
    /// How long the server may hold each attempt before answering (a long poll), added to
    /// the attempt timeout.
    server_wait: Duration,
}

impl Progress {
    /// Lets each attempt wait `wait` longer for its answer (a long poll), and the request as
    /// much longer for its deadline. At most [`SERVER_WAIT_MAX`] here: a longer wait is the
    /// store's to refuse (`INVALID_ARGUMENT`; its own limit is 60 s), not an overflow of the
    /// client's clock arithmetic.
    pub(crate) fn allow_server_wait(&mut self, wait: Duration) {
        let wait = wait.min(SERVER_WAIT_MAX);
        self.server_wait = wait;
        self.deadline += wait;
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Gives up `budget` from now at the latest (never after the request's deadline): the
    /// time one store gets before store-change retry moves on.
    pub(crate) fn limit_to(&mut self, budget: Duration) {
        self.deadline = self.request_deadline.min(Instant::now() + budget);
    }

    /// Back to the request's own deadline, after [`Progress::limit_to`].
    pub(crate) fn unlimit(&mut self) {
        self.deadline = self.request_deadline;
    }

    /// Whether the request's own deadline is still ahead.
    pub(crate) fn time_left(&self) -> bool {
        Instant::now() < self.request_deadline
    }

    /// Takes in what `other`, a copy of this request's progress that went its own way (to
    /// another store), met: its attempts (the larger count), its uncertainty, its trouble.
    pub(crate) fn absorb(&mut self, other: &Progress) {
        self.attempts = self.attempts.max(other.attempts);
        self.maybe_stored |= other.maybe_stored;
        if other.last.is_some() {
            self.last.clone_from(&other.last);
        }
    }

    /// Notes that a write's outcome is unknown (the node answered success but made no sense).
    pub(crate) fn set_maybe_stored(&mut self) {
        self.maybe_stored = true;
    }

    /// `error` with this request's attempts and uncertainty.
    pub(crate) fn fail(&self, error: ProduceError) -> ProduceError {
        error.after(self.attempts, self.maybe_stored)
    }

    /// How long the next attempt may wait for its answer.
    fn attempt_timeout(&self, limit: Duration) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(limit + self.server_wait)
    }

    /// Waits the next backoff delay; fails (with the last trouble met) instead when the
    /// delay would end at or past the deadline.
    pub(crate) async fn pause(&mut self) -> Result<(), ProduceError> {
        let delay = self.backoff.next_delay();
        if Instant::now() + delay >= self.deadline {
            return Err(self.give_up());
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn give_up(&self) -> ProduceError {
        let error = match &self.last {
            Some(Trouble::Refused(failure)) => ProduceError::from_failure(failure),
            Some(Trouble::Transport(detail)) => {
                ProduceError::new(ErrorKind::Unreachable, None, detail.clone())
            }
            None => ProduceError::new(ErrorKind::Unreachable, None, "no attempt could be made"),
        };
        self.fail(error)
    }
}

/// Channels to the store's nodes and what is known of its layout and masters. Shared by
/// every clone of a [`crate::Producer`].
pub(crate) struct Router {
    config: ProducerConfig,
    /// Sent on every call (`ProducerConfig::token`).
    token: api::BearerToken,
    channels: Mutex<HashMap<String, api::Client>>,
    routes: Mutex<Routes>,
    /// Held while a refresh after a failure is in flight: at most one at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Rotates over the nodes when no master is known.
    next_node: AtomicUsize,
    /// Seeds each request's backoff jitter.
    rng: Mutex<Rng>,
    pub(crate) counters: Counters,
    /// Single-queue produces over `ProduceStream` (with `ProducerConfig::produce_streams`).
    pub(crate) streams: crate::produce_stream::Streams,
}

impl Router {
    /// A router for a validated `config`. Connects to nothing yet.
    pub(crate) fn new(config: ProducerConfig) -> Router {
        let mut rng = Rng::new(seed());
        let next_node = rng.below(config.servers.len() as u64) as usize;
        let token = api::BearerToken::new(config.token.as_deref()).expect("a validated config");
        Router {
            config,
            token,
            channels: Mutex::new(HashMap::new()),
            routes: Mutex::new(Routes::default()),
            refreshing: tokio::sync::Mutex::new(()),
            next_node: AtomicUsize::new(next_node),
            rng: Mutex::new(rng),
            counters: Counters::default(),
            streams: crate::produce_stream::Streams::default(),
        }
    }

    pub(crate) fn config(&self) -> &ProducerConfig {
        &self.config
    }

    /// A draw from the producer's generator (spreads round-robin starts).
    pub(crate) fn random(&self) -> u64 {
        lock(&self.rng).next_u64()
    }

    /// The progress of a new request, whose deadline starts now.
    pub(crate) fn start_request(&self) -> Progress {
        let started = Instant::now();
        let rng = lock(&self.rng).fork();
        Progress {
            started,
            deadline: started + self.config.deadline,
            request_deadline: started + self.config.deadline,
            attempts: 0,
            backoff: Backoff::new(self.config.backoff_initial, self.config.backoff_max, rng),
            maybe_stored: false,
            redirects_in_a_row: 0,
            last: None,
            server_wait: Duration::ZERO,
        }
    }

    // -----------------------------------------------------------------------------------------
    // The layout

    /// The store's layout: the cached one, or asked of a node now.
    pub(crate) async fn layout(
        &self,
        progress: &mut Progress,
    ) -> Result<Arc<Layout>, ProduceError> {
        if let Some(layout) = lock(&self.routes).layout.clone() {
            return Ok(layout);
        }
        self.learn_layout(progress).await
    }

    /// The queue count of `topic`. A topic missing from a layout learnt before this request
    /// started is looked up once more (the cache may predate a store change).
    pub(crate) async fn topic_queues(
        &self,
        topic: &str,
        progress: &mut Progress,
    ) -> Result<(Arc<Layout>, u32), ProduceError> {
        let mut layout = self.layout(progress).await?;
        if !layout.topics.contains_key(topic) && layout.learnt_at < progress.started {
            layout = self.learn_layout(progress).await?;
        }
        match layout.topics.get(topic) {
            Some(&queues) => Ok((layout.clone(), queues)),
            None => {
                let mut known: Vec<&str> = layout.topics.keys().map(String::as_str).collect();
                known.sort_unstable();
                let message = format!(
                    "no topic {topic:?} in the store (topics: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
                Err(progress.fail(ProduceError::refused(ErrorCode::UnknownTopic, message)))
            }
        }
    }

    /// The store's layout asked of a node now, whatever is cached (a consumer re-reading its
    /// group's settings).
    pub(crate) async fn relearn_layout(
        &self,
        progress: &mut Progress,
    ) -> Result<Arc<Layout>, ProduceError> {
        self.learn_layout(progress).await
    }

    /// Asks `ClusterStatus` of any node (retrying until the deadline) and installs it.
    async fn learn_layout(&self, progress: &mut Progress) -> Result<Arc<Layout>, ProduceError> {
        let status =
            self.call(None, progress, status_attempt)
                .await
                .map_err(|halt| match halt {
                    Halt::Error(error) => error,
                    Halt::MasterMissing => unreachable!("status calls do not halt on masters"),
                })?;
        self.install(&status).map_err(|error| progress.fail(error))
    }

    /// Makes `status` the current layout and masters, after checking it.
    fn install(&self, status: &api::ClusterStatusResponse) -> Result<Arc<Layout>, ProduceError> {
        let store_id = self.config.store_id;
        if store_id != 0 && status.store_id != store_id {
            return Err(ProduceError::refused(
                ErrorCode::WrongStore,
                format!(
                    "node {} belongs to store {}, not store {store_id}",
                    status.node_id, status.store_id
                ),
            ));
        }
        if status.groups_count == 0 || status.nodes.is_empty() {
            return Err(ProduceError::new(
                ErrorKind::Protocol,
                None,
                format!(
                    "node {} described a store of {} groups and {} nodes",
                    status.node_id,
                    status.groups_count,
                    status.nodes.len()
                ),
            ));
        }
        let layout = Arc::new(Layout {
            groups: status.groups_count,
            topics: status
                .topics
                .iter()
                .filter(|topic| topic.queues > 0)
                .map(|topic| (topic.name.clone(), topic.queues))
                .collect(),
            group_settings: status
                .topics
                .iter()
                .filter(|topic| topic.queues > 0)
                .filter_map(|topic| {
                    let settings = &topic.config.as_ref()?.group_settings;
                    (!settings.is_empty()).then(|| (topic.name.clone(), settings.clone()))
                })
                .collect(),
            nodes: status.nodes.iter().map(|n| n.client_addr.clone()).collect(),
            learnt_at: Instant::now(),
        });
        let masters = status
            .groups
            .iter()
            .filter(|group| group.master != 0)
            .filter_map(|group| {
                let master = status.nodes.iter().find(|n| n.id == group.master)?;
                Some((GroupId(group.group), master.client_addr.clone()))
            })
            .collect();
        let mut routes = lock(&self.routes);
        routes.layout = Some(layout.clone());
        routes.masters = masters;
        Ok(layout)
    }

    /// After `failed` could not be reached (or is stopping): one `ClusterStatus` call to
    /// another node, so that masters elected meanwhile are found. Skipped when a refresh is
    /// already in flight or no time is left; its own failure changes nothing.
    async fn refresh_after_failure(&self, failed: &str, progress: &mut Progress) {
        let Ok(_refreshing) = self.refreshing.try_lock() else {
            return;
        };
        let timeout = progress.attempt_timeout(self.config.attempt_timeout);
        if timeout.is_zero() {
            return;
        }
        let addr = self.next_node_except(failed);
        let Ok(client) = self.client(&addr) else {
            return;
        };
        progress.attempts += 1;
        bump(&self.counters.status_calls);
        match tokio::time::timeout(timeout, status_attempt(client)).await {
            Ok(Ok((status, error))) if api::check(error.as_ref()).is_ok() => {
                if let Err(error) = self.install(&status) {
                    tracing::warn!(node = %addr, %error, "ignoring a store description");
                }
            }
            _ => tracing::debug!(node = %addr, "refreshing the store's layout failed"),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Masters and channels

    /// The addresses to try when no master is known: the store's nodes, then configured
    /// servers the store does not list (another spelling of a node, or a node added since).
    fn candidates(&self) -> Vec<String> {
        let mut nodes = match &lock(&self.routes).layout {
            Some(layout) => layout.nodes.clone(),
            None => Vec::new(),
        };
        for server in &self.config.servers {
            if !nodes.contains(server) {
                nodes.push(server.clone());
            }
        }
        nodes
    }

    /// The next node in turn.
    fn next_node(&self) -> String {
        self.next_node_except("")
    }

    /// The next node in turn that is not `except` (unless it is the only one).
    fn next_node_except(&self, except: &str) -> String {
        let nodes = self.candidates();
        debug_assert!(!nodes.is_empty(), "validated: at least one server");
        let mut addr = String::new();
        for _ in 0..nodes.len() {
            let turn = self.next_node.fetch_add(1, Ordering::Relaxed);
            addr.clone_from(&nodes[turn % nodes.len()]);
            if addr != except {
                break;
            }
        }
        addr
    }

    /// Where to send a call about `group` (`None`: any node).
    fn target(&self, group: Option<GroupId>) -> String {
        if let Some(group) = group
            && let Some(master) = lock(&self.routes).masters.get(&group)
        {
            return master.clone();
        }
        self.next_node()
    }

    fn learn_master(&self, group: GroupId, addr: &str) {
        lock(&self.routes).masters.insert(group, addr.to_string());
    }

    /// Forgets `group`'s master if it is still `addr` (a newer answer may have replaced it).
    fn forget_master(&self, group: Option<GroupId>, addr: &str) {
        if let Some(group) = group {
            let mut routes = lock(&self.routes);
            if routes
                .masters
                .get(&group)
                .is_some_and(|master| master == addr)
            {
                routes.masters.remove(&group);
            }
        }
    }

    /// The client for `addr`, connecting lazily on first use and reused after.
    fn client(&self, addr: &str) -> Result<api::Client, String> {
        let mut channels = lock(&self.channels);
        if let Some(client) = channels.get(addr) {
            return Ok(client.clone());
        }
        check_address(addr)?;
        let dial = self.config.dial(addr);
        let endpoint = endpoint(addr, dial, self.config.ca.as_ref(), CONNECT_TIMEOUT)?;
        let client = api::client(endpoint.connect_lazy(), self.token.clone());
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        channels.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    // -----------------------------------------------------------------------------------------
    // Calls

    /// Calls `attempt` on the master of `group` (any node for `None`) until it succeeds, a
    /// refusal cannot be retried, or the deadline passes; see the module documentation. For a
    /// group, the call is a write (its uncertain outcomes are counted), and with queue-change
    /// retry on it halts with [`Halt::MasterMissing`] when the group has no reachable master.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        group: Option<GroupId>,
        progress: &mut Progress,
        mut attempt: F,
    ) -> Result<T, Halt>
    where
        F: FnMut(api::Client) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        self.call_at(group, progress, |client, _| attempt(client))
            .await
    }

    /// [`Router::call`] with an `attempt` that is also told the node's address.
    pub(crate) async fn call_at<T, F, Fut>(
        &self,
        group: Option<GroupId>,
        progress: &mut Progress,
        mut attempt: F,
    ) -> Result<T, Halt>
    where
        F: FnMut(api::Client, &str) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let write = group.is_some();
        let halt_when_masterless = write && self.config.queue_change_retry;
        loop {
            let addr = self.target(group);
            let timeout = progress.attempt_timeout(self.config.attempt_timeout);
            progress.attempts += 1;
            bump(if write {
                &self.counters.produce_calls
            } else {
                &self.counters.status_calls
            });
            let outcome = match self.client(&addr) {
                Ok(client) => tokio::time::timeout(timeout, attempt(client, &addr)).await,
                Err(detail) => Ok(Err(tonic::Status::unavailable(detail))),
            };
            let verdict = match outcome {
                Ok(Ok((value, error))) => match api::check(error.as_ref()) {
                    Ok(()) => return Ok(value),
                    Err(failure) => {
                        if self.redirect(group, &failure, progress) {
                            continue;
                        }
                        self.refused(group, &addr, failure, write, progress)
                            .map_err(Halt::Error)?
                    }
                },
                // A refused token or role: retrying cannot change it.
                Ok(Err(status)) if api::status_failure(&status).is_some() => {
                    let failure = api::status_failure(&status).expect("just checked");
                    let error = ProduceError::from_failure(&failure);
                    return Err(Halt::Error(progress.fail(error)));
                }
                // TLS on one side only, or another store's CA: retrying cannot change it.
                Ok(Err(status)) if tls_mismatch(&status, self.config.ca.is_some()).is_some() => {
                    let why = tls_mismatch(&status, self.config.ca.is_some()).expect("checked");
                    let error =
                        ProduceError::new(ErrorKind::Protocol, None, format!("{addr}: {why}"));
                    return Err(Halt::Error(progress.fail(error)));
                }
                Ok(Err(status)) if !is_transport_trouble(&status) => {
                    let error = ProduceError::new(
                        ErrorKind::Protocol,
                        None,
                        format!(
                            "{addr}: gRPC status {}: {}",
                            status.code(),
                            status.message()
                        ),
                    );
                    return Err(Halt::Error(progress.fail(error)));
                }
                Ok(Err(status)) => {
                    let detail = format!("{addr}: {}: {}", status.code(), status.message());
                    self.unreachable(group, &addr, detail, write, progress)
                }
                Err(_) => {
                    let detail = format!("{addr}: no answer within {} ms", timeout.as_millis());
                    self.unreachable(group, &addr, detail, write, progress)
                }
            };
            if group.is_some() && verdict.refresh {
                self.refresh_after_failure(&addr, progress).await;
            }
            if halt_when_masterless && verdict.masterless {
                return Err(Halt::MasterMissing);
            }
            progress.pause().await.map_err(Halt::Error)?;
            bump(&self.counters.retries);
        }
    }

    /// Follows `NOT_MASTER` to the master it names; true when the next attempt should go
    /// there at once.
    fn redirect(&self, group: Option<GroupId>, failure: &Failure, progress: &mut Progress) -> bool {
        let master = match (&failure.code, &failure.master_addr, group) {
            (Some(ErrorCode::NotMaster), Some(master), Some(group)) => {
                self.learn_master(group, master);
                master
            }
            _ => {
                progress.redirects_in_a_row = 0;
                return false;
            }
        };
        if progress.redirects_in_a_row >= REDIRECTS_IN_A_ROW_MAX {
            progress.redirects_in_a_row = 0;
            return false;
        }
        progress.redirects_in_a_row += 1;
        bump(&self.counters.redirects);
        tracing::debug!(%master, "following NOT_MASTER");
        true
    }

    /// Handles a refusal that is not a redirect to follow now: an error if it cannot be
    /// retried, else what the retry should know.
    fn refused(
        &self,
        group: Option<GroupId>,
        addr: &str,
        failure: Failure,
        write: bool,
        progress: &mut Progress,
    ) -> Result<Verdict, ProduceError> {
        if !failure.is_retryable() {
            return Err(progress.fail(ProduceError::from_failure(&failure)));
        }
        tracing::debug!(node = %addr, %failure, "retrying");
        let code = failure.code;
        // UNAVAILABLE on a write can mean the master stopped with the entry in flight (a
        // failed fsync drops its pending answers): the followers may still commit it.
        if write
            && matches!(
                code,
                Some(ErrorCode::Indeterminate | ErrorCode::Timeout | ErrorCode::Unavailable)
            )
        {
            progress.maybe_stored = true;
            bump(&self.counters.uncertain_attempts);
        }
        let verdict = Verdict {
            masterless: matches!(code, Some(ErrorCode::NoMaster | ErrorCode::Unavailable)),
            refresh: code == Some(ErrorCode::Unavailable),
        };
        // A redirect's master is already cached; the others say this node is not a master to
        // use. BUSY and TIMEOUT come from a working master: keep it.
        let forget = match code {
            Some(ErrorCode::NotMaster) => failure.master_addr.is_none(),
            Some(ErrorCode::Busy | ErrorCode::Timeout) => false,
            _ => true,
        };
        if forget {
            self.forget_master(group, addr);
        }
        progress.last = Some(Trouble::Refused(failure));
        Ok(verdict)
    }

    /// Handles an attempt that reached no node or had no answer: the node is forgotten as a
    /// master; a write's outcome is unknown; the layout is worth asking again elsewhere.
    fn unreachable(
        &self,
        group: Option<GroupId>,
        addr: &str,
        detail: String,
        write: bool,
        progress: &mut Progress,
    ) -> Verdict {
        tracing::debug!(%detail, "node unreachable; retrying");
        self.forget_master(group, addr);
        if write {
            progress.maybe_stored = true;
            bump(&self.counters.uncertain_attempts);
        }
        progress.redirects_in_a_row = 0;
        progress.last = Some(Trouble::Transport(detail));
        Verdict {
            masterless: true,
            refresh: true,
        }
    }
}

/// One `ClusterStatus` attempt.
async fn status_attempt(mut client: api::Client) -> Attempt<api::ClusterStatusResponse> {
    let status = client
        .cluster_status(api::ClusterStatusRequest {})
        .await?
        .into_inner();
    let error = status.error.clone();
    Ok((status, error))
}

/// Whether a gRPC status is transport trouble worth retrying (no connection, reset stream,
/// deadline) rather than a refusal of the request's bytes that would repeat (a size limit,
/// an unimplemented method).
fn is_transport_trouble(status: &tonic::Status) -> bool {
    use tonic::Code;
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
    )
}

/// Locks `mutex`; a poisoned lock (a panic while holding it) still guards consistent data:
/// every critical section here is a single map operation.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A seed for the jitter: differs between producers and processes (jitter needs spread, not
/// replay).
fn seed() -> u64 {
    static PRODUCERS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let count = PRODUCERS.fetch_add(1, Ordering::Relaxed);
    nanos ^ u64::from(std::process::id()).rotate_left(32) ^ count.rotate_left(48)
}
