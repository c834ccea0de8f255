//! phxq's node shell: one node of a store, driving the raft-rs `RawNode` of every replication
//! group it hosts over the node's one write-ahead log.
//!
//! The heart is [`Node`], a driver that does no networking and no timing of its own: the caller
//! feeds it ticks, peer messages, client requests and sync completions, and calls
//! [`Node::round`], which hands back the messages to send, the answers for clients and the log
//! position that must be made durable. The same `Node` runs inside the real server (threads and
//! TCP, see `server`) and inside the deterministic simulator (`phxq-sim`).
//!
//! The rule this crate exists to keep: **nothing is acknowledged before the fsync that covers
//! it.** A round writes every group's new entries and hard state to the log with one write;
//! messages that claim durability (a follower's append and vote responses) are held until the
//! sync of that write, and the groups learn their entries are persisted
//! (`RawNode::on_persist_ready`) only then, so a master counts its own copy only once it is on
//! disk, and a client's enqueue is answered only when its entry is committed (on disk on a
//! majority) and applied.

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod config;
pub mod coordinator;
mod node;
mod peer_filter;
mod replica;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod transport;

pub use node::{
    Append, GroupStatus, Node, NodeConfig, NodeCounters, NodeError, NodeStatus, Output, Received,
    Request, RequestId, Response, Timing,
};
