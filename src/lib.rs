//! userhub: a user registry with asynchronous profile enrichment, as one binary.
//!
//! Two modules, [`users`] and [`enrichment`], talk only through [`events`] on the
//! [`bus`]; [`outbox`] makes publishing part of the user's transaction. The layers,
//! each importing only those below it:
//!
//! - [`startup`] picks the adapters from [`config`], wires the modules, runs the server
//!   and the workers;
//! - [`app`] composes the routes: the modules' own, health, admin, docs, combined views;
//! - [`users`] and [`enrichment`], the modules, each with its routes;
//! - [`web`], what every route shares (errors, auth, limits), knowing no module;
//! - the infrastructure: [`bus`], [`outbox`], [`cache`], [`db`], [`resilience`],
//!   [`metrics`], [`telemetry`], [`crypto`].

pub mod app;
pub mod bus;
pub mod cache;
pub mod config;
pub mod crypto;
pub mod db;
pub mod enrichment;
pub mod events;
pub mod metrics;
pub mod outbox;
pub mod resilience;
pub mod startup;
pub mod telemetry;
pub mod users;
pub mod web;
