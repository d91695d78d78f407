-- The in-process bus (bus.url = memory://): a durable queue, so an event the outbox
-- handed over survives a crash or restart while it waits for a retry.
CREATE TABLE bus_messages (
    queue            TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    routing_key      TEXT NOT NULL,
    payload          TEXT NOT NULL,
    headers          TEXT NOT NULL,
    occurred_at      TEXT NOT NULL,
    -- Deliveries so far (failed ones, plus the one in progress while claimed).
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- Unix milliseconds: when the message may next be delivered. A claim pushes it
    -- forward by the handler timeout, so a crashed worker's message comes back.
    available_at_ms  INTEGER NOT NULL,
    last_error       TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (queue, message_id)
);

CREATE INDEX bus_messages_due ON bus_messages (queue, available_at_ms);

-- Messages given up on: after max_attempts transient failures, or at once when they
-- cannot be processed at all. Kept for inspection and replay.
CREATE TABLE dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      TEXT NOT NULL,
    occurred_at  TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    error        TEXT NOT NULL,
    replayed_at  TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
