"""The command line and composition root: ``crm-bridge run | migrate | check | admin-link | ...``.

Each subcommand reads the settings it needs, configures logging, and runs one coroutine.
A command prints its result on stdout and logs to stderr; ``run`` logs to stdout (a
service's log stream). An operator's mistake — bad settings, an unknown integration, a
database that cannot be reached, a port already taken — is one line on stderr, never a
traceback. Exit codes: 0 success, 1 failure (a crashed task, a failed check, an unreachable
database), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from daemon import (
    __version__,
    collector,
    db,
    devmode,
    links,
    logconfig,
    retention,
    runtime,
    sdnotify,
    store,
)
from daemon.integrations import (
    UnknownIntegration,
    available,
    integration_type,
    module_name,
)
from daemon.migrate import MigrationError, find_sql_dir, load_migrations, migrate, pending
from daemon.settings import Settings, SettingsError, load, load_database, mask_url_password

log = structlog.get_logger("crm_bridge")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SIGNAL_ECHO_S = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crm-bridge",
        description="Deliver the PBX platform's call events to CRMs. "
        "Configured by CRM_BRIDGE_* environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"crm-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--integration", help="adapter to run (default CRM_BRIDGE_INTEGRATION)")
    sub.add_parser("migrate", help="apply the database migrations (idempotent)")
    check = sub.add_parser("check", help="validate settings, reach the database, find "
                           "pending migrations and ambiguous Tokens")
    check.add_argument("--integration")
    sub.add_parser("genkey", help="print a new key for CRM_BRIDGE_ENCRYPTION_KEYS")
    replay = sub.add_parser("replay", help="put failed deliveries back in the queue")
    replay.add_argument("--integration")
    replay.add_argument("--enterprise", help="only this enterprise")
    replay.add_argument("--since", type=_timestamp, help="events received at or after (ISO 8601)")
    replay.add_argument("--until", type=_timestamp, help="events received before (ISO 8601)")
    replay.add_argument("--status", choices=["failed", "skipped"], action="append",
                        help="which settled deliveries (default: failed)")
    replay.add_argument("--call", help="only this call (its UniqueId)")
    link = sub.add_parser("admin-link", help="print a link that opens one enterprise's admin "
                          "pages (for operators and demos)")
    link.add_argument("enterprise", help="the enterprise number")
    link.add_argument("--ttl", type=_duration, default=links.DEFAULT_TTL_S,
                      help="how long the link opens the pages: seconds, or with s/m/h/d "
                      "(default 7d, at most 366d)")
    link.add_argument("--integration")
    purge = sub.add_parser("purge", help="delete delivered events older than the retention")
    purge.add_argument("--older-than-days", type=float,
                       help="override CRM_BRIDGE_RETENTION_DAYS for this run")
    for name in available():
        _adapter_commands(sub, name)
    return parser


def _adapter_commands(sub: Any, name: str) -> None:
    """Let adapter ``name`` add ``crm-bridge <name> ...`` (its ``commands`` module, if any).

    The module's ``register(subparsers)`` adds one parser whose ``handler`` default is a
    ``Callable[[argparse.Namespace, Settings], int]``.
    """
    try:
        module = importlib.import_module(f"{module_name(name)}.commands")
    except ModuleNotFoundError:
        return
    module.register(sub)


def _timestamp(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {raw!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration(raw: str) -> float:
    text = raw.strip().lower()
    unit = _UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 12h, 7d..., got {raw!r}") from None
    if not 0 < value <= links.MAX_TTL_S:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 366d")
    return value


class ListenError(Exception):
    """The HTTP server could not bind its address (taken, not ours, not allowed)."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            text = (f"port {port} is already in use ({where}): stop what holds it, or set "
                    f"CRM_BRIDGE_PORT to a free port (in development: CRM_BRIDGE_PORT="
                    f"{port + 1} make run)")
        else:
            text = (f"cannot listen on {where}: {exc.strerror or exc}; check CRM_BRIDGE_HOST "
                    "and CRM_BRIDGE_PORT")
        super().__init__(text)


class DatabaseUnreachable(Exception):
    """A command could not reach (or use) the database at start; the message says why."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crm-bridge`` console script and ``python -m daemon``."""
    args = _parser().parse_args(argv)
    args.environ, args.dev_env = dict(os.environ), None
    try:
        args.environ, args.dev_env = devmode.environment(os.environ, devmode.checkout())
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args, _settings(args)))
        command: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
        return command(args)
    except SettingsError as exc:
        return _say(f"configuration error: {exc}", EXIT_USAGE)
    except MigrationError as exc:
        return _say(f"migration error: {exc}", EXIT_FAILED)
    except UnknownIntegration as exc:
        return _say(str(exc), EXIT_USAGE)
    except ListenError as exc:
        return _say(str(exc), EXIT_FAILED)
    except Exception as exc:
        reason = _database_failure(exc, args.environ)
        if reason is None:
            raise
        return _say(reason, EXIT_FAILED)


def _say(text: str, code: int) -> int:
    print(f"crm-bridge: {text}", file=sys.stderr, flush=True)
    return code


# What a database that refuses us for good raises at connect time (no such database, bad
# password); everything that means "cannot be reached now" is ``db.unavailable``.
_REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)


def _database_failure(exc: BaseException, environ: Mapping[str, str]) -> str | None:
    """One line saying why the database could not be used, or None for any other error."""
    url = mask_url_password(environ.get("CRM_BRIDGE_DATABASE_URL", "")) or "(not set)"
    detail = logconfig.scrub_text(str(exc).strip() or type(exc).__name__)
    if isinstance(exc, asyncpg.UndefinedTableError):
        return (f"the database at {url} is not migrated ({detail}): run crm-bridge migrate "
                "first")
    if db.unavailable(exc) or isinstance(exc, _REFUSED):
        return (f"cannot reach the database at {url}: {detail} (is PostgreSQL running? "
                "check CRM_BRIDGE_DATABASE_URL)")
    return None


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(args.environ, integration=getattr(args, "integration", None))
    _log_to(args, settings.log_format, settings.log_level)
    if args.dev_env is not None:
        log.warning("dev_mode", secrets_from=str(args.dev_env),
                    note="development mode: throwaway secrets; never use it in production")
    elif settings.generated:
        log.warning(
            "dev_mode_throwaway_secrets", variables=list(settings.generated),
            note="generated for this run only; never use dev mode in production",
        )
    return settings


def _log_to(args: argparse.Namespace, log_format: str, level: str = "info") -> None:
    """The daemon logs to stdout (a service's stream); a command to stderr (its stdout is
    its result)."""
    logconfig.configure(log_format, level, sys.stdout if args.command == "run" else sys.stderr)


def _cmd_genkey(_args: argparse.Namespace) -> int:
    from cryptography.fernet import Fernet

    print(Fernet.generate_key().decode("ascii"))
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    url, sql_dir = load_database(args.environ)
    _log_to(args, args.environ.get("CRM_BRIDGE_LOG_FORMAT", "auto"))
    return asyncio.run(_migrate(url, sql_dir))


async def _migrate(url: str, sql_dir: str) -> int:
    migrations = load_migrations(find_sql_dir(sql_dir))
    conn = await db.connect(url, command_timeout_s=300.0, application_name="crm-bridge:migrate")
    try:
        applied = await migrate(conn, migrations)
    finally:
        await conn.close()
    latest = migrations[-1].version if migrations else None
    log.info("migrations_done", applied=[m.version for m in applied], latest=latest)
    if applied:
        print(f"applied {len(applied)} migration(s): "
              f"{', '.join(str(m.version) for m in applied)}; the database is at {latest}")
    else:
        print(f"the database is up to date (at {latest})")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    integration_type(settings.integration)  # UnknownIntegration: exit 2, as ``run`` does
    return asyncio.run(_check(settings))


async def _check(settings: Settings) -> int:
    conn = await db.connect(settings.database_url, command_timeout_s=10.0)
    try:
        missing = await pending(conn, load_migrations(find_sql_dir(settings.sql_dir)))
        ambiguous = [] if missing else await store.ambiguous_tokens(conn)
    finally:
        await conn.close()
    if missing:
        log.error("migrations_pending", versions=[m.version for m in missing])
        return _say(f"migrations pending: {', '.join(str(m.version) for m in missing)}; "
                    "run crm-bridge migrate", EXIT_FAILED)
    if ambiguous:
        # Events carrying these Tokens are refused (docs/events.md): the operator must
        # give each of these enterprises a Token of its own.
        log.error("ambiguous_tokens", count=len(ambiguous))
        for row in ambiguous:
            shown = repr(row["token"]) if row["level"] == "name2" else "(a secret, not shown)"
            _say(f"ambiguous Token {shown}: the {row['level']} of active enterprises "
                 f"{', '.join(row['enterprises'])}; their events are refused", EXIT_FAILED)
        return EXIT_FAILED
    log.info("check_ok", settings=settings.describe())
    print(f"ok: settings valid, integration {settings.integration}, database "
          f"{mask_url_password(settings.database_url)} reachable and migrated")
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    settings = _settings(args)
    return asyncio.run(_replay(settings, args))


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    conn = await db.connect(settings.database_url)
    try:
        count = await store.replay(
            conn, integration_type(settings.integration), statuses=args.status or ["failed"],
            enterprise=args.enterprise, since=args.since, until=args.until, call=args.call,
        )
    finally:
        await conn.close()
    log.info("replayed", count=count, integration=integration_type(settings.integration))
    print(f"{count} deliveries put back in the queue")
    return EXIT_OK


def _cmd_purge(args: argparse.Namespace) -> int:
    settings = _settings(args)
    days = args.older_than_days if args.older_than_days is not None else settings.retention_days
    return asyncio.run(_purge(settings, days))


async def _purge(settings: Settings, days: float) -> int:
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        removed = await retention.purge(pool, days * 86_400)
    finally:
        await pool.close()
    log.info("purged", count=removed, older_than_days=days)
    print(f"{removed} events removed")
    return EXIT_OK


def _cmd_admin_link(args: argparse.Namespace) -> int:
    settings = _settings(args)
    return asyncio.run(_admin_link(settings, args.enterprise, args.ttl))


async def _admin_link(settings: Settings, enterprise: str, ttl_s: float) -> int:
    source = integration_type(settings.integration)
    conn = await db.connect(settings.database_url, command_timeout_s=10.0,
                            application_name="crm-bridge:admin-link")
    try:
        token = await links.issue(conn, settings.secret_key, enterprise, source, ttl_s=ttl_s)
    finally:
        await conn.close()
    if token is None:
        print(f"crm-bridge: there is no enterprise {enterprise}", file=sys.stderr)
        return EXIT_FAILED
    log.info("admin_link_issued", enterprise=enterprise, integration=source, ttl_s=ttl_s)
    print(f"{settings.public_url}/{source}-admin/?token={token}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    collector.tune()  # a long-lived server's collector (daemon/collector.py)
    return asyncio.run(serve(settings, args.dev_env))


async def serve(settings: Settings, dev_env: Path | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit 0) or a crashed task (exit 1).

    In development mode, once it serves, it prints how to reach it (``devmode.banner``).
    """
    from web.app import create_app
    from web.server import Limits, Runner

    async with runtime.build(settings) as rt:
        _install_signal_handlers(rt.supervisor.stop)
        cut = rt.metrics.http_cut
        runner = Runner(create_app(rt), Limits.from_settings(settings),
                        on_cut=lambda reason: cut.labels(reason).inc())
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            try:
                await site.start()
            except OSError as exc:
                rt.supervisor.stop()
                raise ListenError(settings.host, settings.port, exc) from None
            url = _bound_url(runner, settings)
            log.info("listening", url=url, public_url=settings.public_url,
                     integration=rt.adapter.name, instance=settings.instance_id)
            _notify_systemd(rt, url)
            if settings.dev_mode:  # a terminal's message, not a log line: it shows the token
                admin = await _admin_line(rt, settings, url, dev_env)
                print(devmode.banner(url, settings.service_token, dev_env, admin),
                      file=sys.stderr, flush=True)
            await rt.supervisor.stopping.wait()
            log.info("stopping", reason=rt.supervisor.failed or "signal")
            await rt.supervisor.join(settings.shutdown_grace_s + 5)
        finally:
            await runner.cleanup()
        failed = rt.supervisor.failed
    log.info("stopped", failed=failed)
    return EXIT_FAILED if failed else EXIT_OK


async def _admin_line(rt: runtime.Runtime, settings: Settings, url: str,
                      dev_env: Path | None) -> str:
    """Development mode's admin line: a link (on ``url``, where this process listens) to
    the admin pages of an enterprise where the integration is configured, else the command
    that prints one (nothing is written for an enterprise never configured here)."""
    cli = ".venv/bin/crm-bridge" if dev_env is not None else "crm-bridge"
    candidate = devmode.admin_candidate(rt.cache.entries())
    if candidate is None:
        return devmode.admin_line(None, None, cli)
    enterprise, configured = candidate
    link = None
    if configured:
        try:
            token = await links.issue(rt.pool, settings.secret_key, enterprise, rt.adapter.name)
        except (asyncpg.PostgresError, OSError, ValueError) as exc:
            log.warning("admin_link_not_issued", enterprise=enterprise, error=type(exc).__name__)
            token = None
        if token is not None:
            link = f"{url}/{rt.adapter.name}-admin/?token={token}"
    return devmode.admin_line(enterprise, link, cli)


def _notify_systemd(rt: runtime.Runtime, url: str) -> None:
    """Under systemd (``Type=notify``): READY=1 once the listener is connected and caught
    up (the cache is loaded before this point), then watchdog heartbeats and STATUS=."""
    notifier = sdnotify.Notifier()
    if not notifier.enabled:
        return
    listener = rt.listener

    async def ready() -> None:
        if listener is not None:
            await listener.caught_up.wait()

    def status() -> str:
        if listener is None:
            feed = "poll only"
        else:
            feed = "listener connected" if listener.state.connected else "listener reconnecting"
        return (f"{rt.adapter.name} on {url}: {feed}, "
                f"{rt.dispatcher.stats()['in_flight']} deliveries in flight")

    rt.supervisor.spawn("systemd-notify", notifier.run(ready(), rt.supervisor.stopping, status))


def _bound_url(runner: web.AppRunner, settings: Settings) -> str:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            host = address[0] if ":" not in str(address[0]) else f"[{address[0]}]"
            return f"http://{host}:{address[1]}"
    return f"http://{settings.host}:{settings.port}"


def _install_signal_handlers(stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: graceful stop. Another one a while later: exit at once.

    A repeat within ``SIGNAL_ECHO_S`` is the same request delivered twice (a terminal's
    Ctrl-C reaches the whole process group; ``timeout`` and some supervisors signal both
    the process and its group), not an operator insisting.
    """
    loop = asyncio.get_running_loop()
    first: list[float] = []

    def on_signal(signum: int) -> None:
        now = loop.time()
        if not first:
            first.append(now)
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop()
        elif now - first[0] >= SIGNAL_ECHO_S:
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


_COMMANDS: dict[str, Callable[[Any], int]] = {
    "run": _cmd_run,
    "migrate": _cmd_migrate,
    "check": _cmd_check,
    "genkey": _cmd_genkey,
    "replay": _cmd_replay,
    "purge": _cmd_purge,
    "admin-link": _cmd_admin_link,
}
