//! The group's topic table, changed by `PutTopic` and `DeleteTopic`.
//!
//! Every group keeps its own table: a topic exists in a group once that group applied its
//! `PutTopic`, and the CLI sends the same command to every group. The rules, checked the same
//! way at admission and at apply (so every replica agrees):
//! - a config must pass [`TopicConfig::check`]; the table holds at most [`TOPICS_MAX`];
//! - create: refused with `TOPIC_EXISTS` if the name exists with another config; the same
//!   config again changes nothing (a fan-out that failed half way can be re-run);
//! - alter: the topic must exist (`UNKNOWN_TOPIC`); the queue count may grow, never shrink
//!   (`INVALID_ARGUMENT`: a shrunk queue's messages and cursors would be orphaned); the same
//!   config changes nothing;
//! - a queue that appears (new topic, or grown) starts empty with every cursor at 1; a consumer
//!   group added by an alter starts at 1 on every queue (the oldest retained message), one
//!   removed loses its cursors and deliveries, the others keep theirs;
//! - the topic's queues and cursors (queues hosted here × consumer groups) must fit the
//!   group's snapshot budget with everything else it holds (`STATE_BUDGET_EXCEEDED`, see the
//!   `budget` module); an alter that lowers the dedup window pushes the oldest ids out of
//!   every window at once;
//! - delete: the topic must exist; its queues' state is dropped, so their runs no longer hold
//!   back [`GroupMachine::deletable_index`].
//!
//! A queue created in the middle of an entry must not claim that entry's earlier enqueues to
//! it (refused then: no such queue, or another incarnation of the topic): they are marked
//! skipped in the new queue, as duplicates are, so reading never serves them.

use phxq_types::{ErrorCode, TOPICS_MAX};

use super::delivery::Deliveries;
use super::queue::QueueState;
use super::{GroupMachine, TopicState};
use crate::{Command, PutMode, TopicConfig};

impl GroupMachine {
    /// Whether the topic change `command` (a `PutTopic` or `DeleteTopic`) may apply, and
    /// whether it would change anything; a refusal carries its code and a reason for people.
    pub fn check_topic_change(&self, command: &Command) -> Result<bool, (ErrorCode, String)> {
        match command {
            Command::PutTopic { config, mode } => self.check_put(config, *mode),
            Command::DeleteTopic { name } => match self.topic(name) {
                Some(_) => Ok(true),
                None => Err(unknown(name)),
            },
            other => panic!("not a topic change: {other:?}"),
        }
    }

    fn check_put(&self, config: &TopicConfig, mode: PutMode) -> Result<bool, (ErrorCode, String)> {
        let changed = self.check_put_rules(config, mode)?;
        if changed {
            let what = format!(
                "topic {:?} ({} queues, {} consumer groups, dedup window {})",
                config.name,
                config.queues,
                config.consumer_groups.len(),
                config.dedup_window
            );
            self.check_state_budget(self.state_after_put(config), &what)?;
        }
        Ok(changed)
    }

    fn check_put_rules(
        &self,
        config: &TopicConfig,
        mode: PutMode,
    ) -> Result<bool, (ErrorCode, String)> {
        config.check()?;
        let Some(existing) = self.topic(&config.name) else {
            if mode == PutMode::Alter {
                return Err(unknown(&config.name));
            }
            if self.topics.len() >= TOPICS_MAX {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!("the store has {TOPICS_MAX} topics, the most it may have"),
                ));
            }
            return Ok(true);
        };
        if existing == config {
            return Ok(false);
        }
        if mode == PutMode::Create {
            return Err((
                ErrorCode::TopicExists,
                format!(
                    "topic {:?} exists with another configuration ({} queues, consumer groups \
                     {:?}); alter it instead",
                    config.name, existing.queues, existing.consumer_groups
                ),
            ));
        }
        if config.queues < existing.queues {
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "topic {:?} has {} queues; an alter may add queues but not remove them \
                     (asked for {})",
                    config.name, existing.queues, config.queues
                ),
            ));
        }
        Ok(true)
    }

    /// Applies a checked `PutTopic` at position `earlier.len()` of entry `index`; returns
    /// whether the table changed.
    pub(super) fn put_topic(
        &mut self,
        index: u64,
        config: &TopicConfig,
        earlier: &[Command],
    ) -> bool {
        let (group, groups) = (self.group, self.layout.groups);
        let position = self
            .topics
            .iter()
            .position(|t| t.config.name == config.name);
        let (topic, first_new_slot) = match position {
            None => {
                self.topics
                    .push(TopicState::new(config.clone(), group, groups));
                (self.topics.last_mut().expect("pushed"), 0)
            }
            Some(position) => {
                let topic = &mut self.topics[position];
                if topic.config == *config {
                    return false;
                }
                let first_new_slot = topic.queues.len();
                alter(topic, config, group, groups, index);
                (topic, first_new_slot)
            }
        };
        // Earlier enqueues of this entry to a queue that did not exist then (or was a deleted
        // incarnation's) took none of its offsets: reading must pass over them.
        for (slot, queue) in topic.queues.iter_mut().enumerate().skip(first_new_slot) {
            let queue_id = queue_of_slot(slot, group, groups);
            for (position, command) in earlier.iter().enumerate() {
                if let Command::Enqueue {
                    topic: name,
                    queue: target,
                    ..
                } = command
                    && *name == config.name
                    && *target == queue_id
                {
                    queue.skip(index, position);
                }
            }
        }
        self.topics_changed_index = index;
        true
    }

    /// Applies a checked `DeleteTopic` at entry `index`.
    pub(super) fn delete_topic(&mut self, index: u64, name: &str) {
        self.topics.retain(|topic| topic.config.name != name);
        self.topics_changed_index = index;
    }
}

/// Changes `topic` to `config` (same name, at least as many queues): new queues start empty,
/// cursors follow their consumer group by name.
/// A lowered dedup window pushes the oldest ids out of every window at once, by entry `index`.
fn alter(
    topic: &mut TopicState,
    config: &TopicConfig,
    group: phxq_types::GroupId,
    groups: u32,
    index: u64,
) {
    let old_groups = &topic.config.consumer_groups;
    let moves: Vec<Option<usize>> = (config.consumer_groups.iter())
        .map(|name| old_groups.iter().position(|old| old == name))
        .collect();
    for queue in &mut topic.queues {
        queue.dedup.trim(config.dedup_window, index);
        queue.cursors = moves
            .iter()
            .map(|old| old.map_or(1, |old| queue.cursors[old]))
            .collect();
        let mut deliveries = std::mem::take(&mut queue.deliveries);
        queue.deliveries = moves
            .iter()
            .map(|old| {
                old.map_or_else(
                    || Deliveries::at(1),
                    |old| std::mem::replace(&mut deliveries[old], Deliveries::at(1)),
                )
            })
            .collect();
    }
    let hosted = super::budget::hosted_count(config.queues, group, groups);
    let consumer_groups = config.consumer_groups.len();
    topic
        .queues
        .resize_with(hosted, || QueueState::new(consumer_groups));
    topic.config = config.clone();
}

/// The queue at `slot` of a topic's hosted queues.
fn queue_of_slot(slot: usize, group: phxq_types::GroupId, groups: u32) -> u32 {
    u32::try_from(slot as u64 * u64::from(groups) + group.0).expect("queue numbers fit u32")
}

fn unknown(name: &str) -> (ErrorCode, String) {
    (
        ErrorCode::UnknownTopic,
        format!("no topic {name:?} in this store"),
    )
}
