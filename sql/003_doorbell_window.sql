-- 003: the doorbell window, shorter and kept in one place.
--
-- 001 rang NOTIFY crm_events at most once per 100 ms. An event committed inside that window
-- rang nothing and waited for the dispatcher's second look, 100 ms and more later: at 20
-- events/s, half the events took 50–80 ms to reach the CRM (docs/benchmarks.md). At most
-- one ring per 5 ms (≤ 200 NOTIFY/s, however many writers) still spares the server's
-- NOTIFY queue lock under a burst, and bounds that wait at a few milliseconds.
--
-- The window lives in the doorbell's own row: the trigger reads it on every insert, each
-- dispatcher reads it at start to time its second look. Changing it is an UPDATE of
-- crm_doorbell.window_ms, then a restart of the daemons.

ALTER TABLE crm_doorbell
    ADD COLUMN window_ms integer NOT NULL DEFAULT 5,
    ADD CONSTRAINT crm_doorbell_window_check CHECK (window_ms BETWEEN 1 AND 1000);

-- As in 001, with the window read from the row.
CREATE OR REPLACE FUNCTION crm_events_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO crm_deliveries (event_id, integration_type, enterprise_number, unique_id)
    SELECT NEW.id, i.integration_type, NEW.enterprise_number, NEW.unique_id
      FROM crm_integrations i
      JOIN enterprises e ON e.number = NEW.enterprise_number
     WHERE e.integrations_config -> i.integration_type -> 'enabled' = 'true'::jsonb
       AND NEW.event_type = ANY (i.event_types);
    IF FOUND THEN
        PERFORM 1 FROM crm_doorbell
         WHERE channel = 'crm_events'
           AND rang_at < clock_timestamp() - window_ms * interval '1 millisecond'
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE crm_doorbell SET rang_at = clock_timestamp() WHERE channel = 'crm_events';
            PERFORM pg_notify('crm_events', '');
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
