"""Development mode's secrets, kept once per checkout so that every command shares them.

``make run`` starts the daemon with ``CRM_BRIDGE_DEV_MODE=1`` and no secrets. If each
process made up its own, a second shell could reach nothing: ``/api/*`` would answer 401 to
any token, and ``crm-bridge retailcrm configure`` would store an API key encrypted with a key
the daemon never saw. So the secrets live in the checkout's local data folder, in
``.pgdata/dev.env`` (mode 0600, written once, removed by ``make clean``), with the database
URL development mode last ran against. A ``crm-bridge`` command run from the checkout:

* with ``CRM_BRIDGE_DEV_MODE=1``: takes every secret it is not given from that file (made on
  first use) and records its database URL there;
* with neither ``CRM_BRIDGE_DATABASE_URL`` nor ``CRM_BRIDGE_DEV_MODE`` set, while the file
  exists: runs in development mode with everything the file holds — ``make run`` in one
  shell, and ``.venv/bin/crm-bridge retailcrm …`` in another just works;
* otherwise (production, the test suite, any explicitly configured run): never reads it.

Variables set in the environment always win over the file. The checkout is the working
directory when it holds crm-bridge's ``setup.cfg``; elsewhere development mode falls back to
secrets made up for the one process (``Settings.generated``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from daemon import links, settings
from daemon.cache import Entry

DEV_ENV = Path(".pgdata") / "dev.env"
DEV_MODE = settings.PREFIX + "DEV_MODE"
DATABASE_URL = settings.PREFIX + "DATABASE_URL"
_HEADER = (
    "# crm-bridge development mode: made by the first command run with CRM_BRIDGE_DEV_MODE=1\n"
    "# (make run). Throwaway secrets of this checkout only; `make clean` removes them.\n"
)


def checkout(cwd: Path | None = None) -> Path | None:
    """The crm-bridge checkout a command runs in (its working directory), or None."""
    root = cwd or Path.cwd()
    with contextlib.suppress(OSError):
        text = (root / "setup.cfg").read_text(encoding="utf-8")
        if "name = crm-bridge" in text:
            return root
    return None


def _dev_mode(environ: Mapping[str, str]) -> bool | None:
    """``CRM_BRIDGE_DEV_MODE`` as given: True, False, or None when unset (or malformed:
    ``settings.load`` names the variable then)."""
    raw = environ.get(DEV_MODE, "")
    try:
        return settings._bool(raw) if raw else None
    except ValueError:
        return False


def read(path: Path) -> dict[str, str]:
    """The ``NAME='value'`` lines of a dev.env file (no file: empty)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = shlex.split(line)[0].partition("=")
            values[name] = value
    return values


def _write(path: Path, values: Mapping[str, str], *, exclusive: bool) -> None:
    """Write ``values`` with mode 0600 from the first byte: at once when ``exclusive`` (fails
    if another process made the file meanwhile), else through a temporary file."""
    text = _HEADER + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
    target = path if exclusive else path.with_name(f".{path.name}.{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    if not exclusive:
        os.replace(target, path)


def _secret_values() -> dict[str, str]:
    """A fresh value of every secret development mode may make up."""
    return {settings.PREFIX + f.name.upper(): f.secret_factory()
            for f in settings._FIELDS if f.secret_factory is not None}


def ensure(path: Path, database_url: str | None) -> dict[str, str]:
    """The file's values, made first if missing; ``database_url`` recorded when given."""
    values = read(path)
    if not values:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        values = {DEV_MODE: "1", **_secret_values()}
        if database_url:
            values[DATABASE_URL] = database_url
        try:
            _write(path, values, exclusive=True)
        except FileExistsError:  # another command made it first: theirs is the one
            return ensure(path, database_url)
        return values
    missing = {k: v for k, v in _secret_values().items() if k not in values}
    if missing or (database_url and values.get(DATABASE_URL) != database_url):
        values = {**values, **missing}
        if database_url:
            values[DATABASE_URL] = database_url
        _write(path, values, exclusive=False)
    return values


def environment(
    environ: Mapping[str, str], root: Path | None
) -> tuple[dict[str, str], Path | None]:
    """The environment a command runs with, and the dev.env file it drew on (or None).

    See the module docstring for when the file applies; ``root`` is the checkout (None:
    never).
    """
    env = dict(environ)
    if root is None:
        return env, None
    path = root / DEV_ENV
    asked = _dev_mode(environ)
    if asked:
        try:
            values = ensure(path, environ.get(DATABASE_URL) or None)
        except OSError as exc:
            raise settings.SettingsError(
                DEV_MODE, f"cannot keep the development secrets in {path}: "
                f"{exc.strerror or exc}") from None
    elif asked is None and not environ.get(DATABASE_URL) and path.is_file():
        values = read(path)
    else:
        return env, None
    return {**values, **env, DEV_MODE: "1"}, path


def admin_candidate(entries: Iterable[Entry]) -> tuple[str, bool] | None:
    """The enterprise whose admin pages ``make run`` points at, and whether this integration
    is configured there: an active enterprise with its configuration (one it serves
    first, then by number), else any active one; None when there is none."""
    active = [e for e in entries if e.active]
    if not active:
        return None
    configured = [e for e in active if e.config is not None or e.invalid is not None]
    if configured:
        best = min(configured, key=lambda e: (not e.serves, e.enterprise))
        return best.enterprise, True
    return min(e.enterprise for e in active), False


def admin_line(enterprise: str | None, link: str | None, cli: str) -> str:
    """The banner's admin line: the ``link`` to ``enterprise``'s pages when there is one,
    else the exact command that prints one (``cli``: how to run ``crm-bridge`` here)."""
    if enterprise is None:
        return ("  admin:   no enterprise yet: add one to the enterprises table (make demo "
                f"seeds two), then {cli} admin-link NUMBER")
    if link is None:
        return (f"  admin:   {cli} admin-link {enterprise}  (prints a link that opens "
                f"enterprise {enterprise}'s admin pages)")
    return (f"  admin:   {link}\n"
            f"           (enterprise {enterprise}'s admin pages, valid "
            f"{links.DEFAULT_TTL_S / 86_400:g} days; another "
            f"enterprise: {cli} admin-link NUMBER)")


def banner(url: str, service_token: str, dev_env: Path | None, admin: str = "") -> str:
    """What ``crm-bridge run`` prints in development mode once it serves: where to look, and
    the exact commands that reach it (``admin``: :func:`admin_line`). Printed to the
    terminal, never logged."""
    lines = [
        f"crm-bridge is ready (development mode; never use it in production). {url}",
        f"  health:  curl {url}/health",
        f"  API:     curl -H 'Authorization: Bearer {service_token}' {url}/stats",
    ]
    if admin:
        lines.append(admin)
    if dev_env is not None:
        lines.append(f"  CLI:     .venv/bin/crm-bridge --help  (from {dev_env.parent.parent} "
                     f"in another shell: it shares these secrets, kept in {dev_env})")
    else:
        lines.append("  These secrets were made up for this process alone: run from the "
                     "checkout to keep them in .pgdata/dev.env.")
    lines.append("  Stop: Ctrl-C.")
    return "\n".join(lines)
