//! The consumer's rate limit: token buckets for messages/s and bytes/s.
//!
//! Each bucket fills at its rate up to a burst of [`BURST`] worth of tokens. A message takes
//! its cost from every bucket at once, and may take a bucket below zero (a message larger
//! than the burst still passes); the caller then waits until the debt is repaid. So over any
//! span of `T` seconds at most `rate * (T + BURST)` tokens are spent, plus one message.
//! Reservations are made in arrival order, so waiters are served first come, first served.
//! Pure: the caller gives the time.

use std::time::{Duration, Instant};

/// How much a bucket holds: this long of its rate (short, so a rate holds over seconds).
pub const BURST: Duration = Duration::from_millis(100);

/// One token bucket.
#[derive(Clone, Debug)]
struct Bucket {
    per_s: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(per_s: f64) -> Bucket {
        assert!(per_s > 0.0, "validated: rates are above zero");
        let capacity = (per_s * BURST.as_secs_f64()).max(1.0);
        Bucket {
            per_s,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_s).min(self.capacity);
    }

    /// Takes `cost`; returns how long until the bucket is out of debt.
    fn take(&mut self, cost: f64) -> Duration {
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_s)
        }
    }
}

/// `bucket` at a new rate, keeping its tokens (capped to the new capacity).
fn retune(bucket: Option<Bucket>, per_s: Option<f64>) -> Option<Bucket> {
    let per_s = per_s?;
    let mut new = Bucket::new(per_s);
    if let Some(old) = bucket {
        new.tokens = old.tokens.min(new.capacity);
    }
    Some(new)
}

/// The limits of one consumer.
#[derive(Clone, Debug)]
pub(crate) struct RateLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl RateLimiter {
    /// A limiter of `messages_per_s` and `bytes_per_s` (each optional); `None` when neither.
    pub(crate) fn new(
        messages_per_s: Option<u32>,
        bytes_per_s: Option<u64>,
        now: Instant,
    ) -> Option<RateLimiter> {
        if messages_per_s.is_none() && bytes_per_s.is_none() {
            return None;
        }
        Some(RateLimiter {
            messages: messages_per_s.map(|rate| Bucket::new(f64::from(rate))),
            bytes: bytes_per_s.map(|rate| Bucket::new(rate as f64)),
            last: now,
        })
    }

    /// Changes the rates (live membership re-divides a group's limit); the buckets keep
    /// their debt, so a change never lets a burst through. A rate that goes away stops
    /// limiting; one that appears starts with a full bucket.
    pub(crate) fn set_rates(
        &mut self,
        messages_per_s: Option<u32>,
        bytes_per_s: Option<u64>,
        now: Instant,
    ) {
        self.reserve_nothing(now);
        self.messages = retune(self.messages.take(), messages_per_s.map(f64::from));
        self.bytes = retune(self.bytes.take(), bytes_per_s.map(|rate| rate as f64));
    }

    /// Refills the buckets up to `now`.
    fn reserve_nothing(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        for bucket in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            bucket.refill(elapsed);
        }
    }

    /// Reserves one message of `bytes` at `now`; the caller waits the returned time before
    /// handling it.
    pub(crate) fn reserve(&mut self, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &mut self.messages {
            bucket.refill(elapsed);
            wait = wait.max(bucket.take(1.0));
        }
        if let Some(bucket) = &mut self.bytes {
            bucket.refill(elapsed);
            wait = wait.max(bucket.take(bytes as f64));
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages of `bytes` passed in `span`, each handled as soon as its wait ends.
    fn passed(limiter: &mut RateLimiter, bytes: usize, span: Duration) -> u64 {
        let start = Instant::now();
        let mut now = start;
        let mut count = 0;
        loop {
            now += limiter.reserve(bytes, now);
            if now > start + span {
                return count;
            }
            count += 1;
        }
    }

    #[test]
    fn a_message_rate_holds_with_one_burst_at_most() {
        let mut limiter = RateLimiter::new(Some(200), None, Instant::now()).expect("limited");
        let count = passed(&mut limiter, 10, Duration::from_secs(10));
        // 2000 in 10 s, plus the burst (20).
        assert!((2000..=2021).contains(&count), "{count}");
    }

    #[test]
    fn a_byte_rate_holds_and_the_stricter_limit_wins() {
        let mut limiter =
            RateLimiter::new(Some(1_000), Some(50_000), Instant::now()).expect("limited");
        let count = passed(&mut limiter, 1_000, Duration::from_secs(10));
        assert!((500..=506).contains(&count), "{count}");
    }

    #[test]
    fn a_message_larger_than_the_burst_passes_and_pays_its_debt() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(None, Some(1_000), start).expect("limited");
        assert_eq!(
            limiter.reserve(50_000, start),
            Duration::from_millis(49_900)
        );
        assert!(RateLimiter::new(None, None, start).is_none());
    }
}
