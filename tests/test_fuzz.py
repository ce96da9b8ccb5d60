"""
Fuzzing the running process (hypothesis, bounded in time): random and mutated startup, auth
and query traffic, each case on its own connection; after every case a well-behaved client
must still log in and get the right answer, and pgdoorman must still be up.
"""

import socket
import struct

import pytest

from conftest import RawClient, md5_secret, message, simple_config, startup_packet

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
CANCEL = struct.pack("!II", 16, 80877102)


@pytest.fixture(scope="module")
def target(pg, module_pgdoorman):
    name, password = pg.new_user("md5")
    d = module_pgdoorman(simple_config(pg, name, md5_secret(name, password),
                                       server_password=password,
                                       general={"client_login_timeout": "3s"}))
    d.user, d.password = name, password
    return d


def _mutate(data: bytes, flips):
    b = bytearray(data)
    for pos, value in flips:
        if b:
            b[pos % len(b)] = value
    return bytes(b)


def startups(user):
    params = st.dictionaries(st.sampled_from(["user", "database", "options", "application_name",
                                              "_pq_.x", "replication", "DateStyle", "\x00"]),
                             st.text(max_size=30), max_size=5)
    versions = st.sampled_from([196608, 196609, 131072, 80877103, 80877104, 80877102, 0,
                                0x7FFFFFFF])

    def build(p, v):
        if any("\x00" in k + x for k, x in p.items()):
            return b"\x00\x00"
        return startup_packet(p if "user" in p else dict(p, user=user), v)
    return st.builds(build, params, versions)


def cases(user):
    frontend = st.builds(lambda code, payload: message(code, payload),
                         st.sampled_from([b"p", b"Q", b"P", b"B", b"E", b"S", b"X", b"d", b"H",
                                          b"F", b"C", b"D", b"c", b"f", b"\x00", b"Z"]),
                         st.binary(max_size=200))
    raw_len = st.builds(lambda c, n, tail: c + struct.pack("!I", n) + tail,
                        st.sampled_from([b"Q", b"p", b"P"]),
                        st.sampled_from([0, 1, 3, 4, 5, 0x3FFFFFFF, 0x40000000, 0xFFFFFFFF]),
                        st.binary(max_size=50))
    return st.tuples(
        st.sampled_from(["pre", "auth", "logged_in"]),
        st.lists(st.one_of(startups(user), frontend, raw_len, st.binary(max_size=300),
                           st.sampled_from([SSL_REQUEST, GSSENC_REQUEST, CANCEL + b"\x00" * 8])),
                 min_size=1, max_size=4),
        st.lists(st.tuples(st.integers(0, 10000), st.integers(0, 255)), max_size=3))


def _send_case(d, stage, chunks, flips):
    if stage == "logged_in":
        c = RawClient(d.port, timeout=3)
        c.startup(d.user, "db1", d.password)
        sock = c.sock
    else:
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=3)
        if stage == "auth":
            sock.sendall(startup_packet({"user": d.user, "database": "db1"}))
    data = _mutate(b"".join(chunks), flips)
    try:
        sock.sendall(data)
        sock.settimeout(0.3)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


@pytest.mark.timeout(240)
def test_fuzz_startup_auth_and_queries(target):
    d = target

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(d.user))
    def run(case):
        stage, chunks, flips = case
        _send_case(d, stage, chunks, flips)
        assert d.alive(), "pgdoorman died:\n" + d.log()[-3000:]
        good = RawClient(d.port, timeout=10).startup(d.user, "db1", d.password)
        assert good.query("SELECT 40 + 2") == [("42",)]
        good.terminate()

    run()


def test_fuzz_left_no_unhandled_errors(target):
    log = target.log()
    assert "Unhandled" not in log and "Traceback" not in log, log[-5000:]
