-- Keeps updated_at current on every UPDATE of a table that has one.
CREATE OR REPLACE FUNCTION userhub_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = date_trunc('milliseconds', clock_timestamp());
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- Users. `uuid` is a UUIDv7 (time-ordered), so it is also the keyset for "newest first".
CREATE TABLE users (
    uuid        UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL,
    -- Lower-cased e-mail: the database, not a racy SELECT, enforces uniqueness.
    email_key   TEXT NOT NULL CONSTRAINT users_email_key UNIQUE,
    -- Lower-cased name for the `q` filter.
    name_key    TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp())
);

CREATE TRIGGER users_touch_updated_at BEFORE UPDATE ON users
FOR EACH ROW EXECUTE FUNCTION userhub_touch_updated_at();
