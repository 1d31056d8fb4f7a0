"""Logging: structlog, JSON in production and the console renderer on a terminal.

The daemon (``crm-bridge run``) logs to stdout, as structlog's doctrine wants of a service
(journald keeps it); the other commands log to stderr, so that their stdout holds only their
result.

The standard library's loggers (aiohttp's access and server logs, asyncpg) go through the
same processor chain, so every line has one shape. ``redact`` runs last before rendering: it
masks values under known secret keys and secret-looking substrings (JWTs, ``apiKey=`` and
``clientId=`` in URLs) in any string, and — by value, in text, values and keys — the secrets
the current unit of work declared with :func:`hide` (its enterprise's API key, clientId...).
The last line of defence, not the first.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "***"

# Keys whose values are secrets wherever they appear (compared lower-cased, without - and _).
SECRET_KEYS = frozenset(
    {
        "apikey", "xapikey", "clientid", "token", "secret", "secretkey", "password",
        "passwd", "session", "sessiontoken", "jwt", "authorization", "cookie", "setcookie",
        "encryptionkey", "encryptionkeys", "servicetoken", "accesstoken", "refreshtoken",
        "enterprisesecret", "csrftoken", "csrf",
    }
)

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}")
_URL_SECRET = re.compile(
    r"(?i)\b(api_?key|client_?id|token|secret|session_token|jwt|password)=([^&\s\"']+)"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
# The secrets of the unit of work running in this context (a delivery's task, a request's
# handler, a command): a context variable, so each task sees only its own.
_HIDDEN: ContextVar[tuple[str, ...]] = ContextVar("crm_bridge_hidden_secrets", default=())


def hide(secrets: Iterable[str]) -> None:
    """From now on, in this context (the current task and what it starts), mask these
    values wherever they appear in a log line: text, values, keys. Replaces what an
    earlier call declared: a context works for one enterprise at a time."""
    _HIDDEN.set(tuple(sorted({s for s in secrets if s}, key=len, reverse=True)))


def also_hide(secrets: Iterable[str]) -> None:
    """Like :func:`hide`, keeping what this context hides already: a second credential met
    on the way (the enterprise's PBX secret, read while a callback is being answered)."""
    hide((*_HIDDEN.get(), *secrets))


def is_secret_key(key: object) -> bool:
    """True when a mapping key names a secret (``api_key``, ``X-API-KEY``, ``clientId``...)."""
    return isinstance(key, str) and _names_secret(key)


@functools.lru_cache(maxsize=4096)  # keys repeat: every log row has the same few
def _names_secret(key: str) -> bool:
    return key.lower().replace("-", "").replace("_", "") in SECRET_KEYS


def scrub_text(text: str) -> str:
    """Mask secret-looking substrings of free text: JWTs, bearer tokens, ``key=value`` in URLs."""
    if "=" in text or "eyJ" in text or "earer" in text:
        text = _JWT.sub(MASK, text)
        text = _URL_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
        text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return text


def redact_value(value: Any, depth: int = 0, hidden: tuple[str, ...] = ()) -> Any:
    """Return ``value`` with every secret masked: by key in mappings, by pattern in strings,
    and the ``hidden`` values wherever they appear (keys included)."""
    if depth > 8:
        return value
    if isinstance(value, str):
        return scrub_text(_hide(value, hidden))
    if isinstance(value, Mapping):
        return {
            _hide(k, hidden) if isinstance(k, str) else k:
                MASK if is_secret_key(k) and v not in (None, "")
                else redact_value(v, depth + 1, hidden)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v, depth + 1, hidden) for v in value]
    return value


def _hide(text: str, hidden: tuple[str, ...]) -> str:
    for secret in hidden:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in every field of the event (see the module)."""
    hidden = _HIDDEN.get()
    if hidden and any(secret in key for key in event_dict for secret in hidden):
        event_dict = {_hide(key, hidden): value for key, value in event_dict.items()}
    for key, value in list(event_dict.items()):
        if is_secret_key(key) and value not in (None, ""):
            event_dict[key] = MASK
        elif isinstance(value, str | Mapping | list | tuple):
            event_dict[key] = redact_value(value, hidden=hidden)
    return event_dict


def _renderer(log_format: str, stream: TextIO) -> Processor:
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    if console:
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer()


def shared_processors() -> list[Processor]:
    """The chain every line passes through, structlog's and the standard library's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]


def configure(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and route the standard library's logging through it, to
    ``stream`` (default stdout).

    Idempotent: calling it again replaces the handler (tests and the CLI both call it).
    """
    stream = stream or sys.stdout
    numeric = logging.getLevelName(level.upper())
    renderer = _renderer(log_format, stream)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's access log is one line per request: useful, but at info only when asked.
    logging.getLogger("aiohttp.access").setLevel(max(numeric, logging.WARNING))
