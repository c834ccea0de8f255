//! Live membership: a consumer that joins its group through the group coordinator, handles
//! the queues it is granted, and hands them over safely.
//!
//! The coordinator is the master of replication group 0 (the `Heartbeat` call; its rules are
//! in `phxq-node`'s `coordinator.rs` and ARCHITECTURE.md, "Live membership"). This side:
//!
//! * **Heartbeats** every [`Membership::heartbeat_interval`] (at once when a queue finished
//!   handing over) report the queues this consumer handles, including those it is draining;
//!   the answer grants queues and counts the live members.
//! * **Granted queues start** from the group's committed cursor (one pull loop each, as
//!   with a static list). **A queue no longer granted is handed over**: its loop stops
//!   pulling, its running handlers finish, its cursor is committed, and only then does the
//!   next heartbeat stop reporting it, so the coordinator grants it to the next owner only
//!   once this one has finished: **two members never handle one queue at once**.
//! * **Self-fencing**: the grant of a heartbeat holds until [`Membership::session_timeout`]
//!   after that heartbeat was *sent*. When it runs out with no newer answer (coordinator
//!   unreachable, or this process stalled), every queue loop is aborted at once (handlers
//!   are dropped at their next await; nothing more is committed) and nothing starts until a
//!   heartbeat is answered again. The coordinator drops a member `session_timeout` after the
//!   heartbeat *arrived*, later than that, and only then grants its queues to others, who
//!   start from the committed cursor: what the fenced member handled but had not committed
//!   is delivered again (at least once).
//! * **Leaving** (the shutdown future completed): heartbeats say `leaving`, so the others
//!   are granted its queues one by one as it drains them; a last heartbeat reporting nothing
//!   removes it from the group.
//! * **Rate limit per group**: the group's messages/s and bytes/s
//!   ([`Membership::group_messages_per_s_max`], [`Membership::group_bytes_per_s_max`])
//!   divided by the live members of the last answer, and the consumer's own limit if lower.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phxq_proto::api;
use phxq_types::{GroupId, QueueId, group_of_queue, validate_name};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::consumer::{ConsumerError, ConsumerReport, Handler, QueueEnd, Shared, run_queue};
use crate::consumer_config::{ConsumerConfig, ConsumerConfigError};
use crate::error::{ErrorKind, ProduceError};
use crate::router::{Halt, Router};

/// Default for [`Membership::session_timeout`].
pub const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(6);
/// Shortest [`Membership::session_timeout`] accepted (the coordinator's limit).
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// Longest [`Membership::session_timeout`] accepted (the coordinator's limit).
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// Default for [`Membership::heartbeat_interval`].
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Shortest [`Membership::heartbeat_interval`] accepted.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Heartbeats per session timeout at least: the interval must be at most a third of the
/// session timeout, so two lost heartbeats in a row do not fence a healthy member.
pub const HEARTBEATS_PER_SESSION_MIN: u32 = 3;

/// Live membership of a consumer group (see the module documentation). Set
/// [`ConsumerConfig::membership`] to use it instead of a static member list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// This consumer's name, unique in its group: 1 to 128 bytes of `[A-Za-z0-9._-]`. A
    /// restarted consumer may reuse its name.
    pub member_id: String,
    /// How long the coordinator keeps this member without a heartbeat, and how long after
    /// sending its last answered heartbeat this member keeps handling: [`SESSION_TIMEOUT_MIN`]
    /// to [`SESSION_TIMEOUT_MAX`], default [`SESSION_TIMEOUT_DEFAULT`]. A killed member's
    /// queues are taken over within about this plus one heartbeat interval. Give every
    /// member of a group the same value.
    pub session_timeout: Duration,
    /// Between two heartbeats: [`HEARTBEAT_INTERVAL_MIN`] to a third of `session_timeout`;
    /// default [`HEARTBEAT_INTERVAL_DEFAULT`]. A queue given up is taken by its next owner
    /// within about one interval after its drain.
    pub heartbeat_interval: Duration,
    /// Most messages per second handled by the whole group: each member takes its share (this
    /// divided by the live members), re-divided as members come and go. `None`: no group
    /// limit (the member's own [`ConsumerConfig::messages_per_s_max`] still applies).
    pub group_messages_per_s_max: Option<u32>,
    /// Most bytes per second handled by the whole group, shared like
    /// `group_messages_per_s_max`.
    pub group_bytes_per_s_max: Option<u64>,
}

impl Membership {
    /// Defaults for member `member_id`.
    pub fn new(member_id: impl Into<String>) -> Membership {
        Membership {
            member_id: member_id.into(),
            session_timeout: SESSION_TIMEOUT_DEFAULT,
            heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
            group_messages_per_s_max: None,
            group_bytes_per_s_max: None,
        }
    }

    /// Checks every field; the error names it (`membership.session_timeout`, ...).
    pub(crate) fn validate(&self) -> Result<(), ConsumerConfigError> {
        let invalid = |field: &str, reason: String| ConsumerConfigError {
            field: format!("membership.{field}"),
            reason,
        };
        validate_name(&self.member_id).map_err(|error| invalid("member_id", error.to_string()))?;
        if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&self.session_timeout) {
            return Err(invalid(
                "session_timeout",
                format!(
                    "{:?}; {SESSION_TIMEOUT_MIN:?} to {SESSION_TIMEOUT_MAX:?}",
                    self.session_timeout
                ),
            ));
        }
        let longest = self.session_timeout / HEARTBEATS_PER_SESSION_MIN;
        if !(HEARTBEAT_INTERVAL_MIN..=longest).contains(&self.heartbeat_interval) {
            return Err(invalid(
                "heartbeat_interval",
                format!(
                    "{:?}; {HEARTBEAT_INTERVAL_MIN:?} to session_timeout / \
                     {HEARTBEATS_PER_SESSION_MIN} ({longest:?})",
                    self.heartbeat_interval
                ),
            ));
        }
        if self.group_messages_per_s_max == Some(0) {
            return Err(invalid(
                "group_messages_per_s_max",
                "0; use None for no limit".into(),
            ));
        }
        if self.group_bytes_per_s_max == Some(0) {
            return Err(invalid(
                "group_bytes_per_s_max",
                "0; use None for no limit".into(),
            ));
        }
        Ok(())
    }

    /// The member's rate limits with `members` live members.
    pub(crate) fn rates(
        &self,
        config: &ConsumerConfig,
        members: usize,
    ) -> (Option<u32>, Option<u64>) {
        let members = members.max(1);
        let share_messages = self
            .group_messages_per_s_max
            .map(|rate| (rate / members as u32).max(1));
        let share_bytes = self
            .group_bytes_per_s_max
            .map(|rate| (rate / members as u64).max(1));
        (
            lower(config.messages_per_s_max, share_messages),
            lower(config.bytes_per_s_max, share_bytes),
        )
    }
}

fn lower<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the last answered heartbeat granted.
#[derive(Clone, Debug)]
struct Lease {
    granted: BTreeSet<QueueId>,
    members: usize,
    /// The heartbeat's send time plus the session timeout: the grant holds until then.
    valid_until: Instant,
}

/// What the heartbeats report, written by the consumer's loop.
#[derive(Default)]
struct Reported {
    owned: Mutex<(BTreeSet<QueueId>, bool)>,
    /// Wakes the heartbeat loop to report a change at once.
    changed: Notify,
}

impl Reported {
    fn set(&self, owned: BTreeSet<QueueId>, leaving: bool) {
        *crate::consumer::lock(&self.owned) = (owned, leaving);
        self.changed.notify_one();
    }

    fn get(&self) -> (BTreeSet<QueueId>, bool) {
        crate::consumer::lock(&self.owned).clone()
    }
}

/// Aborts a task when dropped (a consumer dropped without draining takes its heartbeats
/// with it, as a crashed process would).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The consumer's main loop under live membership: starts and stops queue loops as the
/// coordinator grants and revokes, fences itself, leaves on `shutdown`.
pub(crate) async fn run_live<H: Handler>(
    shared: Arc<Shared<H>>,
    groups: u32,
    membership: Membership,
    shutdown: impl Future<Output = ()>,
) -> Result<ConsumerReport, ConsumerError> {
    let reported = Arc::new(Reported::default());
    let (lease_sender, lease) = watch::channel(None::<Lease>);
    let heartbeats = HeartbeatLoop::new(&shared.config, &membership, reported.clone());
    let heartbeats = AbortOnDrop(tokio::spawn(heartbeats.run(lease_sender)));
    let inputs = Inputs {
        lease,
        heartbeats,
        reported,
    };
    drive(shared, groups, inputs, shutdown).await
}

/// What drives [`drive`]: the heartbeat loop's grants and its end, and what it reports.
struct Inputs {
    lease: watch::Receiver<Option<Lease>>,
    heartbeats: AbortOnDrop<Result<(), ConsumerError>>,
    reported: Arc<Reported>,
}

/// [`run_live`]'s loop, fed by the heartbeat loop (or a test).
async fn drive<H: Handler>(
    shared: Arc<Shared<H>>,
    groups: u32,
    inputs: Inputs,
    shutdown: impl Future<Output = ()>,
) -> Result<ConsumerReport, ConsumerError> {
    let Inputs {
        mut lease,
        mut heartbeats,
        reported,
    } = inputs;
    let mut shutdown = pin!(shutdown);
    let mut live = Live {
        shared: &shared,
        groups,
        reported: &reported,
        loops: JoinSet::new(),
        running: BTreeMap::new(),
        tasks: HashMap::new(),
        members: 1,
        report: ConsumerReport::default(),
        failure: None,
        leaving: false,
    };
    let mut heartbeats_done = false;
    loop {
        if live.leaving && live.running.is_empty() && heartbeats_done {
            break;
        }
        let fence_at = lease
            .borrow()
            .as_ref()
            .map(|lease| lease.valid_until)
            .filter(|_| !live.running.is_empty());
        tokio::select! {
            () = &mut shutdown, if !live.leaving => live.leave(),
            Some(joined) = live.loops.join_next_with_id(), if !live.loops.is_empty() => {
                live.joined(joined);
                let current = lease.borrow().clone();
                live.reconcile(current.as_ref());
            }
            changed = lease.changed(), if !heartbeats_done => {
                if changed.is_ok() {
                    let current = lease.borrow_and_update().clone();
                    live.reconcile(current.as_ref());
                }
            }
            () = sleep_until_some(fence_at) => live.fence().await,
            ended = &mut heartbeats.0, if !heartbeats_done => {
                heartbeats_done = true;
                match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        live.failure.get_or_insert(error);
                        live.leave();
                    }
                    Err(joined) => std::panic::resume_unwind(joined.into_panic()),
                }
            }
        }
    }
    let mut report = live.report;
    shared.count_into(&mut report);
    match live.failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// Sleeps until `at`, or forever for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The state of [`run_live`]'s loop.
struct Live<'a, H> {
    shared: &'a Arc<Shared<H>>,
    groups: u32,
    reported: &'a Reported,
    loops: JoinSet<QueueEnd>,
    /// Queues with a loop, running or draining, and the sender that stops it.
    running: BTreeMap<QueueId, watch::Sender<bool>>,
    tasks: HashMap<tokio::task::Id, QueueId>,
    members: usize,
    report: ConsumerReport,
    failure: Option<ConsumerError>,
    leaving: bool,
}

impl<H: Handler> Live<'_, H> {
    /// Starts the queues granted and not running; asks those running and not granted to
    /// hand over. A lease that ran out grants nothing (the fence timer stops the rest).
    fn reconcile(&mut self, lease: Option<&Lease>) {
        let Some(lease) = lease.filter(|lease| lease.valid_until > Instant::now()) else {
            return;
        };
        if lease.members != self.members {
            self.members = lease.members;
            self.shared.set_members(lease.members);
        }
        for (&queue, stop) in &self.running {
            if !lease.granted.contains(&queue) && !*stop.borrow() {
                tracing::info!(queue, "handing over");
                stop.send_replace(true);
            }
        }
        if self.leaving || self.failure.is_some() {
            return;
        }
        let mut started = false;
        for &queue in &lease.granted {
            if self.running.contains_key(&queue) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let group: GroupId = group_of_queue(queue, self.groups);
            let task = self
                .loops
                .spawn(run_queue(self.shared.clone(), queue, group, stopped));
            self.tasks.insert(task.id(), queue);
            self.running.insert(queue, stop);
            if !self.report.queues.contains(&queue) {
                self.report.queues.push(queue);
                self.report.queues.sort_unstable();
            }
            tracing::info!(queue, "taking over");
            started = true;
        }
        if started {
            self.report_owned();
        }
    }

    /// A queue loop ended: its queue is handed over (reported no more).
    fn joined(&mut self, joined: Result<(tokio::task::Id, QueueEnd), tokio::task::JoinError>) {
        let (id, (queue, cursor, outcome)) = match joined {
            Ok(ended) => ended,
            Err(error) if error.is_cancelled() => {
                if let Some(queue) = self.tasks.remove(&error.id()) {
                    self.running.remove(&queue);
                }
                self.report_owned();
                return;
            }
            // A pull loop panicked: a bug here, not the handler's (its panics are caught).
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        self.tasks.remove(&id);
        self.running.remove(&queue);
        if let Some(cursor) = cursor {
            self.report.cursors.insert(queue, cursor);
        }
        if let Err(error) = outcome {
            self.failure.get_or_insert(error);
            self.leave();
        }
        self.report_owned();
    }

    /// Shutdown (or a failure): every queue drains, heartbeats say `leaving`.
    fn leave(&mut self) {
        self.leaving = true;
        for stop in self.running.values() {
            stop.send_replace(true);
        }
        self.report_owned();
    }

    /// The grant ran out: aborts every queue loop at once and waits until they are gone.
    async fn fence(&mut self) {
        tracing::warn!(
            queues = ?self.running.keys().collect::<Vec<_>>(),
            "no heartbeat answered within the session timeout: fencing (handled but \
             uncommitted messages will be delivered again)"
        );
        self.loops.abort_all();
        while let Some(joined) = self.loops.join_next_with_id().await {
            if let Ok((_, (queue, Some(cursor), _))) = joined {
                self.report.cursors.insert(queue, cursor);
            }
        }
        self.tasks.clear();
        self.running.clear();
        self.report_owned();
    }

    fn report_owned(&self) {
        self.reported
            .set(self.running.keys().copied().collect(), self.leaving);
    }
}

/// The heartbeat loop of one member.
struct HeartbeatLoop {
    router: Router,
    request: api::HeartbeatRequest,
    session_timeout: Duration,
    interval: Duration,
    reported: Arc<Reported>,
}

impl HeartbeatLoop {
    fn new(config: &ConsumerConfig, membership: &Membership, reported: Arc<Reported>) -> Self {
        // Its own router: a heartbeat retries for at most half a session (a late answer is
        // worthless), each attempt for at most one interval.
        let mut router_config = config.router_config();
        router_config.deadline = membership.session_timeout / 2;
        router_config.attempt_timeout = membership.heartbeat_interval;
        HeartbeatLoop {
            router: Router::new(router_config),
            request: api::HeartbeatRequest {
                topic: config.topic.clone(),
                consumer_group: config.consumer_group.clone(),
                member_id: membership.member_id.clone(),
                session_timeout_ms: u32::try_from(membership.session_timeout.as_millis())
                    .expect("validated: at most a minute"),
                owned_queues: Vec::new(),
                // A restarted member starts above its earlier heartbeats.
                sequence: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_micros() as u64),
                store_id: config.store_id,
                leaving: false,
                describe_only: false,
            },
            session_timeout: membership.session_timeout,
            interval: membership.heartbeat_interval,
            reported,
        }
    }

    /// Heartbeats until the member has left; publishes every grant in `lease`. Returns an
    /// error when the coordinator refuses for good (unknown topic or group, bad input).
    async fn run(mut self, lease: watch::Sender<Option<Lease>>) -> Result<(), ConsumerError> {
        let mut progress = self.router.start_request();
        // Learn the nodes (so a down seed node does not hide the coordinator); best effort.
        let _ = self.router.layout(&mut progress).await;
        loop {
            let (owned, leaving) = self.reported.get();
            let last = leaving && owned.is_empty();
            self.request.owned_queues = owned.into_iter().collect();
            self.request.leaving = leaving;
            self.request.sequence += 1;
            let sent = Instant::now();
            let valid_until = sent + self.session_timeout;
            match self.send().await {
                Ok(Some(answer)) if Instant::now() < valid_until => {
                    lease.send_replace(Some(Lease {
                        granted: answer.granted_queues.into_iter().collect(),
                        members: answer.members.len(),
                        valid_until,
                    }));
                }
                Ok(_) => {}
                Err(error) if last => {
                    tracing::warn!(%error, "the leaving heartbeat failed; the coordinator \
                                            will drop this member after its session");
                }
                Err(error) => return Err(ConsumerError::Store { queue: None, error }),
            }
            if last {
                return Ok(());
            }
            let next = sent + self.interval;
            let changed = self.reported.changed.notified();
            tokio::select! {
                () = tokio::time::sleep_until(next.into()) => {}
                () = changed => {}
            }
        }
    }

    /// One heartbeat, routed to group 0's master and retried; `Ok(None)` when it ran out of
    /// retries (logged).
    async fn send(&self) -> Result<Option<api::HeartbeatResponse>, ProduceError> {
        let mut progress = self.router.start_request();
        let called = self
            .router
            .call(Some(GroupId(0)), &mut progress, |mut client| {
                let request = self.request.clone();
                async move {
                    let response = client.heartbeat(request).await?.into_inner();
                    let error = response.error.clone();
                    Ok((response, error))
                }
            })
            .await;
        match called {
            Ok(answer) => Ok(Some(answer)),
            Err(Halt::Error(error))
                if matches!(
                    error.kind(),
                    ErrorKind::DeadlineExceeded | ErrorKind::Unreachable
                ) =>
            {
                tracing::warn!(%error, "heartbeat gave up");
                Ok(None)
            }
            Err(Halt::Error(error)) => Err(error),
            Err(Halt::MasterMissing) => unreachable!("queue-change retry is off for consumers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{Delivery, Outcome, Tunables};
    use crate::consumer_settings::EffectiveSettings;

    /// The grants a test sends, what the member reports, and the member's task.
    type Driven = (
        watch::Sender<Option<Lease>>,
        Arc<Reported>,
        tokio::task::JoinHandle<Result<ConsumerReport, ConsumerError>>,
    );

    /// A consumer with no store behind it (its pulls retry), driven by grants from the test.
    fn driven(membership: &Membership) -> Driven {
        let mut config = ConsumerConfig::new(["127.0.0.1:9"], "t", "g");
        config.membership = Some(membership.clone());
        let router = Router::new(config.router_config());
        let handler = |_: &Delivery| async { Outcome::Handled };
        let tunables = Tunables {
            settings: EffectiveSettings::of(&config, false),
            config,
            dead_letters: None,
        };
        let progress = watch::channel(Default::default()).0;
        let shared = Shared::new(router, handler, tunables, progress);
        let (sender, lease) = watch::channel(None);
        let reported = Arc::new(Reported::default());
        let inputs = Inputs {
            lease,
            heartbeats: AbortOnDrop(tokio::spawn(std::future::pending())),
            reported: reported.clone(),
        };
        let task = tokio::spawn(drive(shared, 4, inputs, std::future::pending()));
        (sender, reported, task)
    }

    fn lease(granted: &[QueueId], valid_for: Duration) -> Option<Lease> {
        Some(Lease {
            granted: granted.iter().copied().collect(),
            members: 1,
            valid_until: Instant::now() + valid_for,
        })
    }

    #[tokio::test]
    async fn a_member_whose_grant_runs_out_stops_every_queue_until_granted_again() {
        let (grants, reported, task) = driven(&Membership::new("a"));
        let owned = || reported.get().0.into_iter().collect::<Vec<_>>();
        grants.send_replace(lease(&[0, 1], Duration::from_millis(300)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(owned(), vec![0, 1], "granted queues run");
        // No newer answer: the grant runs out and every queue stops at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(owned(), Vec::<QueueId>::new(), "fenced");
        // A new grant starts what it grants.
        grants.send_replace(lease(&[2], Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(owned(), vec![2]);
        // A queue no longer granted is handed over (its idle loop ends at once).
        grants.send_replace(lease(&[3], Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(owned(), vec![3]);
        task.abort();
    }

    fn field(change: fn(&mut Membership)) -> Result<(), String> {
        let mut membership = Membership::new("a");
        change(&mut membership);
        membership.validate().map_err(|error| error.field)
    }

    #[test]
    fn bad_membership_fields_are_named() {
        let err = |name: &str| Err(name.to_string());
        assert_eq!(field(|_| {}), Ok(()));
        assert_eq!(field(|m| m.member_id.clear()), err("membership.member_id"));
        assert_eq!(
            field(|m| m.session_timeout = Duration::from_millis(999)),
            err("membership.session_timeout")
        );
        assert_eq!(
            field(|m| m.session_timeout = Duration::from_secs(3600)),
            err("membership.session_timeout")
        );
        assert_eq!(
            field(|m| m.heartbeat_interval = Duration::from_millis(2001)),
            err("membership.heartbeat_interval")
        );
        assert_eq!(
            field(|m| m.heartbeat_interval = Duration::ZERO),
            err("membership.heartbeat_interval")
        );
        assert_eq!(
            field(|m| m.group_messages_per_s_max = Some(0)),
            err("membership.group_messages_per_s_max")
        );
    }

    #[test]
    fn the_group_rate_is_shared_among_the_live_members() {
        let config = ConsumerConfig::new(["127.0.0.1:1"], "t", "g");
        let mut membership = Membership::new("a");
        membership.group_messages_per_s_max = Some(300);
        membership.group_bytes_per_s_max = Some(9_000);
        assert_eq!(membership.rates(&config, 1), (Some(300), Some(9_000)));
        assert_eq!(membership.rates(&config, 3), (Some(100), Some(3_000)));
        let mut config = config;
        config.messages_per_s_max = Some(50);
        assert_eq!(membership.rates(&config, 3), (Some(50), Some(3_000)));
    }
}
