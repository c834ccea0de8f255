//! The `Receive`, `Ack` and `Nack` calls: per-message acknowledgement over gRPC.
//!
//! The wire checks here (names, limits); the node checks the rest against the group's state
//! on its master (`phxq_core::machine::delivery`) and answers after commit.

use phxq_proto::api;
use phxq_types::{ACK_TIMEOUT_MS_MAX, DELIVERY_OFFSETS_MAX, ErrorCode, NACK_DELAY_MS_MAX};

use super::{CONSUME_BYTES_MAX, CONSUME_WAIT_MS_MAX, Service, check_limits, check_name, refuse};
use crate::{Request, Response};

impl Service {
    /// Answers a `Receive`: one long-poll delivery, answered once committed.
    pub(super) async fn receive_of(&self, request: api::ReceiveRequest) -> api::ReceiveResponse {
        let refused = |error| api::ReceiveResponse {
            error: Some(error),
            messages: Vec::new(),
        };
        if let Err(error) = self
            .check_store(request.store_id)
            .and_then(|()| check_receive(&request))
        {
            return refused(error);
        }
        let wait_ms = request.wait_ms;
        let call = Request::Receive {
            topic: request.topic,
            queue: request.queue,
            consumer_group: request.consumer_group,
            count_max: u64::from(request.max_messages),
            bytes_max: u64::from(request.max_bytes),
            wait_ticks: self.wait_ticks(wait_ms),
            ack_timeout_ms: request.ack_timeout_ms,
        };
        match self.call(call, u64::from(wait_ms)).await {
            Response::Received { messages } => api::ReceiveResponse {
                error: None,
                messages: messages
                    .into_iter()
                    .map(|received| api::ReceivedMessage {
                        message: Some(api::StoredMessage {
                            offset: received.message.offset,
                            time_ms: received.message.time_ms,
                            key: received.message.key,
                            value: received.message.value,
                        }),
                        delivery_count: received.delivery_count,
                        deadline_ms: received.deadline_ms,
                    })
                    .collect(),
            },
            other => refused(self.failure(other)),
        }
    }

    /// Answers an `Ack` once committed.
    pub(super) async fn ack_of(&self, request: api::AckRequest) -> api::AckResponse {
        let checked = (self.check_store(request.store_id)).and_then(|()| {
            check_offsets(&request.topic, &request.consumer_group, &request.offsets)
        });
        if let Err(error) = checked {
            return api::AckResponse {
                error: Some(error),
                cursor: 0,
            };
        }
        let call = Request::Ack {
            topic: request.topic,
            queue: request.queue,
            consumer_group: request.consumer_group,
            offsets: request.offsets,
        };
        match self.call(call, 0).await {
            Response::Acked { cursor } => api::AckResponse {
                error: None,
                cursor,
            },
            other => api::AckResponse {
                error: Some(self.failure(other)),
                cursor: 0,
            },
        }
    }

    /// Answers a `Nack` once committed.
    pub(super) async fn nack_of(&self, request: api::NackRequest) -> api::NackResponse {
        let checked = (self.check_store(request.store_id))
            .and_then(|()| check_offsets(&request.topic, &request.consumer_group, &request.offsets))
            .and_then(|()| check_nack_delay(request.delay_ms));
        if let Err(error) = checked {
            return api::NackResponse { error: Some(error) };
        }
        let call = Request::Nack {
            topic: request.topic,
            queue: request.queue,
            consumer_group: request.consumer_group,
            offsets: request.offsets,
            delay_ms: request.delay_ms,
        };
        let error = match self.call(call, 0).await {
            Response::Nacked => None,
            other => Some(self.failure(other)),
        };
        api::NackResponse { error }
    }
}

fn check_receive(request: &api::ReceiveRequest) -> Result<(), api::Error> {
    check_name("topic", &request.topic)?;
    check_name("consumer group", &request.consumer_group)?;
    let messages_max = u64::try_from(DELIVERY_OFFSETS_MAX).expect("small");
    let limits = [
        (
            "max_messages",
            u64::from(request.max_messages),
            1,
            messages_max,
        ),
        (
            "max_bytes",
            u64::from(request.max_bytes),
            1,
            u64::from(CONSUME_BYTES_MAX),
        ),
        (
            "wait_ms",
            u64::from(request.wait_ms),
            0,
            u64::from(CONSUME_WAIT_MS_MAX),
        ),
        (
            "ack_timeout_ms",
            request.ack_timeout_ms,
            1,
            ACK_TIMEOUT_MS_MAX,
        ),
    ];
    check_limits(limits)
}

fn check_offsets(topic: &str, consumer_group: &str, offsets: &[u64]) -> Result<(), api::Error> {
    check_name("topic", topic)?;
    check_name("consumer group", consumer_group)?;
    if offsets.is_empty() || offsets.len() > DELIVERY_OFFSETS_MAX {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            format!(
                "{} offsets; name 1 to {DELIVERY_OFFSETS_MAX}",
                offsets.len()
            ),
        ));
    }
    if offsets.contains(&0) {
        return Err(refuse(ErrorCode::InvalidArgument, "offsets start at 1"));
    }
    Ok(())
}

fn check_nack_delay(delay_ms: u64) -> Result<(), api::Error> {
    if delay_ms > NACK_DELAY_MS_MAX {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            format!("delay_ms is {delay_ms}; at most {NACK_DELAY_MS_MAX} (a week)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(max_messages: u32, wait_ms: u32, ack_timeout_ms: u64) -> api::ReceiveRequest {
        api::ReceiveRequest {
            topic: "orders".to_string(),
            queue: 0,
            consumer_group: "g1".to_string(),
            max_messages,
            max_bytes: 1,
            wait_ms,
            ack_timeout_ms,
            store_id: 0,
        }
    }

    fn code(result: Result<(), api::Error>) -> Option<u32> {
        result.err().map(|error| error.code)
    }

    #[test]
    fn receive_limits_are_inclusive_and_refused_beyond() {
        let invalid = Some(ErrorCode::InvalidArgument.number());
        assert_eq!(code(check_receive(&receive(1, 0, 1))), None);
        let most = receive(1000, CONSUME_WAIT_MS_MAX, ACK_TIMEOUT_MS_MAX);
        assert_eq!(code(check_receive(&most)), None);
        assert_eq!(code(check_receive(&receive(0, 0, 1))), invalid);
        assert_eq!(code(check_receive(&receive(1001, 0, 1))), invalid);
        assert_eq!(
            code(check_receive(&receive(1, CONSUME_WAIT_MS_MAX + 1, 1))),
            invalid
        );
        assert_eq!(code(check_receive(&receive(1, 0, 0))), invalid);
        assert_eq!(
            code(check_receive(&receive(1, 0, ACK_TIMEOUT_MS_MAX + 1))),
            invalid
        );
        assert_eq!(code(check_receive(&receive(1, 0, u64::MAX))), invalid);
    }

    #[test]
    fn ack_and_nack_offsets_and_delays_are_checked() {
        let invalid = Some(ErrorCode::InvalidArgument.number());
        assert_eq!(code(check_offsets("t", "g", &[3, 1, 3])), None);
        assert_eq!(code(check_offsets("t", "g", &[])), invalid);
        assert_eq!(code(check_offsets("t", "g", &[1, 0])), invalid);
        assert_eq!(code(check_offsets("t", "g", &[1; 1001])), invalid);
        let invalid_name = Some(ErrorCode::InvalidName.number());
        assert_eq!(code(check_offsets("t", "a b", &[1])), invalid_name);
        assert_eq!(code(check_nack_delay(NACK_DELAY_MS_MAX)), None);
        assert_eq!(code(check_nack_delay(NACK_DELAY_MS_MAX + 1)), invalid);
    }
}
