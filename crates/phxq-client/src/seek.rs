//! Moving a consumer group's cursors: [`seek`] (and [`Consumer::seek`]).
//!
//! A seek resolves every queue's target first (a `Consume` at the group's cursor for where
//! it is and the queue's end; one at offset 1 for the oldest retained message; an
//! `OffsetForTime` for a time), each at the queue's master like every other call of this
//! crate, and refuses the whole seek, **moving nothing**, when any queue refuses or any
//! target is past its queue's end. Only then does it commit, queue by queue. A consumer of
//! the group that is running meanwhile commits its own cursor over the seek's: stop the
//! group's consumers first.

use phxq_proto::api;
use phxq_types::{ErrorCode, GroupId, Offset, QueueId, TIME_MS_MAX, group_of_queue, validate_name};

use crate::config::{ConfigError, ProducerConfig};
use crate::consumer::Consumer;
use crate::error::ProduceError;
use crate::router::{Halt, Router};

/// Where a [`seek`] moves a cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTo {
    /// The queue's oldest retained message.
    Earliest,
    /// The queue's end: only messages produced from now on are read.
    Latest,
    /// This offset (from 1 to the queue's end; one already deleted by retention reads from
    /// the oldest retained message).
    Offset(Offset),
    /// The first retained message accepted at or after this time (ms since the Unix epoch,
    /// the accepting master's clock); the queue's end if none is.
    Time(u64),
}

/// One cursor a [`seek`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeekMove {
    /// The queue.
    pub queue: QueueId,
    /// Where the group read next before (its cursor, or the oldest retained message if
    /// retention passed the cursor).
    pub from: Offset,
    /// The cursor now.
    pub to: Offset,
}

/// Why a [`seek`] was refused or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SeekError {
    /// The connection settings are invalid; nothing was asked.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A refusal (unknown topic, consumer group or queue, an offset past the end: nothing
    /// moved), or trouble that outlasted the deadline. Only a failure of a commit, after
    /// every target was resolved, can leave the queues before `queue` moved.
    #[error("queue {queue:?}: {error}")]
    Store {
        /// The queue concerned (`None`: the topic or the request as a whole).
        queue: Option<QueueId>,
        /// What happened, with its [`ErrorCode`] when there is one.
        error: ProduceError,
    },
}

impl SeekError {
    /// The phxq error code, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SeekError::Config(_) => None,
            SeekError::Store { error, .. } => error.code(),
        }
    }
}

/// Moves the cursor of `consumer_group` on queue `queue` of `topic` (every queue of the topic
/// for `None`) to `to`, through the store `config` reaches (its deadline bounds each call
/// with its retries). Returns every move, in queue order. See the module documentation.
pub async fn seek(
    config: &ProducerConfig,
    topic: &str,
    consumer_group: &str,
    queue: Option<QueueId>,
    to: SeekTo,
) -> Result<Vec<SeekMove>, SeekError> {
    config.validate()?;
    let refused = |queue, code, message: String| SeekError::Store {
        queue,
        error: ProduceError::refused(code, message),
    };
    for (what, name) in [("topic", topic), ("consumer group", consumer_group)] {
        validate_name(name)
            .map_err(|error| refused(None, ErrorCode::InvalidName, format!("{what}: {error}")))?;
    }
    match to {
        SeekTo::Offset(0) => {
            return Err(refused(
                None,
                ErrorCode::InvalidArgument,
                "offsets start at 1".to_string(),
            ));
        }
        SeekTo::Time(time_ms) if time_ms > TIME_MS_MAX => {
            return Err(refused(
                None,
                ErrorCode::InvalidArgument,
                format!("time {time_ms} ms is after {TIME_MS_MAX} (year 9999)"),
            ));
        }
        _ => {}
    }
    let mut config = config.clone();
    config.queue_change_retry = false; // a seek is about given queues
    let seeker = Seeker {
        router: Router::new(config),
        topic,
        consumer_group,
    };
    let mut progress = seeker.router.start_request();
    let (layout, queues) = seeker
        .router
        .topic_queues(topic, &mut progress)
        .await
        .map_err(|error| SeekError::Store { queue: None, error })?;
    let chosen: Vec<QueueId> = match queue {
        Some(queue) if queue >= queues => {
            return Err(refused(
                Some(queue),
                ErrorCode::UnknownQueue,
                format!("topic {topic:?} has {queues} queues; there is no queue {queue}"),
            ));
        }
        Some(queue) => vec![queue],
        None => (0..queues).collect(),
    };
    // Every target first: any refusal moves nothing.
    let mut moves = Vec::with_capacity(chosen.len());
    for queue in chosen {
        let group = group_of_queue(queue, layout.groups);
        let target = seeker.target(group, queue, to).await?;
        moves.push(target);
    }
    for SeekMove { queue, to, .. } in &moves {
        seeker
            .commit(group_of_queue(*queue, layout.groups), *queue, *to)
            .await?;
    }
    Ok(moves)
}

impl Consumer {
    /// Moves this consumer's group's cursor on `queue` of its topic (every queue for `None`)
    /// to `to`: [`seek`] through this consumer's servers. Do it while no consumer of the
    /// group runs (a running one commits over it).
    pub async fn seek(
        &self,
        queue: Option<QueueId>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SeekError> {
        let config = self.config();
        seek(
            &config.router_config(),
            &config.topic,
            &config.consumer_group,
            queue,
            to,
        )
        .await
    }
}

/// One seek's calls.
struct Seeker<'a> {
    router: Router,
    topic: &'a str,
    consumer_group: &'a str,
}

impl Seeker<'_> {
    /// Where `queue`'s cursor is and where it should go, checked against the queue's end.
    async fn target(
        &self,
        group: GroupId,
        queue: QueueId,
        to: SeekTo,
    ) -> Result<SeekMove, SeekError> {
        let at_cursor = self.consume(group, queue, None).await?;
        let from = at_cursor
            .messages
            .first()
            .map_or(at_cursor.next_offset, |message| message.offset);
        let end = at_cursor.end_offset;
        let target = match to {
            SeekTo::Latest => end,
            SeekTo::Offset(offset) => offset,
            SeekTo::Earliest => {
                let oldest = self.consume(group, queue, Some(1)).await?;
                oldest
                    .messages
                    .first()
                    .map_or(oldest.end_offset, |message| message.offset)
            }
            SeekTo::Time(time_ms) => self.offset_for_time(group, queue, time_ms).await?,
        };
        if target == 0 || target > end {
            return Err(SeekError::Store {
                queue: Some(queue),
                error: ProduceError::refused(
                    ErrorCode::InvalidArgument,
                    format!("queue {queue} ends at offset {end}; cannot seek to {target}"),
                ),
            });
        }
        Ok(SeekMove {
            queue,
            from,
            to: target,
        })
    }

    /// One message of `queue` for the group, from its cursor (`None`) or `from`, no wait.
    async fn consume(
        &self,
        group: GroupId,
        queue: QueueId,
        from: Option<Offset>,
    ) -> Result<api::ConsumeResponse, SeekError> {
        let request = api::ConsumeRequest {
            topic: self.topic.to_string(),
            queue,
            consumer_group: self.consumer_group.to_string(),
            from_offset: from,
            max_messages: 1,
            max_bytes: 1,
            wait_ms: 0,
            store_id: self.router.config().store_id,
        };
        self.call(group, queue, move |mut client| {
            let request = request.clone();
            async move {
                let response = client.consume(request).await?.into_inner();
                let error = response.error.clone();
                Ok((response, error))
            }
        })
        .await
    }

    async fn offset_for_time(
        &self,
        group: GroupId,
        queue: QueueId,
        time_ms: u64,
    ) -> Result<Offset, SeekError> {
        let request = api::OffsetForTimeRequest {
            topic: self.topic.to_string(),
            queue,
            time_ms,
            store_id: self.router.config().store_id,
        };
        self.call(group, queue, move |mut client| {
            let request = request.clone();
            async move {
                let response = client.offset_for_time(request).await?.into_inner();
                Ok((response.offset, response.error))
            }
        })
        .await
    }

    async fn commit(
        &self,
        group: GroupId,
        queue: QueueId,
        offset: Offset,
    ) -> Result<(), SeekError> {
        let request = api::CommitRequest {
            topic: self.topic.to_string(),
            queue,
            consumer_group: self.consumer_group.to_string(),
            offset,
            store_id: self.router.config().store_id,
            // An operator's move of the group's cursor: needs `admin` with auth on.
            seek: true,
        };
        self.call(group, queue, move |mut client| {
            let request = request.clone();
            async move {
                let response = client.commit(request).await?.into_inner();
                Ok(((), response.error))
            }
        })
        .await
    }

    /// One routed call about `queue` with its retries.
    async fn call<T, F, Fut>(
        &self,
        group: GroupId,
        queue: QueueId,
        attempt: F,
    ) -> Result<T, SeekError>
    where
        F: FnMut(api::Client) -> Fut,
        Fut: Future<Output = crate::router::Attempt<T>>,
    {
        let mut progress = self.router.start_request();
        self.router
            .call(Some(group), &mut progress, attempt)
            .await
            .map_err(|halt| match halt {
                Halt::Error(error) => SeekError::Store {
                    queue: Some(queue),
                    error,
                },
                Halt::MasterMissing => unreachable!("queue-change retry is off for seeks"),
            })
    }
}
