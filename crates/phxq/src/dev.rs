//! `phxq dev`: what can honestly run locally today.
//!
//! The replicated 3-node store arrives with issue #3. Until then this command opens the node
//! write-ahead log the store will use, says what recovery found, proves a round trip (write,
//! fsync, read back with checksums verified) and shows the log as `phxq wal inspect` sees it.
//! It says plainly that nothing more runs.

use std::path::PathBuf;
use std::process::ExitCode;

use phxq_storage::{EntryKind, GroupId, HardState, LogEntry, RecoveryReport, Wal, WalOptions};
use phxq_storage::{Result as StorageResult, WriteBatch};

use crate::{CommandResult, print_line};

/// The group the self-check writes to. No replication group will have this id: groups are
/// numbered from 0 by queue (`queue mod groups`). (`u64::MAX` itself is reserved by the log's
/// record framing.)
const SELF_CHECK_GROUP: GroupId = GroupId(u64::MAX - 1);
/// Entries written per self-check.
const SELF_CHECK_ENTRIES: u64 = 3;

/// Arguments of `phxq dev`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Data directory; node 1's write-ahead log lives in DATA_DIR/node-1.
    #[arg(long, default_value = "./phxq-data")]
    data_dir: PathBuf,
}

pub fn run(args: &Args) -> CommandResult {
    let dir = args.data_dir.join("node-1");
    let (wal, recovery) = Wal::open(&dir, WalOptions::default()).map_err(|error| {
        format!(
            "cannot open the write-ahead log in {}: {error}\n(`phxq wal inspect {}` shows what \
             is wrong)",
            dir.display(),
            dir.display()
        )
    })?;
    print_line(format_args!(
        "phxq dev: opened the node write-ahead log in {}",
        dir.display()
    ))?;
    print_line(format_args!("  recovery: {}", describe_recovery(&recovery)))?;
    let (first, last) = self_check(&wal)?;
    print_line(format_args!(
        "  self-check: wrote entries {first}..={last} of the self-check group \
         {SELF_CHECK_GROUP} and a hard state, synced them, read them back with checksums \
         verified, compacted them"
    ))?;
    drop(wal);
    let report = phxq_storage::inspect::inspect(&dir)?;
    print_line(format_args!(
        "  inspect: {}",
        crate::inspect::summary_line(&dir, &report)
    ))?;
    if report.damaged() {
        return Err(format!(
            "the log reads as damaged right after the self-check; see `phxq wal inspect {}`",
            dir.display()
        )
        .into());
    }
    print_line(
        "phxq dev: the replicated 3-node store arrives with issue #3; today this opens and \
         checks the node write-ahead log only.",
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Every field of the recovery report, in a line.
fn describe_recovery(report: &RecoveryReport) -> String {
    let torn = match &report.torn_tail {
        Some((path, offset, bytes)) => format!(
            "cut a torn tail of {bytes} bytes at byte {offset} of {}",
            path.display()
        ),
        None => "no torn tail".to_string(),
    };
    let repaired: usize = report.repaired.iter().map(|(_, damage)| damage.len()).sum();
    let cut: Vec<String> = report
        .cut_groups
        .iter()
        .map(|(group, index)| format!("{group} from {index}"))
        .collect();
    format!(
        "replayed {} segment(s), {} record(s); {torn}; {repaired} damaged range(s) repaired; \
         groups cut: {}; {} dead segment(s) deleted",
        report.segments,
        report.records,
        if cut.is_empty() {
            "none".to_string()
        } else {
            cut.join(", ")
        },
        report.segments_deleted
    )
}

/// Appends a few entries and a hard state to the self-check group, syncs, reads the entries
/// back and compares, then compacts them so they hold no segment. Returns the index range.
fn self_check(wal: &Wal) -> CommandResult<(u64, u64)> {
    let first = wal.group(SELF_CHECK_GROUP)?.last_index + 1;
    let last = first + SELF_CHECK_ENTRIES - 1;
    let entries: Vec<LogEntry> = (first..=last)
        .map(|index| LogEntry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: format!("phxq dev self-check, entry {index}").into_bytes(),
            context: Vec::new(),
        })
        .collect();
    let mut batch = WriteBatch::new();
    batch.append(SELF_CHECK_GROUP, entries.clone());
    batch.hard_state(
        SELF_CHECK_GROUP,
        HardState {
            term: 1,
            vote: 0,
            commit: last,
        },
    );
    write_and_sync(wal, &batch)?;
    let read_back = wal.entries(SELF_CHECK_GROUP, first, last + 1, None)?;
    if read_back != entries {
        return Err(format!(
            "self-check failed: entries {first}..={last} of {SELF_CHECK_GROUP} read back \
             differently from how they were written"
        )
        .into());
    }
    let mut compact = WriteBatch::new();
    compact.compact(SELF_CHECK_GROUP, last);
    write_and_sync(wal, &compact)?;
    Ok((first, last))
}

fn write_and_sync(wal: &Wal, batch: &WriteBatch) -> StorageResult<()> {
    let lsn = wal.write(batch)?;
    wal.sync_to(lsn)?;
    Ok(())
}
