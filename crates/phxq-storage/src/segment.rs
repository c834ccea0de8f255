//! Segment files: naming, the header, creation with the directory fsync, and reading.
//!
//! Header (32 bytes): magic `PHXQ-WAL`, format version u32, flags u32 (0), segment id u64,
//! reserved u32 (0), CRC32C of the first 28 bytes. A segment's first write is always a
//! checkpoint of every group's metadata (without snapshots since format 4), so older segments
//! can be deleted in any order once none of their entries or snapshots are live. Zeros may
//! follow the last record (written
//! ahead so that syncs never extend the file); they read as the segment's end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result, SegmentId, io_error};

pub(crate) const SEGMENT_HEADER_BYTES: usize = 32;
const MAGIC: &[u8; 8] = b"PHXQ-WAL";
/// The segment format this build writes. Version 2 added snapshots to compaction and
/// checkpoint records; version 3 the synced-to offset in every frame header; version 4
/// snapshots in chunk records and checkpoints without snapshots. Version 3 segments are still
/// read (their whole-snapshot records mean what they meant), so a node upgrades in place; an
/// older build refuses version 4 by number instead of misreading its records as damage.
/// Versions 1 and 2 are refused (none were deployed).
pub const FORMAT_VERSION: u32 = 4;
/// The oldest segment format this build reads.
pub const FORMAT_VERSION_OLDEST_READ: u32 = 3;
const SUFFIX: &str = ".wal";

pub(crate) fn file_name(id: SegmentId) -> String {
    format!("{id:020}{SUFFIX}")
}

pub(crate) fn parse_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&id| id > 0)
}

/// The segment files in `dir`, oldest first.
pub(crate) fn list(dir: &Path) -> Result<Vec<(SegmentId, PathBuf)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("list", dir, e))?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_file_name) {
            found.push((id, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

pub(crate) fn encode_header(id: SegmentId) -> [u8; SEGMENT_HEADER_BYTES] {
    encode_header_of_version(id, FORMAT_VERSION)
}

/// A header of another format version: the current one, or an old one in tests.
pub(crate) fn encode_header_of_version(id: SegmentId, version: u32) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&version.to_le_bytes());
    header[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    header
}

/// What a segment's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Valid,
    /// Shorter than a header, or all zero: the file was created but its header never synced.
    Torn,
}

pub(crate) fn check_header(path: &Path, id: SegmentId, bytes: &[u8]) -> Result<Header> {
    let corrupt = |offset: u64, reason: &str| Error::Corruption {
        path: path.to_path_buf(),
        offset,
        reason: reason.to_string(),
    };
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Ok(Header::Torn);
    }
    let header = &bytes[..SEGMENT_HEADER_BYTES];
    if header.iter().all(|&b| b == 0) {
        return Ok(Header::Torn);
    }
    let crc = u32::from_le_bytes(header[28..32].try_into().expect("4"));
    if crc32c::crc32c(&header[..28]) != crc {
        return Err(corrupt(0, "segment header checksum mismatch"));
    }
    if &header[0..8] != MAGIC {
        return Err(corrupt(0, "not a phxq segment (bad magic)"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4"));
    if !(FORMAT_VERSION_OLDEST_READ..=FORMAT_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
            supported: FORMAT_VERSION,
        });
    }
    let stored_id = u64::from_le_bytes(header[16..24].try_into().expect("8"));
    if stored_id != id {
        return Err(corrupt(
            16,
            "segment id in the header does not match the file name",
        ));
    }
    Ok(Header::Valid)
}

/// Makes a directory's entries (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync directory", dir, e))
}

/// Creates segment `id` holding its header and `first_records`, then zeros up to file offset
/// `zeroed_to` (if it is further), synced, with its directory entry synced, so that a crash
/// leaves either no file or a whole one.
pub(crate) fn create(
    dir: &Path,
    id: SegmentId,
    first_records: &[u8],
    zeroed_to: u64,
) -> Result<(File, PathBuf)> {
    let path = dir.join(file_name(id));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_error("create segment", &path, e))?;
    let mut bytes = Vec::with_capacity(SEGMENT_HEADER_BYTES + first_records.len());
    bytes.extend_from_slice(&encode_header(id));
    bytes.extend_from_slice(first_records);
    if zeroed_to > bytes.len() as u64 {
        bytes.resize(zeroed_to as usize, 0);
    }
    file.write_all(&bytes)
        .map_err(|e| io_error("write segment", &path, e))?;
    file.sync_data()
        .map_err(|e| io_error("fsync segment", &path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        for name in [
            "LOCK",
            "00000000000000000042.wal.corrupt",
            "42.wal",
            "00000000000000000000.wal",
        ] {
            assert_eq!(parse_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn headers_are_checked() {
        let p = Path::new("x");
        let good = encode_header(7);
        assert_eq!(check_header(p, 7, &good).unwrap(), Header::Valid);
        assert_eq!(check_header(p, 7, &good[..10]).unwrap(), Header::Torn);
        assert_eq!(check_header(p, 7, &[0; 40]).unwrap(), Header::Torn);
        assert!(matches!(
            check_header(p, 8, &good),
            Err(Error::Corruption { .. })
        ));
        let mut flipped = good;
        flipped[3] ^= 1;
        assert!(matches!(
            check_header(p, 7, &flipped),
            Err(Error::Corruption { .. })
        ));
    }

    #[test]
    fn a_segment_of_the_previous_format_is_read() {
        let header = encode_header_of_version(7, FORMAT_VERSION_OLDEST_READ);
        assert_eq!(
            check_header(Path::new("x"), 7, &header).unwrap(),
            Header::Valid
        );
    }

    #[test]
    fn a_segment_of_another_format_version_is_refused_as_such() {
        for version in [1, 2, FORMAT_VERSION + 1] {
            assert!(!(FORMAT_VERSION_OLDEST_READ..=FORMAT_VERSION).contains(&version));
            let mut header = encode_header(7);
            header[8..12].copy_from_slice(&u32::to_le_bytes(version));
            let crc = crc32c::crc32c(&header[..28]);
            header[28..32].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(
                    check_header(Path::new("x"), 7, &header),
                    Err(Error::UnsupportedVersion { version: v, supported: FORMAT_VERSION, .. })
                        if v == version
                ),
                "version {version}"
            );
        }
    }
}
