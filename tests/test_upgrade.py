"""
Issue 10: zero-downtime upgrade.  A running pgdoorman hands its listening socket and its idle
clients' live sockets (with their state) to a new process started from the installed code, on
SIGUSR2, SIGINT without a terminal, or the admin console's UPGRADE.

Everything is real: PostgreSQL, the pgdoorman process (started by the C{pgdoorman} fixture, whose
stdin is /dev/null: no terminal), the new process it starts, and the clients (pgbench, psycopg,
asyncpg, a raw protocol client).  A changed installed version is a copy of this tree (put first
on PYTHONPATH) whose C{__version__} is edited after the old process started: the new process
reports it in C{SHOW VERSION}.
"""

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (PGBENCH, PSQL, Background, doorman_env, psql, send_cancel, simple_config,
                      wait_until)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

SHUTDOWN_TIMEOUT = "20s"


# -- helpers --------------------------------------------------------------------------------------

def _gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Upgrades:
    """Follows one pgdoorman across upgrades; stops every process it started at teardown."""

    def __init__(self):
        self.doormen = []

    def follow(self, d):
        d.pid = d.proc.pid
        d.pids = [d.proc.pid]
        self.doormen.append(d)
        return d

    def started(self, d):
        return [int(p) for p in re.findall(r"started the new process (\d+)", d.log())]

    def accepting(self, d):
        return len(re.findall(r"is accepting connections [\d.]+s after", d.log()))

    def failures(self, d):
        return len(re.findall(r"UPGRADE FAILED", d.log()))

    def signal(self, d, sig=signal.SIGUSR2, expect="accepting", timeout=40):
        """Send C{sig} to the current process; wait for the new one (or the failure)."""
        n_ok, n_failed, n_started = self.accepting(d), self.failures(d), len(self.started(d))
        t0 = time.monotonic()
        os.kill(d.pid, sig)
        if expect == "accepting":
            wait_until(lambda: self.accepting(d) > n_ok or self.failures(d) > n_failed,
                       timeout, 0.02, "the new process accepting")
            assert self.failures(d) == n_failed, d.log()[-4000:]
            new = self.started(d)[n_started]
            d.old_pid, d.pid = d.pid, new
            d.pids.append(new)
            return time.monotonic() - t0
        wait_until(lambda: self.failures(d) > n_failed, timeout, 0.02, "the upgrade failing")
        return time.monotonic() - t0

    def wait_old_gone(self, d, timeout=40):
        wait_until(lambda: _gone(d.old_pid) or (d.proc.pid == d.old_pid
                                                 and d.proc.poll() is not None),
                   timeout, 0.05, "the old process %d exiting" % d.old_pid)
        if d.proc.pid == d.old_pid:
            d.proc.wait(10)

    def stop_all(self):
        for d in self.doormen:
            for pid in d.pids + self.started(d):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            for pid in d.pids + self.started(d):
                while not _gone(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _gone(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass


@pytest.fixture
def upgrades():
    u = Upgrades()
    yield u
    u.stop_all()


def config(pg, user, pw, db="db1", pool_size=2, **general):
    gen = {"shutdown_timeout": SHUTDOWN_TIMEOUT, "query_wait_timeout": "30s"}
    gen.update(general)
    return simple_config(pg, user, pw, db=db, pool_size=pool_size, general=gen)


def admin(d, sql, timeout=60):
    return psql(d, "admin", "pgdoorman", "admin", sql, args=["-A", "-t"], timeout=timeout)


def copy_tree(tmp_path):
    """A copy of the installed code that a test may change (the "installed" pgdoorman)."""
    dest = tmp_path / "installed"
    shutil.copytree(os.path.join(REPO, "pgdoorman"), dest / "pgdoorman",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def start_from(pgdoorman, cfg, code_dir):
    """Start pgdoorman from C{code_dir} (first on PYTHONPATH)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code_dir) + (os.pathsep + old if old else "")
    try:
        return pgdoorman(cfg)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def set_version(code_dir, version):
    path = code_dir / "pgdoorman" / "__init__.py"
    text = path.read_text()
    path.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "%s"' % version, text))


def tcp_port(conn):
    """The client side's local port of a psycopg connection (its TCP connection)."""
    return socket.socket(fileno=os.dup(conn.fileno())).getsockname()[1]


# -- tests ------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_idle_psycopg_client_moves_with_its_prepared_statements(pg, pgdoorman, new_user,
                                                                 upgrades):
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw)))
    with d.connect(user, "db1", pw, prepare_threshold=0) as conn:
        conn.execute("SET application_name = 'moving'")
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        key = (conn.info.backend_pid, conn.pgconn.get_cancel())
        port = tcp_port(conn)
        took = upgrades.signal(d)
        upgrades.wait_old_gone(d)
        assert tcp_port(conn) == port
        assert conn.info.backend_pid == key[0]
        # the statement psycopg prepared (named, prepare_threshold=0) runs on the new process
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        assert conn.execute("SHOW application_name").fetchone() == ("moving",)
        assert conn.execute("SELECT %s::int + 1", (2,)).fetchone() == (3,)
    log = d.log()
    assert re.search(r"1 clients handed over", log), log[-3000:]
    assert took < 20
    print(log)
