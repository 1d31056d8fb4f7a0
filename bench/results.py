"""Benchmark results: the rows, the machine they were measured on, the table and the JSON.

A benchmark returns ``Row``s. ``Row.check`` fills the verdict from a target: ``ok`` when
met, ``MISS`` when not; a row without a target says ``-`` (a figure to compare, such as a
baseline). A benchmark that could not run gets one ``ERROR`` row naming why.
"""

from __future__ import annotations

import json
import os
import platform
import time
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg


@dataclass(slots=True)
class Row:
    """One line of the table; ``details`` (raw numbers, settings) goes to the JSON only."""

    benchmark: str
    figure: str
    target: str = ""
    verdict: str = "-"
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, value: float, *, at_least: float | None = None,
              at_most: float | None = None) -> Row:
        """Set ``value`` and the verdict against a lower or upper bound."""
        self.value = value
        ok = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        self.verdict = "ok" if ok else "MISS"
        return self


def error_row(name: str, exc: BaseException) -> Row:
    """The row of a benchmark that failed to run."""
    message = f"{type(exc).__name__}: {exc}"
    return Row(name, message[:70], verdict="ERROR", details={"error": message})


def _cpu() -> tuple[str, int]:
    model, count = platform.processor() or "unknown", 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                    count += 1
    except OSError:
        pass
    return model, count or (os.cpu_count() or 0)


async def machine(server_url: str) -> dict[str, Any]:
    """CPU model and count, memory, Python, and the PostgreSQL server with the settings
    that move these figures most."""
    model, count = _cpu()
    conn = await asyncpg.connect(server_url)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in
                    ("fsync", "synchronous_commit", "shared_buffers", "max_connections")}
    finally:
        await conn.close()
    mem_kb = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            mem_kb = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    loop_us = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    return {
        "cpu_model": model, "cpu_count": count, "memory_gb": round(mem_kb / 1024**2, 1),
        "python_sum_range_1000_us": round(loop_us, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "postgresql": version,
        "postgresql_settings": settings, "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cpu_times() -> list[int]:
    """The machine's aggregate CPU times (``/proc/stat`` "cpu" line, in ticks)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to others between two ``cpu_times``."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return (after[7] - before[7]) / total if total else None


def table(rows: Sequence[Row]) -> str:
    """The rows as one plain-text table."""
    head = ("benchmark", "figure", "target", "verdict")
    cells = [head, *[(r.benchmark, r.figure, r.target, r.verdict) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for n, cell in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def facts_line(facts: dict[str, Any]) -> str:
    """Machine facts in one line under the table."""
    pg = facts["postgresql_settings"]
    return (f"{facts['cpu_model']} x{facts['cpu_count']}, {facts['memory_gb']} GB, "
            f"load {facts['load_average_at_start'][0]:.1f} at start | "
            f"Python {facts['python']} (sum(range(1000)) = "
            f"{facts['python_sum_range_1000_us']:.0f} µs) | PostgreSQL {facts['postgresql']} "
            f"(fsync={pg.get('fsync')}, synchronous_commit={pg.get('synchronous_commit')}, "
            f"shared_buffers={pg.get('shared_buffers')}) | {facts['date']}"
            + (f" | CPU steal {facts['cpu_steal_during_run']:.0%}"
               if facts.get("cpu_steal_during_run") is not None else ""))


def write_json(path: Path, rows: Sequence[Row], facts: dict[str, Any],
               command: str, elapsed_s: float) -> None:
    """``.bench/results.json``: the same rows, with their details."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": facts, "command": command, "elapsed_s": round(elapsed_s, 1),
               "results": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n",
                    encoding="utf-8")
