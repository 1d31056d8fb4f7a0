-- 006: managers' availability, as their CRM reports it.
--
-- RetailCRM calls the module's changeUserStatusUrl whenever a manager changes status
-- (free, busy, dinner, break); crm-bridge keeps the latest word per manager here. The managers
-- list shows it, and smart redirect does not ring a manager who is away (unless the
-- enterprise says otherwise). The words themselves are the CRM's, checked by its adapter:
-- this table only keeps them short and plain.
--
-- Every change NOTIFYs crm_config for the enterprise (as crm_holds does, sql/002), so every
-- instance reloads it and stops using what it remembered of that enterprise's statuses.

CREATE TABLE crm_user_status (
    enterprise_number text NOT NULL,
    integration_type  text NOT NULL,
    user_id           text NOT NULL,
    status            text NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (enterprise_number, integration_type, user_id),
    CONSTRAINT crm_user_status_status_check CHECK (status ~ '^[a-z_]{1,32}$'),
    CONSTRAINT crm_user_status_user_check CHECK (length(user_id) BETWEEN 1 AND 64)
);

CREATE FUNCTION crm_user_status_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_row crm_user_status := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
    PERFORM pg_notify('crm_config', json_build_object(
        'enterprise', v_row.enterprise_number,
        'keys', json_build_array(v_row.integration_type),
        'fields', json_build_array('user_status'))::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER crm_user_status_notify
    AFTER INSERT OR UPDATE OR DELETE ON crm_user_status
    FOR EACH ROW EXECUTE FUNCTION crm_user_status_notify();
