//! phxq's sans-IO core: what a replication group's committed log *means*.
//!
//! The replicated log is the queue (PhxQueue's central idea). A raft entry's payload is a
//! [`Batch`] of [`Command`]s gathered by the master in one group-commit round; applying it in
//! log order assigns dense offsets per queue and moves consumer-group cursors. Messages are
//! not copied anywhere: the [`GroupMachine`] keeps, per queue, which raft entry holds which
//! offsets, and the node reads the bytes back from its write-ahead log.
//!
//! Nothing here touches files, sockets, threads or the clock: time comes in as the master's
//! timestamp inside each batch, so every replica applies the same log to the same state.

mod codec;
pub mod command;
pub mod layout;
pub mod machine;

pub use command::{Batch, Command, DecodeError, Message, PutMode, decode_batch, encode_batch};
pub use layout::{
    ConsumerGroupSettings, LayoutError, Retention, RetryTier, StoreLayout, TopicConfig,
};
pub use machine::{
    Applied, Delivery, EntryRef, GroupMachine, InFlight, ReadPlan, StoredMessage, in_flight_limit,
    is_due,
};
