"""CRM adapters, one folder each, loaded by name.

``load("retailcrm", deps)`` imports ``daemon.integrations.retailcrm`` and calls its
``create_adapter(deps)``. A dotted name (``tests.support.echo``) imports that module instead:
the test suite's own adapter comes in that way, and so could a third-party one.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from daemon.integrations.base import Adapter, AdapterDeps


class UnknownIntegration(LookupError):
    """No adapter of that name exists (the message lists the ones that do)."""


def available() -> list[str]:
    """The names of the adapter folders shipped in this package."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg)


def module_name(name: str) -> str:
    """The module that holds adapter ``name``."""
    return name if "." in name else f"{__name__}.{name}"


def integration_type(name: str) -> str:
    """The integration type (``crm_deliveries.integration_type``) of adapter ``name``: its
    module's ``NAME``, without building the adapter (for commands that only query)."""
    try:
        module = importlib.import_module(module_name(name))
    except ModuleNotFoundError:
        raise UnknownIntegration(
            f"no integration {name!r} (available: {', '.join(available()) or 'none'})"
        ) from None
    value = getattr(module, "NAME", None)
    if not isinstance(value, str):
        raise UnknownIntegration(f"{module.__name__} has no NAME")
    return value


def load(name: str, deps: AdapterDeps) -> Adapter:
    """Build the adapter ``name``; ``UnknownIntegration`` when there is none."""
    try:
        module = importlib.import_module(module_name(name))
    except ModuleNotFoundError as exc:
        if exc.name not in {module_name(name), name}:
            raise
        raise UnknownIntegration(
            f"no integration {name!r} (available: {', '.join(available()) or 'none'})"
        ) from None
    factory = getattr(module, "create_adapter", None)
    if factory is None:
        raise UnknownIntegration(f"{module.__name__} has no create_adapter(deps)")
    adapter: Adapter = factory(deps)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{module.__name__}.create_adapter did not return an Adapter")
    return adapter
