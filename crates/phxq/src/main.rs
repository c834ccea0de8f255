//! `phxq`: the one binary of a phxq deployment.
//!
//! * `phxq node --config FILE` runs one node of a store (`etc/` has a 3-node sample).
//! * `phxq dev` runs a complete 3-node store on loopback in one process.
//! * `phxq produce`, `phxq consume`, `phxq cluster status`: a first client path over gRPC.
//! * `phxq topic create|list|describe|alter|delete`: topics through the API.
//! * `phxq token secret|issue`: client auth (a store secret, tokens with roles).
//! * `phxq wal inspect` and `phxq bench wal`: operator tools for a node's write-ahead log.
//! * `phxq bench produce`, `phxq bench consume` and `phxq bench failover`: producers (and
//!   consumers) against a store, in PhxQueue's report format; end-to-end latency; a master
//!   killed with SIGKILL under load.
//!
//! Exit codes are part of the interface, for scripts: 0 success, 1 error (including a bad
//! command line, a refused request, or a node that stopped on a failure), 2 the log is damaged
//! and needs repair. Clap's own usage errors would exit 2, so they are mapped to 1 to keep 2
//! unambiguous.

mod bench;
mod bench_store;
mod cert;
mod client;
mod dev;
mod inspect;
mod logging;
mod node_cmd;
mod table;
mod timestamp;
mod token;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code: something failed (I/O, bad arguments, a log that does not open).
const EXIT_ERROR: u8 = 1;
/// Exit code: the log holds damaged synced data and will not open until repaired.
const EXIT_DAMAGED: u8 = 2;

/// What a command returns: how to exit, or the error to print before exiting with 1.
type CommandResult<T = ExitCode> = Result<T, Box<dyn std::error::Error>>;

/// phxq: a distributed, replicated, persistent message queue.
#[derive(Debug, Parser)]
#[command(name = "phxq", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Operator tools for a node's write-ahead log.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Benchmarks (figures are reported, targets printed as pass/miss, never asserted).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run one node of a store from its TOML config (see etc/node1.toml).
    Node(node_cmd::Args),
    /// Run a complete 3-node store on 127.0.0.1 in one command, until Ctrl-C.
    Dev(dev::Args),
    /// Make a store's CA and node certificates for peer TLS (PEM; keys 0600).
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Send one message per line of standard input; exits 0 only if every one was acknowledged.
    Produce(client::ProduceArgs),
    /// Print messages of a topic for a consumer group and commit its cursor.
    Consume(client::ConsumeArgs),
    /// Print messages as they arrive (tail -f), from each queue's end or its beginning,
    /// without reading or moving any consumer group's cursor.
    Tail(client::TailArgs),
    /// Move a consumer group's cursor: to the earliest retained message, to the latest (only
    /// new messages are read), to an offset, or to the first message at or after a time; on
    /// one queue or every queue of a topic.
    Seek(client::SeekArgs),
    /// Receive messages for per-message acknowledgement: each printed with its delivery
    /// count (stored in the store); one not acked within the ack timeout comes back.
    Receive(client::receive::ReceiveArgs),
    /// Acknowledge received messages of a queue by offset (the group's cursor moves over the
    /// acked prefix).
    Ack(client::receive::AckArgs),
    /// Give received messages of a queue back, to be delivered again after `--delay-ms`.
    Nack(client::receive::AckArgs),
    /// The store as its nodes see it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Consumer groups: list them, or describe one's cursors and lag.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Topics: create, list, describe, alter, delete (replicated in every group's table).
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Client auth: make a store secret, issue tokens signed with it.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Write a new store secret (32 random bytes) to a file.
    Secret(token::SecretArgs),
    /// Print a token with roles, signed with the store's secret.
    Issue(token::IssueArgs),
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic in every replication group (re-running the same create is harmless).
    Create(client::topic::CreateArgs),
    /// Every topic with its settings, and whether every group agrees on it.
    List(client::topic::ListArgs),
    /// One topic's settings, and any group that differs.
    Describe(client::topic::NameArgs),
    /// Change a topic's settings: more queues, consumer groups added or removed, retention.
    Alter(client::topic::AlterArgs),
    /// Delete a topic with its messages and cursors, in every group.
    Delete(client::topic::NameArgs),
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Every consumer group and the topics it reads.
    List(client::GroupListArgs),
    /// Per queue of a topic: where the group reads next (its cursor), the queue's end, and the
    /// lag between them.
    Describe(client::GroupDescribeArgs),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes, the master of every group and its lease, asking every node for its view.
    Status(client::StatusArgs),
}

#[derive(Debug, Subcommand)]
enum WalCommand {
    /// Report what a log directory holds, without changing it: segments, torn tails, damage,
    /// and each group as recovery would leave it. Exits 2 if the log needs repair.
    Inspect(inspect::Args),
    /// Repair a damaged log (the node stopped): drop the damaged records (each damaged file is
    /// kept beside as *.corrupt) and cut each group that lost an entry there, so its peers
    /// send it again when the node rejoins.
    Repair(inspect::RepairArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The write-ahead log against the raw disk (write + fdatasync) measured just before each
    /// case, from one writer thread to hundreds.
    Wal(bench::Args),
    /// Producers against a running store, each waiting for its own acknowledgement:
    /// PhxQueue's report (return codes, latency buckets) plus p50/p99/p99.9.
    Produce(bench_store::ProduceArgs),
    /// End-to-end latency from enqueue to handler: producers at a fixed rate, one consumer
    /// pull loop per queue from the queues' ends; PhxQueue's report for end-to-end and
    /// produce-ack latency, and every message accounted for (missing, duplicates).
    Consume(bench_store::ConsumeArgs),
    /// Starts its own 3-node store, kills the master of the most groups with SIGKILL under
    /// load, restarts it, and reports every second and the time to recover each group.
    Failover(bench_store::FailoverArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // Help and version go to stdout and are a success; usage errors are errors.
            return if error.use_stderr() {
                ExitCode::from(EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let outcome = match &cli.command {
        Command::Wal {
            command: WalCommand::Inspect(args),
        } => inspect::run(args),
        Command::Wal {
            command: WalCommand::Repair(args),
        } => inspect::repair(args),
        Command::Bench {
            command: BenchCommand::Wal(args),
        } => bench::run(args),
        Command::Bench {
            command: BenchCommand::Produce(args),
        } => bench_store::produce(args),
        Command::Bench {
            command: BenchCommand::Consume(args),
        } => bench_store::consume(args),
        Command::Bench {
            command: BenchCommand::Failover(args),
        } => bench_store::failover(args),
        Command::Node(args) => node_cmd::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Cert { command } => cert::run(command),
        Command::Produce(args) => client::produce(args),
        Command::Consume(args) => client::consume(args),
        Command::Tail(args) => client::tail(args),
        Command::Seek(args) => client::seek(args),
        Command::Receive(args) => client::receive::receive(args),
        Command::Ack(args) => client::receive::ack(args),
        Command::Nack(args) => client::receive::nack(args),
        Command::Cluster {
            command: ClusterCommand::Status(args),
        } => client::status(args),
        Command::Group {
            command: GroupCommand::List(args),
        } => client::group_list(args),
        Command::Group {
            command: GroupCommand::Describe(args),
        } => client::group_describe(args),
        Command::Topic { command } => match command {
            TopicCommand::Create(args) => client::topic::create(args),
            TopicCommand::List(args) => client::topic::list(args),
            TopicCommand::Describe(args) => client::topic::describe(args),
            TopicCommand::Alter(args) => client::topic::alter(args),
            TopicCommand::Delete(args) => client::topic::delete(args),
        },
        Command::Token { command } => match command {
            TokenCommand::Secret(args) => token::secret(args),
            TokenCommand::Issue(args) => token::run_issue(args),
        },
    };
    match outcome {
        Ok(code) => code,
        // Whoever read our output stopped (`phxq wal inspect DIR | head`): nothing to say.
        Err(error) if is_broken_pipe(&*error) => ExitCode::from(EXIT_ERROR),
        Err(error) => {
            eprintln!("phxq: error: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Writes `text` and a newline to standard output, flushed, so that a long command shows each
/// line as it comes even when piped. Unlike `println!`, a closed pipe is an error returned to
/// `main` rather than a panic.
fn print_line(text: impl std::fmt::Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    // The io::Error may be the error itself or its source (a client command's output error).
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
