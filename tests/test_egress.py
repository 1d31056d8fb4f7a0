"""Outbound connections reach public addresses only: a CRM address typed by an enterprise's
admin can never make the daemon talk to the platform's own network (SSRF), not even through a
name whose DNS answer changes after it was saved (rebinding). ``CRM_BRIDGE_ALLOW_PRIVATE_CRM``
lifts the rule, and only it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.abc import AbstractResolver, ResolveResult

from daemon import egress, errors
from daemon.integrations.retailcrm.client import RetailCrmClient
from tests.support.bytesink import ByteSink

KEY = "rcrm-KEY-5ecret-0123456789abcdef"


@pytest_asyncio.fixture
async def postgres_port() -> AsyncIterator[ByteSink]:
    async with ByteSink() as sink:
        yield sink


class FixedDns(AbstractResolver):
    """A DNS server stand-in: answers each name from a script, one answer per lookup."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.lookups.append(host)
        address = self.answers[host.rstrip(".")].pop(0)
        kind = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [ResolveResult(hostname=host, host=address, port=port, family=kind, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),  # noqa: S104
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("240.0.0.1", "private"),  # reserved (Python files 240/4 under private too)
    ("100.64.0.1", "non-public"),  # carrier-grade NAT
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.2.3", "private"),  # v4-mapped
    ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
    ("8.8.8.8", None), ("93.184.216.34", None), ("2a00:1450:4001:82a::200e", None),
])
def test_what_counts_as_public(address: str, kind: str | None) -> None:
    assert egress.non_public(ipaddress.ip_address(address)) == kind


async def test_a_literal_private_address_is_never_connected(postgres_port: ByteSink) -> None:
    target = f"http://127.0.0.1:{postgres_port.port}/api/credentials"
    async with aiohttp.ClientSession(connector=egress.connector(allow_private=False)) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await http.get(target, headers={"X-API-KEY": KEY})
    refused = egress.refusal(info.value)
    assert refused is not None and refused.kind == "loopback"
    assert "CRM_BRIDGE_ALLOW_PRIVATE_CRM" in str(refused)
    assert postgres_port.connections == 0 and not postgres_port.received

    # The same request with the operator's permission does arrive: the refusal was the rule.
    async with aiohttp.ClientSession(connector=egress.connector(allow_private=True)) as http, \
            http.get(target, headers={"X-API-KEY": KEY}) as answer:
        assert answer.status == 200
    assert KEY.encode() in postgres_port.received


async def test_a_name_resolving_to_loopback_is_refused(postgres_port: ByteSink) -> None:
    async with aiohttp.ClientSession(connector=egress.connector(allow_private=False)) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await http.get(f"http://localhost:{postgres_port.port}/", headers={"X-API-KEY": KEY})
    refused = egress.refusal(info.value)
    assert refused is not None and refused.host == "localhost"
    assert refused.kind == "loopback"
    assert postgres_port.connections == 0


async def test_dns_rebinding_is_refused_at_connect_time(postgres_port: ByteSink) -> None:
    dns = FixedDns({"crm.example.com": ["93.184.216.34", "127.0.0.1", "::ffff:127.0.0.1"]})
    guard = egress.PublicOnlyResolver(dns)
    # Saved while the name was public...
    [first] = await guard.resolve("crm.example.com", 443)
    assert first["host"] == "93.184.216.34"
    # ...and pointing at the platform's loopback today: refused at the next connection,
    # whichever way the address is written.
    connector = aiohttp.TCPConnector(resolver=guard, socket_factory=egress.public_socket,
                                     use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(2):
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.get(f"http://crm.example.com:{postgres_port.port}/")
            refused = egress.refusal(info.value)
            assert refused is not None and refused.kind == "loopback"
    assert len(dns.lookups) == 3
    assert postgres_port.connections == 0


async def test_a_name_half_public_half_private_is_refused() -> None:
    class Both(FixedDns):
        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
            return [*await super().resolve(host, port), *await super().resolve(host, port)]

    guard = egress.PublicOnlyResolver(Both({"crm.example.com": ["93.184.216.34", "10.0.0.7"]}))
    with pytest.raises(egress.TargetRefused, match=r"10\.0\.0\.7.*private"):
        await guard.resolve("crm.example.com", 443)


async def test_the_crm_client_says_target_refused_and_sends_no_key(
    postgres_port: ByteSink,
) -> None:
    exchanges: list[Any] = []
    async with aiohttp.ClientSession(connector=egress.connector(allow_private=False)) as http:
        for domain in (f"http://127.0.0.1:{postgres_port.port}",
                       f"https://localhost:{postgres_port.port}",
                       f"http://[::ffff:127.0.0.1]:{postgres_port.port}"):
            client = RetailCrmClient(http, domain, KEY, on_exchange=exchanges.append)
            with pytest.raises(errors.Permanent) as info:
                await client.credentials()
            assert info.value.error_id == "target_refused"
            assert "was not contacted" in info.value.message
            assert KEY not in info.value.message
    assert len(exchanges) == 3 and all(x.status is None for x in exchanges)
    assert postgres_port.connections == 0 and not postgres_port.received
