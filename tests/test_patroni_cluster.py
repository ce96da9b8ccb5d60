"""
patroni_proxy against a real Patroni cluster (tools/patronicluster.py: etcd and 3 Patroni 3.0
nodes running PostgreSQL 15 on 127.0.0.11..13, synchronous_mode on), through the real
process (C{python -m pgdoorman.patroni.cli CONFIG}).

The cluster is shared by the module and the tests change its topology (switchover, killed
leader), so each test starts by waiting for the cluster to be healthy again and asks Patroni
who holds which role instead of assuming it.  The proxy's host list also holds two broken REST
APIs (one answers HTTP 500, one accepts and never answers) ahead of the real ones: routing must
not notice them.

PATRONI_PROXY_PYTHON=.venv-pypy/bin/python runs the proxy itself on PyPy.
Needs tools/patroni-deps.sh; without it every test fails saying so (nothing is skipped).
About 70-90 s in all, most of it the cluster starting and healing after each failover.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import patronicluster  # noqa: E402
from conftest import wait_for  # noqa: E402

INTERVAL = 1.0          # cluster_update_interval of the proxy under test
MARGIN = 4.0            # seconds allowed beyond one interval for Patroni and PostgreSQL
FRESH_LAG = 4 * 1024 * 1024   # max_lag_in_bytes of the "fresh" replica port
# The interpreter running patroni_proxy (e.g. .venv-pypy/bin/python to test it on PyPy).
PROXY_PYTHON = os.environ.get("PATRONI_PROXY_PYTHON") or sys.executable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




# -- broken REST APIs -------------------------------------------------------------------------

class _Error500(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(500)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"oops\n")

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the proxy cancels requests it no longer needs: resets are expected


class BrokenAPIs:
    """An HTTP server answering 500, and a socket that accepts and never answers."""

    def __init__(self):
        self.e500 = _QuietServer(("127.0.0.1", 0), _Error500)
        threading.Thread(target=self.e500.serve_forever, daemon=True).start()
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(64)
        self.held = []
        self._stop = False
        threading.Thread(target=self._accept_forever, daemon=True).start()

    def _accept_forever(self):
        while not self._stop:
            try:
                conn, _ = self.silent.accept()
            except OSError:
                return
            self.held.append(conn)   # never read, never answered

    @property
    def urls(self):
        return ["http://127.0.0.1:%d" % self.e500.server_address[1],
                "http://127.0.0.1:%d" % self.silent.getsockname()[1]]

    def close(self):
        self._stop = True
        self.e500.shutdown()
        self.silent.close()
        for c in self.held:
            c.close()


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    missing = patronicluster.missing_dependencies()
    if missing:
        pytest.fail("patroni_proxy cluster tests need %s: %s"
                    % (", ".join(missing), patronicluster.DEPS_HINT), pytrace=False)
    c = patronicluster.PatroniCluster(nodes=3)
    t0 = time.monotonic()
    try:
        c.start()
    except Exception:
        logs = subprocess.run("tail -n 20 %s/*/patroni.log" % c.base_dir, shell=True,
                              stdout=subprocess.PIPE).stdout.decode(errors="replace")
        c.destroy()
        raise RuntimeError("Patroni cluster did not start; logs:\n" + logs)
    c.started_in = time.monotonic() - t0
    yield c
    c.destroy()


class Proxy:
    def __init__(self, cluster, tmp_dir, bad_urls):
        self.cluster = cluster
        self.api_port = free_port()
        self.ports = {"master": free_port(), "replicas": free_port(), "fresh": free_port()}
        self.path = os.path.join(tmp_dir, "patroni_proxy.yaml")
        self.log_path = os.path.join(tmp_dir, "patroni_proxy.log")
        self.config = {
            "cluster_update_interval": INTERVAL,
            "listen_address": "127.0.0.1:%d" % self.api_port,
            "clusters": {"main": {
                "hosts": bad_urls + cluster.api_urls,
                "ports": {
                    "master": {"listen": "127.0.0.1:%d" % self.ports["master"],
                               "roles": ["leader"], "host_port": cluster.pg_port},
                    "replicas": {"listen": "127.0.0.1:%d" % self.ports["replicas"],
                                 "roles": ["sync", "async"], "host_port": cluster.pg_port},
                    "fresh": {"listen": "127.0.0.1:%d" % self.ports["fresh"],
                              "roles": ["sync", "async"], "host_port": cluster.pg_port,
                              "max_lag_in_bytes": FRESH_LAG},
                }}},
        }
        self.write()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PROXY_PYTHON, "-m", "pgdoorman.patroni.cli", self.path],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        try:
            wait_for(lambda: self.get("/") == "OK\n", 15, "patroni_proxy answering")
            # The first poll has landed when /status shows members.
            wait_for(lambda: self.status()["clusters"]["main"]["members"], 10,
                     "a first update")
        except BaseException:
            self.stop()
            raise AssertionError("patroni_proxy did not start:\n" + self.log()[-3000:])

    def write(self):
        with open(self.path, "w") as f:
            yaml.safe_dump(self.config, f)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.api_port, path)

    def get(self, path, timeout=10):
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
            return r.read().decode()

    def status(self):
        return json.loads(self.get("/status"))

    def port_status(self, port):
        return {m["name"]: m for m in self.status()["clusters"]["main"]["ports"][port]["members"]}

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def proxy(cluster, tmp_path_factory):
    bad = BrokenAPIs()
    p = Proxy(cluster, str(tmp_path_factory.mktemp("patroni_proxy")), bad.urls)
    yield p
    p.stop()
    bad.close()
    assert p.proc.returncode == 0, p.log()[-3000:]


@pytest.fixture
def healthy(cluster, proxy):
    """Wait for a healthy cluster and a proxy that has seen it."""
    cluster.wait_healthy(60)
    assert proxy.get("/update_clusters") == "OK\n"
    return cluster


def connect(port, **kw):
    import psycopg
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                           autocommit=True, connect_timeout=5, **kw)


def where(conn):
    """(node name, in recovery) of the server behind C{conn}."""
    addr, recovery = conn.execute(
        "SELECT host(inet_server_addr()), pg_is_in_recovery()").fetchone()
    return "n%d" % (int(addr.rsplit(".", 1)[1]) - 10), recovery


def alive(conn):
    try:
        return conn.execute("SELECT 1").fetchone() == (1,)
    except Exception:  # noqa: BLE001
        return False


# -- the tests ----------------------------------------------------------------------------------

def test_cluster_started_quickly(cluster):
    # The harness's promise (see the measured facts): seconds, not minutes.
    assert cluster.started_in < 40, cluster.started_in


def test_master_port_reaches_leader(healthy, proxy):
    leader = healthy.leader()
    conns = [connect(proxy.ports["master"]) for _ in range(4)]
    try:
        assert [where(c) for c in conns] == [(leader, False)] * 4
        ports = proxy.status()["clusters"]["main"]["ports"]
        assert ports["master"]["connections"] == 4
        assert [m["name"] for m in ports["master"]["members"] if m["eligible"]] == [leader]
    finally:
        for c in conns:
            c.close()


def test_replica_port_balances_over_replicas(healthy, proxy):
    replicas = sorted(healthy.with_role("sync_standby") + healthy.with_role("replica"))
    assert len(replicas) == 2
    conns = [connect(proxy.ports["replicas"]) for _ in range(6)]
    try:
        seen = [where(c) for c in conns]
        assert all(recovery for _, recovery in seen)
        counts = {name: sum(1 for n, _ in seen if n == name) for name in replicas}
        assert counts == {replicas[0]: 3, replicas[1]: 3}
        status = proxy.port_status("replicas")
        assert {n: status[n]["connections"] for n in replicas} == counts
    finally:
        for c in conns:
            c.close()


def test_switchover(healthy, proxy):
    old_leader = healthy.leader()
    new_leader = healthy.with_role("sync_standby")[0]
    stays_replica = healthy.with_role("replica")[0]
    master = connect(proxy.ports["master"])
    assert where(master) == (old_leader, False)
    # Idle connections on the replica port: those to the member that stays a replica must
    # survive, those to the one being promoted must be closed.
    idle = [connect(proxy.ports["replicas"]) for _ in range(4)]
    by_node = {}
    for c in idle:
        by_node.setdefault(where(c)[0], []).append(c)
    assert sorted(by_node) == sorted([new_leader, stays_replica])

    t0 = time.monotonic()
    healthy.switchover(new_leader)
    patroni_done = time.monotonic() - t0

    def new_connections_reach_new_leader():
        with connect(proxy.ports["master"]) as c:
            return where(c) == (new_leader, False)
    wait_for(new_connections_reach_new_leader, INTERVAL + MARGIN,
             "new master connections reaching %s" % new_leader)
    reached = time.monotonic() - t0
    print("switchover: Patroni shows the new leader after %.1fs, proxy routes to it after %.1fs"
          % (patroni_done, reached))
    for c in by_node[stays_replica]:
        assert alive(c), "an idle connection to %s (still a replica) was closed" % stays_replica
        assert where(c) == (stays_replica, True)
    wait_for(lambda: not any(alive(c) for c in by_node[new_leader]), INTERVAL + MARGIN,
             "connections to the promoted member closed on the replica port")
    assert not alive(master), "a master connection to the demoted leader survived"
    for c in idle + [master]:
        c.close()
    assert proxy.status()["clusters"]["main"]["failovers"] >= 1


def test_killed_leader_fast_errors_then_new_leader(healthy, proxy):
    old_leader = healthy.leader()
    held = connect(proxy.ports["replicas"])
    replica_of_held = where(held)[0]
    t0 = time.monotonic()
    healthy.kill_postmaster(old_leader)
    attempts = []
    deadline = t0 + 30
    new = None
    while time.monotonic() < deadline:
        a = time.monotonic()
        try:
            with connect(proxy.ports["master"]) as c:
                node, recovery = where(c)
            if not recovery and node != old_leader:
                new = node
                attempts.append(("ok", time.monotonic() - a))
                break
            attempts.append(("in recovery or old leader", time.monotonic() - a))
        except Exception as e:  # noqa: BLE001
            attempts.append((type(e).__name__, time.monotonic() - a))
        time.sleep(0.1)
    took = time.monotonic() - t0
    print("killed leader %s: %d attempts, new leader %s after %.1fs; slowest attempt %.2fs"
          % (old_leader, len(attempts), new, took, max(d for _, d in attempts)))
    assert new is not None, attempts
    failures = [(what, d) for what, d in attempts if what != "ok"]
    assert failures, "expected errors during the gap"
    assert max(d for _, d in failures) < 2.0, "a client waited during the gap: %r" % failures
    # The replica-port connection went to a member that was not the leader: untouched, unless
    # that replica is the one promoted.
    if replica_of_held != new:
        assert alive(held)
    held.close()


def test_lagging_replica_leaves_the_port_and_only_its_connections_close(healthy, proxy):
    import psycopg
    lagger = healthy.with_role("replica")[0]
    sync = healthy.with_role("sync_standby")[0]
    leader = healthy.node(healthy.leader())
    conns = [connect(proxy.ports["fresh"]) for _ in range(4)]
    by_node = {}
    for c in conns:
        by_node.setdefault(where(c)[0], []).append(c)
    assert sorted(by_node) == sorted([lagger, sync])
    walreceiver = healthy.node(lagger).child_pid("walreceiver")
    assert walreceiver, "no walreceiver on %s" % lagger
    writer = psycopg.connect(host=leader.host, port=healthy.pg_port, user="postgres",
                             dbname="postgres", autocommit=True)
    writer.execute("CREATE TABLE IF NOT EXISTS lag_filler (x text)")
    os.kill(walreceiver, signal.SIGSTOP)
    try:
        # Write at ~1.5 MB/s: Patroni publishes each member's WAL position once per loop, so
        # even the healthy sync standby looks up to a loop's worth of WAL behind; the limit
        # (FRESH_LAG) is well above that and the stopped replica passes it in seconds.
        t0 = time.monotonic()

        def write_and_check():
            writer.execute("INSERT INTO lag_filler SELECT repeat('x', 1000) "
                           "FROM generate_series(1, 150)")
            return not proxy.port_status("fresh")[lagger]["eligible"]
        wait_for(write_and_check, 20, "%s leaving the fresh port's eligible set" % lagger)
        reason = proxy.port_status("fresh")[lagger]["reason"]
        print("lagging replica ineligible %.1fs after writes began: %s"
              % (time.monotonic() - t0, reason))
        assert "max_lag_in_bytes" in reason
        wait_for(lambda: not any(alive(c) for c in by_node[lagger]), INTERVAL + MARGIN,
                 "connections to the lagging replica closed")
        assert all(alive(c) for c in by_node[sync]), (proxy.status(), proxy.log()[-2000:])
        # New connections avoid it; the port without a lag limit still uses it.
        for _ in range(3):
            with connect(proxy.ports["fresh"]) as c:
                assert where(c)[0] == sync
        assert proxy.port_status("replicas")[lagger]["eligible"]
    finally:
        os.kill(walreceiver, signal.SIGCONT)
        writer.close()
    wait_for(lambda: proxy.port_status("fresh")[lagger]["eligible"], 30,
             "%s eligible again after catching up" % lagger)
    for c in conns:
        c.close()


def test_sighup_adds_a_port_without_dropping_connections(healthy, proxy):
    master = connect(proxy.ports["master"])
    replica = connect(proxy.ports["replicas"])
    new_port = free_port()
    proxy.config["clusters"]["main"]["ports"]["any"] = {
        "listen": "127.0.0.1:%d" % new_port, "roles": ["any"],
        "host_port": healthy.pg_port}
    proxy.write()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: socket.create_connection(("127.0.0.1", new_port), timeout=1).close() or True,
             5, "the new port listening")
    seen = set()
    for _ in range(6):
        with connect(new_port) as c:
            seen.add(where(c)[0])
    assert len(seen) == 3, seen   # "any": every member, balanced
    assert alive(master) and alive(replica)
    # A broken file is refused and the running configuration kept.
    with open(proxy.path, "a") as f:
        f.write("  bogus: [\n")
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in proxy.log(), 5, "reload refused")
    assert alive(master) and alive(replica)
    with connect(new_port) as c:
        assert alive(c)
    proxy.write()
    master.close()
    replica.close()


def test_http_endpoints(healthy, proxy):
    assert proxy.get("/") == "OK\n"
    t0 = time.monotonic()
    assert proxy.get("/update_clusters") == "OK\n"
    # The first good answer wins: the silent REST API in the host list costs nothing here.
    assert time.monotonic() - t0 < 0.9
    status = proxy.status()
    main = status["clusters"]["main"]
    assert main["last_update_source"] in healthy.api_urls
    assert sorted(m["name"] for m in main["members"]) == ["n1", "n2", "n3"]
    assert sorted(m["role"] for m in main["members"]) == ["leader", "replica", "sync_standby"]
    leader = healthy.leader()
    master = {m["name"]: m for m in main["ports"]["master"]["members"]}
    assert master[leader]["eligible"] and master[leader]["reason"] is None
    assert all("role" in m["reason"] for n, m in master.items() if n != leader)
    metrics = proxy.get("/metrics")
    for line in ('patroni_proxy_cluster_members{cluster="main",role="leader"} 1.0',
                 'patroni_proxy_cluster_members{cluster="main",role="replica"} 1.0',
                 'patroni_proxy_eligible_members{cluster="main",port="master"} 1.0',
                 'patroni_proxy_eligible_members{cluster="main",port="replicas"} 2.0'):
        assert line in metrics, metrics
    assert "patroni_proxy_connections_total{" in metrics
    assert 'patroni_proxy_failovers_total{cluster="main"}' in metrics
    with pytest.raises(urllib.error.HTTPError) as e:
        proxy.get("/nope")
    assert e.value.code == 404
