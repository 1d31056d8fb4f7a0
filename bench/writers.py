"""The call-service writers of ``pipeline.a``: 8 connections inserting single rows.

``run_writers`` drives them from asyncpg (what a Python call service does); ``pgbench``
drives the same 8 writers from PostgreSQL's C client, which costs the machine far less per
insert and so measures the server rather than the client. ``PLAIN_TABLE`` is the baseline:
``crm_events``'s shape, indexes and defaults, without its triggers.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time

import asyncpg

from bench.workload import CALL_SERVICE_INSERT
from daemon import pgcluster

WRITERS = 8

PLAIN_TABLE = """
CREATE TABLE bench_plain_events
    (LIKE crm_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
ALTER TABLE bench_plain_events ALTER enterprise_number DROP NOT NULL,
                               ALTER unique_id DROP NOT NULL;
"""
PLAIN_INSERT = CALL_SERVICE_INSERT.replace("crm_events", "bench_plain_events")


async def run_writers(url: str, statement: str, bodies: list[str], tag: str,
                   warmup_s: float, duration_s: float) -> tuple[float, float]:
    """``WRITERS`` connections inserting single rows (autocommit) as fast as they can for
    ``warmup_s + duration_s``; (rows/s over the measured part, this process's CPU share)."""
    conns = [await asyncpg.connect(url) for _ in range(WRITERS)]
    counted = [0] * WRITERS
    start = time.monotonic()
    begin, end = start + warmup_s, start + warmup_s + duration_s
    cpu: list[float] = []

    async def write(k: int, conn: asyncpg.Connection) -> None:
        n = 0
        while (now := time.monotonic()) < end:
            body = bodies[n % len(bodies)].replace("__UID__", f"{tag}{k}.{n}")
            await conn.execute(statement, "dial", body)
            n += 1
            if now >= begin:
                counted[k] += 1

    async def clock() -> None:
        await asyncio.sleep(warmup_s)
        cpu.append(time.process_time())
        await asyncio.sleep(duration_s)
        cpu.append(time.process_time())

    try:
        await asyncio.gather(clock(), *(write(k, c) for k, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    return sum(counted) / duration_s, (cpu[1] - cpu[0]) / duration_s


async def pgbench(url: str, table: str, template: str, seconds: float) -> float | None:
    """The same 8 writers as a C client (pgbench, prepared, autocommit): the dial body is
    concatenated server-side from its two varying parts (Token, UniqueId). rows/s, or None
    when pgbench is not installed."""
    binary = shutil.which("pgbench")
    if binary is None:
        candidate = pgcluster.bindir() / "pgbench"
        binary = str(candidate) if candidate.exists() else None
    if binary is None:
        return None
    head, rest = template.split('"__TOKEN__"')
    mid, tail = rest.split('"__UID__"')
    script = (
        "\\set n random(1, 2000000000)\n\\set f random(1, 50)\n"
        f"INSERT INTO {table} (event_type, payload) VALUES ('dial', ('{head}\"37529' || "
        f"lpad(:f::text, 7, '0') || '\"{mid}\"' || :n || '\"{tail}')::jsonb) "
        "ON CONFLICT DO NOTHING;\n")
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as fh:
        fh.write(script)
        fh.flush()
        proc = await asyncio.create_subprocess_exec(
            binary, "-n", "-c", str(WRITERS), "-j", "2", "-M", "prepared",
            "-T", str(max(1, round(seconds))), "-f", fh.name, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    found = re.search(rb"tps = ([0-9.]+) \(without initial connection time\)", out)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {err.decode(errors='replace')[-300:]}")
    return float(found.group(1))
