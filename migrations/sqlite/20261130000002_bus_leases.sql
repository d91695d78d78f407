-- A fencing token per message of the in-process bus: every claim takes the next one,
-- and an acknowledgement, a retry or a dead-lettering applies only with the token of
-- the claim it settles. A worker whose lease ran out (and whose message another
-- worker now holds) can no longer settle it.
ALTER TABLE bus_messages ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
