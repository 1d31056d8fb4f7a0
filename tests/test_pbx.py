"""The PBX client against the PBX simulator: what goes out, what is refused before anything
leaves (a hypothesis property over arbitrary strings), typed failures, no secret anywhere."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.metrics import Metrics
from daemon.pbx import (
    ORIGINATE_PATH,
    TRANSFER_PATH,
    Line,
    Pbx,
    PbxFailed,
    PbxRefused,
    PbxTimeout,
    check_extension,
    check_phone,
    new_session,
)
from daemon.pbx_simulator import PbxSimulator, running_pbx
from tests.support.seed import add_enterprise

ENTERPRISE = "0367"
OTHER = "0368"
SECRET = f"secret-{ENTERPRISE}"  # what tests.support.seed stores in enterprises.secret
LINE = Line(ENTERPRISE, SECRET, frozenset({"101", "102", "150"}))
HOSTILE = [
    "101;reboot", "101 && reboot", "$(reboot)", "`reboot`", "101 102", "101\n102", "101\x00",
    "10l", "+375 29 123 45 67", "375-29-1234567", "1" * 40, "٣٧٥٢٩١٢٣٤٥٦٧", "",
    "+", "++375291234567", "375291234567\n", "\u202e101", "0x65",
]


@pytest_asyncio.fixture
async def pbx_sim() -> AsyncIterator[PbxSimulator]:
    async with running_pbx(PbxSimulator({SECRET: ENTERPRISE})) as sim:
        yield sim


@pytest_asyncio.fixture
async def client(pool: asyncpg.Pool, pbx_sim: PbxSimulator) -> AsyncIterator[Pbx]:
    for number, extensions in ((ENTERPRISE, ("101", "102", "150")), (OTHER, ("201",))):
        await add_enterprise(pool, number)
        for ext in extensions:
            await pool.execute("INSERT INTO user_internal_phones (enterprise_number, "
                               "phone_number) VALUES ($1, $2)", number, ext)
    async with new_session(0.5) as session:
        yield Pbx(pool, session, pbx_sim.url + "/", timeout_s=0.5, metrics=Metrics("retailcrm"))


def test_an_extension_must_be_digits_and_the_enterprise_s_own() -> None:
    assert check_extension("101", LINE) == "101"
    for bad in [*HOSTILE, "201", "1010"]:
        with pytest.raises(PbxRefused) as info:
            check_extension(bad, LINE, "from_ext")
        assert info.value.field == "from_ext"
        assert "\x00" not in str(info.value) and "\n" not in str(info.value)


def test_a_phone_is_plainly_a_number_normalised_in_the_region() -> None:
    assert check_phone("80291234567", LINE, "BY") == "+375291234567"
    assert check_phone("+375291234567", LINE, "BY") == "+375291234567"
    assert check_phone("375291234567", LINE, "BY") == "+375291234567"
    assert check_phone("84951234567", LINE, "RU") == "+74951234567"
    assert check_phone("150", LINE, "BY") == "150"  # a colleague: as it is
    for bad in [*HOSTILE, "12", "999", "201", "0000000000000"]:
        with pytest.raises(PbxRefused) as info:
            check_phone(bad, LINE, "BY")
        assert info.value.field == "phone", bad


async def test_originate_sends_the_checked_values_and_the_secret(
    client: Pbx, pbx_sim: PbxSimulator
) -> None:
    line = await client.line(ENTERPRISE)
    assert line.extensions == {"101", "102", "150"}
    assert SECRET not in repr(line) and SECRET not in repr(client)
    answer = await client.originate(line, "102", "80291234567", region="BY")
    assert answer.status == 200 and answer.body["success"] is True
    (request,) = pbx_sim.received(ORIGINATE_PATH)
    assert request.query == {"code": "102", "phone": "+375291234567"}
    assert request.client_ok and request.enterprise == ENTERPRISE and not request.dangerous
    await client.transfer(line, "101", "150")
    (moved,) = pbx_sim.received(TRANSFER_PATH)
    assert moved.query == {"transfer_type": "blind", "from_ext": "101", "to_ext": "150"}
    assert moved.enterprise == ENTERPRISE


async def test_nothing_leaves_for_a_bad_value_or_another_enterprise_s_number(
    client: Pbx, pbx_sim: PbxSimulator
) -> None:
    line = await client.line(ENTERPRISE)
    for code, phone, field in [("201", "+375291234567", "code"),
                               ("101", "201", "phone"),
                               *[(bad, "+375291234567", "code") for bad in HOSTILE],
                               *[("101", bad, "phone") for bad in HOSTILE]]:
        with pytest.raises(PbxRefused) as info:
            await client.originate(line, code, phone)
        assert info.value.field == field
    with pytest.raises(PbxRefused) as info:
        await client.transfer(line, "101", "201")
    assert info.value.field == "to_ext"
    assert pbx_sim.requests == []
    with pytest.raises(PbxRefused) as info:
        await client.line("9999")
    assert info.value.field == "enterprise"


@given(code=st.one_of(st.text(), st.sampled_from(["101", "102", "201", "150"])),
       phone=st.one_of(st.text(), st.from_regex(r"\+?[0-9]{3,18}", fullmatch=True)))
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_property_whatever_the_strings_nothing_unsafe_reaches_the_pbx(
    client: Pbx, pbx_sim: PbxSimulator, code: str, phone: str
) -> None:
    line = Line(ENTERPRISE, SECRET, frozenset({"101", "102", "150"}))
    before = len(pbx_sim.requests)
    try:
        await client.originate(line, code, phone)
    except PbxRefused:
        assert len(pbx_sim.requests) == before  # refused: nothing was sent
        return
    request = pbx_sim.requests[-1]
    assert len(pbx_sim.requests) == before + 1
    assert request.query["code"] == code and code in line.extensions
    assert re.fullmatch(r"\+?[0-9]{3,18}", request.query["phone"])
    assert not request.dangerous


async def test_failures_are_typed_and_never_carry_the_secret(
    client: Pbx, pbx_sim: PbxSimulator
) -> None:
    line = await client.line(ENTERPRISE)
    with capture_logs() as logs:
        pbx_sim.add_fault(status=500, body=f"boom for {SECRET}", count=1)
        with pytest.raises(PbxFailed) as failed:
            await client.originate(line, "101", "+375291234567")
        assert "HTTP 500" in failed.value.message and SECRET not in failed.value.message
        pbx_sim.add_fault(status=200, body={"success": False, "error": "line busy"}, count=1)
        with pytest.raises(PbxFailed) as refused:
            await client.originate(line, "101", "+375291234567")
        assert "line busy" in refused.value.message
        pbx_sim.add_fault(latency_ms=2000, count=1)
        with pytest.raises(PbxTimeout) as slow:
            await client.originate(line, "101", "+375291234567")
        assert slow.value.status == 504
        pbx_sim.add_fault(outage=True, count=1)
        before = len(pbx_sim.requests)
        with pytest.raises(PbxFailed):
            await client.originate(line, "101", "+375291234567")
        # A dropped connection is reported, never re-sent: the manager's phone rings once.
        assert len(pbx_sim.requests) == before + 1
        wrong = Line(ENTERPRISE, "not-the-secret", line.extensions)
        with pytest.raises(PbxFailed) as unknown:
            await client.originate(wrong, "101", "+375291234567")
        assert "403" in unknown.value.message
        assert "not-the-secret" not in unknown.value.message
    assert [e["outcome"] for e in logs if e["event"] == "pbx_request"] == [
        "failed", "failed", "timeout", "failed", "failed"]
    assert SECRET not in repr(logs)


async def test_the_simulator_s_controls(pbx_sim: PbxSimulator,
                                        http: aiohttp.ClientSession) -> None:
    async with http.post(pbx_sim.url + "/_clients", json={"s3cr3t": "0999"}) as resp:
        assert resp.status == 200
    url = pbx_sim.url + ORIGINATE_PATH
    async with http.get(url, params={"code": "1;ls", "phone": "1", "clientId": "s3cr3t"}) as resp:
        assert resp.status == 400
    async with http.get(url, params={"code": "1", "phone": "2", "clientId": "nope"}) as resp:
        assert resp.status == 403
    async with http.post(pbx_sim.url + "/_fault", json={"colour": "red"}) as resp:
        assert resp.status == 400
    async with http.get(pbx_sim.url + "/_requests") as resp:
        listed = await resp.json()
    assert listed["count"] == 2
    assert listed["requests"][0]["dangerous"] == ["code"]
    assert listed["requests"][0]["enterprise"] == "0999"
    assert "s3cr3t" not in repr(listed)
    async with http.post(pbx_sim.url + "/_reset") as resp:
        assert resp.status == 200
    assert pbx_sim.requests == []
