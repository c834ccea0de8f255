//! Load generators and micro-benchmarks behind `phxq bench`.
//!
//! Benchmarks are programs, not timed tests: they measure and report, and the targets they
//! print pass or miss for are never asserted (a test that fails when the machine is busy tells
//! nobody anything). The binary parses the command line and prints; the measuring lives here.
//!
//! * [`wal`]: the node write-ahead log against the raw disk, from one writer to hundreds
//!   (`phxq bench wal`).
//! * [`store`]: producers against a running store, in PhxQueue's report format, and the
//!   failover timeline (`phxq bench produce`, `phxq bench failover`).
//! * [`consume`]: end-to-end latency from enqueue to handler, producers at a fixed rate and
//!   one consumer pull loop per queue, on [`store`]'s routing and reports
//!   (`phxq bench consume`).

use std::path::PathBuf;

pub mod consume;
pub mod store;
pub mod wal;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options make no sense (say, zero writers); nothing was run.
    #[error("invalid benchmark options: {0}")]
    InvalidOptions(String),
    /// A file operation of the benchmark itself failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A writer thread could not be started.
    #[error("cannot start a writer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The write-ahead log under test failed.
    #[error(transparent)]
    Storage(#[from] phxq_storage::Error),
}

/// Result of benchmark operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_error(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
