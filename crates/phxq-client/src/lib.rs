//! The Rust client library of phxq: a [`Producer`] and a [`Consumer`].
//!
//! A producer is given a few nodes of one store ([`ProducerConfig::servers`]), or of each of
//! several stores ([`ProducerConfig::with_stores`], below); it learns the rest of each store
//! from the `ClusterStatus` call of the client protocol (`phxq-proto`'s
//! `proto/phxq/v1/phxq.proto`): how many replication groups the store has, its topics and
//! their queue counts, every node's client address and each group's master. Then:
//!
//! * [`Producer::send`] routes a message by its key to queue [`queue_of_key`]`(key, queues)`
//!   (a stable FNV-1a hash that never changes, so one key keeps one queue and its order), or
//!   round-robin without a key, and sends it to the master of the queue's group (`queue mod
//!   groups`), following `NOT_MASTER` redirects and retrying elections, overload and lost
//!   connections with jittered exponential backoff until the request's deadline.
//! * [`Producer::send_batch`] sends many messages with one call per replication group
//!   (server-side batching: one log entry per group), the groups concurrently, and reports
//!   each message's outcome.
//! * Refusals that retrying cannot change (`UNKNOWN_TOPIC`, `MESSAGE_TOO_LARGE`, ...) come
//!   back at once as a [`ProduceError`] carrying the stable [`ErrorCode`].
//! * Opt-in queue-change retry ([`ProducerConfig::queue_change_retry`]) trades per-key order
//!   for availability while a group has no master.
//! * **Several stores** ([`ProducerConfig::with_stores`], each a [`StoreConfig`] with a name,
//!   servers and a weight): a key first picks its store by weighted rendezvous hashing
//!   ([`store_of_key`], fixed forever like the queue mapping; adding a store moves only
//!   the keys it wins), then its queue there; keyless messages spread by weight. One router
//!   (layout, masters cache) per store; a batch makes one call per (store, group), all at
//!   once; errors name the store ([`ProduceError::store`]). Opt-in store-change retry
//!   ([`ProducerConfig::store_change_retry`]) moves a message to the next store of its key's
//!   ranking when its store has no reachable master, giving up per-key order.
//!
//! A success ([`Receipt`]) means the message is durable: committed to a majority of the
//! store, fsynced there. Delivery is at least once (see [`ProduceError::maybe_stored`]).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use phxq_client::{Producer, ProducerConfig};
//!
//! let producer = Producer::new(ProducerConfig::new(["127.0.0.1:7100"]))?;
//! let receipt = producer.send("test", b"user-42", "hello").await?;
//! println!("stored in queue {} at offset {}", receipt.queue, receipt.offset);
//! # Ok(())
//! # }
//! ```
//!
//! A [`Consumer`] reads a topic for a consumer group: one long-poll pull loop per queue it
//! owns (queues divided among a static member list by consistent hashing,
//! [`assigned_queues`], or granted to the group's live members by the store's group
//! coordinator with safe takeover, [`Membership`]), routed like the producer's calls; a [`Handler`] called for
//! different keys in parallel (at most [`ConsumerConfig::max_in_flight`] at once, under an
//! optional messages/s and bytes/s limit) but for one key's messages strictly in order; each
//! queue's cursor committed, in batches, only up to its lowest unhandled offset (delivery is
//! at least once); a graceful drain when its shutdown future completes. A failed delivery (a
//! nack, a handler past [`ConsumerConfig::ack_timeout`], a panic, caught) is delivered again
//! in place after the delay of its [`RetryTier`], then produced to
//! [`ConsumerConfig::dead_letter_topic`] with an idempotent message id. [`seek`] (or
//! [`Consumer::seek`]) moves a group's cursors to the earliest, the latest, an offset or a
//! time, resolving every queue before moving any.
//!
//! **Operator settings win.** An operator can set, per topic and consumer group, retry tiers,
//! a dead-letter topic, rate limits and a max in flight in the store (`phxq topic alter NAME
//! --settings-for GROUP ...`). [`Consumer::run`] reads them at start and each one the store
//! has replaces the matching [`ConsumerConfig`] value (rates are per group: divided among a
//! static list's members, or among the live members); one the library cannot apply stops it
//! at once ([`ConsumerError::Settings`]). [`ConsumerReport::settings`] says what applied.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use phxq_client::{Consumer, ConsumerConfig, Delivery, Outcome};
//!
//! let consumer = Consumer::new(ConsumerConfig::new(["127.0.0.1:7100"], "test", "g1"))?;
//! let handler = |msg: &Delivery| {
//!     println!("queue {} offset {}: {} bytes", msg.queue, msg.offset, msg.value.len());
//!     async { Outcome::Handled }
//! };
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>(); // `stop.send(())` drains
//! let report = consumer.run(handler, async { let _ = stopped.await; }).await?;
//! # drop(stop);
//! println!("handled {}", report.handled);
//! # Ok(())
//! # }
//! ```
//!
//! A [`Receiver`] is the store's per-message acknowledgement instead: `receive` a queue's
//! messages, each with its **stored** delivery count, then `ack` or `nack` (with a delay)
//! each one; an unacked message comes back after its ack timeout, counted again, even after
//! a master change.
//!
//! The crate holds no server code: it depends on the wire types (`phxq-proto`) and the
//! shared vocabulary (`phxq-types`) only, and needs a tokio runtime (tonic's).

mod backoff;
mod config;
pub mod connect;
mod consumer;
mod consumer_assign;
mod consumer_config;
mod consumer_member;
mod consumer_rate;
mod consumer_retry;
mod consumer_settings;
mod consumer_types;
mod error;
mod key;
mod produce_stream;
mod producer;
mod receiver;
mod router;
mod seek;

pub use config::{
    ATTEMPT_TIMEOUT_DEFAULT, BACKOFF_INITIAL_DEFAULT, BACKOFF_MAX_DEFAULT, BACKOFF_MAX_LIMIT,
    BACKOFF_MIN_LIMIT, ConfigError, DEADLINE_DEFAULT, DEADLINE_MAX, DEFAULT_STORE_NAME,
    ProducerConfig, SERVERS_MAX, STORE_CHANGE_AFTER_DEFAULT, STORE_WEIGHT_MAX, STORES_MAX,
    StoreConfig,
};
pub use connect::StoreCa;
pub use consumer::{
    Consumer, ConsumerError, ConsumerProgress, ConsumerReport, Delivery, Handler, Outcome,
};
pub use consumer_assign::{assigned_queues, queue_owner};
pub use consumer_config::{
    ACK_TIMEOUT_DEFAULT, ACK_TIMEOUT_MAX, ACK_TIMEOUT_MIN, COMMIT_INTERVAL_DEFAULT,
    COMMIT_INTERVAL_MAX, COMMIT_INTERVAL_MIN, CONSUMER_DEADLINE_DEFAULT, ConsumerConfig,
    ConsumerConfigError, HandlingOrder, LONG_POLL_DEFAULT, LONG_POLL_LIMIT, LONG_POLL_MARGIN,
    MAX_IN_FLIGHT_DEFAULT, MAX_IN_FLIGHT_LIMIT, MEMBERS_MAX, PULL_BYTES_DEFAULT, PULL_BYTES_LIMIT,
    PULL_MESSAGES_DEFAULT, PULL_MESSAGES_LIMIT, QUEUES_LISTED_MAX, RETRY_DELAY_MAX,
    RETRY_TIER_ATTEMPTS_MAX, RETRY_TIERS_MAX, RetryTier, SETTINGS_REFRESH_DEFAULT,
    SETTINGS_REFRESH_MAX, SETTINGS_REFRESH_MIN, retry_tiers_default,
};
pub use consumer_member::{
    HEARTBEAT_INTERVAL_DEFAULT, HEARTBEAT_INTERVAL_MIN, HEARTBEATS_PER_SESSION_MIN, Membership,
    SESSION_TIMEOUT_DEFAULT, SESSION_TIMEOUT_MAX, SESSION_TIMEOUT_MIN,
};
pub use consumer_rate::BURST as RATE_BURST;
pub use consumer_settings::{EffectiveSettings, SettingsError};
pub use consumer_types::ByType;
pub use error::{ErrorKind, ProduceError};
pub use key::{
    StoreWeight, fnv1a_64, queue_of_key, store_hash, store_of_key, store_ranking, store_score,
};
pub use phxq_types::{ErrorCode, KEY_BYTES_MAX, MESSAGE_ID_BYTES_MAX, Offset, QueueId};
pub use producer::{
    BATCH_BYTES_MAX, BATCH_MESSAGES_MAX, Outgoing, Producer, ProducerStats, Receipt, Stored,
    VALUE_BYTES_MAX,
};
pub use receiver::{RECEIVE_ACK_TIMEOUT_DEFAULT, Received, Receiver};
pub use router::{CHANNELS_MAX, CONNECT_TIMEOUT, REDIRECTS_IN_A_ROW_MAX};
pub use seek::{SeekError, SeekMove, SeekTo, seek};
