//! Which consumer of a group reads which queue: consistent (rendezvous) hashing.
//!
//! Queue `q` of topic `t` goes to the member with the highest score `mix(t, q, member)`
//! (highest random weight hashing, a form of consistent hashing): every member computes the
//! same owner from the same list without talking to the others; each queue has exactly one
//! owner; adding or removing a member moves only the queues it gains or loses. Pure.
//!
//! With a static member list (given in each consumer's config) nothing notices a member that
//! died: its queues stay unread until the list changes. With live membership
//! ([`Membership`](crate::Membership)) the group coordinator hashes over the live members
//! with this same function and hands queues over safely (`consumer_member.rs`).

use phxq_types::QueueId;

/// The member of `members` that reads queue `queue` of `topic`; `None` when `members` is
/// empty. Ties (never seen in practice) go to the smallest name. The same function as the
/// group coordinator's (`phxq_types::queue_owner`).
pub fn queue_owner<'m>(topic: &str, queue: QueueId, members: &'m [String]) -> Option<&'m str> {
    phxq_types::queue_owner(topic, queue, members)
}

/// The queues of a `queues`-queue `topic` that `member` reads, ascending. With no members,
/// every queue (a lone consumer).
pub fn assigned_queues(topic: &str, queues: u32, members: &[String], member: &str) -> Vec<QueueId> {
    (0..queues)
        .filter(|&queue| members.is_empty() || queue_owner(topic, queue, members) == Some(member))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("consumer-{i}")).collect()
    }

    #[test]
    fn every_queue_has_exactly_one_owner_and_the_load_is_spread() {
        let members = names(4);
        let mut seen = vec![0u32; 256];
        for member in &members {
            let mine = assigned_queues("orders", 256, &members, member);
            // 64 on average; rendezvous hashing is binomial, so allow a wide band.
            assert!((40..=90).contains(&mine.len()), "{member}: {}", mine.len());
            for queue in mine {
                seen[queue as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&count| count == 1), "{seen:?}");
    }

    #[test]
    fn removing_a_member_moves_only_its_queues() {
        let before = names(5);
        let after: Vec<String> = before
            .iter()
            .filter(|m| *m != "consumer-2")
            .cloned()
            .collect();
        for queue in 0..512 {
            let old = queue_owner("orders", queue, &before).expect("members");
            let new = queue_owner("orders", queue, &after).expect("members");
            if old != "consumer-2" {
                assert_eq!(old, new, "queue {queue} moved needlessly");
            }
        }
    }

    #[test]
    fn a_lone_consumer_reads_everything_and_nobody_owns_without_members() {
        assert_eq!(assigned_queues("t", 3, &[], "x"), vec![0, 1, 2]);
        assert_eq!(
            assigned_queues("t", 3, &names(1), "consumer-0"),
            vec![0, 1, 2]
        );
        assert_eq!(queue_owner("t", 0, &[]), None);
    }
}
