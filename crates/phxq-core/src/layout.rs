//! The store's layout: how many groups, which topics, which consumer groups read them.
//!
//! Every node of a store is started with the same layout (from its config file). Its topics
//! are the *bootstrap* topic table: each replication group starts from it, then changes its
//! own copy only by applying replicated `PutTopic`/`DeleteTopic` commands (see
//! `GroupMachine`), so topics created through the API are not in any file.

use std::collections::BTreeMap;

use phxq_types::{
    CONSUMER_GROUPS_PER_TOPIC_MAX, DEDUP_WINDOW_MAX, ErrorCode, GroupId, QUEUES_PER_TOPIC_MAX,
    QueueId, RETENTION_AGE_MS_MAX, TOPICS_MAX, group_of_queue, validate_name,
};

/// How long consumed data is kept, per topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per queue behind the slowest consumer group (replay window, by count).
    pub replay_count: u64,
    /// Milliseconds of messages kept behind the slowest consumer group (replay window, by age).
    pub replay_age_ms: u64,
    /// Messages older than this are deletable even if unconsumed (`None`: no age cap).
    pub max_age_ms: Option<u64>,
    /// Per queue, the oldest messages beyond this many bytes are deletable even if unconsumed.
    pub max_bytes: Option<u64>,
}

/// One topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Its name (see `phxq_types::validate_name`).
    pub name: String,
    /// Number of queues, numbered `0..queues`.
    pub queues: u32,
    /// The consumer groups subscribed to it; each has its own cursor per queue.
    pub consumer_groups: Vec<String>,
    /// How long data is kept.
    pub retention: Retention,
    /// How many producer message ids each queue remembers (its newest ones): an enqueue whose
    /// id is among them appends nothing and is answered with the first one's offsets. 0 turns
    /// deduplication off (ids are still checked, then ignored). At most `DEDUP_WINDOW_MAX`.
    pub dedup_window: u32,
    /// Settings of consumer groups that have any, by name (each one of `consumer_groups`).
    /// The store validates, replicates and reports them; consumers apply them.
    pub group_settings: BTreeMap<String, ConsumerGroupSettings>,
}

/// How a consumer group handles a topic's messages: what the consumer library applies. All
/// optional: the default is no retry tiers, no dead-letter topic, no limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerGroupSettings {
    /// A failed message is redelivered by these tiers in order: `attempts` more deliveries,
    /// each `delay_ms` after the failure, then the next tier. At most [`RETRY_TIERS_MAX`].
    pub retry_tiers: Vec<RetryTier>,
    /// Where a message goes once the tiers are spent (a topic name; not this topic).
    pub dead_letter_topic: Option<String>,
    /// Messages handled per second at most, over the group's consumers of a queue.
    pub rate_messages_per_s: Option<u64>,
    /// Bytes (keys and values) handled per second at most.
    pub rate_bytes_per_s: Option<u64>,
    /// Messages being handled at once at most.
    pub max_in_flight: Option<u32>,
}

/// One retry tier of a consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryTier {
    /// Deliveries in this tier, 1 to [`RETRY_ATTEMPTS_MAX`].
    pub attempts: u32,
    /// Wait before each of them, in ms, at most [`RETRY_DELAY_MS_MAX`].
    pub delay_ms: u64,
}

/// Most retry tiers of a consumer group.
pub const RETRY_TIERS_MAX: usize = 8;
/// Most attempts in one retry tier.
pub const RETRY_ATTEMPTS_MAX: u32 = 1_000;
/// Longest delay of a retry tier, in ms (one week).
pub const RETRY_DELAY_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Largest rate limit in messages per second (beyond, a limit is no limit: a mistake).
pub const RATE_MESSAGES_PER_S_MAX: u64 = 100_000_000;
/// Largest rate limit in bytes per second (100 GB/s).
pub const RATE_BYTES_PER_S_MAX: u64 = 100_000_000_000;
/// Largest max-in-flight of a consumer group.
pub const MAX_IN_FLIGHT_MAX: u32 = 1_000_000;

/// Everything a store's nodes must agree on to apply the log the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLayout {
    /// Replication groups in the store (queue `q` lives in group `q mod groups`).
    pub groups: u32,
    /// The topics.
    pub topics: Vec<TopicConfig>,
    /// Largest message value accepted, in bytes.
    pub message_bytes_max: usize,
}

/// Why a layout was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Described in the message.
    #[error("{0}")]
    Invalid(String),
}

/// Most replication groups a store may have.
const GROUPS_MAX: u32 = 1024;

impl StoreLayout {
    /// Checks names, counts and limits; duplicate topics or consumer groups are refused.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.groups == 0 || self.groups > GROUPS_MAX {
            return Err(invalid(format!(
                "groups is {}; it must be 1 to {GROUPS_MAX}",
                self.groups
            )));
        }
        if self.message_bytes_max == 0 {
            return Err(invalid("message_bytes_max must be at least 1".to_string()));
        }
        if self.topics.len() > TOPICS_MAX {
            return Err(invalid(format!(
                "{} topics; at most {TOPICS_MAX}",
                self.topics.len()
            )));
        }
        for (position, topic) in self.topics.iter().enumerate() {
            topic.check().map_err(|(_, message)| invalid(message))?;
            if self.topics[..position].iter().any(|t| t.name == topic.name) {
                return Err(invalid(format!("topic {:?} is listed twice", topic.name)));
            }
        }
        crate::machine::check_layout(self.groups, &self.topics).map_err(invalid)
    }

    /// The topic called `name`.
    pub fn topic(&self, name: &str) -> Option<&TopicConfig> {
        self.topics.iter().find(|topic| topic.name == name)
    }

    /// The `(topic, queue)` pairs hosted by `group`, in topic then queue order.
    pub fn queues_of_group(&self, group: GroupId) -> Vec<(&TopicConfig, QueueId)> {
        self.topics
            .iter()
            .flat_map(|topic| (0..topic.queues).map(move |queue| (topic, queue)))
            .filter(|&(_, queue)| group_of_queue(queue, self.groups) == group)
            .collect()
    }
}

impl TopicConfig {
    /// Checks the topic's name, queue count, consumer groups and limits; a refusal carries
    /// its stable code (`INVALID_NAME` for a name, `INVALID_ARGUMENT` for the rest) and a
    /// sentence for people. Deterministic: replicas run it when applying a `PutTopic`.
    pub fn check(&self) -> Result<(), (ErrorCode, String)> {
        let argument = |message: String| Err((ErrorCode::InvalidArgument, message));
        validate_name(&self.name).map_err(|error| {
            (
                ErrorCode::InvalidName,
                format!("topic name {:?}: {error}", self.name),
            )
        })?;
        for (position, consumer_group) in self.consumer_groups.iter().enumerate() {
            validate_name(consumer_group).map_err(|error| {
                (
                    ErrorCode::InvalidName,
                    format!(
                        "consumer group {consumer_group:?} of topic {:?}: {error}",
                        self.name
                    ),
                )
            })?;
            if self.consumer_groups[..position].contains(consumer_group) {
                return argument(format!(
                    "consumer group {consumer_group:?} is listed twice in topic {:?}",
                    self.name
                ));
            }
        }
        if self.consumer_groups.len() > CONSUMER_GROUPS_PER_TOPIC_MAX {
            return argument(format!(
                "topic {:?} has {} consumer groups; at most {CONSUMER_GROUPS_PER_TOPIC_MAX}",
                self.name,
                self.consumer_groups.len()
            ));
        }
        if self.queues == 0 || self.queues > QUEUES_PER_TOPIC_MAX {
            return argument(format!(
                "topic {:?} has {} queues; it must have 1 to {QUEUES_PER_TOPIC_MAX}",
                self.name, self.queues
            ));
        }
        if self.dedup_window > DEDUP_WINDOW_MAX {
            return argument(format!(
                "topic {:?} has a dedup window of {} ids; at most {DEDUP_WINDOW_MAX}",
                self.name, self.dedup_window
            ));
        }
        self.retention.check(&self.name).or_else(argument)?;
        for (group, settings) in &self.group_settings {
            if !self.consumer_groups.contains(group) {
                return argument(format!(
                    "topic {:?} has settings for {group:?}, which is not one of its consumer \
                     groups",
                    self.name
                ));
            }
            settings.check(&self.name, group)?;
        }
        Ok(())
    }
}

impl ConsumerGroupSettings {
    /// Every limit in range; the dead-letter topic a valid name other than `topic`.
    fn check(&self, topic: &str, group: &str) -> Result<(), (ErrorCode, String)> {
        let argument = |what: String| {
            Err((
                ErrorCode::InvalidArgument,
                format!("consumer group {group:?} of topic {topic:?}: {what}"),
            ))
        };
        if self.retry_tiers.len() > RETRY_TIERS_MAX {
            return argument(format!(
                "{} retry tiers; at most {RETRY_TIERS_MAX}",
                self.retry_tiers.len()
            ));
        }
        for tier in &self.retry_tiers {
            if tier.attempts == 0 || tier.attempts > RETRY_ATTEMPTS_MAX {
                return argument(format!(
                    "a retry tier of {} attempts; 1 to {RETRY_ATTEMPTS_MAX}",
                    tier.attempts
                ));
            }
            if tier.delay_ms > RETRY_DELAY_MS_MAX {
                return argument(format!(
                    "a retry delay of {} ms; at most {RETRY_DELAY_MS_MAX} (a week)",
                    tier.delay_ms
                ));
            }
        }
        if let Some(dead_letter) = &self.dead_letter_topic {
            validate_name(dead_letter).map_err(|error| {
                (
                    ErrorCode::InvalidName,
                    format!("dead-letter topic of {group:?}: {error}"),
                )
            })?;
            if dead_letter == topic {
                return argument("the dead-letter topic is the topic itself".to_string());
            }
        }
        let limits = [
            (
                "messages/s",
                self.rate_messages_per_s,
                RATE_MESSAGES_PER_S_MAX,
            ),
            ("bytes/s", self.rate_bytes_per_s, RATE_BYTES_PER_S_MAX),
            (
                "max in flight",
                self.max_in_flight.map(u64::from),
                u64::from(MAX_IN_FLIGHT_MAX),
            ),
        ];
        for (what, limit, max) in limits {
            if let Some(limit) = limit
                && (limit == 0 || limit > max)
            {
                return argument(format!("{what} limit of {limit}; 1 to {max} (or none)"));
            }
        }
        Ok(())
    }
}

impl Retention {
    /// Ages within [`RETENTION_AGE_MS_MAX`]; caps, when set, at least 1 (a cap of 0 would
    /// release every message at once: surely a mistake).
    fn check(&self, topic: &str) -> Result<(), String> {
        let ages = [
            ("replay age", Some(self.replay_age_ms)),
            ("max age", self.max_age_ms),
        ];
        for (what, age) in ages {
            if let Some(age) = age
                && age > RETENTION_AGE_MS_MAX
            {
                return Err(format!(
                    "topic {topic:?}: {what} of {age} ms; at most {RETENTION_AGE_MS_MAX} ms \
                     (100 years)"
                ));
            }
        }
        if self.max_age_ms == Some(0) || self.max_bytes == Some(0) {
            return Err(format!(
                "topic {topic:?}: a max age or max bytes cap of 0 would delete every message; \
                 leave it unset for no cap"
            ));
        }
        Ok(())
    }
}

fn invalid(message: String) -> LayoutError {
    LayoutError::Invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention() -> Retention {
        Retention {
            replay_count: 0,
            replay_age_ms: 0,
            max_age_ms: None,
            max_bytes: None,
        }
    }

    fn topic(name: &str, queues: u32, consumer_groups: &[&str]) -> TopicConfig {
        TopicConfig {
            name: name.to_string(),
            queues,
            consumer_groups: consumer_groups.iter().map(|g| g.to_string()).collect(),
            retention: retention(),
            dedup_window: 10,
            group_settings: BTreeMap::new(),
        }
    }

    fn layout() -> StoreLayout {
        StoreLayout {
            groups: 3,
            topics: vec![
                topic("orders", 5, &["billing", "audit"]),
                topic("logs", 2, &[]),
            ],
            message_bytes_max: 1024,
        }
    }

    fn refusal(change: impl FnOnce(&mut StoreLayout)) -> String {
        let mut layout = layout();
        change(&mut layout);
        match layout.validate() {
            Err(LayoutError::Invalid(message)) => message,
            Ok(()) => panic!("layout accepted: {layout:?}"),
        }
    }

    #[test]
    fn a_sound_layout_is_accepted_and_its_topics_found_by_name() {
        let layout = layout();
        assert_eq!(layout.validate(), Ok(()));
        assert_eq!(layout.topic("logs").map(|t| t.queues), Some(2));
        assert_eq!(layout.topic("nope"), None);
    }

    #[test]
    fn each_broken_rule_is_refused_with_a_reason() {
        assert!(refusal(|l| l.groups = 0).contains("groups"));
        assert!(refusal(|l| l.groups = GROUPS_MAX + 1).contains("groups"));
        assert!(refusal(|l| l.message_bytes_max = 0).contains("message_bytes_max"));
        assert!(refusal(|l| l.topics[0].name = "bad name".into()).contains("topic name"));
        assert!(refusal(|l| l.topics[0].queues = 0).contains("queues"));
        assert!(refusal(|l| l.topics[0].queues = QUEUES_PER_TOPIC_MAX + 1).contains("queues"));
        assert!(refusal(|l| l.topics[1].name = "orders".into()).contains("twice"));
        assert!(refusal(|l| l.topics[0].dedup_window = DEDUP_WINDOW_MAX + 1).contains("dedup"));
        assert!(refusal(|l| l.topics[0].consumer_groups[1] = "".into()).contains("consumer"));
        assert!(refusal(|l| l.topics[0].consumer_groups[1] = "billing".into()).contains("twice"));
        assert!(refusal(|l| l.topics[0].retention.max_age_ms = Some(0)).contains("cap of 0"));
        assert!(refusal(|l| l.topics[0].retention.max_bytes = Some(0)).contains("cap of 0"));
        let too_old = RETENTION_AGE_MS_MAX + 1;
        assert!(refusal(|l| l.topics[0].retention.replay_age_ms = too_old).contains("100 years"));
        assert!(refusal(|l| l.topics[0].retention.max_age_ms = Some(too_old)).contains("max age"));
        let many = (0..=CONSUMER_GROUPS_PER_TOPIC_MAX)
            .map(|g| format!("g{g}"))
            .collect();
        assert!(refusal(|l| l.topics[0].consumer_groups = many).contains("consumer groups"));
    }

    #[test]
    fn a_bad_name_is_invalid_name_and_anything_else_invalid_argument() {
        let mut topic = layout().topics[0].clone();
        topic.name = "a b".into();
        assert_eq!(topic.check().unwrap_err().0, ErrorCode::InvalidName);
        let mut topic = layout().topics[0].clone();
        topic.queues = 0;
        assert_eq!(topic.check().unwrap_err().0, ErrorCode::InvalidArgument);
    }

    #[test]
    fn consumer_group_settings_are_checked_limit_by_limit() {
        let refused = |change: &dyn Fn(&mut ConsumerGroupSettings)| {
            let mut settings = ConsumerGroupSettings {
                retry_tiers: vec![RetryTier {
                    attempts: 3,
                    delay_ms: 1000,
                }],
                dead_letter_topic: Some("orders.dead".into()),
                rate_messages_per_s: Some(100),
                rate_bytes_per_s: Some(1 << 20),
                max_in_flight: Some(64),
            };
            change(&mut settings);
            let mut layout = layout();
            layout.topics[0]
                .group_settings
                .insert("billing".into(), settings);
            layout.validate().err().map(|e| e.to_string())
        };
        assert_eq!(refused(&|_| {}), None);
        assert_eq!(refused(&|s| *s = ConsumerGroupSettings::default()), None);
        let tier = |attempts, delay_ms| RetryTier { attempts, delay_ms };
        type Change<'a> = &'a dyn Fn(&mut ConsumerGroupSettings);
        let cases: [(Change, &str); 9] = [
            (&|s| s.retry_tiers[0].attempts = 0, "attempts"),
            (
                &|s| s.retry_tiers[0].delay_ms = RETRY_DELAY_MS_MAX + 1,
                "delay",
            ),
            (
                &|s| s.retry_tiers = vec![tier(1, 1); RETRY_TIERS_MAX + 1],
                "tiers",
            ),
            (&|s| s.dead_letter_topic = Some("orders".into()), "itself"),
            (&|s| s.dead_letter_topic = Some("a b".into()), "dead-letter"),
            (&|s| s.rate_messages_per_s = Some(0), "messages/s"),
            (
                &|s| s.rate_bytes_per_s = Some(RATE_BYTES_PER_S_MAX + 1),
                "bytes/s",
            ),
            (&|s| s.max_in_flight = Some(0), "in flight"),
            (
                &|s| s.max_in_flight = Some(MAX_IN_FLIGHT_MAX + 1),
                "in flight",
            ),
        ];
        for (change, reason) in cases {
            let message = refused(change).expect("refused");
            assert!(message.contains(reason), "{message} lacks {reason}");
        }
        let mut layout = layout();
        layout.topics[1]
            .group_settings
            .insert("stranger".into(), Default::default());
        assert!(
            layout
                .validate()
                .unwrap_err()
                .to_string()
                .contains("not one of its")
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let mut layout = layout();
        layout.groups = GROUPS_MAX;
        layout.topics[0].queues = QUEUES_PER_TOPIC_MAX;
        layout.message_bytes_max = 1;
        layout.topics[0].dedup_window = DEDUP_WINDOW_MAX;
        assert_eq!(layout.validate(), Ok(()));
    }

    #[test]
    fn a_group_hosts_every_queue_congruent_to_it_in_topic_then_queue_order() {
        let layout = layout();
        let hosted = |group| {
            layout
                .queues_of_group(GroupId(group))
                .into_iter()
                .map(|(topic, queue)| (topic.name.as_str(), queue))
                .collect::<Vec<_>>()
        };
        assert_eq!(hosted(0), [("orders", 0), ("orders", 3), ("logs", 0)]);
        assert_eq!(hosted(1), [("orders", 1), ("orders", 4), ("logs", 1)]);
        assert_eq!(hosted(2), [("orders", 2)]);
        assert_eq!(hosted(3), []);
    }
}
