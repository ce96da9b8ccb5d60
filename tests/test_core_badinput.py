"""
Bad input on the client port (issue 7, point 8): garbage bytes, a length of 2^31, an unknown
protocol version, a startup packet for an unknown database or user get a PostgreSQL-style
ErrorResponse and a closed connection, are logged (once, not a flood), and cost other clients
nothing.
"""

import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import (PROTOCOL_3, SSL_REQUEST, Background, ConnectionClosed, RawClient,
                      ServerError, message, parse_fields, psql, simple_config, startup_packet)
from hostile import SYNC, bind, execute, parse
from hostile import query as hquery

USER, PW = "u_scram", "scram-secret"


@pytest.fixture(scope="module")
def d(pg, module_pgdoorman):
    return module_pgdoorman(simple_config(pg, USER, PW, pool_size=2))


@pytest.fixture
def bystander(d):
    """A client logged in before the bad input, in the middle of a transaction."""
    conn = d.connect(USER, "db1", PW, autocommit=False)
    conn.execute("SELECT 1")
    yield conn
    # Still fine after the bad input, and pgdoorman serves newcomers.
    assert conn.execute("SELECT 'bystander ok'").fetchone() == ("bystander ok",)
    conn.commit()
    conn.close()
    with d.connect(USER, "db1", PW) as fresh:
        assert fresh.execute("SELECT 'newcomer ok'").fetchone() == ("newcomer ok",)
    assert d.alive()


def log_lines(d):
    return len(d.log().splitlines())


def expect_error_and_close(raw, states):
    fields = raw.read_error_then_close(5)
    assert fields.get("S") in ("FATAL", "ERROR"), fields
    assert fields.get("C") in states, fields
    assert fields.get("M"), fields
    return fields


def test_garbage_bytes(d, bystander):
    before = log_lines(d)
    raw = RawClient(d.port)
    raw.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    expect_error_and_close(raw, {"08P01"})
    time.sleep(0.2)
    grew = log_lines(d) - before
    assert 1 <= grew <= 5, d.log()[-2000:]


def test_length_of_2_to_the_31(d, bystander):
    raw = RawClient(d.port)
    t0 = time.monotonic()
    raw.send(struct.pack("!II", 2 ** 31, PROTOCOL_3) + b"user\x00x\x00\x00")
    expect_error_and_close(raw, {"08P01"})
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("length", [0, 3, 7, 0xFFFFFFFF])
def test_impossible_startup_lengths(d, bystander, length):
    raw = RawClient(d.port)
    raw.send(struct.pack("!II", length, PROTOCOL_3))
    expect_error_and_close(raw, {"08P01"})


def test_unknown_protocol_version(d, bystander):
    raw = RawClient(d.port)
    raw.send(startup_packet({"user": USER, "database": "db1"}, version=(9 << 16) | 9))
    expect_error_and_close(raw, {"0A000", "08P01"})


def test_protocol_version_2(d, bystander):
    raw = RawClient(d.port)
    raw.send(startup_packet({"user": USER, "database": "db1"}, version=2 << 16))
    expect_error_and_close(raw, {"0A000", "08P01"})


def test_startup_without_user(d, bystander):
    raw = RawClient(d.port)
    raw.send(startup_packet({"database": "db1"}))
    expect_error_and_close(raw, {"08P01", "28000"})


def test_unknown_database(d, bystander):
    raw = RawClient(d.port)
    with pytest.raises(ServerError) as e:
        raw.startup(USER, "no_such_db", PW)
    assert e.value.sqlstate == "3D000", e.value.fields
    assert e.value.fields["S"] == "FATAL"
    assert "no_such_db" in e.value.message
    assert raw.closed_within(5)
    out = psql(d, USER, "no_such_db", PW, "SELECT 1")
    assert out.returncode == 2
    assert 'database "no_such_db" does not exist' in out.stderr, out.stderr


def test_unknown_user(d, bystander):
    raw = RawClient(d.port)
    with pytest.raises(ServerError) as e:
        raw.startup("no_such_user", "db1", "pw")
    assert e.value.sqlstate in ("28P01", "28000"), e.value.fields
    assert e.value.fields["S"] == "FATAL"
    assert raw.closed_within(5)


def test_ssl_request_is_declined_then_startup_works(d):
    raw = RawClient(d.port)
    raw.send(struct.pack("!II", 8, SSL_REQUEST))
    assert raw.recv_byte() == b"N"
    raw.startup(USER, "db1", PW)
    assert raw.query("SELECT 'plain after N'") == [("plain after N",)]
    raw.terminate()


def test_half_a_startup_packet_then_close(d, bystander):
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(struct.pack("!I", 100) + b"\x00\x03")
        s.close()


def test_huge_message_after_login(d, bystander):
    raw = RawClient(d.port).startup(USER, "db1", PW)
    t0 = time.monotonic()
    raw.send(b"Q" + struct.pack("!I", 2 ** 31) + b"SELECT 1")
    try:
        fields = raw.read_error_then_close(5)
        assert fields.get("C") == "08P01", fields
    except (ConnectionClosed, ConnectionResetError):
        pass  # closed without a word is acceptable mid-session
    assert time.monotonic() - t0 < 5


def test_unknown_message_type_after_login(d, bystander):
    raw = RawClient(d.port).startup(USER, "db1", PW)
    raw.send(message(b"\x01", b"junk"))
    fields = raw.read_error_then_close(5)
    assert fields.get("C") == "08P01", fields


@pytest.mark.timeout(120)
def test_burst_of_bad_connections_while_clients_work(d, bystander):
    stop = threading.Event()
    errors = []

    def good_client():
        try:
            with d.connect(USER, "db1", PW) as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    assert conn.execute("SELECT %s::int", [n]).fetchone() == (n,)
        except Exception as e:
            errors.append(e)

    def bad_client(i):
        try:
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            s.sendall([b"\xff" * 64, struct.pack("!II", 2 ** 31, PROTOCOL_3),
                       startup_packet({"user": "x"}, version=1234)][i % 3])
            s.settimeout(5)
            while s.recv(4096):
                pass
            s.close()
        except socket.timeout:
            errors.append(AssertionError("bad connection %d not closed" % i))
        except OSError:
            pass

    good = [threading.Thread(target=good_client, daemon=True) for _ in range(2)]
    for t in good:
        t.start()
    bad = [Background(bad_client, i) for i in range(60)]
    for b in bad:
        b.result(20)
    stop.set()
    for t in good:
        t.join(10)
    assert errors == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=300))
def test_fuzz_startup(d, data):
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # no more is coming: pgdoorman must give up on us
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    break
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            pytest.fail("connection not closed after %r" % data)
    finally:
        s.close()
    assert d.alive()
    with socket.create_connection(("127.0.0.1", d.port), timeout=5):
        pass


def test_still_serving_after_fuzz(d):
    with d.connect(USER, "db1", PW) as conn:
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)
    assert d.alive()


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_messages_split_into_single_bytes(d, mode):
    """
    A client (or a network) that delivers messages a byte at a time: headers cut before their
    length, bodies cut anywhere.  Answers must be the same, and nothing is logged as an error.
    """
    before = d.log()
    raw = RawClient(d.port).startup(USER, "db1", PW)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "simple":
        data = message(b"Q", b"SELECT 40 + 2\x00")
    else:
        data = (message(b"P", b"s1\x00SELECT $1::int * 2\x00\x00\x00")
                + message(b"B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0221\x00\x00")
                + message(b"E", b"\x00\x00\x00\x00\x00") + message(b"S"))
    for _ in range(3):
        for i in range(len(data)):
            raw.send(data[i:i + 1])
            time.sleep(0.001)
        kinds, rows = [], []
        while True:
            kind, payload = raw.recv_msg()
            kinds.append(kind)
            if kind == b"D":
                rows.append(payload[6:])
            if kind == b"Z":
                break
        assert rows == [b"42"], kinds
        if mode == "extended":
            data = data[data.index(b"B"):]  # s1 exists now: Bind/Execute/Sync only
    raw.terminate()
    after = d.log()[len(before):]
    assert "Traceback" not in after and "Unhandled" not in after, after


def _transcript(raw, readies):
    """The replies up to the C{readies}-th ReadyForQuery, as (kind, detail) pairs."""
    out = []
    while readies:
        kind, payload = raw.recv_msg()
        if kind == b"E":
            fields = parse_fields(payload)
            out.append(("E", fields.get("S"), fields.get("C"), fields.get("M")))
        elif kind == b"Z":
            out.append(("Z", payload.decode()))
            readies -= 1
        elif kind in (b"N", b"S"):
            continue  # notices and ParameterStatus are not what this compares
        else:
            out.append((kind.decode(),))
    return out


FLUSH_WITH_BODY = message(b"H", b"junk")


@pytest.mark.parametrize("sequence, readies", [
    # Parse/Bind, the bad Flush, Execute (skipped), Sync; then a Query on the same session.
    (parse("", "SELECT 1") + bind("") + FLUSH_WITH_BODY + execute() + SYNC
     + hquery("SELECT 2"), 2),
    # Inside a transaction block: the error aborts it, as any ERROR does.
    (hquery("BEGIN") + FLUSH_WITH_BODY + SYNC + hquery("SELECT 1") + hquery("ROLLBACK")
     + hquery("SELECT 3"), 5),
    # Alone, with no server yet (transaction mode): the same error, the Sync's 'I'.
    (FLUSH_WITH_BODY + SYNC + hquery("SELECT 4"), 2),
], ids=["pipeline", "transaction", "alone"])
def test_flush_with_a_body_is_answered_as_postgresql_does(d, pg, bystander, sequence, readies):
    """
    A Flush with bytes in it is PostgreSQL's ERROR 08P01 "invalid message format" (its
    pq_getmsgend), then a skip to Sync, and the session carries on: the same transcript
    through pgdoorman as from PostgreSQL itself, and the bystander is untouched.
    """
    direct = RawClient(pg.port).startup(USER, "db1", pg.passwords.get(USER, PW))
    direct.send(sequence)
    want = _transcript(direct, readies)
    direct.terminate()
    assert ("E", "ERROR", "08P01", "invalid message format") in want, want
    raw = RawClient(d.port).startup(USER, "db1", PW)
    raw.send(sequence)
    assert _transcript(raw, readies) == want
    assert raw.query("SELECT 'still here'") == [("still here",)]
    raw.terminate()


def test_flush_over_postgresql_limit_ends_the_client(d, pg, bystander):
    """
    PostgreSQL reads at most 10000 bytes of a Flush (PQ_SMALL_MESSAGE_LIMIT) and drops the
    connection at a longer one; pgdoorman ends the client there too (with a word), and the
    server is not sent to its death.
    """
    big = message(b"H", b"x" * 10001)
    direct = RawClient(pg.port).startup(USER, "db1", pg.passwords.get(USER, PW))
    direct.send(big)
    assert direct.closed_within(5)
    raw = RawClient(d.port).startup(USER, "db1", PW)
    raw.send(big)
    fields = raw.read_error_then_close(5)
    assert fields.get("C") == "08P01" and fields.get("M") == "invalid message length", fields
