//! Exponential backoff with jitter, computed from a persisted attempt count.
//!
//! Retry crates (backon, backoff) drive an in-memory retry loop; our attempts live in
//! the database or in message headers, so all we need is "how long before retry n".

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// The un-jittered delay after `failures` failed attempts (1 = first failure):
    /// `base * 2^(failures-1)`, capped at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << exponent)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// "Equal jitter": half the ceiling is fixed, the other half random, so retries of
    /// many messages that failed together spread out but never come back at once.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with_jitter(failures, rand::rng().random::<f64>())
    }

    /// `jitter` in `[0, 1]` picks where in `[ceiling/2, ceiling]` the delay falls.
    pub fn delay_with_jitter(&self, failures: u32, jitter: f64) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[test]
    fn ceiling_doubles_from_the_base_and_stops_at_the_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| policy().ceiling(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn zero_failures_behaves_like_the_first() {
        assert_eq!(policy().ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        assert_eq!(policy().ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_full_ceiling() {
        let p = policy();
        assert_eq!(p.delay_with_jitter(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay_with_jitter(3, 1.0), Duration::from_secs(4));
        assert_eq!(p.delay_with_jitter(3, 7.0), Duration::from_secs(4));
        for failures in 1..10 {
            let d = p.delay(failures);
            assert!(
                d >= p.ceiling(failures) / 2 && d <= p.ceiling(failures),
                "{d:?}"
            );
        }
    }

    #[test]
    fn max_below_base_is_raised_to_base() {
        let p = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(p.ceiling(4), Duration::from_secs(5));
    }
}
