//! The data directory's history: a node that has run before never starts empty.
//!
//! Raft's safety rests on a voter remembering its term, its vote and the entries it
//! acknowledged. A node whose `wal/` is deleted (or whose whole data directory is) and that
//! starts again as if new can vote twice in one term and forget entries it helped commit.
//! So the directory keeps, outside `wal/`, the file `INITIALIZED`:
//!
//! ```text
//! store_id = 7
//! node_id = 2
//! term = 15
//! ```
//!
//! written (temporary file, fsync, rename, fsync of the directory) on the first start, and
//! rewritten whenever the highest term any group wrote to the log grows: by the event loop,
//! after the sync that made that term durable and **before** the node is told of the sync,
//! so before any vote or acknowledgement of that term leaves the node (they are released by
//! [`crate::Node::synced`]). Terms grow on elections only, so this costs a few fsyncs per
//! election, never one per round. The marker's term is therefore never above the log's
//! durable term, and never below the highest term this node promised anything in.
//!
//! At start:
//!
//! | found | means | done |
//! |---|---|---|
//! | no `IDENTITY`, no marker, no `wal/` | a new node (or a whole wiped directory: see below) | marker written with term 0 |
//! | marker, `wal/` missing, or the log's highest term below the marker's | the log was lost or replaced by an older copy | refused, naming `--rejoin-empty` |
//! | marker of term 0, no log | the node never voted nor acknowledged | starts |
//! | `IDENTITY` and `wal/` but no marker | a directory from before markers | marker written from the log's term |
//! | `IDENTITY`, no marker, no `wal/` | a pre-marker node whose log was lost, or a first start cut short between two files | refused (remove `IDENTITY` if it was a first start) |
//! | marker without `IDENTITY` | damage | refused (`check_identity`) |
//!
//! A whole wiped directory looks new to the node itself; its peers remember it. A master's
//! heartbeat then carries a commit past the empty log, and the node stops with
//! [`crate::NodeError::LostLog`] instead of raft-rs's panic; and every restarted node
//! grants no vote for one election timeout, so a master alive in the meantime is heard
//! first. `--rejoin-empty` (see [`crate::NodeConfig::rejoin_empty`]) is the operator's
//! statement that the disk was lost: the checks above let it start, and its groups neither
//! vote nor campaign until they caught up with their masters.

use std::io::Write;
use std::path::{Path, PathBuf};

use phxq_storage::Wal;
use phxq_types::GroupId;

use crate::config::ServerConfig;
use crate::server::{ServerError, WAL_DIR};

/// The marker's file name in the data directory.
pub(crate) const MARKER_FILE: &str = "INITIALIZED";

/// Largest marker file read, in bytes (it holds three short lines).
const MARKER_BYTES_MAX: u64 = 4096;

/// What `INITIALIZED` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Marker {
    store_id: u64,
    node_id: u64,
    term: u64,
}

/// Written by `phxq wal repair` when it cut a group's log: the node may have acknowledged
/// entries it no longer has, so until its groups caught up with their masters it must not
/// vote on that log. Its text says what was cut. Removed once every group caught up.
pub const REJOIN_FILE: &str = "REJOIN_REQUIRED";

/// Records durably in `data_dir` that this node's log lost entries (`why`), so that it
/// starts only with `--rejoin-empty` and keeps that rule until it caught up.
pub fn require_rejoin(data_dir: &Path, why: &str) -> std::io::Result<()> {
    write_file(data_dir, REJOIN_FILE, why)
}

/// The marker as the event loop keeps it current.
#[derive(Debug)]
pub(crate) struct History {
    dir: PathBuf,
    store_id: u64,
    node_id: u64,
    /// The term the file says.
    term: u64,
    /// `REJOIN_FILE` exists and goes when every group caught up.
    rejoin_file: bool,
}

impl History {
    /// Rewrites the marker if `term` (the highest term the log holds, durable) is above the
    /// one it says. Call before releasing what the sync covered.
    pub(crate) fn keep(&mut self, term: u64) -> Result<(), ServerError> {
        if term <= self.term {
            return Ok(());
        }
        let marker = Marker {
            store_id: self.store_id,
            node_id: self.node_id,
            term,
        };
        write(&self.dir, marker).map_err(|error| ServerError::DataDir {
            path: self.dir.clone(),
            reason: format!("cannot write {MARKER_FILE}: {error}"),
        })?;
        self.term = term;
        Ok(())
    }

    /// Whether `REJOIN_FILE` waits for every group to catch up.
    pub(crate) fn rejoin_pending(&self) -> bool {
        self.rejoin_file
    }

    /// Every group caught up after `--rejoin-empty`: the log holds again what this node
    /// acknowledged, so a later start needs no flag.
    pub(crate) fn rejoined(&mut self) -> Result<(), ServerError> {
        let fail = |error: std::io::Error| ServerError::DataDir {
            path: self.dir.clone(),
            reason: format!("cannot remove {REJOIN_FILE}: {error}"),
        };
        std::fs::remove_file(self.dir.join(REJOIN_FILE)).map_err(fail)?;
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(fail)?;
        self.rejoin_file = false;
        tracing::info!("every group caught up; {REJOIN_FILE} removed");
        Ok(())
    }
}

/// Before the log opens: the marker read (or written on a first start), or a refusal when
/// the log is missing but the node ran before. `fresh`: `IDENTITY` was written just now.
pub(crate) fn before_open(config: &ServerConfig, fresh: bool) -> Result<Option<u64>, ServerError> {
    let dir = &config.data_dir;
    let fail = |reason: String| ServerError::DataDir {
        path: dir.clone(),
        reason,
    };
    let wal_exists = dir.join(WAL_DIR).exists();
    if !config.rejoin_empty
        && let Ok(why) = std::fs::read_to_string(dir.join(REJOIN_FILE))
    {
        return Err(fail(format!(
            "{REJOIN_FILE}: {}; it may have acknowledged entries it no longer holds, so it \
             must not vote on this log: start it with `phxq node --rejoin-empty` (safe only \
             while the other members still hold a majority of the old voters' data; see \
             README, \"A node that lost its disk\")",
            why.trim()
        )));
    }
    let new = Marker {
        store_id: config.store_id,
        node_id: config.node.0,
        term: 0,
    };
    match read(dir).map_err(fail)? {
        Some(marker) if (marker.store_id, marker.node_id) != (new.store_id, new.node_id) => {
            Err(fail(format!(
                "{MARKER_FILE} belongs to store {} node {}, this config is store {} node {}",
                marker.store_id, marker.node_id, new.store_id, new.node_id
            )))
        }
        Some(marker) if !wal_exists && marker.term > 0 && !config.rejoin_empty => {
            Err(fail(lost_log(
                marker.term,
                &format!("{} is missing", dir.join(WAL_DIR).display()),
            )))
        }
        Some(marker) => Ok(Some(marker.term)),
        None if !fresh && !wal_exists && !config.rejoin_empty => Err(fail(format!(
            "IDENTITY exists but neither {MARKER_FILE} nor wal/ does: either a first start \
             was cut short between writing the two (then remove IDENTITY and start again) or \
             this node ran before markers existed and lost its log (then start it with \
             `phxq node --rejoin-empty`, see README, \"A node that lost its disk\")"
        ))),
        None if fresh || !wal_exists => {
            write(dir, new)
                .map_err(|error| fail(format!("cannot write {MARKER_FILE}: {error}")))?;
            Ok(Some(0))
        }
        // A directory from before markers: the log itself says what the node promised.
        None => Ok(None),
    }
}

/// After the log opened: refuses a log whose terms are behind the marker's (unless the
/// operator said the disk was lost) and returns the history the event loop keeps.
pub(crate) fn after_open(
    config: &ServerConfig,
    marker_term: Option<u64>,
    wal: &Wal,
) -> Result<History, ServerError> {
    let dir = &config.data_dir;
    let fail = |reason: String| ServerError::DataDir {
        path: dir.clone(),
        reason,
    };
    let mut log_term = 0;
    for g in 0..config.layout.groups {
        log_term = log_term.max(wal.group(GroupId(u64::from(g)))?.hard_state.term);
    }
    let mut history = History {
        dir: dir.clone(),
        store_id: config.store_id,
        node_id: config.node.0,
        term: marker_term.unwrap_or(0),
        rejoin_file: dir.join(REJOIN_FILE).exists(),
    };
    match marker_term {
        Some(term) if term > log_term && !config.rejoin_empty => Err(fail(lost_log(
            term,
            &format!("its log's highest term is {log_term}"),
        ))),
        Some(_) => Ok(history),
        None => {
            tracing::info!(
                term = log_term,
                "{MARKER_FILE} written from the log's terms"
            );
            write(
                dir,
                Marker {
                    store_id: config.store_id,
                    node_id: config.node.0,
                    term: log_term,
                },
            )
            .map_err(|error| fail(format!("cannot write {MARKER_FILE}: {error}")))?;
            history.term = log_term;
            Ok(history)
        }
    }
}

/// Why a node that ran before refuses to start on the log it found, and what to do.
fn lost_log(marker_term: u64, found: &str) -> String {
    format!(
        "this node has run before ({MARKER_FILE} records term {marker_term}) but {found}: it \
         may have voted and acknowledged entries it no longer remembers, and starting as if \
         new could elect two masters in one term or lose acknowledged messages. If node.data_dir \
         names the wrong directory, fix it. If the disk was really lost, start the node with \
         `phxq node --rejoin-empty` (safe only while the other members still hold a majority \
         of the old voters' data; see README, \"A node that lost its disk\")"
    )
}

fn read(dir: &Path) -> Result<Option<Marker>, String> {
    let path = dir.join(MARKER_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MARKER_BYTES_MAX), &mut text)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    parse(&text)
        .map(Some)
        .ok_or_else(|| format!("{} is damaged: {:?}", path.display(), text.trim()))
}

fn parse(text: &str) -> Option<Marker> {
    let mut values = [None; 3];
    for line in text.lines() {
        let (key, value) = line.split_once(" = ")?;
        let slot = ["store_id", "node_id", "term"]
            .iter()
            .position(|k| *k == key)?;
        values[slot] = Some(value.parse().ok()?);
    }
    Some(Marker {
        store_id: values[0]?,
        node_id: values[1]?,
        term: values[2]?,
    })
}

/// Writes the marker durably.
fn write(dir: &Path, marker: Marker) -> std::io::Result<()> {
    let text = format!(
        "store_id = {}\nnode_id = {}\nterm = {}\n",
        marker.store_id, marker.node_id, marker.term
    );
    write_file(dir, MARKER_FILE, &text)
}

/// Writes `dir/name` durably: temporary file, fsync, rename, fsync of the directory.
fn write_file(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let temporary = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_reads_back_and_damage_is_refused() {
        let marker = Marker {
            store_id: 7,
            node_id: 2,
            term: 15,
        };
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), marker).unwrap();
        assert_eq!(read(dir.path()), Ok(Some(marker)));
        std::fs::write(dir.path().join(MARKER_FILE), "store_id = 7\nterm = x\n").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("damaged"));
        std::fs::write(dir.path().join(MARKER_FILE), "store_id = 7\nnode_id = 2\n").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("damaged"));
    }
}
