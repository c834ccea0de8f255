//! `phxq receive`, `phxq ack` and `phxq nack`: the store's per-message acknowledgement
//! (`Receive`, `Ack` and `Nack` calls) through `phxq_client::Receiver`.
//!
//! `receive` prints each message with its delivery count (stored by the store, so it counts
//! deliveries by every consumer of the group, across master changes); a message not acked
//! within `--ack-timeout-ms` is delivered again. `ack` and `nack` name offsets of one queue.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use phxq_client::{ErrorKind, ProduceError, ProducerConfig, Received, Receiver};
use serde_json::json;

use super::{ClientError, Connection, Router, client_runtime, insert_bytes, parse_server};
use crate::{CommandResult, print_line};

/// Longest `--wait-ms` (the store's longest long poll).
const WAIT_MS_MAX: u32 = 60_000;
/// Pause between two passes over the queues while `receive --wait-ms` waits.
const PASS_PAUSE_MS: u64 = 100;

/// Arguments of `phxq receive`.
#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The consumer group receiving (subscribed to the topic).
    #[arg(long)]
    group: String,
    /// Receive from this queue only (default: every queue of the topic, in turn).
    #[arg(long)]
    queue: Option<u32>,
    /// Messages to receive at most, 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = 100)]
    max: u32,
    /// How long after delivery a message not acked is delivered again, 1 to 86400000 ms.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    ack_timeout_ms: u64,
    /// When nothing is deliverable, wait this long for a message (at most 60000).
    #[arg(long, value_name = "W", default_value_t = 0)]
    wait_ms: u32,
    /// One JSON object per message (queue, offset, time_ms, delivery_count, deadline_ms, key,
    /// value) instead of `queue Q offset O delivery D: value` lines.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq ack` and `phxq nack`.
#[derive(Debug, clap::Args)]
pub struct AckArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// The queue.
    #[arg(long)]
    queue: u32,
    /// The offsets (as `receive` printed them), 1 to 1000.
    #[arg(value_name = "OFFSET", required = true)]
    offsets: Vec<u64>,
    /// nack only: deliver them again after this long (0 to 604800000, a week).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// A JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

/// `phxq receive`.
pub fn receive(args: &ReceiveArgs) -> CommandResult {
    let runtime = client_runtime()?;
    runtime.block_on(receive_all(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn receive_all(args: &ReceiveArgs) -> Result<(), ClientError> {
    if args.wait_ms > WAIT_MS_MAX {
        return Err(super::refused(
            phxq_types::ErrorCode::InvalidArgument,
            format!("--wait-ms {}; at most {WAIT_MS_MAX}", args.wait_ms),
        ));
    }
    let (_, status) = Router::discover(&args.connection).await?;
    let queues = super::subscribed_queues(&status, &args.topic, &args.group, args.queue)?;
    let (mut receiver, server) = receiver(&args.connection, &args.topic, &args.group)?;
    receiver.set_ack_timeout(Duration::from_millis(args.ack_timeout_ms));
    let started = Instant::now();
    let wait = Duration::from_millis(u64::from(args.wait_ms));
    let mut left = args.max;
    loop {
        for &queue in &queues {
            // One queue: its own long poll; several: passes without waiting.
            let poll = if queues.len() == 1 {
                wait
            } else {
                Duration::ZERO
            };
            let got = (receiver.receive(queue, left, poll).await)
                .map_err(|error| store_error(&server, error))?;
            for message in &got {
                print_received(message, args.json)?;
            }
            left = left.saturating_sub(got.len() as u32);
            if left == 0 {
                return Ok(());
            }
        }
        if left < args.max || queues.len() == 1 || started.elapsed() >= wait {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(PASS_PAUSE_MS)).await;
    }
}

fn print_received(message: &Received, json: bool) -> Result<(), ClientError> {
    let line = if json {
        let mut object = serde_json::Map::new();
        object.insert("queue".into(), json!(message.queue));
        object.insert("offset".into(), json!(message.offset));
        object.insert("time_ms".into(), json!(message.time_ms));
        object.insert("delivery_count".into(), json!(message.delivery_count));
        object.insert("deadline_ms".into(), json!(message.deadline_ms));
        insert_bytes(&mut object, "key", &message.key);
        insert_bytes(&mut object, "value", &message.value);
        serde_json::Value::Object(object).to_string()
    } else {
        format!(
            "queue {} offset {} delivery {}: {}",
            message.queue,
            message.offset,
            message.delivery_count,
            String::from_utf8_lossy(&message.value)
        )
    };
    print_line(format_args!("{line}")).map_err(ClientError::Output)
}

/// `phxq ack`.
pub fn ack(args: &AckArgs) -> CommandResult {
    let runtime = client_runtime()?;
    if args.delay_ms != 0 {
        return Err(
            ClientError::Usage("--delay-ms is for nack; an ack has no delay".into()).into(),
        );
    }
    runtime.block_on(async {
        let (receiver, server) = receiver(&args.connection, &args.topic, &args.group)?;
        let cursor = (receiver.ack(args.queue, &args.offsets).await)
            .map_err(|error| store_error(&server, error))?;
        let line = match args.json {
            true => json!({"queue": args.queue, "cursor": cursor}).to_string(),
            false => format!("queue {}: acked, cursor {cursor}", args.queue),
        };
        print_line(format_args!("{line}")).map_err(ClientError::Output)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `phxq nack`.
pub fn nack(args: &AckArgs) -> CommandResult {
    let runtime = client_runtime()?;
    runtime.block_on(async {
        let (receiver, server) = receiver(&args.connection, &args.topic, &args.group)?;
        let delay = Duration::from_millis(args.delay_ms);
        (receiver.nack(args.queue, &args.offsets, delay).await)
            .map_err(|error| store_error(&server, error))?;
        let line = match args.json {
            true => json!({"queue": args.queue, "nacked": args.offsets.len()}).to_string(),
            false => format!(
                "queue {}: {} nacked, delivered again after {} ms",
                args.queue,
                args.offsets.len(),
                args.delay_ms
            ),
        };
        print_line(format_args!("{line}")).map_err(ClientError::Output)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A receiver through `--server` with `--timeout-ms` as each call's deadline.
fn receiver(
    connection: &Connection,
    topic: &str,
    group: &str,
) -> Result<(Receiver, String), ClientError> {
    let server = parse_server(&connection.server)?;
    let mut config = ProducerConfig::new([server.clone()]);
    config.deadline = Duration::from_millis(connection.timeout_ms);
    config.token = connection.token()?;
    config.ca = connection.store_ca()?;
    let receiver = Receiver::new(config, topic, group)
        .map_err(|error| ClientError::Usage(error.to_string()))?;
    Ok((receiver, server))
}

/// The command's error for the library's.
fn store_error(server: &str, error: ProduceError) -> ClientError {
    match error.code() {
        Some(code) if error.kind() == ErrorKind::Refused => super::refused(code, error.message()),
        _ => ClientError::Unreachable {
            addr: server.to_string(),
            detail: error.to_string(),
        },
    }
}
