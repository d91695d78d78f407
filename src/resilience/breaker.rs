//! Circuit breaker: stops calling a dependency that keeps failing, then probes it with
//! one trial call per cool-down until it answers again.
//!
//! Written here rather than taken from a crate: `failsafe` lets every call through
//! while half-open and hides its state; `circuitbreaker-rs` (0.1) reads the system
//! clock directly and can admit several probes at once; the tower ones are middleware
//! for tower services, which our adapters are not.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where the breaker stands, for metrics and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are refused at once until the cool-down has passed.
    Open,
    /// One trial call is in flight; every other call is refused until it ends.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When to open and how long to stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open a closed breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before it lets one trial through.
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// The time source, injectable so tests move time by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// A thread-safe circuit breaker. Ask [`CircuitBreaker::try_acquire`] before each call
/// and report the outcome on the returned [`Permit`].
///
/// The closed state, where almost every call happens, costs two atomic loads and no
/// lock; transitions take a mutex that is never held across an `.await`.
pub struct CircuitBreaker {
    name: String,
    policy: BreakerPolicy,
    clock: Arc<dyn Clock>,
    /// Written only with `opened_at` locked; read without the lock on the hot path.
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// When the breaker last opened.
    opened_at: Mutex<Instant>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("state", &self.state())
            .field("consecutive_failures", &self.consecutive_failures())
            .finish()
    }
}

impl CircuitBreaker {
    /// `name` identifies the guarded dependency in logs (e.g. `"redis"`).
    pub fn new(name: impl Into<String>, policy: BreakerPolicy) -> Self {
        Self::with_clock(name, policy, Arc::new(SystemClock))
    }

    pub fn with_clock(
        name: impl Into<String>,
        policy: BreakerPolicy,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let now = clock.now();
        Self {
            name: name.into(),
            policy: BreakerPolicy {
                failure_threshold: policy.failure_threshold.max(1),
                ..policy
            },
            clock,
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_at: Mutex::new(now),
        }
    }

    /// The guarded dependency, as given to [`CircuitBreaker::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// The current state. An open breaker whose cool-down has passed still reads
    /// `Open` until the next call becomes its trial.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// How long until an open breaker lets its next trial through: `None` while closed,
    /// zero once the cool-down has passed or while a trial is in flight.
    pub fn retry_in(&self) -> Option<Duration> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return None;
        }
        let opened_at = *self.lock();
        let elapsed = self.clock.now().saturating_duration_since(opened_at);
        Some(self.policy.cool_down.saturating_sub(elapsed))
    }

    /// Failures in a row while closed (reset by a success or by opening).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Permission for one call, or `None` when the call must not be made (open, or a
    /// trial already in flight).
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Some(self.permit(false));
        }
        let opened_at = self.lock();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(self.permit(false)),
            OPEN if self.clock.now().saturating_duration_since(*opened_at)
                >= self.policy.cool_down =>
            {
                self.state.store(HALF_OPEN, Ordering::Release);
                tracing::info!(breaker = %self.name, "circuit half-open: letting one trial call through");
                Some(self.permit(true))
            }
            _ => None,
        }
    }

    fn permit(&self, trial: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            trial,
            settled: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Instant> {
        // The guarded data is a plain Instant, valid whatever a panicking holder did.
        self.opened_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn on_success(&self, trial: bool) {
        if trial {
            let _opened_at = self.lock();
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.state.store(CLOSED, Ordering::Release);
            tracing::info!(breaker = %self.name, "circuit closed: trial call succeeded");
        } else if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            // Only write when needed, so successes do not bounce the cache line.
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    fn on_failure(&self, trial: bool) {
        let mut opened_at = self.lock();
        if trial {
            *opened_at = self.clock.now();
            self.state.store(OPEN, Ordering::Release);
            tracing::warn!(
                breaker = %self.name,
                cool_down = ?self.policy.cool_down,
                "circuit re-opened: trial call failed"
            );
            return;
        }
        // A call admitted while closed but finishing after the breaker opened says
        // nothing new: the breaker already knows the dependency is failing.
        if self.state.load(Ordering::Acquire) != CLOSED {
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.policy.failure_threshold {
            *opened_at = self.clock.now();
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.state.store(OPEN, Ordering::Release);
            tracing::warn!(
                breaker = %self.name,
                failures,
                cool_down = ?self.policy.cool_down,
                "circuit opened: calls are short-circuited"
            );
        }
    }

    /// A trial dropped without an outcome (its caller was cancelled) proves nothing:
    /// reopen without restarting the cool-down, so the next call is a new trial.
    fn on_abandoned_trial(&self) {
        let _opened_at = self.lock();
        if self.state.load(Ordering::Acquire) == HALF_OPEN {
            self.state.store(OPEN, Ordering::Release);
        }
    }
}

/// Permission for one call. Report how it went with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported counts as neither.
#[must_use = "report the outcome with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    settled: bool,
}

impl Permit<'_> {
    /// Whether this call is the half-open trial.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    pub fn success(mut self) {
        self.settled = true;
        self.breaker.on_success(self.trial);
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.on_failure(self.trial);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.settled {
            self.breaker.on_abandoned_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that only moves when told to.
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn new() -> Arc<Self> {
            Arc::new(Self(Mutex::new(Instant::now())))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    const COOL_DOWN: Duration = Duration::from_secs(30);

    fn breaker(threshold: u32) -> (CircuitBreaker, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::with_clock(
            "test",
            BreakerPolicy {
                failure_threshold: threshold,
                cool_down: COOL_DOWN,
            },
            clock.clone(),
        );
        (breaker, clock)
    }

    fn fail(breaker: &CircuitBreaker) {
        breaker.try_acquire().expect("call permitted").failure();
    }

    fn succeed(breaker: &CircuitBreaker) {
        breaker.try_acquire().expect("call permitted").success();
    }

    /// Opens the breaker and lets the cool-down pass.
    fn open_and_cool_down(breaker: &CircuitBreaker, clock: &ManualClock) {
        for _ in 0..breaker.policy().failure_threshold {
            fail(breaker);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        clock.advance(COOL_DOWN);
    }

    #[test]
    fn starts_closed_and_lets_calls_through() {
        let (breaker, _) = breaker(3);
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..10 {
            let permit = breaker.try_acquire().expect("closed breaker permits");
            assert!(!permit.is_trial());
            permit.success();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn opens_after_n_consecutive_failures() {
        let (breaker, _) = breaker(3);
        fail(&breaker);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.consecutive_failures(), 2);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let (breaker, _) = breaker(3);
        fail(&breaker);
        fail(&breaker);
        succeed(&breaker);
        assert_eq!(breaker.consecutive_failures(), 0);
        fail(&breaker);
        fail(&breaker);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "failures were not consecutive"
        );
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn an_open_breaker_refuses_calls_until_the_cool_down_has_passed() {
        let (breaker, clock) = breaker(1);
        assert_eq!(breaker.retry_in(), None, "closed");
        fail(&breaker);
        assert!(breaker.try_acquire().is_none());
        assert_eq!(breaker.retry_in(), Some(COOL_DOWN));
        clock.advance(COOL_DOWN - Duration::from_millis(1));
        assert!(breaker.try_acquire().is_none(), "cool-down not over yet");
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.retry_in(), Some(Duration::from_millis(1)));
        clock.advance(Duration::from_secs(5));
        assert_eq!(breaker.retry_in(), Some(Duration::ZERO), "a trial may go");
    }

    #[test]
    fn after_the_cool_down_exactly_one_trial_goes_through() {
        let (breaker, clock) = breaker(2);
        open_and_cool_down(&breaker, &clock);
        let trial = breaker.try_acquire().expect("trial after cool-down");
        assert!(trial.is_trial());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(
            breaker.try_acquire().is_none(),
            "a second caller waits for the trial"
        );
        clock.advance(COOL_DOWN * 10);
        assert!(
            breaker.try_acquire().is_none(),
            "still one trial, however long it takes"
        );
        trial.success();
    }

    #[test]
    fn a_successful_trial_closes_the_breaker() {
        let (breaker, clock) = breaker(2);
        open_and_cool_down(&breaker, &clock);
        breaker.try_acquire().expect("trial").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.consecutive_failures(), 0);
        // Closed again means a full threshold of failures before it reopens.
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Closed);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn a_failed_trial_reopens_for_a_full_cool_down() {
        let (breaker, clock) = breaker(2);
        open_and_cool_down(&breaker, &clock);
        breaker.try_acquire().expect("trial").failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        clock.advance(COOL_DOWN - Duration::from_millis(1));
        assert!(breaker.try_acquire().is_none(), "the cool-down restarted");
        clock.advance(Duration::from_millis(1));
        assert!(breaker.try_acquire().expect("next trial").is_trial());
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_call_try_at_once() {
        let (breaker, clock) = breaker(1);
        open_and_cool_down(&breaker, &clock);
        drop(breaker.try_acquire().expect("trial"));
        assert_eq!(breaker.state(), BreakerState::Open);
        let next = breaker
            .try_acquire()
            .expect("a new trial without another cool-down");
        assert!(next.is_trial());
        next.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn late_outcomes_of_calls_admitted_while_closed_do_not_move_an_open_breaker() {
        let (breaker, clock) = breaker(1);
        let slow_failure = breaker.try_acquire().expect("closed");
        let slow_success = breaker.try_acquire().expect("closed");
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
        slow_success.success();
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "only a trial closes it"
        );
        slow_failure.failure();
        clock.advance(COOL_DOWN);
        assert!(
            breaker.try_acquire().is_some(),
            "a late failure did not restart the cool-down"
        );
    }

    #[test]
    fn a_zero_threshold_behaves_like_one() {
        let (breaker, _) = breaker(0);
        assert_eq!(breaker.state(), BreakerState::Closed);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn only_one_of_many_threads_gets_the_trial() {
        let (breaker, clock) = breaker(1);
        open_and_cool_down(&breaker, &clock);
        let barrier = std::sync::Barrier::new(8);
        let permits: Vec<Permit<'_>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        breaker.try_acquire()
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(permits.len(), 1);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn states_have_metric_friendly_names() {
        let names: Vec<_> = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(names, ["closed", "open", "half_open"]);
    }
}
