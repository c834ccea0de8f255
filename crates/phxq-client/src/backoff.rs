//! Retry delays: exponential steps with jitter.
//!
//! The step starts at `initial` and doubles after each delay, up to `max`. Each delay is
//! "equal jitter": half the step fixed plus a random part up to the other half, so producers
//! that failed together (an election) do not retry together, and no delay is shorter than
//! half its step. Pure: the randomness comes from a seeded [`Rng`].

use std::time::Duration;

use phxq_types::Rng;

/// The delays of one request's retries.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
    rng: Rng,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max` (`initial <= max`), jittered by `rng`.
    pub(crate) fn new(initial: Duration, max: Duration, rng: Rng) -> Backoff {
        assert!(
            !initial.is_zero() && initial <= max,
            "validated: 0 < initial <= max"
        );
        Backoff {
            step: initial,
            max,
            rng,
        }
    }

    /// The next delay: in `[step / 2, step]`; then the step doubles (at most `max`).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step_us = u64::try_from(self.step.as_micros()).unwrap_or(u64::MAX);
        let half_us = step_us / 2;
        let delay = Duration::from_micros(half_us + self.rng.below(step_us - half_us + 1));
        self.step = self.step.saturating_mul(2).min(self.max);
        debug_assert!(delay <= self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_max_and_delays_stay_within_half_and_all_of_the_step() {
        let ms = Duration::from_millis;
        for seed in 0..200 {
            let mut backoff = Backoff::new(ms(10), ms(100), Rng::new(seed));
            for step in [10, 20, 40, 80, 100, 100, 100] {
                let delay = backoff.next_delay();
                assert!(
                    ms(step) / 2 <= delay && delay <= ms(step),
                    "seed {seed}: {delay:?} for step {step} ms"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|seed| {
                let ms = Duration::from_millis;
                Backoff::new(ms(100), ms(100), Rng::new(seed)).next_delay()
            })
            .collect();
        assert!(delays.len() > 40, "{} distinct delays", delays.len());
    }
}
