//! What happens to a message after a failed delivery: the retry schedule and the
//! dead-letter message id. Pure: the consumer feeds in failure counts and sleeps for it.
//!
//! * **Schedule.** After failed delivery number `n` of a message (a nack, an ack timeout, a
//!   panic), the wait before the next delivery is the delay of the tier `n` falls into: the
//!   first tier covers failures `1..=attempts[0]`, the second the next `attempts[1]`, and so
//!   on. Past the last tier the message is dead-lettered when the consumer has a dead-letter
//!   topic, otherwise the last tier's delay repeats: a message is never dropped.
//! * **Dead-letter ids.** The produce to the dead-letter topic carries a message id that is a
//!   function of (consumer group, topic, queue, offset) only, so every consumer of the group
//!   that ever dead-letters this message (a retry of the produce, a restart, a takeover)
//!   sends the same id and the store keeps one copy within its dedup window.

use std::time::Duration;

use phxq_types::{MESSAGE_ID_BYTES_MAX, Offset, QueueId};

use crate::consumer_config::{RETRY_DELAY_MAX, RetryTier};
use crate::key::fnv1a_64;

/// What to do after a failed delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Deliver it again after this wait.
    Redeliver(Duration),
    /// Every tier is used up: produce it to the dead-letter topic.
    DeadLetter,
}

/// The step after failed delivery number `failures` (from 1) under `tiers` (validated: not
/// empty). `explicit` is the handler's own delay ([`crate::Outcome::Retry`]), used instead
/// of the tier's (cut to [`RETRY_DELAY_MAX`]); it still counts against the tiers.
pub(crate) fn after_failure(
    tiers: &[RetryTier],
    failures: u32,
    explicit: Option<Duration>,
    dead_letter: bool,
) -> Next {
    assert!(failures >= 1, "called after a failure");
    let mut covered: u64 = 0;
    let mut tier_delay = None;
    for tier in tiers {
        covered += u64::from(tier.attempts);
        if u64::from(failures) <= covered {
            tier_delay = Some(tier.delay);
            break;
        }
    }
    let delay = match tier_delay {
        Some(delay) => delay,
        None if dead_letter => return Next::DeadLetter,
        None => tiers.last().expect("validated: at least one tier").delay,
    };
    Next::Redeliver(explicit.unwrap_or(delay).min(RETRY_DELAY_MAX))
}

/// The message id of the dead-letter copy of `(topic, queue, offset)` for `consumer_group`:
/// a version byte, the FNV-1a 64 hashes of the group and the topic, the queue and the offset
/// (29 bytes). Two different messages collide only if both 64-bit hashes collide while queue
/// and offset match and they land in one dead-letter queue's window.
pub(crate) fn dead_letter_id(
    consumer_group: &str,
    topic: &str,
    queue: QueueId,
    offset: Offset,
) -> Vec<u8> {
    let mut id = Vec::with_capacity(29);
    id.push(1); // the format's version
    id.extend_from_slice(&fnv1a_64(consumer_group.as_bytes()).to_be_bytes());
    id.extend_from_slice(&fnv1a_64(topic.as_bytes()).to_be_bytes());
    id.extend_from_slice(&queue.to_be_bytes());
    id.extend_from_slice(&offset.to_be_bytes());
    debug_assert!(id.len() <= MESSAGE_ID_BYTES_MAX);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn tiers() -> Vec<RetryTier> {
        vec![
            RetryTier {
                attempts: 2,
                delay: ms(10),
            },
            RetryTier {
                attempts: 1,
                delay: ms(50),
            },
        ]
    }

    #[test]
    fn each_failure_waits_the_delay_of_its_tier_then_dead_letters() {
        let steps: Vec<Next> = (1..=4)
            .map(|n| after_failure(&tiers(), n, None, true))
            .collect();
        assert_eq!(
            steps,
            [
                Next::Redeliver(ms(10)),
                Next::Redeliver(ms(10)),
                Next::Redeliver(ms(50)),
                Next::DeadLetter
            ]
        );
    }

    #[test]
    fn without_a_dead_letter_topic_the_last_tier_repeats_forever() {
        for n in [4, 5, 1000, u32::MAX] {
            assert_eq!(
                after_failure(&tiers(), n, None, false),
                Next::Redeliver(ms(50))
            );
        }
    }

    #[test]
    fn an_explicit_delay_replaces_the_tiers_but_counts_against_them() {
        assert_eq!(
            after_failure(&tiers(), 1, Some(ms(7)), true),
            Next::Redeliver(ms(7))
        );
        assert_eq!(
            after_failure(&tiers(), 4, Some(ms(7)), true),
            Next::DeadLetter
        );
        assert_eq!(
            after_failure(&tiers(), 1, Some(Duration::from_secs(1 << 40)), true),
            Next::Redeliver(RETRY_DELAY_MAX)
        );
    }

    #[test]
    fn dead_letter_ids_depend_on_group_topic_queue_and_offset_only() {
        let id = dead_letter_id("audit", "orders", 3, 17);
        assert_eq!(id, dead_letter_id("audit", "orders", 3, 17));
        assert_eq!(id.len(), 29);
        for other in [
            dead_letter_id("billing", "orders", 3, 17),
            dead_letter_id("audit", "orders-2", 3, 17),
            dead_letter_id("audit", "orders", 4, 17),
            dead_letter_id("audit", "orders", 3, 18),
        ] {
            assert_ne!(id, other);
        }
    }
}
