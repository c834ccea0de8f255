//! One queue's producer message ids: the window of ids whose enqueues a retry must not append
//! again.
//!
//! The window is the queue's newest `dedup_window` *original* enqueues that carried an id (a
//! duplicate is answered, not remembered again, so it does not push older ids out). An id
//! that left the window is forgotten: a retry after that appends again (at least once).
//!
//! Snapshots need the table *as of* their index, not the newest one: a snapshot at `i` plus
//! the log after `i` must rebuild the current table, so an id pushed out after `i` must still
//! be in the snapshot (a replayed retry of it after `i` was a duplicate). So a record pushed
//! out of the window stays, marked with the raft index that pushed it out, until the log is
//! compacted past that index ([`DedupTable::forget_through`]); memory is the window plus the
//! ids pushed out by entries the log still holds.
//!
//! Invariants (checked by [`DedupTable::validate`]):
//! - `records` are in apply order (raft index never decreases); the first `evicted` are the
//!   pushed-out ones, with non-decreasing `evicted_at` at or above their own index;
//! - `live` maps the id of each other record to its offsets, one entry per record, so an id
//!   is in the window at most once.

use std::collections::{BTreeMap, VecDeque};

use phxq_types::{MESSAGE_ID_BYTES_MAX, Offset};

/// Where the original enqueue with an id went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Original {
    /// The offset of its first message.
    pub(super) first_offset: Offset,
    /// How many messages it appended.
    pub(super) count: u64,
}

/// An original enqueue with an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Record {
    /// The producer's id (1 to [`MESSAGE_ID_BYTES_MAX`] bytes).
    pub(super) id: Vec<u8>,
    /// The raft index of the entry that appended it.
    pub(super) index: u64,
    /// Where it went.
    pub(super) original: Original,
    /// The raft index of the entry that pushed it out of the window, if one did.
    pub(super) evicted_at: Option<u64>,
}

/// A queue's dedup window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct DedupTable {
    /// Every remembered record, oldest first: `evicted` pushed-out ones, then the window.
    records: VecDeque<Record>,
    /// How many of `records` (a prefix) are out of the window.
    evicted: usize,
    /// The window, by id.
    live: BTreeMap<Vec<u8>, Original>,
}

impl DedupTable {
    /// Where the enqueue with `id` went, if `id` is in the window.
    pub(super) fn lookup(&self, id: &[u8]) -> Option<Original> {
        self.live.get(id).copied()
    }

    /// Remembers the original enqueue with `id` (not in the window), appended by entry
    /// `index`, then pushes the oldest ids out until at most `window` remain (0: none).
    pub(super) fn record(&mut self, id: &[u8], index: u64, original: Original, window: u32) {
        debug_assert!(self.lookup(id).is_none(), "a duplicate is not recorded");
        if window > 0 {
            self.live.insert(id.to_vec(), original);
            self.records.push_back(Record {
                id: id.to_vec(),
                index,
                original,
                evicted_at: None,
            });
        }
        self.trim(window, index);
    }

    /// How many ids are in the window.
    pub(super) fn window_len(&self) -> usize {
        self.live.len()
    }

    /// Pushes the oldest ids out, by entry `index`, until at most `window` remain (a topic
    /// alter lowering the window does this at once, so that a window never holds more ids
    /// than at a later index: see `budget`).
    pub(super) fn trim(&mut self, window: u32, index: u64) {
        while self.live.len() > window as usize {
            let oldest = &mut self.records[self.evicted];
            let removed = self.live.remove(&oldest.id);
            assert_eq!(
                removed,
                Some(oldest.original),
                "the window maps every live id"
            );
            oldest.evicted_at = Some(index);
            self.evicted += 1;
        }
    }

    /// Forgets records pushed out by entries at or below `index` (the log no longer holds
    /// those entries, so no snapshot will be taken before them).
    pub(super) fn forget_through(&mut self, index: u64) {
        while self.evicted > 0 && self.records[0].evicted_at.is_some_and(|at| at <= index) {
            self.records.pop_front();
            self.evicted -= 1;
        }
    }

    /// The window as it was right after entry `index` was applied, oldest first (needs every
    /// record pushed out after `index`: see the module doc).
    pub(super) fn as_of(&self, index: u64) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(move |record| {
            record.index <= index && record.evicted_at.is_none_or(|at| at > index)
        })
    }

    /// Puts back a record of a snapshot's window, in order; `false` if its id is already in
    /// the window, or its index is below the previous one's (a corrupt snapshot).
    pub(super) fn restore(&mut self, id: Vec<u8>, index: u64, original: Original) -> bool {
        if self.live.contains_key(&id) || self.records.back().is_some_and(|last| last.index > index)
        {
            return false;
        }
        self.live.insert(id.clone(), original);
        self.records.push_back(Record {
            id,
            index,
            original,
            evicted_at: None,
        });
        true
    }

    /// Panics if an invariant of the module doc does not hold.
    pub(super) fn validate(&self, applied_index: u64) {
        assert!(self.evicted <= self.records.len());
        assert_eq!(self.live.len(), self.records.len() - self.evicted);
        let mut previous_index = 0;
        let mut previous_evicted_at = 0;
        for (position, record) in self.records.iter().enumerate() {
            assert!(
                !record.id.is_empty() && record.id.len() <= MESSAGE_ID_BYTES_MAX,
                "bad id {record:?}"
            );
            assert!(record.index >= previous_index, "records out of order");
            assert!(
                record.index <= applied_index,
                "record above the applied index"
            );
            previous_index = record.index;
            match record.evicted_at {
                Some(at) => {
                    assert!(position < self.evicted, "pushed out inside the window");
                    assert!(at >= record.index && at >= previous_evicted_at && at <= applied_index);
                    previous_evicted_at = at;
                }
                None => {
                    assert!(
                        position >= self.evicted,
                        "window record among pushed-out ones"
                    );
                    assert_eq!(self.live.get(&record.id), Some(&record.original));
                }
            }
        }
    }
}
