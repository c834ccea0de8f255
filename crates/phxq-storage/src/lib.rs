//! The node's write-ahead log: one log per node, shared by every replication group it hosts.
//!
//! This is where phxq's first promise, *an acknowledged message is never lost*, is kept or
//! broken. Replication groups append raft entries, hard states and membership to one log;
//! [`Wal::sync`] makes every earlier append durable with one `fdatasync`, so one sync covers
//! every group's appends of an event-loop round (group commit). Concurrent writers waiting for
//! durability share syncs through [`Wal::sync_to`] (threads) or [`Wal::durable`] (futures), with
//! no timer when idle.
//!
//! Layout of this crate:
//!
//! * [`record`](crate::record) frames and encodes records (checksums, torn-write detection);
//! * `index` is the in-memory index: per group, metadata and where each live entry is;
//! * `segment` names, creates and validates segment files;
//! * [`wal`](crate::wal) owns the files: writing, group-commit syncing, recovery, repair,
//!   segment deletion, and poisoning after an fsync failure;
//! * `group_commit` decides who runs the next `fdatasync` and wakes only the callers a sync
//!   concerns;
//! * [`durable`](crate::durable) lets async callers wait for durability ([`Wal::durable`]),
//!   with one syncer thread per log instead of one parked thread per waiter;
//! * [`raft_storage`](crate::raft_storage) is raft-rs's `Storage` for one group over the log;
//! * [`inspect`](crate::inspect) is the read-only report behind `phxq wal inspect`.
//!
//! What the log guarantees, with the tests that try to break it in `tests/`:
//!
//! * every write covered by a successful sync comes back after a crash, exactly;
//! * a torn tail (a write that never completed) is cut off at open;
//! * a damaged byte in synced data is a [`Error::Corruption`] naming the file and offset; the
//!   log does not open on it unless asked to repair ([`WalOptions::repair`]);
//! * after a failed fsync every call fails ([`Error::Poisoned`]): nothing is acknowledged
//!   after it.

pub mod durable;
mod group_commit;
mod index;
pub mod inspect;
pub mod raft_storage;
mod record;
mod recovery;
mod segment;
pub mod wal;

use std::path::PathBuf;

pub use index::CARRY_BACKLOG_SEGMENTS_MAX;
pub use phxq_types::GroupId;
pub use raft_storage::GroupStorage;
pub use record::{
    RECORD_PAYLOAD_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX, SNAPSHOT_CHUNK_FRAME_BYTES_MAX,
};
pub use wal::{RecoveryReport, Wal, WalOptions, WalStats, WriteBatch};

/// Largest snapshot a compaction or snapshot install may carry, in bytes. It is written as
/// records of at most [`SNAPSHOT_CHUNK_BYTES_MAX`] bytes; the limit bounds what recovery
/// reassembles (and is half the record limit, so a format 3 record of one still fits a frame).
pub const SNAPSHOT_BYTES_MAX: usize = RECORD_PAYLOAD_BYTES_MAX / 2;

/// The one group id no group may use: frame headers mark records of no group with it.
pub const GROUP_ID_RESERVED: GroupId = GroupId(u64::MAX);

/// Log sequence number: the number of a [`Wal::write`] call in this process, from 1.
///
/// A sync returns the highest `Lsn` it made durable; every write with a lower or equal `Lsn`
/// is durable too. Lsns are not stored: they restart after every open.
pub type Lsn = u64;

/// Segment files are numbered from 1, in the order they were created.
pub type SegmentId = u64;

/// How an entry's bytes are to be read: raft-rs's entry types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// An application command (for phxq: a batch of queue commands).
    #[default]
    Normal = 0,
    /// A single-step membership change.
    ConfChange = 1,
    /// A joint-consensus membership change.
    ConfChangeV2 = 2,
}

impl EntryKind {
    fn from_u8(value: u8) -> Option<EntryKind> {
        match value {
            0 => Some(EntryKind::Normal),
            1 => Some(EntryKind::ConfChange),
            2 => Some(EntryKind::ConfChangeV2),
            _ => None,
        }
    }
}

/// One replicated log entry, as the log stores it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogEntry {
    /// Position in the group's log, from 1.
    pub index: u64,
    /// Raft term of the master that created the entry.
    pub term: u64,
    /// What the data is.
    pub kind: EntryKind,
    /// The entry's payload.
    pub data: Vec<u8>,
    /// Raft's per-entry context (used by leader transfer and conf changes).
    pub context: Vec<u8>,
}

/// A group's raft hard state: what must survive a restart for the protocol to stay safe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// The latest term this replica has seen.
    pub term: u64,
    /// Who this replica voted for in `term` (0: nobody).
    pub vote: u64,
    /// The highest index known committed.
    pub commit: u64,
}

/// A group's membership, as raft-rs describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConfState {
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration during a joint change.
    pub voters_outgoing: Vec<u64>,
    /// Learners once the joint change completes.
    pub learners_next: Vec<u64>,
    /// Whether the joint configuration leaves by itself.
    pub auto_leave: bool,
}

/// What a group's log holds: the metadata raft needs at start and the live index range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    /// The latest hard state written.
    pub hard_state: HardState,
    /// The latest membership written.
    pub conf_state: ConfState,
    /// The first live index (one past the compaction point).
    pub first_index: u64,
    /// The last index (equal to `first_index - 1` when the group holds no entries).
    pub last_index: u64,
    /// The term of entry `first_index - 1`, the compaction point (0 if never compacted).
    pub compact_term: u64,
    /// The group's state machine at the compaction point `first_index - 1`, as given to the
    /// compaction or snapshot install that set it: opaque bytes, empty if never set. A restarted
    /// replica rebuilds its state machine from it and the live entries; raft-rs sends it to a
    /// follower that needs compacted entries.
    pub snapshot: Vec<u8>,
}

/// Everything that can go wrong in the log.
///
/// Three kinds: a bad request ([`Error::InvalidWrite`], [`Error::Compacted`],
/// [`Error::Unavailable`]) changes nothing and the log goes on; damage
/// ([`Error::Corruption`], [`Error::UnsupportedVersion`]) stops the open; and a failure that
/// voids durability ([`Error::Poisoned`]) stops the log for good.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
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
    /// An earlier write or fsync failed; the log refuses every call until it is reopened.
    #[error("the write-ahead log is poisoned by an earlier write or fsync failure: {cause}")]
    Poisoned {
        /// The failure that poisoned it.
        cause: String,
    },
    /// Synced data failed a check.
    #[error("corruption in {path} at byte {offset}: {reason}")]
    Corruption {
        /// The damaged segment file.
        path: PathBuf,
        /// Byte offset of the damaged record or header in that file.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// A segment written by a format this build does not read.
    #[error(
        "{path}: segment format version {version} is not supported (this build reads {supported})"
    )]
    UnsupportedVersion {
        /// The segment file.
        path: PathBuf,
        /// Its version.
        version: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// Another process has the log open.
    #[error("{path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A write that cannot follow the log as it is; nothing was written.
    #[error("invalid write for {group}: {reason}")]
    InvalidWrite {
        /// The group the write was for.
        group: GroupId,
        /// Why it was refused.
        reason: String,
    },
    /// The requested index was compacted away.
    #[error("{group}: index {index} is compacted (first index is {first_index})")]
    Compacted {
        /// The group.
        group: GroupId,
        /// The index asked for.
        index: u64,
        /// The group's first live index.
        first_index: u64,
    },
    /// The requested index is past the end of the log.
    #[error("{group}: index {index} is past the last index {last_index}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// The index asked for.
        index: u64,
        /// The group's last index.
        last_index: u64,
    },
}

/// Result of log operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_error(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
