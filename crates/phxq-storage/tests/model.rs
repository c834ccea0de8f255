//! Model-based test of the write-ahead log: random operations over several groups against an
//! in-memory model, with crashes and damage in between.
//!
//! The model is a plain map per group (entries, compaction point and its snapshot, hard
//! state), written
//! independently of the log's index. The harness tracks which writes are durable (after a
//! sync, or after the sync a segment rotation makes) and where each unsynced write ends in the
//! newest segment file, so a simulated power loss can cut the file at any byte beyond the synced
//! length and know exactly which state must come back:
//!
//! * every synced write comes back exactly, and no more than what survived the cut: snapshot
//!   bytes included, also when they are larger than a segment and when only a copy carried
//!   forward out of a deleted segment still holds them;
//! * a torn tail (cut mid-record, or zero-filled unwritten sectors) is cut off silently;
//! * a flipped bit in synced data is reported as corruption naming the file, and repair then
//!   opens with each group holding a contiguous subset of what the model holds (never a
//!   different entry at the same index) and a compaction point that was once written, with the
//!   snapshot written with it; the repaired log opens strictly afterwards.
//!
//! The operations are raft-like (nothing committed is rewritten, commit never passes the last
//! index), because the log enforces exactly that.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use phxq_storage::{
    ConfState, EntryKind, Error, GroupId, HardState, LogEntry, Wal, WalOptions, WriteBatch,
};
use proptest::prelude::*;

const GROUPS: u64 = 3;
const SEGMENT_BYTES: u64 = 4096;
/// Zeros written ahead: crashes meet segments with a zero tail, and runs of it written later.
const PREALLOCATE_BYTES: u64 = 1024;
const SECTOR: u64 = 512;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ModelGroup {
    entries: BTreeMap<u64, (u64, Vec<u8>)>,
    compact_index: u64,
    compact_term: u64,
    /// The state machine at `compact_index`, as the compaction or install that set it gave it.
    snapshot: Vec<u8>,
    hard_state: HardState,
    conf_state: ConfState,
}

impl ModelGroup {
    fn last_index(&self) -> u64 {
        self.entries
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.compact_index)
    }
    fn term(&self) -> u64 {
        self.hard_state
            .term
            .max(self.entries.values().map(|e| e.0).max().unwrap_or(0))
    }
    /// The lowest index a new entry or a truncation may touch.
    fn floor(&self) -> u64 {
        self.hard_state.commit.max(self.compact_index) + 1
    }
}

type Model = BTreeMap<GroupId, ModelGroup>;

#[derive(Clone, Debug)]
enum Crash {
    /// The process dies; the page cache survives.
    Process,
    /// Power loss: nothing unsynced survives.
    DropUnsynced,
    /// Power loss mid-write: the file ends at a random byte of the unsynced tail.
    Tear(f64),
    /// Power loss: the size grew but sectors from a random point on were never written.
    UnwrittenSectors(f64),
    /// Power loss exactly between two frames of the unsynced tail (possibly inside one write).
    TearAtFrame(f64),
    /// Power loss over zeros written ahead: each sector of the unsynced tail independently
    /// landed or not (a lost one keeps its zeros, and the synced bytes of a sector it shares
    /// with synced data), so later writes can land after a hole (seeded choice per sector).
    LostSectors(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        group: u64,
        back: u64,
        count: u64,
        new_term: bool,
        bytes: usize,
    },
    HardState {
        group: u64,
        commit: f64,
        vote: u64,
    },
    Compact {
        group: u64,
        to: f64,
        snapshot_bytes: usize,
    },
    Truncate {
        group: u64,
        from: f64,
    },
    Snapshot {
        group: u64,
        ahead: u64,
        snapshot_bytes: usize,
    },
    Invalid {
        group: u64,
        kind: u8,
    },
    Sync,
    Crash(Crash),
    FlipBit {
        file: usize,
        byte: f64,
        bit: u8,
    },
}

/// Mostly small snapshots; some larger than a segment. (All fit one chunk: snapshots of
/// several chunks are `snapshot_chunks.rs`'s.)
fn snapshot_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0..300usize,
        1 => SEGMENT_BYTES as usize..2 * SEGMENT_BYTES as usize,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let group = 0..GROUPS;
    let crash = prop_oneof![
        Just(Crash::Process),
        Just(Crash::DropUnsynced),
        (0.0..1.0f64).prop_map(Crash::Tear),
        (0.0..1.0f64).prop_map(Crash::UnwrittenSectors),
        (0.0..1.0f64).prop_map(Crash::TearAtFrame),
        any::<u64>().prop_map(Crash::LostSectors),
    ];
    prop_oneof![
        10 => (group.clone(), 0..4u64, 1..6u64, prop::bool::weighted(0.2), 0..400usize)
            .prop_map(|(group, back, count, new_term, bytes)| Op::Append { group, back, count, new_term, bytes }),
        3 => (group.clone(), 0.0..1.0f64, 0..4u64).prop_map(|(group, commit, vote)| Op::HardState { group, commit, vote }),
        2 => (group.clone(), 0.0..1.0f64, snapshot_bytes()).prop_map(|(group, to, snapshot_bytes)| Op::Compact { group, to, snapshot_bytes }),
        2 => (group.clone(), 0.0..1.0f64).prop_map(|(group, from)| Op::Truncate { group, from }),
        1 => (group.clone(), 0..3u64, snapshot_bytes()).prop_map(|(group, ahead, snapshot_bytes)| Op::Snapshot { group, ahead, snapshot_bytes }),
        1 => (group.clone(), 0..4u8).prop_map(|(group, kind)| Op::Invalid { group, kind }),
        4 => Just(Op::Sync),
        2 => crash.prop_map(Op::Crash),
        1 => (0..8usize, 0.0..1.0f64, 0..8u8).prop_map(|(file, byte, bit)| Op::FlipBit { file, byte, bit }),
    ]
}

/// What is durable: the model as of the last sync, and the synced length of the newest file.
struct Durable {
    path: PathBuf,
    synced_len: u64,
    model: Model,
}

struct Harness {
    dir: tempfile::TempDir,
    wal: Option<Wal>,
    model: Model,
    durable: Durable,
    /// Writes since the durable point: where each ends in the newest file, and the model after.
    unsynced: Vec<(u64, Model)>,
    /// Every entry ever committed. Raft never changes one, so after repair cuts a group its
    /// peers resend these same entries, and repair may keep them.
    committed: BTreeMap<(GroupId, u64), (u64, Vec<u8>)>,
    /// Every compaction point ever set, with its term and snapshot: repair may go back to an
    /// earlier one (when it lost the record of a later one), never to one never written.
    compactions: BTreeSet<(GroupId, u64, u64, Vec<u8>)>,
    next_data: u64,
    /// Inject at most one damage event (see ARCHITECTURE.md, invariant 8: a second fault that
    /// destroys an earlier repair's checkpoint is not handled yet).
    single_damage: bool,
    damaged: bool,
}

/// Zeroes each sector of `path` overlapping the unsynced bytes `synced..end` with probability
/// one half (seeded), keeping synced bytes; returns the first byte that changed, if any.
fn lose_sectors(path: &Path, synced: u64, end: u64, seed: u64) -> Option<u64> {
    let mut bytes = std::fs::read(path).unwrap();
    let mut rng = seed | 1;
    let mut first_changed = None;
    for sector in (synced / SECTOR * SECTOR..end).step_by(SECTOR as usize) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng.is_multiple_of(2) {
            continue;
        }
        let from = sector.max(synced) as usize;
        let to = ((sector + SECTOR) as usize).min(bytes.len());
        if let Some(changed) = bytes[from..to].iter().position(|&b| b != 0) {
            first_changed = first_changed.or(Some((from + changed) as u64));
        }
        bytes[from..to].fill(0);
    }
    std::fs::write(path, &bytes).unwrap();
    first_changed
}

fn newest_segment(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files.pop().expect("a log always has a segment")
}

fn options(repair: bool) -> WalOptions {
    WalOptions {
        segment_bytes_max: SEGMENT_BYTES,
        repair,
        preallocate_bytes: PREALLOCATE_BYTES,
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), options(false)).unwrap();
        let path = newest_segment(dir.path());
        let synced_len = data_end(&path);
        Harness {
            dir,
            wal: Some(wal),
            model: Model::new(),
            durable: Durable {
                path,
                synced_len,
                model: Model::new(),
            },
            unsynced: Vec::new(),
            committed: BTreeMap::new(),
            compactions: BTreeSet::new(),
            single_damage: false,
            damaged: false,
            next_data: 0,
        }
    }

    fn wal(&self) -> &Wal {
        self.wal.as_ref().expect("open")
    }

    fn group(&self, g: u64) -> ModelGroup {
        self.model.get(&GroupId(g)).cloned().unwrap_or_default()
    }

    fn data(&mut self, bytes: usize) -> Vec<u8> {
        self.next_data += 1;
        let seed = self.next_data;
        (0..bytes)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
            .collect()
    }

    /// Writes a batch, applies the same change to the model, and tracks durability.
    fn write(&mut self, batch: WriteBatch, apply: impl FnOnce(&mut Model)) {
        let before = self.wal().stats();
        let model_before = self.model.clone();
        let lsn = self.wal().write(&batch).expect("valid write");
        apply(&mut self.model);
        self.model.retain(|_, g| *g != ModelGroup::default());
        let after = self.wal().stats();
        if after.writes == before.writes {
            assert_eq!(
                self.model, model_before,
                "a write that wrote nothing changed the model"
            );
            return;
        }
        let path = newest_segment(self.dir.path());
        let end = data_end(&path);
        if after.durable_lsn + 1 >= lsn {
            // Everything before this write is durable (a sync, or the rotation it caused).
            let write_bytes = after.bytes - before.bytes;
            self.durable = Durable {
                path,
                synced_len: end - write_bytes,
                model: model_before,
            };
            self.unsynced.clear();
        }
        self.unsynced.push((end, self.model.clone()));
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Append {
                group,
                back,
                count,
                new_term,
                bytes,
            } => self.append(group, back, count, new_term, bytes),
            Op::HardState {
                group,
                commit,
                vote,
            } => {
                let g = self.group(group);
                let commit = g.hard_state.commit
                    + ((g.last_index() - g.hard_state.commit) as f64 * commit) as u64;
                let state = HardState {
                    term: g.term(),
                    vote,
                    commit,
                };
                for (&index, entry) in g.entries.range(..=commit) {
                    self.committed
                        .entry((GroupId(group), index))
                        .or_insert_with(|| entry.clone());
                }
                let mut batch = WriteBatch::new();
                batch.hard_state(GroupId(group), state.clone());
                self.write(batch, |m| {
                    m.entry(GroupId(group)).or_default().hard_state = state
                });
            }
            Op::Compact {
                group,
                to,
                snapshot_bytes,
            } => {
                let g = self.group(group);
                let to = g.compact_index
                    + ((g.hard_state.commit.saturating_sub(g.compact_index)) as f64 * to) as u64;
                let snapshot = self.data(snapshot_bytes);
                if to > g.compact_index {
                    let term = g.entries[&to].0;
                    self.compactions
                        .insert((GroupId(group), to, term, snapshot.clone()));
                }
                let mut batch = WriteBatch::new();
                batch.compact(GroupId(group), to, snapshot.clone());
                self.write(batch, |m| {
                    let g = m.entry(GroupId(group)).or_default();
                    if to > g.compact_index {
                        g.compact_term = g.entries[&to].0;
                        g.entries = g.entries.split_off(&(to + 1));
                        g.compact_index = to;
                        g.snapshot = snapshot;
                    }
                });
            }
            Op::Truncate { group, from } => {
                let g = self.group(group);
                let (floor, last) = (g.floor(), g.last_index());
                if floor > last {
                    return;
                }
                let from = floor + ((last - floor) as f64 * from) as u64;
                let mut batch = WriteBatch::new();
                batch.truncate_suffix(GroupId(group), from);
                self.write(batch, |m| {
                    m.entry(GroupId(group))
                        .or_default()
                        .entries
                        .split_off(&from);
                });
            }
            Op::Snapshot {
                group,
                ahead,
                snapshot_bytes,
            } => {
                let g = self.group(group);
                let snapshot = self.data(snapshot_bytes);
                let index = g.last_index() + 1 + ahead;
                let term = g.term() + 1;
                let conf = ConfState {
                    voters: vec![1, 2, 3],
                    learners: vec![group + 10],
                    ..Default::default()
                };
                let state = HardState {
                    term,
                    vote: 0,
                    commit: index,
                };
                self.compactions
                    .insert((GroupId(group), index, term, snapshot.clone()));
                let mut batch = WriteBatch::new();
                batch.install_snapshot(GroupId(group), index, term, conf.clone(), snapshot.clone());
                batch.hard_state(GroupId(group), state.clone());
                self.write(batch, |m| {
                    *m.entry(GroupId(group)).or_default() = ModelGroup {
                        entries: BTreeMap::new(),
                        compact_index: index,
                        compact_term: term,
                        snapshot,
                        hard_state: state,
                        conf_state: conf,
                    };
                });
            }
            Op::Invalid { group, kind } => self.invalid(group, kind),
            Op::Sync => {
                self.wal().sync().unwrap();
                let path = newest_segment(self.dir.path());
                let synced_len = data_end(&path);
                self.durable = Durable {
                    path,
                    synced_len,
                    model: self.model.clone(),
                };
                self.unsynced.clear();
            }
            Op::Crash(ref crash) => self.crash(crash),
            Op::FlipBit { file, byte, bit } => self.flip_bit(file, byte, bit),
        }
    }

    fn append(&mut self, group: u64, back: u64, count: u64, new_term: bool, bytes: usize) {
        let g = self.group(group);
        let last = g.last_index();
        let start = last + 1 - back.min(last + 1 - g.floor());
        let term = g.term() + u64::from(new_term);
        let entries: Vec<LogEntry> = (start..start + count)
            .map(|index| {
                let (term, data) = match self.committed.get(&(GroupId(group), index)) {
                    Some(committed) => committed.clone(),
                    None => (term, self.data(bytes)),
                };
                LogEntry {
                    index,
                    term,
                    kind: EntryKind::Normal,
                    data,
                    context: vec![],
                }
            })
            .collect();
        let mut batch = WriteBatch::new();
        batch.append(GroupId(group), entries.clone());
        self.write(batch, |m| {
            let g = m.entry(GroupId(group)).or_default();
            g.entries.split_off(&start);
            for e in entries {
                g.entries.insert(e.index, (e.term, e.data));
            }
        });
    }

    /// A bad write is refused with a typed error and changes nothing.
    fn invalid(&mut self, group: u64, kind: u8) {
        let g = self.group(group);
        let id = GroupId(group);
        let mut batch = WriteBatch::new();
        // A valid op first: the whole batch must be refused, not just the bad part.
        batch.append(
            id,
            [LogEntry {
                index: g.last_index() + 1,
                term: g.term(),
                ..Default::default()
            }],
        );
        match kind {
            0 => batch.append(
                id,
                [LogEntry {
                    index: g.last_index() + 3,
                    ..Default::default()
                }],
            ),
            1 => batch.compact(id, g.last_index() + 2, b"past the end".to_vec()),
            2 => batch.hard_state(
                id,
                HardState {
                    commit: g.last_index() + 2,
                    ..Default::default()
                },
            ),
            _ if g.hard_state.commit > 0 => batch.truncate_suffix(id, g.hard_state.commit),
            _ => batch.append(
                id,
                [LogEntry {
                    index: 0,
                    ..Default::default()
                }],
            ),
        };
        let before = self.wal().stats();
        let outcome = self.wal().write(&batch);
        assert!(
            matches!(outcome, Err(Error::InvalidWrite { .. })),
            "kind {kind}: {outcome:?}"
        );
        assert_eq!(
            self.wal().stats(),
            before,
            "a refused write changed the log"
        );
        self.check(&self.model.clone());
    }

    fn crash(&mut self, crash: &Crash) {
        drop(self.wal.take());
        let path = self.durable.path.clone();
        let synced = self.durable.synced_len;
        let end = data_end(&path);
        let expected = match *crash {
            Crash::Process => self.model.clone(),
            // Unsynced sectors reverted to the zeros written ahead (the file keeps its size).
            Crash::DropUnsynced => self.cut(&path, synced, end, true),
            // The file's last extension torn at any byte (its size moved with it).
            Crash::Tear(at) => self.cut(
                &path,
                synced + ((end - synced) as f64 * at) as u64,
                end,
                false,
            ),
            Crash::TearAtFrame(at) => {
                let boundaries = frame_boundaries(&path, synced);
                let cut = boundaries[((boundaries.len() - 1) as f64 * at) as usize];
                self.cut(&path, cut, end, false)
            }
            Crash::LostSectors(seed) => match lose_sectors(&path, synced, end, seed) {
                Some(first_lost) => self.survivor(first_lost),
                None => self.model.clone(),
            },
            Crash::UnwrittenSectors(at) => {
                let cut = (synced + ((end - synced) as f64 * at) as u64).next_multiple_of(SECTOR);
                if cut >= end {
                    self.model.clone()
                } else {
                    self.cut(&path, cut, end, true)
                }
            }
        };
        let (wal, report) = Wal::open(self.dir.path(), options(false))
            .unwrap_or_else(|e| panic!("reopen after {crash:?}: {e}"));
        self.wal = Some(wal);
        self.check(&expected);
        if matches!(crash, Crash::Process) {
            assert!(
                report.torn_tail.is_none(),
                "a clean process crash left a torn tail: {report:?}"
            );
        }
        self.reset_durable(expected);
    }

    /// Cuts the newest file at `at` (or zero-fills from there to the file's end, as a crash
    /// leaves a segment whose zeros were written ahead), returning the state that must
    /// survive: the last write that ends at or before the cut.
    fn cut(&self, path: &Path, at: u64, end: u64, zero_fill: bool) -> Model {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let file_len = file.metadata().unwrap().len();
        file.set_len(at).unwrap();
        if zero_fill {
            file.set_len(file_len.max(end)).unwrap();
        }
        self.survivor(at)
    }

    /// The state after the last write that ends at or before byte `at` of the newest file.
    fn survivor(&self, at: u64) -> Model {
        self.unsynced
            .iter()
            .rev()
            .find(|(write_end, _)| *write_end <= at)
            .map_or_else(|| self.durable.model.clone(), |(_, m)| m.clone())
    }

    fn flip_bit(&mut self, file: usize, byte: f64, bit: u8) {
        if self.single_damage && self.damaged {
            return;
        }
        self.damaged = true;
        drop(self.wal.take());
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        files.sort();
        let path = files[file % files.len()].clone();
        let synced = if path == self.durable.path {
            self.durable.synced_len
        } else {
            data_end(&path)
        };
        let offset = (synced as f64 * byte) as u64;
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offset as usize] ^= 1 << bit;
        std::fs::write(&path, &bytes).unwrap();

        match Wal::open(self.dir.path(), options(false)) {
            Err(Error::Corruption {
                path: reported,
                offset: at,
                ..
            }) => {
                assert_eq!(reported, path, "corruption reported in the wrong file");
                assert!(
                    at <= offset,
                    "corruption reported at {at}, after the flipped byte {offset}"
                );
            }
            other => panic!(
                "flipped bit {bit} at {} byte {offset} not reported: {:?}",
                path.display(),
                other.map(|_| ())
            ),
        }
        let (wal, report) = Wal::open(self.dir.path(), options(true)).expect("repair opens");
        if std::env::var_os("PHXQ_MODEL_TRACE").is_some() {
            eprintln!(
                "flipped {} byte {offset} bit {bit}: {report:?}\n  state {:?}",
                path.display(),
                read_model(&wal).values().map(summary).collect::<Vec<_>>()
            );
        }
        assert!(
            !report.repaired.is_empty(),
            "repair found nothing to repair"
        );
        let recovered = read_model(&wal);
        for (group, got) in &recovered {
            let want = self.model.get(group).cloned().unwrap_or_default();
            let compaction = (
                *group,
                got.compact_index,
                got.compact_term,
                got.snapshot.clone(),
            );
            assert!(
                compaction == (*group, 0, 0, Vec::new()) || self.compactions.contains(&compaction),
                "{group}: repair left compaction point {}@{} with a snapshot of {} bytes that \
                 was never written together",
                got.compact_index,
                got.compact_term,
                got.snapshot.len()
            );
            assert!(
                got.hard_state.commit <= got.last_index(),
                "{group}: commit past the last index after repair"
            );
            for (index, entry) in &got.entries {
                // An entry the model holds, or one committed once (a lost compaction, or a cut
                // from an earlier repair whose checkpoint this damage took).
                let committed = self.committed.get(&(*group, *index));
                let known = want.entries.get(index) == Some(entry) || committed == Some(entry);
                assert!(
                    known,
                    "{group}: repair kept entry {index}, neither in the model nor ever committed"
                );
            }
        }
        drop(wal);
        let (wal, _) =
            Wal::open(self.dir.path(), options(false)).expect("the repaired log opens strictly");
        assert_eq!(read_model(&wal), recovered, "repair did not stick");
        self.wal = Some(wal);
        self.reset_durable(recovered);
    }

    fn reset_durable(&mut self, model: Model) {
        self.model = model.clone();
        let path = newest_segment(self.dir.path());
        let synced_len = data_end(&path);
        self.durable = Durable {
            path,
            synced_len,
            model,
        };
        self.unsynced.clear();
    }

    /// The log must hold exactly `expected`.
    fn check(&self, expected: &Model) {
        let got = read_model(self.wal());
        for g in 0..GROUPS {
            let group = GroupId(g);
            let want = expected.get(&group).cloned().unwrap_or_default();
            let have = got.get(&group).cloned().unwrap_or_default();
            assert!(
                have == want,
                "{group} differs from the model:\n  log:   {}\n  model: {}",
                summary(&have),
                summary(&want)
            );
        }
    }
}

/// An append at the end of a group's log, in the current term (for the regression tests).
fn append(group: u64, count: u64, bytes: usize) -> Op {
    Op::Append {
        group,
        back: 0,
        count,
        new_term: false,
        bytes,
    }
}

/// Runs `ops` on a fresh log, checking it against the model after each one.
fn run_ops(ops: &[Op], single_damage: bool) -> Harness {
    let mut harness = Harness::new();
    harness.single_damage = single_damage;
    for op in ops {
        harness.run(op);
        harness.check(&harness.model.clone());
    }
    harness
}

/// Offsets where frames start in `path` from `from` (a frame boundary) to the end of file.
/// Reads only frame lengths: `[len u32 (top bit: more in this write)][..16 bytes][payload][4]`.
/// Where a segment's data ends: after its last non-zero byte (every frame ends in a non-zero
/// end marker; zeros written ahead follow).
fn data_end(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

fn frame_boundaries(path: &Path, from: u64) -> Vec<u64> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.truncate(data_end(path) as usize);
    let mut at = from as usize;
    let mut boundaries = vec![at as u64];
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) & !(1 << 31);
        at += 20 + len as usize + 4;
        if at > bytes.len() {
            break;
        }
        boundaries.push(at as u64);
    }
    boundaries
}

/// One line per group: compaction point, hard state, and (index, term, first data byte).
fn summary(g: &ModelGroup) -> String {
    let entries: Vec<String> = g
        .entries
        .iter()
        .map(|(i, (t, d))| format!("{i}/{t}/{}", d.first().copied().unwrap_or(0)))
        .collect();
    format!(
        "compact {}@{} snapshot {} bytes ({:?}) {:?} [{}]",
        g.compact_index,
        g.compact_term,
        g.snapshot.len(),
        &g.snapshot[..g.snapshot.len().min(4)],
        g.hard_state,
        entries.join(" ")
    )
}

/// Everything the log holds, read back through its public API.
fn read_model(wal: &Wal) -> Model {
    let mut model = Model::new();
    for g in 0..GROUPS {
        let group = GroupId(g);
        let info = wal.group(group).unwrap();
        let entries = wal
            .entries(group, info.first_index, info.last_index + 1, None)
            .unwrap();
        let mut contiguous = info.first_index;
        for e in &entries {
            assert_eq!(e.index, contiguous, "{group}: entries not contiguous");
            assert_eq!(wal.term(group, e.index).unwrap(), e.term);
            contiguous += 1;
        }
        assert_eq!(contiguous, info.last_index + 1, "{group}: entries missing");
        let m = ModelGroup {
            entries: entries
                .into_iter()
                .map(|e| (e.index, (e.term, e.data)))
                .collect(),
            compact_index: info.first_index - 1,
            compact_term: info.compact_term,
            snapshot: info.snapshot,
            hard_state: info.hard_state,
            conf_state: info.conf_state,
        };
        if m != ModelGroup::default() {
            model.insert(group, m);
        }
    }
    model
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PHXQ_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_log_matches_the_model_through_crashes_tears_and_bit_flips(ops in prop::collection::vec(op(), 1..80)) {
        let mut harness = run_ops(&ops, true);
        // A last clean reopen sees the same log.
        harness.run(&Op::Crash(Crash::Process));
    }
}

/// Found by the property test: a second repair loses the checkpoint holding the first one's
/// cuts, and committed entries the first cut come back.
#[test]
fn a_second_repair_may_bring_back_committed_entries_the_first_cut() {
    let ops = [
        append(0, 3, 1),
        append(1, 4, 12),
        Op::Sync,
        Op::Crash(Crash::Process),
        append(1, 4, 135),
        append(0, 3, 398),
        Op::HardState {
            group: 0,
            commit: 0.35533452730176757,
            vote: 0,
        },
        Op::Compact {
            group: 0,
            to: 0.5028064503170144,
            snapshot_bytes: 0,
        },
        append(1, 4, 353),
        Op::FlipBit {
            file: 3,
            byte: 0.14913060350482943,
            bit: 0,
        },
        Op::FlipBit {
            file: 3,
            byte: 0.0,
            bit: 0,
        },
    ];
    run_ops(&ops, false);
}

/// Found by the property test: two bit flips, each repaired, around a snapshot install.
#[test]
fn repair_twice_around_a_snapshot() {
    let hard_state = Op::HardState {
        group: 0,
        commit: 0.0,
        vote: 0,
    };
    let ops = [
        append(0, 1, 0),
        append(0, 1, 0),
        hard_state.clone(),
        Op::Snapshot {
            group: 0,
            ahead: 0,
            snapshot_bytes: 0,
        },
        Op::FlipBit {
            file: 0,
            byte: 0.8203565438515397,
            bit: 0,
        },
        hard_state,
        Op::FlipBit {
            file: 0,
            byte: 0.22357441589632696,
            bit: 0,
        },
    ];
    run_ops(&ops, false);
}

/// Found by the property test: commit past the last index after a second repair.
#[test]
fn a_second_repair_keeps_commit_within_the_log() {
    let ops = [
        Op::HardState {
            group: 0,
            commit: 0.0,
            vote: 0,
        },
        append(1, 2, 195),
        append(2, 5, 239),
        Op::Snapshot {
            group: 0,
            ahead: 0,
            snapshot_bytes: 0,
        },
        append(0, 5, 294),
        Op::Crash(Crash::DropUnsynced),
        Op::Snapshot {
            group: 0,
            ahead: 0,
            snapshot_bytes: 0,
        },
        append(0, 1, 0),
        append(0, 1, 0),
        Op::HardState {
            group: 2,
            commit: 0.42822984586358676,
            vote: 0,
        },
        Op::Truncate {
            group: 1,
            from: 0.0,
        },
        Op::Invalid { group: 0, kind: 0 },
        Op::FlipBit {
            file: 2,
            byte: 0.45754869925014646,
            bit: 0,
        },
        Op::FlipBit {
            file: 5,
            byte: 0.15295555169953592,
            bit: 5,
        },
    ];
    run_ops(&ops, false);
}
