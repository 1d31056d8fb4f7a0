"""The documentation stands on its own: nothing in the repository names or links a file that
is not part of it (the developers' notes the project started from live elsewhere and are not
shipped), and every relative link of the README and docs/ leads to a file of this
repository."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("docs", "daemon", "web", "tests", "bench", "deploy", "sql", "systemd")
TOP_FILES = ("README.md", "Makefile", "setup.cfg", "pyproject.toml")
SKIPPED_PARTS = frozenset({"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"})
# Notes that are not part of the repository, by name or by the folder they sit in. Written
# so that this file does not match itself.
OUTSIDE = re.compile(r"\b(?:RETAILCRM|EVENTS|DESIGN|STYLE)\.md\b|\.\./shared\b|/work/(?:shared)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def text_files() -> Iterator[tuple[Path, str]]:
    """Every text file scanned, with its content."""
    paths = [ROOT / name for name in TOP_FILES]
    for folder in SCANNED_DIRS:
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file()
                        and not SKIPPED_PARTS & set(p.relative_to(ROOT).parts))
    for path in paths:
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # an image, a compiled file: nothing to read


def test_the_scan_sees_the_files_that_matter() -> None:
    scanned = {path.relative_to(ROOT).as_posix() for path, _ in text_files()}
    for expected in ("README.md", "docs/retailcrm.md", "docs/events.md",
                     "docs/architecture.md", "daemon/errors.py", "tests/support/bodies.py",
                     "sql/001_foundation.sql", "systemd/crm-bridge@.service"):
        assert expected in scanned
    assert OUTSIDE.search("see " + "STYLE" + ".md rule 8")
    assert OUTSIDE.search("[events](.." + "/shared/EVENTS" + ".md)")
    assert OUTSIDE.search("/work" + "/shared/x")
    assert not OUTSIDE.search("docs/retailcrm.md, docs/events.md, retailcrm.md")


def test_nothing_names_a_file_outside_the_repository() -> None:
    offences = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}"
        for path, text in text_files()
        for number, line in enumerate(text.splitlines(), start=1)
        if OUTSIDE.search(line)
    ]
    assert not offences, "\n".join(offences)


def test_every_relative_link_of_the_docs_leads_to_a_file_of_the_repository() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor of the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
