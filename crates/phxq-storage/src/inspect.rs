//! A read-only look at a log directory, for operators (`phxq wal inspect DIR`).
//!
//! It never writes, never takes the log's lock, and never stops at damage: it reports every
//! damaged range it finds and what each group would hold after recovery (after repair, if
//! there is damage).

use std::path::Path;

use phxq_types::GroupId;

use crate::recovery::{self, Mode};
use crate::{GroupInfo, Result};

pub use crate::recovery::{Damage, GroupRecords, ScannedSegment};

/// What a log directory holds.
#[derive(Clone, Debug)]
pub struct InspectReport {
    /// Every segment file, oldest first.
    pub segments: Vec<ScannedSegment>,
    /// Each group as recovery would leave it.
    pub groups: Vec<(GroupId, GroupInfo)>,
    /// Groups that lost entries to damage, and the first index lost.
    pub cut_groups: Vec<(GroupId, u64)>,
}

impl InspectReport {
    /// True if recovery would need repair (damage, or a group missing entries).
    pub fn damaged(&self) -> bool {
        !self.cut_groups.is_empty()
            || self
                .segments
                .iter()
                .any(|s| !s.damage.is_empty() || s.unreadable.is_some())
    }
}

/// Scans `dir` without changing it.
pub fn inspect(dir: &Path) -> Result<InspectReport> {
    let segments = crate::segment::list(dir)?;
    let replay = recovery::replay(dir, &segments, Mode::Lenient)?;
    let groups = replay
        .index
        .groups
        .iter()
        .map(|(&group, log)| (group, log.info()))
        .collect();
    Ok(InspectReport {
        segments: replay.segments,
        groups,
        cut_groups: replay.cut_groups,
    })
}
