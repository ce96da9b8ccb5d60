"""
Limits against hostile or broken clients: slow logins (slowloris) and client_login_timeout,
max_connections, oversized startup packets and length prefixes (which must not allocate),
and what the log says about failed logins.
"""

import socket
import ssl
import struct
import time

import pytest

from conftest import (RawClient, ServerError, md5_secret, message, simple_config,
                      startup_packet, wait_until)

SSL_REQUEST = struct.pack("!II", 8, 80877103)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def md5_doorman(pg, pgdoorman, new_user):
    def make(**general):
        name, password = new_user("md5")
        d = pgdoorman(simple_config(pg, name, md5_secret(name, password), general=general,
                                    server_password=password))
        d.user, d.password = name, password
        return d
    return make


@pytest.mark.timeout(60)
def test_slowloris_is_cut_off_by_client_login_timeout(md5_doorman):
    d = md5_doorman(client_login_timeout="1500ms")
    # Nothing at all; a startup packet dribbled a byte at a time; a TLS request never
    # followed by a handshake; a login that stops before the password.
    idle = socket.create_connection(("127.0.0.1", d.port))
    drip = socket.create_connection(("127.0.0.1", d.port))
    tls = socket.create_connection(("127.0.0.1", d.port))
    tls.sendall(SSL_REQUEST)
    half = RawClient(d.port)
    half.send(startup_packet({"user": d.user, "database": "db1"}))
    assert half.recv_msg()[0] == b"R"
    started = time.monotonic()
    packet = startup_packet({"user": d.user, "database": "db1"})
    closed = False
    for b in packet:
        try:
            drip.sendall(bytes([b]))
        except OSError:
            closed = True
            break
        drip.settimeout(0.2)
        try:
            if drip.recv(65536) == b"":
                closed = True
                break
        except socket.timeout:
            pass
        except OSError:
            closed = True
            break
    assert closed and time.monotonic() - started < 5
    fields = half.read_error_then_close(5)
    assert fields["C"] == "08P01" and "login not completed within 1.5s" in fields["M"]
    for s in (idle, tls):
        s.settimeout(5)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    # A well-behaved client is not affected.
    c = RawClient(d.port).startup(d.user, "db1", d.password)
    time.sleep(2)  # past the login timeout: logged-in clients are not cut off
    assert c.query("SELECT 1") == [("1",)]
    c.terminate()
    assert "client_login_timeout" in d.log()


def test_max_connections(pg, pgdoorman, new_user):
    name, password = new_user("md5")
    d = pgdoorman(simple_config(pg, name, md5_secret(name, password), server_password=password,
                                general={"max_connections": 3}))
    held = [RawClient(d.port).startup(name, "db1", password) for _ in range(3)]
    extra = RawClient(d.port)
    extra.send(startup_packet({"user": name, "database": "db1"}))
    fields = extra.read_error_then_close()
    assert fields["C"] == "53300" and fields["M"] == "sorry, too many clients already"
    held.pop().terminate()

    def again():
        try:
            RawClient(d.port).startup(name, "db1", password).terminate()
            return True
        except (ServerError, OSError):
            return False
    wait_until(again, message="a slot freed")
    for c in held:
        assert c.query("SELECT 1") == [("1",)]
        c.terminate()


def test_oversized_startup_and_length_prefixes(md5_doorman):
    d = md5_doorman()
    before = rss_kb(d.proc.pid)
    # Startup packet over PostgreSQL's 10000-byte limit, and a negative length.
    for length in (10001, 0x7FFFFFFF, 4):
        c = RawClient(d.port)
        c.send(struct.pack("!II", length, 196608))
        fields = c.read_error_then_close()
        assert fields["C"] == "08P01" and "invalid length of startup packet" in fields["M"]
    # A 1 GB password message announced during md5 auth.
    c = RawClient(d.port)
    c.send(startup_packet({"user": d.user, "database": "db1"}))
    assert c.recv_msg()[0] == b"R"
    c.send(b"p" + struct.pack("!I", 0x40000000) + b"x" * 70000)
    fields = c.read_error_then_close()
    assert fields["C"] == "08P01"
    # A 1 GB query announced after login, then a few bytes of it.
    c = RawClient(d.port).startup(d.user, "db1", d.password)
    c.send(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"SELECT 1")
    fields = c.read_error_then_close()
    assert fields["C"] == "08P01" and "invalid message length" in fields["M"]
    c = RawClient(d.port).startup(d.user, "db1", d.password)
    assert c.query("SELECT 1") == [("1",)]
    c.terminate()
    assert rss_kb(d.proc.pid) - before < 100 * 1024  # nothing near 1 GB was allocated


def test_tls_request_inside_tls_and_bad_ssl_lengths(md5_doorman, tmp_path):
    from tls_certs import CA
    ca = CA(tmp_path)
    cert, key = ca.issue("srv", "localhost", ips=["127.0.0.1"])
    d = md5_doorman(tls_certificate=cert, tls_private_key=key)
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(SSL_REQUEST)
    assert s.recv(1) == b"S"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = ctx.wrap_socket(s)
    t.sendall(SSL_REQUEST)  # again, inside TLS
    data = t.recv(1024)
    assert data[:1] == b"E" and b"08P01" in data
    t.close()
    # Garbage instead of a TLS handshake after 'S': closed, process fine.
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(SSL_REQUEST)
    assert s.recv(1) == b"S"
    s.sendall(b"\x00" * 64 + message(b"Q", b"SELECT 1\x00"))
    s.settimeout(5)
    try:
        while s.recv(1024):
            pass
    except OSError:
        pass
    s.close()
    assert d.alive()
    c = RawClient(d.port).startup(d.user, "db1", d.password)
    assert c.query("SELECT 1") == [("1",)]
    c.terminate()


def test_auth_failures_logged_with_peer_and_user_never_the_password(md5_doorman):
    d = md5_doorman()
    with pytest.raises(ServerError) as info:
        RawClient(d.port).startup(d.user, "db1", "Leaky-Password-123")
    assert info.value.sqlstate == "28P01"
    with pytest.raises(ServerError):
        RawClient(d.port).startup("nobody_here", "db1", "Leaky-Password-456")
    log = d.log()
    line = [x for x in log.splitlines() if "password authentication failed" in x and d.user in x]
    assert line and "127.0.0.1:" in line[0] and "wrong password" in line[0]
    assert "nobody_here" in log
    assert "Leaky-Password" not in log
