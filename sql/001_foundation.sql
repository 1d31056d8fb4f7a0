-- 001: the platform tables crm-bridge reads (only where absent), crm-bridge's own queue
-- tables, the fan-out triggers on crm_events and the config trigger on enterprises.
--
-- The platform owns enterprises, users, user_internal_phones, sessions and integration_logs:
-- in production they exist, and this file creates them only for standalone runs, demos and
-- tests. It alters nothing of theirs beyond adding enterprises.integrations_config where
-- missing and one index on enterprises(name2) (the fan-out trigger resolves every event's
-- Token through it). It never creates or touches the platform's call_events table.

-- ---------------------------------------------------------------- platform tables
CREATE TABLE IF NOT EXISTS enterprises (
    number              text PRIMARY KEY,
    name                text NOT NULL DEFAULT '',
    name2               text,
    secret              text,
    active              boolean NOT NULL DEFAULT true,
    integrations_config jsonb NOT NULL DEFAULT '{}'::jsonb
);
ALTER TABLE enterprises
    ADD COLUMN IF NOT EXISTS integrations_config jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX IF NOT EXISTS crm_enterprises_name2_idx ON enterprises (name2);

CREATE TABLE IF NOT EXISTS users (
    id          serial PRIMARY KEY,
    first_name  text,
    last_name   text
);

CREATE TABLE IF NOT EXISTS user_internal_phones (
    id                serial PRIMARY KEY,
    enterprise_number text NOT NULL,
    phone_number      text NOT NULL,
    user_id           integer
);

CREATE TABLE IF NOT EXISTS sessions (
    session_token     text PRIMARY KEY,
    enterprise_number text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS integration_logs (
    id                bigserial PRIMARY KEY,
    enterprise_number text NOT NULL,
    integration_type  text NOT NULL,
    event_type        text,
    request_data      jsonb,
    response_data     jsonb,
    status            text NOT NULL,
    error_message     text,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- crm-bridge's own tables

-- The integrations crm-bridge serves, registered by each daemon at start-up, with the event
-- types its adapter acts on. The fan-out creates deliveries only for these.
CREATE TABLE crm_integrations (
    integration_type text PRIMARY KEY,
    event_types      text[] NOT NULL,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per call event, the body exactly as received. The call services' contract is
-- documented in docs/events.md. dedup_key lets a call hold several distinct dials or
-- bridges (transfers, follow-me) while a retried insert of the same body stays a no-op.
CREATE TABLE crm_events (
    id                bigserial PRIMARY KEY,
    enterprise_number text NOT NULL,
    event_type        text NOT NULL,
    unique_id         text NOT NULL,
    payload           jsonb NOT NULL,
    record_url        text,
    origin            text NOT NULL DEFAULT 'live',
    received_at       timestamptz NOT NULL DEFAULT now(),
    dedup_key         text NOT NULL DEFAULT '',
    CONSTRAINT crm_events_origin_check CHECK (origin IN ('live', 'download')),
    CONSTRAINT crm_events_once UNIQUE (enterprise_number, unique_id, event_type, dedup_key)
);
CREATE INDEX crm_events_received_idx ON crm_events (received_at);

-- One row per (event, integration): the durable queue. enterprise_number and unique_id are
-- copied from the event so the claim query's per-call order needs no join.
CREATE TABLE crm_deliveries (
    event_id          bigint NOT NULL REFERENCES crm_events (id) ON DELETE CASCADE,
    integration_type  text NOT NULL,
    enterprise_number text NOT NULL,
    unique_id         text NOT NULL,
    status            text NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    queued_at         timestamptz NOT NULL DEFAULT now(),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    locked_until      timestamptz,
    locked_by         text,
    last_error        text,
    delivered_at      timestamptz,
    PRIMARY KEY (event_id, integration_type),
    CONSTRAINT crm_deliveries_status_check
        CHECK (status IN ('pending', 'done', 'failed', 'skipped'))
);
-- The claim: due pending deliveries of one integration, oldest first.
CREATE INDEX crm_deliveries_due_idx ON crm_deliveries (integration_type, next_attempt_at, event_id)
    WHERE status = 'pending';
-- Per-call order: "is an earlier delivery of this call still pending?"
CREATE INDEX crm_deliveries_call_idx
    ON crm_deliveries (integration_type, enterprise_number, unique_id, event_id)
    WHERE status = 'pending';
-- Operations and the admin UI: failed deliveries by enterprise.
CREATE INDEX crm_deliveries_failed_idx ON crm_deliveries (enterprise_number, integration_type)
    WHERE status = 'failed';

-- The doorbell's memory: when crm_events was last rung. One row; the fan-out trigger rings
-- at most once per 100 ms (DOORBELL_WINDOW_S in daemon/dispatcher.py must match).
CREATE TABLE crm_doorbell (
    channel text PRIMARY KEY,
    rang_at timestamptz NOT NULL
);
INSERT INTO crm_doorbell (channel, rang_at) VALUES ('crm_events', '-infinity');

-- ---------------------------------------------------------------- fan-out triggers

-- BEFORE INSERT: drop what nobody will deliver, fill what the row can be derived with.
-- Resolves the enterprise from the row or from the body's Token (= enterprises.name2, or
-- the enterprise number itself); drops the row (RETURN NULL: the insert reports 0 rows, no
-- error) when the type is not one crm-bridge stores, the enterprise is unknown or inactive,
-- or no integration that crm-bridge serves is enabled for it.
CREATE FUNCTION crm_events_admit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_config jsonb;
BEGIN
    IF NEW.event_type NOT IN ('start', 'dial', 'bridge', 'hangup', 'download') THEN
        RETURN NULL;
    END IF;
    IF NEW.enterprise_number IS NULL THEN
        SELECT e.number, e.integrations_config INTO NEW.enterprise_number, v_config
          FROM enterprises e
         WHERE e.name2 = NEW.payload ->> 'Token' AND e.active
         LIMIT 1;
        IF NEW.enterprise_number IS NULL THEN
            SELECT e.number, e.integrations_config INTO NEW.enterprise_number, v_config
              FROM enterprises e
             WHERE e.number = NEW.payload ->> 'Token' AND e.active;
        END IF;
    ELSE
        SELECT e.integrations_config INTO v_config
          FROM enterprises e
         WHERE e.number = NEW.enterprise_number AND e.active;
    END IF;
    IF v_config IS NULL OR NOT EXISTS (
        SELECT 1 FROM crm_integrations i
         WHERE v_config -> i.integration_type -> 'enabled' = 'true'::jsonb
    ) THEN
        RETURN NULL;
    END IF;
    NEW.unique_id := coalesce(NEW.unique_id, NEW.payload ->> 'UniqueId');
    IF NEW.unique_id IS NULL OR NEW.unique_id = '' THEN
        RAISE EXCEPTION 'crm_events: the body has no UniqueId and unique_id is not set'
            USING ERRCODE = 'not_null_violation', COLUMN = 'unique_id';
    END IF;
    IF NEW.event_type = 'download' THEN
        NEW.origin := 'download';
    END IF;
    -- A call may have several dials and bridges; only an identical body is the same event.
    IF NEW.event_type IN ('dial', 'bridge') THEN
        NEW.dedup_key := md5(NEW.payload::text);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER crm_events_admit
    BEFORE INSERT ON crm_events
    FOR EACH ROW EXECUTE FUNCTION crm_events_admit();

-- AFTER INSERT: one delivery per integration that is enabled for the enterprise and acts on
-- this event type, then ring the doorbell — at most once per 100 ms across all writers. A
-- writer that finds the doorbell just rung (or being rung by another open transaction) stays
-- silent: the dispatcher looks once more when the window has passed, and polls anyway.
CREATE FUNCTION crm_events_fan_out() RETURNS trigger
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
           AND rang_at < clock_timestamp() - interval '100 milliseconds'
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE crm_doorbell SET rang_at = clock_timestamp() WHERE channel = 'crm_events';
            PERFORM pg_notify('crm_events', '');
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER crm_events_fan_out
    AFTER INSERT ON crm_events
    FOR EACH ROW EXECUTE FUNCTION crm_events_fan_out();

-- ---------------------------------------------------------------- config trigger

-- NOTIFY crm_config {"enterprise": "...", "keys": [integration keys that changed],
-- "fields": [other columns that matter: name2, active]} when an enterprise's configuration,
-- Token or activity changes, or the enterprise appears or goes. Other columns are silent.
CREATE FUNCTION crm_enterprises_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old    jsonb := CASE WHEN TG_OP = 'INSERT' THEN '{}'::jsonb ELSE OLD.integrations_config END;
    v_new    jsonb := CASE WHEN TG_OP = 'DELETE' THEN '{}'::jsonb ELSE NEW.integrations_config END;
    v_number text  := CASE WHEN TG_OP = 'DELETE' THEN OLD.number ELSE NEW.number END;
    v_keys   text[];
    v_fields text[] := '{}';
BEGIN
    SELECT coalesce(array_agg(k ORDER BY k), '{}') INTO v_keys
      FROM (SELECT jsonb_object_keys(coalesce(v_old, '{}'::jsonb))
            UNION
            SELECT jsonb_object_keys(coalesce(v_new, '{}'::jsonb))) AS s(k)
     WHERE v_old -> k IS DISTINCT FROM v_new -> k;
    IF TG_OP = 'UPDATE' THEN
        IF OLD.name2 IS DISTINCT FROM NEW.name2 THEN v_fields := array_append(v_fields, 'name2'); END IF;
        IF OLD.active IS DISTINCT FROM NEW.active THEN v_fields := array_append(v_fields, 'active'); END IF;
        IF cardinality(v_keys) = 0 AND cardinality(v_fields) = 0 THEN
            RETURN NULL;
        END IF;
    ELSE
        v_fields := ARRAY[lower(TG_OP)];
    END IF;
    PERFORM pg_notify('crm_config', json_build_object(
        'enterprise', v_number, 'keys', v_keys, 'fields', v_fields)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER crm_enterprises_notify
    AFTER INSERT OR DELETE OR UPDATE OF integrations_config, name2, active ON enterprises
    FOR EACH ROW EXECUTE FUNCTION crm_enterprises_notify();
