//! Envelopes on the wire: how an envelope becomes AMQP properties and back, and the
//! transport headers (`x-…`) the adapter keeps beside the envelope's own.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use uuid::Uuid;

use super::PERSISTENT;
use crate::bus::{BusError, Envelope};

/// Transport headers. Everything starting with `x-` is kept out of envelope headers.
pub(super) mod transport {
    pub const ATTEMPTS: &str = "x-attempts";
    pub const ERROR: &str = "x-error";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    pub const ORIGINAL_QUEUE: &str = "x-original-queue";
    /// The envelope's `occurred_at` with milliseconds (the AMQP timestamp has seconds).
    pub const OCCURRED_AT: &str = "x-occurred-at";
    pub const DEAD_AT: &str = "x-dead-at";
    /// Set by a quorum queue on a redelivery: how many times it delivered the message
    /// before without a settlement.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Set by the broker when it dead-letters a message itself.
    pub const FIRST_DEATH_REASON: &str = "x-first-death-reason";
    /// Broker bookkeeping that must not travel with a republished copy.
    pub const BROKER_DEATH: [&str; 8] = [
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ];
}

pub(super) fn string_value(text: impl AsRef<str>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_ref()))
}

pub(super) fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(super) fn truncate(text: &str, max_bytes: usize) -> &str {
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
pub(super) fn envelope_properties(envelope: &Envelope) -> Result<BasicProperties, BusError> {
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
pub(super) fn copy_headers(properties: &BasicProperties) -> FieldTable {
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
pub(super) fn copy_properties(
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
pub(super) fn header_text(table: Option<&FieldTable>, key: &str) -> Option<String> {
    value_text(table?.inner().get(key)?)
}

pub(super) fn value_text(value: &AMQPValue) -> Option<String> {
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

pub(super) fn header_u32(table: Option<&FieldTable>, key: &str) -> Option<u32> {
    header_text(table, key)?.trim().parse().ok()
}

/// Envelope headers: every readable header outside the transport's `x-` space.
pub(super) fn envelope_headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
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

pub(super) fn occurred_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    let table = properties.headers().as_ref();
    header_text(table, transport::OCCURRED_AT)
        .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
        .map(|at| at.with_timezone(&Utc))
        .or_else(|| seconds(*properties.timestamp()))
}

pub(super) fn seconds(timestamp: Option<u64>) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(i64::try_from(timestamp?).ok()?, 0)
}

/// A delivery read back into an envelope, as far as it can be.
#[derive(Debug)]
pub(super) struct Incoming {
    /// Best effort when `problem` is set: a lossy payload, a fresh id if it had none.
    pub(super) envelope: Envelope,
    pub(super) attempt: u32,
    /// Why the message cannot be handed to a handler at all.
    pub(super) problem: Option<String>,
}

impl Incoming {
    pub(super) fn decode(routing_key: &str, properties: &BasicProperties, body: &[u8]) -> Self {
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
            // Ours count the retries; the broker's count its redeliveries (a consumer
            // that died holding the message): both were tries.
            attempt: header_u32(table, transport::ATTEMPTS)
                .unwrap_or(1)
                .max(1)
                .saturating_add(header_u32(table, transport::DELIVERY_COUNT).unwrap_or(0)),
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }
}

pub(super) fn without(table: FieldTable, key: &str) -> FieldTable {
    let mut map = table.inner().clone();
    map.remove(key);
    FieldTable::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::headers;

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
