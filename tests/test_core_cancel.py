"""
Cancel requests (issue 7, point 6): pgdoorman hands out its own BackendKeyData, forwards a
CancelRequest with those keys to the server the client uses right now, and ignores it when the
client has no query running.  Drivers' cancel and psql's Ctrl-C work.
"""

import os
import random
import signal
import subprocess
import time

import psycopg
import psycopg.errors
import pytest

from conftest import PSQL, Background, RawClient, send_cancel, simple_config

USER, PW = "u_scram", "scram-secret"


@pytest.fixture(params=["transaction", "session"])
def d(request, pg, pgdoorman):
    return pgdoorman(simple_config(pg, USER, PW, mode=request.param, pool_size=2))


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_driver_cancel(d, how):
    with d.connect(USER, "db1", PW) as conn:
        conn.execute("SELECT 1")
        job = Background(lambda: conn.execute("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        getattr(conn, how)()
        err = job.error(8)
        assert isinstance(err, psycopg.errors.QueryCanceled), repr(err)
        assert job.elapsed < 3, job.elapsed
        assert "canceling statement due to user request" in str(err)
        assert conn.execute("SELECT 'usable after cancel'").fetchone() == \
            ("usable after cancel",)


def test_session_mode_cancel_keeps_the_server(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, USER, PW, mode="session", pool_size=2))
    with d.connect(USER, "db1", PW) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        job = Background(lambda: conn.execute("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        conn.cancel_safe()
        assert isinstance(job.error(8), psycopg.errors.QueryCanceled)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_cancel_in_a_transaction_block(d):
    with d.connect(USER, "db1", PW, autocommit=False) as conn:
        conn.execute("SELECT 1")
        job = Background(lambda: conn.execute("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        conn.cancel_safe()
        assert isinstance(job.error(8), psycopg.errors.QueryCanceled)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_psql_ctrl_c(d):
    env = dict(os.environ, PGPASSWORD=PW, PGCONNECT_TIMEOUT="10")
    proc = subprocess.Popen([PSQL, "-X", "-h", d.host, "-p", str(d.port), "-U", USER, "-d",
                             d.aliases.get("db1", "db1"), "-c", "SELECT pg_sleep(10)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=8)
        assert time.monotonic() - t0 < 3
        assert "canceling statement due to user request" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pgdoorman_hands_out_its_own_keys(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, USER, PW, pool_size=1))
    with d.connect(USER, "db1", PW) as a, d.connect(USER, "db1", PW) as b:
        pa = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        pb = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pa == pb, "not sharing the one server; the test proves nothing"
        assert a.info.backend_pid != b.info.backend_pid


def test_cancel_from_an_idle_client_is_ignored(pg, pgdoorman):
    # a and b share one server; a is idle and cancels: b's query must not be hit, nor a's next.
    d = pgdoorman(simple_config(pg, USER, PW, pool_size=1))
    with d.connect(USER, "db1", PW) as a, d.connect(USER, "db1", PW) as b:
        a.execute("SELECT 1")
        job = Background(lambda: b.execute("SELECT pg_sleep(1.5), 'b done'").fetchone()[1])
        time.sleep(0.4)
        a.cancel_safe()
        assert job.result(10) == "b done"
        time.sleep(0.3)
        assert a.execute("SELECT pg_sleep(0.5), 'a done'").fetchone()[1] == "a done"


@pytest.mark.parametrize("keys", ["random", "zeros"])
def test_cancel_with_unknown_keys_is_harmless(d, keys):
    with d.connect(USER, "db1", PW) as a:
        job = Background(lambda: a.execute("SELECT pg_sleep(1.5), 'not cancelled'")
                         .fetchone()[1])
        time.sleep(0.4)
        for _ in range(5):
            if keys == "random":
                pid, key = random.getrandbits(31), random.getrandbits(32)
            else:
                pid, key = 0, 0
            assert send_cancel(d.port, pid, key), "cancel connection left open"
        assert job.result(10) == "not cancelled"
    with d.connect(USER, "db1", PW) as b:
        assert b.execute("SELECT 1").fetchone() == (1,)


def test_raw_cancel_with_the_right_keys(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, USER, PW, pool_size=1))
    c = RawClient(d.port).startup(USER, "db1", PW)
    try:
        pid, key = c.backend_key
        # A cancel with the right pid but a wrong key does nothing.
        job = Background(lambda: c.query("SELECT pg_sleep(1), 'fine'"))
        time.sleep(0.3)
        send_cancel(d.port, pid, key ^ 0x5A5A5A5A)
        assert job.result(10) == [("", "fine")]
        # The right keys cancel.
        job = Background(lambda: c.query("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        send_cancel(d.port, pid, key)
        err = job.error(8)
        assert getattr(err, "sqlstate", None) == "57014", repr(err)
        assert job.elapsed < 3
        assert c.query("SELECT 'after'") == [("after",)]
    finally:
        c.terminate()
