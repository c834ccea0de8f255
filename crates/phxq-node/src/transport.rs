//! The peer transport: [`PeerFrame`]s between the nodes of a store, over TCP.
//!
//! Each node keeps **one outbound connection per peer** and only writes on it; the connections
//! other nodes open to it are only read. A frame is queued without blocking
//! ([`Transport::send`]); one task per peer connects (reconnecting with jittered exponential
//! backoff), and writes everything queued as one coalesced write, so a round's messages for a
//! peer leave in one system call.
//!
//! Delivery is best effort, as raft expects: a frame for a peer that is down or whose queue is
//! full is dropped and counted, and raft retransmits. Frames queued while a connection fails
//! are dropped too, so a peer that comes back does not get a burst of stale messages.
//!
//! Every inbound frame is checked before it reaches the node: stream checksum, strict decoding
//! ([`phxq_proto::peer`]), our store id, addressed to us, from a configured peer, and the same
//! sender for the whole connection. Anything else closes that connection only (with a
//! warning); the node keeps running and other connections are untouched. A new connection
//! from a node replaces its older one (the older may be half-open after a crash of the peer).
//!
//! With [`PeerTls`] (the default of a node config), every connection is mutual TLS 1.3: the
//! dialer checks that the listener's certificate, from the store CA, names the node it dials;
//! the listener requires a client certificate from the store CA naming one configured peer,
//! and that node is the connection's sender: a frame claiming another `from` closes it. So
//! only a node itself can replace its own older connection. Without TLS (tests, explicitly)
//! the sender is whoever the first frame claims.
//!
//! Limits on inbound connections: the TLS handshake and the first frame within
//! [`HANDSHAKE_TIMEOUT_MS`], then a frame at least every [`IDLE_TIMEOUT_MS`] (a live peer
//! sends heartbeats far more often), frames capped before allocation
//! ([`phxq_proto::peer::PEER_FRAME_BYTES_MAX`]), at most [`INBOUND_CONNECTIONS_MAX`] open.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use phxq_proto::peer::{
    PEER_FRAME_BATCH_BYTES_MAX, PeerFrame, STREAM_HEADER_BYTES, append_stream_frame,
    decode_peer_frame, read_stream_payload,
};
use phxq_types::{NodeId, Rng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::tls::PeerTls;

/// First reconnect delay after a failed connection, in milliseconds.
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 50;
/// Longest reconnect delay, in milliseconds; delays double from the minimum up to it.
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;
/// How long a connection attempt may take, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// How long one coalesced write may take before the connection is given up, in milliseconds.
/// Generous, as a write may carry a large snapshot.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;
/// Most bytes coalesced into one write (a single larger frame is still written alone).
pub const WRITE_BATCH_BYTES_MAX: usize = 4 << 20;
/// Most inbound connections open at once; more are closed on accept.
pub const INBOUND_CONNECTIONS_MAX: usize = 256;
/// How long an inbound connection has for its TLS handshake and first frame, in milliseconds:
/// a connection that does neither cannot hold one of the [`INBOUND_CONNECTIONS_MAX`] places.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// An inbound connection with no frame for this long is closed, in milliseconds. Peers send
/// heartbeats every few hundred milliseconds, so a live peer is never idle this long.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;

/// A peer connection's byte stream: TCP, or TLS over TCP.
trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerStream for T {}
type BoxedStream = Box<dyn PeerStream>;

/// Where a transport listens, whom it talks to, and its limits.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// The store this node belongs to; frames of other stores are refused.
    pub store_id: u64,
    /// This node.
    pub me: NodeId,
    /// The address to listen on for other nodes' connections.
    pub listen: SocketAddr,
    /// The peer address of every other node of the store (an entry for `me` is ignored).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Most frames queued for one peer; more are dropped until the queue drains.
    pub queue_frames_max: usize,
    /// Mutual TLS between the store's nodes; `None` only where a config opts out.
    pub tls: Option<PeerTls>,
    /// How long an inbound connection may go without a frame, in milliseconds
    /// ([`IDLE_TIMEOUT_MS`]; tests shorten it).
    pub idle_timeout_ms: u64,
    /// How long an inbound connection has for its handshake and first frame, in milliseconds
    /// ([`HANDSHAKE_TIMEOUT_MS`]; tests shorten it).
    pub handshake_timeout_ms: u64,
}

/// Counters since the transport started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Frames written to outbound connections.
    pub frames_sent: u64,
    /// Bytes written to outbound connections, framing included.
    pub bytes_sent: u64,
    /// Frames received, checked and delivered.
    pub frames_received: u64,
    /// Bytes of delivered frames, framing included.
    pub bytes_received: u64,
    /// Frames not sent: peer down, queue full, unknown peer, over the size limit, or queued
    /// when a connection failed.
    pub frames_dropped: u64,
    /// Outbound connections established.
    pub connects: u64,
    /// Failed outbound connection attempts and outbound connections lost.
    pub connection_errors: u64,
    /// Inbound connections closed for bad input (bad checksum, malformed, wrong store, wrong
    /// node, over the limit) or refused over [`INBOUND_CONNECTIONS_MAX`].
    pub inbound_rejected: u64,
    /// Inbound connections whose TLS handshake failed or whose certificate names no peer.
    pub unauthenticated: u64,
    /// Inbound connections closed for a handshake or first frame too slow, or idleness.
    pub timed_out: u64,
}

/// A running transport. Cheap to clone; the tasks stop on [`Transport::shutdown`] or when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

/// What a node does with a frame that passed every check.
pub type Deliver = Arc<dyn Fn(PeerFrame) + Send + Sync>;

struct Inner {
    me: NodeId,
    local_addr: SocketAddr,
    peers: BTreeMap<NodeId, Outbound>,
    counters: Arc<Counters>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the tasks (dropping the sender also wakes them).
        self.shutdown.send_replace(true);
    }
}

/// The sending side of one peer's queue and its connection state.
struct Outbound {
    queue: mpsc::Sender<PeerFrame>,
    reachable: Arc<AtomicBool>,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    frames_dropped: AtomicU64,
    connects: AtomicU64,
    connection_errors: AtomicU64,
    inbound_rejected: AtomicU64,
    unauthenticated: AtomicU64,
    timed_out: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Transport {
    /// Binds `config.listen` and starts the transport; see [`Transport::start_on`].
    pub async fn start(config: TransportConfig, deliver: Deliver) -> io::Result<Transport> {
        let listener = TcpListener::bind(config.listen).await?;
        Transport::start_on(listener, config, deliver)
    }

    /// Starts the transport on an already bound `listener` (`config.listen` is not used): the
    /// accept task, and one outbound task per peer, on the current tokio runtime.
    ///
    /// Every inbound frame that decodes, carries our store id, is addressed to `me` and comes
    /// from a configured peer is handed to `deliver`, on the connection's task (so `deliver`
    /// should only queue the frame). Anything else closes that connection only.
    pub fn start_on(
        listener: TcpListener,
        config: TransportConfig,
        deliver: Deliver,
    ) -> io::Result<Transport> {
        if config.queue_frames_max == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue_frames_max must be at least 1",
            ));
        }
        let local_addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut peers = BTreeMap::new();
        let mut seed_rng = Rng::new(clock_seed() ^ config.me.0.rotate_left(32));
        for (&peer, &addr) in config.peers.iter().filter(|(id, _)| **id != config.me) {
            let (queue, queued) = mpsc::channel(config.queue_frames_max);
            let reachable = Arc::new(AtomicBool::new(false));
            let task = OutboundTask {
                peer,
                addr,
                tls: config.tls.clone(),
                queued,
                reachable: reachable.clone(),
                counters: counters.clone(),
                shutdown: shutdown.subscribe(),
                rng: seed_rng.fork(),
            };
            tasks.push(tokio::spawn(task.run()));
            peers.insert(peer, Outbound { queue, reachable });
        }
        let inbound = InboundTask {
            listener,
            check: Arc::new(FrameCheck {
                store_id: config.store_id,
                me: config.me,
                peers: peers.keys().copied().collect(),
                tls: config.tls.clone(),
                handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
                idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            }),
            deliver,
            counters: counters.clone(),
            shutdown: shutdown.subscribe(),
            latest: Arc::new(Mutex::new(HashMap::new())),
        };
        tasks.push(tokio::spawn(inbound.run()));
        Ok(Transport {
            inner: Arc::new(Inner {
                me: config.me,
                local_addr,
                peers,
                counters,
                shutdown,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// The address the transport listens on (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Queues `frame` for node `to` without blocking. When the peer is unknown or down, or
    /// its queue is full, the frame is dropped and counted; raft retransmits.
    pub fn send(&self, to: NodeId, frame: PeerFrame) {
        debug_assert_eq!(frame.to, to, "a frame goes to the node it names");
        debug_assert_eq!(frame.from, self.inner.me, "a frame comes from this node");
        let counters = &self.inner.counters;
        let Some(outbound) = self.inner.peers.get(&to) else {
            tracing::warn!(peer = %to, "frame for a node that is not a configured peer dropped");
            bump(&counters.frames_dropped, 1);
            return;
        };
        if !outbound.reachable.load(Ordering::Relaxed) || outbound.queue.try_send(frame).is_err() {
            bump(&counters.frames_dropped, 1);
        }
    }

    /// Whether the outbound connection to `to` is up.
    pub fn peer_reachable(&self, to: NodeId) -> bool {
        self.inner
            .peers
            .get(&to)
            .is_some_and(|outbound| outbound.reachable.load(Ordering::Relaxed))
    }

    /// The counters so far.
    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TransportStats {
            frames_sent: get(&c.frames_sent),
            bytes_sent: get(&c.bytes_sent),
            frames_received: get(&c.frames_received),
            bytes_received: get(&c.bytes_received),
            frames_dropped: get(&c.frames_dropped),
            connects: get(&c.connects),
            connection_errors: get(&c.connection_errors),
            inbound_rejected: get(&c.inbound_rejected),
            unauthenticated: get(&c.unauthenticated),
            timed_out: get(&c.timed_out),
        }
    }

    /// Stops listening, closes every connection and waits for the tasks to end. Other clones
    /// of this handle stop working too (their frames are dropped).
    pub async fn shutdown(self) {
        self.inner.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for task in tasks {
            // A task that panicked has nothing left to stop; its panic was already reported.
            let _ = task.await;
        }
    }
}

/// A seed for backoff jitter: differs across nodes and restarts. Jitter needs no replay.
fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// Resolves when shutdown is signalled or the transport is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // `wait_for` fails only when the sender is dropped: stop then too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

// ---------------------------------------------------------------------------------------------
// Outbound

/// One peer's outbound side: connect, write queued frames, reconnect on failure.
struct OutboundTask {
    peer: NodeId,
    addr: SocketAddr,
    tls: Option<PeerTls>,
    queued: mpsc::Receiver<PeerFrame>,
    reachable: Arc<AtomicBool>,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
    rng: Rng,
}

/// Why an outbound connection ended.
enum Ended {
    /// The transport is stopping.
    Shutdown,
    /// The connection failed; reconnect.
    Failed(io::Error),
}

impl OutboundTask {
    async fn run(mut self) {
        let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
        // Log a peer's failures at warn when its state changes, at debug while it stays down.
        let mut was_up = true;
        loop {
            let connect = tokio::time::timeout(
                Duration::from_millis(CONNECT_TIMEOUT_MS),
                connect(self.addr, self.peer, self.tls.clone()),
            );
            let connected = tokio::select! {
                () = stopped(&mut self.shutdown) => return,
                connected = connect => connected.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            };
            match connected {
                Ok(stream) => {
                    tracing::info!(peer = %self.peer, addr = %self.addr, "connected to peer");
                    bump(&self.counters.connects, 1);
                    backoff_ms = RECONNECT_BACKOFF_MIN_MS;
                    was_up = true;
                    self.reachable.store(true, Ordering::Relaxed);
                    let ended = self.serve(stream).await;
                    self.reachable.store(false, Ordering::Relaxed);
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Failed(error) => {
                            tracing::warn!(peer = %self.peer, addr = %self.addr, %error, "connection to peer lost");
                            bump(&self.counters.connection_errors, 1);
                        }
                    }
                }
                Err(error) => {
                    if was_up {
                        tracing::warn!(peer = %self.peer, addr = %self.addr, %error, "cannot connect to peer; retrying");
                    } else {
                        tracing::debug!(peer = %self.peer, addr = %self.addr, %error, "cannot connect to peer");
                    }
                    was_up = false;
                    bump(&self.counters.connection_errors, 1);
                }
            }
            self.drop_queued();
            // Sleep a uniformly random time in [backoff/2, backoff], so nodes restarted
            // together do not reconnect in lockstep.
            let delay_ms = backoff_ms / 2 + self.rng.below(backoff_ms / 2 + 1);
            tokio::select! {
                () = stopped(&mut self.shutdown) => return,
                () = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
            }
            backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MAX_MS);
        }
    }

    /// Frames queued for a connection that failed are stale by the time another is up.
    fn drop_queued(&mut self) {
        let mut dropped = 0;
        while self.queued.try_recv().is_ok() {
            dropped += 1;
        }
        bump(&self.counters.frames_dropped, dropped);
    }

    /// Writes queued frames until the connection fails or the transport stops. The peer never
    /// writes on this connection; reading only detects that it closed.
    async fn serve(&mut self, stream: BoxedStream) -> Ended {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut batch = Vec::new();
        loop {
            let first = tokio::select! {
                () = stopped(&mut self.shutdown) => return Ended::Shutdown,
                closed = peer_closed(&mut reader) => return Ended::Failed(closed),
                frame = self.queued.recv() => match frame {
                    Some(frame) => frame,
                    None => return Ended::Shutdown, // every handle is gone
                },
            };
            let frames = self.coalesce(first, &mut batch);
            if frames == 0 {
                continue;
            }
            let write = tokio::time::timeout(
                Duration::from_millis(WRITE_TIMEOUT_MS),
                write_batch(&mut writer, &batch),
            );
            let written = tokio::select! {
                () = stopped(&mut self.shutdown) => return Ended::Shutdown,
                written = write => written.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            };
            if let Err(error) = written {
                bump(&self.counters.frames_dropped, frames);
                return Ended::Failed(error);
            }
            bump(&self.counters.frames_sent, frames);
            bump(&self.counters.bytes_sent, batch.len() as u64);
        }
    }

    /// Encodes `first` and whatever else is queued, up to [`WRITE_BATCH_BYTES_MAX`], into
    /// `batch`; returns how many frames it holds.
    fn coalesce(&mut self, first: PeerFrame, batch: &mut Vec<u8>) -> u64 {
        batch.clear();
        let mut frames = 0;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            let (sent, dropped) = append_split(batch, frame);
            frames += sent;
            if dropped > 0 {
                tracing::warn!(peer = %self.peer, dropped, "raft message too large to send; dropped");
                bump(&self.counters.frames_dropped, dropped);
            }
            if batch.len() < WRITE_BATCH_BYTES_MAX {
                next = self.queued.try_recv().ok();
            }
        }
        frames
    }
}

/// Appends `frame` to `batch`, split into one frame per message when it is over
/// [`PEER_FRAME_BATCH_BYTES_MAX`] (receivers refuse a larger frame of several messages);
/// returns the frames appended and the messages dropped as too large even alone.
fn append_split(batch: &mut Vec<u8>, frame: PeerFrame) -> (u64, u64) {
    let start = batch.len();
    let fits = append_stream_frame(batch, &frame).is_ok();
    if fits && batch.len() - start - STREAM_HEADER_BYTES <= PEER_FRAME_BATCH_BYTES_MAX {
        return (1, 0);
    }
    batch.truncate(start);
    if frame.messages.len() <= 1 {
        // One message: within the frame limit it goes alone, else nothing can carry it.
        return if fits && append_stream_frame(batch, &frame).is_ok() {
            (1, 0)
        } else {
            (0, frame.messages.len() as u64)
        };
    }
    let (mut sent, mut dropped) = (0, 0);
    let (store_id, from, to) = (frame.store_id, frame.from, frame.to);
    for message in frame.messages {
        let single = PeerFrame {
            store_id,
            from,
            to,
            messages: vec![message],
        };
        let (s, d) = append_split(batch, single);
        (sent, dropped) = (sent + s, dropped + d);
    }
    (sent, dropped)
}

/// A TCP connection to `peer`, with TLS proving it is `peer` when configured.
async fn connect(addr: SocketAddr, peer: NodeId, tls: Option<PeerTls>) -> io::Result<BoxedStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let stream = connector.connect(tls.server_name(peer), stream).await?;
    Ok(Box::new(stream))
}

async fn write_batch(writer: &mut WriteHalf<BoxedStream>, batch: &[u8]) -> io::Result<()> {
    writer.write_all(batch).await?;
    writer.flush().await
}

/// Resolves when the peer closes an outbound connection or sends on it (which it must not).
async fn peer_closed(reader: &mut ReadHalf<BoxedStream>) -> io::Error {
    let mut byte = [0u8; 1];
    match reader.read(&mut byte).await {
        Ok(0) => io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "peer closed the connection",
        ),
        Ok(_) => io::Error::new(
            io::ErrorKind::InvalidData,
            "peer wrote on an outbound connection",
        ),
        Err(error) => error,
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound

/// What an inbound frame must satisfy.
/// What an inbound connection must satisfy: the handshake, then every frame.
struct FrameCheck {
    store_id: u64,
    me: NodeId,
    peers: Vec<NodeId>,
    tls: Option<PeerTls>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

impl FrameCheck {
    /// Why `frame` must not be delivered, if it must not; `sender` is the node earlier frames
    /// of the connection came from.
    fn refuse(&self, frame: &PeerFrame, sender: Option<NodeId>) -> Option<String> {
        if frame.store_id != self.store_id {
            return Some(format!(
                "frame of store {}, this is store {}",
                frame.store_id, self.store_id
            ));
        }
        if frame.to != self.me {
            return Some(format!("frame for {}, this is {}", frame.to, self.me));
        }
        if !self.peers.contains(&frame.from) {
            return Some(format!(
                "frame from {}, not a peer of this store",
                frame.from
            ));
        }
        if sender.is_some_and(|sender| sender != frame.from) {
            return Some(format!(
                "frame from {} on a connection of {sender:?}",
                frame.from
            ));
        }
        None
    }
}

/// The newest inbound connection of each peer, so that a new one can retire the old.
type Latest = Arc<Mutex<HashMap<NodeId, (u64, Arc<Notify>)>>>;

struct InboundTask {
    listener: TcpListener,
    check: Arc<FrameCheck>,
    deliver: Deliver,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
    latest: Latest,
}

impl InboundTask {
    async fn run(mut self) {
        let mut connections = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                () = stopped(&mut self.shutdown) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        if connections.len() >= INBOUND_CONNECTIONS_MAX {
                            tracing::warn!(%remote, "too many inbound peer connections; closing the new one");
                            bump(&self.counters.inbound_rejected, 1);
                            continue;
                        }
                        next_id += 1;
                        let connection = InboundConnection {
                            id: next_id,
                            remote,
                            check: self.check.clone(),
                            deliver: self.deliver.clone(),
                            counters: self.counters.clone(),
                            shutdown: self.shutdown.clone(),
                            latest: self.latest.clone(),
                            retired: Arc::new(Notify::new()),
                            sender: None,
                            registered: false,
                        };
                        connections.spawn(connection.run(stream));
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(%error, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(RECONNECT_BACKOFF_MIN_MS)).await;
                    }
                },
            }
        }
        drop(self.listener);
        connections.shutdown().await;
    }
}

struct InboundConnection {
    id: u64,
    remote: SocketAddr,
    check: Arc<FrameCheck>,
    deliver: Deliver,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
    latest: Latest,
    /// Notified when a newer connection from the same node replaces this one.
    retired: Arc<Notify>,
    /// The node this connection's frames come from: named by its certificate, or (without
    /// TLS) fixed by its first valid frame.
    sender: Option<NodeId>,
    /// Whether this connection has replaced its sender's older one (after its first frame).
    registered: bool,
}

/// Why an inbound connection's handshake failed.
enum Refused {
    TimedOut,
    Unauthenticated(String),
}

impl InboundConnection {
    async fn run(mut self, stream: TcpStream) {
        let mut shutdown = self.shutdown.clone();
        let handshake = tokio::time::timeout(self.check.handshake_timeout, self.handshake(stream));
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => return,
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(Refused::Unauthenticated(reason))) => {
                    tracing::warn!(remote = %self.remote, %reason, "peer connection refused");
                    bump(&self.counters.unauthenticated, 1);
                    return;
                }
                Err(_) | Ok(Err(Refused::TimedOut)) => {
                    tracing::warn!(remote = %self.remote, "peer connection handshake timed out");
                    bump(&self.counters.timed_out, 1);
                    return;
                }
            },
        };
        self.serve(stream).await;
        if let Some(sender) = self.sender.filter(|_| self.registered) {
            let mut latest = self.latest.lock().expect("latest lock");
            if latest.get(&sender).is_some_and(|(id, _)| *id == self.id) {
                latest.remove(&sender);
            }
        }
    }

    /// TLS (when configured): the client certificate must name a peer, which becomes the
    /// connection's sender.
    async fn handshake(&mut self, stream: TcpStream) -> Result<BoxedStream, Refused> {
        let Some(tls) = &self.check.tls else {
            return Ok(Box::new(stream));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let stream = acceptor.accept(stream).await.map_err(|error| {
            if error.kind() == io::ErrorKind::TimedOut {
                Refused::TimedOut
            } else {
                Refused::Unauthenticated(format!("TLS handshake: {error}"))
            }
        })?;
        let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let Some(node) = tls.node_of(chain, &self.check.peers) else {
            return Err(Refused::Unauthenticated(
                "certificate names no peer of this store".into(),
            ));
        };
        self.sender = Some(node);
        Ok(Box::new(stream))
    }

    /// Reads frames until the connection ends, fails a check, idles or is replaced. The first
    /// frame must come within the handshake timeout, later ones within the idle timeout.
    async fn serve(&mut self, mut stream: BoxedStream) {
        let retired = self.retired.clone();
        let mut wait = self.check.handshake_timeout;
        loop {
            let read = tokio::select! {
                () = stopped(&mut self.shutdown) => break,
                () = retired.notified() => {
                    tracing::debug!(remote = %self.remote, "inbound peer connection replaced by a newer one");
                    break;
                }
                read = tokio::time::timeout(wait, read_stream_payload(&mut stream)) => read,
            };
            let Ok(read) = read else {
                tracing::warn!(remote = %self.remote, "inbound peer connection idle; closing it");
                bump(&self.counters.timed_out, 1);
                break;
            };
            wait = self.check.idle_timeout;
            let outcome = match read {
                Ok(None) => break,
                Ok(Some(payload)) => self.accept(&payload),
                Err(error) => Err(error.to_string()),
            };
            if let Err(reason) = outcome {
                tracing::warn!(remote = %self.remote, %reason, "closing inbound peer connection");
                bump(&self.counters.inbound_rejected, 1);
                break;
            }
        }
    }

    /// Checks and delivers one payload.
    fn accept(&mut self, payload: &[u8]) -> Result<(), String> {
        let frame = decode_peer_frame(payload).map_err(|error| error.to_string())?;
        if let Some(reason) = self.check.refuse(&frame, self.sender) {
            return Err(reason);
        }
        if !self.registered {
            self.sender = Some(frame.from);
            self.registered = true;
            let mut latest = self.latest.lock().expect("latest lock");
            if let Some((_, older)) = latest.insert(frame.from, (self.id, self.retired.clone())) {
                older.notify_one();
            }
        }
        bump(&self.counters.frames_received, 1);
        bump(
            &self.counters.bytes_received,
            (STREAM_HEADER_BYTES + payload.len()) as u64,
        );
        (self.deliver)(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phxq_proto::peer::append_stream_payload;
    use phxq_types::GroupId;
    use raft::eraftpb::{Message, MessageType};
    use std::future::Future;

    const STORE: u64 = 7;
    const TEST_BOUND: Duration = Duration::from_secs(20);

    /// Runs a test body, failing it if it takes longer than [`TEST_BOUND`].
    async fn bounded<F: Future<Output = ()>>(body: F) {
        tokio::time::timeout(TEST_BOUND, body)
            .await
            .expect("test finished within its time bound");
    }

    /// Waits (up to 5 s) until `condition` holds.
    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..500 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    async fn loopback_listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback")
    }

    /// A port nobody listens on (bound, then released).
    async fn closed_port() -> SocketAddr {
        loopback_listener().await.local_addr().unwrap()
    }

    fn config(me: u64, peers: &[(u64, SocketAddr)]) -> TransportConfig {
        TransportConfig {
            store_id: STORE,
            me: NodeId(me),
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: peers.iter().map(|&(id, addr)| (NodeId(id), addr)).collect(),
            queue_frames_max: 64,
            tls: None,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
        }
    }

    /// A `Deliver` that queues frames for the test to read.
    fn collector() -> (Deliver, mpsc::UnboundedReceiver<PeerFrame>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let deliver: Deliver = Arc::new(move |frame| {
            let _ = tx.send(frame);
        });
        (deliver, rx)
    }

    /// A frame of `store` from `from` to `to` holding one heartbeat tagged with `tag`.
    fn heartbeat(store: u64, from: u64, to: u64, tag: u64) -> PeerFrame {
        let message = Message {
            msg_type: MessageType::MsgHeartbeat,
            from,
            to,
            commit: tag,
            ..Message::default()
        };
        PeerFrame {
            store_id: store,
            from: NodeId(from),
            to: NodeId(to),
            messages: vec![(GroupId(tag % 3), message)],
        }
    }

    fn framed(frame: &PeerFrame) -> Vec<u8> {
        let mut bytes = Vec::new();
        append_stream_frame(&mut bytes, frame).unwrap();
        bytes
    }

    async fn next(frames: &mut mpsc::UnboundedReceiver<PeerFrame>) -> PeerFrame {
        tokio::time::timeout(Duration::from_secs(5), frames.recv())
            .await
            .expect("a frame within 5 s")
            .expect("transport alive")
    }

    /// Whether the other side closes `stream` within 5 s (EOF or reset).
    async fn closed_by_transport(stream: &mut TcpStream) -> bool {
        let mut buffer = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn two_nodes_exchange_frames_both_ways() {
        bounded(async {
            let (listen_1, listen_2) = (loopback_listener().await, loopback_listener().await);
            let (addr_1, addr_2) = (
                listen_1.local_addr().unwrap(),
                listen_2.local_addr().unwrap(),
            );
            let (deliver_1, mut frames_1) = collector();
            let (deliver_2, mut frames_2) = collector();
            let node_1 =
                Transport::start_on(listen_1, config(1, &[(1, addr_1), (2, addr_2)]), deliver_1)
                    .unwrap();
            let node_2 =
                Transport::start_on(listen_2, config(2, &[(1, addr_1), (2, addr_2)]), deliver_2)
                    .unwrap();
            eventually("both connections are up", || {
                node_1.peer_reachable(NodeId(2)) && node_2.peer_reachable(NodeId(1))
            })
            .await;

            for tag in 1..=20 {
                node_1.send(NodeId(2), heartbeat(STORE, 1, 2, tag));
            }
            node_2.send(NodeId(1), heartbeat(STORE, 2, 1, 99));
            for tag in 1..=20 {
                assert_eq!(
                    next(&mut frames_2).await,
                    heartbeat(STORE, 1, 2, tag),
                    "in order"
                );
            }
            assert_eq!(next(&mut frames_1).await, heartbeat(STORE, 2, 1, 99));

            let (stats_1, stats_2) = (node_1.stats(), node_2.stats());
            assert_eq!((stats_1.frames_sent, stats_2.frames_received), (20, 20));
            assert_eq!((stats_2.frames_sent, stats_1.frames_received), (1, 1));
            assert_eq!(stats_1.bytes_sent, stats_2.bytes_received);
            assert_eq!(
                (
                    stats_1.connects,
                    stats_1.frames_dropped,
                    stats_2.inbound_rejected
                ),
                (1, 0, 0)
            );
            node_1.shutdown().await;
            node_2.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_peer_that_starts_later_is_reached_once_it_is_up() {
        bounded(async {
            let late_addr = closed_port().await;
            let (deliver_1, _frames_1) = collector();
            let node_1 = Transport::start(config(1, &[(2, late_addr)]), deliver_1)
                .await
                .unwrap();
            eventually("a few connection attempts failed", || {
                node_1.stats().connection_errors >= 2
            })
            .await;
            assert!(!node_1.peer_reachable(NodeId(2)));
            node_1.send(NodeId(2), heartbeat(STORE, 1, 2, 1));
            assert_eq!(
                node_1.stats().frames_dropped,
                1,
                "a frame for a peer that is down is dropped"
            );

            // The late node binds the address node 1 keeps trying.
            let (deliver_2, mut frames_2) = collector();
            let mut late_config = config(2, &[(1, node_1.local_addr())]);
            late_config.listen = late_addr;
            let node_2 = Transport::start(late_config, deliver_2).await.unwrap();
            eventually("node 1 reconnects", || node_1.peer_reachable(NodeId(2))).await;
            node_1.send(NodeId(2), heartbeat(STORE, 1, 2, 2));
            assert_eq!(next(&mut frames_2).await, heartbeat(STORE, 1, 2, 2));
            assert_eq!(node_1.stats().connects, 1);

            // And when it goes away again, node 1 notices.
            node_2.shutdown().await;
            eventually("node 1 sees the peer gone", || {
                !node_1.peer_reachable(NodeId(2))
            })
            .await;
            node_1.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn bad_input_closes_only_its_connection_and_good_peers_are_still_served() {
        bounded(async {
            let (deliver, mut frames) = collector();
            let node = Transport::start(
                config(2, &[(1, closed_port().await), (3, closed_port().await)]),
                deliver,
            )
            .await
            .unwrap();
            let addr = node.local_addr();
            // A good connection opened first must survive everything below.
            let mut good = TcpStream::connect(addr).await.unwrap();
            good.write_all(&framed(&heartbeat(STORE, 3, 2, 1)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 3, 2, 1));

            let mut bad_checksum = framed(&heartbeat(STORE, 1, 2, 2));
            bad_checksum[4] ^= 1;
            let mut over_limit = Vec::new();
            over_limit.extend_from_slice(&u32::MAX.to_le_bytes());
            over_limit.extend_from_slice(&[0; 4]);
            let mut malformed_payload = Vec::new();
            append_stream_payload(&mut malformed_payload, &[9, 9, 9]);
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
                ("bad checksum", bad_checksum),
                ("frame over the limit", over_limit),
                ("checksummed but malformed payload", malformed_payload),
                ("wrong store", framed(&heartbeat(STORE + 1, 1, 2, 3))),
                (
                    "addressed to another node",
                    framed(&heartbeat(STORE, 1, 3, 4)),
                ),
                (
                    "from a node not in the store",
                    framed(&heartbeat(STORE, 9, 2, 5)),
                ),
                ("from this node itself", framed(&heartbeat(STORE, 2, 2, 6))),
            ];
            let rejected = cases.len() as u64;
            for (case, bytes) in cases {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                assert!(
                    closed_by_transport(&mut stream).await,
                    "{case}: connection closed"
                );
            }
            // A sender that changes its name mid-connection is cut off after its good frame.
            let mut turncoat = TcpStream::connect(addr).await.unwrap();
            turncoat
                .write_all(&framed(&heartbeat(STORE, 1, 2, 7)))
                .await
                .unwrap();
            turncoat
                .write_all(&framed(&heartbeat(STORE, 3, 2, 8)))
                .await
                .unwrap();
            assert!(
                closed_by_transport(&mut turncoat).await,
                "sender changed: connection closed"
            );
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 1, 2, 7));

            good.write_all(&framed(&heartbeat(STORE, 3, 2, 9)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 3, 2, 9));
            let stats = node.stats();
            assert_eq!(stats.inbound_rejected, rejected + 1);
            assert_eq!(stats.frames_received, 3);
            assert!(frames.try_recv().is_err(), "nothing bad was delivered");
            node.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_new_connection_from_a_node_replaces_its_older_one() {
        bounded(async {
            let (deliver, mut frames) = collector();
            let node = Transport::start(config(2, &[(1, closed_port().await)]), deliver)
                .await
                .unwrap();
            let mut older = TcpStream::connect(node.local_addr()).await.unwrap();
            older
                .write_all(&framed(&heartbeat(STORE, 1, 2, 1)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 1, 2, 1));
            let mut newer = TcpStream::connect(node.local_addr()).await.unwrap();
            newer
                .write_all(&framed(&heartbeat(STORE, 1, 2, 2)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 1, 2, 2));
            assert!(
                closed_by_transport(&mut older).await,
                "the older connection is closed"
            );
            newer
                .write_all(&framed(&heartbeat(STORE, 1, 2, 3)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 1, 2, 3));
            assert_eq!(
                node.stats().inbound_rejected,
                0,
                "replacing is not an error"
            );
            node.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_queue_drops_frames_and_counts_them() {
        bounded(async {
            // A peer that accepts but never reads: the connection is up, writes back up.
            let sink = loopback_listener().await;
            let sink_addr = sink.local_addr().unwrap();
            let (deliver, _frames) = collector();
            let mut small = config(1, &[(2, sink_addr)]);
            small.queue_frames_max = 2;
            let node = Transport::start(small, deliver).await.unwrap();
            let (_held, _) = sink.accept().await.unwrap();
            eventually("connected", || node.peer_reachable(NodeId(2))).await;
            node.send(NodeId(99), heartbeat(STORE, 1, 99, 0));
            assert_eq!(node.stats().frames_dropped, 1, "unknown peer");
            // Large frames fill the socket buffers, then the queue of 2, then are dropped.
            let mut big = heartbeat(STORE, 1, 2, 1);
            big.messages[0].1.context = vec![0; 1 << 20].into();
            for _ in 0..64 {
                node.send(NodeId(2), big.clone());
            }
            eventually("drops counted", || node.stats().frames_dropped > 1).await;
            node.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn shutdown_stops_listening_and_ends_the_tasks() {
        bounded(async {
            let (deliver, _frames) = collector();
            let node = Transport::start(config(1, &[(2, closed_port().await)]), deliver)
                .await
                .unwrap();
            let addr = node.local_addr();
            let mut open = TcpStream::connect(addr).await.unwrap();
            let clone = node.clone();
            node.shutdown().await;
            assert!(
                closed_by_transport(&mut open).await,
                "open connections are closed"
            );
            assert!(
                TcpStream::connect(addr).await.is_err(),
                "nobody listens any more"
            );
            clone.send(NodeId(2), heartbeat(STORE, 1, 2, 1));
            assert_eq!(clone.stats().frames_dropped, 1);
        })
        .await;
    }

    /// Certificates of store `STORE` (nodes 1 to 3) in `dir`, and node 2's transport on them
    /// with short timeouts, expecting peers 1 and 3.
    async fn tls_node(dir: &std::path::Path) -> (Transport, mpsc::UnboundedReceiver<PeerFrame>) {
        let ids = [NodeId(1), NodeId(2), NodeId(3)];
        let files = crate::tls::ensure_store_certs(dir, STORE, &ids).unwrap();
        let mut config = config(2, &[(1, closed_port().await), (3, closed_port().await)]);
        config.tls = Some(PeerTls::load(&files[1], STORE).unwrap());
        config.handshake_timeout_ms = 300;
        config.idle_timeout_ms = 600;
        let (deliver, frames) = collector();
        (Transport::start(config, deliver).await.unwrap(), frames)
    }

    /// A TLS connection to `addr` presenting the certificate in `files` (any CA).
    async fn tls_connect(
        addr: SocketAddr,
        files: &crate::tls::CertFiles,
        server_ca: &crate::tls::CertFiles,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut client = PeerTls::load(files, STORE).unwrap().client_config();
        if files.ca != server_ca.ca {
            // Trust the real store's server so only the client certificate is foreign.
            let roots = crate::tls::load_roots(&server_ca.ca).unwrap();
            let chain = crate::tls::load_certs(&files.cert).unwrap();
            let key_pem = std::fs::read(&files.key).unwrap();
            use rustls::pki_types::pem::PemObject;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
            client = Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap(),
            );
        }
        let stream = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(crate::tls::node_name(STORE, NodeId(2)))
            .unwrap();
        tokio_rustls::TlsConnector::from(client)
            .connect(name, stream)
            .await
    }

    /// Whether the other side closes `stream` within 5 s, whatever it sends first (a TLS
    /// alert, say).
    async fn drained_to_close(stream: &mut TcpStream) -> bool {
        let mut buffer = [0u8; 256];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// A frame from `from` to node 2 of one raft message of `kind`.
    fn forged(from: u64, kind: MessageType, commit: u64) -> Vec<u8> {
        let message = Message {
            msg_type: kind,
            from,
            to: 2,
            term: 1,
            commit,
            entries: vec![raft::eraftpb::Entry {
                data: b"garbage".to_vec().into(),
                ..Default::default()
            }]
            .into(),
            ..Message::default()
        };
        framed(&PeerFrame {
            store_id: STORE,
            from: NodeId(from),
            to: NodeId(2),
            messages: vec![(GroupId(0), message)],
        })
    }

    #[tokio::test]
    async fn with_tls_only_a_certified_peer_speaking_as_itself_is_heard() {
        bounded(async {
            let store = tempfile::tempdir().unwrap();
            let (node, mut frames) = tls_node(store.path()).await;
            let addr = node.local_addr();
            let real = crate::tls::ensure_store_certs(
                store.path(),
                STORE,
                &[NodeId(1), NodeId(2), NodeId(3)],
            )
            .unwrap();
            // (a) No TLS at all: a plaintext frame is a failed handshake.
            let mut plain = TcpStream::connect(addr).await.unwrap();
            let _ = plain
                .write_all(&forged(1, MessageType::MsgPropose, 0))
                .await;
            assert!(drained_to_close(&mut plain).await, "plaintext closed");
            // (b) A certificate for node 1 from another CA.
            let other = tempfile::tempdir().unwrap();
            let foreign =
                crate::tls::ensure_store_certs(other.path(), STORE, &[NodeId(1)]).unwrap();
            if let Ok(mut stream) = tls_connect(addr, &foreign[0], &real[1]).await {
                let _ = stream
                    .write_all(&forged(1, MessageType::MsgPropose, 0))
                    .await;
                let mut buffer = [0u8; 16];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
                assert!(matches!(read, Ok(Ok(0) | Err(_))), "foreign CA closed");
            }
            eventually("both refusals counted", || {
                node.stats().unauthenticated == 2
            })
            .await;
            // (c) Node 1's real certificate, frames claiming node 3: closed, nothing delivered.
            let mut liar = tls_connect(addr, &real[0], &real[1]).await.unwrap();
            liar.write_all(&forged(3, MessageType::MsgHeartbeat, u64::MAX))
                .await
                .unwrap();
            let mut buffer = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), liar.read(&mut buffer)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "impostor closed");
            assert_eq!(node.stats().inbound_rejected, 1);
            // Node 1 speaking as itself is heard.
            let mut honest = tls_connect(addr, &real[0], &real[1]).await.unwrap();
            honest
                .write_all(&framed(&heartbeat(STORE, 1, 2, 5)))
                .await
                .unwrap();
            assert_eq!(next(&mut frames).await, heartbeat(STORE, 1, 2, 5));
            assert!(frames.try_recv().is_err(), "nothing forged was delivered");
            // It goes idle: closed after the idle timeout.
            let read = tokio::time::timeout(Duration::from_secs(5), honest.read(&mut buffer)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "idle connection closed");
            // A connection that never handshakes is closed too.
            let mut silent = TcpStream::connect(addr).await.unwrap();
            assert!(
                drained_to_close(&mut silent).await,
                "silent connection closed"
            );
            assert_eq!(node.stats().timed_out, 2);
            node.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_256_mib_frame_header_closes_the_connection_before_allocation() {
        bounded(async {
            let (deliver, mut frames) = collector();
            let node = Transport::start(config(2, &[(1, closed_port().await)]), deliver)
                .await
                .unwrap();
            let mut stream = TcpStream::connect(node.local_addr()).await.unwrap();
            let mut header = Vec::new();
            header.extend_from_slice(&(256u32 << 20).to_le_bytes());
            header.extend_from_slice(&[0; 4]);
            stream.write_all(&header).await.unwrap();
            // Announced, never sent: the refusal cannot have waited for (or buffered) it.
            assert!(
                closed_by_transport(&mut stream).await,
                "refused at the header"
            );
            assert_eq!(node.stats().inbound_rejected, 1);
            assert!(frames.try_recv().is_err());
            node.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_zero_queue_bound_is_refused() {
        let (deliver, _frames) = collector();
        let mut zero = config(1, &[]);
        zero.queue_frames_max = 0;
        let error = Transport::start(zero, deliver)
            .await
            .err()
            .expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
