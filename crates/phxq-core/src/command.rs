//! The payload of a raft entry: a batch of queue commands, in our own versioned encoding.
//!
//! The write-ahead log checksums every record, so the encoding carries no checksum of its own;
//! it does carry a version byte so that a later format can still read old logs.

use phxq_types::{Offset, QueueId};

use crate::codec::{Reader, VARINT_BYTES_MAX, put_bytes, put_varint};
use std::collections::BTreeMap;

use crate::{ConsumerGroupSettings, Retention, RetryTier, TopicConfig};

/// One message as a producer sent it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Message {
    /// The routing key (may be empty).
    pub key: Vec<u8>,
    /// The payload.
    pub value: Vec<u8>,
}

/// One command inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Appends messages to one queue, in order.
    Enqueue {
        /// Topic name.
        topic: String,
        /// Queue number.
        queue: QueueId,
        /// The producer's id for this enqueue, or empty for none. Within the queue's dedup
        /// window (`TopicConfig::dedup_window` ids) a second enqueue with the same id appends
        /// nothing and is answered with the first one's offsets; at most
        /// `MESSAGE_ID_BYTES_MAX` bytes.
        message_id: Vec<u8>,
        /// The messages, in the producer's order.
        messages: Vec<Message>,
    },
    /// Sets a consumer group's cursor on one queue: the next offset it will read.
    CommitCursor {
        /// Consumer group name.
        consumer_group: String,
        /// Topic name.
        topic: String,
        /// Queue number.
        queue: QueueId,
        /// The next offset to read.
        offset: Offset,
    },
    /// Creates or alters a topic in this replication group's topic table (an admin command;
    /// the CLI sends the same one to every group). Applying it again changes nothing.
    PutTopic {
        /// The whole new configuration.
        config: TopicConfig,
        /// Create (a different existing config is refused) or alter (the topic must exist).
        mode: PutMode,
    },
    /// Removes a topic, its queues and their cursors from this group's topic table.
    DeleteTopic {
        /// Topic name.
        name: String,
    },
    /// Delivers offsets of one queue to a consumer group for per-message acknowledgement
    /// (`machine::delivery`): each offset that is due (in flight past its deadline) or the
    /// next fresh one gets its delivery count incremented and the deadline
    /// `batch.time_ms + ack_timeout_ms`; any other is skipped (a race the master lost).
    Deliver {
        /// Consumer group name.
        consumer_group: String,
        /// Topic name.
        topic: String,
        /// Queue number.
        queue: QueueId,
        /// The offsets, strictly ascending, 1 to `DELIVERY_OFFSETS_MAX` of them.
        offsets: Vec<Offset>,
        /// Ms after the batch's time before an unacked offset is due again (1 to
        /// `ACK_TIMEOUT_MS_MAX`).
        ack_timeout_ms: u64,
    },
    /// Acknowledges delivered offsets: they are done; the cursor moves over the acked prefix.
    Ack {
        /// Consumer group name.
        consumer_group: String,
        /// Topic name.
        topic: String,
        /// Queue number.
        queue: QueueId,
        /// The offsets, strictly ascending, 1 to `DELIVERY_OFFSETS_MAX` of them.
        offsets: Vec<Offset>,
    },
    /// Gives delivered offsets back: each is due again `delay_ms` after the batch's time.
    Nack {
        /// Consumer group name.
        consumer_group: String,
        /// Topic name.
        topic: String,
        /// Queue number.
        queue: QueueId,
        /// The offsets (each in flight), strictly ascending, 1 to `DELIVERY_OFFSETS_MAX`.
        offsets: Vec<Offset>,
        /// Ms after the batch's time before they are due (0 to `NACK_DELAY_MS_MAX`).
        delay_ms: u64,
    },
}

/// How a [`Command::PutTopic`] treats an existing topic of that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// The topic must not exist, or exist with exactly this config (a re-run: no change).
    Create,
    /// The topic must exist; its queue count may grow, never shrink.
    Alter,
}

/// A raft entry's payload: the commands one master gathered in one group-commit round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The master's wall clock when it proposed the batch, in ms since the Unix epoch; the
    /// enqueue time of every message in it (replay by time and retention by age use it).
    pub time_ms: u64,
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

/// Bytes that are not a batch this build can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Described in the message.
    #[error("undecodable batch: {0}")]
    Invalid(String),
}

/// The format version this build writes (and the only one it reads).
const FORMAT_VERSION: u8 = 1;
/// Tag of [`Command::Enqueue`].
const TAG_ENQUEUE: u8 = 1;
/// Tag of [`Command::CommitCursor`].
const TAG_COMMIT_CURSOR: u8 = 2;
/// Tag of a [`Command::Enqueue`] with a message id (one without keeps tag 1, so logs written
/// before ids existed read the same).
const TAG_ENQUEUE_WITH_ID: u8 = 3;
/// Tag of [`Command::PutTopic`].
const TAG_PUT_TOPIC: u8 = 4;
/// Tag of [`Command::DeleteTopic`].
const TAG_DELETE_TOPIC: u8 = 5;
/// Tag of [`Command::Deliver`].
const TAG_DELIVER: u8 = 6;
/// Tag of [`Command::Ack`].
const TAG_ACK: u8 = 7;
/// Tag of [`Command::Nack`].
const TAG_NACK: u8 = 8;

/// Encodes a batch.
///
/// ```text
/// batch   = version(1) time_ms:varint count:varint command*
/// command = 1 topic:bytes queue:varint count:varint (key:bytes value:bytes)*   Enqueue
///         | 2 consumer_group:bytes topic:bytes queue:varint offset:varint      CommitCursor
///         | 3 topic:bytes queue:varint message_id:bytes count:varint (key:bytes value:bytes)*
///                                                    Enqueue with a (non-empty) message id
///         | 4 mode(1: create, 2: alter) topic_config                               PutTopic
///         | 5 topic:bytes                                                       DeleteTopic
///         | 6 delivery ack_timeout_ms:varint                                    Deliver
///         | 7 delivery                                                          Ack
///         | 8 delivery delay_ms:varint                                          Nack
/// delivery = consumer_group:bytes topic:bytes queue:varint count:varint offset:varint*
/// topic_config = name:bytes queues:varint group_count:varint group:bytes*
///                replay_count:varint replay_age_ms:varint max_age_ms:option max_bytes:option
///                dedup_window:varint settings_count:varint settings*
/// settings = consumer_group:bytes tier_count:varint (attempts:varint delay_ms:varint)*
///            dead_letter:option_bytes rate_messages:option rate_bytes:option
///            max_in_flight:option                       (consumer groups in ascending order)
/// option  = 0 | 1 value:varint
/// option_bytes = 0 | 1 value:bytes
/// bytes   = length:varint byte*
/// ```
///
/// Varints are minimal LEB128, strings are UTF-8.
pub fn encode_batch(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_bytes_hint(batch));
    out.push(FORMAT_VERSION);
    put_varint(&mut out, batch.time_ms);
    put_varint(&mut out, batch.commands.len() as u64);
    for command in &batch.commands {
        encode_command(&mut out, command);
    }
    out
}

/// Decodes a batch written by [`encode_batch`].
///
/// Never panics: arbitrary bytes give a batch or a [`DecodeError`], and no allocation is
/// larger than the input. Trailing bytes, an unknown version or an unknown tag are errors.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, DecodeError> {
    let mut reader = Reader::new(bytes);
    let version = reader.u8("version")?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::Invalid(format!(
            "batch format version {version}; this build reads {FORMAT_VERSION}"
        )));
    }
    let time_ms = reader.varint("time_ms")?;
    let count = reader.count("command count")?;
    let mut commands = Vec::with_capacity(count);
    for _ in 0..count {
        commands.push(decode_command(&mut reader)?);
    }
    reader.finish("batch")?;
    Ok(Batch { time_ms, commands })
}

/// An upper bound of the encoded size (every varint counted at its widest), so encoding
/// allocates once.
fn encoded_bytes_hint(batch: &Batch) -> usize {
    let command_bytes = |command: &Command| match command {
        Command::Enqueue {
            topic,
            message_id,
            messages,
            ..
        } => {
            let message_bytes: usize = messages
                .iter()
                .map(|m| m.key.len() + m.value.len() + 2 * VARINT_BYTES_MAX)
                .sum();
            1 + topic.len() + message_id.len() + 4 * VARINT_BYTES_MAX + message_bytes
        }
        Command::CommitCursor {
            consumer_group,
            topic,
            ..
        } => 1 + consumer_group.len() + topic.len() + 4 * VARINT_BYTES_MAX,
        Command::PutTopic { config, .. } => {
            let groups: usize = config.consumer_groups.iter().map(String::len).sum();
            2 + config.name.len() + groups + (8 + config.consumer_groups.len()) * VARINT_BYTES_MAX
        }
        Command::DeleteTopic { name } => 1 + name.len() + VARINT_BYTES_MAX,
        Command::Deliver {
            consumer_group,
            topic,
            offsets,
            ..
        }
        | Command::Ack {
            consumer_group,
            topic,
            offsets,
            ..
        }
        | Command::Nack {
            consumer_group,
            topic,
            offsets,
            ..
        } => 1 + consumer_group.len() + topic.len() + (5 + offsets.len()) * VARINT_BYTES_MAX,
    };
    1 + 2 * VARINT_BYTES_MAX + batch.commands.iter().map(command_bytes).sum::<usize>()
}

fn encode_command(out: &mut Vec<u8>, command: &Command) {
    match command {
        Command::Enqueue {
            topic,
            queue,
            message_id,
            messages,
        } => {
            out.push(if message_id.is_empty() {
                TAG_ENQUEUE
            } else {
                TAG_ENQUEUE_WITH_ID
            });
            put_bytes(out, topic.as_bytes());
            put_varint(out, u64::from(*queue));
            if !message_id.is_empty() {
                put_bytes(out, message_id);
            }
            put_varint(out, messages.len() as u64);
            for message in messages {
                put_bytes(out, &message.key);
                put_bytes(out, &message.value);
            }
        }
        Command::CommitCursor {
            consumer_group,
            topic,
            queue,
            offset,
        } => {
            out.push(TAG_COMMIT_CURSOR);
            put_bytes(out, consumer_group.as_bytes());
            put_bytes(out, topic.as_bytes());
            put_varint(out, u64::from(*queue));
            put_varint(out, *offset);
        }
        Command::PutTopic { config, mode } => {
            out.push(TAG_PUT_TOPIC);
            out.push(match mode {
                PutMode::Create => 1,
                PutMode::Alter => 2,
            });
            put_topic_config(out, config);
        }
        Command::DeleteTopic { name } => {
            out.push(TAG_DELETE_TOPIC);
            put_bytes(out, name.as_bytes());
        }
        Command::Deliver {
            consumer_group,
            topic,
            queue,
            offsets,
            ack_timeout_ms,
        } => {
            out.push(TAG_DELIVER);
            put_delivery(out, consumer_group, topic, *queue, offsets);
            put_varint(out, *ack_timeout_ms);
        }
        Command::Ack {
            consumer_group,
            topic,
            queue,
            offsets,
        } => {
            out.push(TAG_ACK);
            put_delivery(out, consumer_group, topic, *queue, offsets);
        }
        Command::Nack {
            consumer_group,
            topic,
            queue,
            offsets,
            delay_ms,
        } => {
            out.push(TAG_NACK);
            put_delivery(out, consumer_group, topic, *queue, offsets);
            put_varint(out, *delay_ms);
        }
    }
}

/// Appends the `delivery` part of [`encode_batch`]'s grammar.
fn put_delivery(
    out: &mut Vec<u8>,
    consumer_group: &str,
    topic: &str,
    queue: QueueId,
    offsets: &[Offset],
) {
    put_bytes(out, consumer_group.as_bytes());
    put_bytes(out, topic.as_bytes());
    put_varint(out, u64::from(queue));
    put_varint(out, offsets.len() as u64);
    for &offset in offsets {
        put_varint(out, offset);
    }
}

/// Reads the `delivery` part: consumer group, topic, queue, offsets.
fn read_delivery(
    reader: &mut Reader<'_>,
) -> Result<(String, String, QueueId, Vec<Offset>), DecodeError> {
    let consumer_group = reader.string("consumer group")?;
    let topic = reader.string("topic")?;
    let queue = reader.varint_u32("queue")?;
    let count = reader.count("offset count")?;
    let mut offsets = Vec::with_capacity(count);
    for _ in 0..count {
        offsets.push(reader.varint("offset")?);
    }
    Ok((consumer_group, topic, queue, offsets))
}

/// Appends a topic's configuration (`topic_config` in [`encode_batch`]'s grammar; snapshots
/// use it too).
pub(crate) fn put_topic_config(out: &mut Vec<u8>, config: &TopicConfig) {
    put_bytes(out, config.name.as_bytes());
    put_varint(out, u64::from(config.queues));
    put_varint(out, config.consumer_groups.len() as u64);
    for group in &config.consumer_groups {
        put_bytes(out, group.as_bytes());
    }
    let retention = &config.retention;
    put_varint(out, retention.replay_count);
    put_varint(out, retention.replay_age_ms);
    for option in [retention.max_age_ms, retention.max_bytes] {
        put_option(out, option);
    }
    put_varint(out, u64::from(config.dedup_window));
    put_varint(out, config.group_settings.len() as u64);
    for (group, settings) in &config.group_settings {
        put_bytes(out, group.as_bytes());
        put_varint(out, settings.retry_tiers.len() as u64);
        for tier in &settings.retry_tiers {
            put_varint(out, u64::from(tier.attempts));
            put_varint(out, tier.delay_ms);
        }
        match &settings.dead_letter_topic {
            None => out.push(0),
            Some(topic) => {
                out.push(1);
                put_bytes(out, topic.as_bytes());
            }
        }
        let max_in_flight = settings.max_in_flight.map(u64::from);
        for option in [
            settings.rate_messages_per_s,
            settings.rate_bytes_per_s,
            max_in_flight,
        ] {
            put_option(out, option);
        }
    }
}

fn put_option(out: &mut Vec<u8>, option: Option<u64>) {
    match option {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            put_varint(out, value);
        }
    }
}

/// The presence byte of an option: 0 or 1, anything else is an error.
fn read_present(reader: &mut Reader<'_>, what: &str) -> Result<bool, DecodeError> {
    match reader.u8(what)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::Invalid(format!("{what}: option byte {other}"))),
    }
}

fn read_option(reader: &mut Reader<'_>, what: &str) -> Result<Option<u64>, DecodeError> {
    Ok(match read_present(reader, what)? {
        true => Some(reader.varint(what)?),
        false => None,
    })
}

/// Reads the consumer-group settings of a topic config: groups in strictly ascending order.
fn read_group_settings(
    reader: &mut Reader<'_>,
) -> Result<BTreeMap<String, ConsumerGroupSettings>, DecodeError> {
    let mut all = BTreeMap::new();
    for _ in 0..reader.count("settings count")? {
        let group = reader.string("settings group")?;
        if all
            .keys()
            .next_back()
            .is_some_and(|last: &String| *last >= group)
        {
            return Err(DecodeError::Invalid(format!(
                "settings of {group:?} out of order or repeated"
            )));
        }
        let tiers = reader.count("retry tier count")?;
        let mut retry_tiers = Vec::with_capacity(tiers);
        for _ in 0..tiers {
            retry_tiers.push(RetryTier {
                attempts: reader.varint_u32("retry attempts")?,
                delay_ms: reader.varint("retry delay")?,
            });
        }
        let dead_letter_topic = match read_present(reader, "dead-letter topic")? {
            true => Some(reader.string("dead-letter topic")?),
            false => None,
        };
        let rate_messages_per_s = read_option(reader, "rate messages")?;
        let rate_bytes_per_s = read_option(reader, "rate bytes")?;
        let max_in_flight = match read_option(reader, "max in flight")? {
            None => None,
            Some(value) => Some(
                u32::try_from(value)
                    .map_err(|_| DecodeError::Invalid(format!("max in flight {value} over u32")))?,
            ),
        };
        let settings = ConsumerGroupSettings {
            retry_tiers,
            dead_letter_topic,
            rate_messages_per_s,
            rate_bytes_per_s,
            max_in_flight,
        };
        all.insert(group, settings);
    }
    Ok(all)
}

/// Reads what [`put_topic_config`] wrote. Checks the encoding only, not the config's rules
/// (applying does that).
pub(crate) fn read_topic_config(reader: &mut Reader<'_>) -> Result<TopicConfig, DecodeError> {
    let name = reader.string("topic")?;
    let queues = reader.varint_u32("queue count")?;
    let count = reader.count("consumer group count")?;
    let mut consumer_groups = Vec::with_capacity(count);
    for _ in 0..count {
        consumer_groups.push(reader.string("consumer group")?);
    }
    let replay_count = reader.varint("replay count")?;
    let replay_age_ms = reader.varint("replay age")?;
    let max_age_ms = read_option(reader, "max age")?;
    let max_bytes = read_option(reader, "max bytes")?;
    let dedup_window = reader.varint_u32("dedup window")?;
    let group_settings = read_group_settings(reader)?;
    Ok(TopicConfig {
        name,
        queues,
        consumer_groups,
        retention: Retention {
            replay_count,
            replay_age_ms,
            max_age_ms,
            max_bytes,
        },
        dedup_window,
        group_settings,
    })
}

fn decode_command(reader: &mut Reader<'_>) -> Result<Command, DecodeError> {
    match reader.u8("command tag")? {
        tag @ (TAG_ENQUEUE | TAG_ENQUEUE_WITH_ID) => {
            let topic = reader.string("topic")?;
            let queue = reader.varint_u32("queue")?;
            let message_id = if tag == TAG_ENQUEUE_WITH_ID {
                let id = reader.bytes("message id")?;
                if id.is_empty() {
                    // One encoding per batch: no id is written with tag 1.
                    return Err(DecodeError::Invalid("empty message id".to_string()));
                }
                id.to_vec()
            } else {
                Vec::new()
            };
            let count = reader.count("message count")?;
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let key = reader.bytes("key")?.to_vec();
                let value = reader.bytes("value")?.to_vec();
                messages.push(Message { key, value });
            }
            Ok(Command::Enqueue {
                topic,
                queue,
                message_id,
                messages,
            })
        }
        TAG_COMMIT_CURSOR => Ok(Command::CommitCursor {
            consumer_group: reader.string("consumer group")?,
            topic: reader.string("topic")?,
            queue: reader.varint_u32("queue")?,
            offset: reader.varint("offset")?,
        }),
        TAG_PUT_TOPIC => {
            let mode = match reader.u8("put mode")? {
                1 => PutMode::Create,
                2 => PutMode::Alter,
                other => return Err(DecodeError::Invalid(format!("put mode {other}"))),
            };
            let config = read_topic_config(reader)?;
            Ok(Command::PutTopic { config, mode })
        }
        TAG_DELETE_TOPIC => Ok(Command::DeleteTopic {
            name: reader.string("topic")?,
        }),
        TAG_DELIVER => {
            let (consumer_group, topic, queue, offsets) = read_delivery(reader)?;
            Ok(Command::Deliver {
                consumer_group,
                topic,
                queue,
                offsets,
                ack_timeout_ms: reader.varint("ack timeout")?,
            })
        }
        TAG_ACK => {
            let (consumer_group, topic, queue, offsets) = read_delivery(reader)?;
            Ok(Command::Ack {
                consumer_group,
                topic,
                queue,
                offsets,
            })
        }
        TAG_NACK => {
            let (consumer_group, topic, queue, offsets) = read_delivery(reader)?;
            Ok(Command::Nack {
                consumer_group,
                topic,
                queue,
                offsets,
                delay_ms: reader.varint("nack delay")?,
            })
        }
        tag => Err(DecodeError::Invalid(format!("unknown command tag {tag}"))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Batch {
        Batch {
            time_ms: 300,
            commands: vec![
                Command::Enqueue {
                    topic: "t".into(),
                    queue: 2,
                    message_id: Vec::new(),
                    messages: vec![Message {
                        key: b"k".to_vec(),
                        value: b"vv".to_vec(),
                    }],
                },
                Command::CommitCursor {
                    consumer_group: "g".into(),
                    topic: "t".into(),
                    queue: 2,
                    offset: 1,
                },
            ],
        }
    }

    #[test]
    fn the_format_is_pinned_byte_for_byte() {
        // A change here breaks every existing log: add a version instead.
        #[rustfmt::skip]
        let expected = [
            1, 0xac, 0x02, 2,                       // version, time 300, 2 commands
            1, 1, b't', 2, 1, 1, b'k', 2, b'v', b'v', // enqueue t/2: one message k=vv
            2, 1, b'g', 1, b't', 2, 1,                // commit g on t/2 at 1
        ];
        assert_eq!(encode_batch(&sample()), expected);
        assert_eq!(decode_batch(&expected), Ok(sample()));
    }

    #[test]
    fn unknown_versions_tags_and_trailing_bytes_are_refused() {
        let good = encode_batch(&sample());
        let mut version_2 = good.clone();
        version_2[0] = 2;
        assert!(decode_batch(&version_2).is_err());
        let mut tag_9 = good.clone();
        tag_9[4] = 9;
        assert!(decode_batch(&tag_9).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_batch(&trailing).is_err());
        assert!(decode_batch(&[]).is_err());
    }

    #[test]
    fn an_enqueue_with_a_message_id_has_its_own_tag_and_never_an_empty_id() {
        let batch = Batch {
            time_ms: 1,
            commands: vec![Command::Enqueue {
                topic: "t".into(),
                queue: 0,
                message_id: b"id".to_vec(),
                messages: vec![Message::default()],
            }],
        };
        let expected = [1, 1, 1, 3, 1, b't', 0, 2, b'i', b'd', 1, 0, 0];
        assert_eq!(encode_batch(&batch), expected);
        assert_eq!(decode_batch(&expected), Ok(batch));
        let empty_id = [1, 1, 1, 3, 1, b't', 0, 0, 1, 0, 0];
        assert!(decode_batch(&empty_id).is_err());
    }

    #[test]
    fn topic_admin_commands_are_pinned_byte_for_byte() {
        let config = TopicConfig {
            name: "t".into(),
            queues: 3,
            consumer_groups: vec!["g".into()],
            retention: Retention {
                replay_count: 2,
                replay_age_ms: 0,
                max_age_ms: None,
                max_bytes: Some(5),
            },
            dedup_window: 7,
            group_settings: BTreeMap::new(),
        };
        let batch = Batch {
            time_ms: 1,
            commands: vec![
                Command::PutTopic {
                    config,
                    mode: PutMode::Alter,
                },
                Command::DeleteTopic { name: "t".into() },
            ],
        };
        #[rustfmt::skip]
        let expected = [
            1, 1, 2,                                 // version, time 1, 2 commands
            4, 2, 1, b't', 3, 1, 1, b'g', 2, 0, 0, 1, 5, 7, 0, // alter t: 3 queues, g, ...
            5, 1, b't',                              // delete t
        ];
        assert_eq!(encode_batch(&batch), expected);
        assert_eq!(decode_batch(&expected), Ok(batch));
        let mut bad_mode = expected;
        bad_mode[4] = 3;
        assert!(decode_batch(&bad_mode).is_err());
        let mut bad_option = expected;
        bad_option[13] = 2;
        assert!(decode_batch(&bad_option).is_err());
    }

    #[test]
    fn delivery_commands_are_pinned_byte_for_byte() {
        let command = |kind| {
            let (consumer_group, topic, offsets) = ("g".to_string(), "t".to_string(), vec![3, 300]);
            match kind {
                6 => Command::Deliver {
                    consumer_group,
                    topic,
                    queue: 2,
                    offsets,
                    ack_timeout_ms: 5,
                },
                7 => Command::Ack {
                    consumer_group,
                    topic,
                    queue: 2,
                    offsets,
                },
                _ => Command::Nack {
                    consumer_group,
                    topic,
                    queue: 2,
                    offsets,
                    delay_ms: 0,
                },
            }
        };
        let batch = Batch {
            time_ms: 1,
            commands: vec![command(6), command(7), command(8)],
        };
        #[rustfmt::skip]
        let expected = [
            1, 1, 3,                                                 // version, time 1, 3 commands
            6, 1, b'g', 1, b't', 2, 2, 3, 0xac, 0x02, 5,             // deliver g t/2 [3, 300] 5 ms
            7, 1, b'g', 1, b't', 2, 2, 3, 0xac, 0x02,                // ack g t/2 [3, 300]
            8, 1, b'g', 1, b't', 2, 2, 3, 0xac, 0x02, 0,             // nack g t/2 [3, 300] 0 ms
        ];
        assert_eq!(encode_batch(&batch), expected);
        assert_eq!(decode_batch(&expected), Ok(batch));
    }

    #[test]
    fn names_must_be_utf8_and_queues_must_fit_u32() {
        let mut bad_name = encode_batch(&sample());
        bad_name[6] = 0xff;
        assert!(decode_batch(&bad_name).is_err());
        let mut out = vec![FORMAT_VERSION, 0, 1, TAG_COMMIT_CURSOR];
        put_bytes(&mut out, b"g");
        put_bytes(&mut out, b"t");
        put_varint(&mut out, u64::from(u32::MAX) + 1);
        put_varint(&mut out, 1);
        assert!(decode_batch(&out).is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z]{0,6}"
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            prop::collection::vec(any::<u8>(), 0..4),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(key, value)| Message { key, value })
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (
                name(),
                any::<u32>(),
                prop::collection::vec(any::<u8>(), 0..3),
                prop::collection::vec(message(), 0..4)
            )
                .prop_map(|(topic, queue, message_id, messages)| Command::Enqueue {
                    topic,
                    queue,
                    message_id,
                    messages
                }),
            (name(), name(), any::<u32>(), any::<u64>()).prop_map(
                |(consumer_group, topic, queue, offset)| Command::CommitCursor {
                    consumer_group,
                    topic,
                    queue,
                    offset
                }
            ),
            (
                name(),
                name(),
                any::<u32>(),
                prop::collection::vec(any::<u64>(), 0..4),
                any::<u64>(),
                0..3u8
            )
                .prop_map(|(consumer_group, topic, queue, offsets, ms, kind)| {
                    match kind {
                        0 => Command::Deliver {
                            consumer_group,
                            topic,
                            queue,
                            offsets,
                            ack_timeout_ms: ms,
                        },
                        1 => Command::Ack {
                            consumer_group,
                            topic,
                            queue,
                            offsets,
                        },
                        _ => Command::Nack {
                            consumer_group,
                            topic,
                            queue,
                            offsets,
                            delay_ms: ms,
                        },
                    }
                }),
        ]
    }

    fn group_settings() -> impl Strategy<Value = BTreeMap<String, ConsumerGroupSettings>> {
        let tier = (any::<u32>(), any::<u64>())
            .prop_map(|(attempts, delay_ms)| RetryTier { attempts, delay_ms });
        let settings = (
            prop::collection::vec(tier, 0..3),
            prop::option::of(name()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(
                |(retry_tiers, dead_letter_topic, messages, bytes, max_in_flight)| {
                    ConsumerGroupSettings {
                        retry_tiers,
                        dead_letter_topic,
                        rate_messages_per_s: messages,
                        rate_bytes_per_s: bytes,
                        max_in_flight,
                    }
                },
            );
        prop::collection::btree_map(name(), settings, 0..3)
    }

    fn topic_config() -> impl Strategy<Value = TopicConfig> {
        (
            name(),
            any::<u32>(),
            prop::collection::vec(name(), 0..3),
            (any::<u64>(), any::<u64>()),
            (
                prop::option::of(any::<u64>()),
                prop::option::of(any::<u64>()),
            ),
            (any::<u32>(), group_settings()),
        )
            .prop_map(
                |(
                    name,
                    queues,
                    consumer_groups,
                    (replay_count, replay_age_ms),
                    caps,
                    (dedup, group_settings),
                )| {
                    TopicConfig {
                        name,
                        queues,
                        consumer_groups,
                        retention: Retention {
                            replay_count,
                            replay_age_ms,
                            max_age_ms: caps.0,
                            max_bytes: caps.1,
                        },
                        dedup_window: dedup,
                        group_settings,
                    }
                },
            )
    }

    fn admin_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (topic_config(), any::<bool>()).prop_map(|(config, create)| Command::PutTopic {
                config,
                mode: if create {
                    PutMode::Create
                } else {
                    PutMode::Alter
                },
            }),
            name().prop_map(|name| Command::DeleteTopic { name }),
        ]
    }

    fn batch() -> impl Strategy<Value = Batch> {
        let any_command = prop_oneof![4 => command(), 1 => admin_command()];
        (any::<u64>(), prop::collection::vec(any_command, 0..6))
            .prop_map(|(time_ms, commands)| Batch { time_ms, commands })
    }

    proptest! {
        #[test]
        fn every_batch_round_trips(batch in batch()) {
            let bytes = encode_batch(&batch);
            prop_assert_eq!(decode_batch(&bytes), Ok(batch));
        }

        #[test]
        fn every_truncation_of_a_batch_is_refused(batch in batch()) {
            let bytes = encode_batch(&batch);
            for length in 0..bytes.len() {
                prop_assert!(decode_batch(&bytes[..length]).is_err(), "prefix {length}");
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_batch(&bytes);
            // Biased towards the real format, so decoding gets past the first bytes.
            let mut framed = vec![FORMAT_VERSION];
            framed.extend_from_slice(&bytes);
            if let Ok(batch) = decode_batch(&framed) {
                prop_assert_eq!(encode_batch(&batch), framed, "one encoding per batch");
            }
        }

        #[test]
        fn flipping_one_byte_never_panics(batch in batch(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let mut bytes = encode_batch(&batch);
            let at = at.index(bytes.len());
            bytes[at] = to;
            let _ = decode_batch(&bytes);
        }
    }
}
