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
import time

import pytest

from conftest import PGBENCH, Background, psql, simple_config, wait_until
from test_prepared_drivers import TPCB_AUTOCOMMIT
from test_prepared_drivers import bench_db as bench_db_fixture

bench_db = bench_db_fixture  # the fixture, shared with the prepared-statement tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

SHUTDOWN_TIMEOUT = "20s"
PYPY = os.path.join(REPO, ".venv-pypy", "bin", "python")
#: The interpreters pgdoorman runs on; the upgrade starts the new process on the same one.
PYTHONS = [pytest.param(sys.executable, id="cpython"), pytest.param(PYPY, id="pypy")]


# -- helpers -----------------------------------------------------------------------------------

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
    """Run one admin console command; its output and psql's messages, as text."""
    out = psql(d, "admin", "pgdoorman", "admin", sql, timeout=timeout)
    return out.stdout + out.stderr


def copy_tree(tmp_path):
    """
    A copy of the installed code that a test may change (the "installed" pgdoorman).  It goes
    in the fixture's directory, which is pgdoorman's working directory: C{python -m pgdoorman}
    puts that first on sys.path, ahead of PYTHONPATH, and the new process inherits it.
    """
    shutil.copytree(os.path.join(REPO, "pgdoorman"), tmp_path / "pgdoorman",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def start_from(pgdoorman, cfg, code_dir):
    """Start pgdoorman from C{code_dir} (its working directory, see L{copy_tree})."""
    d = pgdoorman(cfg)
    assert os.path.samefile(os.readlink("/proc/%d/cwd" % d.proc.pid), str(code_dir))
    return d


def set_version(code_dir, version):
    path = code_dir / "pgdoorman" / "__init__.py"
    text = path.read_text()
    path.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "%s"' % version, text))


def tcp_port(conn):
    """The client side's local port of a psycopg connection (its TCP connection)."""
    return socket.socket(fileno=os.dup(conn.fileno())).getsockname()[1]


# -- tests -------------------------------------------------------------------------------------

def need_python(python):
    if not os.path.exists(python):
        pytest.fail("%s is missing (bench/run.py --pypy creates .venv-pypy)" % python)
    return [python, "-m", "pgdoorman", "{config}"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("python", PYTHONS)
def test_idle_psycopg_client_moves_with_its_prepared_statements(pg, pgdoorman, new_user,
                                                                 upgrades, python):
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw), argv=need_python(python)))
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


def test_client_session_round_trip_and_versions():
    from pgdoorman.session import ClientSession, SessionFormatError
    s = ClientSession("db1", "alice", {"user": "alice", "database": "db1"},
                      {"TimeZone": "UTC"}, (123, -456), "127.0.0.1:5555", 1.5)
    s.prepared = {b"s1": b"SELECT $1::int\x00\x00\x01\x00\x00\x00\x17", b"\xff": b"x\x00\x00\x00"}
    s.startup_values = {"TimeZone": "UTC"}
    s.scram_client_key = b"\x01\x02"
    t = ClientSession.from_bytes(s.to_bytes())
    assert (t.database, t.user, t.cancel_key, t.prepared, t.startup_values,
            t.scram_client_key) == ("db1", "alice", (123, -456), s.prepared, s.startup_values,
                                    b"\x01\x02")
    # version 1 (before the upgrade fields) is still read
    v1 = b'{"version":1,"database":"d","user":"u","startup":{},"params":{},"cancel_key":[1,2]}'
    assert ClientSession.from_bytes(v1).prepared == {}
    for bad in (b'{"version":99,"database":"d","user":"u"}', b"not json", b'{"version":2}'):
        with pytest.raises(SessionFormatError):
            ClientSession.from_bytes(bad)


def run_pgbench(d, user, pw, db, mode, seconds, script_path, clients=50):
    env = {"PGPASSWORD": pw, "PATH": "/usr/bin:/bin"}
    return subprocess.run([PGBENCH, "-n", "-h", d.host, "-p", str(d.port), "-U", user,
                           "-M", mode, "-c", str(clients), "-j", "2", "-T", str(seconds),
                           "-f", str(script_path), db],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          timeout=seconds + 60, text=True, cwd="/tmp")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_through_two_upgrades_one_to_a_new_version(pg, pgdoorman, new_user, upgrades,
                                                            bench_db, tmp_path, mode):
    user, pw = new_user()
    code = copy_tree(tmp_path)
    d = upgrades.follow(start_from(pgdoorman, config(pg, user, pw, db=bench_db, pool_size=5),
                                   code))
    from pgdoorman import __version__
    assert admin(d, "SHOW VERSION").strip() == "pgdoorman %s" % __version__
    script = tmp_path / "tpcb-autocommit.sql"
    script.write_text(TPCB_AUTOCOMMIT)
    bench = Background(run_pgbench, d, user, pw, bench_db, mode, 14, script)
    time.sleep(3)
    # first: SIGINT without a terminal (stdin is /dev/null) means upgrade, same code
    upgrades.signal(d, signal.SIGINT if mode == "prepared" else signal.SIGUSR2)
    upgrades.wait_old_gone(d)
    # second: the installed code changed (a new version), through the admin console
    set_version(code, "9.9.9-upgraded")
    out = admin(d, "UPGRADE")
    assert "is accepting connections" in out, out
    new = upgrades.started(d)[-1]
    d.old_pid, d.pid = d.pid, new
    d.pids.append(new)
    upgrades.wait_old_gone(d)
    out = bench.result(timeout=120)
    report = "pgbench exit %s:\n%s\n-- pgdoorman log (tail):\n%s" % (
        out.returncode, out.stdout[-3000:], d.log()[-6000:])
    assert out.returncode == 0, report
    assert "aborted" not in out.stdout, report
    m = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert m and m.group(1) == "0", report
    m = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    assert m and int(m.group(1)) > 0, report
    assert admin(d, "SHOW VERSION").strip() == "pgdoorman 9.9.9-upgraded"
    handed = [int(n) for n in re.findall(r"(\d+) clients handed over", d.log())]
    assert len(handed) == 2 and handed[0] == 50, report
    assert "closed; old process" in d.log() and " 0 closed;" in d.log(), report


@pytest.mark.timeout(120)
def test_asyncpg_prepared_statements_and_cancel_with_old_keys(pg, pgdoorman, new_user, upgrades):
    import asyncpg
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw, pool_size=1)))
    url = "postgresql://%s:%s@%s:%d/db1" % (user, pw, d.host, d.port)

    async def main():
        conn = await asyncpg.connect(url, timeout=30)
        stmt = await conn.prepare("SELECT $1::int * 2")
        assert await stmt.fetchval(21) == 42
        assert await conn.fetchval("SELECT $1::text || 'b'", "a") == "ab"  # cached statement
        await asyncio.get_running_loop().run_in_executor(None, upgrades.signal, d)
        await asyncio.get_running_loop().run_in_executor(None, upgrades.wait_old_gone, d)
        assert await stmt.fetchval(5) == 10
        assert await conn.fetchval("SELECT $1::text || 'b'", "c") == "cb"
        # asyncpg cancels with the BackendKeyData it got from the old process
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(20)"))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        task.cancel()  # asyncpg sends a CancelRequest, then waits for the query to end
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert time.monotonic() - t0 < 5
        assert await stmt.fetchval(7) == 14
        await conn.close()

    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.timeout(120)
def test_psycopg_cancel_with_old_keys_after_migration(pg, pgdoorman, new_user, upgrades):
    import psycopg
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw)))
    with d.connect(user, "db1", pw, prepare_threshold=0) as conn:
        pid = conn.info.backend_pid
        upgrades.signal(d)
        upgrades.wait_old_gone(d)
        assert conn.info.backend_pid == pid
        slow = Background(conn.execute, "SELECT pg_sleep(20)")
        time.sleep(1.0)
        conn.cancel()
        err = slow.error(timeout=10)
        assert isinstance(err, psycopg.errors.QueryCanceled), err
        assert slow.elapsed < 6
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("python", PYTHONS)
def test_long_transaction_finishes_on_the_old_process_then_moves(pg, pgdoorman, new_user,
                                                                 upgrades, python):
    import psycopg
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw, pool_size=2),
                                  argv=need_python(python)))
    with d.connect(user, "db1", pw, autocommit=False) as conn, \
            d.connect(user, "db1", pw) as idle:
        port = tcp_port(conn)
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # opens a transaction
        old_pid = d.pid
        upgrades.signal(d)
        # the idle client moved, the one in a transaction stays on the old process
        wait_until(lambda: "1 clients to hand over" in d.log() or "2 clients to hand over"
                   in d.log(), 10, 0.05, "migration start")
        assert not _gone(old_pid)
        assert idle.execute("SELECT 2").fetchone() == (2,)
        time.sleep(1.0)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == backend
        # a cancel sent now reaches the new process, which passes it to the old one
        slow = Background(conn.execute, "SELECT pg_sleep(20)")
        time.sleep(1.0)
        conn.cancel()
        err = slow.error(timeout=10)
        assert isinstance(err, psycopg.errors.QueryCanceled), err
        conn.rollback()
        upgrades.wait_old_gone(d, timeout=15)
        after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        assert after != backend
        assert tcp_port(conn) == port
    assert "2 clients handed over" in d.log(), d.log()[-3000:]


@pytest.mark.timeout(120)
def test_invalid_config_refuses_the_upgrade(pg, pgdoorman, new_user, upgrades):
    user, pw = new_user()
    d = upgrades.follow(pgdoorman(config(pg, user, pw)))
    with d.connect(user, "db1", pw) as conn:
        good = open(d.config_path).read()
        with open(d.config_path, "w") as f:
            f.write(good.replace("pool_mode:", "pool_mood:"))
        upgrades.signal(d, expect="failed")
        assert "refuses the configuration" in d.log()
        out = admin(d, "UPGRADE")
        assert "UPGRADE failed" in out and "refuses the configuration" in out, out
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with d.connect(user, "db1", pw) as other:
            assert other.execute("SELECT 2").fetchone() == (2,)
        assert upgrades.started(d) == []
        assert d.proc.poll() is None


@pytest.mark.timeout(120)
def test_new_process_crashing_at_start_leaves_the_old_in_charge(pg, pgdoorman, new_user,
                                                               upgrades, tmp_path):
    user, pw = new_user()
    code = copy_tree(tmp_path)
    d = upgrades.follow(start_from(pgdoorman, config(pg, user, pw), code))
    with d.connect(user, "db1", pw, prepare_threshold=0) as conn:
        assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        service_py = code / "pgdoorman" / "service.py"
        service_py.write_text(service_py.read_text() + (
            "\nimport os as _os\nif _os.environ.get('PGDOORMAN_UPGRADE_FDS'):\n"
            "    raise SystemExit('crashing on purpose')\n"))
        upgrades.signal(d, expect="failed")
        assert "exited during startup" in d.log(), d.log()[-3000:]
        assert conn.execute("SELECT %s::int", (2,)).fetchone() == (2,)
        with d.connect(user, "db1", pw) as other:
            assert other.execute("SELECT 3").fetchone() == (3,)
        assert d.proc.poll() is None


@pytest.mark.timeout(120)
def test_sighup_after_a_package_upgrade_hands_over(pg, pgdoorman, new_user, upgrades, tmp_path):
    """
    `apt-get install --only-upgrade pgdoorman` then `systemctl reload pgdoorman` (SIGHUP): the
    config is reloaded, and because the installed code now has another version, a new process
    takes over; an idle client keeps its TCP connection and its prepared statement.  A SIGHUP
    with unchanged code only reloads.
    """
    import psycopg
    user, pw = new_user()
    code = copy_tree(tmp_path)
    d = upgrades.follow(start_from(pgdoorman, config(pg, user, pw), code))
    conn = psycopg.connect(d.dsn(user, "db1", pw), autocommit=True, prepare_threshold=0)
    try:
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        port = tcp_port(conn)
        pid = d.pid
        os.kill(pid, signal.SIGHUP)  # same code: a reload only
        time.sleep(3)
        assert upgrades.started(d) == [] and d.pid == pid
        set_version(code, "9.9.9-from-sighup")
        upgrades.signal(d, signal.SIGHUP)
        upgrades.wait_old_gone(d)
        assert admin(d, "SHOW VERSION").strip() == "pgdoorman 9.9.9-from-sighup"
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        assert tcp_port(conn) == port
    finally:
        conn.close()
