#!/bin/sh
# Install what the patroni_proxy cluster tests (tests/test_patroni_cluster.py) need on a fresh
# Debian 12 machine: Patroni 3.0 with its etcd client, and an etcd server.  Run as root
# (apt-get); idempotent: installs only what is missing, and does nothing when all is there.
#
#   tools/patroni-deps.sh
#
# python3-etcd is named on purpose: `patroni` depends on "python3-etcd | python3-consul | ...",
# and with --no-install-recommends apt may satisfy that with another DCS client, leaving the
# etcd3 backend the tests use unable to import.
set -eu

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

need patroni
need python3-etcd
need etcd-server
[ -x /usr/lib/postgresql/15/bin/postgres ] || need postgresql-15

if [ -n "$missing" ]; then
    echo "patroni-deps: apt-get install$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# The Debian packages enable system services; the tests start their own processes on their
# own ports, so the system ones are left alone (policy-rc.d usually keeps them stopped).
command -v patroni >/dev/null && command -v etcd >/dev/null
echo "patroni-deps: patroni $(patroni --version 2>/dev/null | cut -d' ' -f2), $(etcd --version | head -1)"
