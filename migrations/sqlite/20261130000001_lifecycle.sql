-- The user lifecycle: versions for ordering, subjects for erasure, idempotent creates.

-- 1 at creation, +1 on every change (and on deletion): events carry it, so a consumer
-- applies a user's events in order and ignores stale ones.
ALTER TABLE users ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

-- The user each event is about, so erasing a user can find its events.
ALTER TABLE outbox ADD COLUMN subject TEXT;
UPDATE outbox SET subject = json_extract(payload, '$.uuid') WHERE json_valid(payload);
CREATE INDEX outbox_subject ON outbox (subject);

ALTER TABLE bus_messages ADD COLUMN subject TEXT;
UPDATE bus_messages SET subject = json_extract(payload, '$.uuid') WHERE json_valid(payload);
CREATE INDEX bus_messages_subject ON bus_messages (subject);

ALTER TABLE dead_letters ADD COLUMN subject TEXT;
UPDATE dead_letters SET subject = json_extract(payload, '$.uuid') WHERE json_valid(payload);
CREATE INDEX dead_letters_subject ON dead_letters (subject);

-- The enrichment queue now takes every user event (created, updated, deleted), so
-- that one user's events wait in one queue.
UPDATE bus_messages SET queue = 'enrichment.users' WHERE queue = 'enrichment.user-created';
UPDATE dead_letters SET queue = 'enrichment.users' WHERE queue = 'enrichment.user-created';

-- Profiles: the version they were derived from, and 'deleted' tombstones that hold no
-- personal data but keep a late, stale event from bringing an erased user back.
-- (SQLite cannot change a CHECK constraint or a NOT NULL in place: rebuild the table.)
CREATE TABLE enriched_profiles_v2 (
    uuid             TEXT PRIMARY KEY NOT NULL,
    name             TEXT,
    email            TEXT,
    linkedin         TEXT,
    github           TEXT,
    -- 'completed', 'failed' or 'deleted' (no row yet means pending).
    status           TEXT NOT NULL CHECK (status IN ('completed', 'failed', 'deleted')),
    error            TEXT,
    source_event_id  TEXT NOT NULL,
    version          INTEGER NOT NULL DEFAULT 1,
    enriched_at      TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
INSERT INTO enriched_profiles_v2
       (uuid, name, email, linkedin, github, status, error, source_event_id, enriched_at,
        created_at, updated_at)
SELECT uuid, name, email, linkedin, github, status, error, source_event_id, enriched_at,
       created_at, updated_at
  FROM enriched_profiles;
DROP TABLE enriched_profiles;
ALTER TABLE enriched_profiles_v2 RENAME TO enriched_profiles;
CREATE TRIGGER enriched_profiles_touch_updated_at AFTER UPDATE ON enriched_profiles
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE enriched_profiles SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE uuid = NEW.uuid;
END;

-- Idempotency-Key on POST /api/users: the first response of each (caller, key), kept
-- for 24 hours, with a fingerprint of the request it answered.
CREATE TABLE idempotency_keys (
    scope            TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    -- The user the request created (erased with it) and the response, as JSON.
    subject          TEXT NOT NULL,
    response         TEXT NOT NULL,
    expires_at_ms    INTEGER NOT NULL,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_subject ON idempotency_keys (subject);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
