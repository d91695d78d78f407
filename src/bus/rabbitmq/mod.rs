//! RabbitMQ adapter of the event bus (`bus.url = amqp://…` or `amqps://…`).
//!
//! Same semantics as the in-process bus, carried by broker topology instead of tables:
//!
//! - `{p}userhub.events` (topic) routes each event to the work queue `{p}{queue}` of
//!   every binding (quorum, durable).
//! - A transient failure republishes a copy, with `x-attempts` increased, to a retry
//!   queue `{p}{queue}.retry.{ms}ms` whose fixed TTL is the backoff ceiling for that
//!   attempt; on expiry the broker dead-letters it back to the work queue through the
//!   default exchange. A retrying message therefore never blocks later ones.
//! - A permanent failure, an unreadable message or the last failed attempt goes to
//!   `{p}userhub.dlx` (direct, keyed by work queue name) and lands in
//!   `{p}{queue}.dlq` with `x-error`, `x-attempts`, `x-original-routing-key` and
//!   `x-original-queue`. The work queue also dead-letters there, so a message the
//!   broker itself gives up on (a quorum delivery limit) is kept too.
//!
//! Every copy is published with a confirm before the original is acknowledged, so a
//! crash in between duplicates a message but never loses one. Headers starting with
//! `x-` belong to the transport and are not part of an envelope's headers.
//!
//! The connection lives in a background task that reconnects with exponential backoff
//! and re-declares the topology every time; until it is up, `publish` fails at once
//! with [`BusError::Unavailable`], so the outbox keeps the events.

mod codec;
mod consumer;
mod dead_letters;
mod link;
mod topology;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Binding, BusError, DeadLetter, DeliveryPolicy, Envelope, EventBus, EventHandler, QueueCounts,
    ReplayFilter,
};
use crate::resilience::Backoff;
use codec::envelope_properties;
use link::{Shared, close_channel, io, unavailable};
use topology::Topology;

/// Deliveries a consumer may hold unacknowledged.
const PREFETCH: u16 = 16;
/// Bound on every broker round trip: connect, declare, get, ack, close.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish may wait for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection task checks that the link is still open.
const LINK_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// `x-error` is cut to this many bytes: headers must fit in one frame.
const MAX_ERROR_BYTES: usize = 2048;
/// Persistent messages survive a broker restart.
const PERSISTENT: u8 = 2;

fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(15))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The RabbitMQ event bus. See the module documentation for the topology.
pub struct RabbitBus {
    shared: Arc<Shared>,
    connection_task: Mutex<Option<JoinHandle<()>>>,
    /// Walks over the DLQs (listing, replaying, purging) run one at a time in this
    /// process: each holds the messages it has read until it ends, and two at once
    /// would hide them from each other.
    dlq_scans: tokio::sync::Mutex<()>,
}

impl RabbitBus {
    /// Starts connecting in the background and returns at once, even when the broker
    /// is down. Fails only on a malformed URL or names too long for AMQP. `prefix` is
    /// put in front of every exchange and queue name (empty in production).
    pub async fn connect(
        url: &str,
        prefix: &str,
        bindings: Vec<Binding>,
        policy: DeliveryPolicy,
    ) -> anyhow::Result<Self> {
        let uri: AMQPUri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("bus.url is not a valid AMQP URL: {e}"))?;
        let topology = Topology::new(prefix, &bindings, &policy)?;
        let (link, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            uri,
            topology,
            policy,
            link,
            stop: CancellationToken::new(),
        });
        let connection_task = tokio::spawn(shared.clone().maintain_link());
        Ok(Self {
            shared,
            connection_task: Mutex::new(Some(connection_task)),
            dlq_scans: tokio::sync::Mutex::new(()),
        })
    }

    /// Waits until the broker is connected and the topology declared, at most `timeout`
    /// (for one-shot commands such as `userhub dlq`, which cannot wait for a retry).
    pub async fn wait_until_connected(&self, timeout: Duration) -> Result<(), BusError> {
        let mut link = self.shared.link.subscribe();
        tokio::time::timeout(
            timeout,
            link.wait_for(|l| l.as_ref().is_some_and(|l| l.is_open())),
        )
        .await
        .map_err(|_| unavailable(format!("not connected to RabbitMQ within {timeout:?}")))?
        .map_err(unavailable)?;
        Ok(())
    }

    /// Stops the connection task and every consumer of this bus, and closes the
    /// connection. Dropping the bus does the same without waiting.
    pub async fn close(&self) {
        self.shared.stop.cancel();
        let task = self
            .connection_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task
            && tokio::time::timeout(IO_TIMEOUT * 2, task).await.is_err()
        {
            tracing::warn!("the RabbitMQ connection task did not stop in time");
        }
    }

    /// Deletes every queue and exchange of this bus's topology, messages included.
    /// For tests and decommissioning. Stop the consumers first: a consumer re-declares
    /// its queues when it restarts, and the bus re-declares everything on reconnect.
    pub async fn delete_topology(&self) -> Result<(), BusError> {
        let link = self.shared.current()?;
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        let topology = &self.shared.topology;
        let result = async {
            for queue in topology.distinct_queues() {
                let names = std::iter::once(&queue.work)
                    .chain(queue.retries.values())
                    .chain(std::iter::once(&queue.dlq));
                for queue in names {
                    io(
                        "deleting a queue",
                        channel.queue_delete(queue.clone(), QueueDeleteOptions::default()),
                    )
                    .await?;
                }
            }
            for exchange in [&topology.exchange, &topology.dlx] {
                io(
                    "deleting an exchange",
                    channel.exchange_delete(exchange.clone(), ExchangeDeleteOptions::default()),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        close_channel(&channel).await;
        result
    }
}

impl Drop for RabbitBus {
    fn drop(&mut self) {
        // The connection task sees this, closes the connection and ends by itself.
        self.shared.stop.cancel();
    }
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let link = self.shared.current()?;
        let routing_key = ShortString::try_new(envelope.routing_key.as_str())
            .map_err(|e| BusError::Corrupt(format!("routing key: {e}")))?;
        self.shared
            .publish_confirmed(
                &link,
                &self.shared.topology.exchange,
                routing_key,
                envelope.payload.as_bytes(),
                envelope_properties(envelope)?,
                // A message no queue is bound to take comes back and fails the publish,
                // so the outbox keeps it, instead of the broker confirming and dropping
                // it.
                true,
            )
            .await
    }

    async fn consume(
        &self,
        binding: &Binding,
        handler: Arc<dyn EventHandler>,
        shutdown: CancellationToken,
    ) {
        self.consume_binding(binding, handler, shutdown).await;
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.shared.current().map(|_| ())
    }

    fn messaging_system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn queue_counts(&self) -> Result<Vec<QueueCounts>, BusError> {
        self.count_messages().await
    }

    async fn dead_letters(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        self.list_dead_letters(limit, after).await
    }

    async fn replay(&self, id: &str) -> Result<bool, BusError> {
        self.replay_dead_letter(id).await
    }

    async fn replay_all(&self, filter: &ReplayFilter) -> Result<u64, BusError> {
        self.replay_dead_letters(filter).await
    }
}
