//! Deterministic simulation of whole phxq stores from one seed.
//!
//! The real [`phxq_node::Node`] runs here, over the real write-ahead log, with everything
//! around it simulated: time (virtual microseconds), the network between nodes (delay,
//! reorder, loss, duplication, symmetric and one-way partitions), the disk (syncs complete
//! late; a crash loses what was never synced or tears the newest write), crashes and
//! restarts, tick rates skewed per node, and a workload of producers and consumers whose
//! every request and answer is recorded. At the end the faults heal, the consumers drain, and
//! read-only checkers compare the history with every replica (see [`history`]).
//!
//! One seed fixes every choice, so `cargo run -p phxq-sim -- --seed N` replays a run exactly.

pub mod disk;
pub mod history;
mod sim;

pub use sim::{Failure, Report, SimConfig, run};
