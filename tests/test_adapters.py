"""Adapter conformance: every adapter folder (and the test suite's fake) satisfies the
protocol and the folder rules, and the import arrows of docs/architecture.md hold (checked
with ast)."""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

import daemon.integrations
from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations import available, load
from daemon.integrations.base import Adapter, AdapterDeps, Responsible, Route
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = Path(daemon.integrations.__file__).parent
ADAPTERS = [*available(), "tests.support.fakecrm"]
FIXED_FILES = ("__init__.py", "config.py", "client.py", "events.py")
KNOWN_EVENT_TYPES = frozenset({"start", "dial", "bridge", "hangup", "download"})
ASYNC_METHODS = ("deliver", "deliver_batch", "check_credentials", "list_users", "register",
                 "unregister", "responsible_manager", "read_settings", "write_settings",
                 "test_connection", "managers", "internal_numbers_view", "extensions",
                 "save_extensions", "sync_extensions")
# docs/architecture.md: cli is the composition root (cli → web → core); it alone may import web.
COMPOSITION_ROOT = Path("daemon/cli.py")


@pytest_asyncio.fixture
async def deps(pool: asyncpg.Pool) -> AsyncIterator[AdapterDeps]:
    async with aiohttp.ClientSession() as http:
        yield AdapterDeps(crypto=Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY), http=http,
                          pool=pool, public_url="https://bridge.example",
                          secret_key=TEST_SECRET_KEY)


def test_there_is_at_least_the_reference_adapter() -> None:
    assert "retailcrm" in available()


@pytest.mark.parametrize("name", ADAPTERS)
async def test_an_adapter_loads_by_name_and_satisfies_the_protocol(
    name: str, deps: AdapterDeps
) -> None:
    adapter = load(name, deps)
    assert isinstance(adapter, Adapter)
    assert adapter.name == name.rsplit(".", 1)[-1]
    assert adapter.name.isidentifier() and adapter.name.islower()
    assert isinstance(adapter.event_types, frozenset) and adapter.event_types
    assert adapter.event_types <= KNOWN_EVENT_TYPES
    assert isinstance(adapter.rate_limits, Mapping) and "default" in adapter.rate_limits
    assert all(isinstance(v, float | int) and v > 0 for v in adapter.rate_limits.values())
    assert adapter.rate_class("/some/path") in adapter.rate_limits
    assert isinstance(adapter.max_batch, int) and adapter.max_batch >= 1
    for method in ASYNC_METHODS:
        assert inspect.iscoroutinefunction(getattr(adapter, method)), method
    routes = adapter.routes()
    assert all(isinstance(r, web.AbstractRouteDef) for r in routes)
    web.Application().add_routes(routes)  # mountable as they are
    tasks = adapter.tasks(asyncio.Event())
    assert isinstance(tasks, Mapping)
    for task_name, coro in tasks.items():
        assert task_name and inspect.iscoroutine(coro)
        coro.close()  # never started: the runtime is the one that runs them
    templates = adapter.templates_dir()
    assert templates is None or templates.is_dir()
    assert not inspect.iscoroutinefunction(adapter.route)  # pure: called on every call


@pytest.mark.parametrize("name", ADAPTERS)
async def test_nobody_known_routes_nowhere(name: str, deps: AdapterDeps) -> None:
    adapter = load(name, deps)
    config = adapter.parse_config({"enabled": False, **_minimal_config(name)})
    route = adapter.route(config, Responsible(), {})
    assert isinstance(route, Route)
    assert route.extension is None and route.reason == "no_customer"


def _minimal_config(name: str) -> dict[str, str]:
    """What parse_config needs of a switched-off config of adapter ``name``."""
    if name == "tests.support.fakecrm":
        return {"url": "http://127.0.0.1:9", "api_key": Crypto(
            (TEST_FERNET_KEY,), TEST_SECRET_KEY).encrypt("k")}
    return {}


@pytest.mark.parametrize("name", ADAPTERS)
async def test_an_adapter_refuses_an_unknown_setting_by_name(
    name: str, deps: AdapterDeps, pool: asyncpg.Pool
) -> None:
    from tests.support.seed import add_enterprise

    await add_enterprise(pool, "0001")
    adapter = load(name, deps)
    with pytest.raises(ConfigError) as info:
        await adapter.write_settings("0001", {"no_such_setting": True})
    assert info.value.field == "no_such_setting"
    assert isinstance(await adapter.read_settings("0001"), Mapping)
    assert isinstance(await adapter.extensions("0001"), Mapping)


@pytest.mark.parametrize("name", ADAPTERS)
async def test_an_enabled_config_without_its_fields_names_a_field(
    name: str, deps: AdapterDeps
) -> None:
    adapter = load(name, deps)
    with pytest.raises(ConfigError) as info:
        adapter.parse_config({"enabled": True})
    assert info.value.field
    assert info.value.field in str(info.value)


@pytest.mark.parametrize("name", available())
def test_an_adapter_folder_has_the_fixed_file_names(name: str) -> None:
    folder = INTEGRATIONS / name
    missing = [f for f in FIXED_FILES if not (folder / f).is_file()]
    assert not missing, f"{folder} lacks {missing}"


# ---------------------------------------------------------------------- import arrows


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (inside functions too), absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _adapter_of(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    if len(parts) >= 4 and parts[:2] == ("daemon", "integrations") and parts[2] in available():
        return parts[2]
    return None


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_import_parser_sees_nested_and_relative_imports() -> None:
    source = "def f():\n    from .retailcrm import client\n    import web.app\n"
    found = _imports_of(source, "daemon.integrations")
    assert {"daemon.integrations.retailcrm", "daemon.integrations.retailcrm.client",
            "web.app"} <= found
    assert "web.app" in _imports(ROOT / COMPOSITION_ROOT)  # imported inside serve()


def test_the_core_imports_no_adapter_and_no_web() -> None:
    adapter_packages = [f"daemon.integrations.{name}" for name in available()]
    offences = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        if _adapter_of(path) is not None:
            continue
        rel = path.relative_to(ROOT)
        for module in _imports(path):
            if any(_is(module, package) for package in adapter_packages):
                offences.append(f"{rel} imports {module}")
            if _is(module, "web") and rel != COMPOSITION_ROOT:
                offences.append(f"{rel} imports {module}")
    assert not offences, offences


def test_web_imports_no_adapter() -> None:
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "web").rglob("*.py"))
        for module in _imports(path)
        if any(_is(module, f"daemon.integrations.{name}") for name in available())
    ]
    assert not offences, offences


def test_no_core_module_names_the_retailcrm_adapter() -> None:
    core = [p for p in [*(ROOT / "daemon").rglob("*.py"), *(ROOT / "web").rglob("*.py")]
            if _adapter_of(p) is None]
    offences = [str(p.relative_to(ROOT)) for p in core
                if any(_is(m, "daemon.integrations.retailcrm") for m in _imports(p))]
    assert not offences, offences


def test_an_adapter_imports_neither_web_nor_the_runtime_nor_another_adapter() -> None:
    # The runtime is the composition root's: an adapter's routes get CALLBACK_DEPS instead.
    offences = []
    for name in available():
        others = [f"daemon.integrations.{n}" for n in available() if n != name]
        for path in sorted((INTEGRATIONS / name).rglob("*.py")):
            for module in _imports(path):
                if (_is(module, "web") or _is(module, "daemon.runtime")
                        or any(_is(module, other) for other in others)):
                    offences.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offences, offences


def test_the_arrow_checks_catch_an_adapter_importing_the_runtime() -> None:
    # What retailcrm/http.py did before its routes got CALLBACK_DEPS.
    found = _imports_of("from daemon.runtime import RUNTIME\n", "daemon.integrations.retailcrm")
    assert any(_is(m, "daemon.runtime") for m in found)
