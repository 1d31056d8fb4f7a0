"""The pgqueuer anchor: a worker written with pgqueuer's public API, drained like crm-bridge.

pgqueuer is a well-kept PostgreSQL job queue (``FOR UPDATE SKIP LOCKED`` in batches, LISTEN/
NOTIFY, a status log); a worker of it on the same server, in the same run, is the yardstick
the drain figures are read against. It is a bench-only dependency (the ``bench`` extra).

The queue gets the same call events as crm-bridge's backlog, one job per event (entrypoint
= the event type, payload = the body as the call service inserted it), enqueued *frozen*
(due in a day) and vacuumed; ``RELEASE`` makes them due at once, and pgqueuer's own
statement trigger rings its channel. The worker is a child process
(``python -m bench.pgqworker``), so its CPU is its own in ``/proc``:

* ``noop``: the handler returns at once;
* ``http``: the handler sends what a RetailCRM integration sends for that event, with one
  ``aiohttp.ClientSession``: a dial one ``call/event``, a hangup a ``call/event`` and a
  ``calls/upload`` — ≈ 1.5 requests per job — form-encoded with the nested objects as JSON
  fields and the API key in ``X-API-KEY``, as crm-bridge's RetailCRM client does, each
  answer read and checked for ``"success": true``.

The child prints one JSON line when its listener answers a NOTIFY round trip (ready), and
when its stdin closes it stops and prints a summary (jobs handled, requests, failures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg

from bench.harness import OUT_DIR, PYTHON, ROOT, child_environ

BATCH_SIZE = 100
ENQUEUE_CHUNK = 1_000
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 3.0
FROZEN = timedelta(days=1)
RELEASE = "UPDATE pgqueuer SET execute_after = now() WHERE status = 'queued'"
LOGGED = "SELECT coalesce(max(id), 0) FROM pgqueuer_log"
LEFT = "SELECT count(*) FROM pgqueuer"
EVENT_PATH = "/api/v5/telephony/call/event"
UPLOAD_PATH = "/api/v5/telephony/calls/upload"
SITE = "main"
LINE = "+375173334455"


# ---------------------------------------------------------------------- the parent's side


async def install(conn: asyncpg.Connection) -> None:
    """Create pgqueuer's tables, trigger and indexes in ``conn``'s database."""
    from pgqueuer import AsyncpgDriver, Queries

    await Queries(AsyncpgDriver(conn)).install()


async def enqueue_frozen(conn: asyncpg.Connection, events: Sequence[tuple[str, str]]) -> int:
    """Enqueue one job per ``(event_type, body)``, due in a day, then vacuum; jobs queued."""
    from pgqueuer import AsyncpgDriver, Queries

    queries = Queries(AsyncpgDriver(conn))
    for start in range(0, len(events), ENQUEUE_CHUNK):
        chunk = events[start:start + ENQUEUE_CHUNK]
        await queries.enqueue([t for t, _b in chunk], [b.encode() for _t, b in chunk],
                              [0] * len(chunk), [FROZEN] * len(chunk))
    await conn.execute("VACUUM (ANALYZE) pgqueuer")
    await conn.execute("VACUUM (ANALYZE) pgqueuer_log")
    queued: int = await conn.fetchval(LEFT)
    return queued


@dataclass(slots=True)
class Worker:
    """A running worker child: its pid; ``summary`` is filled in when it stops."""

    pid: int
    summary: dict[str, Any] = field(default_factory=dict)


@asynccontextmanager
async def running(url: str, mode: str, *, upstream: str = "", batch_size: int = BATCH_SIZE,
                  max_tasks: int = 0) -> AsyncIterator[Worker]:
    """``python -m bench.pgqworker`` on database ``url`` until the block ends (see the
    module docstring); yields once its listener is up."""
    args = [PYTHON, "-m", "bench.pgqworker", url, mode, "--batch-size", str(batch_size),
            "--max-tasks", str(max_tasks)]
    if upstream:
        args += ["--upstream", upstream]
    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / "pgqworker.log", "ab") as log:  # its warnings, if any
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=child_environ({}), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=log)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line:
            raise RuntimeError("the pgqueuer worker exited before it was ready")
        worker = Worker(proc.pid)
        yield worker
        proc.stdin.close()
        tail = await asyncio.wait_for(proc.stdout.read(), START_TIMEOUT_S)
        worker.summary = json.loads(tail) if tail.strip() else {}
    finally:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------------- the handlers


def _field(value: Any) -> str:
    """A nested form field as RetailCRM takes it (and crm-bridge's client sends it)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def requests_for(event_type: str, body: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The RetailCRM requests (path, form body) a dial or a hangup makes."""
    incoming = body.get("CallType") == 0
    codes = [x for x in body.get("Extensions", []) if isinstance(x, str) and len(x) == 3]
    event: dict[str, Any] = {
        "type": ("in" if incoming else "out") if event_type == "dial" else "hangup",
        "phone": body.get("Phone", ""), "codes": codes or ["150"],
        "userIds": [1], "callExternalId": body.get("UniqueId"), "externalPhone": LINE,
    }
    out = []
    if event_type == "hangup":
        answered = body.get("CallStatus") == "2"
        event["hangupStatus"] = "answered" if answered else "no answered"
        call = {"date": body.get("DateReceived"), "type": "in" if incoming else "out",
                "phone": body.get("Phone", ""), "result": "answered" if answered else "no answer",
                "duration": 60 if answered else 0, "externalId": body.get("UniqueId"),
                "code": "150", "userId": 1, "durationWaiting": 5, "externalPhone": LINE}
        out.append((UPLOAD_PATH, urlencode({"calls": _field([call])}).encode()))
    out.insert(0, (EVENT_PATH, urlencode({"event": _field(event)}).encode()))
    return out


@dataclass(slots=True)
class _Counts:
    handled: int = 0
    requests: int = 0
    failed: int = 0


async def _serve(url: str, mode: str, upstream: str, batch_size: int, max_tasks: int) -> None:
    import aiohttp
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

    counts = _Counts()
    conn = await asyncpg.connect(url)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    async def post(path: str, form: bytes, token: str) -> None:
        headers = {"X-API-KEY": f"key-{token}", "Accept": "application/json",
                   "Content-Type": "application/x-www-form-urlencoded"}
        counts.requests += 1
        async with http.post(upstream + path, data=form, headers=headers,
                             allow_redirects=False) as resp:
            answer = json.loads(await resp.read())
        if resp.status != 200 or answer.get("success") is not True:
            counts.failed += 1
            raise RuntimeError(f"{path}: HTTP {resp.status}")

    async def handle(job: Job) -> None:
        if mode == "http":
            body = json.loads(job.payload or b"{}")
            for path, form in requests_for(job.entrypoint, body):
                await post(path, form, str(body.get("Token")))
        counts.handled += 1

    for event_type in ("dial", "hangup"):
        qm.entrypoint(event_type)(handle)
    task = asyncio.create_task(qm.run(batch_size=batch_size, max_concurrent_tasks=max_tasks,
                                      dequeue_timeout=timedelta(seconds=1)))
    try:
        await _until_listening(qm, task)
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        qm.shutdown.set()
        await asyncio.wait_for(task, START_TIMEOUT_S)
    finally:
        if not task.done():
            task.cancel()
        await http.close()
        await conn.close()
    print(json.dumps({"handled": counts.handled, "requests": counts.requests,
                      "failed": counts.failed, "batch_size": batch_size,
                      "max_concurrent_tasks": max_tasks or None}), flush=True)


async def _until_listening(qm: Any, task: asyncio.Task[None]) -> None:
    """Until the worker's listener answers a NOTIFY round trip (its ready signal)."""
    from pgqueuer.errors import FailingListenerError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while True:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the queue manager stopped before it was ready")
        try:
            await qm.listener_healthy(timedelta(seconds=0.5))
            return
        except FailingListenerError:
            if loop.time() > deadline:
                raise


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.pgqworker URL noop|http [--upstream URL] [--batch-size N]
    [--max-tasks N]`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.pgqworker")
    parser.add_argument("url")
    parser.add_argument("mode", choices=["noop", "http"])
    parser.add_argument("--upstream", default="")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--max-tasks", type=int, default=0, help="0 = unlimited")
    args = parser.parse_args(argv)
    if args.mode == "http" and not args.upstream:
        parser.error("http needs --upstream")
    asyncio.run(_serve(args.url, args.mode, args.upstream, args.batch_size, args.max_tasks))


if __name__ == "__main__":
    main()
