"""The systemd units as shipped, checked by systemd's own tool: installed the way
docs/operations.md says (a wheel into /opt/crm-bridge/venv — under a temporary root), the
units verify clean, their ExecStart and Documentation= exist, and the settings the issue
asked for are where systemd reads them."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = "opt/crm-bridge/venv"
UNITS = ("crm-bridge@.service", "crm-bridge-migrate.service")
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "daemon", "web", "sql", "docs",
           "systemd", "deploy")

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not found (Debian's systemd package has it)")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=60, check=False)


def _system_root(tmp_path: Path) -> Path:
    """A filesystem root with the host's systemd units (the targets ours order against)."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root in which crm-bridge is installed into /opt/crm-bridge/venv from a wheel built
    from this tree, and its units copied from the installed share/ to /etc/systemd/system."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze not found")
    tmp = tmp_path_factory.mktemp("systemd")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    root = _system_root(tmp)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--ignore-installed",  # else pip uninstalls the running editable install first
         "--no-index", "--prefix", str(root / VENV), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    for unit in UNITS:
        shutil.copy2(root / VENV / "share/crm-bridge/systemd" / unit,
                     root / "etc/systemd/system" / unit)
    return root


@needs_analyze
@pytest.mark.slow
def test_the_installed_units_verify_clean(installed: Path) -> None:
    assert os.access(installed / VENV / "bin/crm-bridge", os.X_OK)
    result = _verify(installed, "crm-bridge@retailcrm.service", "crm-bridge-migrate.service")
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "not even a warning"


@needs_analyze
@pytest.mark.slow
def test_documentation_exists_after_install(installed: Path) -> None:
    for unit in UNITS:
        for url in _unit(unit)["Unit"]["Documentation"].split():
            assert url.startswith("file:///"), url
            assert (installed / url.removeprefix("file:///")).is_file(), url


@needs_analyze
def test_verify_catches_what_the_old_unit_got_wrong(tmp_path: Path) -> None:
    """The check above can fail: a start limit in [Service] is a warning systemd-analyze
    prints (and systemd ignores), a missing ExecStart binary an error."""
    root = _system_root(tmp_path)
    bad = (ROOT / "systemd/crm-bridge@.service").read_text().replace(
        "[Service]\n", "[Service]\nStartLimitIntervalSec=300\n", 1)
    (root / "etc/systemd/system/crm-bridge@.service").write_text(bad)
    shutil.copy2(ROOT / "systemd/crm-bridge-migrate.service", root / "etc/systemd/system")
    result = _verify(root, "crm-bridge@retailcrm.service")
    assert "Unknown key 'StartLimitIntervalSec' in section [Service]" in result.stderr
    assert "/opt/crm-bridge/venv/bin/crm-bridge is not executable" in result.stderr


def test_the_instance_unit_is_a_notify_service_with_a_watchdog_and_its_hardening() -> None:
    unit = _unit("crm-bridge@.service")
    assert unit["Unit"]["StartLimitIntervalSec"] and unit["Unit"]["StartLimitBurst"]
    assert "StartLimitIntervalSec" not in unit["Service"]
    assert "crm-bridge-migrate.service" in unit["Unit"]["Requires"]
    assert "crm-bridge-migrate.service" in unit["Unit"]["After"]
    service = unit["Service"]
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert int(service["WatchdogSec"]) > 0
    assert "ExecStartPre" not in service, "migrations are a unit of their own"
    for key, value in {"PrivateUsers": "yes", "ProtectProc": "invisible",
                       "ProcSubset": "pid", "RemoveIPC": "yes"}.items():
        assert service[key] == value, key
    assert "link-local" in service["IPAddressDeny"]
    assert "AF_UNIX" in service["RestrictAddressFamilies"], "the notification socket"


def test_the_migrate_unit_is_a_oneshot_reading_only_the_database_url() -> None:
    service = _unit("crm-bridge-migrate.service")["Service"]
    assert (service["Type"], service["RemainAfterExit"]) == ("oneshot", "yes")
    assert service["ExecStart"].endswith("crm-bridge migrate")
    assert service["EnvironmentFile"] == "/etc/crm-bridge/migrate.env"
