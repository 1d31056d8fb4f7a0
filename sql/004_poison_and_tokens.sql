-- 004: no row can stop delivery; one rule names an event's enterprise.
--
-- 1. crm_deliveries.lease_expiries counts the times a delivery's lease expired without an
--    outcome (its holder crashed, hung, or lost the database for longer than the lease).
--    The claim statement (daemon/store.py CLAIM) dead-letters a delivery as 'poison' when
--    the count reaches CRM_BRIDGE_MAX_LEASE_EXPIRIES: a row that kills whatever process
--    attempts it cannot do so forever.
--
-- 2. The Token rule (docs/events.md), the same in this trigger, in the HTTP ingest and in
--    the daemons' in-memory index: the body's Token names the enterprise whose name2 it is,
--    else whose secret it is, else whose number it is — counting active enterprises only.
--    A Token that names more than one active enterprise at the first level that matches is
--    ambiguous: the insert fails with an error saying so, and nothing is stored.
--
-- 3. The config trigger also reports changes of secret and number (both name an enterprise
--    now), and a renumbered enterprise under its old number too, so every daemon's index
--    forgets it there at once.
--
-- Beyond 001's index on enterprises(name2), this adds one on enterprises(secret): without
-- it every event whose Token is not a name2 would scan the table.

ALTER TABLE crm_deliveries ADD COLUMN lease_expiries integer NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS crm_enterprises_secret_idx ON enterprises (secret);

-- As in 001, with the Token rule above. The error names the ambiguity and the enterprises;
-- it quotes the Token only when it is a name2 (a Token matching secrets may be a secret).
CREATE OR REPLACE FUNCTION crm_events_admit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_token  text;
    v_found  text[];
    v_level  text := 'name2';
    v_config jsonb;
BEGIN
    IF NEW.event_type NOT IN ('start', 'dial', 'bridge', 'hangup', 'download') THEN
        RETURN NULL;
    END IF;
    IF NEW.enterprise_number IS NULL THEN
        v_token := nullif(NEW.payload ->> 'Token', '');
        SELECT array_agg(e.number ORDER BY e.number),
               (array_agg(e.integrations_config ORDER BY e.number))[1]
          INTO v_found, v_config
          FROM enterprises e WHERE e.active AND e.name2 = v_token;
        IF v_found IS NULL THEN
            v_level := 'secret';
            SELECT array_agg(e.number ORDER BY e.number),
                   (array_agg(e.integrations_config ORDER BY e.number))[1]
              INTO v_found, v_config
              FROM enterprises e WHERE e.active AND e.secret = v_token;
        END IF;
        IF v_found IS NULL THEN
            v_level := 'number';
            SELECT ARRAY[e.number], e.integrations_config INTO v_found, v_config
              FROM enterprises e WHERE e.active AND e.number = v_token;
        END IF;
        IF cardinality(v_found) > 1 THEN
            RAISE EXCEPTION 'crm_events: the Token % is ambiguous: it is the % of % active enterprises (%)',
                  CASE WHEN v_level = 'name2' THEN quote_literal(v_token) ELSE '(not shown)' END,
                  v_level, cardinality(v_found), array_to_string(v_found, ', ')
                USING ERRCODE = 'cardinality_violation', COLUMN = 'payload',
                      HINT = 'Each active enterprise needs a Token of its own; nothing was stored.';
        END IF;
        NEW.enterprise_number := v_found[1];
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

-- As in 001, reporting secret and number too; a renumbering notifies the old number as
-- well (fields ["number"]): the daemons reload it, find nothing, and drop it.
CREATE OR REPLACE FUNCTION crm_enterprises_notify() RETURNS trigger
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
        IF OLD.secret IS DISTINCT FROM NEW.secret THEN v_fields := array_append(v_fields, 'secret'); END IF;
        IF OLD.number IS DISTINCT FROM NEW.number THEN
            v_fields := array_append(v_fields, 'number');
            PERFORM pg_notify('crm_config', json_build_object(
                'enterprise', OLD.number, 'keys', v_keys, 'fields', ARRAY['number'])::text);
        END IF;
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

DROP TRIGGER crm_enterprises_notify ON enterprises;
CREATE TRIGGER crm_enterprises_notify
    AFTER INSERT OR DELETE OR UPDATE OF integrations_config, name2, secret, number, active
    ON enterprises
    FOR EACH ROW EXECUTE FUNCTION crm_enterprises_notify();
