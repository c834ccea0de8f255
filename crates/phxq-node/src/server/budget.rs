//! Budgets in bytes between the gRPC threads, the transport and the event loop, and the peer
//! input queue that keeps raft's traffic apart from the clients'.
//!
//! * **Peer input has a queue of its own** ([`peer_inputs`]), bounded in frames and bytes.
//!   Client requests can never fill it, so a client flood never drops a heartbeat; when it is
//!   full (the event loop stalled), frames are dropped and raft retransmits. The event loop
//!   drains it before the client queue, and again before every round.
//! * **Produce payloads pending** ([`ByteBudget`]): bytes of keys and values of `Produce` and
//!   `ProduceMany` requests handed to the node and not yet answered, queued or admitted. A
//!   request that would pass the budget is answered `BUSY` (retryable) and changes nothing;
//!   the others go on. The reservation ([`Reserved`]) travels with the request and is
//!   released when its answer is sent, or when the request is dropped unanswered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use phxq_proto::PeerFrame;

use crate::Request;

/// Peer frames queued for the event loop at most; beyond, frames are dropped.
pub const PEER_INPUTS_QUEUED_MAX: usize = 4_096;
/// Bytes of peer frames (entries and snapshots, see [`frame_bytes`]) queued for the event
/// loop at most; beyond, frames are dropped. One frame alone always fits (a snapshot may be
/// up to 32 MiB).
pub const PEER_INPUT_BYTES_MAX: u64 = 64 << 20;
/// Bytes counted per raft message besides its entries' and snapshot's data: its fields.
const MESSAGE_OVERHEAD_BYTES: u64 = 64;

/// A limit on bytes in use, shared by threads; see the module documentation.
pub struct ByteBudget {
    used: AtomicU64,
    max: u64,
}

/// Bytes reserved from a [`ByteBudget`], given back when dropped.
pub struct Reserved {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            used: AtomicU64::new(0),
            max,
        })
    }

    /// Reserves `bytes`, unless that would pass the budget. An empty budget takes any one
    /// reservation, so a request larger than the budget is slow, never refused forever.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reserved> {
        let admitted = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.checked_add(bytes)?;
                (used == 0 || after <= self.max).then_some(after)
            })
            .is_ok();
        admitted.then(|| Reserved {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn max(&self) -> u64 {
        self.max
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Bytes of keys and values a request asks the node to store (0 for anything but produces).
pub fn produce_bytes(request: &Request) -> u64 {
    let bytes = |m: &phxq_core::Message| (m.key.len() + m.value.len()) as u64;
    match request {
        Request::Produce { messages, .. } => messages.iter().map(bytes).sum(),
        Request::ProduceMany { appends } => {
            appends.iter().flat_map(|a| &a.messages).map(bytes).sum()
        }
        _ => 0,
    }
}

/// What a peer frame costs the queue: its entries' and snapshots' data, plus a little per
/// message.
pub fn frame_bytes(frame: &PeerFrame) -> u64 {
    frame
        .messages
        .iter()
        .map(|(_, message)| {
            let entries: u64 = (message.entries.iter())
                .map(|e| (e.data.len() + e.context.len()) as u64 + MESSAGE_OVERHEAD_BYTES)
                .sum();
            let snapshot = message.snapshot.as_ref().map_or(0, |s| s.data.len() as u64);
            MESSAGE_OVERHEAD_BYTES + entries + snapshot
        })
        .sum()
}

/// The transport's end of the peer input queue.
pub struct PeerSender {
    frames: SyncSender<(PeerFrame, u64)>,
    bytes: Arc<AtomicU64>,
    bytes_max: u64,
    /// Raised when a frame is queued; the event loop lowers it when it drains the queue. A
    /// wake-up goes on the client queue only when it was low, so peer traffic puts at most
    /// one wake-up there at a time.
    wake_due: Arc<AtomicBool>,
}

/// The event loop's end of the peer input queue.
pub struct PeerReceiver {
    frames: Receiver<(PeerFrame, u64)>,
    bytes: Arc<AtomicU64>,
    wake_due: Arc<AtomicBool>,
}

/// Why a peer frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerRefused {
    /// The queue holds as many frames or bytes as it may.
    Full,
    /// The event loop is gone.
    Stopped,
}

/// A peer input queue of at most `frames_max` frames and about `bytes_max` bytes.
pub fn peer_inputs(frames_max: usize, bytes_max: u64) -> (PeerSender, PeerReceiver) {
    let (sender, receiver) = std::sync::mpsc::sync_channel(frames_max);
    let bytes = Arc::new(AtomicU64::new(0));
    let wake_due = Arc::new(AtomicBool::new(false));
    let sender = PeerSender {
        frames: sender,
        bytes: bytes.clone(),
        bytes_max,
        wake_due: wake_due.clone(),
    };
    let receiver = PeerReceiver {
        frames: receiver,
        bytes,
        wake_due,
    };
    (sender, receiver)
}

impl PeerSender {
    /// Queues `frame` unless the queue is full; returns whether the event loop needs a
    /// wake-up (see `wake_due`).
    pub fn send(&self, frame: PeerFrame) -> Result<bool, PeerRefused> {
        let (bytes, bytes_max) = (frame_bytes(&frame), self.bytes_max);
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used + bytes <= bytes_max).then_some(used + bytes)
            });
        if reserved.is_err() {
            return Err(PeerRefused::Full);
        }
        match self.frames.try_send((frame, bytes)) {
            Ok(()) => Ok(!self.wake_due.swap(true, Ordering::AcqRel)),
            Err(error) => {
                self.bytes.fetch_sub(bytes, Ordering::AcqRel);
                Err(match error {
                    TrySendError::Full(_) => PeerRefused::Full,
                    TrySendError::Disconnected(_) => PeerRefused::Stopped,
                })
            }
        }
    }
}

impl PeerReceiver {
    /// Takes up to `max` queued frames, in arrival order.
    pub fn drain(&self, max: usize) -> Vec<PeerFrame> {
        self.wake_due.store(false, Ordering::Release);
        let mut frames = Vec::new();
        while frames.len() < max {
            let Ok((frame, bytes)) = self.frames.try_recv() else {
                break;
            };
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            frames.push(frame);
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phxq_types::{GroupId, NodeId};
    use raft::eraftpb;

    fn frame(data_bytes: usize) -> PeerFrame {
        let mut message = eraftpb::Message::default();
        let entry = eraftpb::Entry {
            data: vec![7; data_bytes].into(),
            ..Default::default()
        };
        message.entries = vec![entry].into();
        PeerFrame {
            store_id: 1,
            from: NodeId(2),
            to: NodeId(1),
            messages: vec![(GroupId(0), message)],
        }
    }

    #[test]
    fn a_budget_admits_up_to_its_max_and_gets_its_bytes_back() {
        let budget = ByteBudget::new(100);
        let first = budget.try_reserve(60).expect("fits");
        assert!(budget.try_reserve(41).is_none(), "60 + 41 passes 100");
        let second = budget.try_reserve(40).expect("60 + 40 fits");
        assert_eq!(budget.used(), 100);
        drop(first);
        drop(second);
        assert_eq!(budget.used(), 0);
        // Alone, a reservation larger than the budget is admitted.
        let huge = budget
            .try_reserve(1_000)
            .expect("an empty budget takes one");
        assert!(budget.try_reserve(1).is_none());
        drop(huge);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_peer_queue_is_bounded_in_frames_and_bytes() {
        let (sender, receiver) = peer_inputs(3, 10_000);
        assert_eq!(sender.send(frame(100)), Ok(true), "first frame wakes");
        assert_eq!(sender.send(frame(100)), Ok(false), "one wake-up at a time");
        assert_eq!(sender.send(frame(20_000)), Err(PeerRefused::Full));
        assert_eq!(sender.send(frame(100)), Ok(false));
        assert_eq!(sender.send(frame(1)), Err(PeerRefused::Full), "3 frames");
        assert_eq!(receiver.drain(2).len(), 2);
        assert_eq!(receiver.drain(10).len(), 1);
        assert_eq!(receiver.bytes.load(Ordering::Acquire), 0);
        // Empty, one frame over the byte bound is taken alone.
        assert_eq!(sender.send(frame(20_000)), Ok(true));
        assert_eq!(receiver.drain(10).len(), 1);
        drop(receiver);
        assert_eq!(sender.send(frame(1)), Err(PeerRefused::Stopped));
    }
}
