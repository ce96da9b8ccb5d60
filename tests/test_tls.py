"""
TLS on both sides: clients (psql, psycopg, raw sockets) to pgdoorman under each tls_mode, and
pgdoorman to a PostgreSQL with ssl on under each server_tls_mode, with a CA made here.
"""

import os
import pwd
import shutil
import signal
import socket
import ssl
import struct
import time

import psycopg
import pytest

from conftest import (Background, Cluster, RawClient, make_config, pool_entry, psql,
                      user_entry, wait_until)
from tls_certs import CA

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    other = CA(d, "another CA")
    return {
        "dir": str(d), "ca": ca, "other": other,
        # pgdoorman's certificate for clients, and PostgreSQL's (IP name only: see the
        # host name test).
        "doorman": ca.issue("doorman", "localhost", dns=["localhost"], ips=["127.0.0.1"]),
        "postgres": ca.issue("postgres", "pg-test", ips=["127.0.0.1"]),
        "client_tls_u": ca.issue("client_tls_u", "tls_u", client=True),
        "client_other": other.issue("client_other", "tls_u", client=True),
        "server_client": ca.issue("server_client", "cert_u", client=True),
    }


@pytest.fixture(scope="module")
def tls_pg(pki):
    """A PostgreSQL with ssl on; tls_u may log in only over TLS, cert_u only with a cert."""
    pg = Cluster()
    os.makedirs(pg.base_dir, exist_ok=True)
    files = {}
    for name, src in (("server.crt", pki["postgres"][0]), ("server.key", pki["postgres"][1]),
                      ("root.crt", pki["ca"].cert_path)):
        dst = os.path.join(pg.base_dir, name)
        shutil.copy(src, dst)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(dst, pw.pw_uid, pw.pw_gid)
        os.chmod(dst, 0o600)
        files[name] = dst
    pg.init(hba_lines=["hostssl all tls_u 127.0.0.1/32 scram-sha-256",
                       "hostnossl all tls_u 127.0.0.1/32 reject",
                       "hostssl all cert_u 127.0.0.1/32 cert",
                       "host all cert_u 127.0.0.1/32 reject"],
            settings={"ssl": "on", "ssl_cert_file": "'%s'" % files["server.crt"],
                      "ssl_key_file": "'%s'" % files["server.key"],
                      "ssl_ca_file": "'%s'" % files["root.crt"]})
    pg.start()
    pg.create_user("tls_u", "tls-secret")
    pg.create_user("cert_u", "unused-secret")
    pg.create_database("tlsdb")
    yield pg
    pg.destroy()


def tls_config(pg, pki, user="tls_u", password="tls-secret", general=None, pool=None,
               **user_kw):
    g = {"tls_certificate": pki["doorman"][0], "tls_private_key": pki["doorman"][1]}
    g.update(general or {})
    user_kw.setdefault("server_username", user)
    user_kw.setdefault("server_password", pg.passwords.get(user, password))
    return make_config({"tlsdb": pool_entry(pg, [user_entry(user, password, 2, **user_kw)],
                                            **(pool or {}))}, **g)


def ssl_in_use_query(d, password="tls-secret", **kw):
    with d.connect("tls_u", "tlsdb", password, **kw) as conn:
        return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                            ).fetchone()[0], conn.pgconn.ssl_in_use


def raw_tls(port, context=None, server_hostname=None):
    """SSLRequest by hand, then a TLS socket (or the answer byte if not 'S')."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(SSL_REQUEST)
    answer = sock.recv(1)
    if answer != b"S":
        sock.close()
        return answer
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=server_hostname)


# -- client side ----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_client_tls_require_psql_and_psycopg(tls_pg, pki, pgdoorman):
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "require",
                                                   "server_tls_mode": "require"}))
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "require"})
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    # psql verify-full: our CA, the certificate names 127.0.0.1.
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 2",
             env_extra={"PGSSLMODE": "verify-full", "PGSSLROOTCERT": pki["ca"].cert_path})
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
    # verify-full against a CA that did not sign pgdoorman's certificate fails.
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 3",
             env_extra={"PGSSLMODE": "verify-full", "PGSSLROOTCERT": pki["other"].cert_path})
    assert r.returncode != 0 and "certificate verify failed" in r.stderr
    server_ssl, client_ssl = ssl_in_use_query(d, sslmode="require")
    assert client_ssl and server_ssl
    # SHOW CLIENTS / SHOW SERVERS name the protocol and cipher, as PgBouncer's tls column.
    with d.connect("tls_u", "tlsdb", "tls-secret", sslmode="require", autocommit=False) as c:
        c.execute("SELECT 1")
        with psycopg.connect(d.dsn("admin", "pgdoorman", "admin", sslmode="require"),
                             autocommit=True) as admin:
            for what in ("CLIENTS", "SERVERS"):
                cur = admin.execute("SHOW " + what)
                col = [x.name for x in cur.description].index("tls")
                tls = [r[col] for r in cur.fetchall()]
                assert tls and all(t.startswith("TLSv1.") and "/" in t for t in tls), tls
    # A client that must use TLS and does not is refused, clearly.
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "disable"})
    assert r.returncode != 0 and "TLS required" in r.stderr, r.stderr


def test_client_tls_allow_and_disable(tls_pg, pki, pgdoorman):
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "allow",
                                                   "server_tls_mode": "require"}))
    assert ssl_in_use_query(d, sslmode="require")[1] is True
    assert ssl_in_use_query(d, sslmode="disable")[1] is False
    d2 = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "disable",
                                                    "server_tls_mode": "require"}))
    assert raw_tls(d2.port) == b"N"
    r = psql(d2, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "require"})
    assert r.returncode != 0 and "does not support SSL" in r.stderr
    assert ssl_in_use_query(d2, sslmode="prefer")[1] is False


def test_client_certificates_verify_full(tls_pg, pki, pgdoorman):
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "verify-full",
                                                   "tls_ca_cert": pki["ca"].cert_path,
                                                   "server_tls_mode": "require"}))
    cert, key = pki["client_tls_u"]
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "require", "PGSSLCERT": cert, "PGSSLKEY": key})
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    # No certificate, or one from another CA: the handshake fails.
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "require", "PGSSLCERT": "/nonexistent"})
    assert r.returncode != 0
    cert, key = pki["client_other"]
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "require", "PGSSLCERT": cert, "PGSSLKEY": key})
    assert r.returncode != 0
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1", env_extra={"PGSSLMODE": "disable"})
    assert r.returncode != 0 and "TLS required" in r.stderr
    assert d.alive()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_minimum_version_and_raw_protocol(tls_pg, pki, pgdoorman):
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "allow",
                                                   "server_tls_mode": "require"}))
    # TLS 1.1 is refused (the client side is told to allow it, so the server decides).
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        raw_tls(d.port, old).do_handshake()
    tls = raw_tls(d.port)
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    tls.close()
    # GSSENCRequest: 'N', then TLS and a normal login on the same connection.
    c = RawClient(d.port)
    c.send(GSSENC_REQUEST)
    assert c.recv_byte() == b"N"
    c.send(SSL_REQUEST)
    assert c.recv_byte() == b"S"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock)
    c.startup("tls_u", "tlsdb", "tls-secret")
    assert c.query("SELECT 7") == [("7",)]
    c.terminate()
    # Plaintext bytes behind an SSLRequest are refused, not read as the startup packet.
    from conftest import startup_packet
    c = RawClient(d.port)
    c.send(SSL_REQUEST + startup_packet({"user": "tls_u", "database": "tlsdb"}))
    fields = c.read_error_then_close()
    assert fields["C"] == "08P01" and "unencrypted data" in fields["M"]
    assert d.alive()


@pytest.mark.timeout(60)
def test_cancel_over_tls(tls_pg, pki, pgdoorman):
    import psycopg
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_mode": "require",
                                                   "server_tls_mode": "require"}))
    with d.connect("tls_u", "tlsdb", "tls-secret", sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        slow = Background(conn.execute, "SELECT pg_sleep(20)")
        time.sleep(1.0)
        conn.cancel()
        err = slow.error(15)
        assert isinstance(err, psycopg.errors.QueryCanceled)
        assert slow.elapsed < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # A raw CancelRequest inside TLS, with the key the client got, reaches its server too.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = RawClient(d.port)
    c.send(SSL_REQUEST)
    assert c.recv_byte() == b"S"
    c.sock = ctx.wrap_socket(c.sock)
    c.startup("tls_u", "tlsdb", "tls-secret")
    pid, key = c.backend_key
    c.send(b"Q" + struct.pack("!I", 4 + len("SELECT pg_sleep(20)") + 1)
           + b"SELECT pg_sleep(20)\x00")
    time.sleep(0.5)
    s = raw_tls(d.port, ctx)
    s.sendall(struct.pack("!IIII", 16, 80877102, pid, key))
    s.close()
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        _drain_until_ready(c)
    assert "57014" in str(info.value)
    assert time.monotonic() - started < 10
    c.terminate()


def _drain_until_ready(c):
    from conftest import ServerError, parse_fields
    error = None
    while True:
        kind, payload = c.recv_msg()
        if kind == b"E":
            error = ServerError(parse_fields(payload))
        elif kind == b"Z":
            if error:
                raise error
            return


def test_certificates_reloaded_on_sighup(tls_pg, pki, pgdoorman, tmp_path):
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(pki["doorman"][0], cert)
    shutil.copy(pki["doorman"][1], key)
    cfg = tls_config(tls_pg, pki, general={"tls_mode": "require", "server_tls_mode": "require",
                                           "tls_certificate": cert, "tls_private_key": key})
    d = pgdoorman(cfg)

    def served():
        s = raw_tls(d.port)
        der = s.getpeercert(binary_form=True)
        s.close()
        return der

    first = served()
    new_cert, new_key = pki["ca"].issue("rotated", "rotated", ips=["127.0.0.1"])
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    assert served() == first  # files are re-read on reload, not behind our back
    with d.connect("tls_u", "tlsdb", "tls-secret", sslmode="require") as kept:
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served() != first, message="new certificate served")
        assert kept.execute("SELECT 1").fetchone() == (1,)  # old connection carries on
    r = psql(d, "tls_u", "tlsdb", "tls-secret", "SELECT 1",
             env_extra={"PGSSLMODE": "verify-full", "PGSSLROOTCERT": pki["ca"].cert_path})
    assert r.returncode == 0, r.stderr


# -- server side ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full", "prefer"])
def test_server_tls_modes(tls_pg, pki, pgdoorman, mode):
    d = pgdoorman(tls_config(tls_pg, pki, general={"server_tls_mode": mode,
                                                   "server_tls_ca_cert": pki["ca"].cert_path}))
    assert ssl_in_use_query(d, sslmode="disable") == (True, False)


@pytest.mark.parametrize("mode", ["disable", "allow"])
def test_server_tls_off_modes_meet_hostssl_rules(tls_pg, pki, pgdoorman, mode):
    import psycopg
    d = pgdoorman(tls_config(tls_pg, pki, general={"server_tls_mode": mode}))
    if mode == "allow":
        # As libpq's sslmode=allow: the plaintext login gets 28000 from the hostnossl reject
        # rule, so pgdoorman logs in again over TLS.
        assert ssl_in_use_query(d, sslmode="disable") == (True, False)
        with d.connect("tls_u", "tlsdb", "tls-secret", sslmode="disable") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert d.alive()
        return
    with pytest.raises(psycopg.OperationalError) as info:
        d.connect("tls_u", "tlsdb", "tls-secret", sslmode="disable")
    assert "no encryption" in str(info.value) or "rejects" in str(info.value)


def test_server_tls_allow_retries_once(tls_pg, pki, pgdoorman):
    import psycopg
    # One retry only: the plaintext 28000 leads to a TLS login, whose 28P01 (a wrong server
    # password) is reported as it is.
    d = pgdoorman(tls_config(tls_pg, pki, general={"server_tls_mode": "allow"},
                             server_password="wrong"))
    with pytest.raises(psycopg.OperationalError) as info:
        d.connect("tls_u", "tlsdb", "tls-secret", sslmode="disable")
    assert "password authentication failed" in str(info.value)
    assert d.alive()


class _FirstBytesProxy:
    """A TCP relay in front of PostgreSQL that records each connection's first 8 bytes."""

    def __init__(self, port):
        import threading
        self.target = port
        self.first = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            head = b""
            while len(head) < 8:
                chunk = a.recv(8 - len(head))
                if not chunk:
                    break
                head += chunk
            self.first.append(head)
            b.sendall(head)
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["require", "allow"])
def test_cancel_to_tls_server_goes_over_tls(tls_pg, pki, pgdoorman, mode):
    """The CancelRequest to a TLS server connection starts with an SSLRequest too."""
    import psycopg
    proxy = _FirstBytesProxy(tls_pg.port)
    try:
        d = pgdoorman(tls_config(tls_pg, pki, general={"server_tls_mode": mode},
                                 pool={"server_port": proxy.port}))
        with d.connect("tls_u", "tlsdb", "tls-secret", sslmode="disable") as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                ).fetchone() == (True,)
            seen = len(proxy.first)
            slow = Background(conn.execute, "SELECT pg_sleep(20)")
            time.sleep(1.0)
            conn.cancel()
            err = slow.error(15)
            assert isinstance(err, psycopg.errors.QueryCanceled)
            assert slow.elapsed < 10
            assert conn.execute("SELECT 1").fetchone() == (1,)
        later = proxy.first[seen:]
        # No plaintext CancelRequest reached PostgreSQL; the cancel connection asked for TLS
        # (new pool connections in allow mode start with a plaintext startup packet instead).
        assert struct.pack("!II", 16, 80877102) not in later, later
        assert SSL_REQUEST in later, later
    finally:
        proxy.close()


def test_server_tls_verification_failures(tls_pg, pki, pgdoorman):
    import psycopg
    # A CA that did not sign PostgreSQL's certificate.
    d = pgdoorman(tls_config(tls_pg, pki, general={
        "server_tls_mode": "verify-ca", "server_tls_ca_cert": pki["other"].cert_path}))
    with pytest.raises(psycopg.OperationalError):
        d.connect("tls_u", "tlsdb", "tls-secret")
    # The right CA but a host name the certificate does not carry (it names 127.0.0.1 only):
    # verify-ca is content, verify-full is not.
    for mode, ok in (("verify-ca", True), ("verify-full", False)):
        cfg = tls_config(tls_pg, pki, general={"server_tls_mode": mode,
                                               "server_tls_ca_cert": pki["ca"].cert_path},
                         pool={"server_host": "localhost"})
        d = pgdoorman(cfg)
        if ok:
            assert ssl_in_use_query(d)[0] is True
        else:
            with pytest.raises(psycopg.OperationalError):
                d.connect("tls_u", "tlsdb", "tls-secret")
        assert d.alive()


def test_server_tls_pool_override_and_plain_server(tls_pg, pg, pki, pgdoorman):
    import psycopg
    # The session cluster has no TLS: prefer falls back, require refuses with a reason.
    name, password = pg.new_user()
    cfg = make_config({"db1": pool_entry(pg, [user_entry(name, password, 2,
                                                         server_username=name,
                                                         server_password=password)])},
                      server_tls_mode="prefer")
    d = pgdoorman(cfg)
    with d.connect(name, "db1", password) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cfg["pools"]["db1"]["server_tls_mode"] = "require"  # pool overrides general
    d = pgdoorman(cfg)
    with pytest.raises(psycopg.OperationalError) as info:
        d.connect(name, "db1", password)
    assert "does not support TLS" in str(info.value)


def test_server_mutual_tls_client_certificate(tls_pg, pki, pgdoorman):
    import psycopg
    cert, key = pki["server_client"]
    cfg = tls_config(tls_pg, pki, user="cert_u", password="doorman-side-secret",
                     server_password="unused-secret",
                     general={"server_tls_mode": "verify-full",
                              "server_tls_ca_cert": pki["ca"].cert_path,
                              "server_tls_certificate": cert, "server_tls_private_key": key})
    d = pgdoorman(cfg)
    with d.connect("cert_u", "tlsdb", "doorman-side-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("cert_u",)
    del cfg["general"]["server_tls_certificate"], cfg["general"]["server_tls_private_key"]
    d = pgdoorman(cfg)
    with pytest.raises(psycopg.OperationalError):
        d.connect("cert_u", "tlsdb", "doorman-side-secret")


# -- tls_rate_limit_per_second -------------------------------------------------------------

def test_handshake_limiter_budget():
    from pgdoorman.tlslimit import HandshakeLimiter
    now = [100.0]
    lim = HandshakeLimiter(clock=lambda: now[0])
    assert lim.delay(0) == 0.0
    # 500/s: a burst of 5 at once, then one every 2 ms.
    waits = [lim.delay(500) for _ in range(10)]
    assert waits[:5] == [0.0] * 5
    assert waits[5:] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.010])
    now[0] += 1.0  # a quiet second restores the burst
    assert [lim.delay(500) for _ in range(5)] == [0.0] * 5


def test_tls_rate_limit_spreads_handshakes(tls_pg, pki, pgdoorman):
    """
    30 SSLRequests at once with tls_rate_limit_per_second 100: the 'S' answers (and the
    handshakes) come one per 10 ms instead of all at once, nobody is refused, and a real TLS
    login still works.
    """
    d = pgdoorman(tls_config(tls_pg, pki, general={"tls_rate_limit_per_second": 100}))
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        socks.append(s)
    started = time.monotonic()
    for s in socks:
        s.sendall(SSL_REQUEST)
    answered = []
    for s in socks:
        assert s.recv(1) == b"S"
        answered.append(time.monotonic() - started)
        s.close()
    assert max(answered) >= 0.2, answered  # 30 at 100/s: the last one after ~0.29 s
    server_ssl, client_ssl = ssl_in_use_query(d, sslmode="require")
    assert client_ssl and server_ssl


def test_tls_rate_limit_must_be_a_multiple_of_100(tls_pg, pki, tmp_path):
    from conftest import run_check, write_config
    path = write_config(tmp_path, tls_config(tls_pg, pki, general={
        "tls_rate_limit_per_second": 150}))
    status, out = run_check(path)
    assert status == 1 and "tls_rate_limit_per_second" in out and "multiple of 100" in out
