//! raft-rs's [`Storage`] for one replication group, read straight from the node's log.
//!
//! raft-rs only *reads* through `Storage`; the node shell writes what a `Ready` hands it with a
//! [`WriteBatch`](crate::WriteBatch) (entries, hard state, snapshot) and syncs before it sends
//! the messages that depend on it. Conversions between raft-rs's protobuf types and ours live
//! here so that nothing else in the crate sees protobuf.

use std::sync::Arc;

use raft::eraftpb::{self, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::{ConfState, EntryKind, Error, GroupId, HardState, LogEntry, Wal};

/// One group's view of a shared [`Wal`], for `raft::RawNode`.
#[derive(Clone)]
pub struct GroupStorage {
    wal: Arc<Wal>,
    group: GroupId,
}

impl GroupStorage {
    /// The storage of `group` in `wal`.
    pub fn new(wal: Arc<Wal>, group: GroupId) -> Self {
        GroupStorage { wal, group }
    }

    /// The group this storage reads.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The shared log.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }
}

fn to_raft(error: Error) -> raft::Error {
    match error {
        Error::Compacted { .. } => raft::Error::Store(StorageError::Compacted),
        Error::Unavailable { .. } => raft::Error::Store(StorageError::Unavailable),
        other => raft::Error::Store(StorageError::Other(Box::new(other))),
    }
}

impl Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let (hard_state, conf_state) = self
            .wal
            .read_group(self.group, |log| {
                (
                    hard_state_to_raft(&log.hard_state),
                    conf_state_to_raft(&log.conf_state),
                )
            })
            .map_err(to_raft)?;
        Ok(RaftState::new(hard_state, conf_state))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<eraftpb::Entry>> {
        let max_size = max_size.into().filter(|&m| m != raft::NO_LIMIT);
        let entries = self
            .wal
            .entries(self.group, low, high, max_size)
            .map_err(to_raft)?;
        Ok(entries.into_iter().map(entry_to_raft).collect())
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        self.wal.term(self.group, index).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.wal
            .read_group(self.group, |log| log.first_index())
            .map_err(to_raft)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.wal
            .read_group(self.group, |log| log.last_index())
            .map_err(to_raft)
    }

    /// The snapshot at the compaction point: its index, term and membership, and in `data` the
    /// state machine there, as the compaction or snapshot install that set it stored it (empty
    /// if none did).
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (info, data) = self
            .wal
            .read_group(self.group, |log| log.info_and_snapshot())
            .map_err(to_raft)?;
        let mut snapshot = Snapshot {
            data: data.to_vec().into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = info.first_index - 1;
        metadata.term = info.compact_term;
        metadata.set_conf_state(conf_state_to_raft(&info.conf_state));
        Ok(snapshot)
    }
}

/// raft-rs entry → log entry.
pub fn entry_from_raft(entry: &eraftpb::Entry) -> LogEntry {
    LogEntry {
        index: entry.index,
        term: entry.term,
        kind: match entry.get_entry_type() {
            eraftpb::EntryType::EntryNormal => EntryKind::Normal,
            eraftpb::EntryType::EntryConfChange => EntryKind::ConfChange,
            eraftpb::EntryType::EntryConfChangeV2 => EntryKind::ConfChangeV2,
        },
        data: entry.data.to_vec(),
        context: entry.context.to_vec(),
    }
}

/// Log entry → raft-rs entry.
pub fn entry_to_raft(entry: LogEntry) -> eraftpb::Entry {
    let mut out = eraftpb::Entry {
        index: entry.index,
        term: entry.term,
        data: entry.data.into(),
        context: entry.context.into(),
        ..Default::default()
    };
    out.set_entry_type(match entry.kind {
        EntryKind::Normal => eraftpb::EntryType::EntryNormal,
        EntryKind::ConfChange => eraftpb::EntryType::EntryConfChange,
        EntryKind::ConfChangeV2 => eraftpb::EntryType::EntryConfChangeV2,
    });
    out
}

/// raft-rs hard state → ours.
pub fn hard_state_from_raft(state: &eraftpb::HardState) -> HardState {
    HardState {
        term: state.term,
        vote: state.vote,
        commit: state.commit,
    }
}

fn hard_state_to_raft(state: &HardState) -> eraftpb::HardState {
    eraftpb::HardState {
        term: state.term,
        vote: state.vote,
        commit: state.commit,
        ..Default::default()
    }
}

/// raft-rs membership → ours.
pub fn conf_state_from_raft(state: &eraftpb::ConfState) -> ConfState {
    ConfState {
        voters: state.voters.clone(),
        learners: state.learners.clone(),
        voters_outgoing: state.voters_outgoing.clone(),
        learners_next: state.learners_next.clone(),
        auto_leave: state.auto_leave,
    }
}

fn conf_state_to_raft(state: &ConfState) -> eraftpb::ConfState {
    eraftpb::ConfState {
        voters: state.voters.clone(),
        learners: state.learners.clone(),
        voters_outgoing: state.voters_outgoing.clone(),
        learners_next: state.learners_next.clone(),
        auto_leave: state.auto_leave,
        ..Default::default()
    }
}
