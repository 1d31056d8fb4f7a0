-- 007: the admin UI — its sessions, and the indexes its journal pages read through.
--
-- An admin link (a signed, expiring JWT) is exchanged for a session of our own: the browser
-- keeps a random session id in an HttpOnly cookie, the database keeps only its SHA-256, so
-- a copy of this table opens nothing. A session belongs to one enterprise and one
-- integration and remembers the integration's token_version when it was made: bumping
-- token_version (deleting the integration does) revokes every session at once, like every
-- link. Expired rows are removed by the daemon's purger.
--
-- Indexes: the journal lists one enterprise's deliveries newest first, a page at a time by
-- keyset (event_id below the last one shown), and shows each delivery's attempts from
-- integration_logs. integration_logs is the platform's table: these two indexes are the only
-- change crm-bridge makes to it (created only where missing). On a large existing table,
-- create them beforehand with CREATE INDEX CONCURRENTLY under the same names.

CREATE TABLE crm_admin_sessions (
    id_hash           bytea PRIMARY KEY,
    enterprise_number text NOT NULL,
    integration_type  text NOT NULL,
    token_version     integer NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL
);
CREATE INDEX crm_admin_sessions_expires_idx ON crm_admin_sessions (expires_at);

-- The journal's first page and every next one: an index range scan, never an OFFSET.
CREATE INDEX crm_deliveries_journal_idx
    ON crm_deliveries (enterprise_number, integration_type, event_id);

-- A delivery's attempts (the dispatcher writes its event_id into request_data).
CREATE INDEX IF NOT EXISTS crm_integration_logs_event_idx
    ON integration_logs (enterprise_number, integration_type, ((request_data ->> 'event_id')))
    WHERE request_data ? 'event_id';

-- Diagnostics: the last success and the last error of an enterprise.
CREATE INDEX IF NOT EXISTS crm_integration_logs_status_idx
    ON integration_logs (enterprise_number, integration_type, status, id);
