"""
pgdoorman.protocol.framing without sockets: the Scanner and the MessageBuffer fed bytes in
every chunking must frame exactly as a whole buffer does.

Every Scanner test runs against both scanners: the pure-Python reference (framing.PyScanner)
and the compiled one (protocol/_cframing.pyx); a random-stream test checks that the two call
their handler alike and give the same bytes.  The compiled one is skipped only where it was
not built, never where PGDOORMAN_REQUIRE_COMPILED=1 (make test, CI).
"""

import os
import platform
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, doorman_env

from pgdoorman.protocol import framing, messages as M
from pgdoorman.protocol.framing import STOP, WHOLE, FramingError, MessageBuffer, PyScanner

try:
    from pgdoorman.protocol import _cframing
except ImportError as e:
    _cframing = None
    _CFRAMING_ERROR = str(e)

REQUIRE_COMPILED = os.environ.get("PGDOORMAN_REQUIRE_COMPILED") == "1"
IMPLEMENTATIONS = ["python", "compiled"]


def implementation(name):
    if name == "python":
        return PyScanner
    if _cframing is None:
        if REQUIRE_COMPILED:
            pytest.fail("PGDOORMAN_REQUIRE_COMPILED=1 but the compiled scanner does not import "
                        "(%s): rebuild it with `make venv`" % _CFRAMING_ERROR)
        pytest.skip("the compiled scanner was not built (%s)" % _CFRAMING_ERROR)
    return _cframing.Scanner


@pytest.fixture(params=IMPLEMENTATIONS)
def Scanner(request):
    return implementation(request.param)

STREAM = (M.message(b"T", b"x" * 30) + M.message(b"D", b"y" * 3000) + M.message(b"Z", b"I")
          + M.message(b"D", b"z" * 10) + M.message(b"C", b"SELECT 1\x00") + M.message(b"Z", b"T"))


def chunks(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def feed_all(scanner, data, size):
    out = []
    for piece in chunks(data, size):
        got = scanner.feed(piece)
        if got:
            out.append(got)
    return b"".join(out)


@pytest.mark.parametrize("size", [1, 2, 4, 5, 6, 13, 100, 100000])
def test_scanner_passes_everything_through_and_sees_each_inspected_message_whole(Scanner, size):
    seen = []

    def handle(code, data, pos, end, n):
        if end > n:
            return WHOLE
        seen.append(data[pos:end])
        return None

    s = Scanner(handle, frozenset(b"Z"))
    assert feed_all(s, STREAM, size) == STREAM
    assert seen == [M.message(b"Z", b"I"), M.message(b"Z", b"T")]
    assert s.between_messages


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_scanner_streams_uninspected_bodies_without_holding_them(Scanner, size):
    """A DataRow larger than any read is passed on as it comes (never held whole)."""
    big = M.message(b"D", b"r" * 50000)
    s = Scanner(lambda *a: None, frozenset(b"Z"))
    held_max = 0
    out = []
    for piece in chunks(big + M.message(b"Z", b"I"), size):
        got = s.feed(piece)
        if got:
            out.append(got)
        held = s._held
        held_max = max(held_max, len(held) if held is not None else 0)
    assert b"".join(out) == big + M.message(b"Z", b"I")
    assert held_max < 5 + 2  # at most a split header (or the tiny Z), never the body


@pytest.mark.parametrize("size", [1, 5, 9, 64])
def test_scanner_replaces_and_drops_messages(Scanner, size):
    def handle(code, data, pos, end, n):
        if end > n:
            return WHOLE
        if code == ord("C"):
            return b""
        return M.message(b"Z", b"E")

    s = Scanner(handle, frozenset(b"CZ"))
    expected = (M.message(b"T", b"x" * 30) + M.message(b"D", b"y" * 3000) + M.message(b"Z", b"E")
                + M.message(b"D", b"z" * 10) + M.message(b"Z", b"E"))
    assert feed_all(s, STREAM, size) == expected


def test_scanner_stop_passes_nothing_from_that_message_on(Scanner):
    s = Scanner(lambda code, data, pos, end, n: STOP, frozenset(b"X"))
    data = M.query("SELECT 1") + M.TERMINATE_MESSAGE + M.query("SELECT 2")
    assert s.feed(data) == M.query("SELECT 1")
    assert s.stopped


def test_scanner_rejects_impossible_lengths(Scanner):
    s = Scanner(lambda *a: None, frozenset())
    with pytest.raises(FramingError):
        s.feed(b"Q\x00\x00\x00\x02")
    s = Scanner(lambda *a: None, frozenset())
    with pytest.raises(FramingError):
        s.feed(b"Q\x7f\xff\xff\xff")


def test_scanner_reassembles_a_large_held_message_once(Scanner):
    """A 2 MB message asked for WHOLE, in 4 KB reads: the handler sees it once, intact."""
    body = bytes(range(256)) * 8192
    msg = M.message(b"B", body)
    seen = []

    def handle(code, data, pos, end, n):
        if end > n:
            return WHOLE
        seen.append(data[pos:end])
        return None

    s = Scanner(handle, frozenset(b"B"))
    assert feed_all(s, msg, 4096) == msg
    assert seen == [msg]


@pytest.mark.parametrize("size", [1, 2, 5, 8, 1000])
def test_message_buffer_gives_whole_messages_in_order(size):
    data = M.message(b"p", b"secret\x00") + M.message(b"Q", b"SELECT 1\x00") + b"S\x00"
    buf = MessageBuffer()
    got = []
    for piece in chunks(data, size):
        got += buf.feed(piece)
    assert got == [(ord("p"), b"secret\x00"), (ord("Q"), b"SELECT 1\x00")]
    assert buf.take() == b"S\x00"
    assert len(buf) == 0


def test_message_buffer_limit_and_push_back():
    buf = MessageBuffer(limit=100)
    with pytest.raises(FramingError):
        buf.feed(b"p\x00\x01\x00\x00")  # announces 64 KB: refused before it arrives
    buf = MessageBuffer()
    msgs = buf.feed(M.query("a") + M.query("b"))
    buf.push_back(msgs[1:])
    assert buf.take() == M.query("b")


@pytest.mark.parametrize("switch_to", [frozenset(b"DZ"), {ord("D"), ord("Z")}, b"DZ"],
                         ids=["frozenset", "set", "bytes"])
def test_scanner_reads_inspect_again_after_each_handler_call(Scanner, switch_to):
    """server.py switches the set from inside its handler; any container of codes works."""
    seen = []
    s = None

    def handle(code, data, pos, end, n):
        seen.append(chr(code))
        if code == ord("Z"):
            s.inspect = switch_to
        return None

    s = Scanner(handle, frozenset(b"Z"))
    assert s.feed(STREAM) is STREAM
    assert seen == ["Z", "D", "Z"]
    assert s.inspect is switch_to


def test_scanner_accepts_any_bytes_like_and_hands_it_on_as_itself(Scanner):
    seen = []

    def handle(code, data, pos, end, n):
        seen.append((type(data), bytes(data[pos:end])))
        return b"" if code == ord("C") else None

    s = Scanner(handle, frozenset(b"CZ"))
    data = bytearray(STREAM)
    out = s.feed(data)
    assert type(out) is bytes and out == STREAM.replace(M.message(b"C", b"SELECT 1\x00"), b"")
    assert seen[0] == (bytearray, M.message(b"Z", b"I"))
    s = Scanner(lambda *a: None, frozenset(b"Z"))
    assert s.feed(data) is data


# -- the two scanners against each other ----------------------------------------------------

CODES = b"TDZCEQPBS1"
#: what the random handler does with a message of a code (a STOP ends the scan: rarer).
ACTIONS = ["pass", "whole", "replace", "drop", "switch"] * 3 + ["stop"]
#: the inspect sets a "switch" goes through: frozensets (the compiled table) and others (`in`).
SWITCHES = [frozenset(b"Z"), {ord("D"), ord("Z"), ord("C")}, b"TZQ", frozenset(range(256)),
            frozenset()]


def run(scanner_class, policy, inspect, pieces):
    """Feed C{pieces}; everything the handler saw and every answer and state after each feed."""
    trace = []
    scanner = None
    switches = [0]

    def handle(code, data, pos, end, n):
        trace.append(("call", code, type(data).__name__, bytes(data), pos, end, n))
        action = policy.get(code, "pass")
        if action == "whole":
            return WHOLE if end > n else None
        if action == "replace":
            return b"<%d:%d>" % (code, end - pos)
        if action == "drop":
            return b""
        if action == "stop":
            return STOP
        if action == "switch":
            scanner.inspect = SWITCHES[switches[0] % len(SWITCHES)]
            switches[0] += 1
        return None

    scanner = scanner_class(handle, inspect)
    for piece in pieces:
        try:
            out = scanner.feed(piece)
        except FramingError as e:
            trace.append(("error", str(e)))
            break
        trace.append(("out", type(out).__name__, None if out is None else bytes(out),
                      out is piece, scanner.between_messages, scanner.stopped,
                      None if scanner._held is None else bytes(scanner._held)))
    return trace


@st.composite
def streams(draw):
    messages = draw(st.lists(st.tuples(
        st.sampled_from(CODES),
        st.one_of(st.binary(max_size=30), st.integers(0, 3000).map(lambda k: b"r" * k))),
        min_size=4, max_size=40))
    data = b"".join(M.message(bytes((code,)), body) for code, body in messages)
    if draw(st.booleans()):
        data += draw(st.sampled_from([b"Q\x00\x00\x00\x03", b"D\x40\x00\x00\x00", b"Z\x00"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0] + cuts + [len(data)]
    kinds = draw(st.lists(st.sampled_from([bytes, bytes, bytes, bytearray]),
                          min_size=len(bounds), max_size=len(bounds)))
    pieces = [kind(data[a:b]) for a, b, kind in zip(bounds, bounds[1:], kinds)]
    actions = draw(st.lists(st.sampled_from(ACTIONS), min_size=len(CODES), max_size=len(CODES)))
    policy = dict(zip(CODES, actions))
    inspect = draw(st.sampled_from(SWITCHES[:1] + [frozenset(CODES), frozenset(b"DC"),
                                                   set(b"ZE"), b"Z1"]))
    return policy, inspect, pieces


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_compiled_scanner_behaves_as_the_reference_on_random_streams(case):
    """Random messages split at random points, a random handler: the same calls, same output."""
    compiled = implementation("compiled")
    policy, inspect, pieces = case
    expected = run(PyScanner, policy, inspect, pieces)
    assert run(compiled, policy, inspect, pieces) == expected


# -- which scanner runs ---------------------------------------------------------------------

def _scanner_in(env_extra):
    env = doorman_env()
    env.pop("PGDOORMAN_PURE_PYTHON", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", "from pgdoorman.protocol import framing; "
                          "print(framing.Scanner.__module__, framing.COMPILED)"],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return out.stdout.split()


def test_framing_uses_the_compiled_scanner_unless_told_not_to():
    """What framing.Scanner is: the compiled one where it imports on CPython, else the reference;
    PGDOORMAN_PURE_PYTHON=1 always gives the reference."""
    assert _scanner_in({"PGDOORMAN_PURE_PYTHON": "1"}) == ["pgdoorman.protocol.framing", "False"]
    if _cframing is not None and platform.python_implementation() == "CPython":
        assert _scanner_in({}) == ["pgdoorman.protocol._cframing", "True"]
    else:
        assert _scanner_in({}) == ["pgdoorman.protocol.framing", "False"]
    assert framing.COMPILED == (framing.Scanner is not PyScanner)


@pytest.mark.skipif(not REQUIRE_COMPILED, reason="PGDOORMAN_REQUIRE_COMPILED=1 not set")
def test_the_compiled_scanner_is_built_and_current():
    """In CI (make test) the compiled scanner must be built from the .pyx as it is now, and be
    what runs: a failed build or a stale .so must not pass as both tested."""
    assert _cframing is not None, "the compiled scanner does not import: %s" % _CFRAMING_ERROR
    if os.environ.get("PGDOORMAN_PURE_PYTHON", "") == "1":
        assert not framing.COMPILED and framing.Scanner is PyScanner
    else:
        assert framing.COMPILED and framing.Scanner is _cframing.Scanner
    pyx = os.path.join(os.path.dirname(framing.__file__), "_cframing.pyx")
    if os.path.exists(pyx):  # an editable install: the .so beside its source
        assert os.path.getmtime(_cframing.__file__) >= os.path.getmtime(pyx), \
            "%s is older than its .pyx: rebuild it (make venv)" % _cframing.__file__
