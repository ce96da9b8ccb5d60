"""
Pooling (issue 7, point 4): one pool per (database, user) shared by all clients, transaction
and session modes, FIFO waiting, query_wait_timeout, pool_size as a hard limit (checked in
pg_stat_activity), min_pool_size, idle_timeout, server_lifetime, max_connections.

Every test uses a role of its own (C{new_user}) so that its backends can be counted.
"""

import subprocess
import threading
import time

import psycopg
import pytest

from conftest import (PGBENCH, Background, BackendSampler, make_config, pool_entry,
                      simple_config, user_entry, wait_until)


def start(pgdoorman, pg, user, password, **kw):
    return pgdoorman(simple_config(pg, user, password, **kw))


# -- transaction mode ---------------------------------------------------------------------

def test_transaction_mode_shares_one_server_between_clients(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1)
    conns = [d.connect(user, "db1", pw) for _ in range(5)]
    try:
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
        pids |= {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
        assert len(pids) == 1
        assert pg.count_backends(user) == 1
    finally:
        for c in conns:
            c.close()


@pytest.mark.timeout(120)
def test_pool_size_never_exceeded_under_load(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=3, general={"query_wait_timeout": "30s"})
    errors, pids = [], set()

    def work():
        try:
            with d.connect(user, "db1", pw) as conn:
                for i in range(30):
                    with conn.transaction():
                        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                        conn.execute("SELECT pg_sleep(0.002)")
                    pids.add(pid)
        except Exception as e:  # reported below
            errors.append(e)

    with BackendSampler(pg, user) as sampler:
        threads = [threading.Thread(target=work, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        peak = sampler.stop()
    assert not any(t.is_alive() for t in threads), "clients hung"
    assert errors == []
    assert 1 <= len(pids) <= 3
    assert 1 <= peak <= 3, sampler.samples
    assert pg.count_backends(user) <= 3


@pytest.mark.timeout(120)
def test_pgbench_many_clients_small_pool(pg, pgdoorman, new_user, tmp_path):
    user, pw = new_user()
    script = tmp_path / "pid.sql"
    script.write_text("SELECT pg_backend_pid();\n")
    d = start(pgdoorman, pg, user, pw, pool_size=2, general={"query_wait_timeout": "30s"})
    with BackendSampler(pg, user) as sampler:
        out = subprocess.run([PGBENCH, "-n", "-h", d.host, "-p", str(d.port), "-U", user,
                              "-c", "20", "-j", "2", "-T", "3", "-M", "extended",
                              "-f", str(script), "db1"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={"PGPASSWORD": pw}, timeout=60, cwd="/tmp")
        peak = sampler.stop()
    assert out.returncode == 0, out.stdout
    assert "number of failed transactions: 0" in out.stdout, out.stdout
    assert peak <= 2 and peak >= 1, sampler.samples


def test_server_released_after_commit(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "5s"})
    with d.connect(user, "db1", pw, autocommit=False) as a, d.connect(user, "db1", pw) as b:
        a.execute("SELECT 1")
        a.commit()  # a stays connected but idle: its server goes back to the pool
        t0 = time.monotonic()
        assert b.execute("SELECT 'b runs'").fetchone() == ("b runs",)
        assert time.monotonic() - t0 < 2


def test_client_waits_while_server_is_in_a_transaction(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "10s"})
    with d.connect(user, "db1", pw, autocommit=False) as a, d.connect(user, "db1", pw) as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # BEGIN ... held
        job = Background(lambda: b.execute("SELECT pg_backend_pid()").fetchone()[0])
        time.sleep(1.0)
        assert not job.done(), "b ran while a's transaction held the only server"
        a.commit()
        assert job.result(10) == pid_a
        assert 0.9 <= job.elapsed < 5


def test_waiting_clients_are_served_fifo(pg, pgdoorman, new_user):
    user, pw = new_user()
    pg.psql("DROP SEQUENCE IF EXISTS fifo_seq; CREATE SEQUENCE fifo_seq; "
            "GRANT ALL ON SEQUENCE fifo_seq TO PUBLIC", db="db1")
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "20s"})
    holder = d.connect(user, "db1", pw, autocommit=False)
    holder.execute("SELECT 1")
    waiters = [d.connect(user, "db1", pw) for _ in range(6)]
    jobs = []
    try:
        for w in waiters:
            jobs.append(Background(lambda w=w: w.execute("SELECT nextval('fifo_seq')")
                                   .fetchone()[0]))
            time.sleep(0.2)
        holder.commit()
        got = [j.result(20) for j in jobs]
        assert got == sorted(got), "served out of order: %r" % got
    finally:
        holder.close()
        for w in waiters:
            w.close()


def test_query_wait_timeout(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "1s"})
    with d.connect(user, "db1", pw, autocommit=False) as a:
        a.execute("SELECT 1")  # holds the only server
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error) as e:
            with d.connect(user, "db1", pw) as b:
                b.execute("SELECT 1")
        elapsed = time.monotonic() - t0
        assert 0.8 <= elapsed < 5, elapsed
        assert "timeout" in str(e.value).lower() or "wait" in str(e.value).lower(), e.value
        # The holder is unaffected, and once it is done others get the server.
        assert a.execute("SELECT 'a still works'").fetchone() == ("a still works",)
        a.commit()
    with d.connect(user, "db1", pw) as c:
        assert c.execute("SELECT 2").fetchone() == (2,)
    assert d.alive()


def test_pools_are_per_database_and_user(pg, pgdoorman, new_user):
    u1, p1 = new_user()
    u2, p2 = new_user()
    cfg = make_config({
        "db1": pool_entry(pg, [user_entry(u1, p1, 1), user_entry(u2, p2, 1)]),
        "db2": pool_entry(pg, [user_entry(u1, p1, 1)]),
    }, query_wait_timeout="2s")
    d = pgdoorman(cfg)
    with d.connect(u1, "db1", p1, autocommit=False) as held:
        held.execute("SELECT 1")  # u1@db1's only server is busy
        with d.connect(u2, "db1", p2) as other_user, d.connect(u1, "db2", p1) as other_db:
            t0 = time.monotonic()
            assert other_user.execute("SELECT current_user").fetchone() == (u2,)
            assert other_db.execute("SELECT current_database()").fetchone() == ("db2",)
            assert time.monotonic() - t0 < 1.5
        held.rollback()
    assert pg.count_backends(u1, "db1") == 1
    assert pg.count_backends(u1, "db2") == 1
    assert pg.count_backends(u2, "db1") == 1


def test_client_disconnect_mid_transaction_frees_the_server(pg, pgdoorman, new_user):
    user, pw = new_user()
    pg.psql("DROP TABLE IF EXISTS disc_t; CREATE TABLE disc_t (x int); "
            "GRANT ALL ON disc_t TO PUBLIC", db="db1")
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "10s"})
    a = d.connect(user, "db1", pw, autocommit=False)
    a.execute("INSERT INTO disc_t VALUES (1)")
    a.pgconn.finish()  # drop the socket without Terminate or ROLLBACK
    with d.connect(user, "db1", pw) as b:
        t0 = time.monotonic()
        assert b.execute("SELECT count(*) FROM disc_t").fetchone() == (0,)
        assert time.monotonic() - t0 < 5
        assert b.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = current_user "
                         "AND state LIKE 'idle in transaction%'").fetchone() == (0,)


def test_client_disconnect_during_long_query(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"query_wait_timeout": "15s"})
    a = d.connect(user, "db1", pw)
    a.pgconn.send_query(b"SELECT pg_sleep(30)")
    time.sleep(0.5)
    a.pgconn.finish()
    with d.connect(user, "db1", pw) as b:
        t0 = time.monotonic()
        assert b.execute("SELECT 'next client'").fetchone() == ("next client",)
        assert time.monotonic() - t0 < 10
    # (The abandoned backend may sleep on in PostgreSQL until pg_sleep ends: PostgreSQL only
    # notices a closed socket when it next talks to it, so it is not counted here.)


# -- session mode -------------------------------------------------------------------------

def test_session_mode_one_server_per_client(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, mode="session", pool_size=2,
              general={"query_wait_timeout": "10s"})
    a = d.connect(user, "db1", pw)
    b = d.connect(user, "db1", pw)
    try:
        pa = {a.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(3)}
        pb = {b.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(3)}
        assert len(pa) == 1 and len(pb) == 1 and pa != pb
        # A third client waits for a session to end.
        c = Background(lambda: d.connect(user, "db1", pw))
        cq = Background(lambda: c.result(15).execute("SELECT pg_backend_pid()").fetchone()[0])
        time.sleep(1.0)
        assert not cq.done(), "a third session got a server with pool_size 2"
        a.close()
        assert cq.result(10) in pa
        c.result().close()
        assert pg.count_backends(user) == 2
    finally:
        a.close()
        b.close()


def test_session_state_reset_before_reuse(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, mode="session", pool_size=1)
    with d.connect(user, "db1", pw) as a:
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        a.execute("SET statement_timeout = '1234s'")
        a.execute("PREPARE leftover_stmt AS SELECT 1")
    with d.connect(user, "db1", pw) as b:
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid, "server not reused"
        assert b.execute("SHOW statement_timeout").fetchone() != ("1234s",)
        assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_session_mode_query_wait_timeout(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, mode="session", pool_size=1,
              general={"query_wait_timeout": "1s"})
    with d.connect(user, "db1", pw) as a:
        a.execute("SELECT 1")
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error):
            with d.connect(user, "db1", pw) as b:
                b.execute("SELECT 1")
        assert 0.8 <= time.monotonic() - t0 < 5
        assert a.execute("SELECT 'a fine'").fetchone() == ("a fine",)


# -- pool maintenance ---------------------------------------------------------------------

def test_min_pool_size_opens_servers_without_clients(pg, pgdoorman, new_user):
    user, pw = new_user()
    start(pgdoorman, pg, user, pw, pool_size=4, min_pool_size=2)
    wait_until(lambda: pg.count_backends(user) == 2, 15, message="2 idle servers")
    time.sleep(1)
    assert pg.count_backends(user) == 2


def test_min_pool_size_is_restored_after_a_server_dies(pg, pgdoorman, new_user):
    user, pw = new_user()
    start(pgdoorman, pg, user, pw, pool_size=4, min_pool_size=2)
    wait_until(lambda: pg.count_backends(user) == 2, 15, message="2 idle servers")
    victim = pg.backends(user)[0]["pid"]
    pg.psql("SELECT pg_terminate_backend(%d)" % victim)
    wait_until(lambda: len(pg.backends(user)) == 2 and
               victim not in [b["pid"] for b in pg.backends(user)], 20,
               message="min_pool_size restored")


def test_idle_timeout_closes_idle_servers(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=3, general={"idle_timeout": "1s"})
    with d.connect(user, "db1", pw) as conn:
        conn.execute("SELECT 1")
        assert pg.count_backends(user) == 1
        wait_until(lambda: pg.count_backends(user) == 0, 15, message="idle server closed")
        # and the client still works: a new server is opened for it
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_server_lifetime_replaces_servers(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"server_lifetime": "1s"})
    with d.connect(user, "db1", pw) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            if pid != first:
                break
        else:
            pytest.fail("server not replaced within 15s despite server_lifetime 1s")
    assert pg.count_backends(user) <= 1


def test_server_lifetime_does_not_cut_a_transaction(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"server_lifetime": "1s"})
    with d.connect(user, "db1", pw, autocommit=False) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(2.5)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        conn.commit()


def test_max_connections(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=2, general={"max_connections": 3})
    conns = [d.connect(user, "db1", pw) for _ in range(3)]
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            extra = d.connect(user, "db1", pw)
            extra.execute("SELECT 1")
        assert time.monotonic() - t0 < 5
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        time.sleep(0.3)
        with d.connect(user, "db1", pw) as again:
            assert again.execute("SELECT 'room again'").fetchone() == ("room again",)
    finally:
        for c in conns:
            c.close()


def test_pool_level_idle_timeout_overrides_general(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=2, general={"idle_timeout": "1h"},
              pool={"idle_timeout": "1s"})
    with d.connect(user, "db1", pw) as conn:
        conn.execute("SELECT 1")
        assert pg.count_backends(user) == 1
        wait_until(lambda: pg.count_backends(user) == 0, 15, message="idle server closed")


def test_user_level_server_lifetime_overrides_general(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1, general={"server_lifetime": "1h"},
              server_lifetime="1s")
    with d.connect(user, "db1", pw) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        wait_until(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first,
                   15, interval=0.5, message="server replaced after its lifetime")


def test_session_mode_logins_beyond_max_concurrent_creates(pg, pgdoorman, new_user):
    """
    12 clients log in at once in session mode with max_concurrent_creates 2: every one of
    them gets its own server (connections are opened two at a time, never held back for good).
    """
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, mode="session", pool_size=12,
              general={"max_concurrent_creates": 2, "query_wait_timeout": "20s"})
    pids, errors = [], []

    def work():
        try:
            with d.connect(user, "db1", pw, application_name="login-storm") as conn:
                pids.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                time.sleep(0.5)  # hold the session so that the others need their own server
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "logins hung"
    assert errors == []
    assert len(set(pids)) == 12
