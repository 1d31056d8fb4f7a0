"""Responsible-manager routing: which extension should ring first for a calling number.

Owns one decision for the PBX's smart redirect: ask RetailCRM who is responsible for the
caller (``GET /api/v5/telephony/manager``), then look that manager's internal number up in
the enterprise's ``user_extensions``. No manager, or a manager without a number, is None:
the PBX then routes the call as it would without RetailCRM.

The phone is normalised first (:func:`daemon.phones.normalize`, the enterprise's region), so
``80291234567`` and ``+375291234567`` find the same customer. By default RetailCRM only
answers with a manager whose status is ``free`` (``ignoreStatus=0``): a manager at dinner is
not rung first. The whole look-up is one request bounded by ``timeout_s``.
"""

from __future__ import annotations

from daemon import phones
from daemon.integrations.retailcrm.client import RetailCrmClient
from daemon.integrations.retailcrm.config import RetailCrmConfig

DEFAULT_TIMEOUT_S = 1.0


async def responsible_extension(
    client: RetailCrmClient, config: RetailCrmConfig, phone: str, *,
    timeout_s: float = DEFAULT_TIMEOUT_S, ignore_status: bool = False,
) -> str | None:
    """The responsible manager's extension for ``phone``, or None (see the module doc).

    A RetailCRM failure raises the client's ``DeliveryError`` classes; a look-up that takes
    longer than ``timeout_s`` raises ``Retryable`` (``error_id`` ``timeout``).
    """
    normalized = phones.normalize(phone, config.region)
    if not phones.digits(normalized) or phones.is_extension(normalized):
        return None  # nobody to look up: anonymous, or an internal caller
    manager = await client.responsible_manager(
        normalized, ignore_status=ignore_status, timeout_s=timeout_s)
    if manager is None or manager.get("id") is None:
        return None
    return config.user_extensions.get(str(manager["id"]))
