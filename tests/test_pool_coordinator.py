"""
The pool coordinator (max_db_connections, eviction, min_guaranteed_pool_size, the reserve
pool), min_pool_size under it, and server_idle_check_timeout: two users of one database
through the real pgdoorman process, counted in the real PostgreSQL's pg_stat_activity.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from conftest import Background, free_port, make_config, pool_entry, user_entry, wait_until
from test_metrics import scrape, value

ADMIN = ("admin", "admin")


def coord_config(pg, users, general=None, **pool):
    """Pool db1 for C{users}: (name, password, pool_size[, user keys]) tuples."""
    entries = []
    for spec in users:
        name, password, size = spec[:3]
        extra = spec[3] if len(spec) > 3 else {}
        entries.append(user_entry(name, password, size, server_username=name,
                                  server_password=password, **extra))
    gen = {"query_wait_timeout": "10s"}
    gen.update(general or {})
    return make_config({"db1": pool_entry(pg, entries, **pool)}, **gen)


def admin_show(d, what):
    with psycopg.connect(d.dsn(ADMIN[0], "pgdoorman", ADMIN[1]), autocommit=True,
                         row_factory=dict_row) as conn:
        return conn.execute("SHOW %s" % what).fetchall()


def coordinator_row(d, db="db1"):
    rows = [r for r in admin_show(d, "POOL_COORDINATOR") if r["database"] == db]
    assert len(rows) == 1, rows
    return rows[0]


def count(pg, *users):
    with pg.connect_super() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND usename = ANY(%s)", [list(users)]).fetchone()[0]


class Sampler:
    """Samples the backends of C{users} together, every few milliseconds, in a thread."""

    def __init__(self, pg, users, interval=0.005):
        self.users = list(users)
        self.samples = []
        self._stop = threading.Event()
        self._conn = pg.connect_super()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.thread.start()

    def _run(self, interval):
        while not self._stop.is_set():
            self.samples.append(self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND usename = ANY(%s)", [self.users]).fetchone()[0])
            time.sleep(interval)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        self._conn.close()
        return max(self.samples)


def hold(d, user, password):
    """A client inside a transaction, holding a server of its pool."""
    conn = d.connect(user, "db1", password, autocommit=False)
    conn.execute("SELECT 1")
    return conn


def open_idle(d, user, password, n):
    """Leave C{n} idle servers in C{user}'s pool (n clients in a transaction at once)."""
    conns = [hold(d, user, password) for _ in range(n)]
    for conn in conns:
        conn.commit()
        conn.close()


# -- max_db_connections --------------------------------------------------------------------

def test_two_users_under_load_never_exceed_max_db_connections(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    d = pgdoorman(coord_config(pg, [(a, apw, 4), (b, bpw, 4)], max_db_connections=4,
                               min_connection_lifetime=0, reserve_pool_timeout="20s",
                               general={"query_wait_timeout": "30s"}))
    sampler = Sampler(pg, [a, b])
    per_client = 40

    def work(user, password):
        with d.connect(user, "db1", password) as conn:
            for _ in range(per_client):
                assert conn.execute("SELECT 1 FROM pg_sleep(0.005)").fetchone() == (1,)
        return per_client

    try:
        jobs = [Background(work, u, p) for u, p in [(a, apw)] * 5 + [(b, bpw)] * 5]
        done = sum(job.result(90) for job in jobs)
    finally:
        peak = sampler.stop()
    assert done == 10 * per_client
    assert peak <= 4, "backends of the two users peaked at %d with max_db_connections 4" % peak
    assert peak == 4  # the load did use the whole budget
    row = coordinator_row(d)
    assert row["max_db_conn"] == 4 and row["current"] <= 4
    assert row["exhaustions"] == 0


def test_idle_server_of_another_user_is_evicted_for_a_waiting_client(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    config = coord_config(pg, [(a, apw, 2), (b, bpw, 2)], max_db_connections=2,
                          min_connection_lifetime=0)
    metrics_port = free_port()
    config["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": metrics_port}
    d = pgdoorman(config)
    open_idle(d, a, apw, 2)
    assert pg.count_backends(a) == 2
    started = time.monotonic()
    with d.connect(b, "db1", bpw) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (b,)
    # No waiting for a timeout: the coordinator closed one of a's idle servers at once.
    assert time.monotonic() - started < 2.0
    assert pg.count_backends(a) == 1
    assert pg.count_backends(b) == 1
    row = coordinator_row(d)
    assert (row["evictions"], row["current"], row["reserve_used"]) == (1, 2, 0)
    _, text = scrape(metrics_port)
    assert value(text, "pg_doorman_pool_coordinator_total", database="db1",
                 type="evictions") == 1
    assert value(text, "pg_doorman_pool_coordinator", database="db1", type="connections") == 2
    assert value(text, "pg_doorman_pool_coordinator", database="db1",
                 type="max_connections") == 2
    assert value(text, "pg_doorman_pool_coordinator", database="db1",
                 type="reserve_in_use") == 0


def test_young_servers_are_not_evicted_and_the_client_is_told_why(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    # min_connection_lifetime left at PgDoorman's 30s: a's fresh servers are not evicted.
    d = pgdoorman(coord_config(pg, [(a, apw, 2), (b, bpw, 2)], max_db_connections=2,
                               reserve_pool_timeout="1s"))
    open_idle(d, a, apw, 2)
    started = time.monotonic()
    with pytest.raises(psycopg.Error) as e:
        with d.connect(b, "db1", bpw) as conn:
            conn.execute("SELECT 1")
    waited = time.monotonic() - started
    assert 'all server connections to database "db1" are in use' in str(e.value)
    assert 0.9 <= waited < 5
    assert pg.count_backends(a) == 2 and pg.count_backends(b) == 0
    assert coordinator_row(d)["exhaustions"] == 1
    # a's own clients are not affected.
    with d.connect(a, "db1", apw) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_min_guaranteed_pool_size_is_never_evicted(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    d = pgdoorman(coord_config(pg, [(a, apw, 3), (b, bpw, 3)], max_db_connections=3,
                               min_guaranteed_pool_size=2, min_connection_lifetime=0,
                               reserve_pool_timeout="1s"))
    open_idle(d, a, apw, 3)
    assert pg.count_backends(a) == 3
    first = hold(d, b, bpw)  # takes one of a's three: a keeps its guaranteed two
    assert pg.count_backends(a) == 2 and pg.count_backends(b) == 1
    with pytest.raises(psycopg.Error) as e:
        hold(d, b, bpw)
    assert "are in use" in str(e.value)
    assert pg.count_backends(a) == 2
    assert count(pg, a, b) == 3
    first.rollback()
    first.close()
    row = coordinator_row(d)
    assert row["evictions"] == 1 and row["exhaustions"] == 1


# -- the reserve pool ----------------------------------------------------------------------

def test_reserve_pool_opens_only_after_reserve_pool_timeout(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    d = pgdoorman(coord_config(pg, [(a, apw, 2), (b, bpw, 2)], max_db_connections=2,
                               reserve_pool_size=1, reserve_pool_timeout="1500ms",
                               min_connection_lifetime=0))
    held = [hold(d, a, apw) for _ in range(2)]  # busy: nothing to evict
    try:
        job = Background(hold, d, b, bpw)
        time.sleep(0.7)
        assert not job.done()
        assert count(pg, a, b) == 2  # not yet: the reserve waits for reserve_pool_timeout
        conn = job.result(10)
        assert job.elapsed >= 1.4
        assert job.elapsed < 5
        assert count(pg, a, b) == 3
        assert pg.count_backends(b) == 1
        row = coordinator_row(d)
        assert (row["current"], row["reserve_used"], row["reserve_acq"]) == (3, 1, 1)
        # The reserve is only one: another client of b waits for b's own server.
        with pytest.raises(psycopg.Error) as e:
            hold(d, b, bpw)
        assert "are in use" in str(e.value)
        assert count(pg, a, b) == 3
        conn.rollback()
        conn.close()
    finally:
        for c in held:
            c.rollback()
            c.close()


# -- min_pool_size -------------------------------------------------------------------------

def test_min_pool_size_filled_at_start_and_after_terminate(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    d = pgdoorman(coord_config(pg, [(a, apw, 4, {"min_pool_size": 2}), (b, bpw, 4)],
                               max_db_connections=4))
    wait_until(lambda: pg.count_backends(a) == 2, 15, message="min_pool_size at start")
    victim = pg.backends(a)[0]["pid"]
    pg.psql("SELECT pg_terminate_backend(%d)" % victim)
    wait_until(lambda: pg.count_backends(a) == 2
               and victim not in [r["pid"] for r in pg.backends(a)], 15,
               message="min_pool_size restored after pg_terminate_backend")
    time.sleep(0.5)
    assert pg.count_backends(a) == 2
    assert coordinator_row(d)["current"] == 2


def test_min_pool_size_stays_within_max_db_connections(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    d = pgdoorman(coord_config(pg, [(a, apw, 3, {"min_pool_size": 3}),
                                    (b, bpw, 3, {"min_pool_size": 3})],
                               max_db_connections=4))
    wait_until(lambda: count(pg, a, b) == 4, 15, message="the cap filled by min_pool_size")
    time.sleep(1.0)
    assert count(pg, a, b) == 4
    # A client still gets a server: min_pool_size connections are not evicted (they are the
    # floor), but an idle one of its own pool serves it.
    user, password = (a, apw) if pg.count_backends(a) else (b, bpw)
    with d.connect(user, "db1", password) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert count(pg, a, b) == 4


# -- server_idle_check_timeout -------------------------------------------------------------

def test_terminated_idle_backend_is_never_handed_to_a_client(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = pgdoorman(coord_config(pg, [(user, pw, 1)],
                               general={"server_idle_check_timeout": "200ms"}))
    with d.connect(user, "db1", pw) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(0.3)
        pg.psql("SELECT pg_terminate_backend(%d)" % first)
        wait_until(lambda: first not in [r["pid"] for r in pg.backends(user)], 10,
                   message="backend gone")
        second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert second != first


class BlackholeProxy:
    """
    A TCP proxy to PostgreSQL that can go silent on the connections it carries (the sockets
    stay open, nothing passes): a backend lost without a FIN, as behind a firewall that
    dropped the flow.  Connections made afterwards pass normally.
    """

    def __init__(self, host, port):
        self.target = (host, port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.links = []  # [client socket, server socket, silent Event]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            link = [c, s, threading.Event()]
            self.links.append(link)
            self.connections += 1
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pump, args=(a, b, link[2]), daemon=True).start()

    @staticmethod
    def _pump(src, dst, silent):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data or silent.is_set():
                return  # silent: stop reading, keep both sockets open
            try:
                dst.sendall(data)
            except OSError:
                return

    def go_silent(self, index=None):
        for link in self.links if index is None else [self.links[index]]:
            link[2].set()

    def close(self):
        self.listener.close()
        for c, s, _ in self.links:
            for sock in (c, s):
                try:
                    sock.close()
                except OSError:
                    pass


def test_idle_check_replaces_a_server_that_went_silent(pg, pgdoorman, new_user):
    user, pw = new_user()
    proxy = BlackholeProxy(pg.host, pg.port)
    try:
        config = coord_config(pg, [(user, pw, 2)],
                              general={"server_idle_check_timeout": "500ms",
                                       "connect_timeout": "1s"})
        config["pools"]["db1"]["server_host"] = "127.0.0.1"
        config["pools"]["db1"]["server_port"] = proxy.port
        d = pgdoorman(config)
        with d.connect(user, "db1", pw) as conn:
            first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            time.sleep(0.8)  # idle longer than server_idle_check_timeout
            proxy.go_silent()
            job = Background(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            time.sleep(0.4)
            row = [r for r in admin_show(d, "POOLS") if r["user"] == user][0]
            assert (row["sv_tested"], row["sv_idle"], row["sv_active"], row["cl_waiting"]) \
                == (1, 0, 0, 1)
            second = job.result(15)
        # The check got no answer within connect_timeout; the query ran on a new server.
        assert second != first
        assert job.elapsed < 5
        assert proxy.connections == 2
        log = d.log()
        assert "did not answer the check query" in log, log
    finally:
        proxy.close()


def test_after_a_failed_check_another_idle_server_serves_the_client(pg, pgdoorman, new_user):
    user, pw = new_user()
    proxy = BlackholeProxy(pg.host, pg.port)
    try:
        config = coord_config(pg, [(user, pw, 2)],
                              general={"server_idle_check_timeout": "500ms",
                                       "connect_timeout": "1s"})
        config["pools"]["db1"]["server_host"] = "127.0.0.1"
        config["pools"]["db1"]["server_port"] = proxy.port
        d = pgdoorman(config)
        first, second = hold(d, user, pw), hold(d, user, pw)
        pids = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in (first, second)]
        assert proxy.connections == 2
        second.commit()
        first.commit()  # the first server is now the most recently used: checked out next
        time.sleep(0.8)
        proxy.go_silent(0)  # the first server's link
        job = Background(lambda: first.execute("SELECT pg_backend_pid()").fetchone()[0])
        got = job.result(15)
        first.commit()
        # The silent server failed its check; the other idle one passed its own and served
        # the client: no new connection was needed.
        assert got == pids[1]
        assert proxy.connections == 2
        assert job.elapsed < 5
        first.close()
        second.close()
    finally:
        proxy.close()


def test_idle_check_is_not_run_on_recently_used_servers(pg, pgdoorman, new_user):
    user, pw = new_user()
    proxy = BlackholeProxy(pg.host, pg.port)
    try:
        config = coord_config(pg, [(user, pw, 1)],
                              general={"server_idle_check_timeout": "30s"})
        config["pools"]["db1"]["server_host"] = "127.0.0.1"
        config["pools"]["db1"]["server_port"] = proxy.port
        d = pgdoorman(config)
        with d.connect(user, "db1", pw) as conn:
            first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            for _ in range(20):
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        assert proxy.connections == 1
        row = [r for r in admin_show(d, "POOLS") if r["user"] == user][0]
        assert row["sv_tested"] == 0 and row["sv_idle"] == 1
    finally:
        proxy.close()


# -- reload --------------------------------------------------------------------------------

def reload(d, config):
    """Write C{config} over the running process's file and RELOAD from the admin console."""
    config = dict(config)
    config["general"] = dict(config["general"], host="127.0.0.1", port=d.port)
    with open(d.config_path + ".tmp", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(d.config_path + ".tmp", d.config_path)
    with psycopg.connect(d.dsn(ADMIN[0], "pgdoorman", ADMIN[1]), autocommit=True) as conn:
        conn.execute("RELOAD")


def test_reload_raises_max_db_connections_for_a_waiting_client(pg, pgdoorman, new_user):
    (a, apw), (b, bpw) = new_user(), new_user()
    users = [(a, apw, 2), (b, bpw, 2)]
    general = {"query_wait_timeout": "30s"}
    d = pgdoorman(coord_config(pg, users, general, max_db_connections=1,
                               reserve_pool_timeout="30s"))
    held = hold(d, a, apw)
    try:
        job = Background(hold, d, b, bpw)
        time.sleep(0.5)
        assert not job.done() and pg.count_backends(b) == 0
        reload(d, coord_config(pg, users, general, max_db_connections=2,
                               reserve_pool_timeout="30s"))
        conn = job.result(10)
        assert job.elapsed < 5
        assert count(pg, a, b) == 2
        assert coordinator_row(d)["max_db_conn"] == 2
        conn.rollback()
        conn.close()
        # And off again: no coordinator, no SHOW POOL_COORDINATOR row.
        reload(d, coord_config(pg, users, general))
        assert admin_show(d, "POOL_COORDINATOR") == []
    finally:
        held.rollback()
        held.close()
