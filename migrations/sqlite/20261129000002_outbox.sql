-- Transactional outbox: written in the same transaction as the change it announces,
-- relayed to the bus in `id` order, marked sent only after the bus accepted it.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    routing_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      TEXT NOT NULL,
    occurred_at  TEXT NOT NULL,
    sent_at      TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
