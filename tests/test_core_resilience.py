"""
Servers that die (issue 7, point 7): a client whose server dies or is restarted mid-transaction
gets an error, not a hang; the pool replaces the connection; other clients carry on.
PostgreSQL down when pgdoorman starts: pgdoorman starts anyway, clients get a clear error, and
work once PostgreSQL is back.

Tests that stop PostgreSQL use a cluster of their own (C{own_pg}).
"""

import time

import psycopg
import pytest

from conftest import Background, RawClient, ServerError, simple_config

USER, PW = "u_scram", "scram-secret"


def start(pgdoorman, pg, mode="transaction", pool_size=2, **general):
    general.setdefault("connect_timeout", "2s")
    general.setdefault("query_wait_timeout", "5s")
    return pgdoorman(simple_config(pg, USER, PW, mode=mode, pool_size=pool_size,
                                   general=general), direct_pg=pg)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_postgres_restarted_mid_transaction(own_pg, pgdoorman, mode):
    pg = own_pg()
    d = start(pgdoorman, pg, mode=mode, pool_size=3)
    idle = d.connect(USER, "db1", PW)
    idle.execute("SELECT 1")
    a = d.connect(USER, "db1", PW, autocommit=False)
    a.execute("SELECT 1")  # in a transaction
    pg.restart("fast")
    t0 = time.monotonic()
    with pytest.raises(psycopg.Error):
        a.execute("SELECT 'after restart'")
    assert time.monotonic() - t0 < 10
    a.close()
    # New clients work at once.
    time.sleep(0.5)
    for i in range(3):
        with d.connect(USER, "db1", PW) as conn:
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
    if mode == "transaction":
        # A client that was idle through the restart held no server: it just carries on.
        assert idle.execute("SELECT 'idle client'").fetchone() == ("idle client",)
    idle.close()
    assert d.alive()


@pytest.mark.timeout(120)
def test_postgres_killed_during_a_query(own_pg, pgdoorman):
    pg = own_pg()
    d = start(pgdoorman, pg)
    with d.connect(USER, "db1", PW) as conn:
        job = Background(lambda: conn.execute("SELECT pg_sleep(30)"))
        time.sleep(0.5)
        pg.stop("immediate")
        err = job.error(15)
        assert isinstance(err, psycopg.Error), repr(err)
        assert job.elapsed < 10
    pg.start()
    deadline = time.monotonic() + 15
    while True:
        try:
            with d.connect(USER, "db1", PW) as conn:
                assert conn.execute("SELECT 'back'").fetchone() == ("back",)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(120)
def test_postgres_down_at_start(own_pg, pgdoorman):
    pg = own_pg(start=False)
    d = start(pgdoorman, pg)  # starts and listens although PostgreSQL is down
    assert d.alive()
    # A clear error: a PostgreSQL ErrorResponse with a message, within the connect_timeout
    # bounds, not a dropped connection or a hang.
    t0 = time.monotonic()
    c = RawClient(d.port, timeout=15)
    with pytest.raises(ServerError) as e:
        c.startup(USER, "db1", PW)
        c.query("SELECT 1")
    assert time.monotonic() - t0 < 10
    assert e.value.message, e.value.fields
    c.close()
    with pytest.raises(psycopg.Error):
        with d.connect(USER, "db1", PW) as conn:
            conn.execute("SELECT 1")
    assert d.alive()
    pg.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            with d.connect(USER, "db1", PW) as conn:
                assert conn.execute("SELECT 'up now'").fetchone() == ("up now",)
            break
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_idle_server_terminated_is_replaced(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = pgdoorman(simple_config(pg, user, pw, pool_size=1))
    with d.connect(user, "db1", pw) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        pg.psql("SELECT pg_terminate_backend(%d)" % first)
        time.sleep(0.3)
        second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert second != first
    assert pg.count_backends(user) == 1


def test_server_terminated_mid_transaction(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = pgdoorman(simple_config(pg, user, pw, pool_size=2))
    with d.connect(user, "db1", pw, autocommit=False) as a, \
            d.connect(user, "db1", pw, autocommit=False) as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pid_a != pid_b
        pg.psql("SELECT pg_terminate_backend(%d)" % pid_a)
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error) as e:
            a.execute("SELECT 1")
        assert time.monotonic() - t0 < 5
        assert "terminat" in str(e.value) or isinstance(e.value, psycopg.OperationalError)
        # The other client carries on with its transaction.
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_b
        b.commit()
    with d.connect(user, "db1", pw) as c:
        assert c.execute("SELECT 'replaced'").fetchone() == ("replaced",)
    assert pg.count_backends(user) <= 2
