//! `phxq wal inspect DIR`: what a node's write-ahead log holds, for an operator deciding
//! whether a node can restart as it is.
//!
//! The scan ([`phxq_storage::inspect`]) never writes and never takes the log's lock, so it is
//! safe beside a running node. A torn tail is normal after a crash (a write that never
//! completed, hence never acknowledged) and the log cuts it at open: that is still clean.
//! Damage inside synced data is not: the log refuses to open until it is repaired, and this
//! command exits 2 and names each damaged file, offset and reason.
//!
//! `phxq wal repair DIR` is the operator's way to ask for that repair, with the node stopped
//! (the log's lock refuses a second opener): it drops the damaged records, keeps each damaged
//! file beside as `*.corrupt`, and cuts each group that lost an entry at that entry, so the
//! group's peers send it again when the node rejoins its store.

use std::path::Path;
use std::process::ExitCode;

use phxq_storage::inspect::{InspectReport, ScannedSegment};
use phxq_storage::{GroupInfo, Wal, WalOptions};
use serde::Serialize;

use crate::table::{Align, render};
use crate::{CommandResult, EXIT_DAMAGED, print_line};

/// Arguments of `phxq wal inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A node's data directory (such as ./phxq-data/node-1) or its log directory inside it
    /// (./phxq-data/node-1/wal).
    dir: std::path::PathBuf,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq wal repair`.
#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// A node's data directory or its log directory (as for `wal inspect`). The node must be
    /// stopped.
    dir: std::path::PathBuf,
}

/// The log directory `dir` names: `dir/wal` when `dir` is a node's data directory.
fn log_dir(dir: &Path) -> std::path::PathBuf {
    let inner = dir.join("wal");
    if dir.join("IDENTITY").is_file() && inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// A cut log may have lost entries the node acknowledged: the node must not vote on it until
/// it caught up, so it starts only with `--rejoin-empty` (`REJOIN_REQUIRED` in its data
/// directory says so, and goes once every group caught up).
fn require_rejoin(
    given: &Path,
    log: &Path,
    cut: &[(phxq_types::GroupId, u64)],
) -> CommandResult<()> {
    let cuts: Vec<String> = cut
        .iter()
        .map(|(g, i)| format!("{g} at index {i}"))
        .collect();
    let why = format!("`phxq wal repair` cut this node's log: {}", cuts.join(", "));
    let data_dir = [given, log.parent().unwrap_or(log)]
        .into_iter()
        .find(|dir| dir.join("IDENTITY").is_file());
    let Some(data_dir) = data_dir else {
        print_line(format_args!(
            "{} is not inside a node's data directory: start the node that uses it with \
             `phxq node --rejoin-empty`",
            log.display()
        ))?;
        return Ok(());
    };
    phxq_node::server::require_rejoin(data_dir, &why)
        .map_err(|error| format!("cannot write {}: {error}", data_dir.display()))?;
    print_line(format_args!(
        "{}: the node now starts only with `phxq node --rejoin-empty` (it may have \
         acknowledged entries the cut removed), until every group caught up",
        data_dir.join(phxq_node::server::REJOIN_FILE).display()
    ))?;
    Ok(())
}

/// `phxq wal repair`: opens the log in repair mode and says what it dropped and cut.
pub fn repair(args: &RepairArgs) -> CommandResult {
    let dir = log_dir(&args.dir);
    if !dir.is_dir() {
        return Err(format!("{}: no such log directory", dir.display()).into());
    }
    let options = WalOptions {
        repair: true,
        ..WalOptions::default()
    };
    let (wal, report) = Wal::open(&dir, options)?;
    drop(wal);
    if report.repaired.is_empty() {
        print_line(format_args!(
            "{}: nothing to repair; the log opens as it is",
            dir.display()
        ))?;
    }
    for (path, damage) in &report.repaired {
        for d in damage {
            print_line(format_args!(
                "{}: dropped bytes {}..{} ({}); the original is kept as {}.corrupt",
                path.display(),
                d.offset,
                d.end,
                d.reason,
                path.display()
            ))?;
        }
    }
    for (group, index) in &report.cut_groups {
        print_line(format_args!(
            "cut {group} at index {index}: its peers send it from there when the node rejoins"
        ))?;
    }
    if !report.cut_groups.is_empty() {
        require_rejoin(&args.dir, &dir, &report.cut_groups)?;
    }
    if let Some((path, offset, bytes)) = &report.torn_tail {
        print_line(format_args!(
            "{}: cut a torn tail of {bytes} bytes at byte {offset}",
            path.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: &Args) -> CommandResult {
    let dir = log_dir(&args.dir);
    let report = phxq_storage::inspect::inspect(&dir)?;
    if args.json {
        let json = serde_json::to_string_pretty(&ReportJson::of(&dir, &report))?;
        print_line(json)?;
    } else {
        print_line(render_report(&dir, &report).trim_end())?;
    }
    Ok(if report.damaged() {
        ExitCode::from(EXIT_DAMAGED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The human report: a summary line, then one table per aspect, then the verdict.
pub fn render_report(dir: &Path, report: &InspectReport) -> String {
    let mut out = summary_line(dir, report);
    out.push('\n');
    if report.segments.is_empty() {
        out.push_str("\nno segment files: an empty log (opening it creates the first segment)\n");
        return out;
    }
    out.push_str("\nSegments\n");
    out.push_str(&segments_table(&report.segments));
    out.push_str("\nRecords per segment and group\n");
    out.push_str(&segment_groups_table(&report.segments));
    if report.segments.iter().any(|s| !s.damage.is_empty()) {
        out.push_str("\nDamage\n");
        out.push_str(&damage_table(&report.segments));
    }
    out.push_str("\nGroups as recovery leaves them\n");
    out.push_str(&groups_table(&report.groups));
    out.push('\n');
    out.push_str(&verdict(report));
    out
}

/// One line: where, how many segments, bytes, records and groups.
pub fn summary_line(dir: &Path, report: &InspectReport) -> String {
    let bytes: u64 = report.segments.iter().map(|s| s.file_bytes).sum();
    let records: u64 = report
        .segments
        .iter()
        .flat_map(|s| s.records_by_kind.values())
        .sum();
    format!(
        "write-ahead log {}: {} segment(s), {bytes} bytes, {records} records, {} group(s), {}",
        dir.display(),
        report.segments.len(),
        report.groups.len(),
        if report.damaged() { "DAMAGED" } else { "clean" }
    )
}

fn segments_table(segments: &[ScannedSegment]) -> String {
    let rows: Vec<Vec<String>> = segments
        .iter()
        .map(|s| {
            let kinds: Vec<String> = s
                .records_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            vec![
                s.id.to_string(),
                file_name(&s.path),
                s.file_bytes.to_string(),
                s.records_by_kind.values().sum::<u64>().to_string(),
                kinds.join(", "),
                segment_state(s),
            ]
        })
        .collect();
    render(
        &[
            ("segment", Align::Right),
            ("file", Align::Left),
            ("bytes", Align::Right),
            ("records", Align::Right),
            ("by kind", Align::Left),
            ("state", Align::Left),
        ],
        &rows,
    )
}

/// A segment's condition in a few words.
fn segment_state(segment: &ScannedSegment) -> String {
    if let Some(reason) = &segment.unreadable {
        return format!("UNREADABLE: {reason}");
    }
    if segment.header_torn {
        return "header never written: removed at open".to_string();
    }
    if !segment.damage.is_empty() {
        return format!("DAMAGED: {} range(s)", segment.damage.len());
    }
    match segment.torn_at {
        Some(offset) => format!("torn tail at byte {offset} will be cut at open"),
        None => "ok".to_string(),
    }
}

fn segment_groups_table(segments: &[ScannedSegment]) -> String {
    let rows: Vec<Vec<String>> = segments
        .iter()
        .flat_map(|s| {
            s.groups.iter().map(|(group, records)| {
                vec![
                    s.id.to_string(),
                    group.to_string(),
                    records.records.to_string(),
                    records.entries.to_string(),
                    records
                        .index_range
                        .map_or("-".to_string(), |(low, high)| format!("{low}..={high}")),
                ]
            })
        })
        .collect();
    render(
        &[
            ("segment", Align::Right),
            ("group", Align::Left),
            ("records", Align::Right),
            ("entries", Align::Right),
            ("entry indexes", Align::Left),
        ],
        &rows,
    )
}

fn damage_table(segments: &[ScannedSegment]) -> String {
    let rows: Vec<Vec<String>> = segments
        .iter()
        .flat_map(|s| {
            s.damage.iter().map(|d| {
                vec![
                    s.path.display().to_string(),
                    d.offset.to_string(),
                    d.end.to_string(),
                    d.reason.clone(),
                ]
            })
        })
        .collect();
    render(
        &[
            ("file", Align::Left),
            ("offset", Align::Right),
            ("end", Align::Right),
            ("reason", Align::Left),
        ],
        &rows,
    )
}

fn groups_table(groups: &[(phxq_storage::GroupId, GroupInfo)]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|(group, info)| {
            let voters: Vec<String> = info.conf_state.voters.iter().map(u64::to_string).collect();
            vec![
                group.to_string(),
                info.first_index.to_string(),
                info.last_index.to_string(),
                info.hard_state.term.to_string(),
                info.hard_state.vote.to_string(),
                info.hard_state.commit.to_string(),
                if voters.is_empty() {
                    "-".to_string()
                } else {
                    voters.join(",")
                },
            ]
        })
        .collect();
    render(
        &[
            ("group", Align::Left),
            ("first index", Align::Right),
            ("last index", Align::Right),
            ("term", Align::Right),
            ("vote", Align::Right),
            ("commit", Align::Right),
            ("voters", Align::Left),
        ],
        &rows,
    )
}

/// The closing lines: clean (with any torn tail named) or damaged (with what repair loses).
fn verdict(report: &InspectReport) -> String {
    if !report.damaged() {
        let torn: Vec<String> = report
            .segments
            .iter()
            .filter_map(|s| {
                let offset = s.torn_at?;
                Some(format!(
                    "clean: torn tail at byte {offset} of {} will be cut at open \
                     (a write that never completed, normal after a crash)\n",
                    s.path.display()
                ))
            })
            .collect();
        return if torn.is_empty() {
            "clean\n".to_string()
        } else {
            torn.concat()
        };
    }
    let mut out = String::from(
        "DAMAGED: synced data failed its checks; the log will not open until it is repaired \
         (WalOptions::repair drops the damaged records and keeps each original as *.corrupt)\n",
    );
    for (group, index) in &report.cut_groups {
        out.push_str(&format!(
            "  repair cuts {group} at index {index}: its peers must send it from there again\n"
        ));
    }
    out
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// The `--json` document. A view of the report rather than the storage types themselves, so
/// that the document's shape is decided here, where scripts depend on it.
#[derive(Serialize)]
struct ReportJson<'a> {
    dir: String,
    /// `"clean"` or `"damaged"`, as the exit code says.
    status: &'static str,
    segments: Vec<SegmentJson<'a>>,
    groups: Vec<GroupJson<'a>>,
    /// Groups that repair would cut, and the first index each loses.
    cut_groups: Vec<CutJson>,
}

#[derive(Serialize)]
struct SegmentJson<'a> {
    id: u64,
    path: String,
    file_bytes: u64,
    valid_bytes: u64,
    header_torn: bool,
    unreadable: Option<&'a str>,
    torn_at: Option<u64>,
    damage: Vec<DamageJson<'a>>,
    records_by_kind: &'a std::collections::BTreeMap<&'static str, u64>,
    groups: Vec<SegmentGroupJson>,
}

#[derive(Serialize)]
struct DamageJson<'a> {
    offset: u64,
    end: u64,
    reason: &'a str,
}

#[derive(Serialize)]
struct SegmentGroupJson {
    group: u64,
    records: u64,
    entries: u64,
    /// `[lowest, highest]` entry index in the segment, or null.
    index_range: Option<[u64; 2]>,
}

#[derive(Serialize)]
struct GroupJson<'a> {
    group: u64,
    first_index: u64,
    last_index: u64,
    compact_term: u64,
    hard_state: HardStateJson,
    voters: &'a [u64],
    learners: &'a [u64],
}

#[derive(Serialize)]
struct HardStateJson {
    term: u64,
    vote: u64,
    commit: u64,
}

#[derive(Serialize)]
struct CutJson {
    group: u64,
    first_lost_index: u64,
}

impl<'a> ReportJson<'a> {
    fn of(dir: &Path, report: &'a InspectReport) -> ReportJson<'a> {
        ReportJson {
            dir: dir.display().to_string(),
            status: if report.damaged() { "damaged" } else { "clean" },
            segments: report.segments.iter().map(SegmentJson::of).collect(),
            groups: report
                .groups
                .iter()
                .map(|(group, info)| GroupJson {
                    group: group.0,
                    first_index: info.first_index,
                    last_index: info.last_index,
                    compact_term: info.compact_term,
                    hard_state: HardStateJson {
                        term: info.hard_state.term,
                        vote: info.hard_state.vote,
                        commit: info.hard_state.commit,
                    },
                    voters: &info.conf_state.voters,
                    learners: &info.conf_state.learners,
                })
                .collect(),
            cut_groups: report
                .cut_groups
                .iter()
                .map(|(group, index)| CutJson {
                    group: group.0,
                    first_lost_index: *index,
                })
                .collect(),
        }
    }
}

impl<'a> SegmentJson<'a> {
    fn of(segment: &'a ScannedSegment) -> SegmentJson<'a> {
        SegmentJson {
            id: segment.id,
            path: segment.path.display().to_string(),
            file_bytes: segment.file_bytes,
            valid_bytes: segment.valid_bytes,
            header_torn: segment.header_torn,
            unreadable: segment.unreadable.as_deref(),
            torn_at: segment.torn_at,
            damage: segment
                .damage
                .iter()
                .map(|d| DamageJson {
                    offset: d.offset,
                    end: d.end,
                    reason: &d.reason,
                })
                .collect(),
            records_by_kind: &segment.records_by_kind,
            groups: segment
                .groups
                .iter()
                .map(|(group, records)| SegmentGroupJson {
                    group: group.0,
                    records: records.records,
                    entries: records.entries,
                    index_range: records.index_range.map(|(low, high)| [low, high]),
                })
                .collect(),
        }
    }
}
