//! The simulator in CI: a few hundred seeds must keep every promise, and a planted durability
//! bug must be caught. `PHXQ_SIM_SEEDS` sets how many seeds each test runs.

use phxq_sim::{SimConfig, run};

fn seeds_per_test() -> u64 {
    std::env::var("PHXQ_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn run_seeds(first: u64, nodes: usize) {
    let mut failures = Vec::new();
    for seed in first..first + seeds_per_test() {
        let mut config = SimConfig::for_seed(seed);
        config.nodes = nodes;
        if let Err(failure) = run(&config) {
            failures.push(format!(
                "seed {seed} ({nodes} nodes): {}\n  replay: cargo run -p phxq-sim -- --seed {seed} --nodes {nodes}",
                failure.violations[..failure.violations.len().min(5)].join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn three_node_stores_lose_nothing_through_crashes_partitions_and_torn_writes() {
    run_seeds(1_000, 3);
}

#[test]
fn five_node_stores_lose_nothing_through_crashes_partitions_and_torn_writes() {
    run_seeds(2_000, 5);
}

/// The canary: a node that releases follower acks (and its own "persisted") before the fsync
/// must be caught losing an acknowledged enqueue within a bounded number of seeds. If this
/// fails, the simulator's faults no longer reach the window the real code protects.
#[test]
fn acks_released_before_the_fsync_are_caught_losing_messages() {
    for seed in 0..200 {
        let mut config = SimConfig::for_seed(seed);
        config.canary = true;
        if let Err(failure) = run(&config)
            && failure.violations.iter().any(|v| v.starts_with("lost"))
        {
            eprintln!("canary caught at seed {seed}: {}", failure.violations[0]);
            return;
        }
    }
    panic!("200 seeds with acks released before the fsync lost no acknowledged enqueue");
}
