#!/bin/sh
# Install what the driver acceptance tests (tests/test_prepared_drivers.py) need on a fresh
# Debian 12 machine.  Run as root (apt-get); idempotent: installs only what is missing.
#
#   tools/test-deps.sh [VENV]      VENV defaults to .venv (relative to the repository)
#
# Installs: Go with pgx v4 (Debian packages, built with GO111MODULE=off
# GOPATH=/usr/share/gocode), pgjdbc (/usr/share/java/postgresql.jar) and a JDK, Node.js and
# npm, the npm packages of tests/drivers/node (pg, postgres), and the Python drivers
# (asyncpg, pg8000, SQLAlchemy 2, psycopg) in the venv.
set -eu

cd "$(dirname "$0")/.."
VENV=${1:-.venv}

SUDO=
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
fi

missing=
need() {  # need PACKAGE: queue a Debian package unless it is installed
    if ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $1"
    fi
}

need golang-go
need pypy3
need golang-github-jackc-pgx-v4-dev
need libpostgresql-jdbc-java
command -v javac >/dev/null 2>&1 || need default-jdk-headless
command -v node >/dev/null 2>&1 || need nodejs
command -v npm >/dev/null 2>&1 || need npm
command -v pgbench >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/pgbench ] || need postgresql-15

if [ -n "$missing" ]; then
    echo "test-deps: apt-get install$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# Node drivers: pinned by the committed package-lock.json.
if [ ! -d tests/drivers/node/node_modules/pg ] || [ ! -d tests/drivers/node/node_modules/postgres ] \
        || [ tests/drivers/node/package-lock.json -nt tests/drivers/node/node_modules ]; then
    echo "test-deps: npm ci in tests/drivers/node"
    (cd tests/drivers/node && npm ci --no-audit --no-fund --loglevel=error)
    touch tests/drivers/node/node_modules
fi

# Python drivers (also listed in setup.cfg's test extra).
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import asyncpg, greenlet, pg8000, psycopg, pytest, sqlalchemy, sys
sys.exit(int(sqlalchemy.__version__.split(".")[0]) < 2)' 2>/dev/null; then
    echo "test-deps: pip install the Python drivers into $VENV"
    "$VENV/bin/python" -m pip install -q asyncpg pg8000 'sqlalchemy[asyncio]>=2' 'psycopg[binary]' pytest
fi
# PyPy 3.9 (Debian's pypy3): the upgrade and patroni_proxy tests run pgdoorman on it too; the
# same venv serves `bench/run.py --pypy`.  cryptography<44 is the last with PyPy 3.9 wheels.
if ! .venv-pypy/bin/python -c 'import twisted, yaml, xxhash, prometheus_client, OpenSSL, service_identity, jwt, pam, tomli' 2>/dev/null; then
    echo "test-deps: creating .venv-pypy"
    [ -x .venv-pypy/bin/python ] || pypy3 -m venv .venv-pypy
    .venv-pypy/bin/python -m pip install -q twisted pyopenssl service-identity pyyaml xxhash \
        prometheus-client "cryptography<44" six python-pam pyjwt tomli
fi
echo "test-deps: ok"
