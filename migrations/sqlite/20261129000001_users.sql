-- Users. `uuid` is a UUIDv7 (time-ordered), so it is also the keyset for "newest first".
CREATE TABLE users (
    uuid        TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL,
    -- Lower-cased e-mail: the database, not a racy SELECT, enforces uniqueness.
    email_key   TEXT NOT NULL CONSTRAINT users_email_key UNIQUE,
    -- Lower-cased name for the `q` filter (SQLite's lower() only folds ASCII).
    name_key    TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TRIGGER users_touch_updated_at AFTER UPDATE ON users
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE users SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE uuid = NEW.uuid;
END;
