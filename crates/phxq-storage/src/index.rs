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
//!   after every entry below it), so a group pins a contiguous range of segments;
//! * a group's snapshot (the state machine at its compaction point) is read back from the
//!   chunks that last wrote it, in segment `snapshot_at`; `segment_use[s].live_snapshots`
//!   counts the groups whose snapshot lives in `s`, and such a segment is not deleted (the
//!   checkpoints that open later segments name the compaction point but carry no snapshot).

use std::collections::BTreeMap;
use std::sync::Arc;

use phxq_types::GroupId;

use crate::record::{self, GroupCheckpoint, Record};
use crate::{ConfState, GroupInfo, HardState, Lsn, SegmentId};

/// Sealed segments kept only by snapshots beyond which a write carries every snapshot of the
/// oldest one instead of one. At most one segment dies per segment started, so past this
/// backlog the carry keeps up with any rate of rolls: the segments waiting stay bounded, and
/// so does the disk. Below it, a write carries one snapshot, spreading the copies.
pub const CARRY_BACKLOG_SEGMENTS_MAX: usize = 4;

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
    /// The state machine at `compact_index` (empty when never set).
    pub snapshot: Arc<[u8]>,
    /// The segment holding the copy of `snapshot` that recovery reads; `None` when the group
    /// has none (never compacted), or, during replay, when a checkpoint moved the compaction
    /// point past the snapshot read so far (its chunks must follow).
    pub snapshot_at: Option<SegmentId>,
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
            snapshot: None,
        }
    }
}

/// Per segment: live entries and snapshots left and the last time one was released.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SegmentUse {
    pub live_entries: u64,
    /// Groups whose snapshot is read from this segment.
    pub live_snapshots: u64,
    /// The write that last released an entry or snapshot of this segment. The segment may be
    /// deleted only once that write is durable, or a crash could bring back a log that still
    /// needs it.
    pub released_at: Lsn,
}

impl SegmentUse {
    /// Nothing in the segment is needed any more.
    pub fn dead(&self) -> bool {
        self.live_entries == 0 && self.live_snapshots == 0
    }
}

/// A snapshot whose chunks are being read: the next chunk must start at `next_offset`.
#[derive(Debug)]
struct PendingSnapshot {
    index: u64,
    term: u64,
    total_bytes: u64,
    next_offset: u64,
    /// The chunks so far (left empty when the chunks point into the whole snapshot).
    bytes: Vec<u8>,
}

/// A record that cannot follow the records before it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Inconsistent(pub String);

#[derive(Debug, Default)]
pub(crate) struct LogIndex {
    pub groups: BTreeMap<GroupId, GroupLog>,
    pub segment_use: BTreeMap<SegmentId, SegmentUse>,
    /// How many times a segment's last live entry or snapshot was released (a segment may
    /// have become deletable).
    pub segments_emptied: u64,
    /// Snapshots whose last chunk has not been applied yet, per group. A chunk that does not
    /// continue the group's pending snapshot drops it: that snapshot never happened.
    pending: BTreeMap<GroupId, PendingSnapshot>,
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
                let at = (*index, *term, Arc::clone(snapshot));
                self.set_snapshot(*group, at, location.0, lsn)?;
            }
            Record::SnapshotChunk { group, .. } => {
                if let Some(snapshot) = self.assemble(record) {
                    self.set_snapshot(*group, snapshot, location.0, lsn)?;
                }
            }
            Record::TruncateSuffix { group, from_index } => {
                let log = self.groups.entry(*group).or_default();
                let removed = log.entries.split_off(from_index);
                self.release(removed.values(), lsn);
            }
            Record::Checkpoint { groups } => {
                for g in groups {
                    self.apply_checkpoint(g, location.0, lsn);
                }
            }
        }
        Ok(())
    }

    /// Adds a chunk to its group's pending snapshot; returns the snapshot `(index, term,
    /// bytes)` when this was its last chunk. A chunk that does not continue the pending
    /// snapshot (one was missing) drops it and is dropped.
    fn assemble(&mut self, chunk: &Record) -> Option<(u64, u64, Arc<[u8]>)> {
        let Record::SnapshotChunk {
            group,
            index,
            term,
            total_bytes,
            offset,
            bytes,
        } = chunk
        else {
            unreachable!("only chunks are assembled")
        };
        if *offset == 0 {
            let pending = PendingSnapshot {
                index: *index,
                term: *term,
                total_bytes: *total_bytes,
                next_offset: 0,
                bytes: Vec::new(),
            };
            self.pending.insert(*group, pending);
        }
        let continues = self.pending.get(group).is_some_and(|p| {
            (p.index, p.term, p.total_bytes, p.next_offset)
                == (*index, *term, *total_bytes, *offset)
        });
        if !continues {
            self.pending.remove(group);
            return None;
        }
        let pending = self.pending.get_mut(group).expect("checked above");
        // The writer's chunks point into the whole snapshot: nothing to copy.
        let whole = bytes.source.len() as u64 == *total_bytes && bytes.start as u64 == *offset;
        if !whole {
            pending.bytes.extend_from_slice(bytes.as_slice());
        }
        pending.next_offset += bytes.len as u64;
        if pending.next_offset < *total_bytes {
            return None;
        }
        let pending = self.pending.remove(group).expect("checked above");
        let snapshot = if whole {
            Arc::clone(&bytes.source)
        } else {
            Arc::from(pending.bytes)
        };
        Some((*index, *term, snapshot))
    }

    /// A whole snapshot `(index, term, bytes)` of `group` was read from `segment`: past the
    /// compaction point it compacts (entries up to `index` are gone); at it, the same snapshot
    /// now lives in `segment` (carried forward, or after a checkpoint).
    fn set_snapshot(
        &mut self,
        group: GroupId,
        (index, term, snapshot): (u64, u64, Arc<[u8]>),
        segment: SegmentId,
        lsn: Lsn,
    ) -> Result<(), Inconsistent> {
        let log = self.groups.entry(group).or_default();
        if index < log.compact_index || (index == log.compact_index && term != log.compact_term) {
            return Err(Inconsistent(format!(
                "{group}: snapshot at {index}@{term} behind the compaction point {}@{}",
                log.compact_index, log.compact_term
            )));
        }
        let kept = log.entries.split_off(&(index + 1));
        let removed = std::mem::replace(&mut log.entries, kept);
        log.compact_index = index;
        log.compact_term = term;
        log.snapshot = snapshot;
        let previous = log.snapshot_at.replace(segment);
        self.segment_use.entry(segment).or_default().live_snapshots += 1;
        self.unpin(previous, lsn);
        self.release(removed.values(), lsn);
        Ok(())
    }

    /// Sets a group's metadata from a checkpoint and drops entries outside its live range.
    /// Entries a deleted segment held may be missing inside the range for a while; later
    /// records replace them, or recovery reports the gap. A format 4 checkpoint carries no
    /// snapshot: the one read so far stays if it is at the checkpoint's compaction point, and
    /// is forgotten otherwise (the chunks of the right one must follow).
    fn apply_checkpoint(&mut self, g: &GroupCheckpoint, segment: SegmentId, lsn: Lsn) {
        let log = self.groups.entry(g.group).or_default();
        let moved = (log.compact_index, log.compact_term) != (g.compact_index, g.compact_term);
        let forgotten = if moved || g.snapshot.is_some() {
            log.snapshot = Arc::from(&[][..]);
            log.snapshot_at.take()
        } else {
            None
        };
        log.hard_state = g.hard_state.clone();
        log.conf_state = g.conf_state.clone();
        log.compact_index = g.compact_index;
        log.compact_term = g.compact_term;
        // Format 3 checkpoints carry every group's snapshot, empty ones of groups never
        // compacted included: only a compaction point needs one.
        if let Some(snapshot) = g.snapshot.as_ref().filter(|_| g.compact_index > 0) {
            log.snapshot = Arc::clone(snapshot);
            log.snapshot_at = Some(segment);
            self.segment_use.entry(segment).or_default().live_snapshots += 1;
        }
        let log = self.groups.get_mut(&g.group).expect("inserted above");
        let above = log.entries.split_off(&(g.last_index + 1));
        let kept = log.entries.split_off(&(g.compact_index + 1));
        let below = std::mem::replace(&mut log.entries, kept);
        self.unpin(forgotten, lsn);
        self.release(above.values().chain(below.values()), lsn);
    }

    /// A group's snapshot no longer lives in `segment`.
    fn unpin(&mut self, segment: Option<SegmentId>, lsn: Lsn) {
        if let Some(segment) = segment {
            self.end_use(segment, lsn, |usage| &mut usage.live_snapshots);
        }
    }

    /// One use of `segment` (an entry or a snapshot: `count` picks which) ended with write
    /// `lsn`.
    fn end_use(&mut self, segment: SegmentId, lsn: Lsn, count: fn(&mut SegmentUse) -> &mut u64) {
        let usage = self
            .segment_use
            .get_mut(&segment)
            .expect("a live entry's or snapshot's segment is tracked");
        let live = count(usage);
        *live = live
            .checked_sub(1)
            .expect("live counts never go below zero");
        usage.released_at = usage.released_at.max(lsn);
        if usage.dead() {
            self.segments_emptied += 1;
        }
    }

    /// Groups compacted past the snapshot replay found (it must have lived in a segment that
    /// is gone). Checked after a replay: every group with a compaction point has its snapshot.
    pub fn missing_snapshots(&self) -> Vec<(GroupId, u64)> {
        self.groups
            .iter()
            .filter(|(_, log)| log.compact_index > 0 && log.snapshot_at.is_none())
            .map(|(&group, log)| (group, log.compact_index))
            .collect()
    }

    /// Snapshot chunks whose last chunk never came are dropped: those snapshots never happened.
    pub fn drop_pending_snapshots(&mut self) {
        self.pending.clear();
    }

    /// Empties a group that lost its snapshot: compaction point, entries and commit go to
    /// nothing (term, vote and membership stay). Only for repair: the group catches up from
    /// its peers by snapshot.
    pub fn empty_group(&mut self, group: GroupId, lsn: Lsn) {
        let log = self.groups.get_mut(&group).expect("group exists");
        let removed = std::mem::take(&mut log.entries);
        log.compact_index = 0;
        log.compact_term = 0;
        log.snapshot = Arc::from(&[][..]);
        log.hard_state.commit = 0;
        let forgotten = log.snapshot_at.take();
        self.unpin(forgotten, lsn);
        self.release(removed.values(), lsn);
    }

    /// The groups whose snapshots are to be carried forward out of the oldest sealed segment
    /// (older than `active`) kept only by snapshots, so that it can go: one group, or all of
    /// that segment's when more than [`CARRY_BACKLOG_SEGMENTS_MAX`] segments wait so.
    pub fn carry_due(&self, active: SegmentId) -> Vec<GroupId> {
        let waiting: Vec<SegmentId> = self
            .segment_use
            .iter()
            .filter(|&(&id, u)| id < active && u.live_entries == 0 && u.live_snapshots > 0)
            .map(|(&id, _)| id)
            .collect();
        let Some(&oldest) = waiting.first() else {
            return Vec::new();
        };
        let groups = self
            .groups
            .iter()
            .filter(|(_, log)| log.snapshot_at == Some(oldest))
            .map(|(&group, _)| group);
        if waiting.len() > CARRY_BACKLOG_SEGMENTS_MAX {
            groups.collect()
        } else {
            groups.take(1).collect()
        }
    }

    fn release<'a>(&mut self, removed: impl Iterator<Item = &'a EntryLocation>, lsn: Lsn) {
        for location in removed {
            self.end_use(location.segment, lsn, |usage| &mut usage.live_entries);
        }
    }

    /// Every group's metadata, for the checkpoint that opens a new segment: records to be
    /// written as one write. No snapshots: each stays where it was written (see the module
    /// docs).
    pub fn checkpoint(&self) -> Vec<Record> {
        record::checkpoint_records(
            self.groups
                .iter()
                .map(|(&group, log)| log.checkpoint(group)),
        )
    }

    /// The checkpoint, then a copy of every group's snapshot in chunks: the first write of the
    /// segment repair starts, which must not depend on the segments it rewrites.
    pub fn checkpoint_with_snapshots(&self) -> Vec<Record> {
        let mut records = self.checkpoint();
        for (&group, log) in &self.groups {
            if log.snapshot_at.is_some() {
                let (index, term) = (log.compact_index, log.compact_term);
                records.extend(record::snapshot_chunks(group, index, term, &log.snapshot));
            }
        }
        records
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
        let mut pins: BTreeMap<SegmentId, u64> = BTreeMap::new();
        for (group, log) in &self.groups {
            if let Some(segment) = log.snapshot_at {
                *pins.entry(segment).or_default() += 1;
            }
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
            let expected = pins.get(segment).copied().unwrap_or(0);
            if usage.live_snapshots != expected {
                return Err(Inconsistent(format!(
                    "segment {segment}: counted {expected} live snapshots, tracked {}",
                    usage.live_snapshots
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
                snapshot: Some(Arc::from(&b"at 2"[..])),
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

    /// The chunks of `snapshot` as recovery decodes them: each owning only its bytes.
    fn decoded_chunks(group: GroupId, index: u64, snapshot: &[u8]) -> Vec<Record> {
        record::snapshot_chunks(group, index, 1, &Arc::from(snapshot))
            .into_iter()
            .map(|chunk| match chunk {
                Record::SnapshotChunk {
                    group,
                    index,
                    term,
                    total_bytes,
                    offset,
                    bytes,
                } => Record::SnapshotChunk {
                    group,
                    index,
                    term,
                    total_bytes,
                    offset,
                    bytes: record::ChunkBytes {
                        source: Arc::from(bytes.as_slice()),
                        start: 0,
                        len: bytes.len,
                    },
                },
                other => other,
            })
            .collect()
    }

    #[test]
    fn a_snapshot_takes_effect_at_its_last_chunk_and_never_with_one_missing() {
        let chunk = record::SNAPSHOT_CHUNK_BYTES_MAX;
        let old: Vec<u8> = vec![1; 10];
        let new: Vec<u8> = (0..3 * chunk + 5).map(|i| (i % 253) as u8).collect();
        let mut ix = LogIndex::default();
        for i in 1..=9 {
            ix.apply(&entry(i, 1), (1, i * 10, 10), 1).unwrap();
        }
        for c in decoded_chunks(G, 3, &old) {
            ix.apply(&c, (1, 100, 10), 1).unwrap();
        }
        assert_eq!(
            (ix.groups[&G].compact_index, &ix.groups[&G].snapshot[..]),
            (3, &old[..])
        );
        let chunks = decoded_chunks(G, 6, &new);
        assert_eq!(chunks.len(), 4);
        // The second chunk is missing where it was due (it comes last): the third does not
        // continue the first, so no snapshot, whatever follows.
        for c in [&chunks[0], &chunks[2], &chunks[3], &chunks[1]] {
            ix.apply(c, (2, 0, 10), 2).unwrap();
        }
        assert_eq!(
            ix.groups[&G].compact_index, 3,
            "a snapshot with a hole took effect"
        );
        assert_eq!(&ix.groups[&G].snapshot[..], &old[..]);
        // A torn sequence (chunks 0 and 1 only) then a whole one: the whole one wins.
        for c in chunks.iter().take(2).chain(&chunks) {
            ix.apply(c, (2, 0, 10), 3).unwrap();
        }
        let log = &ix.groups[&G];
        assert_eq!((log.compact_index, log.first_index()), (6, 7));
        assert!(log.snapshot[..] == new[..], "reassembled bytes differ");
        assert_eq!(log.snapshot_at, Some(2));
        assert_eq!(
            (
                ix.segment_use[&1].live_snapshots,
                ix.segment_use[&2].live_snapshots
            ),
            (0, 1)
        );
        ix.validate().unwrap();
        // Chunks of another group in between change nothing for this one.
        let other = GroupId(2);
        let mut tail = decoded_chunks(G, 8, &new);
        let last = tail.pop().unwrap();
        for c in tail
            .iter()
            .chain(&decoded_chunks(other, 1, b"x"))
            .chain([&last])
        {
            ix.apply(c, (3, 0, 10), 4).unwrap();
        }
        assert_eq!(ix.groups[&G].compact_index, 8);
        ix.validate().unwrap();
    }

    #[test]
    fn a_checkpoint_past_the_snapshot_read_so_far_leaves_it_missing_until_its_chunks_come() {
        let mut ix = LogIndex::default();
        for i in 1..=6 {
            ix.apply(&entry(i, 1), (1, i, 10), 1).unwrap();
        }
        for c in decoded_chunks(G, 2, b"at 2") {
            ix.apply(&c, (1, 50, 10), 1).unwrap();
        }
        let checkpoint = Record::Checkpoint {
            groups: vec![GroupCheckpoint {
                group: G,
                compact_index: 4,
                compact_term: 1,
                last_index: 6,
                ..Default::default()
            }],
        };
        ix.apply(&checkpoint, (2, 0, 10), 2).unwrap();
        assert_eq!(ix.missing_snapshots(), [(G, 4)]);
        for c in decoded_chunks(G, 4, b"at 4") {
            ix.apply(&c, (2, 60, 10), 2).unwrap();
        }
        assert!(ix.missing_snapshots().is_empty());
        assert_eq!(&ix.groups[&G].snapshot[..], b"at 4");
        ix.validate().unwrap();
    }
}
