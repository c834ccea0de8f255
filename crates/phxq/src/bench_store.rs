//! `phxq bench produce`, `phxq bench consume` and `phxq bench failover`: the command lines of
//! [`phxq_bench::store`] and [`phxq_bench::consume`], the store processes of the failover
//! run, and the printing.
//!
//! All three print PhxQueue's report (every `--report-every-s` and at the end) and end with one
//! JSON line holding the whole result, so scripts can take `tail -n 1`; with `--json` that
//! line is all that is printed. Targets are printed as pass/miss, never asserted.
//!
//! `bench failover` runs its own store: three `phxq node` processes of this binary, on
//! 127.0.0.1 ports of its own (17300-17302 for clients, 17400-17402 for peers by default), in
//! a temporary directory removed at the end, with one queue per group so every group carries
//! load. It kills the node that masters the most groups with SIGKILL mid-run, restarts it
//! later, and reports every second of the run and, for each group the killed node mastered,
//! the time from the kill to the first enqueue acknowledged by another node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use phxq_bench::consume::{self, ConsumeReport};
use phxq_bench::store::{self, FailoverReport, Load, Options, Report};
use serde_json::json;

use crate::{CommandResult, print_line};

/// Failover target: median time from the kill to the first success per group (issue 3).
const FAILOVER_MEDIAN_TARGET_MS: f64 = 1_500.0;
/// Nodes of the failover store.
const NODES: u16 = 3;
/// How long the failover store may take to elect a master for every group.
const READY_TIMEOUT_MS: u64 = 30_000;
/// How long placement may take to spread masters evenly before the run starts anyway.
const BALANCE_TIMEOUT_MS: u64 = 20_000;
/// How often the store's state is polled while waiting, in milliseconds.
const POLL_MS: u64 = 200;
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT_MS: u64 = 10_000;
/// Longest phase of a run, in seconds.
const PHASE_SECONDS_MAX: f64 = 3_600.0;
/// `bench consume` says the load was below its target when the producers sent less than
/// this fraction of it.
const RATE_SHORTFALL_RATIO: f64 = 0.95;

/// Load options shared by both commands.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Concurrent producers, each waiting for its own acknowledgement; producer i writes queue
    /// i mod queues [default: 16; for `bench failover`, one per queue].
    #[arg(long)]
    producers: Option<usize>,
    /// Bytes of each message value.
    #[arg(long, default_value_t = 1024)]
    bytes: usize,
    /// Messages per Produce call (1: no client batching).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Send each producer's calls over one ProduceStream per node instead of one unary
    /// Produce call each (still one at a time, each waiting for its own acknowledgement).
    #[arg(long)]
    stream: bool,
    /// Target calls/s over all producers (0: unlimited).
    #[arg(long, default_value_t = 0)]
    qps: u64,
    /// Do not retry failed attempts (NOT_MASTER redirects are still followed).
    #[arg(long)]
    no_retries: bool,
    /// A call's deadline, retries included, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Seconds between periodic reports.
    #[arg(long, default_value_t = 10.0)]
    report_every_s: f64,
    /// Seconds of a raw fsync probe (4 KB appends + fdatasync) before and after the run, in
    /// --probe-dir; 0 skips it.
    #[arg(long, default_value_t = 1.0)]
    fsync_probe_s: f64,
    /// Where the fsync probe writes its scratch file (put it on the store's disk).
    #[arg(long, default_value = ".")]
    probe_dir: PathBuf,
    /// Threads of the load generator (0: one up to 16 producers, else one per 32 producers,
    /// from 2 to 4). The producers
    /// share the machine with the store, so the fewer threads the better while they keep up:
    /// one thread runs every producer without cross-thread wake-ups.
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// Print only the final JSON line.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq bench produce`.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Any node of the store (HOST:PORT of its client API); calls follow NOT_MASTER.
    #[arg(long, env = "PHXQ_SERVER", default_value = "127.0.0.1:7100")]
    server: String,
    /// The topic written.
    #[arg(long, default_value = "test")]
    topic: String,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Seconds before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Process ids of the store's servers, comma-separated, to report their CPU use.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// The token the benchmark's clients send (stores with auth on; `phxq dev --auth`
    /// prints an admin one).
    #[arg(long, env = "PHXQ_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// The store's CA certificate (PEM), for stores whose client port serves TLS (`phxq dev
    /// --tls` prints it); without it, plaintext.
    #[arg(long, env = "PHXQ_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
}

/// Arguments of `phxq bench consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Any node of the store (HOST:PORT of its client API); calls follow NOT_MASTER.
    #[arg(long, env = "PHXQ_SERVER", default_value = "127.0.0.1:7100")]
    server: String,
    /// The topic written and read.
    #[arg(long, default_value = "test")]
    topic: String,
    /// The token the benchmark's clients send (stores with auth on; `phxq dev --auth`
    /// prints an admin one).
    #[arg(long, env = "PHXQ_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// The store's CA certificate (PEM), for stores whose client port serves TLS (`phxq dev
    /// --tls` prints it); without it, plaintext.
    #[arg(long, env = "PHXQ_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,

    /// The consumer group reading (its cursors are first moved to the end of every queue).
    #[arg(long, default_value = "g1")]
    group: String,
    /// Target messages/s over all producers, one message per Produce call (a latency is
    /// measured at a known load; the figure is at half of `bench produce`'s maximum).
    #[arg(long, default_value_t = consume::Options::default().qps)]
    qps: u64,
    /// Concurrent producers, each waiting for its own acknowledgement; producer i writes
    /// queue i mod queues.
    #[arg(long, default_value_t = consume::Options::default().producers)]
    producers: usize,
    /// Bytes of each message value (at least 28: the send time and the message's identity
    /// lead every value).
    #[arg(long, visible_alias = "bytes", default_value_t = consume::Options::default().message_bytes)]
    message_bytes: usize,
    /// Measured seconds of producing.
    #[arg(long, visible_alias = "duration-s", default_value_t = 10.0)]
    seconds: f64,
    /// Seconds of producing before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Longest wait after producing stops for every acknowledged message to be consumed;
    /// what is still not consumed then is reported missing.
    #[arg(long, default_value_t = 5.0)]
    drain_s: f64,
    /// Seconds between periodic reports.
    #[arg(long, default_value_t = 10.0)]
    report_every_s: f64,
    /// A call's deadline, retries included, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Threads of the load generator (0: one up to 16 producers, else one per 32 producers,
    /// from 2 to 4); consumers run on the same threads.
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// Print only the final JSON line.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq bench failover`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Directory in which the store's temporary data directory is made [default: the
    /// system's temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Client port of node 1; nodes 2 and 3 take the next two.
    #[arg(long, default_value_t = 17300)]
    client_port: u16,
    /// Peer port of node 1; nodes 2 and 3 take the next two.
    #[arg(long, default_value_t = 17400)]
    peer_port: u16,
    /// Replication groups of the store.
    #[arg(long, default_value_t = 24)]
    groups: u32,
    /// Queues of topic `test` [default: one per group, so every group carries load].
    #[arg(long)]
    queues: Option<u32>,
    /// Seconds of load before the kill.
    #[arg(long, default_value_t = 5.0)]
    kill_after_s: f64,
    /// Seconds the killed node stays down.
    #[arg(long, default_value_t = 5.0)]
    down_s: f64,
    /// Seconds of load after the restart.
    #[arg(long, default_value_t = 10.0)]
    after_s: f64,
    #[command(flatten)]
    load: LoadArgs,
}

fn seconds(flag: &str, value: f64) -> CommandResult<Duration> {
    if !(0.0..=PHASE_SECONDS_MAX).contains(&value) {
        return Err(format!("{flag} {value}: must be within 0 to {PHASE_SECONDS_MAX}").into());
    }
    Duration::try_from_secs_f64(value).map_err(|error| format!("{flag} {value}: {error}").into())
}

fn options(load: &LoadArgs, server: String, topic: String) -> CommandResult<Options> {
    Ok(Options {
        server,
        topic,
        producers: load.producers.unwrap_or(16),
        message_bytes: load.bytes,
        batch: load.batch,
        stream: load.stream,
        qps: load.qps,
        report_every: seconds("--report-every-s", load.report_every_s)?,
        retries: !load.no_retries,
        call_timeout: Duration::from_millis(load.timeout_ms),
        ..Options::default()
    })
}

/// The raw fsync probe, or `None` when skipped.
fn probe(load: &LoadArgs) -> CommandResult<Option<f64>> {
    if load.fsync_probe_s == 0.0 {
        return Ok(None);
    }
    let duration = seconds("--fsync-probe-s", load.fsync_probe_s)?;
    Ok(Some(store::fsync_probe(&load.probe_dir, duration)?))
}

/// `--client-threads` resolved.
fn client_threads(threads: usize, producers: usize) -> usize {
    match threads {
        0 if producers <= 16 => 1,
        0 => (producers / 32).clamp(2, 4),
        n => n,
    }
}

/// The load generator's runtime: `threads` workers (see `--client-threads`); one thread is a
/// current-thread runtime.
fn runtime(threads: usize, producers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = client_threads(threads, producers);
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Prints `report` unless only JSON is wanted.
fn print_report(json_only: bool, report: &Report) -> std::io::Result<()> {
    if json_only {
        return Ok(());
    }
    print_line(report.render().trim_end())
}

/// The token and CA every benchmark client uses.
fn set_credentials(token: Option<&str>, ca: Option<&std::path::Path>) -> CommandResult<()> {
    let ca = ca
        .map(phxq_client::StoreCa::load)
        .transpose()
        .map_err(|error| format!("--ca {error}"))?;
    phxq_bench::store::set_credentials(token, ca)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench produce

pub fn produce(args: &ProduceArgs) -> CommandResult {
    set_credentials(args.token.as_deref(), args.ca.as_deref())?;
    let mut options = options(&args.load, args.server.clone(), args.topic.clone())?;
    options.duration = seconds("--duration-s", args.duration_s)?;
    options.warmup = seconds("--warmup-s", args.warmup_s)?;
    options.server_pids = args.server_pids.clone();
    options.validate()?;
    let json_only = args.load.json;
    if !json_only {
        print_line(format_args!(
            "phxq bench produce: {} producer(s) → {} topic {:?}, {}-byte messages, {} per \
             call, {}, {:?} warmup then {:?}; retries {}",
            options.producers,
            options.server,
            options.topic,
            options.message_bytes,
            options.batch,
            if options.qps == 0 {
                "unlimited qps".to_string()
            } else {
                format!("target {} calls/s", options.qps)
            },
            options.warmup,
            options.duration,
            if options.retries { "on" } else { "off" },
        ))?;
    }
    let probe_before = probe(&args.load)?;
    let runtime = runtime(args.load.client_threads, options.producers)?;
    let mut printed = Ok(());
    let report = runtime.block_on(store::run(&options, |interval| {
        if printed.is_ok() {
            printed = print_report(json_only, interval);
        }
    }))?;
    printed?;
    drop(runtime);
    let probe_after = probe(&args.load)?;
    print_report(json_only, &report)?;
    if !json_only && let (Some(before), Some(after)) = (probe_before, probe_after) {
        print_line(format_args!(
            "  raw fsync probe: {before:.0}/s before, {after:.0}/s after"
        ))?;
    }
    let line = json!({
        "bench": "produce",
        "server": options.server,
        "topic": options.topic,
        "producers": options.producers,
        "client_threads": client_threads(args.load.client_threads, options.producers),
        "message_bytes": options.message_bytes,
        "batch": options.batch,
        "stream": options.stream,
        "qps_target": options.qps,
        "retries": options.retries,
        "warmup_s": options.warmup.as_secs_f64(),
        "duration_s": options.duration.as_secs_f64(),
        "fsync_probe_before_per_s": probe_before,
        "fsync_probe_after_per_s": probe_after,
        "report": report,
    });
    print_line(line)?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// bench consume

pub fn consume(args: &ConsumeArgs) -> CommandResult {
    set_credentials(args.token.as_deref(), args.ca.as_deref())?;
    let options = consume::Options {
        server: args.server.clone(),
        topic: args.topic.clone(),
        group: args.group.clone(),
        producers: args.producers,
        message_bytes: args.message_bytes,
        qps: args.qps,
        warmup: seconds("--warmup-s", args.warmup_s)?,
        duration: seconds("--seconds", args.seconds)?,
        drain: seconds("--drain-s", args.drain_s)?,
        report_every: seconds("--report-every-s", args.report_every_s)?,
        call_timeout: Duration::from_millis(args.timeout_ms),
    };
    options.validate()?;
    let json_only = args.json;
    if !json_only {
        print_line(format_args!(
            "phxq bench consume: {} producer(s) → {} topic {:?} at {} msgs/s, {}-byte \
             messages, {:?} warmup then {:?}, drain at most {:?}; one consumer per queue in \
             group {:?}, starting at each queue's end",
            options.producers,
            options.server,
            options.topic,
            options.qps,
            options.message_bytes,
            options.warmup,
            options.duration,
            options.drain,
            options.group,
        ))?;
    }
    let runtime = runtime(args.client_threads, options.producers)?;
    let print = |report: &ConsumeReport| {
        if json_only {
            Ok(())
        } else {
            print_line(report.render().trim_end())
        }
    };
    let mut printed = Ok(());
    let outcome = runtime.block_on(consume::run(&options, |interval| {
        if printed.is_ok() {
            printed = print(interval);
        }
    }))?;
    printed?;
    drop(runtime);
    print(&outcome.report)?;
    let sent_per_sec = outcome.report.produce_ack.qps;
    let below_target = sent_per_sec < options.qps as f64 * RATE_SHORTFALL_RATIO;
    if !json_only && below_target {
        print_line(format_args!(
            "  note: the producers sent {sent_per_sec:.0} msgs/s, below the target {}: each \
             waits for its acknowledgement, so raise --producers for this rate",
            options.qps
        ))?;
    }
    let line = json!({
        "bench": "consume",
        "server": options.server,
        "topic": options.topic,
        "group": options.group,
        "queues": outcome.queues,
        "start_offsets": outcome.start_offsets,
        "producers": options.producers,
        "client_threads": client_threads(args.client_threads, options.producers),
        "message_bytes": options.message_bytes,
        "qps_target": options.qps,
        "qps_below_target": below_target,
        "warmup_s": options.warmup.as_secs_f64(),
        "duration_s": options.duration.as_secs_f64(),
        "drain_s": options.drain.as_secs_f64(),
        "counts": outcome.report.counts,
        "drained_ms": outcome.report.drained_ms,
        "end_to_end": outcome.report.end_to_end,
        "produce_ack": outcome.report.produce_ack,
    });
    print_line(line)?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// bench failover

pub fn failover(args: &FailoverArgs) -> CommandResult {
    let kill_after = seconds("--kill-after-s", args.kill_after_s)?;
    let down = seconds("--down-s", args.down_s)?;
    let after = seconds("--after-s", args.after_s)?;
    let queues = args.queues.unwrap_or(args.groups);
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut cluster = Cluster::start(&parent, args, queues)?;
    let mut options = options(&args.load, cluster.client_addr(1), "test".to_string())?;
    options.producers = args.load.producers.unwrap_or(queues as usize);
    options.duration = kill_after + down + after;
    options.warmup = Duration::ZERO;
    options.validate()?;
    let json_only = args.load.json;
    let say = |text: String| -> std::io::Result<()> {
        if json_only {
            Ok(())
        } else {
            print_line(format_args!("phxq bench failover: {text}"))
        }
    };
    say(format!(
        "a {NODES}-node store of `phxq node` processes, {} groups, topic test with {queues} \
         queues, data in {}",
        args.groups,
        cluster.dir.display()
    ))?;
    let probe_before = probe(&args.load)?;
    let runtime = runtime(args.load.client_threads, options.producers)?;
    let outcome = runtime.block_on(async {
        let masters = cluster.wait_ready().await?;
        say(format!("ready; groups mastered per node: {masters:?}"))?;
        say(format!(
            "{} producer(s), {}-byte messages; kill -9 after {kill_after:?}, restart {down:?} \
             later, then {after:?} more",
            options.producers, options.message_bytes
        ))?;
        let load = Load::start(options.clone()).await?;
        load.begin_measuring();
        tokio::time::sleep(kill_after).await;
        let views = store::cluster_views(&cluster.client_addrs()).await;
        let (victim, mastered) = store::masters_by_node(&views)
            .into_iter()
            .max_by_key(|(node, groups)| (groups.len(), std::cmp::Reverse(*node)))
            .ok_or("no node answered before the kill")?;
        let loaded = load.loaded_groups();
        let watched: Vec<u64> = mastered
            .iter()
            .copied()
            .filter(|g| loaded.contains(g))
            .collect();
        let victim_addr = cluster.client_addr(victim);
        cluster.kill9(victim)?;
        load.watch_failover(&watched, &victim_addr);
        load.mark(format!("kill -9 node {victim}"));
        say(format!(
            "killed node {victim} with SIGKILL; it mastered groups {mastered:?} ({} with load)",
            watched.len()
        ))?;
        tokio::time::sleep(down).await;
        cluster.restart(victim)?;
        load.mark(format!("restart node {victim}"));
        say(format!("restarted node {victim}"))?;
        tokio::time::sleep(after).await;
        let (report, failover) = load.finish().await;
        Ok::<_, Box<dyn std::error::Error>>((victim, mastered, report, failover))
    });
    drop(runtime);
    let stopped = cluster.stop();
    let (victim, mastered, report, failover) = outcome?;
    stopped?;
    let probe_after = probe(&args.load)?;
    if !json_only {
        print_failover(&report, &failover, probe_before, probe_after)?;
    }
    let line = json!({
        "bench": "failover",
        "groups": args.groups,
        "queues": queues,
        "producers": options.producers,
        "client_threads": client_threads(args.load.client_threads, options.producers),
        "message_bytes": options.message_bytes,
        "retries": options.retries,
        "killed_node": victim,
        "killed_node_groups": mastered,
        "kill_after_s": kill_after.as_secs_f64(),
        "down_s": down.as_secs_f64(),
        "after_s": after.as_secs_f64(),
        "fsync_probe_before_per_s": probe_before,
        "fsync_probe_after_per_s": probe_after,
        "failover": failover,
        "report": report,
    });
    print_line(line)?;
    Ok(ExitCode::SUCCESS)
}

fn print_failover(
    report: &Report,
    failover: &FailoverReport,
    probe_before: Option<f64>,
    probe_after: Option<f64>,
) -> std::io::Result<()> {
    print_line("per second (calls finished in that second; latency includes retries):")?;
    print_line(failover.render_seconds().trim_end())?;
    let times: Vec<String> = failover
        .first_success_ms
        .iter()
        .map(|(group, ms)| match ms {
            Some(ms) => format!("g{group} {ms:.0}"),
            None => format!("g{group} never"),
        })
        .collect();
    print_line(format_args!(
        "time from kill -9 to the first acknowledged enqueue per group (ms): {}",
        times.join(", ")
    ))?;
    let verdict = match failover.median_ms {
        Some(median) if median <= FAILOVER_MEDIAN_TARGET_MS => "pass",
        _ => "**miss**",
    };
    print_line(format_args!(
        "failover: median {} ms, max {} ms; target median ≤ {FAILOVER_MEDIAN_TARGET_MS:.0} ms: \
         {verdict}",
        failover
            .median_ms
            .map_or("-".to_string(), |m| format!("{m:.0}")),
        failover
            .max_ms
            .map_or("- (a group never recovered)".to_string(), |m| format!(
                "{m:.0}"
            )),
    ))?;
    print_line(report.render().trim_end())?;
    if let (Some(before), Some(after)) = (probe_before, probe_after) {
        print_line(format_args!(
            "  raw fsync probe: {before:.0}/s before, {after:.0}/s after"
        ))?;
    }
    Ok(())
}

/// The failover run's store: three `phxq node` processes of this very binary.
struct Cluster {
    /// The run's directory: configs, node logs, data; removed when the cluster is dropped.
    dir: PathBuf,
    exe: PathBuf,
    client_port: u16,
    nodes: Vec<Option<Child>>,
    groups: u32,
}

impl Cluster {
    fn start(parent: &Path, args: &FailoverArgs, queues: u32) -> CommandResult<Cluster> {
        let last = |first: u16| first.checked_add(NODES - 1).filter(|_| first > 0);
        if last(args.client_port).is_none() || last(args.peer_port).is_none() {
            return Err(format!("ports must leave room for {NODES} nodes").into());
        }
        for port in (0..NODES).flat_map(|n| [args.client_port + n, args.peer_port + n]) {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|error| format!("port {port} is not free: {error}"))?;
        }
        let dir = parent.join(format!("phxq-bench-failover-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|error| format!("cannot make {}: {error}", dir.display()))?;
        let mut cluster = Cluster {
            dir,
            exe: std::env::current_exe()?,
            client_port: args.client_port,
            nodes: Vec::new(),
            groups: args.groups,
        };
        for id in 1..=NODES {
            let data_dir = cluster.dir.join(format!("node-{id}"));
            let text = config_text(id, &data_dir, &cluster.dir.join("tls"), args, queues);
            std::fs::write(cluster.config_path(u64::from(id)), text)?;
        }
        for id in 1..=NODES {
            let child = cluster.spawn(u64::from(id))?;
            cluster.nodes.push(Some(child));
        }
        Ok(cluster)
    }

    fn config_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}.toml"))
    }

    fn spawn(&self, id: u64) -> CommandResult<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{id}.log")))?;
        let child = Command::new(&self.exe)
            .args(["node", "--config"])
            .arg(self.config_path(id))
            .env("RUST_LOG", "warn,phxq_node::transport=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", self.exe.display()))?;
        Ok(child)
    }

    fn client_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.client_port) + id - 1)
    }

    fn client_addrs(&self) -> Vec<String> {
        (1..=u64::from(NODES))
            .map(|id| self.client_addr(id))
            .collect()
    }

    /// Waits until every group has a master, then (bounded) until masters are spread
    /// evenly; returns how many groups each node masters.
    async fn wait_ready(&self) -> CommandResult<Vec<usize>> {
        let start = Instant::now();
        let even = |counts: &[usize]| {
            let low = self.groups as usize / usize::from(NODES);
            let high =
                low + usize::from(!(self.groups as usize).is_multiple_of(usize::from(NODES)));
            counts.iter().all(|c| (low..=high).contains(c))
        };
        loop {
            let views = store::cluster_views(&self.client_addrs()).await;
            let masters = store::masters_by_node(&views);
            let counts: Vec<usize> = (1..=u64::from(NODES))
                .map(|id| masters.get(&id).map_or(0, Vec::len))
                .collect();
            let all = counts.iter().sum::<usize>() == self.groups as usize
                && views.iter().all(Option::is_some);
            let waited = start.elapsed();
            if all && (even(&counts) || waited > Duration::from_millis(BALANCE_TIMEOUT_MS)) {
                return Ok(counts);
            }
            if waited > Duration::from_millis(READY_TIMEOUT_MS) {
                return Err(format!(
                    "the store has no master for every group after {READY_TIMEOUT_MS} ms \
                     ({counts:?}); node logs are in {}",
                    self.dir.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill9(&mut self, id: u64) -> CommandResult<()> {
        let slot = &mut self.nodes[(id - 1) as usize];
        let mut child = slot
            .take()
            .ok_or_else(|| format!("node {id} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    fn restart(&mut self, id: u64) -> CommandResult<()> {
        let child = self.spawn(id)?;
        self.nodes[(id - 1) as usize] = Some(child);
        Ok(())
    }

    /// SIGTERM to every node, then SIGKILL to any still running after [`STOP_TIMEOUT_MS`].
    fn stop(&mut self) -> CommandResult<()> {
        for child in self.nodes.iter().flatten() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        let mut stubborn = Vec::new();
        for (index, slot) in self.nodes.iter_mut().enumerate() {
            let Some(mut child) = slot.take() else {
                continue;
            };
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    stubborn.push(index + 1);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if stubborn.is_empty() {
            Ok(())
        } else {
            Err(format!("nodes {stubborn:?} did not stop on SIGTERM and were killed").into())
        }
    }
}

impl Drop for Cluster {
    /// Kills what still runs and removes the run's directory (node logs included: a run that
    /// needs them can be repeated with `RUST_LOG` and a look before it ends).
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node `id`'s config: `phxq dev`'s store on the run's ports, with `queues` queues, and the
/// store's CA and node certificates in `tls` (made by the first call, reused by the others).
fn config_text(id: u16, data_dir: &Path, tls: &Path, args: &FailoverArgs, queues: u32) -> String {
    let mut text = format!(
        "[node]\nid = {id}\ndata_dir = {:?}\n\n[store]\nid = 1\ngroups = {}\n\n",
        data_dir.display().to_string(),
        args.groups
    );
    for n in 0..NODES {
        text += &format!(
            "[[store.nodes]]\nid = {}\nclient_addr = \"127.0.0.1:{}\"\npeer_addr = \
             \"127.0.0.1:{}\"\n\n",
            n + 1,
            args.client_port + n,
            args.peer_port + n
        );
    }
    text += &format!(
        "[[store.topics]]\nname = \"test\"\nqueues = {queues}\nconsumer_groups = [\"g1\"]\n"
    );
    // Not `data_dir/../tls`: the data directory does not exist yet, so that path would not
    // resolve, every call would make a new CA, and no node's certificate would verify.
    let ids: Vec<_> = (1..=u64::from(NODES)).map(phxq_types::NodeId).collect();
    match phxq_node::tls::ensure_store_certs(tls, 1, &ids) {
        Ok(files) => text += &phxq_node::tls::config_section(&files[usize::from(id) - 1]),
        // The node refuses the config and says why; the benchmark reports it.
        Err(error) => tracing::error!(%error, "making the store's certificates"),
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FailoverArgs,
    }

    /// The three configs share one CA: a node certificate signed by a CA that a later config
    /// replaced verifies nowhere, and the store never elects a master.
    #[test]
    fn the_failover_store_configs_share_one_ca() {
        let run = tempfile::tempdir().unwrap();
        let tls = run.path().join("tls");
        let args = Cli::parse_from(["failover"]).args;
        let mut cas = Vec::new();
        for id in 1..=NODES {
            let data_dir = run.path().join(format!("node-{id}"));
            let text = config_text(id, &data_dir, &tls, &args, 3);
            let config = phxq_node::config::ServerConfig::parse(&text).unwrap();
            assert!(config.peer_tls.is_some(), "node {id} has no [tls]: {text}");
            cas.push(std::fs::read(tls.join("ca.pem")).unwrap());
        }
        assert!(
            cas.windows(2).all(|pair| pair[0] == pair[1]),
            "a config made a new CA"
        );
    }
}
