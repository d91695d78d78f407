//! Resilience shared by the adapters and workers: the retry schedule of the outbox
//! relay and the event consumers, and the circuit breaker guarding flaky dependencies.

mod backoff;
mod breaker;

pub use backoff::Backoff;
pub use breaker::{BreakerPolicy, BreakerState, CircuitBreaker, Clock, Permit, SystemClock};
