"""The RetailCRM (Simla.com) adapter: the glue between the core and RetailCRM.

The pieces (mapping, client and glue kept apart): ``config`` (the stored settings),
``account`` (the settings as an admin edits them), ``events`` (pure mapping), ``client``
(the dumb HTTP client), ``module`` (the telephony module we register),
``extensions`` (managers ↔ internal numbers), ``http`` (RetailCRM's callbacks to us) and
``simulator`` (a strict stand-in for tests and demos). This file implements the core's
``Adapter`` protocol with them.

Delivery: each event is mapped with its call's stored events (never process memory) into a
``call/event`` and/or one ``calls/upload`` item, each a **step** of its own (``popup``,
``upload``): a retry redoes only the step that failed, so a failed upload never shows a
popup twice. A popup older than ``POPUP_MAX_AGE_S`` is worth nothing any more and is skipped
with a reason; an upload is retried as long as the retry policy allows. The upload of a
hangup (or download) waits the settle window (``upload_settle_s``, 3 s by default) after the
hangup was stored — the delivery is ``Deferred`` meanwhile, its popup sent at once — and
then folds every event of the call stored by then: a dial stored after its hangup still
names the manager. Hangups whose popup is done (or too old to show) and downloads of one
enterprise claimed together (a backlog) are delivered as one batch: their uploads in
requests of at most 50.

Upkeep: ``register``/``unregister``/``sync_extensions`` keep the module registered in
RetailCRM (``module.Registrar``); ``save_extensions`` stores an assignment set and syncs it;
the ``extensions-sync`` task (``tasks()``) re-syncs, every ``RECONCILE_INTERVAL_S`` ± 20 %,
the enterprises whose sync is pending or whose admin link is due for a refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from aiohttp import web

from daemon import db, store
from daemon.calls import (
    ENDING_TYPES,
    MAX_RECORD_URL_CHARS,
    CallEvent,
    MalformedEvent,
    StoredEvent,
    parse_call,
    parse_event,
)
from daemon.errors import ConfigError, DeliveryError, Permanent
from daemon.integrations.base import (
    AdapterDeps,
    CredentialsCheck,
    CrmUser,
    Deferred,
    Delivered,
    DeliveryContext,
    IntegrationConfig,
    InternalNumber,
    ManagersView,
    Outcome,
    RegistrationResult,
    Responsible,
    Route,
    Skipped,
)
from daemon.integrations.retailcrm import account, extensions, routing
from daemon.integrations.retailcrm import config as cfg
from daemon.integrations.retailcrm.client import (
    MAX_UPLOAD_BATCH,
    RetailCrmClient,
    account_client,
)
from daemon.integrations.retailcrm.events import MappingOptions, Plan, batches, plan
from daemon.integrations.retailcrm.module import LINK_REFRESH_S, ModuleIdentity, Registrar

log = structlog.get_logger(__name__)

NAME = cfg.KEY
INTERNAL_NUMBERS_TTL_S = 60.0
TELEPHONY_PREFIX = "/api/v5/telephony"
# What the bridge needs of an API key: read/edit its module, popups and uploads, the
# responsible manager, the users list (GET /api/credentials names them this way).
REQUIRED_SCOPES = ("integration_read", "integration_write", "telephony_read",
                   "telephony_write", "user_read")
CHECK_TIMEOUT_S = 5.0
# A live call card shown later than this helps nobody: the popup is skipped.
POPUP_MAX_AGE_S = 120.0
# How far this host's clock may be ahead of the database's for batch_key's reading of an
# event's age (the popup decision itself reads the database's clock).
CLOCK_MARGIN_S = 60.0
DEFAULT_UPLOAD_SETTLE_S = 3.0
POPUP, UPLOAD = "popup", "upload"  # a delivery's steps
STALE_POPUP = "stale_popup"  # the reason a popup was not sent
RECONCILE_INTERVAL_S = 180.0
RECONCILE_BATCH = 100
TEMPLATES = Path(__file__).parent / "templates"

__all__ = ["NAME", "RetailCrmAdapter", "create_adapter"]


class RetailCrmAdapter:
    """The ``Adapter`` of RetailCRM (see the module docstring)."""

    name = NAME
    event_types = frozenset({"dial", "hangup", "download"})
    # RetailCRM's client-side limits per API key, as its official clients keep them
    # (docs/retailcrm.md, "Rate limits").
    rate_limits: Mapping[str, float] = {"default": 10.0, "telephony": 40.0}
    max_batch = MAX_UPLOAD_BATCH

    def __init__(self, deps: AdapterDeps) -> None:
        self.deps = deps
        self.allow_private = cfg.allows_private(deps.settings)
        self.identity = ModuleIdentity.from_deps(deps)
        self.registrar = Registrar(deps, self.identity)
        self.upload_settle_s = float(deps.settings.get("upload_settle_s",
                                                       DEFAULT_UPLOAD_SETTLE_S))
        self._internal: dict[str, tuple[float, frozenset[str]]] = {}
        # enterprise -> (config, internal numbers, the mapping options made of them)
        self._options: dict[str, tuple[cfg.RetailCrmConfig, frozenset[str], MappingOptions]] = {}
        self._rng = random.Random()  # the reconciler's jitter, not the module's shared state

    # ------------------------------------------------------------------ protocol

    def rate_class(self, path: str) -> str:
        """``telephony`` for paths under /api/v5/telephony, else ``default``."""
        return "telephony" if path.startswith(TELEPHONY_PREFIX) else "default"

    def parse_config(self, raw: Mapping[str, Any]) -> cfg.RetailCrmConfig:
        """Validate ``integrations_config['retailcrm']`` (decrypting its secrets)."""
        return cfg.parse(raw, self.deps.crypto, allow_private=self.allow_private)

    def batch_key(
        self, event: StoredEvent, config: IntegrationConfig, steps_done: frozenset[str]
    ) -> str | None:
        """Upload-only deliveries of one enterprise share upload requests: downloads (the
        recovery backlog), and hangups whose popup is done, off, or long past showing (a
        backlog the CRM could not take for minutes). A hangup with a popup to send is
        delivered alone, so a batch is one request and always fits the attempt timeout."""
        if event.event_type == "download":
            return "calls"
        upload_only = event.event_type == "hangup" and isinstance(
            config, cfg.RetailCrmConfig) and (
                POPUP in steps_done or not config.popup_hangup or _past_popup(event))
        return "calls" if upload_only else None

    def client(self, config: cfg.RetailCrmConfig, ctx: DeliveryContext | None = None,
               timeout_s: float = 3.0) -> RetailCrmClient:
        """A client for one enterprise's account (recording exchanges into ``ctx``)."""
        if ctx is None:
            return account_client(self.deps, config, timeout_s=timeout_s)
        return account_client(self.deps, config, timeout_s=ctx.timeout_s, gate=ctx.gate,
                              on_exchange=ctx.record)

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        """Map one event with its call and send what the mapping says."""
        (result,) = await self.deliver_batch([ctx])
        if isinstance(result, BaseException):
            raise result
        return result

    async def deliver_batch(
        self, ctxs: Sequence[DeliveryContext]
    ) -> list[Outcome | DeliveryError]:
        """Deliver several events of one enterprise; one result per context, in order.

        Each event's popup goes at once (unless done, or stale); an ending's upload waits
        for the settle window, then uploads go together, at most 50 per request. A batch
        the API refuses as a whole is retried item by item, so one bad item fails alone.
        """
        results: list[Outcome | DeliveryError | None] = [None] * len(ctxs)
        uploads: list[tuple[int, dict[str, Any]]] = []
        notes: dict[int, str] = {}
        for i, ctx in enumerate(ctxs):
            try:
                outcome, upload = await self._deliver_popup(ctx)
            except DeliveryError as exc:
                results[i] = exc
                continue
            if upload is None:
                results[i] = outcome
                continue
            uploads.append((i, upload))
            if isinstance(outcome, Delivered) and outcome.detail:
                notes[i] = outcome.detail
        if uploads:
            await self._upload(ctxs, uploads, results)
        for i, note in notes.items():
            result = results[i]
            if isinstance(result, Delivered):
                results[i] = Delivered(f"{result.detail}; {note}")
        return [r if r is not None else Permanent("nothing decided") for r in results]

    async def _deliver_popup(
        self, ctx: DeliveryContext
    ) -> tuple[Outcome, dict[str, Any] | None]:
        """Plan the event and send its popup if one is due; then either the outcome, or the
        upload item still to send (with a note for its outcome, when the popup went stale)."""
        settling = ctx.event.event_type in ENDING_TYPES and ctx.age_s() < self.upload_settle_s
        try:
            planned, current = await self._plan(ctx)
        except MalformedEvent:
            if not settling:
                raise
            # The call's other events may still come and settle what this one lacks.
            return Deferred(self.upload_settle_s - ctx.age_s(), "waiting for the call's "
                            "other events"), None
        stale: str | None = None
        if planned.event is not None and not ctx.done(POPUP):
            age_s = ctx.age_s()
            if age_s > POPUP_MAX_AGE_S:
                stale = f"{STALE_POPUP}: not shown {age_s:.0f} s after the event"
            else:
                await self.client(_config(ctx), ctx).call_event(planned.event)
                ctx.step_done(POPUP)
        wait_s = self.upload_settle_s - ctx.age_s()
        if ctx.event.event_type in ENDING_TYPES and wait_s > 0:
            # Whatever the plan says now, the call's late events may change it: the upload
            # (or the decision that there is none) waits for the settle window.
            return Deferred(wait_s, "the upload waits for the settle window"), None
        if planned.upload is not None and not ctx.done(UPLOAD):
            if current.record_url_dropped:  # said when the upload goes without it
                log.warning("record_url_dropped", unique_id=ctx.event.unique_id,
                            reason="not an absolute http(s) URL of at most "
                            f"{MAX_RECORD_URL_CHARS} characters")
            return Delivered(stale or ""), planned.upload
        if planned.skipped:
            return Skipped(planned.skipped), None
        if stale is not None:
            return Skipped(stale), None
        return Delivered("call event sent"), None

    async def _plan(self, ctx: DeliveryContext) -> tuple[Plan, CallEvent]:
        config = _config(ctx)
        current = parse_event(ctx.event)
        # The call's events include this one: it is parsed once, above.
        others, _rejected = parse_call(e for e in await ctx.load_call() if e.id != current.id)
        options = await self.options(ctx.enterprise, config)
        planned = plan(current, others, options)
        if planned.phone_unparsed:
            log.info("phone_not_normalised", unique_id=ctx.event.unique_id)
        return planned, current

    async def _upload(
        self,
        ctxs: Sequence[DeliveryContext],
        uploads: list[tuple[int, dict[str, Any]]],
        results: list[Outcome | DeliveryError | None],
    ) -> None:
        for chunk in batches(uploads, MAX_UPLOAD_BATCH):
            first = ctxs[chunk[0][0]]
            try:
                answer = await self.client(_config(first), first).upload_calls(
                    [item for _i, item in chunk])
            except Permanent as exc:
                if len(chunk) == 1:
                    results[chunk[0][0]] = exc
                    continue
                for index, item in chunk:  # find the one bad item; the others go through
                    await self._upload(ctxs, [(index, item)], results)
                continue
            except DeliveryError as exc:
                for index, _item in chunk:
                    results[index] = exc
                continue
            duplicates = set(map(str, answer.get("duplicateCalls") or []))
            for index, item in chunk:
                if index != chunk[0][0]:
                    ctxs[index].exchanges.extend(first.exchanges[-1:])
                seen = str(item.get("externalId")) in duplicates
                ctxs[index].step_done(UPLOAD)
                results[index] = Delivered("call already uploaded" if seen else "call uploaded")

    async def options(self, enterprise: str, config: cfg.RetailCrmConfig) -> MappingOptions:
        """The mapping options of one enterprise (its internal numbers cached briefly); the
        same object for as long as its configuration and its numbers are the same ones."""
        numbers = await self.internal_numbers(enterprise)
        kept = self._options.get(enterprise)
        if kept is not None and kept[0] is config and kept[1] is numbers:
            return kept[2]
        options = MappingOptions(
            host_zone=ZoneInfo(config.time_zone), crm_zone=ZoneInfo(config.crm_time_zone),
            region=config.region, popup_incoming=config.popup_incoming,
            popup_outgoing=config.popup_outgoing, popup_hangup=config.popup_hangup,
            upload_history=config.upload_history, upload_recordings=config.upload_recordings,
            log_internal=config.log_internal, user_extensions=config.user_extensions,
            internal_numbers=numbers, external_phones=config.external_phones,
        )
        self._options[enterprise] = (config, numbers, options)
        return options

    async def internal_numbers(self, enterprise: str) -> frozenset[str]:
        """This enterprise's extensions (``user_internal_phones``), cached for a minute."""
        cached = self._internal.get(enterprise)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        numbers = frozenset(await store.internal_numbers(self.deps.pool, enterprise))
        self._internal[enterprise] = (now + INTERNAL_NUMBERS_TTL_S, numbers)
        return numbers

    def routes(self) -> Sequence[web.AbstractRouteDef]:
        """RetailCRM's callbacks (mounted under /retailcrm/): the module's activity,
        click-to-call, managers' statuses, the logo."""
        from daemon.integrations.retailcrm import http

        return http.routes

    # ------------------------------------------------------------------ upkeep

    async def check_credentials(self, config: IntegrationConfig) -> CredentialsCheck:
        """``GET /api/credentials`` with the stored key: reachable, accepted, and every
        scope of ``REQUIRED_SCOPES`` granted."""
        assert isinstance(config, cfg.RetailCrmConfig)
        if not (config.domain and config.api_key):
            return CredentialsCheck(ok=False, message="RetailCRM is not configured: the "
                                    "account domain and the API key are required.")
        try:
            answer = await self.client(config, timeout_s=CHECK_TIMEOUT_S).credentials()
        except DeliveryError as exc:
            return CredentialsCheck(ok=False, message=f"The connection test failed: {exc}")
        granted = answer.get("scopes")
        scopes = {str(s) for s in granted} if isinstance(granted, list) else set()
        missing = tuple(s for s in REQUIRED_SCOPES if s not in scopes)
        if missing:
            return CredentialsCheck(
                ok=False, missing_scopes=missing,
                message=f"RetailCRM at {config.domain} accepted the API key, but it lacks "
                f"the permissions {', '.join(missing)}: add them to the key in RetailCRM.")
        return CredentialsCheck(
            ok=True, message=f"RetailCRM at {config.domain} accepted the API key, which has "
            "every permission the bridge needs.")

    async def list_users(self, enterprise: str, config: IntegrationConfig) -> list[CrmUser]:
        """Every active RetailCRM user, each with their number (local map merged with the
        module's ``additionalCodes``, local winning) and status (the latest RetailCRM
        reported through ``changeUserStatusUrl``, else the users list's)."""
        assert isinstance(config, cfg.RetailCrmConfig)
        client = self.client(config, timeout_s=CHECK_TIMEOUT_S)
        statuses = await store.user_statuses(self.deps.pool, enterprise, NAME)
        view = await extensions.managers(client, config, self.identity.code, statuses)
        return list(view.managers)

    async def register(self, enterprise: str) -> RegistrationResult:
        """Register (or update) the telephony module and switch the integration on."""
        return await self.registrar.register(enterprise)

    async def unregister(self, enterprise: str) -> RegistrationResult:
        """Deactivate the module; revoke links and the clientId; switch off locally."""
        return await self.registrar.unregister(enterprise)

    async def sync_extensions(self, enterprise: str) -> RegistrationResult:
        """Send the module (with the current ``additionalCodes``) to RetailCRM again."""
        return await self.registrar.sync(enterprise)

    async def save_extensions(
        self, enterprise: str, assignments: Mapping[str, str | None]
    ) -> extensions.SaveResult:
        """Store an assignment set (``ConfigError`` naming the field changes nothing), then
        sync it to RetailCRM (pending on failure)."""
        return await extensions.save_and_sync(self.deps.pool, enterprise, assignments,
                                              self.registrar.sync)

    async def responsible_manager(
        self, enterprise: str, config: IntegrationConfig, phone: str, *,
        timeout_s: float = routing.DEFAULT_TIMEOUT_S,
    ) -> Responsible:
        """RetailCRM's customer and responsible manager for ``phone`` (``routing.look_up``);
        nobody when the account is not configured."""
        assert isinstance(config, cfg.RetailCrmConfig)
        if not (config.domain and config.api_key):
            return routing.NOBODY
        return await routing.look_up(
            self.client(config, timeout_s=timeout_s), config, phone, timeout_s=timeout_s)

    def route(self, config: IntegrationConfig, found: Responsible,
              statuses: Mapping[str, str]) -> Route:
        """The extension to ring for ``found`` (``routing.decide``)."""
        assert isinstance(config, cfg.RetailCrmConfig)
        return routing.decide(config, found, statuses)

    def tasks(self, stopping: asyncio.Event) -> Mapping[str, Coroutine[Any, Any, None]]:
        """``extensions-sync``: the reconciliation loop."""
        return {"extensions-sync": self.run_reconciler(stopping)}

    def templates_dir(self) -> Path | None:
        """The RetailCRM part of the admin pages (the connection form)."""
        return TEMPLATES

    # ------------------------------------------------------------------ administration

    async def read_settings(self, enterprise: str) -> dict[str, Any]:
        """The masked settings view (``account.view``)."""
        return account.view(await cfg.read_raw(self.deps.pool, enterprise), self.deps.crypto,
                            allow_private=self.allow_private)

    async def write_settings(self, enterprise: str, changes: Mapping[str, Any]
                             ) -> dict[str, Any]:
        """A validated partial update (``account.update``)."""
        return await account.update(self.deps.pool, enterprise, changes, self.deps.crypto,
                                    allow_private=self.allow_private)

    async def test_connection(self, enterprise: str,
                              changes: Mapping[str, Any] | None = None) -> CredentialsCheck:
        """``check_credentials`` of the stored settings (with ``changes``, unsaved)."""
        current = await cfg.read_raw(self.deps.pool, enterprise)
        _values, config = account.prepare(current, changes or {}, self.deps.crypto,
                                          allow_private=self.allow_private)
        return await self.check_credentials(config)

    async def managers(self, enterprise: str) -> ManagersView:
        """Active RetailCRM users with status (the latest RetailCRM reported through
        ``changeUserStatusUrl``, else the users list's) and number, and the mismatches."""
        config = await self._stored_config(enterprise)
        if not (config.domain and config.api_key):
            raise ConfigError("domain", "RetailCRM is not connected: set the account "
                              "address and the API key first")
        client = self.client(config, timeout_s=CHECK_TIMEOUT_S)
        statuses = await store.user_statuses(self.deps.pool, enterprise, NAME)
        return await extensions.managers(client, config, self.identity.code, statuses)

    async def internal_numbers_view(self, enterprise: str) -> list[InternalNumber]:
        """The enterprise's numbers with owners and the managers on them."""
        raw = await cfg.read_raw(self.deps.pool, enterprise)
        return await extensions.internal_numbers(self.deps.pool, enterprise,
                                                 extensions.stored_map(raw))

    async def extensions(self, enterprise: str) -> dict[str, str]:
        """The stored ``user_extensions``."""
        return extensions.stored_map(await cfg.read_raw(self.deps.pool, enterprise))

    async def _stored_config(self, enterprise: str) -> cfg.RetailCrmConfig:
        return cfg.parse(await cfg.read_raw(self.deps.pool, enterprise) or {},
                         self.deps.crypto, allow_private=self.allow_private)

    async def reconcile(self) -> int:
        """Re-sync every enterprise whose sync is pending or whose link is getting old
        (``store.integration_sync_due``); how many syncs succeeded."""
        due = await store.integration_sync_due(self.deps.pool, NAME, LINK_REFRESH_S,
                                               RECONCILE_BATCH)
        done = 0
        for enterprise in due:
            result = await self.registrar.sync(enterprise)
            done += result.ok
        if due:
            log.info("extensions_reconciled", due=len(due), synced=done)
        return done

    async def run_reconciler(self, stopping: asyncio.Event) -> None:
        """``reconcile`` every ``RECONCILE_INTERVAL_S`` ± 20 % until ``stopping``; a
        database failure is logged and retried next round."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(),
                                       RECONCILE_INTERVAL_S * self._rng.uniform(0.8, 1.2))
            if stopping.is_set():
                return
            try:
                await self.reconcile()
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                health = self.deps.health
                if health is None or not health.failed(exc, "extensions-sync"):
                    log.warning("extensions_reconcile_failed", error=type(exc).__name__)


def _past_popup(event: StoredEvent) -> bool:
    """Whether the event is surely too old for its popup (``POPUP_MAX_AGE_S``): by this
    host's clock, with ``CLOCK_MARGIN_S`` to spare for a database clock behind it — the
    attempt decides by the database's, and a popup it still finds due goes all the same."""
    age_s = (datetime.now(UTC) - event.received_at).total_seconds()
    return age_s > POPUP_MAX_AGE_S + CLOCK_MARGIN_S


def _config(ctx: DeliveryContext) -> cfg.RetailCrmConfig:
    config = ctx.config
    assert isinstance(config, cfg.RetailCrmConfig)
    return config


def create_adapter(deps: AdapterDeps) -> RetailCrmAdapter:
    """Build the adapter (the loader's entry point)."""
    return RetailCrmAdapter(deps)
