//! userhub: a user registry with asynchronous profile enrichment, as one binary.
//!
//! Two modules, [`users`] and [`enrichment`], talk only through [`events`] on the
//! [`bus`]; [`outbox`] makes publishing part of the user's transaction; [`startup`]
//! wires the adapters chosen by configuration.

pub mod bus;
pub mod cache;
pub mod config;
pub mod db;
pub mod enrichment;
pub mod events;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod resilience;
pub mod startup;
pub mod telemetry;
pub mod users;
