"""
The zero-downtime upgrade under twistd with a pid file (daemon mode): the new twistd must not
refuse to start next to the old one's pid file, it writes the pid file with its own pid (also
after the old twistd removed the file at exit), the clients move, and the next upgrade and a
final SIGTERM work the same way.
"""

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import doorman_env, free_port, simple_config, wait_port, wait_until, write_config

from pgdoorman.upgrade import twistd_command_line


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def test_twistd_command_line_for_the_new_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PGDOORMAN_PIDFILE", raising=False)
    argv, pidfile = twistd_command_line(["--pidfile", "run/p.pid", "-l", "x.log", "pgdoorman",
                                         "-c", "c.yaml"])
    assert pidfile == str(tmp_path / "run/p.pid")
    # Ours come last before the subcommand, so they win over the old ones.
    assert argv[-3:] == ["pgdoorman", "-c", "c.yaml"]
    assert argv[:4] == ["--pidfile", "run/p.pid", "-l", "x.log"]
    assert argv[4:-3] == ["--pidfile=", "--nodaemon", "--umask=0077"]
    argv, pidfile = twistd_command_line(["-n", "pgdoorman"])
    assert pidfile == str(tmp_path / "twistd.pid")  # twistd's default
    assert not any(a.startswith("--logfile") for a in argv)
    argv, pidfile = twistd_command_line(["--pidfile=", "-n", "pgdoorman"])
    assert pidfile is None
    argv, _ = twistd_command_line(["pgdoorman"])  # a daemon logging to twistd.log
    assert "--logfile=%s" % (tmp_path / "twistd.log") in argv
    monkeypatch.setenv("PGDOORMAN_PIDFILE", "/run/x.pid")
    assert twistd_command_line(["--pidfile=", "--nodaemon", "pgdoorman"])[1] == "/run/x.pid"


@pytest.mark.timeout(180)
def test_upgrade_under_twistd_daemon_with_pid_file(pg, new_user, tmp_path):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    user, password = new_user()
    cfg = simple_config(pg, user, password, pool_size=2)
    cfg["general"]["host"] = "127.0.0.1"
    cfg["general"]["port"] = port = free_port()
    path = write_config(tmp_path, cfg)
    pidfile = str(tmp_path / "pgdoorman.pid")
    logfile = str(tmp_path / "pgdoorman.log")

    def log():
        return open(logfile).read() if os.path.exists(logfile) else ""

    out = subprocess.run([twistd, "--pidfile", pidfile, "--logfile", logfile, "pgdoorman",
                          "-c", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=doorman_env(), cwd=str(tmp_path), timeout=30)
    assert out.returncode == 0, out.stdout.decode(errors="replace")
    pids = []
    try:
        wait_until(lambda: _pid(pidfile), message="pid file")
        pids.append(_pid(pidfile))
        wait_port(port, log=log)
        dsn = "host=127.0.0.1 port=%d user=%s dbname=db1 password=%s" % (port, user, password)
        conn = psycopg.connect(dsn, autocommit=True)
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        for n in (1, 2):
            old = pids[-1]
            os.kill(old, signal.SIGUSR2)
            wait_until(lambda: not _alive(old), timeout=60, message="old process %d exits"
                       % old)
            # The new twistd wrote the pid file, and wrote it again after the old twistd
            # removed it on its way out.
            wait_until(lambda: _pid(pidfile) not in (0, old), timeout=10,
                       message="pid file rewritten")
            new = _pid(pidfile)
            assert _alive(new), log()[-3000:]
            time.sleep(0.3)
            assert _pid(pidfile) == new, "the pid file went away after the old process left"
            pids.append(new)
            # The idle client moved with its connection, and new clients are served.
            assert conn.execute("SELECT %s::int", (n,)).fetchone()[0] == n
            with psycopg.connect(dsn) as other:
                assert other.execute("SELECT 2").fetchone()[0] == 2
        assert "Another twistd server is running" not in log()
        conn.close()
        os.kill(pids[-1], signal.SIGTERM)
        wait_until(lambda: not _alive(pids[-1]), timeout=20, message="exit on SIGTERM")
        wait_until(lambda: not os.path.exists(pidfile), timeout=5,
                   message="pid file removed at the end")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
