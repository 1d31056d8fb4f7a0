"""Process settings: one frozen, typed object read from the environment once at start-up.

Every variable is ``CRM_BRIDGE_<NAME>``. A missing or malformed value raises
``SettingsError`` naming the variable, and the process stops before doing anything.
There are no fallback secrets: only the explicit development mode
(``CRM_BRIDGE_DEV_MODE=1``, set by ``make run``) may generate throwaway ones, and
``Settings.generated`` lists which, so start-up can say so in the log.

The table ``_FIELDS`` below is the single description of every variable: the configuration
reference in docs/operations.md is generated from it (``python -m daemon.reference``).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PREFIX = "CRM_BRIDGE_"
# A CRM answer cap below this would refuse ordinary answers (a users page is ~10 KiB).
MIN_RESPONSE_BYTES = 16_384


class SettingsError(ValueError):
    """A variable is missing or malformed; ``variable`` is its full environment name."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the process is configured with. Built by ``load``; never mutated."""

    database_url: str
    secret_key: str = field(repr=False)
    encryption_keys: tuple[str, ...] = field(repr=False)
    service_token: str = field(repr=False)
    integration: str = "retailcrm"
    host: str = "127.0.0.1"
    port: int = 8019
    public_url: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    dev_mode: bool = False
    instance_id: str = ""
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_command_timeout_s: float = 10.0
    notify: bool = True
    poll_interval_s: float = 1.0
    attempt_timeout_s: float = 3.0
    lease_s: float = 30.0
    ownership_s: float = 15.0
    upload_settle_s: float = 3.0
    concurrency: int = 200
    enterprise_concurrency: int = 4
    max_attempts: int = 12
    max_lease_expiries: int = 3
    max_age_s: float = 86_400.0
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    retention_days: float = 30.0
    purge_interval_s: float = 3_600.0
    config_refresh_s: float = 240.0
    config_ttl_s: float = 90.0
    listener_probe_s: float = 10.0
    shutdown_grace_s: float = 10.0
    sql_dir: str = ""
    rate_limits: tuple[tuple[str, float], ...] = ()
    retailcrm_module_code: str = "vochi-telephony"
    retailcrm_module_name: str = "Vochi-CRM"
    allow_private_crm: bool = False
    max_response_bytes: int = 1_048_576
    http_header_timeout_s: float = 5.0
    http_body_timeout_s: float = 10.0
    http_max_connections: int = 1000
    pbx_url: str = "http://127.0.0.1:8018"
    pbx_timeout_s: float = 5.0
    make_call_rate: float = 5.0
    smart_redirect_deadline_s: float = 1.5
    generated: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The settings as a dict safe to log: secrets omitted, the DB password masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.repr is False:
                continue
            out[f.name] = getattr(self, f.name)
        out["database_url"] = mask_url_password(self.database_url)
        return out

    def adapter_settings(self) -> dict[str, Any]:
        """What an adapter reads from ``AdapterDeps.settings``: its module's identity, where
        it may connect (``allow_private_crm``), how much of an answer it may read, and how
        long a hangup's upload waits for the rest of its call (``upload_settle_s``)."""
        return {
            "retailcrm_module_code": self.retailcrm_module_code,
            "retailcrm_module_name": self.retailcrm_module_name,
            "allow_private_crm": self.allow_private_crm,
            "max_response_bytes": self.max_response_bytes,
            "upload_settle_s": self.upload_settle_s,
        }


def mask_url_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# --- parsers: each takes the raw string and returns the value or raises ValueError ---


def _str(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _port(raw: str) -> int:
    value = _int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a TCP port 0-65535, got {value}")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number, 0 or more")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false (1/0, yes/no, on/off), got {raw!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _database_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError("expected a postgresql:// URL")
    return raw.strip()


def _http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"expected an absolute http(s) URL, got {raw!r}")
    return value


def _secret_key(raw: str) -> str:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters (use `openssl rand -hex 32`)")
    return raw


def _fernet_keys(raw: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ValueError("must hold at least one key")
    for position, key in enumerate(keys, start=1):
        try:
            decoded = base64.urlsafe_b64decode(key.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            decoded = b""
        if len(decoded) != 32:
            raise ValueError(
                f"key {position} is not a Fernet key (32 url-safe base64 bytes; "
                "make one with `crm-bridge genkey`)"
            )
    return keys


def _service_token(raw: str) -> str:
    if len(raw) < 24:
        raise ValueError("must be at least 24 characters")
    return raw


def _integration(raw: str) -> str:
    value = raw.strip()
    if not value.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"expected an adapter name such as 'retailcrm', got {raw!r}")
    return value


def _module_code(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError(f"expected letters, digits, '-', '_' or '.' (at most 64), got {raw!r}")
    return value


def _rate_limits(raw: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in raw.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected class=requests_per_second pairs, got {item.strip()!r}")
        pairs.append((name.strip(), _positive_float(value)))
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    parse: Callable[[str], Any]
    help: str
    secret_factory: Callable[[], str] | None = None


def _new_fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")


_FIELDS: tuple[_Field, ...] = (
    _Field("database_url", _database_url, "PostgreSQL URL, `postgresql://user:password@host/db`"),
    _Field("secret_key", _secret_key,
           "signs admin links and sessions (at least 32 characters: `openssl rand -hex 32`)",
           lambda: secrets.token_hex(32)),
    _Field("encryption_keys", _fernet_keys,
           "Fernet key(s) encrypting CRM API keys at rest, comma-separated, newest first "
           "(`crm-bridge genkey` makes one)", _new_fernet_key),
    _Field("service_token", _service_token,
           "bearer token of the platform's call services and operators for `/api/*` and "
           "`/stats` (at least 24 characters)",
           lambda: secrets.token_urlsafe(32)),
    _Field("integration", _integration, "the adapter this process runs (`--integration` wins)"),
    _Field("host", _str, "listen address"),
    _Field("port", _port, "listen port"),
    _Field("public_url", _http_url,
           "the URL RetailCRM and browsers reach this process at (required, except in "
           "development mode: `http://HOST:PORT`)"),
    _Field("log_format", _choice("auto", "json", "console"),
           "`auto` (console on a terminal, JSON otherwise), `json`, `console`"),
    _Field("log_level", _choice("debug", "info", "warning", "error"),
           "`debug`, `info`, `warning`, `error`"),
    _Field("dev_mode", _bool,
           "`1` = development mode: secrets kept in the checkout's `.pgdata/dev.env` "
           "(`make run`; never in production)"),
    _Field("instance_id", _str,
           "this instance's name in leases, `/health` and `/stats` (unset: host name-pid); "
           "unique per running process — fixed per unit, a restart keeps its enterprises"),
    _Field("db_pool_min", _int, "database pool size floor"),
    _Field("db_pool_max", _int, "database pool size ceiling (at least 2)"),
    _Field("db_command_timeout_s", _positive_float, "timeout of every SQL command, seconds"),
    _Field("notify", _bool, "`0` = poll only, no LISTEN (behind PgBouncer in transaction pooling)"),
    _Field("poll_interval_s", _positive_float, "dispatcher poll interval, seconds"),
    _Field("attempt_timeout_s", _positive_float, "hard limit of one delivery attempt, seconds"),
    _Field("lease_s", _positive_float,
           "claim lease, seconds; at least twice `CRM_BRIDGE_ATTEMPT_TIMEOUT_S`"),
    _Field("ownership_s", _positive_float,
           "how long an instance's hold on the enterprises it serves lasts, seconds; renewed "
           "every third of it while the instance lives, so a dead instance's enterprises are "
           "served again within it; at least twice `CRM_BRIDGE_ATTEMPT_TIMEOUT_S` plus 2"),
    _Field("upload_settle_s", _non_negative_float,
           "seconds a hangup's history upload waits after the hangup is stored, to fold in "
           "the call's late events (its popup does not wait); 0: no wait"),
    _Field("concurrency", _int, "deliveries in flight per process"),
    _Field("enterprise_concurrency", _int, "deliveries in flight per enterprise"),
    _Field("max_attempts", _int, "attempts before a delivery fails (dead letter)"),
    _Field("max_lease_expiries", _int,
           "times a delivery's lease may expire without an outcome (its process crashed or "
           "hung on it) before it fails as `poison`"),
    _Field("max_age_s", _positive_float, "age after which a delivery fails, seconds"),
    _Field("retry_base_s", _positive_float,
           "first retry's backoff ceiling, seconds; doubles per attempt, full jitter"),
    _Field("retry_max_s", _positive_float, "largest retry backoff, seconds"),
    _Field("retention_days", _positive_float, "delivered events are kept this many days"),
    _Field("purge_interval_s", _positive_float,
           "how often the daemon purges expired events, seconds"),
    _Field("config_refresh_s", _positive_float,
           "full configuration reload period, seconds, ±20 % jitter"),
    _Field("config_ttl_s", _positive_float,
           "per-enterprise configuration TTL, seconds, ±⅓ jitter"),
    _Field("listener_probe_s", _positive_float, "LISTEN connection probe period, seconds"),
    _Field("shutdown_grace_s", _positive_float, "in-flight grace period on SIGTERM, seconds"),
    _Field("sql_dir", _str,
           "where the migrations are (unset: the checkout's `sql/`, then "
           "`<prefix>/share/crm-bridge/sql`)"),
    _Field("rate_limits", _rate_limits,
           "per-enterprise request rates overriding the adapter's, e.g. "
           "`default=10,telephony=40`"),
    _Field("retailcrm_module_code", _module_code,
           "code of the telephony module registered in RetailCRM (default vochi-telephony)"),
    _Field("retailcrm_module_name", _str,
           "name RetailCRM shows for that module (default Vochi-CRM)"),
    _Field("allow_private_crm", _bool,
           "1 = CRM addresses may be plain http, IP addresses or resolve to loopback/private "
           "ones (tests, the simulator; default 0, but 1 in development mode)"),
    _Field("max_response_bytes", _int,
           "largest CRM answer read, after decompression (default 1048576)"),
    _Field("http_header_timeout_s", _positive_float,
           "time a client has to send a request's headers (default 5)"),
    _Field("http_body_timeout_s", _positive_float,
           "time a client has to send a request's body once its headers are in (default 10)"),
    _Field("http_max_connections", _int, "open HTTP connections accepted (default 1000)"),
    _Field("pbx_url", _http_url,
           "the platform's Asterisk service, which places and transfers calls "
           "(default http://127.0.0.1:8018)"),
    _Field("pbx_timeout_s", _positive_float,
           "timeout of one request to that service, seconds (default 5)"),
    _Field("make_call_rate", _positive_float,
           "click-to-call requests per second per RetailCRM clientId; more are answered 429 "
           "(default 5)"),
    _Field("smart_redirect_deadline_s", _positive_float,
           "hard deadline of a smart-redirect or customer-name answer, seconds; at most 10 "
           "(default 1.5)"),
)


def variables() -> list[tuple[str, str]]:
    """(variable name, help) for every setting, in declaration order."""
    return [(PREFIX + f.name.upper(), f.help) for f in _FIELDS]


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate every ``CRM_BRIDGE_*`` variable; ``SettingsError`` on the first bad one.

    ``overrides`` (already typed) win over the environment: the CLI passes
    ``integration`` from ``--integration`` this way.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in _FIELDS:
        variable = PREFIX + f.name.upper()
        raw = env.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = f.parse(raw)
        except ValueError as exc:
            raise SettingsError(variable, str(exc)) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    dev_mode = bool(values.get("dev_mode", False))
    if dev_mode:  # a developer's RetailCRM is the simulator on 127.0.0.1, over http
        values.setdefault("allow_private_crm", True)
    generated: list[str] = []
    for f in _FIELDS:
        if f.name in values:
            continue
        if f.secret_factory is not None and dev_mode:
            values[f.name] = f.parse(f.secret_factory())
            generated.append(PREFIX + f.name.upper())
        elif f.name in _REQUIRED:
            raise SettingsError(PREFIX + f.name.upper(), "is required but not set")
    return _finish(values, dev_mode, tuple(generated))


# A smart redirect holds a ringing call: a deadline beyond this is a configuration mistake.
MAX_REDIRECT_DEADLINE_S = 10.0

_REQUIRED = frozenset({"database_url", "secret_key", "encryption_keys", "service_token"})


def _finish(values: dict[str, Any], dev_mode: bool, generated: tuple[str, ...]) -> Settings:
    settings = Settings(**values, generated=generated)
    if not settings.public_url:
        if not dev_mode:
            raise SettingsError(PREFIX + "PUBLIC_URL", "is required but not set")
        host = "127.0.0.1" if settings.host in {"0.0.0.0", "::", ""} else settings.host  # noqa: S104
        settings = dataclasses.replace(settings, public_url=f"http://{host}:{settings.port}")
    if not settings.instance_id:
        settings = dataclasses.replace(
            settings, instance_id=f"{socket.gethostname()}-{os.getpid()}"
        )
    if settings.lease_s < 2 * settings.attempt_timeout_s:
        raise SettingsError(
            PREFIX + "LEASE_S",
            f"must be at least twice CRM_BRIDGE_ATTEMPT_TIMEOUT_S ({settings.attempt_timeout_s})",
        )
    if settings.ownership_s < 2 * settings.attempt_timeout_s + 2:
        raise SettingsError(
            PREFIX + "OWNERSHIP_S",
            "must be at least twice CRM_BRIDGE_ATTEMPT_TIMEOUT_S plus 2 seconds "
            f"({2 * settings.attempt_timeout_s + 2:g})",
        )
    if settings.db_pool_max < max(settings.db_pool_min, 2):
        raise SettingsError(PREFIX + "DB_POOL_MAX", "must be >= 2 and >= CRM_BRIDGE_DB_POOL_MIN")
    if settings.concurrency < 1:
        raise SettingsError(PREFIX + "CONCURRENCY", "must be at least 1")
    if settings.enterprise_concurrency < 1:
        raise SettingsError(PREFIX + "ENTERPRISE_CONCURRENCY", "must be at least 1")
    if settings.max_attempts < 1:
        raise SettingsError(PREFIX + "MAX_ATTEMPTS", "must be at least 1")
    if settings.smart_redirect_deadline_s > MAX_REDIRECT_DEADLINE_S:
        raise SettingsError(PREFIX + "SMART_REDIRECT_DEADLINE_S",
                            f"must be at most {MAX_REDIRECT_DEADLINE_S:g} (a caller is waiting)")
    if settings.max_lease_expiries < 1:
        raise SettingsError(PREFIX + "MAX_LEASE_EXPIRIES", "must be at least 1")
    if settings.max_response_bytes < MIN_RESPONSE_BYTES:
        raise SettingsError(PREFIX + "MAX_RESPONSE_BYTES",
                            f"must be at least {MIN_RESPONSE_BYTES} bytes")
    if settings.http_max_connections < 1:
        raise SettingsError(PREFIX + "HTTP_MAX_CONNECTIONS", "must be at least 1")
    return settings


def load_database(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Just ``(database_url, sql_dir)``: what ``crm-bridge migrate`` needs, no secrets."""
    env = os.environ if environ is None else environ
    variable = PREFIX + "DATABASE_URL"
    raw = env.get(variable, "")
    if not raw:
        raise SettingsError(variable, "is required but not set")
    try:
        url = _database_url(raw)
    except ValueError as exc:
        raise SettingsError(variable, str(exc)) from None
    return url, env.get(PREFIX + "SQL_DIR", "")
