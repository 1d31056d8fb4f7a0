"""Prometheus collectors, one registry per Runtime (tests build several apps in one process).

Names follow ``crm_bridge_<what>_<unit>``; counters end in ``_total``. Label values are
bounded: outcomes, reasons, states and enterprise numbers (an operator's platform has
thousands of enterprises at most, and the per-enterprise series are the ones alerts need).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TELEPHONY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0,
                      5.0)
_ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """Every collector of the process, registered in its own ``CollectorRegistry``."""

    def __init__(self, integration: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Not "instance": Prometheus sets that label on every scraped series itself (ours would
        # become "exported_instance"); the host name, unlike host-pid, survives a restart.
        self.info = Gauge(
            "crm_bridge_info", "Constant 1, labelled with what this process runs and where.",
            ["integration", "version", "host"], registry=r,
        )
        # --- the database
        self.database_up = Gauge(
            "crm_bridge_database_up",
            "1 while the database answers this process's loops, 0 during an outage.",
            registry=r,
        )
        self.database_outages = Counter(
            "crm_bridge_database_outages_total",
            "Times the database became unavailable to this process.", registry=r,
        )
        # --- listener
        self.listener_connected = Gauge(
            "crm_bridge_listener_connected", "1 while the LISTEN connection is up.", registry=r
        )
        self.listener_reconnects = Counter(
            "crm_bridge_listener_reconnects_total", "LISTEN connection (re)connects after a loss.",
            registry=r,
        )
        self.notifications = Counter(
            "crm_bridge_notifications_total", "Notifications received, by channel.",
            ["channel"], registry=r,
        )
        self.notifications_dropped = Counter(
            "crm_bridge_notifications_dropped_total", "Malformed notification payloads dropped.",
            ["channel"], registry=r,
        )
        self.notification_queue_usage = Gauge(
            "crm_bridge_notification_queue_usage_ratio",
            "pg_notification_queue_usage(): fraction of the server's NOTIFY queue in use.",
            registry=r,
        )
        # --- config cache
        self.cache_hits = Counter(
            "crm_bridge_config_cache_hits_total", "Config cache lookups answered from memory.",
            registry=r,
        )
        self.cache_misses = Counter(
            "crm_bridge_config_cache_misses_total", "Config cache lookups with no entry.",
            registry=r,
        )
        self.cache_loads = Counter(
            "crm_bridge_config_loads_total", "Config loads, by reason.", ["reason"], registry=r
        )
        self.cache_load_seconds = Histogram(
            "crm_bridge_config_load_seconds", "Duration of config loads, by scope.",
            ["scope"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.cache_entries = Gauge(
            "crm_bridge_config_entries", "Enterprises in the config cache.", registry=r
        )
        self.cache_load_failures = Counter(
            "crm_bridge_config_load_failures_total",
            "Config loads that failed (the database did not answer), by scope.",
            ["scope"], registry=r,
        )
        self.cache_invalid = Gauge(
            "crm_bridge_config_invalid_entries",
            "Enterprises whose configuration of this integration failed validation.", registry=r,
        )
        self.ambiguous_tokens = Gauge(
            "crm_bridge_ambiguous_tokens",
            "Tokens naming more than one active enterprise (their events are refused).",
            registry=r,
        )
        # --- delivery pipeline
        self.deliveries = Counter(
            "crm_bridge_deliveries_total", "Delivery attempts settled, by outcome.",
            ["outcome"], registry=r,
        )
        self.deliveries_rejected = Counter(
            "crm_bridge_deliveries_rejected_total",
            "Deliveries dead-lettered without an attempt, by reason: malformed (the row "
            "cannot be read), poison (its lease expired too often without an outcome), "
            "attempts (used up).", ["reason"], registry=r,
        )
        self.attempt_seconds = Histogram(
            "crm_bridge_attempt_seconds", "Duration of delivery attempts.",
            buckets=_ATTEMPT_BUCKETS, registry=r,
        )
        self.retries = Counter(
            "crm_bridge_retries_scheduled_total", "Deliveries rescheduled, by reason.",
            ["reason"], registry=r,
        )
        self.leases_reclaimed = Counter(
            "crm_bridge_leases_reclaimed_total",
            "Deliveries claimed after another holder's lease expired.", registry=r,
        )
        self.acks_lost = Counter(
            "crm_bridge_acks_fenced_total",
            "Outcomes dropped because this instance no longer held the lease.", registry=r,
        )
        self.claims = Counter(
            "crm_bridge_claims_total", "Claim queries run by the dispatcher.", registry=r
        )
        self.claim_seconds = Histogram(
            "crm_bridge_claim_seconds", "Duration of claim queries.", buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "crm_bridge_deliveries_in_flight", "Deliveries claimed and not yet settled.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "crm_bridge_queue_depth", "Pending deliveries of this integration.", registry=r
        )
        self.oldest_due_seconds = Gauge(
            "crm_bridge_queue_oldest_due_seconds",
            "Age of the oldest due pending delivery (0 when none is due).", registry=r,
        )
        self.failed_total = Gauge(
            "crm_bridge_deliveries_failed", "Failed (dead-lettered) deliveries kept.", registry=r
        )
        self.log_rows = Counter(
            "crm_bridge_log_rows_total", "integration_logs rows written.", registry=r
        )
        self.log_flushes = Counter(
            "crm_bridge_log_flushes_total", "Batched writes of outcomes and log rows.", registry=r
        )
        self.http_cut = Counter(
            "crm_bridge_http_connections_cut_total",
            "HTTP connections closed by the server: a request head or body too slow "
            "(header, body), or the connection cap reached (capacity).", ["reason"],
            registry=r,
        )
        self.bug_errors = Counter(
            "crm_bridge_adapter_bugs_total",
            "Unexpected exceptions escaping an adapter (each one is a bug).", registry=r,
        )
        self.purged = Counter(
            "crm_bridge_events_purged_total", "Events removed by retention.", registry=r
        )
        # --- guards
        self.breaker_state = Gauge(
            "crm_bridge_breaker_state",
            "Circuit breaker per enterprise while not closed: 1 half-open, 2 open "
            "(a closed breaker has no series).",
            ["enterprise"], registry=r,
        )
        self.rate_limited_waits = Counter(
            "crm_bridge_rate_limited_waits_total",
            "Requests that waited for the per-enterprise token bucket.", registry=r,
        )
        self.rate_limited_rejects = Counter(
            "crm_bridge_rate_limited_rejects_total",
            "Deliveries rescheduled because the token bucket would wait too long.", registry=r,
        )
        self.rate_factor = Gauge(
            "crm_bridge_rate_factor",
            "Share of its full request rate an enterprise runs at after the CRM asked to slow "
            "down (1: all of it).", ["enterprise"], registry=r,
        )
        # --- ownership
        self.owned_enterprises = Gauge(
            "crm_bridge_owned_enterprises",
            "Enterprises this instance serves (their ownership lease is held).", registry=r,
        )
        self.ownership_changes = Counter(
            "crm_bridge_ownership_changes_total",
            "Enterprises taken, handed over, or lost (lease lapsed) by this instance.",
            ["change"], registry=r,
        )
        self.ownership_renewals_failed = Counter(
            "crm_bridge_ownership_renewals_failed_total",
            "Heartbeats that could not renew this instance's ownership leases.", registry=r,
        )
        self.held_enterprises = Gauge(
            "crm_bridge_held_enterprises",
            "Enterprises whose deliveries wait, by reason.", ["reason"], registry=r,
        )
        # --- HTTP
        self.http_requests = Counter(
            "crm_bridge_http_requests_total", "HTTP requests served, by route and status.",
            ["route", "status"], registry=r,
        )
        self.http_seconds = Histogram(
            "crm_bridge_http_request_seconds", "HTTP request handling time, by route.",
            ["route"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.admin_sessions = Counter(
            "crm_bridge_admin_sessions_total",
            "Admin sign-ins by admin link or platform session, by result.", ["result"],
            registry=r,
        )
        self.journal_watchers = Gauge(
            "crm_bridge_journal_watchers", "Admin pages watching the live journal.",
            registry=r,
        )
        self.events_ingested = Counter(
            "crm_bridge_events_ingested_total", "Events received over HTTP, by result.",
            ["result"], registry=r,
        )
        # --- telephony: click-to-call, statuses, smart redirect, the PBX
        self.telephony_requests = Counter(
            "crm_bridge_telephony_requests_total",
            "Click-to-call, status, smart-redirect and customer-name requests, by route and "
            "outcome.", ["route", "outcome"], registry=r,
        )
        self.telephony_seconds = Histogram(
            "crm_bridge_telephony_request_seconds",
            "Time to answer those requests, by route.", ["route"],
            buckets=_TELEPHONY_BUCKETS, registry=r,
        )
        self.routing_lookups = Counter(
            "crm_bridge_routing_lookups_total",
            "Responsible-manager look-ups: answered from the cache (hit), started (miss), "
            "joined while running (joined), finished after their caller's deadline (late).",
            ["result"], registry=r,
        )
        self.pbx_requests = Counter(
            "crm_bridge_pbx_requests_total",
            "Requests to the platform's Asterisk service, by action and outcome "
            "(refused = never sent: a value failed validation).", ["action", "outcome"],
            registry=r,
        )
        self.pbx_seconds = Histogram(
            "crm_bridge_pbx_request_seconds", "Round trips to the Asterisk service.",
            ["action"], buckets=_TELEPHONY_BUCKETS, registry=r,
        )
        # --- the process
        self.loop_lag = Gauge(
            "crm_bridge_event_loop_lag_seconds",
            "How late the event loop ran a timer at the last look: time ready work waited.",
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "crm_bridge_event_loop_lag_seconds_observed", "Event loop lag, every look.",
            buckets=_FAST_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format of every collector, without ``_created`` series."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    """A view of a registry that leaves out the ``<counter|histogram>_created`` samples.

    They hold each series' creation time: Prometheus stores them as series of their own (one
    more per counter and histogram, for nothing an alert or a graph uses here).
    ``prometheus_client.disable_created_metrics()`` would drop them for every registry of
    the process at once (module state); this filter keeps the choice to our registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """The registry's families, each without its ``_created`` samples."""
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
