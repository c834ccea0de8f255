//! Record framing and payload encoding. Pure functions over byte slices: no I/O.
//!
//! A segment is a header followed by frames:
//!
//! ```text
//! [len u32][group u64][synced_to u64][crc32c(len, group, synced_to) u32][crc32c(payload) u32]
//! [payload][RECORD_END u32]
//! ```
//!
//! The top bit of `len` says "more records of the same write follow": recovery applies a
//! write only once its last frame is there, so a write is all-or-nothing across a crash.
//! `synced_to` is the segment offset up to which the writer knew the segment durable when it
//! wrote the frame: a frame that landed after a hole proves the hole was synced only if its
//! `synced_to` passes it (see `recovery`).
//!
//! All integers are little-endian. The header checksum makes `len`, `group` and `synced_to`
//! trustworthy on their own: when a payload is damaged, repair still knows which group lost a
//! record. The trailer tells a torn write from a damaged one:
//!
//! * a frame that runs past the end of the file, or whose damage lies in a zero-filled run of
//!   sectors reaching the end of the file, is a **torn write**: the write never completed, so it
//!   was never synced, so it was never acknowledged. Recovery cuts it off.
//! * anything else that fails a check is **corruption**: a complete frame whose bytes changed.
//!   A single flipped bit can never look torn (it cannot zero a sector or remove the trailer), so
//!   damage to synced data is always reported, never skipped.

use std::sync::Arc;

use phxq_types::GroupId;

use crate::{ConfState, EntryKind, HardState, LogEntry};

/// Bytes before the payload: length, group, synced-to offset, header checksum, payload
/// checksum.
pub(crate) const FRAME_HEADER_BYTES: usize = 28;
/// Bytes of the header covered by the header checksum.
const HEADER_CHECKED_BYTES: usize = 20;
/// Flag in the length field: the next frame belongs to the same write.
const MORE_IN_WRITE: u32 = 1 << 31;
/// The header's group field for records that belong to no group (checkpoints).
const NO_GROUP: u64 = crate::GROUP_ID_RESERVED.0;
/// Bytes after the payload: the end marker.
pub(crate) const FRAME_TRAILER_BYTES: usize = 4;
/// Framing overhead of one record.
pub(crate) const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + FRAME_TRAILER_BYTES;
/// Marks the end of a complete frame ("PQEN" read as bytes).
const RECORD_END: u32 = u32::from_le_bytes(*b"PQEN");
/// Largest payload a frame may carry. Larger lengths are rejected on write and are corruption
/// on read (the length checksum passed, so only a software bug can produce one).
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 << 20;
/// Torn writes are assumed to lose whole sectors of this size (the smallest a disk writes
/// atomically); a zero-filled run is only "unwritten" if it starts on such a boundary.
pub(crate) const SECTOR_BYTES: usize = 512;

/// One decoded record. Entry locations in the index point at the frame of an `Entry` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// A log entry for a group. Writing index `i` replaces any entry at `i` or above.
    Entry { group: GroupId, entry: LogEntry },
    /// The group's latest hard state.
    HardState { group: GroupId, state: HardState },
    /// The group's latest membership.
    ConfState { group: GroupId, state: ConfState },
    /// Entries up to `index` are gone; `term` is the term of entry `index` and `snapshot` the
    /// group's state machine there. Format 3 only: read from old logs, never written (format 4
    /// writes [`Record::SnapshotChunk`]s).
    Compact {
        group: GroupId,
        index: u64,
        term: u64,
        snapshot: Arc<[u8]>,
    },
    /// Entries at `from_index` and above are gone.
    TruncateSuffix { group: GroupId, from_index: u64 },
    /// Metadata of some groups at the moment a segment was started. A segment's first write
    /// is one or more checkpoints that together cover every group (see [`checkpoint_records`]).
    Checkpoint { groups: Vec<GroupCheckpoint> },
    /// A piece of the group's state machine at compaction point `index` (with `term`). The
    /// chunks of one snapshot are written in order in one write; the snapshot takes effect
    /// when the last one (the one reaching `total_bytes`) is applied: entries up to `index`
    /// are gone (a compaction or install), or, at the current compaction point, the same
    /// snapshot now lives here (a copy carried forward out of an old segment).
    SnapshotChunk {
        group: GroupId,
        index: u64,
        term: u64,
        /// Bytes of the whole snapshot.
        total_bytes: u64,
        /// Where this chunk's bytes start in the snapshot.
        offset: u64,
        bytes: ChunkBytes,
    },
}

/// Largest piece of a snapshot one record carries, in bytes: a snapshot (up to
/// [`crate::SNAPSHOT_BYTES_MAX`]) is written as records of at most this much, so no frame
/// carrying one approaches the frame limit.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;

/// Payload bytes of a snapshot chunk record besides the chunk: kind, group, index, term, total,
/// offset, length.
pub const SNAPSHOT_CHUNK_HEADER_BYTES: usize = 1 + 8 * 5 + 4;

/// The largest frame a snapshot chunk makes, framing included: no write of a snapshot passes it.
pub const SNAPSHOT_CHUNK_FRAME_BYTES_MAX: usize =
    FRAME_OVERHEAD_BYTES + SNAPSHOT_CHUNK_HEADER_BYTES + SNAPSHOT_CHUNK_BYTES_MAX;

/// The bytes of one snapshot chunk: `source[start..start + len]`. The writer points into the
/// whole snapshot (no copy per chunk); a decoded chunk owns just its bytes.
#[derive(Clone, Debug)]
pub(crate) struct ChunkBytes {
    pub source: Arc<[u8]>,
    pub start: usize,
    pub len: usize,
}

impl ChunkBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.source[self.start..self.start + self.len]
    }
}

impl PartialEq for ChunkBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for ChunkBytes {}

/// The chunk records of `snapshot`, the group's state machine at `index` (term `term`): at
/// least one (an empty snapshot is one empty chunk), each at most [`SNAPSHOT_CHUNK_BYTES_MAX`].
pub(crate) fn snapshot_chunks(
    group: GroupId,
    index: u64,
    term: u64,
    snapshot: &Arc<[u8]>,
) -> Vec<Record> {
    let total = snapshot.len();
    let mut starts: Vec<usize> = (0..total).step_by(SNAPSHOT_CHUNK_BYTES_MAX).collect();
    if starts.is_empty() {
        starts.push(0);
    }
    starts
        .into_iter()
        .map(|start| Record::SnapshotChunk {
            group,
            index,
            term,
            total_bytes: total as u64,
            offset: start as u64,
            bytes: ChunkBytes {
                source: Arc::clone(snapshot),
                start,
                len: (total - start).min(SNAPSHOT_CHUNK_BYTES_MAX),
            },
        })
        .collect()
}

/// What a checkpoint remembers of one group: everything but the entries themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupCheckpoint {
    pub group: GroupId,
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub compact_index: u64,
    pub compact_term: u64,
    pub last_index: u64,
    /// The state machine at `compact_index`: only in format 3 checkpoints (read from old logs).
    /// Format 4 checkpoints carry none; the snapshot lives in the chunks that wrote it, and the
    /// segment holding them is kept while it is the group's snapshot (see `index`).
    pub snapshot: Option<Arc<[u8]>>,
}

/// A checkpoint record is closed once its groups' encoding passes this size, so that each frame
/// stays far below [`RECORD_PAYLOAD_BYTES_MAX`] whatever the number of groups (there may be
/// thousands).
const CHECKPOINT_RECORD_BYTES_TARGET: usize = 1 << 20;

/// Every group's metadata as checkpoint records, to be written as one write (so recovery
/// applies all of them or none): groups are packed in order, a record taking groups until its
/// encoding passes [`CHECKPOINT_RECORD_BYTES_TARGET`]. Always at least one record, so an empty
/// log's segments still open with a checkpoint.
pub(crate) fn checkpoint_records(groups: impl IntoIterator<Item = GroupCheckpoint>) -> Vec<Record> {
    let mut records = vec![Record::Checkpoint { groups: Vec::new() }];
    let mut bytes = 0;
    for group in groups {
        if bytes >= CHECKPOINT_RECORD_BYTES_TARGET {
            records.push(Record::Checkpoint { groups: Vec::new() });
            bytes = 0;
        }
        bytes += group.encoded_bytes();
        let Some(Record::Checkpoint { groups }) = records.last_mut() else {
            unreachable!("only checkpoints are pushed");
        };
        groups.push(group);
    }
    records
}

impl GroupCheckpoint {
    /// Bytes of this group in a checkpoint payload (see [`encode_payload`]).
    fn encoded_bytes(&self) -> usize {
        let ids = self.conf_state.voters.len()
            + self.conf_state.learners.len()
            + self.conf_state.voters_outgoing.len()
            + self.conf_state.learners_next.len();
        let snapshot = self.snapshot.as_ref().map_or(0, |s| 4 + s.len());
        8 + 24 + (16 + 8 * ids + 1) + 24 + snapshot
    }
}

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_COMPACT: u8 = 4;
const KIND_TRUNCATE_SUFFIX: u8 = 5;
/// A checkpoint with snapshots (format 3): read, never written.
const KIND_CHECKPOINT_WITH_SNAPSHOTS: u8 = 6;
const KIND_SNAPSHOT_CHUNK: u8 = 7;
/// A checkpoint without snapshots (format 4).
const KIND_CHECKPOINT: u8 = 8;

impl Record {
    /// Short name for reports.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Record::Entry { .. } => "entry",
            Record::HardState { .. } => "hard_state",
            Record::ConfState { .. } => "conf_state",
            Record::Compact { .. } => "compact",
            Record::TruncateSuffix { .. } => "truncate_suffix",
            Record::Checkpoint { .. } => "checkpoint",
            Record::SnapshotChunk { .. } => "snapshot_chunk",
        }
    }

    /// The group a record belongs to; `None` for checkpoints, which cover all groups.
    pub(crate) fn group(&self) -> Option<GroupId> {
        match self {
            Record::Entry { group, .. }
            | Record::HardState { group, .. }
            | Record::ConfState { group, .. }
            | Record::Compact { group, .. }
            | Record::TruncateSuffix { group, .. }
            | Record::SnapshotChunk { group, .. } => Some(*group),
            Record::Checkpoint { .. } => None,
        }
    }
}

/// Appends one framed record, a write of its own, to `out` and returns the frame's length.
#[cfg(test)]
pub(crate) fn encode_frame(record: &Record, out: &mut Vec<u8>) -> usize {
    encode_frame_in_write(record, false, 0, out)
}

/// Appends the frames of one write; returns each frame's (offset in `out`, length).
/// `synced_to` is the segment offset known durable when the write is made.
pub(crate) fn encode_write(
    records: &[Record],
    synced_to: u64,
    out: &mut Vec<u8>,
) -> Vec<(usize, usize)> {
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let start = out.len();
            (
                start,
                encode_frame_in_write(record, i + 1 < records.len(), synced_to, out),
            )
        })
        .collect()
}

fn encode_frame_in_write(record: &Record, more: bool, synced_to: u64, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    encode_payload(record, out);
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    assert!(
        payload_len <= RECORD_PAYLOAD_BYTES_MAX,
        "record payload over the limit"
    );
    assert!(
        !matches!(record, Record::SnapshotChunk { .. })
            || payload_len + FRAME_OVERHEAD_BYTES <= SNAPSHOT_CHUNK_FRAME_BYTES_MAX,
        "a snapshot chunk frame over the chunk bound"
    );
    let group = record.group().map_or(NO_GROUP, |g| g.0);
    assert!(
        record.group() != Some(crate::GROUP_ID_RESERVED),
        "the reserved group id is refused by WriteBatch validation"
    );
    let len_field = payload_len as u32 | if more { MORE_IN_WRITE } else { 0 };
    out[start..start + 4].copy_from_slice(&len_field.to_le_bytes());
    out[start + 4..start + 12].copy_from_slice(&group.to_le_bytes());
    out[start + 12..start + 20].copy_from_slice(&synced_to.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[start..start + HEADER_CHECKED_BYTES]);
    let payload_crc = crc32c::crc32c(&out[start + FRAME_HEADER_BYTES..]);
    out[start + 20..start + 24].copy_from_slice(&header_crc.to_le_bytes());
    out[start + 24..start + 28].copy_from_slice(&payload_crc.to_le_bytes());
    out.extend_from_slice(&RECORD_END.to_le_bytes());
    out.len() - start
}

/// Payload bytes a record will need, used to enforce the limit before anything is encoded.
pub(crate) fn entry_payload_bytes(entry: &LogEntry) -> usize {
    1 + 8 + 8 + 8 + 1 + 4 + entry.data.len() + 4 + entry.context.len()
}

/// What [`next_frame`] found at a position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete, checksummed and decoded frame; the next one starts at `next`. `more`: the
    /// write it belongs to continues in the next frame. `synced_to`: the segment offset its
    /// writer knew durable.
    Record {
        record: Record,
        next: usize,
        more: bool,
        synced_to: u64,
    },
    /// Clean end of the buffer.
    End,
    /// An incomplete write at the tail: everything from here on was never synced.
    Torn,
    /// A complete frame that fails a check.
    Corrupt {
        reason: &'static str,
        /// Who lost a record: known when only the payload is damaged.
        affected: Affected,
    },
}

impl Frame {
    fn corrupt(reason: &'static str, affected: Affected) -> Frame {
        Frame::Corrupt { reason, affected }
    }
}

/// Which groups a damaged frame may have belonged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Affected {
    Group(GroupId),
    /// The header is damaged, or the record was a checkpoint: any group.
    All,
}

impl Affected {
    fn of_header_group(group: u64) -> Affected {
        if group == NO_GROUP {
            Affected::All
        } else {
            Affected::Group(GroupId(group))
        }
    }
}

/// Where a write that would start at segment offset `offset` starts: never in the last
/// [`FRAME_HEADER_BYTES`] of a sector, so that a write whose first sector was lost reads as at
/// least a header's worth of zeros up to a sector boundary, which a flipped bit cannot produce
/// (see `recovery`). The bytes skipped are zeros (padding).
pub(crate) fn write_start(offset: u64) -> u64 {
    let sector = SECTOR_BYTES as u64;
    let room = sector - offset % sector;
    if room < sector && room < FRAME_HEADER_BYTES as u64 {
        offset + room
    } else {
        offset
    }
}

/// At a write boundary `pos`: if `pos` lies where no write starts (see [`write_start`]) and
/// only zeros follow up to the sector boundary, the padding ends there; returns it. `base` is
/// the file offset of `buf[0]`.
pub(crate) fn padding_end(buf: &[u8], pos: usize, base: usize) -> Option<usize> {
    let start = write_start((base + pos) as u64) as usize - base;
    (start > pos && start <= buf.len() && buf[pos..start].iter().all(|&b| b == 0)).then_some(start)
}

/// Where the buffer's trailing run of zero bytes starts (`buf.len()` if it ends in non-zero).
pub(crate) fn trailing_zeros_start(buf: &[u8]) -> usize {
    buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// True if an unwritten (zero-filled, sector-aligned, reaching the end of file) region
/// overlaps `[.., end)`. `zeros_start` is [`trailing_zeros_start`] of the whole file and
/// `base` the file offset of `buf[0]`.
fn touches_unwritten_tail(zeros_start: usize, base: usize, end: usize) -> bool {
    let first_unwritten = (base + zeros_start).next_multiple_of(SECTOR_BYTES) - base;
    first_unwritten < end
}

/// Reads the frame at `pos`. `base` is the file offset of `buf[0]` (for sector alignment) and
/// `zeros_start` the start of the buffer's trailing zero run.
pub(crate) fn next_frame(buf: &[u8], pos: usize, base: usize, zeros_start: usize) -> Frame {
    let rest = &buf[pos..];
    // Nothing but zeros from here: the end (of the file, or of the data, when zeros were
    // written ahead). Every frame ends in a non-zero end marker, so this is a frame boundary.
    if pos >= zeros_start {
        return Frame::End;
    }
    if rest.len() < FRAME_HEADER_BYTES {
        return Frame::Torn;
    }
    let len_field = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
    let more = len_field & MORE_IN_WRITE != 0;
    let len = (len_field & !MORE_IN_WRITE) as usize;
    let group = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
    let synced_to = u64::from_le_bytes(rest[12..20].try_into().expect("8 bytes"));
    let header_crc = u32::from_le_bytes(rest[20..24].try_into().expect("4 bytes"));
    if crc32c::crc32c(&rest[..HEADER_CHECKED_BYTES]) != header_crc {
        if touches_unwritten_tail(zeros_start, base, pos + FRAME_HEADER_BYTES) {
            return Frame::Torn;
        }
        return Frame::corrupt("frame header checksum mismatch", Affected::All);
    }
    let affected = Affected::of_header_group(group);
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Frame::corrupt("frame length over the limit", affected);
    }
    let frame_len = len + FRAME_OVERHEAD_BYTES;
    if rest.len() < frame_len {
        return Frame::Torn;
    }
    let trailer = u32::from_le_bytes(rest[frame_len - 4..frame_len].try_into().expect("4 bytes"));
    if trailer != RECORD_END {
        if touches_unwritten_tail(zeros_start, base, pos + frame_len) {
            return Frame::Torn;
        }
        return Frame::corrupt("frame end marker missing", affected);
    }
    let payload = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    let payload_crc = u32::from_le_bytes(rest[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != payload_crc {
        return Frame::corrupt("payload checksum mismatch", affected);
    }
    match decode_payload(payload) {
        Ok(record) if record.group().map_or(NO_GROUP, |g| g.0) == group => Frame::Record {
            record,
            next: pos + frame_len,
            more,
            synced_to,
        },
        Ok(_) => Frame::corrupt("payload group differs from the header", Affected::All),
        Err(reason) => Frame::corrupt(reason, affected),
    }
}

/// After corruption at `pos`, the next position holding a complete, valid frame, if any.
/// A false match needs two independent CRC32C collisions, about 1 in 2^64.
pub(crate) fn resync(buf: &[u8], pos: usize, base: usize, zeros_start: usize) -> Option<usize> {
    (pos + 1..buf.len()).find(|&candidate| {
        matches!(
            next_frame(buf, candidate, base, zeros_start),
            Frame::Record { .. }
        )
    })
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("field under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_ids(out: &mut Vec<u8>, ids: &[u64]) {
    let len = u32::try_from(ids.len()).expect("id list under 4 G");
    out.extend_from_slice(&len.to_le_bytes());
    ids.iter().for_each(|&id| put_u64(out, id));
}

fn put_hard_state(out: &mut Vec<u8>, state: &HardState) {
    put_u64(out, state.term);
    put_u64(out, state.vote);
    put_u64(out, state.commit);
}

fn put_conf_state(out: &mut Vec<u8>, state: &ConfState) {
    put_ids(out, &state.voters);
    put_ids(out, &state.learners);
    put_ids(out, &state.voters_outgoing);
    put_ids(out, &state.learners_next);
    out.push(u8::from(state.auto_leave));
}

fn encode_payload(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Entry { group, entry } => {
            out.push(KIND_ENTRY);
            put_u64(out, group.0);
            put_u64(out, entry.index);
            put_u64(out, entry.term);
            out.push(entry.kind as u8);
            put_bytes(out, &entry.data);
            put_bytes(out, &entry.context);
        }
        Record::HardState { group, state } => {
            out.push(KIND_HARD_STATE);
            put_u64(out, group.0);
            put_hard_state(out, state);
        }
        Record::ConfState { group, state } => {
            out.push(KIND_CONF_STATE);
            put_u64(out, group.0);
            put_conf_state(out, state);
        }
        Record::Compact {
            group,
            index,
            term,
            snapshot,
        } => {
            out.push(KIND_COMPACT);
            put_u64(out, group.0);
            put_u64(out, *index);
            put_u64(out, *term);
            put_bytes(out, snapshot);
        }
        Record::TruncateSuffix { group, from_index } => {
            out.push(KIND_TRUNCATE_SUFFIX);
            put_u64(out, group.0);
            put_u64(out, *from_index);
        }
        Record::Checkpoint { groups } => {
            // A format 3 checkpoint is written only by tests that build old logs.
            let with_snapshots = groups.first().is_some_and(|g| g.snapshot.is_some());
            assert!(
                groups
                    .iter()
                    .all(|g| g.snapshot.is_some() == with_snapshots),
                "a checkpoint has snapshots for all its groups or for none"
            );
            out.push(if with_snapshots {
                KIND_CHECKPOINT_WITH_SNAPSHOTS
            } else {
                KIND_CHECKPOINT
            });
            let count = u32::try_from(groups.len()).expect("group count under 4 G");
            out.extend_from_slice(&count.to_le_bytes());
            for g in groups {
                put_u64(out, g.group.0);
                put_hard_state(out, &g.hard_state);
                put_conf_state(out, &g.conf_state);
                put_u64(out, g.compact_index);
                put_u64(out, g.compact_term);
                put_u64(out, g.last_index);
                if let Some(snapshot) = &g.snapshot {
                    put_bytes(out, snapshot);
                }
            }
        }
        Record::SnapshotChunk {
            group,
            index,
            term,
            total_bytes,
            offset,
            bytes,
        } => {
            out.push(KIND_SNAPSHOT_CHUNK);
            put_u64(out, group.0);
            put_u64(out, *index);
            put_u64(out, *term);
            put_u64(out, *total_bytes);
            put_u64(out, *offset);
            put_bytes(out, bytes.as_slice());
        }
    }
}

/// A cursor over a payload. Every read is bounds-checked: a payload that passed its checksum
/// but does not decode is reported as corruption, never a panic.
struct Reader<'a> {
    buf: &'a [u8],
}

type DecodeResult<T> = Result<T, &'static str>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err("payload shorter than its fields");
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn bytes(&mut self) -> DecodeResult<Vec<u8>> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn shared_bytes(&mut self) -> DecodeResult<Arc<[u8]>> {
        let len = self.u32()? as usize;
        Ok(Arc::from(self.take(len)?))
    }

    fn ids(&mut self) -> DecodeResult<Vec<u64>> {
        let len = self.u32()? as usize;
        if len > self.buf.len() / 8 {
            return Err("id list longer than the payload");
        }
        (0..len).map(|_| self.u64()).collect()
    }

    fn hard_state(&mut self) -> DecodeResult<HardState> {
        Ok(HardState {
            term: self.u64()?,
            vote: self.u64()?,
            commit: self.u64()?,
        })
    }

    fn conf_state(&mut self) -> DecodeResult<ConfState> {
        Ok(ConfState {
            voters: self.ids()?,
            learners: self.ids()?,
            voters_outgoing: self.ids()?,
            learners_next: self.ids()?,
            auto_leave: match self.u8()? {
                0 => false,
                1 => true,
                _ => return Err("invalid boolean"),
            },
        })
    }

    fn group(&mut self) -> DecodeResult<GroupId> {
        Ok(GroupId(self.u64()?))
    }

    /// A chunk's fields, checked so that reassembly never allocates past the snapshot limit
    /// or places bytes outside the snapshot.
    fn snapshot_chunk(&mut self) -> DecodeResult<Record> {
        let (group, index, term) = (self.group()?, self.u64()?, self.u64()?);
        let (total_bytes, offset) = (self.u64()?, self.u64()?);
        let source = self.shared_bytes()?;
        if total_bytes > crate::SNAPSHOT_BYTES_MAX as u64 {
            return Err("snapshot chunk of a snapshot over the snapshot limit");
        }
        if source.len() > SNAPSHOT_CHUNK_BYTES_MAX {
            return Err("snapshot chunk over the chunk limit");
        }
        if offset
            .checked_add(source.len() as u64)
            .is_none_or(|end| end > total_bytes)
        {
            return Err("snapshot chunk past the end of its snapshot");
        }
        let len = source.len();
        Ok(Record::SnapshotChunk {
            group,
            index,
            term,
            total_bytes,
            offset,
            bytes: ChunkBytes {
                source,
                start: 0,
                len,
            },
        })
    }
}

/// Decodes a payload that passed its checksum.
fn decode_payload(payload: &[u8]) -> DecodeResult<Record> {
    let mut r = Reader { buf: payload };
    let record = match r.u8()? {
        KIND_ENTRY => Record::Entry {
            group: r.group()?,
            entry: LogEntry {
                index: r.u64()?,
                term: r.u64()?,
                kind: EntryKind::from_u8(r.u8()?).ok_or("unknown entry kind")?,
                data: r.bytes()?,
                context: r.bytes()?,
            },
        },
        KIND_HARD_STATE => Record::HardState {
            group: r.group()?,
            state: r.hard_state()?,
        },
        KIND_CONF_STATE => Record::ConfState {
            group: r.group()?,
            state: r.conf_state()?,
        },
        KIND_COMPACT => Record::Compact {
            group: r.group()?,
            index: r.u64()?,
            term: r.u64()?,
            snapshot: r.shared_bytes()?,
        },
        KIND_TRUNCATE_SUFFIX => Record::TruncateSuffix {
            group: r.group()?,
            from_index: r.u64()?,
        },
        kind @ (KIND_CHECKPOINT | KIND_CHECKPOINT_WITH_SNAPSHOTS) => {
            let count = r.u32()? as usize;
            let mut groups = Vec::with_capacity(count.min(r.buf.len() / 8));
            for _ in 0..count {
                groups.push(GroupCheckpoint {
                    group: r.group()?,
                    hard_state: r.hard_state()?,
                    conf_state: r.conf_state()?,
                    compact_index: r.u64()?,
                    compact_term: r.u64()?,
                    last_index: r.u64()?,
                    snapshot: match kind {
                        KIND_CHECKPOINT => None,
                        _ => Some(r.shared_bytes()?),
                    },
                });
            }
            Record::Checkpoint { groups }
        }
        KIND_SNAPSHOT_CHUNK => r.snapshot_chunk()?,
        _ => return Err("unknown record kind"),
    };
    if !r.buf.is_empty() {
        return Err("trailing bytes after the record");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, data: &[u8]) -> Record {
        Record::Entry {
            group: GroupId(3),
            entry: LogEntry {
                index,
                term: 2,
                kind: EntryKind::Normal,
                data: data.to_vec(),
                context: b"ctx".to_vec(),
            },
        }
    }

    fn samples() -> Vec<Record> {
        vec![
            entry(1, b"hello"),
            Record::HardState {
                group: GroupId(1),
                state: HardState {
                    term: 4,
                    vote: 2,
                    commit: 9,
                },
            },
            Record::ConfState {
                group: GroupId(1),
                state: ConfState {
                    voters: vec![1, 2, 3],
                    learners: vec![4],
                    voters_outgoing: vec![],
                    learners_next: vec![5],
                    auto_leave: true,
                },
            },
            Record::Compact {
                group: GroupId(9),
                index: 10,
                term: 3,
                snapshot: Arc::from(&b"state at 10"[..]),
            },
            Record::TruncateSuffix {
                group: GroupId(9),
                from_index: 11,
            },
            Record::Checkpoint {
                groups: vec![GroupCheckpoint {
                    group: GroupId(5),
                    compact_index: 3,
                    compact_term: 1,
                    last_index: 7,
                    snapshot: Some(Arc::from(&b"state at 3"[..])),
                    ..Default::default()
                }],
            },
            Record::Checkpoint {
                groups: vec![GroupCheckpoint {
                    group: GroupId(5),
                    compact_index: 3,
                    compact_term: 1,
                    last_index: 7,
                    ..Default::default()
                }],
            },
            Record::SnapshotChunk {
                group: GroupId(5),
                index: 3,
                term: 1,
                total_bytes: 20,
                offset: 10,
                bytes: ChunkBytes {
                    source: Arc::from(&b"state at 3, part two"[..]),
                    start: 10,
                    len: 10,
                },
            },
        ]
    }

    fn scan(buf: &[u8]) -> (Vec<Record>, Frame) {
        let zeros = trailing_zeros_start(buf);
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            match next_frame(buf, pos, 0, zeros) {
                Frame::Record { record, next, .. } => {
                    out.push(record);
                    pos = next;
                }
                other => return (out, other),
            }
        }
    }

    #[test]
    fn every_record_kind_round_trips() {
        let mut buf = Vec::new();
        for r in samples() {
            encode_frame(&r, &mut buf);
        }
        let (decoded, end) = scan(&buf);
        assert_eq!(decoded, samples());
        assert_eq!(end, Frame::End);
    }

    #[test]
    fn a_checkpoint_of_many_groups_is_split_into_bounded_records_of_one_write() {
        let groups: Vec<GroupCheckpoint> = (0..20_000)
            .map(|g| GroupCheckpoint {
                group: GroupId(g),
                compact_index: g,
                ..Default::default()
            })
            .collect();
        let records = checkpoint_records(groups.clone());
        assert!(records.len() > 1, "1.8 MB of groups in one record");
        let mut buf = Vec::new();
        let frames = encode_write(&records, 0, &mut buf);
        for (_, len) in &frames {
            assert!(*len < CHECKPOINT_RECORD_BYTES_TARGET + 1_000, "{len}");
        }
        let (decoded, end) = scan(&buf);
        assert_eq!(end, Frame::End);
        let back: Vec<GroupCheckpoint> = decoded
            .into_iter()
            .flat_map(|r| match r {
                Record::Checkpoint { groups } => groups,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, groups);
        assert_eq!(
            checkpoint_records([]),
            [Record::Checkpoint { groups: vec![] }],
            "an empty log still opens its segments with a checkpoint"
        );
    }

    #[test]
    fn a_snapshot_is_written_as_bounded_chunks_that_cover_it_in_order() {
        let snapshot: Arc<[u8]> = (0..(5 * SNAPSHOT_CHUNK_BYTES_MAX / 2))
            .map(|i| (i % 251) as u8)
            .collect();
        let chunks = snapshot_chunks(GroupId(2), 9, 4, &snapshot);
        assert_eq!(chunks.len(), 3);
        let mut buf = Vec::new();
        for (_, len) in encode_write(&chunks, 0, &mut buf) {
            assert!(len <= SNAPSHOT_CHUNK_FRAME_BYTES_MAX, "{len}");
        }
        let (decoded, end) = scan(&buf);
        assert_eq!((decoded, end), (chunks, Frame::End));
        let mut joined = Vec::new();
        for chunk in snapshot_chunks(GroupId(2), 9, 4, &snapshot) {
            let Record::SnapshotChunk { offset, bytes, .. } = chunk else {
                unreachable!()
            };
            assert_eq!(offset as usize, joined.len());
            joined.extend_from_slice(bytes.as_slice());
        }
        assert_eq!(joined, &snapshot[..]);
        let empty = snapshot_chunks(GroupId(2), 9, 4, &Arc::from(&[][..]));
        assert_eq!(empty.len(), 1, "an empty snapshot is one empty chunk");
    }

    #[test]
    fn a_snapshot_chunk_claiming_bytes_outside_its_snapshot_is_a_decode_error() {
        let chunk = |total: u64, offset: u64, len: usize| {
            let mut payload = vec![KIND_SNAPSHOT_CHUNK];
            for field in [2, 9, 4, total, offset] {
                put_u64(&mut payload, field);
            }
            put_bytes(&mut payload, &vec![7; len]);
            decode_payload(&payload)
        };
        assert!(chunk(20, 10, 10).is_ok());
        assert!(chunk(20, 11, 10).is_err(), "past the end");
        assert!(chunk(20, u64::MAX, 10).is_err(), "offset overflow");
        assert!(chunk(crate::SNAPSHOT_BYTES_MAX as u64 + 1, 0, 10).is_err());
        assert!(chunk(1 << 24, 0, SNAPSHOT_CHUNK_BYTES_MAX + 1).is_err());
    }

    #[test]
    fn a_cut_anywhere_in_the_last_frame_is_torn_not_corrupt() {
        let mut buf = Vec::new();
        encode_frame(&entry(1, b"first"), &mut buf);
        let first_len = buf.len();
        encode_frame(&entry(2, &[7; 600]), &mut buf);
        for cut in first_len + 1..buf.len() {
            let (decoded, end) = scan(&buf[..cut]);
            assert_eq!(decoded.len(), 1, "cut at {cut}");
            assert_eq!(end, Frame::Torn, "cut at {cut}");
        }
    }

    #[test]
    fn unwritten_zero_sectors_at_the_tail_are_torn() {
        let mut buf = Vec::new();
        encode_frame(&entry(1, &[1; 100]), &mut buf);
        encode_frame(&entry(2, &[9; 2000]), &mut buf);
        // The second frame's sectors from 1024 on never reached the disk; the size did.
        for start in [512usize, 1024, 1536] {
            let mut torn = buf.clone();
            torn[start..].fill(0);
            let (decoded, end) = scan(&torn);
            assert_eq!(end, Frame::Torn, "zeros from {start}");
            assert_eq!(decoded.len(), 1, "the first frame ends before byte 512");
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_corruption_even_in_the_last_frame() {
        let mut buf = Vec::new();
        encode_frame(&entry(1, b"a"), &mut buf);
        let second = buf.len();
        encode_frame(&entry(2, &[0; 1500]), &mut buf); // zero-heavy payload, last frame
        for byte in 0..buf.len() {
            for bit in [0, 3, 7] {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                let (_, end) = scan(&bad);
                let Frame::Corrupt { affected, .. } = end else {
                    panic!("flip at byte {byte} bit {bit} gave {end:?}");
                };
                // Past a frame's header, the damage is pinned on the frame's own group.
                let frame_start = if byte >= second { second } else { 0 };
                if byte >= frame_start + FRAME_HEADER_BYTES {
                    assert_eq!(affected, Affected::Group(GroupId(3)), "byte {byte}");
                }
            }
        }
    }

    #[test]
    fn frames_of_one_write_say_whether_more_follow() {
        let mut buf = Vec::new();
        let records = [entry(1, b"a"), entry(2, b"b"), entry(3, b"c")];
        let frames = encode_write(&records, 0, &mut buf);
        let zeros = trailing_zeros_start(&buf);
        let flags: Vec<bool> = frames
            .iter()
            .map(|&(start, _)| match next_frame(&buf, start, 0, zeros) {
                Frame::Record { more, .. } => more,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(flags, [true, true, false]);
    }

    #[test]
    fn resync_finds_the_frame_after_a_damaged_one() {
        let mut buf = Vec::new();
        encode_frame(&entry(1, b"one"), &mut buf);
        let second = buf.len();
        encode_frame(&entry(2, b"two"), &mut buf);
        let third = buf.len();
        encode_frame(&entry(3, b"three"), &mut buf);
        buf[second + 30] ^= 0x10;
        let zeros = trailing_zeros_start(&buf);
        assert_eq!(
            next_frame(&buf, second, 0, zeros),
            Frame::corrupt("payload checksum mismatch", Affected::Group(GroupId(3)))
        );
        assert_eq!(resync(&buf, second, 0, zeros), Some(third));
    }

    #[test]
    fn garbage_payloads_decode_to_errors_not_panics() {
        for payload in [
            &[][..],
            &[1],
            &[1, 0, 0],
            &[6, 255, 255, 255, 255],
            &[42; 9],
        ] {
            assert!(decode_payload(payload).is_err(), "{payload:?}");
        }
    }
}
