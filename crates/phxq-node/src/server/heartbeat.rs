//! The `Heartbeat` call: the consumer group coordinator's shell.
//!
//! The coordinator ([`Coordinator`], pure) answers only while this node masters replication
//! group 0 with a valid lease; the node's status is read for every heartbeat (one event-loop
//! round trip) so the answer never rests on a lease that ended. Other nodes answer
//! `NOT_MASTER` with group 0's master, or `NO_MASTER`.

use std::time::Instant;

use phxq_proto::api;
use phxq_types::{ErrorCode, GroupId, QueueId};

use super::{Service, check_name, refuse, topics_status};
use crate::coordinator::{Coordinator, Grant, Heartbeat, HeartbeatError};
use crate::{NodeStatus, Request, Response};

/// The coordinator of a node and the clock it runs on.
pub(super) struct CoordinatorShell {
    coordinator: std::sync::Mutex<Coordinator>,
    started: Instant,
}

impl CoordinatorShell {
    pub(super) fn new() -> CoordinatorShell {
        CoordinatorShell {
            coordinator: std::sync::Mutex::new(Coordinator::new()),
            started: Instant::now(),
        }
    }
}

impl Service {
    /// Answers a heartbeat (see the module documentation).
    pub(super) async fn heartbeat_of(
        &self,
        request: api::HeartbeatRequest,
    ) -> api::HeartbeatResponse {
        match self.coordinate(request).await {
            Ok(response) => response,
            Err(error) => api::HeartbeatResponse {
                error: Some(error),
                ..Default::default()
            },
        }
    }

    async fn coordinate(
        &self,
        request: api::HeartbeatRequest,
    ) -> Result<api::HeartbeatResponse, api::Error> {
        self.check_store(request.store_id)?;
        check_name("topic", &request.topic)?;
        check_name("consumer group", &request.consumer_group)?;
        if !request.describe_only {
            check_name("member id", &request.member_id)?;
        }
        let status = match self.call(Request::Status, 0).await {
            Response::Status(status) => status,
            other => return Err(self.failure(other)),
        };
        let queues = coordinated_queues(&status, &request.topic, &request.consumer_group)?;
        let term = self.coordinator_term(&status)?;
        let shell = &self.coordinator;
        let now_ms = u64::try_from(shell.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if request.describe_only {
            let view = shell
                .coordinator
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .describe(term, now_ms, &request.topic, &request.consumer_group);
            return Ok(response_of(view));
        }
        let heartbeat = Heartbeat {
            topic: request.topic,
            consumer_group: request.consumer_group,
            member_id: request.member_id,
            session_timeout_ms: u64::from(request.session_timeout_ms),
            owned_queues: request.owned_queues,
            sequence: request.sequence,
            leaving: request.leaving,
        };
        let grant = shell
            .coordinator
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .heartbeat(term, now_ms, queues, &heartbeat)
            .map_err(|error| match error {
                HeartbeatError::InvalidArgument(message) => {
                    refuse(ErrorCode::InvalidArgument, message)
                }
                HeartbeatError::Full(message) => refuse(ErrorCode::Busy, message),
            })?;
        Ok(response_of(grant))
    }

    /// The term in which this node masters group 0 with a valid lease, or the refusal that
    /// sends the member to the coordinator.
    fn coordinator_term(&self, status: &NodeStatus) -> Result<u64, api::Error> {
        let group = status
            .groups
            .iter()
            .find(|group| group.group == GroupId(0))
            .expect("every node hosts group 0");
        match (group.master, group.lease_remaining_ms) {
            (Some(master), Some(_)) if master == self.config.node => Ok(group.term),
            (Some(master), _) if master != self.config.node => Err(self.wire_error(
                ErrorCode::NotMaster,
                "the group coordinator is group 0's master".into(),
                Some(master),
            )),
            _ => Err(refuse(
                ErrorCode::NoMaster,
                "group 0 has no master with a lease right now",
            )),
        }
    }
}

/// The queue count of `topic`, which `consumer_group` must be subscribed to, as this node's
/// replicated topic tables have it: the merged view clients route by (`ClusterStatus`), so
/// while a change has reached only some replication groups the coordinator grants only the
/// queues every group has.
fn coordinated_queues(
    status: &NodeStatus,
    topic: &str,
    consumer_group: &str,
) -> Result<QueueId, api::Error> {
    let topics = topics_status(&status.groups);
    let Some(found) = topics.iter().find(|found| found.name == topic) else {
        return Err(refuse(
            ErrorCode::UnknownTopic,
            format!("no topic {topic:?} in this store"),
        ));
    };
    if !found
        .consumer_groups
        .iter()
        .any(|group| group == consumer_group)
    {
        return Err(refuse(
            ErrorCode::UnknownConsumerGroup,
            format!("consumer group {consumer_group:?} is not subscribed to {topic:?}"),
        ));
    }
    Ok(found.queues)
}

fn response_of(grant: Grant) -> api::HeartbeatResponse {
    api::HeartbeatResponse {
        error: None,
        members: grant.members,
        granted_queues: grant.granted_queues,
        generation: grant.generation,
        member_queues: grant
            .member_queues
            .into_iter()
            .map(|(member_id, queues)| api::MemberQueues { member_id, queues })
            .collect(),
    }
}
