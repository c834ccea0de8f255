//! `phxq produce` on the producer library ([`phxq_client::Producer`]): one store
//! (`--server`) or several (`--store NAME=HOST:PORT[,HOST:PORT]...[@WEIGHT]`, repeated), a
//! key's store by weighted rendezvous hashing and its queue there (`phxq_client::key`),
//! masters followed and retries as the library does them, until `--timeout-ms`.
//!
//! Standard input is read line by line; lines already waiting are sent together (one
//! `send_messages` call: one `Produce`/`ProduceMany` per (store, replication group)), so a
//! fast pipe makes large batches and a slow one sends each line as it comes. The first
//! failed line stops the run: the summary says what was acknowledged, and the lines after
//! the failed batch are not sent.
//!
//! Message ids: `--message-id ID` names the one line of input; `--id-prefix P` gives line
//! `i` (from 1) the id `P-<i>`, so running the same input again (after a crash or a timeout)
//! stores nothing twice while the ids are in their queues' dedup windows: the store answers
//! those lines as duplicates, which are reported (with where the original is) and not
//! counted as acknowledged. With store-change retry a moved line meets a store that never saw
//! its id: idempotence holds per store only.
//!
//! `--queue N` (a queue of one store, bypassing the key) is served by the older path in
//! `client.rs`, which this module does not replace.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phxq_client::{Outgoing, Producer, ProducerConfig, StoreConfig, Stored};
use phxq_types::{ErrorCode, MESSAGE_ID_BYTES_MAX};

use super::{
    ClientError, Line, PRODUCE_BATCH_BYTES_MAX, PRODUCE_BATCH_LINES_MAX, ProduceArgs,
    check_message_id, check_name, client_runtime, parse_server, read_lines, refused,
};
use crate::CommandResult;

/// Longest `--id-prefix`: the prefix, a `-` and a line number of up to 20 digits fit in a
/// message id ([`MESSAGE_ID_BYTES_MAX`] bytes).
pub const ID_PREFIX_BYTES_MAX: usize = MESSAGE_ID_BYTES_MAX - 1 - 20;
/// Duplicates reported one by one at most; beyond, a count.
const DUPLICATES_REPORTED_MAX: usize = 20;

/// Parses `--store NAME=HOST:PORT[,HOST:PORT]...[@WEIGHT]` (weight 1 if omitted). Only the
/// shape is checked here; names, addresses, weights and duplicates are checked with the
/// whole config (`ProducerConfig::validate`).
pub fn parse_store(text: &str) -> Result<StoreConfig, String> {
    let bad =
        |why: &str| format!("{text:?}: {why}; expected NAME=HOST:PORT[,HOST:PORT]...[@WEIGHT]");
    let (name, rest) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
    let (servers, weight) = match rest.rsplit_once('@') {
        Some((servers, weight)) => {
            let weight = weight
                .parse::<u32>()
                .map_err(|_| bad("the weight is not a whole number"))?;
            (servers, weight)
        }
        None => (rest, 1),
    };
    if servers.is_empty() {
        return Err(bad("no server"));
    }
    Ok(StoreConfig::new(name, servers.split(','), weight))
}

/// How a produce run went.
#[derive(Default)]
struct Tally {
    acknowledged: u64,
    /// Acknowledged messages per (store, queue).
    queues: BTreeMap<(Arc<str>, u32), u64>,
    /// Lines the store answered as duplicates: (line number, id, where the original is).
    duplicates: Vec<(u64, String, Stored)>,
}

/// `phxq produce` without `--queue`.
pub fn produce(args: &ProduceArgs) -> CommandResult {
    let runtime = client_runtime()?;
    let started = Instant::now();
    let mut tally = Tally::default();
    let several = args.store.len() > 1;
    let outcome = runtime.block_on(produce_all(args, &mut tally));
    let place = |store: &str, queue: u32| {
        if several {
            format!("{store}/q{queue}")
        } else {
            format!("q{queue}")
        }
    };
    let queues: Vec<String> = tally
        .queues
        .iter()
        .map(|((store, queue), n)| format!("{}: {n}", place(store, *queue)))
        .collect();
    let mut summary = format!(
        "{} message(s) acknowledged in {:.2} s ({})",
        tally.acknowledged,
        started.elapsed().as_secs_f64(),
        if queues.is_empty() {
            "none".to_string()
        } else {
            queues.join(", ")
        }
    );
    for (line, id, stored) in tally.duplicates.iter().take(DUPLICATES_REPORTED_MAX) {
        eprintln!(
            "phxq produce: line {line} (message id {id:?}) is a duplicate of an earlier produce \
             with this message id, stored at {} offset {}: not stored again",
            place(&stored.store, stored.queue),
            stored.offset
        );
    }
    let duplicates = tally.duplicates.len();
    if duplicates > DUPLICATES_REPORTED_MAX {
        eprintln!(
            "phxq produce: and {} more duplicate(s)",
            duplicates - DUPLICATES_REPORTED_MAX
        );
    }
    if duplicates > 0 {
        summary += &format!("; {duplicates} duplicate(s) not stored again");
    }
    match outcome {
        Ok(uncertain) => {
            eprintln!("phxq produce: {summary}");
            if uncertain > 0 {
                eprintln!(
                    "phxq produce: {uncertain} attempt(s) ended with an uncertain outcome and \
                     were retried; some messages may be stored twice (at-least-once)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("phxq produce: {summary}; then failed, and the lines after were not sent");
            Err(error)
        }
    }
}

/// The producer config of the command line.
fn producer_config(args: &ProduceArgs) -> Result<ProducerConfig, ClientError> {
    let mut config = if args.store.is_empty() {
        ProducerConfig::new([parse_server(&args.connection.server)?])
    } else {
        ProducerConfig::with_stores(args.store.iter().cloned())
    };
    config.deadline = Duration::from_millis(args.connection.timeout_ms);
    config.token = args.connection.token()?;
    config.ca = args.connection.store_ca()?;
    config.store_change_retry = args.store_change_retry;
    config.validate().map_err(|error| {
        let flag = match error.field.as_str() {
            "deadline" => "--timeout-ms".to_string(),
            "store_change_retry" => "--store-change-retry".to_string(),
            field if field.starts_with("stores[") => "--store".to_string(),
            _ => "--server".to_string(),
        };
        ClientError::Usage(format!("{flag}: {error}"))
    })?;
    Ok(config)
}

/// Checks the command line, then sends every line; returns the number of uncertain attempts.
async fn produce_all(
    args: &ProduceArgs,
    tally: &mut Tally,
) -> Result<u64, Box<dyn std::error::Error>> {
    check_name("topic", &args.topic)?;
    if args.message_id.is_some() && args.id_prefix.is_some() {
        return Err(ClientError::Usage(
            "--message-id and --id-prefix both name message ids: give one".to_string(),
        )
        .into());
    }
    check_message_id(args.message_id.as_deref())?;
    if let Some(prefix) = &args.id_prefix
        && !(1..=ID_PREFIX_BYTES_MAX).contains(&prefix.len())
    {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "--id-prefix of {} bytes; 1 to {ID_PREFIX_BYTES_MAX} (with \"-\" and the line \
                 number it makes a message id of at most {MESSAGE_ID_BYTES_MAX} bytes)",
                prefix.len()
            ),
        )
        .into());
    }
    let producer = Producer::new(producer_config(args)?)?;
    let key = args.key.clone().unwrap_or_default().into_bytes();
    let mut lines = read_lines();
    let mut number = 0u64;
    while let Some(first) = lines.recv().await {
        let batch = gather(first, &mut lines, args.message_id.is_some())?;
        if args.message_id.is_some() && lines.recv().await.is_some() {
            return Err(ClientError::Usage(
                "--message-id names one message: standard input must hold one line; nothing \
                 was produced"
                    .to_string(),
            )
            .into());
        }
        let mut ids = Vec::with_capacity(batch.len());
        let outgoing: Vec<Outgoing> = batch
            .into_iter()
            .map(|value| {
                number += 1;
                let message = Outgoing::new(key.clone(), value);
                let id = match (&args.message_id, &args.id_prefix) {
                    (Some(id), _) => Some(id.clone()),
                    (None, Some(prefix)) => Some(format!("{prefix}-{number}")),
                    (None, None) => None,
                };
                ids.push((number, id.clone()));
                match id {
                    Some(id) => message.with_id(id),
                    None => message,
                }
            })
            .collect();
        let results = producer.send_messages(&args.topic, outgoing).await;
        let mut failure = None;
        for ((line, id), result) in ids.into_iter().zip(results) {
            match result {
                Ok(stored) if stored.duplicate => {
                    tally
                        .duplicates
                        .push((line, id.unwrap_or_default(), stored));
                }
                Ok(stored) => {
                    tally.acknowledged += 1;
                    *tally
                        .queues
                        .entry((stored.store, stored.queue))
                        .or_default() += 1;
                }
                Err(error) => failure = failure.or(Some(error)),
            }
        }
        if let Some(error) = failure {
            return Err(error.into());
        }
    }
    if number == 0 {
        return Err(refused(
            ErrorCode::EmptyBatch,
            "standard input had no lines; nothing was produced",
        )
        .into());
    }
    Ok(producer.stats().uncertain_attempts)
}

/// `first` and the lines already waiting, up to the batch limits (just `first` if `alone`).
fn gather(
    first: Line,
    lines: &mut tokio::sync::mpsc::Receiver<Line>,
    alone: bool,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(line) = next.take() {
        let value = match line {
            Line::Text(value) => value,
            Line::Failed(reason) => return Err(ClientError::Usage(reason)),
        };
        bytes += value.len();
        batch.push(value);
        if !alone && batch.len() < PRODUCE_BATCH_LINES_MAX && bytes < PRODUCE_BATCH_BYTES_MAX {
            next = lines.try_recv().ok();
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_name_servers_and_an_optional_weight() {
        let store = parse_store("eu-1=10.0.0.1:7100,10.0.0.2:7100@3").unwrap();
        assert_eq!(store.name, "eu-1");
        assert_eq!(store.servers, ["10.0.0.1:7100", "10.0.0.2:7100"]);
        assert_eq!(store.weight, 3);
        let store = parse_store("b=[::1]:7100").unwrap();
        assert_eq!((store.servers.len(), store.weight), (1, 1));
        for bad in ["nameless", "a=", "a=h:1@", "a=h:1@x", "a=h:1@-1", "a=@2"] {
            assert!(parse_store(bad).is_err(), "{bad}");
        }
        // The shape is fine; the config refuses the values.
        assert_eq!(parse_store("a=h:1@0").unwrap().weight, 0);
    }
}
