//! `phxq bench wal`: the command line of [`phxq_bench::wal`], and its printing.
//!
//! The table is printed case by case as the run goes (a default run takes about a minute); the
//! last line of output is always the whole report as one JSON object, so scripts can take
//! `tail -n 1`. With `--json` that line is all that is printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use phxq_bench::wal::{self, Options};

use crate::{CommandResult, print_line};

/// Arguments of `phxq bench wal`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory on the disk to measure; a fresh subdirectory is made in it for the run and
    /// removed at the end [default: the current directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Writer counts, one case each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    writers: Vec<usize>,
    /// Seconds each write-ahead log case runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Seconds of the raw disk loop (write + fdatasync, one thread) run before each case.
    #[arg(long, default_value_t = 3.0)]
    raw_seconds: f64,
    /// A phase also stops after this many records.
    #[arg(long, default_value_t = 5_000_000)]
    records_max: u64,
    /// What a writer is: a task awaiting durability (as a server's handlers would), or an OS
    /// thread parked until its record is durable.
    #[arg(long, value_enum, default_value = "tasks")]
    writers_as: WritersAs,
    /// Zeros the log writes ahead of its data (its `preallocate_bytes`).
    #[arg(long, default_value_t = phxq_storage::WalOptions::default().preallocate_bytes)]
    preallocate_bytes: u64,
    /// Print only the JSON report.
    #[arg(long)]
    json: bool,
}

/// `--writers-as`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum WritersAs {
    Tasks,
    Threads,
}

pub fn run(args: &Args) -> CommandResult {
    let options = Options {
        parent_dir: args.dir.clone().unwrap_or_else(|| PathBuf::from(".")),
        writers: args.writers.clone(),
        duration: seconds("--seconds", args.seconds)?,
        raw_duration: seconds("--raw-seconds", args.raw_seconds)?,
        record_bytes: args.record_bytes,
        records_max: args.records_max,
        writers_as: match args.writers_as {
            WritersAs::Tasks => wal::WriterKind::Tasks,
            WritersAs::Threads => wal::WriterKind::Threads,
        },
        preallocate_bytes: args.preallocate_bytes,
        ..Options::default()
    };
    options.validate()?;
    if !args.json {
        print_line(format_args!(
            "phxq bench wal: {}-byte records over {} groups, writers as {:?}, {} bytes of \
             zeros written ahead, {:?} per case, \
             each between two {:?} runs of raw write + fdatasync on the same disk; scratch \
             directory in {} (removed at the end)",
            options.record_bytes,
            options.groups,
            options.writers_as,
            options.preallocate_bytes,
            options.duration,
            options.raw_duration,
            options.parent_dir.display()
        ))?;
        print_line(wal::table_header())?;
    }
    let mut printed = Ok(());
    let report = wal::run(&options, |case| {
        if !args.json && printed.is_ok() {
            printed = print_line(case.table_row());
        }
    })?;
    printed?;
    if !args.json {
        print_line("ratio = WAL records/s / raw fsyncs/s measured just before the case")?;
        for verdict in report.verdicts() {
            print_line(format_args!("target: {verdict}"))?;
        }
    }
    print_line(report.to_json())?;
    Ok(ExitCode::SUCCESS)
}

fn seconds(flag: &str, value: f64) -> CommandResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|error| format!("{flag} {value}: {error}").into())
}
