"""``integrations_config->'retailcrm'``: parsed, validated, frozen; and how it is written.

Stored shape (flat; every key optional except where noted)::

    {"enabled": true,
     "domain": "https://demo.retailcrm.ru",        # required when enabled
     "api_key": "<Fernet token>",                  # required when enabled; encrypted at rest
     "popup_incoming": true, "popup_outgoing": true, "popup_hangup": true,
     "upload_history": true, "upload_recordings": true, "log_internal": false,
     "time_zone": "Europe/Minsk",                  # the Asterisk hosts' local time
     "crm_time_zone": "Europe/Minsk",              # the RetailCRM account's (default: time_zone)
     "region": "BY",                               # default phone region
     "user_extensions": {"12": "151"},             # RetailCRM user id -> internal number
     "external_phones": {"0001363": "+375172000000"},  # trunk -> the line's own number
     "site_code": "main",                          # for the module's externalPhones
     "skip_away_managers": true,                   # smart redirect: not to managers on
                                                   # break or at dinner
     "client_id": "<Fernet token>",                # what RetailCRM sends back in callbacks
     "token_version": 1, "last_sync": "2026-11-26T12:00:00+00:00", "sync_pending": false}

Every write goes through ``write_keys`` (``store.MERGE_INTEGRATION_CONFIG``): one statement
that changes only the ``retailcrm`` key, never a read-modify-write of the whole column, which
other integrations' services write too.

``parse`` runs for every enterprise on each full config refresh, so it keeps one copy of the
short strings thousands of configs share (time zones, region, internal numbers, trunks,
last_sync...: ``sys.intern``) and skips URL parsing for a domain already normalized.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from daemon import phones, store
from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.store import Executor

KEY = "retailcrm"
DEFAULT_TIME_ZONE = "Europe/Minsk"
SWITCHES = ("popup_incoming", "popup_outgoing", "popup_hangup", "upload_history",
            "upload_recordings")
_EXTENSION = re.compile(r"^[0-9*#+]{1,20}$")
_USER_ID = re.compile(r"^[0-9]{1,12}$")
_TRUNK = re.compile(r"^.{1,40}$")
# A DNS host name: dot-separated labels of letters, digits and inner hyphens, the last
# one not all digits (``127.1`` and ``2130706433`` are IPv4 addresses to a resolver).
_DNS_NAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
    r"(?=[a-z0-9-]*[a-z])[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
_MAX_HOST_CHARS = 253
# What ``normalize_domain`` returns unchanged: an https host name with a dot, lower case,
# no port (the shape of nearly every stored domain: no URL parsing on a config refresh).
_NORMALIZED_DOMAIN = re.compile(
    r"https://(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
    r"(?=[a-z0-9-]*[a-z])[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
_MAX_DOMAIN_CHARS = len("https://") + _MAX_HOST_CHARS
_LOCALHOST = ".localhost"
_EXPECTED = "expected the account address, e.g. https://demo.retailcrm.ru"


@dataclass(frozen=True, slots=True)
class RetailCrmConfig:
    """One enterprise's RetailCRM settings (secrets decrypted, masked in ``repr``)."""

    enabled: bool
    domain: str
    api_key: str = field(repr=False)
    popup_incoming: bool = True
    popup_outgoing: bool = True
    popup_hangup: bool = True
    upload_history: bool = True
    upload_recordings: bool = True
    log_internal: bool = False
    time_zone: str = DEFAULT_TIME_ZONE
    crm_time_zone: str = DEFAULT_TIME_ZONE
    region: str = phones.DEFAULT_REGION
    user_extensions: Mapping[str, str] = field(default_factory=dict)
    external_phones: Mapping[str, str] = field(default_factory=dict)
    site_code: str | None = None
    client_id: str | None = field(default=None, repr=False)
    token_version: int = 0
    last_sync: str | None = None
    sync_pending: bool = False
    skip_away_managers: bool = True

    @property
    def callback_secret(self) -> str | None:
        """RetailCRM's ``clientId``: the only credential of its callbacks."""
        return self.client_id

    def secrets(self) -> tuple[str, ...]:
        """Values that must never be logged or stored in clear."""
        return tuple(s for s in (self.api_key, self.client_id) if s)


def normalize_domain(raw: str, *, allow_private: bool = False) -> str:
    """``demo.retailcrm.ru/`` → ``https://demo.retailcrm.ru``, or ``ConfigError('domain')``.

    Accepted: ``https://`` and a DNS host name (letters, digits, ``-``; an international
    name is stored in its ASCII form), optionally a port. Refused: IP literals, ``localhost``,
    spaces, control characters, ``%``-escapes, user names or passwords, paths, queries.
    ``allow_private`` (``CRM_BRIDGE_ALLOW_PRIVATE_CRM``) also accepts plain ``http://`` and IP
    literals: the simulator on 127.0.0.1, a CRM inside the platform's network. Whatever a
    name resolves to is checked again at connect time (:mod:`daemon.egress`).
    """
    if len(raw) <= _MAX_DOMAIN_CHARS and _NORMALIZED_DOMAIN.fullmatch(raw) and not (
            raw.endswith(_LOCALHOST)):
        return raw
    value = raw.strip()
    if not value:
        raise ConfigError("domain", "is required")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ConfigError("domain", "must not contain spaces or control characters")
    if "://" not in value:
        value = "https://" + value
    try:
        parts = urlsplit(value)
        port_number = parts.port  # a port out of range or not a number raises here
    except ValueError:
        raise ConfigError("domain", _EXPECTED) from None
    if parts.scheme not in {"http", "https"} or (parts.scheme == "http" and not allow_private):
        raise ConfigError("domain", "must use https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ConfigError("domain", "must not hold a user name or password: " + _EXPECTED)
    if parts.path.strip("/") or parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError("domain", "expected the account address without a path")
    if port_number == 0:
        raise ConfigError("domain", _EXPECTED)
    host = _host(parts.hostname or "", allow_private)
    port = f":{port_number}" if port_number else ""
    return f"{parts.scheme}://{host}{port}"


def _host(raw: str, allow_private: bool) -> str:
    """The host part, checked: a DNS name in ASCII form, or (``allow_private``) an IP."""
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        address = None
    if address is not None:
        if not allow_private:
            raise ConfigError("domain", "must be a host name, not an IP address")
        return f"[{address.compressed}]" if address.version == 6 else address.compressed
    invalid = ConfigError("domain", "expected a valid host name, e.g. demo.retailcrm.ru")
    try:
        host = raw.encode("idna").decode("ascii").lower()
    except UnicodeError:  # an empty or overlong label
        raise invalid from None
    if len(host) > _MAX_HOST_CHARS or not _DNS_NAME.fullmatch(host):
        raise invalid
    if not allow_private and (host == "localhost" or host.endswith(_LOCALHOST)):
        raise ConfigError("domain", "must not be localhost")
    return host


def allows_private(settings: Mapping[str, Any]) -> bool:
    """Whether the process settings (``AdapterDeps.settings``) allow private CRM addresses."""
    return settings.get("allow_private_crm") is True


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, "expected true or false")
    return value


def _zone(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key) or default
    if not isinstance(value, str):
        raise ConfigError(key, "expected an IANA time zone name such as Europe/Minsk")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key, f"unknown time zone {value[:60]!r}") from None
    return sys.intern(value)


def _mapping(raw: Mapping[str, Any], key: str, check_key: re.Pattern[str],
             check_value: re.Pattern[str] | None) -> dict[str, str]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "expected an object")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str | int) or isinstance(v, bool) or not check_key.match(str(k)):
            raise ConfigError(f"{key}.{str(k)[:20]}", "malformed entry")
        if check_value is not None and not check_value.match(str(v)):
            raise ConfigError(f"{key}.{str(k)[:20]}", f"malformed value {str(v)[:20]!r}")
        out[sys.intern(str(k))] = sys.intern(str(v))
    return out


def parse(
    raw: Mapping[str, Any], crypto: Crypto, *, allow_private: bool = False
) -> RetailCrmConfig:
    """Validate a stored config; ``ConfigError`` names the first bad field.

    A disabled config may be incomplete (no domain, no key yet); an enabled one may not.
    ``allow_private``: see :func:`normalize_domain` (a stored private address is invalid
    unless the operator allows private CRMs).
    """
    enabled = _bool(raw, "enabled", False)
    domain_raw = raw.get("domain")
    if domain_raw is not None and not isinstance(domain_raw, str):
        raise ConfigError("domain", "expected a string")
    domain = normalize_domain(domain_raw, allow_private=allow_private) if domain_raw else ""
    token = raw.get("api_key")
    if token is not None and not isinstance(token, str):
        raise ConfigError("api_key", "expected the encrypted key as a string")
    api_key = crypto.decrypt(token, field="api_key") if token else ""
    if enabled and not (domain and api_key):
        raise ConfigError("domain" if not domain else "api_key", "is required when enabled")
    client_token = raw.get("client_id")
    if client_token is not None and not isinstance(client_token, str):
        raise ConfigError("client_id", "expected the encrypted clientId as a string")
    region = raw.get("region") or phones.DEFAULT_REGION
    if not isinstance(region, str) or not phones.is_valid_region(region):
        raise ConfigError("region", "expected a two-letter country code such as BY")
    time_zone = _zone(raw, "time_zone", DEFAULT_TIME_ZONE)
    version = raw.get("token_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError("token_version", "expected a non-negative integer")
    site = raw.get("site_code")
    if site is not None and not isinstance(site, str):
        raise ConfigError("site_code", "expected a string")
    last_sync = raw.get("last_sync")
    return RetailCrmConfig(
        enabled=enabled, domain=domain, api_key=api_key,
        **{k: _bool(raw, k, True) for k in SWITCHES},
        log_internal=_bool(raw, "log_internal", False),
        time_zone=time_zone, crm_time_zone=_zone(raw, "crm_time_zone", time_zone),
        region=sys.intern(region.upper().strip()),
        user_extensions=_mapping(raw, "user_extensions", _USER_ID, _EXTENSION),
        external_phones=_mapping(raw, "external_phones", _TRUNK, None),
        site_code=sys.intern(site) if site else None,
        client_id=crypto.decrypt(client_token, field="client_id") if client_token else None,
        token_version=version,
        last_sync=sys.intern(last_sync) if isinstance(last_sync, str) else None,
        sync_pending=raw.get("sync_pending") is True,
        skip_away_managers=_bool(raw, "skip_away_managers", True),
    )


# ---------------------------------------------------------------------- writing


async def write_keys(
    db: Executor, enterprise: str, values: Mapping[str, Any], *, only_missing: bool = False
) -> dict[str, Any] | None:
    """Set ``values`` inside ``integrations_config->'retailcrm'`` (one statement, that key
    only); the new stored value, or None when the enterprise does not exist.

    ``only_missing``: keys already stored keep their value (a secret generated once: of two
    racing writers, the first one's value stands and both get it back).
    """
    if only_missing:
        return await store.merge_integration_config_missing(db, enterprise, KEY, values)
    return await store.merge_integration_config(db, enterprise, KEY, values)


async def read_raw(db: Executor, enterprise: str) -> dict[str, Any] | None:
    """The stored (still encrypted) retailcrm key, or None."""
    return await store.read_integration_config(db, enterprise, KEY)


async def bump_token_version(db: Executor, enterprise: str) -> int | None:
    """token_version + 1, atomically: every admin link issued before is revoked."""
    return await store.bump_integration_counter(db, enterprise, KEY, "token_version")
