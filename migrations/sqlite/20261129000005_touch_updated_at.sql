-- updated_at is the database's job: touch it on every UPDATE that did not set it.
CREATE TRIGGER outbox_touch_updated_at AFTER UPDATE ON outbox
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE outbox SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id;
END;

CREATE TRIGGER bus_messages_touch_updated_at AFTER UPDATE ON bus_messages
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE bus_messages SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE queue = NEW.queue AND message_id = NEW.message_id;
END;

CREATE TRIGGER dead_letters_touch_updated_at AFTER UPDATE ON dead_letters
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE dead_letters SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id;
END;

CREATE TRIGGER enriched_profiles_touch_updated_at AFTER UPDATE ON enriched_profiles
FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN
    UPDATE enriched_profiles SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE uuid = NEW.uuid;
END;
