//! Client auth against a real node (gRPC over loopback): every RPC without a token, with a
//! malformed, forged, tampered or expired one, and with a role that does not cover it, is
//! refused with the right code and changes nothing; the right roles work; `ClusterStatus`
//! hides peer addresses from non-admins.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use phxq_node::auth::{Claims, SECRET_BYTES, Secret, issue};
use phxq_node::config::{AuthConfig, ServerConfig};
use phxq_node::server::RunningServer;
use phxq_proto::api;
use phxq_types::ErrorCode;

const TOPIC: &str = "t";
const GROUP: &str = "g";
/// How long the single node may take to master its groups.
const READY_TIMEOUT_MS: u64 = 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Store {
    server: RunningServer,
    secret: Secret,
    _dir: tempfile::TempDir,
}

impl Store {
    /// One node with auth on, every group mastered.
    async fn start() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("store.secret");
        let secret = Secret::create(&secret_file).unwrap();
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
            queues = 2
            consumer_groups = ["g", "other"]
            [auth]
            secret_file = "set below"
            [tls]
            insecure_peer_plaintext = true
            "#,
        )
        .unwrap();
        config.data_dir = dir.path().join("node");
        config.client_listen = "127.0.0.1:0".parse().unwrap();
        config.peer_listen = "127.0.0.1:0".parse().unwrap();
        config.auth = Some(AuthConfig { secret_file });
        let server = RunningServer::start(config).await.unwrap();
        let store = Store {
            server,
            secret,
            _dir: dir,
        };
        store.wait_for_masters().await;
        store
    }

    fn token(&self, roles: &[&str]) -> String {
        token_of(&self.secret, roles, now_ms() + 600_000)
    }

    async fn client(&self, token: Option<&str>) -> api::Client {
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            self.server.client_addr()
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        api::client(channel, api::BearerToken::new(token).unwrap())
    }

    async fn admin(&self) -> api::Client {
        self.client(Some(&self.token(&["admin"]))).await
    }

    async fn wait_for_masters(&self) {
        let mut admin = self.admin().await;
        let deadline = now_ms() + READY_TIMEOUT_MS;
        loop {
            let status = admin
                .cluster_status(api::ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if status.groups.iter().all(|g| g.lease_remaining_ms > 0) {
                return;
            }
            assert!(now_ms() < deadline, "no masters: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What a refused call must not have changed: the topic table of every group, each
    /// queue's messages, and each group's cursor on each queue.
    async fn state(&self) -> String {
        let mut admin = self.admin().await;
        let status = admin
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut state = String::new();
        for group in &status.groups {
            let names: Vec<&str> = group.topics.iter().map(|t| t.name.as_str()).collect();
            state += &format!("group {}: topics {names:?}\n", group.group);
        }
        for queue in 0..2 {
            for consumer_group in [GROUP, "other"] {
                let read = admin
                    .consume(consume(queue, consumer_group))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(read.error, None);
                let first = read.messages.first().map(|m| m.offset);
                state += &format!(
                    "queue {queue} {consumer_group}: from {first:?} next {} end {}\n",
                    read.next_offset, read.end_offset
                );
            }
        }
        state
    }
}

fn token_of(secret: &Secret, roles: &[&str], expires_ms: u64) -> String {
    let claims = Claims {
        subject: "tester".to_string(),
        roles: roles.iter().map(|r| r.parse().unwrap()).collect(),
        expires_ms,
    };
    issue(secret, &claims).unwrap()
}

fn consume(queue: u32, group: &str) -> api::ConsumeRequest {
    api::ConsumeRequest {
        topic: TOPIC.to_string(),
        queue,
        consumer_group: group.to_string(),
        from_offset: None,
        max_messages: 100,
        max_bytes: 1 << 20,
        ..Default::default()
    }
}

fn message(value: &str) -> api::Message {
    api::Message {
        key: Vec::new(),
        value: value.as_bytes().to_vec(),
    }
}

/// A call's outcome as one number: 0 success, a phxq code from the body or the status, or
/// 1000 + the gRPC code of any other status.
fn outcome<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
    error: impl Fn(&T) -> Option<&api::Error>,
) -> u32 {
    match answer {
        Ok(response) => error(response.get_ref()).map_or(0, |e| e.code),
        Err(status) => api::status_failure(&status)
            .map_or(1000 + status.code() as u32, |failure| failure.number),
    }
}

/// Calls every RPC of the service once, each with a request that would change the store
/// if it were allowed (or read from it); their outcomes by name.
async fn every_rpc(client: &mut api::Client, topic: &str) -> Vec<(&'static str, u32)> {
    let t = topic.to_string();
    let g = GROUP.to_string();
    let mut outcomes = Vec::new();
    let produce = api::ProduceRequest {
        topic: t.clone(),
        queue: 0,
        messages: vec![message("x")],
        ..Default::default()
    };
    let answer = client.produce(produce.clone()).await;
    outcomes.push(("Produce", outcome(answer, |r| r.error.as_ref())));
    let many = api::ProduceManyRequest {
        appends: vec![api::Append {
            topic: t.clone(),
            queue: 0,
            messages: vec![message("y")],
            message_id: Vec::new(),
        }],
        store_id: 0,
    };
    let answer = client.produce_many(many).await;
    outcomes.push(("ProduceMany", outcome(answer, |r| r.error.as_ref())));
    outcomes.push(("ProduceStream", produce_stream(client, produce).await));
    let mut request = consume(0, GROUP);
    request.topic.clone_from(&t);
    let answer = client.consume(request).await;
    outcomes.push(("Consume", outcome(answer, |r| r.error.as_ref())));
    for (name, seek) in [("Commit", false), ("Commit(seek)", true)] {
        let commit = api::CommitRequest {
            topic: t.clone(),
            queue: 0,
            consumer_group: g.clone(),
            offset: 2,
            store_id: 0,
            seek,
        };
        let answer = client.commit(commit).await;
        outcomes.push((name, outcome(answer, |r| r.error.as_ref())));
    }
    let receive = api::ReceiveRequest {
        topic: t.clone(),
        queue: 1,
        consumer_group: g.clone(),
        max_messages: 10,
        max_bytes: 1 << 20,
        ack_timeout_ms: 30_000,
        ..Default::default()
    };
    let answer = client.receive(receive).await;
    outcomes.push(("Receive", outcome(answer, |r| r.error.as_ref())));
    let ack = api::AckRequest {
        topic: t.clone(),
        queue: 1,
        consumer_group: g.clone(),
        offsets: vec![1],
        store_id: 0,
    };
    let answer = client.ack(ack).await;
    outcomes.push(("Ack", outcome(answer, |r| r.error.as_ref())));
    let nack = api::NackRequest {
        topic: t.clone(),
        queue: 1,
        consumer_group: g.clone(),
        offsets: vec![1],
        delay_ms: 0,
        store_id: 0,
    };
    let answer = client.nack(nack).await;
    outcomes.push(("Nack", outcome(answer, |r| r.error.as_ref())));
    let at = api::OffsetForTimeRequest {
        topic: t.clone(),
        queue: 0,
        time_ms: 0,
        store_id: 0,
    };
    let answer = client.offset_for_time(at).await;
    outcomes.push(("OffsetForTime", outcome(answer, |r| r.error.as_ref())));
    let answer = client.cluster_status(api::ClusterStatusRequest {}).await;
    outcomes.push(("ClusterStatus", outcome(answer, |r| r.error.as_ref())));
    let put = api::PutTopicRequest {
        group: 0,
        topic: Some(api::TopicConfig {
            name: "new".to_string(),
            queues: 1,
            ..Default::default()
        }),
        mode: api::PutMode::Create as i32,
        store_id: 0,
    };
    let answer = client.put_topic(put).await;
    outcomes.push(("PutTopic", outcome(answer, |r| r.error.as_ref())));
    let delete = api::DeleteTopicRequest {
        group: 1,
        name: t.clone(),
        store_id: 0,
    };
    let answer = client.delete_topic(delete).await;
    outcomes.push(("DeleteTopic", outcome(answer, |r| r.error.as_ref())));
    let heartbeat = api::HeartbeatRequest {
        topic: t.clone(),
        consumer_group: g.clone(),
        member_id: "m1".to_string(),
        session_timeout_ms: 10_000,
        sequence: 1,
        ..Default::default()
    };
    let answer = client.heartbeat(heartbeat).await;
    outcomes.push(("Heartbeat", outcome(answer, |r| r.error.as_ref())));
    outcomes
}

/// One produce over a `ProduceStream`: the call's status, or the one answer's code.
async fn produce_stream(client: &mut api::Client, request: api::ProduceRequest) -> u32 {
    let requests = tokio_stream::iter([api::ProduceStreamRequest {
        id: 7,
        request: Some(request),
    }]);
    let mut answers = match client.produce_stream(requests).await {
        Ok(answers) => answers.into_inner(),
        Err(status) => return outcome::<()>(Err(status), |_| None),
    };
    match answers.message().await {
        Ok(Some(answer)) => {
            assert_eq!(answer.id, 7);
            let response = answer.response.expect("a response");
            response.error.map_or(0, |e| e.code)
        }
        Ok(None) => panic!("a stream without its answer"),
        Err(status) => outcome::<()>(Err(status), |_| None),
    }
}

fn refused_all(outcomes: &[(&'static str, u32)], code: ErrorCode, what: &str) {
    for (name, got) in outcomes {
        assert_eq!(*got, code.number(), "{name} {what}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_unauthenticated_and_change_nothing() {
    let store = Store::start().await;
    let before = store.state().await;
    let admin = store.token(&["admin"]);
    let (signed, mac) = admin.rsplit_once('.').unwrap();
    let other_store = Secret::from_bytes([7; SECRET_BYTES]);
    // The claims of a produce token, signed again by nobody: the admin token's MAC on them.
    let producer = store.token(&["produce:t"]);
    let tampered = format!("{}.{mac}", producer.rsplit_once('.').unwrap().0);
    let bad_tokens = [
        ("no token", None),
        ("malformed", Some("not-a-token".to_string())),
        ("cut short", Some(signed.to_string())),
        (
            "forged",
            Some(token_of(&other_store, &["admin"], now_ms() + 600_000)),
        ),
        ("tampered claims", Some(tampered)),
        (
            "expired",
            Some(token_of(&store.secret, &["admin"], now_ms() - 1)),
        ),
    ];
    for (what, token) in &bad_tokens {
        let mut client = store.client(token.as_deref()).await;
        let outcomes = every_rpc(&mut client, TOPIC).await;
        assert_eq!(outcomes.len(), 14);
        refused_all(&outcomes, ErrorCode::Unauthenticated, what);
    }
    assert_eq!(
        store.state().await,
        before,
        "a refused call changed the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_roles_are_permission_denied_and_change_nothing() {
    let store = Store::start().await;
    let before = store.state().await;
    let expect = |outcomes: &[(&'static str, u32)], allowed: &[&str], who: &str| {
        for (name, got) in outcomes {
            if allowed.contains(name) {
                continue;
            }
            assert_eq!(
                *got,
                ErrorCode::PermissionDenied.number(),
                "{name} as {who}: {outcomes:?}"
            );
        }
    };
    // A producer of another topic, a consumer of another group, a consumer of another
    // topic: everything but ClusterStatus refused.
    for roles in [["produce:other"], ["consume:t/other"], ["consume:t2/g"]] {
        let mut client = store.client(Some(&store.token(&roles))).await;
        let outcomes = every_rpc(&mut client, TOPIC).await;
        let allowed: &[&str] = if roles[0] == "consume:t/other" {
            // OffsetForTime names no group: a consumer of the topic may ask it.
            &["ClusterStatus", "OffsetForTime"]
        } else {
            &["ClusterStatus"]
        };
        expect(&outcomes, allowed, roles[0]);
    }
    assert_eq!(
        store.state().await,
        before,
        "a refused call changed the store"
    );
    // Producers may not read; consumers may not produce, seek, or change topics. Their own
    // calls are not refused for want of a role (they may fail on their own merits).
    let mut producer = store.client(Some(&store.token(&["produce:t"]))).await;
    let outcomes = every_rpc(&mut producer, TOPIC).await;
    expect(
        &outcomes,
        &["Produce", "ProduceMany", "ProduceStream", "ClusterStatus"],
        "producer",
    );
    let mut consumer = store.client(Some(&store.token(&["consume:t/g"]))).await;
    let outcomes = every_rpc(&mut consumer, TOPIC).await;
    expect(
        &outcomes,
        &[
            "Consume",
            "Commit",
            "Receive",
            "Ack",
            "Nack",
            "OffsetForTime",
            "ClusterStatus",
            "Heartbeat",
        ],
        "consumer",
    );
    for (name, got) in &outcomes {
        if ["PutTopic", "DeleteTopic", "Commit(seek)"].contains(name) {
            assert_eq!(*got, ErrorCode::PermissionDenied.number(), "{name}");
        }
    }
    let state = store.state().await;
    assert!(state.contains("group 1: topics [\"t\"]"), "{state}");
    assert!(!state.contains("\"new\""), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_roles_work() {
    let store = Store::start().await;
    let mut producer = store.client(Some(&store.token(&["produce:t"]))).await;
    let answer = producer
        .produce(api::ProduceRequest {
            topic: TOPIC.to_string(),
            queue: 0,
            messages: vec![message("a"), message("b"), message("c")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (answer.error, answer.first_offset, answer.count),
        (None, 1, 3)
    );
    let mut consumer = store.client(Some(&store.token(&["consume:t/g*"]))).await;
    let read = consumer
        .consume(consume(0, GROUP))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((read.error, read.messages.len()), (None, 3));
    let commit = |offset, seek| api::CommitRequest {
        topic: TOPIC.to_string(),
        queue: 0,
        consumer_group: GROUP.to_string(),
        offset,
        store_id: 0,
        seek,
    };
    let committed = consumer
        .commit(commit(3, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.error, None);
    // Seeking back is the admin's.
    let mut admin = store.admin().await;
    let sought = admin.commit(commit(1, true)).await.unwrap().into_inner();
    assert_eq!(sought.error, None);
    let read = consumer
        .consume(consume(0, GROUP))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.messages.first().map(|m| m.offset), Some(1));
    let put = admin
        .put_topic(api::PutTopicRequest {
            group: 0,
            topic: Some(api::TopicConfig {
                name: "new".to_string(),
                queues: 1,
                ..Default::default()
            }),
            mode: api::PutMode::Create as i32,
            store_id: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_hides_peer_addresses_and_counters_from_non_admins() {
    let store = Store::start().await;
    let mut admin = store.admin().await;
    let seen = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.nodes[0].peer_addr, "127.0.0.1:2");
    assert!(seen.counters.is_some());
    for roles in [["produce:t"], ["consume:t/g"]] {
        let mut client = store.client(Some(&store.token(&roles))).await;
        let seen = client
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(seen.nodes[0].peer_addr, "", "{roles:?}");
        assert_eq!(seen.nodes[0].client_addr, "127.0.0.1:1", "routing needs it");
        assert!(seen.counters.is_none(), "{roles:?}");
        assert_eq!(
            seen.topics.len(),
            1,
            "consumers read their settings from it"
        );
    }
}
