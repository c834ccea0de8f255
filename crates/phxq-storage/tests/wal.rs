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
    compact.compact(GroupId(7), 95);
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
        batch.compact(GroupId(2), i - 1);
        wal.write(&batch).unwrap();
        wal.sync().unwrap();
    }
    assert!(wal.stats().segments_deleted > 5);
    drop(wal);
    let wal = open(dir.path());
    assert_eq!(wal.group(GroupId(1)).unwrap().hard_state, idle);
    assert_eq!(wal.group(GroupId(2)).unwrap().last_index, 200);
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
