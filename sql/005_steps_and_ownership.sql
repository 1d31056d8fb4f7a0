-- 005: a delivery's steps, and which instance serves each enterprise.
--
-- Steps. One delivery may need several CRM requests (RetailCRM: a hangup's popup, then its
-- history upload). steps_done names those already done, written by the same statement that
-- settles an attempt, so a retry redoes only what failed: a failed upload never re-sends
-- the popup. The names belong to the adapter; the core only stores and hands them back.
--
-- Ownership. A CRM's rate limit counts per API key, i.e. per enterprise, for the whole
-- deployment; each instance can only count its own requests. So each enterprise's
-- deliveries are claimed by one live instance at a time: crm_owners holds that lease.
-- The claim statement takes a free enterprise (no row, or `until` passed) for the live
-- instance it hashes to (rendezvous hashing over crm_instances, so enterprises spread over
-- the instances alive); the owner renews its rows while it lives and hands one over by
-- setting owner '' with `until` a rate window ahead (nobody takes it before its last
-- requests have left the CRM's window). A dead instance's enterprises are free again when
-- their `until` passes.

ALTER TABLE crm_deliveries ADD COLUMN steps_done text[] NOT NULL DEFAULT '{}';

-- Instances alive, per integration: each one's heartbeat pushes alive_until forward.
CREATE TABLE crm_instances (
    integration_type text NOT NULL,
    instance_id      text NOT NULL,
    alive_until      timestamptz NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (integration_type, instance_id)
);

-- Which instance serves an enterprise's deliveries of one integration, until when.
-- owner '' = handed over: free once `until` has passed.
CREATE TABLE crm_owners (
    integration_type  text NOT NULL,
    enterprise_number text NOT NULL,
    owner             text NOT NULL,
    until             timestamptz NOT NULL,
    PRIMARY KEY (integration_type, enterprise_number)
);
CREATE INDEX crm_owners_owner_idx ON crm_owners (integration_type, owner);
