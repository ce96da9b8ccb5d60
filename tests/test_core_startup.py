"""
Starting and stopping pgdoorman, checking configs (issue 7, points 1 and 2).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (doorman_env, make_config, pool_entry, psql, run_check,
                      simple_config, user_entry, wait_port, write_config)
from pgcluster import free_port

# The "Minimal config" of PgDoorman's README, verbatim.
README_MINIMAL = '''\
general:
  host: "0.0.0.0"
  port: 6432
  admin_username: "admin"
  admin_password: "change_me"

pools:
  mydb:
    server_host: "127.0.0.1"
    server_port: 5432
    pool_mode: "transaction"
    users:
      - username: "app"
        password: "md5..."           # hash for client auth (from pg_shadow)
        pool_size: 40
        server_username: "app"       # real PostgreSQL username
        server_password: "secret"    # real PostgreSQL password (plaintext)
'''

OK_LINE = re.compile(r"\b(ok|valid)\b", re.I)


def test_check_accepts_readme_minimal_config_verbatim(tmp_path):
    path = write_config(tmp_path, README_MINIMAL)
    status, out = run_check(path)
    assert status == 0, out
    assert OK_LINE.search(out), out


def test_readme_minimal_config_runs(pg, pgdoorman, tmp_path):
    # The README's config with only the addresses and credentials made real.
    text = (README_MINIMAL
            .replace('host: "0.0.0.0"', 'host: "127.0.0.1"')
            .replace("port: 6432", "port: @PORT@")
            .replace("server_port: 5432", "server_port: %d" % pg.port)
            .replace('mydb:', 'db1:')
            .replace('"md5..."', '"%s"' % pg.password_hash("u_md5"))
            .replace('"app"', '"u_md5"')
            .replace('"secret"', '"md5-secret"'))
    d = pgdoorman(text)
    out = psql(d, "u_md5", "db1", "md5-secret", "SELECT current_user, current_database()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "u_md5|db1"


def test_check_ok_exits_zero(pg, tmp_path):
    path = write_config(tmp_path, simple_config(pg, "u_scram", "scram-secret"))
    status, out = run_check(path)
    assert status == 0, out
    assert OK_LINE.search(out), out


def test_check_accepts_durations(pg, tmp_path):
    cfg = simple_config(pg, "u_scram", "scram-secret", general={
        "query_wait_timeout": "30s", "idle_timeout": "5m", "server_lifetime": "1h",
        "connect_timeout": "1500ms", "max_connections": 100},
        pool={"idle_timeout": "10m", "server_lifetime": "30m"})
    path = write_config(tmp_path, cfg)
    status, out = run_check(path)
    assert status == 0, out


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["general"].__setitem__("no_such_setting", 1), "no_such_setting"),
    (lambda c: c["pools"]["db1"].__setitem__("sever_host", "x"), "sever_host"),
    (lambda c: c["pools"]["db1"]["users"][0].__setitem__("pool_sise", 3), "pool_sise"),
], ids=["general", "pool", "user"])
def test_check_rejects_unknown_key_naming_file_and_key(pg, tmp_path, mutate, key):
    cfg = simple_config(pg, "u_scram", "scram-secret")
    mutate(cfg)
    path = write_config(tmp_path, cfg)
    status, out = run_check(path)
    assert status == 1, out
    assert key in out, out
    assert os.path.basename(path) in out, out


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["general"].__setitem__("port", "not-a-port"), "port"),
    (lambda c: c["pools"]["db1"]["users"][0].__setitem__("pool_size", "many"), "pool_size"),
    (lambda c: c["general"].__setitem__("query_wait_timeout", "soon"), "query_wait_timeout"),
    (lambda c: c["pools"]["db1"].__setitem__("pool_mode", "statementish"), "pool_mode"),
], ids=["port", "pool_size", "duration", "pool_mode"])
def test_check_rejects_wrong_type_naming_file_and_key(pg, tmp_path, mutate, key):
    cfg = simple_config(pg, "u_scram", "scram-secret")
    mutate(cfg)
    path = write_config(tmp_path, cfg)
    status, out = run_check(path)
    assert status == 1, out
    assert key in out, out
    assert os.path.basename(path) in out, out


def test_check_rejects_missing_username(pg, tmp_path):
    cfg = simple_config(pg, "u_scram", "scram-secret")
    del cfg["pools"]["db1"]["users"][0]["username"]
    path = write_config(tmp_path, cfg)
    status, out = run_check(path)
    assert status == 1, out
    assert "username" in out, out
    assert os.path.basename(path) in out, out


def test_check_rejects_unparseable_yaml(tmp_path):
    path = write_config(tmp_path, "general:\n  host: [unclosed\n")
    status, out = run_check(path)
    assert status == 1, out
    assert os.path.basename(path) in out, out


def test_check_missing_file(tmp_path):
    path = os.path.join(str(tmp_path), "nowhere.yaml")
    status, out = run_check(path)
    assert status == 1, out
    assert "nowhere.yaml" in out, out


def test_bad_config_starts_nothing(pg, pgdoorman, tmp_path):
    cfg = simple_config(pg, "u_scram", "scram-secret")
    port = free_port()
    cfg["general"]["port"] = port
    cfg["pools"]["db1"]["users"][0]["pool_size"] = "lots"
    path = write_config(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "pgdoorman", path], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=doorman_env(), timeout=30)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode != 0, out
    assert "pool_size" in out and os.path.basename(path) in out, out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_toml_config(pg, pgdoorman, tmp_path):
    password = pg.password_hash("u_md5")
    text = '''\
[general]
host = "127.0.0.1"
port = @PORT@
admin_username = "admin"
admin_password = "admin"
query_wait_timeout = "5s"

[pools.db1]
server_host = "127.0.0.1"
server_port = %d
pool_mode = "transaction"

[[pools.db1.users]]
username = "u_md5"
password = "%s"
pool_size = 2
server_username = "u_md5"
server_password = "md5-secret"
''' % (pg.port, password)
    path = write_config(tmp_path, text.replace("@PORT@", "6432"), name="check.toml")
    status, out = run_check(path)
    assert status == 0, out
    d = pgdoorman(text, name="pgdoorman.toml")
    out = psql(d, "u_md5", "db1", "md5-secret", "SELECT 40 + 2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


def test_toml_unknown_key_named(pg, tmp_path):
    text = '''\
[general]
host = "127.0.0.1"
port = 6432
admin_username = "admin"
admin_password = "admin"
bogus_toml_key = 1

[pools.db1]
server_host = "127.0.0.1"
server_port = 5432

[[pools.db1.users]]
username = "u"
password = "p"
pool_size = 2
'''
    path = write_config(tmp_path, text, name="bad.toml")
    status, out = run_check(path)
    assert status == 1, out
    assert "bogus_toml_key" in out and "bad.toml" in out, out


def test_foreground_serves_and_stops_on_sigterm(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    with d.connect("u_scram", "db1", "scram-secret") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert d.alive()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()


def test_logs_to_stderr(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    with d.connect("u_scram", "db1", "scram-secret") as conn:
        conn.execute("SELECT 1")
    assert d.log().strip(), "nothing on stderr"


def test_twistd_foreground(pg, pgdoorman):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    assert os.path.exists(twistd), "twistd missing from the venv"
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"),
                  argv=[twistd, "-n", "pgdoorman", "-c", "{config}"])
    out = psql(d, "u_scram", "db1", "scram-secret", "SELECT current_user")
    assert out.returncode == 0, out.stderr + d.log()
    assert out.stdout.strip() == "u_scram"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) is not None


def test_twistd_daemon(pg, tmp_path):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    assert os.path.exists(twistd), "twistd missing from the venv"
    cfg = simple_config(pg, "u_scram", "scram-secret")
    cfg["general"]["port"] = port = free_port()
    path = write_config(tmp_path, cfg)
    pidfile = str(tmp_path / "pgdoorman.pid")
    logfile = str(tmp_path / "pgdoorman.log")
    proc = subprocess.run([twistd, "--pidfile", pidfile, "--logfile", logfile, "pgdoorman",
                           "-c", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=doorman_env(), cwd=str(tmp_path), timeout=30)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")
    pid = None
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(pidfile), "no pid file"
        pid = int(open(pidfile).read().strip())
        os.kill(pid, 0)  # alive
        wait_port(port, log=lambda: open(logfile).read() if os.path.exists(logfile) else "")

        class D:
            host = "127.0.0.1"
        D.port = port
        out = psql(D, "u_scram", "db1", "scram-secret", "SELECT 'daemon'")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "daemon"
        assert os.path.getsize(logfile) > 0
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("daemon did not exit on SIGTERM")
        pid = None
        assert not os.path.exists(pidfile), "pid file left behind"
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_pools_and_two_users(pg, pgdoorman):
    cfg = make_config({
        "db1": pool_entry(pg, [
            user_entry("u_md5", pg.password_hash("u_md5"), 2,
                       server_username="u_md5", server_password="md5-secret"),
            user_entry("u_scram", "scram-secret", 2)]),
        "other": pool_entry(pg, [user_entry("u_scram", "scram-secret", 2)], database="db2"),
    })
    d = pgdoorman(cfg)
    for user, db, password, expect in [("u_md5", "db1", "md5-secret", "u_md5|db1"),
                                       ("u_scram", "db1", "scram-secret", "u_scram|db1"),
                                       ("u_scram", "other", "scram-secret", "u_scram|db2")]:
        out = psql(d, user, db, password, "SELECT current_user, current_database()")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expect
