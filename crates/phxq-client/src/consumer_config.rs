//! How a [`Consumer`](crate::Consumer) reaches its store, what it reads and how fast.
//!
//! A [`ConsumerConfig`] is plain data with defaults ([`ConsumerConfig::new`]);
//! [`Consumer::new`](crate::Consumer::new) validates it (the field at fault is named), so the
//! consumer never meets a bad value at run time. The fields it shares with a producer
//! (`servers`, `store_id`, `deadline`, `backoff_*`) mean the same and obey the same limits:
//! the consumer routes with the producer's router.

use std::time::Duration;

use phxq_types::{QueueId, validate_name};

use crate::config::ProducerConfig;
use crate::consumer_member::Membership;

/// Default for [`ConsumerConfig::max_in_flight`]: messages handled at once.
pub const MAX_IN_FLIGHT_DEFAULT: usize = 64;
/// Largest [`ConsumerConfig::max_in_flight`] accepted.
pub const MAX_IN_FLIGHT_LIMIT: usize = 10_000;
/// Default for [`ConsumerConfig::pull_messages_max`].
pub const PULL_MESSAGES_DEFAULT: u32 = 256;
/// Largest [`ConsumerConfig::pull_messages_max`] accepted (the server's limit per `Consume`).
pub const PULL_MESSAGES_LIMIT: u32 = 10_000;
/// Default for [`ConsumerConfig::pull_bytes_max`]: 4 MiB.
pub const PULL_BYTES_DEFAULT: u32 = 4 << 20;
/// Largest [`ConsumerConfig::pull_bytes_max`] accepted (the server's limit per `Consume`).
pub const PULL_BYTES_LIMIT: u32 = 64 << 20;
/// Default for [`ConsumerConfig::long_poll`]: how long a pull waits on an empty queue.
pub const LONG_POLL_DEFAULT: Duration = Duration::from_secs(5);
/// Longest [`ConsumerConfig::long_poll`] accepted (the server's limit per `Consume`).
pub const LONG_POLL_LIMIT: Duration = Duration::from_secs(60);
/// How much longer than its long poll a pull may wait for the answer before it counts as
/// lost (the server answers at the end of the wait; this covers the network and a slow round).
pub const LONG_POLL_MARGIN: Duration = Duration::from_secs(2);
/// Default for [`ConsumerConfig::commit_interval`].
pub const COMMIT_INTERVAL_DEFAULT: Duration = Duration::from_millis(200);
/// Shortest [`ConsumerConfig::commit_interval`] accepted.
pub const COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// Longest [`ConsumerConfig::commit_interval`] accepted.
pub const COMMIT_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Default for [`ConsumerConfig::deadline`]: one pull or commit with all its retries.
pub const CONSUMER_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);
/// Most names in [`ConsumerConfig::members`].
pub const MEMBERS_MAX: usize = 1024;
/// Default for [`ConsumerConfig::ack_timeout`]: how long a handler may take with one message.
pub const ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Shortest [`ConsumerConfig::ack_timeout`] accepted.
pub const ACK_TIMEOUT_MIN: Duration = Duration::from_millis(1);
/// Longest [`ConsumerConfig::ack_timeout`] accepted: a handler busy for longer than an hour
/// with one message is better split up.
pub const ACK_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Most tiers in [`ConsumerConfig::retry_tiers`].
pub const RETRY_TIERS_MAX: usize = 16;
/// Most failed deliveries one [`RetryTier`] may cover.
pub const RETRY_TIER_ATTEMPTS_MAX: u32 = 10_000;
/// Longest redelivery delay: of a [`RetryTier`], and of an [`Outcome::Retry`] (longer ones
/// are cut to it). A message waiting longer holds its key and its queue's cursor for that
/// long; park it in a topic of its own instead.
///
/// [`Outcome::Retry`]: crate::Outcome::Retry
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(3600);
/// Default for [`ConsumerConfig::settings_refresh`]: how often a running consumer re-reads
/// the store's settings of its (topic, consumer group).
pub const SETTINGS_REFRESH_DEFAULT: Duration = Duration::from_secs(5);
/// Shortest [`ConsumerConfig::settings_refresh`] accepted (each refresh is one
/// `ClusterStatus` call).
pub const SETTINGS_REFRESH_MIN: Duration = Duration::from_millis(100);
/// Longest [`ConsumerConfig::settings_refresh`] accepted.
pub const SETTINGS_REFRESH_MAX: Duration = Duration::from_secs(3600);
/// Most queues in [`ConsumerConfig::queues`] (a topic's most queues).
pub const QUEUES_LISTED_MAX: usize = 4096;

/// Which messages of a queue may be handled at once ([`ConsumerConfig::order`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HandlingOrder {
    /// One key's messages one at a time in offset order; different keys (and keyless
    /// messages) in parallel. The default.
    #[default]
    PerKey,
    /// A queue's messages one at a time in offset order, whatever their keys (queues still
    /// run in parallel): for handlers whose effects must follow the queue, as a printer's.
    PerQueue,
}

/// One step of the redelivery schedule ([`ConsumerConfig::retry_tiers`]): the next `attempts`
/// failed deliveries of a message are each followed by a wait of `delay`, then it is
/// delivered again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryTier {
    /// Failed deliveries this tier covers (from 1).
    pub attempts: u32,
    /// The wait after each of them before the next delivery.
    pub delay: Duration,
}

/// The default schedule: 3 quick retries (100 ms), 3 slower ones (1 s), then 10 s apart.
pub fn retry_tiers_default() -> Vec<RetryTier> {
    vec![
        RetryTier {
            attempts: 3,
            delay: Duration::from_millis(100),
        },
        RetryTier {
            attempts: 3,
            delay: Duration::from_secs(1),
        },
        RetryTier {
            attempts: 4,
            delay: Duration::from_secs(10),
        },
    ]
}

/// A consumer's settings. Build one with [`ConsumerConfig::new`] and change the fields you
/// need.
///
/// # The store's settings win
///
/// The operator may set, in the store, settings of a (topic, consumer group)
/// (`phxq topic alter NAME --settings-for GROUP --retry 3x1s,5x1m --dead-letter T
/// --rate-messages N --rate-bytes N --max-in-flight N`). [`Consumer::run`](crate::Consumer::run)
/// reads them when it starts and, **field by field, a setting the store has replaces the value
/// here**; a value here that the store also sets is ignored (not merged, not the lower of
/// the two), and one the store does not set stays:
///
/// | store setting | replaces |
/// |---|---|
/// | retry tiers (non-empty) | [`retry_tiers`](Self::retry_tiers) |
/// | dead-letter topic | [`dead_letter_topic`](Self::dead_letter_topic) |
/// | max in flight | [`max_in_flight`](Self::max_in_flight) |
/// | messages/s, bytes/s (**per consumer group**) | with a static list: [`messages_per_s_max`](Self::messages_per_s_max) / [`bytes_per_s_max`](Self::bytes_per_s_max) become the group's rate divided by the length of [`members`](Self::members) (an empty list counts as one; at least 1); with [`membership`](Self::membership): its `group_messages_per_s_max` / `group_bytes_per_s_max` (divided among the live members), and this consumer's own `messages_per_s_max` / `bytes_per_s_max` are dropped |
///
/// The result must pass [`validate`](Self::validate) like any config; a store setting the
/// library cannot accept (a delay above [`RETRY_DELAY_MAX`], more than
/// [`MAX_IN_FLIGHT_LIMIT`] in flight: the store allows more) makes `run` return
/// [`ConsumerError::Settings`](crate::ConsumerError::Settings) naming it, before anything is
/// consumed. The effective values are logged at start and reported in
/// [`ConsumerReport::settings`](crate::ConsumerReport::settings).
///
/// A running consumer re-reads them every [`settings_refresh`](Self::settings_refresh) and
/// applies a change in place (rates, max in flight, retry tiers, dead-letter topic; no queue
/// restarts, so nothing handled is lost or handled again); a change it cannot apply (the
/// same reasons, or a dead-letter topic the store lacks) is logged and ignored as a whole,
/// the previous values staying in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Client addresses (`host:port`) of some nodes of **one** store; one is enough.
    pub servers: Vec<String>,
    /// The store to read; 0 accepts whichever store `servers` belong to.
    pub store_id: u64,
    /// Where to dial nodes not reachable at their advertised address, as
    /// [`ProducerConfig::connect_via`]. Every call goes there: pulls, commits, heartbeats.
    pub connect_via: Vec<(String, String)>,
    /// The token sent on every call, as [`ProducerConfig::token`]: `consume` on the topic and
    /// group is enough for running a consumer (a dead-letter topic also needs `produce`).
    pub token: Option<String>,
    /// The store's CA, as [`ProducerConfig::ca`]: `Some` dials every node over TLS.
    pub ca: Option<crate::StoreCa>,
    /// The topic to read.
    pub topic: String,
    /// The consumer group reading it: its cursors are the ones read from and committed.
    pub consumer_group: String,
    /// The consumers of this group sharing the topic, by name; empty: this consumer reads
    /// every queue. Queues are divided among them by consistent hashing
    /// ([`assigned_queues`](crate::assigned_queues)). The list is **static**: a member that
    /// stops keeps its queues (nobody reads them) until the list given to every member
    /// changes. For live membership and takeover, leave it empty and set `membership`.
    pub members: Vec<String>,
    /// This consumer's name in `members` (ignored when `members` is empty).
    pub member: String,
    /// Read only these queues of the topic (`None`: the queues `members` assigns, all with an
    /// empty list). With a static list, the queues both name. Not with `membership` (the
    /// coordinator assigns). A queue the topic lacks makes `run` return `UNKNOWN_QUEUE`.
    pub queues: Option<Vec<QueueId>>,
    /// What may be handled at once within a queue. Default [`HandlingOrder::PerKey`].
    pub order: HandlingOrder,
    /// How often a running consumer re-reads the store's settings of its (topic, consumer
    /// group) and applies a change. Default [`SETTINGS_REFRESH_DEFAULT`],
    /// [`SETTINGS_REFRESH_MIN`] to [`SETTINGS_REFRESH_MAX`].
    pub settings_refresh: Duration,
    /// Live membership through the group coordinator (`None`: the static `members` list,
    /// which must then be empty when this is set). See [`Membership`].
    pub membership: Option<Membership>,
    /// Most messages handled at once by this consumer, all queues and keys together.
    /// Default [`MAX_IN_FLIGHT_DEFAULT`].
    pub max_in_flight: usize,
    /// Most messages per pull (`Consume`). Default [`PULL_MESSAGES_DEFAULT`].
    pub pull_messages_max: u32,
    /// Most bytes of keys and values per pull (one message may exceed it). Default
    /// [`PULL_BYTES_DEFAULT`].
    pub pull_bytes_max: u32,
    /// How long a pull waits for a message on an empty queue. Default [`LONG_POLL_DEFAULT`].
    pub long_poll: Duration,
    /// How often a queue's cursor is committed while there is something to commit: handled
    /// messages are committed together, at most about this long after they were handled.
    /// Default [`COMMIT_INTERVAL_DEFAULT`].
    pub commit_interval: Duration,
    /// Most messages handed to the handler per second by this consumer (redeliveries
    /// count); `None`: no limit.
    pub messages_per_s_max: Option<u32>,
    /// Most bytes (keys and values) handed to the handler per second by this consumer
    /// (redeliveries count); `None`: no limit.
    pub bytes_per_s_max: Option<u64>,
    /// How long one pull or commit may keep retrying (elections, lost nodes) before the
    /// consumer logs it and starts over. Default [`CONSUMER_DEADLINE_DEFAULT`]; must exceed
    /// `long_poll + LONG_POLL_MARGIN`.
    pub deadline: Duration,
    /// The first retry delay (doubling up to `backoff_max`), as for a producer.
    pub backoff_initial: Duration,
    /// The longest retry delay, as for a producer.
    pub backoff_max: Duration,
    /// How long a handler may take with one message. One that has not answered by then is
    /// a failed delivery: its future is dropped (cancelled at its next `.await`; work it
    /// spawned elsewhere, or a thread it blocks, is not stopped) and the message is
    /// delivered again after the [`retry_tiers`](Self::retry_tiers) delay. A draining
    /// consumer waits at most this long for its running handlers. Default
    /// [`ACK_TIMEOUT_DEFAULT`], [`ACK_TIMEOUT_MIN`] to [`ACK_TIMEOUT_MAX`].
    pub ack_timeout: Duration,
    /// The redelivery schedule after failed deliveries ([`Outcome::Nack`], an ack timeout,
    /// a handler panic; [`Outcome::Retry`] counts too, with its own delay): after failed
    /// delivery number `n` of a message, the wait is the delay of the tier `n` falls into
    /// (the first tier covers failures `1..=attempts`, the next the following ones, ...).
    /// After the last tier, the message goes to [`dead_letter_topic`](Self::dead_letter_topic)
    /// if one is set; otherwise the last tier's delay repeats forever (a message is never
    /// dropped). 1 to [`RETRY_TIERS_MAX`] tiers, each of 1 to [`RETRY_TIER_ATTEMPTS_MAX`]
    /// attempts and a delay of at most [`RETRY_DELAY_MAX`]. Default
    /// [`retry_tiers_default`].
    ///
    /// [`Outcome::Nack`]: crate::Outcome::Nack
    /// [`Outcome::Retry`]: crate::Outcome::Retry
    pub retry_tiers: Vec<RetryTier>,
    /// Where a message goes when every retry tier is used up: a topic of the same store
    /// (another than [`topic`](Self::topic)). It is produced there with the same key and
    /// value and a message id made of (consumer group, topic, queue, offset), so a produce
    /// repeated after a crash is deduplicated by the store (within the dead-letter topic's
    /// dedup window); only once that produce is acknowledged does the message count as
    /// handled. `None` (the default): no dead letters, the last tier repeats.
    pub dead_letter_topic: Option<String>,
}

impl ConsumerConfig {
    /// The defaults: `consumer_group` reads every queue of `topic` through `servers`.
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        topic: impl Into<String>,
        consumer_group: impl Into<String>,
    ) -> ConsumerConfig {
        let producer = ProducerConfig::new(servers);
        ConsumerConfig {
            servers: producer.servers,
            store_id: 0,
            connect_via: Vec::new(),
            token: None,
            ca: None,
            topic: topic.into(),
            consumer_group: consumer_group.into(),
            members: Vec::new(),
            member: String::new(),
            queues: None,
            order: HandlingOrder::PerKey,
            settings_refresh: SETTINGS_REFRESH_DEFAULT,
            membership: None,
            max_in_flight: MAX_IN_FLIGHT_DEFAULT,
            pull_messages_max: PULL_MESSAGES_DEFAULT,
            pull_bytes_max: PULL_BYTES_DEFAULT,
            long_poll: LONG_POLL_DEFAULT,
            commit_interval: COMMIT_INTERVAL_DEFAULT,
            messages_per_s_max: None,
            bytes_per_s_max: None,
            deadline: CONSUMER_DEADLINE_DEFAULT,
            backoff_initial: producer.backoff_initial,
            backoff_max: producer.backoff_max,
            ack_timeout: ACK_TIMEOUT_DEFAULT,
            retry_tiers: retry_tiers_default(),
            dead_letter_topic: None,
        }
    }

    /// The router settings: the producer's, with attempts long enough for a long poll.
    pub(crate) fn router_config(&self) -> ProducerConfig {
        let mut config = ProducerConfig::new(self.servers.clone());
        config.store_id = self.store_id;
        config.connect_via.clone_from(&self.connect_via);
        config.token.clone_from(&self.token);
        config.ca.clone_from(&self.ca);
        config.deadline = self.deadline;
        config.attempt_timeout = self.long_poll + LONG_POLL_MARGIN;
        config.backoff_initial = self.backoff_initial;
        config.backoff_max = self.backoff_max;
        config.queue_change_retry = false;
        config
    }

    /// Checks every field; the error names the field at fault.
    pub fn validate(&self) -> Result<(), ConsumerConfigError> {
        // The shared fields have the producer's names and limits.
        self.router_config()
            .validate()
            .map_err(|error| invalid(error.field, error.reason))?;
        validate_name(&self.topic).map_err(|error| invalid("topic", error.to_string()))?;
        validate_name(&self.consumer_group)
            .map_err(|error| invalid("consumer_group", error.to_string()))?;
        self.validate_members()?;
        if let Some(membership) = &self.membership {
            membership.validate()?;
            if !self.members.is_empty() {
                return Err(invalid(
                    "members",
                    "a static member list and live membership exclude each other",
                ));
            }
        }
        self.validate_queues()?;
        if !(SETTINGS_REFRESH_MIN..=SETTINGS_REFRESH_MAX).contains(&self.settings_refresh) {
            return Err(invalid(
                "settings_refresh",
                format!(
                    "{:?}; {SETTINGS_REFRESH_MIN:?} to {SETTINGS_REFRESH_MAX:?}",
                    self.settings_refresh
                ),
            ));
        }
        let within = |value: u64, limit: u64| (1..=limit).contains(&value);
        if !within(self.max_in_flight as u64, MAX_IN_FLIGHT_LIMIT as u64) {
            return Err(invalid(
                "max_in_flight",
                format!("{}; 1 to {MAX_IN_FLIGHT_LIMIT}", self.max_in_flight),
            ));
        }
        if !within(self.pull_messages_max.into(), PULL_MESSAGES_LIMIT.into()) {
            return Err(invalid(
                "pull_messages_max",
                format!("{}; 1 to {PULL_MESSAGES_LIMIT}", self.pull_messages_max),
            ));
        }
        if !within(self.pull_bytes_max.into(), PULL_BYTES_LIMIT.into()) {
            return Err(invalid(
                "pull_bytes_max",
                format!("{}; 1 to {PULL_BYTES_LIMIT}", self.pull_bytes_max),
            ));
        }
        if self.long_poll.is_zero() || self.long_poll > LONG_POLL_LIMIT {
            return Err(invalid(
                "long_poll",
                format!(
                    "{:?}; above zero, at most {LONG_POLL_LIMIT:?}",
                    self.long_poll
                ),
            ));
        }
        if self.deadline <= self.long_poll + LONG_POLL_MARGIN {
            return Err(invalid(
                "deadline",
                format!(
                    "{:?}; it must exceed long_poll + {LONG_POLL_MARGIN:?}",
                    self.deadline
                ),
            ));
        }
        if !(COMMIT_INTERVAL_MIN..=COMMIT_INTERVAL_MAX).contains(&self.commit_interval) {
            return Err(invalid(
                "commit_interval",
                format!(
                    "{:?}; {COMMIT_INTERVAL_MIN:?} to {COMMIT_INTERVAL_MAX:?}",
                    self.commit_interval
                ),
            ));
        }
        if self.messages_per_s_max == Some(0) {
            return Err(invalid("messages_per_s_max", "0; use None for no limit"));
        }
        if self.bytes_per_s_max == Some(0) {
            return Err(invalid("bytes_per_s_max", "0; use None for no limit"));
        }
        if !(ACK_TIMEOUT_MIN..=ACK_TIMEOUT_MAX).contains(&self.ack_timeout) {
            return Err(invalid(
                "ack_timeout",
                format!(
                    "{:?}; {ACK_TIMEOUT_MIN:?} to {ACK_TIMEOUT_MAX:?}",
                    self.ack_timeout
                ),
            ));
        }
        self.validate_retries()
    }

    fn validate_retries(&self) -> Result<(), ConsumerConfigError> {
        if self.retry_tiers.is_empty() || self.retry_tiers.len() > RETRY_TIERS_MAX {
            return Err(invalid(
                "retry_tiers",
                format!("{} tiers; 1 to {RETRY_TIERS_MAX}", self.retry_tiers.len()),
            ));
        }
        for (i, tier) in self.retry_tiers.iter().enumerate() {
            if !(1..=RETRY_TIER_ATTEMPTS_MAX).contains(&tier.attempts) {
                return Err(invalid(
                    format!("retry_tiers[{i}].attempts"),
                    format!("{}; 1 to {RETRY_TIER_ATTEMPTS_MAX}", tier.attempts),
                ));
            }
            if tier.delay > RETRY_DELAY_MAX {
                return Err(invalid(
                    format!("retry_tiers[{i}].delay"),
                    format!("{:?}; at most {RETRY_DELAY_MAX:?}", tier.delay),
                ));
            }
        }
        if let Some(topic) = &self.dead_letter_topic {
            validate_name(topic)
                .map_err(|error| invalid("dead_letter_topic", error.to_string()))?;
            if *topic == self.topic {
                return Err(invalid(
                    "dead_letter_topic",
                    format!("{topic:?} is the topic read: dead letters would come back"),
                ));
            }
        }
        Ok(())
    }

    /// The producer settings of the dead-letter produce: the router's, with the ids this
    /// consumer derives itself.
    pub(crate) fn dead_letter_producer_config(&self) -> ProducerConfig {
        let mut config = self.router_config();
        config.attempt_timeout = crate::config::ATTEMPT_TIMEOUT_DEFAULT.min(self.deadline);
        config
    }

    fn validate_queues(&self) -> Result<(), ConsumerConfigError> {
        let Some(queues) = &self.queues else {
            return Ok(());
        };
        if self.membership.is_some() {
            return Err(invalid(
                "queues",
                "a fixed queue list and live membership exclude each other",
            ));
        }
        if queues.is_empty() || queues.len() > QUEUES_LISTED_MAX {
            return Err(invalid(
                "queues",
                format!("{} queues; 1 to {QUEUES_LISTED_MAX}", queues.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, queue) in queues.iter().enumerate() {
            if !seen.insert(queue) {
                return Err(invalid(
                    format!("queues[{i}]"),
                    format!("queue {queue} twice"),
                ));
            }
        }
        Ok(())
    }

    fn validate_members(&self) -> Result<(), ConsumerConfigError> {
        if self.members.is_empty() {
            return Ok(());
        }
        if self.members.len() > MEMBERS_MAX {
            return Err(invalid(
                "members",
                format!("{} names; at most {MEMBERS_MAX}", self.members.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, name) in self.members.iter().enumerate() {
            if name.is_empty() {
                return Err(invalid(format!("members[{i}]"), "empty name"));
            }
            if !seen.insert(name) {
                return Err(invalid(format!("members[{i}]"), format!("{name:?} twice")));
            }
        }
        if !seen.contains(&self.member) {
            return Err(invalid(
                "member",
                format!("{:?} is not in members", self.member),
            ));
        }
        Ok(())
    }
}

/// Why a [`ConsumerConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("consumer config: {field}: {reason}")]
pub struct ConsumerConfigError {
    /// The field at fault (`topic`, `members[2]`, `long_poll`, ...).
    pub field: String,
    /// Why.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConsumerConfigError {
    ConsumerConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(change: fn(&mut ConsumerConfig)) -> Result<(), String> {
        let mut config = ConsumerConfig::new(["127.0.0.1:7100"], "orders", "audit");
        change(&mut config);
        config.validate().map_err(|error| error.field)
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(field(|_| {}), Ok(()));
    }

    #[test]
    fn every_bad_field_is_named() {
        let err = |name: &str| Err(name.to_string());
        assert_eq!(field(|c| c.servers.clear()), err("servers"));
        assert_eq!(field(|c| c.topic = "a b".into()), err("topic"));
        assert_eq!(field(|c| c.consumer_group.clear()), err("consumer_group"));
        assert_eq!(field(|c| c.max_in_flight = 0), err("max_in_flight"));
        assert_eq!(
            field(|c| c.pull_messages_max = 10_001),
            err("pull_messages_max")
        );
        assert_eq!(field(|c| c.pull_bytes_max = 0), err("pull_bytes_max"));
        assert_eq!(field(|c| c.long_poll = Duration::ZERO), err("long_poll"));
        assert_eq!(
            field(|c| c.deadline = Duration::from_secs(6)),
            err("deadline")
        );
        assert_eq!(
            field(|c| c.commit_interval = Duration::ZERO),
            err("commit_interval")
        );
        assert_eq!(
            field(|c| c.messages_per_s_max = Some(0)),
            err("messages_per_s_max")
        );
        assert_eq!(
            field(|c| c.bytes_per_s_max = Some(0)),
            err("bytes_per_s_max")
        );
        assert_eq!(
            field(|c| c.backoff_initial = Duration::ZERO),
            err("backoff_initial")
        );
        assert_eq!(
            field(|c| c.ack_timeout = Duration::ZERO),
            err("ack_timeout")
        );
        assert_eq!(
            field(|c| c.ack_timeout = Duration::from_secs(3601)),
            err("ack_timeout")
        );
        assert_eq!(
            field(|c| c.settings_refresh = Duration::from_millis(99)),
            err("settings_refresh")
        );
        assert_eq!(field(|c| c.queues = Some(Vec::new())), err("queues"));
        assert_eq!(field(|c| c.queues = Some(vec![3, 1, 3])), err("queues[2]"));
        assert_eq!(
            field(|c| {
                c.queues = Some(vec![1]);
                c.membership = Some(Membership::new("m"));
            }),
            err("queues")
        );
        assert_eq!(field(|c| c.queues = Some(vec![3, 1])), Ok(()));
    }

    #[test]
    fn retry_tiers_and_the_dead_letter_topic_are_checked() {
        let err = |name: &str| Err(name.to_string());
        fn tier(attempts: u32, delay_ms: u64) -> RetryTier {
            RetryTier {
                attempts,
                delay: Duration::from_millis(delay_ms),
            }
        }
        assert_eq!(field(|c| c.retry_tiers.clear()), err("retry_tiers"));
        assert_eq!(
            field(|c| c.retry_tiers = vec![tier(1, 0); RETRY_TIERS_MAX + 1]),
            err("retry_tiers")
        );
        assert_eq!(
            field(|c| c.retry_tiers = vec![tier(2, 10), tier(0, 10)]),
            err("retry_tiers[1].attempts")
        );
        assert_eq!(
            field(|c| c.retry_tiers = vec![tier(RETRY_TIER_ATTEMPTS_MAX + 1, 10)]),
            err("retry_tiers[0].attempts")
        );
        assert_eq!(
            field(|c| c.retry_tiers = vec![tier(1, 3_600_001)]),
            err("retry_tiers[0].delay")
        );
        assert_eq!(field(|c| c.retry_tiers = vec![tier(1, 0)]), Ok(()));
        assert_eq!(
            field(|c| c.dead_letter_topic = Some("orders".into())),
            err("dead_letter_topic")
        );
        assert_eq!(
            field(|c| c.dead_letter_topic = Some("no spaces".into())),
            err("dead_letter_topic")
        );
        assert_eq!(
            field(|c| c.dead_letter_topic = Some("orders-dead".into())),
            Ok(())
        );
    }

    #[test]
    fn members_must_be_distinct_names_that_include_this_consumer() {
        let err = |name: &str| Err(name.to_string());
        assert_eq!(
            field(|c| c.members = vec!["a".into(), "b".into()]),
            err("member")
        );
        assert_eq!(
            field(|c| {
                c.members = vec!["a".into(), "a".into()];
                c.member = "a".into();
            }),
            err("members[1]")
        );
        assert_eq!(
            field(|c| {
                c.members = vec!["a".into(), String::new()];
                c.member = "a".into();
            }),
            err("members[1]")
        );
        assert_eq!(
            field(|c| {
                c.members = vec!["a".into(), "b".into()];
                c.member = "b".into();
            }),
            Ok(())
        );
    }
}
