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
use std::collections::btree_map::Entry;
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
use crate::key::{StoreWeight, queue_of_key, store_of_key, store_ranking};
use crate::router::{Counters, Halt, Progress, Router};

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

/// Where an acknowledged message is stored: `(topic, queue, offset)` is its stable id (in its
/// store, for a producer of several stores: see [`Stored`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Receipt {
    /// The queue it went to.
    pub queue: QueueId,
    /// Its offset in that queue (dense, from 1).
    pub offset: Offset,
}

/// Where an acknowledged message is stored, with its store, and whether the store answered
/// it as a duplicate of an earlier append with the same message id (then `offset` is the
/// original's and nothing was stored again). [`Producer::send_messages`] returns these.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stored {
    /// The store's name ([`crate::StoreConfig::name`], or [`crate::DEFAULT_STORE_NAME`]).
    pub store: Arc<str>,
    /// The queue it went to, in that store.
    pub queue: QueueId,
    /// Its offset in that queue (dense, from 1).
    pub offset: Offset,
    /// The store already held this message id: nothing was appended.
    pub duplicate: bool,
}

impl Stored {
    /// The queue and offset, without the store.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            queue: self.queue,
            offset: self.offset,
        }
    }
}

/// A message for [`Producer::send_messages`]: a key (empty: none), a value, and optionally a
/// message id of the caller's (see [`Producer::send_with_id`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// Picks the store and the queue; empty: none (spread by weight, then round-robin).
    pub key: Vec<u8>,
    /// The message.
    pub value: Vec<u8>,
    /// 1 to [`MESSAGE_ID_BYTES_MAX`] bytes: the message is an append of its own that the
    /// store deduplicates by this id; without a key it is routed by the id (see
    /// [`Producer::send_with_id`]). `None`: the producer's own id if
    /// [`ProducerConfig::message_ids`], else none.
    pub message_id: Option<Vec<u8>>,
}

impl Outgoing {
    /// A message of `key` and `value`, without an id of the caller's.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Outgoing {
        Outgoing {
            key: key.into(),
            value: value.into(),
            message_id: None,
        }
    }

    /// The same message with the caller's message id `id`.
    pub fn with_id(mut self, id: impl Into<Vec<u8>>) -> Outgoing {
        self.message_id = Some(id.into());
        self
    }
}

/// What a producer has done since it was created (all its clones together, all its stores).
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
    /// Calls whose messages moved to their next store by store-change retry.
    pub store_changes: u64,
    /// Write attempts that ended without a known outcome; each retry after one may have
    /// stored messages twice.
    pub uncertain_attempts: u64,
    /// Appends the server answered as duplicates of an earlier attempt (message ids only):
    /// stored once, by that attempt.
    pub duplicates: u64,
}

/// A producer for one store or several: cheap to clone (clones share channels, the cached
/// layouts and masters, and statistics) and safe to use from many tasks at once. Needs a
/// tokio runtime.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

/// One store of the producer: its own router (layout, masters cache, channels).
struct Store {
    name: Arc<str>,
    weight: u32,
    router: Router,
}

struct Shared {
    config: ProducerConfig,
    /// The stores, in config order (routing depends on their names, not on this order).
    stores: Vec<Store>,
    /// The next queue for a message without a key (taken modulo the topic's queue count).
    next_queue: AtomicU64,
    /// The next spread token of a message without a key (hashed to pick its store).
    next_spread: AtomicU64,
    /// This producer's half of its message ids: random, drawn once.
    id_token: u64,
    /// The sequence half of the next message id.
    next_id: AtomicU64,
    /// Appends answered as duplicates.
    duplicates: AtomicU64,
    /// Calls moved on by store-change retry.
    store_changes: AtomicU64,
}

/// One message on its way, with the stores it may still go to.
struct Item {
    /// Its position in the caller's input.
    position: usize,
    message: api::Message,
    /// The caller's message id: the message is an append of its own.
    message_id: Option<Vec<u8>>,
    /// Stores still to try, the current one first (indices into `Shared::stores`): the
    /// key's rendezvous ranking with store-change retry, else its one store.
    stores: Vec<usize>,
}

/// Messages routed to one queue, as one append.
struct Routed {
    queue: QueueId,
    items: Vec<Item>,
    /// The append's message id (empty: none), the same on every attempt.
    message_id: Vec<u8>,
    /// The id is the caller's: no other message may join this append.
    callers_id: bool,
}

type Outcomes = Vec<(usize, Result<Stored, ProduceError>)>;
/// Messages sent on to their next store, with their request's progress so far.
type Moved = Vec<(Vec<Item>, Progress)>;

impl Producer {
    /// A producer with `config` (validated here). It connects to nothing yet: the first send
    /// to a store learns its layout.
    pub fn new(config: ProducerConfig) -> Result<Producer, ConfigError> {
        config.validate()?;
        let stores: Vec<Store> = config
            .store_list()
            .iter()
            .map(|store| Store {
                name: Arc::from(store.name.as_str()),
                weight: store.weight,
                router: Router::new(config.for_store(store)),
            })
            .collect();
        let first = &stores[0].router;
        let next_queue = AtomicU64::new(first.random());
        let id_token = first.random();
        let next_spread = AtomicU64::new(first.random());
        Ok(Producer {
            shared: Arc::new(Shared {
                config,
                stores,
                next_queue,
                next_spread,
                id_token,
                next_id: AtomicU64::new(1),
                duplicates: AtomicU64::new(0),
                store_changes: AtomicU64::new(0),
            }),
        })
    }

    /// The producer's configuration.
    pub fn config(&self) -> &ProducerConfig {
        &self.shared.config
    }

    /// What the producer (with all its clones) has done so far.
    pub fn stats(&self) -> ProducerStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let sum = |counter: fn(&Counters) -> &AtomicU64| {
            let stores = &self.shared.stores;
            stores
                .iter()
                .map(|s| read(counter(&s.router.counters)))
                .sum()
        };
        ProducerStats {
            produce_calls: sum(|c| &c.produce_calls),
            status_calls: sum(|c| &c.status_calls),
            redirects: sum(|c| &c.redirects),
            retries: sum(|c| &c.retries),
            queue_changes: sum(|c| &c.queue_changes),
            store_changes: read(&self.shared.store_changes),
            uncertain_attempts: sum(|c| &c.uncertain_attempts),
            duplicates: read(&self.shared.duplicates),
        }
    }

    /// The name of the store a message with `key` goes to ([`crate::store_of_key`] over the
    /// configured stores; the first store of its ranking, before any store-change retry).
    /// `key` must not be empty (keyless messages spread over the stores).
    pub fn store_of_key(&self, key: &[u8]) -> &str {
        let weights = self.shared.weights();
        &self.shared.stores[store_of_key(&weights, key)].name
    }

    /// Sends one message to `topic` and waits until it is durable (committed on a majority
    /// of the store) or the deadline passes. `key` picks the store and the queue
    /// ([`crate::store_of_key`], [`queue_of_key`]); an empty key means none (spread over the
    /// stores by weight, round-robin over the queues).
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        value: impl Into<Vec<u8>>,
    ) -> Result<Receipt, ProduceError> {
        self.send_one(topic, key, value.into(), None).await
    }

    /// Sends one message like [`send`](Self::send), with a message id of the caller's (1 to
    /// [`MESSAGE_ID_BYTES_MAX`] bytes) instead of one of the producer's: the store appends
    /// nothing for an id already in the queue's dedup window and answers with the offset of
    /// the message first stored with it ([`ProducerStats::duplicates`] counts those). Derive
    /// the id from what makes the message unique (an order number, a source offset) to make
    /// a produce idempotent across retries, restarts and processes. An id of bad length is
    /// refused (`INVALID_ARGUMENT`) before sending. Without a key, the message is routed by
    /// its id instead (store and queue, as a key would be), so that the same id always meets
    /// the same dedup window. (A store-change retry takes the message to a store whose window
    /// does not hold the id.)
    pub async fn send_with_id(
        &self,
        topic: &str,
        key: &[u8],
        value: impl Into<Vec<u8>>,
        message_id: impl Into<Vec<u8>>,
    ) -> Result<Receipt, ProduceError> {
        let message_id = message_id.into();
        check_message_id(&message_id, None)?;
        self.send_one(topic, key, value.into(), Some(message_id))
            .await
    }

    /// [`send`](Self::send) with the caller's `message_id`, if any.
    async fn send_one(
        &self,
        topic: &str,
        key: &[u8],
        value: Vec<u8>,
        message_id: Option<Vec<u8>>,
    ) -> Result<Receipt, ProduceError> {
        let message = api::Message {
            key: key.to_vec(),
            value,
        };
        check_message(&message, None)?;
        let mut results = self.send_checked(topic, vec![(message, message_id)]).await;
        debug_assert_eq!(results.len(), 1, "one result per message");
        match results.pop() {
            Some(result) => result.map(|stored| stored.receipt()),
            None => unreachable!("send_checked answers every message"),
        }
    }

    /// Sends `messages` (key, value) to `topic`, one call per (store, replication group),
    /// all at once; returns one result per message, in input order.
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
        let outgoing = messages
            .into_iter()
            .map(|(key, value)| Outgoing::new(key, value));
        self.send_messages(topic, outgoing)
            .await
            .into_iter()
            .map(|result| result.map(|stored| stored.receipt()))
            .collect()
    }

    /// [`send_batch`](Self::send_batch) with a message id per message if wanted, and the
    /// store and duplicate flag in each result ([`Stored`]). A message with the caller's id
    /// is an append of its own (the store deduplicates appends), in the same call as the
    /// other messages of its group. An id of bad length refuses the whole batch
    /// (`INVALID_ARGUMENT`) before sending.
    pub async fn send_messages(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Outgoing>,
    ) -> Vec<Result<Stored, ProduceError>> {
        let (messages, ids): (Vec<api::Message>, Vec<Option<Vec<u8>>>) = messages
            .into_iter()
            .map(|outgoing| {
                let message = api::Message {
                    key: outgoing.key,
                    value: outgoing.value,
                };
                (message, outgoing.message_id)
            })
            .unzip();
        let count = messages.len();
        let checked = check_batch(&messages).and_then(|()| {
            ids.iter().enumerate().try_for_each(|(i, id)| match id {
                Some(id) => check_message_id(id, Some(i)),
                None => Ok(()),
            })
        });
        if let Err(error) = checked {
            return vec![Err(error); count];
        }
        self.send_checked(topic, messages.into_iter().zip(ids).collect())
            .await
    }

    /// Routes and delivers checked messages; one result per message, in input order.
    async fn send_checked(
        &self,
        topic: &str,
        messages: Vec<(api::Message, Option<Vec<u8>>)>,
    ) -> Vec<Result<Stored, ProduceError>> {
        let count = messages.len();
        let progress = self.shared.stores[0].router.start_request();
        if let Err(error) = validate_name(topic) {
            let error = ProduceError::refused(ErrorCode::InvalidName, format!("topic: {error}"));
            return vec![Err(error); count];
        }
        let items = messages
            .into_iter()
            .enumerate()
            .map(|(position, (message, message_id))| Item {
                position,
                stores: self.shared.stores_of(route_key(&message, &message_id)),
                message,
                message_id,
            })
            .collect();
        let outcomes = deliver_all(self.shared.clone(), Arc::from(topic), items, &progress).await;
        let mut results: Vec<Option<Result<Stored, ProduceError>>> = vec![None; count];
        for (position, outcome) in outcomes {
            results[position] = Some(outcome);
        }
        // A call abandoned mid-flight (the runtime shutting down) may still commit.
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

    /// The queue of a message: by key, or round-robin without one.
    #[cfg(test)]
    fn choose_queue(&self, key: &[u8], queues: u32) -> QueueId {
        self.shared.choose_queue(key, queues)
    }
}

impl Shared {
    /// The stores' names and weights, as the routing functions take them.
    fn weights(&self) -> Vec<StoreWeight<'_>> {
        self.stores
            .iter()
            .map(|store| StoreWeight {
                name: &store.name,
                weight: store.weight,
            })
            .collect()
    }

    /// The stores a message with `key` tries, in order: its store, then (store-change retry
    /// only) the rest of its ranking. Without a key, a spread token stands for it, so keyless
    /// messages spread over the stores by weight.
    fn stores_of(&self, key: &[u8]) -> Vec<usize> {
        if self.stores.len() == 1 {
            return vec![0];
        }
        let spread;
        let route_key = if key.is_empty() {
            spread = self
                .next_spread
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes();
            &spread[..]
        } else {
            key
        };
        let weights = self.weights();
        if self.config.store_change_retry {
            store_ranking(&weights, route_key)
        } else {
            vec![store_of_key(&weights, route_key)]
        }
    }

    /// The queue of a message: by key, or round-robin without one.
    fn choose_queue(&self, key: &[u8], queues: u32) -> QueueId {
        if key.is_empty() {
            let turn = self.next_queue.fetch_add(1, Ordering::Relaxed);
            // The remainder is below `queues`, a u32.
            (turn % u64::from(queues)) as QueueId
        } else {
            queue_of_key(key, queues)
        }
    }

    /// A new message id for one append if the config asks for ids, else none (empty).
    fn new_message_id(&self) -> Vec<u8> {
        if !self.config.message_ids {
            return Vec::new();
        }
        let sequence = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = self.id_token.to_be_bytes().to_vec();
        id.extend_from_slice(&sequence.to_be_bytes());
        id
    }

    /// After `store` failed `items` with `error`: each item fails with `error` (naming the
    /// store when there are several), moves on to its next store, or visits this store again
    /// ([`after_failure`]).
    fn give_up_or_move(
        &self,
        store: usize,
        items: Vec<Item>,
        error: ProduceError,
        mut progress: Progress,
        outcomes: &mut Outcomes,
        moved: &mut Moved,
    ) {
        let error = if self.stores.len() > 1 {
            error.in_store(self.stores[store].name.clone())
        } else {
            error
        };
        let (mut going, mut again) = (Vec::new(), Vec::new());
        for item in items {
            let failure = Failure {
                store_change_retry: self.config.store_change_retry,
                retryable: !matches!(error.kind(), ErrorKind::Refused | ErrorKind::Protocol),
                masterless: masterless(&error),
                time_left: progress.time_left(),
                stores_left: item.stores.len() - 1,
            };
            match after_failure(failure) {
                AfterFailure::Fail => outcomes.push((item.position, Err(error.clone()))),
                AfterFailure::NextStore => going.push(item),
                AfterFailure::SameStore => again.push(item),
            }
        }
        progress.unlimit();
        if !going.is_empty() {
            tracing::debug!(store = %self.stores[store].name, %error, "changing store");
            for item in &mut going {
                debug_assert_eq!(item.stores[0], store);
                item.stores.remove(0);
            }
            self.store_changes.fetch_add(1, Ordering::Relaxed);
            moved.push((going, progress.clone()));
        }
        if !again.is_empty() {
            moved.push((again, progress));
        }
    }
}

/// What a failed visit to a store knows, for [`after_failure`].
#[derive(Clone, Copy, Debug)]
struct Failure {
    /// [`ProducerConfig::store_change_retry`].
    store_change_retry: bool,
    /// Retrying could change the outcome (not a refusal, not a protocol error).
    retryable: bool,
    /// The store had no reachable master ([`masterless`]).
    masterless: bool,
    /// The request's own deadline is still ahead.
    time_left: bool,
    /// Stores of the message's ranking after this one.
    stores_left: usize,
}

/// Where a message goes after its store failed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Return the error.
    Fail,
    /// The next store of its ranking (store-change retry).
    NextStore,
    /// This store again, with a new visit's budget: it failed only because the visit's time
    /// ran out, not the request's, and store-change retry has nowhere better to go (the store
    /// has a master but is busy, or it is the last of the ranking).
    SameStore,
}

/// The store-change retry rule. Without it a store's visit has the request's whole deadline,
/// so every failure is final; with it, a refusal is final, a masterless store is left for
/// the next one, and anything else retryable is retried in the same store until the
/// request's deadline.
fn after_failure(failure: Failure) -> AfterFailure {
    if !failure.store_change_retry || !failure.retryable || !failure.time_left {
        AfterFailure::Fail
    } else if failure.masterless && failure.stores_left > 0 {
        AfterFailure::NextStore
    } else {
        AfterFailure::SameStore
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

/// What routes a message: its key; without one, the caller's message id, so that sending
/// the same id again (a retry, a re-run after a crash) reaches the same store and queue,
/// whose dedup window holds it; without either, nothing (empty: spread).
fn route_key<'a>(message: &'a api::Message, message_id: &'a Option<Vec<u8>>) -> &'a [u8] {
    match message_id {
        Some(id) if message.key.is_empty() => id,
        _ => &message.key,
    }
}

/// Whether `error` says the store had no reachable master (what store-change retry is for),
/// rather than a refusal or an overloaded master.
fn masterless(error: &ProduceError) -> bool {
    match error.kind() {
        ErrorKind::Unreachable => true,
        ErrorKind::DeadlineExceeded => matches!(
            error.code(),
            Some(ErrorCode::NoMaster | ErrorCode::Unavailable | ErrorCode::NotMaster)
        ),
        ErrorKind::Refused | ErrorKind::Protocol => false,
    }
}

/// Delivers `items` to their stores, all stores at once, then the items store-change retry
/// moved on to their next stores, round after round (each round takes every item one store
/// further down its ranking, so there are at most as many rounds as stores). Returns the
/// outcome of every item not lost to a cancelled task.
async fn deliver_all(
    shared: Arc<Shared>,
    topic: Arc<str>,
    items: Vec<Item>,
    progress: &Progress,
) -> Outcomes {
    let mut outcomes = Vec::new();
    let mut pending: BTreeMap<usize, (Vec<Item>, Progress)> = BTreeMap::new();
    add_by_store(&mut pending, items, progress);
    while !pending.is_empty() {
        let mut visits = JoinSet::new();
        for (store, (items, progress)) in std::mem::take(&mut pending) {
            visits.spawn(visit_store(
                shared.clone(),
                store,
                topic.clone(),
                items,
                progress,
            ));
        }
        while let Some(joined) = visits.join_next().await {
            match joined {
                Ok((done, moved)) => {
                    outcomes.extend(done);
                    for (items, progress) in moved {
                        add_by_store(&mut pending, items, &progress);
                    }
                }
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // Cancelled: the runtime is shutting down; the caller reports the messages.
                Err(_) => {}
            }
        }
    }
    outcomes
}

/// Adds `items` to `pending` by their current store; items joining others take in their
/// progress (attempts, uncertainty).
fn add_by_store(
    pending: &mut BTreeMap<usize, (Vec<Item>, Progress)>,
    items: Vec<Item>,
    progress: &Progress,
) {
    for item in items {
        match pending.entry(item.stores[0]) {
            Entry::Occupied(mut entry) => {
                let (items, joined) = entry.get_mut();
                joined.absorb(progress);
                items.push(item);
            }
            Entry::Vacant(entry) => {
                entry.insert((vec![item], progress.clone()));
            }
        }
    }
    for (items, _) in pending.values_mut() {
        items.sort_by_key(|item| item.position);
    }
}

/// Sends `items` to `store`: learns the topic's queue count there, routes each item to its
/// queue, and makes one call per replication group, the groups at once. With store-change
/// retry the store gets [`ProducerConfig::store_change_after`] before its items move on.
async fn visit_store(
    shared: Arc<Shared>,
    store: usize,
    topic: Arc<str>,
    items: Vec<Item>,
    mut progress: Progress,
) -> (Outcomes, Moved) {
    let (mut outcomes, mut moved) = (Vec::new(), Vec::new());
    if shared.config.store_change_retry {
        progress.limit_to(shared.config.store_change_after);
    }
    let router = &shared.stores[store].router;
    let (layout, queues) = match router.topic_queues(&topic, &mut progress).await {
        Ok(found) => found,
        Err(error) => {
            shared.give_up_or_move(store, items, error, progress, &mut outcomes, &mut moved);
            return (outcomes, moved);
        }
    };
    let mut by_queue: BTreeMap<QueueId, Vec<Routed>> = BTreeMap::new();
    for item in items {
        let queue = shared.choose_queue(route_key(&item.message, &item.message_id), queues);
        let appends = by_queue.entry(queue).or_default();
        match appends.last_mut() {
            Some(last) if !last.callers_id && item.message_id.is_none() => last.items.push(item),
            _ => {
                let callers_id = item.message_id.is_some();
                let message_id = match &item.message_id {
                    Some(id) => id.clone(),
                    None => shared.new_message_id(),
                };
                appends.push(Routed {
                    queue,
                    items: vec![item],
                    message_id,
                    callers_id,
                });
            }
        }
    }
    let mut calls = JoinSet::new();
    for appends in by_group(by_queue.into_values().flatten(), layout.groups) {
        calls.spawn(deliver(
            shared.clone(),
            store,
            topic.clone(),
            (layout.groups, queues),
            appends,
            progress.clone(),
        ));
    }
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok((done, gone)) => {
                outcomes.extend(done);
                moved.extend(gone);
            }
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled: the runtime is shutting down; the caller reports the messages.
            Err(_) => {}
        }
    }
    (outcomes, moved)
}

/// Delivers `appends` (all of one group of `store`), moving them on by queue-change retry
/// when asked; returns the outcome of every message, by its position in the caller's input,
/// and the messages store-change retry moves on. `shape` is the store's group count and the
/// topic's queue count there.
async fn deliver(
    shared: Arc<Shared>,
    store: usize,
    topic: Arc<str>,
    shape: (u32, u32),
    appends: Vec<Routed>,
    progress: Progress,
) -> (Outcomes, Moved) {
    let (groups, queues) = shape;
    let router = &shared.stores[store].router;
    let name = &shared.stores[store].name;
    let (mut outcomes, mut moved) = (Vec::new(), Vec::new());
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
        let failure = match produce(router, group, &topic, &appends, &mut progress).await {
            Ok(ranges) => {
                for (append, (first, duplicate)) in appends.iter().zip(ranges) {
                    if duplicate {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    for (i, item) in append.items.iter().enumerate() {
                        let stored = Stored {
                            store: name.clone(),
                            queue: append.queue,
                            offset: first + i as Offset,
                            duplicate,
                        };
                        outcomes.push((item.position, Ok(stored)));
                    }
                }
                continue;
            }
            Err(Halt::Error(error)) => error,
            Err(Halt::MasterMissing) => match progress.pause().await {
                Err(error) => error,
                Ok(()) => {
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
                    continue;
                }
            },
        };
        let items = appends
            .into_iter()
            .flat_map(|append| append.items)
            .collect();
        shared.give_up_or_move(store, items, failure, progress, &mut outcomes, &mut moved);
    }
    (outcomes, moved)
}

/// Sends one group's appends: `Produce` for one, `ProduceMany` for several. Returns the first
/// offset of each append and whether the server answered it as a duplicate.
async fn produce(
    router: &Router,
    group: GroupId,
    topic: &str,
    appends: &[Routed],
    progress: &mut Progress,
) -> Result<Vec<(Offset, bool)>, Halt> {
    let store_id = router.config().store_id;
    let messages = |append: &Routed| -> Vec<api::Message> {
        append
            .items
            .iter()
            .map(|item| item.message.clone())
            .collect()
    };
    let ranges: Vec<(Offset, u32, bool)> = if let [append] = appends {
        let request = &api::ProduceRequest {
            topic: topic.to_string(),
            queue: append.queue,
            messages: messages(append),
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
                    messages: messages(append),
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
    let counts: Vec<(Offset, u32)> = ranges.iter().map(|&(f, c, _)| (f, c)).collect();
    check_ranges(appends, &counts).map_err(|message| {
        // The node said success: the messages are stored somewhere, at offsets unknown.
        progress.set_maybe_stored();
        Halt::Error(progress.fail(ProduceError::new(ErrorKind::Protocol, None, message)))
    })?;
    Ok(ranges
        .into_iter()
        .map(|(first, _, dup)| (first, dup))
        .collect())
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
        if first == 0 || count as usize != append.items.len() {
            return Err(format!(
                "the node stored {count} messages at offset {first} for an append of {} to \
                 queue {}",
                append.items.len(),
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

/// `INVALID_ARGUMENT` for a message id of bad length; `position` names the message in a batch.
fn check_message_id(id: &[u8], position: Option<usize>) -> Result<(), ProduceError> {
    if id.is_empty() || id.len() > MESSAGE_ID_BYTES_MAX {
        let which = position.map_or(String::new(), |i| format!("message {i}: "));
        return Err(ProduceError::refused(
            ErrorCode::InvalidArgument,
            format!(
                "{which}a message id of {} bytes; 1 to {MESSAGE_ID_BYTES_MAX}",
                id.len()
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
        let item = |position| Item {
            position,
            message: api::Message::default(),
            message_id: None,
            stores: vec![0],
        };
        Routed {
            queue,
            items: (0..count).map(item).collect(),
            message_id: Vec::new(),
            callers_id: false,
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

    #[test]
    fn store_change_retry_moves_only_masterless_failures_and_never_refusals() {
        let base = Failure {
            store_change_retry: true,
            retryable: true,
            masterless: true,
            time_left: true,
            stores_left: 1,
        };
        let next = |change: fn(&mut Failure)| {
            let mut failure = base;
            change(&mut failure);
            after_failure(failure)
        };
        assert_eq!(next(|_| {}), AfterFailure::NextStore);
        assert_eq!(next(|f| f.store_change_retry = false), AfterFailure::Fail);
        assert_eq!(next(|f| f.retryable = false), AfterFailure::Fail);
        assert_eq!(next(|f| f.time_left = false), AfterFailure::Fail);
        // A busy store with a master, or the last store of the ranking: try it again.
        assert_eq!(next(|f| f.masterless = false), AfterFailure::SameStore);
        assert_eq!(next(|f| f.stores_left = 0), AfterFailure::SameStore);
        let error = |kind, code| ProduceError::new(kind, code, "why");
        assert!(masterless(&error(ErrorKind::Unreachable, None)));
        assert!(masterless(&error(
            ErrorKind::DeadlineExceeded,
            Some(ErrorCode::NoMaster)
        )));
        assert!(!masterless(&error(
            ErrorKind::DeadlineExceeded,
            Some(ErrorCode::Busy)
        )));
        assert!(!masterless(&error(
            ErrorKind::Refused,
            Some(ErrorCode::UnknownTopic)
        )));
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
