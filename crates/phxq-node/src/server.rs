//! The server: one [`Node`] run for real, with threads, wall time, TCP and gRPC.
//!
//! ```text
//!  gRPC handlers ──Client──┐                        ┌──▶ Transport::send (one frame per peer)
//!  Transport ─────Peer─────┼─▶ event-loop thread ───┼──▶ reply oneshots (client answers)
//!  RunningServer ──Wake────┘   (owns the Node)      └──▶ wal.sync_to(newest Lsn), then
//!                                                        Node::synced
//! ```
//!
//! * **The event-loop thread owns the [`Node`].** Inputs arrive on one bounded channel: peer
//!   frames from the transport, client requests with a reply sender, and wake-ups. It drains
//!   what is queued (at most [`INPUTS_PER_WAKE_MAX`]), turns elapsed wall time ([`Instant`])
//!   into ticks, and runs [`Node::round`] until the node has no work, sending each round's
//!   messages (one [`PeerFrame`] per destination) and answering clients.
//! * **Then it syncs the log itself**, to the newest Lsn the rounds wrote, and reports it with
//!   [`Node::synced`]; the messages and answers that depend on that sync (held by the node)
//!   go out with the next round. Everything that did not depend on it (appends to followers,
//!   heartbeats, answers to reads) was sent before the fsync began, so the followers' writes
//!   overlap the master's. Inputs that arrive during the fsync queue up and the next round
//!   takes them all: group commit by construction, with no timer and no thread hand-off.
//!   (A separate sync thread, measured against this in BENCHMARKS.md, cost two thread wake-ups
//!   per round and 15-20% of the throughput on two cores.) The cost: while an fsync runs, the
//!   node answers nothing, so a disk that stalls longer than the election timeout makes the
//!   node lose its masters to healthy peers, which is the failover one wants from a stuck disk.
//! * **Fail-stop.** A [`NodeError`] from a round or a failed sync voids durability: the event
//!   loop stops at once, answers nothing more (pending clients see `UNAVAILABLE`, never a
//!   success), and [`RunningServer::run_until`] returns the error so the process exits
//!   non-zero.
//! * **Backpressure, not buffering.** A full input channel answers a client `BUSY` and drops a
//!   peer frame (raft retransmits); the node itself refuses requests beyond its pending limit.
//! * **Graceful stop**: stop accepting client calls, finish the current round, sync what was
//!   written, answer what is left (`INDETERMINATE` for writes in flight, which may still
//!   commit through the other nodes; `UNAVAILABLE` for reads), stop the transport.
//!
//! The data directory holds the write-ahead log in `wal/` and an `IDENTITY` file naming the
//! store and node it belongs to, so a node started with another node's directory (or another
//! store's) refuses to start instead of corrupting raft state.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phxq_core::{ConsumerGroupSettings, Message, PutMode, Retention, RetryTier, TopicConfig};
use phxq_proto::PeerFrame;
use phxq_proto::api::{self, phxq_server};
use phxq_storage::{Lsn, Wal, WalOptions};
use phxq_types::{ErrorCode, GroupId, NodeId, validate_name};
use tokio::sync::oneshot;

use crate::auth::{Action, Secret, Verifier};
use crate::config::ServerConfig;
use crate::server::auth::caller;
use crate::server::budget::{
    ByteBudget, PeerReceiver, PeerRefused, PeerSender, Reserved, produce_bytes,
};
use crate::server::heartbeat::CoordinatorShell;
use crate::transport::{Transport, TransportConfig};
use crate::{
    Append, GroupStatus, Node, NodeError, NodeStatus, Output, Request, RequestId, Response,
};

mod auth;
mod budget;
mod delivery;
mod heartbeat;
mod history;
pub use history::{REJOIN_FILE, require_rejoin};
mod produce_stream;

/// Client inputs queued for the event loop at most, by default (`limits.inputs_queued_max`);
/// beyond, clients get `BUSY`. Peer frames have a queue of their own (`budget.rs`), which
/// clients cannot fill.
pub const INPUTS_QUEUED_MAX: usize = 16_384;
/// Peer frames the event loop takes per wake-up, and before each round, at most.
pub const PEER_FRAMES_PER_WAKE_MAX: usize = 1_024;
pub use budget::{PEER_INPUT_BYTES_MAX, PEER_INPUTS_QUEUED_MAX};
/// Inputs the event loop takes per wake-up before running a round (bounds a round's latency).
pub const INPUTS_PER_WAKE_MAX: usize = 4_096;
/// Rounds run per wake-up at most, so ticks are never starved by a busy node.
pub const ROUNDS_PER_WAKE_MAX: usize = 64;
/// Ticks replayed at most after the event loop was held up (a stopped process); beyond, the
/// extra ticks are skipped: every timeout they could fire has fired.
pub const TICKS_CATCH_UP_MAX: u64 = 1_000;
/// Frames queued per peer in the transport.
pub const PEER_QUEUE_FRAMES_MAX: usize = 1_024;

/// Messages in one Produce call at most.
pub const PRODUCE_MESSAGES_MAX: usize = 10_000;
/// Bytes of keys and values in one Produce call at most (32 MiB): one call is one log entry.
pub const PRODUCE_BYTES_MAX: usize = 32 << 20;
/// `max_messages` of a Consume call at most.
pub const CONSUME_MESSAGES_MAX: u32 = 10_000;
/// `max_bytes` of a Consume call at most (64 MiB).
pub const CONSUME_BYTES_MAX: u32 = 64 << 20;
/// `wait_ms` of a Consume call at most (1 minute).
pub const CONSUME_WAIT_MS_MAX: u32 = 60_000;
/// How long a call may wait for the node beyond its own long-poll wait, in milliseconds;
/// then it fails with `TIMEOUT` (a Produce may still commit: at-least-once).
pub const CALL_TIMEOUT_MS: u64 = 30_000;
/// Slack over the payload limits for protobuf framing of a call, in bytes.
/// (A ProduceMany of `PRODUCE_MESSAGES_MAX` appends repeats a topic name of up to 128 bytes
/// in each: about 1.5 MB of framing.)
const GRPC_OVERHEAD_BYTES: usize = 4 << 20;
/// Concurrent calls per client connection at most.
pub const CALLS_PER_CONNECTION_MAX: u32 = 1_024;
/// How long a graceful stop waits for client connections to drain, in milliseconds.
pub const DRAIN_TIMEOUT_MS: u64 = 5_000;

/// The file in the data directory naming the store and node it belongs to.
const IDENTITY_FILE: &str = "IDENTITY";
/// The write-ahead log's directory inside the data directory.
pub(crate) const WAL_DIR: &str = "wal";

/// Why a server could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory is unusable or belongs to another node.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The write-ahead log did not open.
    #[error("write-ahead log: {0}")]
    Wal(#[from] phxq_storage::Error),
    /// Binding a listening socket failed.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Client or peer.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Durability is void: the node stopped (see the module documentation).
    #[error("node stopped to protect durability: {0}")]
    Node(#[from] NodeError),
    /// An fsync of the write-ahead log failed; the node stopped.
    #[error("node stopped: syncing the write-ahead log failed: {0}")]
    Sync(String),
    /// The client gRPC server failed.
    #[error("client gRPC server: {0}")]
    Grpc(String),
    /// The `[auth]` secret file is missing or not a secret.
    #[error("auth: {0}")]
    Auth(String),
    /// A thread could not be started, or ended by a panic.
    #[error("{0}")]
    Thread(String),
    /// The peer TLS files are missing or unusable.
    #[error("peer TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The client port's TLS files are unusable, or its certificate does not name the node's
    /// client address.
    #[error("client port TLS: {0}")]
    ClientTls(crate::tls::TlsError),
}

// ---------------------------------------------------------------------------------------------
// Handles

/// What the event loop receives from clients (peer frames come on their own queue).
enum Input {
    /// A client request, where its answer goes, and the produce bytes it holds.
    Client(Request, oneshot::Sender<Response>, Option<Reserved>),
    /// Nothing to do but look at the stop flag.
    Wake,
}

/// A cheap, cloneable way to ask a running node something (used by the gRPC service and by
/// in-process callers such as `phxq dev`).
#[derive(Clone)]
pub struct NodeHandle {
    inputs: SyncSender<Input>,
    /// Bytes of produce payloads handed to the node and not yet answered.
    produce_budget: Arc<ByteBudget>,
    /// Peer frames the transport dropped because the peer input queue was full
    /// (`NodeCounters.peer_frames_dropped` in `ClusterStatus`).
    peer_frames_dropped: Arc<AtomicU64>,
}

impl NodeHandle {
    /// Sends `request` to the node and waits for its answer. A full input queue answers
    /// `BUSY`, a stopped node `UNAVAILABLE`.
    pub async fn call(&self, request: Request) -> Response {
        self.submit(request).await
    }

    /// Queues `request` for the node now, before the returned future is first polled, and
    /// gives the future of its answer: requests submitted one after the other reach the node
    /// in that order (a `ProduceStream` relies on it).
    /// A produce that would pass the pending produce bytes is answered `BUSY` at once.
    pub fn submit(&self, request: Request) -> impl Future<Output = Response> + Send + use<> {
        let (reply, answer) = oneshot::channel();
        let bytes = produce_bytes(&request);
        let reserved = match bytes {
            0 => Ok(None),
            _ => self.produce_budget.try_reserve(bytes).map(Some).ok_or(()),
        };
        let refused = match reserved {
            Err(()) => Some(Response::error(
                ErrorCode::Busy,
                format!(
                    "{} of {} bytes of produces pending; {bytes} more do not fit",
                    self.produce_budget.used(),
                    self.produce_budget.max()
                ),
            )),
            Ok(reserved) => self.queue(Input::Client(request, reply, reserved)),
        };
        async move {
            match refused {
                Some(response) => response,
                None => answer.await.unwrap_or_else(|_| stopped_response()),
            }
        }
    }

    /// Queues `input`; the answer if it could not be.
    fn queue(&self, input: Input) -> Option<Response> {
        match self.inputs.try_send(input) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) => Some(Response::error(
                ErrorCode::Busy,
                "the node's input queue is full",
            )),
            Err(TrySendError::Disconnected(_)) => Some(stopped_response()),
        }
    }

    /// This node's view of its groups.
    pub async fn status(&self) -> Option<NodeStatus> {
        match self.call(Request::Status).await {
            Response::Status(status) => Some(status),
            _ => None,
        }
    }

    fn wake(&self) {
        // A full queue wakes the loop anyway.
        let _ = self.inputs.try_send(Input::Wake);
    }
}

fn stopped_response() -> Response {
    Response::error(ErrorCode::Unavailable, "the node is stopping or stopped")
}

// ---------------------------------------------------------------------------------------------
// Starting and stopping

/// A node serving clients and peers. Stop it with [`RunningServer::run_until`].
pub struct RunningServer {
    config: Arc<ServerConfig>,
    handle: NodeHandle,
    client_addr: SocketAddr,
    transport: Transport,
    stopping: Arc<AtomicBool>,
    /// Raised to stop the gRPC service and end its `ProduceStream`s.
    grpc_stop: Option<tokio::sync::watch::Sender<bool>>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    exited: oneshot::Receiver<Result<(), ServerError>>,
    /// The log, for tests that inject faults.
    #[cfg(test)]
    wal: Arc<Wal>,
}

impl RunningServer {
    /// Opens the data directory and the log, starts the node's groups, the peer transport and
    /// the client gRPC service. Must be called inside a tokio runtime (multi-threaded).
    pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
        let config = Arc::new(config);
        let fresh = check_identity(&config)?;
        let verifier = load_verifier(&config)?;
        let client_tls = client_tls(&config)?;
        // A node that ran before never starts empty (see `server/history.rs`).
        let marker_term = history::before_open(&config, fresh)?;
        let wal_dir = config.data_dir.join(WAL_DIR);
        let opening = wal_dir.clone();
        let (wal, recovery) =
            tokio::task::spawn_blocking(move || Wal::open(&opening, WalOptions::default()))
                .await
                .map_err(|error| ServerError::Thread(format!("opening the log: {error}")))??;
        tracing::info!(
            node = %config.node,
            dir = %wal_dir.display(),
            segments = recovery.segments,
            records = recovery.records,
            torn_tail = recovery.torn_tail.is_some(),
            "write-ahead log opened"
        );
        let history = history::after_open(&config, marker_term, &wal)?;
        if config.rejoin_empty {
            tracing::warn!(
                node = %config.node,
                "--rejoin-empty: this node's groups neither vote nor campaign until they caught \
                 up with their masters"
            );
        }
        let wal = Arc::new(wal);
        let client_listener = bind("client", config.client_listen).await?;
        let peer_listener = bind("peer", config.peer_listen).await?;
        let client_addr = local_addr("client", &client_listener, config.client_listen)?;

        let (inputs, receiver) = std::sync::mpsc::sync_channel(config.limits.inputs_queued_max);
        let produce_budget = ByteBudget::new(config.limits.produce_pending_bytes_max);
        let handle = NodeHandle {
            inputs,
            produce_budget,
            peer_frames_dropped: Arc::new(AtomicU64::new(0)),
        };
        let (peer_sender, peer_receiver) =
            budget::peer_inputs(PEER_INPUTS_QUEUED_MAX, PEER_INPUT_BYTES_MAX);
        let transport = start_transport(&config, peer_listener, &handle, peer_sender)?;
        let stopping = Arc::new(AtomicBool::new(false));
        #[cfg(test)]
        let wal_for_tests = wal.clone();
        let inputs = Inputs {
            clients: receiver,
            peers: peer_receiver,
        };
        let exited = spawn_event_loop(
            &config,
            (wal, history),
            inputs,
            transport.clone(),
            stopping.clone(),
        )
        .await?;
        let (grpc_stop, grpc_stopped) = tokio::sync::watch::channel(false);
        let service = Service {
            config: config.clone(),
            handle: handle.clone(),
            stopping: grpc_stopped.clone(),
            transport: transport.clone(),
            coordinator: CoordinatorShell::new(),
        };
        let gate = (verifier, client_tls);
        let grpc = tokio::spawn(serve_grpc(service, gate, client_listener, grpc_stopped));
        tracing::info!(
            node = %config.node,
            store = config.store_id,
            client = %client_addr,
            peer = %transport.local_addr(),
            "node serving"
        );
        Ok(RunningServer {
            config,
            handle,
            client_addr,
            transport,
            stopping,
            grpc_stop: Some(grpc_stop),
            grpc,
            exited,
            #[cfg(test)]
            wal: wal_for_tests,
        })
    }

    /// A handle for in-process requests.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// The address the client gRPC service listens on.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The address the peer transport listens on.
    pub fn peer_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    /// The peer transport's counters (inbound connections refused, unauthenticated, ...).
    pub fn peer_stats(&self) -> crate::transport::TransportStats {
        self.transport.stats()
    }

    /// The node's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Serves until `shutdown` resolves, then stops gracefully and returns `Ok`; or until the
    /// node stops on its own (a failure that voids durability), and returns that error.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let early = tokio::select! {
            () = shutdown => None,
            exited = &mut self.exited => Some(exited),
        };
        let node = self.config.node;
        if early.is_none() {
            tracing::info!(%node, "stopping: no new calls; finishing the current round");
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.handle.wake();
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(true);
        }
        let outcome = match early {
            Some(exited) => exited,
            None => (&mut self.exited).await,
        }
        .unwrap_or_else(|_| Err(ServerError::Thread("the event loop vanished".to_string())));
        let drained =
            tokio::time::timeout(Duration::from_millis(DRAIN_TIMEOUT_MS), &mut self.grpc).await;
        match drained {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                tracing::warn!(%node, %error, "client gRPC server ended with an error")
            }
            Ok(Err(error)) => tracing::warn!(%node, %error, "client gRPC server task failed"),
            Err(_) => {
                tracing::warn!(%node, "client connections did not drain in time; closing them");
                self.grpc.abort();
            }
        }
        self.transport.clone().shutdown().await;
        match &outcome {
            Ok(()) => tracing::info!(%node, "stopped"),
            Err(error) => tracing::error!(%node, %error, "node failed"),
        }
        outcome
    }
}

impl Drop for RunningServer {
    /// A server dropped without [`RunningServer::run_until`] still stops its event loop
    /// (gracefully: it syncs what was written), rather than leaving it running unseen.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.handle.wake();
    }
}

/// The verifier of the `[auth]` secret, or `None` (with a loud warning) when auth is off.
fn load_verifier(config: &ServerConfig) -> Result<Option<Arc<Verifier>>, ServerError> {
    let Some(auth) = &config.auth else {
        tracing::warn!(
            node = %config.node,
            "AUTH IS OFF: the config has no [auth] section, so any client that reaches {} may \
             produce, consume, seek, and create or delete topics; add [auth] secret_file = ... \
             (see etc/node1.toml)",
            config.client_listen
        );
        return Ok(None);
    };
    let secret = Secret::load(&auth.secret_file).map_err(ServerError::Auth)?;
    tracing::info!(node = %config.node, secret_file = %auth.secret_file.display(), "client auth on");
    Ok(Some(Arc::new(Verifier::new(secret))))
}

/// The client port's TLS, or `None` for plaintext (warned about when tokens would cross it).
fn client_tls(
    config: &ServerConfig,
) -> Result<Option<tonic::transport::ServerTlsConfig>, ServerError> {
    let Some(files) = &config.client_tls else {
        if config.auth.is_some() {
            tracing::warn!(
                node = %config.node,
                "CLIENT PORT IN PLAINTEXT with auth on: tokens cross {} in clear, and anyone on \
                 the path can replay them; set [tls] client_port = true (see etc/node1.toml)",
                config.client_listen
            );
        }
        return Ok(None);
    };
    let (cert, key) = crate::tls::client_port_identity(files, config.me().client_addr)
        .map_err(ServerError::ClientTls)?;
    tracing::info!(node = %config.node, cert = %files.cert.display(), "client port TLS on");
    let identity = tonic::transport::Identity::from_pem(cert, key);
    // A client that connects and never finishes its handshake holds a connection only this
    // long (handshakes run apart from the accept loop, so a slow one delays no one else).
    let handshake = Duration::from_millis(crate::transport::HANDSHAKE_TIMEOUT_MS);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(handshake),
    ))
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn local_addr(
    what: &'static str,
    listener: &tokio::net::TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, ServerError> {
    listener
        .local_addr()
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn start_transport(
    config: &ServerConfig,
    listener: tokio::net::TcpListener,
    handle: &NodeHandle,
    peers: PeerSender,
) -> Result<Transport, ServerError> {
    let peer_addr = config.peer_listen;
    let handle = handle.clone();
    let dropped = handle.peer_frames_dropped.clone();
    let deliver = Arc::new(move |frame: PeerFrame| match peers.send(frame) {
        Ok(true) => handle.wake(),
        Ok(false) | Err(PeerRefused::Stopped) => {}
        Err(PeerRefused::Full) => {
            // Only a stalled event loop fills the peer queue (clients cannot): raft
            // retransmits; count and say so once in a while.
            let count = dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if count.is_power_of_two() {
                tracing::warn!(count, "peer input queue full: peer frames dropped");
            }
        }
    });
    let tls = match &config.peer_tls {
        Some(files) => Some(crate::tls::PeerTls::load(files, config.store_id)?),
        None => None,
    };
    let transport_config = TransportConfig {
        store_id: config.store_id,
        me: config.node,
        listen: peer_addr,
        peers: config.members.iter().map(|m| (m.id, m.peer_addr)).collect(),
        queue_frames_max: PEER_QUEUE_FRAMES_MAX,
        tls,
        idle_timeout_ms: crate::transport::IDLE_TIMEOUT_MS,
        handshake_timeout_ms: crate::transport::HANDSHAKE_TIMEOUT_MS,
    };
    Transport::start_on(listener, transport_config, deliver).map_err(|source| ServerError::Bind {
        what: "peer",
        addr: peer_addr,
        source,
    })
}

/// Checks (or, on first start, writes) the data directory's identity file; true if it was
/// written now.
fn check_identity(config: &ServerConfig) -> Result<bool, ServerError> {
    let dir = &config.data_dir;
    let fail = |reason: String| ServerError::DataDir {
        path: dir.clone(),
        reason,
    };
    let expected = format!(
        "store_id = {}\nnode_id = {}\n",
        config.store_id, config.node.0
    );
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(found) if found == expected => Ok(false),
        Ok(found) => Err(fail(format!(
            "belongs to another node: {} says {:?}, this config is {:?}",
            path.display(),
            found.trim(),
            expected.trim()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            write_identity(dir, &path, &expected).map_err(|error| fail(error.to_string()))?;
            Ok(true)
        }
        Err(error) => Err(fail(format!("cannot read {}: {error}", path.display()))),
    }
}

/// Writes the identity file durably: temporary file, fsync, rename, fsync of the directory.
fn write_identity(dir: &Path, path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for found in [WAL_DIR, history::MARKER_FILE] {
        if dir.join(found).exists() {
            return Err(std::io::Error::other(format!(
                "{} exists without {IDENTITY_FILE}; refusing to guess whose it is",
                dir.join(found).display()
            )));
        }
    }
    let temporary = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Starts the event-loop thread; returns once the node's groups are open (or failed to open),
/// with a receiver that fires when the event loop ends.
async fn spawn_event_loop(
    config: &Arc<ServerConfig>,
    (wal, history): (Arc<Wal>, history::History),
    receiver: Inputs,
    transport: Transport,
    stopping: Arc<AtomicBool>,
) -> Result<oneshot::Receiver<Result<(), ServerError>>, ServerError> {
    let (opened_tx, opened) = oneshot::channel();
    let (exited_tx, exited) = oneshot::channel();
    let config = config.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("phxq-{}-loop", config.node))
        .spawn(move || {
            let node = match Node::open(config.node_config(seed(&config)), wal.clone()) {
                Ok(node) => node,
                Err(error) => {
                    let _ = opened_tx.send(Err(ServerError::Node(error)));
                    return;
                }
            };
            let _ = opened_tx.send(Ok(()));
            let mut event_loop =
                EventLoop::new(config, (node, history), wal, receiver, transport, stopping);
            // A panic (a bug, or raft-rs meeting a log that just failed) must still stop the
            // node with a reason, never leave it half-alive.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event_loop.run()))
                    .unwrap_or_else(|panic| {
                        Err(ServerError::Thread(format!(
                            "the event loop panicked: {}",
                            panic_message(&*panic)
                        )))
                    });
            // Release the log (its directory lock) before saying the loop ended, so a caller
            // that restarts on the same directory at once does not find it still locked.
            drop(event_loop);
            let _ = exited_tx.send(outcome);
        });
    spawned
        .map_err(|error| ServerError::Thread(format!("cannot start the event loop: {error}")))?;
    opened.await.unwrap_or_else(|_| {
        Err(ServerError::Thread(
            "the event loop panicked while opening".to_string(),
        ))
    })?;
    Ok(exited)
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Seeds the node's random choices: differs across nodes and restarts (elections only need
/// spread, not replay; the simulator seeds its nodes itself).
fn seed(config: &ServerConfig) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ config.node.0.rotate_left(48) ^ u64::from(std::process::id()).rotate_left(16)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

// ---------------------------------------------------------------------------------------------
// The event loop

/// A client waiting for its answer.
struct Pending {
    reply: oneshot::Sender<Response>,
    /// A write (produce or cursor commit): if the node stops first, the outcome is unknown.
    write: bool,
    /// The produce bytes it holds, released with the answer.
    _reserved: Option<Reserved>,
}

/// The event loop's two input queues.
struct Inputs {
    /// Client requests and wake-ups.
    clients: Receiver<Input>,
    /// Peer frames, served first.
    peers: PeerReceiver,
}

/// The thread that owns the [`Node`]. See the module documentation.
struct EventLoop {
    config: Arc<ServerConfig>,
    node: Node,
    /// The data directory's marker, kept at the log's highest durable term.
    history: history::History,
    wal: Arc<Wal>,
    inputs: Inputs,
    transport: Transport,
    stopping: Arc<AtomicBool>,
    pending: HashMap<RequestId, Pending>,
    next_request: RequestId,
    /// The newest Lsn a round asked to make durable.
    sync_requested: Lsn,
    /// The newest durable Lsn reported to the node.
    synced: Lsn,
    tick: Duration,
    next_tick: Instant,
    /// The wall clock read once at start, and the monotonic clock read then: the time the
    /// node stamps on batches is their sum plus the monotonic time elapsed, so a wall clock
    /// stepped (NTP, an operator) while the node runs moves no deadline or retention
    /// decision; only a restart reads the wall clock again.
    started_wall_ms: u64,
    started: Instant,
}

impl EventLoop {
    fn new(
        config: Arc<ServerConfig>,
        (node, history): (Node, history::History),
        wal: Arc<Wal>,
        inputs: Inputs,
        transport: Transport,
        stopping: Arc<AtomicBool>,
    ) -> EventLoop {
        let tick = Duration::from_millis(config.timing.tick_ms);
        EventLoop {
            config,
            node,
            history,
            wal,
            inputs,
            transport,
            stopping,
            pending: HashMap::new(),
            next_request: 1,
            sync_requested: 0,
            synced: 0,
            tick,
            next_tick: Instant::now() + tick,
            started_wall_ms: wall_ms(),
            started: Instant::now(),
        }
    }

    /// Serves until told to stop (then stops gracefully) or a failure voids durability.
    fn run(&mut self) -> Result<(), ServerError> {
        let outcome = self.serve();
        match outcome {
            Ok(()) => self.stop_gracefully(),
            Err(error) => {
                // Answer nothing more: dropping the reply senders tells every waiting client
                // `UNAVAILABLE`, which promises nothing.
                self.pending.clear();
                Err(error)
            }
        }
    }

    fn serve(&mut self) -> Result<(), ServerError> {
        while !self.stopping.load(Ordering::SeqCst) {
            // Peer frames first: they are never behind client load. Work left over from a
            // capped wake-up, or peer frames, run at once; otherwise sleep until the next
            // tick unless an input comes first (the transport wakes the loop on the client
            // queue when it queues a frame on an empty peer queue).
            let mut frames = self.inputs.peers.drain(PEER_FRAMES_PER_WAKE_MAX);
            let timeout = if self.node.has_work() || !frames.is_empty() {
                Duration::ZERO
            } else {
                self.next_tick.saturating_duration_since(Instant::now())
            };
            let mut inputs = Vec::new();
            match self.inputs.clients.recv_timeout(timeout) {
                Ok(input) => inputs.push(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let room = PEER_FRAMES_PER_WAKE_MAX - frames.len();
            frames.extend(self.inputs.peers.drain(room));
            while inputs.len() < INPUTS_PER_WAKE_MAX {
                match self.inputs.clients.try_recv() {
                    Ok(input) => inputs.push(input),
                    Err(_) => break,
                }
            }
            // The clock first, then the inputs, with answers to a master counted as heard at
            // the tick before the catch-up. After a stall (a slow fsync, a descheduled
            // process) a follower's election timer is reset by a queued heartbeat only now,
            // not back at the stall's start, and a master's lease is never stretched by
            // answers that waited in the queue: both sides stay on the safe side of the
            // lease (ARCHITECTURE invariant 2).
            let heard_tick = self.node.now_tick();
            self.tick_due();
            for frame in frames {
                self.step_peer(frame, heard_tick);
            }
            for input in inputs {
                self.handle(input);
            }
            self.run_rounds()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Steps a peer's frame, its answers counted as heard at `heard_tick`.
    fn step_peer(&mut self, frame: PeerFrame, heard_tick: u64) {
        let before = self.node.status_counters().peer_messages_rejected;
        self.node
            .step_heard_at(frame.from, frame.messages, heard_tick);
        let after = self.node.status_counters().peer_messages_rejected;
        // Say so at the first rejection and then at every power of two.
        if (before + 1..=after).any(u64::is_power_of_two) {
            let reason = self.node.last_peer_rejection().unwrap_or_default();
            tracing::warn!(count = after, %reason, "peer raft messages dropped");
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Client(request, reply, reserved) => {
                if self.stopping.load(Ordering::SeqCst) {
                    let _ = reply.send(stopped_response());
                    return;
                }
                let id = self.next_request;
                self.next_request += 1;
                let write = matches!(
                    request,
                    Request::Produce { .. }
                        | Request::ProduceMany { .. }
                        | Request::Commit { .. }
                        | Request::Receive { .. }
                        | Request::Ack { .. }
                        | Request::Nack { .. }
                        | Request::PutTopic { .. }
                        | Request::DeleteTopic { .. }
                );
                let pending = Pending {
                    reply,
                    write,
                    _reserved: reserved,
                };
                self.pending.insert(id, pending);
                self.node.request(id, request);
            }
            Input::Wake => {}
        }
    }

    /// Makes what the rounds wrote durable and tells the node, which releases what depended
    /// on it with the next round; a failed sync is fatal.
    fn sync(&mut self) -> Result<(), ServerError> {
        if self.sync_requested > self.synced {
            let durable = self.wal.sync_to(self.sync_requested).map_err(|error| {
                tracing::error!(%error, "fsync of the write-ahead log failed; stopping the node");
                ServerError::Sync(error.to_string())
            })?;
            self.synced = durable.max(self.sync_requested);
            // Before the votes and acknowledgements of a new term are released.
            self.history.keep(self.node.term_max())?;
            self.node.synced(self.synced);
        }
        // An idle group catches up with no write, so this is not inside the sync above.
        if self.history.rejoin_pending() && self.node.rejoining_groups() == 0 {
            self.history.rejoined()?;
        }
        Ok(())
    }

    /// Turns elapsed wall time into ticks.
    fn tick_due(&mut self) {
        let now = Instant::now();
        let mut ticks = 0;
        while self.next_tick <= now {
            if ticks == TICKS_CATCH_UP_MAX {
                tracing::warn!(node = %self.config.node, "event loop held up; skipping ticks");
                self.next_tick = now + self.tick;
                break;
            }
            let elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.node
                .tick(self.started_wall_ms.saturating_add(elapsed_ms));
            self.next_tick += self.tick;
            ticks += 1;
        }
    }

    /// Runs rounds while the node has work (bounded), dispatching each round's output.
    /// Peer frames that arrived meanwhile are stepped before each round after the first (no
    /// tick passes here, so they count as heard now), so a long burst of rounds never holds
    /// a heartbeat or its answer back.
    fn run_rounds(&mut self) -> Result<(), ServerError> {
        for round in 0..ROUNDS_PER_WAKE_MAX {
            if round > 0 {
                for frame in self.inputs.peers.drain(PEER_FRAMES_PER_WAKE_MAX) {
                    self.step_peer(frame, self.node.now_tick());
                }
            }
            let output = self.node.round()?;
            self.dispatch(output);
            // A tick due ends the burst: heartbeats and lease checks run on ticks, and the
            // sync after the burst releases what followers must answer.
            if !self.node.has_work() || Instant::now() >= self.next_tick {
                break;
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, output: Output) {
        let me = self.config.node;
        for (to, messages) in output.messages {
            debug_assert_ne!(to, me, "raft sends nothing to itself");
            let frame = PeerFrame {
                store_id: self.config.store_id,
                from: me,
                to,
                messages,
            };
            self.transport.send(to, frame);
        }
        for (id, response) in output.responses {
            if let Some(pending) = self.pending.remove(&id) {
                // The client may have gone; its answer is then dropped.
                let _ = pending.reply.send(response);
            }
        }
        if let Some(lsn) = output.sync
            && lsn > self.sync_requested
        {
            self.sync_requested = lsn;
        }
    }

    /// Refuses what is still queued, finishes the round, syncs what was written, and answers
    /// the clients left.
    fn stop_gracefully(&mut self) -> Result<(), ServerError> {
        while let Ok(input) = self.inputs.clients.try_recv() {
            // Clients are refused while stopping.
            self.handle(input);
        }
        self.run_rounds()?;
        if self.sync_requested > self.synced {
            self.sync()?;
            self.run_rounds()?;
        }
        for (_, pending) in self.pending.drain() {
            let response = if pending.write {
                Response::error(
                    ErrorCode::Indeterminate,
                    "the node stopped before the request committed; it may still commit",
                )
            } else {
                stopped_response()
            };
            let _ = pending.reply.send(response);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The client gRPC service

/// Serves the client API on `listener` until `stop` fires (or its sender is dropped).
async fn serve_grpc(
    service: Service,
    (verifier, tls): (
        Option<Arc<Verifier>>,
        Option<tonic::transport::ServerTlsConfig>,
    ),
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let message_bytes_max = service.config.layout.message_bytes_max;
    let server = phxq_server::PhxqServer::new(service)
        .max_decoding_message_size(PRODUCE_BYTES_MAX + GRPC_OVERHEAD_BYTES)
        .max_encoding_message_size(
            CONSUME_BYTES_MAX as usize + message_bytes_max + GRPC_OVERHEAD_BYTES,
        );
    // Every call passes the gate first: no token, no request read (`server/auth.rs`).
    let server = tonic::service::interceptor::InterceptedService::new(server, move |request| {
        auth::authenticate(verifier.as_deref(), request)
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .max_concurrent_streams(CALLS_PER_CONNECTION_MAX)
        .add_service(server)
        .serve_with_incoming_shutdown(incoming, async {
            // Raised, or its sender dropped: either way, stop.
            let _ = stop.wait_for(|stopping| *stopping).await;
        })
        .await
}

/// The gRPC service: checks arguments, turns calls into [`Request`]s and answers back.
struct Service {
    config: Arc<ServerConfig>,
    handle: NodeHandle,
    /// Raised when the node stops: open `ProduceStream`s stop reading and end.
    stopping: tokio::sync::watch::Receiver<bool>,
    transport: Transport,
    /// The consumer group coordinator (`server/heartbeat.rs`).
    coordinator: CoordinatorShell,
}

type GrpcResult<T> = Result<tonic::Response<T>, tonic::Status>;

impl Service {
    /// Asks the node, bounded by `wait_ms` plus [`CALL_TIMEOUT_MS`].
    async fn call(&self, request: Request, wait_ms: u64) -> Response {
        bounded(self.handle.submit(request), wait_ms).await
    }

    /// The wire form of a refusal; `NOT_MASTER` carries the master's client address.
    fn wire_error(&self, code: ErrorCode, message: String, master: Option<NodeId>) -> api::Error {
        wire_error(&self.config, code, message, master)
    }

    /// The error of an answer that is not the expected kind.
    fn failure(&self, response: Response) -> api::Error {
        failure(&self.config, response)
    }

    fn wait_ticks(&self, wait_ms: u32) -> u64 {
        u64::from(wait_ms).div_ceil(self.config.timing.tick_ms)
    }
}

/// `answer`, or `TIMEOUT` if it takes longer than `wait_ms` plus [`CALL_TIMEOUT_MS`].
async fn bounded(answer: impl Future<Output = Response>, wait_ms: u64) -> Response {
    let limit = Duration::from_millis(wait_ms + CALL_TIMEOUT_MS);
    tokio::time::timeout(limit, answer)
        .await
        .unwrap_or_else(|_| {
            Response::error(
                ErrorCode::Timeout,
                format!(
                    "no answer within {} ms; a write may still commit",
                    limit.as_millis()
                ),
            )
        })
}

/// The wire form of a refusal; `NOT_MASTER` carries the master's client address.
fn wire_error(
    config: &ServerConfig,
    code: ErrorCode,
    message: String,
    master: Option<NodeId>,
) -> api::Error {
    let master_addr = master
        .and_then(|id| config.member(id))
        .map(|member| member.client_addr.to_string())
        .unwrap_or_default();
    api::error(code, message, master_addr)
}

/// The error of an answer that is not the expected kind.
fn failure(config: &ServerConfig, response: Response) -> api::Error {
    match response {
        Response::Error {
            code,
            message,
            master,
        } => wire_error(config, code, message, master),
        other => {
            tracing::error!(
                ?other,
                "the node answered a call with the wrong kind of answer"
            );
            api::error(
                ErrorCode::Unavailable,
                "internal error: unexpected answer",
                "",
            )
        }
    }
}

/// The node's request for a Produce call, or the refusal of its arguments (another store,
/// a bad topic name, too many messages or bytes).
fn produce_request(
    config: &ServerConfig,
    request: api::ProduceRequest,
) -> Result<Request, api::Error> {
    check_store(config, request.store_id)?;
    check_produce(&request)?;
    Ok(Request::Produce {
        topic: request.topic,
        queue: request.queue,
        message_id: request.message_id,
        messages: messages_of(request.messages),
    })
}

/// The wire answer to a Produce from the node's answer.
fn produce_response(config: &ServerConfig, response: Response) -> api::ProduceResponse {
    match response {
        Response::Produced {
            first_offset,
            count,
            duplicate,
        } => api::ProduceResponse {
            error: None,
            first_offset,
            count: u32::try_from(count).expect("at most PRODUCE_MESSAGES_MAX"),
            duplicate,
        },
        other => produce_refused(failure(config, other)),
    }
}

/// A Produce answered with `error`.
fn produce_refused(error: api::Error) -> api::ProduceResponse {
    api::ProduceResponse {
        error: Some(error),
        ..Default::default()
    }
}

/// A request addressed to another store changes nothing here.
fn check_store(config: &ServerConfig, store_id: u64) -> Result<(), api::Error> {
    if store_id == 0 || store_id == config.store_id {
        Ok(())
    } else {
        Err(api::error(
            ErrorCode::WrongStore,
            format!(
                "this node belongs to store {}, not store {store_id}",
                config.store_id
            ),
            String::new(),
        ))
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> api::Error {
    api::error(code, message, "")
}

/// `INVALID_NAME` unless `name` follows the naming rules.
fn check_name(what: &str, name: &str) -> Result<(), api::Error> {
    validate_name(name).map_err(|error| refuse(ErrorCode::InvalidName, format!("{what}: {error}")))
}

fn check_produce(request: &api::ProduceRequest) -> Result<(), api::Error> {
    check_name("topic", &request.topic)?;
    check_call_size(&request.messages)
}

fn check_produce_many(request: &api::ProduceManyRequest) -> Result<(), api::Error> {
    // Every append holds at least one message, so the message limit bounds the appends too;
    // checked first, so an absurd call costs nothing more.
    if request.appends.len() > PRODUCE_MESSAGES_MAX {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            format!(
                "{} appends in one call; at most {PRODUCE_MESSAGES_MAX}",
                request.appends.len()
            ),
        ));
    }
    for (i, append) in request.appends.iter().enumerate() {
        validate_name(&append.topic).map_err(|error| {
            refuse(
                ErrorCode::InvalidName,
                format!("append {i}: topic: {error}"),
            )
        })?;
    }
    let messages: Vec<&api::Message> = request
        .appends
        .iter()
        .flat_map(|a| a.messages.iter())
        .collect();
    check_call_size(&messages)
}

/// `INVALID_ARGUMENT` if one call carries more messages or bytes than it may.
fn check_call_size<M: std::borrow::Borrow<api::Message>>(messages: &[M]) -> Result<(), api::Error> {
    if messages.len() > PRODUCE_MESSAGES_MAX {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            format!(
                "{} messages in one call; at most {PRODUCE_MESSAGES_MAX}",
                messages.len()
            ),
        ));
    }
    let bytes: usize = messages
        .iter()
        .map(|m| m.borrow().key.len() + m.borrow().value.len())
        .sum();
    if bytes > PRODUCE_BYTES_MAX {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            format!("{bytes} bytes of messages in one call; at most {PRODUCE_BYTES_MAX}"),
        ));
    }
    Ok(())
}

/// The node's form of wire messages.
fn messages_of(messages: Vec<api::Message>) -> Vec<Message> {
    messages
        .into_iter()
        .map(|m| Message {
            key: m.key,
            value: m.value,
        })
        .collect()
}

fn check_consume(request: &api::ConsumeRequest) -> Result<(), api::Error> {
    check_name("topic", &request.topic)?;
    check_name("consumer group", &request.consumer_group)?;
    let limits = [
        (
            "max_messages",
            request.max_messages,
            1,
            CONSUME_MESSAGES_MAX,
        ),
        ("max_bytes", request.max_bytes, 1, CONSUME_BYTES_MAX),
        ("wait_ms", request.wait_ms, 0, CONSUME_WAIT_MS_MAX),
    ];
    check_limits(limits)
}

/// `INVALID_ARGUMENT` naming the first `(name, value, min, max)` whose value is outside
/// `min..=max`.
fn check_limits<T: Copy + PartialOrd + std::fmt::Display>(
    limits: impl IntoIterator<Item = (&'static str, T, T, T)>,
) -> Result<(), api::Error> {
    for (name, value, min, max) in limits {
        if !(min..=max).contains(&value) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!("{name} is {value}; it must be {min} to {max}"),
            ));
        }
    }
    Ok(())
}

fn check_commit(request: &api::CommitRequest) -> Result<(), api::Error> {
    check_name("topic", &request.topic)?;
    check_name("consumer group", &request.consumer_group)
}

#[tonic::async_trait]
impl phxq_server::Phxq for Service {
    async fn produce(
        &self,
        request: tonic::Request<api::ProduceRequest>,
    ) -> GrpcResult<api::ProduceResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Produce {
            topic: &request.topic,
        })?;
        let answer = match produce_request(&self.config, request) {
            Err(error) => produce_refused(error),
            Ok(request) => produce_response(&self.config, self.call(request, 0).await),
        };
        Ok(tonic::Response::new(answer))
    }

    type ProduceStreamStream = produce_stream::Answers;

    async fn produce_stream(
        &self,
        request: tonic::Request<tonic::Streaming<api::ProduceStreamRequest>>,
    ) -> GrpcResult<Self::ProduceStreamStream> {
        let caller = caller(&request)?;
        let answers = produce_stream::serve(
            caller,
            self.config.clone(),
            self.handle.clone(),
            self.stopping.clone(),
            request.into_inner(),
        );
        Ok(tonic::Response::new(answers))
    }

    async fn produce_many(
        &self,
        request: tonic::Request<api::ProduceManyRequest>,
    ) -> GrpcResult<api::ProduceManyResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        for append in &request.appends {
            caller.check(Action::Produce {
                topic: &append.topic,
            })?;
        }
        let refused = |error| api::ProduceManyResponse {
            error: Some(error),
            results: Vec::new(),
        };
        if let Err(error) = self
            .check_store(request.store_id)
            .and_then(|()| check_produce_many(&request))
        {
            return Ok(tonic::Response::new(refused(error)));
        }
        let appends = request
            .appends
            .into_iter()
            .map(|a| Append {
                topic: a.topic,
                queue: a.queue,
                message_id: a.message_id,
                messages: messages_of(a.messages),
            })
            .collect();
        let answer = match self.call(Request::ProduceMany { appends }, 0).await {
            Response::ProducedMany { ranges } => api::ProduceManyResponse {
                error: None,
                results: ranges
                    .into_iter()
                    .map(|(first_offset, count, duplicate)| api::AppendResult {
                        first_offset,
                        count: u32::try_from(count).expect("at most PRODUCE_MESSAGES_MAX"),
                        duplicate,
                    })
                    .collect(),
            },
            other => refused(self.failure(other)),
        };
        Ok(tonic::Response::new(answer))
    }

    async fn consume(
        &self,
        request: tonic::Request<api::ConsumeRequest>,
    ) -> GrpcResult<api::ConsumeResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Consume {
            topic: &request.topic,
            group: &request.consumer_group,
        })?;
        if let Err(error) = self
            .check_store(request.store_id)
            .and_then(|()| check_consume(&request))
        {
            return Ok(tonic::Response::new(api::ConsumeResponse {
                error: Some(error),
                ..Default::default()
            }));
        }
        let wait_ms = request.wait_ms;
        let call = Request::Consume {
            topic: request.topic,
            queue: request.queue,
            consumer_group: request.consumer_group,
            from: request.from_offset,
            count_max: u64::from(request.max_messages),
            bytes_max: u64::from(request.max_bytes),
            wait_ticks: self.wait_ticks(wait_ms),
        };
        let answer = match self.call(call, u64::from(wait_ms)).await {
            Response::Consumed {
                messages,
                next_offset,
                end_offset,
            } => api::ConsumeResponse {
                error: None,
                messages: messages
                    .into_iter()
                    .map(|m| api::StoredMessage {
                        offset: m.offset,
                        time_ms: m.time_ms,
                        key: m.key,
                        value: m.value,
                    })
                    .collect(),
                next_offset,
                end_offset,
            },
            other => api::ConsumeResponse {
                error: Some(self.failure(other)),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(answer))
    }

    async fn commit(
        &self,
        request: tonic::Request<api::CommitRequest>,
    ) -> GrpcResult<api::CommitResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        // A seek is an operator's move of a group's cursor; a plain commit is the group's
        // own consumer recording its progress (see CommitRequest.seek in the .proto).
        caller.check(if request.seek {
            Action::Admin
        } else {
            Action::Consume {
                topic: &request.topic,
                group: &request.consumer_group,
            }
        })?;
        let error = match self
            .check_store(request.store_id)
            .and_then(|()| check_commit(&request))
        {
            Err(error) => Some(error),
            Ok(()) => {
                let call = Request::Commit {
                    topic: request.topic,
                    queue: request.queue,
                    consumer_group: request.consumer_group,
                    offset: request.offset,
                };
                match self.call(call, 0).await {
                    Response::Committed => None,
                    other => Some(self.failure(other)),
                }
            }
        };
        Ok(tonic::Response::new(api::CommitResponse { error }))
    }

    async fn offset_for_time(
        &self,
        request: tonic::Request<api::OffsetForTimeRequest>,
    ) -> GrpcResult<api::OffsetForTimeResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::ReadTopic {
            topic: &request.topic,
        })?;
        let refused = |error| api::OffsetForTimeResponse {
            error: Some(error),
            ..Default::default()
        };
        if let Err(error) = self
            .check_store(request.store_id)
            .and_then(|()| check_name("topic", &request.topic))
        {
            return Ok(tonic::Response::new(refused(error)));
        }
        // The node checks the queue and the time (on any node, before asking who is master).
        let call = Request::OffsetForTime {
            topic: request.topic,
            queue: request.queue,
            time_ms: request.time_ms,
        };
        let answer = match self.call(call, 0).await {
            Response::OffsetForTime { offset, end_offset } => api::OffsetForTimeResponse {
                error: None,
                offset,
                end_offset,
            },
            other => refused(self.failure(other)),
        };
        Ok(tonic::Response::new(answer))
    }

    async fn put_topic(
        &self,
        request: tonic::Request<api::PutTopicRequest>,
    ) -> GrpcResult<api::PutTopicResponse> {
        caller(&request)?.check(Action::Admin)?;
        let request = request.into_inner();
        let refused = |error| api::PutTopicResponse {
            error: Some(error),
            changed: false,
        };
        let call = match self
            .check_store(request.store_id)
            .and_then(|()| put_topic_request(request))
        {
            Ok(call) => call,
            Err(error) => return Ok(tonic::Response::new(refused(error))),
        };
        let answer = match self.call(call, 0).await {
            Response::TopicChanged { changed } => api::PutTopicResponse {
                error: None,
                changed,
            },
            other => refused(self.failure(other)),
        };
        Ok(tonic::Response::new(answer))
    }

    async fn delete_topic(
        &self,
        request: tonic::Request<api::DeleteTopicRequest>,
    ) -> GrpcResult<api::DeleteTopicResponse> {
        caller(&request)?.check(Action::Admin)?;
        let request = request.into_inner();
        let error = match self
            .check_store(request.store_id)
            .and_then(|()| check_name("topic", &request.name))
        {
            Err(error) => Some(error),
            Ok(()) => {
                let call = Request::DeleteTopic {
                    group: GroupId(request.group),
                    name: request.name,
                };
                match self.call(call, 0).await {
                    Response::TopicChanged { .. } => None,
                    other => Some(self.failure(other)),
                }
            }
        };
        Ok(tonic::Response::new(api::DeleteTopicResponse { error }))
    }

    async fn cluster_status(
        &self,
        request: tonic::Request<api::ClusterStatusRequest>,
    ) -> GrpcResult<api::ClusterStatusResponse> {
        let caller = caller(&request)?;
        let answer = match self.call(Request::Status, 0).await {
            Response::Status(status) => {
                let mut answer = self.cluster_status_of(&status);
                if !caller.is_admin() {
                    hide_from_non_admins(&mut answer);
                }
                answer
            }
            other => api::ClusterStatusResponse {
                error: Some(self.failure(other)),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(answer))
    }

    async fn heartbeat(
        &self,
        request: tonic::Request<api::HeartbeatRequest>,
    ) -> GrpcResult<api::HeartbeatResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Consume {
            topic: &request.topic,
            group: &request.consumer_group,
        })?;
        let answer = self.heartbeat_of(request).await;
        Ok(tonic::Response::new(answer))
    }

    async fn receive(
        &self,
        request: tonic::Request<api::ReceiveRequest>,
    ) -> GrpcResult<api::ReceiveResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Consume {
            topic: &request.topic,
            group: &request.consumer_group,
        })?;
        Ok(tonic::Response::new(self.receive_of(request).await))
    }

    async fn ack(&self, request: tonic::Request<api::AckRequest>) -> GrpcResult<api::AckResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Consume {
            topic: &request.topic,
            group: &request.consumer_group,
        })?;
        Ok(tonic::Response::new(self.ack_of(request).await))
    }

    async fn nack(
        &self,
        request: tonic::Request<api::NackRequest>,
    ) -> GrpcResult<api::NackResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        caller.check(Action::Consume {
            topic: &request.topic,
            group: &request.consumer_group,
        })?;
        Ok(tonic::Response::new(self.nack_of(request).await))
    }
}

impl Service {
    /// A request addressed to another store changes nothing here.
    fn check_store(&self, store_id: u64) -> Result<(), api::Error> {
        check_store(&self.config, store_id)
    }

    fn cluster_status_of(&self, status: &NodeStatus) -> api::ClusterStatusResponse {
        let config = &self.config;
        api::ClusterStatusResponse {
            error: None,
            store_id: config.store_id,
            node_id: config.node.0,
            nodes: config
                .members
                .iter()
                .map(|member| api::NodeStatus {
                    id: member.id.0,
                    client_addr: member.client_addr.to_string(),
                    peer_addr: member.peer_addr.to_string(),
                    reachable: member.id == config.node || self.transport.peer_reachable(member.id),
                })
                .collect(),
            groups: status.groups.iter().map(group_status).collect(),
            topics: topics_status(&status.groups),
            groups_count: config.layout.groups,
            counters: Some(api::NodeCounters {
                peer_frames_dropped: self.handle.peer_frames_dropped.load(Ordering::Relaxed),
                ..counters(&status.counters)
            }),
        }
    }
}

/// What a non-admin caller does not see of the store: where peers listen (the aim of a
/// forged peer frame) and the nodes' counters. Client addresses, groups, masters and topics
/// stay: producers and consumers route by them.
fn hide_from_non_admins(answer: &mut api::ClusterStatusResponse) {
    for node in &mut answer.nodes {
        node.peer_addr.clear();
    }
    answer.counters = None;
}

fn counters(c: &crate::NodeCounters) -> api::NodeCounters {
    api::NodeCounters {
        rounds: c.rounds,
        writes: c.writes,
        syncs: c.syncs,
        proposals: c.proposals,
        commands: c.commands,
        messages: c.messages,
        snapshots_installed: c.snapshots_installed,
        compactions: c.compactions,
        peer_messages_rejected: c.peer_messages_rejected,
        compactions_refused: c.compactions_refused,
        peer_frames_dropped: 0,
    }
}

fn group_status(group: &GroupStatus) -> api::GroupStatus {
    api::GroupStatus {
        group: group.group.0,
        master: group.master.map_or(0, |m| m.0),
        term: group.term,
        lease_remaining_ms: group.lease_remaining_ms.unwrap_or(0),
        commit_index: group.commit_index,
        applied_index: group.applied_index,
        last_index: group.last_index,
        topics: group.topics.iter().map(topic_config_to_wire).collect(),
    }
}

/// The topics of every group's table, merged by name (see `TopicStatus` in the .proto): the
/// smallest queue count, the config with the most queues, whether all groups agree.
fn topics_status(groups: &[GroupStatus]) -> Vec<api::TopicStatus> {
    let mut by_name: std::collections::BTreeMap<&str, Vec<&TopicConfig>> = Default::default();
    for group in groups {
        for topic in &group.topics {
            by_name.entry(&topic.name).or_default().push(topic);
        }
    }
    by_name
        .into_iter()
        .map(|(name, configs)| {
            let widest = configs
                .iter()
                .copied()
                .reduce(|a, b| if b.queues > a.queues { b } else { a })
                .expect("at least one");
            let queues = configs.iter().map(|c| c.queues).min().unwrap_or(0);
            let consistent =
                configs.len() == groups.len() && configs.iter().all(|c| *c == configs[0]);
            api::TopicStatus {
                name: name.to_string(),
                queues,
                consumer_groups: widest.consumer_groups.clone(),
                config: Some(topic_config_to_wire(widest)),
                groups_with_topic: configs.len() as u32,
                consistent,
            }
        })
        .collect()
}

/// A topic's configuration on the wire.
pub fn topic_config_to_wire(config: &TopicConfig) -> api::TopicConfig {
    api::TopicConfig {
        name: config.name.clone(),
        queues: config.queues,
        consumer_groups: config.consumer_groups.clone(),
        replay_count: config.retention.replay_count,
        replay_age_ms: config.retention.replay_age_ms,
        max_age_ms: config.retention.max_age_ms,
        max_bytes: config.retention.max_bytes,
        dedup_window: config.dedup_window,
        group_settings: (config.group_settings.iter())
            .map(|(group, settings)| api::ConsumerGroupSettings {
                consumer_group: group.clone(),
                retry_tiers: (settings.retry_tiers.iter())
                    .map(|tier| api::RetryTier {
                        attempts: tier.attempts,
                        delay_ms: tier.delay_ms,
                    })
                    .collect(),
                dead_letter_topic: settings.dead_letter_topic.clone(),
                rate_messages_per_s: settings.rate_messages_per_s,
                rate_bytes_per_s: settings.rate_bytes_per_s,
                max_in_flight: settings.max_in_flight,
            })
            .collect(),
    }
}

/// A wire topic configuration as the core's (not yet checked: the node does that), or why
/// not: a consumer group's settings given twice.
pub fn topic_config_from_wire(config: api::TopicConfig) -> Result<TopicConfig, api::Error> {
    let mut group_settings = std::collections::BTreeMap::new();
    for settings in config.group_settings {
        let group = settings.consumer_group.clone();
        let core = ConsumerGroupSettings {
            retry_tiers: (settings.retry_tiers.iter())
                .map(|tier| RetryTier {
                    attempts: tier.attempts,
                    delay_ms: tier.delay_ms,
                })
                .collect(),
            dead_letter_topic: settings.dead_letter_topic,
            rate_messages_per_s: settings.rate_messages_per_s,
            rate_bytes_per_s: settings.rate_bytes_per_s,
            max_in_flight: settings.max_in_flight,
        };
        if group_settings.insert(group.clone(), core).is_some() {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!("settings of consumer group {group:?} given twice"),
            ));
        }
    }
    Ok(TopicConfig {
        name: config.name,
        queues: config.queues,
        consumer_groups: config.consumer_groups,
        retention: Retention {
            replay_count: config.replay_count,
            replay_age_ms: config.replay_age_ms,
            max_age_ms: config.max_age_ms,
            max_bytes: config.max_bytes,
        },
        dedup_window: config.dedup_window,
        group_settings,
    })
}

/// The node request of a PutTopic call, or why it is malformed.
fn put_topic_request(request: api::PutTopicRequest) -> Result<Request, api::Error> {
    let mode = match api::PutMode::try_from(request.mode) {
        Ok(api::PutMode::Create) => PutMode::Create,
        Ok(api::PutMode::Alter) => PutMode::Alter,
        _ => {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!("put mode {} (1: create, 2: alter)", request.mode),
            ));
        }
    };
    let Some(topic) = request.topic else {
        return Err(refuse(ErrorCode::Malformed, "no topic configuration"));
    };
    check_name("topic", &topic.name)?;
    for group in &topic.consumer_groups {
        check_name("consumer group", group)?;
    }
    for settings in &topic.group_settings {
        check_name("consumer group", &settings.consumer_group)?;
    }
    Ok(Request::PutTopic {
        group: GroupId(request.group),
        config: topic_config_from_wire(topic)?,
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use phxq_types::{QueueId, TIME_MS_MAX};

    fn consume(max_messages: u32, max_bytes: u32, wait_ms: u32) -> api::ConsumeRequest {
        api::ConsumeRequest {
            store_id: 0,
            topic: "test".to_string(),
            queue: 0,
            consumer_group: "g1".to_string(),
            from_offset: None,
            max_messages,
            max_bytes,
            wait_ms,
        }
    }

    fn code(outcome: Result<(), api::Error>) -> Option<u32> {
        outcome.err().map(|error| error.code)
    }

    #[test]
    fn consume_limits_are_inclusive_and_refused_beyond() {
        let invalid = Some(ErrorCode::InvalidArgument.number());
        assert_eq!(code(check_consume(&consume(1, 1, 0))), None);
        assert_eq!(
            code(check_consume(&consume(
                CONSUME_MESSAGES_MAX,
                CONSUME_BYTES_MAX,
                CONSUME_WAIT_MS_MAX
            ))),
            None
        );
        assert_eq!(code(check_consume(&consume(0, 1, 0))), invalid);
        assert_eq!(
            code(check_consume(&consume(CONSUME_MESSAGES_MAX + 1, 1, 0))),
            invalid
        );
        assert_eq!(
            code(check_consume(&consume(1, CONSUME_BYTES_MAX + 1, 0))),
            invalid
        );
        assert_eq!(
            code(check_consume(&consume(1, 1, CONSUME_WAIT_MS_MAX + 1))),
            invalid
        );
    }

    #[test]
    fn bad_names_are_invalid_name_before_anything_else() {
        let invalid_name = Some(ErrorCode::InvalidName.number());
        let mut request = consume(0, 0, 0);
        request.consumer_group = "a b".to_string();
        assert_eq!(code(check_consume(&request)), invalid_name);
        let produce = api::ProduceRequest {
            store_id: 0,
            topic: String::new(),
            queue: 0,
            messages: Vec::new(),
            message_id: Vec::new(),
        };
        assert_eq!(code(check_produce(&produce)), invalid_name);
        let commit = api::CommitRequest {
            store_id: 0,
            topic: "t".to_string(),
            queue: 0,
            consumer_group: "x/y".to_string(),
            offset: 1,
            seek: false,
        };
        assert_eq!(code(check_commit(&commit)), invalid_name);
    }

    #[test]
    fn produce_calls_are_bounded_by_count_and_bytes() {
        let message = |bytes: usize| api::Message {
            key: Vec::new(),
            value: vec![0; bytes],
        };
        let request = |messages| api::ProduceRequest {
            store_id: 0,
            topic: "test".to_string(),
            queue: 0,
            messages,
            message_id: Vec::new(),
        };
        let invalid = Some(ErrorCode::InvalidArgument.number());
        assert_eq!(
            code(check_produce(&request(vec![
                message(1);
                PRODUCE_MESSAGES_MAX
            ]))),
            None
        );
        assert_eq!(
            code(check_produce(&request(vec![
                message(1);
                PRODUCE_MESSAGES_MAX + 1
            ]))),
            invalid
        );
        assert_eq!(
            code(check_produce(&request(vec![message(
                PRODUCE_BYTES_MAX + 1
            )]))),
            invalid
        );
    }

    /// A store of one node, on ports the kernel picks, in `dir`.
    fn single_node(dir: &Path) -> ServerConfig {
        let mut config = ServerConfig::parse(
            r#"
            [node]
            id = 1
            data_dir = "set below"
            [store]
            id = 1
            groups = 2
            [[store.nodes]]
            id = 1
            client_addr = "127.0.0.1:1"
            peer_addr = "127.0.0.1:2"
            [[store.topics]]
            name = "t"
            queues = 4
            consumer_groups = ["g"]
            [tls]
            insecure_peer_plaintext = true
            "#,
        )
        .expect("valid config");
        config.data_dir = dir.to_path_buf();
        config.client_listen = "127.0.0.1:0".parse().expect("address");
        config.peer_listen = "127.0.0.1:0".parse().expect("address");
        config
    }

    fn produce(value: &str) -> Request {
        Request::Produce {
            topic: "t".to_string(),
            queue: 0,
            message_id: Vec::new(),
            messages: vec![Message {
                key: Vec::new(),
                value: value.as_bytes().to_vec(),
            }],
        }
    }

    /// Produces `value`, retrying while the group elects its master.
    async fn produce_when_mastered(handle: &NodeHandle, value: &str) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = handle.call(produce(value)).await;
            let electing = matches!(
                answer,
                Response::Error {
                    code: ErrorCode::NoMaster | ErrorCode::NotMaster,
                    ..
                }
            );
            if !electing || Instant::now() > deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_fsync_failure_stops_the_node_and_acknowledges_nothing_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = RunningServer::start(single_node(dir.path()))
            .await
            .expect("start");
        let handle = server.handle();
        let first = produce_when_mastered(&handle, "durable").await;
        assert!(
            matches!(
                first,
                Response::Produced {
                    first_offset: 1,
                    count: 1,
                    duplicate: false
                }
            ),
            "{first:?}"
        );

        server.wal.fail_next_sync();
        let answer = handle.call(produce("lost")).await;
        assert!(
            matches!(
                answer,
                Response::Error {
                    code: ErrorCode::Unavailable,
                    ..
                }
            ),
            "nothing is acknowledged after a failed fsync: {answer:?}"
        );
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            server.run_until(std::future::pending()),
        )
        .await
        .expect("the node stops on its own");
        // The event loop runs the fsync itself: it sees the failure before any round could
        // read the poisoned log.
        assert!(matches!(outcome, Err(ServerError::Sync(_))), "{outcome:?}");
        let after = handle.call(Request::Status).await;
        assert!(
            matches!(
                after,
                Response::Error {
                    code: ErrorCode::Unavailable,
                    ..
                }
            ),
            "{after:?}"
        );
    }

    fn append(queue: QueueId, values: &[&str]) -> Append {
        Append {
            topic: "t".to_string(),
            queue,
            message_id: Vec::new(),
            messages: values
                .iter()
                .map(|v| Message {
                    key: Vec::new(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
        }
    }

    /// The values of `queue`, read from offset 1 by the node (once its group has a master).
    async fn values_of(handle: &NodeHandle, queue: QueueId) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = handle
                .call(Request::Consume {
                    topic: "t".to_string(),
                    queue,
                    consumer_group: "g".to_string(),
                    from: Some(1),
                    count_max: 100,
                    bytes_max: 1 << 20,
                    wait_ticks: 0,
                })
                .await;
            match answer {
                Response::Consumed { messages, .. } => {
                    return messages
                        .into_iter()
                        .map(|m| String::from_utf8(m.value).expect("utf-8"))
                        .collect();
                }
                Response::Error {
                    code: ErrorCode::NoMaster,
                    ..
                } if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("consume failed: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_many_appends_to_several_queues_of_a_group_at_once_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = RunningServer::start(single_node(dir.path()))
            .await
            .expect("start");
        let handle = server.handle();
        // Queues 0 and 2 are in group 0 (2 groups), queue 1 in group 1.
        produce_when_mastered(&handle, "a0").await;
        let many = Request::ProduceMany {
            appends: vec![
                append(0, &["b0", "c0"]),
                append(2, &["a2"]),
                append(0, &["d0"]),
            ],
        };
        assert_eq!(
            handle.call(many).await,
            Response::ProducedMany {
                ranges: vec![(2, 2, false), (1, 1, false), (4, 1, false)]
            }
        );

        let refusals = [
            (vec![], ErrorCode::EmptyBatch, "no appends"),
            (
                vec![append(0, &["x"]), append(2, &[])],
                ErrorCode::EmptyBatch,
                "append 1: no messages",
            ),
            (
                vec![append(0, &["x"]), append(1, &["y"])],
                ErrorCode::InvalidArgument,
                "append 1: queue 1 is in g1, append 0's queue 0 in g0",
            ),
            (
                vec![append(2, &["x"]), append(6, &["y"])],
                ErrorCode::UnknownQueue,
                "append 1: topic \"t\" has 4 queues",
            ),
        ];
        for (appends, code, text) in refusals {
            let answer = handle.call(Request::ProduceMany { appends }).await;
            let Response::Error {
                code: got, message, ..
            } = &answer
            else {
                panic!("expected {code:?}: {answer:?}");
            };
            assert_eq!((*got, message.contains(text)), (code, true), "{answer:?}");
        }
        // Nothing refused was written: the queues hold exactly the accepted appends.
        assert_eq!(values_of(&handle, 0).await, ["a0", "b0", "c0", "d0"]);
        assert_eq!(values_of(&handle, 2).await, ["a2"]);
        assert!(values_of(&handle, 1).await.is_empty());
        server.run_until(async {}).await.expect("graceful stop");
    }

    fn offset_for_time(queue: QueueId, time_ms: u64) -> Request {
        Request::OffsetForTime {
            topic: "t".to_string(),
            queue,
            time_ms,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offset_for_time_finds_the_first_message_at_or_after_a_time_and_refuses_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = RunningServer::start(single_node(dir.path()))
            .await
            .expect("start");
        let handle = server.handle();
        produce_when_mastered(&handle, "early").await;
        // Batches are stamped with the clock of the last tick (50 ms): wait a few.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for value in ["late-1", "late-2"] {
            let answer = handle.call(produce(value)).await;
            assert!(matches!(answer, Response::Produced { .. }), "{answer:?}");
        }
        let read = handle
            .call(Request::Consume {
                topic: "t".to_string(),
                queue: 0,
                consumer_group: "g".to_string(),
                from: Some(1),
                count_max: 100,
                bytes_max: 1 << 20,
                wait_ticks: 0,
            })
            .await;
        let Response::Consumed { messages, .. } = read else {
            panic!("consume failed: {read:?}");
        };
        let times: Vec<u64> = messages.iter().map(|m| m.time_ms).collect();
        assert!(times[0] < times[1] && times[1] <= times[2], "{times:?}");

        let at = |offset| Response::OffsetForTime {
            offset,
            end_offset: 4,
        };
        let expected = [
            (0, at(1)),
            (times[0], at(1)),
            (times[0] + 1, at(2)),
            (times[1], at(2)),
            (times[2] + 1, at(4)),
            (TIME_MS_MAX, at(4)),
        ];
        for (time_ms, answer) in expected {
            assert_eq!(
                handle.call(offset_for_time(0, time_ms)).await,
                answer,
                "at {time_ms} (times {times:?})"
            );
        }
        assert_eq!(
            handle.call(offset_for_time(2, times[0])).await,
            Response::OffsetForTime {
                offset: 1,
                end_offset: 1
            },
            "an empty queue: its end"
        );

        let refusals = [
            (
                offset_for_time(0, TIME_MS_MAX + 1),
                ErrorCode::InvalidArgument,
            ),
            (offset_for_time(0, u64::MAX), ErrorCode::InvalidArgument),
            (offset_for_time(4, 0), ErrorCode::UnknownQueue),
            (
                Request::OffsetForTime {
                    topic: "nope".to_string(),
                    queue: 0,
                    time_ms: 0,
                },
                ErrorCode::UnknownTopic,
            ),
        ];
        for (request, code) in refusals {
            let answer = handle.call(request).await;
            assert!(
                matches!(&answer, Response::Error { code: got, .. } if *got == code),
                "expected {code:?}: {answer:?}"
            );
        }
        assert_eq!(values_of(&handle, 0).await, ["early", "late-1", "late-2"]);
        server.run_until(async {}).await.expect("graceful stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_graceful_stop_keeps_what_was_acknowledged_and_the_directory_knows_its_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = RunningServer::start(single_node(dir.path()))
            .await
            .expect("start");
        let first = produce_when_mastered(&server.handle(), "kept").await;
        assert!(
            matches!(
                first,
                Response::Produced {
                    first_offset: 1,
                    ..
                }
            ),
            "{first:?}"
        );
        server.run_until(async {}).await.expect("graceful stop");

        let server = RunningServer::start(single_node(dir.path()))
            .await
            .expect("restart");
        let second = produce_when_mastered(&server.handle(), "next").await;
        assert!(
            matches!(
                second,
                Response::Produced {
                    first_offset: 2,
                    ..
                }
            ),
            "{second:?}"
        );
        server.run_until(async {}).await.expect("graceful stop");

        let mut other = single_node(dir.path());
        other.node = NodeId(2);
        other.members[0].id = NodeId(2);
        let refused = RunningServer::start(other)
            .await
            .err()
            .expect("another node's directory");
        assert!(matches!(refused, ServerError::DataDir { .. }), "{refused}");
    }
}
