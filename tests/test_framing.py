"""
pgdoorman.protocol.framing without sockets: the Scanner and the MessageBuffer fed bytes in
every chunking must frame exactly as a whole buffer does.
"""

import pytest

from pgdoorman.protocol import messages as M
from pgdoorman.protocol.framing import (STOP, WHOLE, FramingError, MessageBuffer, Scanner)

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
def test_scanner_passes_everything_through_and_sees_each_inspected_message_whole(size):
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
def test_scanner_streams_uninspected_bodies_without_holding_them(size):
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
def test_scanner_replaces_and_drops_messages(size):
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


def test_scanner_stop_passes_nothing_from_that_message_on():
    s = Scanner(lambda code, data, pos, end, n: STOP, frozenset(b"X"))
    data = M.query("SELECT 1") + M.TERMINATE_MESSAGE + M.query("SELECT 2")
    assert s.feed(data) == M.query("SELECT 1")
    assert s.stopped


def test_scanner_rejects_impossible_lengths():
    s = Scanner(lambda *a: None, frozenset())
    with pytest.raises(FramingError):
        s.feed(b"Q\x00\x00\x00\x02")
    s = Scanner(lambda *a: None, frozenset())
    with pytest.raises(FramingError):
        s.feed(b"Q\x7f\xff\xff\xff")


def test_scanner_reassembles_a_large_held_message_once():
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
