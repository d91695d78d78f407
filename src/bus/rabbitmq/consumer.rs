//! Consuming: one consumer per work queue, resumed on every new link; up to
//! `worker.concurrency` deliveries handled at once, each settled (ack, a retry copy, or
//! a dead-letter copy, every copy confirmed before the original is acknowledged). While
//! the handler says a dependency is down, the consumer stops consuming and what it held
//! goes back to the queue.

use std::sync::Arc;

use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{
    Incoming, copy_headers, copy_properties, rfc3339, string_value, transport, truncate,
};
use super::link::{Link, ack, close_channel, io, unavailable};
use super::topology::QueueTopology;
use super::{MAX_ERROR_BYTES, PREFETCH, RabbitBus, millis, reconnect_backoff};
use crate::bus::{Binding, BusError, EventHandler, HandlerError, Outcome, headers};

/// The shortest wait of a paused consumer before it asks its handler again.
const PAUSE_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a consumer stopped without an error.
enum Stopped {
    Shutdown,
    /// The handler's dependency is down: resume after about this long.
    Paused(std::time::Duration),
}

impl RabbitBus {
    /// Delivers messages of `binding` to `handler` until `shutdown` or the bus stops,
    /// resuming on every new link.
    pub(super) async fn consume_binding(
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
            if let Some(wait) = handler.pause().await {
                tracing::warn!(
                    queue = binding.queue,
                    "consumer paused: a dependency of the handler is down"
                );
                self.wait_until_ready(handler.as_ref(), wait, &shutdown)
                    .await;
                continue;
            }
            match self
                .consume_on(&link, queue, handler.as_ref(), &shutdown, &mut failures)
                .await
            {
                Ok(Stopped::Shutdown) => break,
                Ok(Stopped::Paused(wait)) => {
                    tracing::warn!(
                        queue = binding.queue,
                        "consumer paused: a dependency of the handler is down"
                    );
                    self.wait_until_ready(handler.as_ref(), wait, &shutdown)
                        .await;
                    tracing::info!(queue = binding.queue, "consumer resumed");
                    continue;
                }
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

    /// Waits, asking the handler again now and then, until it can take work.
    async fn wait_until_ready(
        &self,
        handler: &dyn EventHandler,
        mut wait: std::time::Duration,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.shared.stop.cancelled() => return,
                () = tokio::time::sleep(wait.max(PAUSE_RECHECK)) => {}
            }
            match handler.pause().await {
                Some(again) => wait = again,
                None => return,
            }
        }
    }

    /// Delivers messages of one work queue, up to `concurrency` at once, until
    /// `shutdown`, the bus stops, or the handler asks for a pause. An error when the
    /// channel or the link broke. Whatever way it ends, the channel is closed, which
    /// hands the prefetched, unacknowledged messages back to the queue.
    async fn consume_on(
        &self,
        link: &Link,
        queue: &QueueTopology,
        handler: &dyn EventHandler,
        shutdown: &CancellationToken,
        failures: &mut u32,
    ) -> Result<Stopped, BusError> {
        let concurrency = self.shared.policy.concurrency.max(1);
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        let result = async {
            // Declaring again is cheap and recreates a queue deleted under a live link.
            io(
                "declaring the queue",
                self.shared.topology.declare_queue(&channel, queue),
            )
            .await?;
            let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX).max(PREFETCH);
            io(
                "setting the prefetch",
                channel.basic_qos(prefetch, BasicQosOptions::default()),
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
            tracing::info!(queue = %queue.work, concurrency, "consuming");
            let mut in_flight = FuturesUnordered::new();
            let stopped = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break Ok(Stopped::Shutdown),
                    () = self.shared.stop.cancelled() => break Ok(Stopped::Shutdown),
                    Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                        let settled = match settled {
                            Ok(settled) => settled,
                            Err(error) => break Err(error),
                        };
                        // A message sent back because a dependency is down: stop
                        // taking more until it is back.
                        if let Outcome::Requeued = settled
                            && let Some(wait) = handler.pause().await
                        {
                            break Ok(Stopped::Paused(wait));
                        }
                        // Only a settled message proves the broker is healthy again: a
                        // message that cannot be settled must not come back in a tight loop.
                        *failures = 0;
                    }
                    next = consumer.next(), if in_flight.len() < concurrency => match next {
                        Some(Ok(delivery)) => {
                            in_flight.push(self.process(link, queue, handler, delivery));
                        }
                        Some(Err(error)) => break Err(unavailable(error)),
                        None => break Err(unavailable("the broker cancelled the consumer")),
                    },
                }
            };
            // Messages already being handled are let finish (each within the handler
            // timeout), not dropped halfway: a handler cancelled after its store write
            // would skip what follows it (the cache update, the `profile enriched` log)
            // and its redelivery then finds the write already done. Their settling may
            // fail on a broken channel; they come back and are recognised as repeats.
            while let Some(settled) = in_flight.next().await {
                if let Err(error) = settled {
                    tracing::debug!(%error, "an in-flight message was not settled");
                }
            }
            stopped
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
            otel.kind = "consumer",
            otel.name = %format!("process {}", queue.binding.queue),
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %queue.work,
            messaging.message.id = %incoming.envelope.id,
        );
        // The handling joins the trace of the request that emitted the event.
        crate::telemetry::set_parent_from(&span, &incoming.envelope.headers);
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
            Err(HandlerError::Unavailable(error)) => {
                // Not the message's fault: back to the queue, for when it is up again.
                io(
                    "requeueing the message",
                    delivery.nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    }),
                )
                .await?;
                tracing::info!(%error, "a dependency is down; message put back");
                return Ok(Outcome::Requeued);
            }
            Ok(()) => {
                ack(delivery).await?;
                tracing::debug!("message acknowledged");
                if let Some(subject) = envelope.subject().filter(|_| envelope.erases_subject()) {
                    // Best effort after the ack: a failure leaves dead letters that a
                    // replay of this event, or the next erasure, takes away.
                    match self.purge_dead_letters_of(link, queue, subject).await {
                        Ok(dead) => tracing::info!(dead, "subject erased from the dead letters"),
                        Err(error) => {
                            tracing::warn!(%error, "could not erase the subject's dead letters")
                        }
                    }
                }
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
}
