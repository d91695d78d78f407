//! The profile store behind a circuit breaker. A failed call is followed by a ping:
//! if the store answers, the failure was the call's own (a retry may help, and the
//! message spends an attempt); if it does not, the store is down
//! ([`StoreError::Unavailable`]: the message waits, its attempts untouched). After a
//! run of those the breaker opens: calls fail at once instead of waiting for
//! timeouts, and the consumer pauses (see `UserEventsHandler::pause`). While open, the
//! store is pinged once per cool-down; the first answer closes the breaker and the
//! consumer resumes.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::domain::{EnrichedProfile, Write};
use super::store::{ProfileStore, StoreError};
use crate::resilience::CircuitBreaker;

pub struct GuardedStore {
    inner: Arc<dyn ProfileStore>,
    breaker: Arc<CircuitBreaker>,
}

impl GuardedStore {
    pub fn new(inner: Arc<dyn ProfileStore>, breaker: Arc<CircuitBreaker>) -> Self {
        Self { inner, breaker }
    }

    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.breaker.clone()
    }

    /// Runs one store call through the breaker. A failure with the store unreachable
    /// (its ping fails too), or while the breaker is open, is
    /// [`StoreError::Unavailable`]: no fault of the message being handled.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(permit) = self.breaker.try_acquire() else {
            return Err(StoreError::Unavailable(format!(
                "the profile store is down (circuit breaker {})",
                self.breaker.state()
            )));
        };
        let error = match call.await {
            Ok(value) => {
                permit.success();
                return Ok(value);
            }
            Err(error) => error,
        };
        match self.inner.ping().await {
            Ok(()) => {
                // Reachable: whatever failed, it was not an outage.
                permit.success();
                Err(error)
            }
            Err(_) => {
                permit.failure();
                Err(StoreError::Unavailable(error.to_string()))
            }
        }
    }

    /// `None` when the store may be used; else how long to wait before asking again.
    /// Once an open breaker's cool-down has passed, this pings the store as the
    /// breaker's one trial: an answer closes it.
    pub async fn pause(&self) -> Option<std::time::Duration> {
        match self.breaker.retry_in() {
            None => None,
            Some(wait) if !wait.is_zero() => Some(wait),
            Some(_) => match self.breaker.try_acquire() {
                // Another caller holds the trial.
                None => Some(self.breaker.policy().cool_down),
                Some(trial) => match self.inner.ping().await {
                    Ok(()) => {
                        trial.success();
                        None
                    }
                    Err(_) => {
                        trial.failure();
                        Some(self.breaker.policy().cool_down)
                    }
                },
            },
        }
    }
}

#[async_trait]
impl ProfileStore for GuardedStore {
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        self.call(self.inner.upsert(profile)).await
    }

    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        self.call(self.inner.mark_failed(profile)).await
    }

    async fn erase(
        &self,
        uuid: Uuid,
        version: u64,
        source_event_id: Uuid,
    ) -> Result<Write, StoreError> {
        self.call(self.inner.erase(uuid, version, source_event_id))
            .await
    }

    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        self.call(self.inner.get(uuid)).await
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        self.inner.prepare().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Readiness asks the store itself: it reports what is, and must not spend
        // the breaker's trial.
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::resilience::{BreakerPolicy, BreakerState};

    /// A store that is up or down at will, counting the calls that reach it.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        calls: AtomicU32,
    }

    impl Flaky {
        fn answer(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Backend("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl ProfileStore for Flaky {
        async fn upsert(&self, _: &EnrichedProfile) -> Result<Write, StoreError> {
            self.answer().map(|()| Write::Applied)
        }
        async fn mark_failed(&self, _: &EnrichedProfile) -> Result<Write, StoreError> {
            self.answer().map(|()| Write::Applied)
        }
        async fn erase(&self, _: Uuid, _: u64, _: Uuid) -> Result<Write, StoreError> {
            self.answer().map(|()| Write::Applied)
        }
        async fn get(&self, _: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
            self.answer().map(|()| None)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.answer()
        }
    }

    fn guarded(cool_down: Duration) -> (GuardedStore, Arc<Flaky>) {
        let flaky = Arc::new(Flaky::default());
        let breaker = CircuitBreaker::new(
            "profile_store",
            BreakerPolicy {
                failure_threshold: 2,
                cool_down,
            },
        );
        (GuardedStore::new(flaky.clone(), Arc::new(breaker)), flaky)
    }

    #[tokio::test]
    async fn a_store_that_is_down_is_unavailable_then_not_called_at_all() {
        let (store, flaky) = guarded(Duration::from_secs(3600));
        flaky.down.store(true, Ordering::SeqCst);
        let first = store.get(Uuid::nil()).await.unwrap_err();
        assert!(matches!(first, StoreError::Unavailable(_)), "{first:?}");
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            2,
            "the call, then a ping"
        );
        assert_eq!(store.pause().await, None, "one failure does not pause");
        let opening = store.get(Uuid::nil()).await.unwrap_err();
        assert!(matches!(opening, StoreError::Unavailable(_)), "{opening:?}");
        assert_eq!(store.breaker().state(), BreakerState::Open);
        let refused = store.get(Uuid::nil()).await.unwrap_err();
        assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            4,
            "the open breaker refused"
        );
        let wait = store.pause().await.expect("the consumer pauses");
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            4,
            "no trial before the cool-down"
        );
    }

    /// A store that answers its ping but fails a write: the message's own failure,
    /// worth its attempts (and in the end a dead letter), and no outage.
    #[tokio::test]
    async fn a_failed_call_to_a_store_that_answers_is_the_calls_own() {
        struct FailingWrites(Flaky);
        #[async_trait]
        impl ProfileStore for FailingWrites {
            async fn upsert(&self, _: &EnrichedProfile) -> Result<Write, StoreError> {
                Err(StoreError::Backend("document failed validation".into()))
            }
            async fn mark_failed(&self, p: &EnrichedProfile) -> Result<Write, StoreError> {
                self.0.mark_failed(p).await
            }
            async fn erase(&self, u: Uuid, v: u64, e: Uuid) -> Result<Write, StoreError> {
                self.0.erase(u, v, e).await
            }
            async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
                self.0.get(uuid).await
            }
            async fn ping(&self) -> Result<(), StoreError> {
                self.0.ping().await
            }
        }
        let breaker = CircuitBreaker::new(
            "profile_store",
            BreakerPolicy {
                failure_threshold: 1,
                cool_down: Duration::from_secs(3600),
            },
        );
        let store = GuardedStore::new(Arc::new(FailingWrites(Flaky::default())), Arc::new(breaker));
        let profile = EnrichedProfile::derive(Uuid::nil(), "Ada", "ada@x.io", Uuid::nil(), 1);
        for _ in 0..3 {
            let error = store.upsert(&profile).await.unwrap_err();
            assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
        }
        assert_eq!(store.breaker().state(), BreakerState::Closed);
        assert_eq!(store.pause().await, None);
    }

    #[tokio::test]
    async fn the_pause_ends_with_the_first_ping_that_answers() {
        let (store, flaky) = guarded(Duration::ZERO);
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            store.get(Uuid::nil()).await.unwrap_err();
        }
        assert_eq!(store.breaker().state(), BreakerState::Open);
        assert!(store.pause().await.is_some(), "the trial ping failed");
        flaky.down.store(false, Ordering::SeqCst);
        assert_eq!(
            store.pause().await,
            None,
            "the trial ping closed the breaker"
        );
        assert_eq!(store.breaker().state(), BreakerState::Closed);
        assert!(store.get(Uuid::nil()).await.is_ok());
        // Readiness pings the store itself, whatever the breaker says.
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(store.ping().await, Err(StoreError::Backend(_))));
        }
        assert_eq!(store.breaker().state(), BreakerState::Closed);
    }
}
