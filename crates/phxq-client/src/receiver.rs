//! Per-message acknowledgement from the store: [`Receiver`].
//!
//! A thin client of the `Receive`, `Ack` and `Nack` calls (see `phxq.proto`): the store
//! remembers, replicated, which messages of a queue were delivered to the consumer group and
//! not yet acked, with each one's delivery count and deadline. A message not acked before its
//! ack timeout, or nacked (after the nack's delay), is delivered again with its count + 1, to
//! whichever receiver of the group asks next; the count survives master changes and restarts
//! because it is stored, unlike the [`Consumer`](crate::Consumer)'s, which is cursor-based
//! and counts in memory. Acks move the group's cursor over the acked prefix, so both kinds of
//! consumer of a group share one cursor.
//!
//! Calls are routed like the producer's: to the master of the queue's replication group,
//! following `NOT_MASTER`, retrying elections and lost connections until the config's
//! deadline; refusals (`UNKNOWN_TOPIC`, `UNKNOWN_CONSUMER_GROUP`, `INVALID_ARGUMENT` for an
//! ack of an offset never delivered, a zero ack timeout...) come back at once with their
//! [`ErrorCode`](crate::ErrorCode). A `Receive` retried after an uncertain outcome may have
//! delivered messages that are then delivered again after their ack timeout (at least once).

use std::time::Duration;

use phxq_proto::api;
use phxq_types::{GroupId, Offset, QueueId, group_of_queue};

use crate::config::{ConfigError, ProducerConfig};
use crate::error::{ErrorKind, ProduceError};
use crate::router::{Attempt, Halt, Router};

/// The ack timeout a [`Receiver`] asks for unless told otherwise.
pub const RECEIVE_ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Bytes of keys and values one receive asks for at most (the store's limit, 64 MiB; at
/// least one message is delivered whatever its size).
const RECEIVE_BYTES_MAX: u32 = 64 << 20;

/// One message delivered by [`Receiver::receive`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The queue.
    pub queue: QueueId,
    /// Its offset in the queue: what [`Receiver::ack`] and [`Receiver::nack`] name.
    pub offset: Offset,
    /// When the master accepted it, ms since the Unix epoch.
    pub time_ms: u64,
    /// The key given at produce.
    pub key: Vec<u8>,
    /// The value given at produce.
    pub value: Vec<u8>,
    /// How many times it has been delivered to the group, this time included (1 the first
    /// time).
    pub delivery_count: u32,
    /// When the store delivers it again unless acked, ms since the Unix epoch (the master's
    /// clock).
    pub deadline_ms: u64,
}

/// Receives, acks and nacks messages of one topic for one consumer group (see the module
/// documentation).
pub struct Receiver {
    router: Router,
    topic: String,
    consumer_group: String,
    ack_timeout: Duration,
}

impl Receiver {
    /// A receiver through the store `config` reaches (its deadline bounds each call with its
    /// retries; queue-change retry does not apply). Connects to nothing yet.
    pub fn new(
        config: ProducerConfig,
        topic: impl Into<String>,
        consumer_group: impl Into<String>,
    ) -> Result<Receiver, ConfigError> {
        config.validate()?;
        let mut config = config;
        config.queue_change_retry = false;
        Ok(Receiver {
            router: Router::new(config),
            topic: topic.into(),
            consumer_group: consumer_group.into(),
            ack_timeout: RECEIVE_ACK_TIMEOUT_DEFAULT,
        })
    }

    /// Sets the ack timeout later receives ask for (the store takes 1 ms to a day and refuses
    /// others with `INVALID_ARGUMENT`).
    pub fn set_ack_timeout(&mut self, ack_timeout: Duration) {
        self.ack_timeout = ack_timeout;
    }

    /// Up to `max` messages of `queue` (1 to 1,000), waiting up to `wait` (at most 60 s) for
    /// one: the ones due again first, then fresh ones, in offset order; empty if the wait
    /// ended with nothing to deliver. Answered once the delivery is replicated.
    pub async fn receive(
        &self,
        queue: QueueId,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Received>, ProduceError> {
        let request = api::ReceiveRequest {
            topic: self.topic.clone(),
            queue,
            consumer_group: self.consumer_group.clone(),
            max_messages: max,
            max_bytes: RECEIVE_BYTES_MAX,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            ack_timeout_ms: u64::try_from(self.ack_timeout.as_millis()).unwrap_or(u64::MAX),
            store_id: self.router.config().store_id,
        };
        let response = self
            .call(queue, wait, move |mut client| {
                let request = request.clone();
                async move {
                    let response = client.receive(request).await?.into_inner();
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await?;
        response
            .messages
            .into_iter()
            .map(|received| {
                let message = received.message.ok_or_else(|| {
                    ProduceError::new(ErrorKind::Protocol, None, "a received message is missing")
                })?;
                Ok(Received {
                    queue,
                    offset: message.offset,
                    time_ms: message.time_ms,
                    key: message.key,
                    value: message.value,
                    delivery_count: received.delivery_count,
                    deadline_ms: received.deadline_ms,
                })
            })
            .collect()
    }

    /// Acks `offsets` of `queue` (1 to 1,000, any order): an offset acked already is fine; one
    /// never delivered to the group refuses the whole call (`INVALID_ARGUMENT`). Returns the
    /// group's cursor on the queue after the ack.
    pub async fn ack(&self, queue: QueueId, offsets: &[Offset]) -> Result<Offset, ProduceError> {
        let request = api::AckRequest {
            topic: self.topic.clone(),
            queue,
            consumer_group: self.consumer_group.clone(),
            offsets: offsets.to_vec(),
            store_id: self.router.config().store_id,
        };
        self.call(queue, Duration::ZERO, move |mut client| {
            let request = request.clone();
            async move {
                let response = client.ack(request).await?.into_inner();
                Ok((response.cursor, response.error))
            }
        })
        .await
    }

    /// Gives `offsets` of `queue` back (each must be in flight: delivered, not acked), to be
    /// delivered again after `delay` (at most a week).
    pub async fn nack(
        &self,
        queue: QueueId,
        offsets: &[Offset],
        delay: Duration,
    ) -> Result<(), ProduceError> {
        let request = api::NackRequest {
            topic: self.topic.clone(),
            queue,
            consumer_group: self.consumer_group.clone(),
            offsets: offsets.to_vec(),
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            store_id: self.router.config().store_id,
        };
        self.call(queue, Duration::ZERO, move |mut client| {
            let request = request.clone();
            async move {
                let response = client.nack(request).await?.into_inner();
                Ok(((), response.error))
            }
        })
        .await
    }

    /// One routed call about `queue` with its retries; each attempt may be held `wait`.
    async fn call<T, F, Fut>(
        &self,
        queue: QueueId,
        wait: Duration,
        attempt: F,
    ) -> Result<T, ProduceError>
    where
        F: FnMut(api::Client) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let mut progress = self.router.start_request();
        progress.allow_server_wait(wait);
        let (layout, _) = self.router.topic_queues(&self.topic, &mut progress).await?;
        let group: GroupId = group_of_queue(queue, layout.groups);
        self.router
            .call(Some(group), &mut progress, attempt)
            .await
            .map_err(|halt| match halt {
                Halt::Error(error) => error,
                Halt::MasterMissing => unreachable!("queue-change retry is off for receivers"),
            })
    }
}
