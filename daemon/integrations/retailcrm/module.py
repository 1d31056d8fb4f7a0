"""The telephony module crm-bridge registers in each enterprise's RetailCRM account.

Owns the ``integrationModule`` object (docs/retailcrm.md, "The module registration") and its
life cycle in one account: :func:`build` makes the object (pure), :class:`Registrar` registers,
re-syncs and unregisters it, keeping the stored configuration in step.

What the module says (``<base>`` = ``CRM_BRIDGE_PUBLIC_URL`` + ``/retailcrm``):

* ``code`` and ``integrationCode`` = ``CRM_BRIDGE_RETAILCRM_MODULE_CODE`` (``vochi-telephony``),
  ``name`` = ``CRM_BRIDGE_RETAILCRM_MODULE_NAME`` (``Vochi-CRM``), ``active``;
* ``logo`` = ``<base>/logo.svg`` (served by this daemon), ``baseUrl`` = ``<base>``;
* ``clientId`` = the enterprise's callback secret: 256 random bits, generated once, stored
  encrypted, kept across registrations and replaced by unregistering;
* ``accountUrl`` = ``<public>/retailcrm-admin/?token=<JWT>`` (:mod:`daemon.links`, valid
  ``ACCOUNT_LINK_TTL_S``; the reconciliation re-registers every ``LINK_REFRESH_S`` so the
  link RetailCRM shows never expires while the integration is on; left out when
  deactivating);
* ``actions.activity`` = ``/actions/activity`` (relative to ``baseUrl``);
* ``integrations.telephony``: ``makeCallUrl`` (``<base>/make-call``), ``changeUserStatusUrl``
  (``<base>/user-status``), ``allowEdit`` false, ``inputEventSupported`` /
  ``outputEventSupported`` / ``hangupEventSupported`` from the popup switches,
  ``additionalCodes`` from ``user_extensions`` (``userId`` as a string, as the official Go
  client sends it) and ``externalPhones`` from ``external_phones`` with ``site_code``.

Every configuration write goes through ``config.write_keys``. Each edit sent to RetailCRM
leaves one ``integration_logs`` row (``event_type`` ``module_edit``), masked like delivery
rows: the clientId, the link and the API key never reach it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import structlog

from daemon import db, links, store
from daemon.errors import AuthFailed, ConfigError, DeliveryError, Retryable
from daemon.integrations.base import AdapterDeps, Exchange, RegistrationResult
from daemon.integrations.retailcrm import config as cfg
from daemon.integrations.retailcrm.client import account_client
from daemon.logs import mask

log = structlog.get_logger(__name__)

DEFAULT_CODE: Final = "vochi-telephony"
DEFAULT_NAME: Final = "Vochi-CRM"
ACTIVITY_PATH: Final = "/actions/activity"
MAKE_CALL_PATH: Final = "/make-call"
USER_STATUS_PATH: Final = "/user-status"
LOGO_PATH: Final = "/logo.svg"
ADMIN_PATH: Final = "/retailcrm-admin/"
ACCOUNT_LINK_TTL_S: Final = 30 * 86_400.0
LINK_REFRESH_S: Final = 10 * 86_400.0
EDIT_TIMEOUT_S: Final = 5.0
CLIENT_ID_BYTES: Final = 32  # 256 bits
LOG_EVENT: Final = "module_edit"
HOLD_DEACTIVATED: Final = "deactivated"


@dataclass(frozen=True, slots=True)
class ModuleIdentity:
    """Who the module is: its code and name (settings) and where this daemon is reached."""

    code: str
    name: str
    public_url: str

    @classmethod
    def from_deps(cls, deps: AdapterDeps) -> ModuleIdentity:
        """From ``AdapterDeps.settings`` (``retailcrm_module_code``/``_name``, defaults)."""
        code = deps.settings.get("retailcrm_module_code") or DEFAULT_CODE
        name = deps.settings.get("retailcrm_module_name") or DEFAULT_NAME
        return cls(str(code), str(name), deps.public_url.rstrip("/"))

    @property
    def base_url(self) -> str:
        """``baseUrl``: where RetailCRM's callbacks to this daemon go."""
        return f"{self.public_url}/{cfg.KEY}"


def new_client_id() -> str:
    """A fresh callback secret (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(CLIENT_ID_BYTES)


def account_url(identity: ModuleIdentity, secret_key: str, enterprise: str, token_version: int,
                *, now: float | None = None) -> str:
    """The ``accountUrl``: the admin pages of ``enterprise`` behind a signed link."""
    token = links.create(secret_key, enterprise, cfg.KEY, token_version,
                         ttl_s=ACCOUNT_LINK_TTL_S, now=now)
    return f"{identity.public_url}{ADMIN_PATH}?token={token}"


def additional_codes(user_extensions: Mapping[str, str]) -> list[dict[str, str]]:
    """``[{userId, code}]`` for every mapped manager, by user id."""
    return [{"userId": uid, "code": code}
            for uid, code in sorted(user_extensions.items(), key=lambda kv: int(kv[0]))]


def external_phones(config: cfg.RetailCrmConfig) -> list[dict[str, str]]:
    """``[{siteCode, externalPhone}]``: the lines' own numbers (none without a site code)."""
    if not config.site_code:
        return []
    unique = sorted(set(config.external_phones.values()))
    return [{"siteCode": config.site_code, "externalPhone": phone} for phone in unique]


def build(identity: ModuleIdentity, config: cfg.RetailCrmConfig, *, client_id: str,
          account_link: str | None, active: bool) -> dict[str, Any]:
    """The ``integrationModule`` object for one enterprise (see the module docstring)."""
    base = identity.base_url
    telephony = {
        "makeCallUrl": base + MAKE_CALL_PATH,
        "changeUserStatusUrl": base + USER_STATUS_PATH,
        "allowEdit": False,
        "inputEventSupported": config.popup_incoming,
        "outputEventSupported": config.popup_outgoing,
        "hangupEventSupported": config.popup_hangup,
        "additionalCodes": additional_codes(config.user_extensions),
        "externalPhones": external_phones(config),
    }
    module: dict[str, Any] = {
        "code": identity.code, "integrationCode": identity.code, "active": active,
        "name": identity.name, "logo": base + LOGO_PATH, "baseUrl": base,
        "clientId": client_id, "actions": {"activity": ACTIVITY_PATH},
        "integrations": {"telephony": telephony},
    }
    if account_link is not None:
        module["accountUrl"] = account_link
    return module


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class _Loaded:
    config: cfg.RetailCrmConfig | None
    deactivated: bool
    problem: RegistrationResult | None = None


class Registrar:
    """Registers, re-syncs and unregisters one enterprise's module (see the module doc)."""

    def __init__(self, deps: AdapterDeps, identity: ModuleIdentity) -> None:
        self._deps = deps
        self.identity = identity
        self._allow_private = cfg.allows_private(deps.settings)

    # ------------------------------------------------------------------ operations

    async def register(self, enterprise: str) -> RegistrationResult:
        """Register or update the module (active) and switch the integration on.

        Lifts a ``deactivated`` hold on success: registering is the operator saying so.
        A failure changes nothing but a clientId generated for it (kept for the next try).
        """
        loaded = await self._load(enterprise)
        if loaded.problem is not None or loaded.config is None:
            return loaded.problem or _not_configured(enterprise)
        if (missing := _credentials_problem(loaded.config)) is not None:
            return missing
        config = await self._ensure_client_id(enterprise, loaded.config)
        if config is None:
            return _unknown(enterprise)
        result = await self._edit(enterprise, config, active=True, verb="Registered")
        if result.ok:
            await cfg.write_keys(self._deps.pool, enterprise,
                                 {"enabled": True, "sync_pending": False, "last_sync": _now()})
            if await store.lift_hold(self._deps.pool, enterprise, cfg.KEY, HOLD_DEACTIVATED):
                log.info("module_reactivated", enterprise=enterprise, by="register")
        log.info("module_registered" if result.ok else "module_registration_failed",
                 enterprise=enterprise, error_id=result.error_id)
        return result

    async def sync(self, enterprise: str) -> RegistrationResult:
        """Send the current module (manager codes, switches, a fresh link) to RetailCRM.

        For an integration that is on: success clears ``sync_pending`` and sets
        ``last_sync``; a failure, or a module RetailCRM has deactivated, leaves
        ``sync_pending`` true for the reconciliation. An integration that is off or not
        configured is not touched (``error_id`` ``not_connected``).
        """
        loaded = await self._load(enterprise)
        if loaded.problem is not None or loaded.config is None:
            return loaded.problem or _not_configured(enterprise)
        config = loaded.config
        if not config.enabled or _credentials_problem(config) is not None:
            return RegistrationResult(
                ok=False, error_id="not_connected",
                message=f"RetailCRM is not connected for enterprise {enterprise}: nothing was "
                "sent; the managers' numbers go to RetailCRM when the module is registered.")
        pool = self._deps.pool
        if loaded.deactivated:
            await cfg.write_keys(pool, enterprise, {"sync_pending": True})
            return RegistrationResult(
                ok=False, error_id="deactivated",
                message="RetailCRM has deactivated (or frozen) the module: nothing was sent; "
                "the sync is pending and happens once RetailCRM reports it active again.")
        ensured = await self._ensure_client_id(enterprise, config)
        if ensured is None:
            return _unknown(enterprise)
        result = await self._edit(enterprise, ensured, active=True, verb="Updated")
        if result.ok:
            await cfg.write_keys(pool, enterprise, {"sync_pending": False, "last_sync": _now()})
        else:
            await cfg.write_keys(pool, enterprise, {"sync_pending": True})
        log.info("module_synced" if result.ok else "module_sync_failed", enterprise=enterprise,
                 error_id=result.error_id)
        return result

    async def unregister(self, enterprise: str) -> RegistrationResult:
        """Deactivate the module in RetailCRM, then locally: ``token_version`` + 1 (every
        admin link dies), a new clientId (the old one stops resolving), ``enabled`` false.
        ``user_extensions`` stay for a later reconnect. The local part happens even when
        RetailCRM cannot be told; the result then says so and is not ok."""
        loaded = await self._load(enterprise)
        if loaded.problem is not None and loaded.problem.error_id != "config":
            return loaded.problem
        config = loaded.config
        if config is None:
            remote = loaded.problem or _not_configured(enterprise)
        elif config.client_id is None:
            remote = RegistrationResult(ok=True, message="No module was registered in RetailCRM.")
        elif (missing := _credentials_problem(config)) is not None:
            remote = missing
        else:
            remote = await self._edit(enterprise, config, active=False, verb="Deactivated")
        pool = self._deps.pool
        async with pool.acquire() as conn, conn.transaction():
            version = await cfg.bump_token_version(conn, enterprise)
            await cfg.write_keys(conn, enterprise, {
                "client_id": self._deps.crypto.encrypt(new_client_id()), "enabled": False,
                "sync_pending": False,
            })
        log.info("module_unregistered", enterprise=enterprise, remote_ok=remote.ok,
                 token_version=version)
        local = (f"Locally: the integration is off for enterprise {enterprise}, every admin "
                 "link and the old clientId are revoked; the managers' numbers are kept.")
        if remote.ok:
            return RegistrationResult(ok=True, message=f"{remote.message} {local}",
                                      warnings=remote.warnings,
                                      unknown_users=remote.unknown_users)
        return RegistrationResult(
            ok=False, error_id=remote.error_id, details=remote.details,
            message=f"RetailCRM was not updated: {remote.message} {local}")

    # ------------------------------------------------------------------ pieces

    async def _load(self, enterprise: str) -> _Loaded:
        deactivated = False
        try:
            row = await store.load_enterprise(self._deps.pool, cfg.KEY, enterprise)
            if row is None:
                return _Loaded(None, False, _unknown(enterprise))
            raw = row["config"]
            deactivated = HOLD_DEACTIVATED in (row["holds"] or {})
            if not isinstance(raw, Mapping):
                return _Loaded(None, deactivated, _not_configured(enterprise))
            return _Loaded(cfg.parse(raw, self._deps.crypto, allow_private=self._allow_private),
                           deactivated)
        except ConfigError as exc:
            problem = RegistrationResult(
                ok=False, error_id="config", details={exc.field: exc.message},
                message=f"The stored RetailCRM configuration of enterprise {enterprise} is "
                f"invalid: {exc}.")
            return _Loaded(None, deactivated, problem)

    async def _ensure_client_id(self, enterprise: str,
                                config: cfg.RetailCrmConfig) -> cfg.RetailCrmConfig | None:
        """``config`` with a clientId: the stored one, else a new one stored now (of two
        racing registrations, both get the first one's). None: the enterprise is gone."""
        if config.client_id is not None:
            return config
        stored = await cfg.write_keys(
            self._deps.pool, enterprise,
            {"client_id": self._deps.crypto.encrypt(new_client_id())}, only_missing=True)
        return None if stored is None else cfg.parse(stored, self._deps.crypto,
                                                     allow_private=self._allow_private)

    async def _edit(self, enterprise: str, config: cfg.RetailCrmConfig, *,
                    active: bool, verb: str) -> RegistrationResult:
        assert config.client_id is not None
        link = None
        if active:
            link = account_url(self.identity, self._deps.secret_key, enterprise,
                               config.token_version)
        module = build(self.identity, config, client_id=config.client_id, account_link=link,
                       active=active)
        exchanges: list[Exchange] = []
        hidden = (*config.secrets(), *filter(None, [link]))
        client = account_client(self._deps, config, timeout_s=EDIT_TIMEOUT_S,
                                on_exchange=exchanges.append, hidden=hidden)
        try:
            answer = await client.edit_module(self.identity.code, module)
        except DeliveryError as exc:
            result = _failure(exc, config)
        else:
            result = _success(answer, config, self.identity, verb)
        # RetailCRM's answer is quoted either way (an error's text, the users and sites it
        # does not know): mask what it may echo back (the clientId, the link, the key).
        result = _masked(result, hidden)
        await self._log(enterprise, config, exchanges, result, link)
        return result

    async def _log(self, enterprise: str, config: cfg.RetailCrmConfig,
                   exchanges: list[Exchange], result: RegistrationResult,
                   link: str | None) -> None:
        hidden = (*config.secrets(), *((link,) if link else ()))
        for exchange in exchanges:
            request = mask({"method": exchange.method, "path": exchange.path,
                            "body": exchange.request}, hidden)
            response = mask({"status": exchange.status, "body": exchange.response}, hidden)
            error = None if result.ok else mask(result.message, hidden)
            try:
                await store.insert_log(self._deps.pool, enterprise, cfg.KEY, LOG_EVENT,
                                       request, response, result.ok, error)
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                log.warning("module_log_not_written", enterprise=enterprise,
                            error=type(exc).__name__)


def _unknown(enterprise: str) -> RegistrationResult:
    return RegistrationResult(ok=False, error_id="unknown_enterprise",
                              message=f"There is no enterprise {enterprise}.",
                              details={"enterprise": "unknown"})


def _not_configured(enterprise: str) -> RegistrationResult:
    return RegistrationResult(
        ok=False, error_id="not_configured", details={"domain": "is required"},
        message=f"RetailCRM is not configured for enterprise {enterprise}: set the account "
        "domain and API key first (crm-bridge retailcrm configure).")


def _credentials_problem(config: cfg.RetailCrmConfig) -> RegistrationResult | None:
    if config.domain and config.api_key:
        return None
    field = "domain" if not config.domain else "api_key"
    return RegistrationResult(
        ok=False, error_id="not_configured", details={field: "is required"},
        message=f"RetailCRM is not configured: {field} is missing "
        "(crm-bridge retailcrm configure).")


def _failure(exc: DeliveryError, config: cfg.RetailCrmConfig) -> RegistrationResult:
    """A refused or failed module edit, said plainly (RetailCRM's field errors kept)."""
    details = _field_errors(exc.details)
    if exc.error_id == "payment_required":
        return RegistrationResult(
            ok=False, error_id="payment_required", details=details,
            message=f"RetailCRM at {config.domain} refused to edit the module: the RetailCRM "
            "account must be paid to edit modules (HTTP 402). Pay for the account, then "
            "register again.")
    if isinstance(exc, AuthFailed):
        return RegistrationResult(
            ok=False, error_id="auth_failed",
            message=f"RetailCRM at {config.domain} rejected the API key: check the key and "
            "its permissions (crm-bridge retailcrm configure, then test).")
    if isinstance(exc, Retryable):
        return RegistrationResult(
            ok=False, error_id="unavailable",
            message=f"RetailCRM could not be reached or failed ({exc.message}); nothing "
            "changed there, try again later.")
    if details:
        listed = "; ".join(f"{k}: {v}" for k, v in details.items())
        return RegistrationResult(
            ok=False, error_id="invalid_module", details=details,
            message=f"RetailCRM rejected the module as invalid (HTTP {exc.status}): {listed}.")
    return RegistrationResult(ok=False, error_id="refused",
                              message=f"RetailCRM refused the module: {exc.message}.")


def _masked(result: RegistrationResult, hidden: tuple[str, ...]) -> RegistrationResult:
    return dataclasses.replace(
        result, message=mask(result.message, hidden), details=mask(dict(result.details), hidden),
        warnings=tuple(mask(list(result.warnings), hidden)),
        unknown_users=tuple(mask(list(result.unknown_users), hidden)))


def _field_errors(details: Any) -> dict[str, str]:
    if isinstance(details, Mapping):
        return {str(k): str(v) for k, v in details.items()}
    if isinstance(details, list):
        return {f"errors[{i}]": str(v) for i, v in enumerate(details)}
    return {}


def _success(answer: Mapping[str, Any], config: cfg.RetailCrmConfig,
             identity: ModuleIdentity, verb: str) -> RegistrationResult:
    info = answer.get("info") if isinstance(answer.get("info"), Mapping) else {}
    assert isinstance(info, Mapping)
    warnings: list[str] = []
    unknown = [str(u) for u in info.get("notExistUsersIds") or []]
    if unknown:
        warnings.append(
            f"RetailCRM does not know the users {', '.join(unknown)} (notExistUsersIds): "
            "their extensions were not registered; reassign or remove them.")
    sites = [str(s) for s in info.get("notExistSiteCodes") or []]
    if sites:
        warnings.append(f"RetailCRM does not know the site codes {', '.join(sites)} "
                        "(notExistSiteCodes): the lines' numbers were not registered.")
    if config.external_phones and not config.site_code:
        warnings.append("external_phones are configured but site_code is not: the lines' "
                        "numbers were not registered.")
    message = f"{verb} the module {identity.code!r} in RetailCRM at {config.domain}"
    if verb == "Deactivated":
        message += "."
    else:
        switches = ", ".join(f"{name} {'on' if on else 'off'}" for name, on in (
            ("incoming", config.popup_incoming), ("outgoing", config.popup_outgoing),
            ("hangup", config.popup_hangup)))
        message += (f": {len(config.user_extensions)} manager extension(s), call cards "
                    f"{switches}.")
    return RegistrationResult(ok=True, message=message, warnings=tuple(warnings),
                              unknown_users=tuple(unknown))
