"""Sampling profiles of another process with py-spy (``--profile``): where its CPU goes.

cProfile sees only the bench's own process; the anchors run crm-bridge as a process of its
own, as deployed. ``sampled(pid, path)`` runs ``py-spy record --native --format raw`` on it
for the duration of the block (py-spy is in the ``bench`` extra; without it, or without
the right to trace, the block runs unprofiled and says why). ``summary(path)`` reads the
collapsed stacks back and shares the samples out by *area* — the package or project module
of a frame: ``aiohttp``, ``asyncpg``, ``daemon.dispatcher``, ``json``, ``<gc>``… — once
by the innermost frame that has one (own time: the interpreter's native frames count for
the Python code they run) and once by every area on the stack (inclusive).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.harness import PYTHON

RATE_HZ = 250
STOP_TIMEOUT_S = 20.0
TOP = 15
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_PROJECT = ("daemon", "web", "bench", "tests")


def _binary() -> str | None:
    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@asynccontextmanager
async def sampled(pid: int, path: Path) -> AsyncIterator[dict[str, Any]]:
    """Sample ``pid`` into ``path`` while the block runs; yields a dict that holds, after
    the block, ``summary(path)`` or an ``error``."""
    out: dict[str, Any] = {}
    spy = _binary()
    if spy is None:
        out["error"] = "py-spy not installed (make bench installs the bench extra)"
        yield out
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--native", "--rate", str(RATE_HZ), "--format", "raw",
        "--output", str(path), "--pid", str(pid), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        yield out
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            said, _ = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            said, _ = await proc.communicate()
        if path.exists() and path.stat().st_size:
            out.update(summary(path))
        else:
            out["error"] = f"py-spy wrote nothing: {said.decode(errors='replace')[-300:]}"


# Native frames that belong to an area (the rest — the interpreter, libc — are generic:
# their samples go to the nearest frame that is not).
_NATIVE = {
    "protocol.c": "asyncpg", "pgproto.c": "asyncpg", "recordobj.c": "asyncpg",
    "_asynciomodule.c": "asyncio", "_json.c": "json", "gcmodule.c": "<gc>",
    "_http_parser.c": "aiohttp", "_http_writer.c": "aiohttp", "_websocket.c": "aiohttp",
    "_multidict.c": "multidict", "_quoting_c.c": "yarl", "_frozenlist.c": "frozenlist",
    "_helpers_c.c": "propcache", "socketmodule.c": "<socket>", "selectmodule.c": "<select>",
    "_datetimemodule.c": "datetime", "_zoneinfo.c": "zoneinfo", "_hashopenssl.c": "hashlib",
    "_ssl.c": "ssl", "_struct.c": "struct", "_pickle.c": "pickle",
}


def area(frame: str) -> str:
    """The area a collapsed-stack frame belongs to (see the module docstring); "" for a
    generic native frame (the interpreter's own)."""
    match = _FRAME.match(frame)
    file = match.group("file") if match else ""
    if match and match.group("func").startswith("gc_collect"):
        return "<gc>"
    if file.endswith(".py"):
        parts = file[:-3].split("/")
        if parts[0] in _PROJECT:
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        return parts[0]
    if file.startswith("<frozen"):
        return file
    return _NATIVE.get(file, "")


def summary(path: Path) -> dict[str, Any]:
    """Shares of the samples in ``path`` (py-spy raw output) by area: own (the innermost
    frame with an area; garbage collection wherever it is on the stack) and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        areas = [a for a in map(area, stack.split(";")) if a]
        innermost = "<gc>" if "<gc>" in areas else (areas[-1] if areas else "<interpreter>")
        own[innermost] += count
        for name in set(areas):
            inclusive[name] += count
        total += count
    if not total:
        return {"samples": 0}
    return {"samples": total, "rate_hz": RATE_HZ,
            "own": {k: round(v / total, 3) for k, v in own.most_common(TOP)},
            "inclusive": {k: round(v / total, 3) for k, v in inclusive.most_common(TOP)}}


def describe(found: dict[str, Any]) -> str:
    """A few lines for stderr: the top areas by own and inclusive share."""
    if "error" in found or not found.get("samples"):
        return f"  (no profile: {found.get('error', 'no samples')})"
    own = ", ".join(f"{k} {v:.0%}" for k, v in found["own"].items())
    inc = ", ".join(f"{k} {v:.0%}" for k, v in found["inclusive"].items() if v < 0.99)
    return f"  {found['samples']} samples\n  own: {own}\n  inclusive: {inc}"


if __name__ == "__main__":  # python -m bench.sampling FILE: summarise a saved profile
    print(describe(summary(Path(sys.argv[1]))))
