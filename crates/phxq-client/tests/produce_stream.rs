//! `ProduceStream` against a real 3-node store: many Produces pipelined on one stream are
//! appended in stream order, every request gets exactly one answer with its id (also after
//! the client closes its side), a queue another node masters is answered `NOT_MASTER` with
//! the master's address, and bad requests are refused one by one with their codes while the
//! rest of the stream goes on, storing nothing for them.

use std::collections::BTreeMap;

use phxq_client::ErrorCode;
use phxq_proto::api::{self, phxq_client::PhxqClient};

mod common;

use common::{MESSAGE_BYTES_MAX, Store, TOPIC, run};

/// Requests pipelined for the queue the stream's node masters: more than the server keeps
/// in flight per stream (256), so its flow control is crossed too.
const PIPELINED: u64 = 300;

fn produce(queue: u32, value: String) -> api::ProduceRequest {
    api::ProduceRequest {
        topic: TOPIC.to_string(),
        queue,
        messages: vec![api::Message {
            key: Vec::new(),
            value: value.into_bytes(),
        }],
        store_id: 0,
        message_id: Vec::new(),
    }
}

/// The code of an answer (`None`: success).
fn code(response: &api::ProduceResponse) -> Option<ErrorCode> {
    api::check(response.error.as_ref())
        .err()
        .map(|failure| failure.code.expect("a known code"))
}

#[test]
fn a_stream_appends_in_order_answers_every_request_once_and_refuses_bad_ones_alone() {
    run(async {
        // Placed: group g is mastered by node g mod 3 + 1, so node 1 masters queues 0 and 3
        // (groups 0 and 3 of 4) and node 2 queue 1.
        let store = Store::start(3, true).await;
        let node1 = &store.client_addrs[0];
        let mut client = PhxqClient::connect(format!("http://{node1}"))
            .await
            .expect("connect");

        let mut requests = Vec::new();
        let mut expected: BTreeMap<u64, Option<ErrorCode>> = BTreeMap::new();
        let mut push = |request: Option<api::ProduceRequest>, outcome: Option<ErrorCode>| {
            let id = requests.len() as u64 + 1;
            requests.push(api::ProduceStreamRequest { id, request });
            expected.insert(id, outcome);
            id
        };
        let mut in_order = Vec::new();
        for i in 0..PIPELINED {
            in_order.push(push(Some(produce(0, format!("q0-{i}"))), None));
            if i % 50 == 0 {
                // Interleaved: another queue of this node, a queue of node 2, bad requests.
                push(Some(produce(3, format!("q3-{i}"))), None);
                push(
                    Some(produce(1, format!("q1-{i}"))),
                    Some(ErrorCode::NotMaster),
                );
                push(None, Some(ErrorCode::InvalidArgument));
                let mut bad = produce(0, "bad".to_string());
                bad.topic = "no such topic".to_string();
                push(Some(bad), Some(ErrorCode::InvalidName));
                let mut bad = produce(0, "bad".to_string());
                bad.topic = "missing".to_string();
                push(Some(bad), Some(ErrorCode::UnknownTopic));
                let mut bad = produce(0, "bad".to_string());
                bad.store_id = 99;
                push(Some(bad), Some(ErrorCode::WrongStore));
                let bad = produce(0, "x".repeat(MESSAGE_BYTES_MAX + 1));
                push(Some(bad), Some(ErrorCode::MessageTooLarge));
            }
        }

        // Every request sent at once; the request side closes after the last one.
        let mut answers = client
            .produce_stream(tokio_stream::iter(requests))
            .await
            .expect("stream opened")
            .into_inner();
        let mut answered: BTreeMap<u64, api::ProduceResponse> = BTreeMap::new();
        let within = std::time::Duration::from_secs(60);
        while let Some(answer) = tokio::time::timeout(within, answers.message())
            .await
            .expect("answers keep coming")
            .expect("no transport error")
        {
            let response = answer.response.expect("every answer has a response");
            let again = answered.insert(answer.id, response);
            assert!(again.is_none(), "request {} answered twice", answer.id);
        }
        // The stream ended only after every request was answered.
        assert_eq!(
            answered.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "one answer per request, none missing"
        );
        for (id, outcome) in &expected {
            let response = &answered[id];
            assert_eq!(code(response), *outcome, "request {id}: {response:?}");
            if *outcome == Some(ErrorCode::NotMaster) {
                let master = api::check(response.error.as_ref()).unwrap_err().master_addr;
                assert_eq!(master.as_deref(), Some(store.client_addrs[1].as_str()));
            }
        }
        // Stream order is append order: the pipelined requests of queue 0 got offsets 1..,
        // in the order they were sent.
        let offsets: Vec<u64> = in_order
            .iter()
            .map(|id| answered[id].first_offset)
            .collect();
        assert_eq!(offsets, (1..=PIPELINED).collect::<Vec<_>>());

        // And the queue holds exactly them, in order: nothing of the refused requests.
        let values: Vec<String> = store
            .read_queue(0)
            .await
            .iter()
            .map(|m| String::from_utf8(m.value.clone()).expect("utf-8"))
            .collect();
        let sent: Vec<String> = (0..PIPELINED).map(|i| format!("q0-{i}")).collect();
        assert_eq!(values, sent);
        store.stop().await;
    });
}

#[test]
fn a_graceful_stop_ends_an_idle_stream_instead_of_waiting_for_its_client() {
    run(async {
        let mut store = Store::start(1, true).await;
        let node = &store.client_addrs[0];
        let mut client = PhxqClient::connect(format!("http://{node}"))
            .await
            .expect("connect");
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        let mut answers = client
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .expect("stream opened")
            .into_inner();
        let request = api::ProduceStreamRequest {
            id: 7,
            request: Some(produce(0, "before the stop".to_string())),
        };
        requests.send(request).await.expect("sent");
        let answer = answers
            .message()
            .await
            .expect("answered")
            .expect("an answer");
        assert_eq!(answer.id, 7);
        assert_eq!(code(&answer.response.expect("response")), None);

        // The client keeps its side open and idle; the node must still stop promptly (the
        // drain limit is 5 s) and end the stream.
        let started = std::time::Instant::now();
        store.stop_node(1).await;
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(3),
            "stop took {took:?}"
        );
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), answers.message())
            .await
            .expect("the stream ends");
        assert!(
            !matches!(end, Ok(Some(_))),
            "no answer after the stop: {end:?}"
        );
        drop(requests);
    });
}
