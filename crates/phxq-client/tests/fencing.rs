//! Self-fencing end to end: a member cut off from the group coordinator, but not from the
//! masters of its queues, stops handling them before the coordinator grants them to another
//! member. Against a real three-node store (every node a full server in this process).
//!
//! Member `a` reaches node 1 (group 0's master, the coordinator, and the master of groups 0
//! and 3) only through a TCP proxy in this test (`ConsumerConfig::connect_via`); nodes 2 and
//! 3 it reaches directly. When the proxy black-holes (holds every connection open and
//! forwards nothing more), `a`'s heartbeats go unanswered while its queues of groups 1 and 2
//! still pull and handle. Handlers journal `(queue, member, start, end)` intervals (the end
//! taken when the handler's future is dropped, so a fenced member's handlers end when it
//! fences): no two members' intervals of one queue may overlap.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    Consumer, ConsumerConfig, Delivery, Membership, Outcome, Producer, ProducerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod common;

use common::{CONSUMER_GROUPS, GROUPS, POLL, Running, Store, TOPIC, lock, run};

/// The members' session timeout.
const SESSION: Duration = Duration::from_secs(2);
/// Their heartbeat interval.
const INTERVAL: Duration = Duration::from_millis(200);
/// How long each handler takes.
const HANDLING: Duration = Duration::from_millis(20);
/// How long the test waits for each thing it expects.
const WAIT: Duration = Duration::from_secs(30);
/// The group the members share.
const GROUP: &str = CONSUMER_GROUPS[0];

/// A TCP proxy to one address that can be cut: from then on it forwards nothing, on old
/// connections and new ones, and closes none (a black hole, not a refusal).
struct Proxy {
    addr: String,
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (cut, watch_cut) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(relay(inbound, upstream.clone(), watch_cut.clone()));
            }
        });
        Proxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

async fn relay(inbound: TcpStream, upstream: String, cut: watch::Receiver<bool>) {
    if *cut.borrow() {
        let _held = inbound;
        return std::future::pending().await;
    }
    let Ok(outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (from_client, to_client) = inbound.into_split();
    let (from_node, to_node) = outbound.into_split();
    tokio::join!(
        forward(from_client, to_node, cut.clone()),
        forward(from_node, to_client, cut)
    );
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = cut.wait_for(|&cut| cut) => Ok(usize::MAX),
        };
        let count = match read {
            Ok(0) | Err(_) => return,
            Ok(count) => count,
        };
        if count == usize::MAX || *cut.borrow() {
            // Black hole: keep both ends open, forward nothing.
            return std::future::pending().await;
        }
        if to.write_all(&buf[..count]).await.is_err() {
            return;
        }
    }
}

/// What the members' handlers saw.
#[derive(Default)]
struct Journal {
    /// `(queue, member, start, end)`; `end` is `None` while the handler runs.
    intervals: Vec<(u32, &'static str, Instant, Option<Instant>)>,
    /// Values handled to the end.
    handled: BTreeSet<String>,
}

impl Journal {
    /// Pairs of intervals of one queue by two members that overlap in time.
    fn overlaps(&self) -> Vec<String> {
        let now = Instant::now();
        let mut by_queue: BTreeMap<u32, Vec<(Instant, Instant, &str)>> = BTreeMap::new();
        for &(queue, member, start, end) in &self.intervals {
            by_queue
                .entry(queue)
                .or_default()
                .push((start, end.unwrap_or(now), member));
        }
        let mut found = Vec::new();
        for (queue, intervals) in by_queue {
            for (i, (start, end, member)) in intervals.iter().enumerate() {
                for (other_start, other_end, other) in &intervals[i + 1..] {
                    if member != other && start < other_end && other_start < end {
                        found.push(format!("queue {queue}: {member} and {other} at once"));
                    }
                }
            }
        }
        found
    }

    /// The queues `member` started a handler of at or after `since`.
    fn queues_since(&self, member: &str, since: Instant) -> BTreeSet<u32> {
        self.intervals
            .iter()
            .filter(|(_, who, start, _)| *who == member && *start >= since)
            .map(|&(queue, ..)| queue)
            .collect()
    }
}

/// Ends an interval when dropped (the handler finished or was cut off).
struct IntervalEnd {
    journal: Arc<Mutex<Journal>>,
    index: usize,
}

impl Drop for IntervalEnd {
    fn drop(&mut self) {
        lock(&self.journal).intervals[self.index].3 = Some(Instant::now());
    }
}

fn journaling(
    journal: Arc<Mutex<Journal>>,
    member: &'static str,
) -> impl Fn(&Delivery) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static
{
    move |msg: &Delivery| {
        let journal = journal.clone();
        let value = String::from_utf8(msg.value.clone()).expect("utf-8");
        let queue = msg.queue;
        Box::pin(async move {
            let index = {
                let mut journal = lock(&journal);
                journal
                    .intervals
                    .push((queue, member, Instant::now(), None));
                journal.intervals.len() - 1
            };
            let _end = IntervalEnd {
                journal: journal.clone(),
                index,
            };
            tokio::time::sleep(HANDLING).await;
            lock(&journal).handled.insert(value);
            Outcome::Handled
        })
    }
}

fn member(servers: Vec<String>, name: &str, connect_via: Vec<(String, String)>) -> Consumer {
    let mut config = ConsumerConfig::new(servers, TOPIC, GROUP);
    config.long_poll = Duration::from_millis(300);
    config.commit_interval = Duration::from_millis(50);
    config.connect_via = connect_via;
    config.membership = Some(Membership {
        session_timeout: SESSION,
        heartbeat_interval: INTERVAL,
        ..Membership::new(name)
    });
    Consumer::new(config).expect("valid consumer config")
}

/// Waits until `done` holds of the journal, at most [`WAIT`].
async fn wait_for(journal: &Arc<Mutex<Journal>>, what: &str, done: impl Fn(&Journal) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(&lock(journal)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

#[test]
fn a_member_cut_off_from_the_coordinator_stops_its_queues_before_they_are_granted_elsewhere() {
    run(async {
        // Placed: group g's master is node g mod 3 + 1, so node 1 masters groups 0 and 3
        // and is the coordinator.
        let store = Store::start(3, true).await;
        let proxy = Proxy::start(store.client_addrs[0].clone()).await;

        // Keyed messages over every queue, about a hundred a second, until told to stop.
        let producing = Arc::new(AtomicBool::new(true));
        let sent: Arc<Mutex<Vec<String>>> = Arc::default();
        let producer_task = {
            let (producing, sent) = (producing.clone(), sent.clone());
            let producer =
                Producer::new(ProducerConfig::new(store.client_addrs.clone())).expect("producer");
            tokio::spawn(async move {
                let mut seq = 0u64;
                while producing.load(Ordering::SeqCst) {
                    let value = format!("v{seq}");
                    let key = format!("key-{}", seq % 32);
                    if producer
                        .send(TOPIC, key.as_bytes(), value.clone())
                        .await
                        .is_ok()
                    {
                        lock(&sent).push(value);
                    }
                    seq += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };

        let journal = Arc::new(Mutex::new(Journal::default()));
        let a_via = vec![(store.client_addrs[0].clone(), proxy.addr.clone())];
        let a_servers = store.client_addrs[1..].to_vec();
        let a = Running::spawn(
            member(a_servers, "a", a_via),
            journaling(journal.clone(), "a"),
        );
        let began = Instant::now();
        wait_for(&journal, "a handling every queue", |j| {
            j.queues_since("a", began).len() == common::QUEUES as usize
        })
        .await;
        let b = Running::spawn(
            member(store.client_addrs.clone(), "b", Vec::new()),
            journaling(journal.clone(), "b"),
        );
        let joined = Instant::now();
        wait_for(&journal, "b handling queues handed over", |j| {
            j.queues_since("b", joined).len() >= 2
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let settled = Instant::now() - Duration::from_millis(500);
        let a_queues = lock(&journal).queues_since("a", settled);
        // Queues of groups 1 and 2 are mastered by nodes 2 and 3, which `a` still reaches.
        let a_reachable: BTreeSet<u32> = a_queues
            .iter()
            .copied()
            .filter(|queue| !matches!(queue % GROUPS, 0 | 3))
            .collect();
        assert!(
            !a_reachable.is_empty(),
            "a holds a queue it can read without node 1: {a_queues:?}"
        );

        proxy.cut();
        let cut_at = Instant::now();
        wait_for(&journal, "b taking over a's queues", |j| {
            a_reachable.is_subset(&j.queues_since("b", cut_at + SESSION))
        })
        .await;
        producing.store(false, Ordering::SeqCst);
        producer_task.await.expect("producer task");
        let sent = lock(&sent).clone();
        wait_for(&journal, "every message handled", |j| {
            sent.iter().all(|value| j.handled.contains(value))
        })
        .await;
        let report = b.drain_within(WAIT).await;
        a.kill().await;

        let journal = std::mem::take(&mut *lock(&journal));
        assert_eq!(journal.overlaps(), Vec::<String>::new(), "{report:?}");
        // The case fencing is for: a went on handling after the cut...
        let after_cut = journal.queues_since("a", cut_at);
        assert!(
            !after_cut.is_disjoint(&a_reachable),
            "a kept handling its reachable queues after the cut: {after_cut:?}"
        );
        // ... and stopped within its session (its last answered heartbeat was sent before
        // the cut), then handled nothing.
        let a_last = journal
            .intervals
            .iter()
            .filter(|(_, who, ..)| *who == "a")
            .filter_map(|&(_, _, _, end)| end)
            .max()
            .expect("a handled something");
        assert!(
            a_last <= cut_at + SESSION + Duration::from_millis(200),
            "a's last handler ended {:?} after the cut",
            a_last - cut_at
        );
        assert!(report.queues.len() >= a_reachable.len(), "{report:?}");
        store.stop().await;
    });
}
