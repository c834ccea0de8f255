//! Replaying segment files into a [`LogIndex`]. Reads files; writes nothing.
//!
//! The same scan serves three callers: a normal open (strict: the first damage is an error),
//! the repair pass (lenient: damage is skipped by resynchronising on the next valid frame, and
//! groups left with a gap are cut there) and `phxq wal inspect` (lenient, and only reports).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use phxq_types::GroupId;

use crate::index::LogIndex;
use crate::record::{self, Affected, Frame, Record};
use crate::segment::{self, Header, SEGMENT_HEADER_BYTES};
use crate::{Error, Result, SegmentId, io_error};

/// How to treat damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The first damage, or an entry missing from a group's live range, is an error.
    Strict,
    /// Skip damaged bytes (resynchronising on the next valid frame) and cut each group that
    /// lost a record; its peers resend the rest. For repair and inspection.
    Lenient,
}

/// A damaged byte range of a segment: `offset..end` is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where the damage starts.
    pub offset: u64,
    /// Where valid frames start again (the file length if they never do).
    pub end: u64,
    /// What failed.
    pub reason: String,
}

/// Records of one group in one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupRecords {
    /// Records of any kind for the group.
    pub records: u64,
    /// Entry records.
    pub entries: u64,
    /// Lowest and highest entry index written in this segment.
    pub index_range: Option<(u64, u64)>,
}

/// What the scan found in one segment file.
#[derive(Clone, Debug)]
pub struct ScannedSegment {
    /// Segment number.
    pub id: SegmentId,
    /// File path.
    pub path: PathBuf,
    /// File length in bytes.
    pub file_bytes: u64,
    /// Bytes up to the end of the last whole record (0 when the header is torn).
    pub valid_bytes: u64,
    /// The header never reached the disk (only the newest segment may be like this).
    pub header_torn: bool,
    /// The whole segment is unreadable (damaged header); repair moves it aside.
    pub unreadable: Option<String>,
    /// Offset of a torn tail that recovery cuts, if any.
    pub torn_at: Option<u64>,
    /// Damaged ranges (only in lenient mode; strict mode fails on the first).
    pub damage: Vec<Damage>,
    /// Whole records, by kind name.
    pub records_by_kind: BTreeMap<&'static str, u64>,
    /// Records per group.
    pub groups: BTreeMap<GroupId, GroupRecords>,
}

/// The outcome of a replay.
pub(crate) struct Replay {
    pub index: LogIndex,
    pub segments: Vec<ScannedSegment>,
    pub records: u64,
    /// Groups cut by repair, and the first index each lost (lenient mode only).
    pub cut_groups: Vec<(GroupId, u64)>,
    /// Groups that lost a record to damage: the last index each may keep.
    keep_through: BTreeMap<GroupId, u64>,
    /// A record of unknown group was lost: groups first seen later may have lost state too.
    unknown_group_lost: bool,
}

fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corruption {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Replays `segments` (oldest first) into a fresh index.
pub(crate) fn replay(dir: &Path, segments: &[(SegmentId, PathBuf)], mode: Mode) -> Result<Replay> {
    let mut out = Replay {
        index: LogIndex::default(),
        segments: Vec::with_capacity(segments.len()),
        records: 0,
        cut_groups: Vec::new(),
        keep_through: BTreeMap::new(),
        unknown_group_lost: false,
    };
    for (position, (id, path)) in segments.iter().enumerate() {
        let newest = position + 1 == segments.len();
        let bytes = std::fs::read(path).map_err(|e| io_error("read segment", path, e))?;
        let scanned = scan_segment(*id, path, &bytes, newest, mode, &mut out)?;
        out.segments.push(scanned);
    }
    out.index.drop_pending_snapshots();
    for (group, compact_index) in out.index.missing_snapshots() {
        if mode == Mode::Strict {
            return Err(corruption(
                dir,
                0,
                format!(
                    "{group}: the snapshot at compaction point {compact_index} is missing; \
                     the segment holding it was lost or damaged"
                ),
            ));
        }
        out.index.empty_group(group, 0);
        out.cut_groups.push((group, 1));
    }
    if out.unknown_group_lost {
        for &group in out.index.groups.keys() {
            out.keep_through.entry(group).or_insert(0);
        }
    }
    for (group, keep_through) in std::mem::take(&mut out.keep_through) {
        let Some(log) = out.index.groups.get(&group) else {
            continue;
        };
        // The state at the loss may itself be partial (a stale hard state whose clamp was in
        // the lost checkpoint), so the commit index is checked against what is left too.
        let from = keep_through.min(log.last_index()) + 1;
        if log.last_index() >= from || log.hard_state.commit >= from {
            out.index.cut(group, from, 0);
            out.cut_groups.push((group, from));
        }
    }
    let gaps: Vec<(GroupId, u64)> = out
        .index
        .groups
        .iter()
        .filter_map(|(&group, log)| log.first_gap().map(|gap| (group, gap)))
        .collect();
    for (group, gap) in gaps {
        if mode == Mode::Strict {
            let log = &out.index.groups[&group];
            return Err(corruption(
                dir,
                0,
                format!(
                    "{group}: entry {gap} is missing from the live range {}..={}; \
                     a segment holding it was lost or damaged",
                    log.first_index(),
                    log.last_index()
                ),
            ));
        }
        out.index.cut(group, gap, 0);
        out.cut_groups.push((group, gap));
    }
    if let Err(inconsistent) = out.index.validate() {
        panic!(
            "log index invariant broken after replay: {}",
            inconsistent.0
        );
    }
    Ok(out)
}

fn scan_segment(
    id: SegmentId,
    path: &Path,
    bytes: &[u8],
    newest: bool,
    mode: Mode,
    out: &mut Replay,
) -> Result<ScannedSegment> {
    let mut scanned = ScannedSegment {
        id,
        path: path.to_path_buf(),
        file_bytes: bytes.len() as u64,
        valid_bytes: 0,
        header_torn: false,
        unreadable: None,
        torn_at: None,
        damage: Vec::new(),
        records_by_kind: BTreeMap::new(),
        groups: BTreeMap::new(),
    };
    match segment::check_header(path, id, bytes) {
        Ok(Header::Valid) => {}
        Ok(Header::Torn) if newest => {
            scanned.header_torn = true;
            return Ok(scanned);
        }
        Ok(Header::Torn) => {
            let error = corruption(path, 0, "sealed segment has no header");
            return unreadable(error, scanned, mode, out);
        }
        Err(error @ Error::Corruption { .. }) => return unreadable(error, scanned, mode, out),
        Err(other) => return Err(other),
    }
    let body = &bytes[SEGMENT_HEADER_BYTES..];
    let base = SEGMENT_HEADER_BYTES;
    let zeros_start = record::trailing_zeros_start(body);
    let mut pos = 0;
    // Frames of a write whose last frame has not been seen yet: (record, offset, length).
    let mut write: Vec<(Record, u64, u32)> = Vec::new();
    // `pos` is where a write may start (not inside one, nor just after a resync).
    let mut at_write_boundary = true;
    loop {
        if at_write_boundary && let Some(next) = record::padding_end(body, pos, base) {
            pos = next;
        }
        let offset = (base + pos) as u64;
        let write_start = write.first().map_or(offset, |w| w.1);
        match record::next_frame(body, pos, base, zeros_start) {
            Frame::Record {
                record, next, more, ..
            } => {
                write.push((record, offset, (next - pos) as u32));
                if !more {
                    apply_write(id, path, &mut write, &mut scanned, mode, out)?;
                }
                at_write_boundary = !more;
                pos = next;
            }
            Frame::End if write.is_empty() => break,
            // A write whose last frame is missing never completed: it was never synced.
            Frame::Torn | Frame::End if newest => {
                scanned.torn_at = Some(write_start);
                break;
            }
            Frame::Torn | Frame::End => {
                let error = corruption(path, write_start, "sealed segment ends in a torn write");
                damaged(
                    error,
                    write_start,
                    Affected::All,
                    bytes.len(),
                    &mut scanned,
                    mode,
                    out,
                )?;
                break;
            }
            Frame::Corrupt { reason, affected } => {
                let resume = record::resync(body, pos, base, zeros_start);
                let resume_offset = resume.map_or(bytes.len(), |r| base + r);
                if newest && never_synced(bytes, write_start as usize, resume_offset, zeros_start) {
                    scanned.torn_at = Some(write_start);
                    break;
                }
                // The damaged write is lost whole, like a torn one: its groups lost records.
                for (record, ..) in write.drain(..) {
                    lost(record.group().map_or(Affected::All, Affected::Group), out);
                }
                let error = corruption(path, offset, reason);
                damaged(
                    error,
                    write_start,
                    affected,
                    resume_offset,
                    &mut scanned,
                    mode,
                    out,
                )?;
                match resume {
                    Some(r) => pos = r,
                    None => break,
                }
                at_write_boundary = false;
            }
        }
    }
    scanned.valid_bytes = scanned.torn_at.unwrap_or(bytes.len() as u64);
    Ok(scanned)
}

/// Whether damage from `from` to `resume` (file offsets; `resume` is where valid frames start
/// again, or the file's end) in the newest segment is a write that was never synced, rather
/// than damage to synced data. Writes over blocks that already exist (zeros written ahead)
/// reach the disk in no set order, so a power failure can lose sectors of an unsynced write
/// while a later unsynced write landed. Two things together say so:
///
/// * a sector inside the damage reads as zeros (a whole one, or the part of the write's first
///   sector from its start, at least a frame header long): a lost write, not a flipped bit (a
///   flip cannot zero a sector or a header, so damage to synced data from a flip is reported);
/// * no valid frame after the damage was written knowing the damage durable: each frame
///   carries the offset its writer knew durable, and a sync covers everything before it.
///
/// What this cannot tell from a torn write, in the last synced writes when nothing was written
/// after their sync: the disk losing a synced sector (reading it back as zeros), which is cut
/// as a torn tail like a disk that ignores `fdatasync` would be; and a flipped bit in a frame
/// whose payload holds a whole sector of zeros.
fn never_synced(bytes: &[u8], from: usize, resume: usize, zeros_start: usize) -> bool {
    let sector = record::SECTOR_BYTES;
    let zeros = |range: std::ops::Range<usize>| bytes[range].iter().all(|&b| b == 0);
    // Zeros after the last non-zero byte are the file's unwritten tail (or zeros written
    // ahead), not a lost sector among written ones.
    let resume = resume.min(SEGMENT_HEADER_BYTES + zeros_start);
    // The write's first sector lost: zeros from its start (never in a sector's last header
    // bytes, see `record::write_start`) to the sector's end.
    let first_sector_lost = from.next_multiple_of(sector) <= resume
        && !from.is_multiple_of(sector)
        && zeros(from..from.next_multiple_of(sector));
    let whole_sector_lost = (from.next_multiple_of(sector)..resume.saturating_sub(sector - 1))
        .step_by(sector)
        .any(|start| zeros(start..start + sector));
    if !first_sector_lost && !whole_sector_lost {
        return false;
    }
    let body = &bytes[SEGMENT_HEADER_BYTES..];
    let base = SEGMENT_HEADER_BYTES;
    let mut pos = resume.saturating_sub(base);
    let mut known_durable = 0;
    while pos < body.len() {
        match record::next_frame(body, pos, base, zeros_start) {
            Frame::Record {
                next, synced_to, ..
            } => {
                known_durable = known_durable.max(synced_to);
                pos = next;
            }
            Frame::Corrupt { .. } => match record::resync(body, pos, base, zeros_start) {
                Some(next) => pos = next,
                None => break,
            },
            Frame::End | Frame::Torn => break,
        }
    }
    known_durable <= from as u64
}

/// Applies the records of one complete write to the index.
fn apply_write(
    id: SegmentId,
    path: &Path,
    write: &mut Vec<(Record, u64, u32)>,
    scanned: &mut ScannedSegment,
    mode: Mode,
    out: &mut Replay,
) -> Result<()> {
    for (record, offset, frame_len) in write.drain(..) {
        match out.index.apply(&record, (id, offset, frame_len), 0) {
            Ok(()) => {
                count(scanned, &record);
                out.records += 1;
            }
            Err(inconsistent) => {
                let error = corruption(path, offset, inconsistent.0);
                let affected = record.group().map_or(Affected::All, Affected::Group);
                let resume = (offset + u64::from(frame_len)) as usize;
                damaged(error, offset, affected, resume, scanned, mode, out)?;
            }
        }
    }
    Ok(())
}

/// Records damage from `lost_from` up to `resume`, or fails in strict mode.
fn damaged(
    error: Error,
    lost_from: u64,
    affected: Affected,
    resume: usize,
    scanned: &mut ScannedSegment,
    mode: Mode,
    out: &mut Replay,
) -> Result<()> {
    let Error::Corruption { reason, .. } = &error else {
        unreachable!("only corruption is recorded as damage")
    };
    if mode == Mode::Strict {
        return Err(error);
    }
    scanned.damage.push(Damage {
        offset: lost_from,
        end: resume as u64,
        reason: reason.clone(),
    });
    lost(affected, out);
    Ok(())
}

/// Notes that `affected` lost a record here.
///
/// A group that lost a record keeps only the entries it had committed *before* the loss:
/// committed entries are never replaced, so they cannot be stale, while an uncommitted entry
/// before the loss may have been superseded by the lost record (keeping it would break raft's
/// log matching). Its peers send the rest again. A lost record of unknown group (a damaged
/// header or checkpoint) also cuts, to nothing, every group first seen after it.
fn lost(affected: Affected, out: &mut Replay) {
    let groups: Vec<GroupId> = match affected {
        Affected::Group(group) => vec![group],
        Affected::All => {
            out.unknown_group_lost = true;
            out.index.groups.keys().copied().collect()
        }
    };
    for group in groups {
        let committed = out
            .index
            .groups
            .get(&group)
            .map_or(0, |log| log.hard_state.commit);
        let limit = out.keep_through.entry(group).or_insert(committed);
        *limit = (*limit).min(committed);
    }
}

fn unreadable(
    error: Error,
    mut scanned: ScannedSegment,
    mode: Mode,
    out: &mut Replay,
) -> Result<ScannedSegment> {
    let end = scanned.file_bytes as usize;
    damaged(error, 0, Affected::All, end, &mut scanned, mode, out)?;
    scanned.unreadable = scanned.damage.pop().map(|d| d.reason);
    Ok(scanned)
}

fn count(scanned: &mut ScannedSegment, record: &Record) {
    *scanned
        .records_by_kind
        .entry(record.kind_name())
        .or_default() += 1;
    let Some(group) = record.group() else { return };
    let stats = scanned.groups.entry(group).or_default();
    stats.records += 1;
    if let Record::Entry { entry, .. } = record {
        stats.entries += 1;
        let (low, high) = stats.index_range.unwrap_or((entry.index, entry.index));
        stats.index_range = Some((low.min(entry.index), high.max(entry.index)));
    }
}
