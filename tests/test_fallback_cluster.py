"""
Patroni-assisted fallback against a real Patroni cluster (tools/patronicluster.py: etcd and 3
Patroni nodes with PostgreSQL 15 on 127.0.0.11..13, synchronous_mode on).

pgdoorman's pool points at the plain replica (not the leader, not the sync standby, so stopping
it causes no failover).  Its Patroni and PostgreSQL are stopped: new clients must be served by
the sync standby, found through /cluster.  Then the node is started again: once the cooldown
and fallback_lifetime have passed, new clients are served by the own server again.

Needs tools/patroni-deps.sh; without it the test fails saying so.  About a minute.
"""

import os
import socket
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import patronicluster  # noqa: E402
from conftest import wait_for  # noqa: E402

COOLDOWN = 3.0
LIFETIME = 3.0




@pytest.fixture(scope="module")
def cluster():
    c = patronicluster.PatroniCluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


def refuses(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def served_by(d):
    """inet_server_addr() and pg_is_in_recovery() of a new client's server."""
    with d.connect("postgres", "db", "postgres", connect_timeout=10) as conn:
        host, recovery = conn.execute(
            "SELECT host(inet_server_addr()), pg_is_in_recovery()").fetchone()
    return host, recovery


@pytest.mark.timeout(150)
def test_stopped_own_server_falls_back_to_sync_standby_and_returns(cluster, pgdoorman):
    cluster.wait_healthy(60)
    replicas = cluster.with_role("replica")
    assert replicas, cluster.members()
    own = cluster.node(replicas[0])
    config = {
        "general": {
            "admin_username": "admin", "admin_password": "admin",
            "connect_timeout": "2s", "query_wait_timeout": "10s",
            "patroni_api_urls": cluster.api_urls,
            "patroni_api_timeout": "2s",
            "fallback_cooldown": "%ds" % COOLDOWN,
            "fallback_connect_timeout": "2s",
            "fallback_lifetime": "%ds" % LIFETIME,
        },
        "pools": {"db": {
            "server_host": own.host, "server_port": cluster.pg_port,
            "server_database": "postgres", "pool_mode": "transaction",
            "users": [{"username": "postgres", "password": "postgres", "pool_size": 2,
                       "server_username": "postgres", "server_password": "postgres"}],
        }},
    }
    d = pgdoorman(config)
    assert served_by(d) == (own.host, True)

    own.stop()
    wait_for(lambda: refuses(own.host, cluster.pg_port), 20, "%s refusing" % own.name)
    sync = cluster.with_role("sync_standby")
    assert sync, cluster.members()
    sync_host = cluster.node(sync[0]).host
    t0 = time.monotonic()
    # the pool may first notice its old connections are gone; a new client must be served
    # by the sync standby well within a few seconds
    host, recovery = wait_for(lambda: served_by(d), 15, "a client served during the outage")
    assert (host, recovery) == (sync_host, True), d.log()
    assert time.monotonic() - t0 < 10
    for _ in range(3):
        assert served_by(d)[0] == sync_host
    assert "Patroni fallback" in d.log() and "fallback target is %s" % sync_host in d.log()
    # past the cooldown and the fallback lifetime, still down: the own server is tried again,
    # refuses again, and clients go on being served by the sync standby
    time.sleep(COOLDOWN + LIFETIME + 0.5)
    assert served_by(d) == (sync_host, True)
    assert d.log().count("is down (") >= 2, d.log()

    own.start()
    cluster.wait_healthy(60)
    t1 = time.monotonic()
    wait_for(lambda: served_by(d)[0] == own.host, COOLDOWN + LIFETIME + 10,
             "new clients served by the own server again")
    back = time.monotonic() - t1
    for _ in range(3):
        assert served_by(d) == (own.host, True)
    assert "fallback cooldown over" in d.log()
    print("fallback back on the own server %.1fs after it was healthy" % back)
