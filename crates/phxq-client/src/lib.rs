//! The Rust client library of phxq: a [`Producer`].
//!
//! A producer is given a few nodes of one store ([`ProducerConfig::servers`]); it learns the
//! rest from the `ClusterStatus` call of the client protocol (`phxq-proto`'s
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
//! The crate holds no server code: it depends on the wire types (`phxq-proto`) and the
//! shared vocabulary (`phxq-types`) only, and needs a tokio runtime (tonic's).

mod backoff;
mod config;
mod error;
mod key;
mod producer;
mod router;

pub use config::{
    ATTEMPT_TIMEOUT_DEFAULT, BACKOFF_INITIAL_DEFAULT, BACKOFF_MAX_DEFAULT, BACKOFF_MAX_LIMIT,
    BACKOFF_MIN_LIMIT, ConfigError, DEADLINE_DEFAULT, DEADLINE_MAX, ProducerConfig, SERVERS_MAX,
};
pub use error::{ErrorKind, ProduceError};
pub use key::{fnv1a_64, queue_of_key};
pub use phxq_types::{ErrorCode, KEY_BYTES_MAX, Offset, QueueId};
pub use producer::{
    BATCH_BYTES_MAX, BATCH_MESSAGES_MAX, Producer, ProducerStats, Receipt, VALUE_BYTES_MAX,
};
pub use router::{CHANNELS_MAX, CONNECT_TIMEOUT, REDIRECTS_IN_A_ROW_MAX};
