//! The AsyncAPI 3.0 document of the events (`/api-docs/asyncapi.json`): the exchange,
//! the routing keys, the headers and the payload schemas, the last taken from the
//! event types themselves so the document cannot drift from what is published.

use actix_web::{HttpResponse, http::header, web};
use serde_json::{Value, json};
use utoipa::PartialSchema;

use crate::bus::headers;
use crate::enrichment;
use crate::events::{
    EVENT_VERSION, REASON_REENRICH, USER_CREATED, USER_DELETED, USER_UPDATED, UserCreated,
    UserDeleted, UserUpdated,
};

/// Where the document is served.
pub const DOCUMENT_URL: &str = "/api-docs/asyncapi.json";

/// The topic exchange every event is published to (prefixed by `bus.prefix`).
const EXCHANGE: &str = "userhub.events";

fn schema_of<T: PartialSchema>() -> Value {
    serde_json::to_value(T::schema()).unwrap_or_default()
}

/// The headers every event carries, as a schema.
fn headers_schema() -> Value {
    json!({
        "type": "object",
        "required": [headers::EVENT_VERSION, headers::SUBJECT],
        "properties": {
            headers::EVENT_VERSION: {
                "type": "string",
                "enum": [EVENT_VERSION],
                "description": "Version of the payload's schema for its routing key; a \
                                breaking change publishes a new version beside the old"
            },
            headers::SUBJECT: {
                "type": "string",
                "format": "uuid",
                "description": "The user the event is about"
            },
            headers::REQUEST_ID: {
                "type": "string",
                "description": "X-Request-Id of the HTTP request that caused the event"
            },
            headers::TRACEPARENT: {
                "type": "string",
                "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                "description": "W3C trace context of the span that emitted the event"
            },
            headers::TRACESTATE: {
                "type": "string",
                "description": "W3C vendor trace state, when the trace carries one"
            },
            headers::ERASES_SUBJECT: {
                "type": "string",
                "enum": ["true"],
                "description": "On user.deleted: once a queue's consumer handled it, the \
                                bus drops that queue's dead letters of the subject"
            },
            headers::REASON: {
                "type": "string",
                "enum": [REASON_REENRICH],
                "description": "On a user.updated that republishes an unchanged user so \
                                consumers rebuild what they derive from it"
            }
        },
        "additionalProperties": { "type": "string" }
    })
}

fn message(routing_key: &str, title: &str, summary: &str, schema: &str) -> Value {
    json!({
        "name": routing_key,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "headers": { "$ref": "#/components/schemas/EventHeaders" },
        "payload": { "$ref": format!("#/components/schemas/{schema}") },
        "correlationId": { "location": format!("$message.header#/{}", headers::REQUEST_ID) },
        "bindings": {
            "amqp": {
                "messageType": routing_key,
                "bindingVersion": "0.3.0"
            }
        }
    })
}

/// The routing key of each message, for the operations' bindings.
const MESSAGES: [(&str, &str); 3] = [
    ("userCreated", USER_CREATED),
    ("userUpdated", USER_UPDATED),
    ("userDeleted", USER_DELETED),
];

/// The document, built once at start.
pub fn document() -> Value {
    let channel = |name: &str| json!({ "$ref": format!("#/channels/{name}") });
    let channel_message =
        |name: &str| json!({ "$ref": format!("#/channels/userEvents/messages/{name}") });
    let mut operations = serde_json::Map::new();
    for (name, routing_key) in MESSAGES {
        operations.insert(
            format!("publish{}{}", name[..1].to_uppercase(), &name[1..]),
            json!({
                "action": "send",
                "channel": channel("userEvents"),
                "messages": [channel_message(name)],
                "summary": format!("The users module publishes `{routing_key}` through its outbox, in the transaction of the change"),
                "bindings": {
                    "amqp": {
                        "cc": [routing_key],
                        "deliveryMode": 2,
                        "bindingVersion": "0.3.0"
                    }
                }
            }),
        );
    }
    operations.insert(
        "receiveUserEvents".into(),
        json!({
            "action": "receive",
            "channel": channel("enrichmentUsers"),
            "messages": MESSAGES.iter().map(|(name, _)| json!({
                "$ref": format!("#/channels/enrichmentUsers/messages/{name}")
            })).collect::<Vec<_>>(),
            "summary": "The enrichment module consumes every user event from one queue, \
                        applying each user's events in version order",
            "bindings": { "amqp": { "ack": true, "bindingVersion": "0.3.0" } }
        }),
    );
    let messages = json!({
        "userCreated": { "$ref": "#/components/messages/UserCreated" },
        "userUpdated": { "$ref": "#/components/messages/UserUpdated" },
        "userDeleted": { "$ref": "#/components/messages/UserDeleted" },
    });
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "userhub events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Events of the users module. Each is about one user (its \
                            `subject` header) and carries the user's `version`: 1 at \
                            creation, one more with each change; consumers apply a \
                            user's events in version order and ignore older ones. \
                            Delivery is at least once: consumers de-duplicate by the \
                            message id (a UUIDv7). With `bus.url = memory://` the same \
                            messages travel through a queue in the database."
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "rabbitmq:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The broker of bus.url; names are prefixed by bus.prefix"
            }
        },
        "channels": {
            "userEvents": {
                "address": EXCHANGE,
                "title": "User events",
                "description": "The topic exchange; the routing key is the event's name",
                "messages": messages,
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {
                            "name": EXCHANGE,
                            "type": "topic",
                            "durable": true,
                            "autoDelete": false,
                            "vhost": "/"
                        },
                        "bindingVersion": "0.3.0"
                    }
                }
            },
            "enrichmentUsers": {
                "address": enrichment::BINDING.queue,
                "title": "Enrichment's queue",
                "description": "A quorum queue bound to the three routing keys; retries \
                                wait in TTL queues and the given-up messages in its DLQ",
                "messages": messages,
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {
                            "name": enrichment::BINDING.queue,
                            "durable": true,
                            "exclusive": false,
                            "autoDelete": false,
                            "vhost": "/"
                        },
                        "bindingVersion": "0.3.0"
                    }
                }
            }
        },
        "operations": operations,
        "components": {
            "messages": {
                "UserCreated": message(USER_CREATED, "User created", "A user was registered", "UserCreated"),
                "UserUpdated": message(USER_UPDATED, "User updated", "A user's name or e-mail changed (or, with reason reenrich, it is republished unchanged)", "UserUpdated"),
                "UserDeleted": message(USER_DELETED, "User deleted", "A user was deleted; consumers erase what they hold about it", "UserDeleted"),
            },
            "schemas": {
                "EventHeaders": headers_schema(),
                "UserCreated": schema_of::<UserCreated>(),
                "UserUpdated": schema_of::<UserUpdated>(),
                "UserDeleted": schema_of::<UserDeleted>(),
            }
        }
    })
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    let document = web::Bytes::from(document().to_string());
    cfg.service(web::resource(DOCUMENT_URL).get(move || {
        let document = document.clone();
        async move {
            HttpResponse::Ok()
                .content_type(header::ContentType::json())
                .body(document)
        }
    }));
}
