//! Dead letters on the broker: listing them from the DLQs without losing any, and
//! replaying one onto the work queue it failed on.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use uuid::Uuid;

use super::codec::{
    copy_headers, envelope_headers, header_text, header_u32, seconds, string_value, transport,
    without,
};
use super::link::{Link, ack, close_channel, io};
use super::topology::QueueTopology;
use super::{PERSISTENT, RabbitBus};
use crate::bus::{BusError, DeadLetter, QueueCounts, ReplayFilter, headers};

impl RabbitBus {
    /// Dead letters of every DLQ, oldest first, at most `limit`, after the one `after`.
    pub(super) async fn list_dead_letters(
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

    /// Replays the dead letter `id`; `Ok(false)` when no DLQ holds it.
    pub(super) async fn replay_dead_letter(&self, id: &str) -> Result<bool, BusError> {
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

    /// Replays every dead letter `filter` selects, in one walk over the DLQs (O(n));
    /// the others go back where they were when the walk ends.
    pub(super) async fn replay_dead_letters(&self, filter: &ReplayFilter) -> Result<u64, BusError> {
        let mut scan = self.scan_dead_letters().await?;
        let result = async {
            let mut replayed = 0;
            while let Some((queue, delivery)) = scan.next().await? {
                let letter = dead_letter(queue, &delivery);
                let selected = filter.queue.as_deref().is_none_or(|q| q == letter.queue)
                    && filter
                        .error_contains
                        .as_deref()
                        .is_none_or(|text| letter.error.contains(text));
                if selected {
                    self.replay_one(&scan.link, queue, &delivery, &letter)
                        .await?;
                    replayed += 1;
                }
            }
            Ok(replayed)
        }
        .await;
        scan.finish().await;
        tracing::info!(?filter, replayed = ?result.as_ref().ok(), "dead letters replayed");
        result
    }

    /// Drops the dead letters of `subject` from `queue`'s DLQ (see
    /// `headers::ERASES_SUBJECT`); the others go back where they were.
    pub(super) async fn purge_dead_letters_of(
        &self,
        link: &Link,
        queue: &QueueTopology,
        subject: &str,
    ) -> Result<u64, BusError> {
        let _turn = self.dlq_scans.lock().await;
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        let result = async {
            let mut dropped = 0;
            while let Some(message) = io(
                "reading the dead letters",
                channel.basic_get(queue.dlq.clone(), BasicGetOptions { no_ack: false }),
            )
            .await?
            {
                let delivery = message.delivery;
                let headers = delivery.properties.headers().as_ref();
                if header_text(headers, headers::SUBJECT).as_deref() == Some(subject) {
                    ack(&delivery).await?;
                    dropped += 1;
                }
            }
            Ok(dropped)
        }
        .await;
        close_channel(&channel).await;
        result
    }

    /// Puts a dead letter back onto the queue it failed on (not onto every binding of
    /// its routing key) as a fresh message: attempts and error are gone.
    pub(super) async fn replay_one(
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

    /// Messages of each work queue: ready in the work queue or waiting in its retry
    /// queues, and dead letters in its DLQ. One passive declare per queue, on a channel
    /// of its own (the broker closes a channel whose passive declare finds no queue; no
    /// other operation must pay for that). Unacknowledged deliveries are not counted.
    pub(super) async fn count_messages(&self) -> Result<Vec<QueueCounts>, BusError> {
        let link = self.shared.current()?;
        let channel = io("opening a channel", link.connection.create_channel()).await?;
        let length = async |name: &ShortString| -> Result<u64, BusError> {
            let declared = io(
                "counting messages",
                channel.queue_declare(
                    name.clone(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            Ok(u64::from(declared.message_count()))
        };
        let result = async {
            let mut counts = Vec::new();
            for queue in self.shared.topology.distinct_queues() {
                let mut waiting = length(&queue.work).await?;
                for retry in queue.retries.values() {
                    waiting += length(retry).await?;
                }
                counts.push(QueueCounts {
                    queue: queue.binding.queue.to_owned(),
                    waiting,
                    dead: length(&queue.dlq).await?,
                });
            }
            Ok(counts)
        }
        .await;
        close_channel(&channel).await;
        result
    }

    /// Starts a walk over the dead-letter queues on a channel of its own.
    pub(super) async fn scan_dead_letters(&self) -> Result<DeadLetterScan<'_>, BusError> {
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
pub(super) struct DeadLetterScan<'a> {
    pub(super) queues: Vec<&'a QueueTopology>,
    pub(super) next_queue: usize,
    pub(super) link: Arc<Link>,
    pub(super) channel: Channel,
}

impl<'a> DeadLetterScan<'a> {
    pub(super) async fn next(&mut self) -> Result<Option<(&'a QueueTopology, Delivery)>, BusError> {
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

    pub(super) async fn finish(self) {
        close_channel(&self.channel).await;
    }
}

pub(super) fn dead_letter(queue: &QueueTopology, delivery: &Delivery) -> DeadLetter {
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
            // Only a message the broker dead-lettered itself lacks it; the queue takes
            // several keys, so which one it had is unknown.
            .unwrap_or_default(),
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
