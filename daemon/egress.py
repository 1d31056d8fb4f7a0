"""Where the daemon may connect to: the public internet only, unless the operator says so.

A CRM's address is typed in by an enterprise's administrator. Without a rule, an address such
as ``https://169.254.169.254`` (a cloud's metadata service) or ``http://127.0.0.1:5432`` (the
platform's own database) makes the daemon send a request — with the enterprise's API key in
its headers — into the platform's own network. Two checks stop that:

* when an address is saved or loaded, ``retailcrm.config.normalize_domain`` accepts only an
  ``https://`` DNS host name (no IP literal, no userinfo, no path);
* when a connection is opened, this module refuses every address that is not public:
  loopback, private, shared (CGNAT), link-local, multicast, reserved, unspecified — IPv4 and
  IPv6 alike, an IPv4 address mapped or embedded in IPv6 judged as that IPv4 address.

The connect-time check sits in the connector of the shared ``ClientSession``: a resolver
wrapping aiohttp's default one refuses a name if any address it resolves to is not public,
and a socket factory refuses the exact address about to be connected (which also covers a
literal address, for which aiohttp asks no resolver). Checking at connect time, not only at
save time, is what defeats DNS rebinding: a name that was public when it was saved and
points at 127.0.0.1 today is refused today.

``CRM_BRIDGE_ALLOW_PRIVATE_CRM=1`` switches the connect-time check off (the test suite, the
demo, a CRM hosted inside the platform's network).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Checked in this order, so the message names the most telling property.
_KINDS: Final = (
    ("is_loopback", "loopback"),
    ("is_unspecified", "unspecified"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_private", "private"),
    ("is_reserved", "reserved"),
)
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
ALLOW_HINT: Final = "set CRM_BRIDGE_ALLOW_PRIVATE_CRM=1 to allow private CRM addresses"


class TargetRefused(OSError):
    """A connection to a non-public address was refused before anything was sent."""

    def __init__(self, host: str, address: str, kind: str) -> None:
        shown = host if host == address else f"{host} ({address})"
        super().__init__(f"{shown} is a {kind} address: refused ({ALLOW_HINT})")
        self.host = host
        self.address = address
        self.kind = kind


def non_public(address: Address) -> str | None:
    """What makes ``address`` unfit for a CRM (``"loopback"``, ``"private"``...), or None
    when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return non_public(embedded)
        if address.teredo is not None:
            return non_public(address.teredo[1])
        if address in _NAT64:
            return non_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for attribute, kind in _KINDS:
        if getattr(address, attribute):
            return kind
    if not address.is_global:
        return "non-public"
    return None


def check(host: str, address: str) -> None:
    """Raise :class:`TargetRefused` unless ``address`` (an IP, maybe with an IPv6
    ``%scope``) is public."""
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        raise TargetRefused(host, address, "malformed") from None
    kind = non_public(parsed)
    if kind is not None:
        raise TargetRefused(host, address, kind)


class PublicOnlyResolver(AbstractResolver):
    """Wraps a resolver (aiohttp's default one) and refuses a name if any of its addresses
    is not public: a name half public, half private is not trusted either."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The inner resolver's answer, once every address in it passed :func:`check`."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check(host.rstrip("."), result["host"])
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


def public_socket(addr_info: aiohttp.AddrInfoType) -> socket.socket:
    """aiohttp's socket factory: a socket for ``addr_info``, if its address is public."""
    family, kind, proto, _canonical, sockaddr = addr_info
    address = str(sockaddr[0])
    check(address, address)
    return socket.socket(family=family, type=kind, proto=proto)


def connector(*, allow_private: bool, limit: int = 100) -> aiohttp.TCPConnector:
    """The connector of a session that talks to CRMs: public addresses only, unless
    ``allow_private``. Call it inside the running event loop."""
    if allow_private:
        return aiohttp.TCPConnector(limit=limit)
    return aiohttp.TCPConnector(limit=limit, resolver=PublicOnlyResolver(),
                                socket_factory=public_socket)


def refusal(exc: BaseException) -> TargetRefused | None:
    """The :class:`TargetRefused` behind an aiohttp connection error, if that is its cause."""
    seen: BaseException | None = exc
    for _depth in range(4):
        if seen is None:
            return None
        if isinstance(seen, TargetRefused):
            return seen
        os_error = getattr(seen, "os_error", None)
        seen = os_error if isinstance(os_error, BaseException) else seen.__cause__
    return None
