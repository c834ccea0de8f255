//! The consumer: one pull loop per assigned queue, handlers in parallel across keys, cursors
//! committed behind them.
//!
//! * **Pulling.** Each queue this consumer owns ([`assigned_queues`]) has one loop: a
//!   long-poll `Consume` at the queue's master (routed, redirected and retried by the
//!   producer's router: `NOT_MASTER` followed, `NO_MASTER`/`UNAVAILABLE`/lost nodes retried
//!   with backoff), the first from the group's committed cursor, every later one from the
//!   offset after the last message pulled. A batch must hold consecutive offsets from where
//!   it was asked (anything else stops the consumer as a protocol error), so nothing of a
//!   queue is skipped or reordered by the consumer. The next pull starts once the batch is
//!   handled.
//! * **Handling.** A batch is split into chains, one per key (in offset order; each keyless
//!   message is a chain of its own); a chain's messages are handled one after the other,
//!   chains in parallel, at most [`ConsumerConfig::max_in_flight`] messages of the whole
//!   consumer at once, under its rate limit. Batches of one queue follow each other, so
//!   **messages of one key in one queue are handled strictly in offset order, never two at
//!   once**. (The producer keeps a key in one queue unless queue-change retry is on.)
//! * **Failing.** A delivery fails when the handler answers [`Outcome::Nack`] or
//!   [`Outcome::Retry`], panics (caught: the consumer goes on), or has not answered within
//!   [`ConsumerConfig::ack_timeout`] (its future is dropped). The message is delivered again,
//!   in place, after the wait its retry tier gives ([`ConsumerConfig::retry_tiers`],
//!   `consumer_retry.rs`) with [`Delivery::attempt`] one higher; later messages of its key
//!   wait (order holds), other keys go on. Past the last tier it is produced to
//!   [`ConsumerConfig::dead_letter_topic`] (same key and value, a message id derived from
//!   (consumer group, topic, queue, offset) so a repeated produce is deduplicated) and counts
//!   as done only once that produce is acknowledged; without a dead-letter topic the last
//!   tier repeats. A message is never dropped.
//! * **Committing.** A queue's cursor is committed only up to its lowest offset not yet
//!   handled ([`Watermark`]), so a crash at any moment never skips an unhandled message:
//!   **delivery is at least once**, and what was handled after that offset is delivered
//!   again. Commits are batched: at most one per [`ConsumerConfig::commit_interval`] per
//!   queue while handling, and when the queue goes idle.
//! * **Store settings.** At start, the operator's settings of the (topic, consumer group)
//!   held in the store (retry tiers, dead-letter topic, rates per group, max in flight)
//!   replace the matching [`ConsumerConfig`] values (`consumer_settings.rs`; precedence in
//!   [`ConsumerConfig`]'s documentation). A task re-reads them every
//!   [`ConsumerConfig::settings_refresh`] and applies a change in place, between two
//!   deliveries: new rates to the token buckets (their debt kept), a new max in flight to
//!   the permits (a lower one takes effect as running handlers finish), new tiers and
//!   dead-letter topic to the next failure. No queue loop restarts, so a reload neither
//!   loses nor repeats a handled message. A change it cannot apply is logged and ignored.
//! * **Draining.** When `run`'s shutdown future completes, pulls stop, handlers already
//!   running finish (no new one starts; a hung one is cut at its ack timeout; a dead-letter
//!   produce under way finishes its attempt), every queue commits its lowest unhandled
//!   offset, and `run` returns. Dropping `run`'s future instead aborts everything at once: handled but
//!   uncommitted messages are delivered again to the next consumer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use phxq_proto::api;
use phxq_types::{ErrorCode, GroupId, Offset, QueueId, group_of_queue};
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio::task::JoinSet;

use crate::consumer_assign::assigned_queues;
use crate::consumer_config::{ConsumerConfig, ConsumerConfigError, HandlingOrder};
use crate::consumer_member::{self, AbortOnDrop};
use crate::consumer_rate::RateLimiter;
use crate::consumer_retry::{Next, after_failure, dead_letter_id};
use crate::consumer_settings::{EffectiveSettings, SettingsError, effective};
use crate::error::{ErrorKind, ProduceError};
use crate::producer::Producer;
use crate::router::{Halt, Layout, Router};

/// A message given to a [`Handler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The topic it was read from.
    pub topic: Arc<str>,
    /// Its queue.
    pub queue: QueueId,
    /// Its offset in the queue: `(topic, queue, offset)` is its stable id, the same on every
    /// delivery (use it to make handling idempotent).
    pub offset: Offset,
    /// When the master accepted it, in ms since the Unix epoch (the master's clock).
    pub time_ms: u64,
    /// Its key (empty: none).
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
    /// The delivery count: how many times this consumer has handed it to the handler, this
    /// time included (from 1; one more after each failed delivery: a nack, an ack timeout, a
    /// panic). The count lives in this consumer only and is not stored: a message delivered
    /// again after a crash, a restart or a takeover of its queue starts at 1 again, and so
    /// does its retry schedule (the dead-letter produce stays deduplicated).
    pub attempt: u32,
}

/// What a [`Handler`] made of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: the cursor may pass it.
    Handled,
    /// Not handled (a failed delivery): deliver it again after the delay of its retry tier
    /// ([`ConsumerConfig::retry_tiers`]), or dead-letter it once they are used up. Its key
    /// waits (order), and the queue's cursor stays before it meanwhile.
    Nack,
    /// Not handled, as [`Outcome::Nack`], but deliver it again after this delay instead of
    /// the tier's (at most [`RETRY_DELAY_MAX`](crate::RETRY_DELAY_MAX)). It still counts as a
    /// failed delivery: once the tiers' attempts are used up it is dead-lettered.
    Retry(Duration),
}

/// Handles messages. Implement it with `async fn handle(&self, msg: &Delivery) -> Outcome`,
/// or pass a closure `|msg: &Delivery| { let v = msg.value.clone(); async move { ... } }`
/// (the future may not borrow the message).
///
/// Called for different keys at once (so `&self`); never for two messages of one key of one
/// queue at once. A panic is caught and counts as a failed delivery (the message is delivered
/// again later; the consumer goes on); so does a future that has not finished within
/// [`ConsumerConfig::ack_timeout`], which is dropped. Handle messages idempotently: delivery
/// is at least once.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, msg: &Delivery) -> impl Future<Output = Outcome> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(&Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, msg: &Delivery) -> impl Future<Output = Outcome> + Send {
        self(msg)
    }
}

/// Why a consumer stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The store refused a pull or commit in a way retrying cannot change (`UNKNOWN_TOPIC`,
    /// `UNKNOWN_CONSUMER_GROUP`, `WRONG_STORE`, ...), or answered nonsense.
    #[error("queue {queue:?}: {error}")]
    Store {
        /// The queue concerned (`None`: learning the layout).
        queue: Option<QueueId>,
        /// What the router reported.
        error: ProduceError,
    },
    /// A setting the store holds for this (topic, consumer group) cannot be applied by this
    /// library (a delay beyond [`RETRY_DELAY_MAX`](crate::RETRY_DELAY_MAX), ...): refused
    /// when `run` starts, before anything is consumed.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The dead-letter topic refused a message for good (`UNKNOWN_TOPIC`,
    /// `MESSAGE_TOO_LARGE`, ...): it stays unhandled, the cursor before it.
    #[error("queue {queue} offset {offset}: dead-lettering failed: {error}")]
    DeadLetter {
        /// Its queue.
        queue: QueueId,
        /// Its offset.
        offset: Offset,
        /// What the producer reported.
        error: ProduceError,
    },
}

/// What a consumer did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// The queues it read.
    pub queues: Vec<QueueId>,
    /// Each queue's cursor as last committed by this consumer (queues it never committed are
    /// absent).
    pub cursors: BTreeMap<QueueId, Offset>,
    /// Messages handled (`Outcome::Handled`).
    pub handled: u64,
    /// Failed deliveries followed by a redelivery (all causes).
    pub retries: u64,
    /// `Outcome::Nack` and `Outcome::Retry` answers.
    pub nacks: u64,
    /// Handlers cut off at the ack timeout.
    pub timeouts: u64,
    /// Handler panics caught.
    pub panics: u64,
    /// Messages produced to the dead-letter topic (acknowledged) after their last tier.
    pub dead_lettered: u64,
    /// Pulls answered.
    pub pulls: u64,
    /// Commits acknowledged.
    pub commits: u64,
    /// The settings in force when it stopped: the store's for its (topic, consumer group)
    /// over its [`ConsumerConfig`] (see [`ConsumerConfig`]'s precedence rules), as last
    /// reloaded.
    pub settings: EffectiveSettings,
    /// Changes of the store's settings applied while running.
    pub settings_reloads: u64,
    /// Changes of the store's settings it could not apply (each distinct one counted once;
    /// the previous settings stayed in force).
    pub settings_refused: u64,
}

/// Where a running consumer stands, for a caller that watches it ([`Consumer::progress`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerProgress {
    /// The queues it has a pull loop for now.
    pub queues: BTreeSet<QueueId>,
    /// Those whose latest pull waited its whole long poll ([`ConsumerConfig::long_poll`]) and
    /// found nothing past what was pulled before: caught up with the queue's end.
    pub caught_up: BTreeSet<QueueId>,
}

/// A consumer of one topic for one consumer group. Build it with [`Consumer::new`], then
/// [`Consumer::run`] it.
pub struct Consumer {
    config: ConsumerConfig,
    progress: watch::Sender<ConsumerProgress>,
}

impl Consumer {
    /// A consumer with `config` (validated here). Connects to nothing yet.
    pub fn new(config: ConsumerConfig) -> Result<Consumer, ConsumerConfigError> {
        config.validate()?;
        Ok(Consumer {
            config,
            progress: watch::channel(ConsumerProgress::default()).0,
        })
    }

    /// Watches where the consumer stands once running: its queues and which are caught up
    /// (a caller can stop it when all are, as `phxq consume` does).
    pub fn progress(&self) -> watch::Receiver<ConsumerProgress> {
        self.progress.subscribe()
    }

    /// The consumer's configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Reads the topic's assigned queues and hands their messages to `handler` until
    /// `shutdown` completes, then drains (see the module documentation) and returns what it
    /// did. Returns early with an error when the store refuses for good (a pull, a commit,
    /// a dead-letter produce; after draining the other queues). A dead-letter topic of the
    /// config that the store does not have is refused at the start (`UNKNOWN_TOPIC`); one
    /// the store's settings name is used only once it exists.
    ///
    /// At the start it reads the store's settings for its (topic, consumer group) and lays
    /// them over its config (they win; see [`ConsumerConfig`]); one it cannot apply is
    /// [`ConsumerError::Settings`]. It re-reads them every
    /// [`ConsumerConfig::settings_refresh`] and applies a change without stopping; one it
    /// cannot apply then is logged and ignored (counted in
    /// [`ConsumerReport::settings_refused`]).
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerReport, ConsumerError> {
        let router = Router::new(self.config.router_config());
        let mut shutdown = pin!(shutdown);
        let mut progress = router.start_request();
        let learnt = first(
            router.topic_queues(&self.config.topic, &mut progress),
            &mut shutdown,
        )
        .await;
        let (layout, queues) = match learnt {
            First::Left(Ok(found)) => found,
            First::Left(Err(error)) => return Err(ConsumerError::Store { queue: None, error }),
            First::Right(()) => return Ok(ConsumerReport::default()),
        };
        let store_settings = layout.group_settings(&self.config.topic, &self.config.consumer_group);
        let mut config = effective(&self.config, store_settings)?;
        // A dead-letter topic the store names but lacks: the library's value stays until the
        // topic exists (a reload then applies it), as for a change made while running.
        let mut refused_at_start = None;
        if let Some(topic) = store_settings.and_then(|s| s.dead_letter_topic.as_ref())
            && !layout.topics.contains_key(topic)
        {
            tracing::warn!(topic = %config.topic, group = %config.consumer_group,
                dead_letter_topic = %topic,
                "the store's dead-letter topic does not exist: not used until it does");
            config
                .dead_letter_topic
                .clone_from(&self.config.dead_letter_topic);
            refused_at_start = Some(store_settings.cloned());
        }
        let settings = EffectiveSettings::of(&config, store_settings.is_some());
        log_settings(&config, &settings, "effective settings");
        let config = &config;
        if let Some(topic) = &config.dead_letter_topic {
            router
                .topic_queues(topic, &mut progress)
                .await
                .map_err(|error| ConsumerError::Store { queue: None, error })?;
        }
        let dead_letters = config
            .dead_letter_topic
            .as_ref()
            .map(|_| dead_letter_producer(config));
        let mine = assigned_queues(&config.topic, queues, &config.members, &config.member);
        let mine = only_listed(config, mine, queues)?;
        let tunables = Tunables {
            config: config.clone(),
            settings,
            dead_letters,
        };
        let shared = Shared::new(router, handler, tunables, self.progress.clone());
        if refused_at_start.is_some() {
            shared
                .counters
                .settings_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        // Ends with `run` (aborted when dropped).
        let refresh = refresh_settings(shared.clone(), self.config, refused_at_start);
        let _refresh = AbortOnDrop(tokio::spawn(refresh));
        if let Some(membership) = config.membership.clone() {
            // Live membership: queues come and go with the coordinator's grants.
            return consumer_member::run_live(shared, layout.groups, membership, shutdown).await;
        }
        tracing::info!(topic = %config.topic, group = %config.consumer_group, queues = ?mine,
            "consuming");
        let stop = &shared.stop;
        // Every queue counts as running from now, so a watcher never sees some caught up
        // before the others started.
        self.progress
            .send_modify(|progress| progress.queues.extend(&mine));
        let mut loops = JoinSet::new();
        for &queue in &mine {
            let group = group_of_queue(queue, layout.groups);
            loops.spawn(run_queue(shared.clone(), queue, group, stop.subscribe()));
        }
        let mut report = ConsumerReport {
            queues: mine,
            ..ConsumerReport::default()
        };
        let mut failure = None;
        let mut shutdown_seen = false;
        loop {
            let joined = if shutdown_seen {
                First::Left(loops.join_next().await)
            } else {
                first(loops.join_next(), &mut shutdown).await
            };
            match joined {
                First::Right(()) => {
                    shutdown_seen = true;
                    stop.send_replace(true);
                }
                First::Left(None) => break,
                First::Left(Some(Ok((queue, cursor, outcome)))) => {
                    if let Some(cursor) = cursor {
                        report.cursors.insert(queue, cursor);
                    }
                    if let Err(error) = outcome {
                        failure.get_or_insert(error);
                        stop.send_replace(true);
                    }
                }
                // A pull loop panicked: a bug here, not the handler's (its panics are caught).
                First::Left(Some(Err(joined))) => std::panic::resume_unwind(joined.into_panic()),
            }
        }
        shared.count_into(&mut report);
        match failure {
            Some(error) => Err(error),
            None => Ok(report),
        }
    }
}

/// The dead-letter producer of a validated `config`.
fn dead_letter_producer(config: &ConsumerConfig) -> Producer {
    Producer::new(config.dead_letter_producer_config())
        .expect("a validated consumer config makes a valid producer config")
}

/// `mine` cut to [`ConsumerConfig::queues`], each checked against the topic's `queues`.
fn only_listed(
    config: &ConsumerConfig,
    mut mine: Vec<QueueId>,
    queues: u32,
) -> Result<Vec<QueueId>, ConsumerError> {
    let Some(listed) = &config.queues else {
        return Ok(mine);
    };
    if let Some(&queue) = listed.iter().find(|&&queue| queue >= queues) {
        let message = format!(
            "topic {:?} has {queues} queue(s): no queue {queue}",
            config.topic
        );
        return Err(ConsumerError::Store {
            queue: Some(queue),
            error: ProduceError::refused(ErrorCode::UnknownQueue, message),
        });
    }
    mine.retain(|queue| listed.contains(queue));
    Ok(mine)
}

/// The settings that may change while the consumer runs, replaced as a whole on a reload.
pub(crate) struct Tunables {
    /// The effective config: the store's settings over the library's.
    pub(crate) config: ConsumerConfig,
    pub(crate) settings: EffectiveSettings,
    /// Produces dead letters (with a dead-letter topic only).
    pub(crate) dead_letters: Option<Producer>,
}

/// What every loop and handler task of one running consumer shares.
pub(crate) struct Shared<H> {
    /// The effective config at start. Its settings fields ([`Tunables`]) may be stale: read
    /// those through [`Shared::tunables`]; the others never change.
    pub(crate) config: ConsumerConfig,
    topic: Arc<str>,
    router: Router,
    handler: H,
    /// One permit per message being handled: the max in flight.
    in_flight: InFlight,
    limiter: Mutex<Option<RateLimiter>>,
    tunables: Mutex<Arc<Tunables>>,
    /// Live members of the group as last heard (1 with a static list: its division is in
    /// the config already).
    members: AtomicUsize,
    /// Set to stop every chain and (static member list) every queue loop: shutdown, or a
    /// failure of one of them. With live membership each queue loop has its own stop, and a
    /// failure reaches the membership loop as the queue loop's error instead.
    stop: watch::Sender<bool>,
    progress: watch::Sender<ConsumerProgress>,
    counters: Counters,
}

impl<H> Shared<H> {
    pub(crate) fn new(
        router: Router,
        handler: H,
        tunables: Tunables,
        progress: watch::Sender<ConsumerProgress>,
    ) -> Arc<Shared<H>> {
        let config = tunables.config.clone();
        let (messages, bytes) = rates(&config, 1);
        Arc::new(Shared {
            topic: Arc::from(config.topic.as_str()),
            limiter: Mutex::new(RateLimiter::new(messages, bytes, Instant::now())),
            in_flight: InFlight::new(config.max_in_flight),
            tunables: Mutex::new(Arc::new(tunables)),
            members: AtomicUsize::new(1),
            stop: watch::channel(false).0,
            progress,
            config,
            router,
            handler,
            counters: Counters::default(),
        })
    }

    /// The settings in force now.
    pub(crate) fn tunables(&self) -> Arc<Tunables> {
        lock(&self.tunables).clone()
    }

    /// The group has `members` live members now: re-divides its rates.
    pub(crate) fn set_members(&self, members: usize) {
        self.members.store(members.max(1), Ordering::Relaxed);
        self.retune();
    }

    /// Sets the rate limiter to the rates of the settings in force and the live members.
    fn retune(&self) {
        let tunables = self.tunables();
        let (messages, bytes) = rates(&tunables.config, self.members.load(Ordering::Relaxed));
        let now = Instant::now();
        let mut limiter = lock(&self.limiter);
        match limiter.as_mut() {
            Some(limiter) => limiter.set_rates(messages, bytes, now),
            None => *limiter = RateLimiter::new(messages, bytes, now),
        }
    }

    /// Marks `queue` as running (or not), and caught up (or not).
    fn set_progress(&self, queue: QueueId, running: bool, caught_up: bool) {
        self.progress.send_if_modified(|progress| {
            let changed = if running {
                progress.queues.insert(queue)
            } else {
                progress.queues.remove(&queue)
            };
            let caught_up = running && caught_up;
            changed
                | if caught_up {
                    progress.caught_up.insert(queue)
                } else {
                    progress.caught_up.remove(&queue)
                }
        });
    }

    /// Applies the store's `store` settings (laid over the `library` config) if they differ
    /// from those in force and can be applied; else logs why not (once per distinct
    /// refused change: `last_refused` remembers it).
    fn reload(
        &self,
        library: &ConsumerConfig,
        store: Option<&api::ConsumerGroupSettings>,
        layout: &Layout,
        last_refused: &mut Option<Option<api::ConsumerGroupSettings>>,
    ) {
        let current = self.tunables();
        let refuse = |why: String, last_refused: &mut Option<Option<_>>| {
            if last_refused.as_ref() != Some(&store.cloned()) {
                *last_refused = Some(store.cloned());
                self.counters
                    .settings_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %library.topic, group = %library.consumer_group,
                    reason = %why, "ignoring changed store settings; the previous stay");
            }
        };
        let config = match effective(library, store) {
            Ok(config) => config,
            Err(error) => return refuse(error.to_string(), last_refused),
        };
        let settings = EffectiveSettings::of(&config, store.is_some());
        if settings == current.settings {
            *last_refused = None;
            return;
        }
        if let Some(topic) = &config.dead_letter_topic
            && !layout.topics.contains_key(topic)
        {
            let why = format!("dead-letter topic {topic:?}: no such topic in the store");
            return refuse(why, last_refused);
        }
        let dead_letters = match (&config.dead_letter_topic, &current.dead_letters) {
            (None, _) => None,
            (Some(_), Some(producer)) => Some(producer.clone()),
            (Some(_), None) => Some(dead_letter_producer(&config)),
        };
        log_settings(&config, &settings, "settings changed in the store: applied");
        self.in_flight.resize(config.max_in_flight);
        *lock(&self.tunables) = Arc::new(Tunables {
            config,
            settings,
            dead_letters,
        });
        self.retune();
        *last_refused = None;
        self.counters
            .settings_reloads
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the counters and the settings in force into `report`.
    pub(crate) fn count_into(&self, report: &mut ConsumerReport) {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        report.handled = read(&self.counters.handled);
        report.retries = read(&self.counters.retries);
        report.nacks = read(&self.counters.nacks);
        report.timeouts = read(&self.counters.timeouts);
        report.panics = read(&self.counters.panics);
        report.dead_lettered = read(&self.counters.dead_lettered);
        report.pulls = read(&self.counters.pulls);
        report.commits = read(&self.counters.commits);
        report.settings_reloads = read(&self.counters.settings_reloads);
        report.settings_refused = read(&self.counters.settings_refused);
        report.settings = self.tunables().settings.clone();
    }
}

/// The rate limits of one consumer under `config` with `members` live members.
fn rates(config: &ConsumerConfig, members: usize) -> (Option<u32>, Option<u64>) {
    match &config.membership {
        Some(membership) => membership.rates(config, members),
        None => (config.messages_per_s_max, config.bytes_per_s_max),
    }
}

/// Re-reads the store's settings of the consumer's (topic, consumer group) every
/// `settings_refresh` and applies a change (see [`Shared::reload`]); runs until aborted.
/// `last_refused`: a change refused at start, not to be reported again.
async fn refresh_settings<H: Handler>(
    shared: Arc<Shared<H>>,
    library: ConsumerConfig,
    mut last_refused: Option<Option<api::ConsumerGroupSettings>>,
) {
    loop {
        tokio::time::sleep(library.settings_refresh).await;
        let mut progress = shared.router.start_request();
        let layout = match shared.router.relearn_layout(&mut progress).await {
            Ok(layout) => layout,
            Err(error) => {
                tracing::debug!(%error, "re-reading the store's settings failed; next time");
                continue;
            }
        };
        let store = layout.group_settings(&library.topic, &library.consumer_group);
        shared.reload(&library, store, &layout, &mut last_refused);
    }
}

/// The max in flight: a semaphore whose size can change while permits are out. A shrink
/// takes the free permits at once and the rest as they come back (`owed`), so the number of
/// handlers running reaches the new limit as soon as enough of them finish.
struct InFlight {
    permits: Semaphore,
    limit: Mutex<InFlightLimit>,
}

struct InFlightLimit {
    max: usize,
    /// Permits to forget when they come back.
    owed: usize,
}

/// A permit of [`InFlight`]; forgotten on drop while a shrink is owed one.
struct InFlightPermit<'a> {
    permit: Option<SemaphorePermit<'a>>,
    owner: &'a InFlight,
}

impl Drop for InFlightPermit<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut limit = lock(&self.owner.limit);
        if limit.owed > 0 {
            limit.owed -= 1;
            permit.forget();
        }
    }
}

impl InFlight {
    fn new(max: usize) -> InFlight {
        InFlight {
            permits: Semaphore::new(max),
            limit: Mutex::new(InFlightLimit { max, owed: 0 }),
        }
    }

    async fn acquire(&self) -> InFlightPermit<'_> {
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        InFlightPermit {
            permit: Some(permit),
            owner: self,
        }
    }

    /// Makes the limit `max`.
    fn resize(&self, max: usize) {
        assert!(max > 0, "validated: at least one in flight");
        let mut limit = lock(&self.limit);
        if max > limit.max {
            let more = max - limit.max;
            let repaid = more.min(limit.owed);
            limit.owed -= repaid;
            self.permits.add_permits(more - repaid);
        } else {
            let fewer = limit.max - max;
            let taken = self.permits.forget_permits(fewer);
            limit.owed += fewer - taken;
        }
        limit.max = max;
    }
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    retries: AtomicU64,
    nacks: AtomicU64,
    timeouts: AtomicU64,
    panics: AtomicU64,
    dead_lettered: AtomicU64,
    pulls: AtomicU64,
    commits: AtomicU64,
    settings_reloads: AtomicU64,
    settings_refused: AtomicU64,
}

/// A queue loop's result: its queue, its last committed cursor, how it ended.
pub(crate) type QueueEnd = (QueueId, Option<Offset>, Result<(), ConsumerError>);

/// One queue's cursor: what is committed and what may be.
struct Cursor {
    queue: QueueId,
    group: GroupId,
    /// Last committed by us, or read at start (`None` before the first pull).
    committed: Option<Offset>,
    /// The lowest offset not yet handled: where the cursor may go.
    handled_to: Option<Offset>,
    last_commit: Instant,
}

impl Cursor {
    fn pending(&self) -> bool {
        self.handled_to > self.committed
    }

    fn due(&self, interval: Duration) -> bool {
        self.pending() && self.last_commit.elapsed() >= interval
    }
}

/// Pulls, handles and commits queue `queue` until `stop`, then drains it.
pub(crate) async fn run_queue<H: Handler>(
    shared: Arc<Shared<H>>,
    queue: QueueId,
    group: GroupId,
    mut stop: watch::Receiver<bool>,
) -> QueueEnd {
    let mut cursor = Cursor {
        queue,
        group,
        committed: None,
        handled_to: None,
        last_commit: Instant::now(),
    };
    shared.set_progress(queue, true, false);
    let outcome = pull_and_handle(&shared, &mut cursor, &mut stop).await;
    shared.set_progress(queue, false, false);
    // Drain: commit what was handled, whatever stopped us.
    let committed = if cursor.pending() {
        shared.commit(&mut cursor).await
    } else {
        Ok(())
    };
    (queue, cursor.committed, outcome.and(committed))
}

/// The loop of [`run_queue`], up to its drain.
async fn pull_and_handle<H: Handler>(
    shared: &Arc<Shared<H>>,
    cursor: &mut Cursor,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ConsumerError> {
    let config = &shared.config;
    let mut next: Option<Offset> = None;
    while !*stop.borrow() {
        // With a commit pending, do not sleep in a long poll past its time.
        let wait = if cursor.pending() {
            config.long_poll.min(config.commit_interval)
        } else {
            config.long_poll
        };
        let Some(pulled) = unless_stopped(shared.pull(cursor, next, wait), stop).await else {
            break;
        };
        let batch = match pulled? {
            Some(batch) => batch,
            None => {
                // The store was unreachable for a whole deadline: logged; start over.
                unless_stopped(tokio::time::sleep(config.backoff_max), stop).await;
                continue;
            }
        };
        if cursor.committed.is_none() {
            // The first pull read from the group's cursor.
            cursor.committed = Some(batch.start);
            cursor.handled_to = Some(batch.start);
        }
        let caught_up = batch.deliveries.is_empty() && wait == config.long_poll;
        shared.set_progress(cursor.queue, true, caught_up);
        if batch.deliveries.is_empty() {
            next = Some(batch.start);
        } else {
            let end = batch.end();
            let handled_to = shared.handle_batch(cursor, batch.deliveries, stop).await?;
            cursor.handled_to = Some(handled_to);
            if handled_to < end {
                break; // Stopped mid-batch.
            }
            next = Some(end);
        }
        if cursor.due(config.commit_interval) {
            shared.commit(cursor).await?;
        }
    }
    Ok(())
}

/// A checked pull: consecutive offsets from `start`.
struct Batch {
    start: Offset,
    deliveries: Vec<Delivery>,
}

impl Batch {
    /// One past the last offset.
    fn end(&self) -> Offset {
        self.start + self.deliveries.len() as u64
    }
}

impl<H: Handler> Shared<H> {
    /// One long-poll `Consume` from `from` (`None`: the group's cursor), routed and retried.
    /// `Ok(None)` when retrying passed the deadline (logged); an error when the store
    /// refused for good or answered nonsense.
    async fn pull(
        &self,
        cursor: &Cursor,
        from: Option<Offset>,
        wait: Duration,
    ) -> Result<Option<Batch>, ConsumerError> {
        let request = api::ConsumeRequest {
            topic: self.config.topic.clone(),
            queue: cursor.queue,
            consumer_group: self.config.consumer_group.clone(),
            from_offset: from,
            max_messages: self.config.pull_messages_max,
            max_bytes: self.config.pull_bytes_max,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            store_id: self.config.store_id,
        };
        let mut progress = self.router.start_request();
        let called = self
            .router
            .call(Some(cursor.group), &mut progress, |mut client| {
                let request = request.clone();
                async move {
                    let response = client.consume(request).await?.into_inner();
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await;
        let response = match self.settle(cursor.queue, "pull", called)? {
            Some(response) => response,
            None => return Ok(None),
        };
        self.counters.pulls.fetch_add(1, Ordering::Relaxed);
        let batch = check_batch(&self.topic, cursor.queue, from, response).map_err(|message| {
            ConsumerError::Store {
                queue: Some(cursor.queue),
                error: progress.fail(ProduceError::new(ErrorKind::Protocol, None, message)),
            }
        })?;
        Ok(Some(batch))
    }

    /// Commits `cursor.handled_to`, retried until the deadline. Trouble that retrying may
    /// cure is logged and left for the next commit (cursors are absolute: a later commit
    /// covers this one); a refusal is an error.
    async fn commit(&self, cursor: &mut Cursor) -> Result<(), ConsumerError> {
        let Some(offset) = cursor.handled_to else {
            return Ok(());
        };
        let request = api::CommitRequest {
            topic: self.config.topic.clone(),
            queue: cursor.queue,
            consumer_group: self.config.consumer_group.clone(),
            offset,
            store_id: self.config.store_id,
            seek: false,
        };
        let mut progress = self.router.start_request();
        let called = self
            .router
            .call(Some(cursor.group), &mut progress, |mut client| {
                let request = request.clone();
                async move {
                    let response = client.commit(request).await?.into_inner();
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await;
        cursor.last_commit = Instant::now();
        if self.settle(cursor.queue, "commit", called)?.is_some() {
            self.counters.commits.fetch_add(1, Ordering::Relaxed);
            cursor.committed = Some(offset);
        }
        Ok(())
    }

    /// A routed call's value; `None` (logged) when it ran out of retries; an error when
    /// retrying cannot help.
    fn settle<T>(
        &self,
        queue: QueueId,
        what: &str,
        called: Result<T, Halt>,
    ) -> Result<Option<T>, ConsumerError> {
        match called {
            Ok(value) => Ok(Some(value)),
            Err(Halt::Error(error))
                if matches!(
                    error.kind(),
                    ErrorKind::DeadlineExceeded | ErrorKind::Unreachable
                ) =>
            {
                tracing::warn!(queue, %error, "{what} gave up; starting over");
                Ok(None)
            }
            Err(Halt::Error(error)) => Err(ConsumerError::Store {
                queue: Some(queue),
                error,
            }),
            Err(Halt::MasterMissing) => unreachable!("queue-change retry is off for consumers"),
        }
    }

    /// Handles `deliveries` (consecutive offsets of one queue), committing on the way; returns
    /// the lowest offset not handled (one past the last when all were). On `stop`, returns
    /// once the handlers already running are done. A chain that fails for good (a refused
    /// dead letter) stops the whole consumer; its error is returned once the others are done.
    async fn handle_batch(
        self: &Arc<Self>,
        cursor: &mut Cursor,
        deliveries: Vec<Delivery>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Offset, ConsumerError> {
        let watermark = Arc::new(Mutex::new(Watermark::new(
            deliveries[0].offset,
            deliveries.len(),
        )));
        let mut chains = JoinSet::new();
        for chain in chains_of(deliveries, self.config.order) {
            chains.spawn(run_chain(
                self.clone(),
                chain,
                watermark.clone(),
                stop.clone(),
            ));
        }
        let mut failure = None;
        loop {
            let due = cursor.last_commit + self.config.commit_interval;
            let joined = first(chains.join_next(), tokio::time::sleep_until(due.into())).await;
            match joined {
                First::Left(None) => break,
                First::Left(Some(Ok(Ok(())))) => {}
                First::Left(Some(Ok(Err(error)))) => {
                    failure.get_or_insert(error);
                    self.stop.send_replace(true);
                }
                // Handler panics are caught in the chain: this is a bug of the consumer.
                First::Left(Some(Err(joined))) => std::panic::resume_unwind(joined.into_panic()),
                First::Right(()) => {
                    cursor.handled_to = Some(lock(&watermark).lowest_unhandled());
                    if cursor.pending() {
                        self.commit(cursor).await?;
                    } else {
                        cursor.last_commit = Instant::now();
                    }
                }
            }
        }
        let handled_to = lock(&watermark).lowest_unhandled();
        match failure {
            Some(error) => {
                cursor.handled_to = Some(handled_to);
                Err(error)
            }
            None => Ok(handled_to),
        }
    }

    /// Waits for a permit and the rate limit, then hands `delivery` to the handler once,
    /// under the ack timeout, catching a panic. `None` when `stop` came first (nothing was
    /// delivered).
    async fn deliver(
        &self,
        delivery: &Delivery,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Answer> {
        let _permit = unless_stopped(self.in_flight.acquire(), stop).await?;
        if *stop.borrow() {
            return None;
        }
        let bytes = delivery.key.len() + delivery.value.len();
        let wait = lock(&self.limiter)
            .as_mut()
            .map(|limiter| limiter.reserve(bytes, Instant::now()));
        if let Some(wait) = wait
            && !wait.is_zero()
        {
            unless_stopped(tokio::time::sleep(wait), stop).await?;
        }
        let handled = catch_panic(|| self.handler.handle(delivery));
        // The handler's future is dropped at the timeout: cancelled at its next `.await`.
        let answer = match tokio::time::timeout(self.config.ack_timeout, handled).await {
            Ok(Ok(Outcome::Handled)) => Answer::Handled,
            Ok(Ok(Outcome::Nack)) => Answer::Failed(Failure::Nacked(None)),
            Ok(Ok(Outcome::Retry(delay))) => Answer::Failed(Failure::Nacked(Some(delay))),
            Ok(Err(())) => Answer::Failed(Failure::Panicked),
            Err(_) => Answer::Failed(Failure::TimedOut),
        };
        Some(answer)
    }

    /// Counts a failed delivery of `delivery` and says what comes next, under the settings in
    /// force (returned: a dead letter goes where they say).
    fn failed(&self, delivery: &Delivery, failure: Failure) -> (Next, Arc<Tunables>) {
        let tunables = self.tunables();
        let counters = &self.counters;
        let (counter, explicit) = match failure {
            Failure::Nacked(delay) => (&counters.nacks, delay),
            Failure::TimedOut => (&counters.timeouts, None),
            Failure::Panicked => (&counters.panics, None),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let next = after_failure(
            &tunables.config.retry_tiers,
            delivery.attempt,
            explicit,
            tunables.dead_letters.is_some(),
        );
        // A nack is the handler's own answer; a timeout, a panic or a dead letter is news.
        if !matches!(failure, Failure::Nacked(_)) || next == Next::DeadLetter {
            tracing::warn!(
                queue = delivery.queue,
                offset = delivery.offset,
                attempt = delivery.attempt,
                ?failure,
                ?next,
                "delivery failed"
            );
        }
        (next, tunables)
    }

    /// Produces `delivery` to the dead-letter topic with its derived message id, retrying
    /// trouble until it is acknowledged: `Ok(true)`. `Ok(false)` when `stop` came between
    /// two attempts; an error when the store refused it for good.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        tunables: &Tunables,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, ConsumerError> {
        let (Some(producer), Some(topic)) =
            (&tunables.dead_letters, &tunables.config.dead_letter_topic)
        else {
            unreachable!("dead-lettering needs a dead-letter topic");
        };
        let id = dead_letter_id(
            &self.config.consumer_group,
            &self.config.topic,
            delivery.queue,
            delivery.offset,
        );
        loop {
            // A produce under way is not cut short by `stop`: it is bounded by the deadline,
            // and a cut one could be stored anyway (harmless: the id deduplicates it).
            let sent = producer
                .send_with_id(topic, &delivery.key, delivery.value.clone(), id.clone())
                .await;
            match sent {
                Ok(receipt) => {
                    tracing::warn!(queue = delivery.queue, offset = delivery.offset,
                        dead_letter_topic = %topic, dead_letter_queue = receipt.queue,
                        dead_letter_offset = receipt.offset, "dead-lettered");
                    return Ok(true);
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::DeadlineExceeded | ErrorKind::Unreachable
                    ) =>
                {
                    tracing::warn!(queue = delivery.queue, offset = delivery.offset, %error,
                        "dead-lettering gave up for now; trying again");
                    let pause = tokio::time::sleep(self.config.backoff_max);
                    if unless_stopped(pause, stop).await.is_none() {
                        return Ok(false);
                    }
                }
                Err(error) => {
                    return Err(ConsumerError::DeadLetter {
                        queue: delivery.queue,
                        offset: delivery.offset,
                        error,
                    });
                }
            }
        }
    }
}

/// What came of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Handled,
    Failed(Failure),
}

/// Why a delivery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// `Outcome::Nack` (`None`) or `Outcome::Retry(delay)`.
    Nacked(Option<Duration>),
    /// No answer within the ack timeout.
    TimedOut,
    /// The handler panicked.
    Panicked,
}

/// Handles one key's messages in order: each delivered until handled or dead-lettered,
/// waiting its retry delays in place (so the key's later messages wait). Stops before the
/// next delivery once `stop` is set. Marks each message done in `watermark`.
async fn run_chain<H: Handler>(
    shared: Arc<Shared<H>>,
    chain: Vec<Delivery>,
    watermark: Arc<Mutex<Watermark>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConsumerError> {
    for mut delivery in chain {
        let counter = loop {
            let Some(answer) = shared.deliver(&delivery, &mut stop).await else {
                return Ok(());
            };
            let failure = match answer {
                Answer::Handled => break &shared.counters.handled,
                Answer::Failed(failure) => failure,
            };
            let (next, tunables) = shared.failed(&delivery, failure);
            match next {
                Next::Redeliver(delay) => {
                    shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let slept = unless_stopped(tokio::time::sleep(delay), &mut stop).await;
                    if slept.is_none() {
                        return Ok(());
                    }
                    delivery.attempt = delivery.attempt.saturating_add(1);
                }
                Next::DeadLetter => {
                    if !shared.dead_letter(&delivery, &tunables, &mut stop).await? {
                        return Ok(());
                    }
                    break &shared.counters.dead_lettered;
                }
            }
        };
        lock(&watermark).handled(delivery.offset);
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Makes the future and polls it until it finishes; `Err(())` if making it or a poll panicked
/// (the panic is caught, the future dropped). The panic hook has already reported it.
async fn catch_panic<W: Future>(make: impl FnOnce() -> W) -> Result<W::Output, ()> {
    let work = std::panic::catch_unwind(AssertUnwindSafe(make)).map_err(|_| ())?;
    let mut work = pin!(work);
    poll_fn(
        |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        },
    )
    .await
}

/// Splits a batch into the chains `order` asks for: the whole batch as one, or
/// [`chains_by_key`].
fn chains_of(deliveries: Vec<Delivery>, order: HandlingOrder) -> Vec<Vec<Delivery>> {
    match order {
        HandlingOrder::PerKey => chains_by_key(deliveries),
        HandlingOrder::PerQueue => vec![deliveries],
    }
}

/// Splits a batch into chains: one per key, in offset order; each keyless message alone.
/// Chains are in the order of their first message.
fn chains_by_key(deliveries: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    let mut chains: Vec<Vec<Delivery>> = Vec::new();
    let mut chain_of_key: HashMap<Vec<u8>, usize> = HashMap::new();
    for delivery in deliveries {
        if delivery.key.is_empty() {
            chains.push(vec![delivery]);
            continue;
        }
        match chain_of_key.get(&delivery.key) {
            Some(&chain) => chains[chain].push(delivery),
            None => {
                chain_of_key.insert(delivery.key.clone(), chains.len());
                chains.push(vec![delivery]);
            }
        }
    }
    chains
}

/// Checks a `Consume` answer for a pull from `from` (`None`: the cursor) and makes its
/// deliveries: offsets consecutive from the first (at or after `from`; later only when
/// retention deleted the ones asked for), `next_offset` one past the last.
fn check_batch(
    topic: &Arc<str>,
    queue: QueueId,
    from: Option<Offset>,
    response: api::ConsumeResponse,
) -> Result<Batch, String> {
    let start = response
        .messages
        .first()
        .map_or(response.next_offset, |message| message.offset);
    if start == 0 || from.is_some_and(|from| start < from) {
        return Err(format!(
            "queue {queue}: a pull from {from:?} started at offset {start}"
        ));
    }
    if let Some(from) = from
        && start > from
    {
        tracing::warn!(
            queue,
            from,
            start,
            "retention deleted messages before they were read"
        );
    }
    let count = response.messages.len() as u64;
    if response.next_offset != start + count {
        return Err(format!(
            "queue {queue}: {count} messages from offset {start} but next_offset {}",
            response.next_offset
        ));
    }
    let mut deliveries = Vec::with_capacity(response.messages.len());
    for (i, message) in response.messages.into_iter().enumerate() {
        if message.offset != start + i as u64 {
            return Err(format!(
                "queue {queue}: offset {} where {} was due",
                message.offset,
                start + i as u64
            ));
        }
        deliveries.push(Delivery {
            topic: topic.clone(),
            queue,
            offset: message.offset,
            time_ms: message.time_ms,
            key: message.key,
            value: message.value,
            attempt: 1,
        });
    }
    Ok(Batch { start, deliveries })
}

/// Which offsets of a batch are handled, and so where the cursor may go: the lowest offset
/// not yet handled. Pure.
#[derive(Debug)]
pub(crate) struct Watermark {
    first: Offset,
    handled: Vec<bool>,
    /// Every offset below `first + lowest` is handled.
    lowest: usize,
}

impl Watermark {
    /// A batch of `count` messages from offset `first`.
    pub(crate) fn new(first: Offset, count: usize) -> Watermark {
        assert!(first > 0 && count > 0, "a batch has offsets from 1");
        Watermark {
            first,
            handled: vec![false; count],
            lowest: 0,
        }
    }

    /// Marks `offset` handled (it must be in the batch, and not handled yet).
    pub(crate) fn handled(&mut self, offset: Offset) {
        let index = offset
            .checked_sub(self.first)
            .and_then(|index| usize::try_from(index).ok())
            .filter(|&index| index < self.handled.len())
            .unwrap_or_else(|| panic!("offset {offset} outside the batch"));
        assert!(!self.handled[index], "offset {offset} handled twice");
        self.handled[index] = true;
        while self.lowest < self.handled.len() && self.handled[self.lowest] {
            self.lowest += 1;
        }
    }

    /// The lowest offset not handled (one past the batch when all are).
    pub(crate) fn lowest_unhandled(&self) -> Offset {
        self.first + self.lowest as u64
    }
}

/// Which of two futures finished first.
enum First<A, B> {
    Left(A),
    Right(B),
}

/// Runs `left` and `right` together until one finishes (`left` is polled first); the other
/// is dropped.
async fn first<A, B>(left: impl Future<Output = A>, right: impl Future<Output = B>) -> First<A, B> {
    let mut left = pin!(left);
    let mut right = pin!(right);
    poll_fn(|cx| {
        if let Poll::Ready(value) = left.as_mut().poll(cx) {
            return Poll::Ready(First::Left(value));
        }
        right.as_mut().poll(cx).map(First::Right)
    })
    .await
}

/// `work`'s value, or `None` if `stop` is set first (or already).
async fn unless_stopped<T>(
    work: impl Future<Output = T>,
    stop: &mut watch::Receiver<bool>,
) -> Option<T> {
    if *stop.borrow() {
        return None;
    }
    // A dropped sender means the consumer is gone: stop too.
    match first(work, stop.wait_for(|&stopped| stopped)).await {
        First::Left(value) => Some(value),
        First::Right(_) => None,
    }
}

/// Locks `mutex`; a poisoned lock still holds consistent data (single-step sections).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Logs the settings a consumer runs with (at start, and after each change from the store).
fn log_settings(config: &ConsumerConfig, settings: &EffectiveSettings, what: &'static str) {
    tracing::info!(topic = %config.topic, group = %config.consumer_group,
            from_store = settings.from_store, retry_tiers = ?settings.retry_tiers,
            dead_letter_topic = ?settings.dead_letter_topic,
            max_in_flight = settings.max_in_flight,
            messages_per_s_max = ?settings.messages_per_s_max,
            bytes_per_s_max = ?settings.bytes_per_s_max,
            group_messages_per_s_max = ?settings.group_messages_per_s_max,
            group_bytes_per_s_max = ?settings.group_bytes_per_s_max,
            "{what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(offset: Offset, key: &str) -> Delivery {
        Delivery {
            topic: Arc::from("t"),
            queue: 0,
            offset,
            time_ms: 0,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn a_smaller_max_in_flight_takes_free_permits_at_once_and_the_rest_as_they_return() {
        let in_flight = InFlight::new(4);
        let held = [
            in_flight.acquire().await,
            in_flight.acquire().await,
            in_flight.acquire().await,
        ];
        in_flight.resize(1);
        assert_eq!(
            in_flight.permits.available_permits(),
            0,
            "the free one taken"
        );
        let [first, second, third] = held;
        drop(first);
        drop(second);
        assert_eq!(
            in_flight.permits.available_permits(),
            0,
            "two owed, forgotten"
        );
        drop(third);
        assert_eq!(in_flight.permits.available_permits(), 1, "the new limit");
        // Growing while permits are owed repays them first.
        let held = [in_flight.acquire().await];
        in_flight.resize(3);
        assert_eq!(in_flight.permits.available_permits(), 2);
        let more = [in_flight.acquire().await, in_flight.acquire().await];
        in_flight.resize(2);
        assert_eq!(lock(&in_flight.limit).owed, 1);
        in_flight.resize(4);
        assert_eq!(lock(&in_flight.limit).owed, 0);
        assert_eq!(in_flight.permits.available_permits(), 1);
        drop(held);
        drop(more);
        assert_eq!(in_flight.permits.available_permits(), 4);
    }

    #[test]
    fn the_watermark_is_the_lowest_offset_not_handled() {
        let mut watermark = Watermark::new(10, 4);
        assert_eq!(watermark.lowest_unhandled(), 10);
        watermark.handled(12);
        watermark.handled(11);
        assert_eq!(watermark.lowest_unhandled(), 10, "10 is still unhandled");
        watermark.handled(10);
        assert_eq!(watermark.lowest_unhandled(), 13);
        watermark.handled(13);
        assert_eq!(watermark.lowest_unhandled(), 14);
    }

    #[test]
    #[should_panic(expected = "handled twice")]
    fn a_message_handled_twice_is_a_bug() {
        let mut watermark = Watermark::new(1, 2);
        watermark.handled(1);
        watermark.handled(1);
    }

    #[test]
    fn chains_keep_each_keys_order_and_split_keyless_messages() {
        let batch = ["a", "b", "a", "", "b", "", "a"]
            .iter()
            .enumerate()
            .map(|(i, key)| delivery(i as u64 + 1, key))
            .collect();
        let offsets: Vec<Vec<Offset>> = chains_by_key(batch)
            .iter()
            .map(|chain| chain.iter().map(|d| d.offset).collect())
            .collect();
        assert_eq!(offsets, vec![vec![1, 3, 7], vec![2, 5], vec![4], vec![6]]);
    }

    #[test]
    fn a_batch_must_be_consecutive_from_where_it_was_asked() {
        let topic: Arc<str> = Arc::from("t");
        let message = |offset| api::StoredMessage {
            offset,
            time_ms: 0,
            key: Vec::new(),
            value: Vec::new(),
        };
        let response = |offsets: &[u64], next_offset| api::ConsumeResponse {
            error: None,
            messages: offsets.iter().map(|&offset| message(offset)).collect(),
            next_offset,
            end_offset: next_offset,
        };
        let ok = check_batch(&topic, 0, Some(5), response(&[5, 6], 7)).expect("good");
        assert_eq!((ok.start, ok.end()), (5, 7));
        let empty = check_batch(&topic, 0, None, response(&[], 9)).expect("good");
        assert_eq!((empty.start, empty.end()), (9, 9));
        assert!(check_batch(&topic, 0, Some(5), response(&[5, 7], 8)).is_err());
        assert!(check_batch(&topic, 0, Some(5), response(&[4, 5], 6)).is_err());
        assert!(check_batch(&topic, 0, Some(5), response(&[5, 6], 9)).is_err());
        assert!(check_batch(&topic, 0, None, response(&[], 0)).is_err());
    }
}
