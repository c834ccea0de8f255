//! `phxq bench wal`: how close the write-ahead log comes to the raw disk with one writer, and
//! how far group commit takes it past the disk with many.
//!
//! Every case is compared with the raw disk measured in the same run, just before it: one
//! thread looping `pwrite` of one record at the end of a new file + `fdatasync`, which is what
//! a log without group commit and without overhead would do. Absolute rates mean little on a
//! machine whose fsync rate swings fifty-fold from one minute to the next; the ratio of the
//! log's records/s to the raw fsyncs/s is the figure to compare. The raw loop runs again just
//! after the case: when the two raw figures disagree, the disk changed pace during the case
//! and its ratio says more about the disk than about the log.
//!
//! A case opens a fresh log and runs W writers, each looping: append one entry to its group
//! (`writer % groups`), wait until it is durable, record the latency. That is a producer's
//! synchronous enqueue, minus replication. Writers sharing a group take turns at the group's
//! next index, as the group's master would. Writers are tasks on a tokio runtime with one
//! worker per CPU by default, waiting with [`Wal::durable`] as a server's connection handlers
//! would; `--writers-as threads` runs them as OS threads parked in [`Wal::sync_to`] instead.
//!
//! Targets, printed and never asserted (see [`target_ratio_min`]):
//!
//! * 1 writer: records/s ≥ 0.9 × raw fsyncs/s: the log adds little to the fsync it must do;
//! * 64 writers: records/s ≥ 20 × raw fsyncs/s: group commit shares each fsync among writers.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use phxq_storage::{EntryKind, LogEntry, Lsn, Wal, WalOptions, WriteBatch};
use phxq_types::GroupId;
use serde::Serialize;

use crate::{Error, Result, io_error};

/// Most writers one case may run.
pub const WRITERS_MAX: usize = 4096;
/// Largest record the benchmark writes (the log itself takes more; this bounds our memory).
pub const RECORD_BYTES_MAX: usize = 16 << 20;
/// Most replication groups the writers spread over.
pub const GROUPS_MAX: u64 = 4096;
/// Most zeros the log may be asked to write ahead of its data.
pub const PREALLOCATE_BYTES_MAX: u64 = 1 << 30;
/// Longest a single timed phase may run.
pub const PHASE_SECONDS_MAX: u64 = 3600;
/// Latencies above this are recorded as this (the histogram's upper bound).
const LATENCY_US_MAX: u64 = 60_000_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the run's scratch directory is created; it is removed at the end. Put it on the
    /// filesystem you want measured.
    pub parent_dir: PathBuf,
    /// Writer counts, one case each, in order.
    pub writers: Vec<usize>,
    /// How long each log case writes.
    pub duration: Duration,
    /// How long each raw disk loop (one before and one after each case) runs.
    pub raw_duration: Duration,
    /// Entry payload bytes (the raw loop writes blocks of this size).
    pub record_bytes: usize,
    /// A phase also stops after this many records, so a fast disk cannot fill a small one.
    pub records_max: u64,
    /// Replication groups the writers spread over.
    pub groups: u64,
    /// What a writer is.
    pub writers_as: WriterKind,
    /// The log's [`WalOptions::preallocate_bytes`]: zeros written ahead of the data.
    pub preallocate_bytes: u64,
}

/// What runs each writer of a case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterKind {
    /// A task on a multi-threaded tokio runtime (one worker per CPU), awaiting
    /// [`Wal::durable`].
    #[default]
    Tasks,
    /// An OS thread parked in [`Wal::sync_to`].
    Threads,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            parent_dir: PathBuf::from("."),
            writers: vec![1, 16, 64, 256],
            duration: Duration::from_secs(5),
            raw_duration: Duration::from_secs(3),
            record_bytes: 1024,
            records_max: 5_000_000,
            groups: 24,
            writers_as: WriterKind::default(),
            preallocate_bytes: WalOptions::default().preallocate_bytes,
        }
    }
}

impl Options {
    /// Checks every limit; a benchmark that would run forever or not at all is refused.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidOptions(reason));
        if self.writers.is_empty() {
            return invalid("no writer counts given".into());
        }
        if let Some(&bad) = self.writers.iter().find(|&&w| w == 0 || w > WRITERS_MAX) {
            return invalid(format!("{bad} writers: must be 1..={WRITERS_MAX}"));
        }
        for (name, duration) in [
            ("duration", self.duration),
            ("raw duration", self.raw_duration),
        ] {
            if duration.is_zero() || duration.as_secs() >= PHASE_SECONDS_MAX {
                return invalid(format!(
                    "{name} {duration:?}: must be above 0 and below {PHASE_SECONDS_MAX} s"
                ));
            }
        }
        if self.record_bytes == 0 || self.record_bytes > RECORD_BYTES_MAX {
            return invalid(format!(
                "record of {} bytes: must be 1..={RECORD_BYTES_MAX}",
                self.record_bytes
            ));
        }
        if self.records_max == 0 {
            return invalid("records_max must be above 0".into());
        }
        if self.groups == 0 || self.groups > GROUPS_MAX {
            return invalid(format!("{} groups: must be 1..={GROUPS_MAX}", self.groups));
        }
        if self.preallocate_bytes > PREALLOCATE_BYTES_MAX {
            return invalid(format!(
                "{} bytes of zeros ahead: must be at most {PREALLOCATE_BYTES_MAX}",
                self.preallocate_bytes
            ));
        }
        Ok(())
    }
}

/// The whole run: the options and one [`Case`] per writer count.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Always `"wal"`.
    pub bench: &'static str,
    /// Entry payload bytes.
    pub record_bytes: usize,
    /// Seconds each log case was to run.
    pub seconds: f64,
    /// Seconds each raw disk loop was to run.
    pub raw_seconds: f64,
    /// Replication groups the writers spread over.
    pub groups: u64,
    /// Record bound per phase.
    pub records_max: u64,
    /// What a writer was.
    pub writers_as: WriterKind,
    /// Zeros the log wrote ahead of its data.
    pub preallocate_bytes: u64,
    /// One per writer count, in the order run.
    pub cases: Vec<Case>,
}

/// One writer count: the raw disk just before and just after, the log, and how they compare.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// Writers (tasks or threads, see `Report::writers_as`).
    pub writers: usize,
    /// The raw disk loop run just before the log case: the ratio's yardstick.
    pub raw: RawFigures,
    /// The same loop run just after: how much the disk drifted during the case.
    pub raw_after: RawFigures,
    /// The log case.
    pub wal: WalFigures,
    /// Log records/s divided by raw fsyncs/s.
    pub ratio: f64,
    /// The target for this writer count, if it has one.
    pub target: Option<Target>,
}

/// A target ratio and whether this run met it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Target {
    /// The lowest acceptable [`Case::ratio`].
    pub ratio_min: f64,
    /// Whether the ratio reached it.
    pub met: bool,
}

/// The raw disk loop: one thread, write + `fdatasync`.
#[derive(Clone, Debug, Serialize)]
pub struct RawFigures {
    /// Write + fdatasync rounds completed.
    pub syncs: u64,
    /// Wall time of the loop.
    pub seconds: f64,
    /// `syncs / seconds`.
    pub syncs_per_sec: f64,
    /// Time of one round.
    pub latency: Latency,
}

/// The log case.
#[derive(Clone, Debug, Serialize)]
pub struct WalFigures {
    /// Records written and made durable.
    pub records: u64,
    /// Wall time from the start signal until every writer stopped.
    pub seconds: f64,
    /// `records / seconds`.
    pub records_per_sec: f64,
    /// Bytes written to the log, framing included.
    pub bytes: u64,
    /// `bytes / seconds`, in 10^6 bytes.
    pub mb_per_sec: f64,
    /// `fdatasync` calls made by `sync_to` (segment rotations sync too; not counted).
    pub syncs: u64,
    /// `syncs / seconds`.
    pub syncs_per_sec: f64,
    /// `records / syncs`: how many writers one fsync served on average.
    pub records_per_sync: f64,
    /// Segments started after the first.
    pub rotations: u64,
    /// Time from the start of a write until `sync_to` returned.
    pub latency: Latency,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// The lowest acceptable ratio of log records/s to raw fsyncs/s for a writer count, if the
/// count has a target: one writer must come within 10% of the disk, and 64 writers must get
/// at least 20 records out of each fsync's worth of time.
pub fn target_ratio_min(writers: usize) -> Option<f64> {
    match writers {
        1 => Some(0.9),
        64 => Some(20.0),
        _ => None,
    }
}

/// Runs every case in order, calling `on_case` as each finishes (a full run takes a while),
/// and removes everything it wrote.
pub fn run(options: &Options, mut on_case: impl FnMut(&Case)) -> Result<Report> {
    options.validate()?;
    let parent = &options.parent_dir;
    std::fs::create_dir_all(parent).map_err(|e| io_error("create directory", parent, e))?;
    let scratch = tempfile::Builder::new()
        .prefix("phxq-bench-wal-")
        .tempdir_in(parent)
        .map_err(|e| io_error("create scratch directory in", parent, e))?;
    let mut cases = Vec::with_capacity(options.writers.len());
    for &writers in &options.writers {
        let raw_path = scratch.path().join(format!("raw-{writers}.dat"));
        let raw = raw_disk(&raw_path, options)?;
        let wal = wal_case(
            &scratch.path().join(format!("wal-{writers}")),
            writers,
            options,
        )?;
        let raw_after = raw_disk(&raw_path, options)?;
        let case = Case::new(writers, raw, wal, raw_after);
        on_case(&case);
        cases.push(case);
    }
    let scratch_path = scratch.path().to_path_buf();
    scratch
        .close()
        .map_err(|e| io_error("remove scratch directory", &scratch_path, e))?;
    Ok(Report {
        bench: "wal",
        record_bytes: options.record_bytes,
        seconds: options.duration.as_secs_f64(),
        raw_seconds: options.raw_duration.as_secs_f64(),
        groups: options.groups,
        records_max: options.records_max,
        writers_as: options.writers_as,
        preallocate_bytes: options.preallocate_bytes,
        cases,
    })
}

impl Case {
    fn new(writers: usize, raw: RawFigures, wal: WalFigures, raw_after: RawFigures) -> Case {
        let ratio = ratio(wal.records_per_sec, raw.syncs_per_sec);
        let target = target_ratio_min(writers).map(|ratio_min| Target {
            ratio_min,
            met: ratio >= ratio_min,
        });
        Case {
            writers,
            raw,
            raw_after,
            wal,
            ratio,
            target,
        }
    }

    /// Raw fsyncs/s after the case relative to before, as a signed fraction (-0.3: 30% slower).
    pub fn drift(&self) -> f64 {
        ratio(self.raw_after.syncs_per_sec, self.raw.syncs_per_sec) - 1.0
    }
}

/// One thread writing a record at the end of a new file and `fdatasync`ing it: the fastest a
/// log that syncs every record could go on this disk, and the yardstick for the case after it.
fn raw_disk(path: &Path, options: &Options) -> Result<RawFigures> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    let block = payload(options.record_bytes);
    let mut latency = new_histogram();
    let start = Instant::now();
    let deadline = start + options.raw_duration;
    let mut offset = 0u64;
    while latency.len() < options.records_max && Instant::now() < deadline {
        let began = Instant::now();
        file.write_all_at(&block, offset)
            .map_err(|e| io_error("write", path, e))?;
        file.sync_data()
            .map_err(|e| io_error("fdatasync", path, e))?;
        record(&mut latency, began.elapsed());
        offset += block.len() as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(path).map_err(|e| io_error("remove", path, e))?;
    Ok(RawFigures {
        syncs: latency.len(),
        seconds,
        syncs_per_sec: ratio(latency.len() as f64, seconds),
        latency: Latency::of(&latency),
    })
}

/// What the writers of one case share.
struct Shared {
    wal: Arc<Wal>,
    /// Last index written, per group; held across the write so indexes stay consecutive.
    last_index: Vec<Mutex<u64>>,
    /// Records claimed by writers so far, against `options.records_max`.
    claimed: AtomicU64,
    payload: Vec<u8>,
    /// When writers stop; setting it is the start signal (writers wait for it).
    deadline: OnceLock<Instant>,
    options: Options,
}

/// Opens a fresh log in `dir`, runs `writers` writers against it until the time or the
/// record bound is up, and removes the log.
fn wal_case(dir: &Path, writers: usize, options: &Options) -> Result<WalFigures> {
    let wal_options = WalOptions {
        preallocate_bytes: options.preallocate_bytes,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir, wal_options)?;
    let shared = Arc::new(Shared {
        wal: Arc::new(wal),
        last_index: (0..options.groups).map(|_| Mutex::new(0)).collect(),
        claimed: AtomicU64::new(0),
        payload: payload(options.record_bytes),
        deadline: OnceLock::new(),
        options: options.clone(),
    });
    let (latency, seconds) = match options.writers_as {
        WriterKind::Tasks => run_tasks(&shared, writers)?,
        WriterKind::Threads => run_threads(&shared, writers)?,
    };
    let stats = shared.wal.stats();
    assert_eq!(
        stats.records,
        latency.len(),
        "every record written was made durable and timed, and nothing else was written"
    );
    drop(shared);
    // The syncer thread may still hold the log for a moment; the files can go regardless.
    std::fs::remove_dir_all(dir).map_err(|e| io_error("remove", dir, e))?;
    Ok(WalFigures {
        records: stats.records,
        seconds,
        records_per_sec: ratio(stats.records as f64, seconds),
        bytes: stats.bytes,
        mb_per_sec: ratio(stats.bytes as f64 / 1e6, seconds),
        syncs: stats.syncs,
        syncs_per_sec: ratio(stats.syncs as f64, seconds),
        records_per_sync: ratio(stats.records as f64, stats.syncs as f64),
        rotations: stats.rotations,
        latency: Latency::of(&latency),
    })
}

/// Starts `writers` tasks together on a runtime with one worker per CPU, waits for all of them,
/// and returns their merged latencies and the wall time. The first writer error, if any, is
/// the case's error.
fn run_tasks(shared: &Arc<Shared>, writers: usize) -> Result<(Histogram<u64>, f64)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("wal-writer")
        .build()
        .map_err(Error::Thread)?;
    runtime.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|writer| tokio::spawn(writer_task(Arc::clone(shared), writer)))
            .collect();
        let start = Instant::now();
        shared
            .deadline
            .set(start + shared.options.duration)
            .expect("set once per case");
        let mut results = Vec::with_capacity(writers);
        for task in tasks {
            results.push(task.await.expect("a writer task panicked"));
        }
        merge(results, start)
    })
}

/// One writer task: append, await durability, time it; until the deadline or the record
/// bound. Appending blocks its worker for the length of a `pwrite` to the page cache.
async fn writer_task(shared: Arc<Shared>, writer: usize) -> Result<Histogram<u64>> {
    let group = writer as u64 % shared.options.groups;
    let mut latency = new_histogram();
    let deadline = *shared.deadline.wait();
    while Instant::now() < deadline
        && shared.claimed.fetch_add(1, Ordering::Relaxed) < shared.options.records_max
    {
        let began = Instant::now();
        let lsn = append(&shared, group)?;
        shared.wal.durable(lsn)?.await?;
        record(&mut latency, began.elapsed());
    }
    Ok(latency)
}

/// The merged latencies of every writer and the wall time since `start`, or the first
/// writer's error.
fn merge(
    results: impl IntoIterator<Item = Result<Histogram<u64>>>,
    start: Instant,
) -> Result<(Histogram<u64>, f64)> {
    let mut merged = new_histogram();
    let mut first_error = None;
    for result in results {
        match result {
            Ok(latency) => merged.add(latency).expect("histograms share bounds"),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    match first_error {
        Some(error) => Err(error),
        None => Ok((merged, seconds)),
    }
}

/// Starts the writer threads together, waits for all of them, and returns their merged
/// latencies and the wall time. The first writer error, if any, is the case's error.
fn run_threads(shared: &Shared, writers: usize) -> Result<(Histogram<u64>, f64)> {
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(writers);
        for thread in 0..writers {
            let spawned = std::thread::Builder::new()
                .name(format!("wal-writer-{thread}"))
                .spawn_scoped(scope, move || writer_loop(shared, thread));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    // A deadline in the past releases the writers already started at once.
                    shared
                        .deadline
                        .set(Instant::now())
                        .expect("set once per case");
                    return Err(Error::Thread(error));
                }
            }
        }
        let start = Instant::now();
        shared
            .deadline
            .set(start + shared.options.duration)
            .expect("set once per case");
        let results: Vec<_> = handles
            .into_iter()
            .map(|handle| handle.join().expect("a writer thread panicked"))
            .collect();
        merge(results, start)
    })
}

/// One writer: append, wait until durable, time it; until the deadline or the record bound.
fn writer_loop(shared: &Shared, thread: usize) -> Result<Histogram<u64>> {
    let group = thread as u64 % shared.options.groups;
    let mut latency = new_histogram();
    let deadline = *shared.deadline.wait();
    while Instant::now() < deadline
        && shared.claimed.fetch_add(1, Ordering::Relaxed) < shared.options.records_max
    {
        let began = Instant::now();
        let lsn = append(shared, group)?;
        shared.wal.sync_to(lsn)?;
        record(&mut latency, began.elapsed());
    }
    Ok(latency)
}

/// Appends the group's next entry. The group's lock is held across the write so that writers
/// sharing a group append consecutive indexes, as the group's master does.
fn append(shared: &Shared, group: u64) -> Result<Lsn> {
    let mut last_index = shared.last_index[group as usize]
        .lock()
        .expect("a writer panicked holding a group");
    let entry = LogEntry {
        index: *last_index + 1,
        term: 1,
        kind: EntryKind::Normal,
        data: shared.payload.clone(),
        context: Vec::new(),
    };
    let mut batch = WriteBatch::new();
    batch.append(GroupId(group), [entry]);
    let lsn = shared.wal.write(&batch)?;
    *last_index += 1;
    Ok(lsn)
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// Record contents: a fixed, non-zero pattern (all-zero data would look like unwritten
/// sectors to anyone reading the files afterwards).
fn payload(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i % 251) as u8 + 1).collect()
}

/// `numerator / denominator`, and 0 when there is nothing to divide by.
fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// The column names of [`Case::table_row`].
pub fn table_header() -> String {
    format!(
        "{:>7} {:>12} {:>11} {:>7} {:>9} {:>9} {:>8} {:>8} {:>7} {:>10}  {}",
        "writers",
        "raw fsync/s",
        "records/s",
        "MB/s",
        "syncs/s",
        "rec/sync",
        "p50 us",
        "p99 us",
        "ratio",
        "raw after",
        "target"
    )
}

impl Case {
    /// One line of the human table.
    pub fn table_row(&self) -> String {
        let target = match self.target {
            Some(t) => format!(">= {} {}", t.ratio_min, if t.met { "pass" } else { "MISS" }),
            None => "-".to_string(),
        };
        format!(
            "{:>7} {:>12.0} {:>11.0} {:>7.2} {:>9.0} {:>9.1} {:>8} {:>8} {:>7.2} {:>10.0}  {}",
            self.writers,
            self.raw.syncs_per_sec,
            self.wal.records_per_sec,
            self.wal.mb_per_sec,
            self.wal.syncs_per_sec,
            self.wal.records_per_sync,
            self.wal.latency.p50_us,
            self.wal.latency.p99_us,
            self.ratio,
            self.raw_after.syncs_per_sec,
            target
        )
    }
}

impl Report {
    /// One line per target: what was asked, what was measured.
    pub fn verdicts(&self) -> Vec<String> {
        self.cases
            .iter()
            .filter_map(|case| {
                let target = case.target?;
                Some(format!(
                    "{} writer(s): {:.0} records/s against {:.0} raw fsyncs/s, ratio {:.2}, \
                     target >= {}: {} (raw disk {:+.0}% across the case)",
                    case.writers,
                    case.wal.records_per_sec,
                    case.raw.syncs_per_sec,
                    case.ratio,
                    target.ratio_min,
                    if target.met { "pass" } else { "MISS" },
                    case.drift() * 100.0
                ))
            })
            .collect()
    }

    /// The whole report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_exist_for_one_and_sixty_four_writers_only() {
        assert_eq!(target_ratio_min(1), Some(0.9));
        assert_eq!(target_ratio_min(64), Some(20.0));
        assert_eq!(target_ratio_min(16), None);
        assert_eq!(target_ratio_min(256), None);
    }

    #[test]
    fn options_outside_the_limits_are_refused() {
        assert!(Options::default().validate().is_ok());
        let refused = [
            Options {
                writers: vec![],
                ..Options::default()
            },
            Options {
                writers: vec![1, 0],
                ..Options::default()
            },
            Options {
                writers: vec![WRITERS_MAX + 1],
                ..Options::default()
            },
            Options {
                duration: Duration::ZERO,
                ..Options::default()
            },
            Options {
                record_bytes: 0,
                ..Options::default()
            },
            Options {
                groups: 0,
                ..Options::default()
            },
        ];
        for options in refused {
            assert!(
                matches!(options.validate(), Err(Error::InvalidOptions(_))),
                "{options:?}"
            );
        }
    }

    #[test]
    fn a_tiny_run_counts_every_record_and_leaves_nothing_behind() {
        let parent = tempfile::tempdir().unwrap();
        let options = Options {
            parent_dir: parent.path().to_path_buf(),
            writers: vec![3],
            duration: Duration::from_secs(10),
            raw_duration: Duration::from_secs(10),
            records_max: 50,
            groups: 2,
            ..Options::default()
        };
        let mut seen = 0;
        let report = run(&options, |_| seen += 1).unwrap();
        assert_eq!(seen, 1);
        let case = &report.cases[0];
        assert_eq!(case.raw.syncs, 50, "the raw loop stops at the record bound");
        assert_eq!(case.raw_after.syncs, 50);
        assert_eq!(case.wal.records, 50, "the writers stop at the record bound");
        assert!(case.wal.syncs >= 1 && case.wal.syncs <= 50);
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["cases"][0]["writers"], 3);
    }
}
