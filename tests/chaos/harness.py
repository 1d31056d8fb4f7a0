"""The chaos suite's machinery: its own PostgreSQL (restartable), the RetailCRM simulator,
two real crm-bridge processes kept alive like systemd keeps them, call-service traffic that
retries its inserts like a call service does, and a schedule of misfortunes.

Nothing here asserts: ``test_chaos`` reads what the simulator recorded, what the database
holds and what the daemons printed, and judges (``tests/chaos/verdict.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from daemon import db
from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Fault, Simulator
from daemon.migrate import find_sql_dir, load_migrations, migrate
from daemon.pgcluster import ThrowawayCluster
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, settings_env
from tests.support.daemon import DaemonProcess, start_process
from tests.support.pg import with_database

ATTEMPT_TIMEOUT_S = 2.0
LISTENER_APP = "crm-bridge:retailcrm:listener"
INSERT = ("INSERT INTO crm_events (event_type, payload) VALUES ($1, $2::jsonb) "
          "ON CONFLICT DO NOTHING")
# Only what a connection that went away raises: anything else is a bug of the test.
DB_DOWN = (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES)


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how hard: the short run inside ``make test``, the full one in
    ``make chaos`` (the issue's figures)."""

    name: str
    enterprises: int
    drive_s: float  # calls are started during this long
    calls_per_s: float
    burst_calls: int  # one enterprise's backlog, all at once
    down_s: float  # one enterprise's CRM is down this long
    drain_timeout_s: float
    schedule: tuple[tuple[float, str], ...]  # (second, what)


# The enterprise whose CRM goes down meets nothing but its outage (the random 5xx, stalls
# and 503 bursts spare it), and its owner is not killed between the outage's end and its
# breaker's closing (a probe after the last cool-down): the log must show the breaker
# close, and a restarted process starts with a closed one.
SHORT = Profile(
    "short", enterprises=16, drive_s=45.0, calls_per_s=5.0, burst_calls=60, down_s=12.0,
    drain_timeout_s=100.0,
    schedule=((2, "faults_on"), (5, "kill:a"), (8, "down"), (10, "burst"),
              (12, "restart_postgres"), (16, "terminate_listener"), (24, "burst_503"),
              (36, "terminate_listener"), (38, "kill:b"), (40, "kill:a"), (42, "kill:b"),
              (43, "faults_off")),
)
FULL = Profile(
    "full", enterprises=50, drive_s=150.0, calls_per_s=15.0, burst_calls=200, down_s=60.0,
    drain_timeout_s=300.0,
    schedule=((2, "faults_on"), (10, "terminate_listener"), (15, "kill:a"), (20, "burst_503"),
              (25, "kill:b"), (30, "down"), (40, "burst"), (45, "kill:a"), (55, "restart_postgres"),
              (65, "kill:b"), (75, "terminate_listener"), (85, "burst_503"),
              (115, "restart_postgres_immediate"), (120, "terminate_listener"),
              (125, "kill:a"), (135, "kill:b"), (145, "kill:a"), (147, "faults_off")),
)


@dataclass(slots=True)
class Call:
    """One call of the traffic: its events in the order the call services store them."""

    uid: str
    enterprise: str
    in_order: bool
    answered: bool
    events: list[tuple[str, dict[str, Any]]]


@dataclass(slots=True)
class Enterprise:
    number: str
    key: str = field(repr=False)


@contextlib.contextmanager
def postgres() -> Iterator[ThrowawayCluster]:
    """A cluster of the suite's own: it is restarted under the daemons' feet."""
    with tempfile.TemporaryDirectory(prefix="crm-bridge-chaos-pg-") as tmp:
        if os.geteuid() == 0:
            os.chmod(tmp, 0o755)
        cluster = ThrowawayCluster(os.path.join(tmp, "data"))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.destroy()


async def prepare(cluster: ThrowawayCluster, sim: Simulator,
                  count: int) -> tuple[str, list[Enterprise]]:
    """A migrated database ``chaos`` with ``count`` enterprises on the simulator, each with
    its own API key and extensions 101–103 (101 and 102 mapped to RetailCRM users 1, 2)."""
    admin = await asyncpg.connect(cluster.url)
    try:
        # As in production: a commit is acknowledged once it is in the WAL, so an immediate
        # (crash-like) restart loses nothing acknowledged. The throwaway cluster's default
        # (off) would lose the last moment's settlements, and the daemons would redo — and
        # show again — what they had recorded as done.
        await admin.execute("ALTER SYSTEM SET synchronous_commit = on")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("CREATE DATABASE chaos")
    finally:
        await admin.close()
    url = with_database(cluster.url, "chaos")
    conn = await db.connect(url)
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    firms = [Enterprise(f"{100 + n:04d}", f"chaos-key-{n}-{secrets.token_hex(8)}")
             for n in range(count)]
    try:
        await migrate(conn, load_migrations(find_sql_dir()))
        for firm in firms:
            config = {"retailcrm": {"enabled": True, "domain": sim.url,
                                    "api_key": crypto.encrypt(firm.key),
                                    "user_extensions": {"1": "101", "2": "102"}}}
            await conn.execute(
                "INSERT INTO enterprises (number, name, name2, secret, active, "
                "integrations_config) VALUES ($1, $1, $2, $3, true, $4)",
                firm.number, f"tok{firm.number}", f"secret-{firm.number}", config)
            for ext in ("101", "102", "103"):
                await conn.execute("INSERT INTO user_internal_phones (enterprise_number, "
                                   "phone_number) VALUES ($1, $2)", firm.number, ext)
    finally:
        await conn.close()
    sim.set_keys(firm.key for firm in firms)
    return url, firms


def make_calls(firms: list[Enterprise], profile: Profile, rng: random.Random) -> list[Call]:
    """The traffic: mostly answered calls stored in order (start, dial to 101 and 102, bridge
    with 102, hangup), some missed, and one in ten whose hangup is stored before its dial."""
    total = int(profile.drive_s * profile.calls_per_s)
    calls = []
    for n in range(total):
        # firms[0] only gets the bursts; firms[1], whose CRM goes down, a fifth of all calls
        # (enough failures for its breaker, whichever of its processes lives through it).
        firm = firms[1] if n % 5 == 0 else firms[2 + n % (len(firms) - 2)]
        calls.append(call(f"1757800000.{n}", firm.number, rng))
    return calls


def call(uid: str, number: str, rng: random.Random, *, in_order: bool | None = None) -> Call:
    """One call's events (see ``make_calls``)."""
    token, caller = f"tok{number}", f"+37529{rng.randrange(1_000_000, 9_999_999)}"
    in_order = rng.random() >= 0.1 if in_order is None else in_order
    answered = rng.random() >= 0.15 or not in_order
    head = {"Token": token, "UniqueId": uid, "CallType": 0, "Phone": caller,
            "Trunk": "0001363"}
    start = ("start", head)
    dial = ("dial", {**head, "Extensions": ["101", "102"], "ExtPhone": caller})
    bridge = ("bridge", {"Token": token, "UniqueId": uid, "Channel": "SIP/102-0000001a",
                         "Exten": "102", "CallerIDNum": "102", "CallerIDName": "<unknown>",
                         "ConnectedLineNum": caller.lstrip("+"),
                         "ConnectedLineName": "<unknown>", "BridgeUniqueid": f"b-{uid}"})
    hangup = ("hangup", {**head, "Extensions": [""], "CallStatus": "2" if answered else "0",
                         "DateReceived": "2025-01-09 19:19:50",
                         "StartTime": "2025-01-09 19:20:00", "EndTime": "2025-01-09 19:21:05"})
    if not in_order:
        events = [start, hangup, dial, bridge]
    else:
        events = [start, dial, bridge, hangup] if answered else [start, dial, hangup]
    return Call(uid, number, in_order, answered, events)


class Traffic:
    """Plays calls into ``crm_events`` as the call services do: a retried insert is a no-op,
    and a database that went away is waited for (never an event given up)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._tasks: set[asyncio.Task[None]] = set()
        self.inserted = 0
        self.insert_retries = 0

    def play(self, one: Call, rng: random.Random) -> None:
        """Start ``one``: its events a few hundred milliseconds apart."""
        gaps = [rng.uniform(0.02, 0.4) for _ in one.events]
        task = asyncio.create_task(self._play(one, gaps))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _play(self, one: Call, gaps: list[float]) -> None:
        for (event_type, body), gap in zip(one.events, gaps, strict=True):
            await asyncio.sleep(gap)
            await self._insert(event_type, body)

    async def _insert(self, event_type: str, body: dict[str, Any]) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                await self._pool.execute(INSERT, event_type, body, timeout=5)
                self.inserted += 1
                return
            except DB_DOWN:
                if time.monotonic() > deadline:
                    raise
                self.insert_retries += 1
                await asyncio.sleep(0.2)

    async def finished(self) -> None:
        """Wait for every call started to be stored completely."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


@dataclass(slots=True)
class Slot:
    """One daemon "unit": restarted after a chaos kill, and after any exit we did not cause
    (counted in ``crashes``: a daemon must survive everything here)."""

    name: str
    env: dict[str, str]
    current: DaemonProcess | None = None
    incarnations: list[DaemonProcess] = field(default_factory=list)
    crashes: int = 0
    killing: bool = False


class Daemons:
    """The two crm-bridge processes, supervised (see ``Slot``)."""

    def __init__(self, url: str) -> None:
        env = settings_env(
            url, CRM_BRIDGE_POLL_INTERVAL_S="0.2",
            CRM_BRIDGE_ATTEMPT_TIMEOUT_S=f"{ATTEMPT_TIMEOUT_S:g}", CRM_BRIDGE_LEASE_S="6",
            CRM_BRIDGE_OWNERSHIP_S="6", CRM_BRIDGE_UPLOAD_SETTLE_S="2",
            # Retries capped at 5 s (the default is 300 s) so the queue drains within the
            # run; the attempts allowed are raised to keep about the default's time budget.
            CRM_BRIDGE_RETRY_MAX_S="5", CRM_BRIDGE_MAX_ATTEMPTS="40",
            CRM_BRIDGE_DB_COMMAND_TIMEOUT_S="5", CRM_BRIDGE_SHUTDOWN_GRACE_S="5",
            CRM_BRIDGE_ALLOW_PRIVATE_CRM="1", CRM_BRIDGE_LOG_LEVEL="info")
        # Each "unit" keeps its instance id across restarts, as a systemd unit configured
        # with CRM_BRIDGE_INSTANCE_ID does: its enterprises stay its own.
        self.slots = {name: Slot(name, {**env, "CRM_BRIDGE_INSTANCE_ID": f"chaos-{name}"})
                      for name in ("a", "b")}
        self.kills: list[float] = []  # monotonic instants of our SIGKILLs
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for slot in self.slots.values():
            await self._launch(slot)
        self._watcher = asyncio.create_task(self._watch())

    async def _launch(self, slot: Slot) -> None:
        slot.current = await start_process(slot.env)
        slot.incarnations.append(slot.current)

    async def kill(self, name: str, down_s: float = 2.0) -> None:
        """SIGKILL one daemon mid-work; it comes back ``down_s`` later."""
        slot = self.slots[name]
        if slot.current is None:
            return
        slot.killing = True
        self.kills.append(time.monotonic())
        await slot.current.kill()
        await asyncio.sleep(down_s)
        await self._launch(slot)
        slot.killing = False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for slot in self.slots.values():
                proc = slot.current
                if proc is not None and proc.proc.returncode is not None and not slot.killing:
                    slot.crashes += 1  # like systemd's Restart=on-failure
                    await self._launch(slot)

    async def stop(self) -> list[int]:
        """SIGTERM both; their exit codes (0: a clean, graceful stop)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        codes = []
        for slot in self.slots.values():
            if slot.current is not None:
                codes.append(await slot.current.stop(timeout=30))
        return codes

    def lines(self) -> list[dict[str, Any]]:
        """Every line every incarnation printed."""
        return [line for slot in self.slots.values() for proc in slot.incarnations
                for line in proc.lines]

    async def kill_all(self) -> None:
        """Last resort when the test fails: nothing left running."""
        for slot in self.slots.values():
            for proc in slot.incarnations:
                if proc.proc.returncode is None:
                    proc.proc.send_signal(signal.SIGKILL)
                    await proc.proc.wait()


@dataclass(slots=True)
class Misfortunes:
    """What the schedule did, for the summary."""

    kills: int = 0
    listener_kills: int = 0
    postgres_restarts: int = 0
    bursts_503: int = 0


class Chaos:
    """Runs the profile's schedule against the daemons, PostgreSQL and the simulator."""

    def __init__(self, profile: Profile, cluster: ThrowawayCluster, sim: Simulator,
                 daemons: Daemons, pool: asyncpg.Pool, firms: list[Enterprise],
                 down: Enterprise, burst: Callable[[], None]) -> None:
        self.profile = profile
        self.cluster = cluster
        self.sim = sim
        self.daemons = daemons
        self.pool = pool
        self.down = down
        self.others = [firm for firm in firms if firm is not down]
        self.burst = burst
        self.done = Misfortunes()
        self.down_window: tuple[float, float] = (0.0, 0.0)
        self._faults: list[Fault] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, started: float) -> None:
        """Do everything on the schedule, each at its second after ``started``."""
        for at, what in self.profile.schedule:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            self._tasks.append(asyncio.create_task(self._do(what)))
        await asyncio.gather(*self._tasks)

    async def _do(self, what: str) -> None:
        name, _, arg = what.partition(":")
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            "faults_on": self._faults_on, "faults_off": self._faults_off,
            "kill": lambda: self._kill(arg), "burst": self._burst,
            "terminate_listener": self._terminate_listener,
            "restart_postgres": lambda: self._restart_postgres("fast"),
            "restart_postgres_immediate": lambda: self._restart_postgres("immediate"),
            "down": self._down, "burst_503": self._burst_503,
        }
        await actions[name]()

    async def _faults_on(self) -> None:
        # 20 % of requests answer 500; 5 % stall past the attempt timeout (the CRM still
        # takes them: those are the popups a retry may show twice).
        for firm in self.others:
            self._faults += [
                self.sim.add_fault(api_key=firm.key, ratio=0.05,
                                   latency_ms=(ATTEMPT_TIMEOUT_S + 1.5) * 1000),
                self.sim.add_fault(api_key=firm.key, status=500, ratio=0.2),
            ]

    async def _faults_off(self) -> None:
        for fault in self._faults:
            self.sim.remove_fault(fault)

    async def _kill(self, name: str) -> None:
        self.done.kills += 1
        await self.daemons.kill(name)

    async def _burst(self) -> None:
        self.burst()

    async def _terminate_listener(self) -> None:
        self.done.listener_kills += 1
        with contextlib.suppress(*DB_DOWN):
            await self.pool.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = $1", LISTENER_APP)

    async def _restart_postgres(self, mode: str) -> None:
        self.done.postgres_restarts += 1
        await asyncio.to_thread(self.cluster.restart, mode)

    async def _burst_503(self) -> None:
        self.done.bursts_503 += 1
        for firm in self.others[:4]:  # the busy enterprise among them
            self.sim.add_fault(api_key=firm.key, status=503, retry_after=1, count=10)

    async def _down(self) -> None:
        fault = self.sim.add_fault(api_key=self.down.key, outage=True)
        began = time.monotonic()
        await asyncio.sleep(self.profile.down_s)
        self.sim.remove_fault(fault)
        self.down_window = (began, time.monotonic())


@contextlib.asynccontextmanager
async def driver_pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    """The call services' own connections (and the test's reads)."""
    pool = await db.create_pool(url, min_size=2, max_size=20, command_timeout_s=10,
                                application_name="chaos-call-services")
    try:
        yield pool
    finally:
        await pool.close()
