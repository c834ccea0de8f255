//! Replaying segment files into a [`LogIndex`]. Reads files; writes nothing.
//!
//! The same scan serves three callers: a normal open (strict: the first damage is an error),
//! the repair pass (lenient: damage is skipped by resynchronising on the next valid frame, and
//! groups left with a gap are cut there) and `phxq wal inspect` (lenient, and only reports).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use phxq_types::GroupId;

use crate::index::LogIndex;
use crate::record::{self, Frame, Record};
use crate::segment::{self, Header, SEGMENT_HEADER_BYTES};
use crate::{Error, Result, SegmentId, io_error};

/// How to treat damage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mode {
    /// Skip damaged bytes (resynchronise on the next valid frame) instead of failing.
    pub tolerate_damage: bool,
    /// Cut a group at a missing entry instead of failing (the group's peers resend the rest).
    pub cut_gaps: bool,
}

impl Mode {
    pub const STRICT: Mode = Mode {
        tolerate_damage: false,
        cut_gaps: false,
    };
    pub const LENIENT: Mode = Mode {
        tolerate_damage: true,
        cut_gaps: true,
    };
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
    /// Groups cut at a missing entry, and where (lenient mode only).
    pub cut_groups: Vec<(GroupId, u64)>,
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
    };
    for (position, (id, path)) in segments.iter().enumerate() {
        let newest = position + 1 == segments.len();
        let bytes = std::fs::read(path).map_err(|e| io_error("read segment", path, e))?;
        let scanned = scan_segment(*id, path, &bytes, newest, mode, &mut out)?;
        out.segments.push(scanned);
    }
    let gaps: Vec<(GroupId, u64)> = out
        .index
        .groups
        .iter()
        .filter_map(|(&group, log)| log.first_gap().map(|gap| (group, gap)))
        .collect();
    for (group, gap) in gaps {
        if !mode.cut_gaps {
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
        out.index.truncate_at_gap(group, gap, 0);
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
            return unreadable(error, scanned, mode);
        }
        Err(error @ Error::Corruption { .. }) => return unreadable(error, scanned, mode),
        Err(other) => return Err(other),
    }
    let body = &bytes[SEGMENT_HEADER_BYTES..];
    let base = SEGMENT_HEADER_BYTES;
    let zeros_start = record::trailing_zeros_start(body);
    let mut pos = 0;
    let mut first = true;
    loop {
        let offset = (base + pos) as u64;
        let (payload, next) = match record::next_frame(body, pos, base, zeros_start) {
            Frame::End => break,
            Frame::Record { payload, next } => (payload, next),
            Frame::Torn if newest => {
                scanned.torn_at = Some(offset);
                break;
            }
            Frame::Torn => {
                let error = corruption(path, offset, "sealed segment ends in a torn write");
                damaged(error, &mut scanned, bytes.len(), mode)?;
                break;
            }
            Frame::Corrupt(reason) => {
                let resume = record::resync(body, pos, base, zeros_start);
                let resume_offset = resume.map_or(bytes.len(), |r| base + r);
                damaged(
                    corruption(path, offset, reason),
                    &mut scanned,
                    resume_offset,
                    mode,
                )?;
                match resume {
                    Some(r) => {
                        pos = r;
                        continue;
                    }
                    None => break,
                }
            }
        };
        let outcome = record::decode_payload(payload)
            .map_err(|reason| corruption(path, offset, reason))
            .and_then(|record| {
                if first && !matches!(record, Record::Checkpoint { .. }) && !mode.cut_gaps {
                    return Err(corruption(
                        path,
                        offset,
                        "segment does not start with a checkpoint",
                    ));
                }
                let frame_len = (next - pos) as u32;
                out.index
                    .apply(&record, (id, offset, frame_len), 0)
                    .map_err(|inconsistent| corruption(path, offset, inconsistent.0))?;
                Ok(record)
            });
        match outcome {
            Ok(record) => {
                count(&mut scanned, &record);
                out.records += 1;
            }
            Err(error) => damaged(error, &mut scanned, base + next, mode)?,
        }
        first = false;
        pos = next;
    }
    scanned.valid_bytes = scanned.torn_at.unwrap_or(bytes.len() as u64);
    Ok(scanned)
}

/// Records damage, or fails in strict mode. `resume` is where valid frames start again.
fn damaged(error: Error, scanned: &mut ScannedSegment, resume: usize, mode: Mode) -> Result<()> {
    let Error::Corruption { offset, reason, .. } = &error else {
        unreachable!("only corruption is recorded as damage")
    };
    if !mode.tolerate_damage {
        return Err(error);
    }
    scanned.damage.push(Damage {
        offset: *offset,
        end: resume as u64,
        reason: reason.clone(),
    });
    Ok(())
}

fn unreadable(error: Error, mut scanned: ScannedSegment, mode: Mode) -> Result<ScannedSegment> {
    if !mode.tolerate_damage {
        return Err(error);
    }
    scanned.unreadable = Some(error.to_string());
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
