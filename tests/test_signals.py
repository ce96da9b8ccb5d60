"""
Signals and the shutdown/suspend commands as PgBouncer 1.23+ users expect them, with
PgDoorman's upgrade signals kept: SIGTERM waits for clients to leave ("super safe"), SIGINT in a
terminal lets transactions finish ("safe"), a second SIGTERM/SIGINT or SIGQUIT stops at once;
SIGINT without a terminal and SIGUSR2 upgrade (tests/test_upgrade.py).  SHUTDOWN
WAIT_FOR_CLIENTS / WAIT_FOR_SERVERS, SUSPEND and RESUME from the admin console.
"""

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import (Background, Doorman, doorman_env, free_port, simple_config, wait_port,
                      wait_until, write_config)


def admin(d):
    return psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                           row_factory=dict_row)


def refused(d):
    try:
        psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


def exited_within(d, seconds):
    try:
        d.proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def cfg(pg, new_user):
    user, password = new_user()
    return user, password, simple_config(pg, user, password, pool_size=2,
                                         general={"shutdown_timeout": "30s"})


def test_sigterm_waits_for_clients_to_leave(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    conn = d.connect(user, "db1", password)
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refused(d), message="no new connections after SIGTERM")
    # The connected client is still served, for as long as it stays.
    time.sleep(0.5)
    assert d.alive()
    assert conn.execute("SELECT 7").fetchone()[0] == 7
    started = time.monotonic()
    conn.close()
    assert exited_within(d, 5), "did not exit once the last client left"
    assert time.monotonic() - started < 3
    assert d.proc.returncode == 0
    assert "waiting for the connected ones to leave" in d.log()


def test_second_sigterm_and_sigquit_stop_at_once(pgdoorman, cfg):
    user, password, config = cfg
    for second in (signal.SIGTERM, signal.SIGQUIT):
        d = pgdoorman(config)
        conn = d.connect(user, "db1", password)
        if second == signal.SIGTERM:
            d.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(d), message="shutting down")
            assert d.alive()
        d.proc.send_signal(second)
        assert exited_within(d, 5), second
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_sigterm_stops_at_shutdown_timeout(pgdoorman, pg, new_user):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, general={"shutdown_timeout": "1s"}))
    conn = d.connect(user, "db1", password)
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert exited_within(d, 8)
    assert 0.8 < time.monotonic() - started < 6
    assert "shutdown_timeout (1.0s) reached with clients still there" in d.log() or \
        "shutdown_timeout (1s) reached with clients still there" in d.log(), d.log()
    conn.close()


def start_in_terminal(tmp_path, config):
    """pgdoorman with a pseudo-terminal as stdin, as when started by hand (Ctrl-C)."""
    port = free_port()
    config = dict(config, general=dict(config["general"], host="127.0.0.1", port=port))
    path = write_config(tmp_path, config)
    log_path = str(tmp_path / "pgdoorman.stderr")
    master, slave = os.openpty()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pgdoorman", path], stdin=slave,
                                stdout=log, stderr=log, env=doorman_env(),
                                cwd=str(tmp_path))
    os.close(slave)
    d = Doorman(port, path, log_path, proc)
    d.pty = master
    wait_port(port, proc, d.log)
    return d


def test_sigint_in_a_terminal_lets_transactions_finish(tmp_path, cfg):
    user, password, config = cfg
    d = start_in_terminal(tmp_path, config)
    try:
        busy = d.connect(user, "db1", password, autocommit=False)
        busy.execute("SELECT 1")  # holds a server: a transaction is running
        d.proc.send_signal(signal.SIGINT)
        wait_until(lambda: refused(d), message="no new connections after SIGINT")
        time.sleep(0.5)
        assert d.alive(), "exited with a transaction still running"
        assert busy.execute("SELECT 2").fetchone()[0] == 2
        busy.commit()  # the transaction ends: safe shutdown completes
        assert exited_within(d, 5)
        assert d.proc.returncode == 0
        assert "upgrade" not in d.log().lower()
        # A second SIGINT while waiting stops at once.
        d = start_in_terminal(tmp_path, config)
        busy = d.connect(user, "db1", password, autocommit=False)
        busy.execute("SELECT 1")
        d.proc.send_signal(signal.SIGINT)
        wait_until(lambda: refused(d), message="shutting down")
        d.proc.send_signal(signal.SIGINT)
        assert exited_within(d, 5)
    finally:
        d.stop()
        os.close(d.pty)


def test_shutdown_wait_for_clients(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    conn = d.connect(user, "db1", password)
    with admin(d) as console:
        console.execute("SHUTDOWN WAIT_FOR_CLIENTS")
        with pytest.raises(psycopg.Error):
            console.execute("SHUTDOWN WAIT_FOR_NOTHING")
    wait_until(lambda: refused(d), message="no new connections")
    time.sleep(0.5)
    assert d.alive()
    assert conn.execute("SELECT 3").fetchone()[0] == 3
    conn.close()
    assert exited_within(d, 5)


def test_suspend_flushes_holds_and_resume_lets_go(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    busy = d.connect(user, "db1", password, autocommit=False)
    busy.execute("SELECT 1")
    idle = d.connect(user, "db1", password)
    other = admin(d)  # opened before: a suspended pooler accepts no connection
    with admin(d) as console:
        suspend = Background(console.execute, "SUSPEND")
        time.sleep(0.5)
        assert not suspend.done(), "SUSPEND answered while a transaction was running"
        busy.commit()
        suspend.result(10)
        state = {r["key"]: r["value"] for r in other.execute("SHOW STATE")}
        assert state["suspended"] == "yes"
        with pytest.raises(psycopg.Error) as e:
            other.execute("SUSPEND")
        assert "already suspended" in str(e.value)
        other.close()
        # New connections wait (not refused) and queries wait until RESUME.
        newcomer = Background(lambda: d.connect(user, "db1", password).execute(
            "SELECT 4").fetchone()[0])
        query = Background(lambda: idle.execute("SELECT 5").fetchone()[0])
        time.sleep(1.0)
        assert not newcomer.done() and not query.done()
        assert d.alive()
        console.execute("RESUME")
        assert newcomer.result(10) == 4
        assert query.result(10) == 5
        state = {r["key"]: r["value"] for r in console.execute("SHOW STATE")}
        assert state["suspended"] == "no" and state["paused"] == "no"
