//! Forged peer frames over real sockets against a served 3-node store under produce load
//! (issue 12, "a forged-frame test over real sockets"). Peer mTLS is on, as in production.
//!
//! While producers run, an attacker dials the nodes' peer ports:
//! (a) TLS without a client certificate and (b) with a certificate for node 1 from another
//! CA, each sending a `MsgPropose` of garbage: refused at the handshake, never reaching raft;
//! (c) with node 1's real certificate (a stolen key, or node 1 misbehaving): a `MsgPropose` of
//! garbage to a master, a heartbeat committing past a follower's log, an append response
//! acknowledging past a master's log (each dropped by `peer_filter` and counted in
//! `peer_messages_rejected`), a frame claiming to be node 3 and a frame header over
//! `PEER_FRAME_BYTES_MAX` (each closing the connection, counted by the transport, and the
//! impostor retiring none of node 3's connections). Afterwards every produce was
//! acknowledged, no node stopped, and the queues hold exactly the acknowledged messages, in
//! order: nothing forged was ever applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use phxq_client::{Producer, ProducerConfig, Receipt};
use phxq_node::tls::{CertFiles, PeerTls, ensure_store_certs, load_roots};
use phxq_proto::peer::{PEER_FRAME_BYTES_MAX, PeerFrame, append_stream_frame};
use phxq_types::{GroupId, NodeId};
use raft::eraftpb::{Entry, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

mod common;

use common::{POLL, SETTLE_TIMEOUT, STORE_ID, Store, TOPIC, cluster_status, run};

/// Producers running through the attack.
const PRODUCERS: usize = 4;
/// Keys each producer cycles through (per-key order is checked).
const KEYS_PER_PRODUCER: usize = 4;
/// Most messages one producer sends: bounds the run, and keeps every queue within one read.
const MESSAGES_PER_PRODUCER_MAX: usize = 2_000;
/// Messages acknowledged before the attack starts and after it ends, so that it runs under
/// load.
const MESSAGES_AROUND_ATTACK: usize = 40;
/// How long a node may take to close an attacker's connection, or to count a refusal.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How far past a log's end the forged indexes point.
const FAR_INDEXES: u64 = 1_000_000;

/// The masters of a placed store of three nodes: group `g` at node `g mod 3 + 1`.
const GROUP_OF_NODE_1: u32 = 0;
const GROUP_OF_NODE_2: u32 = 1;
const GROUP_OF_NODE_3: u32 = 2;

/// What the producers acknowledged: (key, value, receipt), in send order per producer.
type Acked = Vec<(String, String, Receipt)>;

#[test]
fn forged_peer_frames_are_refused_or_dropped_while_the_store_keeps_serving() {
    run(async {
        let store = Store::start(3, true).await;
        let (producers, acked, stop) = start_producers(&store);
        let count = &*acked;
        wait_until(
            "the producers are under way",
            SETTLE_TIMEOUT,
            || async move { count.load(Ordering::Relaxed) >= MESSAGES_AROUND_ATTACK },
        )
        .await;

        unauthenticated_attacks(&store).await;
        stolen_key_attacks(&store).await;

        let after_attack = count.load(Ordering::Relaxed) + MESSAGES_AROUND_ATTACK;
        wait_until(
            "the producers go on after the attack",
            SETTLE_TIMEOUT,
            || async move { count.load(Ordering::Relaxed) >= after_attack },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        for producer in producers {
            sent.push(producer.await.expect("producer task"));
        }
        check_stored_exactly(&store, &sent).await;
        for id in 1..=3 {
            let status = cluster_status(&store.client_addrs[id - 1]).await;
            assert!(status.is_some(), "node {id} still serves");
        }
        // A node that stopped on its own (a forged entry applied, a raft panic) fails here.
        store.stop().await;
    });
}

/// (a) and (b): refused at the TLS handshake, counted as unauthenticated, never stepped.
async fn unauthenticated_attacks(store: &Store) {
    let target = 2;
    let rejected_before = rejected(store).await;
    let refused_before = store.server(target).peer_stats().unauthenticated;
    let real = store_certs(store);
    let garbage = garbage_proposal(store, target).await;

    let no_certificate = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(load_roots(&real[0].ca).expect("store CA"))
        .with_no_client_auth(),
    );
    let other_ca = tempfile::tempdir().expect("tempdir");
    let foreign = ensure_store_certs(other_ca.path(), STORE_ID, &[NodeId(1)]).expect("certs");
    // Node 1's name from another CA; the store's CA trusted, so only the client side is
    // foreign.
    let impostor = PeerTls::load(
        &CertFiles {
            ca: real[0].ca.clone(),
            cert: foreign[0].cert.clone(),
            key: foreign[0].key.clone(),
        },
        STORE_ID,
    )
    .expect("impostor's TLS config")
    .client_config();

    for (case, config) in [
        ("no client certificate", no_certificate),
        ("a certificate from another CA", impostor),
    ] {
        let tcp = TcpStream::connect(store.server(target).peer_addr())
            .await
            .expect("connect");
        let name = server_name(target);
        // TLS 1.3 may finish the client's side before the server checks the client.
        if let Ok(mut stream) = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
        {
            let _ = send(&mut stream, &garbage).await;
            assert!(closed(&mut stream).await, "{case}: connection closed");
        }
    }
    // A refusal at the handshake is counted at once.
    wait_until("both refusals counted", CLOSE_TIMEOUT, || async move {
        store.server(target).peer_stats().unauthenticated == refused_before + 2
    })
    .await;
    assert_eq!(
        rejected(store).await,
        rejected_before,
        "nothing of an unauthenticated connection reached raft"
    );
}

/// (c): node 1's own certificate, misused.
async fn stolen_key_attacks(store: &Store) {
    let node_1 = PeerTls::load(&store_certs(store)[0], STORE_ID).expect("node 1's TLS config");
    let connection_errors = |id: usize| store.server(id).peer_stats().connection_errors;
    let others_before = [connection_errors(2), connection_errors(3)];
    let rejected_before = rejected(store).await;

    // Each raft message goes to the node it would hurt; each must be dropped and counted.
    let (term, last) = group_view(store, 2, GROUP_OF_NODE_2).await;
    let mut proposal = raft_message(MessageType::MsgPropose, 1, 2, term);
    proposal.entries = vec![garbage_entry()].into();
    let mut answer = raft_message(MessageType::MsgAppendResponse, 1, 2, term);
    answer.index = last + FAR_INDEXES;
    let (term_0, last_0) = group_view(store, 3, GROUP_OF_NODE_1).await;
    let mut heartbeat = raft_message(MessageType::MsgHeartbeat, 1, 3, term_0);
    heartbeat.commit = last_0 + FAR_INDEXES;
    let cases = [
        (
            "a proposal of garbage to a master",
            2,
            GROUP_OF_NODE_2,
            proposal,
        ),
        (
            "an append response past the master's log",
            2,
            GROUP_OF_NODE_2,
            answer,
        ),
        (
            "a heartbeat committing past the follower's log",
            3,
            GROUP_OF_NODE_1,
            heartbeat,
        ),
    ];
    let mut expected = rejected_before.clone();
    for (case, target, group, message) in cases {
        let mut stream = dial(&node_1, store, target).await;
        send(&mut stream, &frame(1, target, group, message))
            .await
            .expect("write");
        expected[target - 1] += 1;
        let counted = &expected;
        wait_until(case, CLOSE_TIMEOUT, || async move {
            rejected(store).await == *counted
        })
        .await;
    }

    // Frames the transport refuses: the connection is closed, nothing is stepped.
    let (term_2, _) = group_view(store, 2, GROUP_OF_NODE_3).await;
    let mut as_node_3 = raft_message(MessageType::MsgHeartbeat, 3, 2, term_2);
    as_node_3.commit = u64::MAX;
    let mut oversized = Vec::new();
    oversized.extend_from_slice(&(PEER_FRAME_BYTES_MAX as u32 + 1).to_le_bytes());
    oversized.extend_from_slice(&[0; 4]);
    let cases = [
        (
            "a frame claiming node 3",
            2,
            frame(3, 2, GROUP_OF_NODE_3, as_node_3),
        ),
        ("a frame over the size limit", 3, oversized),
    ];
    for (case, target, bytes) in cases {
        let before = store.server(target).peer_stats().inbound_rejected;
        let mut stream = dial(&node_1, store, target).await;
        send(&mut stream, &bytes).await.expect("write");
        assert!(closed(&mut stream).await, "{case}: connection closed");
        assert_eq!(
            store.server(target).peer_stats().inbound_rejected,
            before + 1,
            "{case}: counted"
        );
    }
    assert_eq!(
        rejected(store).await,
        expected,
        "nothing refused was stepped"
    );
    assert_eq!(
        [connection_errors(2), connection_errors(3)],
        others_before,
        "no connection of nodes 2 and 3 was retired by node 1's key"
    );
}

/// Node `id`'s view of `group`: its term and last index.
async fn group_view(store: &Store, id: usize, group: u32) -> (u64, u64) {
    let status = cluster_status(&store.client_addrs[id - 1])
        .await
        .expect("status");
    let group = &status.groups[group as usize];
    (group.term, group.last_index)
}

/// `peer_messages_rejected` of every node, by node.
async fn rejected(store: &Store) -> Vec<u64> {
    let mut counts = Vec::new();
    for (i, addr) in store.client_addrs.iter().enumerate() {
        let status = cluster_status(addr)
            .await
            .unwrap_or_else(|| panic!("node {} answers no ClusterStatus: stopped?", i + 1));
        counts.push(status.counters.expect("counters").peer_messages_rejected);
    }
    counts
}

/// A frame proposing garbage to node `target` as node 1 at the term of the group it masters.
async fn garbage_proposal(store: &Store, target: usize) -> Vec<u8> {
    let group = target as u32 - 1;
    let (term, _) = group_view(store, target, group).await;
    let mut proposal = raft_message(MessageType::MsgPropose, 1, target as u64, term);
    proposal.entries = vec![garbage_entry()].into();
    frame(1, target, group, proposal)
}

fn garbage_entry() -> Entry {
    Entry {
        data: b"\xffnot a batch".to_vec().into(),
        ..Default::default()
    }
}

fn raft_message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut message = Message {
        from,
        to,
        term,
        ..Default::default()
    };
    message.set_msg_type(kind);
    message
}

/// `message` of `group`, framed for the peer stream, from node `from` to node `to`.
fn frame(from: u64, to: usize, group: u32, message: Message) -> Vec<u8> {
    let frame = PeerFrame {
        store_id: STORE_ID,
        from: NodeId(from),
        to: NodeId(to as u64),
        messages: vec![(GroupId(u64::from(group)), message)],
    };
    let mut bytes = Vec::new();
    append_stream_frame(&mut bytes, &frame).expect("a small frame");
    bytes
}

fn store_certs(store: &Store) -> Vec<CertFiles> {
    let ids: Vec<NodeId> = (1..=3).map(NodeId).collect();
    ensure_store_certs(&store.tls_dir(), STORE_ID, &ids).expect("the store's certificates")
}

fn server_name(id: usize) -> rustls::pki_types::ServerName<'static> {
    let name = phxq_node::tls::node_name(STORE_ID, NodeId(id as u64));
    rustls::pki_types::ServerName::try_from(name).expect("a DNS name")
}

/// A TLS connection to node `target`'s peer port, presenting `tls`'s certificate.
async fn dial(
    tls: &PeerTls,
    store: &Store,
    target: usize,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(store.server(target).peer_addr())
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(tls.client_config())
        .connect(server_name(target), tcp)
        .await
        .expect("handshake with a store certificate")
}

/// Writes `bytes` and pushes them out of TLS's buffers.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Whether the other side closes `stream` within [`CLOSE_TIMEOUT`], whatever it sends first
/// (a TLS alert, say).
async fn closed<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> bool {
    let mut buffer = [0u8; 256];
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Polls `condition` until it holds, for at most `within`.
async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// [`PRODUCERS`] producers sending keyed messages one at a time until `stop` (or their
/// maximum); each returns what was acknowledged. Every send must be acknowledged.
fn start_producers(store: &Store) -> (Vec<JoinHandle<Acked>>, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..PRODUCERS)
        .map(|p| {
            let mut config = ProducerConfig::new(store.client_addrs.clone());
            config.deadline = SETTLE_TIMEOUT;
            let producer = Producer::new(config).expect("valid producer config");
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for n in 0..MESSAGES_PER_PRODUCER_MAX {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("p{p}-k{}", n % KEYS_PER_PRODUCER);
                    let value = format!("p{p}-{n}");
                    let receipt = producer
                        .send(TOPIC, key.as_bytes(), value.clone())
                        .await
                        .unwrap_or_else(|error| panic!("{value} not acknowledged: {error}"));
                    acked.fetch_add(1, Ordering::Relaxed);
                    sent.push((key, value, receipt));
                }
                sent
            })
        })
        .collect();
    (tasks, acked, stop)
}

/// The store holds exactly the acknowledged messages, each where its receipt says, and a
/// key's messages in the order they were sent.
async fn check_stored_exactly(store: &Store, sent: &[Acked]) {
    let stored = store.read_all().await;
    let total: usize = stored.values().map(Vec::len).sum();
    let acked: usize = sent.iter().map(Vec::len).sum();
    assert_eq!(
        total, acked,
        "the store holds exactly what was acknowledged"
    );
    let mut last_offset: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, value, receipt) in sent.iter().flatten() {
        let messages = &stored[&receipt.queue];
        let at = usize::try_from(receipt.offset - 1).expect("offset");
        let message = messages.get(at).expect("the acknowledged offset is stored");
        assert_eq!(message.offset, receipt.offset);
        assert_eq!(
            (message.key.as_slice(), message.value.as_slice()),
            (key.as_bytes(), value.as_bytes()),
            "queue {} offset {}",
            receipt.queue,
            receipt.offset
        );
        let previous = last_offset
            .insert(key.as_str(), receipt.offset)
            .unwrap_or(0);
        assert!(receipt.offset > previous, "{key}: in send order");
    }
}
