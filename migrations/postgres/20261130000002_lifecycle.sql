-- The user lifecycle: versions for ordering, subjects for erasure, idempotent creates.

-- 1 at creation, +1 on every change (and on deletion): events carry it, so a consumer
-- applies a user's events in order and ignores stale ones.
ALTER TABLE users ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- The user each event is about, so erasing a user can find its events. Text, like
-- the message ids of the bus tables, so one SQL text serves both dialects.
-- Existing rows get it from their payload (a regular expression rather than a JSON
-- cast: a dead letter's payload may not even be JSON).
ALTER TABLE outbox ADD COLUMN subject TEXT;
UPDATE outbox SET subject = substring(payload from '"uuid"\s*:\s*"([0-9a-fA-F-]{36})"');
CREATE INDEX outbox_subject ON outbox (subject);

ALTER TABLE bus_messages ADD COLUMN subject TEXT;
UPDATE bus_messages SET subject = substring(payload from '"uuid"\s*:\s*"([0-9a-fA-F-]{36})"');
CREATE INDEX bus_messages_subject ON bus_messages (subject);

ALTER TABLE dead_letters ADD COLUMN subject TEXT;
UPDATE dead_letters SET subject = substring(payload from '"uuid"\s*:\s*"([0-9a-fA-F-]{36})"');
CREATE INDEX dead_letters_subject ON dead_letters (subject);

-- The enrichment queue now takes every user event (created, updated, deleted), so
-- that one user's events wait in one queue.
UPDATE bus_messages SET queue = 'enrichment.users' WHERE queue = 'enrichment.user-created';
UPDATE dead_letters SET queue = 'enrichment.users' WHERE queue = 'enrichment.user-created';

-- Idempotency-Key on POST /api/users: the first response of each (caller, key), kept
-- for 24 hours, with a fingerprint of the request it answered.
CREATE TABLE idempotency_keys (
    scope            TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    -- The user the request created (erased with it) and the response, as JSON.
    subject          TEXT NOT NULL,
    response         TEXT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_subject ON idempotency_keys (subject);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);

CREATE TRIGGER idempotency_keys_touch_updated_at BEFORE UPDATE ON idempotency_keys
FOR EACH ROW EXECUTE FUNCTION userhub_touch_updated_at();

-- `q` is a substring of the lower-cased name or e-mail (LIKE '%…%'): trigram indexes
-- answer it without scanning the table.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX users_name_key_trgm ON users USING gin (name_key gin_trgm_ops);
CREATE INDEX users_email_key_trgm ON users USING gin (email_key gin_trgm_ops);
