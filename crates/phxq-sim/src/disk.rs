//! The simulated disk: a real write-ahead log in a real directory (on tmpfs when there is one),
//! with crashes that lose what was never synced.
//!
//! After every sync the simulator completes, it records each segment file's length: the
//! durable image. A crash then cuts every file back to its image (a segment created since keeps
//! only its header, which the log syncs on creation); for a torn write, it keeps a random
//! prefix of the unsynced bytes of the newest file; or, as writes over the zeros the log writes
//! ahead land in no set order, it loses each unsynced sector of the newest file on its own, so
//! that later writes can survive a hole.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use phxq_types::Rng;

/// A segment's header, synced (with its directory) when the log creates the segment.
const SEGMENT_HEADER_BYTES: u64 = 32;

/// File lengths known durable.
#[derive(Clone, Debug, Default)]
pub struct DurableImage {
    lengths: BTreeMap<PathBuf, u64>,
}

/// How a crash treats unsynced bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// Every unsynced byte is lost.
    LoseUnsynced,
    /// A random prefix of the unsynced bytes of the newest file survives (a torn write).
    Tear,
    /// Each sector of the newest file's unsynced bytes survives or not, independently (lost
    /// ones read as zeros; synced bytes of a sector are kept).
    LoseSectors,
}

/// Every segment and where its data ends: after its last non-zero byte (every frame ends in a
/// non-zero marker; the log writes zeros ahead of its data, which are not data).
/// The disk's unit of atomic writes.
const SECTOR_BYTES: u64 = 512;

fn segments(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir)
        .expect("sim data dir is readable")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .map(|p| {
            let end = data_end(&p);
            (p, end)
        })
        .collect();
    files.sort();
    files
}

/// Where a segment's data ends, reading back from its end in blocks (the zeros ahead are
/// short; the data may not be).
fn data_end(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 16 << 10;
    let file = fs::File::open(path).expect("segment readable");
    let mut end = file.metadata().expect("segment metadata").len();
    let mut block = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let bytes = &mut block[..(end - start) as usize];
        file.read_exact_at(bytes, start).expect("segment readable");
        if let Some(i) = bytes.iter().rposition(|&b| b != 0) {
            return start + i as u64 + 1;
        }
        end = start;
    }
    0
}

/// Zeroes each sector overlapping `from..to` of `path` with probability one half, keeping the
/// bytes before `from` (synced).
fn lose_sectors(path: &Path, from: u64, to: u64, rng: &mut Rng) {
    let mut bytes = fs::read(path).expect("segment readable");
    for sector in (from / SECTOR_BYTES * SECTOR_BYTES..to).step_by(SECTOR_BYTES as usize) {
        if rng.chance(1, 2) {
            let start = sector.max(from) as usize;
            let end = ((sector + SECTOR_BYTES) as usize).min(bytes.len());
            bytes[start..end].fill(0);
        }
    }
    fs::write(path, bytes).expect("segment writable");
}

impl DurableImage {
    /// The directory as it is now (right after a sync).
    pub fn capture(dir: &Path) -> DurableImage {
        DurableImage {
            lengths: segments(dir).into_iter().collect(),
        }
    }

    /// Cuts `dir` back to this image, as a crash would: the lost bytes become zeros (the file
    /// keeps the size its written-ahead zeros gave it) or, at random, are cut off (the
    /// zeros' extension was lost too).
    pub fn crash(&self, dir: &Path, kind: CrashKind, rng: &mut Rng) {
        let files = segments(dir);
        let newest = files.last().map(|(p, _)| p.clone());
        for (path, len) in files {
            let durable = self.lengths.get(&path).copied();
            if kind == CrashKind::LoseSectors && Some(&path) == newest.as_ref() {
                lose_sectors(
                    &path,
                    durable.unwrap_or(SEGMENT_HEADER_BYTES).min(len),
                    len,
                    rng,
                );
                continue;
            }
            let keep = match (kind, durable) {
                (CrashKind::Tear, durable) if Some(&path) == newest.as_ref() => {
                    let from = durable.unwrap_or(SEGMENT_HEADER_BYTES).min(len);
                    from + rng.below(len - from + 1)
                }
                (_, Some(durable)) => durable,
                (_, None) => SEGMENT_HEADER_BYTES,
            };
            if keep < len {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open segment");
                let size = file.metadata().expect("segment metadata").len();
                if rng.below(2) == 0 {
                    // Sectors not written revert to the zeros written ahead: a sector is
                    // written whole or not at all, so the cut moves up to a sector boundary.
                    let keep = keep.next_multiple_of(SECTOR_BYTES).min(size);
                    file.set_len(keep).expect("truncate segment");
                    file.set_len(size).expect("zero-fill segment");
                } else {
                    // The file's last extension torn at any byte (its size moved with it).
                    file.set_len(keep).expect("truncate segment");
                }
            }
        }
    }
}
