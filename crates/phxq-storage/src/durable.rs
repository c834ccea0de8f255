//! Waiting for durability without a thread per waiter: [`Wal::durable`] returns a future, and
//! one thread per log, the *syncer*, runs the syncs its waiters need.
//!
//! Why: [`Wal::sync_to`] parks the calling thread until its write is durable. With 64 writer
//! threads on two CPUs, each record then costs two context switches, and on this project's
//! machine those wake-ups, not the disk, capped group commit at about 13× a raw `fdatasync`
//! loop (BENCHMARKS.md). A future waits for the price of a waker.
//!
//! How the syncer decides when to sync:
//!
//! * it sleeps (without a timeout) while no future waits: no timer runs when the log is idle;
//! * a waiting future wakes it, and it calls [`Wal::sync`], sharing syncs with threads that
//!   call [`Wal::sync_to`] through the same group commit;
//! * after a sync it wakes the futures it made durable. Those writers usually write again at
//!   once; a sync started right away would miss them, so that each record would wait for the
//!   sync after next and each sync cover only half of the writers. So, when it woke some, the
//!   syncer first waits until as many writes as it woke have arrived, but never longer than
//!   half of its last sync (and at most [`RUSH_WAIT_MAX`]). The write that completes the count
//!   wakes it; there is no polling.
//!
//! Invariants:
//!
//! * a future is on the list until a sync covers its target or the log fails, and the syncer
//!   runs a round whenever the list is not empty: no future waits forever;
//! * the syncer holds the log (a strong reference) only while running a round: dropping the
//!   last handle of the log stops it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::{Lsn, Result, Wal, io_error};

/// The longest the syncer waits for the writers it just woke to write again.
pub const RUSH_WAIT_MAX: Duration = Duration::from_millis(1);

/// The syncer of one log: its waiting futures and its thread.
#[derive(Debug)]
pub(crate) struct Syncer {
    state: Mutex<State>,
    /// The syncer's thread, once started.
    thread: OnceLock<Thread>,
    /// A write whose Lsn reaches this wakes the syncer (it waits for the writers it woke);
    /// `u64::MAX` when it waits for none.
    rush_to: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Futures waiting, with the Lsn each waits for.
    waiters: Vec<(Lsn, Waker)>,
    /// The syncer has work (from the first waiter it is given until it finds its list empty):
    /// a future waits for it. Otherwise a future that finds no sync running syncs on its own
    /// thread (see [`Durable`]).
    busy: bool,
    /// The log is gone: the thread ends.
    stopped: bool,
}

impl Syncer {
    pub fn new() -> Syncer {
        Syncer {
            state: Mutex::default(),
            thread: OnceLock::new(),
            rush_to: AtomicU64::new(u64::MAX),
        }
    }

    /// Called by every write once its Lsn is published.
    pub fn written(&self, lsn: Lsn) {
        let rush_to = self.rush_to.load(Ordering::Acquire);
        if lsn >= rush_to
            && self
                .rush_to
                .compare_exchange(rush_to, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }

    /// The log is being dropped: ends the thread.
    pub fn stop(&self) {
        self.lock().stopped = true;
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Futures on the syncer's list.
    #[cfg(feature = "failpoints")]
    pub fn waiters(&self) -> usize {
        self.lock().waiters.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a thread panicked while holding the syncer lock")
    }
}

/// Resolves when write `target` of the log is durable, with the durable Lsn, or with the
/// error that poisoned the log. Made by [`Wal::durable`].
#[must_use = "a future does nothing unless awaited"]
pub struct Durable {
    wal: Arc<Wal>,
    target: Lsn,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("dir", &self.wal.dir())
            .field("target", &self.target)
            .finish()
    }
}

impl Future for Durable {
    type Output = Result<Lsn>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Lsn>> {
        let wal = &self.wal;
        if let Some(ready) = wal.durable_now(self.target) {
            return Poll::Ready(ready);
        }
        let syncer = &wal.syncer;
        let wake_syncer = {
            let mut state = syncer.lock();
            // Checked again under the lock: the syncer removes durable waiters under it.
            if let Some(ready) = wal.durable_now(self.target) {
                return Poll::Ready(ready);
            }
            if !state.busy && !wal.commit.syncing() {
                // A lone writer: handing its sync to the syncer would only add two thread
                // wake-ups to it. Sync here, as `sync_to` would.
                drop(state);
                return Poll::Ready(wal.sync_to(self.target));
            }
            state.busy = true;
            // The syncer parks without a timeout only after finding the list empty (under
            // this lock), so only the waiter that makes the list non-empty needs to wake it.
            // Waking it for every waiter would also cut its rush wait short again and again.
            let first = state.waiters.is_empty();
            state.waiters.push((self.target, cx.waker().clone()));
            first
        };
        if wake_syncer {
            syncer
                .thread
                .get()
                .expect("the syncer starts before a future is made")
                .unpark();
        }
        Poll::Pending
    }
}

impl Wal {
    /// A future that resolves once write `target` is durable (see the module `durable`): the
    /// log's syncer thread (started on first use) runs the syncs, shared with every caller of
    /// [`Wal::sync_to`]. Returns [`Poisoned`](crate::Error::Poisoned) at once on a failed
    /// log, and the future resolves to it if the log fails while it waits.
    ///
    /// When the log is idle (no sync running, the syncer has nothing to do), the first poll
    /// runs the sync itself, as `sync_to` would: it blocks the polling thread for one
    /// `fdatasync`. That keeps a lone writer at the disk's pace; on an async runtime, poll it
    /// where a short blocking call is acceptable (a worker of a multi-threaded runtime, as
    /// `phxq bench wal` does).
    ///
    /// # Panics
    ///
    /// If `target` was never assigned (greater than the last Lsn).
    pub fn durable(self: &Arc<Self>, target: Lsn) -> Result<Durable> {
        let written = self.written();
        assert!(
            target <= written,
            "durable({target}) but the last Lsn is {written}"
        );
        self.check_poison()?;
        if self.syncer.thread.get().is_none() {
            self.start_syncer()?;
        }
        Ok(Durable {
            wal: Arc::clone(self),
            target,
        })
    }

    /// `Some` when a future waiting for `target` is done: durable, or the log failed.
    fn durable_now(&self, target: Lsn) -> Option<Result<Lsn>> {
        if let Err(error) = self.check_poison() {
            return Some(Err(error));
        }
        let durable = self.commit.durable();
        (durable >= target).then_some(Ok(durable))
    }

    fn start_syncer(self: &Arc<Self>) -> Result<()> {
        static STARTING: Mutex<()> = Mutex::new(());
        let _once = STARTING
            .lock()
            .expect("a thread panicked while starting a syncer");
        if self.syncer.thread.get().is_some() {
            return Ok(());
        }
        let wal = Arc::downgrade(self);
        let handle = thread::Builder::new()
            .name("phxq-wal-syncer".into())
            .spawn(move || run(wal))
            .map_err(|e| io_error("start the syncer thread of", self.dir(), e))?;
        self.syncer
            .thread
            .set(handle.thread().clone())
            .expect("started once, under STARTING");
        Ok(())
    }
}

/// The syncer thread: one round per wake-up while futures wait. It holds the log only while
/// it syncs and sorts its list, never while it sleeps.
fn run(wal: Weak<Wal>) {
    let mut last_sync = Duration::ZERO;
    // After a round that woke writers: the written Lsn to wait for before the next sync.
    let mut rush: Option<Lsn> = None;
    loop {
        let Some(log) = wal.upgrade() else { return };
        if let Some(rush_to) = rush.take() {
            // Still busy: the writers just woken queue up here rather than sync alone.
            drop(log);
            wait_for_writes(&wal, rush_to, (last_sync / 2).min(RUSH_WAIT_MAX));
            continue;
        }
        {
            let mut state = log.syncer.lock();
            if state.stopped {
                return;
            }
            if state.waiters.is_empty() {
                state.busy = false;
                drop(state);
                drop(log);
                thread::park();
                continue;
            }
        }
        let started = Instant::now();
        let synced = log.sync();
        last_sync = started.elapsed();
        let durable = log.commit.durable();
        let woken: Vec<Waker> = {
            let mut state = log.syncer.lock();
            if synced.is_err() {
                state.waiters.drain(..).map(|(_, waker)| waker).collect()
            } else {
                state
                    .waiters
                    .extract_if(.., |(target, _)| *target <= durable)
                    .map(|(_, waker)| waker)
                    .collect()
            }
        };
        if !woken.is_empty() {
            rush = Some(log.written() + woken.len() as u64);
        }
        drop(log);
        for waker in woken {
            waker.wake();
        }
        if synced.is_err() {
            // The log is poisoned: every later call fails at once, and the futures just woken
            // find out why.
            return;
        }
    }
}

/// Sleeps until the log's written Lsn reaches `rush_to` or `longest` has passed. The write
/// that reaches it wakes this thread ([`Syncer::written`]).
fn wait_for_writes(wal: &Weak<Wal>, rush_to: Lsn, longest: Duration) {
    let deadline = Instant::now() + longest;
    let mut armed = false;
    loop {
        let Some(log) = wal.upgrade() else { return };
        if !armed {
            log.syncer.rush_to.store(rush_to, Ordering::Release);
            armed = true;
        }
        let now = Instant::now();
        if log.written() >= rush_to || now >= deadline {
            log.syncer.rush_to.store(u64::MAX, Ordering::Release);
            return;
        }
        drop(log);
        thread::park_timeout(deadline - now);
    }
}
