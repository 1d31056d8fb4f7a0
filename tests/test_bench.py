"""The benchmarks are not part of the suite (docs/benchmarks.md), but they must not rot: they
import, list themselves, select by name and prefix, and the parts that turn measurements
into figures (rounds, /proc readings, wrk's output, py-spy's stacks, the stamping upstream,
the pgqueuer worker's requests) do what the table says. No timed assertion here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest

from bench import anchors, ingest, latency, nginx, pgqworker, procfs, rounds, sampling
from bench.__main__ import BENCHMARKS, select
from daemon.integrations.retailcrm.client import RetailCrmClient
from tests.support.daemon import ROOT

ANCHORS = ["anchor.noop", "anchor.retailcrm", "anchor.latency", "anchor.ingest", "anchor.rss"]


def test_select_by_name_and_prefix() -> None:
    assert select([]) == list(BENCHMARKS)
    assert select(["cache"]) == ["cache.a", "cache.b"]
    assert select(["telephony"]) == ["telephony.a", "telephony.b", "telephony.c"]
    assert select(["anchor"]) == ANCHORS
    assert select(["journal"]) == ["journal.a", "journal.b"]
    assert select(["pipeline.d,cache.a", "pipeline.d"]) == ["pipeline.d", "cache.a"]
    assert select(["anchor.rss,pipeline.a"]) == ["pipeline.a", "anchor.rss"]
    with pytest.raises(ValueError, match=r"no benchmark 'pipeline\.z'"):
        select(["pipeline.z"])


def test_bench_lists_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert all(name in out for name in BENCHMARKS)
    assert all(name in BENCHMARKS for name in ANCHORS)


# ---------------------------------------------------------------------- rounds


def test_series_is_median_and_range() -> None:
    s = rounds.series([3.0, 1.0, 2.0])
    assert s is not None and s.median == 2.0
    assert s.text(".1f", " ms") == "2.0 ms (1.0–3.0)"
    assert rounds.series([5.0]).text(unit="/s") == "5/s"  # type: ignore[union-attr]
    assert rounds.series([1.0, None]) is None


def test_ratio_of_medians_with_the_range_of_pairs() -> None:
    got = rounds.ratio([10.0, 12.0, 30.0], [10.0, 6.0, 15.0])
    assert got is not None
    assert got.value == pytest.approx(12.0 / 10.0)
    assert (got.low, got.high) == (pytest.approx(1.0), pytest.approx(2.0))
    assert got.text() == "×1.20 (pairs ×1.00–2.00)"
    assert rounds.ratio([1.0], [None]) is None


def test_round_counts_cpu_per_thousand_deliveries() -> None:
    r = rounds.Round("crm-bridge", 20_000, 4.0, {rounds.CONSUMER: 2.0, rounds.POSTGRES: None})
    assert r.rate == 5_000
    assert r.per_1000(rounds.CONSUMER) == pytest.approx(0.1)
    assert r.per_1000(rounds.POSTGRES) is None
    assert r.summary()["cpu_s_per_1000"] == {"consumer": 0.1, "postgres": None}


# ---------------------------------------------------------------------- /proc


def test_tree_cpu_counts_a_child_that_has_exited() -> None:
    before = procfs.tree_cpu_seconds(os.getpid())
    burn = "import time\nwhile time.process_time() < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=60)
    # The child is reaped: its CPU is in our cutime/cstime, which the tree adds.
    assert procfs.tree_cpu_seconds(os.getpid()) - before >= 0.3 - 2 * procfs.TICK_S
    assert procfs.cpu_seconds(2**22 + 7) == 0.0  # no such process


def test_memory_of_this_process() -> None:
    mine = procfs.memory_kb(os.getpid())
    assert 0 < mine["VmRSS"] <= mine["VmHWM"]
    assert procfs.memory_kb(2**22 + 7) == {}


async def test_postmaster_is_the_parent_of_a_backend(database_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        postmaster = await procfs.postmaster_pid(conn)
        backend = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    if postmaster is None:  # a server on another machine: nothing of it in /proc
        assert not Path(f"/proc/{backend}").exists()
    else:
        assert procfs.tree_cpu_seconds(postmaster) >= procfs.cpu_seconds(postmaster)


# ---------------------------------------------------------------------- tools' output


WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:41233/api/events
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    36.71ms   20.18ms 201.37ms   74.31%
    Req/Sec   690.74    110.58     0.94k    71.00%
  Latency Distribution
     50%   34.90ms
     75%   45.13ms
     90%   61.66ms
     99%  112.50ms
  6914 requests in 5.01s, 1.39MB read
  Non-2xx or 3xx responses: 2
Requests/sec:   1380.22
Transfer/sec:    284.43KB
"""


def test_wrk_output_is_parsed() -> None:
    got = ingest.parse_wrk(WRK_OUTPUT)
    assert got == {"requests": 6914, "seconds": 5.01, "per_s": 1380.22, "non_2xx": 2,
                   "p50_ms": 34.9, "p90_ms": 61.66, "p99_ms": 112.5}
    with pytest.raises(RuntimeError, match="wrk said nothing usable"):
        ingest.parse_wrk("unable to connect to 127.0.0.1:1")


def test_wrk_script_posts_unique_envelopes() -> None:
    lua = ingest.script("service-token-abc", ["375290000001", "375290000002"], "r1")
    assert 'local tokens = {"375290000001", "375290000002"}' in lua
    assert '"Bearer service-token-abc"' in lua
    assert '"r1." .. tid .. "." .. n' in lua
    template = lua.split("local template = '", 1)[1].split("'\n", 1)[0]
    body = json.loads(template.replace("%%", "%") % ("T", "U", "T", "U"))
    assert (body["token"], body["uniqueId"], body["event_type"]) == ("T", "U", "dial")
    assert (body["raw"]["Token"], body["raw"]["UniqueId"]) == ("T", "U")


def test_py_spy_stacks_are_shared_out_by_area(tmp_path: Path) -> None:
    raw = tmp_path / "daemon.txt"
    raw.write_text(
        "<module> (daemon/__main__.py:10);Dispatcher._attempt (daemon/dispatcher.py:278);"
        "ClientSession._request (aiohttp/client.py:700);sock_send (socketmodule.c:4207) 6\n"
        "<module> (daemon/__main__.py:10);Connection.fetch (asyncpg/connection.py:717);"
        "__Pyx_Coroutine_SendEx (protocol.c:109696);_PyEval_EvalFrameDefault (ceval.c:1) 3\n"
        "<module> (daemon/__main__.py:10);plan (daemon/integrations/retailcrm/events.py:250);"
        "gc_collect_main (libpython3.11.so.1.0) 1\n", encoding="utf-8")
    got = sampling.summary(raw)
    assert got["samples"] == 10
    assert got["own"] == {"<socket>": 0.6, "asyncpg": 0.3, "<gc>": 0.1}
    assert got["inclusive"]["daemon.__main__"] == 1.0
    assert got["inclusive"]["aiohttp"] == 0.6
    assert got["inclusive"]["daemon.integrations.retailcrm.events"] == 0.1
    assert "own: <socket> 60%" in sampling.describe(got)


# ---------------------------------------------------------------------- upstreams


async def test_stamper_notes_each_request_for_its_event() -> None:
    """The stamping upstream answers like RetailCRM (the real client accepts it) and names
    the call and event of every request it received."""
    async with latency.stamper() as (url, received), aiohttp.ClientSession() as http:
        client = RetailCrmClient(http, url, "rcrm-key-0001")
        await client.call_event({"type": "in", "phone": "+375291234567", "codes": ["150"],
                                 "callExternalId": "1757.1"})
        await client.call_event({"type": "hangup", "phone": "+375291234567",
                                 "codes": ["150"], "callExternalId": "1757.1",
                                 "hangupStatus": "answered"})
        await client.upload_calls([{"externalId": "1757.1", "type": "in"},
                                   {"externalId": "1757.2", "type": "out"}])
    assert len(received) == 3
    first = latency.arrivals(received)
    assert set(first) == {"1757.1/dial", "1757.1/hangup", "1757.2/hangup"}
    assert first["1757.1/dial"] <= first["1757.1/hangup"] == received[1][0]


def test_nginx_answers_what_the_retailcrm_client_needs(tmp_path: Path) -> None:
    conf = nginx.config(tmp_path, 18019)
    assert "listen 127.0.0.1:18019;" in conf
    assert "access_log off;" in conf and "worker_processes 1;" in conf
    assert f"return 200 '{nginx.SUCCESS}';" in conf
    assert json.loads(nginx.SUCCESS) == {"success": True}
    assert json.loads(nginx.UPLOADED)["duplicateCalls"] == []


def test_pgqueuer_worker_sends_retailcrm_shaped_requests() -> None:
    dial = {"Token": "375290000001", "UniqueId": "1757.1", "CallType": 0,
            "Phone": "+375291234567", "Extensions": ["150", "151", "375291111111"]}
    (only,) = pgqworker.requests_for("dial", dial)
    assert only[0] == pgqworker.EVENT_PATH
    event = json.loads(parse_qs(only[1].decode())["event"][0])
    assert event["type"] == "in" and event["callExternalId"] == "1757.1"
    assert event["codes"] == ["150", "151"]

    hangup = {**dial, "Extensions": [""], "CallStatus": "2",
              "DateReceived": "2025-09-13 09:00:00"}
    popup, upload = pgqworker.requests_for("hangup", hangup)
    assert json.loads(parse_qs(popup[1].decode())["event"][0])["hangupStatus"] == "answered"
    assert upload[0] == pgqworker.UPLOAD_PATH
    (call,) = json.loads(parse_qs(upload[1].decode())["calls"][0])
    assert call["externalId"] == "1757.1" and call["result"] == "answered"


def test_anchor_rows_give_each_side_the_ratios_and_the_verdicts() -> None:
    def side(name: str, rates: list[float], cpu_ms: float, **details: object) -> list[
            rounds.Round]:
        return [rounds.Round(name, 1_000, 1_000 / rate,
                             {rounds.CONSUMER: cpu_ms, rounds.UPSTREAM: None,
                              rounds.POSTGRES: cpu_ms / 2}, dict(details))
                for rate in rates]

    got = {"crm-bridge": side("crm-bridge", [500.0, 600.0, 700.0], 1.0,
                              statuses={"done": 1_000}),
           "pgqueuer": side("pgqueuer", [1_000.0, 1_200.0, 1_400.0], 0.5, worker={})}
    rows = {r.benchmark: r for r in anchors.comparison_rows(
        "anchor.x", "ours", "theirs", got, rate_at_least=1.0, cpu_at_most=None,
        cpu_ms_at_most=0.5)}
    assert rows["anchor.x ours (3 rounds)"].figure == "600/s (500–700)"
    assert rows["anchor.x rate crm-bridge / pgqueuer"].figure == "×0.50"
    assert rows["anchor.x rate crm-bridge / pgqueuer"].verdict == "MISS"
    assert rows["anchor.x daemon CPU per delivery"].figure == "1.00 ms"
    assert rows["anchor.x daemon CPU per delivery"].verdict == "MISS"
    assert rows["anchor.x CPU s per 1,000, PostgreSQL"].figure == "0.500 vs 0.250 = ×2.00"
    assert "anchor.x CPU s per 1,000, nginx" not in rows  # not measured: no row

    got["crm-bridge"][1].details["statuses"] = {"done": 990, "failed": 10}
    (ours, *_rest) = anchors.comparison_rows("anchor.x", "ours", "theirs", got,
                                             rate_at_least=1.0, cpu_at_most=None)
    assert ours.verdict == "MISS" and "settled" in ours.figure


def test_nginx_counts_the_requests_it_answered() -> None:
    page = ("Active connections: 1 \nserver accepts handled requests\n 4 4 17 \n"
            "Reading: 0 Writing: 1 Waiting: 0 \n")
    assert nginx.served(page) == 17
    assert f"location = {nginx.STATUS_PATH} {{ stub_status; }}" in nginx.config(Path("/x"), 1)


def test_anchor_rows_say_the_requests_per_delivery_and_compare_with_a_baseline() -> None:
    def side(name: str, cpu_ms: float, requests: int) -> list[rounds.Round]:
        return [rounds.Round(name, 1_000, 1.0, {rounds.CONSUMER: cpu_ms, rounds.UPSTREAM: None,
                                                rounds.POSTGRES: cpu_ms / 4},
                             {"requests": requests}) for _ in range(3)]

    got = {"crm-bridge": side("crm-bridge", 0.6, 1_100), "pgqueuer": side("pgqueuer", 0.4, 1_500),
           "baseline": side("baseline", 1.0, 1_500)}
    rows = {r.benchmark: r.figure for r in anchors.comparison_rows(
        "anchor.x", "ours", "theirs", got, rate_at_least=1.0, cpu_at_most=None)}
    assert rows["anchor.x upstream requests per delivery, crm-bridge / pgqueuer"] == (
        "1.10 vs 1.50")
    assert rows["anchor.x CPU s per 1,000, daemon, crm-bridge / baseline"] == (
        "0.600 vs 1.000 = ×0.60")
    assert rows["anchor.x rate crm-bridge / baseline"] == "×1.00"
    assert rows["anchor.x baseline upstream requests per delivery"] == "1.50"
    got.pop("baseline")
    assert not any("baseline" in name for name in {r.benchmark for r in anchors.comparison_rows(
        "anchor.x", "ours", "theirs", got, rate_at_least=1.0, cpu_at_most=None)})
