"""The benchmarks' surroundings: one PostgreSQL server, fresh databases, daemon settings, logs.

``Harness`` is built once per ``python -m bench`` run. The server is the test suite's
(``tests.support.pg.server``: ``TEST_DATABASE_URL`` if set, else a throwaway local cluster);
the migrations are applied once into a template database, and ``Harness.database()`` hands
each benchmark a ``CREATE DATABASE … TEMPLATE`` clone of it, dropped afterwards.

The daemon's own log lines (at ``info`` as in production: failed attempts, not successes)
go to ``.bench/daemon.log`` as JSON — written, not discarded, so their cost is in the
figures — and never to the terminal, where the results table goes.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import logconfig
from daemon.crypto import Crypto
from daemon.settings import Settings, load
from tests.support import pg

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / ".bench"


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(slots=True)
class Harness:
    """Server URL, secrets of this run, and where logs go (see the module docstring)."""

    server_url: str
    quick: bool = False
    log_level: str = "info"
    profile: bool = False
    baseline: Path | None = None  # another checkout whose daemon the anchors also run
    rounds: int = 0  # rounds of each side of the anchors (0: their default)
    secret_key: str = field(default_factory=lambda: secrets.token_hex(32))
    fernet_key: str = field(default_factory=_fernet_key)
    service_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    # ------------------------------------------------------------------ databases

    @asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """A fresh, migrated database of its own (dropped on exit); yields its URL."""
        name, url = await pg.clone(self.server_url)
        try:
            yield url
        finally:
            await pg.drop(self.server_url, name)

    # ------------------------------------------------------------------ the daemon

    def environ(self, database_url: str, **extra: str) -> dict[str, str]:
        """A complete ``CRM_BRIDGE_*`` environment for a daemon on ``database_url``."""
        env = {
            "CRM_BRIDGE_DATABASE_URL": database_url,
            "CRM_BRIDGE_SECRET_KEY": self.secret_key,
            "CRM_BRIDGE_ENCRYPTION_KEYS": self.fernet_key,
            "CRM_BRIDGE_SERVICE_TOKEN": self.service_token,
            "CRM_BRIDGE_PUBLIC_URL": "http://127.0.0.1:8019",
            "CRM_BRIDGE_LOG_FORMAT": "json",
            "CRM_BRIDGE_LOG_LEVEL": self.log_level,
            # The RetailCRM simulator listens on 127.0.0.1 over plain http.
            "CRM_BRIDGE_ALLOW_PRIVATE_CRM": "1",
        }
        env.update(extra)
        return env

    def settings(self, database_url: str, **overrides: Any) -> Settings:
        """Validated daemon settings for ``database_url`` (typed ``overrides`` win)."""
        return load(self.environ(database_url), **overrides)

    @property
    def crypto(self) -> Crypto:
        """Encrypts stored API keys the way this run's daemons will decrypt them."""
        return Crypto((self.fernet_key,), self.secret_key)



def configure_logging(path: Path, level: str) -> None:
    """Route every in-process daemon's log lines to ``path`` (JSON at ``level``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logconfig.configure("json", level)
    stream = open(path, "w", encoding="utf-8")  # noqa: SIM115 - lives for the whole run
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def describe_settings(settings: Settings, keys: tuple[str, ...]) -> dict[str, Any]:
    """The chosen settings a benchmark reports (only ``keys``)."""
    described = settings.describe()
    out = {k: described[k] for k in keys}
    if "rate_limits" in out:
        out["rate_limits"] = dict(out["rate_limits"])
    return out


def child_environ(extra: Mapping[str, str], *, root: Path = ROOT) -> dict[str, str]:
    """The environment of a child Python process of the bench (the checkout at ``root``
    importable first)."""
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


PYTHON = sys.executable
