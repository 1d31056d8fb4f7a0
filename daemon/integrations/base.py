"""The adapter protocol: everything the CRM-neutral core needs from a CRM integration.

One folder per CRM under ``daemon/integrations/`` (docs/architecture.md); its ``__init__.py``
exposes ``create_adapter(runtime_deps) -> Adapter``. The core (dispatcher, cache, web) talks
to a CRM only through these types and never imports an adapter module directly.

The split inside an adapter: pure mapping (no I/O), a dumb HTTP client (typed
errors), and thin glue implementing this protocol.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aiohttp import web

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

    import aiohttp
    import asyncpg

    from daemon.auditlog import AuditLog
    from daemon.calls import StoredEvent
    from daemon.crypto import Crypto
    from daemon.db import DatabaseHealth
    from daemon.errors import DeliveryError
    from daemon.metrics import Metrics
    from daemon.pbx import Pbx
    from daemon.throttle import Throttle


@runtime_checkable
class IntegrationConfig(Protocol):
    """One enterprise's parsed, validated configuration of one integration (frozen)."""

    @property
    def enabled(self) -> bool:
        """False: the enterprise switched this integration off (its deliveries are skipped)."""

    @property
    def callback_secret(self) -> str | None:
        """The secret the CRM sends back in callbacks (RetailCRM's clientId), or None."""

    def secrets(self) -> tuple[str, ...]:
        """Every secret value of this config, scrubbed from anything logged or stored."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP round trip to a CRM, as it goes into the attempt's log row.

    ``request`` is what was sent (query or form fields; a JSON field as the object that was
    encoded, which the caller may still hold: whoever keeps an exchange beyond the request
    copies it, as ``DeliveryContext.record`` does) and never holds a credential; ``status``
    is None when no answer came; ``response`` is the parsed body or a short excerpt of one
    that is not JSON.
    """

    method: str
    path: str
    request: Any
    status: int | None
    response: Any
    duration_s: float


@dataclass(slots=True)
class DeliveryContext:
    """What an adapter gets to deliver one event; built by the dispatcher per attempt.

    Requests: the client awaits ``gate(path)`` right before each request (the rate limit;
    it may raise ``Retryable`` when the request must not go now) and calls ``record`` once
    the round trip is over, failed ones included — the core counts each request against
    the CRM's rate window from the first to the second. ``record`` keeps the exchange as
    the attempt's log row will show it (``keep``: the core masks it there, once).

    Steps: a delivery that needs several requests (a popup, then an upload) names each
    finished one with ``step_done``; they are stored with the attempt's outcome, whatever
    it is, and the next attempt gets them back in ``steps_done`` so it redoes only what is
    left. ``age_s()`` is how long ago the event was stored, by the database's clock.
    """

    enterprise: str
    config: IntegrationConfig
    event: StoredEvent
    attempt: int
    http: aiohttp.ClientSession
    timeout_s: float
    gate: Callable[[str], Awaitable[None]]
    load_call: Callable[[], Awaitable[Sequence[StoredEvent]]]
    exchanges: list[Exchange] = field(default_factory=list)
    steps_done: frozenset[str] = frozenset()
    progress: set[str] = field(default_factory=set)
    stored_s: float = 0.0  # the event's age when it was claimed
    claimed_at: float = field(default_factory=time.monotonic)
    on_exchange: Callable[[Exchange], None] | None = None
    keep: Callable[[Exchange], Exchange] | None = None

    def record(self, exchange: Exchange) -> None:
        """Keep one CRM round trip for the log row (clients call this per request, when it
        is over): ``exchanges`` get it as ``keep`` makes it (masked, a copy of its own)."""
        if self.on_exchange is not None:
            self.on_exchange(exchange)
        self.exchanges.append(exchange if self.keep is None else self.keep(exchange))

    def step_done(self, step: str) -> None:
        """``step`` succeeded in this attempt: a later attempt of this delivery skips it."""
        self.progress.add(step)

    def done(self, step: str) -> bool:
        """Whether ``step`` succeeded in this attempt or an earlier one."""
        return step in self.progress or step in self.steps_done

    def age_s(self) -> float:
        """Seconds since the event was stored (the database's clock at the claim, plus the
        time since)."""
        return self.stored_s + (time.monotonic() - self.claimed_at)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The CRM accepted the event (``detail`` is shown in the admin UI's log)."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing had to be sent for this event (an internal call, a switch that is off...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Deferred:
    """The rest of this delivery is not due yet: pending again in ``delay_s`` seconds,
    without using up an attempt (steps done so far are kept). ``reason`` says why."""

    delay_s: float
    reason: str


Outcome = Delivered | Skipped | Deferred


@dataclass(frozen=True, slots=True)
class CredentialsCheck:
    """What a connection test of an enterprise's CRM credentials found.

    ``ok`` is True only when the CRM accepted the credentials and granted every permission
    the integration needs; ``missing_scopes`` names the permissions it lacks; ``message`` is
    one sentence for an operator or an admin page (never a secret).
    """

    ok: bool
    message: str
    missing_scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CrmUser:
    """A user of the CRM (a manager who may take calls), with the extension mapped to them.

    ``id`` is the CRM's own id as a string; ``status`` is the CRM's availability word
    (RetailCRM: free/busy/dinner/break) or None when the CRM has none; ``extension`` is the
    internal number this integration maps to the user, or None.
    """

    id: str
    name: str
    email: str
    active: bool
    status: str | None
    extension: str | None


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """The outcome of registering (or unregistering) the integration in an enterprise's CRM.

    ``ok`` is True when the CRM took the change. ``message`` is one paragraph for a person;
    ``error_id`` a stable code when not ok (``payment_required``, ``invalid_module``,
    ``auth_failed``, ``unavailable``, ``config``...); ``details`` the CRM's field errors
    (field → message) or the local field at fault; ``warnings`` what was accepted but is
    worth telling (users the CRM does not know...), ``unknown_users`` those users' ids (for
    RetailCRM, its ``notExistUsersIds``). Never carries a secret.
    """

    ok: bool
    message: str
    error_id: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    unknown_users: tuple[str, ...] = ()  # user ids the CRM says it does not know


@dataclass(frozen=True, slots=True)
class ExtensionMismatch:
    """A manager whose number differs between the local map and the CRM's own record."""

    user_id: str
    local: str | None
    remote: str | None


@dataclass(frozen=True, slots=True)
class ManagersView:
    """The CRM's active users with their numbers, and where the two records disagree.

    ``module_registered`` is False when the CRM holds no record of ours (nothing to merge).
    """

    managers: tuple[CrmUser, ...]
    mismatches: tuple[ExtensionMismatch, ...]
    module_registered: bool


@dataclass(frozen=True, slots=True)
class InternalNumber:
    """One internal number of the enterprise: its platform owner and the manager on it."""

    number: str
    owner: str | None
    manager_id: str | None

    @property
    def taken(self) -> bool:
        """Whether a CRM manager has this number."""
        return self.manager_id is not None


@dataclass(frozen=True, slots=True)
class ExtensionMove:
    """A number that left one manager for another because of an assignment."""

    number: str
    from_user: str
    to_user: str


@dataclass(frozen=True, slots=True)
class ExtensionsSaved:
    """The outcome of saving an assignment set (the local save always happened).

    ``synced``: the CRM has the new numbers; ``sync_pending``: it does not yet and the
    adapter retries; neither: the integration is not connected.
    """

    user_extensions: Mapping[str, str]
    moves: tuple[ExtensionMove, ...]
    synced: bool
    sync_pending: bool
    message: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Responsible:
    """What the CRM says about a calling number: its customer and the manager responsible.

    Ids are the CRM's own, as strings. ``customer_id`` None: the CRM knows no customer with
    that number. ``manager_status`` is the CRM's availability word for the manager as the
    look-up saw it (None when it gave none). Every field None: nobody known.
    """

    customer_id: str | None = None
    customer_name: str | None = None
    manager_id: str | None = None
    manager_name: str | None = None
    manager_status: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Which extension should ring first, or why none: ``reason`` is ``no_customer``,
    ``no_manager``, ``no_extension`` (the manager has no internal number) or
    ``manager_away`` (on break or at dinner, and the enterprise skips such managers)."""

    extension: str | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class CallbackDeps:
    """What an adapter's callback routes get from the core, on their sub-application under
    ``CALLBACK_DEPS``: lookups, the pool, the PBX client, the click-to-call throttle, the
    audit log (``integration_logs`` rows written off the request path) and the metrics.
    Routes receive these; they never import the Runtime or web/.

    ``enterprise_by_secret`` maps a callback secret (RetailCRM's clientId) to its enterprise
    through its keyed fingerprint; ``config_of`` is an enterprise's parsed config whatever
    its state (None: unknown or invalid); ``serving_config`` the same only when this
    integration serves it (the enterprise active, the integration enabled and valid). All
    three answer from memory, never awaiting. ``statuses_changed`` is called after a route
    stored a manager's status: this instance forgets what it remembered of the enterprise's
    statuses at once (the others learn of it through ``NOTIFY``).
    """

    integration: str
    pool: asyncpg.Pool
    enterprise_by_secret: Callable[[str], str | None]
    config_of: Callable[[str], IntegrationConfig | None]
    serving_config: Callable[[str], IntegrationConfig | None]
    statuses_changed: Callable[[str], None]
    pbx: Pbx
    make_call_throttle: Throttle
    audit: AuditLog
    metrics: Metrics


CALLBACK_DEPS = web.AppKey("callback_deps", CallbackDeps)


@dataclass(frozen=True, slots=True)
class AdapterDeps:
    """What the composition root hands an adapter when it builds it."""

    crypto: Crypto
    http: aiohttp.ClientSession
    pool: asyncpg.Pool
    public_url: str
    secret_key: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    # Where the adapter's own loops report the database unavailable (None: they log alone).
    health: DatabaseHealth | None = None


@runtime_checkable
class Adapter(Protocol):
    """A CRM integration, as the core sees it."""

    @property
    def name(self) -> str:
        """The integration type: the key in ``integrations_config`` and ``crm_deliveries``."""

    @property
    def event_types(self) -> frozenset[str]:
        """The event types it acts on; the fan-out creates deliveries only for these."""

    @property
    def rate_limits(self) -> Mapping[str, float]:
        """Requests per second per enterprise by path class (``default`` required)."""

    def rate_class(self, path: str) -> str:
        """The rate-limit class of a request path (a key of ``rate_limits``)."""

    def parse_config(self, raw: Mapping[str, Any]) -> IntegrationConfig:
        """Validate ``integrations_config[name]``; raise ``ConfigError`` naming the field."""

    @property
    def max_batch(self) -> int:
        """The most deliveries ``deliver_batch`` takes at once (1: no batching)."""

    def batch_key(
        self, event: StoredEvent, config: IntegrationConfig, steps_done: frozenset[str]
    ) -> str | None:
        """Deliveries of one enterprise with the same non-None key claimed together may go
        through ``deliver_batch`` as one attempt (e.g. uploads sharing a request);
        ``steps_done`` are the delivery's steps done by earlier attempts."""

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        """Send one event; raise ``Retryable``/``Permanent``/``AuthFailed`` on failure."""

    async def deliver_batch(
        self, ctxs: Sequence[DeliveryContext]
    ) -> Sequence[Outcome | DeliveryError]:
        """Send several events of one enterprise; one result (or error) per context, in
        order. Raising instead applies the error to every context."""

    def routes(self) -> Sequence[web.AbstractRouteDef]:
        """Callback routes the CRM calls, mounted under ``/{name}/`` on a sub-application
        whose ``CALLBACK_DEPS`` holds what they may use (``CallbackDeps``)."""

    async def check_credentials(self, config: IntegrationConfig) -> CredentialsCheck:
        """Test ``config``'s credentials against the CRM. Never raises for a CRM failure
        (unreachable, refused...): that is an ``ok=False`` answer saying why."""

    async def list_users(self, enterprise: str, config: IntegrationConfig) -> list[CrmUser]:
        """The CRM's active users of ``enterprise`` with their mapped extensions and status
        (the latest one the CRM reported to us, where it did); a CRM failure raises one of
        the ``DeliveryError`` classes."""

    async def register(self, enterprise: str) -> RegistrationResult:
        """Register (or update) this integration in the enterprise's CRM from its stored
        configuration, and switch it on. Never raises for a CRM or configuration failure."""

    async def unregister(self, enterprise: str) -> RegistrationResult:
        """Switch the integration off in the CRM and locally, revoking every callback
        secret and admin link issued so far. The local part happens even when the CRM
        cannot be told (``ok`` is then False and the message says so)."""

    async def responsible_manager(
        self, enterprise: str, config: IntegrationConfig, phone: str, *, timeout_s: float = 1.0
    ) -> Responsible:
        """What the CRM says about the caller ``phone``: the customer and the manager
        responsible for them, whatever that manager's status (``route`` decides). Takes at
        most about ``timeout_s``; a CRM failure raises one of the ``DeliveryError``
        classes."""

    def route(self, config: IntegrationConfig, found: Responsible,
              statuses: Mapping[str, str]) -> Route:
        """Which extension should ring for ``found`` under ``config`` (its manager ↔ number
        map and its rule for away managers), ``statuses`` being the managers' latest
        statuses stored for the enterprise (CRM user id → word). Pure, no I/O."""

    def tasks(self, stopping: asyncio.Event) -> Mapping[str, Coroutine[Any, Any, None]]:
        """Background loops of this adapter, by name; the runtime spawns and supervises
        them. Each runs until ``stopping`` is set (returning earlier is a crash)."""

    def templates_dir(self) -> Path | None:
        """Where this adapter's admin page templates are, or None when it has none."""

    # ---- administration: the admin pages, the JSON API and the CLI all call these, so
    # ---- there is one validation path. The enterprise exists (the caller checked); a bad
    # ---- value raises ``ConfigError`` naming the field and changes nothing.

    async def read_settings(self, enterprise: str) -> Mapping[str, Any]:
        """The enterprise's settings as an admin sees them: JSON-able, every secret masked
        (never a secret value, at most a hint such as its last characters)."""

    async def write_settings(
        self, enterprise: str, changes: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """Validate and store a partial update of the settings (only the keys given; the
        managers' numbers and other integrations' settings are never touched); the new
        ``read_settings`` view."""

    async def test_connection(
        self, enterprise: str, changes: Mapping[str, Any] | None = None
    ) -> CredentialsCheck:
        """``check_credentials`` of the stored settings, or of them with ``changes`` applied
        (validated as ``write_settings`` would, stored nowhere)."""

    async def managers(self, enterprise: str) -> ManagersView:
        """Every active CRM user with status and number, and the disagreements between the
        local map and the CRM's; a CRM failure raises a ``DeliveryError`` class, a CRM not
        configured ``ConfigError``."""

    async def internal_numbers_view(self, enterprise: str) -> list[InternalNumber]:
        """The enterprise's internal numbers with their owners and the managers on them."""

    async def extensions(self, enterprise: str) -> Mapping[str, str]:
        """The stored map CRM user id → internal number."""

    async def save_extensions(
        self, enterprise: str, assignments: Mapping[str, str | None]
    ) -> ExtensionsSaved:
        """Store an assignment set (one number per manager: a number taken from another
        manager moves), then send it to the CRM."""

    async def sync_extensions(self, enterprise: str) -> RegistrationResult:
        """Send the stored map to the CRM again."""
