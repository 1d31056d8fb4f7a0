"""The shipped Prometheus alert rules: valid and unit-tested by promtool itself, written
against metrics that exist, each with its runbook in docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from daemon.metrics import Metrics
from daemon.settings import Settings
from tests.support.daemon import running
from tests.support.fakecrm import FAKE

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/crm-bridge.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/crm-bridge.rules.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: `deploy/devenv.sh system` installs Debian's prometheus package")


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=RULES.parent, check=False)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in _alerts()}, "every alert is seen firing"
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    assert {"CrmBridgeDeliveriesLate", "CrmBridgeListenerDisconnected"} <= quiet


@needs_promtool
def test_a_broken_expectation_fails(tmp_path: Path) -> None:
    """The unit tests can fail: the backlog alert does not fire a minute early."""
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULE_TESTS.read_text(encoding="utf-8").replace(
        "      - eval_time: 6m\n        alertname: CrmBridgeDeliveriesLate\n"
        "        exp_alerts: []\n", "", 1)
    text = text.replace("      - eval_time: 8m\n        alertname: CrmBridgeDeliveriesLate",
                        "      - eval_time: 6m\n        alertname: CrmBridgeDeliveriesLate", 1)
    (tmp_path / RULE_TESTS.name).write_text(text, encoding="utf-8")
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "CrmBridgeDeliveriesLate" in result.stdout + result.stderr


def _series_names() -> set[str]:
    names = set()
    for family in Metrics("t").registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_the_rules_use_only_series_crm_bridge_exports() -> None:
    known = _series_names()
    for rule in _alerts():
        used = set(re.findall(r"\bcrm_bridge_[a-z_]+", rule["expr"]))
        assert used or "up{" in rule["expr"], rule["alert"]
        assert used <= known, f"{rule['alert']}: {used - known}"


def test_every_alert_has_its_runbook_in_the_operations_guide() -> None:
    guide = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    headings = {line[4:].strip() for line in guide.splitlines() if line.startswith("### ")}
    for rule in _alerts():
        name = rule["alert"]
        assert name in headings, f"docs/operations.md has no '### {name}'"
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


async def test_poll_only_exports_no_listener_series_to_alert_on(
    make_settings: Callable[..., Settings],
) -> None:
    for notify in (True, False):
        async with running(make_settings(integration=FAKE, notify=notify)) as daemon, \
                aiohttp.ClientSession() as http, http.get(f"{daemon.url}/metrics") as r:
            text = await r.text()
        assert ("\ncrm_bridge_listener_connected " in text) is notify
