"""What the benchmarks read about processes from ``/proc``: CPU seconds and resident memory.

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` in clock ticks. A *tree* adds what the
process has reaped from its exited children (``cutime + cstime``) and what its living
descendants have used, so a PostgreSQL server read through its postmaster counts every
backend, the ones that ended during the measurement included, and an nginx master counts
its workers. Readings are taken before and after a drain; the difference is what that
drain cost each side. A process that is gone reads as nothing (``None`` for the server:
a remote PostgreSQL cannot be read from here).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import asyncpg

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 is index 0)."""
    try:
        text = (PROC / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0.0 once it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) * TICK_S if fields else 0.0


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, of the children it has reaped, and of its living
    descendants (see the module docstring)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    total = sum(int(fields[k]) for k in (11, 12, 13, 14)) * TICK_S
    tree = _children()
    pending = list(tree.get(pid, ()))
    while pending:
        child = pending.pop()
        total += cpu_seconds(child)
        pending.extend(tree.get(child, ()))
    return total


def cpu_of(pids: Iterable[int | None]) -> list[float | None]:
    """``tree_cpu_seconds`` of each pid (None stays None)."""
    return [None if p is None else tree_cpu_seconds(p) for p in pids]


async def postmaster_pid(conn: asyncpg.Connection) -> int | None:
    """The PostgreSQL server's postmaster, found as the parent of ``conn``'s backend;
    None when the server is not a process of this machine (or not readable)."""
    backend: int = await conn.fetchval("SELECT pg_backend_pid()")
    fields = _stat(backend)
    if fields is None:
        return None
    parent = int(fields[1])
    return parent if _stat(parent) is not None else None


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in kB; empty once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(PROC / str(pid) / "status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out
