//! Crash test with real processes: a child appends and syncs in a loop and reports what each
//! sync made durable; the parent kills it with SIGKILL at a random moment, reopens the log and
//! finds every reported record, byte for byte.
//!
//! What this proves, and what it does not. SIGKILL stops a *process*; the kernel keeps its page
//! cache, so every `pwrite` that returned survives whether or not it was synced. This test
//! therefore checks the write path and recovery under a process crash: whole records written
//! from several threads, segment rotation and deletion, torn tails (a fatal signal can cut a
//! `pwrite` short), checkpoints carrying metadata past deleted segments, and a recovery that
//! gives back what was written. Two oracles, both lower bounds per group:
//!
//! * every state reported `synced` comes back: the log's promise;
//! * every state reported `wrote` comes back too: the page cache kept it and recovery keeps
//!   every whole record (`Wal::open` replays and fsyncs what the crashed process wrote). This
//!   one catches a recovery that drops a record even when the kill did not land right after a
//!   sync, which is rare: most kills land during an `fdatasync`.
//!
//! It cannot see a missing or misplaced `fdatasync`: a child that skips the sync passes. Power
//! loss, which drops unsynced bytes, is the model-based test's job (`tests/model.rs` truncates
//! what was not synced).
//!
//! The child runs this same binary (`kill9 child <dir> <seed>`): Cargo builds it with
//! `harness = false`, so `main` chooses the role. One line per fact on the child's stdout:
//!
//! ```text
//! open <group> <last_index> <compact_index> <commit>     the state the child opened with
//! ready                                                  the child starts writing
//! wrote <group> <last_index> <compact_index> <commit>    after the write returned
//! synced <group> <last_index> <compact_index> <commit>   after the sync that covered it
//! stats <rotations> <segments_deleted>                   the child's WalStats
//! ```
//!
//! The seed (printed first, `PHXQ_KILL9_SEED=<seed>` to set it) replays the child's choices and
//! the kill delays, not the instruction the kill lands on; a failing run keeps its log
//! directory for inspection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use phxq_storage::{
    ConfState, EntryKind, GroupId, GroupInfo, HardState, LogEntry, Wal, WalOptions, WriteBatch,
};

/// Spawn, kill, recover: this many times, each child continuing the previous one's log.
const ROUNDS: u64 = 12;
/// Small segments, so that rotation and segment deletion happen many times a round.
const SEGMENT_BYTES_MAX: u64 = 64 * 1024;
/// Groups written by the child, numbered `0..GROUPS`.
const GROUPS: u64 = 8;
/// Child threads writing and syncing concurrently; thread `t` owns groups `g % THREADS == t`.
const WRITER_THREADS: u64 = 2;
/// Groups touched by one write batch, at most.
const BATCH_GROUPS_MAX: u64 = 3;
/// Entries appended to a group by one batch, at most.
const APPEND_ENTRIES_MAX: u64 = 8;
/// Entry payload sizes. The first 16 bytes name the entry (see [`entry_data`]).
const DATA_BYTES_MIN: u64 = 20;
const DATA_BYTES_MAX: u64 = 2000;
/// A group holding more live entries than this is compacted, keeping up to
/// `COMPACT_KEEP_MAX` of them: old segments empty out and get deleted.
const LIVE_ENTRIES_MAX: u64 = 128;
const COMPACT_KEEP_MAX: u64 = 64;
/// Most children are killed this long after they report `ready`, while writing and syncing.
const KILL_DELAY_MS_MIN: u64 = 20;
const KILL_DELAY_MS_MAX: u64 = 400;
/// One child in `EARLY_KILL_ONE_IN` is killed up to this long after it is spawned, while it
/// starts or recovers the log (recovery cuts torn tails, creates a segment, deletes segments).
const EARLY_KILL_ONE_IN: u64 = 4;
const EARLY_KILL_US_MAX: u64 = 6_000;
/// How long the parent waits for `ready` before calling the child hung.
const READY_TIMEOUT_MS: u64 = 30_000;
/// A child that was never killed stops writing after this long (the parent died, or forgot).
const CHILD_RUN_MS_MAX: u64 = 60_000;
/// Exit codes of a child that stopped by itself; any of them fails the round.
const CHILD_PANICKED_EXIT: i32 = 101;
const CHILD_OVERRAN_EXIT: i32 = 102;
const CHILD_ORPHANED_EXIT: i32 = 103;

/// Every entry has this term and every hard state this term and vote: the child never
/// truncates, so what a group holds only grows.
const TERM: u64 = 1;
const VOTE: u64 = 1;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2..]);
    } else {
        parent();
    }
}

fn wal_options() -> WalOptions {
    WalOptions {
        segment_bytes_max: SEGMENT_BYTES_MAX,
        repair: false,
        ..WalOptions::default()
    }
}

/// The membership every group is given before its first entry.
fn membership() -> ConfState {
    ConfState {
        voters: vec![1, 2, 3],
        ..ConfState::default()
    }
}

/// Entry `index` of `group`: the same bytes in every process and every round.
fn expected_entry(group: u64, index: u64) -> LogEntry {
    LogEntry {
        index,
        term: TERM,
        kind: EntryKind::Normal,
        data: entry_data(group, index),
        context: Vec::new(),
    }
}

/// The snapshot stored with a compaction of `group` to `index`: names both, so a snapshot that
/// came back with the wrong compaction point says whose it is.
fn expected_snapshot(group: u64, index: u64) -> Vec<u8> {
    if index == 0 {
        return Vec::new();
    }
    format!("state machine of g{group} at {index};")
        .repeat(1 + (index % 7) as usize)
        .into_bytes()
}

/// 20..=2000 bytes: the group and index (so a misplaced entry says whose it is), then bytes
/// drawn from a generator seeded by both.
fn entry_data(group: u64, index: u64) -> Vec<u8> {
    let mut rng = SplitMix64(group.rotate_right(16) ^ index);
    let bytes = rng.between(DATA_BYTES_MIN, DATA_BYTES_MAX) as usize;
    let mut data = Vec::with_capacity(bytes + 8);
    data.extend_from_slice(&group.to_le_bytes());
    data.extend_from_slice(&index.to_le_bytes());
    while data.len() < bytes {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(bytes);
    data
}

/// SplitMix64: small, seedable, good enough to pick sizes and moments.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (modulo bias is irrelevant here).
    fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high);
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `1 / n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n)
    }
}

/// What a group holds, as far as this test tracks it. All three only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupState {
    last_index: u64,
    compact_index: u64,
    commit: u64,
}

impl GroupState {
    fn of(info: &GroupInfo) -> GroupState {
        GroupState {
            last_index: info.last_index,
            compact_index: info.first_index - 1,
            commit: info.hard_state.commit,
        }
    }

    /// True if every field is at least `other`'s.
    fn covers(&self, other: &GroupState) -> bool {
        self.last_index >= other.last_index
            && self.compact_index >= other.compact_index
            && self.commit >= other.commit
    }

    fn max(&self, other: &GroupState) -> GroupState {
        GroupState {
            last_index: self.last_index.max(other.last_index),
            compact_index: self.compact_index.max(other.compact_index),
            commit: self.commit.max(other.commit),
        }
    }
}

impl std::fmt::Display for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.last_index, self.compact_index, self.commit
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The child: write, sync, report, until killed.

fn child(args: &[String]) {
    let [dir, seed] = args else {
        panic!("usage: kill9 child <dir> <seed>, got {args:?}");
    };
    let seed: u64 = seed.parse().expect("child: the seed is a number");
    // A panic on a writer thread must end the process, not leave the other thread writing:
    // the parent then sees an exit code instead of its SIGKILL and fails the round.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report_panic(info);
        std::process::exit(CHILD_PANICKED_EXIT);
    }));

    let (wal, _report) = Wal::open(dir, wal_options()).expect("child: open the log");
    let mut opened = String::new();
    for group in 0..GROUPS {
        let info = wal.group(GroupId(group)).expect("child: read a group");
        writeln!(opened, "open {group} {}", GroupState::of(&info)).expect("a String");
    }
    opened.push_str("ready\n");
    emit(&opened);

    let deadline = Instant::now() + Duration::from_millis(CHILD_RUN_MS_MAX);
    std::thread::scope(|scope| {
        for thread in 0..WRITER_THREADS {
            let wal = &wal;
            scope.spawn(move || write_until(wal, thread, seed, deadline));
        }
    });
    std::process::exit(CHILD_OVERRAN_EXIT);
}

/// One writer thread: a batch over a few of its groups, reported `wrote` once written and
/// `synced` once a sync covers it.
fn write_until(wal: &Wal, thread: u64, seed: u64, deadline: Instant) {
    let mut rng = SplitMix64(seed ^ thread.wrapping_mul(0xA076_1D64_78BD_642F));
    let owned: Vec<u64> = (0..GROUPS)
        .filter(|g| g % WRITER_THREADS == thread)
        .collect();
    while Instant::now() < deadline {
        let mut batch = WriteBatch::new();
        let mut planned: Vec<(u64, GroupState)> = Vec::new();
        for _ in 0..rng.between(1, BATCH_GROUPS_MAX) {
            let group = owned[rng.between(0, owned.len() as u64 - 1) as usize];
            if planned.iter().all(|&(g, _)| g != group) {
                planned.push((group, plan_group(wal, group, &mut rng, &mut batch)));
            }
        }
        let lsn = wal.write(&batch).expect("child: write");
        for &(group, plan) in &planned {
            let info = wal.group(GroupId(group)).expect("child: read a group");
            assert_eq!(
                GroupState::of(&info),
                plan,
                "child: g{group} after write {lsn}"
            );
        }
        emit(&report_lines("wrote", &planned));
        wal.sync_to(lsn).expect("child: sync");

        let stats = wal.stats();
        let mut report = report_lines("synced", &planned);
        writeln!(
            report,
            "stats {} {}",
            stats.rotations, stats.segments_deleted
        )
        .expect("a String");
        emit(&report);
    }
}

/// Adds one group's share of a batch: its membership before its first entry, 1..=8 entries,
/// sometimes a hard state committing them, and a compaction once the group holds too many.
/// Returns the state the batch leaves the group in.
fn plan_group(wal: &Wal, group: u64, rng: &mut SplitMix64, batch: &mut WriteBatch) -> GroupState {
    let id = GroupId(group);
    let mut state = GroupState::of(&wal.group(id).expect("child: read a group"));
    // Ahead of the entries in the same batch: recovery keeps a write whole or not at all, and
    // even one that kept a prefix would never leave entries without their membership.
    if state.last_index == 0 {
        batch.conf_state(id, membership());
    }
    let first = state.last_index + 1;
    state.last_index += rng.between(1, APPEND_ENTRIES_MAX);
    batch.append(
        id,
        (first..=state.last_index).map(|i| expected_entry(group, i)),
    );
    if rng.one_in(3) {
        state.commit = state.last_index;
        let hard_state = HardState {
            term: TERM,
            vote: VOTE,
            commit: state.commit,
        };
        batch.hard_state(id, hard_state);
    }
    if state.last_index - state.compact_index > LIVE_ENTRIES_MAX {
        state.compact_index = state.last_index - rng.between(0, COMPACT_KEEP_MAX);
        batch.compact(
            id,
            state.compact_index,
            expected_snapshot(group, state.compact_index),
        );
    }
    state
}

/// One `<kind> <group> <state>` line per group.
fn report_lines(kind: &str, states: &[(u64, GroupState)]) -> String {
    let mut lines = String::new();
    for (group, state) in states {
        writeln!(lines, "{kind} {group} {state}").expect("a String");
    }
    lines
}

/// Writes whole lines to stdout at once; a child whose parent is gone stops.
fn emit(lines: &str) {
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(lines.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(CHILD_ORPHANED_EXIT);
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: rounds of spawn, kill, recover, check.

/// What the rounds so far established.
#[derive(Default)]
struct History {
    /// Per group, the highest state any child reported synced: recovery owes at least this.
    synced: BTreeMap<u64, GroupState>,
    /// Per group, the highest state any child reported written: a process crash keeps it.
    written: BTreeMap<u64, GroupState>,
    /// Per group, what the latest recovery found: the next child must open exactly this, and
    /// no later recovery may find less.
    recovered: BTreeMap<u64, GroupState>,
    totals: Totals,
}

#[derive(Default, Debug)]
struct Totals {
    rounds: u64,
    /// Rounds whose child was killed before it got ready.
    early_kills: u64,
    syncs_reported: u64,
    entries_verified: u64,
    synced_entries_verified: u64,
    /// Entries recovered past the last reported sync: written, not yet synced, kept by the
    /// page cache.
    unsynced_entries_survived: u64,
    rotations: u64,
    segments_deleted_by_children: u64,
    segments_deleted_at_open: u64,
    torn_tails: u64,
}

fn parent() {
    let seed = match std::env::var("PHXQ_KILL9_SEED") {
        Ok(text) => text.parse().expect("PHXQ_KILL9_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_nanos() as u64,
    };
    println!("kill9: seed {seed} (PHXQ_KILL9_SEED={seed} replays the choices)");
    let dir = tempfile::Builder::new()
        .prefix("phxq-kill9-")
        .tempdir()
        .expect("create a temporary directory");
    let started = Instant::now();
    let mut history = History::default();
    let mut rng = SplitMix64(seed);
    for round in 0..ROUNDS {
        if let Err(violation) = run_round(dir.path(), round, &mut rng, &mut history) {
            let kept = dir.keep();
            panic!(
                "kill9 seed {seed}, round {round}: {violation}\n  the log is kept in {}",
                kept.display()
            );
        }
    }
    let totals = &history.totals;
    println!(
        "kill9: {} rounds ({} killed before ready) in {:.1} s; {} `synced` lines; {} entries \
         verified ({} reported synced, {} unsynced that survived); {} segments rotated, {} \
         deleted by children, {} at open; {} torn tails cut",
        totals.rounds,
        totals.early_kills,
        started.elapsed().as_secs_f64(),
        totals.syncs_reported,
        totals.entries_verified,
        totals.synced_entries_verified,
        totals.unsynced_entries_survived,
        totals.rotations,
        totals.segments_deleted_by_children,
        totals.segments_deleted_at_open,
        totals.torn_tails,
    );
    // The test claims to cover these paths; fail if a run stops reaching them.
    assert!(
        totals.syncs_reported > 0,
        "seed {seed}: no child ever synced"
    );
    assert!(totals.rotations > 0, "seed {seed}: no segment was rotated");
    assert!(
        totals.segments_deleted_by_children + totals.segments_deleted_at_open > 0,
        "seed {seed}: no segment was deleted"
    );
}

/// One round: run a child until the kill, take in its reports, reopen and check the log.
fn run_round(
    dir: &Path,
    round: u64,
    rng: &mut SplitMix64,
    history: &mut History,
) -> Result<(), String> {
    let child_seed = rng.next_u64();
    let kill_at = if rng.one_in(EARLY_KILL_ONE_IN) {
        KillAt::AfterSpawn(Duration::from_micros(rng.between(0, EARLY_KILL_US_MAX)))
    } else {
        let delay_ms = rng.between(KILL_DELAY_MS_MIN, KILL_DELAY_MS_MAX);
        KillAt::AfterReady(Duration::from_millis(delay_ms))
    };
    let lines = run_child(dir, child_seed, kill_at)?;
    let syncs_before = history.totals.syncs_reported;
    history.absorb(&lines)?;

    let (wal, report) =
        Wal::open(dir, wal_options()).map_err(|e| format!("reopen after the kill: {e}"))?;
    let (entries, synced_entries) = history.check_recovered(&wal)?;
    drop(wal); // Releases the lock for the next child.

    let totals = &mut history.totals;
    totals.rounds += 1;
    totals.entries_verified += entries;
    totals.synced_entries_verified += synced_entries;
    totals.unsynced_entries_survived += entries - synced_entries;
    totals.segments_deleted_at_open += report.segments_deleted as u64;
    totals.torn_tails += u64::from(report.torn_tail.is_some());
    let was_ready = lines.iter().any(|line| line == "ready");
    totals.early_kills += u64::from(!was_ready);
    println!(
        "round {round}: {kill_at:?} (ready: {was_ready}), {} `synced` lines; reopened {} \
         segments, {} entries verified ({synced_entries} reported synced); torn tail: {:?}",
        totals.syncs_reported - syncs_before,
        report.segments,
        entries,
        report
            .torn_tail
            .as_ref()
            .map(|(_, offset, bytes)| (offset, bytes)),
    );
    Ok(())
}

/// When the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// This long after it reports `ready`.
    AfterReady(Duration),
    /// This long after it is spawned, ready or not.
    AfterSpawn(Duration),
}

/// Runs a child on `dir`, kills it, and returns its complete lines.
fn run_child(dir: &Path, seed: u64, kill_at: KillAt) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("find this test binary: {e}"))?;
    let mut child = Command::new(exe)
        .arg("child")
        .arg(dir)
        .arg(seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the child: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || read_lines(stdout, ready_tx));

    let ready = match kill_at {
        KillAt::AfterReady(delay) => {
            let ready = ready_rx.recv_timeout(Duration::from_millis(READY_TIMEOUT_MS));
            if ready.is_ok() {
                std::thread::sleep(delay);
            }
            ready.is_ok()
        }
        KillAt::AfterSpawn(delay) => {
            std::thread::sleep(delay);
            true
        }
    };
    // SIGKILL on unix. A child that already exited is a zombie until waited for, so this
    // cannot fail for that reason; its exit code then shows below.
    child.kill().map_err(|e| format!("kill the child: {e}"))?;
    let status = child
        .wait()
        .map_err(|e| format!("wait for the child: {e}"))?;
    let lines = reader.join().expect("the reader thread does not panic");
    if !ready {
        return Err(format!("the child never got ready ({})", describe(status)));
    }
    if status.signal() != Some(9) {
        return Err(format!(
            "the child stopped by itself ({}) before the kill",
            describe(status)
        ));
    }
    Ok(lines)
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(CHILD_PANICKED_EXIT) => "it panicked; see its stderr above".to_string(),
        Some(CHILD_OVERRAN_EXIT) => "it ran out of time".to_string(),
        Some(CHILD_ORPHANED_EXIT) => "it could not write its stdout".to_string(),
        _ => status.to_string(),
    }
}

/// Reads the child's stdout to the end, signalling `ready` as soon as it comes. A last line
/// without its newline was cut by the kill: the child never finished reporting it.
fn read_lines(stdout: ChildStdout, ready: mpsc::Sender<()>) -> Vec<String> {
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some(complete) = line.strip_suffix(b"\n") else {
            break;
        };
        let text = String::from_utf8_lossy(complete).into_owned();
        if text == "ready" {
            let _ = ready.send(());
        }
        lines.push(text);
    }
    lines
}

/// One line of the child's report.
enum Line {
    Open(u64, GroupState),
    Ready,
    Wrote(u64, GroupState),
    Synced(u64, GroupState),
    Stats {
        rotations: u64,
        segments_deleted: u64,
    },
}

impl Line {
    fn parse(line: &str) -> Result<Line, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let number = |i: usize| -> Result<u64, String> {
            let word = words.get(i).ok_or(format!("short line {line:?}"))?;
            word.parse().map_err(|_| format!("bad number in {line:?}"))
        };
        let group_state = || -> Result<GroupState, String> {
            Ok(GroupState {
                last_index: number(2)?,
                compact_index: number(3)?,
                commit: number(4)?,
            })
        };
        match words[0] {
            "open" => Ok(Line::Open(number(1)?, group_state()?)),
            "ready" => Ok(Line::Ready),
            "wrote" => Ok(Line::Wrote(number(1)?, group_state()?)),
            "synced" => Ok(Line::Synced(number(1)?, group_state()?)),
            "stats" => Ok(Line::Stats {
                rotations: number(1)?,
                segments_deleted: number(2)?,
            }),
            _ => Err(format!("unknown line {line:?}")),
        }
    }
}

impl History {
    /// Takes in a child's report: its open state must be what the last recovery found (all of
    /// it if the child got ready), and every `wrote` and `synced` line raises what recovery
    /// owes.
    fn absorb(&mut self, lines: &[String]) -> Result<(), String> {
        let mut opened: BTreeMap<u64, GroupState> = BTreeMap::new();
        let mut ready = false;
        let (mut rotations, mut segments_deleted) = (0, 0);
        for line in lines {
            match Line::parse(line).map_err(|e| format!("from the child: {e}"))? {
                Line::Open(group, state) => {
                    opened.insert(group, state);
                }
                Line::Ready => ready = true,
                Line::Wrote(group, state) => raise(&mut self.written, group, state),
                Line::Synced(group, state) => {
                    raise(&mut self.synced, group, state);
                    self.totals.syncs_reported += 1;
                }
                // Counters since the child's open (threads report in any order).
                Line::Stats {
                    rotations: r,
                    segments_deleted: d,
                } => (rotations, segments_deleted) = (rotations.max(r), segments_deleted.max(d)),
            }
        }
        // A child killed before `ready` may have printed some of its `open` lines, or none.
        for group in 0..GROUPS {
            let expected = self.recovered.get(&group).copied().unwrap_or_default();
            let found = opened.get(&group).copied();
            if found != Some(expected) && (ready || found.is_some()) {
                return Err(format!(
                    "g{group}: the child opened {found:?}, the previous recovery found {expected:?}"
                ));
            }
        }
        self.totals.rotations += rotations;
        self.totals.segments_deleted_by_children += segments_deleted;
        Ok(())
    }

    /// Checks every group of the reopened log against what was reported synced and written
    /// and what the previous recovery found, and reads back every live entry. Returns the
    /// entries verified, and how many of them were reported synced.
    fn check_recovered(&mut self, wal: &Wal) -> Result<(u64, u64), String> {
        let groups = wal.groups().map_err(|e| e.to_string())?;
        if let Some(stranger) = groups.iter().find(|g| g.0 >= GROUPS) {
            return Err(format!("recovered {stranger}, which no child wrote"));
        }
        let (mut entries, mut synced_entries) = (0, 0);
        for group in 0..GROUPS {
            let info = wal.group(GroupId(group)).map_err(|e| e.to_string())?;
            let found = GroupState::of(&info);
            let synced = self.synced.get(&group).copied().unwrap_or_default();
            let written = self.written.get(&group).copied().unwrap_or_default();
            let previous = self.recovered.get(&group).copied().unwrap_or_default();
            if !found.covers(&synced) {
                return Err(format!(
                    "g{group}: synced state lost: recovered {found:?}, reported synced {synced:?}"
                ));
            }
            if !found.covers(&written) {
                return Err(format!(
                    "g{group}: a completed write was lost in a process crash (the page cache \
                     keeps it): recovered {found:?}, reported written {written:?}"
                ));
            }
            if !found.covers(&previous) {
                return Err(format!(
                    "g{group}: went backwards: recovered {found:?}, previously {previous:?}"
                ));
            }
            check_metadata(group, &info)?;
            check_entries(wal, group, &info)?;
            entries += info.last_index + 1 - info.first_index;
            synced_entries += synced.last_index.saturating_sub(found.compact_index);
            self.recovered.insert(group, found);
        }
        Ok((entries, synced_entries))
    }
}

/// Raises what recovery owes a group to at least `state`.
fn raise(owed: &mut BTreeMap<u64, GroupState>, group: u64, state: GroupState) {
    let entry = owed.entry(group).or_default();
    *entry = entry.max(&state);
}

/// The hard state, membership, compaction term and snapshot are what the child wrote.
fn check_metadata(group: u64, info: &GroupInfo) -> Result<(), String> {
    let state = GroupState::of(info);
    if state.commit > state.last_index {
        return Err(format!(
            "g{group}: commit {} past the last index",
            state.commit
        ));
    }
    let hard_state_ok = info.hard_state == HardState::default()
        || (info.hard_state.term == TERM && info.hard_state.vote == VOTE);
    if !hard_state_ok {
        return Err(format!("g{group}: hard state {:?}", info.hard_state));
    }
    let compact_term = if state.compact_index > 0 { TERM } else { 0 };
    if info.compact_term != compact_term {
        return Err(format!("g{group}: compaction term {}", info.compact_term));
    }
    if info.snapshot != expected_snapshot(group, state.compact_index) {
        return Err(format!(
            "g{group}: the snapshot at compaction point {} is not the one written with it: {:?}",
            state.compact_index,
            String::from_utf8_lossy(&info.snapshot[..info.snapshot.len().min(60)])
        ));
    }
    if state.last_index > 0 && info.conf_state != membership() {
        return Err(format!(
            "g{group}: holds entries but its membership is {:?}",
            info.conf_state
        ));
    }
    Ok(())
}

/// Reads back every live entry of a group and compares it with what the child wrote.
fn check_entries(wal: &Wal, group: u64, info: &GroupInfo) -> Result<(), String> {
    let (low, high) = (info.first_index, info.last_index + 1);
    let entries = wal
        .entries(GroupId(group), low, high, None)
        .map_err(|e| format!("g{group}: read entries {low}..{high}: {e}"))?;
    if entries.len() as u64 != high - low {
        return Err(format!(
            "g{group}: read {} entries for {low}..{high}",
            entries.len()
        ));
    }
    for (entry, index) in entries.iter().zip(low..) {
        let expected = expected_entry(group, index);
        if *entry != expected {
            let owner = entry.data.get(..16).map(|head| {
                let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8"));
                (word(0), word(8))
            });
            return Err(format!(
                "g{group} entry {index} differs from what was written: read back index {}, term \
                 {}, {} bytes of data naming (group, index) {owner:?}; wrote term {}, {} bytes",
                entry.index,
                entry.term,
                entry.data.len(),
                expected.term,
                expected.data.len(),
            ));
        }
    }
    Ok(())
}
