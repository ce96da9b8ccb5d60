"""
general.unix_socket_dir / unix_socket_mode: pgdoorman listens on <dir>/.s.PGSQL.<port> as
PostgreSQL does; psql -h <dir> and psycopg reach it, pg_hba 'local' rules decide for its clients
(and 'host' rules for TCP clients), and the socket survives a zero-downtime upgrade.
"""

import os
import signal
import socket
import stat
import struct

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import psql, simple_config, wait_until


def unix_dsn(d, directory, user, password, db="db1"):
    return "host=%s port=%d user=%s dbname=%s password=%s" % (directory, d.port, user, db,
                                                               password)


@pytest.fixture
def sockdir(tmp_path):
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    import tempfile
    directory = tempfile.mkdtemp(prefix="pgd-sock-")
    yield directory
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


def test_unix_socket_listener_mode_and_local_rules(pgdoorman, pg, new_user, sockdir):
    user, password = new_user()
    hba = ("local all %s scram-sha-256\n"
           "local all admin trust\n"
           "host all all 127.0.0.1/32 reject\n" % user)
    d = pgdoorman(simple_config(pg, user, password, general={
        "unix_socket_dir": sockdir, "unix_socket_mode": "0660", "pg_hba": hba}))
    path = os.path.join(sockdir, ".s.PGSQL.%d" % d.port)
    wait_until(lambda: os.path.exists(path), message="socket file")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    r = psql(d, user, "db1", password, "SELECT current_user", args=("-h", sockdir))
    assert r.returncode == 0 and r.stdout.strip() == user, r.stderr + d.log()[-2000:]
    with psycopg.connect(unix_dsn(d, sockdir, user, password)) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        with psycopg.connect(unix_dsn(d, sockdir, "admin", ""), autocommit=True,
                             row_factory=dict_row, dbname="pgdoorman") as admin:
            rows = [r for r in admin.execute("SHOW CLIENTS") if r["user"] == user]
            assert rows and rows[0]["addr"] in ("unix", "")
    # TCP clients meet the host rule: rejected.
    with pytest.raises(psycopg.OperationalError) as e:
        d.connect(user, "db1", password)
    assert "pg_hba" in str(e.value) or "no pg_hba.conf entry" in str(e.value) or \
        "rejects" in str(e.value), str(e.value)
    # A wrong password over the socket is refused as PostgreSQL does.
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(unix_dsn(d, sockdir, user, password + "x"))
    assert "password authentication failed" in str(e.value)


def test_socket_file_removed_at_exit(pgdoorman, pg, new_user, sockdir):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, general={"unix_socket_dir": sockdir}))
    path = os.path.join(sockdir, ".s.PGSQL.%d" % d.port)
    wait_until(lambda: os.path.exists(path), message="socket file")
    d.stop()
    assert not os.path.exists(path), "socket file left at exit"


def test_stale_socket_file_replaced_live_one_and_other_files_refused(sockdir):
    from twisted.internet import error

    from pgdoorman.unixsocket import _remove_stale
    path = os.path.join(sockdir, ".s.PGSQL.1")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # what a killed process leaves behind
    _remove_stale(path)
    assert not os.path.exists(path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(error.CannotListenError) as e:
            _remove_stale(path)
        assert "another process is listening" in str(e.value)
        assert os.path.exists(path)
    finally:
        live.close()
        os.unlink(path)
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(error.CannotListenError) as e:
        _remove_stale(path)
    assert "not a socket" in str(e.value) and os.path.exists(path)


def test_unix_socket_survives_an_upgrade(pgdoorman, pg, new_user, sockdir):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, general={"unix_socket_dir": sockdir}))
    path = os.path.join(sockdir, ".s.PGSQL.%d" % d.port)
    conn = psycopg.connect(unix_dsn(d, sockdir, user, password), autocommit=True)
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    old = d.proc.pid
    d.proc.send_signal(signal.SIGUSR2)
    d.proc.wait(60)  # the old process hands over and exits
    assert os.path.exists(path), "the old process removed the new one's socket file"
    with psycopg.connect(unix_dsn(d, sockdir, user, password)) as other:
        pid = other.execute("SELECT 3").fetchone()[0]
        assert pid == 3
    assert conn.execute("SELECT 4").fetchone()[0] == 4  # moved with its connection
    conn.close()
    # Stop the new process (not our child) so the fixture's teardown is clean.
    for line in d.log().splitlines():
        if "started the new process" in line:
            new = int(line.split("started the new process")[1].split(":")[0])
            assert new != old
            os.kill(new, signal.SIGQUIT)
            wait_until(lambda: not os.path.exists("/proc/%d" % new) or
                       open("/proc/%d/stat" % new).read().split(") ")[1][0] == "Z",
                       message="new process exits")
            break
    else:
        pytest.fail("no new process in the log")


def test_unix_socket_clients_exempt_from_tls_require(pgdoorman, pg, new_user, sockdir,
                                                     tmp_path):
    """
    PostgreSQL never uses TLS on a Unix socket (it answers an SSLRequest there with 'N'), and
    PgBouncer requires TLS "except on unix socket": under tls_mode require, socket clients
    log in in the clear and TCP clients without TLS are still refused.
    """
    from tls_certs import CA
    user, password = new_user()
    cert, key = CA(tmp_path).issue("doorman", "localhost", dns=["localhost"],
                                   ips=["127.0.0.1"])
    d = pgdoorman(simple_config(pg, user, password, general={
        "unix_socket_dir": sockdir, "tls_mode": "require", "tls_certificate": cert,
        "tls_private_key": key}))
    path = os.path.join(sockdir, ".s.PGSQL.%d" % d.port)
    wait_until(lambda: os.path.exists(path), message="socket file")
    r = psql(d, user, "db1", password, "SELECT current_user", args=("-h", sockdir))
    assert r.returncode == 0 and r.stdout.strip() == user, r.stderr + d.log()[-2000:]
    with psycopg.connect(unix_dsn(d, sockdir, user, password)) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert not conn.pgconn.ssl_in_use
    # An SSLRequest on the socket is declined, as PostgreSQL declines it there.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(path)
    try:
        raw.sendall(struct.pack("!II", 8, 80877103))
        assert raw.recv(1) == b"N"
    finally:
        raw.close()
    # TCP still must use TLS.
    with pytest.raises(psycopg.OperationalError) as e:
        d.connect(user, "db1", password, sslmode="disable")
    assert "TLS required" in str(e.value), str(e.value)
    with d.connect(user, "db1", password, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
