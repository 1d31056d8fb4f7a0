"""Responsible-manager routing: which extension should ring first for a calling number.

Two steps, so the slow one can be cached and the quick one always sees the latest data:

* :func:`look_up` asks RetailCRM who the caller is and who is responsible for them
  (``GET /api/v5/telephony/manager?phone=…&details=1&ignoreStatus=1``): the customer's id
  and name, the manager's id, name and status. One request bounded by ``timeout_s``. The
  phone is normalised first (:func:`daemon.phones.normalize`, the enterprise's region), so
  ``80291234567`` and ``+375291234567`` find the same customer. ``ignoreStatus=1``: RetailCRM
  names the responsible manager whatever their status, and :func:`decide` applies our rule;
  with ``ignoreStatus=0`` RetailCRM would hide every manager who is not ``free`` — a busy
  manager too, whom the PBX can still queue a call for.
* :func:`decide` (pure) turns that answer into an extension: the manager's number in
  ``user_extensions``; none when there is no customer, no manager, no number, or when the
  manager is away (``break`` or ``dinner``) and the enterprise skips away managers
  (``skip_away_managers``, on by default). The status that counts is the latest one
  RetailCRM reported through ``changeUserStatusUrl`` (stored per enterprise), else the one
  in the look-up's answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from daemon import phones
from daemon.integrations.base import Responsible, Route
from daemon.integrations.retailcrm.client import RetailCrmClient
from daemon.integrations.retailcrm.config import RetailCrmConfig

DEFAULT_TIMEOUT_S: Final = 1.0
AWAY: Final = frozenset({"break", "dinner"})
NOBODY: Final = Responsible()


async def look_up(client: RetailCrmClient, config: RetailCrmConfig, phone: str, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Responsible:
    """What RetailCRM says about ``phone`` (see the module docstring); ``NOBODY`` for an
    anonymous or internal caller, without asking.

    A RetailCRM failure raises the client's ``DeliveryError`` classes; a look-up that takes
    longer than ``timeout_s`` raises ``Retryable`` (``error_id`` ``timeout``).
    """
    normalized = phones.normalize(phone, config.region)
    if not phones.digits(normalized) or phones.is_extension(normalized):
        return NOBODY
    manager, customer = await client.telephony_manager(
        normalized, ignore_status=True, timeout_s=timeout_s)
    manager_id = _id(manager)
    customer_id = _id(customer)
    if manager_id is None and customer_id is None:
        return NOBODY
    status = manager.get("status") if manager is not None and manager_id is not None else None
    return Responsible(
        customer_id=customer_id,
        customer_name=customer_name(customer) if customer_id is not None else None,
        manager_id=manager_id,
        manager_name=person_name(manager) if manager_id is not None else None,
        manager_status=status if isinstance(status, str) else None,
    )


def decide(config: RetailCrmConfig, found: Responsible, statuses: Mapping[str, str]) -> Route:
    """The extension to ring for ``found``, or why none (see the module docstring)."""
    if found.manager_id is None:
        return Route(None, "no_manager" if found.customer_id is not None else "no_customer")
    extension = config.user_extensions.get(found.manager_id)
    if extension is None:
        return Route(None, "no_extension")
    status = statuses.get(found.manager_id, found.manager_status)
    if config.skip_away_managers and status in AWAY:
        return Route(None, "manager_away")
    return Route(extension)


def person_name(person: Mapping[str, Any] | None) -> str | None:
    """``firstName lastName`` of a RetailCRM user or customer; None when both are empty."""
    if person is None:
        return None
    parts = (person.get(k) for k in ("firstName", "lastName"))
    name = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    return name or None


def customer_name(customer: Mapping[str, Any] | None) -> str | None:
    """A customer's name: a person's first and last name, a company's ``nickName``."""
    if customer is None:
        return None
    name = person_name(customer)
    if name is None and isinstance(customer.get("nickName"), str):
        name = customer["nickName"].strip() or None
    return name


def _id(value: Mapping[str, Any] | None) -> str | None:
    if value is None:
        return None
    raw = value.get("id")
    if isinstance(raw, bool) or not isinstance(raw, int | str) or str(raw) == "":
        return None
    return str(raw)
