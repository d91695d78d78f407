//! Retry policy shared by the outbox relay and the event consumers.

mod backoff;

pub use backoff::Backoff;
