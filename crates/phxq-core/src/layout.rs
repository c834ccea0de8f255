//! The store's layout: how many groups, which topics, which consumer groups read them.
//!
//! Every node of a store is started with the same layout (from its config file). Its topics
//! are the *bootstrap* topic table: each replication group starts from it, then changes its
//! own copy only by applying replicated `PutTopic`/`DeleteTopic` commands (see
//! `GroupMachine`), so topics created through the API are not in any file.

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
}

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
        Ok(())
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
        self.retention.check(&self.name).or_else(argument)
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
        let many = (0..=CONSUMER_GROUPS_PER_TOPIC_MAX).map(|g| format!("g{g}")).collect();
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
