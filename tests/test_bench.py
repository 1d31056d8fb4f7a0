"""The benchmarks are not part of the suite (docs/benchmarks.md), but they must not rot: they
import, list themselves, and select by name and prefix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.__main__ import BENCHMARKS, select
from tests.support.daemon import ROOT


def test_select_by_name_and_prefix() -> None:
    assert select([]) == list(BENCHMARKS)
    assert select(["cache"]) == ["cache.a", "cache.b"]
    assert select(["telephony"]) == ["telephony.a", "telephony.b", "telephony.c"]
    assert select(["journal"]) == ["journal.a", "journal.b"]
    assert select(["pipeline.d,cache.a", "pipeline.d"]) == ["pipeline.d", "cache.a"]
    with pytest.raises(ValueError, match=r"no benchmark 'pipeline\.z'"):
        select(["pipeline.z"])


def test_bench_lists_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert all(name in out for name in BENCHMARKS)
