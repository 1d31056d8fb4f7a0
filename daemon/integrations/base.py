"""The adapter protocol: everything the CRM-neutral core needs from a CRM integration.

One folder per CRM under ``daemon/integrations/`` (STYLE.md rule 6); its ``__init__.py``
exposes ``create_adapter(runtime_deps) -> Adapter``. The core (dispatcher, cache, web) talks
to a CRM only through these types and never imports an adapter module directly.

The split inside an adapter (rule 7): pure mapping (no I/O), a dumb HTTP client (typed
errors), and thin glue implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import aiohttp
    import asyncpg
    from aiohttp import web

    from daemon.calls import StoredEvent
    from daemon.crypto import Crypto
    from daemon.errors import DeliveryError


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

    ``request`` is what was sent (query or form fields, JSON fields decoded) and never holds
    a credential; ``status`` is None when no answer came; ``response`` is the parsed body or
    a short excerpt of one that is not JSON.
    """

    method: str
    path: str
    request: Any
    status: int | None
    response: Any
    duration_s: float


@dataclass(slots=True)
class DeliveryContext:
    """What an adapter gets to deliver one event; built by the dispatcher per attempt."""

    enterprise: str
    config: IntegrationConfig
    event: StoredEvent
    attempt: int
    http: aiohttp.ClientSession
    timeout_s: float
    gate: Callable[[str], Awaitable[None]]
    load_call: Callable[[], Awaitable[Sequence[StoredEvent]]]
    exchanges: list[Exchange] = field(default_factory=list)

    def record(self, exchange: Exchange) -> None:
        """Keep one CRM round trip for the log row (clients call this per request)."""
        self.exchanges.append(exchange)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The CRM accepted the event (``detail`` is shown in the admin UI's log)."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing had to be sent for this event (an internal call, a switch that is off...)."""

    reason: str


Outcome = Delivered | Skipped


@dataclass(frozen=True, slots=True)
class AdapterDeps:
    """What the composition root hands an adapter when it builds it."""

    crypto: Crypto
    http: aiohttp.ClientSession
    pool: asyncpg.Pool
    public_url: str
    secret_key: str
    settings: Mapping[str, Any] = field(default_factory=dict)


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

    def batch_key(self, event: StoredEvent, config: IntegrationConfig) -> str | None:
        """Deliveries of one enterprise with the same non-None key claimed together may go
        through ``deliver_batch`` as one attempt (e.g. uploads sharing a request)."""

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        """Send one event; raise ``Retryable``/``Permanent``/``AuthFailed`` on failure."""

    async def deliver_batch(
        self, ctxs: Sequence[DeliveryContext]
    ) -> Sequence[Outcome | DeliveryError]:
        """Send several events of one enterprise; one result (or error) per context, in
        order. Raising instead applies the error to every context."""

    def routes(self) -> Sequence[web.AbstractRouteDef]:
        """Callback routes the CRM calls (mounted under ``/{name}/``)."""
