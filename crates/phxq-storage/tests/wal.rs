//! Scenario tests of the write-ahead log, each named after what it does to the log.

use std::sync::{Arc, Barrier};

use phxq_storage::{
    ConfState, EntryKind, Error, GroupId, GroupStorage, HardState, LogEntry, Wal, WalOptions,
    WriteBatch, raft_storage,
};

fn entry(index: u64, term: u64, data: &[u8]) -> LogEntry {
    LogEntry {
        index,
        term,
        kind: EntryKind::Normal,
        data: data.to_vec(),
        context: vec![],
    }
}

fn open(dir: &std::path::Path) -> Wal {
    Wal::open(
        dir,
        WalOptions {
            segment_bytes_max: 8192,
            repair: false,
            ..WalOptions::default()
        },
    )
    .expect("open")
    .0
}

#[test]
fn concurrent_writers_share_fsyncs_and_everything_they_were_told_is_durable_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path()));
    const WRITERS: u64 = 16;
    const EACH: u64 = 50;
    let start = Arc::new(Barrier::new(WRITERS as usize));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (wal, start) = (Arc::clone(&wal), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for i in 1..=EACH {
                    let mut batch = WriteBatch::new();
                    batch.append(GroupId(w), [entry(i, 1, &[w as u8; 100])]);
                    let lsn = wal.write(&batch).unwrap();
                    assert!(wal.sync_to(lsn).unwrap() >= lsn);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let stats = wal.stats();
    assert_eq!(stats.writes, WRITERS * EACH);
    assert!(stats.syncs < stats.writes, "no fsync was shared: {stats:?}");
    assert!(
        stats.rotations > 1,
        "segments should have rotated: {stats:?}"
    );
    drop(wal);
    let wal = open(dir.path());
    for w in 0..WRITERS {
        let entries = wal.entries(GroupId(w), 1, EACH + 1, None).unwrap();
        assert_eq!(entries.len() as u64, EACH);
        assert!(entries.iter().all(|e| e.data == [w as u8; 100]));
    }
}

#[test]
fn a_failed_fsync_poisons_the_log_for_every_caller() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let mut batch = WriteBatch::new();
    batch.append(GroupId(1), [entry(1, 1, b"before")]);
    let lsn = wal.write(&batch).unwrap();
    wal.fail_next_sync();
    assert!(matches!(
        wal.sync_to(lsn),
        Err(Error::Io {
            op: "fsync segment",
            ..
        })
    ));
    let mut later = WriteBatch::new();
    later.append(GroupId(1), [entry(2, 1, b"after")]);
    assert!(matches!(wal.write(&later), Err(Error::Poisoned { .. })));
    assert!(matches!(wal.sync(), Err(Error::Poisoned { .. })));
    assert!(matches!(
        wal.entries(GroupId(1), 1, 2, None),
        Err(Error::Poisoned { .. })
    ));
    assert!(matches!(wal.group(GroupId(1)), Err(Error::Poisoned { .. })));
}

#[test]
fn a_second_process_cannot_open_a_log_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let second = Wal::open(dir.path(), WalOptions::default());
    assert!(
        matches!(second, Err(Error::Locked { .. })),
        "{:?}",
        second.map(|_| ())
    );
}

#[test]
fn compacted_segments_are_deleted_only_once_the_compaction_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let count_segments = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "wal")
            })
            .count()
    };
    for i in 1..=100 {
        let mut batch = WriteBatch::new();
        batch.append(GroupId(7), [entry(i, 1, &[1; 200])]);
        wal.write(&batch).unwrap();
    }
    let mut commit = WriteBatch::new();
    commit.hard_state(
        GroupId(7),
        HardState {
            term: 1,
            vote: 1,
            commit: 100,
        },
    );
    wal.write(&commit).unwrap();
    wal.sync().unwrap();
    let before = count_segments();
    assert!(before > 2, "expected several segments, got {before}");

    let mut compact = WriteBatch::new();
    compact.compact(GroupId(7), 95, b"state machine at 95".to_vec());
    wal.write(&compact).unwrap();
    assert_eq!(
        count_segments(),
        before,
        "deleted before the compaction was durable"
    );
    wal.sync().unwrap();
    assert!(
        count_segments() < before,
        "nothing deleted after the compaction was durable"
    );
    assert!(wal.stats().segments_deleted > 0);
    drop(wal);

    let wal = open(dir.path());
    let info = wal.group(GroupId(7)).unwrap();
    assert_eq!(
        (info.first_index, info.last_index, info.compact_term),
        (96, 100, 1)
    );
    assert_eq!(info.snapshot, b"state machine at 95");
    assert_eq!(wal.entries(GroupId(7), 96, 101, None).unwrap().len(), 5);
    assert!(matches!(
        wal.entries(GroupId(7), 95, 96, None),
        Err(Error::Compacted { .. })
    ));
}

#[test]
fn an_idle_groups_hard_state_survives_the_deletion_of_the_segment_that_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let idle = HardState {
        term: 9,
        vote: 3,
        commit: 0,
    };
    let mut batch = WriteBatch::new();
    batch.hard_state(GroupId(1), idle.clone());
    wal.write(&batch).unwrap();
    // A busy group fills and frees many segments; the idle group never writes again.
    for i in 1..=200 {
        let mut batch = WriteBatch::new();
        batch.append(GroupId(2), [entry(i, 1, &[2; 300])]);
        batch.hard_state(
            GroupId(2),
            HardState {
                term: 1,
                vote: 0,
                commit: i,
            },
        );
        batch.compact(
            GroupId(2),
            i - 1,
            format!("state at {}", i - 1).into_bytes(),
        );
        wal.write(&batch).unwrap();
        wal.sync().unwrap();
    }
    assert!(wal.stats().segments_deleted > 5);
    drop(wal);
    let wal = open(dir.path());
    assert_eq!(wal.group(GroupId(1)).unwrap().hard_state, idle);
    let busy = wal.group(GroupId(2)).unwrap();
    assert_eq!(busy.last_index, 200);
    assert_eq!(
        busy.snapshot, b"state at 199",
        "the snapshot came back, though the segments of its first compactions are gone"
    );
}

/// A single-voter raft group elects itself, commits proposals through the log, restarts from
/// the log, and carries on: the log is a complete raft-rs storage.
#[test]
fn a_raft_node_commits_through_the_log_and_restarts_from_it() {
    use raft::{Config, RawNode, Storage};
    let dir = tempfile::tempdir().unwrap();
    let group = GroupId(42);
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let config = Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        ..Default::default()
    };

    let run = |wal: Arc<Wal>, proposals: &[&[u8]]| -> Vec<Vec<u8>> {
        let storage = GroupStorage::new(Arc::clone(&wal), group);
        let mut node = RawNode::new(&config, storage, &logger).unwrap();
        node.campaign().unwrap();
        let mut applied = Vec::new();
        let mut pending = proposals.iter();
        for _ in 0..100 {
            if node.raft.state == raft::StateRole::Leader
                && let Some(p) = pending.next()
            {
                node.propose(vec![], p.to_vec()).unwrap();
            }
            if !node.has_ready() {
                node.tick();
                continue;
            }
            let mut ready = node.ready();
            let mut batch = WriteBatch::new();
            batch.append(
                group,
                ready.entries().iter().map(raft_storage::entry_from_raft),
            );
            if let Some(hs) = ready.hs() {
                batch.hard_state(group, raft_storage::hard_state_from_raft(hs));
            }
            let lsn = wal.write(&batch).unwrap();
            wal.sync_to(lsn).unwrap();
            let committed = ready.take_committed_entries();
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                let mut batch = WriteBatch::new();
                let hs = HardState {
                    commit,
                    ..wal.group(group).unwrap().hard_state
                };
                batch.hard_state(group, hs);
                wal.sync_to(wal.write(&batch).unwrap()).unwrap();
            }
            for e in committed
                .iter()
                .chain(light.take_committed_entries().iter())
            {
                if !e.data.is_empty() {
                    applied.push(e.data.to_vec());
                }
            }
            node.advance_apply();
        }
        applied
    };

    let wal = Arc::new(open(dir.path()));
    let mut bootstrap = WriteBatch::new();
    bootstrap.conf_state(
        group,
        ConfState {
            voters: vec![1],
            ..Default::default()
        },
    );
    wal.sync_to(wal.write(&bootstrap).unwrap()).unwrap();
    let first = run(Arc::clone(&wal), &[b"a", b"b", b"c"]);
    assert_eq!(first, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    drop(wal);

    let wal = Arc::new(open(dir.path()));
    let storage = GroupStorage::new(Arc::clone(&wal), group);
    let state = storage.initial_state().unwrap();
    assert!(
        state.hard_state.commit >= 4,
        "commit index lost: {:?}",
        state.hard_state
    );
    let last = storage.last_index().unwrap();
    let logged: Vec<Vec<u8>> = storage
        .entries(1, last + 1, None, raft::GetEntriesContext::empty(false))
        .unwrap()
        .into_iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.data.to_vec())
        .collect();
    assert_eq!(logged, first);
    // Restarted without an applied index of its own (the state machine arrives with the
    // store), the node replays committed entries, then commits new ones after them.
    let second = run(wal, &[b"d"]);
    assert_eq!(second.last(), Some(&b"d".to_vec()));
}

#[test]
fn the_reserved_group_id_is_refused_and_the_log_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let mut batch = WriteBatch::new();
    batch.append(phxq_storage::GROUP_ID_RESERVED, [entry(1, 1, b"x")]);
    assert!(matches!(wal.write(&batch), Err(Error::InvalidWrite { .. })));
    let mut fine = WriteBatch::new();
    fine.append(GroupId(1), [entry(1, 1, b"x")]);
    wal.sync_to(wal.write(&fine).unwrap()).unwrap();
}

fn write_one(wal: &Wal, group: u64, index: u64, data: &[u8]) -> u64 {
    let mut batch = WriteBatch::new();
    batch.append(GroupId(group), [entry(index, 1, data)]);
    wal.write(&batch).unwrap()
}

/// Waits (yielding, no timer) until `done` holds.
fn until(mut done: impl FnMut() -> bool) {
    while !done() {
        std::thread::yield_now();
    }
}

/// Group commit under contention: whatever the interleaving, no caller is told its write is
/// durable before a sync covering it returned, and every caller gets an answer.
#[test]
fn under_contention_every_caller_is_answered_and_never_before_its_write_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path()));
    const WRITERS: u64 = 48;
    const EACH: u64 = 40;
    let start = Arc::new(Barrier::new(WRITERS as usize));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (wal, start) = (Arc::clone(&wal), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for i in 1..=EACH {
                    let lsn = write_one(&wal, w, i, &[w as u8; 20]);
                    let durable = wal.sync_to(lsn).unwrap();
                    let stats = wal.stats();
                    assert!(durable >= lsn, "told {durable} for write {lsn}");
                    assert!(
                        durable <= stats.durable_lsn && durable <= stats.last_lsn,
                        "told {durable}, but the log says {stats:?}"
                    );
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let stats = wal.stats();
    assert_eq!(stats.writes, WRITERS * EACH);
    assert!(stats.syncs < stats.writes, "no fsync was shared: {stats:?}");
}

/// While one sync is slow, every writer that arrives waits for it; when it ends, one of them
/// runs one more sync for all the rest: two fsyncs for 32 callers.
#[test]
fn writers_arriving_during_a_slow_fsync_share_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let wal = Arc::new(wal);
    const WRITERS: u64 = 32;
    wal.hold_syncs();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let lsn = write_one(&wal, w, 1, b"x");
                (lsn, wal.sync_to(lsn).unwrap())
            })
        })
        .collect();
    // One caller holds the lead (its sync is held); every other one is asleep behind it.
    until(|| wal.sync_waiters() == WRITERS as usize - 1);
    assert_eq!(wal.stats().syncs, 0);
    wal.release_syncs();
    let durable_now = |wal: &Wal| wal.stats().durable_lsn;
    for thread in threads {
        let (lsn, durable) = thread.join().unwrap();
        assert!(lsn <= durable && durable <= durable_now(&wal));
    }
    let stats = wal.stats();
    assert!(
        (1..=2).contains(&stats.syncs),
        "{WRITERS} callers should need the held sync and at most one more: {stats:?}"
    );
    assert_eq!(wal.sync_waiters(), 0);
}

/// A sync fails while every other writer waits for it: all of them are told, none is told
/// success, none sleeps forever, and the log stays poisoned.
#[test]
fn a_failed_fsync_wakes_every_waiting_writer_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let wal = Arc::new(wal);
    const WRITERS: u64 = 16;
    wal.hold_syncs();
    wal.fail_next_sync();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let lsn = write_one(&wal, w, 1, b"x");
                wal.sync_to(lsn)
            })
        })
        .collect();
    until(|| wal.sync_waiters() == WRITERS as usize - 1);
    wal.release_syncs();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed_sync = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Err(Error::Io {
                    op: "fsync segment",
                    ..
                })
            )
        })
        .count();
    let poisoned = outcomes
        .iter()
        .filter(|o| matches!(o, Err(Error::Poisoned { .. })))
        .count();
    assert_eq!(
        (failed_sync, poisoned),
        (1, WRITERS as usize - 1),
        "{outcomes:?}"
    );
    assert!(matches!(wal.sync(), Err(Error::Poisoned { .. })));
    assert_eq!(wal.stats().syncs, 0);
}

/// Deleting a dead segment is housekeeping: when it fails, the sync that made the deletion
/// possible still succeeds, the failure is counted, and the next open deletes the file.
#[test]
fn a_segment_that_cannot_be_deleted_does_not_fail_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    for i in 1..=100 {
        write_one(&wal, 7, i, &[1; 200]);
    }
    let mut commit = WriteBatch::new();
    commit.hard_state(
        GroupId(7),
        HardState {
            term: 1,
            vote: 1,
            commit: 100,
        },
    );
    wal.write(&commit).unwrap();
    wal.sync().unwrap();
    let mut compact = WriteBatch::new();
    compact.compact(GroupId(7), 95, b"at 95".to_vec());
    wal.write(&compact).unwrap();
    wal.fail_next_segment_delete();
    wal.sync()
        .expect("the sync succeeds though a deletion failed");
    let stats = wal.stats();
    assert_eq!(stats.segment_delete_failures, 1, "{stats:?}");
    assert!(stats.segments_deleted > 0, "the other dead segments went");
    wal.sync().unwrap();
    drop(wal);

    let (wal, report) = Wal::open(
        dir.path(),
        WalOptions {
            segment_bytes_max: 8192,
            repair: false,
            ..WalOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        report.segments_deleted, 1,
        "the left-over segment: {report:?}"
    );
    let info = wal.group(GroupId(7)).unwrap();
    assert_eq!((info.first_index, info.last_index), (96, 100));
    assert_eq!(info.snapshot, b"at 95");
}

/// The snapshot is the state machine at the compaction point: it moves with the compaction
/// point and nowhere else.
#[test]
fn a_snapshot_moves_with_the_compaction_point_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let group = GroupId(3);
    assert_eq!(wal.group(group).unwrap().snapshot, b"");
    for i in 1..=10 {
        write_one(&wal, 3, i, b"e");
    }
    let mut batch = WriteBatch::new();
    batch.compact(group, 4, b"at 4".to_vec());
    wal.write(&batch).unwrap();
    // At or below the compaction point: nothing happens, the snapshot stays.
    let mut batch = WriteBatch::new();
    batch.compact(group, 4, b"ignored".to_vec());
    batch.compact(group, 2, b"ignored too".to_vec());
    wal.write(&batch).unwrap();
    assert_eq!(wal.group(group).unwrap().snapshot, b"at 4");
    // Too large: refused, nothing changes.
    let mut batch = WriteBatch::new();
    batch.compact(group, 6, vec![0; phxq_storage::SNAPSHOT_BYTES_MAX + 1]);
    assert!(matches!(wal.write(&batch), Err(Error::InvalidWrite { .. })));
    let mut batch = WriteBatch::new();
    batch.install_snapshot(
        group,
        20,
        2,
        ConfState::default(),
        vec![0; phxq_storage::SNAPSHOT_BYTES_MAX + 1],
    );
    assert!(matches!(wal.write(&batch), Err(Error::InvalidWrite { .. })));
    assert_eq!(wal.group(group).unwrap().first_index, 5);
    // A snapshot of the largest size is accepted.
    let largest = vec![7; phxq_storage::SNAPSHOT_BYTES_MAX];
    let mut batch = WriteBatch::new();
    batch.compact(group, 6, largest.clone());
    wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    drop(wal);

    let wal = open(dir.path());
    let info = wal.group(group).unwrap();
    assert_eq!((info.first_index, info.last_index), (7, 10));
    assert!(info.snapshot == largest, "the largest snapshot came back");
    let mut batch = WriteBatch::new();
    batch.install_snapshot(
        group,
        30,
        3,
        ConfState {
            voters: vec![1, 2],
            ..Default::default()
        },
        b"installed at 30".to_vec(),
    );
    wal.sync_to(wal.write(&batch).unwrap()).unwrap();
    drop(wal);

    let wal = Arc::new(open(dir.path()));
    let storage = GroupStorage::new(Arc::clone(&wal), group);
    use raft::Storage;
    let snapshot = storage.snapshot(0, 2).unwrap();
    assert_eq!(&snapshot.data[..], b"installed at 30");
    let metadata = snapshot.get_metadata();
    assert_eq!((metadata.index, metadata.term), (30, 3));
    assert_eq!(metadata.get_conf_state().voters, [1, 2]);
}

/// A master whose log is compacted past a lagging follower sends it the stored snapshot.
#[test]
fn a_lagging_follower_is_sent_the_snapshot_stored_at_the_compaction_point() {
    use raft::eraftpb::{Message, MessageType};
    use raft::{Config, RawNode};
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path()));
    let group = GroupId(5);
    let mut batch = WriteBatch::new();
    batch.conf_state(
        group,
        ConfState {
            voters: vec![1, 2],
            ..Default::default()
        },
    );
    batch.append(group, (1..=10).map(|i| entry(i, 1, b"old")));
    batch.hard_state(
        group,
        HardState {
            term: 1,
            vote: 1,
            commit: 10,
        },
    );
    batch.compact(group, 10, b"state machine at 10".to_vec());
    wal.sync_to(wal.write(&batch).unwrap()).unwrap();

    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let config = Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        applied: 10,
        ..Default::default()
    };
    let storage = GroupStorage::new(Arc::clone(&wal), group);
    let mut node = RawNode::new(&config, storage, &logger).unwrap();
    node.campaign().unwrap();
    let term = node.raft.term;
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestVoteResponse);
    (vote.from, vote.to, vote.term) = (2, 1, term);
    node.step(vote).unwrap();
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    // Follower 2 has nothing: it rejects the first append with a hint of index 0.
    let mut reject = Message::default();
    reject.set_msg_type(MessageType::MsgAppendResponse);
    (reject.from, reject.to, reject.term) = (2, 1, term);
    (reject.index, reject.reject, reject.reject_hint) = (10, true, 0);
    node.step(reject).unwrap();
    let mut sent = Vec::new();
    for _ in 0..3 {
        if !node.has_ready() {
            break;
        }
        let mut ready = node.ready();
        sent.extend(ready.take_messages());
        let mut batch = WriteBatch::new();
        batch.append(
            group,
            ready.entries().iter().map(raft_storage::entry_from_raft),
        );
        if let Some(hs) = ready.hs() {
            batch.hard_state(group, raft_storage::hard_state_from_raft(hs));
        }
        wal.sync_to(wal.write(&batch).unwrap()).unwrap();
        let mut light = node.advance(ready);
        sent.extend(light.take_messages());
    }
    let snapshot = sent
        .iter()
        .find(|m| m.get_msg_type() == MessageType::MsgSnapshot && m.to == 2)
        .unwrap_or_else(|| panic!("no snapshot sent: {sent:?}"))
        .get_snapshot();
    assert_eq!(&snapshot.data[..], b"state machine at 10");
    assert_eq!(snapshot.get_metadata().index, 10);
}

/// Opens a log writing zeros ahead of its data, as a power failure over it would find it.
fn open_preallocated(dir: &std::path::Path) -> Wal {
    let options = WalOptions {
        preallocate_bytes: 64 << 10,
        ..WalOptions::default()
    };
    Wal::open(dir, options).expect("open").0
}

/// The only segment file of a log that was opened once.
fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

/// Zeroes the first whole 512-byte sector at or after `offset` (a sector the disk lost).
fn lose_sector_after(path: &std::path::Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let start = offset.next_multiple_of(512);
    bytes[start..start + 512].fill(0);
    std::fs::write(path, bytes).unwrap();
}

/// Where the frame of `group`'s entry `index` starts: found by its payload, which is unique.
fn offset_of(path: &std::path::Path, payload: &[u8]) -> usize {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .windows(payload.len())
        .position(|w| w == payload)
        .expect("payload in the segment")
}

/// Over zeros written ahead, a power failure can lose a sector of an unsynced write while a
/// later unsynced write lands. Nothing written after it knew it durable: it is a torn tail,
/// cut with everything after it, and the synced write before it comes back.
#[test]
fn a_lost_sector_before_a_later_write_that_landed_is_a_torn_tail_when_never_synced() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open_preallocated(dir.path());
    let synced = write_one(&wal, 1, 1, &[1; 700]);
    wal.sync_to(synced).unwrap();
    write_one(&wal, 1, 2, &[2; 2000]);
    write_one(&wal, 1, 3, &[3; 300]);
    drop(wal);
    let path = only_segment(dir.path());
    lose_sector_after(&path, offset_of(&path, &[2; 2000]));
    let (wal, report) = Wal::open(dir.path(), WalOptions::default()).expect("a torn tail opens");
    let (_, _, cut) = report.torn_tail.expect("the tail was cut");
    assert!(
        cut > 2300,
        "the damaged write and the one after it: {cut} bytes"
    );
    assert_eq!(
        wal.group(GroupId(1)).unwrap().last_index,
        1,
        "only the synced entry"
    );
    let entries = wal.entries(GroupId(1), 1, 2, None).unwrap();
    assert_eq!(entries[0].data, vec![1; 700]);
}

/// The same lost sector, but a later write was made after a sync covered it: it was durable,
/// so its loss is damage to synced data, reported, never cut silently.
#[test]
fn a_lost_sector_that_a_later_write_knew_durable_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open_preallocated(dir.path());
    let lsn = write_one(&wal, 1, 1, &[2; 2000]);
    wal.sync_to(lsn).unwrap();
    write_one(&wal, 1, 2, &[3; 300]);
    drop(wal);
    let path = only_segment(dir.path());
    let damaged = offset_of(&path, &[2; 2000]);
    lose_sector_after(&path, damaged);
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(Error::Corruption { offset, .. }) => assert!(offset as usize <= damaged),
        other => panic!(
            "a lost synced sector must be reported: {:?}",
            other.map(|_| ())
        ),
    }
}
