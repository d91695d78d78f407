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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    Binding, BusError, DeadLetter, DeliveryPolicy, Envelope, EventBus, EventHandler, HandlerError,
    Outcome, headers,
};
use crate::resilience::Backoff;

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

/// Transport headers. Everything starting with `x-` is kept out of envelope headers.
mod transport {
    pub const ATTEMPTS: &str = "x-attempts";
    pub const ERROR: &str = "x-error";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    pub const ORIGINAL_QUEUE: &str = "x-original-queue";
    /// The envelope's `occurred_at` with milliseconds (the AMQP timestamp has seconds).
    pub const OCCURRED_AT: &str = "x-occurred-at";
    pub const DEAD_AT: &str = "x-dead-at";
    /// Set by the broker when it dead-letters a message itself.
    pub const FIRST_DEATH_REASON: &str = "x-first-death-reason";
    /// Broker bookkeeping that must not travel with a republished copy.
    pub const BROKER_DEATH: [&str; 7] = [
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ];
}

/// Names of everything declared for one binding.
#[derive(Debug, Clone)]
struct QueueTopology {
    binding: Binding,
    routing_key: ShortString,
    work: ShortString,
    dlq: ShortString,
    /// Retry queue per TTL in milliseconds.
    retries: BTreeMap<u64, ShortString>,
}

/// Every name the adapter declares, validated once at construction.
#[derive(Debug, Clone)]
struct Topology {
    exchange: ShortString,
    dlx: ShortString,
    queues: Vec<QueueTopology>,
}

fn name(text: String) -> anyhow::Result<ShortString> {
    ShortString::try_new(text).map_err(|e| anyhow::anyhow!("RabbitMQ name too long: {e}"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Topology {
    fn new(prefix: &str, bindings: &[Binding], policy: &DeliveryPolicy) -> anyhow::Result<Self> {
        let ttls: BTreeSet<u64> = (1..policy.max_attempts)
            .map(|attempt| millis(policy.backoff.ceiling(attempt)).max(1))
            .collect();
        let mut queues = Vec::with_capacity(bindings.len());
        for binding in bindings {
            let work = format!("{prefix}{}", binding.queue);
            let mut retries = BTreeMap::new();
            for ttl in &ttls {
                retries.insert(*ttl, name(format!("{work}.retry.{ttl}ms"))?);
            }
            queues.push(QueueTopology {
                binding: binding.clone(),
                routing_key: name(binding.routing_key.to_owned())?,
                dlq: name(format!("{work}.dlq"))?,
                work: name(work)?,
                retries,
            });
        }
        Ok(Self {
            exchange: name(format!("{prefix}userhub.events"))?,
            dlx: name(format!("{prefix}userhub.dlx"))?,
            queues,
        })
    }

    fn queue(&self, binding: &Binding) -> Option<&QueueTopology> {
        self.queues.iter().find(|q| q.binding == *binding)
    }

    /// One entry per distinct work queue (a queue may be bound to several keys).
    fn distinct_queues(&self) -> impl Iterator<Item = &QueueTopology> {
        let mut seen = BTreeSet::new();
        self.queues
            .iter()
            .filter(move |q| seen.insert(q.work.clone()))
    }

    /// Declares everything; each declaration is idempotent.
    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.clone(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dlx.clone(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        for queue in &self.queues {
            self.declare_queue(channel, queue).await?;
        }
        Ok(())
    }

    async fn declare_queue(&self, channel: &Channel, queue: &QueueTopology) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut work_args = FieldTable::default();
        work_args.insert("x-queue-type".into(), string_value("quorum"));
        work_args.insert(
            "x-dead-letter-exchange".into(),
            string_value(self.dlx.as_str()),
        );
        work_args.insert(
            "x-dead-letter-routing-key".into(),
            string_value(queue.work.as_str()),
        );
        channel
            .queue_declare(queue.work.clone(), durable, work_args)
            .await?;
        channel
            .queue_bind(
                queue.work.clone(),
                self.exchange.clone(),
                queue.routing_key.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Retry queues and the DLQ are classic: never consumed, and a DLQ listed by
        // get-and-requeue must not count those requeues as failed deliveries (quorum
        // queues do, and drop messages past their delivery limit).
        for (ttl, retry) in &queue.retries {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), string_value("classic"));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(*ttl).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), string_value(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                string_value(queue.work.as_str()),
            );
            channel.queue_declare(retry.clone(), durable, args).await?;
        }
        let mut dlq_args = FieldTable::default();
        dlq_args.insert("x-queue-type".into(), string_value("classic"));
        channel
            .queue_declare(queue.dlq.clone(), durable, dlq_args)
            .await?;
        channel
            .queue_bind(
                queue.dlq.clone(),
                self.dlx.clone(),
                queue.work.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

fn string_value(text: impl AsRef<str>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_ref()))
}

/// One live connection and its confirm-mode channel for publishing.
struct Link {
    connection: Connection,
    publisher: Channel,
    /// Counts (re)connections, so a consumer can tell a new link from the one that failed.
    generation: u64,
}

impl Link {
    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    async fn close(&self) {
        if self.connection.status().connected() {
            let closing = self.connection.close(200, "userhub bus closing".into());
            if let Ok(Err(error)) = tokio::time::timeout(IO_TIMEOUT, closing).await {
                tracing::debug!(%error, "closing the RabbitMQ connection failed");
            }
        }
    }
}

struct Shared {
    uri: AMQPUri,
    topology: Topology,
    policy: DeliveryPolicy,
    /// The current link; `None` while (re)connecting.
    link: watch::Sender<Option<Arc<Link>>>,
    /// Stops the connection task and every consumer of this bus.
    stop: CancellationToken,
}

impl Shared {
    fn current(&self) -> Result<Arc<Link>, BusError> {
        self.link
            .borrow()
            .as_ref()
            .filter(|link| link.is_open())
            .cloned()
            .ok_or_else(|| BusError::Unavailable("not connected to RabbitMQ".into()))
    }

    async fn open_link(&self, generation: u64) -> lapin::Result<Link> {
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
    async fn maintain_link(self: Arc<Self>) {
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
    async fn watch(&self, link: &Link) -> bool {
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
    async fn publish_confirmed(
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

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

/// Runs one broker operation under [`IO_TIMEOUT`].
async fn io<T>(
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

/// The RabbitMQ event bus. See the module documentation for the topology.
pub struct RabbitBus {
    shared: Arc<Shared>,
    connection_task: Mutex<Option<JoinHandle<()>>>,
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

    /// Delivers messages of one work queue until `shutdown` or the bus stops.
    /// Returns `Ok(())` on shutdown, an error when the channel or the link broke.
    async fn consume_on(
        &self,
        link: &Link,
        queue: &QueueTopology,
        handler: &dyn EventHandler,
        shutdown: &CancellationToken,
        failures: &mut u32,
    ) -> Result<(), BusError> {
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        let result = async {
            // Declaring again is cheap and recreates a queue deleted under a live link.
            io(
                "declaring the queue",
                self.shared.topology.declare_queue(&channel, queue),
            )
            .await?;
            io(
                "setting the prefetch",
                channel.basic_qos(PREFETCH, BasicQosOptions::default()),
            )
            .await?;
            let mut consumer = io(
                "starting the consumer",
                channel.basic_consume(
                    queue.work.clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            tracing::info!(queue = %queue.work, "consuming");
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Ok(()),
                    () = self.shared.stop.cancelled() => return Ok(()),
                    next = consumer.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => {
                        self.process(link, queue, handler, delivery).await?;
                        // Only a settled message proves the broker is healthy again: a
                        // message that cannot be settled must not come back in a tight loop.
                        *failures = 0;
                    }
                    Some(Err(error)) => return Err(unavailable(error)),
                    None => return Err(unavailable("the broker cancelled the consumer")),
                }
            }
        }
        .await;
        // Closing the channel hands prefetched, unacknowledged messages back to the queue.
        close_channel(&channel).await;
        result
    }

    /// Handles one delivery and settles it: ack, retry copy then ack, or dead-letter
    /// copy then ack. An error leaves the delivery unacknowledged (it comes back).
    async fn process(
        &self,
        link: &Link,
        queue: &QueueTopology,
        handler: &dyn EventHandler,
        delivery: Delivery,
    ) -> Result<Outcome, BusError> {
        let incoming = Incoming::decode(
            delivery.routing_key.as_str(),
            &delivery.properties,
            &delivery.data,
        );
        let span = tracing::info_span!(
            "message",
            queue = queue.binding.queue,
            message_id = %incoming.envelope.id,
            routing_key = %incoming.envelope.routing_key,
            request_id = incoming.envelope.header(headers::REQUEST_ID).unwrap_or("-"),
            attempt = incoming.attempt,
        );
        self.settle(link, queue, handler, &delivery, incoming)
            .instrument(span)
            .await
    }

    async fn settle(
        &self,
        link: &Link,
        queue: &QueueTopology,
        handler: &dyn EventHandler,
        delivery: &Delivery,
        incoming: Incoming,
    ) -> Result<Outcome, BusError> {
        let policy = &self.shared.policy;
        let Incoming {
            envelope,
            attempt,
            problem,
        } = incoming;
        let result = match problem {
            Some(problem) => Err(HandlerError::Permanent(problem)),
            None => tokio::time::timeout(policy.handler_timeout, handler.handle(&envelope))
                .await
                .unwrap_or_else(|_| {
                    Err(HandlerError::Transient(format!(
                        "handler timed out after {:?}",
                        policy.handler_timeout
                    )))
                }),
        };
        let error = match result {
            Ok(()) => {
                ack(delivery).await?;
                tracing::debug!("message acknowledged");
                return Ok(Outcome::Acked);
            }
            Err(HandlerError::Permanent(error)) => {
                tracing::warn!(%error, "message cannot be processed; dead-lettering it");
                error
            }
            Err(HandlerError::Transient(error)) if attempt < policy.max_attempts => {
                let delay = policy.backoff.ceiling(attempt);
                let retry_queue = queue.retries.get(&millis(delay).max(1)).ok_or_else(|| {
                    BusError::Corrupt(format!("no retry queue for a delay of {delay:?}"))
                })?;
                let mut table = copy_headers(&delivery.properties);
                table.insert(
                    transport::ATTEMPTS.into(),
                    AMQPValue::LongLongInt(i64::from(attempt) + 1),
                );
                table.insert(
                    transport::ORIGINAL_ROUTING_KEY.into(),
                    string_value(&envelope.routing_key),
                );
                let properties = copy_properties(&delivery.properties, &envelope, table);
                self.shared
                    .publish_confirmed(
                        link,
                        &ShortString::from(""),
                        retry_queue.clone(),
                        &delivery.data,
                        properties,
                        true,
                    )
                    .await?;
                ack(delivery).await?;
                tracing::warn!(%error, retry_in_ms = millis(delay), "delivery failed; will retry");
                return Ok(Outcome::Retried { attempt, delay });
            }
            Err(HandlerError::Transient(error)) => {
                tracing::error!(%error, "delivery failed on the last attempt; dead-lettering it");
                error
            }
        };
        let mut table = copy_headers(&delivery.properties);
        table.insert(
            transport::ERROR.into(),
            string_value(truncate(&error, MAX_ERROR_BYTES)),
        );
        table.insert(
            transport::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempt)),
        );
        table.insert(
            transport::ORIGINAL_ROUTING_KEY.into(),
            string_value(&envelope.routing_key),
        );
        table.insert(
            transport::ORIGINAL_QUEUE.into(),
            string_value(queue.binding.queue),
        );
        table.insert(transport::DEAD_AT.into(), string_value(rfc3339(Utc::now())));
        let properties = copy_properties(&delivery.properties, &envelope, table);
        self.shared
            .publish_confirmed(
                link,
                &self.shared.topology.dlx,
                queue.work.clone(),
                &delivery.data,
                properties,
                true,
            )
            .await?;
        ack(delivery).await?;
        handler.on_dead_letter(&envelope, &error).await;
        Ok(Outcome::DeadLettered { attempt })
    }

    /// Puts a dead letter back onto the queue it failed on (not onto every binding of
    /// its routing key) as a fresh message: attempts and error are gone.
    async fn replay_one(
        &self,
        link: &Link,
        queue: &QueueTopology,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), BusError> {
        let mut table = copy_headers(&delivery.properties);
        for key in [
            transport::ATTEMPTS,
            transport::ERROR,
            transport::ORIGINAL_QUEUE,
            transport::DEAD_AT,
        ] {
            table = without(table, key);
        }
        table.insert(
            transport::ORIGINAL_ROUTING_KEY.into(),
            string_value(&letter.routing_key),
        );
        let properties = delivery
            .properties
            .clone()
            .with_delivery_mode(PERSISTENT)
            .with_headers(table);
        self.shared
            .publish_confirmed(
                link,
                &ShortString::from(""),
                queue.work.clone(),
                &delivery.data,
                properties,
                true,
            )
            .await?;
        ack(delivery).await?;
        tracing::info!(dead_letter = %letter.id, queue = %queue.work, "dead letter replayed");
        Ok(())
    }

    /// Starts a walk over the dead-letter queues on a channel of its own.
    async fn scan_dead_letters(&self) -> Result<DeadLetterScan<'_>, BusError> {
        let link = self.shared.current()?;
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        Ok(DeadLetterScan {
            queues: self.shared.topology.distinct_queues().collect(),
            next_queue: 0,
            link,
            channel,
        })
    }
}

/// A walk over the dead-letter queues with unacknowledged gets. Closing its channel
/// ([`DeadLetterScan::finish`]) makes the broker put every message not explicitly
/// acknowledged back where it was, so listing loses nothing.
struct DeadLetterScan<'a> {
    queues: Vec<&'a QueueTopology>,
    next_queue: usize,
    link: Arc<Link>,
    channel: Channel,
}

impl<'a> DeadLetterScan<'a> {
    async fn next(&mut self) -> Result<Option<(&'a QueueTopology, Delivery)>, BusError> {
        while let Some(queue) = self.queues.get(self.next_queue).copied() {
            let got = io(
                "reading the dead letters",
                self.channel
                    .basic_get(queue.dlq.clone(), BasicGetOptions { no_ack: false }),
            )
            .await?;
            match got {
                Some(message) => return Ok(Some((queue, message.delivery))),
                None => self.next_queue += 1,
            }
        }
        Ok(None)
    }

    async fn finish(self) {
        close_channel(&self.channel).await;
    }
}

impl Drop for RabbitBus {
    fn drop(&mut self) {
        // The connection task sees this, closes the connection and ends by itself.
        self.shared.stop.cancel();
    }
}

async fn ack(delivery: &Delivery) -> Result<(), BusError> {
    io(
        "acknowledging the message",
        delivery.ack(BasicAckOptions::default()),
    )
    .await
    .map(|_| ())
}

async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let closing = channel.close(200, "done".into());
        if let Ok(Err(error)) = tokio::time::timeout(IO_TIMEOUT, closing).await {
            tracing::debug!(%error, "closing a RabbitMQ channel failed");
        }
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The envelope as AMQP properties: persistent, its id as `message_id`, its headers
/// as string headers.
fn envelope_properties(envelope: &Envelope) -> Result<BasicProperties, BusError> {
    let mut table = FieldTable::default();
    for (key, value) in &envelope.headers {
        let key = ShortString::try_new(key.as_str())
            .map_err(|e| BusError::Corrupt(format!("header name: {e}")))?;
        table.insert(key, string_value(value));
    }
    table.insert(
        transport::OCCURRED_AT.into(),
        string_value(rfc3339(envelope.occurred_at)),
    );
    Ok(BasicProperties::default()
        .with_message_id(envelope.id.to_string().into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(u64::try_from(envelope.occurred_at.timestamp()).unwrap_or(0))
        .with_headers(table))
}

/// The original headers without the broker's dead-lettering bookkeeping.
fn copy_headers(properties: &BasicProperties) -> FieldTable {
    let mut map = properties
        .headers()
        .as_ref()
        .map(|table| table.inner().clone())
        .unwrap_or_default();
    for key in transport::BROKER_DEATH {
        map.remove(key);
    }
    FieldTable::from(map)
}

/// A copy of a delivery for republishing: persistent, addressable by its id.
fn copy_properties(
    original: &BasicProperties,
    envelope: &Envelope,
    headers: FieldTable,
) -> BasicProperties {
    original
        .clone()
        .with_message_id(envelope.id.to_string().into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
}

/// A header as text: strings as they are, numbers and booleans printed.
fn header_text(table: Option<&FieldTable>, key: &str) -> Option<String> {
    value_text(table?.inner().get(key)?)
}

fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        _ => return None,
    })
}

fn header_u32(table: Option<&FieldTable>, key: &str) -> Option<u32> {
    header_text(table, key)?.trim().parse().ok()
}

/// Envelope headers: every readable header outside the transport's `x-` space.
fn envelope_headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    table
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(key, _)| !key.as_str().starts_with("x-"))
                .filter_map(|(key, value)| Some((key.as_str().to_owned(), value_text(value)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn occurred_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    let table = properties.headers().as_ref();
    header_text(table, transport::OCCURRED_AT)
        .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
        .map(|at| at.with_timezone(&Utc))
        .or_else(|| seconds(*properties.timestamp()))
}

fn seconds(timestamp: Option<u64>) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(i64::try_from(timestamp?).ok()?, 0)
}

/// A delivery read back into an envelope, as far as it can be.
#[derive(Debug)]
struct Incoming {
    /// Best effort when `problem` is set: a lossy payload, a fresh id if it had none.
    envelope: Envelope,
    attempt: u32,
    /// Why the message cannot be handed to a handler at all.
    problem: Option<String>,
}

impl Incoming {
    fn decode(routing_key: &str, properties: &BasicProperties, body: &[u8]) -> Self {
        let table = properties.headers().as_ref();
        let mut problems = Vec::new();
        let id = match properties.message_id() {
            Some(id) => id.as_str().parse::<Uuid>().unwrap_or_else(|_| {
                problems.push(format!("message_id {:?} is not a UUID", id.as_str()));
                Uuid::now_v7()
            }),
            None => {
                problems.push("message has no message_id".to_owned());
                Uuid::now_v7()
            }
        };
        let payload = match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(error) => {
                problems.push(format!("message body is not UTF-8: {error}"));
                String::from_utf8_lossy(body).into_owned()
            }
        };
        let envelope = Envelope {
            id,
            // A copy coming back from a retry queue was routed by queue name.
            routing_key: header_text(table, transport::ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| routing_key.to_owned()),
            payload,
            headers: envelope_headers(table),
            occurred_at: occurred_at(properties).unwrap_or_else(Utc::now),
        };
        Self {
            envelope,
            attempt: header_u32(table, transport::ATTEMPTS).unwrap_or(1).max(1),
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }
}

fn dead_letter(queue: &QueueTopology, delivery: &Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let table = properties.headers().as_ref();
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let error = header_text(table, transport::ERROR).unwrap_or_else(|| {
        match header_text(table, transport::FIRST_DEATH_REASON) {
            Some(reason) => format!("dead-lettered by the broker ({reason})"),
            None => "unknown".to_owned(),
        }
    });
    DeadLetter {
        message_id: id.parse().unwrap_or(Uuid::nil()),
        id,
        queue: header_text(table, transport::ORIGINAL_QUEUE)
            .unwrap_or_else(|| queue.binding.queue.to_owned()),
        routing_key: header_text(table, transport::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| queue.binding.routing_key.to_owned()),
        payload: String::from_utf8_lossy(&delivery.data).into_owned(),
        headers: envelope_headers(table),
        attempts: header_u32(table, transport::ATTEMPTS).unwrap_or(1),
        error,
        dead_at: header_text(table, transport::DEAD_AT)
            .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
            .map(|at| at.with_timezone(&Utc))
            .or_else(|| seconds(*properties.timestamp()))
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
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
                false,
            )
            .await
    }

    async fn consume(
        &self,
        binding: &Binding,
        handler: Arc<dyn EventHandler>,
        shutdown: CancellationToken,
    ) {
        let Some(queue) = self.shared.topology.queue(binding) else {
            tracing::error!(
                queue = binding.queue,
                "not consuming: the binding was not given to the bus"
            );
            return;
        };
        tracing::info!(queue = binding.queue, "consumer started");
        let backoff = reconnect_backoff();
        let mut links = self.shared.link.subscribe();
        let mut failures = 0u32;
        let mut failed_generation = 0u64;
        loop {
            let link = tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.shared.stop.cancelled() => break,
                link = links.wait_for(|link| link.as_ref().is_some_and(|l| l.is_open())) => {
                    match link.ok().and_then(|link| link.clone()) {
                        Some(link) => link,
                        None => break,
                    }
                }
            };
            if link.generation != failed_generation {
                failures = 0; // a new connection gets a fresh start
            }
            match self
                .consume_on(&link, queue, handler.as_ref(), &shutdown, &mut failures)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    failed_generation = link.generation;
                    failures = failures.saturating_add(1);
                    tracing::warn!(queue = binding.queue, %error, "consumer interrupted; resuming");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.shared.stop.cancelled() => break,
                () = tokio::time::sleep(backoff.delay(failures.max(1))) => {}
            }
        }
        tracing::info!(queue = binding.queue, "consumer stopped");
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.shared.current().map(|_| ())
    }

    async fn dead_letters(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut letters = Vec::new();
        if limit == 0 {
            return Ok(letters);
        }
        let mut scan = self.scan_dead_letters().await?;
        let mut skipping = after.is_some();
        let result = async {
            while letters.len() < limit {
                let Some((queue, delivery)) = scan.next().await? else {
                    break;
                };
                let letter = dead_letter(queue, &delivery);
                if skipping {
                    skipping = after != Some(letter.id.as_str());
                    continue;
                }
                letters.push(letter);
            }
            Ok(())
        }
        .await;
        scan.finish().await;
        result.map(|()| letters)
    }

    async fn replay(&self, id: &str) -> Result<bool, BusError> {
        let mut scan = self.scan_dead_letters().await?;
        let result = async {
            while let Some((queue, delivery)) = scan.next().await? {
                let letter = dead_letter(queue, &delivery);
                if letter.id == id {
                    self.replay_one(&scan.link, queue, &delivery, &letter)
                        .await?;
                    return Ok(true);
                }
            }
            Ok(false)
        }
        .await;
        scan.finish().await;
        result
    }
}

fn without(table: FieldTable, key: &str) -> FieldTable {
    let mut map = table.inner().clone();
    map.remove(key);
    FieldTable::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> DeliveryPolicy {
        DeliveryPolicy {
            max_attempts,
            backoff: Backoff::new(Duration::from_millis(1000), Duration::from_millis(5000)),
            handler_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
        }
    }

    const BINDING: Binding = Binding {
        queue: "enrichment.user-created",
        routing_key: "user.created",
    };

    #[test]
    fn names_are_prefixed_and_retry_queues_follow_the_distinct_backoff_ceilings() {
        let topology = Topology::new("t.", &[BINDING], &policy(6)).unwrap();
        assert_eq!(topology.exchange.as_str(), "t.userhub.events");
        assert_eq!(topology.dlx.as_str(), "t.userhub.dlx");
        let queue = &topology.queues[0];
        assert_eq!(queue.work.as_str(), "t.enrichment.user-created");
        assert_eq!(queue.dlq.as_str(), "t.enrichment.user-created.dlq");
        let retries: Vec<&str> = queue.retries.values().map(ShortString::as_str).collect();
        // Ceilings 1 s, 2 s, 4 s, 5 s (capped), 5 s: four distinct queues.
        assert_eq!(
            retries,
            [
                "t.enrichment.user-created.retry.1000ms",
                "t.enrichment.user-created.retry.2000ms",
                "t.enrichment.user-created.retry.4000ms",
                "t.enrichment.user-created.retry.5000ms",
            ]
        );
    }

    #[test]
    fn a_single_attempt_needs_no_retry_queue() {
        let topology = Topology::new("", &[BINDING], &policy(1)).unwrap();
        assert!(topology.queues[0].retries.is_empty());
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused_up_front() {
        let prefix = "p".repeat(250);
        assert!(Topology::new(&prefix, &[BINDING], &policy(3)).is_err());
    }

    #[test]
    fn an_envelope_survives_the_trip_through_amqp_properties() {
        let mut headers = BTreeMap::new();
        headers.insert(headers::REQUEST_ID.to_owned(), "req-1".to_owned());
        headers.insert(headers::EVENT_VERSION.to_owned(), "1".to_owned());
        let envelope = Envelope::new("user.created", r#"{"a":1}"#.into(), headers);
        let properties = envelope_properties(&envelope).unwrap();
        assert_eq!(*properties.delivery_mode(), Some(PERSISTENT));
        let incoming = Incoming::decode("user.created", &properties, envelope.payload.as_bytes());
        assert_eq!(incoming.problem, None);
        assert_eq!(incoming.attempt, 1);
        assert_eq!(incoming.envelope, envelope);
    }

    #[test]
    fn retry_copies_keep_their_routing_key_and_attempt_count() {
        let envelope = Envelope::new("user.created", "{}".into(), BTreeMap::new());
        let mut table = copy_headers(&envelope_properties(&envelope).unwrap());
        table.insert(transport::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
        table.insert(
            transport::ORIGINAL_ROUTING_KEY.into(),
            string_value("user.created"),
        );
        table.insert("x-death".into(), AMQPValue::Void);
        let properties = BasicProperties::default()
            .with_message_id(envelope.id.to_string().into())
            .with_headers(table);
        let incoming = Incoming::decode("t.enrichment.user-created", &properties, b"{}");
        assert_eq!(incoming.attempt, 3);
        assert_eq!(incoming.envelope.routing_key, "user.created");
        assert!(incoming.envelope.headers.is_empty(), "x- headers stay out");
    }

    #[test]
    fn unreadable_messages_are_flagged_not_dropped() {
        let properties = BasicProperties::default();
        let incoming = Incoming::decode("user.created", &properties, &[0xff, 0xfe]);
        let problem = incoming.problem.unwrap();
        assert!(problem.contains("message_id"), "{problem}");
        assert!(problem.contains("UTF-8"), "{problem}");
        assert_eq!(incoming.envelope.payload, "\u{fffd}\u{fffd}");
    }

    #[test]
    fn broker_death_headers_are_not_copied() {
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::Void);
        table.insert("x-first-death-reason".into(), string_value("expired"));
        table.insert("request_id".into(), string_value("r"));
        let copied = copy_headers(&BasicProperties::default().with_headers(table));
        let keys: Vec<&str> = copied.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(keys, ["request_id"]);
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
