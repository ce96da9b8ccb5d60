"""
The pgdoorman command line (issue 8): options, exit codes, -t, logging, daemon mode, systemd
notifications.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import doorman_env, psql, simple_config, wait_port, wait_until, write_config
from pgcluster import free_port

from pgdoorman import __version__, logs, systemd


def run(args, env_extra=None, timeout=30):
    env = doorman_env()
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-m", "pgdoorman"] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         timeout=timeout, text=True)
    return out.returncode, out.stdout, out.stderr


# -- options and exit codes -----------------------------------------------------------------

def test_version():
    status, out, _ = run(["-V"])
    assert status == 0 and out.strip() == "pgdoorman %s" % __version__
    status, out, _ = run(["--version"])
    assert status == 0 and __version__ in out


def test_help_lists_options_and_exit_codes():
    status, out, _ = run(["-h"])
    assert status == 0
    for option in ("--log-level", "--log-format", "--daemon", "--test", "--version",
                   "generate", "Exit status"):
        assert option in out, option


def test_bad_log_level_is_a_usage_error(pg, tmp_path):
    path = write_config(tmp_path, simple_config(pg, "u_scram", "scram-secret"))
    status, _, err = run(["-l", "loud", path])
    assert status == 2 and "loud" in err, err
    status, _, err = run([path], env_extra={"LOG_LEVEL": "chatty"})
    assert status == 2 and "LOG_LEVEL" in err and "chatty" in err, err


def test_check_warns_about_unimplemented_keys(pg, tmp_path):
    cfg = simple_config(pg, "u_scram", "scram-secret", general={"tokio_event_interval": 7})
    status, out, err = run(["-t", write_config(tmp_path, cfg)])
    assert status == 0, err
    assert "general.tokio_event_interval" in err and "not implemented" in err, err
    assert "valid" in out


def test_check_does_not_warn_about_keys_the_command_handles(pg, tmp_path):
    cfg = simple_config(pg, "u_scram", "scram-secret",
                        general={"daemon_pid_file": str(tmp_path / "p.pid")})
    status, out, err = run(["-t", write_config(tmp_path, cfg)])
    assert status == 0 and "daemon_pid_file" not in err, err


def _cert_pair(directory, name):
    from OpenSSL import crypto
    key = crypto.PKey()
    key.generate_key(crypto.TYPE_RSA, 2048)
    cert = crypto.X509()
    cert.get_subject().CN = name
    cert.set_serial_number(1)
    cert.gmtime_adj_notBefore(0)
    cert.gmtime_adj_notAfter(3600)
    cert.set_issuer(cert.get_subject())
    cert.set_pubkey(key)
    cert.sign(key, "sha256")
    cert_path, key_path = directory / (name + ".crt"), directory / (name + ".key")
    cert_path.write_bytes(crypto.dump_certificate(crypto.FILETYPE_PEM, cert))
    key_path.write_bytes(crypto.dump_privatekey(crypto.FILETYPE_PEM, key))
    return str(cert_path), str(key_path)


def test_check_tls_files(pg, tmp_path):
    cert_a, key_a = _cert_pair(tmp_path, "a")
    _cert_b, key_b = _cert_pair(tmp_path, "b")

    def check(**general):
        cfg = simple_config(pg, "u_scram", "scram-secret", general=general)
        return run(["-t", write_config(tmp_path, cfg)])

    status, _, err = check(tls_certificate=cert_a, tls_private_key=key_a, tls_ca_cert=cert_a)
    assert status == 0, err
    status, _, err = check(tls_certificate=cert_a, tls_private_key=key_b)
    assert status == 1 and "general.tls_private_key" in err and "does not match" in err, err
    status, _, err = check(tls_certificate=str(tmp_path / "missing.crt"),
                           tls_private_key=key_a)
    assert status == 1 and "missing.crt" in err and "cannot read" in err, err
    status, _, err = check(server_tls_ca_cert=key_a)
    assert status == 1 and "server_tls_ca_cert" in err, err
    status, _, err = check(tls_mode="sometimes")
    assert status == 1 and "general.tls_mode" in err and "sometimes" in err, err


def test_check_pg_hba(pg, tmp_path):
    good = ("# comment\nhost all all 127.0.0.1/32 md5\nhostssl db1 app 10.0.0.0 255.0.0.0 "
            "scram-sha-256\nlocal all all trust\n")
    cfg = simple_config(pg, "u_scram", "scram-secret", general={"pg_hba": good})
    status, _, err = run(["-t", write_config(tmp_path, cfg)])
    assert status == 0, err
    bad = "host all all 127.0.0.1/32 md5\nhots all all 0.0.0.0/0 md5\n"
    cfg = simple_config(pg, "u_scram", "scram-secret", general={"pg_hba": bad})
    status, _, err = run(["-t", write_config(tmp_path, cfg)])
    assert status == 1 and "general.pg_hba" in err and "rule 2" in err and "hots" in err, err
    hba_file = tmp_path / "hba.conf"
    hba_file.write_text("host all all 127.0.0.1/32 magic\n")
    cfg = simple_config(pg, "u_scram", "scram-secret",
                        general={"pg_hba": {"path": str(hba_file)}})
    status, _, err = run(["-t", write_config(tmp_path, cfg)])
    assert status == 1 and "magic" in err, err


def test_hba_problems_unit():
    from pgdoorman.cli import hba_problems
    assert hba_problems("host all all samehost md5\nhost all all ::1/128 trust") == []
    assert [n for n, _ in hba_problems("host all all\nlocal all all\nhost a b 1.2.3.4 md5")] \
        == [1, 2, 3]


def test_port_in_use_names_the_port(pg, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = simple_config(pg, "u_scram", "scram-secret", general={"port": port})
        status, _, err = run([write_config(tmp_path, cfg)])
    assert status == 1, err
    assert str(port) in err and "in use" in err, err
    assert "Traceback" not in err, err


# -- logging --------------------------------------------------------------------------------

def test_structured_log_is_one_json_object_per_line(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"),
                  argv=[sys.executable, "-m", "pgdoorman", "-F", "structured", "{config}"])
    out = psql(d, "u_scram", "db1", "scram-secret", "SELECT 1")
    assert out.returncode == 0, out.stderr
    records = wait_until(lambda: [json.loads(line) for line in d.log().splitlines()
                                  if "disconnected" in line], message="disconnect logged")
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    for record in lines:
        assert {"time", "level", "message", "namespace"} <= set(record), record
    assert any(r["message"].startswith("pgdoorman %s listening" % __version__) for r in lines)
    connect = [r for r in lines if "connecting as" in r["message"]]
    assert connect and connect[0]["user"] == "u_scram" and connect[0]["level"] == "info"
    assert records
    assert "scram-secret" not in d.log()


def test_text_log_format(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    first = wait_until(lambda: d.log().splitlines(), message="a log line")[0]
    # 2024-05-01T12:00:00.123+0000 INFO [pgdoorman] pgdoorman 0.1.0 listening ...
    parts = first.split(" ", 3)
    assert parts[0][:4].isdigit() and "T" in parts[0], first
    assert parts[1] == "INFO" and parts[2].startswith("["), first


def test_log_level_warn_hides_info(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"),
                  argv=[sys.executable, "-m", "pgdoorman", "-l", "warn", "{config}"])
    assert psql(d, "u_scram", "db1", "scram-secret", "SELECT 1").returncode == 0
    time.sleep(0.3)
    assert "listening" not in d.log() and "connecting as" not in d.log(), d.log()


def test_log_level_from_environment(pg, pgdoorman, monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "error")
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    assert psql(d, "u_scram", "db1", "scram-secret", "SELECT 1").returncode == 0
    time.sleep(0.3)
    assert d.log().strip() == "", d.log()


def test_logs_unit_level_control_and_secrets():
    from twisted.logger import LogLevel
    stream = io.StringIO()
    observer = logs.filtered(logs.json_observer(stream))
    old = logs.get_level()
    try:
        logs.set_level("warn")
        observer({"log_level": LogLevel.info, "log_format": "hidden", "log_namespace": "t"})
        observer({"log_level": LogLevel.error, "log_format": "login {user}", "user": "bob",
                  "password": "hunter2", "log_namespace": "t", "log_time": 0})
        assert logs.get_level() == "warn"
        with pytest.raises(ValueError):
            logs.set_level("loud")
        assert logs.get_level() == "warn"
    finally:
        logs.set_level(old)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "login bob" and record["level"] == "error"
    assert record["user"] == "bob" and record["password"] == "***"


def test_log_file_reopen(tmp_path):
    path = tmp_path / "p.log"
    f = logs.LogFile(str(path))
    observer = logs.text_observer(f)
    observer({"log_format": "one", "log_namespace": "t"})
    os.rename(str(path), str(tmp_path / "p.log.1"))
    logs.reopen()
    observer({"log_format": "two", "log_namespace": "t"})
    assert "one" in (tmp_path / "p.log.1").read_text()
    assert "two" in path.read_text() and "one" not in path.read_text()


# -- daemon mode ----------------------------------------------------------------------------

def test_daemon_needs_pid_file(pg, tmp_path):
    path = write_config(tmp_path, simple_config(pg, "u_scram", "scram-secret"))
    status, _, err = run(["-d", path])
    assert status == 1 and "daemon_pid_file" in err, err


def test_daemon_detaches_writes_pid_file_and_serves(pg, tmp_path):
    port = free_port()
    pid_file = tmp_path / "pgdoorman.pid"
    log_file = tmp_path / "pgdoorman.log"
    cfg = simple_config(pg, "u_scram", "scram-secret",
                        general={"port": port, "daemon_pid_file": str(pid_file)})
    path = write_config(tmp_path, cfg)
    status, out, err = run(["-d", "--log-file", str(log_file), path], timeout=30)
    assert status == 0, err
    pid = int(pid_file.read_text())
    try:
        wait_port(port)  # bound before the command returned
        os.kill(pid, 0)
        assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)

        class D:
            host, port_ = "127.0.0.1", port
        D.port = port
        r = psql(D, "u_scram", "db1", "scram-secret", "SELECT 7")
        assert r.returncode == 0 and r.stdout.strip() == "7", r.stderr
        assert "listening" in log_file.read_text()
        # A second daemon with the same pid file refuses to start.
        status, _, err = run(["-d", path])
        assert status == 1 and "already running" in err and str(pid) in err, err
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_file.exists(), message="pid file removed")


def test_daemon_port_in_use_fails_in_the_foreground(pg, tmp_path):
    pid_file = tmp_path / "pgdoorman.pid"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = simple_config(pg, "u_scram", "scram-secret",
                            general={"port": port, "daemon_pid_file": str(pid_file)})
        status, _, err = run(["-d", write_config(tmp_path, cfg)])
    assert status == 1 and str(port) in err and "in use" in err, err
    assert not pid_file.exists()


# -- systemd --------------------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield s
    s.close()


def _messages(sock, until, timeout=15):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            break
        seen.append(data)
        if until(data):
            return seen
    raise AssertionError("not received; got %r" % (seen,))


def test_notify_unit(notify_socket, monkeypatch):
    assert systemd.notify("READY=1", STATUS="x y")
    assert notify_socket.recv(100) == b"READY=1\nSTATUS=x y"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_notify_abstract_socket(monkeypatch):
    name = "pgdoorman-test-%d" % os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("RELOADING=1", systemd.monotonic_usec())
        data = s.recv(100).decode()
    assert data.startswith("RELOADING=1\nMONOTONIC_USEC=")


def test_ready_and_status_under_systemd(pg, pgdoorman, notify_socket):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    first = _messages(notify_socket, lambda m: "READY=1" in m)[-1]
    assert "MAINPID=%d" % d.proc.pid in first
    # READY=1 only once the port accepts connections
    socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
    conn = d.connect("u_scram", "db1", "scram-secret")
    conn.execute("SELECT 1")
    try:
        status = _messages(notify_socket, lambda m: "STATUS=1 clients" in m, timeout=15)[-1]
        assert "1 servers" in status and "1 pools" in status, status
    finally:
        conn.close()
    d.stop()
    _messages(notify_socket, lambda m: "STOPPING=1" in m, timeout=5)


def test_twistd_sends_ready(pg, pgdoorman, notify_socket):
    bindir = os.path.dirname(sys.executable)
    # Debian's python3-twisted calls it twistd3.
    twistd = next((p for p in (os.path.join(bindir, "twistd"), os.path.join(bindir, "twistd3"))
                   if os.path.exists(p)), "twistd")
    pgdoorman(simple_config(pg, "u_scram", "scram-secret"),
              argv=[twistd, "-n", "pgdoorman", "-c", "{config}"])
    _messages(notify_socket, lambda m: "READY=1" in m)
