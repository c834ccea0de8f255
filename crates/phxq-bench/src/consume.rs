//! End-to-end latency, from enqueue to handler: the measuring behind `phxq bench consume`.
//!
//! * **Producers** (tasks, like [`crate::store`]'s) send one message per `Produce` call at a
//!   fixed total rate (`qps` messages/s shared by `producers`, paced as `bench produce` paces
//!   them), producer `i` on queue `i mod queues`, each waiting for its acknowledgement, with
//!   retries. Every value starts with a [`HEADER_BYTES`]-byte header: this run's nonce, the
//!   producer, its sequence number, and the send time as nanoseconds since the run's origin
//!   (one [`Instant`] of this process; producers and consumers share it, so latency never
//!   depends on the wall clock).
//! * **Consumers**: one pull loop per queue of the topic, for consumer group `group`: a long
//!   poll (`Consume` with `wait_ms` [`POLL_WAIT_MS`]) from the loop's own next offset, then
//!   the group's cursor is committed past the batch. Commits go through one committer task per
//!   queue holding at most one `Commit` in flight and always committing the newest cursor, so
//!   a commit's round trip does not delay the next poll. Calls go to the queue's master and
//!   follow `NOT_MASTER` exactly as the producers' do ([`crate::store`]'s routing).
//! * **Old messages are skipped**: before any producer starts, every queue's end offset is
//!   read and the group's cursor committed there (a seek to the end); consumers start at that
//!   offset, so what the queues held before cannot pollute the figures.
//! * **What is measured**: a message's end-to-end latency is its first delivery's handling
//!   time minus its send time; its produce-ack latency is the `Produce` call's, retries
//!   included. Latencies count messages sent after the warmup; the counts (produced,
//!   acknowledged, consumed, duplicates, missing) cover the whole run.
//! * **Bounded**: producing stops after the warmup and the measured time; then consumers
//!   drain until every acknowledged message was consumed or `drain` passed, whichever is
//!   first. A message acknowledged and not consumed by then is **missing**. Every loop is
//!   bounded in time by the run's deadline and in count ([`Options::validate`] bounds the
//!   messages, each poll returns at least one or waits).
//! * **Reports** are [`crate::store::Report`]s, PhxQueue's format: one for end-to-end latency
//!   (each first delivery counts as an `OK` "call") and one for produce-ack latency, plus the
//!   [`Counts`], every `report_every` and at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phxq_proto::api;
use serde::Serialize;

use crate::store::{
    self, ATTEMPT_TIMEOUT_MS, Answer, BACKOFF_MAX_MS, CallPolicy, Connections, Counters, Error,
    LABEL_OK, MESSAGE_BYTES_MAX, PRODUCERS_MAX, REPORT_EVERY_MS_MIN, RUN_SECONDS_MAX, Report,
    Result, Routes, Stats,
};

/// Highest target rate, in messages/s (far above what one machine's store acknowledges).
pub const QPS_MAX: u64 = 1_000_000;
/// Most messages one run may send (target rate × warmup and measured time): each is
/// tracked with one byte until the end.
pub const MESSAGES_MAX: u64 = 50_000_000;
/// Bytes of the header at the start of every value: nonce (8), producer (4), sequence
/// number (8), send time in nanoseconds since the run's origin (8), little-endian.
pub const HEADER_BYTES: usize = 28;
/// Longest drain after producing stops, in milliseconds.
pub const DRAIN_MS_MAX: u64 = 60_000;
/// How long a consumer's poll waits for a message (the long poll), in milliseconds.
pub const POLL_WAIT_MS: u32 = 500;
/// Most messages one poll returns.
pub const POLL_MESSAGES_MAX: u32 = 1_000;
/// About the most bytes one poll returns.
pub const POLL_BYTES_MAX: u32 = 4 << 20;
/// How often the drain checks whether every acknowledged message was consumed, in ms.
const DRAIN_POLL_MS: u64 = 20;
/// Deliveries of one message counted at most (the tracking byte's upper bits).
const DELIVERIES_MAX: u8 = 63;
/// Tracking byte: the message's `Produce` call was acknowledged.
const ACKED: u8 = 1;
/// Tracking byte: one delivery (the count is in the upper six bits).
const DELIVERY: u8 = 4;
/// Labels of the end-to-end report's timing.
const WHAT_INTERVAL_E2E: &str = "interval end-to-end";
const WHAT_INTERVAL_ACK: &str = "interval produce-ack";
const WHAT_TOTAL_E2E: &str = "total end-to-end";
const WHAT_TOTAL_ACK: &str = "total produce-ack";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Any node of the store (HOST:PORT of its client API).
    pub server: String,
    /// The topic written and read; it must exist.
    pub topic: String,
    /// The consumer group reading; it must be subscribed to the topic. Its cursors are moved
    /// to the end of every queue first, then along with the consumers.
    pub group: String,
    /// Concurrent producers, each waiting for its own acknowledgement.
    pub producers: usize,
    /// Bytes of each message value, header included.
    pub message_bytes: usize,
    /// Target messages/s over all producers (a latency figure needs a known load: there is
    /// no "unlimited").
    pub qps: u64,
    /// Time before measuring starts (connections, masters learnt).
    pub warmup: Duration,
    /// Measured time of producing.
    pub duration: Duration,
    /// Longest wait, after producing stops, for the acknowledged messages to be consumed.
    pub drain: Duration,
    /// How often [`run`] hands out a report of the interval just ended.
    pub report_every: Duration,
    /// A call's deadline, retries included (producers, commits, a poll's retries).
    pub call_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            server: "127.0.0.1:7100".to_string(),
            topic: "test".to_string(),
            group: "g1".to_string(),
            producers: 8,
            message_bytes: 1024,
            qps: 1_000,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            drain: Duration::from_secs(5),
            report_every: Duration::from_secs(10),
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// Checks every limit; an error names the offending option.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidOptions(reason));
        if self.producers == 0 || self.producers > PRODUCERS_MAX {
            return invalid(format!(
                "producers {} is not in 1..={PRODUCERS_MAX}",
                self.producers
            ));
        }
        if !(HEADER_BYTES..=MESSAGE_BYTES_MAX).contains(&self.message_bytes) {
            return invalid(format!(
                "message bytes {} is not in {HEADER_BYTES}..={MESSAGE_BYTES_MAX} (every value \
                 carries a {HEADER_BYTES}-byte header)",
                self.message_bytes
            ));
        }
        if self.qps == 0 || self.qps > QPS_MAX {
            return invalid(format!(
                "qps {} is not in 1..={QPS_MAX} (latency is measured at a given rate)",
                self.qps
            ));
        }
        let run = self.warmup + self.duration;
        if self.duration.is_zero() || run.as_secs() >= RUN_SECONDS_MAX {
            return invalid(format!(
                "seconds {:?} must be above zero and, with the warmup, under {RUN_SECONDS_MAX} s",
                self.duration
            ));
        }
        if (self.qps as f64 * run.as_secs_f64()) > MESSAGES_MAX as f64 {
            return invalid(format!(
                "{} messages/s for {run:?} is over {MESSAGES_MAX} messages",
                self.qps
            ));
        }
        if self.drain.is_zero() || self.drain > Duration::from_millis(DRAIN_MS_MAX) {
            return invalid(format!(
                "drain {:?} is not above zero and at most {DRAIN_MS_MAX} ms",
                self.drain
            ));
        }
        if self.report_every < Duration::from_millis(REPORT_EVERY_MS_MIN) {
            return invalid(format!(
                "reports every {:?}: at least {REPORT_EVERY_MS_MIN} ms",
                self.report_every
            ));
        }
        if self.call_timeout.is_zero() || self.call_timeout.as_secs() >= RUN_SECONDS_MAX {
            return invalid(format!("call timeout {:?}", self.call_timeout));
        }
        if self.topic.is_empty() || self.group.is_empty() || self.server.is_empty() {
            return invalid("server, topic and group must be given".to_string());
        }
        Ok(())
    }

    /// Messages one producer sends at most: its share of the rate over the whole run, plus
    /// the first tick (sent at once).
    fn messages_per_producer_max(&self) -> u64 {
        let run = (self.warmup + self.duration).as_secs_f64();
        (self.qps as f64 * run / self.producers as f64).ceil() as u64 + 1
    }

    fn call_policy(&self) -> CallPolicy {
        CallPolicy {
            retries: true,
            timeout: self.call_timeout,
            attempt_timeout: Duration::from_millis(ATTEMPT_TIMEOUT_MS),
        }
    }

    /// A poll's policy: its attempt may wait the long poll and then as long as any call.
    fn poll_policy(&self) -> CallPolicy {
        let wait = Duration::from_millis(u64::from(POLL_WAIT_MS));
        CallPolicy {
            retries: true,
            timeout: self.call_timeout + wait,
            attempt_timeout: Duration::from_millis(ATTEMPT_TIMEOUT_MS) + wait,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The message header

/// What a value's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    nonce: u64,
    producer: u32,
    sequence: u64,
    /// Nanoseconds since the run's origin when the message was sent.
    sent_ns: u64,
}

impl Header {
    /// A value of `bytes` bytes (at least [`HEADER_BYTES`]): the header, then the filler
    /// `bench produce` sends.
    fn value(&self, bytes: usize) -> Vec<u8> {
        assert!(bytes >= HEADER_BYTES, "validated: values hold the header");
        let mut value = Vec::with_capacity(bytes);
        value.extend_from_slice(&self.nonce.to_le_bytes());
        value.extend_from_slice(&self.producer.to_le_bytes());
        value.extend_from_slice(&self.sequence.to_le_bytes());
        value.extend_from_slice(&self.sent_ns.to_le_bytes());
        value.extend_from_slice(&store::payload(bytes - HEADER_BYTES));
        debug_assert_eq!(value.len(), bytes);
        value
    }

    /// The header of `value`; `None` when it is too short to hold one.
    fn parse(value: &[u8]) -> Option<Header> {
        let u64_at = |at: usize| Some(u64::from_le_bytes(value.get(at..at + 8)?.try_into().ok()?));
        let producer = u32::from_le_bytes(value.get(8..12)?.try_into().ok()?);
        Some(Header {
            nonce: u64_at(0)?,
            producer,
            sequence: u64_at(12)?,
            sent_ns: u64_at(20)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tracking every message

/// What happened to the messages of a run, so far or in the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Messages sent (a `Produce` call started).
    pub produced: u64,
    /// Messages whose call was acknowledged.
    pub acknowledged: u64,
    /// Messages whose call failed in the end (after retries; it may still have been stored).
    pub failed: u64,
    /// Messages of this run consumed at least once.
    pub consumed: u64,
    /// Deliveries of a message already consumed (a retried produce stored twice, or a
    /// message read again).
    pub duplicates: u64,
    /// Acknowledged messages not consumed (yet: in an interval report, those still on their
    /// way; in the final report, after the drain, lost ones).
    pub missing: u64,
    /// Messages consumed whose call was not acknowledged (failed or abandoned at the end: a
    /// write whose outcome was unknown and that was stored after all).
    pub consumed_unacknowledged: u64,
    /// Messages read that this run did not send (another writer on the topic); not timed.
    pub foreign: u64,
    /// Polls whose final answer was an error, by label.
    pub poll_errors: BTreeMap<String, u64>,
    /// Cursor commits whose final answer was an error, by label.
    pub commit_errors: BTreeMap<String, u64>,
}

impl Counts {
    /// One line: the counts, then any errors.
    pub fn render(&self) -> String {
        let mut out = format!(
            "  messages: produced {} acknowledged {} failed {} consumed {} missing {} \
             duplicates {} consumed-unacknowledged {} foreign {}\n",
            self.produced,
            self.acknowledged,
            self.failed,
            self.consumed,
            self.missing,
            self.duplicates,
            self.consumed_unacknowledged,
            self.foreign
        );
        for (what, errors) in [
            ("polls", &self.poll_errors),
            ("commits", &self.commit_errors),
        ] {
            if !errors.is_empty() {
                let list: Vec<String> = errors.iter().map(|(l, n)| format!("{l} {n}")).collect();
                out += &format!("  failed {what}: {}\n", list.join(", "));
            }
        }
        out
    }
}

/// One interval's (or the whole run's) figures.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumeReport {
    /// End-to-end latency: send to first delivery, per message (each is an `OK` "call";
    /// `messages_acked` counts messages consumed).
    pub end_to_end: Report,
    /// The `Produce` calls: acknowledgement latency and return codes.
    pub produce_ack: Report,
    /// Messages so far (interval) or in the end.
    pub counts: Counts,
    /// After producing stopped: how long until every acknowledged message was consumed, in
    /// milliseconds (`None` in interval reports, or when the drain ran out).
    pub drained_ms: Option<f64>,
}

impl ConsumeReport {
    /// PhxQueue's report for each latency, then the counts.
    pub fn render(&self) -> String {
        let mut out = self.end_to_end.render();
        out += &self.produce_ack.render();
        out += &self.counts.render();
        if let Some(drained) = self.drained_ms {
            out += &format!("  drained in {drained:.0} ms after producing stopped\n");
        }
        out
    }
}

/// Per producer, one byte per message sent: [`ACKED`] and a delivery count.
struct Tracker {
    nonce: u64,
    origin: Instant,
    messages: Vec<Mutex<Vec<u8>>>,
    produced: AtomicU64,
    acknowledged: AtomicU64,
    failed: AtomicU64,
    consumed: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
    /// Messages both acknowledged and consumed (each counted once, by whichever came last).
    acknowledged_and_consumed: AtomicU64,
}

/// The latency figures, behind one lock.
struct Recorder {
    /// Nanoseconds since the origin when measuring started; `None` during the warmup.
    measure_from_ns: Option<u64>,
    measure_from: Instant,
    e2e_interval: Stats,
    e2e_total: Stats,
    ack_interval: Stats,
    ack_total: Stats,
    interval_from: Instant,
    interval_counters: Counters,
    total_counters: Counters,
    poll_errors: BTreeMap<&'static str, u64>,
    commit_errors: BTreeMap<&'static str, u64>,
}

struct Shared {
    tracker: Tracker,
    recorder: Mutex<Recorder>,
    message_bytes: usize,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.tracker.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn recorder(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.recorder.lock().expect("recorder lock")
    }

    /// Registers message `sequence` of `producer` as sent (before it is: a delivery always
    /// finds its message).
    fn sent(&self, producer: usize, sequence: u64) {
        let mut messages = self.tracker.messages[producer]
            .lock()
            .expect("tracker lock");
        assert_eq!(messages.len() as u64, sequence, "sequences are dense");
        messages.push(0);
        self.tracker.produced.fetch_add(1, Ordering::Relaxed);
    }

    /// The final answer to message `sequence` of `producer`, sent at `sent_ns`.
    fn answered(&self, producer: usize, sequence: u64, sent_ns: u64, answer: &Answer) {
        let latency = Duration::from_nanos(self.now_ns().saturating_sub(sent_ns));
        let t = &self.tracker;
        if answer.ok() {
            let mut messages = t.messages[producer].lock().expect("tracker lock");
            let state = &mut messages[sequence as usize];
            *state |= ACKED;
            t.acknowledged.fetch_add(1, Ordering::Relaxed);
            if *state >= DELIVERY {
                t.acknowledged_and_consumed.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            t.failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut recorder = self.recorder();
        if recorder.measure_from_ns.is_some_and(|from| sent_ns >= from) {
            recorder.ack_interval.add(answer, latency, 1);
            recorder.ack_total.add(answer, latency, 1);
        }
    }

    /// A message read at `received_ns`: the first delivery is timed, a later one counted as
    /// a duplicate, one this run did not send as foreign.
    fn delivered(&self, value: &[u8], received_ns: u64) {
        let t = &self.tracker;
        let Some(header) = Header::parse(value).filter(|h| h.nonce == t.nonce) else {
            t.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let first = {
            let Some(producer) = t.messages.get(header.producer as usize) else {
                t.foreign.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut messages = producer.lock().expect("tracker lock");
            let Some(state) = messages.get_mut(header.sequence as usize) else {
                t.foreign.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let deliveries = *state / DELIVERY;
            if deliveries < DELIVERIES_MAX {
                *state += DELIVERY;
            }
            if deliveries == 0 && *state & ACKED != 0 {
                t.acknowledged_and_consumed.fetch_add(1, Ordering::Relaxed);
            }
            deliveries == 0
        };
        if !first {
            t.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        t.consumed.fetch_add(1, Ordering::Relaxed);
        let latency = Duration::from_nanos(received_ns.saturating_sub(header.sent_ns));
        let mut recorder = self.recorder();
        if recorder
            .measure_from_ns
            .is_some_and(|from| header.sent_ns >= from)
        {
            recorder.e2e_interval.add_outcome(LABEL_OK, &[], latency, 1);
            recorder.e2e_total.add_outcome(LABEL_OK, &[], latency, 1);
        }
    }

    fn poll_failed(&self, label: &'static str) {
        *self.recorder().poll_errors.entry(label).or_default() += 1;
    }

    fn commit_failed(&self, label: &'static str) {
        *self.recorder().commit_errors.entry(label).or_default() += 1;
    }

    /// Acknowledged messages not consumed yet.
    fn missing(&self) -> u64 {
        let t = &self.tracker;
        // Read the pair's smaller side first: both only grow.
        let both = t.acknowledged_and_consumed.load(Ordering::SeqCst);
        t.acknowledged.load(Ordering::SeqCst).saturating_sub(both)
    }

    fn counts(&self, recorder: &Recorder) -> Counts {
        let t = &self.tracker;
        let both = t.acknowledged_and_consumed.load(Ordering::SeqCst);
        let labelled = |errors: &BTreeMap<&'static str, u64>| {
            errors.iter().map(|(l, n)| (l.to_string(), *n)).collect()
        };
        let consumed = t.consumed.load(Ordering::SeqCst);
        Counts {
            produced: t.produced.load(Ordering::SeqCst),
            acknowledged: t.acknowledged.load(Ordering::SeqCst),
            failed: t.failed.load(Ordering::SeqCst),
            consumed,
            duplicates: t.duplicates.load(Ordering::SeqCst),
            missing: t.acknowledged.load(Ordering::SeqCst).saturating_sub(both),
            consumed_unacknowledged: consumed.saturating_sub(both),
            foreign: t.foreign.load(Ordering::SeqCst),
            poll_errors: labelled(&recorder.poll_errors),
            commit_errors: labelled(&recorder.commit_errors),
        }
    }

    fn begin_measuring(&self) {
        let now = Instant::now();
        let now_ns = self.now_ns();
        let counters = Counters::now(&[]);
        let mut recorder = self.recorder();
        recorder.measure_from_ns = Some(now_ns);
        recorder.measure_from = now;
        recorder.e2e_interval = Stats::new();
        recorder.e2e_total = Stats::new();
        recorder.ack_interval = Stats::new();
        recorder.ack_total = Stats::new();
        recorder.interval_from = now;
        recorder.interval_counters = counters.clone();
        recorder.total_counters = counters;
    }

    /// The report of the interval just ended, and a new interval.
    fn take_interval(&self) -> ConsumeReport {
        let now = Instant::now();
        let counters = Counters::now(&[]);
        let mut recorder = self.recorder();
        let e2e = std::mem::replace(&mut recorder.e2e_interval, Stats::new());
        let ack = std::mem::replace(&mut recorder.ack_interval, Stats::new());
        let elapsed = now - std::mem::replace(&mut recorder.interval_from, now);
        let usage = counters.usage_since(&recorder.interval_counters);
        recorder.interval_counters = counters;
        let mut end_to_end =
            Report::of(WHAT_INTERVAL_E2E, &e2e, elapsed, self.message_bytes, usage);
        end_to_end.messages_are = "consumed msgs";
        ConsumeReport {
            end_to_end,
            produce_ack: Report::of(WHAT_INTERVAL_ACK, &ack, elapsed, self.message_bytes, usage),
            counts: self.counts(&recorder),
            drained_ms: None,
        }
    }

    /// The report of the whole measured time, `measured_until` being when producing stopped.
    fn total(&self, measured_until: Instant, drained_ms: Option<f64>) -> ConsumeReport {
        let counters = Counters::now(&[]);
        let recorder = self.recorder();
        let elapsed = measured_until.saturating_duration_since(recorder.measure_from);
        let usage = counters.usage_since(&recorder.total_counters);
        let e2e = &recorder.e2e_total;
        let mut end_to_end = Report::of(WHAT_TOTAL_E2E, e2e, elapsed, self.message_bytes, usage);
        end_to_end.messages_are = "consumed msgs";
        let ack = &recorder.ack_total;
        ConsumeReport {
            end_to_end,
            produce_ack: Report::of(WHAT_TOTAL_ACK, ack, elapsed, self.message_bytes, usage),
            counts: self.counts(&recorder),
            drained_ms,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// The whole run's result.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// Queues of the topic, one consumer each.
    pub queues: u32,
    /// Where each queue's consumer started (the queue's end before any producer started).
    pub start_offsets: Vec<u64>,
    /// The figures of the measured time, the counts of the whole run.
    pub report: ConsumeReport,
}

/// Runs `options` to the end: skips what the queues hold, starts the consumers, produces
/// through the warmup and the measured time (handing `on_interval` a report every
/// `report_every`), drains, and returns the whole run's figures.
pub async fn run(
    options: &Options,
    mut on_interval: impl FnMut(&ConsumeReport),
) -> Result<Outcome> {
    options.validate()?;
    let (topology, status) = store::discover(&options.server, &options.topic).await?;
    check_subscribed(options, &status)?;
    let routes = Arc::new(Routes::new(&topology, &status));
    let options = Arc::new(options.clone());
    let shared = Arc::new(new_shared(&options));
    let context = |queue: u32| QueueContext {
        store_id: topology.store_id,
        queue,
        group: u64::from(queue % topology.groups),
        routes: routes.clone(),
        shared: shared.clone(),
        options: options.clone(),
    };
    let start_offsets = seek_to_end((0..topology.queues).map(context), &options.server).await?;
    // Producing ends; then the producers' last calls end (or are abandoned), the drain, and
    // the consumers' last polls and commits: every loop and wait below ends by `deadline`.
    let producing_until = Instant::now() + options.warmup + options.duration;
    let last_calls = options.call_timeout + Duration::from_millis(ATTEMPT_TIMEOUT_MS);
    let deadline = producing_until
        + last_calls
        + options.drain
        + options.poll_policy().timeout
        + options.call_timeout;

    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut consumers = tokio::task::JoinSet::new();
    for (queue, &start) in (0..topology.queues).zip(&start_offsets) {
        let (cursor, committed) = tokio::sync::watch::channel(start);
        consumers.spawn(committer(context(queue), committed));
        let stop = stop_consumers.clone();
        consumers.spawn(consumer(context(queue), start, cursor, stop, deadline));
    }

    let stop_producers = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..options.producers)
        .map(|index| {
            let queue = (index as u64 % u64::from(topology.queues)) as u32;
            let stop = stop_producers.clone();
            tokio::spawn(producer(index, context(queue), producing_until, stop))
        })
        .collect();

    tokio::time::sleep(options.warmup).await;
    shared.begin_measuring();
    let intervals_max = options.duration.as_millis() / options.report_every.as_millis() + 1;
    for _ in 0..intervals_max {
        let next = (Instant::now() + options.report_every).min(producing_until);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= producing_until {
            break;
        }
        on_interval(&shared.take_interval());
    }
    stop_producers.store(true, Ordering::SeqCst);
    let measured_until = Instant::now();
    let joined_by = measured_until + last_calls;
    for producer in producers {
        // A producer stuck past its call's deadline is abandoned (its message counts as
        // produced, not acknowledged).
        let abort = producer.abort_handle();
        if tokio::time::timeout_at(joined_by.into(), producer)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    let drained_ms = drain(&shared, measured_until, options.drain).await;
    stop_consumers.store(true, Ordering::SeqCst);
    let limit = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(limit, async {
        while consumers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        consumers.abort_all();
    }
    Ok(Outcome {
        queues: topology.queues,
        start_offsets,
        report: shared.total(measured_until, drained_ms),
    })
}

fn new_shared(options: &Options) -> Shared {
    let now = Instant::now();
    Shared {
        tracker: Tracker {
            nonce: nonce(),
            origin: now,
            messages: (0..options.producers)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            produced: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            acknowledged_and_consumed: AtomicU64::new(0),
        },
        recorder: Mutex::new(Recorder {
            measure_from_ns: None,
            measure_from: now,
            e2e_interval: Stats::new(),
            e2e_total: Stats::new(),
            ack_interval: Stats::new(),
            ack_total: Stats::new(),
            interval_from: now,
            interval_counters: Counters::now(&[]),
            total_counters: Counters::now(&[]),
            poll_errors: BTreeMap::new(),
            commit_errors: BTreeMap::new(),
        }),
        message_bytes: options.message_bytes,
    }
}

/// Waits, at most `limit` after `since`, until every acknowledged message was consumed;
/// returns how long after `since` that happened, or `None` if it did not.
async fn drain(shared: &Shared, since: Instant, limit: Duration) -> Option<f64> {
    let until = since + limit;
    loop {
        if shared.missing() == 0 {
            return Some(since.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
}

/// Fails unless `options.group` reads `options.topic`.
fn check_subscribed(options: &Options, status: &api::ClusterStatusResponse) -> Result<()> {
    let topic = status.topics.iter().find(|t| t.name == options.topic);
    if topic.is_some_and(|t| t.consumer_groups.contains(&options.group)) {
        return Ok(());
    }
    let groups = topic.map_or_else(String::new, |t| t.consumer_groups.join(", "));
    Err(Error::Store {
        server: options.server.clone(),
        detail: format!(
            "consumer group {:?} does not read topic {:?} (its groups: {groups})",
            options.group, options.topic
        ),
    })
}

/// A run-unique tag for the values (so that other writers' messages on the topic are told
/// apart): the process id and the wall clock's nanoseconds, mixed.
fn nonce() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let mixed = nanos ^ u64::from(std::process::id()).rotate_left(40);
    // SplitMix64's finaliser: nearby inputs give unrelated outputs.
    let mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// What a task working on one queue needs.
#[derive(Clone)]
struct QueueContext {
    store_id: u64,
    queue: u32,
    group: u64,
    routes: Arc<Routes>,
    shared: Arc<Shared>,
    options: Arc<Options>,
}

impl QueueContext {
    /// One `Consume` call, with retries: the response, or the final answer's label; `None`
    /// when `stop` was raised while waiting to retry.
    async fn consume(
        &self,
        connections: &mut Connections,
        request: &api::ConsumeRequest,
        stop: &AtomicBool,
    ) -> Option<std::result::Result<api::ConsumeResponse, &'static str>> {
        let policy = self.options.poll_policy();
        let attempt = |mut client: api::Client, _: &str| {
            let request = request.clone();
            async move {
                let response = client.consume(request).await?.into_inner();
                let error = response.error.clone();
                Ok((response, error))
            }
        };
        let answer = store::call(
            &self.routes,
            connections,
            self.group,
            &policy,
            stop,
            attempt,
        );
        match answer.await? {
            (_, Some(response)) => Some(Ok(response)),
            (answer, None) => Some(Err(answer.label)),
        }
    }

    /// Commits the group's cursor at `offset`, with retries; the label of a failure.
    async fn commit(
        &self,
        connections: &mut Connections,
        offset: u64,
    ) -> std::result::Result<(), &'static str> {
        let request = api::CommitRequest {
            topic: self.options.topic.clone(),
            queue: self.queue,
            consumer_group: self.options.group.clone(),
            offset,
            store_id: self.store_id,
            seek: false,
        };
        let attempt = |mut client: api::Client, _: &str| {
            let request = request.clone();
            async move {
                let response = client.commit(request).await?.into_inner();
                Ok(((), response.error))
            }
        };
        // A commit is never abandoned half-way for a stop: its deadline bounds it.
        let never = AtomicBool::new(false);
        let policy = self.options.call_policy();
        let answer = store::call(
            &self.routes,
            connections,
            self.group,
            &policy,
            &never,
            attempt,
        );
        match answer.await {
            Some((answer, _)) if answer.ok() => Ok(()),
            Some((answer, _)) => Err(answer.label),
            None => unreachable!("the flag is never raised"),
        }
    }

    /// A poll of at most `max_messages` and `max_bytes` from `from` (`None`: the group's
    /// cursor), waiting up to `wait_ms` for a message.
    fn read_request(
        &self,
        from: Option<u64>,
        max_messages: u32,
        max_bytes: u32,
        wait_ms: u32,
    ) -> api::ConsumeRequest {
        api::ConsumeRequest {
            topic: self.options.topic.clone(),
            queue: self.queue,
            consumer_group: self.options.group.clone(),
            from_offset: from,
            max_messages,
            max_bytes,
            wait_ms,
            store_id: self.store_id,
        }
    }
}

/// Every queue's end offset (in queue order), with the group's cursor committed there, all
/// queues at once; `queues` are the contexts of the topic's queues, in order.
async fn seek_to_end(queues: impl Iterator<Item = QueueContext>, server: &str) -> Result<Vec<u64>> {
    let mut seeks = tokio::task::JoinSet::new();
    for context in queues {
        seeks.spawn(async move {
            let queue = context.queue;
            let mut connections = Connections::new();
            let never = AtomicBool::new(false);
            // The smallest read there is: its answer carries the queue's end.
            let request = context.read_request(None, 1, 1, 0);
            let read = context.consume(&mut connections, &request, &never).await;
            let end = read
                .expect("the flag is never raised")
                .map_err(|label| format!("reading queue {queue}'s end: {label}"))?
                .end_offset;
            context
                .commit(&mut connections, end)
                .await
                .map_err(|label| format!("moving queue {queue}'s cursor to {end}: {label}"))?;
            Ok::<_, String>((queue, end))
        });
    }
    let mut ends = BTreeMap::new();
    while let Some(joined) = seeks.join_next().await {
        let fail = |detail: String| Error::Store {
            server: server.to_string(),
            detail,
        };
        let (queue, end) = joined
            .map_err(|error| fail(error.to_string()))?
            .map_err(fail)?;
        ends.insert(queue, end);
    }
    Ok(ends.into_values().collect())
}

/// One queue's pull loop: polls from `start` until `stop` (or `deadline`), handing every
/// message to the tracker and each new cursor to the queue's committer.
async fn consumer(
    context: QueueContext,
    start: u64,
    cursor: tokio::sync::watch::Sender<u64>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) {
    let shared = &context.shared;
    let mut connections = Connections::new();
    let mut next = start;
    // Each poll returns a message of a bounded run, waits, or fails and pauses: the count
    // bound is never the one reached.
    let left_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    let polls_max = MESSAGES_MAX + left_ms;
    for _ in 0..polls_max {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            break;
        }
        let request =
            context.read_request(Some(next), POLL_MESSAGES_MAX, POLL_BYTES_MAX, POLL_WAIT_MS);
        let Some(read) = context.consume(&mut connections, &request, &stop).await else {
            break;
        };
        match read {
            Ok(read) => {
                for message in &read.messages {
                    shared.delivered(&message.value, shared.now_ns());
                }
                if read.next_offset > next {
                    next = read.next_offset;
                    cursor.send_replace(next);
                }
            }
            Err(label) => {
                shared.poll_failed(label);
                tokio::time::sleep(Duration::from_millis(BACKOFF_MAX_MS)).await;
            }
        }
    }
}

/// One queue's cursor commits: the newest cursor the consumer handed over, one `Commit` at a
/// time, until the consumer ends (its last cursor is committed then).
async fn committer(context: QueueContext, mut cursor: tokio::sync::watch::Receiver<u64>) {
    let mut connections = Connections::new();
    let mut committed = *cursor.borrow_and_update();
    loop {
        let open = cursor.changed().await.is_ok();
        let target = *cursor.borrow_and_update();
        if target > committed {
            match context.commit(&mut connections, target).await {
                Ok(()) => committed = target,
                Err(label) => context.shared.commit_failed(label),
            }
        }
        if !open {
            return;
        }
    }
}

/// Producer `index`: one message per call on its queue, paced, until `until` or `stop`.
async fn producer(index: usize, context: QueueContext, until: Instant, stop: Arc<AtomicBool>) {
    let QueueContext {
        store_id,
        queue,
        group,
        routes,
        shared,
        options,
    } = context;
    let mut pacing = store::pacing(options.producers, options.qps);
    let policy = options.call_policy();
    let mut connections = Connections::new();
    for sequence in 0..options.messages_per_producer_max() {
        pacing.tick().await;
        if stop.load(Ordering::Relaxed) || Instant::now() >= until {
            break;
        }
        shared.sent(index, sequence);
        let sent_ns = shared.now_ns();
        let header = Header {
            nonce: shared.tracker.nonce,
            producer: index as u32,
            sequence,
            sent_ns,
        };
        let request = api::ProduceRequest {
            store_id,
            message_id: Vec::new(),
            topic: options.topic.clone(),
            queue,
            messages: vec![api::Message {
                key: Vec::new(),
                value: header.value(options.message_bytes),
            }],
        };
        let produce = |mut client: api::Client, _: &str| {
            let request = request.clone();
            async move {
                let response = client.produce(request).await?.into_inner();
                let error = response.error.clone();
                Ok((response, error))
            }
        };
        let Some((answer, _)) =
            store::call(&routes, &mut connections, group, &policy, &stop, produce).await
        else {
            break;
        };
        shared.answered(index, sequence, sent_ns, &answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_and_a_short_value_has_none() {
        let header = Header {
            nonce: 0x0102_0304_0506_0708,
            producer: 7,
            sequence: 123_456,
            sent_ns: 987_654_321,
        };
        let value = header.value(HEADER_BYTES + 5);
        assert_eq!(value.len(), HEADER_BYTES + 5);
        assert_eq!(Header::parse(&value), Some(header));
        assert_eq!(Header::parse(&value[..HEADER_BYTES]), Some(header));
        assert_eq!(Header::parse(&value[..HEADER_BYTES - 1]), None);
    }

    fn answer(label: &'static str) -> Answer {
        Answer {
            label,
            node: "n".to_string(),
            retried: Vec::new(),
        }
    }

    fn value(shared: &Shared, producer: u32, sequence: u64, sent_ns: u64) -> Vec<u8> {
        Header {
            nonce: shared.tracker.nonce,
            producer,
            sequence,
            sent_ns,
        }
        .value(HEADER_BYTES)
    }

    #[test]
    fn deliveries_are_timed_once_and_counted_missing_duplicate_or_foreign() {
        let shared = new_shared(&Options {
            producers: 2,
            ..Options::default()
        });
        shared.begin_measuring();
        let from = shared.now_ns();
        for sequence in 0..3 {
            shared.sent(0, sequence);
        }
        shared.sent(1, 0);
        // Message 0/0: consumed before its ack arrives, then acked, then delivered again.
        shared.delivered(&value(&shared, 0, 0, from), from + 2_000_000);
        shared.answered(0, 0, from, &answer(LABEL_OK));
        shared.delivered(&value(&shared, 0, 0, from), from + 3_000_000);
        // 0/1: acked, never consumed. 0/2: failed, consumed anyway. 1/0: acked, consumed.
        shared.answered(0, 1, from, &answer(LABEL_OK));
        shared.answered(0, 2, from, &answer("INDETERMINATE"));
        shared.delivered(&value(&shared, 0, 2, from), from + 1_000_000);
        shared.answered(1, 0, from, &answer(LABEL_OK));
        shared.delivered(&value(&shared, 1, 0, from), from + 30_000_000);
        // Not ours: another nonce, a producer or sequence never sent, a short value.
        let mut other = value(&shared, 1, 0, from);
        other[0] ^= 1;
        shared.delivered(&other, from);
        shared.delivered(&value(&shared, 5, 0, from), from);
        shared.delivered(&value(&shared, 1, 9, from), from);
        shared.delivered(b"short", from);

        assert_eq!(shared.missing(), 1);
        let report = shared.total(Instant::now(), None);
        let counts = &report.counts;
        assert_eq!(
            (counts.produced, counts.acknowledged, counts.failed),
            (4, 3, 1)
        );
        assert_eq!((counts.consumed, counts.duplicates), (3, 1));
        assert_eq!((counts.missing, counts.consumed_unacknowledged), (1, 1));
        assert_eq!(counts.foreign, 4);
        // Three first deliveries timed: 2 ms, 1 ms, 30 ms.
        assert_eq!(report.end_to_end.total, 3);
        assert_eq!(report.end_to_end.buckets[2].count, 1, "2 ms is in <5");
        assert_eq!(report.end_to_end.buckets[1].count, 1, "1 ms is in <2");
        assert_eq!(report.end_to_end.buckets[5].count, 1, "30 ms is in <50");
        assert!((report.end_to_end.p50_ms - 2.0).abs() < 0.01);
        assert_eq!(report.produce_ack.total, 4);
        assert_eq!(report.produce_ack.return_codes["INDETERMINATE"], 1);
        let text = report.render();
        assert!(text.contains("total end-to-end: total 3"), "{text}");
        assert!(text.contains("consumed msgs/s"), "{text}");
        assert!(text.contains("missing 1 duplicates 1"), "{text}");
    }

    #[test]
    fn messages_sent_during_the_warmup_are_counted_but_not_timed() {
        let shared = new_shared(&Options::default());
        shared.sent(0, 0);
        shared.answered(0, 0, shared.now_ns(), &answer(LABEL_OK));
        shared.delivered(&value(&shared, 0, 0, 0), shared.now_ns());
        shared.begin_measuring();
        let report = shared.total(Instant::now(), Some(1.0));
        assert_eq!(report.counts.consumed, 1);
        assert_eq!(report.counts.missing, 0);
        assert_eq!(report.end_to_end.total, 0);
        assert_eq!(report.produce_ack.total, 0);
    }

    #[test]
    fn options_are_bounded() {
        assert!(Options::default().validate().is_ok());
        for bad in [
            Options {
                qps: 0,
                ..Options::default()
            },
            Options {
                qps: QPS_MAX + 1,
                ..Options::default()
            },
            Options {
                qps: QPS_MAX,
                duration: Duration::from_secs(3_000),
                ..Options::default()
            },
            Options {
                producers: 0,
                ..Options::default()
            },
            Options {
                message_bytes: HEADER_BYTES - 1,
                ..Options::default()
            },
            Options {
                message_bytes: MESSAGE_BYTES_MAX + 1,
                ..Options::default()
            },
            Options {
                duration: Duration::ZERO,
                ..Options::default()
            },
            Options {
                duration: Duration::from_secs(RUN_SECONDS_MAX),
                ..Options::default()
            },
            Options {
                drain: Duration::ZERO,
                ..Options::default()
            },
            Options {
                drain: Duration::from_millis(DRAIN_MS_MAX + 1),
                ..Options::default()
            },
            Options {
                report_every: Duration::from_millis(10),
                ..Options::default()
            },
            Options {
                group: String::new(),
                ..Options::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
