//! A first client path over gRPC: `phxq produce`, `phxq consume`, `phxq cluster status`.
//!
//! Every command starts by asking `--server` for the store's layout (`ClusterStatus`: nodes,
//! topics and their queue counts, the number of groups). Calls about a queue go to the master
//! of the queue's group (queue mod groups): the first answer `NOT_MASTER` names it, and the
//! master is remembered per group. Retryable refusals (`NO_MASTER` during an election,
//! `BUSY`, `UNAVAILABLE`, `TIMEOUT`, `INDETERMINATE`) and lost connections are retried with
//! exponential backoff, on another node after a lost connection, until `--timeout-ms` has
//! passed since the call's first attempt. Retrying a produce after `INDETERMINATE`,
//! `TIMEOUT` or a lost connection may store its messages twice: delivery is at least once, and
//! the summary counts such batches. Anything else is a typed error (`CODE(number): why`) and a
//! non-zero exit.
//!
//! `phxq produce` (except with `--queue`) runs on the producer library instead, with several
//! stores if asked: `client/produce.rs`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod consume;
pub mod produce;
pub mod receive;
pub mod topic;

use phxq_client::connect::{endpoint, tls_mismatch};
use phxq_client::{ErrorKind, ProducerConfig, SeekError, SeekTo, StoreCa, StoreConfig, fnv1a_64};
use phxq_proto::api::{self, Failure};
use phxq_types::{ErrorCode, MESSAGE_ID_BYTES_MAX, TIME_MS_MAX, validate_name};
use serde_json::json;
use tokio::task::JoinSet;
use tonic::transport::Endpoint;

use crate::table::{Align, render};
use crate::timestamp::parse_rfc3339_ms;
use crate::{CommandResult, print_line};

/// Lines sent in one Produce call at most.
const PRODUCE_BATCH_LINES_MAX: usize = 1_000;
/// Bytes of lines read into one batch at most (a longer single line is sent alone).
const PRODUCE_BATCH_BYTES_MAX: usize = 1 << 20;
/// Longest line read from standard input, in bytes (the largest message a store accepts).
const LINE_BYTES_MAX: usize = phxq_node::config::MESSAGE_BYTES_MAX_LIMIT;
/// Lines read ahead of the produce calls.
const LINES_QUEUED_MAX: usize = 4 * PRODUCE_BATCH_LINES_MAX;
/// Messages asked for per Consume call.
const CONSUME_BATCH_MESSAGES: u32 = 1_000;
/// Bytes asked for per Consume call.
const CONSUME_BATCH_BYTES: u32 = 4 << 20;
/// How long one call may take beyond its long-poll wait, in milliseconds.
const CALL_TIMEOUT_MS: u64 = 5_000;
/// How long connecting to a node may take, in milliseconds.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// First retry delay, in milliseconds; delays double up to [`BACKOFF_MAX_MS`].
const BACKOFF_MIN_MS: u64 = 25;
/// Longest retry delay, in milliseconds.
const BACKOFF_MAX_MS: u64 = 1_000;
/// Redirects followed in a row without a pause (masters can move while we chase them).
const REDIRECTS_IN_A_ROW_MAX: u32 = 3;
/// Largest gRPC message accepted or sent (a full consume batch plus framing).
const GRPC_MESSAGE_BYTES_MAX: usize = 80 << 20;

/// Where to reach the store and how long to keep trying.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// Any node of the store (HOST:PORT of its client API); calls are redirected to masters.
    #[arg(long, env = "PHXQ_SERVER", default_value = "127.0.0.1:7100")]
    server: String,
    /// Give up on a call (with its retries) after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// The token sent with every call, for stores with auth on (`phxq token issue`; `phxq
    /// dev --auth` prints an admin token). Without it, ./phxq-data/admin.token is used when
    /// it exists (the dev store's, said on stderr).
    #[arg(long, env = "PHXQ_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// The store's CA certificate (PEM): connect over TLS and accept only nodes it signed.
    /// For stores whose client port serves TLS (`[tls] client_port = true`; `phxq dev
    /// --tls` prints the file). Without it, plaintext.
    #[arg(long, env = "PHXQ_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
}

/// Where `phxq dev` (run from the same directory) leaves its admin token.
const DEV_TOKEN_FILE: &str = "phxq-data/admin.token";

impl Connection {
    /// `--token` (or `PHXQ_TOKEN`), else the dev store's admin token when it exists.
    fn token(&self) -> Result<Option<String>, ClientError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_string()));
        }
        match std::fs::read_to_string(DEV_TOKEN_FILE) {
            Ok(token) => {
                eprintln!(
                    "phxq: no --token given: using the dev store's admin token in ./{DEV_TOKEN_FILE}"
                );
                Ok(Some(token.trim().to_string()))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ClientError::Usage(format!(
                "cannot read ./{DEV_TOKEN_FILE}: {error}"
            ))),
        }
    }

    /// `--ca` (or `PHXQ_CA`), loaded and checked.
    fn store_ca(&self) -> Result<Option<StoreCa>, ClientError> {
        self.ca
            .as_deref()
            .map(StoreCa::load)
            .transpose()
            .map_err(|error| ClientError::Usage(format!("--ca {error}")))
    }

    /// [`Connection::token`] as the interceptor that sends it.
    fn bearer(&self) -> Result<api::BearerToken, ClientError> {
        api::BearerToken::new(self.token()?.as_deref())
            .map_err(|error| ClientError::Usage(format!("--token: {error}")))
    }
}

/// An auth refusal, with what the user can do about it.
fn auth_refusal(status: &tonic::Status) -> Option<ClientError> {
    let mut failure = api::status_failure(status)?;
    if failure.code == Some(ErrorCode::Unauthenticated) {
        failure
            .message
            .push_str(" (pass --token TOKEN or set PHXQ_TOKEN)");
    }
    Some(ClientError::Refused(failure))
}

/// Arguments of `phxq produce`.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The key of every message: messages with one key go to one store and one queue, in
    /// order (store by weighted rendezvous hashing of the key over the stores' names, then
    /// queue = FNV-1a 64 of the key mod the topic's queue count in that store). Without a
    /// key, lines are spread over the stores by weight and round-robin over the queues.
    #[arg(long)]
    key: Option<String>,
    /// Send every message to this queue instead (one store only: `--server`).
    #[arg(long)]
    queue: Option<u32>,
    /// A message id (1 to 64 bytes) for the one message on standard input (more lines are
    /// refused, nothing sent): the store deduplicates it within the topic's dedup window, so
    /// running the same command again (after a timeout, say) stores nothing and reports the
    /// duplicate with the offset first stored.
    #[arg(long, value_name = "ID")]
    message_id: Option<String>,
    /// Give line i (from 1) of standard input the message id `P-<i>` (P: 1 to 43 bytes), so
    /// that running the same input again after a crash or a timeout stores no line twice
    /// (within the queues' dedup windows); duplicates are reported, not counted as
    /// acknowledged.
    #[arg(long, value_name = "P")]
    id_prefix: Option<String>,
    /// Write to several stores instead of `--server`'s one (repeat the flag, one per store):
    /// NAME=HOST:PORT[,HOST:PORT]...[@WEIGHT], weight 1 to 1000 (default 1). A key's store
    /// is chosen by weighted rendezvous hashing of the key with the store's NAME, so keep
    /// names stable: renaming a store moves its keys, reordering the flags does not.
    #[arg(long, value_name = "NAME=HOST:PORT[,HOST:PORT]...[@WEIGHT]", value_parser = produce::parse_store)]
    store: Vec<StoreConfig>,
    /// With several stores: when a line's store has no reachable master for a second, send
    /// it to the next store of its key's ranking. Gives up per-key order (and message-id
    /// deduplication, which is per store) for availability.
    #[arg(long)]
    store_change_retry: bool,
}

/// Arguments of `phxq consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The consumer group: reading starts at its cursor, and the cursor is committed after
    /// the messages are printed. Its settings in the store (rate, max in flight) apply.
    #[arg(long)]
    group: String,
    /// Read only this queue (default: every queue of the topic; not with `--member`).
    #[arg(long)]
    queue: Option<u32>,
    /// Join the group as live member ID: read the queues the group coordinator grants it
    /// among the group's live members, take over those of members that die, hand them over
    /// when others join or it stops.
    #[arg(long, value_name = "ID")]
    member: Option<String>,
    /// With `--member`: how long the coordinator keeps this member without a heartbeat, and
    /// how long it keeps reading its queues when no heartbeat is answered (1000 to 60000).
    #[arg(long, value_name = "MS", default_value_t = 6_000)]
    session_timeout_ms: u64,
    /// Stop after this many messages (default: when every queue is read to its end; with
    /// `--member`, when stopped or idle for `--wait-ms`).
    #[arg(long, value_name = "N")]
    max: Option<u64>,
    /// When every queue is at its end, wait this long for more before exiting (at most 60000).
    /// With `--member`: exit once its queues are at their end and nothing came for this long
    /// (0, the default: run until SIGINT or SIGTERM).
    #[arg(long, value_name = "W", default_value_t = 0)]
    wait_ms: u32,
    /// One JSON object per message (queue, offset, time_ms, key, value, and member with
    /// `--member`) instead of the raw values. A key or value that is not UTF-8 comes as
    /// `key_hex` / `value_hex`.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// A consumer group subscribed to the topic, named for access only: tail never reads or
    /// moves its cursor.
    #[arg(long)]
    group: String,
    /// Follow only this queue (default: every queue of the topic).
    #[arg(long)]
    queue: Option<u32>,
    /// Start at each queue's oldest retained message instead of its end.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many messages (default: follow until Ctrl-C).
    #[arg(long, value_name = "N")]
    max: Option<u64>,
    /// One JSON object per message, as `phxq consume --json` prints them.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq seek`.
#[derive(Debug, clap::Args)]
pub struct SeekArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The consumer group whose cursor moves.
    #[arg(long)]
    group: String,
    /// Only this queue (default: every queue of the topic).
    #[arg(long)]
    queue: Option<u32>,
    /// Where the cursor goes: `earliest` (the oldest retained message), `latest` (past the
    /// last message: only new messages are read), an offset (1 to the queue's end; an
    /// offset already deleted by retention reads from the oldest retained message), or a time:
    /// `time:2024-05-01T12:00:00.250Z` (RFC 3339, `Z` or an offset like `+02:00`) or
    /// `time:1714564800250` (ms since the Unix epoch). A time moves each queue's cursor to its
    /// first retained message accepted at or after it (the queue's end if there is none; the
    /// oldest retained message if all are later). Message times are the accepting master's
    /// clock.
    #[arg(long, value_parser = parse_seek)]
    to: SeekTo,
}

fn parse_seek(text: &str) -> Result<SeekTo, String> {
    if let Some(time) = text.strip_prefix("time:") {
        return parse_seek_time(time).map(SeekTo::Time);
    }
    match text {
        "earliest" => Ok(SeekTo::Earliest),
        "latest" => Ok(SeekTo::Latest),
        _ => match text.parse::<u64>() {
            Ok(0) | Err(_) => Err(format!(
                "{text:?}: expected earliest, latest, an offset from 1, or time:<RFC 3339 time \
                 or ms since the Unix epoch>"
            )),
            Ok(offset) => Ok(SeekTo::Offset(offset)),
        },
    }
}

/// The time of `--to time:...`: ms since the Unix epoch if all digits, else RFC 3339.
fn parse_seek_time(text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_rfc3339_ms(text);
    }
    match text.parse::<u64>() {
        Ok(ms) if ms <= TIME_MS_MAX => Ok(ms),
        _ => Err(format!(
            "{text} ms is after 9999-12-31T23:59:59.999Z ({TIME_MS_MAX}); times are \
             milliseconds since the Unix epoch"
        )),
    }
}

/// Arguments of `phxq group list`.
#[derive(Debug, clap::Args)]
pub struct GroupListArgs {
    #[command(flatten)]
    connection: Connection,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq group describe`.
#[derive(Debug, clap::Args)]
pub struct GroupDescribeArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq cluster status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connection: Connection,
    /// One JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    /// A node refused the request (or we refused it locally, with the code a node would use).
    #[error("{0}")]
    Refused(Failure),
    /// No node answered in time.
    #[error("no answer from {addr} within the timeout: {detail}")]
    Unreachable {
        /// The node last tried.
        addr: String,
        /// The last transport error or refusal.
        detail: String,
    },
    /// A bad command line.
    #[error("{0}")]
    Usage(String),
    /// The node and this client disagree on TLS (or on the CA): retrying cannot help.
    #[error("{addr}: {detail}")]
    Tls {
        /// The node.
        addr: String,
        /// What to change.
        detail: String,
    },
    /// Writing standard output failed (a closed pipe, as with `phxq tail | head`, is a normal
    /// end: `main` exits without a message).
    #[error("writing standard output: {0}")]
    Output(#[source] std::io::Error),
}

/// A refusal with `code`, made locally.
/// `INVALID_ARGUMENT` unless `--message-id`, when given, is 1 to [`MESSAGE_ID_BYTES_MAX`]
/// bytes (both produce paths check it before sending anything).
fn check_message_id(id: Option<&str>) -> Result<(), ClientError> {
    match id {
        Some(id) if !(1..=MESSAGE_ID_BYTES_MAX).contains(&id.len()) => Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "--message-id of {} bytes; 1 to {MESSAGE_ID_BYTES_MAX}",
                id.len()
            ),
        )),
        _ => Ok(()),
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::Refused(Failure {
        code: Some(code),
        number: code.number(),
        message: message.into(),
        master_addr: None,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), ClientError> {
    validate_name(name).map_err(|error| refused(ErrorCode::InvalidName, format!("{what}: {error}")))
}

// ---------------------------------------------------------------------------------------------
// Routing and retries

/// Channels to the store's nodes and the master of each group, as learnt.
#[derive(Clone)]
struct Router {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    /// Client addresses of every node (the seed first, until the store's list is known).
    nodes: Vec<String>,
    groups: u32,
    timeout: Duration,
    /// Sent on every call.
    token: api::BearerToken,
    /// `--ca`: dial every node over TLS verified against it.
    ca: Option<StoreCa>,
    channels: Mutex<HashMap<String, api::Client>>,
    masters: Mutex<HashMap<u64, String>>,
    /// Rotates over `nodes` when no master is known.
    next_node: AtomicU64,
    /// Calls retried after an outcome that leaves a write's fate unknown.
    uncertain_retries: AtomicU64,
}

/// What one attempt of a call returned: a value, or the response's error.
type Attempt<T> = Result<(T, Option<api::Error>), tonic::Status>;

impl Router {
    /// Asks `server` for the store's status (retrying until the timeout) and routes by it.
    async fn discover(
        connection: &Connection,
    ) -> Result<(Router, api::ClusterStatusResponse), ClientError> {
        let server = parse_server(&connection.server)?;
        let token = connection.bearer()?;
        let ca = connection.store_ca()?;
        let seed = Router::new(vec![server], 1, connection, (token.clone(), ca.clone()));
        let status = seed
            .call(None, |mut client| async move {
                let status = client
                    .cluster_status(api::ClusterStatusRequest {})
                    .await?
                    .into_inner();
                let error = status.error.clone();
                Ok((status, error))
            })
            .await?;
        let mut nodes: Vec<String> = status.nodes.iter().map(|n| n.client_addr.clone()).collect();
        // Start where the user pointed us.
        if let Some(position) = nodes.iter().position(|n| *n == seed.inner.nodes[0]) {
            nodes.rotate_left(position);
        }
        if nodes.is_empty() || status.groups_count == 0 {
            return Err(ClientError::Usage(format!(
                "{} answered with an empty store description",
                seed.inner.nodes[0]
            )));
        }
        let router = Router::new(nodes, status.groups_count, connection, (token, ca));
        router.learn_masters(&status);
        Ok((router, status))
    }

    fn new(
        nodes: Vec<String>,
        groups: u32,
        connection: &Connection,
        (token, ca): (api::BearerToken, Option<StoreCa>),
    ) -> Router {
        Router {
            inner: Arc::new(RouterInner {
                token,
                ca,
                nodes,
                groups,
                timeout: Duration::from_millis(connection.timeout_ms),
                channels: Mutex::new(HashMap::new()),
                masters: Mutex::new(HashMap::new()),
                next_node: AtomicU64::new(0),
                uncertain_retries: AtomicU64::new(0),
            }),
        }
    }

    /// Remembers the masters a status names (the answering node's view).
    fn learn_masters(&self, status: &api::ClusterStatusResponse) {
        let mut masters = self.inner.masters.lock().expect("masters lock");
        for group in &status.groups {
            if let Some(node) = status
                .nodes
                .iter()
                .find(|n| n.id == group.master && group.master != 0)
            {
                masters.insert(group.group, node.client_addr.clone());
            }
        }
    }

    fn group_of(&self, queue: u32) -> u64 {
        u64::from(queue % self.inner.groups)
    }

    /// The node to try for `group`: its master if known, else the next node in turn.
    fn target(&self, group: Option<u64>) -> String {
        if let Some(group) = group
            && let Some(master) = self.inner.masters.lock().expect("masters lock").get(&group)
        {
            return master.clone();
        }
        let nodes = &self.inner.nodes;
        let turn = self.inner.next_node.fetch_add(1, Ordering::Relaxed);
        nodes[(turn % nodes.len() as u64) as usize].clone()
    }

    fn forget_master(&self, group: Option<u64>) {
        if let Some(group) = group {
            self.inner
                .masters
                .lock()
                .expect("masters lock")
                .remove(&group);
        }
    }

    fn client(&self, addr: &str) -> Result<api::Client, ClientError> {
        let mut channels = self.inner.channels.lock().expect("channels lock");
        if let Some(client) = channels.get(addr) {
            return Ok(client.clone());
        }
        let connect_timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
        let endpoint = endpoint(addr, addr, self.inner.ca.as_ref(), connect_timeout)
            .map_err(ClientError::Usage)?;
        let client = api::client(endpoint.connect_lazy(), self.inner.token.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        channels.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Calls `attempt` on the master of `group` (any node for `None`), following redirects and
    /// retrying as the module documentation says. `wait_ms` is the call's own long-poll wait.
    async fn call_waiting<T, F, Fut>(
        &self,
        group: Option<u64>,
        wait_ms: u64,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(api::Client) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let per_call = Duration::from_millis(wait_ms + CALL_TIMEOUT_MS);
        let mut backoff_ms = BACKOFF_MIN_MS;
        let mut redirects = 0;
        loop {
            let addr = self.target(group);
            let client = self.client(&addr)?;
            let outcome = tokio::time::timeout(per_call, attempt(client)).await;
            let detail = match outcome {
                Ok(Ok((value, error))) => match api::check(error.as_ref()) {
                    Ok(()) => return Ok(value),
                    Err(failure) => {
                        if failure.code == Some(ErrorCode::NotMaster)
                            && let Some(master) = &failure.master_addr
                            && redirects < REDIRECTS_IN_A_ROW_MAX
                        {
                            redirects += 1;
                            if let Some(group) = group {
                                self.inner
                                    .masters
                                    .lock()
                                    .expect("masters lock")
                                    .insert(group, master.clone());
                            }
                            continue;
                        }
                        if !failure.is_retryable() {
                            return Err(ClientError::Refused(failure));
                        }
                        self.note_uncertain(failure.code);
                        if failure.code != Some(ErrorCode::NotMaster)
                            || failure.master_addr.is_none()
                        {
                            self.forget_master(group);
                        }
                        failure.to_string()
                    }
                },
                Ok(Err(status)) if api::status_failure(&status).is_some() => {
                    return Err(auth_refusal(&status).expect("just checked"));
                }
                Ok(Err(status)) if tls_mismatch(&status, self.inner.ca.is_some()).is_some() => {
                    let detail = tls_mismatch(&status, self.inner.ca.is_some()).expect("checked");
                    return Err(ClientError::Tls { addr, detail });
                }
                Ok(Err(status)) => {
                    self.forget_master(group);
                    self.note_uncertain(Some(ErrorCode::Unavailable));
                    format!("{}: {}", status.code(), status.message())
                }
                Err(_) => {
                    self.forget_master(group);
                    self.note_uncertain(Some(ErrorCode::Timeout));
                    format!("no answer within {} ms", per_call.as_millis())
                }
            };
            redirects = 0;
            if Instant::now() + Duration::from_millis(backoff_ms) >= deadline {
                return Err(ClientError::Unreachable { addr, detail });
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
        }
    }

    async fn call<T, F, Fut>(&self, group: Option<u64>, attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(api::Client) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        self.call_waiting(group, 0, attempt).await
    }

    /// Counts outcomes after which a retried write may be stored twice.
    fn note_uncertain(&self, code: Option<ErrorCode>) {
        if matches!(
            code,
            Some(ErrorCode::Indeterminate | ErrorCode::Timeout | ErrorCode::Unavailable)
        ) {
            self.inner.uncertain_retries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Checks `--server`: HOST:PORT.
fn parse_server(server: &str) -> Result<String, ClientError> {
    let bad = || {
        ClientError::Usage(format!(
            "invalid --server {server:?}: expected HOST:PORT, like 127.0.0.1:7100"
        ))
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |port| port == 0) {
        return Err(bad());
    }
    Endpoint::from_shared(format!("http://{server}")).map_err(|_| bad())?;
    Ok(server.to_string())
}

/// The topic named `name` in a store's status, or `UNKNOWN_TOPIC`.
fn find_topic<'a>(
    status: &'a api::ClusterStatusResponse,
    name: &str,
) -> Result<&'a api::TopicStatus, ClientError> {
    check_name("topic", name)?;
    status
        .topics
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = status.topics.iter().map(|t| t.name.as_str()).collect();
            refused(
                ErrorCode::UnknownTopic,
                format!(
                    "no topic {name:?} in store {} (topics: {})",
                    status.store_id,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
}

fn check_queue(topic: &api::TopicStatus, queue: Option<u32>) -> Result<(), ClientError> {
    match queue {
        Some(queue) if queue >= topic.queues => Err(refused(
            ErrorCode::UnknownQueue,
            format!(
                "topic {:?} has {} queues (0 to {}); there is no queue {queue}",
                topic.name,
                topic.queues,
                topic.queues - 1
            ),
        )),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// produce

/// Picks the queue of each line.
struct QueueChooser {
    queues: u32,
    fixed: Option<u32>,
    next: u32,
}

impl QueueChooser {
    fn new(queues: u32, queue: Option<u32>, key: Option<&[u8]>) -> QueueChooser {
        let fixed = queue.or_else(|| key.map(|key| (fnv1a_64(key) % u64::from(queues)) as u32));
        // Round-robin starts at a different queue in each process, so that many short-lived
        // producers do not all load queue 0.
        let next = std::process::id() % queues;
        QueueChooser {
            queues,
            fixed,
            next,
        }
    }

    fn choose(&mut self) -> u32 {
        self.fixed.unwrap_or_else(|| {
            let queue = self.next;
            self.next = (self.next + 1) % self.queues;
            queue
        })
    }
}

/// What reading standard input produced.
enum Line {
    /// One line, without its end of line.
    Text(Vec<u8>),
    /// Reading failed (or a line was too long); nothing after it is read.
    Failed(String),
}

/// Reads standard input on a thread, line by line, into a bounded channel.
fn read_lines() -> tokio::sync::mpsc::Receiver<Line> {
    let (lines, receiver) = tokio::sync::mpsc::channel(LINES_QUEUED_MAX);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let mut number = 0u64;
        loop {
            number += 1;
            let line = match read_line(&mut input) {
                Ok(Some(line)) => Line::Text(line),
                Ok(None) => return,
                Err(error) => Line::Failed(format!("standard input, line {number}: {error}")),
            };
            let failed = matches!(line, Line::Failed(_));
            if lines.blocking_send(line).is_err() || failed {
                return;
            }
        }
    });
    receiver
}

/// One line without its `\n` (or `\r\n`), `None` at the end of input.
fn read_line(input: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = LINE_BYTES_MAX as u64 + 2;
    let read = std::io::Read::take(&mut *input, limit).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() > LINE_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "longer than {LINE_BYTES_MAX} bytes, the largest message a store accepts"
        )));
    }
    Ok(Some(line))
}

/// How a produce run went.
#[derive(Default)]
struct ProduceTally {
    acknowledged: u64,
    queues: BTreeMap<u32, u64>,
    /// Appends the store answered as duplicates of an earlier produce (message id), with
    /// where it stored the original: `(queue, first offset)`.
    duplicates: Vec<(u32, u64)>,
}

pub fn produce(args: &ProduceArgs) -> CommandResult {
    if args.queue.is_none() {
        return produce::produce(args);
    }
    if !args.store.is_empty() || args.store_change_retry || args.id_prefix.is_some() {
        return Err(ClientError::Usage(
            "--queue names a queue of one store (--server): it takes neither --store, \
             --store-change-retry nor --id-prefix; nothing was produced"
                .to_string(),
        )
        .into());
    }
    let runtime = client_runtime()?;
    let started = Instant::now();
    let mut tally = ProduceTally::default();
    let outcome = runtime.block_on(produce_all(args, &mut tally));
    let queues: Vec<String> = tally
        .queues
        .iter()
        .map(|(q, n)| format!("q{q}: {n}"))
        .collect();
    let summary = format!(
        "{} message(s) acknowledged in {:.2} s ({})",
        tally.acknowledged,
        started.elapsed().as_secs_f64(),
        if queues.is_empty() {
            "none".to_string()
        } else {
            queues.join(", ")
        }
    );
    for (queue, offset) in &tally.duplicates {
        eprintln!(
            "phxq produce: a duplicate of an earlier produce with this message id, stored at \
             q{queue} offset {offset}: not stored again"
        );
    }
    match outcome {
        Ok(uncertain) => {
            eprintln!("phxq produce: {summary}");
            if uncertain > 0 {
                eprintln!(
                    "phxq produce: {uncertain} call(s) were retried after an uncertain outcome; \
                     some messages may be stored twice (at-least-once)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("phxq produce: {summary}; then failed, and the lines after were not sent");
            Err(error.into())
        }
    }
}

/// Sends every line; returns the number of uncertain retries.
async fn produce_all(args: &ProduceArgs, tally: &mut ProduceTally) -> Result<u64, ClientError> {
    check_name("topic", &args.topic)?;
    check_message_id(args.message_id.as_deref())?;
    let (router, status) = Router::discover(&args.connection).await?;
    let topic = find_topic(&status, &args.topic)?;
    check_queue(topic, args.queue)?;
    let key = args.key.clone().unwrap_or_default().into_bytes();
    let mut chooser = QueueChooser::new(
        topic.queues,
        args.queue,
        args.key.as_ref().map(|k| k.as_bytes()),
    );
    let mut lines = read_lines();
    if let Some(id) = &args.message_id {
        return produce_with_id(
            &router,
            args,
            id.as_bytes(),
            lines,
            &mut chooser,
            &key,
            tally,
        )
        .await;
    }
    let mut any = false;
    while let Some(first) = lines.recv().await {
        any = true;
        let batch = gather_batch(first, &mut lines, &mut chooser, &key)?;
        send_batch(&router, &args.topic, batch, &[], tally).await?;
    }
    if !any {
        return Err(refused(
            ErrorCode::EmptyBatch,
            "standard input had no lines; nothing was produced",
        ));
    }
    Ok(router.inner.uncertain_retries.load(Ordering::Relaxed))
}

/// Sends the one line of standard input with message id `id`; returns the number of
/// uncertain retries (harmless here: the id deduplicates them).
async fn produce_with_id(
    router: &Router,
    args: &ProduceArgs,
    id: &[u8],
    mut lines: tokio::sync::mpsc::Receiver<Line>,
    chooser: &mut QueueChooser,
    key: &[u8],
    tally: &mut ProduceTally,
) -> Result<u64, ClientError> {
    let Some(line) = lines.recv().await else {
        return Err(refused(
            ErrorCode::EmptyBatch,
            "standard input had no lines; nothing was produced",
        ));
    };
    if lines.recv().await.is_some() {
        return Err(ClientError::Usage(
            "--message-id names one message: standard input must hold one line; nothing was \
             produced"
                .to_string(),
        ));
    }
    let batch = gather_batch(line, &mut lines, chooser, key)?;
    send_batch(router, &args.topic, batch, id, tally).await?;
    Ok(router.inner.uncertain_retries.load(Ordering::Relaxed))
}

/// `first` and the lines already waiting, up to the batch limits, as messages per queue.
fn gather_batch(
    first: Line,
    lines: &mut tokio::sync::mpsc::Receiver<Line>,
    chooser: &mut QueueChooser,
    key: &[u8],
) -> Result<BTreeMap<u32, Vec<api::Message>>, ClientError> {
    let mut batch: BTreeMap<u32, Vec<api::Message>> = BTreeMap::new();
    let (mut count, mut bytes) = (0, 0);
    let mut next = Some(first);
    while let Some(line) = next.take() {
        let value = match line {
            Line::Text(value) => value,
            Line::Failed(reason) => return Err(ClientError::Usage(reason)),
        };
        count += 1;
        bytes += value.len();
        batch
            .entry(chooser.choose())
            .or_default()
            .push(api::Message {
                key: key.to_vec(),
                value,
            });
        if count < PRODUCE_BATCH_LINES_MAX && bytes < PRODUCE_BATCH_BYTES_MAX {
            next = lines.try_recv().ok();
        }
    }
    Ok(batch)
}

/// Sends one batch, one call per queue, concurrently, each with `message_id` (empty: none);
/// fails if any call fails.
async fn send_batch(
    router: &Router,
    topic: &str,
    batch: BTreeMap<u32, Vec<api::Message>>,
    message_id: &[u8],
    tally: &mut ProduceTally,
) -> Result<(), ClientError> {
    let mut calls = JoinSet::new();
    for (queue, messages) in batch {
        let router = router.clone();
        let topic = topic.to_string();
        let message_id = message_id.to_vec();
        calls.spawn(async move {
            let count = messages.len() as u64;
            let request = api::ProduceRequest {
                store_id: 0,
                topic,
                queue,
                messages,
                message_id,
            };
            let outcome = router
                .call(Some(router.group_of(queue)), |mut client| {
                    let request = request.clone();
                    async move {
                        let response = client.produce(request).await?.into_inner();
                        let error = response.error.clone();
                        Ok((response, error))
                    }
                })
                .await;
            (queue, count, outcome)
        });
    }
    let mut failure = None;
    while let Some(joined) = calls.join_next().await {
        let (queue, count, outcome) =
            joined.map_err(|error| ClientError::Usage(error.to_string()))?;
        match outcome {
            Ok(response) if response.duplicate => {
                tally.duplicates.push((queue, response.first_offset));
            }
            Ok(_) => {
                tally.acknowledged += count;
                *tally.queues.entry(queue).or_default() += count;
            }
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    failure.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------------------------------------
// consume

/// `phxq consume`: the library consumer with a printing handler (`client/consume.rs`).
pub fn consume(args: &ConsumeArgs) -> CommandResult {
    consume::consume(args)
}

/// How long each of `phxq tail`'s reads waits for a message, in milliseconds.
const TAIL_WAIT_MS: u32 = 1_000;

/// `phxq tail`: prints messages as they arrive, from each queue's end (or its beginning),
/// without touching any cursor; stops after `--max` messages or on Ctrl-C.
pub fn tail(args: &TailArgs) -> CommandResult {
    if args.max == Some(0) {
        return Err(refused(ErrorCode::InvalidArgument, "--max must be at least 1").into());
    }
    let runtime = client_runtime()?;
    let printed = runtime.block_on(async {
        tokio::select! {
            printed = tail_all(args) => printed.map(Some),
            () = crate::node_cmd::shutdown_signal() => Ok(None),
        }
    })?;
    match printed {
        Some(printed) => eprintln!("phxq tail: {printed} message(s)"),
        None => eprintln!("phxq tail: stopped"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail_all(args: &TailArgs) -> Result<u64, ClientError> {
    let (router, status) = Router::discover(&args.connection).await?;
    let queues = subscribed_queues(&status, &args.topic, &args.group, args.queue)?;
    // Every queue's starting offset first, so nothing appended after this line is missed.
    let mut starts = Vec::with_capacity(queues.len());
    for &queue in &queues {
        let start = if args.from_beginning {
            1
        } else {
            read_from(&router, &args.topic, &args.group, queue, u64::MAX, 0, 1)
                .await?
                .end_offset
        };
        starts.push((queue, start));
    }
    eprintln!(
        "phxq tail: following {} queue(s) of {} from their {}",
        queues.len(),
        args.topic,
        if args.from_beginning {
            "beginning"
        } else {
            "end"
        }
    );
    let (found, mut arrivals) = tokio::sync::mpsc::channel(queues.len().max(1));
    let mut readers = JoinSet::new();
    for (queue, start) in starts {
        let (router, found) = (router.clone(), found.clone());
        let (topic, group) = (args.topic.clone(), args.group.clone());
        readers.spawn(async move {
            let mut next = start;
            loop {
                let read = read_from(&router, &topic, &group, queue, next, TAIL_WAIT_MS, 0).await?;
                if let Some(first) = read.messages.first()
                    && first.offset > next
                {
                    eprintln!(
                        "phxq tail: queue {queue}: offsets {next}..{} were deleted by retention \
                         before they were read",
                        first.offset
                    );
                }
                next = read.next_offset.max(next);
                if !read.messages.is_empty() && found.send((queue, read.messages)).await.is_err() {
                    return Ok::<(), ClientError>(()); // the printer is done
                }
            }
        });
    }
    drop(found);
    let mut printed = 0u64;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            Some((queue, messages)) = arrivals.recv() => {
                let mut lock = out.lock();
                for message in messages {
                    write_message(&mut lock, args.json, queue, &message).map_err(|error| {
                        ClientError::Output(error)
                    })?;
                    printed += 1;
                    if args.max.is_some_and(|max| printed >= max) {
                        lock.flush().map_err(ClientError::Output)?;
                        return Ok(printed);
                    }
                }
                lock.flush().map_err(ClientError::Output)?;
            }
            Some(ended) = readers.join_next() => {
                // A reader only ends on an error (its retries exhausted): report it.
                ended.map_err(|error| ClientError::Usage(error.to_string()))??;
            }
            else => return Ok(printed), // no queue to follow
        }
        out = std::io::stdout();
    }
}

/// One read of `queue` from `offset` (no cursor involved), up to `max_messages` (0: the
/// batch size), waiting up to `wait_ms` for a message.
async fn read_from(
    router: &Router,
    topic: &str,
    group: &str,
    queue: u32,
    offset: u64,
    wait_ms: u32,
    max_messages: u32,
) -> Result<api::ConsumeResponse, ClientError> {
    let request = api::ConsumeRequest {
        store_id: 0,
        topic: topic.to_string(),
        queue,
        consumer_group: group.to_string(),
        from_offset: Some(offset),
        max_messages: if max_messages == 0 {
            CONSUME_BATCH_MESSAGES
        } else {
            max_messages
        },
        max_bytes: CONSUME_BATCH_BYTES,
        wait_ms,
    };
    consume_once(router, queue, request).await
}

/// The queues to read: `queue` or all of `topic`'s, once the topic exists and `group` reads it.
fn subscribed_queues(
    status: &api::ClusterStatusResponse,
    topic: &str,
    group: &str,
    queue: Option<u32>,
) -> Result<Vec<u32>, ClientError> {
    check_name("topic", topic)?;
    check_name("consumer group", group)?;
    let config = find_topic(status, topic)?;
    check_queue(config, queue)?;
    if !config.consumer_groups.iter().any(|g| g == group) {
        return Err(refused(
            ErrorCode::UnknownConsumerGroup,
            format!(
                "consumer group {group:?} does not read topic {topic:?} (its groups: {})",
                config.consumer_groups.join(", ")
            ),
        ));
    }
    Ok(match queue {
        Some(queue) => vec![queue],
        None => (0..config.queues).collect(),
    })
}

/// `phxq group list`: every consumer group and the topics it reads.
pub fn group_list(args: &GroupListArgs) -> CommandResult {
    let runtime = client_runtime()?;
    let (_, status) = runtime.block_on(Router::discover(&args.connection))?;
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for topic in &status.topics {
        for group in &topic.consumer_groups {
            groups.entry(group).or_default().push(&topic.name);
        }
    }
    if args.json {
        let list: Vec<serde_json::Value> = groups
            .iter()
            .map(|(group, topics)| json!({"group": group, "topics": topics}))
            .collect();
        print_line(serde_json::to_string_pretty(&list)?)?;
    } else {
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|(group, topics)| vec![group.to_string(), topics.join(", ")])
            .collect();
        let columns = [("group", Align::Left), ("topics", Align::Left)];
        print_line(render(&columns, &rows).trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One queue's position for a consumer group.
struct QueuePosition {
    queue: u32,
    /// The offset the group reads next: its committed cursor, or the oldest retained message
    /// if retention (a max age or size cap) deleted messages the group had not committed.
    next: u64,
    /// The queue's next offset to be assigned.
    end: u64,
}

/// `phxq group describe`: per queue of a topic, where the group reads next, the queue's end
/// and the lag between them (messages appended and not yet committed), each read from the
/// queue's master; and the live member handling it, from the group coordinator (`-`: none,
/// or the group uses a static member list).
pub fn group_describe(args: &GroupDescribeArgs) -> CommandResult {
    let runtime = client_runtime()?;
    let (positions, owners) = runtime.block_on(async {
        let (router, status) = Router::discover(&args.connection).await?;
        let queues = subscribed_queues(&status, &args.topic, &args.group, None)?;
        let mut positions = Vec::with_capacity(queues.len());
        for queue in queues {
            let (next, end) = cursor_and_end(&router, &args.topic, &args.group, queue).await?;
            positions.push(QueuePosition { queue, next, end });
        }
        let owners = live_owners(&router, &args.topic, &args.group).await?;
        Ok::<_, ClientError>((positions, owners))
    })?;
    let lag = |p: &QueuePosition| p.end.saturating_sub(p.next);
    let owner = |p: &QueuePosition| owners.get(&p.queue).map_or("-", String::as_str);
    if args.json {
        let queues: Vec<serde_json::Value> = positions
            .iter()
            .map(|p| {
                json!({"queue": p.queue, "next": p.next, "end": p.end, "lag": lag(p),
                       "member": owners.get(&p.queue)})
            })
            .collect();
        let total: u64 = positions.iter().map(lag).sum();
        let document =
            json!({"topic": args.topic, "group": args.group, "lag": total, "queues": queues});
        print_line(serde_json::to_string_pretty(&document)?)?;
    } else {
        let rows: Vec<Vec<String>> = positions
            .iter()
            .map(|p| {
                vec![
                    p.queue.to_string(),
                    p.next.to_string(),
                    p.end.to_string(),
                    lag(p).to_string(),
                    owner(p).to_string(),
                ]
            })
            .collect();
        let columns = [
            ("queue", Align::Right),
            ("next", Align::Right),
            ("end", Align::Right),
            ("lag", Align::Right),
            ("member", Align::Left),
        ];
        print_line(render(&columns, &rows).trim_end())?;
        let total: u64 = positions.iter().map(lag).sum();
        print_line(format_args!(
            "{} on {}: {total} message(s) not yet committed",
            args.group, args.topic
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The live member handling each queue of `topic` for `group`, as the group coordinator
/// (group 0's master) knows them (`Heartbeat` with `describe_only`).
async fn live_owners(
    router: &Router,
    topic: &str,
    group: &str,
) -> Result<std::collections::BTreeMap<u32, String>, ClientError> {
    let request = api::HeartbeatRequest {
        topic: topic.to_string(),
        consumer_group: group.to_string(),
        describe_only: true,
        ..Default::default()
    };
    let view = router
        .call(Some(0), |mut client| {
            let request = request.clone();
            async move {
                let response = client.heartbeat(request).await?.into_inner();
                let error = response.error.clone();
                Ok((response, error))
            }
        })
        .await?;
    Ok(view
        .member_queues
        .into_iter()
        .flat_map(|member| {
            let name = member.member_id;
            member
                .queues
                .into_iter()
                .map(move |queue| (queue, name.clone()))
        })
        .collect())
}

/// Where a group reads `queue` next (its committed cursor, or the oldest retained message if
/// retention passed the cursor) and the queue's end, from the queue's master: a one-message
/// read at the cursor. (The protocol does not return the cursor itself when retention passed
/// it; `next` is what the group will read.)
async fn cursor_and_end(
    router: &Router,
    topic: &str,
    group: &str,
    queue: u32,
) -> Result<(u64, u64), ClientError> {
    let request = api::ConsumeRequest {
        store_id: 0,
        topic: topic.to_string(),
        queue,
        consumer_group: group.to_string(),
        from_offset: None,
        max_messages: 1,
        max_bytes: 1,
        wait_ms: 0,
    };
    let read = consume_once(router, queue, request).await?;
    let cursor = read.messages.first().map_or(read.next_offset, |m| m.offset);
    Ok((cursor, read.end_offset))
}

/// `phxq seek`: moves a consumer group's cursor on one queue or every queue of a topic, and
/// prints each move (`queue Q: next A -> B`), through `phxq_client::seek`: every queue's
/// target is found first (a time is asked of the queue's master with `OffsetForTime`); an
/// offset past any queue's end, or any refusal, refuses the whole seek before any cursor
/// moves.
pub fn seek(args: &SeekArgs) -> CommandResult {
    let runtime = client_runtime()?;
    runtime.block_on(seek_all(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn seek_all(args: &SeekArgs) -> Result<(), ClientError> {
    let server = parse_server(&args.connection.server)?;
    let mut config = ProducerConfig::new([server.clone()]);
    config.deadline = Duration::from_millis(args.connection.timeout_ms);
    config.token = args.connection.token()?;
    config.ca = args.connection.store_ca()?;
    let moves = phxq_client::seek(&config, &args.topic, &args.group, args.queue, args.to)
        .await
        .map_err(|error| seek_error(&server, error))?;
    for change in moves {
        print_line(format_args!(
            "queue {}: next {} -> {}",
            change.queue, change.from, change.to
        ))
        .map_err(ClientError::Output)?;
    }
    Ok(())
}

/// The command's error for a library seek's.
fn seek_error(server: &str, error: SeekError) -> ClientError {
    match error {
        SeekError::Config(error) => ClientError::Usage(error.to_string()),
        SeekError::Store { error, .. } => match error.code() {
            Some(code) if error.kind() == ErrorKind::Refused => refused(code, error.message()),
            _ => ClientError::Unreachable {
                addr: server.to_string(),
                detail: error.to_string(),
            },
        },
    }
}

/// One Consume call to the master of `queue`'s group, with retries.
async fn consume_once(
    router: &Router,
    queue: u32,
    request: api::ConsumeRequest,
) -> Result<api::ConsumeResponse, ClientError> {
    let wait_ms = u64::from(request.wait_ms);
    router
        .call_waiting(Some(router.group_of(queue)), wait_ms, |mut client| {
            let request = request.clone();
            async move {
                let response = client.consume(request).await?.into_inner();
                let error = response.error.clone();
                Ok((response, error))
            }
        })
        .await
}

fn write_message(
    out: &mut impl Write,
    json: bool,
    queue: u32,
    message: &api::StoredMessage,
) -> std::io::Result<()> {
    if !json {
        out.write_all(&message.value)?;
        return out.write_all(b"\n");
    }
    let mut object = serde_json::Map::new();
    object.insert("queue".into(), json!(queue));
    object.insert("offset".into(), json!(message.offset));
    object.insert("time_ms".into(), json!(message.time_ms));
    insert_bytes(&mut object, "key", &message.key);
    insert_bytes(&mut object, "value", &message.value);
    writeln!(out, "{}", serde_json::Value::Object(object))
}

/// `name` as a string if `bytes` are UTF-8, else `name_hex` as lowercase hex.
fn insert_bytes(object: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.to_string(), json!(text)),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            object.insert(format!("{name}_hex"), json!(hex))
        }
    };
}

// ---------------------------------------------------------------------------------------------
// cluster status

/// One node's answer to `ClusterStatus`, or why it gave none.
struct View {
    node: api::NodeStatus,
    answer: Result<api::ClusterStatusResponse, String>,
}

pub fn status(args: &StatusArgs) -> CommandResult {
    let runtime = client_runtime()?;
    let (status, views) = runtime.block_on(gather_views(&args.connection))?;
    if args.json {
        print_line(serde_json::to_string_pretty(&status_json(&status, &views))?)?;
    } else {
        print_line(render_status(&status, &views).trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The seed's status, then every node's own view, asked concurrently (no retries: a node that
/// does not answer within the call timeout is reported as such).
async fn gather_views(
    connection: &Connection,
) -> Result<(api::ClusterStatusResponse, Vec<View>), ClientError> {
    let (router, status) = Router::discover(connection).await?;
    let mut calls = JoinSet::new();
    for (index, node) in status.nodes.iter().cloned().enumerate() {
        let client = router.client(&node.client_addr)?;
        calls.spawn(async move {
            let mut client = client;
            let call = client.cluster_status(api::ClusterStatusRequest {});
            let answer =
                match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), call).await {
                    Ok(Ok(response)) => {
                        let response = response.into_inner();
                        match api::check(response.error.as_ref()) {
                            Ok(()) => Ok(response),
                            Err(failure) => Err(failure.to_string()),
                        }
                    }
                    Ok(Err(status)) => Err(status.message().to_string()),
                    Err(_) => Err("no answer in time".to_string()),
                };
            (index, View { node, answer })
        });
    }
    let mut views = Vec::new();
    while let Some(joined) = calls.join_next().await {
        views.push(joined.map_err(|error| ClientError::Usage(error.to_string()))?);
    }
    views.sort_by_key(|(index, _)| *index);
    Ok((status, views.into_iter().map(|(_, view)| view).collect()))
}

/// A group as the store sees it: the node that masters it with a lease (by its own answer).
struct GroupRow {
    group: u64,
    master: Option<u64>,
    lease_remaining_ms: u64,
    term: u64,
    commit_index: u64,
    /// Each answering node's idea of the master (0: none).
    views: Vec<(u64, u64)>,
}

fn group_rows(status: &api::ClusterStatusResponse, views: &[View]) -> Vec<GroupRow> {
    (0..u64::from(status.groups_count))
        .map(|group| {
            let mut row = GroupRow {
                group,
                master: None,
                lease_remaining_ms: 0,
                term: 0,
                commit_index: 0,
                views: Vec::new(),
            };
            for view in views {
                let Ok(answer) = &view.answer else { continue };
                let Some(seen) = answer.groups.iter().find(|g| g.group == group) else {
                    continue;
                };
                row.views.push((view.node.id, seen.master));
                row.term = row.term.max(seen.term);
                row.commit_index = row.commit_index.max(seen.commit_index);
                if seen.master == view.node.id && seen.lease_remaining_ms > 0 {
                    row.master = Some(view.node.id);
                    row.lease_remaining_ms = seen.lease_remaining_ms;
                }
            }
            row
        })
        .collect()
}

fn render_status(status: &api::ClusterStatusResponse, views: &[View]) -> String {
    let rows = group_rows(status, views);
    let topics: Vec<String> = status
        .topics
        .iter()
        .map(|t| {
            format!(
                "{} ({} queues; groups: {})",
                t.name,
                t.queues,
                t.consumer_groups.join(", ")
            )
        })
        .collect();
    let mut out = format!(
        "store {}: {} nodes, {} replication groups; topics: {}\n\n",
        status.store_id,
        status.nodes.len(),
        status.groups_count,
        if topics.is_empty() {
            "none".to_string()
        } else {
            topics.join(", ")
        }
    );
    let node_rows: Vec<Vec<String>> = views
        .iter()
        .map(|view| {
            let masters = rows
                .iter()
                .filter(|r| r.master == Some(view.node.id))
                .count();
            vec![
                format!("n{}", view.node.id),
                view.node.client_addr.clone(),
                view.node.peer_addr.clone(),
                match &view.answer {
                    Ok(_) => "up".to_string(),
                    Err(error) => format!("down ({error})"),
                },
                masters.to_string(),
                counter(view, |c| c.syncs.to_string()),
                counter(view, |c| c.proposals.to_string()),
                counter(view, |c| {
                    format!("{:.1}", c.messages as f64 / c.proposals.max(1) as f64)
                }),
                counter(view, |c| c.peer_messages_rejected.to_string()),
                counter(view, |c| c.compactions_refused.to_string()),
            ]
        })
        .collect();
    let node_columns = [
        ("node", Align::Left),
        ("client", Align::Left),
        ("peer", Align::Left),
        ("state", Align::Left),
        ("masters", Align::Right),
        ("syncs", Align::Right),
        ("entries", Align::Right),
        ("msgs/entry", Align::Right),
        ("peer_rejected", Align::Right),
        ("compact_refused", Align::Right),
    ];
    out.push_str(&render(&node_columns, &node_rows));
    out.push('\n');
    let group_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let agreed = row
                .views
                .iter()
                .all(|(_, master)| Some(*master) == row.master);
            let views: Vec<String> = row
                .views
                .iter()
                .map(|(node, master)| {
                    format!(
                        "n{node}→{}",
                        if *master == 0 {
                            "?".to_string()
                        } else {
                            format!("n{master}")
                        }
                    )
                })
                .collect();
            vec![
                row.group.to_string(),
                row.master.map_or("none".to_string(), |m| format!("n{m}")),
                row.lease_remaining_ms.to_string(),
                row.term.to_string(),
                row.commit_index.to_string(),
                if agreed {
                    "all agree".to_string()
                } else {
                    views.join(" ")
                },
            ]
        })
        .collect();
    let group_columns = [
        ("group", Align::Right),
        ("master", Align::Left),
        ("lease_ms", Align::Right),
        ("term", Align::Right),
        ("commit", Align::Right),
        ("views", Align::Left),
    ];
    out.push_str(&render(&group_columns, &group_rows));
    let missing = rows.iter().filter(|r| r.master.is_none()).count();
    if missing > 0 {
        out.push_str(&format!(
            "\n{missing} group(s) have no master with a lease right now\n"
        ));
    }
    out
}

/// One of a node's counters, or "-" if it did not answer.
fn counter(view: &View, show: impl Fn(&api::NodeCounters) -> String) -> String {
    node_counters(view).map_or("-".to_string(), show)
}

/// A node's counters, if it answered (and showed them: admins only).
fn node_counters(view: &View) -> Option<&api::NodeCounters> {
    view.answer
        .as_ref()
        .ok()
        .and_then(|status| status.counters.as_ref())
}

fn status_json(status: &api::ClusterStatusResponse, views: &[View]) -> serde_json::Value {
    let rows = group_rows(status, views);
    let nodes: Vec<serde_json::Value> = views
        .iter()
        .map(|view| {
            json!({
                "id": view.node.id,
                "client_addr": view.node.client_addr,
                "peer_addr": view.node.peer_addr,
                "up": view.answer.is_ok(),
                "error": view.answer.as_ref().err(),
                "masters": rows.iter().filter(|r| r.master == Some(view.node.id)).count(),
                "peer_messages_rejected": node_counters(view).map(|c| c.peer_messages_rejected),
                "compactions_refused": node_counters(view).map(|c| c.compactions_refused),
            })
        })
        .collect();
    let groups: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let views: serde_json::Map<String, serde_json::Value> = row
                .views
                .iter()
                .map(|(node, master)| {
                    (
                        node.to_string(),
                        if *master == 0 {
                            json!(null)
                        } else {
                            json!(master)
                        },
                    )
                })
                .collect();
            json!({
                "group": row.group,
                "master": row.master,
                "lease_remaining_ms": row.lease_remaining_ms,
                "term": row.term,
                "commit_index": row.commit_index,
                "views": views,
            })
        })
        .collect();
    let topics: Vec<serde_json::Value> = status
        .topics
        .iter()
        .map(|t| json!({"name": t.name, "queues": t.queues, "consumer_groups": t.consumer_groups}))
        .collect();
    json!({
        "store_id": status.store_id,
        "groups_count": status.groups_count,
        "nodes": nodes,
        "groups": groups,
        "topics": topics,
    })
}

/// The client commands' runtime: small, as they do little at once.
fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_fixed_by_key_or_flag_and_round_robin_otherwise() {
        let mut keyed = QueueChooser::new(8, None, Some(b"user-42"));
        let queue = (fnv1a_64(b"user-42") % 8) as u32;
        assert_eq!([keyed.choose(), keyed.choose()], [queue, queue]);
        let mut fixed = QueueChooser::new(8, Some(5), Some(b"user-42"));
        assert_eq!(fixed.choose(), 5);
        let mut spread = QueueChooser::new(3, None, None);
        let mut seen: Vec<u32> = (0..3).map(|_| spread.choose()).collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
    }

    #[test]
    fn lines_lose_their_end_of_line_only() {
        let mut input = std::io::Cursor::new(b"a\r\n\nb c\nlast".to_vec());
        let mut lines = Vec::new();
        while let Some(line) = read_line(&mut input).unwrap() {
            lines.push(String::from_utf8(line).unwrap());
        }
        assert_eq!(lines, ["a", "", "b c", "last"]);
    }

    #[test]
    fn server_addresses_must_be_host_and_port() {
        assert!(parse_server("127.0.0.1:7100").is_ok());
        assert!(parse_server("node-1.example:7100").is_ok());
        for bad in [
            "",
            "7100",
            "host:",
            ":7100",
            "host:0",
            "host:99999",
            "a b:1",
        ] {
            assert!(parse_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seek_targets_are_named_offsets_or_times() {
        assert_eq!(parse_seek("earliest"), Ok(SeekTo::Earliest));
        assert_eq!(parse_seek("latest"), Ok(SeekTo::Latest));
        assert_eq!(parse_seek("7"), Ok(SeekTo::Offset(7)));
        assert_eq!(parse_seek("time:0"), Ok(SeekTo::Time(0)));
        assert_eq!(
            parse_seek("time:1714564800250"),
            Ok(SeekTo::Time(1_714_564_800_250))
        );
        assert_eq!(
            parse_seek("time:2024-05-01T12:00:00.250Z"),
            Ok(SeekTo::Time(1_714_564_800_250))
        );
        assert_eq!(
            parse_seek(&format!("time:{TIME_MS_MAX}")),
            Ok(SeekTo::Time(TIME_MS_MAX))
        );
        for bad in [
            "0",
            "-1",
            "first",
            "time:",
            "time:-5",
            "time:12.5",
            "time:2024-05-01",
            "time:99999999999999999999",
            "Time:0",
        ] {
            assert!(parse_seek(bad).is_err(), "{bad:?}");
        }
        let beyond = parse_seek(&format!("time:{}", TIME_MS_MAX + 1)).unwrap_err();
        assert!(beyond.contains("9999-12-31"), "{beyond}");
    }

    #[test]
    fn binary_keys_and_values_come_as_hex() {
        let message = api::StoredMessage {
            offset: 3,
            time_ms: 9,
            key: vec![0xff],
            value: b"hi".to_vec(),
        };
        let mut out = Vec::new();
        write_message(&mut out, true, 2, &message).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            line,
            json!({"queue": 2, "offset": 3, "time_ms": 9, "key_hex": "ff", "value": "hi"})
        );
    }
}
