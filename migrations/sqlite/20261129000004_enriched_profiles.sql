-- Enrichment module's profile store (documents.url = sqlite://…): one row per user.
CREATE TABLE enriched_profiles (
    uuid             TEXT PRIMARY KEY NOT NULL,
    name             TEXT NOT NULL,
    email            TEXT NOT NULL,
    linkedin         TEXT,
    github           TEXT,
    -- 'completed' or 'failed' (no row yet means pending).
    status           TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    error            TEXT,
    source_event_id  TEXT NOT NULL,
    enriched_at      TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
