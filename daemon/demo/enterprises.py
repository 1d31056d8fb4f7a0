"""The demo's two enterprises: their platform rows, and their RetailCRM connected.

:data:`ENTERPRISES` describes them — number, ``Token``, provider line, internal numbers
with their owners, RetailCRM managers and which number each has, and how the call services
hand their events over (one through the SQL insert, one over HTTP). ``name2`` is the
``Token`` its Asterisk host sends (docs/events.md).

:func:`seed` writes what the platform itself would hold: the ``enterprises`` row (its
``secret``, the credential at the platform's Asterisk service, made anew each run), the
owners in ``users`` and the numbers in ``user_internal_phones``. These are the platform's
tables and statements, so they live here, not among crm-bridge's own (daemon/store.py).
Running it again updates the same rows.

:func:`connect` then connects RetailCRM the way an administrator does, through the
adapter's own operations (the ones the admin pages, the API and ``crm-bridge retailcrm``
call): the account's address and API key (stored encrypted), the managers' numbers, then
the module registration, which switches the integration on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg

from daemon.integrations.base import Adapter

UPSERT_ENTERPRISE: Final = """
INSERT INTO enterprises (number, name, name2, secret, active)
VALUES ($1, $2, $3, $4, true)
ON CONFLICT (number) DO UPDATE
    SET name = EXCLUDED.name, name2 = EXCLUDED.name2, secret = EXCLUDED.secret, active = true
"""
UPSERT_USER: Final = """
INSERT INTO users (id, first_name, last_name) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name
"""
FORGET_PHONES: Final = "DELETE FROM user_internal_phones WHERE enterprise_number = $1"
INSERT_PHONE: Final = """
INSERT INTO user_internal_phones (enterprise_number, phone_number, user_id) VALUES ($1, $2, $3)
"""


class SetupError(Exception):
    """RetailCRM could not be connected for a demo enterprise; the message says why."""


@dataclass(frozen=True, slots=True)
class Extension:
    """An internal number and its owner on the platform (``users``)."""

    number: str
    user_id: int
    first_name: str
    last_name: str


@dataclass(frozen=True, slots=True)
class DemoEnterprise:
    """One demo enterprise (see the module docstring)."""

    number: str
    name: str
    name2: str  # the Token its Asterisk host sends
    trunk: str
    extensions: tuple[Extension, ...]
    crm_users: int
    managers: Mapping[str, str]  # RetailCRM user id → internal number
    via: Literal["sql", "http"]
    known_caller: str  # a customer whose responsible manager RetailCRM knows
    known_caller_manager: int
    time_zone: str = "Europe/Minsk"
    region: str = "BY"

    @property
    def numbers(self) -> tuple[str, ...]:
        """The internal numbers."""
        return tuple(e.number for e in self.extensions)


ENTERPRISES: Final = (
    DemoEnterprise(
        number="0367", name="Demo shop", name2="375291234567", trunk="0001363",
        extensions=(Extension("150", 9001, "Anna", "Ivanova"),
                    Extension("151", 9002, "Ivan", "Petrov"),
                    Extension("152", 9003, "Maria", "Sidorova"),
                    Extension("153", 9004, "Oleg", "Kozlov")),
        crm_users=4, managers={"1": "150", "2": "151", "3": "152"}, via="sql",
        known_caller="+375291112233", known_caller_manager=2,
    ),
    DemoEnterprise(
        number="0400", name="Demo service", name2="375447654321", trunk="0001400",
        extensions=(Extension("201", 9011, "Elena", "Novikova"),
                    Extension("202", 9012, "Sergei", "Morozov"),
                    Extension("203", 9013, "Olga", "Volkova")),
        crm_users=3, managers={"1": "201", "2": "202"}, via="http",
        known_caller="+375447778899", known_caller_manager=1,
    ),
)


async def seed(pool: asyncpg.Pool, firm: DemoEnterprise, pbx_secret: str) -> None:
    """Write ``firm``'s platform rows (one transaction; the same rows again on a rerun)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(UPSERT_ENTERPRISE, firm.number, firm.name, firm.name2, pbx_secret)
        await conn.execute(FORGET_PHONES, firm.number)
        for ext in firm.extensions:
            await conn.execute(UPSERT_USER, ext.user_id, ext.first_name, ext.last_name)
            await conn.execute(INSERT_PHONE, firm.number, ext.number, ext.user_id)


async def connect(adapter: Adapter, firm: DemoEnterprise, crm_url: str, api_key: str) -> str:
    """Connect ``firm`` to the RetailCRM account at ``crm_url``: settings, managers'
    numbers, module registration. Returns the registration's message; ``SetupError`` when
    RetailCRM refused it."""
    await adapter.write_settings(firm.number, {
        "domain": crm_url, "api_key": api_key, "enabled": False,
        "time_zone": firm.time_zone, "region": firm.region,
    })
    # Switched off, so the numbers are sent once, with the registration below.
    await adapter.save_extensions(firm.number, dict(firm.managers))
    result = await adapter.register(firm.number)
    if not result.ok:
        raise SetupError(f"enterprise {firm.number}: {result.message}")
    return result.message
