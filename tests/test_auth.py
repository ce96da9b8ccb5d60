"""
Tests for pgdoorman.auth: md5 and SCRAM math alone, then against a real PostgreSQL 15.

The PostgreSQL tests speak just the startup and authentication part of the wire protocol over a
raw socket, so that they check our math against the server's and nothing else of pgdoorman.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import sys

import pytest

from pgdoorman.auth.md5 import md5_hash, md5_response, md5_verify
from pgdoorman.auth.scram import (
    MECHANISM, AuthFailed, ScramClient, ScramError, ScramSecret, ScramServer, make_scram_secret,
    parse_scram_secret, saslprep, secret_from_password,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
from pgcluster import PG_BIN, PgCluster  # noqa: E402


def exchange(client, server):
    """Run a whole SCRAM exchange between our own client and server."""
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.handle_server_final(server_final)


# -- md5 -------------------------------------------------------------------------------------

def test_md5_hash_matches_postgresql():
    assert md5_hash("pw1", "u_md5") == "md5f769c4b7f10ae4b9b27842b2135998d6"


def test_md5_response_from_plaintext_and_from_hash():
    salt = b"\x01\x02\x03\x04"
    from_plain = md5_response("pw1", "u_md5", salt)
    assert from_plain == md5_response(md5_hash("pw1", "u_md5"), "u_md5", salt)
    assert from_plain.startswith(b"md5") and len(from_plain) == 35
    assert not from_plain.endswith(b"\0")


def test_md5_verify():
    salt = os.urandom(4)
    stored = md5_hash("secret", "alice")
    good = md5_response("secret", "alice", salt)
    assert md5_verify(stored, "alice", salt, good)
    assert md5_verify(stored, "alice", salt, good + b"\0")
    assert md5_verify("secret", "alice", salt, good)
    assert not md5_verify(stored, "alice", salt, md5_response("wrong", "alice", salt))
    assert not md5_verify(stored, "alice", b"\0\0\0\0", good)
    assert not md5_verify("secret", "bob", salt, good)
    assert not md5_verify(stored, "alice", salt, b"")


# -- SCRAM, our client against our server ----------------------------------------------------

def test_scram_right_password():
    server = ScramServer(make_scram_secret("pencil"))
    client = ScramClient("pencil")
    exchange(client, server)
    assert client.finished
    assert len(server.client_key) == 32


def test_scram_plaintext_server_secret():
    exchange(ScramClient("pencil"), ScramServer("pencil"))


def test_scram_server_login_keys_derived_once(monkeypatch):
    """
    A pool opening server connections with a password pays PBKDF2 once per salt, not per
    connection; a changed password or salt is derived anew, and a wrong one still fails.
    """
    import hashlib

    from pgdoorman.auth import scram as _scram
    calls = []
    real = hashlib.pbkdf2_hmac

    def counting(*args):
        calls.append(args[2])
        return real(*args)
    monkeypatch.setattr(_scram.hashlib, "pbkdf2_hmac", counting)
    monkeypatch.setattr(_scram, "_server_keys", {})
    stored = make_scram_secret("pencil")
    calls.clear()
    for _ in range(3):
        exchange(ScramClient("pencil"), ScramServer(stored))
    assert len(calls) == 1
    exchange(ScramClient("pencil"), ScramServer(make_scram_secret("pencil")))  # another salt
    assert len(calls) == 3  # make_scram_secret's own + the new salt's
    server = ScramServer(stored, user="alice")
    client = ScramClient("pen")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed):
        server.handle_client_final(client.handle_server_first(server_first))


def test_scram_secret_cache_is_a_bounded_lru(monkeypatch):
    """
    login.scram_secret keeps derived secrets (PBKDF2 once per password), but auth_query
    brings one per looked-up user: the cache keeps the most recently used and no more.
    """
    from collections import OrderedDict

    from pgdoorman import login
    monkeypatch.setattr(login, "_scram_secrets", OrderedDict())
    bound = login.SCRAM_SECRET_CACHE_SIZE
    assert 1000 <= bound <= 10000
    # A salt per user, one key pair for all: parsing is cheap, PBKDF2 for thousands is not.
    base = make_scram_secret("pencil", salt=b"0123456789abcdef", iterations=1)
    keys = base.split("$", 2)[2]

    def secret_for(i):
        salt = base64.b64encode(b"user-%08d" % i).decode()
        return "SCRAM-SHA-256$4096:%s$%s" % (salt, keys)

    first = login.scram_secret(secret_for(0))
    assert first.salt == b"user-00000000" and first.iterations == 4096
    for i in range(1, bound + 500):
        login.scram_secret(secret_for(i))
        if i % 100 == 0:
            # The first user logs in now and then: used recently, it stays.
            assert login.scram_secret(secret_for(0)) is first
    assert len(login._scram_secrets) == bound
    assert secret_for(0) in login._scram_secrets
    assert secret_for(1) not in login._scram_secrets  # the least recently used went
    assert secret_for(bound + 499) in login._scram_secrets
    # An evicted secret is derived again, equal to what it was.
    again = login.scram_secret(secret_for(1))
    assert again.salt == b"user-00000001" and len(login._scram_secrets) == bound


def test_scram_wrong_password():
    server = ScramServer(make_scram_secret("pencil"), user="alice")
    client = ScramClient("pen")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed) as failed:
        server.handle_client_final(client.handle_server_first(server_first))
    assert str(failed.value) == 'password authentication failed for user "alice"'
    assert failed.value.sqlstate == "28P01"
    assert server.client_key is None


def test_scram_md5_hash_cannot_verify():
    stored = md5_hash("pencil", "alice")
    server = ScramServer(stored, user="alice")
    client = ScramClient(stored)
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed):
        server.handle_client_final(client.handle_server_first(server_first))


def test_scram_client_key_passthrough():
    """The ClientKey a pooler recovers logs in to another server holding the same secret."""
    secret = parse_scram_secret(make_scram_secret("pencil"))
    front = ScramServer(secret)
    exchange(ScramClient("pencil"), front)

    exchange(ScramClient(client_key=front.client_key, server_key=secret.server_key),
             ScramServer(secret))
    exchange(ScramClient(client_key=front.client_key), ScramServer(str(secret)))

    # A different secret for the same password (another salt) needs the password again.
    other = ScramServer(make_scram_secret("pencil"))
    client = ScramClient(client_key=front.client_key)
    server_first = other.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed):
        other.handle_client_final(client.handle_server_first(server_first))


def test_scram_client_rejects_forged_server_signature():
    secret = secret_from_password("pencil")
    client = ScramClient("pencil")
    server = ScramServer(secret)
    server_first = server.handle_client_first(client.client_first())
    server.handle_client_final(client.handle_server_first(server_first))
    with pytest.raises(ScramError):
        client.handle_server_final(b"v=" + base64.b64encode(b"\0" * 32))


def test_scram_client_reports_server_error():
    client = ScramClient("pencil")
    server_first = ScramServer("pencil").handle_client_first(client.client_first())
    client.handle_server_first(server_first)
    with pytest.raises(ScramError, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")


def test_scram_client_rejects_bad_server_first():
    client = ScramClient("pencil", nonce=b"abc")
    client.client_first()
    with pytest.raises(ScramError, match="nonce"):
        client.handle_server_first(b"r=xyzdef,s=QUJD,i=4096")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=abcdef,s=QUJD,i=0")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=abcdef,s=QUJD")


def client_final_by_hand(password, header, client_first_bare, server_first):
    """A client-final-message for any gs2 header (ScramClient only ever sends n,,)."""
    fields = dict(f.split(b"=", 1) for f in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(fields[b"s"]),
                                 int(fields[b"i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = b"c=" + base64.b64encode(header) + b",r=" + fields[b"r"]
    auth_message = b",".join([client_first_bare, server_first, without_proof])
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return without_proof + b",p=" + base64.b64encode(proof)


def test_scram_server_gs2_headers():
    for header in (b"y,,", b"n,,"):
        server = ScramServer("pencil")
        bare = b"n=ignored,r=cnonce"
        server_first = server.handle_client_first(header + bare)
        server.handle_client_final(client_final_by_hand("pencil", header, bare, server_first))
        assert server.client_key
    server = ScramServer("pencil")
    server_first = server.handle_client_first(b"y,," + bare)
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(client_final_by_hand("pencil", b"n,,", bare, server_first))
    with pytest.raises(ScramError, match="channel binding is not supported"):
        ScramServer("pencil").handle_client_first(b"p=tls-server-end-point,,n=,r=abc")
    with pytest.raises(ScramError, match="authorization identity"):
        ScramServer("pencil").handle_client_first(b"n,a=bob,n=,r=abc")


def test_scram_server_rejects_malformed_final():
    server = ScramServer("pencil", nonce=b"snonce")
    server.handle_client_first(b"n,,n=,r=cnonce")
    proof = base64.b64encode(b"\0" * 32)
    with pytest.raises(ScramError, match="Nonce"):
        server.handle_client_final(b"c=biws,r=cnonceXXX,p=" + proof)
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(b"c=eSws,r=cnoncesnonce,p=" + proof)
    with pytest.raises(ScramError, match="proof"):
        server.handle_client_final(b"c=biws,r=cnoncesnonce")
    with pytest.raises(AuthFailed):
        server.handle_client_final(b"c=biws,r=cnoncesnonce,p=" + proof)


def test_rfc7677_vector():
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    client_final = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    server_final = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

    server = ScramServer(secret_from_password("pencil", salt, 4096),
                         nonce=b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    client = ScramClient("pencil", nonce=b"rOprNGfwEbeRWgbNEkqO", user="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = server.handle_client_first(client.client_first())
    assert server_first == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert client.handle_server_first(server_first) == client_final
    assert server.handle_client_final(client_final) == server_final
    client.handle_server_final(server_final)


def test_parse_scram_secret_roundtrip():
    text = make_scram_secret("pencil", salt=b"0123456789abcdef", iterations=4096)
    assert text.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    secret = parse_scram_secret(text)
    assert isinstance(secret, ScramSecret)
    assert secret == secret_from_password("pencil", b"0123456789abcdef")
    assert str(secret) == text
    for garbage in ("", "md5f769c4b7f10ae4b9b27842b2135998d6", text.replace("4096", "x"),
                    text.replace("SCRAM-SHA-256", "SCRAM-SHA-1"), text[:-8], text + "$",
                    "SCRAM-SHA-256$0:QUJD$" + text.split("$", 2)[2]):
        with pytest.raises(ValueError):
            parse_scram_secret(garbage)
    with pytest.raises(ValueError):
        ScramServer("SCRAM-SHA-256$typo")


def test_saslprep():
    assert saslprep("pencil") == "pencil"
    assert saslprep("I\u00adX") == "IX"            # mapped to nothing
    assert saslprep("\u2168") == "IX"              # NFKC
    assert saslprep("a\u00a0b") == "a b"           # non-ASCII space
    assert saslprep("a\u0007\u00e9") == "a\u0007\u00e9"  # prohibited: used raw, like PostgreSQL


# -- against a real PostgreSQL ---------------------------------------------------------------

PROTOCOL_3 = 196608
AUTH_OK, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 5, 10, 11, 12


class LoginRefused(Exception):
    def __init__(self, fields):
        super().__init__(fields.get("M"))
        self.sqlstate = fields.get("C")


class RawConnection:
    """Just enough of the frontend side of the wire protocol to authenticate."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)

    def close(self):
        self.sock.close()

    def send(self, type_code, payload):
        self.sock.sendall(type_code + struct.pack("!i", len(payload) + 4) + payload)

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    def recv(self):
        type_code, length = struct.unpack("!ci", self.recv_exact(5))
        payload = self.recv_exact(length - 4)
        if type_code == b"E":
            fields = {}
            for field in payload.split(b"\0"):
                if field:
                    fields[field[:1].decode()] = field[1:].decode()
            raise LoginRefused(fields)
        return type_code, payload

    def recv_auth(self):
        type_code, payload = self.recv()
        assert type_code == b"R", type_code
        return struct.unpack("!i", payload[:4])[0], payload[4:]

    def login(self, user, secret=None, scram_client=None):
        """
        Authenticate as C{user} and wait for ReadyForQuery.

        @param secret: for md5: the plaintext password or the stored md5 hash.
        @param scram_client: for SCRAM: the L{ScramClient} to use (made from C{secret} if None).
        @return: the authentication method the server asked for.
        """
        params = b"user\0%s\0database\0postgres\0\0" % user.encode()
        self.sock.sendall(struct.pack("!ii", len(params) + 8, PROTOCOL_3) + params)
        code, data = self.recv_auth()
        method = code
        if code == AUTH_MD5:
            self.send(b"p", md5_response(secret, user, data) + b"\0")
            code, data = self.recv_auth()
        elif code == AUTH_SASL:
            assert MECHANISM.encode() in data.split(b"\0")
            client = scram_client or ScramClient(secret)
            first = client.client_first()
            self.send(b"p", MECHANISM.encode() + b"\0" + struct.pack("!i", len(first)) + first)
            code, data = self.recv_auth()
            assert code == AUTH_SASL_CONTINUE
            self.send(b"p", client.handle_server_first(data))
            code, data = self.recv_auth()
            assert code == AUTH_SASL_FINAL
            client.handle_server_final(data)
            assert client.finished
            code, data = self.recv_auth()
        assert code == AUTH_OK
        while self.recv()[0] != b"Z":
            pass
        self.send(b"X", b"")
        return method


@pytest.fixture(scope="module")
def cluster():
    if not os.path.exists(os.path.join(PG_BIN, "initdb")):
        pytest.skip("no PostgreSQL 15 at %s" % PG_BIN)
    c = PgCluster().init(hba_lines=["host all u_md5 127.0.0.1/32 md5"]).start()
    try:
        c.create_user("u_scram", "pw_scram")
        c.create_user("u_md5", "pw1", "md5")
        c.create_user("u_unicode", "p\u00e4ss\u2168")
        yield c
    finally:
        c.destroy()


def login(cluster, user, secret=None, scram_client=None):
    conn = RawConnection(cluster.host, cluster.port)
    try:
        return conn.login(user, secret, scram_client)
    finally:
        conn.close()


def test_pg_scram_login(cluster):
    assert login(cluster, "u_scram", "pw_scram") == AUTH_SASL
    assert login(cluster, "u_unicode", "p\u00e4ss\u2168") == AUTH_SASL


def test_pg_stored_secret_verifies_like_postgresql(cluster):
    """Our ScramServer, fed PostgreSQL's stored secret, accepts the password PostgreSQL does."""
    stored = cluster.password_hash("u_scram")
    assert stored.startswith("SCRAM-SHA-256$")
    exchange(ScramClient("pw_scram"), ScramServer(stored))
    assert parse_scram_secret(stored) == secret_from_password(
        "pw_scram", parse_scram_secret(stored).salt, parse_scram_secret(stored).iterations)


def test_pg_scram_login_with_recovered_client_key(cluster):
    """The PgDoorman passthrough: ClientKey from a client's proof logs in to PostgreSQL."""
    secret = parse_scram_secret(cluster.password_hash("u_scram"))
    front = ScramServer(secret)
    exchange(ScramClient("pw_scram"), front)
    client = ScramClient(client_key=front.client_key, server_key=secret.server_key)
    assert login(cluster, "u_scram", scram_client=client) == AUTH_SASL


def test_pg_md5_login(cluster):
    assert cluster.password_hash("u_md5") == md5_hash("pw1", "u_md5")
    assert login(cluster, "u_md5", "pw1") == AUTH_MD5
    assert login(cluster, "u_md5", cluster.password_hash("u_md5")) == AUTH_MD5


def test_pg_wrong_password(cluster):
    for user in ("u_scram", "u_md5"):
        with pytest.raises(LoginRefused) as refused:
            login(cluster, user, "wrong")
        assert refused.value.sqlstate == "28P01"
        assert str(refused.value) == 'password authentication failed for user "%s"' % user
