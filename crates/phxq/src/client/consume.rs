//! `phxq consume`: the library consumer (`phxq_client::Consumer`) with a handler that prints.
//!
//! The command checks its input against the store's layout first (typed errors, nothing
//! read), then runs a [`Consumer`] of (topic, consumer group) whose handler prints each
//! message, and stops it when done; the consumer drains and commits on the way out. So the
//! command reads as any consumer of the group does:
//!
//! * **Queues**: every queue of the topic (or `--queue`), or, with `--member ID`, the queues
//!   the group coordinator grants this member among the group's live members (taken over
//!   from a member that dies, handed over when another joins or this one stops).
//! * **The store's settings** of (topic, consumer group) apply, and are re-read while it
//!   runs: the group's rate (divided among live members with `--member`), max in flight.
//!   The printer never fails a message, so retry tiers and the dead-letter topic never come
//!   into play.
//! * **Order**: each queue's messages are printed in offset order (`HandlingOrder::PerQueue`),
//!   queues in parallel, so lines of different queues interleave.
//! * **At least once**: a queue's cursor is committed only past printed messages
//!   (every commit interval, and when the command stops); a consumer killed before its
//!   commit leaves what it printed since to be printed again by the next one.
//! * **When it stops**: after `--max` messages (a message past the limit is not printed and
//!   its cursor stays before it); without `--member`, once every queue is read to its end (a
//!   pull that waited `--wait-ms` found nothing); with `--member`, when its queues are read to
//!   their end and nothing was printed for `--wait-ms` (0: it runs until SIGINT or SIGTERM);
//!   and on SIGINT or SIGTERM, draining first.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_client::{
    Consumer, ConsumerConfig, ConsumerError, ConsumerProgress, Delivery,
    HEARTBEAT_INTERVAL_DEFAULT, HEARTBEAT_INTERVAL_MIN, Handler, HandlingOrder, LONG_POLL_DEFAULT,
    LONG_POLL_MARGIN, Membership, Outcome, PULL_MESSAGES_DEFAULT, RETRY_DELAY_MAX,
};
use phxq_types::ErrorCode;
use serde_json::json;
use tokio::sync::watch;

use super::{
    ClientError, ConsumeArgs, Router, check_name, client_runtime, insert_bytes, refused,
    subscribed_queues,
};
use crate::CommandResult;

/// Heartbeats per session timeout that `--member` sends (at most one a second).
const HEARTBEATS_PER_SESSION: u32 = 6;
/// How often a member checks whether it has been idle for `--wait-ms`.
const IDLE_CHECK: Duration = Duration::from_millis(100);

pub fn consume(args: &ConsumeArgs) -> CommandResult {
    if args.wait_ms > phxq_node::server::CONSUME_WAIT_MS_MAX {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "--wait-ms {} is over {}",
                args.wait_ms,
                phxq_node::server::CONSUME_WAIT_MS_MAX
            ),
        )
        .into());
    }
    if args.max == Some(0) {
        return Err(refused(ErrorCode::InvalidArgument, "--max must be at least 1").into());
    }
    if args.member.is_some() && args.queue.is_some() {
        return Err(ClientError::Usage(
            "--queue and --member exclude each other: the coordinator assigns a member's queues"
                .into(),
        )
        .into());
    }
    let runtime = client_runtime()?;
    let printed = runtime.block_on(consume_all(args))?;
    eprintln!("phxq consume: {printed} message(s)");
    Ok(ExitCode::SUCCESS)
}

/// Checks the input against the store, then runs the consumer until it is done.
async fn consume_all(args: &ConsumeArgs) -> Result<u64, ClientError> {
    check_name("topic", &args.topic)?;
    check_name("consumer group", &args.group)?;
    if let Some(member) = &args.member {
        check_name("member", member)?;
    }
    let (_, status) = Router::discover(&args.connection).await?;
    subscribed_queues(&status, &args.topic, &args.group, args.queue)?;
    let config = consumer_config(args, &status)?;
    let consumer = Consumer::new(config).map_err(|error| {
        let code = if error.field.ends_with("member_id") {
            ErrorCode::InvalidName
        } else {
            ErrorCode::InvalidArgument
        };
        refused(code, error.to_string())
    })?;
    let printer = Arc::new(Printer::new(args));
    let done = until_done(
        printer.clone(),
        consumer.progress(),
        Duration::from_millis(args.wait_ms.into()),
        args.member.is_some(),
    );
    let ran = consumer.run(PrintHandler(printer.clone()), done).await;
    if let Some(error) = lock(&printer.output_failure).take() {
        return Err(ClientError::Output(error));
    }
    let report = ran.map_err(consumer_error)?;
    tracing::debug!(?report, "consumer report");
    Ok(printer.printed.load(Ordering::SeqCst))
}

/// The consumer's config: the nodes `status` lists (the one asked first), per-queue order,
/// pulls that wait `--wait-ms`.
fn consumer_config(
    args: &ConsumeArgs,
    status: &phxq_proto::api::ClusterStatusResponse,
) -> Result<ConsumerConfig, ClientError> {
    let server = super::parse_server(&args.connection.server)?;
    let mut servers = vec![server.clone()];
    servers.extend(
        status
            .nodes
            .iter()
            .map(|node| node.client_addr.clone())
            .filter(|addr| *addr != server),
    );
    servers.truncate(phxq_client::SERVERS_MAX);
    let mut config = ConsumerConfig::new(servers, &args.topic, &args.group);
    config.token = args.connection.token()?;
    config.ca = args.connection.store_ca()?;
    config.order = HandlingOrder::PerQueue;
    config.queues = args.queue.map(|queue| vec![queue]);
    config.long_poll = match (args.wait_ms, &args.member) {
        // A member that runs until stopped: the usual long poll.
        (0, Some(_)) => LONG_POLL_DEFAULT,
        (wait_ms, _) => Duration::from_millis(wait_ms.max(1).into()),
    };
    config.pull_messages_max = args
        .max
        .map_or(PULL_MESSAGES_DEFAULT, |max| max.min(1_000) as u32);
    let timeout = Duration::from_millis(args.connection.timeout_ms);
    config.deadline = timeout.max(config.long_poll + LONG_POLL_MARGIN + Duration::from_secs(1));
    if let Some(member) = &args.member {
        let session_timeout = Duration::from_millis(args.session_timeout_ms);
        config.membership = Some(Membership {
            session_timeout,
            heartbeat_interval: (session_timeout / HEARTBEATS_PER_SESSION)
                .clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_DEFAULT),
            ..Membership::new(member.clone())
        });
    }
    Ok(config)
}

/// Why the consumer stopped early, as the CLI reports it.
fn consumer_error(error: ConsumerError) -> ClientError {
    let code = match &error {
        ConsumerError::Store { error, .. } | ConsumerError::DeadLetter { error, .. } => {
            error.code()
        }
        ConsumerError::Settings(_) => Some(ErrorCode::InvalidArgument),
    };
    match code {
        Some(code) => refused(code, error.to_string()),
        None => ClientError::Usage(error.to_string()),
    }
}

/// Resolves when the command is done: `--max` printed (or output failed), idle (see the
/// module documentation), or SIGINT/SIGTERM.
async fn until_done(
    printer: Arc<Printer>,
    progress: watch::Receiver<ConsumerProgress>,
    wait: Duration,
    member: bool,
) {
    let mut finished = printer.finished.subscribe();
    let idle = async {
        if member {
            member_idle(&printer, progress, wait).await;
        } else {
            read_to_end(progress).await;
        }
    };
    tokio::select! {
        _ = finished.wait_for(|&finished| finished) => {}
        () = idle => {}
        () = crate::node_cmd::shutdown_signal() => {}
    }
}

/// Every queue read is caught up with its end at once.
async fn read_to_end(mut progress: watch::Receiver<ConsumerProgress>) {
    let caught_up =
        |p: &ConsumerProgress| !p.queues.is_empty() && p.caught_up.len() == p.queues.len();
    if progress.wait_for(caught_up).await.is_err() {
        std::future::pending::<()>().await; // the consumer is gone: `run` returns on its own
    }
}

/// A member's queues are caught up and nothing was printed for `wait` (never, for 0).
async fn member_idle(
    printer: &Printer,
    progress: watch::Receiver<ConsumerProgress>,
    wait: Duration,
) {
    if wait.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(IDLE_CHECK).await;
        let caught_up = {
            let progress = progress.borrow();
            progress.caught_up.len() == progress.queues.len()
        };
        if caught_up && lock(&printer.last_print).elapsed() >= wait {
            return;
        }
    }
}

/// Prints messages, one line each, up to `--max`.
struct Printer {
    json: bool,
    member: Option<String>,
    max: Option<u64>,
    /// Messages printed (or being printed: a slot is claimed first).
    printed: AtomicU64,
    last_print: Mutex<Instant>,
    /// Set once `--max` is reached or output failed.
    finished: watch::Sender<bool>,
    output_failure: Mutex<Option<std::io::Error>>,
}

impl Printer {
    fn new(args: &ConsumeArgs) -> Printer {
        Printer {
            json: args.json,
            member: args.member.clone(),
            max: args.max,
            printed: AtomicU64::new(0),
            last_print: Mutex::new(Instant::now()),
            finished: watch::channel(false).0,
            output_failure: Mutex::new(None),
        }
    }

    /// Prints `delivery` if `--max` allows and output works: `Handled`. Otherwise the
    /// message stays unhandled (a retry far off, which the stop that follows cuts short), so
    /// the cursor stays before it.
    fn print(&self, delivery: &Delivery) -> Outcome {
        let not_now = Outcome::Retry(RETRY_DELAY_MAX);
        if *self.finished.borrow() {
            return not_now;
        }
        let claimed = self
            .printed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |printed| {
                (self.max.is_none_or(|max| printed < max)).then_some(printed + 1)
            });
        let Ok(before) = claimed else {
            self.finished.send_replace(true);
            return not_now;
        };
        let line = self.line(delivery);
        let written = {
            let mut out = std::io::stdout().lock();
            out.write_all(&line).and_then(|()| out.flush())
        };
        if let Err(error) = written {
            self.printed.fetch_sub(1, Ordering::SeqCst);
            lock(&self.output_failure).get_or_insert(error);
            self.finished.send_replace(true);
            return not_now;
        }
        *lock(&self.last_print) = Instant::now();
        if self.max == Some(before + 1) {
            self.finished.send_replace(true);
        }
        Outcome::Handled
    }

    /// The line of `delivery`: its value, or with `--json` an object as `phxq tail --json`
    /// prints (plus `member` with `--member`).
    fn line(&self, delivery: &Delivery) -> Vec<u8> {
        if !self.json {
            let mut line = delivery.value.clone();
            line.push(b'\n');
            return line;
        }
        let mut object = serde_json::Map::new();
        object.insert("queue".into(), json!(delivery.queue));
        object.insert("offset".into(), json!(delivery.offset));
        object.insert("time_ms".into(), json!(delivery.time_ms));
        insert_bytes(&mut object, "key", &delivery.key);
        insert_bytes(&mut object, "value", &delivery.value);
        if let Some(member) = &self.member {
            object.insert("member".into(), json!(member));
        }
        let mut line = serde_json::Value::Object(object).to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// The consumer's handler: the shared printer.
struct PrintHandler(Arc<Printer>);

impl Handler for PrintHandler {
    fn handle(&self, msg: &Delivery) -> impl Future<Output = Outcome> + Send {
        std::future::ready(self.0.print(msg))
    }
}

/// Locks `mutex`; a poisoned lock still holds consistent data (single-step sections).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
