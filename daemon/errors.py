"""The error classes every boundary speaks, and what each one means for a delivery.

An adapter (or its HTTP client) raises exactly one of these for anything that went wrong
talking to a CRM; the dispatcher decides the delivery's outcome from the class alone
(docs/architecture.md, "Rules that hold everywhere"). Anything else escaping an adapter is
a bug: it is logged with its traceback, counted, and retried a capped number of times.

Messages never carry a secret: they are shown in the admin UI and written to
``integration_logs``.
"""

from __future__ import annotations

from typing import Any


class DeliveryError(Exception):
    """Base class: a CRM call failed in a way the adapter understood.

    ``error_id`` is a stable, machine-readable code (``http_500``, ``timeout``,
    ``not_json``...); ``details`` holds what the CRM said (field errors), already free of
    secrets; ``request`` and ``response`` are what to record in the attempt's log row.
    """

    def __init__(
        self,
        message: str,
        *,
        error_id: str = "error",
        status: int | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_id = error_id
        self.status = status
        self.details = details

    def __str__(self) -> str:
        return self.message


class Retryable(DeliveryError):
    """Try again later: timeouts, connection errors, 5xx, rate limiting.

    ``retry_after`` (seconds) is the earliest sensible retry, from a ``Retry-After``
    header; ``rate_limited`` marks an answer that said "slow down" (429/503), which
    reschedules without using up one of the delivery's attempts.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
        error_id: str = "retryable",
        status: int | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message, error_id=error_id, status=status, details=details)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class Permanent(DeliveryError):
    """The CRM refused this request for good (validation, not found...): dead letter."""


class AuthFailed(DeliveryError):
    """The CRM rejected the credentials: stop sending for this enterprise, ask its admin."""


class ConfigError(ValueError):
    """A stored per-enterprise configuration is invalid; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
