//! The link to the broker: one connection and a confirm-mode publishing channel, kept
//! up by a background task that reconnects with backoff and re-declares the topology;
//! and the bounded broker operations everything else uses.

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use super::{CONFIRM_TIMEOUT, IO_TIMEOUT, LINK_CHECK_INTERVAL, reconnect_backoff};
use crate::bus::{BusError, DeliveryPolicy};

/// One live connection and its confirm-mode channel for publishing.
pub(super) struct Link {
    pub(super) connection: Connection,
    pub(super) publisher: Channel,
    /// Counts (re)connections, so a consumer can tell a new link from the one that failed.
    pub(super) generation: u64,
}

impl Link {
    pub(super) fn is_open(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    pub(super) async fn close(&self) {
        if self.connection.status().connected() {
            let closing = self.connection.close(200, "userhub bus closing".into());
            if let Ok(Err(error)) = tokio::time::timeout(IO_TIMEOUT, closing).await {
                tracing::debug!(%error, "closing the RabbitMQ connection failed");
            }
        }
    }
}

pub(super) struct Shared {
    pub(super) uri: AMQPUri,
    pub(super) topology: Topology,
    pub(super) policy: DeliveryPolicy,
    /// The current link; `None` while (re)connecting.
    pub(super) link: watch::Sender<Option<Arc<Link>>>,
    /// Stops the connection task and every consumer of this bus.
    pub(super) stop: CancellationToken,
}

impl Shared {
    pub(super) fn current(&self) -> Result<Arc<Link>, BusError> {
        self.link
            .borrow()
            .as_ref()
            .filter(|link| link.is_open())
            .cloned()
            .ok_or_else(|| BusError::Unavailable("not connected to RabbitMQ".into()))
    }

    pub(super) async fn open_link(&self, generation: u64) -> lapin::Result<Link> {
        let properties = ConnectionProperties::default().with_connection_name("userhub".into());
        let connection = Connection::connect_uri(self.uri.clone(), properties).await?;
        let setup = async {
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.topology.declare(&publisher).await?;
            Ok::<_, lapin::Error>(publisher)
        };
        match setup.await {
            Ok(publisher) => Ok(Link {
                connection,
                publisher,
                generation,
            }),
            Err(error) => {
                let _ = tokio::time::timeout(
                    IO_TIMEOUT,
                    connection.close(200, "topology declaration failed".into()),
                )
                .await;
                Err(error)
            }
        }
    }

    /// Keeps a link up until `stop`: connect, declare, watch, reconnect with backoff.
    pub(super) async fn maintain_link(self: Arc<Self>) {
        let backoff = reconnect_backoff();
        let mut failures = 0u32;
        let mut generation = 0u64;
        let (host, port) = (self.uri.authority.host.clone(), self.uri.authority.port);
        loop {
            let opened = tokio::select! {
                () = self.stop.cancelled() => break,
                opened = tokio::time::timeout(IO_TIMEOUT, self.open_link(generation + 1)) => opened,
            };
            match opened {
                Ok(Ok(link)) => {
                    failures = 0;
                    generation = link.generation;
                    tracing::info!(%host, port, "connected to RabbitMQ; topology declared");
                    let link = Arc::new(link);
                    self.link.send_replace(Some(link.clone()));
                    let stopping = self.watch(&link).await;
                    self.link.send_replace(None);
                    link.close().await;
                    if stopping {
                        break;
                    }
                    tracing::warn!(%host, port, "lost the RabbitMQ connection; reconnecting");
                }
                Ok(Err(error)) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(%host, port, %error, failures, "cannot connect to RabbitMQ");
                }
                Err(_) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(%host, port, failures, "connecting to RabbitMQ timed out");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(backoff.delay(failures.max(1))) => {}
            }
        }
        self.link.send_replace(None);
        tracing::info!("RabbitMQ connection task stopped");
    }

    /// Returns `true` when stopping, `false` when the link broke.
    pub(super) async fn watch(&self, link: &Link) -> bool {
        let mut tick = tokio::time::interval(LINK_CHECK_INTERVAL);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return true,
                _ = tick.tick() => {
                    if !link.is_open() {
                        return false;
                    }
                }
            }
        }
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, a message no
    /// queue would take comes back and counts as a failure instead of vanishing.
    pub(super) async fn publish_confirmed(
        &self,
        link: &Link,
        exchange: &ShortString,
        routing_key: ShortString,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), BusError> {
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            link.publisher
                .basic_publish(exchange.clone(), routing_key, options, body, properties)
                .await?
                .await
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Err(_) => Err(BusError::Unavailable(format!(
                "no publisher confirm within {CONFIRM_TIMEOUT:?}"
            ))),
            Ok(Err(error)) => Err(BusError::Unavailable(format!("publish failed: {error}"))),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(BusError::Unavailable(format!(
                "message returned as unroutable: {} {}",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(BusError::Unavailable(
                "the broker refused the message (nack)".into(),
            )),
            Ok(Ok(Confirmation::NotRequested)) => Err(BusError::Unavailable(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }
}

pub(super) fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

/// Runs one broker operation under [`IO_TIMEOUT`].
pub(super) async fn io<T>(
    what: &str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(IO_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(BusError::Unavailable(format!("{what}: {error}"))),
        Err(_) => Err(BusError::Unavailable(format!(
            "{what}: timed out after {IO_TIMEOUT:?}"
        ))),
    }
}

pub(super) async fn ack(delivery: &Delivery) -> Result<(), BusError> {
    io(
        "acknowledging the message",
        delivery.ack(BasicAckOptions::default()),
    )
    .await
    .map(|_| ())
}

pub(super) async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let closing = channel.close(200, "done".into());
        if let Ok(Err(error)) = tokio::time::timeout(IO_TIMEOUT, closing).await {
            tracing::debug!(%error, "closing a RabbitMQ channel failed");
        }
    }
}
