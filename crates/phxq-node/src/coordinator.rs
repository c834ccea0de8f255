//! The consumer group coordinator: live members of each (topic, consumer group) and which
//! queues each may handle. Pure: the caller gives the time, the raft term under which this
//! node masters replication group 0, and the topic's queue count; nothing here reads a
//! clock or touches the network.
//!
//! The server runs one [`Coordinator`] per node and consults it only while the node is the
//! master of group 0 with a valid lease (so at most one node answers as coordinator at any
//! moment, under the lease's clock assumption). Its state is in memory only.
//!
//! Invariants (see ARCHITECTURE.md, "Live membership"):
//!
//! 1. **A queue is granted to at most one member, and only when no other live member reports
//!    owning it or was granted it since its last heartbeat.** Queues go to their rendezvous-hash owner among the live, non-leaving
//!    members; an old owner keeps reporting a queue it is handing over until it has drained
//!    and committed it, and the new owner is granted it only after that.
//! 2. **A member is dropped `session_timeout_ms` after its newest heartbeat arrived**; the
//!    member fences itself `session_timeout_ms` after it *sent* that heartbeat, which is
//!    earlier. So when the coordinator drops a member, that member has already stopped.
//! 3. **A fresh coordinator** (the first heartbeat under a new group-0 term, or after a
//!    restart) forgets everything and grants no queue that nobody reports owning until the
//!    longest session timeout it has heard for the group has passed since it took over: by
//!    then every grant of the previous coordinator has been fenced by its holder, unless the
//!    holder reported it here (then it is known). A member whose session timeout exceeds
//!    every one heard by the new coordinator and that cannot reach it could still hold a
//!    queue: members of a group are expected to share one session timeout.
//! 4. Heartbeats of one member carry a growing `sequence`; an older one (a late retry) changes
//!    nothing, so a stale report cannot un-report a queue the member has since started.

use std::collections::{BTreeMap, BTreeSet};

use phxq_types::{QueueId, queue_owner};

/// Shortest session timeout accepted, in ms.
pub const SESSION_TIMEOUT_MS_MIN: u64 = 1_000;
/// Longest session timeout accepted, in ms.
pub const SESSION_TIMEOUT_MS_MAX: u64 = 60_000;
/// Most queues one heartbeat may report.
pub const OWNED_QUEUES_MAX: usize = 10_000;
/// Most live members of one (topic, consumer group).
pub const MEMBERS_PER_GROUP_MAX: usize = 1_024;
/// Most (topic, consumer group) pairs tracked at once.
pub const GROUPS_TRACKED_MAX: usize = 10_000;

/// One member's heartbeat, checked for names by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub consumer_group: String,
    /// The member's name.
    pub member_id: String,
    /// Its session timeout, in ms.
    pub session_timeout_ms: u64,
    /// The queues it handles now, including those it is handing over.
    pub owned_queues: Vec<QueueId>,
    /// Grows with every heartbeat of the member.
    pub sequence: u64,
    /// The member is leaving the group.
    pub leaving: bool,
}

/// The coordinator's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Live members, by name (leaving ones included until they have left).
    pub members: Vec<String>,
    /// What the member may handle, ascending.
    pub granted_queues: Vec<QueueId>,
    /// Changes with membership and with the coordinator.
    pub generation: u64,
    /// Each live member's reported queues, in `members` order.
    pub member_queues: Vec<(String, Vec<QueueId>)>,
}

/// Why a heartbeat was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// An argument out of range (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// Too many groups or members tracked (`BUSY`).
    #[error("{0}")]
    Full(String),
}

#[derive(Clone, Debug)]
struct Member {
    expires_ms: u64,
    owned: BTreeSet<QueueId>,
    sequence: u64,
    leaving: bool,
}

#[derive(Clone, Debug, Default)]
struct GroupState {
    members: BTreeMap<String, Member>,
    /// The longest session timeout heard for this group since the coordinator took over.
    hold_ms: u64,
    /// Bumped on every membership change.
    changes: u64,
}

/// The coordinator of one node: in-memory, reset when the group-0 term changes.
#[derive(Debug, Default)]
pub struct Coordinator {
    /// The group-0 term the state belongs to; `None` before the first heartbeat.
    term: Option<u64>,
    took_over_ms: u64,
    groups: BTreeMap<(String, String), GroupState>,
}

impl Coordinator {
    /// An empty coordinator.
    pub fn new() -> Coordinator {
        Coordinator::default()
    }

    /// Handles `heartbeat` at `now_ms` (a monotonic clock) while this node masters group 0 in
    /// `term`, for a topic of `queues` queues.
    pub fn heartbeat(
        &mut self,
        term: u64,
        now_ms: u64,
        queues: u32,
        heartbeat: &Heartbeat,
    ) -> Result<Grant, HeartbeatError> {
        check(queues, heartbeat)?;
        if self.term != Some(term) {
            // A new coordinator: the old one's state (if it was us) may be stale.
            self.term = Some(term);
            self.took_over_ms = now_ms;
            self.groups.clear();
        }
        self.expire_all(now_ms);
        let key = (heartbeat.topic.clone(), heartbeat.consumer_group.clone());
        if !self.groups.contains_key(&key) && self.groups.len() >= GROUPS_TRACKED_MAX {
            return Err(HeartbeatError::Full(format!(
                "the coordinator tracks {GROUPS_TRACKED_MAX} consumer groups already"
            )));
        }
        let took_over_ms = self.took_over_ms;
        let term = self.term.expect("set above");
        let group = self.groups.entry(key).or_default();
        group.record(now_ms, heartbeat)?;
        let granted_queues = group.granted(took_over_ms, now_ms, queues, heartbeat);
        // A granted queue counts as owned by its grantee from now on, not only once its next
        // heartbeat reports it: the member starts it on this answer, and a member joining
        // before that next heartbeat must not be granted it too. The next heartbeat (a higher
        // sequence) replaces the set with what the member really runs, which frees a grant
        // whose answer never arrived.
        if let Some(member) = group.members.get_mut(&heartbeat.member_id) {
            member.owned.extend(granted_queues.iter().copied());
        }
        let grant = Grant {
            members: group.members.keys().cloned().collect(),
            granted_queues,
            generation: (term << 32) | (group.changes & 0xffff_ffff),
            member_queues: group
                .members
                .iter()
                .map(|(name, member)| (name.clone(), member.owned.iter().copied().collect()))
                .collect(),
        };
        if group.members.is_empty() {
            let key = (heartbeat.topic.clone(), heartbeat.consumer_group.clone());
            self.groups.remove(&key);
        }
        Ok(grant)
    }

    /// The view of (`topic`, `consumer_group`) at `now_ms` in `term`: live members and the
    /// queues they reported, nothing granted. Changes nothing but what time already changed
    /// (expiries, a new term).
    pub fn describe(&mut self, term: u64, now_ms: u64, topic: &str, consumer_group: &str) -> Grant {
        if self.term != Some(term) {
            self.term = Some(term);
            self.took_over_ms = now_ms;
            self.groups.clear();
        }
        self.expire_all(now_ms);
        let key = (topic.to_string(), consumer_group.to_string());
        let Some(group) = self.groups.get(&key) else {
            return Grant {
                members: Vec::new(),
                granted_queues: Vec::new(),
                generation: term << 32,
                member_queues: Vec::new(),
            };
        };
        Grant {
            members: group.members.keys().cloned().collect(),
            granted_queues: Vec::new(),
            generation: (term << 32) | (group.changes & 0xffff_ffff),
            member_queues: group
                .members
                .iter()
                .map(|(name, member)| (name.clone(), member.owned.iter().copied().collect()))
                .collect(),
        }
    }

    /// Drops members whose session ended, and groups left empty.
    fn expire_all(&mut self, now_ms: u64) {
        self.groups.retain(|_, group| {
            let before = group.members.len();
            group.members.retain(|_, member| member.expires_ms > now_ms);
            if group.members.len() != before {
                group.changes += 1;
            }
            !group.members.is_empty()
        });
    }

    /// Checks the state's invariants (tests and debug builds).
    pub fn validate(&self) {
        for ((topic, group), state) in &self.groups {
            assert!(
                !state.members.is_empty(),
                "{topic}/{group}: empty group kept"
            );
            assert!(state.members.len() <= MEMBERS_PER_GROUP_MAX);
            assert!(state.hold_ms <= SESSION_TIMEOUT_MS_MAX);
        }
        assert!(self.groups.len() <= GROUPS_TRACKED_MAX);
    }
}

impl GroupState {
    /// Records the heartbeat (unless stale); removes a leaving member that owns nothing.
    fn record(&mut self, now_ms: u64, heartbeat: &Heartbeat) -> Result<(), HeartbeatError> {
        self.hold_ms = self.hold_ms.max(heartbeat.session_timeout_ms);
        let name = &heartbeat.member_id;
        if let Some(member) = self.members.get(name)
            && heartbeat.sequence < member.sequence
        {
            return Ok(()); // A late retry of an older heartbeat.
        }
        if !self.members.contains_key(name) && self.members.len() >= MEMBERS_PER_GROUP_MAX {
            return Err(HeartbeatError::Full(format!(
                "the group has {MEMBERS_PER_GROUP_MAX} members already"
            )));
        }
        if heartbeat.leaving && heartbeat.owned_queues.is_empty() {
            if self.members.remove(name).is_some() {
                self.changes += 1;
            }
            return Ok(());
        }
        let member = Member {
            expires_ms: now_ms + heartbeat.session_timeout_ms,
            owned: heartbeat.owned_queues.iter().copied().collect(),
            sequence: heartbeat.sequence,
            leaving: heartbeat.leaving,
        };
        match self.members.insert(name.clone(), member.clone()) {
            None => self.changes += 1,
            Some(old) if old.leaving != member.leaving => self.changes += 1,
            Some(_) => {}
        }
        Ok(())
    }

    /// The queues `heartbeat`'s member may handle: those it hashes to among the live members
    /// that are not leaving, that no other member reports, and (for one it does not report
    /// yet) once the coordinator's warm-up has passed.
    fn granted(
        &self,
        took_over_ms: u64,
        now_ms: u64,
        queues: u32,
        heartbeat: &Heartbeat,
    ) -> Vec<QueueId> {
        let Some(member) = self.members.get(&heartbeat.member_id) else {
            return Vec::new(); // It left.
        };
        if member.leaving {
            return Vec::new();
        }
        let staying: Vec<&str> = self
            .members
            .iter()
            .filter(|(_, member)| !member.leaving)
            .map(|(name, _)| name.as_str())
            .collect();
        let warm = now_ms >= took_over_ms + self.hold_ms;
        (0..queues)
            .filter(|&queue| {
                queue_owner(&heartbeat.topic, queue, &staying) == Some(&heartbeat.member_id)
            })
            .filter(|queue| {
                let reported_by_another = self.members.iter().any(|(name, other)| {
                    *name != heartbeat.member_id && other.owned.contains(queue)
                });
                !reported_by_another && (warm || member.owned.contains(queue))
            })
            .collect()
    }
}

fn check(queues: u32, heartbeat: &Heartbeat) -> Result<(), HeartbeatError> {
    let invalid = |message: String| Err(HeartbeatError::InvalidArgument(message));
    if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&heartbeat.session_timeout_ms) {
        return invalid(format!(
            "session_timeout_ms {}: {SESSION_TIMEOUT_MS_MIN} to {SESSION_TIMEOUT_MS_MAX}",
            heartbeat.session_timeout_ms
        ));
    }
    if heartbeat.owned_queues.len() > OWNED_QUEUES_MAX {
        return invalid(format!(
            "{} owned queues; at most {OWNED_QUEUES_MAX}",
            heartbeat.owned_queues.len()
        ));
    }
    if let Some(queue) = heartbeat.owned_queues.iter().find(|&&q| q >= queues) {
        return invalid(format!(
            "owned queue {queue}: the topic has {queues} queues"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUES: u32 = 16;
    const TIMEOUT: u64 = 6_000;

    fn beat(member: &str, owned: &[QueueId], sequence: u64) -> Heartbeat {
        Heartbeat {
            topic: "orders".into(),
            consumer_group: "audit".into(),
            member_id: member.into(),
            session_timeout_ms: TIMEOUT,
            owned_queues: owned.to_vec(),
            sequence,
            leaving: false,
        }
    }

    /// A coordinator that took over at 0 (so is past its warm-up at `TIMEOUT`).
    fn warm() -> Coordinator {
        let mut c = Coordinator::new();
        grant(&mut c, 0, "bootstrap", &[], 1);
        c
    }

    /// Heartbeats `member` owning exactly what it was granted last, until stable.
    fn grant(c: &mut Coordinator, now: u64, member: &str, owned: &[QueueId], seq: u64) -> Vec<u32> {
        let grant = c
            .heartbeat(1, now, QUEUES, &beat(member, owned, seq))
            .expect("ok");
        c.validate();
        grant.granted_queues
    }

    #[test]
    fn a_fresh_coordinator_grants_unreported_queues_only_after_one_session_timeout() {
        let mut c = Coordinator::new();
        assert_eq!(grant(&mut c, 0, "a", &[], 1), Vec::<u32>::new());
        assert_eq!(grant(&mut c, TIMEOUT - 1, "a", &[], 2), Vec::<u32>::new());
        let all: Vec<u32> = (0..QUEUES).collect();
        assert_eq!(grant(&mut c, TIMEOUT, "a", &[], 3), all);
        // Reported ownership is accepted at once by a new coordinator (term 2).
        let grant = c
            .heartbeat(2, TIMEOUT + 1, QUEUES, &beat("a", &[3, 5], 4))
            .expect("ok");
        assert_eq!(grant.granted_queues, vec![3, 5]);
    }

    #[test]
    fn a_queue_moves_only_after_its_old_owner_stops_reporting_it() {
        let mut c = warm();
        let all: Vec<u32> = (0..QUEUES).collect();
        assert_eq!(grant(&mut c, TIMEOUT, "a", &all, 1), all);
        // b joins: a keeps reporting everything, so b gets nothing yet; a loses b's share.
        let b_first = grant(&mut c, TIMEOUT + 1, "b", &[], 1);
        assert!(b_first.is_empty());
        let a_now = grant(&mut c, TIMEOUT + 2, "a", &all, 2);
        let b_share: Vec<u32> = all.iter().copied().filter(|q| !a_now.contains(q)).collect();
        assert!(!b_share.is_empty() && !a_now.is_empty(), "{a_now:?}");
        // a hands over: stops reporting b's share; b gets it.
        assert_eq!(grant(&mut c, TIMEOUT + 3, "a", &a_now, 3), a_now);
        assert_eq!(grant(&mut c, TIMEOUT + 4, "b", &[], 2), b_share);
    }

    #[test]
    fn a_queue_granted_but_not_yet_reported_is_granted_to_nobody_else() {
        let mut c = warm();
        let all: Vec<u32> = (0..QUEUES).collect();
        // a alone is granted everything and starts it on this answer.
        assert_eq!(grant(&mut c, TIMEOUT, "a", &[], 1), all);
        // b joins before a's next heartbeat: every queue is a's until a reports otherwise.
        assert!(grant(&mut c, TIMEOUT + 1, "b", &[], 1).is_empty());
        // a reports what it runs, hands b's share over, and only then does b get it.
        let a_now = grant(&mut c, TIMEOUT + 2, "a", &all, 2);
        let b_share: Vec<u32> = all.iter().copied().filter(|q| !a_now.contains(q)).collect();
        assert!(!b_share.is_empty());
        assert!(grant(&mut c, TIMEOUT + 3, "b", &[], 2).is_empty());
        assert_eq!(grant(&mut c, TIMEOUT + 4, "a", &a_now, 3), a_now);
        assert_eq!(grant(&mut c, TIMEOUT + 5, "b", &[], 3), b_share);
        // A grant whose answer b never received: b's next heartbeat does not report it, so
        // it is free again (here: granted to b again, the hashed owner).
        assert_eq!(grant(&mut c, TIMEOUT + 6, "b", &[], 4), b_share);
    }

    #[test]
    fn a_silent_member_is_dropped_after_its_session_and_its_queues_taken_over() {
        let mut c = warm();
        let t0 = TIMEOUT;
        grant(&mut c, t0, "a", &[], 1);
        grant(&mut c, t0, "b", &[], 1);
        let a = grant(&mut c, t0 + 1, "a", &[], 2);
        let b = grant(&mut c, t0 + 1, "b", &[], 2);
        assert!(!a.is_empty() && !b.is_empty());
        assert_eq!(grant(&mut c, t0 + 1, "a", &a, 3), a);
        // a goes silent at t0 + 1; b still cannot have a's queues just before expiry.
        assert_eq!(grant(&mut c, t0 + TIMEOUT, "b", &b, 3), b);
        assert!(a.iter().all(|q| !b.contains(q)));
        let all: Vec<u32> = (0..QUEUES).collect();
        assert_eq!(grant(&mut c, t0 + 1 + TIMEOUT, "b", &b, 4), all);
    }

    #[test]
    fn a_leaving_member_hands_over_queue_by_queue_then_is_gone() {
        let mut c = warm();
        let all: Vec<u32> = (0..QUEUES).collect();
        grant(&mut c, TIMEOUT, "a", &all, 1);
        grant(&mut c, TIMEOUT, "b", &[], 1);
        let a = grant(&mut c, TIMEOUT, "a", &all, 2);
        grant(&mut c, TIMEOUT, "a", &a, 3);
        let b = grant(&mut c, TIMEOUT, "b", &[], 2);
        let mut leave = beat("a", &a[1..], 4);
        leave.leaving = true;
        let answer = c.heartbeat(1, TIMEOUT + 1, QUEUES, &leave).expect("ok");
        assert!(answer.granted_queues.is_empty());
        let b_now = grant(&mut c, TIMEOUT + 2, "b", &b, 3);
        assert!(b_now.contains(&a[0]) && !b_now.contains(&a[1]), "{b_now:?}");
        leave.owned_queues.clear();
        leave.sequence = 5;
        let answer = c.heartbeat(1, TIMEOUT + 3, QUEUES, &leave).expect("ok");
        assert_eq!(answer.members, vec!["b".to_string()]);
        assert_eq!(grant(&mut c, TIMEOUT + 4, "b", &b_now, 4), all);
    }

    #[test]
    fn a_late_older_heartbeat_changes_nothing() {
        let mut c = Coordinator::new();
        let all: Vec<u32> = (0..QUEUES).collect();
        grant(&mut c, TIMEOUT, "a", &all, 10);
        // An older heartbeat that reported nothing arrives late: a still owns everything.
        grant(&mut c, TIMEOUT, "a", &[], 9);
        assert!(grant(&mut c, TIMEOUT, "b", &[], 1).is_empty());
    }

    #[test]
    fn two_reports_of_one_queue_grant_it_to_neither() {
        let mut c = Coordinator::new();
        grant(&mut c, TIMEOUT, "a", &[0], 1);
        let b = grant(&mut c, TIMEOUT, "b", &[0], 1);
        let a = grant(&mut c, TIMEOUT, "a", &[0], 2);
        assert!(!a.contains(&0) && !b.contains(&0), "{a:?} {b:?}");
    }

    #[test]
    fn bad_input_is_refused() {
        let mut c = Coordinator::new();
        let mut bad = beat("a", &[], 1);
        bad.session_timeout_ms = 999;
        assert!(matches!(
            c.heartbeat(1, 0, QUEUES, &bad),
            Err(HeartbeatError::InvalidArgument(_))
        ));
        bad.session_timeout_ms = 60_001;
        assert!(c.heartbeat(1, 0, QUEUES, &bad).is_err());
        let bad = beat("a", &[QUEUES], 1);
        assert!(c.heartbeat(1, 0, QUEUES, &bad).is_err());
    }
}
