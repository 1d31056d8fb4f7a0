#!/usr/bin/env bash
# Development bootstrap used by the Makefile: system packages, the virtualenv, a local DB.
#   deploy/devenv.sh system    install PostgreSQL and Chromium (apt-get) where missing: the
#                              tests drive the admin pages in Debian's headless Chromium
#   deploy/devenv.sh venv      create .venv and install crm-bridge with its test/dev extras
#   deploy/devenv.sh database  print a database URL: $CRM_BRIDGE_DATABASE_URL when set, else
#                              a throwaway cluster under .pgdata (started if needed)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "devenv: need root (or sudo) to run: $*" >&2; return 1; fi
}

system() {
    if ! have_postgres; then
        echo "devenv: installing PostgreSQL (apt-get)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    if [ ! -x /usr/bin/chromium ]; then
        echo "devenv: installing Chromium (apt-get), for the admin pages' browser tests" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "devenv: Chromium could not be installed: the browser tests will skip" >&2
    fi
    if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
        echo "devenv: installing python3-venv (apt-get)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
}

venv() {
    local stamp="$VENV/.installed"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test,dev]'
        touch "$stamp"
    fi
}

database() {
    if [ -n "${CRM_BRIDGE_DATABASE_URL:-}" ]; then
        echo "$CRM_BRIDGE_DATABASE_URL"
        return
    fi
    local server
    server=$("$VENV/bin/python" -m daemon.pgcluster start "${PGDATA_DIR:-.pgdata}")
    local url="${server%/postgres}/crm_bridge"
    if ! "$VENV/bin/python" - "$server" <<'PY'
import asyncio, sys
import asyncpg
async def main(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'crm_bridge'"):
            await conn.execute("CREATE DATABASE crm_bridge")
    finally:
        await conn.close()
asyncio.run(main(sys.argv[1]))
PY
    then
        echo "devenv: could not create the crm_bridge database" >&2
        return 1
    fi
    echo "$url"
}

"$@"
