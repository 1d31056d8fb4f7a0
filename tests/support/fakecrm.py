"""A small CRM adapter for the pipeline tests, and the fake upstream it talks to.

The adapter ("fakecrm", loaded as ``--integration tests.support.fakecrm``) POSTs each
delivery as JSON to ``<url>/deliver`` with the enterprise's API key, and classifies the
answer like a real adapter: 2xx delivered, 429/503 rate limited (Retry-After honoured),
5xx and connection trouble retryable, 401/403 auth failed, other 4xx permanent. It parses
every event with the platform parser first, so a malformed stored body fails as it would
in production.

Like a real adapter it loads the call's stored events in every attempt (``ctx.load_call``).
An enterprise configured with ``"crash": true`` makes it kill the whole process
(``os._exit``) on any event whose body holds ``"_fakecrm_crash": true``: a row that takes
down whatever process attempts it (only ever used with real daemon processes).

``FakeUpstream`` is a real aiohttp server on 127.0.0.1 recording every request (arrival
time, API key, event) with faults per API key: a queue of status codes, latency per call,
a stall, or an outage.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from daemon.calls import StoredEvent, parse_event
from daemon.errors import AuthFailed, ConfigError, Permanent, Retryable
from daemon.integrations.base import (
    AdapterDeps,
    Delivered,
    DeliveryContext,
    Exchange,
    Outcome,
)
from daemon.serving import serving
from tests.support.stand_in import StandInCrm

NAME = "fakecrm"
FAKE = "tests.support.fakecrm"  # the module path to run it: --integration tests.support.fakecrm
CRASH_KEY = "_fakecrm_crash"
CRASH_EXIT_CODE = 70


def fake_config(settings: Any, url: str, key: str, **extra: Any) -> dict[str, Any]:
    """``integrations_config`` for an enterprise delivering to ``url`` with API key ``key``."""
    from daemon.crypto import Crypto

    crypto = Crypto(settings.encryption_keys, settings.secret_key)
    return {"fakecrm": {"enabled": True, "url": url, "api_key": crypto.encrypt(key), **extra}}


@dataclass(frozen=True, slots=True)
class FakeConfig:
    enabled: bool
    url: str
    api_key: str = field(repr=False)
    callback_secret: str | None = None
    crash: bool = False

    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,)


class FakeCrmAdapter(StandInCrm):
    crm_label = "the fake CRM"
    name = NAME
    event_types = frozenset({"dial", "hangup", "download"})
    rate_limits: Mapping[str, float] = {"default": 50.0}

    def __init__(self, deps: AdapterDeps) -> None:
        self._deps = deps

    max_batch = 1

    def rate_class(self, path: str) -> str:
        return "default"

    def batch_key(self, event: StoredEvent, config: Any, steps_done: frozenset[str]) -> str | None:
        return None

    async def deliver_batch(self, ctxs: Sequence[DeliveryContext]) -> list[Outcome]:
        return [await self.deliver(ctx) for ctx in ctxs]

    def parse_config(self, raw: Mapping[str, Any]) -> FakeConfig:
        url = raw.get("url")
        if not isinstance(url, str) or not url.startswith("http"):
            raise ConfigError("url", "expected an http(s) URL")
        token = raw.get("api_key")
        if not isinstance(token, str):
            raise ConfigError("api_key", "is required")
        return FakeConfig(bool(raw.get("enabled")), url.rstrip("/"),
                          self._deps.crypto.decrypt(token), crash=raw.get("crash") is True)

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        parse_event(ctx.event)  # MalformedEvent (Permanent) for a bad stored body
        config = ctx.config
        assert isinstance(config, FakeConfig)
        await ctx.load_call()
        if config.crash and ctx.event.payload.get(CRASH_KEY) is True:
            os._exit(CRASH_EXIT_CODE)
        body = {"event_id": ctx.event.id, "unique_id": ctx.event.unique_id,
                "event_type": ctx.event.event_type, "attempt": ctx.attempt,
                "enterprise": ctx.enterprise}
        await ctx.gate("/deliver")
        started = time.monotonic()
        status: int | None = None
        answer: Any = None
        try:
            async with ctx.http.post(
                f"{config.url}/deliver", json=body, headers={"X-API-KEY": config.api_key},
                timeout=aiohttp.ClientTimeout(total=ctx.timeout_s),
            ) as response:
                status = response.status
                answer = await response.json(content_type=None)
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise Retryable(f"connection failed: {type(exc).__name__}",
                            error_id="connection") from None
        finally:
            ctx.record(Exchange("POST", "/deliver", body, status, answer,
                                time.monotonic() - started))
        return _classify(status, answer, retry_after)


def _classify(status: int, answer: Any, retry_after: str | None) -> Outcome:
    if 200 <= status < 300:
        return Delivered("ok")
    if status in (429, 503):
        raise Retryable(f"HTTP {status}", rate_limited=True, status=status,
                        retry_after=float(retry_after) if retry_after else None,
                        error_id="rate_limited")
    if status >= 500:
        raise Retryable(f"HTTP {status}", status=status, error_id=f"http_{status}")
    if status in (401, 403):
        raise AuthFailed(f"HTTP {status}: credentials refused", status=status,
                         error_id="auth_failed")
    raise Permanent(f"HTTP {status}: {answer}", status=status, error_id=f"http_{status}")


def create_adapter(deps: AdapterDeps) -> FakeCrmAdapter:
    return FakeCrmAdapter(deps)


# ---------------------------------------------------------------------- the upstream


@dataclass(slots=True)
class Received:
    at: float  # when the answer was sent (after any latency)
    arrived: float
    api_key: str
    event_id: int
    unique_id: str
    event_type: str
    attempt: int
    enterprise: str
    status: int


@dataclass(slots=True)
class FakeUpstream:
    """State and faults of the fake CRM (see the module docstring)."""

    received: list[Received] = field(default_factory=list)
    statuses: dict[str, deque[int]] = field(default_factory=lambda: defaultdict(deque))
    latency_s: dict[str, float] = field(default_factory=dict)  # by "unique_id" or "uid/type"
    slow_keys: dict[str, float] = field(default_factory=dict)  # by api key
    down_keys: set[str] = field(default_factory=set)  # answer 500 while listed
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, event id)
    url: str = ""

    def fail_next(self, api_key: str, *statuses: int) -> None:
        self.statuses[api_key].extend(statuses)

    def delivered(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    def per_second(self, api_key: str) -> int:
        """The most requests of one key that arrived in any 1-second window."""
        times = sorted(r.arrived for r in self.received if r.api_key == api_key)
        best, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best

    def duplicates(self) -> Counter[int]:
        counts = Counter(r.event_id for r in self.delivered())
        return Counter({k: v for k, v in counts.items() if v > 1})

    async def handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        body = await request.json()
        self.arrivals.append((arrived, body["event_id"]))
        key = request.headers.get("X-API-KEY", "")
        delay = (self.latency_s.get(f"{body['unique_id']}/{body['event_type']}")
                 or self.latency_s.get(body["unique_id"]) or self.slow_keys.get(key))
        if delay:
            await asyncio.sleep(delay)
        queue = self.statuses.get(key)
        status = 500 if key in self.down_keys else (queue.popleft() if queue else 200)
        self.received.append(Received(time.monotonic(), arrived, key, body["event_id"],
                                      body["unique_id"], body["event_type"], body["attempt"],
                                      body["enterprise"], status))
        headers = {"Retry-After": "1"} if status in (429, 503) else {}
        return web.json_response({"ok": status < 300, "echo": key}, status=status,
                                 headers=headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/deliver", self.handle)
        return app


@asynccontextmanager
async def running_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    async with serving(upstream.app()) as upstream.url:
        yield upstream
