-- The in-process bus (bus.url = memory://): a durable queue in the database, so an
-- event the outbox handed over survives a crash or restart while it waits for a retry.
-- Column types mirror the SQLite schema so the adapter's SQL serves both.
CREATE TABLE bus_messages (
    queue            TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    routing_key      TEXT NOT NULL,
    payload          TEXT NOT NULL,
    headers          TEXT NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    -- Deliveries so far (failed ones, plus the one in progress while claimed).
    attempts         BIGINT NOT NULL DEFAULT 0,
    -- Unix milliseconds: when the message may next be delivered. A claim pushes it
    -- forward by the handler timeout, so a crashed worker's message comes back.
    available_at_ms  BIGINT NOT NULL,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    PRIMARY KEY (queue, message_id)
);

CREATE INDEX bus_messages_due ON bus_messages (queue, available_at_ms);

CREATE TRIGGER bus_messages_touch_updated_at BEFORE UPDATE ON bus_messages
FOR EACH ROW EXECUTE FUNCTION userhub_touch_updated_at();

-- Messages given up on, kept for inspection and replay.
CREATE TABLE dead_letters (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      TEXT NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    attempts     BIGINT NOT NULL,
    error        TEXT NOT NULL,
    replayed_at  TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp())
);

CREATE TRIGGER dead_letters_touch_updated_at BEFORE UPDATE ON dead_letters
FOR EACH ROW EXECUTE FUNCTION userhub_touch_updated_at();
