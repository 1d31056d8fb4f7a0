"""``python -m daemon.demo`` (``make demo``): the whole product at work, in one command.

::

    python -m daemon.demo [--port 8019] [--crm-port 8020] [--pbx-port 8018]
                          [--calls-per-minute 20] [--seed N] [--log-dir .demo]

With ``CRM_BRIDGE_DATABASE_URL`` (``make demo`` sets it to the checkout's throwaway
PostgreSQL): migrate, start a RetailCRM simulator per demo enterprise (ports
``--crm-port`` and the next) and the PBX simulator, seed the two enterprises and connect
them to their RetailCRM accounts, start crm-bridge in development mode, print where to
look (:mod:`daemon.demo.guide`), and replay calls at a steady rate until Ctrl-C. A port of
0 means any free port. Ctrl-C (or SIGTERM) stops the calls, then crm-bridge, then the
simulators; a second one, a while later, kills them at once. Exit 0 after a stop, 1 when
something failed (one line saying what, with the end of the log of a child that died), 2
for bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg

from daemon import db, devmode, egress, links, logconfig, settings
from daemon.crypto import Crypto
from daemon.demo import guide
from daemon.demo.enterprises import ENTERPRISES, SetupError, connect, seed
from daemon.demo.scenarios import CallFactory, Line
from daemon.demo.stack import Stack, StackError, check_port
from daemon.demo.traffic import Feed, HttpSink, Sink, SqlSink, Traffic
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps
from daemon.migrate import MigrationError, find_sql_dir, load_migrations, migrate
from daemon.pgcluster import free_port

INTEGRATION: Final = "retailcrm"
HOST: Final = "127.0.0.1"
LINK_TTL_S: Final = 7 * 86_400.0
STATUS_EVERY_S: Final = 30.0
READY_TIMEOUT_S: Final = 90.0
HTTP_TIMEOUT_S: Final = 10.0
SIGNAL_ECHO_S: Final = 1.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m daemon.demo",
        description="crm-bridge with a simulated RetailCRM and PBX, two demo enterprises and "
        "a steady stream of calls (make demo). Needs CRM_BRIDGE_DATABASE_URL.")
    parser.add_argument("--port", type=_port, default=8019, help="crm-bridge's port")
    parser.add_argument("--crm-port", type=_port, default=8020,
                        help="the first RetailCRM simulator's port (the second takes the next)")
    parser.add_argument("--pbx-port", type=_port, default=8018, help="the PBX simulator's port")
    parser.add_argument("--calls-per-minute", type=_rate, default=20.0,
                        help="how many calls begin each minute (default 20)")
    parser.add_argument("--seed", type=int, help="make the calls repeatable")
    parser.add_argument("--log-dir", type=Path, default=Path(".demo"),
                        help="where the children's logs go (default .demo)")
    parser.add_argument("--throwaway-db", action="store_true",
                        help="the database is the checkout's throwaway PostgreSQL (make demo)")
    return parser


def _port(raw: str) -> int:
    if not raw.isdigit() or int(raw) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, got {raw!r}")
    return int(raw)


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 6000:
        raise argparse.ArgumentTypeError(f"expected a number of calls in (0, 6000], got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports everything listens on (none left 0)."""

    bridge: int
    crm: tuple[int, ...]
    pbx: int


def _ports(args: argparse.Namespace) -> Ports:
    """The ports asked for, free ones for 0; ``StackError`` naming the option of one taken."""
    wanted = [(args.port, "--port"), (args.pbx_port, "--pbx-port")]
    wanted += [(args.crm_port + i if args.crm_port else 0, "--crm-port")
               for i in range(len(ENTERPRISES))]
    for port, option in wanted:
        if port:
            check_port(HOST, port, option)
    chosen = [port or free_port() for port, _ in wanted]
    return Ports(chosen[0], tuple(chosen[2:]), chosen[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m daemon.demo``."""
    args = _parser().parse_args(argv)
    try:
        ports = _ports(args)
        environ = _environment(os.environ, ports)
        config = settings.load(environ, integration=INTEGRATION)
    except settings.SettingsError as exc:
        return _say(f"configuration error: {exc}", EXIT_USAGE)
    except StackError as exc:
        return _say(str(exc), EXIT_USAGE)
    logconfig.configure("console", "warning", sys.stderr)
    try:
        return asyncio.run(Demo(args, ports, environ, config).run())
    except (StackError, SetupError, MigrationError) as exc:
        return _say(str(exc), EXIT_FAILED)
    except Exception as exc:
        if db.unavailable(exc) or isinstance(exc, asyncpg.PostgresError):
            url = settings.mask_url_password(config.database_url)
            return _say(f"cannot use the database at {url}: {exc}", EXIT_FAILED)
        raise


def _say(text: str, code: int) -> int:
    print(f"demo: {text}", file=sys.stderr, flush=True)
    return code


def _environment(environ: Mapping[str, str], ports: Ports) -> dict[str, str]:
    """The environment of the demo and of its crm-bridge: development mode (the checkout's
    secrets, ``.pgdata/dev.env``), the demo's port and PBX."""
    asked = {**environ, devmode.DEV_MODE: "1",
             settings.PREFIX + "HOST": HOST, settings.PREFIX + "PORT": str(ports.bridge),
             settings.PREFIX + "PBX_URL": f"http://{HOST}:{ports.pbx}"}
    asked.pop(settings.PREFIX + "PUBLIC_URL", None)  # development mode's own: this port
    env, _ = devmode.environment(asked, devmode.checkout())
    return env


class Demo:
    """One run of the demo (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, ports: Ports, environ: Mapping[str, str],
                 config: settings.Settings) -> None:
        self.args = args
        self.ports = ports
        self.environ = environ
        self.config = config
        self.stack = Stack(args.log_dir)
        self.stopping = asyncio.Event()
        self.bridge_url = f"http://{HOST}:{ports.bridge}"
        self.pbx_url = f"http://{HOST}:{ports.pbx}"
        self.crm_urls = [f"http://{HOST}:{port}" for port in ports.crm]
        self._serving = False  # up and replaying calls: a stop goes through the traffic

    async def run(self) -> int:
        """Everything, until a signal (0) or a child's death (1); children always stopped.
        A signal while starting up cancels the start."""
        self._signals(self.stopping.set, self.stack.kill)
        conn = await db.connect(self.config.database_url, command_timeout_s=300.0,
                                application_name="crm-bridge:demo")
        try:
            await migrate(conn, load_migrations(find_sql_dir(self.config.sql_dir)))
        finally:
            await conn.close()
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        pool = await db.create_pool(self.config.database_url, min_size=1, max_size=4,
                                    application_name="crm-bridge:demo")
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                work = asyncio.create_task(self._run(pool, http), name="demo")
                stop = asyncio.create_task(self.stopping.wait(), name="demo-stop")
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done() and not self._serving:
                    work.cancel()
                stop.cancel()
                try:
                    return await work
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # this coroutine itself was cancelled, not just the start
                    return EXIT_OK  # stopped while starting up
        finally:
            await self.stack.stop()
            await pool.close()
            print(guide.stopped(self.args.throwaway_db), flush=True)

    async def _run(self, pool: asyncpg.Pool, http: aiohttp.ClientSession) -> int:
        keys = await self._simulators(http)
        pbx_secrets = {firm.number: secrets.token_urlsafe(24) for firm in ENTERPRISES}
        for firm in ENTERPRISES:
            await seed(pool, firm, pbx_secrets[firm.number])
        await self._post(http, f"{self.pbx_url}/_clients",
                         {secret: number for number, secret in pbx_secrets.items()})
        await self._connect(pool, keys)
        bridge = await self.stack.start(
            "crm-bridge", [sys.executable, "-m", "daemon", "run", "--integration", INTEGRATION],
            self._bridge_env())
        await self.stack.wait_ready(bridge, http, f"{self.bridge_url}/ready", READY_TIMEOUT_S)
        shown = [guide.Shown(firm, crm, await self._admin_link(pool, firm.number))
                 for firm, crm in zip(ENTERPRISES, self.crm_urls, strict=True)]
        places = guide.Places(self.bridge_url, self.pbx_url, self.config.service_token,
                              self.args.log_dir, self.args.calls_per_minute)
        print(guide.guide(places, shown), flush=True)
        self._serving = True
        return await self._traffic(pool, http)

    async def _simulators(self, http: aiohttp.ClientSession) -> list[str]:
        """Start a RetailCRM account per enterprise (its API key through stdin) and the PBX."""
        keys = []
        for firm, port in zip(ENTERPRISES, self.ports.crm, strict=True):
            key = f"demo-{firm.number}-{secrets.token_hex(12)}"
            child = await self.stack.start(
                f"retailcrm-{firm.number}",
                [sys.executable, "-m", "daemon.integrations.retailcrm.simulator",
                 "--host", HOST, "--port", str(port), "--api-key-file", "-",
                 "--users", str(firm.crm_users),
                 "--manager", f"{firm.known_caller}={firm.known_caller_manager}"],
                _plain_env(self.environ), stdin=key.encode() + b"\n")
            await self.stack.wait_ready(child, http, f"http://{HOST}:{port}/_requests?limit=0",
                                        READY_TIMEOUT_S)
            keys.append(key)
        pbx = await self.stack.start(
            "pbx", [sys.executable, "-m", "daemon.pbx_simulator", "--host", HOST,
                    "--port", str(self.ports.pbx)], _plain_env(self.environ))
        await self.stack.wait_ready(pbx, http, f"{self.pbx_url}/_state", READY_TIMEOUT_S)
        return keys

    async def _connect(self, pool: asyncpg.Pool, keys: Sequence[str]) -> None:
        """Connect each enterprise to its simulated account through the adapter."""
        config = self.config
        connector = egress.connector(allow_private=True)  # the simulators are on loopback
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            adapter = load(INTEGRATION, AdapterDeps(
                crypto=Crypto(config.encryption_keys, config.secret_key), http=http, pool=pool,
                public_url=config.public_url, secret_key=config.secret_key,
                settings=config.adapter_settings()))
            for firm, crm, key in zip(ENTERPRISES, self.crm_urls, keys, strict=True):
                await connect(adapter, firm, crm, key)

    def _bridge_env(self) -> dict[str, str]:
        """crm-bridge's environment: the demo's, the secrets given explicitly (they may have
        been made for this process alone, outside a checkout), JSON logs, a short grace."""
        config, prefix = self.config, settings.PREFIX
        return {**self.environ, "PYTHONUNBUFFERED": "1",
                prefix + "SECRET_KEY": config.secret_key,
                prefix + "ENCRYPTION_KEYS": ",".join(config.encryption_keys),
                prefix + "SERVICE_TOKEN": config.service_token,
                prefix + "LOG_FORMAT": "json", prefix + "SHUTDOWN_GRACE_S": "3"}

    async def _admin_link(self, pool: asyncpg.Pool, enterprise: str) -> str:
        token = await links.issue(pool, self.config.secret_key, enterprise, INTEGRATION,
                                  ttl_s=LINK_TTL_S)
        if token is None:
            raise SetupError(f"enterprise {enterprise} vanished before its admin link was made")
        return f"{self.config.public_url}/{INTEGRATION}-admin/?token={token}"

    async def _traffic(self, pool: asyncpg.Pool, http: aiohttp.ClientSession) -> int:
        """Calls until Ctrl-C (0) or until a child dies (1)."""
        seed_ = self.args.seed if self.args.seed is not None else random.randrange(1 << 30)
        feeds = []
        for index, firm in enumerate(ENTERPRISES):
            line = Line(firm.name2, firm.trunk, firm.numbers, firm.time_zone)
            sink: Sink = (SqlSink(pool) if firm.via == "sql"
                          else HttpSink(http, self.bridge_url, self.config.service_token))
            feeds.append(Feed(CallFactory(line, random.Random(seed_ + index)), sink))
        traffic = Traffic(feeds, self.args.calls_per_minute)
        calls = asyncio.create_task(traffic.run(self.stopping), name="demo-traffic")
        died = asyncio.create_task(self.stack.first_exit(), name="demo-watch")
        stop = asyncio.create_task(self.stopping.wait(), name="demo-stop")
        try:
            while not (died.done() or stop.done()):
                await asyncio.wait({died, stop}, timeout=STATUS_EVERY_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not (died.done() or stop.done()):
                    print(guide.status(traffic.counters, await self._received(http)),
                          flush=True)
            crashed = died.result() if died.done() and not stop.done() else None
        finally:
            self.stopping.set()
            await calls
            for task in (died, stop):
                task.cancel()
        if crashed is not None:
            raise StackError(f"{crashed.name} stopped unexpectedly (exit "
                             f"{crashed.proc.returncode if crashed.proc else '?'}); the end "
                             f"of {crashed.log}:\n{crashed.tail()}")
        print(guide.status(traffic.counters, await self._received(http)), flush=True)
        return EXIT_OK

    async def _received(self, http: aiohttp.ClientSession) -> list[tuple[str, int | None]]:
        counts: list[tuple[str, int | None]] = []
        for firm, crm in zip(ENTERPRISES, self.crm_urls, strict=True):
            try:
                async with http.get(f"{crm}/_requests", params={"limit": "0"}) as resp:
                    counts.append((firm.number, int((await resp.json())["count"])))
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                counts.append((firm.number, None))
        return counts

    async def _post(self, http: aiohttp.ClientSession, url: str, body: object) -> None:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                raise StackError(f"{url} answered HTTP {resp.status}: {await resp.text()}")

    def _signals(self, stop: Callable[[], None], kill: Callable[[], None]) -> None:
        """First SIGINT/SIGTERM: stop in order. Another one a while later: kill the
        children and exit at once (a repeat within a second is the same Ctrl-C)."""
        loop = asyncio.get_running_loop()
        first: list[float] = []

        def on_signal(signum: int) -> None:
            if not first:
                first.append(loop.time())
                print("demo: stopping (Ctrl-C again to kill everything at once)…",
                      file=sys.stderr, flush=True)
                stop()
            elif loop.time() - first[0] >= SIGNAL_ECHO_S:
                kill()
                os._exit(128 + signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)


def _plain_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A simulator's environment: no crm-bridge setting, no secret."""
    return {k: v for k, v in environ.items() if not k.startswith(settings.PREFIX)} | {
        "PYTHONUNBUFFERED": "1"}
