//! Snapshots written in chunks, each named after what it does to the log: a 16 MiB snapshot
//! is written in bounded frames and comes back after many segments rolled and were deleted; a
//! crash at any chunk boundary or inside any chunk of a compaction's write leaves the previous
//! snapshot in force and the log replayable.

use std::path::{Path, PathBuf};

use phxq_storage::{
    CARRY_BACKLOG_SEGMENTS_MAX, EntryKind, GroupId, HardState, LogEntry, SNAPSHOT_CHUNK_BYTES_MAX,
    SNAPSHOT_CHUNK_FRAME_BYTES_MAX, Wal, WalOptions, WriteBatch,
};

const SECTOR_BYTES: u64 = 512;
/// Frame header and trailer (see `record.rs`).
const FRAME_OVERHEAD_BYTES: u64 = 32;
const FRAME_HEADER_BYTES: u64 = 28;

fn entry(index: u64, data: &[u8]) -> LogEntry {
    LogEntry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        data: data.to_vec(),
        context: vec![],
    }
}

fn commit(index: u64) -> HardState {
    HardState {
        term: 1,
        vote: 1,
        commit: index,
    }
}

/// No zeros written ahead: a segment file ends where its data ends.
fn open(dir: &Path, segment_bytes_max: u64) -> Wal {
    let options = WalOptions {
        segment_bytes_max,
        preallocate_bytes: 0,
        ..WalOptions::default()
    };
    Wal::open(dir, options).expect("open").0
}

/// Bytes that differ from position to position, so a misplaced chunk shows.
fn patterned(bytes: usize, seed: u8) -> Vec<u8> {
    (0..bytes)
        .map(|i| (i % 251) as u8 ^ seed ^ (i >> 16) as u8)
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_16_mib_snapshot_is_written_in_bounded_frames_and_survives_segments_rolled_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), 256 << 10);
    let (idle, busy) = (GroupId(1), GroupId(2));
    let big = patterned(16 << 20, 7);
    let mut batch = WriteBatch::new();
    batch.append(idle, (1..=10).map(|i| entry(i, b"idle")));
    batch.hard_state(idle, commit(10));
    // Compacted through its last entry: no live entry keeps the snapshot's segment.
    batch.compact(idle, 10, big.clone());
    wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    // The idle group never writes again; the busy one rolls and frees segments, so the
    // segment holding the only copy of the idle group's snapshot dies around it.
    for i in 1..=300 {
        let mut batch = WriteBatch::new();
        batch.append(busy, [entry(i, &[2; 4096])]);
        batch.hard_state(busy, commit(i));
        batch.compact(busy, i - 1, format!("state at {}", i - 1).into_bytes());
        // Synced every round: a segment is deleted as soon as it may be.
        wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    }
    wal.sync().unwrap();
    let stats = wal.stats();
    assert!(stats.rotations > 4, "{stats:?}");
    assert!(stats.segments_deleted > 2, "{stats:?}");
    assert!(stats.snapshots_carried > 0, "{stats:?}");
    assert!(
        stats.frame_largest_bytes <= SNAPSHOT_CHUNK_FRAME_BYTES_MAX as u64,
        "a frame of {} bytes, over the chunk bound {} (+ header)",
        stats.frame_largest_bytes,
        SNAPSHOT_CHUNK_BYTES_MAX
    );
    assert!(
        segments(dir.path()).len() <= 3,
        "dead segments kept: {:?}",
        segments(dir.path())
    );
    drop(wal);

    let wal = open(dir.path(), 256 << 10);
    let info = wal.group(idle).unwrap();
    assert_eq!(
        (info.first_index, info.last_index, info.compact_term),
        (11, 10, 1)
    );
    assert!(
        info.snapshot == big,
        "the 16 MiB snapshot came back different"
    );
    let info = wal.group(busy).unwrap();
    assert_eq!((info.first_index, info.last_index), (300, 300));
    assert_eq!(info.snapshot, b"state at 299");
}

#[test]
fn segments_waiting_only_on_snapshots_stay_bounded_when_a_segment_rolls_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), 64 << 10);
    // 32 idle groups, each compacted through its one entry with a 64 KiB snapshot.
    for g in 1..=32 {
        let group = GroupId(g);
        let mut batch = WriteBatch::new();
        batch.append(group, [entry(1, b"idle")]);
        batch.hard_state(group, commit(1));
        batch.compact(group, 1, patterned(64 << 10, g as u8));
        wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    }
    // A busy group fills a segment every round and compacts it away the next: every segment
    // dies as soon as it is sealed, with the idle snapshots carried into it.
    let busy = GroupId(100);
    let mut most = 0;
    for i in 1..=200 {
        let mut batch = WriteBatch::new();
        batch.append(busy, [entry(i, &[3; 60 << 10])]);
        batch.hard_state(busy, commit(i));
        batch.compact(busy, i - 1, Vec::new());
        wal.sync_to(wal.write(&batch).unwrap()).unwrap();
        most = most.max(segments(dir.path()).len());
    }
    let stats = wal.stats();
    assert!(stats.rotations > 150, "{stats:?}");
    assert!(
        most <= CARRY_BACKLOG_SEGMENTS_MAX + 4,
        "{most} segment files at once: carrying falls behind ({stats:?})"
    );
    drop(wal);
    let wal = open(dir.path(), 64 << 10);
    for g in 1..=32 {
        let info = wal.group(GroupId(g)).unwrap();
        assert!(info.snapshot == patterned(64 << 10, g as u8), "{g}");
    }
}

/// Where each frame of the write starting at or after `from` lies in `bytes`: (start, length).
fn frames_from(bytes: &[u8], from: u64) -> Vec<(u64, u64)> {
    // A write never starts in the last frame header's worth of a sector (`record::write_start`).
    let room = SECTOR_BYTES - from % SECTOR_BYTES;
    let mut pos = if room < FRAME_HEADER_BYTES {
        from + room
    } else {
        from
    };
    let mut frames = Vec::new();
    while pos < bytes.len() as u64 {
        let at = pos as usize;
        let len_field = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u64::from(len_field & !(1 << 31)) + FRAME_OVERHEAD_BYTES;
        frames.push((pos, len));
        pos += len;
    }
    frames
}

/// A copy of the log in `to` whose newest segment lost everything from byte `cut`: cut off
/// (`zeros: false`), or, its size kept, zeros from the first sector boundary at or after `cut`
/// (sectors of the write that never reached the disk).
fn crashed_copy(from: &Path, to: &Path, cut: u64, zeros: bool) {
    let files = segments(from);
    for file in &files {
        std::fs::copy(file, to.join(file.file_name().unwrap())).unwrap();
    }
    let newest = to.join(files.last().unwrap().file_name().unwrap());
    let mut bytes = std::fs::read(&newest).unwrap();
    if zeros {
        let start = (cut.next_multiple_of(SECTOR_BYTES) as usize).min(bytes.len());
        bytes[start..].fill(0);
    } else {
        bytes.truncate(cut as usize);
    }
    std::fs::write(&newest, bytes).unwrap();
}

#[test]
fn a_crash_at_every_chunk_boundary_and_inside_every_chunk_leaves_the_previous_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), 64 << 20);
    let (group, other) = (GroupId(1), GroupId(2));
    let old = patterned(300, 1);
    let mut batch = WriteBatch::new();
    batch.append(group, (1..=20).map(|i| entry(i, &[i as u8; 100])));
    batch.hard_state(group, commit(20));
    batch.compact(group, 5, old.clone());
    wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    let newest = segments(dir.path()).pop().unwrap();
    let synced_bytes = std::fs::metadata(&newest).unwrap().len();
    // One write: entries, a compaction whose snapshot takes 3.5 chunks, another group's entry.
    let new = patterned(7 * SNAPSHOT_CHUNK_BYTES_MAX / 2, 9);
    let mut batch = WriteBatch::new();
    batch.append(group, [entry(21, b"21"), entry(22, b"22")]);
    batch.compact(group, 15, new.clone());
    batch.append(other, [entry(1, b"other")]);
    wal.write(&batch).unwrap();
    drop(wal);

    let bytes = std::fs::read(&newest).unwrap();
    let frames = frames_from(&bytes, synced_bytes);
    assert_eq!(
        frames.len(),
        2 + 4 + 1,
        "entries, 4 chunks, entry: {frames:?}"
    );
    let mut cuts = vec![synced_bytes];
    for &(start, len) in &frames {
        cuts.extend([start, start + 1, start + len / 2, start + len - 1]);
    }
    for cut in cuts {
        for zeros in [false, true] {
            if zeros && cut.next_multiple_of(SECTOR_BYTES) >= bytes.len() as u64 {
                continue; // no sector left to lose
            }
            let copy = tempfile::tempdir().unwrap();
            crashed_copy(dir.path(), copy.path(), cut, zeros);
            let wal = open(copy.path(), 64 << 20);
            let at = format!("crash at byte {cut} (zeros: {zeros})");
            let info = wal.group(group).unwrap();
            assert_eq!((info.first_index, info.last_index), (6, 20), "{at}");
            assert!(info.snapshot == old, "{at}: not the previous snapshot");
            let entries = wal.entries(group, 6, 21, None).unwrap();
            assert_eq!(entries.len(), 15, "{at}");
            assert_eq!(wal.group(other).unwrap().last_index, 0, "{at}");
            // The log goes on: a later compaction with its own snapshot sticks.
            let mut batch = WriteBatch::new();
            batch.append(group, [entry(21, b"again")]);
            batch.compact(group, 12, b"after the crash".to_vec());
            wal.sync_to(wal.write(&batch).unwrap()).unwrap();
            drop(wal);
            let wal = open(copy.path(), 64 << 20);
            let info = wal.group(group).unwrap();
            assert_eq!((info.first_index, info.last_index), (13, 21), "{at}");
            assert_eq!(info.snapshot, b"after the crash", "{at}");
        }
    }
    // Nothing cut: the new snapshot is in force.
    let wal = open(dir.path(), 64 << 20);
    let info = wal.group(group).unwrap();
    assert_eq!((info.first_index, info.last_index), (16, 22));
    assert!(info.snapshot == new, "the new snapshot came back different");
    assert_eq!(wal.group(other).unwrap().last_index, 1);
}
