"""What a stand-in CRM (the tests' fake, the benchmarks' no-op) has of the adapter protocol
beyond delivering: nothing — no users, no module to register, no callbacks, no background
loops, no admin pages, no settings an admin could change. Subclasses name themselves in
``crm_label`` for the messages."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.errors import ConfigError
from daemon.integrations.base import (
    CredentialsCheck,
    CrmUser,
    ExtensionsSaved,
    IntegrationConfig,
    InternalNumber,
    ManagersView,
    RegistrationResult,
    Responsible,
    Route,
)


class StandInCrm:
    """The adapter protocol's members a CRM without users, module or callbacks needs."""

    crm_label = "the stand-in CRM"

    def routes(self) -> Sequence[web.AbstractRouteDef]:
        """No callbacks."""
        return []

    async def check_credentials(self, config: IntegrationConfig) -> CredentialsCheck:
        """Any credentials do."""
        return CredentialsCheck(ok=True, message=f"{self.crm_label} takes any key")

    async def list_users(self, enterprise: str, config: IntegrationConfig) -> list[CrmUser]:
        """Nobody."""
        return []

    async def register(self, enterprise: str) -> RegistrationResult:
        """Nothing to register."""
        return RegistrationResult(ok=True, message=f"nothing to register in {self.crm_label}")

    async def unregister(self, enterprise: str) -> RegistrationResult:
        """Nothing to unregister."""
        return RegistrationResult(ok=True, message=f"nothing to unregister in {self.crm_label}")

    async def responsible_manager(
        self, enterprise: str, config: IntegrationConfig, phone: str, *, timeout_s: float = 1.0
    ) -> Responsible:
        """Nobody is known."""
        return Responsible()

    def route(self, config: IntegrationConfig, found: Responsible,
              statuses: Mapping[str, str]) -> Route:
        """Nobody to ring."""
        return Route(None, "no_customer")

    def tasks(self, stopping: asyncio.Event) -> Mapping[str, Coroutine[Any, Any, None]]:
        """No background loops."""
        return {}

    def templates_dir(self) -> Path | None:
        """No admin pages."""
        return None

    async def read_settings(self, enterprise: str) -> Mapping[str, Any]:
        """Nothing to show."""
        return {}

    async def write_settings(self, enterprise: str, changes: Mapping[str, Any]
                             ) -> Mapping[str, Any]:
        """Nothing can be changed: the first key named is refused."""
        for name in changes:
            raise ConfigError(str(name), f"is not a setting of {self.crm_label}")
        return {}

    async def test_connection(self, enterprise: str,
                              changes: Mapping[str, Any] | None = None) -> CredentialsCheck:
        """Any credentials do."""
        return CredentialsCheck(ok=True, message=f"{self.crm_label} takes any key")

    async def managers(self, enterprise: str) -> ManagersView:
        """Nobody."""
        return ManagersView((), (), module_registered=False)

    async def internal_numbers_view(self, enterprise: str) -> list[InternalNumber]:
        """None are shown."""
        return []

    async def extensions(self, enterprise: str) -> Mapping[str, str]:
        """None."""
        return {}

    async def save_extensions(self, enterprise: str, assignments: Mapping[str, str | None]
                              ) -> ExtensionsSaved:
        """Refused: there are no managers."""
        raise ConfigError("user_extensions", f"{self.crm_label} has no managers")

    async def sync_extensions(self, enterprise: str) -> RegistrationResult:
        """Nothing to send."""
        return RegistrationResult(ok=True, message=f"nothing to send to {self.crm_label}")
