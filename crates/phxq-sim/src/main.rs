//! `phxq-sim`: runs simulations from the command line.
//!
//! ```text
//! cargo run -p phxq-sim -- --seed 42          # replay one seed exactly
//! cargo run -p phxq-sim -- --seeds 1..200     # a range, stops at the first failure
//! cargo run -p phxq-sim -- --seed 7 --canary  # plant ack-before-sync and watch it get caught
//! ```

use std::ops::Range;
use std::process::ExitCode;

use clap::Parser;
use phxq_sim::{SimConfig, run};

/// Deterministic simulation of a phxq store.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run seeds START..END.
    #[arg(long, value_parser = parse_range)]
    seeds: Option<Range<u64>>,
    /// Plant the ack-before-sync bug in every node.
    #[arg(long)]
    canary: bool,
    /// Nodes (3 or 5); default: chosen by the seed.
    #[arg(long)]
    nodes: Option<usize>,
}

fn parse_range(text: &str) -> Result<Range<u64>, String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?} is not START..END"))?;
    let start = start.parse().map_err(|e| format!("{start:?}: {e}"))?;
    let end = end.parse().map_err(|e| format!("{end:?}: {e}"))?;
    Ok(start..end)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seeds = match (args.seed, args.seeds) {
        (Some(seed), _) => seed..seed + 1,
        (None, Some(range)) => range,
        (None, None) => 0..1,
    };
    for seed in seeds {
        let mut config = SimConfig::for_seed(seed);
        config.canary = args.canary;
        if let Some(nodes) = args.nodes {
            config.nodes = nodes;
        }
        match run(&config) {
            Ok(report) => println!(
                "seed {seed}: ok ({} nodes, {} groups): {} acked, {} delivered, {} indeterminate, {} duplicates, {} crashes, {} dropped, {} events, {} snapshots installed, {} compactions, {:.1} messages per proposal",
                config.nodes,
                config.groups,
                report.acked,
                report.delivered,
                report.indeterminate,
                report.duplicates,
                report.crashes,
                report.dropped,
                report.events,
                report.counters.snapshots_installed,
                report.counters.compactions,
                report.counters.messages as f64 / report.counters.proposals.max(1) as f64
            ),
            Err(failure) => {
                println!(
                    "seed {seed}: FAILED ({} nodes, {} groups) after {} acked, {} crashes:",
                    config.nodes, config.groups, failure.report.acked, failure.report.crashes
                );
                for v in failure.violations.iter().take(20) {
                    println!("  {v}");
                }
                if failure.violations.len() > 20 {
                    println!("  ... and {} more", failure.violations.len() - 20);
                }
                println!("replay: cargo run -p phxq-sim -- --seed {seed}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
