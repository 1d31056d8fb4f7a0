"""``crm-bridge retailcrm …``: an operator's commands for one enterprise's RetailCRM account.

::

    crm-bridge retailcrm configure ENTERPRISE [--domain D] [--api-key-file PATH|-]
              [--enable|--disable] [--time-zone TZ] [--crm-time-zone TZ] [--region CC]
              [--[no-]popup-incoming] [--[no-]popup-outgoing] [--[no-]popup-hangup]
              [--[no-]upload-history] [--[no-]upload-recordings] [--[no-]log-internal]
              [--site-code CODE] [--external-phone LINE=PHONE ...|--no-external-phones]
    crm-bridge retailcrm test ENTERPRISE             # GET /api/credentials, scopes
    crm-bridge retailcrm register ENTERPRISE         # register the module, switch it on
    crm-bridge retailcrm unregister ENTERPRISE       # deactivate, revoke, switch off
    crm-bridge retailcrm sync-extensions ENTERPRISE  # send the managers' numbers again
    crm-bridge retailcrm extensions show ENTERPRISE  # the managers' numbers
    crm-bridge retailcrm extensions set ENTERPRISE USER=NUMBER ...   # USER= removes one

Each prints one paragraph saying what happened (stdout on success, stderr on failure) and
exits 0 on success, 1 on failure. No secret is ever printed: the API key is read from a
file or standard input (never from the command line, where ``ps`` and shell histories see
it), encrypted at once and stored encrypted. ``configure`` and ``extensions set`` go
through the adapter's ``write_settings`` and ``save_extensions``, the very code the admin
pages and the JSON API call: everything is validated before anything is written, and
``configure`` never touches the managers' numbers. Each command builds what it needs (a
small pool, an HTTP session with timeouts, the adapter) and closes it before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import asyncpg

from daemon import db, egress, store
from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps, RegistrationResult
from daemon.integrations.retailcrm import RetailCrmAdapter, account
from daemon.integrations.retailcrm import config as cfg
from daemon.logs import mask
from daemon.settings import Settings

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
HTTP_TOTAL_S: Final = 15.0
HTTP_CONNECT_S: Final = 5.0
MAX_KEY_CHARS: Final = 256

Handler = Callable[[argparse.Namespace, Settings], int]


def register(subparsers: Any) -> None:
    """Add ``crm-bridge retailcrm`` and its subcommands to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "retailcrm", help="connect enterprises to RetailCRM and manage their module")
    sub = parser.add_subparsers(dest="retailcrm_command", required=True)
    simple: dict[str, tuple[str, Handler]] = {
        "test": ("check the stored domain and API key against RetailCRM", _test),
        "register": ("register the telephony module in RetailCRM and switch it on", _register),
        "unregister": ("deactivate the module, revoke its secrets, switch off", _unregister),
        "sync-extensions": ("send the managers' internal numbers to RetailCRM again", _sync),
    }
    for name, (help_text, handler) in simple.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("enterprise", help="the enterprise number")
        command.set_defaults(handler=handler)
    # No abbreviations: "--api-key SECRET" must be an error, not "--api-key-file SECRET".
    configure = sub.add_parser(
        "configure", help="store an enterprise's RetailCRM account (the key from a file or -)",
        allow_abbrev=False)
    configure.add_argument("enterprise", help="the enterprise number")
    configure.add_argument("--domain", help="the account address, e.g. demo.retailcrm.ru")
    configure.add_argument("--api-key-file", metavar="PATH|-",
                           help="read the API key from PATH, or from standard input with -")
    switch = configure.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_const", const=True,
                        help="switch the integration on")
    switch.add_argument("--disable", dest="enabled", action="store_const", const=False,
                        help="switch the integration off")
    configure.add_argument("--api-key", action=_RefuseKeyArgument, help=argparse.SUPPRESS)
    configure.add_argument("--time-zone", help="the Asterisk hosts' IANA zone, e.g. Europe/Minsk")
    configure.add_argument("--crm-time-zone",
                           help="the RetailCRM account's IANA zone (default: --time-zone)")
    configure.add_argument("--region", help="default phone region, e.g. BY")
    for name, what in SWITCH_HELP.items():
        configure.add_argument(f"--{name.replace('_', '-')}", dest=name,
                               action=argparse.BooleanOptionalAction, help=what)
    configure.add_argument("--site-code", help="the RetailCRM site (shop) code of the lines")
    lines = configure.add_mutually_exclusive_group()
    lines.add_argument("--external-phone", action="append", metavar="LINE=PHONE",
                       help="a line's own number (repeat for each line; replaces the list)")
    lines.add_argument("--no-external-phones", action="store_true",
                       help="forget every line's number")
    configure.set_defaults(handler=_configure)
    numbers = sub.add_parser("extensions", help="the managers' internal numbers")
    numbers_sub = numbers.add_subparsers(dest="extensions_command", required=True)
    show = numbers_sub.add_parser("show", help="print the managers' numbers")
    show.add_argument("enterprise", help="the enterprise number")
    show.set_defaults(handler=_extensions_show)
    assign = numbers_sub.add_parser(
        "set", help="assign numbers (a number another manager has moves; USER= removes)")
    assign.add_argument("enterprise", help="the enterprise number")
    assign.add_argument("assignments", nargs="+", metavar="USER=NUMBER",
                        help="RetailCRM user id = internal number")
    assign.set_defaults(handler=_extensions_set)


SWITCH_HELP: Final = {
    "popup_incoming": "call cards of incoming calls", "popup_outgoing": "of outgoing calls",
    "popup_hangup": "hangup events", "upload_history": "upload finished calls",
    "upload_recordings": "with their recordings", "log_internal": "internal calls too",
    "skip_away_managers": "smart redirect rings no manager on break or at dinner",
}


class _RefuseKeyArgument(argparse.Action):
    """``--api-key VALUE``: refused without echoing VALUE (argparse would print it back as
    an unrecognized argument)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("--api-key is not accepted: a key on the command line shows in ps and "
                     "in shell histories; use --api-key-file PATH, or - to read standard input")


# ---------------------------------------------------------------------- plumbing


@dataclass(frozen=True, slots=True)
class _Tools:
    pool: asyncpg.Pool
    crypto: Crypto
    adapter: RetailCrmAdapter


@asynccontextmanager
async def _tools(settings: Settings) -> AsyncIterator[_Tools]:
    pool = await db.create_pool(
        settings.database_url, min_size=1, max_size=3,
        command_timeout_s=settings.db_command_timeout_s,
        application_name="crm-bridge:retailcrm-cli")
    try:
        timeout = aiohttp.ClientTimeout(total=HTTP_TOTAL_S, connect=HTTP_CONNECT_S)
        connector = egress.connector(allow_private=settings.allow_private_crm)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            crypto = Crypto(settings.encryption_keys, settings.secret_key)
            adapter = load(cfg.KEY, AdapterDeps(
                crypto=crypto, http=http, pool=pool, public_url=settings.public_url,
                secret_key=settings.secret_key, settings=settings.adapter_settings()))
            assert isinstance(adapter, RetailCrmAdapter)
            yield _Tools(pool, crypto, adapter)
    finally:
        await pool.close()


def _run(settings: Settings, work: Callable[[_Tools], Awaitable[tuple[bool, str]]]) -> int:
    async def main() -> tuple[bool, str]:
        async with _tools(settings) as tools:
            return await work(tools)

    ok, text = asyncio.run(main())
    print(text, file=sys.stdout if ok else sys.stderr, flush=True)
    return EXIT_OK if ok else EXIT_FAILED


def _said(result: RegistrationResult) -> tuple[bool, str]:
    text = result.message
    if result.warnings:
        text += " Warnings: " + " ".join(result.warnings)
    return result.ok, text


# ---------------------------------------------------------------------- commands


def _test(args: argparse.Namespace, settings: Settings) -> int:
    async def work(tools: _Tools) -> tuple[bool, str]:
        raw = await cfg.read_raw(tools.pool, args.enterprise)
        if raw is None:
            return False, (f"Enterprise {args.enterprise} has no RetailCRM configuration (or "
                           "does not exist): run crm-bridge retailcrm configure first.")
        try:
            config = tools.adapter.parse_config(raw)
        except ConfigError as exc:
            return False, f"The stored RetailCRM configuration is invalid: {exc}."
        check = await tools.adapter.check_credentials(config)
        return check.ok, mask(check.message, config.secrets())

    return _run(settings, work)


def _register(args: argparse.Namespace, settings: Settings) -> int:
    async def work(tools: _Tools) -> tuple[bool, str]:
        return _said(await tools.adapter.register(args.enterprise))

    return _run(settings, work)


def _unregister(args: argparse.Namespace, settings: Settings) -> int:
    async def work(tools: _Tools) -> tuple[bool, str]:
        return _said(await tools.adapter.unregister(args.enterprise))

    return _run(settings, work)


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    async def work(tools: _Tools) -> tuple[bool, str]:
        return _said(await tools.adapter.sync_extensions(args.enterprise))

    return _run(settings, work)


def _configure(args: argparse.Namespace, settings: Settings) -> int:
    try:
        changes = _changes(args)
        account.encode(changes, Crypto(settings.encryption_keys, settings.secret_key),
                       allow_private=settings.allow_private_crm)
    except ConfigError as exc:
        print(f"Nothing was saved: {exc}.", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if not changes:
        print("Nothing to save: give --domain, --api-key-file, --enable/--disable, "
              "--time-zone, --region or another setting (see --help).", file=sys.stderr,
              flush=True)
        return EXIT_FAILED

    async def work(tools: _Tools) -> tuple[bool, str]:
        if await store.load_enterprise(tools.pool, cfg.KEY, args.enterprise) is None:
            return False, f"Nothing was saved: there is no enterprise {args.enterprise}."
        try:
            view = await tools.adapter.write_settings(args.enterprise, changes)
        except ConfigError as exc:
            return False, f"Nothing was saved: {exc}."
        return True, _configured(args.enterprise, view, "api_key" in changes)

    return _run(settings, work)


def _extensions_show(args: argparse.Namespace, settings: Settings) -> int:
    async def work(tools: _Tools) -> tuple[bool, str]:
        if await store.load_enterprise(tools.pool, cfg.KEY, args.enterprise) is None:
            return False, f"There is no enterprise {args.enterprise}."
        mapped = await tools.adapter.extensions(args.enterprise)
        listed = ", ".join(f"manager {uid} → {number}" for uid, number in mapped.items())
        return True, (f"Enterprise {args.enterprise}: {listed}." if listed else
                      f"Enterprise {args.enterprise}: no manager has an internal number.")

    return _run(settings, work)


def _extensions_set(args: argparse.Namespace, settings: Settings) -> int:
    assignments: dict[str, str | None] = {}
    for item in args.assignments:
        user, sep, number = item.partition("=")
        if not sep or not user.strip():
            print(f"Nothing was saved: {item[:40]!r}: expected USER=NUMBER (USER= removes).",
                  file=sys.stderr, flush=True)
            return EXIT_FAILED
        assignments[user.strip()] = number.strip() or None

    async def work(tools: _Tools) -> tuple[bool, str]:
        if await store.load_enterprise(tools.pool, cfg.KEY, args.enterprise) is None:
            return False, f"Nothing was saved: there is no enterprise {args.enterprise}."
        try:
            saved = await tools.adapter.save_extensions(args.enterprise, assignments)
        except ConfigError as exc:
            return False, f"Nothing was saved: {exc}."
        text = saved.message
        if saved.warnings:
            text += " Warnings: " + " ".join(saved.warnings)
        return True, text

    return _run(settings, work)


def _read_key(source: str) -> str:
    """The API key from a file or ``-`` (stdin); ``ConfigError('api_key')`` when unusable."""
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as handle:
                text = handle.read(MAX_KEY_CHARS * 4)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("api_key", f"cannot read the key file ({type(exc).__name__})") from None
    key = text.strip()
    if not key:
        raise ConfigError("api_key", "the key file is empty")
    if len(key) > MAX_KEY_CHARS or any(ch.isspace() for ch in key):
        raise ConfigError("api_key", "the key file must hold the key alone, on one line")
    return key


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a partial update of the settings (the API's field names)."""
    changes: dict[str, Any] = {}
    if args.api_key_file:
        changes["api_key"] = _read_key(args.api_key_file)
    for name in ("domain", "enabled", "time_zone", "crm_time_zone", "region", "site_code",
                 *SWITCH_HELP):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.no_external_phones:
        changes["external_phones"] = {}
    elif args.external_phone:
        phones: dict[str, str] = {}
        for item in args.external_phone:
            line, sep, phone = item.partition("=")
            if not sep:
                raise ConfigError("external_phones", f"{item[:40]!r}: expected LINE=PHONE")
            phones[line.strip()] = phone.strip()
        changes["external_phones"] = phones
    return changes


def _configured(enterprise: str, view: Mapping[str, Any], new_key: bool) -> str:
    key = "replaced (stored encrypted)" if new_key else (
        "unchanged" if view["api_key_set"] else "not set")
    state = "on" if view["enabled"] else "off"
    switches = ", ".join(name for name in SWITCH_HELP if view[name]) or "none"
    return (f"Saved the RetailCRM settings of enterprise {enterprise}: domain "
            f"{view['domain'] or 'not set'}, API key {key}, integration {state}, time zone "
            f"{view['time_zone']}, phone region {view['region']}, switches on: {switches}, "
            f"{len(view['external_phones'])} line number(s), site code "
            f"{view['site_code'] or 'not set'}; {len(view['user_extensions'])} manager "
            f"number(s) kept. Next: crm-bridge retailcrm test {enterprise}, then crm-bridge "
            f"retailcrm register {enterprise}.")
