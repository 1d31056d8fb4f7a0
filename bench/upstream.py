"""The CRMs the drain benchmarks deliver to, each served from a child process of its own.

A CRM is somebody else's machine: serving it from the daemon's event loop would charge its
request handling to the daemon's figure. So ``running("fakecrm")`` or
``running("retailcrm", api_keys=...)`` starts ``python -m bench.upstream …`` (an aiohttp
server on 127.0.0.1, any free port), reads its URL from the first line it prints, and on exit
closes its stdin, upon which the child prints a JSON summary of what it received and stops.

* ``fakecrm``: ``tests.support.fakecrm.FakeUpstream``, answering 200 at once; the summary
  counts requests, distinct events and duplicates.
* ``retailcrm``: ``daemon.integrations.retailcrm.simulator.Simulator`` with the given API
  keys (one per enterprise) and its rate limit off; the summary counts requests by path and
  status, call events and uploaded calls.
* ``pbx``: ``daemon.pbx_simulator.PbxSimulator`` taking any clientId, answering at once;
  the summary counts requests by path and status, and any that would have been dangerous.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.harness import PYTHON, ROOT, child_environ

START_TIMEOUT_S = 30.0


@dataclass(slots=True)
class Upstream:
    """A running child CRM: its base URL; ``summary`` is filled in when it stops."""

    url: str
    pid: int
    summary: dict[str, Any] = field(default_factory=dict)


@asynccontextmanager
async def running(kind: str, *, api_keys: Sequence[str] = ()) -> AsyncIterator[Upstream]:
    """Serve CRM ``kind`` from a child process for the duration of the block; its summary
    of what it received is in ``Upstream.summary`` afterwards."""
    args = [PYTHON, "-m", "bench.upstream", kind]
    keys_file = None
    if api_keys:
        keys_file = tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False)  # noqa: SIM115
        keys_file.write("\n".join(api_keys))
        keys_file.close()
        args += ["--keys-file", keys_file.name]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, env=child_environ({}), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"bench.upstream {kind} exited before serving")
        upstream = Upstream(json.loads(line)["url"], proc.pid)
        yield upstream
        proc.stdin.close()
        tail = await asyncio.wait_for(proc.stdout.read(), START_TIMEOUT_S)
        upstream.summary = json.loads(tail) if tail.strip() else {}
    finally:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if keys_file is not None:
            os.unlink(keys_file.name)


# ---------------------------------------------------------------------- the child


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


async def _serve_fakecrm() -> dict[str, Any]:
    from tests.support.fakecrm import running_upstream

    async with running_upstream() as up:
        print(json.dumps({"url": up.url}), flush=True)
        await _until_stdin_closes()
        delivered = Counter(r.event_id for r in up.delivered())
        return {"requests": len(up.received), "events": len(delivered),
                "duplicates": sum(n - 1 for n in delivered.values() if n > 1)}


async def _serve_retailcrm(keys: list[str]) -> dict[str, Any]:
    from daemon.integrations.retailcrm.simulator import Simulator, running_simulator

    simulator = Simulator(api_keys=keys, rate_limit=False)
    async with running_simulator(simulator) as sim:
        print(json.dumps({"url": sim.url}), flush=True)
        await _until_stdin_closes()
        requests = Counter(f"{r.path} {r.status}" for r in sim.state.requests)
        events = Counter(str(e.get("callExternalId")) + "/" + str(e.get("type"))
                         for e in sim.state.call_events)
        return {"requests": sum(requests.values()), "by_path": dict(requests),
                "call_events": len(sim.state.call_events),
                "duplicate_call_events": sum(n - 1 for n in events.values() if n > 1),
                "uploaded_calls": len(sim.state.uploaded_calls)}


async def _serve_pbx() -> dict[str, Any]:
    from daemon.pbx_simulator import running_pbx

    async with running_pbx() as sim:
        print(json.dumps({"url": sim.url}), flush=True)
        await _until_stdin_closes()
        requests = Counter(f"{r.path} {r.status}" for r in sim.requests)
        return {"requests": len(sim.requests), "by_path": dict(requests),
                "dangerous": sum(1 for r in sim.requests if r.dangerous)}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.upstream fakecrm | pbx | retailcrm --keys-file FILE``."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("kind", choices=["fakecrm", "retailcrm", "pbx"])
    parser.add_argument("--keys-file")
    args = parser.parse_args(argv)
    if args.kind == "fakecrm":
        summary = asyncio.run(_serve_fakecrm())
    elif args.kind == "pbx":
        summary = asyncio.run(_serve_pbx())
    else:
        with open(args.keys_file, encoding="utf-8") as fh:
            keys = [k for k in fh.read().splitlines() if k]
        summary = asyncio.run(_serve_retailcrm(keys))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
