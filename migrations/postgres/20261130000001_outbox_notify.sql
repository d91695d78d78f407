-- Every transaction that writes outbox rows wakes the relays LISTENing on
-- `userhub_outbox`, whichever code wrote them. NOTIFY is delivered at commit, and
-- identical notifications of one transaction are folded into one.
CREATE OR REPLACE FUNCTION userhub_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('userhub_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION userhub_outbox_notify();
