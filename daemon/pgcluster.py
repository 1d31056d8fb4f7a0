"""A throwaway local PostgreSQL cluster for ``make run`` and the test suite.

``ThrowawayCluster(datadir).start()`` runs ``initdb`` once and ``pg_ctl start`` on a free
loopback port, trusting local connections (it is a development database: fsync is off and
nothing in it matters). PostgreSQL refuses to run as root, so under root every command runs
as the ``postgres`` user through ``runuser``, and the data directory must be reachable by
that user: when it is not (a checkout under a private home), the cluster moves under the
system temp directory and ``datadir`` becomes a symbolic link to it.

Command line (used by the Makefile)::

    python -m daemon.pgcluster start .pgdata   # prints the database URL
    python -m daemon.pgcluster stop .pgdata
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
}


class ClusterError(RuntimeError):
    """The cluster could not be created or started; the message says what to do."""


def bindir() -> Path:
    """The PostgreSQL server binaries: ``pg_config --bindir``, Debian's layout, or PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterError("PostgreSQL server binaries (initdb) not found: apt-get install postgresql")


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayCluster:
    """One local cluster in ``datadir`` (see the module docstring)."""

    def __init__(self, datadir: str | Path) -> None:
        self.requested = Path(datadir).absolute()
        self.as_postgres = os.geteuid() == 0
        self.bin = bindir()

    @property
    def datadir(self) -> Path:
        """Where the cluster really lives (a symlink target when it had to move)."""
        return self.requested.resolve() if self.requested.is_symlink() else self.requested

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def _reachable_by_postgres(self, path: Path) -> bool:
        probe = subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(path)], check=False
        )
        return probe.returncode == 0

    def _prepare_dir(self) -> None:
        if self.requested.exists() or self.requested.is_symlink():
            return
        parent = self.requested.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.as_postgres and not self._reachable_by_postgres(parent):
            digest = hashlib.sha256(str(self.requested).encode()).hexdigest()[:12]
            target = Path(tempfile.gettempdir()) / f"crm-bridge-pg-{digest}"
            target.mkdir(mode=0o700, exist_ok=True)
            self.requested.symlink_to(target)
        else:
            self.requested.mkdir(mode=0o700)
        if self.as_postgres:
            shutil.chown(self.datadir, "postgres", "postgres")

    def _initdb(self) -> None:
        result = self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions",
        )
        if result.returncode != 0:
            raise ClusterError(f"initdb failed: {result.stderr.strip()[-500:]}")
        settings = dict(SERVER_SETTINGS, port=str(free_port()),
                        unix_socket_directories=f"'{self.datadir}'")
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# crm-bridge throwaway cluster\n" + conf)

    @property
    def port(self) -> int:
        """The port written into postgresql.conf at initdb."""
        port = 0
        for line in (self.datadir / "postgresql.conf").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "port" and value.strip():
                port = int(value.split("#")[0].strip())
        if not port:
            raise ClusterError(f"{self.datadir}: no port in postgresql.conf")
        return port

    @property
    def url(self) -> str:
        """The superuser URL of the cluster's ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def running(self) -> bool:
        """True when ``pg_ctl status`` finds the server up."""
        return self._run("pg_ctl", "-D", str(self.datadir), "status").returncode == 0

    def _set_aside(self) -> dict[str, bytes]:
        """Files already in a data directory that holds no cluster yet — development mode's
        ``dev.env``, written by a ``crm-bridge`` command before the first ``make run`` —
        taken out (initdb wants an empty directory) to be put back after initdb."""
        if not self.datadir.is_dir() or (self.datadir / "PG_VERSION").exists():
            return {}
        kept = {p.name: p.read_bytes() for p in self.datadir.iterdir() if p.is_file()}
        for name in kept:
            (self.datadir / name).unlink()
        if not self.requested.is_symlink() and not any(self.requested.iterdir()):
            self.requested.rmdir()  # _prepare_dir decides where it lives and who owns it
        return kept

    def start(self) -> str:
        """Create (once) and start the cluster; return its URL. Idempotent."""
        kept = self._set_aside()
        self._prepare_dir()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        for name, content in kept.items():
            fd = os.open(self.datadir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
        if not self.running():
            result = self._run(
                "pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
                "-w", "-t", "60", "start",
            )
            if result.returncode != 0:
                log_tail = ""
                log_file = self.datadir / "server.log"
                if log_file.exists():
                    log_tail = log_file.read_text(errors="replace")[-800:]
                raise ClusterError(f"pg_ctl start failed: {result.stderr.strip()} {log_tail}")
        return self.url

    def restart(self, mode: str = "fast") -> None:
        """Restart the running server: ``fast`` (clients are disconnected, a clean shutdown)
        or ``immediate`` (as after a crash: recovery at start). Tests use it to take the
        database away from a running daemon."""
        if mode not in {"fast", "immediate"}:
            raise ValueError(f"mode must be 'fast' or 'immediate', got {mode!r}")
        result = self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
            "-m", mode, "-w", "-t", "60", "restart",
        )
        if result.returncode != 0:
            raise ClusterError(f"pg_ctl restart failed: {result.stderr.strip()[-500:]}")

    def stop(self) -> None:
        """Stop the server (fast mode) if it runs."""
        if (self.datadir / "PG_VERSION").exists() and self.running():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        """Stop and delete the cluster's files."""
        self.stop()
        target = self.datadir
        if self.requested.is_symlink():
            self.requested.unlink()
        shutil.rmtree(target, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``start|stop|url|destroy DATADIR``."""
    if len(argv) != 2 or argv[0] not in {"start", "stop", "url", "destroy"}:
        print("usage: python -m daemon.pgcluster start|stop|url|destroy DATADIR", file=sys.stderr)
        return 2
    cluster = ThrowawayCluster(argv[1])
    try:
        if argv[0] == "start":
            print(cluster.start())
        elif argv[0] == "url":
            print(cluster.url)
        elif argv[0] == "stop":
            cluster.stop()
        else:
            cluster.destroy()
    except ClusterError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
