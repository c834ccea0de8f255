//! The node-to-node wire format: raft messages between the nodes of a store.
//!
//! Peer bytes are never parsed with protobuf-2 (RUSTSEC-2024-0437: uncontrolled recursion on
//! crafted input); this module is our own encoding of `raft::eraftpb::Message`, versioned and
//! strict, and the stream framing used on the peer TCP connections.
//!
//! # Stream framing
//!
//! A connection carries a sequence of frames:
//!
//! ```text
//! [u32 LE payload length][u32 LE crc32c(payload)][payload]
//! ```
//!
//! The length is checked against [`PEER_FRAME_BYTES_MAX`] before anything is allocated, and
//! the payload buffer grows only as bytes arrive, so a peer that announces a large frame and
//! stalls costs nothing. A checksum mismatch is an error: the connection is not trusted after
//! it.
//!
//! # Payload, version 1
//!
//! Integers are LEB128 varints (u64; `priority` is zigzag-encoded i64), written in their
//! shortest form; byte strings and lists are a varint count followed by their items; booleans
//! and presence flags are one byte, 0 or 1; enums are one byte holding raft-rs's numbers.
//!
//! ```text
//! frame    = version(u8 = 1) store_id from to count { group message }*count
//! message  = msg_type(u8) to from term log_term index commit commit_term request_snapshot
//!            reject_hint reject(bool) context(bytes) deprecated_priority priority(zigzag)
//!            count { entry }*count has_snapshot(bool) [snapshot]
//! entry    = entry_type(u8) term index data(bytes) context(bytes) sync_log(bool)
//! snapshot = data(bytes) has_metadata(bool) [index term has_conf_state(bool) [conf_state]]
//! conf_state = voters learners voters_outgoing learners_next (each: count { id }*count)
//!            auto_leave(bool)
//! ```
//!
//! # Invariants
//!
//! * Decoding accepts exactly what encoding produces: unknown versions and enum values,
//!   booleans other than 0 or 1, over-long or overflowing varints and trailing bytes are
//!   errors. So `decode(encode(f)) == f`, and any proper prefix of a valid payload is an error.
//! * Decoding never panics, and allocates in proportion to the input it has actually read:
//!   a count is trusted only as far as the remaining bytes could hold that many items.

use std::io;

use phxq_types::{GroupId, NodeId};
use raft::eraftpb::{
    ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The payload format this code writes and the only one it reads.
pub const PEER_FORMAT_VERSION: u8 = 1;

/// Largest frame payload, in bytes (64 MiB), checked from the header before anything is
/// allocated: bounds what a peer can make us buffer. Only a frame of one raft message may be
/// this large (a snapshot, at most 32 MiB, or an append of one entry, at most
/// `limits.batch_bytes_max` ≤ 32 MiB); see [`PEER_FRAME_BATCH_BYTES_MAX`].
pub const PEER_FRAME_BYTES_MAX: usize = 64 << 20;

/// Largest payload of a frame holding more than one message, or a message with more than one
/// entry, in bytes (5 MiB: raft's 4 MiB `max_size_per_msg` and room for framing). Decoding a
/// larger payload refuses a second message or entry before allocating for it, so what a frame
/// decodes to stays within a small multiple of this (many tiny messages) or of its own size
/// (one large snapshot or entry, whose bytes are copied once). Senders split frames to fit.
pub const PEER_FRAME_BATCH_BYTES_MAX: usize = 5 << 20;

/// Bytes of stream framing before each payload: length and checksum.
pub const STREAM_HEADER_BYTES: usize = 8;

/// A batch of raft messages from one node of a store to another, for any of its groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerFrame {
    /// The store both nodes belong to; a frame for another store is refused.
    pub store_id: u64,
    /// The sending node.
    pub from: NodeId,
    /// The receiving node.
    pub to: NodeId,
    /// The messages, each for one replication group, in the order raft produced them.
    pub messages: Vec<(GroupId, Message)>,
}

/// Why bytes from a peer were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended inside a field.
    #[error("truncated: the input ends inside a field")]
    Truncated,
    /// The input goes on after a complete frame.
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    /// The payload is of a format version we do not read.
    #[error("unsupported peer format version {0} (this node reads {PEER_FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// A varint longer than 10 bytes, over 64 bits, or not in its shortest form.
    #[error("malformed varint")]
    MalformedVarint,
    /// A boolean or presence byte other than 0 or 1.
    #[error("invalid boolean byte {0}")]
    InvalidBool(u8),
    /// A raft message type we do not know.
    #[error("unknown raft message type {0}")]
    UnknownMessageType(u8),
    /// A raft entry type we do not know.
    #[error("unknown raft entry type {0}")]
    UnknownEntryType(u8),
    /// A frame over [`PEER_FRAME_BYTES_MAX`].
    #[error("frame of {bytes} bytes is over the limit of {PEER_FRAME_BYTES_MAX}")]
    FrameTooLarge {
        /// The frame's payload size.
        bytes: usize,
    },
    /// A payload over [`PEER_FRAME_BATCH_BYTES_MAX`] with more than one message or entry.
    #[error(
        "a frame over {PEER_FRAME_BATCH_BYTES_MAX} bytes must hold one message of at most one entry"
    )]
    LargeFrameNotSingle,
    /// The payload does not match its checksum.
    #[error("checksum mismatch: frame says {stored:#010x}, payload has {computed:#010x}")]
    ChecksumMismatch {
        /// The checksum in the frame header.
        stored: u32,
        /// The checksum of the payload received.
        computed: u32,
    },
}

/// Why reading or writing a framed stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed, or ended inside a frame (`UnexpectedEof`).
    #[error("peer stream I/O: {0}")]
    Io(#[from] io::Error),
    /// The bytes received are not a valid frame.
    #[error("peer stream: {0}")]
    Wire(#[from] WireError),
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Encodes a frame's payload (without stream framing).
pub fn encode_peer_frame(frame: &PeerFrame) -> Vec<u8> {
    let mut out = Vec::new();
    put_peer_frame(&mut out, frame);
    out
}

/// Decodes a payload made by [`encode_peer_frame`]. Never panics, whatever the bytes.
pub fn decode_peer_frame(payload: &[u8]) -> Result<PeerFrame, WireError> {
    let mut reader = Reader::new(payload);
    let version = reader.u8()?;
    if version != PEER_FORMAT_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let store_id = reader.varint()?;
    let from = NodeId(reader.varint()?);
    let to = NodeId(reader.varint()?);
    let count = reader.count(GROUP_MESSAGE_BYTES_MIN)?;
    let large = payload.len() > PEER_FRAME_BATCH_BYTES_MAX;
    if large && count > 1 {
        return Err(WireError::LargeFrameNotSingle);
    }
    reader.single_entry = large;
    let mut messages = Vec::with_capacity(count);
    for _ in 0..count {
        let group = GroupId(reader.varint()?);
        messages.push((group, reader.message()?));
    }
    reader.finish()?;
    Ok(PeerFrame {
        store_id,
        from,
        to,
        messages,
    })
}

/// Appends `frame` with its stream framing (length, checksum) to `out`, so several frames
/// can be written with one system call. On error `out` is left as it was.
pub fn append_stream_frame(out: &mut Vec<u8>, frame: &PeerFrame) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; STREAM_HEADER_BYTES]);
    put_peer_frame(out, frame);
    let bytes = out.len() - start - STREAM_HEADER_BYTES;
    if bytes > PEER_FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(WireError::FrameTooLarge { bytes });
    }
    let header = stream_header(&out[start + STREAM_HEADER_BYTES..]);
    out[start..start + STREAM_HEADER_BYTES].copy_from_slice(&header);
    Ok(())
}

/// Appends arbitrary `payload` bytes with stream framing to `out`: for tests and tools that
/// need a correctly framed payload of their own (peers send [`PeerFrame`]s, through
/// [`append_stream_frame`]). Panics if `payload` is over [`PEER_FRAME_BYTES_MAX`].
pub fn append_stream_payload(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(
        payload.len() <= PEER_FRAME_BYTES_MAX,
        "payload over PEER_FRAME_BYTES_MAX"
    );
    out.extend_from_slice(&stream_header(payload));
    out.extend_from_slice(payload);
}

/// Length and checksum of a payload within the limit.
fn stream_header(payload: &[u8]) -> [u8; STREAM_HEADER_BYTES] {
    let length = u32::try_from(payload.len()).expect("PEER_FRAME_BYTES_MAX fits in u32");
    let checksum = crc32c::crc32c(payload);
    let mut header = [0; STREAM_HEADER_BYTES];
    header[..4].copy_from_slice(&length.to_le_bytes());
    header[4..].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Writes one framed `frame` to `writer` and flushes it.
pub async fn write_peer_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &PeerFrame,
) -> Result<(), StreamError> {
    let mut bytes = Vec::new();
    append_stream_frame(&mut bytes, frame)?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one framed payload from `reader`, checking its length and checksum.
///
/// Returns `None` when the stream ends cleanly between frames; a stream ending inside a frame
/// is an `UnexpectedEof` error.
pub async fn read_stream_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, StreamError> {
    let mut header = [0u8; STREAM_HEADER_BYTES];
    let mut filled = 0;
    while filled < header.len() {
        let read = reader.read(&mut header[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        filled += read;
    }
    let (bytes, stored) = parse_stream_header(header)?;
    // Grow the buffer as bytes arrive rather than trusting the announced length.
    let mut payload = Vec::new();
    let wanted = u64::try_from(bytes).expect("usize fits in u64");
    (&mut *reader)
        .take(wanted)
        .read_to_end(&mut payload)
        .await?;
    if payload.len() != bytes {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    check_payload(stored, &payload)?;
    Ok(Some(payload))
}

/// Reads and decodes one framed [`PeerFrame`]; `None` at a clean end of stream.
pub async fn read_peer_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<PeerFrame>, StreamError> {
    match read_stream_payload(reader).await? {
        None => Ok(None),
        Some(payload) => Ok(Some(decode_peer_frame(&payload)?)),
    }
}

/// Splits one framed payload off the front of `bytes`, checking length and checksum; returns
/// the payload and the bytes consumed. The synchronous twin of [`read_stream_payload`].
pub fn split_stream_frame(bytes: &[u8]) -> Result<(&[u8], usize), WireError> {
    let header: [u8; STREAM_HEADER_BYTES] = bytes
        .get(..STREAM_HEADER_BYTES)
        .ok_or(WireError::Truncated)?
        .try_into()
        .expect("slice of header length");
    let (length, stored) = parse_stream_header(header)?;
    let end = STREAM_HEADER_BYTES + length;
    let payload = bytes
        .get(STREAM_HEADER_BYTES..end)
        .ok_or(WireError::Truncated)?;
    check_payload(stored, payload)?;
    Ok((payload, end))
}

/// Payload length and stored checksum; the length is checked against the limit.
fn parse_stream_header(header: [u8; STREAM_HEADER_BYTES]) -> Result<(usize, u32), WireError> {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let length = u32::from_le_bytes([l0, l1, l2, l3]);
    let bytes = length as usize;
    if bytes > PEER_FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes });
    }
    Ok((bytes, u32::from_le_bytes([c0, c1, c2, c3])))
}

fn check_payload(stored: u32, payload: &[u8]) -> Result<(), WireError> {
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Err(WireError::ChecksumMismatch { stored, computed });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn put_peer_frame(out: &mut Vec<u8>, frame: &PeerFrame) {
    out.push(PEER_FORMAT_VERSION);
    put_varint(out, frame.store_id);
    put_varint(out, frame.from.0);
    put_varint(out, frame.to.0);
    put_count(out, frame.messages.len());
    for (group, message) in &frame.messages {
        put_varint(out, group.0);
        put_message(out, message);
    }
}

fn put_message(out: &mut Vec<u8>, message: &Message) {
    out.push(message_type_number(message.msg_type));
    for value in [
        message.to,
        message.from,
        message.term,
        message.log_term,
        message.index,
        message.commit,
        message.commit_term,
        message.request_snapshot,
        message.reject_hint,
    ] {
        put_varint(out, value);
    }
    put_bool(out, message.reject);
    put_bytes(out, &message.context);
    put_varint(out, message.deprecated_priority);
    put_varint(out, zigzag(message.priority));
    put_count(out, message.entries.len());
    for entry in message.entries.iter() {
        put_entry(out, entry);
    }
    put_bool(out, message.has_snapshot());
    if message.has_snapshot() {
        put_snapshot(out, message.get_snapshot());
    }
}

fn put_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.push(entry_type_number(entry.entry_type));
    put_varint(out, entry.term);
    put_varint(out, entry.index);
    put_bytes(out, &entry.data);
    put_bytes(out, &entry.context);
    put_bool(out, entry.sync_log);
}

fn put_snapshot(out: &mut Vec<u8>, snapshot: &Snapshot) {
    put_bytes(out, &snapshot.data);
    put_bool(out, snapshot.has_metadata());
    if snapshot.has_metadata() {
        let metadata = snapshot.get_metadata();
        put_varint(out, metadata.index);
        put_varint(out, metadata.term);
        put_bool(out, metadata.has_conf_state());
        if metadata.has_conf_state() {
            put_conf_state(out, metadata.get_conf_state());
        }
    }
}

fn put_conf_state(out: &mut Vec<u8>, conf_state: &ConfState) {
    for ids in [
        &conf_state.voters,
        &conf_state.learners,
        &conf_state.voters_outgoing,
        &conf_state.learners_next,
    ] {
        put_count(out, ids.len());
        for &id in ids {
            put_varint(out, id);
        }
    }
    put_bool(out, conf_state.auto_leave);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    put_varint(out, u64::try_from(count).expect("usize fits in u64"));
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_count(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_bool(out: &mut Vec<u8>, value: bool) {
    out.push(u8::from(value));
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

// ---------------------------------------------------------------------------------------------
// Enum numbers: ours on the wire, equal to raft-rs's today but spelled out so that a change in
// raft-rs cannot silently change the wire.

fn message_type_number(message_type: MessageType) -> u8 {
    match message_type {
        MessageType::MsgHup => 0,
        MessageType::MsgBeat => 1,
        MessageType::MsgPropose => 2,
        MessageType::MsgAppend => 3,
        MessageType::MsgAppendResponse => 4,
        MessageType::MsgRequestVote => 5,
        MessageType::MsgRequestVoteResponse => 6,
        MessageType::MsgSnapshot => 7,
        MessageType::MsgHeartbeat => 8,
        MessageType::MsgHeartbeatResponse => 9,
        MessageType::MsgUnreachable => 10,
        MessageType::MsgSnapStatus => 11,
        MessageType::MsgCheckQuorum => 12,
        MessageType::MsgTransferLeader => 13,
        MessageType::MsgTimeoutNow => 14,
        MessageType::MsgReadIndex => 15,
        MessageType::MsgReadIndexResp => 16,
        MessageType::MsgRequestPreVote => 17,
        MessageType::MsgRequestPreVoteResponse => 18,
    }
}

fn message_type_from_number(number: u8) -> Result<MessageType, WireError> {
    Ok(match number {
        0 => MessageType::MsgHup,
        1 => MessageType::MsgBeat,
        2 => MessageType::MsgPropose,
        3 => MessageType::MsgAppend,
        4 => MessageType::MsgAppendResponse,
        5 => MessageType::MsgRequestVote,
        6 => MessageType::MsgRequestVoteResponse,
        7 => MessageType::MsgSnapshot,
        8 => MessageType::MsgHeartbeat,
        9 => MessageType::MsgHeartbeatResponse,
        10 => MessageType::MsgUnreachable,
        11 => MessageType::MsgSnapStatus,
        12 => MessageType::MsgCheckQuorum,
        13 => MessageType::MsgTransferLeader,
        14 => MessageType::MsgTimeoutNow,
        15 => MessageType::MsgReadIndex,
        16 => MessageType::MsgReadIndexResp,
        17 => MessageType::MsgRequestPreVote,
        18 => MessageType::MsgRequestPreVoteResponse,
        other => return Err(WireError::UnknownMessageType(other)),
    })
}

fn entry_type_number(entry_type: EntryType) -> u8 {
    match entry_type {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

fn entry_type_from_number(number: u8) -> Result<EntryType, WireError> {
    Ok(match number {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        other => return Err(WireError::UnknownEntryType(other)),
    })
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Fewest bytes a `(group, message)` pair can take: group, type, nine varints, reject,
/// context length, deprecated priority, priority, entry count, snapshot flag.
const GROUP_MESSAGE_BYTES_MIN: usize = 17;
/// Fewest bytes an entry can take: type, term, index, data length, context length, sync_log.
const ENTRY_BYTES_MIN: usize = 6;
/// Fewest bytes a varint takes.
const VARINT_BYTES_MIN: usize = 1;
/// Longest varint of a u64.
const VARINT_BYTES_MAX: usize = 10;

/// A cursor over untrusted input. Every read is bounds-checked and returns an error, never
/// panics.
struct Reader<'a> {
    input: &'a [u8],
    /// A payload over [`PEER_FRAME_BATCH_BYTES_MAX`]: at most one entry per message.
    single_entry: bool,
}

impl<'a> Reader<'a> {
    fn new(input: &'a [u8]) -> Reader<'a> {
        Reader {
            input,
            single_entry: false,
        }
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.input.len()))
        }
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        let (&first, rest) = self.input.split_first().ok_or(WireError::Truncated)?;
        self.input = rest;
        Ok(first)
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError::InvalidBool(other)),
        }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for position in 0..VARINT_BYTES_MAX {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if position == VARINT_BYTES_MAX - 1 && bits > 1 {
                return Err(WireError::MalformedVarint); // over 64 bits
            }
            value |= bits << (7 * position);
            if byte & 0x80 == 0 {
                if byte == 0 && position > 0 {
                    return Err(WireError::MalformedVarint); // not the shortest form
                }
                return Ok(value);
            }
        }
        Err(WireError::MalformedVarint)
    }

    /// A count of items each at least `item_bytes_min` long: refused when the rest of the
    /// input could not hold that many, so it is safe to allocate for.
    fn count(&mut self, item_bytes_min: usize) -> Result<usize, WireError> {
        let count = self.varint()?;
        let possible = self.input.len() / item_bytes_min;
        match usize::try_from(count) {
            Ok(count) if count <= possible => Ok(count),
            _ => Err(WireError::Truncated),
        }
    }

    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let length = self.count(1)?;
        let (bytes, rest) = self.input.split_at(length);
        self.input = rest;
        Ok(bytes.to_vec())
    }

    fn message(&mut self) -> Result<Message, WireError> {
        // Struct fields are evaluated in the order written, which is the wire order.
        let mut message = Message {
            msg_type: message_type_from_number(self.u8()?)?,
            to: self.varint()?,
            from: self.varint()?,
            term: self.varint()?,
            log_term: self.varint()?,
            index: self.varint()?,
            commit: self.varint()?,
            commit_term: self.varint()?,
            request_snapshot: self.varint()?,
            reject_hint: self.varint()?,
            reject: self.bool()?,
            context: self.bytes()?.into(),
            deprecated_priority: self.varint()?,
            priority: unzigzag(self.varint()?),
            ..Message::default()
        };
        let count = self.count(ENTRY_BYTES_MIN)?;
        if self.single_entry && count > 1 {
            return Err(WireError::LargeFrameNotSingle);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(self.entry()?);
        }
        message.entries = entries.into();
        if self.bool()? {
            message.set_snapshot(self.snapshot()?);
        }
        Ok(message)
    }

    fn entry(&mut self) -> Result<Entry, WireError> {
        Ok(Entry {
            entry_type: entry_type_from_number(self.u8()?)?,
            term: self.varint()?,
            index: self.varint()?,
            data: self.bytes()?.into(),
            context: self.bytes()?.into(),
            sync_log: self.bool()?,
            ..Entry::default()
        })
    }

    fn snapshot(&mut self) -> Result<Snapshot, WireError> {
        let mut snapshot = Snapshot {
            data: self.bytes()?.into(),
            ..Snapshot::default()
        };
        if self.bool()? {
            let mut metadata = SnapshotMetadata {
                index: self.varint()?,
                term: self.varint()?,
                ..SnapshotMetadata::default()
            };
            if self.bool()? {
                metadata.set_conf_state(self.conf_state()?);
            }
            snapshot.set_metadata(metadata);
        }
        Ok(snapshot)
    }

    fn conf_state(&mut self) -> Result<ConfState, WireError> {
        Ok(ConfState {
            voters: self.ids()?,
            learners: self.ids()?,
            voters_outgoing: self.ids()?,
            learners_next: self.ids()?,
            auto_leave: self.bool()?,
            ..ConfState::default()
        })
    }

    fn ids(&mut self) -> Result<Vec<u64>, WireError> {
        let count = self.count(VARINT_BYTES_MIN)?;
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.varint()?);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests;
