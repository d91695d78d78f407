//! The broker topology of the bus: the events exchange, one quorum work queue per
//! binding, its retry queues (one per backoff step) and its dead-letter queue, all
//! declared idempotently.

use std::collections::{BTreeMap, BTreeSet};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use super::codec::string_value;
use super::millis;
use crate::bus::{Binding, DeliveryPolicy};

/// Names of everything declared for one binding.
#[derive(Debug, Clone)]
pub(super) struct QueueTopology {
    pub(super) binding: Binding,
    pub(super) routing_keys: Vec<ShortString>,
    pub(super) work: ShortString,
    pub(super) dlq: ShortString,
    /// Retry queue per TTL in milliseconds.
    pub(super) retries: BTreeMap<u64, ShortString>,
}

/// Every name the adapter declares, validated once at construction.
#[derive(Debug, Clone)]
pub(super) struct Topology {
    pub(super) exchange: ShortString,
    pub(super) dlx: ShortString,
    pub(super) queues: Vec<QueueTopology>,
    /// `x-delivery-limit` of the work queues (see [`DeliveryPolicy::delivery_limit`]).
    delivery_limit: u32,
    /// `x-message-ttl` of the DLQs (see [`DeliveryPolicy::dead_letter_ttl`]).
    dead_letter_ttl: u64,
}

pub(super) fn name(text: String) -> anyhow::Result<ShortString> {
    ShortString::try_new(text).map_err(|e| anyhow::anyhow!("RabbitMQ name too long: {e}"))
}

impl Topology {
    pub(super) fn new(
        prefix: &str,
        bindings: &[Binding],
        policy: &DeliveryPolicy,
    ) -> anyhow::Result<Self> {
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
                routing_keys: binding
                    .routing_keys
                    .iter()
                    .map(|key| name((*key).to_owned()))
                    .collect::<anyhow::Result<_>>()?,
                dlq: name(format!("{work}.dlq"))?,
                work: name(work)?,
                retries,
            });
        }
        Ok(Self {
            exchange: name(format!("{prefix}userhub.events"))?,
            dlx: name(format!("{prefix}userhub.dlx"))?,
            queues,
            delivery_limit: policy.delivery_limit.max(1),
            dead_letter_ttl: millis(policy.dead_letter_ttl).max(1),
        })
    }

    pub(super) fn queue(&self, binding: &Binding) -> Option<&QueueTopology> {
        self.queues.iter().find(|q| q.binding == *binding)
    }

    /// One entry per distinct work queue (a queue may be bound to several keys).
    pub(super) fn distinct_queues(&self) -> impl Iterator<Item = &QueueTopology> {
        let mut seen = BTreeSet::new();
        self.queues
            .iter()
            .filter(move |q| seen.insert(q.work.clone()))
    }

    /// Declares everything; each declaration is idempotent.
    pub(super) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
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

    pub(super) async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &QueueTopology,
    ) -> lapin::Result<()> {
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
        // A message that keeps coming back without being settled (it crashes the
        // consumer, say) is dead-lettered by the broker after this many deliveries,
        // instead of looping forever. At-least-once dead-lettering: the broker keeps
        // the message until the DLQ has confirmed it, which requires `reject-publish`.
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        work_args.insert(
            "x-dead-letter-strategy".into(),
            string_value("at-least-once"),
        );
        work_args.insert("x-overflow".into(), string_value("reject-publish"));
        channel
            .queue_declare(queue.work.clone(), durable, work_args)
            .await?;
        for routing_key in &queue.routing_keys {
            channel
                .queue_bind(
                    queue.work.clone(),
                    self.exchange.clone(),
                    routing_key.clone(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
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
        // Dead letters hold personal data: they are kept as long as the retention says,
        // like the database bus's, then dropped.
        dlq_args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(self.dead_letter_ttl).unwrap_or(i64::MAX)),
        );
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::resilience::Backoff;

    fn policy(max_attempts: u32) -> DeliveryPolicy {
        DeliveryPolicy {
            max_attempts,
            backoff: Backoff::new(Duration::from_millis(1000), Duration::from_millis(5000)),
            handler_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            concurrency: 1,
            delivery_limit: 20,
            dead_letter_ttl: Duration::from_secs(3600),
        }
    }

    const BINDING: Binding = Binding {
        queue: "enrichment.user-created",
        routing_keys: &["user.created", "user.updated"],
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
}
