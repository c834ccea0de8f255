//! Per-message acknowledgement through gRPC against a real 3-node store (every node a full
//! server in this test process on 127.0.0.1): `Receive`, `Ack` and `Nack` through the
//! [`Receiver`], the stored delivery count across a master change, and bad input refused
//! with nothing changed. Tests run one at a time, each on a store of its own; every wait is
//! bounded.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phxq_client::{ErrorCode, Producer, ProducerConfig, Received, Receiver, queue_of_key};
use phxq_proto::api;

mod common;

use common::{CONSUMER_GROUPS, GROUPS, QUEUES, Store, TOPIC, run};

/// The group these tests receive with.
const GROUP: &str = CONSUMER_GROUPS[1];
/// The queue they use: in group 1, mastered by node 2 once placed.
const QUEUE: u32 = 5;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn config(store: &Store) -> ProducerConfig {
    let mut config = ProducerConfig::new(store.client_addrs.clone());
    config.deadline = Duration::from_secs(20);
    config
}

/// A key that the producer routes to `queue`.
fn key_for(queue: u32) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|key| queue_of_key(key.as_bytes(), QUEUES) == queue)
        .expect("some key hashes there")
}

/// Produces `values` to [`QUEUE`], in order.
async fn produce(store: &Store, values: &[&str]) {
    let producer = Producer::new(config(store)).expect("config");
    let key = key_for(QUEUE);
    for value in values {
        let receipt = producer.send(TOPIC, key.as_bytes(), *value).await;
        assert_eq!(receipt.expect("stored").queue, QUEUE);
    }
}

fn receiver(store: &Store, group: &str, ack_timeout: Duration) -> Receiver {
    let mut receiver = Receiver::new(config(store), TOPIC, group).expect("config");
    receiver.set_ack_timeout(ack_timeout);
    receiver
}

/// `(offset, value, delivery count)` of each message.
fn seen(received: &[Received]) -> Vec<(u64, String, u32)> {
    received
        .iter()
        .map(|r| {
            let value = String::from_utf8(r.value.clone()).expect("utf-8");
            (r.offset, value, r.delivery_count)
        })
        .collect()
}

/// The code of a refusal (`None`: success).
fn code<T>(result: Result<T, phxq_client::ProduceError>) -> Option<ErrorCode> {
    result.err().and_then(|error| error.code())
}

/// Receives until something comes (each call long-polls 1 s), within `within`.
async fn receive_some(receiver: &Receiver, within: Duration) -> Vec<Received> {
    let until = Instant::now() + within;
    loop {
        let got = receiver
            .receive(QUEUE, 10, Duration::from_secs(1))
            .await
            .expect("receive");
        if !got.is_empty() {
            return got;
        }
        assert!(Instant::now() < until, "nothing received within {within:?}");
    }
}

/// The group's cursor on [`QUEUE`] as a `Consume` from the cursor sees it.
async fn cursor(store: &Store, group: &str) -> u64 {
    let request = api::ConsumeRequest {
        topic: TOPIC.to_string(),
        queue: QUEUE,
        consumer_group: group.to_string(),
        from_offset: None,
        max_messages: 1,
        max_bytes: 1,
        wait_ms: 0,
        store_id: 0,
    };
    let response = store.consume_at_master(request).await;
    response
        .messages
        .first()
        .map_or(response.next_offset, |m| m.offset)
}

#[test]
fn acks_move_the_shared_cursor_and_unacked_or_nacked_messages_come_back_counted() {
    run(async {
        let store = Store::start(3, true).await;
        produce(&store, &["a", "b", "c"]).await;
        let receiver = receiver(&store, GROUP, Duration::from_millis(600));
        let first = receive_some(&receiver, Duration::from_secs(10)).await;
        assert_eq!(
            seen(&first),
            [(1, "a".into(), 1), (2, "b".into(), 1), (3, "c".into(), 1)]
        );
        let first_deadline = first[1].deadline_ms;
        // Acks: the cursor moves over the acked prefix only, and Consume sees it.
        assert_eq!(receiver.ack(QUEUE, &[1]).await.expect("ack"), 2);
        assert_eq!(
            receiver.ack(QUEUE, &[3]).await.expect("ack"),
            2,
            "2 in flight"
        );
        assert_eq!(cursor(&store, GROUP).await, 2);
        assert_eq!(cursor(&store, CONSUMER_GROUPS[0]).await, 1, "other group");
        // 2 was not acked: it comes back after its ack timeout, counted twice.
        let again = receive_some(&receiver, Duration::from_secs(10)).await;
        assert_eq!(seen(&again), [(2, "b".into(), 2)]);
        assert!(now_ms() >= first_deadline, "not before its deadline");
        assert_eq!(receiver.ack(QUEUE, &[2]).await.expect("ack"), 4);
        assert_eq!(receiver.ack(QUEUE, &[2, 1]).await.expect("idempotent"), 4);
        assert_eq!(cursor(&store, GROUP).await, 4);
        // A nack with a delay: not back before the delay, then counted again.
        produce(&store, &["d"]).await;
        let fresh = receive_some(&receiver, Duration::from_secs(10)).await;
        assert_eq!(seen(&fresh), [(4, "d".into(), 1)]);
        let nacked_at = Instant::now();
        receiver
            .nack(QUEUE, &[4], Duration::from_millis(800))
            .await
            .expect("nack");
        let back = receive_some(&receiver, Duration::from_secs(10)).await;
        assert!(
            nacked_at.elapsed() >= Duration::from_millis(800),
            "{:?}",
            nacked_at.elapsed()
        );
        assert_eq!(seen(&back), [(4, "d".into(), 2)]);
        assert_eq!(receiver.ack(QUEUE, &[4]).await.expect("ack"), 5);
        store.stop().await;
    });
}

#[test]
fn the_delivery_count_survives_a_master_change() {
    run(async {
        let mut store = Store::start(3, true).await;
        produce(&store, &["x", "y"]).await;
        let receiver = receiver(&store, GROUP, Duration::from_millis(1500));
        let first = receive_some(&receiver, Duration::from_secs(10)).await;
        assert_eq!(seen(&first), [(1, "x".into(), 1), (2, "y".into(), 1)]);
        receiver.ack(QUEUE, &[2]).await.expect("ack");
        // The master of the queue's group stops; another node takes over.
        let group = QUEUE % GROUPS;
        let master = store.wait_masters(true).await[group as usize];
        store.stop_node(master as usize).await;
        let until = Instant::now() + common::SETTLE_TIMEOUT;
        while store.wait_masters(false).await[group as usize] == master {
            assert!(Instant::now() < until, "no new master");
            tokio::time::sleep(common::POLL).await;
        }
        // The new master knows offset 1 was delivered once and 2 acked.
        let again = receive_some(&receiver, Duration::from_secs(20)).await;
        assert_eq!(seen(&again), [(1, "x".into(), 2)]);
        assert!(now_ms() >= first[0].deadline_ms, "not before its deadline");
        assert_eq!(receiver.ack(QUEUE, &[1]).await.expect("ack"), 3);
        store.stop().await;
    });
}

#[test]
fn bad_receives_acks_and_nacks_are_refused_and_change_nothing() {
    run(async {
        let store = Store::start(3, true).await;
        produce(&store, &["p", "q"]).await;
        let good = receiver(&store, GROUP, Duration::from_secs(30));
        let invalid = Some(ErrorCode::InvalidArgument);
        let wait = Duration::ZERO;
        // Nothing delivered yet: an ack or nack of anything is refused.
        assert_eq!(
            code(good.ack(QUEUE, &[1]).await),
            invalid,
            "ack of undelivered"
        );
        assert_eq!(
            code(good.ack(QUEUE, &[99]).await),
            invalid,
            "ack past the end"
        );
        assert_eq!(
            code(good.nack(QUEUE, &[1], wait).await),
            invalid,
            "nack of undelivered"
        );
        assert_eq!(code(good.ack(QUEUE, &[]).await), invalid, "no offsets");
        assert_eq!(code(good.ack(QUEUE, &[0]).await), invalid, "offset 0");
        assert_eq!(code(good.receive(QUEUE, 0, wait).await), invalid, "max 0");
        assert_eq!(
            code(good.receive(QUEUE, 1001, wait).await),
            invalid,
            "max 1001"
        );
        assert_eq!(
            code(good.receive(QUEUE, 1, Duration::from_secs(61)).await),
            invalid
        );
        assert_eq!(
            code(good.receive(QUEUE, 1, Duration::MAX).await),
            invalid,
            "an absurd wait"
        );
        assert_eq!(
            code(good.receive(QUEUE + QUEUES, 1, wait).await),
            Some(ErrorCode::UnknownQueue)
        );
        for absurd in [Duration::ZERO, Duration::from_secs(86_401), Duration::MAX] {
            let bad = receiver(&store, GROUP, absurd);
            assert_eq!(
                code(bad.receive(QUEUE, 1, wait).await),
                invalid,
                "{absurd:?}"
            );
        }
        let stranger = receiver(&store, "strangers", Duration::from_secs(30));
        assert_eq!(
            code(stranger.receive(QUEUE, 1, wait).await),
            Some(ErrorCode::UnknownConsumerGroup)
        );
        assert_eq!(
            code(stranger.ack(QUEUE, &[1]).await),
            Some(ErrorCode::UnknownConsumerGroup)
        );
        let mut elsewhere = Receiver::new(config(&store), "nope", GROUP).expect("config");
        elsewhere.set_ack_timeout(Duration::from_secs(1));
        assert_eq!(
            code(elsewhere.receive(QUEUE, 1, wait).await),
            Some(ErrorCode::UnknownTopic)
        );
        // Nothing moved: the first delivery is of offset 1, counted once.
        assert_eq!(cursor(&store, GROUP).await, 1);
        let first = good
            .receive(QUEUE, 1, Duration::from_secs(5))
            .await
            .expect("receive");
        assert_eq!(seen(&first), [(1, "p".into(), 1)]);
        // Acked already is fine; 2 was never delivered; a week and a day of delay is absurd.
        assert_eq!(good.ack(QUEUE, &[1]).await.expect("ack"), 2);
        assert_eq!(good.ack(QUEUE, &[1]).await.expect("again"), 2);
        assert_eq!(
            code(good.ack(QUEUE, &[1, 2]).await),
            invalid,
            "2 undelivered"
        );
        assert_eq!(
            code(good.nack(QUEUE, &[1], wait).await),
            invalid,
            "nack of acked"
        );
        let second = good
            .receive(QUEUE, 1, Duration::from_secs(5))
            .await
            .expect("receive");
        assert_eq!(seen(&second), [(2, "q".into(), 1)]);
        let week_and_a_day = Duration::from_secs(8 * 24 * 3600);
        assert_eq!(code(good.nack(QUEUE, &[2], week_and_a_day).await), invalid);
        assert_eq!(cursor(&store, GROUP).await, 2, "2 still in flight");
        // A node that is not the queue's master answers NOT_MASTER with the master's address.
        let master = store.wait_masters(true).await[(QUEUE % GROUPS) as usize];
        let other = store.client_addrs[(master as usize) % 3].clone();
        let mut client = api::phxq_client::PhxqClient::connect(format!("http://{other}"))
            .await
            .expect("connect");
        let request = api::AckRequest {
            topic: TOPIC.to_string(),
            queue: QUEUE,
            consumer_group: GROUP.to_string(),
            offsets: vec![2],
            store_id: 0,
        };
        let answer = client.ack(request).await.expect("call").into_inner();
        let failure = api::check(answer.error.as_ref()).expect_err("refused");
        assert_eq!(failure.code, Some(ErrorCode::NotMaster));
        assert_eq!(
            failure.master_addr.as_deref(),
            Some(store.client_addrs[master as usize - 1].as_str())
        );
        assert_eq!(
            cursor(&store, GROUP).await,
            2,
            "nothing acked by the refusal"
        );
        store.stop().await;
    });
}
