//! [`Wal::durable`]: futures that wait for durability, and the syncer thread that serves them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phxq_storage::{EntryKind, Error, GroupId, LogEntry, Lsn, Wal, WalOptions, WriteBatch};

fn open(dir: &std::path::Path) -> Arc<Wal> {
    let options = WalOptions {
        segment_bytes_max: 16 << 10,
        ..WalOptions::default()
    };
    Arc::new(Wal::open(dir, options).expect("open").0)
}

fn write_one(wal: &Wal, group: u64, index: u64, data: &[u8]) -> Lsn {
    let mut batch = WriteBatch::new();
    batch.append(
        GroupId(group),
        [LogEntry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: data.to_vec(),
            context: vec![],
        }],
    );
    wal.write(&batch).expect("write")
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .build()
        .expect("runtime")
}

/// Waits for `done`; a condition that never comes is a failure, not a hang.
fn until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "the condition never came");
        std::thread::yield_now();
    }
}

/// 32 tasks on two workers, 60 writes each, every one awaited: each future resolves only once
/// its write is durable, the tasks share syncs, and everything comes back after a reopen.
#[test]
fn many_tasks_share_syncs_and_each_resolves_only_once_its_write_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    const TASKS: u64 = 32;
    const EACH: u64 = 60;
    runtime(2).block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let wal = Arc::clone(&wal);
                tokio::spawn(async move {
                    for index in 1..=EACH {
                        let lsn = write_one(&wal, task, index, &[task as u8; 200]);
                        let durable = wal.durable(lsn).unwrap().await.unwrap();
                        assert!(durable >= lsn, "resolved at {durable} for {lsn}");
                        assert!(wal.stats().durable_lsn >= lsn);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let stats = wal.stats();
    assert_eq!(stats.writes, TASKS * EACH);
    assert!(
        stats.syncs * 2 < stats.writes,
        "tasks should share syncs: {stats:?}"
    );
    assert!(stats.rotations > 1, "segments should rotate: {stats:?}");
    drop(wal);
    let wal = reopen_when_closed(dir.path());
    for task in 0..TASKS {
        let entries = wal.entries(GroupId(task), 1, EACH + 1, None).unwrap();
        assert_eq!(entries.len() as u64, EACH);
        assert!(entries.iter().all(|e| e.data == [task as u8; 200]));
    }
}

/// The syncer holds the log only during a round: once the last handle is dropped, the log
/// closes (its directory lock is released) within a round, without anyone stopping it.
fn reopen_when_closed(dir: &std::path::Path) -> Arc<Wal> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match Wal::open(dir, WalOptions::default()) {
            Ok((wal, _)) => return Arc::new(wal),
            Err(Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => panic!("the log never closed: {error}"),
        }
    }
}

/// A future awaited alone, with no sync running, syncs on its own thread: one fsync per
/// write, and no waiting on the syncer's list.
#[test]
fn a_lone_future_syncs_without_the_syncer() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    runtime(1).block_on(async {
        for index in 1..=5 {
            let lsn = write_one(&wal, 1, index, b"alone");
            assert_eq!(wal.durable(lsn).unwrap().await.unwrap(), lsn);
            assert_eq!(wal.durable_waiters(), 0);
        }
    });
    assert_eq!(wal.stats().syncs, 5);
}

/// A sync fails while futures wait on the syncer: every one resolves with an error, none with
/// success, none hangs; later calls fail at once.
#[test]
fn a_failed_sync_resolves_every_waiting_future_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    const TASKS: u64 = 12;
    wal.hold_syncs();
    let runtime = runtime(2);
    // The first future leads the (held) sync on its worker; the rest go to the syncer.
    let first = {
        let wal = Arc::clone(&wal);
        let lsn = write_one(&wal, 0, 1, b"x");
        runtime.spawn(async move { wal.durable(lsn).unwrap().await })
    };
    until(|| wal.sync_running());
    let rest: Vec<_> = (1..TASKS)
        .map(|task| {
            let wal = Arc::clone(&wal);
            let lsn = write_one(&wal, task, 1, b"x");
            runtime.spawn(async move { wal.durable(lsn).unwrap().await })
        })
        .collect();
    until(|| wal.durable_waiters() == TASKS as usize - 1);
    wal.fail_next_sync();
    wal.release_syncs();
    let outcomes: Vec<_> = runtime.block_on(async {
        let mut outcomes = vec![first.await.unwrap()];
        for task in rest {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    });
    assert!(
        outcomes.iter().all(Result::is_err),
        "a future resolved Ok after the failed sync: {outcomes:?}"
    );
    assert!(matches!(
        outcomes[0],
        Err(Error::Io {
            op: "fsync segment",
            ..
        })
    ));
    let lsn = wal.stats().last_lsn;
    assert!(matches!(wal.durable(lsn), Err(Error::Poisoned { .. })));
}
