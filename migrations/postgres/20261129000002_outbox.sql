-- Transactional outbox: written in the same transaction as the change it announces,
-- relayed to the bus in `id` order (FOR UPDATE SKIP LOCKED lets several relays share
-- it), marked sent only after the bus accepted it.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     UUID NOT NULL UNIQUE,
    routing_key  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      TEXT NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    sent_at      TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp())
);

CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

CREATE TRIGGER outbox_touch_updated_at BEFORE UPDATE ON outbox
FOR EACH ROW EXECUTE FUNCTION userhub_touch_updated_at();
