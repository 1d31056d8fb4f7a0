#!/usr/bin/env bash
# Development bootstrap used by the Makefile: system packages, the virtualenv, a local DB.
#   deploy/devenv.sh system    install (apt-get) what is missing: PostgreSQL's server and
#                              python3-venv (required), and the tools some tests run against
#                              the shipped configuration and pages: promtool (Debian's
#                              prometheus package), nginx and chromium (optional: those
#                              tests skip, saying why, without them)
#   deploy/devenv.sh venv      create .venv and install crm-bridge with its test/dev extras
#   deploy/devenv.sh bench     what `make bench` adds: nginx and wrk (apt-get) when missing,
#                              and the bench extra (pgqueuer, py-spy) in .venv
#   deploy/devenv.sh database  print a database URL: $CRM_BRIDGE_DATABASE_URL when set, else
#                              a throwaway cluster under .pgdata (started if needed)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

have() {  # a program, also where PATH lacks the sbin folders (nginx is /usr/sbin/nginx)
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "devenv: need root (or sudo) to run: $*" >&2; return 1; fi
}

updated=""
apt_install() {
    if [ -z "$updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@" >/dev/null
}

system() {
    local required=() optional=()
    have_postgres || required+=(postgresql)
    "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || required+=(python3-venv)
    have promtool || optional+=(prometheus)
    have nginx || optional+=(nginx)
    [ -x /usr/bin/chromium ] || optional+=(chromium)
    if [ ${#required[@]} -gt 0 ]; then
        echo "devenv: installing ${required[*]} (apt-get)" >&2
        apt_install "${required[@]}"
    fi
    if [ ${#optional[@]} -gt 0 ]; then
        echo "devenv: installing ${optional[*]} (apt-get): the tests check the shipped" \
             "alert rules, the nginx configuration and the admin pages with them" >&2
        if apt_install --no-install-recommends "${optional[@]}"; then
            # Only their tools are wanted: a service the package started is stopped again.
            if [ -d /run/systemd/system ]; then
                for package in "${optional[@]}"; do
                    as_root systemctl disable --now "$package.service" >/dev/null 2>&1 || true
                done
            fi
        else
            echo "devenv: could not install ${optional[*]}: the tests that need them skip" >&2
        fi
    fi
}

venv() {
    local stamp="$VENV/.installed"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "devenv: creating the virtualenv $VENV and installing crm-bridge with its test" \
             "and dev tools (first run: about a minute)..." >&2
        "$PYTHON" -m venv "$VENV"
    elif [ -f "$stamp" ] && { [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; }; then
        echo "devenv: setup.cfg or pyproject.toml changed: updating $VENV..." >&2
    fi
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test,dev]'
        touch "$stamp"
        echo "devenv: $VENV is ready" >&2
    fi
}

bench() {
    local missing=()
    have nginx || missing+=(nginx)
    have wrk || missing+=(wrk)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "devenv: installing ${missing[*]} for the benchmarks (apt-get)" >&2
        apt_install --no-install-recommends "${missing[@]}"
        # Only the program is wanted: the bench runs its own nginx, so stop the service.
        if [ -d /run/systemd/system ]; then
            as_root systemctl disable --now nginx.service >/dev/null 2>&1 || true
        fi
    fi
    local stamp="$VENV/.installed-bench"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
        echo "devenv: installing the bench extra (pgqueuer, py-spy) into $VENV" >&2
        "$VENV/bin/python" -m pip install -q -e '.[bench]'
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
