-- 002: holds — why an enterprise's deliveries of one integration must wait.
--
-- A hold stops the dispatchers from claiming that enterprise's deliveries (they stay
-- pending; nothing is lost or failed). Reasons: 'auth_failed' (the CRM rejected the
-- credentials; cleared automatically when that integration's configuration changes) and
-- 'deactivated' (the CRM switched the integration off or froze it; cleared when it is
-- switched back on). Every change NOTIFYs crm_config, so every instance reloads that
-- enterprise and learns of it within milliseconds.

CREATE TABLE crm_holds (
    enterprise_number text NOT NULL,
    integration_type  text NOT NULL,
    reason            text NOT NULL,
    detail            text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (enterprise_number, integration_type, reason),
    CONSTRAINT crm_holds_reason_check CHECK (reason IN ('auth_failed', 'deactivated'))
);

CREATE FUNCTION crm_holds_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_row crm_holds := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
    PERFORM pg_notify('crm_config', json_build_object(
        'enterprise', v_row.enterprise_number,
        'keys', json_build_array(v_row.integration_type),
        'fields', json_build_array('holds'))::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER crm_holds_notify
    AFTER INSERT OR UPDATE OR DELETE ON crm_holds
    FOR EACH ROW EXECUTE FUNCTION crm_holds_notify();

-- "Until its configuration changes": a change of an integration's key in
-- integrations_config lifts that integration's auth_failed hold, in the same transaction.
CREATE FUNCTION crm_enterprises_lift_auth_holds() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM crm_holds h
     WHERE h.enterprise_number = NEW.number
       AND h.reason = 'auth_failed'
       AND OLD.integrations_config -> h.integration_type
           IS DISTINCT FROM NEW.integrations_config -> h.integration_type;
    RETURN NULL;
END;
$$;

CREATE TRIGGER crm_enterprises_lift_auth_holds
    AFTER UPDATE OF integrations_config ON enterprises
    FOR EACH ROW
    WHEN (OLD.integrations_config IS DISTINCT FROM NEW.integrations_config)
    EXECUTE FUNCTION crm_enterprises_lift_auth_holds();
