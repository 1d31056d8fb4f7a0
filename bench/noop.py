"""A no-op CRM adapter: every delivery succeeds at once, without I/O.

Loaded by the daemon as ``--integration bench.noop`` (``CRM_BRIDGE_INTEGRATION=bench.noop``).
It measures the pipeline itself — claim, per-call order, guards, settle, log rows — with no
CRM in the way. Its stored configuration is ``integrations_config->'noop'``:
``{"enabled": true, "revision": <int, optional>}``; ``revision`` lets the cache benchmark
tell one version of an enterprise's configuration from the next.

``observer``: when set (by a benchmark, after the runtime is built), it is called with
``(revision, time.monotonic())`` each time a configuration is parsed — which the config
cache does right before it swaps the new entry in, with no await in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.calls import StoredEvent
from daemon.errors import ConfigError, DeliveryError
from daemon.integrations.base import (
    Adapter,
    AdapterDeps,
    Delivered,
    DeliveryContext,
    IntegrationConfig,
    Outcome,
)
from tests.support.stand_in import StandInCrm

NAME = "noop"
EVENT_TYPES = frozenset({"dial", "hangup", "download"})

Observer = Callable[[int | None, float], None]


@dataclass(frozen=True, slots=True)
class NoopConfig:
    """The no-op adapter's per-enterprise configuration."""

    enabled: bool
    revision: int | None = None

    @property
    def callback_secret(self) -> str | None:
        """The no-op CRM never calls back."""
        return None

    def secrets(self) -> tuple[str, ...]:
        """Nothing secret in it."""
        return ()


class NoopAdapter(StandInCrm):
    """The ``Adapter`` protocol, doing nothing as fast as possible."""

    crm_label = "the no-op CRM"

    name = NAME
    event_types = EVENT_TYPES
    rate_limits: Mapping[str, float] = {"default": 1e9}
    max_batch = 1

    def __init__(self, deps: AdapterDeps) -> None:
        self.deps = deps
        self.observer: Observer | None = None
        self.delivered = 0

    def rate_class(self, path: str) -> str:
        """One class for everything."""
        return "default"

    def parse_config(self, raw: Mapping[str, Any]) -> NoopConfig:
        """``enabled`` (bool) and an optional integer ``revision``."""
        enabled = raw.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError("enabled", "expected true or false")
        revision = raw.get("revision")
        if revision is not None and (not isinstance(revision, int) or isinstance(revision, bool)):
            raise ConfigError("revision", "expected an integer")
        if self.observer is not None:
            self.observer(revision, time.monotonic())
        return NoopConfig(enabled, revision)

    def batch_key(
        self, event: StoredEvent, config: IntegrationConfig, steps_done: frozenset[str]
    ) -> str | None:
        """No batching."""
        return None

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        """Delivered, at once."""
        self.delivered += 1
        return Delivered("noop")

    async def deliver_batch(
        self, ctxs: Sequence[DeliveryContext]
    ) -> Sequence[Outcome | DeliveryError]:
        """Each one delivered (never called: ``max_batch`` is 1)."""
        return [await self.deliver(ctx) for ctx in ctxs]


def create_adapter(deps: AdapterDeps) -> NoopAdapter:
    """The loader's entry point."""
    return NoopAdapter(deps)


# mypy checks here that NoopAdapter matches the Protocol member by member, signatures
# included (the loader's runtime isinstance check only sees that the names exist).
_CONFORMS: type[Adapter] = NoopAdapter
