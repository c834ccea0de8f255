//! The producer: routes messages to queues and delivers them to their groups' masters.
//!
//! * **Routing.** A message with a key goes to queue [`queue_of_key`]`(key, queues)`, so one
//!   key always lands in one queue and its messages keep their order there; a message
//!   without a key (an empty key: the wire does not tell them apart) goes to the next queue
//!   in turn (round-robin over the topic's queues, from a random start per producer).
//! * **One call per group.** [`Producer::send`] makes one `Produce` call. [`Producer::send_batch`]
//!   groups its messages by queue (keeping their input order within a queue), then by
//!   replication group (queue `q` is in group `q mod groups`), and makes one call per group
//!   (`ProduceMany`, or `Produce` when the group has one queue), the groups concurrently. Each
//!   call is atomic on the server: all its messages are stored, or none.
//! * **Retries** follow the master and back off until the deadline (see `router.rs`); a
//!   refusal that retrying cannot change is returned at once.
//! * **Queue-change retry** (opt-in, [`ProducerConfig::queue_change_retry`]): when a call's
//!   group has no reachable master, its messages move to the next queue (`q + 1 mod
//!   queues`), which lives in another group, and the call is retried there. Per-key order is
//!   given up for those messages.
//!
//! * **Message ids** (opt-in, [`ProducerConfig::message_ids`]): each routed append gets an
//!   id when it is routed (`token ++ sequence`, 16 bytes) and keeps it through every retry,
//!   so the server answers a retry of a stored append with its offsets instead of storing
//!   it again ([`ProducerStats::duplicates`] counts those answers).
//!
//! Delivery is **at least once** (without message ids): an attempt that ends without a known outcome
//! (`INDETERMINATE`, `TIMEOUT`, a lost connection, no answer in time) is retried and may
//! store its messages twice; such retries are counted in [`ProducerStats`] and flagged on a
//! final error ([`ProduceError::maybe_stored`]). Order per key holds between messages sent
//! one after the other, each after the previous was acknowledged; an abandoned attempt of a
//! failed send may still commit later.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use phxq_proto::api;
use phxq_types::{
    ErrorCode, GroupId, KEY_BYTES_MAX, MESSAGE_ID_BYTES_MAX, Offset, QueueId, group_of_queue,
    validate_name,
};
use tokio::task::JoinSet;

use crate::config::{ConfigError, ProducerConfig};
use crate::error::{ErrorKind, ProduceError};
use crate::key::queue_of_key;
use crate::router::{Halt, Layout, Progress, Router};

/// Most messages in one [`Producer::send_batch`]: the server's limit for one call, so that
/// every group's call fits whatever the routing.
pub const BATCH_MESSAGES_MAX: usize = 10_000;
/// Most bytes of keys and values in one [`Producer::send_batch`] (32 MiB): the server's limit
/// for one call.
pub const BATCH_BYTES_MAX: usize = 32 << 20;
/// Largest message value any store accepts (16 MiB, the ceiling of a store's
/// `message_bytes_max`); larger values are refused before sending. A store's own limit may be
/// lower (1 MiB by default): its nodes refuse with `MESSAGE_TOO_LARGE`.
pub const VALUE_BYTES_MAX: usize = 16 << 20;

/// Where an acknowledged message is stored: `(topic, queue, offset)` is its stable id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Receipt {
    /// The queue it went to.
    pub queue: QueueId,
    /// Its offset in that queue (dense, from 1).
    pub offset: Offset,
}

/// What a producer has done since it was created (all its clones together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// `Produce` and `ProduceMany` calls made, every attempt and redirect included.
    pub produce_calls: u64,
    /// `ClusterStatus` calls made (learning and refreshing the layout and masters).
    pub status_calls: u64,
    /// `NOT_MASTER` answers followed at once to the master they named.
    pub redirects: u64,
    /// Attempts made again after a backoff (retryable refusals, unreachable nodes).
    pub retries: u64,
    /// Calls moved to the next queue by queue-change retry.
    pub queue_changes: u64,
    /// Write attempts that ended without a known outcome; each retry after one may have
    /// stored messages twice.
    pub uncertain_attempts: u64,
    /// Appends the server answered as duplicates of an earlier attempt (message ids only):
    /// stored once, by that attempt.
    pub duplicates: u64,
}

/// A producer for one store: cheap to clone (clones share channels, the cached layout and
/// masters, and statistics) and safe to use from many tasks at once. Needs a tokio runtime.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

struct Shared {
    router: Router,
    /// The next queue for a message without a key (taken modulo the topic's queue count).
    next_queue: AtomicU64,
    /// This producer's half of its message ids: random, drawn once.
    id_token: u64,
    /// The sequence half of the next message id.
    next_id: AtomicU64,
    /// Appends answered as duplicates.
    duplicates: AtomicU64,
}

/// Messages routed to one queue, with their positions in the caller's input.
struct Routed {
    queue: QueueId,
    positions: Vec<usize>,
    messages: Vec<api::Message>,
    /// The append's message id (empty: none), the same on every attempt.
    message_id: Vec<u8>,
}

type Outcomes = Vec<(usize, Result<Receipt, ProduceError>)>;

impl Producer {
    /// A producer with `config` (validated here). It connects to nothing yet: the first send
    /// learns the store's layout.
    pub fn new(config: ProducerConfig) -> Result<Producer, ConfigError> {
        config.validate()?;
        let router = Router::new(config);
        let next_queue = AtomicU64::new(router.random());
        let id_token = router.random();
        Ok(Producer {
            shared: Arc::new(Shared {
                router,
                next_queue,
                id_token,
                next_id: AtomicU64::new(1),
                duplicates: AtomicU64::new(0),
            }),
        })
    }

    /// The producer's configuration.
    pub fn config(&self) -> &ProducerConfig {
        self.shared.router.config()
    }

    /// What the producer (with all its clones) has done so far.
    pub fn stats(&self) -> ProducerStats {
        let counters = &self.shared.router.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProducerStats {
            produce_calls: read(&counters.produce_calls),
            status_calls: read(&counters.status_calls),
            redirects: read(&counters.redirects),
            retries: read(&counters.retries),
            queue_changes: read(&counters.queue_changes),
            uncertain_attempts: read(&counters.uncertain_attempts),
            duplicates: read(&self.shared.duplicates),
        }
    }

    /// A new message id for one append if the config asks for ids, else none (empty).
    fn new_message_id(&self) -> Vec<u8> {
        if !self.config().message_ids {
            return Vec::new();
        }
        let sequence = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = self.shared.id_token.to_be_bytes().to_vec();
        id.extend_from_slice(&sequence.to_be_bytes());
        id
    }

    /// Sends one message to `topic` and waits until it is durable (committed on a majority
    /// of the store) or the deadline passes. `key` picks the queue ([`queue_of_key`]); an
    /// empty key means none (round-robin).
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        value: impl Into<Vec<u8>>,
    ) -> Result<Receipt, ProduceError> {
        let message_id = self.new_message_id();
        self.send_one(topic, key, value.into(), message_id).await
    }

    /// Sends one message like [`send`](Self::send), with a message id of the caller's (1 to
    /// [`MESSAGE_ID_BYTES_MAX`] bytes) instead of one of the producer's: the store appends
    /// nothing for an id already in the queue's dedup window and answers with the offset of
    /// the message first stored with it ([`ProducerStats::duplicates`] counts those). Derive
    /// the id from what makes the message unique (an order number, a source offset) to make
    /// a produce idempotent across retries, restarts and processes. An id of bad length is
    /// refused (`INVALID_ARGUMENT`) before sending.
    pub async fn send_with_id(
        &self,
        topic: &str,
        key: &[u8],
        value: impl Into<Vec<u8>>,
        message_id: impl Into<Vec<u8>>,
    ) -> Result<Receipt, ProduceError> {
        let message_id = message_id.into();
        if message_id.is_empty() || message_id.len() > MESSAGE_ID_BYTES_MAX {
            return Err(ProduceError::refused(
                ErrorCode::InvalidArgument,
                format!(
                    "a message id of {} bytes; 1 to {MESSAGE_ID_BYTES_MAX}",
                    message_id.len()
                ),
            ));
        }
        self.send_one(topic, key, value.into(), message_id).await
    }

    /// [`send`](Self::send) with `message_id` (empty: none).
    async fn send_one(
        &self,
        topic: &str,
        key: &[u8],
        value: Vec<u8>,
        message_id: Vec<u8>,
    ) -> Result<Receipt, ProduceError> {
        let message = api::Message {
            key: key.to_vec(),
            value,
        };
        check_message(&message, None)?;
        let mut progress = self.shared.router.start_request();
        let (layout, queues) = self.topic(topic, &mut progress).await?;
        let routed = Routed {
            queue: self.choose_queue(key, queues),
            positions: vec![0],
            messages: vec![message],
            message_id,
        };
        let mut outcomes = deliver(
            self.shared.clone(),
            Arc::from(topic),
            (layout.groups, queues),
            vec![routed],
            progress,
        )
        .await;
        debug_assert_eq!(outcomes.len(), 1, "one outcome per message");
        match outcomes.pop() {
            Some((_, outcome)) => outcome,
            None => unreachable!("deliver answers every message"),
        }
    }

    /// Sends `messages` (key, value) to `topic`, one call per replication group, the groups
    /// concurrently; returns one result per message, in input order.
    ///
    /// Messages of one queue are appended in input order, at consecutive offsets. A group's
    /// call succeeds or fails as a whole (so do its retries); different groups' calls succeed
    /// or fail independently, and resending only the failed messages is at-least-once like
    /// any retry (see [`ProduceError::maybe_stored`]). A refusal of the whole batch (unknown
    /// topic, more than [`BATCH_MESSAGES_MAX`] messages or [`BATCH_BYTES_MAX`] bytes, a
    /// message over the size limits) is given to every message and nothing is sent. An empty
    /// batch sends nothing and returns nothing.
    pub async fn send_batch<I, K, V>(
        &self,
        topic: &str,
        messages: I,
    ) -> Vec<Result<Receipt, ProduceError>>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<Vec<u8>>,
        V: Into<Vec<u8>>,
    {
        let messages: Vec<api::Message> = messages
            .into_iter()
            .map(|(key, value)| api::Message {
                key: key.into(),
                value: value.into(),
            })
            .collect();
        let count = messages.len();
        let whole = |error: ProduceError| vec![Err(error); count];
        if let Err(error) = check_batch(&messages) {
            return whole(error);
        }
        let mut progress = self.shared.router.start_request();
        let (layout, queues) = match self.topic(topic, &mut progress).await {
            Ok(found) => found,
            Err(error) => return whole(error),
        };
        let mut by_queue: BTreeMap<QueueId, Routed> = BTreeMap::new();
        for (position, message) in messages.into_iter().enumerate() {
            let queue = self.choose_queue(&message.key, queues);
            let routed = by_queue.entry(queue).or_insert_with(|| Routed {
                queue,
                positions: Vec::new(),
                messages: Vec::new(),
                message_id: self.new_message_id(),
            });
            routed.positions.push(position);
            routed.messages.push(message);
        }
        let topic: Arc<str> = Arc::from(topic);
        let mut calls = JoinSet::new();
        for appends in by_group(by_queue.into_values(), layout.groups) {
            calls.spawn(deliver(
                self.shared.clone(),
                topic.clone(),
                (layout.groups, queues),
                appends,
                progress.clone(),
            ));
        }
        let mut results: Vec<Option<Result<Receipt, ProduceError>>> = vec![None; count];
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok(outcomes) => {
                    for (position, outcome) in outcomes {
                        results[position] = Some(outcome);
                    }
                }
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // Cancelled: the runtime is shutting down; its messages get the error below.
                Err(_) => {}
            }
        }
        // A call abandoned mid-flight may still commit.
        let cancelled = ProduceError::new(
            ErrorKind::Unreachable,
            None,
            "the call was cancelled: the runtime is shutting down",
        )
        .after(progress.attempts(), true);
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(cancelled.clone())))
            .collect()
    }

    /// The layout and queue count of `topic`, after checking its name.
    async fn topic(
        &self,
        topic: &str,
        progress: &mut Progress,
    ) -> Result<(Arc<Layout>, u32), ProduceError> {
        validate_name(topic).map_err(|error| {
            ProduceError::refused(ErrorCode::InvalidName, format!("topic: {error}"))
        })?;
        self.shared.router.topic_queues(topic, progress).await
    }

    /// The queue of a message: by key, or round-robin without one.
    fn choose_queue(&self, key: &[u8], queues: u32) -> QueueId {
        if key.is_empty() {
            let turn = self.shared.next_queue.fetch_add(1, Ordering::Relaxed);
            // The remainder is below `queues`, a u32.
            (turn % u64::from(queues)) as QueueId
        } else {
            queue_of_key(key, queues)
        }
    }
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("config", self.config())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Delivers `appends` (all of one group), moving them on by queue-change retry when asked;
/// returns the outcome of every message, by its position in the caller's input. `shape` is
/// the store's group count and the topic's queue count.
async fn deliver(
    shared: Arc<Shared>,
    topic: Arc<str>,
    shape: (u32, u32),
    appends: Vec<Routed>,
    progress: Progress,
) -> Outcomes {
    let (groups, queues) = shape;
    let router = &shared.router;
    let mut outcomes = Vec::new();
    // Work left: a split of a moved call (a queue that wrapped around to 0 lands in group 0)
    // is delivered after the rest. Each item costs an attempt and a backoff within the
    // deadline, so the loop is bounded by it.
    let mut work = vec![(appends, progress)];
    while let Some((appends, mut progress)) = work.pop() {
        let group = group_of_queue(appends[0].queue, groups);
        debug_assert!(
            appends
                .iter()
                .all(|a| group_of_queue(a.queue, groups) == group)
        );
        match produce(router, group, &topic, &appends, &mut progress).await {
            Ok((first_offsets, duplicates)) => {
                (shared.duplicates).fetch_add(duplicates, Ordering::Relaxed);
                for (append, first) in appends.iter().zip(first_offsets) {
                    for (i, &position) in append.positions.iter().enumerate() {
                        let offset = first + i as Offset;
                        let receipt = Receipt {
                            queue: append.queue,
                            offset,
                        };
                        outcomes.push((position, Ok(receipt)));
                    }
                }
            }
            Err(Halt::Error(error)) => fail_all(&mut outcomes, &appends, &error),
            Err(Halt::MasterMissing) => {
                if let Err(error) = progress.pause().await {
                    fail_all(&mut outcomes, &appends, &error);
                    continue;
                }
                router
                    .counters
                    .queue_changes
                    .fetch_add(1, Ordering::Relaxed);
                let moved = appends.into_iter().map(|mut append| {
                    append.queue = (append.queue + 1) % queues;
                    append
                });
                for part in by_group(moved, groups) {
                    work.push((part, progress.clone()));
                }
            }
        }
    }
    outcomes
}

fn fail_all(outcomes: &mut Outcomes, appends: &[Routed], error: &ProduceError) {
    for append in appends {
        for &position in &append.positions {
            outcomes.push((position, Err(error.clone())));
        }
    }
}

/// Sends one group's appends: `Produce` for one, `ProduceMany` for several. Returns the first
/// offset of each append and how many the server answered as duplicates.
async fn produce(
    router: &Router,
    group: GroupId,
    topic: &str,
    appends: &[Routed],
    progress: &mut Progress,
) -> Result<(Vec<Offset>, u64), Halt> {
    let store_id = router.config().store_id;
    let ranges: Vec<(Offset, u32, bool)> = if let [append] = appends {
        let request = &api::ProduceRequest {
            topic: topic.to_string(),
            queue: append.queue,
            messages: append.messages.clone(),
            store_id,
            message_id: append.message_id.clone(),
        };
        let streams = router.config().produce_streams;
        let response = router
            .call_at(Some(group), progress, |mut client, addr| {
                let request = request.clone();
                let addr = addr.to_string();
                async move {
                    let response = if streams {
                        router.streams.produce(client, &addr, request).await?
                    } else {
                        client.produce(request).await?.into_inner()
                    };
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await?;
        vec![(response.first_offset, response.count, response.duplicate)]
    } else {
        let request = &api::ProduceManyRequest {
            appends: appends
                .iter()
                .map(|append| api::Append {
                    topic: topic.to_string(),
                    queue: append.queue,
                    messages: append.messages.clone(),
                    message_id: append.message_id.clone(),
                })
                .collect(),
            store_id,
        };
        let response = router
            .call(Some(group), progress, |mut client| {
                let request = request.clone();
                async move {
                    let response = client.produce_many(request).await?.into_inner();
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await?;
        response
            .results
            .iter()
            .map(|result| (result.first_offset, result.count, result.duplicate))
            .collect()
    };
    let duplicates = ranges.iter().filter(|range| range.2).count() as u64;
    let ranges: Vec<(Offset, u32)> = ranges.into_iter().map(|(f, c, _)| (f, c)).collect();
    check_ranges(appends, &ranges).map_err(|message| {
        // The node said success: the messages are stored somewhere, at offsets unknown.
        progress.set_maybe_stored();
        Halt::Error(progress.fail(ProduceError::new(ErrorKind::Protocol, None, message)))
    })?;
    let first_offsets = ranges.into_iter().map(|(first, _)| first).collect();
    Ok((first_offsets, duplicates))
}

/// Checks that a successful answer gives each append a range of its size, from offset 1 on.
fn check_ranges(appends: &[Routed], ranges: &[(Offset, u32)]) -> Result<(), String> {
    if ranges.len() != appends.len() {
        return Err(format!(
            "the node answered {} results for {} appends",
            ranges.len(),
            appends.len()
        ));
    }
    for (append, &(first, count)) in appends.iter().zip(ranges) {
        if first == 0 || count as usize != append.messages.len() {
            return Err(format!(
                "the node stored {count} messages at offset {first} for an append of {} to \
                 queue {}",
                append.messages.len(),
                append.queue
            ));
        }
    }
    Ok(())
}

/// The appends split by replication group, each group's in queue order.
fn by_group(appends: impl IntoIterator<Item = Routed>, groups: u32) -> Vec<Vec<Routed>> {
    let mut by_group: BTreeMap<GroupId, Vec<Routed>> = BTreeMap::new();
    for append in appends {
        by_group
            .entry(group_of_queue(append.queue, groups))
            .or_default()
            .push(append);
    }
    by_group.into_values().collect()
}

/// `MESSAGE_TOO_LARGE` for a key or value over the limits any store has; `position` names the
/// message in a batch.
fn check_message(message: &api::Message, position: Option<usize>) -> Result<(), ProduceError> {
    let which = position.map_or(String::new(), |i| format!("message {i}: "));
    if message.key.len() > KEY_BYTES_MAX {
        return Err(ProduceError::refused(
            ErrorCode::MessageTooLarge,
            format!(
                "{which}key of {} bytes; at most {KEY_BYTES_MAX}",
                message.key.len()
            ),
        ));
    }
    if message.value.len() > VALUE_BYTES_MAX {
        return Err(ProduceError::refused(
            ErrorCode::MessageTooLarge,
            format!(
                "{which}value of {} bytes; no store accepts more than {VALUE_BYTES_MAX}",
                message.value.len()
            ),
        ));
    }
    Ok(())
}

/// The batch limits, then every message's.
fn check_batch(messages: &[api::Message]) -> Result<(), ProduceError> {
    if messages.len() > BATCH_MESSAGES_MAX {
        return Err(ProduceError::refused(
            ErrorCode::InvalidArgument,
            format!(
                "{} messages in one batch; at most {BATCH_MESSAGES_MAX}",
                messages.len()
            ),
        ));
    }
    let bytes: usize = messages.iter().map(|m| m.key.len() + m.value.len()).sum();
    if bytes > BATCH_BYTES_MAX {
        return Err(ProduceError::refused(
            ErrorCode::InvalidArgument,
            format!("{bytes} bytes of keys and values in one batch; at most {BATCH_BYTES_MAX}"),
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        check_message(message, Some(i))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(queue: QueueId, count: usize) -> Routed {
        Routed {
            queue,
            positions: (0..count).collect(),
            messages: vec![api::Message::default(); count],
            message_id: Vec::new(),
        }
    }

    #[test]
    fn appends_split_by_group_in_queue_order() {
        let parts = by_group([0, 1, 2, 3, 4, 5, 6].map(|q| routed(q, 1)), 3);
        let queues: Vec<Vec<QueueId>> = parts
            .iter()
            .map(|part| part.iter().map(|a| a.queue).collect())
            .collect();
        assert_eq!(queues, [vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
    }

    #[test]
    fn answers_that_do_not_match_the_request_are_caught() {
        let appends = [routed(0, 2), routed(3, 1)];
        assert_eq!(check_ranges(&appends, &[(1, 2), (7, 1)]), Ok(()));
        assert!(check_ranges(&appends, &[(1, 2)]).is_err());
        assert!(check_ranges(&appends, &[(1, 2), (0, 1)]).is_err());
        assert!(check_ranges(&appends, &[(1, 1), (7, 1)]).is_err());
    }

    #[test]
    fn oversized_batches_and_messages_are_refused_before_sending() {
        let code = |messages: &[api::Message]| check_batch(messages).err().and_then(|e| e.code());
        let message = |key: usize, value: usize| api::Message {
            key: vec![0; key],
            value: vec![0; value],
        };
        assert_eq!(code(&[message(KEY_BYTES_MAX, 10)]), None);
        assert_eq!(
            code(&[message(1, 1), message(KEY_BYTES_MAX + 1, 1)]),
            Some(ErrorCode::MessageTooLarge)
        );
        assert_eq!(
            code(&[message(0, VALUE_BYTES_MAX + 1)]),
            Some(ErrorCode::MessageTooLarge)
        );
        assert_eq!(
            code(&vec![message(0, 0); BATCH_MESSAGES_MAX + 1]),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&[
                message(0, VALUE_BYTES_MAX),
                message(0, VALUE_BYTES_MAX),
                message(0, 1)
            ]),
            Some(ErrorCode::InvalidArgument)
        );
        let error = check_batch(&[message(1, 1), message(KEY_BYTES_MAX + 1, 1)]).unwrap_err();
        assert!(error.message().starts_with("message 1: "), "{error}");
        assert_eq!((error.kind(), error.attempts()), (ErrorKind::Refused, 0));
    }

    #[tokio::test]
    async fn keyless_messages_go_round_robin_and_keyed_ones_by_hash() {
        let producer = Producer::new(ProducerConfig::new(["127.0.0.1:1"])).unwrap();
        let mut seen: Vec<QueueId> = (0..5).map(|_| producer.choose_queue(b"", 5)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        for _ in 0..3 {
            assert_eq!(producer.choose_queue(b"user-1", 8), 4);
        }
    }
}
