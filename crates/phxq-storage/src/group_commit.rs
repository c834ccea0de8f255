//! Group commit: who runs the next `fdatasync`, and who is woken when it ends. No I/O.
//!
//! Callers of [`Wal::sync_to`](crate::Wal::sync_to) wait for their write to be durable. At most
//! one of them, the *leader*, runs a sync at a time; the others wait on a list, each parked on
//! its own thread. When the sync ends, its leader wakes exactly the waiters it covered, plus
//! one waiter it did not cover, to which it hands the lead (the next sync then covers everything
//! written until that waiter runs it). Nobody is woken to find out that it must sleep again, and
//! a caller whose write is already durable reads the durable [`Lsn`] from an atomic and returns
//! without a lock.
//!
//! Why not one condition variable: `notify_all` wakes every waiter, and each then takes the
//! mutex in turn to read the durable Lsn; with 64 writers on two CPUs, that wake-up herd was
//! half the CPU time and capped group commit far below the disk (BENCHMARKS.md).
//!
//! Invariants, asserted where they are used:
//!
//! * a waiter is on the list only while a leader exists (`leading`), and that leader settles the
//!   list when its sync ends: no waiter sleeps forever (no lost wake-up);
//! * a waiter is woken only once it is off the list, with a reason: covered (its target is at
//!   or below the durable Lsn), stopped (the log failed), or lead;
//! * `durable` only grows, and only after the sync or segment seal that made it durable.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};

use crate::Lsn;

/// What a caller of [`GroupCommit::wait_or_lead`] is to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Stop waiting: the target is durable (at or below this Lsn), or the log failed.
    Settled(Lsn),
    /// Run the next sync, then call [`GroupCommit::finish`].
    Lead,
}

/// The shared state of the group commit of one log.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// The highest Lsn known durable. Written under `state`'s lock, read without it.
    durable: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A leader exists: a sync is running or about to run.
    leading: bool,
    /// The callers waiting for a sync, in arrival order.
    waiters: Vec<Arc<Waiter>>,
    /// Syncs that succeeded.
    syncs: u64,
}

/// One parked caller of [`GroupCommit::wait_or_lead`].
#[derive(Debug)]
struct Waiter {
    target: Lsn,
    thread: Thread,
    /// `WAITING` until a waker takes it off the list and says why it may go.
    signal: AtomicU8,
}

const WAITING: u8 = 0;
const SETTLED: u8 = 1;
const LEAD: u8 = 2;

impl GroupCommit {
    /// The highest Lsn known durable.
    pub fn durable(&self) -> Lsn {
        self.durable.load(Ordering::Acquire)
    }

    /// A sync is running (or about to).
    pub fn syncing(&self) -> bool {
        self.lock().leading
    }

    /// Syncs that succeeded.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Callers asleep on the list.
    #[cfg(any(test, feature = "failpoints"))]
    pub fn waiters(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Returns [`Turn::Settled`] once `target` is durable (at once if it is already), or
    /// [`Turn::Lead`] when the caller is to run the sync that covers it. Sleeps while another
    /// caller's sync runs. `stopped` is asked under the lock before taking the lead: a log
    /// that failed takes no new leader.
    pub fn wait_or_lead(&self, target: Lsn, stopped: impl Fn() -> bool) -> Turn {
        let durable = self.durable();
        if durable >= target {
            return Turn::Settled(durable);
        }
        let waiter = {
            let mut state = self.lock();
            let durable = self.durable();
            if durable >= target || stopped() {
                return Turn::Settled(durable);
            }
            if !state.leading {
                state.leading = true;
                return Turn::Lead;
            }
            let waiter = Arc::new(Waiter {
                target,
                thread: thread::current(),
                signal: AtomicU8::new(WAITING),
            });
            state.waiters.push(Arc::clone(&waiter));
            waiter
        };
        loop {
            match waiter.signal.load(Ordering::Acquire) {
                WAITING => thread::park(),
                LEAD => return Turn::Lead,
                _ => return Turn::Settled(self.durable()),
            }
        }
    }

    /// Ends the caller's lead. `synced` is the Lsn its sync made durable, if it succeeded;
    /// `stopped` says the log failed, and then every waiter is woken to find that out. Otherwise
    /// the waiters the sync covered are woken, and the lead passes to one it did not cover, if
    /// any.
    pub fn finish(&self, synced: Option<Lsn>, stopped: bool) {
        let (next_leader, covered) = {
            let mut state = self.lock();
            assert!(state.leading, "finish without the lead");
            if let Some(lsn) = synced {
                self.durable.fetch_max(lsn, Ordering::Release);
                state.syncs += 1;
            }
            let covered = if stopped {
                std::mem::take(&mut state.waiters)
            } else {
                let durable = self.durable();
                state
                    .waiters
                    .extract_if(.., |w| w.target <= durable)
                    .collect()
            };
            // The longest waiting: its write, like every other waiter's, is already written,
            // so the sync it runs covers them all.
            let next_leader = if state.waiters.is_empty() {
                None
            } else {
                Some(state.waiters.remove(0))
            };
            state.leading = next_leader.is_some();
            (next_leader, covered)
        };
        // The next leader first, so that the next sync starts as soon as it can; each wake-up
        // is a system call, and there may be dozens of covered waiters.
        if let Some(leader) = next_leader {
            leader.wake(LEAD);
        }
        for waiter in covered {
            waiter.wake(SETTLED);
        }
    }

    /// Everything up to `lsn` became durable outside a sync (a segment was sealed): wakes the
    /// waiters that covers. A running sync goes on and settles the rest.
    pub fn advance(&self, lsn: Lsn) {
        let covered: Vec<Arc<Waiter>> = {
            let mut state = self.lock();
            self.durable.fetch_max(lsn, Ordering::Release);
            let durable = self.durable();
            let covered = state
                .waiters
                .extract_if(.., |w| w.target <= durable)
                .collect();
            assert!(
                state.leading || state.waiters.is_empty(),
                "waiters without a leader"
            );
            covered
        };
        for waiter in covered {
            waiter.wake(SETTLED);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a thread panicked while holding the group commit lock")
    }
}

impl Waiter {
    /// Called off the list and without the lock. The waiter may return (and drop its side)
    /// as soon as `signal` is set; our `Arc` keeps the handle alive for `unpark`, and an
    /// unpark that arrives after it left is absorbed by a later `park`'s loop.
    fn wake(&self, signal: u8) {
        self.signal.store(signal, Ordering::Release);
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_target_returns_at_once_and_the_first_caller_leads() {
        let commit = GroupCommit::default();
        assert_eq!(commit.wait_or_lead(1, || false), Turn::Lead);
        commit.finish(Some(3), false);
        assert_eq!(commit.wait_or_lead(3, || false), Turn::Settled(3));
        assert_eq!(commit.syncs(), 1);
        assert_eq!(commit.wait_or_lead(4, || true), Turn::Settled(3));
    }

    #[test]
    fn a_sync_wakes_the_waiters_it_covers_and_hands_the_lead_to_one_it_does_not() {
        let commit = Arc::new(GroupCommit::default());
        assert_eq!(commit.wait_or_lead(1, || false), Turn::Lead);
        let spawn = |target: Lsn| {
            let commit = Arc::clone(&commit);
            thread::spawn(move || commit.wait_or_lead(target, || false))
        };
        let covered = spawn(2);
        let uncovered = spawn(5);
        while commit.lock().waiters.len() < 2 {
            thread::yield_now();
        }
        commit.finish(Some(4), false);
        assert_eq!(covered.join().unwrap(), Turn::Settled(4));
        assert_eq!(uncovered.join().unwrap(), Turn::Lead);
        assert!(commit.lock().leading, "the lead passed, it was not dropped");
        commit.finish(Some(5), false);
        assert!(!commit.lock().leading);
        assert_eq!(commit.durable(), 5);
    }

    #[test]
    fn a_failed_sync_wakes_every_waiter_and_gives_the_lead_to_nobody() {
        let commit = Arc::new(GroupCommit::default());
        assert_eq!(commit.wait_or_lead(1, || false), Turn::Lead);
        let waiters: Vec<_> = (2..6)
            .map(|target| {
                let commit = Arc::clone(&commit);
                thread::spawn(move || commit.wait_or_lead(target, || false))
            })
            .collect();
        while commit.lock().waiters.len() < 4 {
            thread::yield_now();
        }
        commit.finish(None, true);
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), Turn::Settled(0));
        }
        assert!(!commit.lock().leading);
        assert_eq!(commit.wait_or_lead(2, || true), Turn::Settled(0));
    }

    #[test]
    fn a_sealed_segment_settles_waiters_while_the_sync_runs_on() {
        let commit = Arc::new(GroupCommit::default());
        assert_eq!(commit.wait_or_lead(1, || false), Turn::Lead);
        let waiter = {
            let commit = Arc::clone(&commit);
            thread::spawn(move || commit.wait_or_lead(3, || false))
        };
        while commit.lock().waiters.is_empty() {
            thread::yield_now();
        }
        commit.advance(7);
        assert_eq!(waiter.join().unwrap(), Turn::Settled(7));
        commit.finish(Some(2), false);
        assert_eq!(commit.durable(), 7, "durable never goes back");
    }
}
