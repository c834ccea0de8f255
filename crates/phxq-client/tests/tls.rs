//! The client port over TLS, against real stores of the harness: a store serving TLS and
//! requiring tokens is produced to and consumed from by clients holding its CA (redirects to
//! other nodes stay on TLS); a client without the CA, with another store's CA, or with a CA
//! for a plaintext port is refused at once with what to change, and stores nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    ConsumerConfig, ErrorKind, Outcome, ProduceError, Producer, ProducerConfig, StoreCa,
};
use phxq_node::auth::Role;

mod common;

use common::{CONSUMER_GROUPS, Running, SETTLE_TIMEOUT, Store, TOPIC, lock, run};

/// Messages produced over TLS.
const MESSAGES: usize = 60;
/// A refused client must be told well before its deadline (no retrying a TLS mismatch).
const REFUSED_WITHIN: Duration = Duration::from_secs(3);
/// The refused clients' deadline: far above [`REFUSED_WITHIN`].
const DEADLINE: Duration = Duration::from_secs(20);

fn role(text: &str) -> Role {
    text.parse().expect("a role")
}

/// A producer of `store`'s topic with `ca` and `token`.
fn producer(store: &Store, ca: Option<StoreCa>, token: Option<String>) -> Producer {
    let mut config = ProducerConfig::new(store.client_addrs.clone());
    config.deadline = DEADLINE;
    config.ca = ca;
    config.token = token;
    Producer::new(config).expect("valid producer config")
}

/// The error of one send, which must come within [`REFUSED_WITHIN`].
async fn refused_send(producer: &Producer) -> ProduceError {
    let started = Instant::now();
    let error = producer
        .send(TOPIC, b"refused", "must not be stored")
        .await
        .expect_err("refused");
    assert!(
        started.elapsed() < REFUSED_WITHIN,
        "refused after {:?}: {error}",
        started.elapsed()
    );
    assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
    error
}

/// Another store's CA (same store id: only the key differs).
fn foreign_ca() -> (tempfile::TempDir, StoreCa) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = phxq_node::tls::ensure_ca(dir.path(), 1).expect("a CA");
    let ca = StoreCa::load(&path).expect("loads");
    (dir, ca)
}

#[test]
fn a_tls_store_with_auth_is_served_to_clients_with_its_ca_and_refuses_the_others() {
    run(async {
        let store = Store::start_secured(3).await;
        let ca = store.access.ca.clone();
        let produce_token = store.token(&[role(&format!("produce:{TOPIC}"))]);

        // Refused first, so that the count read back shows none of them was stored.
        let without_ca = refused_send(&producer(&store, None, Some(produce_token.clone()))).await;
        assert!(without_ca.message().contains("speaks TLS"), "{without_ca}");
        assert!(without_ca.message().contains("--ca"), "{without_ca}");
        let (_dir, foreign) = foreign_ca();
        let wrong_ca = producer(&store, Some(foreign), Some(produce_token.clone()));
        let wrong = refused_send(&wrong_ca).await;
        assert!(wrong.message().contains("not accepted"), "{wrong}");

        let producer = producer(&store, ca.clone(), Some(produce_token));
        let mut sent = BTreeSet::new();
        for i in 0..MESSAGES {
            let value = format!("m{i}");
            // Keys spread over every group, so most calls are redirected to other nodes.
            let key = format!("user-{i}");
            producer
                .send(TOPIC, key.as_bytes(), value.clone())
                .await
                .unwrap_or_else(|error| panic!("message {i}: {error}"));
            sent.insert(value);
        }

        let group = CONSUMER_GROUPS[0];
        let mut config = ConsumerConfig::new(store.client_addrs.clone(), TOPIC, group);
        config.ca = ca;
        config.token = Some(store.token(&[role(&format!("consume:{TOPIC}/{group}"))]));
        let consumer = phxq_client::Consumer::new(config).expect("valid consumer config");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let running = Running::spawn(consumer, move |delivery: &phxq_client::Delivery| {
            lock(&log).push(String::from_utf8_lossy(&delivery.value).into_owned());
            async { Outcome::Handled }
        });
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while lock(&seen).len() < MESSAGES {
            assert!(Instant::now() < deadline, "consumed {:?}", lock(&seen));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let report = running.drain().await;
        let seen = lock(&seen).clone();
        assert_eq!(
            seen.len(),
            MESSAGES,
            "each once, none refused stored: {seen:?}"
        );
        assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), sent);
        assert_eq!(report.handled, MESSAGES as u64);
        store.stop().await;
    });
}

#[test]
fn a_client_with_a_ca_is_refused_by_a_plaintext_port() {
    run(async {
        let store = Store::start(1, true).await;
        let (_dir, ca) = foreign_ca();
        let error = refused_send(&producer(&store, Some(ca), None)).await;
        assert!(error.message().contains("does not speak TLS"), "{error}");
        let plain = producer(&store, None, None);
        plain
            .send(TOPIC, b"k", "plaintext still works")
            .await
            .expect("stored");
        store.stop().await;
    });
}
