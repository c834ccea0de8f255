//! The in-memory index of the log: per group, its metadata and where each live entry's frame
//! is; per segment, how many live entries it still holds. No I/O.
//!
//! Live writes and recovery apply records through the same [`LogIndex::apply`], so the state
//! after a restart is, by construction, the state the writer had. Invariants:
//!
//! * a group's live entries are exactly `compact_index + 1 ..= last_index`, with no gap
//!   (checked by [`LogIndex::validate`], and after recovery);
//! * `segment_use[s].live_entries` is the number of live entries whose frame is in segment `s`;
//! * entry `i + 1` of a group is never in an older segment than entry `i` (an entry is written
//!   after every entry below it), so a group pins a contiguous range of segments.

use std::collections::BTreeMap;
use std::sync::Arc;

use phxq_types::GroupId;

use crate::record::{self, GroupCheckpoint, Record};
use crate::{ConfState, GroupInfo, HardState, Lsn, SegmentId};

/// Where an entry's frame lives, and its term (kept in memory: raft asks for terms often).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryLocation {
    pub term: u64,
    pub segment: SegmentId,
    pub offset: u64,
    pub frame_len: u32,
}

/// One group's view of the log.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupLog {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Entries up to here are compacted away; `first_index = compact_index + 1`.
    pub compact_index: u64,
    /// Term of entry `compact_index` (0 when nothing was compacted).
    pub compact_term: u64,
    /// The state machine at `compact_index` (empty when never set). Shared with the
    /// checkpoints that repeat it.
    pub snapshot: Arc<[u8]>,
    pub entries: BTreeMap<u64, EntryLocation>,
}

impl GroupLog {
    pub fn first_index(&self) -> u64 {
        self.compact_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.entries
            .last_key_value()
            .map_or(self.compact_index, |(&i, _)| i)
    }

    /// Term of entry `index`, if it is live or is the compaction point.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.compact_index {
            return Some(self.compact_term);
        }
        self.entries.get(&index).map(|l| l.term)
    }

    /// The first index at which the live entries stop being contiguous, if any.
    pub fn first_gap(&self) -> Option<u64> {
        (self.first_index()..)
            .zip(self.entries.keys())
            .find(|(expected, index)| expected != *index)
            .map(|(expected, _)| expected)
    }

    /// The public view of the group.
    pub fn info(&self) -> GroupInfo {
        let (info, snapshot) = self.info_and_snapshot();
        GroupInfo {
            snapshot: snapshot.to_vec(),
            ..info
        }
    }

    /// The public view of the group with its snapshot still shared (and left out of the
    /// `GroupInfo`): a caller holding a lock copies the snapshot after releasing it.
    pub fn info_and_snapshot(&self) -> (GroupInfo, Arc<[u8]>) {
        let info = GroupInfo {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            first_index: self.first_index(),
            last_index: self.last_index(),
            compact_term: self.compact_term,
            snapshot: Vec::new(),
        };
        (info, Arc::clone(&self.snapshot))
    }

    fn checkpoint(&self, group: GroupId) -> GroupCheckpoint {
        GroupCheckpoint {
            group,
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            compact_index: self.compact_index,
            compact_term: self.compact_term,
            last_index: self.last_index(),
            snapshot: Arc::clone(&self.snapshot),
        }
    }
}

/// Per segment: live entries left and the last time one was released.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SegmentUse {
    pub live_entries: u64,
    /// The write that last released an entry of this segment. The segment may be deleted only
    /// once that write is durable, or a crash could bring back a log that still needs it.
    pub released_at: Lsn,
}

/// A record that cannot follow the records before it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Inconsistent(pub String);

#[derive(Debug, Default)]
pub(crate) struct LogIndex {
    pub groups: BTreeMap<GroupId, GroupLog>,
    pub segment_use: BTreeMap<SegmentId, SegmentUse>,
    /// How many times a segment's last live entry was released (a segment may have become
    /// deletable).
    pub segments_emptied: u64,
}

impl LogIndex {
    /// Applies one record. `location` is the record's frame (used by entries); `lsn` is the
    /// write it belongs to.
    pub fn apply(
        &mut self,
        record: &Record,
        location: (SegmentId, u64, u32),
        lsn: Lsn,
    ) -> Result<(), Inconsistent> {
        match record {
            Record::Entry { group, entry } => {
                let log = self.groups.entry(*group).or_default();
                if entry.index <= log.compact_index {
                    return Err(Inconsistent(format!(
                        "{group}: entry {} at or below the compaction point {}",
                        entry.index, log.compact_index
                    )));
                }
                let removed = log.entries.split_off(&entry.index);
                let (segment, offset, frame_len) = location;
                log.entries.insert(
                    entry.index,
                    EntryLocation {
                        term: entry.term,
                        segment,
                        offset,
                        frame_len,
                    },
                );
                self.segment_use.entry(segment).or_default().live_entries += 1;
                self.release(removed.values(), lsn);
            }
            Record::HardState { group, state } => {
                self.groups.entry(*group).or_default().hard_state = state.clone();
            }
            Record::ConfState { group, state } => {
                self.groups.entry(*group).or_default().conf_state = state.clone();
            }
            Record::Compact {
                group,
                index,
                term,
                snapshot,
            } => {
                let log = self.groups.entry(*group).or_default();
                if *index < log.compact_index {
                    return Err(Inconsistent(format!(
                        "{group}: compaction to {index} below the compaction point {}",
                        log.compact_index
                    )));
                }
                let kept = log.entries.split_off(&(index + 1));
                let removed = std::mem::replace(&mut log.entries, kept);
                log.compact_index = *index;
                log.compact_term = *term;
                log.snapshot = Arc::clone(snapshot);
                self.release(removed.values(), lsn);
            }
            Record::TruncateSuffix { group, from_index } => {
                let log = self.groups.entry(*group).or_default();
                let removed = log.entries.split_off(from_index);
                self.release(removed.values(), lsn);
            }
            Record::Checkpoint { groups } => {
                for g in groups {
                    self.apply_checkpoint(g, lsn);
                }
            }
        }
        Ok(())
    }

    /// Sets a group's metadata from a checkpoint and drops entries outside its live range.
    /// Entries a deleted segment held may be missing inside the range for a while; later
    /// records replace them, or recovery reports the gap.
    fn apply_checkpoint(&mut self, g: &GroupCheckpoint, lsn: Lsn) {
        let log = self.groups.entry(g.group).or_default();
        log.hard_state = g.hard_state.clone();
        log.conf_state = g.conf_state.clone();
        log.compact_index = g.compact_index;
        log.compact_term = g.compact_term;
        log.snapshot = Arc::clone(&g.snapshot);
        let above = log.entries.split_off(&(g.last_index + 1));
        let kept = log.entries.split_off(&(g.compact_index + 1));
        let below = std::mem::replace(&mut log.entries, kept);
        self.release(above.values().chain(below.values()), lsn);
    }

    fn release<'a>(&mut self, removed: impl Iterator<Item = &'a EntryLocation>, lsn: Lsn) {
        for location in removed {
            let usage = self
                .segment_use
                .get_mut(&location.segment)
                .expect("a live entry's segment is tracked");
            usage.live_entries = usage
                .live_entries
                .checked_sub(1)
                .expect("live entry count never goes below zero");
            usage.released_at = usage.released_at.max(lsn);
            if usage.live_entries == 0 {
                self.segments_emptied += 1;
            }
        }
    }

    /// Every group's metadata, for the checkpoint that opens a new segment: records to be
    /// written as one write.
    pub fn checkpoint(&self) -> Vec<Record> {
        record::checkpoint_records(
            self.groups
                .iter()
                .map(|(&group, log)| log.checkpoint(group)),
        )
    }

    /// Drops a group's entries from `from_index` on and lowers its commit index to what it
    /// still holds. Only for repair: the group's lost entries come back from its peers.
    pub fn cut(&mut self, group: GroupId, from_index: u64, lsn: Lsn) {
        let log = self.groups.get_mut(&group).expect("group exists");
        let removed = log.entries.split_off(&from_index);
        log.hard_state.commit = log.hard_state.commit.min(log.last_index());
        self.release(removed.values(), lsn);
    }

    /// Checks the invariants named in the module docs. Costs a walk over every live entry.
    pub fn validate(&self) -> Result<(), Inconsistent> {
        let mut counted: BTreeMap<SegmentId, u64> = BTreeMap::new();
        for (group, log) in &self.groups {
            if let Some(gap) = log.first_gap() {
                return Err(Inconsistent(format!(
                    "{group}: entry {gap} is missing (live range {}..={})",
                    log.first_index(),
                    log.last_index()
                )));
            }
            let mut previous_segment = 0;
            for location in log.entries.values() {
                if location.segment < previous_segment {
                    return Err(Inconsistent(format!(
                        "{group}: entries out of segment order"
                    )));
                }
                previous_segment = location.segment;
                *counted.entry(location.segment).or_default() += 1;
            }
        }
        for (segment, usage) in &self.segment_use {
            let expected = counted.get(segment).copied().unwrap_or(0);
            if usage.live_entries != expected {
                return Err(Inconsistent(format!(
                    "segment {segment}: counted {expected} live entries, tracked {}",
                    usage.live_entries
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryKind, LogEntry};

    const G: GroupId = GroupId(1);

    fn entry(index: u64, term: u64) -> Record {
        Record::Entry {
            group: G,
            entry: LogEntry {
                index,
                term,
                kind: EntryKind::Normal,
                data: vec![],
                context: vec![],
            },
        }
    }

    fn indexes(ix: &LogIndex) -> Vec<(u64, u64)> {
        ix.groups[&G]
            .entries
            .iter()
            .map(|(&i, l)| (i, l.term))
            .collect()
    }

    #[test]
    fn an_entry_replaces_everything_from_its_index() {
        let mut ix = LogIndex::default();
        for i in 1..=5 {
            ix.apply(&entry(i, 1), (1, i * 100, 10), 1).unwrap();
        }
        ix.apply(&entry(3, 2), (2, 0, 10), 2).unwrap();
        assert_eq!(indexes(&ix), vec![(1, 1), (2, 1), (3, 2)]);
        assert_eq!(ix.segment_use[&1].live_entries, 2);
        assert_eq!(ix.segment_use[&1].released_at, 2);
        ix.validate().unwrap();
    }

    #[test]
    fn compaction_releases_segments_and_remembers_the_term() {
        let mut ix = LogIndex::default();
        for i in 1..=4 {
            ix.apply(&entry(i, i), (i, 0, 10), 1).unwrap();
        }
        let compact = Record::Compact {
            group: G,
            index: 2,
            term: 2,
            snapshot: Arc::from(&b"at 2"[..]),
        };
        ix.apply(&compact, (4, 50, 10), 7).unwrap();
        let log = &ix.groups[&G];
        assert_eq!((log.first_index(), log.last_index()), (3, 4));
        assert_eq!(log.term(2), Some(2));
        assert_eq!(log.term(1), None);
        assert_eq!(log.info().snapshot, b"at 2");
        assert_eq!(ix.segment_use[&1].live_entries, 0);
        assert_eq!(ix.segment_use[&2].released_at, 7);
        assert!(ix.apply(&entry(2, 9), (5, 0, 10), 8).is_err());
        ix.validate().unwrap();
    }

    #[test]
    fn a_checkpoint_clamps_entries_a_deleted_segment_had_removed() {
        let mut ix = LogIndex::default();
        for i in 1..=6 {
            ix.apply(&entry(i, 1), (1, i, 10), 1).unwrap();
        }
        // The segment that truncated to 4 and compacted to 2 is gone; its successor's
        // checkpoint still knows.
        let checkpoint = Record::Checkpoint {
            groups: vec![GroupCheckpoint {
                group: G,
                compact_index: 2,
                compact_term: 1,
                last_index: 4,
                snapshot: Arc::from(&b"at 2"[..]),
                ..Default::default()
            }],
        };
        ix.apply(&checkpoint, (3, 0, 10), 2).unwrap();
        assert_eq!(indexes(&ix), vec![(3, 1), (4, 1)]);
        assert_eq!(ix.groups[&G].info().snapshot, b"at 2");
        ix.validate().unwrap();
    }

    #[test]
    fn validate_reports_a_gap_and_repair_cuts_the_group_there() {
        let mut ix = LogIndex::default();
        ix.apply(&entry(1, 1), (1, 0, 10), 1).unwrap();
        ix.apply(&entry(2, 1), (1, 10, 10), 1).unwrap();
        ix.apply(&entry(3, 1), (1, 20, 10), 1).unwrap();
        ix.groups.get_mut(&G).unwrap().entries.remove(&2);
        ix.segment_use.get_mut(&1).unwrap().live_entries -= 1;
        ix.groups.get_mut(&G).unwrap().hard_state.commit = 3;
        assert!(ix.validate().unwrap_err().0.contains("entry 2 is missing"));
        ix.cut(G, 2, 5);
        assert_eq!(indexes(&ix), vec![(1, 1)]);
        assert_eq!(ix.groups[&G].hard_state.commit, 1);
        ix.validate().unwrap();
    }
}
