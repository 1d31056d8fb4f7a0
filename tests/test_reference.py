"""The generated reference tables (configuration, metrics) match the code, and the check
notices when the code moves on without them."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client import Gauge

from daemon import reference, settings
from daemon.metrics import Metrics
from daemon.settings import variables

ROOT = Path(__file__).resolve().parent.parent


def _first_column(page: str, header: str) -> list[str]:
    """The backticked names in the first column of the table whose header row starts with
    ``| header |``."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names.append(re.match(r"\| `([^`]+)`", line).group(1))  # type: ignore[union-attr]
    return names


def test_the_generated_tables_are_current() -> None:
    assert reference.stale() == [], "run `make docs` (python -m daemon.reference)"


def test_the_metrics_table_lists_every_family_the_registry_exports() -> None:
    exported = {reference.series_name(f.name, f.type) for f in Metrics("t").registry.collect()}
    documented = _first_column("docs/metrics.md", "metric")
    assert len(documented) == len(set(documented))
    assert set(documented) == exported


def test_the_configuration_reference_lists_every_variable() -> None:
    documented = _first_column("docs/operations.md", "variable")
    assert documented == [name for name, _help in variables()]


def test_the_readme_points_to_the_configuration_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/operations.md#configuration-reference" in readme


def test_a_new_setting_makes_the_reference_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "docs").mkdir()
    for table in reference.TABLES:
        shutil.copy(ROOT / table.page, tmp_path / table.page)
    assert reference.stale(tmp_path) == []
    extra = settings._Field("newcomer_s", settings._positive_float, "something new, seconds")
    monkeypatch.setattr(settings, "_FIELDS", (*settings._FIELDS, extra))
    assert reference.stale(tmp_path) == ["docs/operations.md (configuration reference)"]
    assert reference.write(tmp_path) == ["docs/operations.md"]
    assert "| `CRM_BRIDGE_NEWCOMER_S` | required | something new, seconds |" in (
        tmp_path / "docs/operations.md").read_text(encoding="utf-8")
    assert reference.stale(tmp_path) == []


def test_a_new_metric_makes_the_metrics_table_stale(tmp_path: Path) -> None:
    metrics = Metrics("t")
    Gauge("crm_bridge_newcomer_ratio", "Something new.", ["enterprise"],
          registry=metrics.registry)
    table = dataclasses.replace(reference.TABLES[1],
                                render=lambda: reference.metrics_table(metrics))
    text = (ROOT / "docs/metrics.md").read_text(encoding="utf-8")
    fresh = reference.rewritten(text, table)
    assert fresh != text
    assert "| `crm_bridge_newcomer_ratio` | gauge | `enterprise` | Something new. |" in fresh


def test_defaults_come_from_the_settings_dataclass() -> None:
    table = reference.settings_table()
    assert "| `CRM_BRIDGE_PORT` | `8019` | listen port |" in table
    assert "| `CRM_BRIDGE_NOTIFY` | `1` |" in table
    assert "| `CRM_BRIDGE_MAX_AGE_S` | `86400` |" in table
    assert "(default" not in table, "the default has a column of its own"
