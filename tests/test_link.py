"""
pgdoorman.link without sockets: the reply accounting of one server, fed the replies
PostgreSQL sends for each sequence (as its docs, 55.2.3, and its behaviour say).
"""

from pgdoorman import link as L
from pgdoorman.link import Entry, Link
from pgdoorman.prepared import Statement, server_name
from pgdoorman.protocol import messages as M

ERR = M.error_response("ERROR", "22012", "division by zero")


def stmt(text):
    body = text.encode() + b"\x00\x00\x00"
    return Statement(server_name(body), body)


def test_error_in_a_pipeline_undoes_the_parses_it_skipped():
    link = Link(10, track=True)
    a, b = stmt("SELECT 1"), stmt("SELECT 2")
    names = {b"a": a, b"b": b}
    link.statements.add(a.name)
    link.statements.add(b.name)
    link.expect.extend([Entry(L.PARSED, names, b"a", a), Entry(L.PARSED, names, b"b", b),
                        L.SYNC_ENTRY])
    link.pending = 1
    assert link.complete() is None  # a's ParseComplete
    assert link.error(ERR, names) is None
    assert names == {b"a": a} and a.name in link.statements and b.name not in link.statements
    link.ready()
    assert link.settled()


def test_error_to_a_simple_query_skips_nothing():
    link = Link(10, track=True)
    s = stmt("SELECT 3")
    names = {b"s": s}
    link.expect.extend([L.QUERY_ENTRY, Entry(L.PARSED, names, b"s", s), L.SYNC_ENTRY])
    link.pending = 2
    link.error(ERR, names)
    link.ready()
    assert link.complete() is None  # the Parse after the failed Query still runs
    link.ready()
    assert names == {b"s": s} and link.settled()


def test_queries_after_a_failed_extended_message_are_skipped_until_sync():
    """Bind (fails), Execute, probe, Query, Query: no ReadyForQuery until the client's Sync."""
    link = Link(10, track=True)
    link.expect.extend([L.PROBE_ENTRY, L.QUERY_ENTRY, L.QUERY_ENTRY])
    link.pending = 2
    link.error(ERR, None)
    assert link.pending == 0 and not link.expect
    assert link.dirty and not link.settled()  # PostgreSQL still waits for a Sync
    link.dirty = False  # the client's Sync
    link.pending += 1
    link.expect.append(L.SYNC_ENTRY)
    link.ready()
    assert link.settled()


def test_a_probe_answered_means_the_query_runs():
    link = Link(10, track=True)
    link.expect.extend([L.PROBE_ENTRY, L.QUERY_ENTRY])
    link.pending = 1
    assert link.complete() == b""  # the probe's CloseComplete is swallowed
    assert link.error(ERR, None) is None  # the Query's own error
    assert link.pending == 1
    link.ready()
    assert link.settled()


def test_fake_errors_replace_the_servers():
    link = Link(10, track=True)
    mine = M.error_response("ERROR", "26000", 'prepared statement "x" does not exist')
    link.expect.extend([Entry(L.FAKE_ERROR, reply=mine), L.SYNC_ENTRY])
    link.pending = 1
    assert link.error(ERR, None) == mine
    link.ready()
    assert link.settled()
    link.expect.extend([Entry(L.QUERY_ERROR, reply=mine), L.QUERY_ENTRY])
    link.pending = 1
    failing = M.error_response("ERROR", "26000", 'prepared statement "DOORMAN_NONE" does not '
                               'exist')
    assert link.error(failing, None) == mine
    assert link.pending == 1  # a simple query's error: its ReadyForQuery still comes
    link.ready()
    assert link.settled()
    # An error PostgreSQL gives before it would look at the name (a failed transaction's
    # 25P02) is what the client gets.
    aborted = M.error_response("ERROR", "25P02", "current transaction is aborted, commands "
                               "ignored until end of transaction block")
    link.expect.extend([Entry(L.QUERY_ERROR, reply=mine), L.QUERY_ENTRY])
    link.pending = 1
    assert link.error(aborted, None) is None
    link.ready()
    assert link.settled()


def test_a_skipped_close_of_an_evicted_statement_leaves_it_recorded():
    link = Link(1, track=True)
    old, new = stmt("SELECT 4"), stmt("SELECT 5")
    link.statements.add(old.name)
    assert link.statements.add(new.name) == old.name  # evicted: a Close goes out
    link.expect.extend([Entry(L.CLOSED, name=old.name), L.SWALLOW_ENTRY,
                        Entry(L.INJECTED, stmt=new), L.SYNC_ENTRY])
    link.error(ERR, None)
    assert old.name in link.statements.names and new.name not in link.statements.names


def test_replies_nobody_asked_for_taint_the_link():
    link = Link(10, track=True)
    link.ready()
    assert link.tainted and not link.settled()
    link = Link(10, track=True)
    assert link.complete() is None
    assert link.tainted
    link = Link(10, track=True)
    link.expect.extend([L.SYNC_ENTRY])
    link.pending = 1
    link.complete()  # a ParseComplete where a ReadyForQuery is due
    assert link.tainted


def test_errors_speak_of_the_clients_names():
    link = Link(10, track=True)
    s = stmt("SELECT 6")
    link.expect.extend([L.SYNC_ENTRY])
    text = M.error_response("ERROR", "42P05", 'prepared statement "%s" already exists'
                            % s.name.decode())
    out = link.error(text, {b"mine": s})
    assert b"mine" in out and s.name not in out


def test_messages_sent_after_an_error_before_the_sync_are_skipped_quietly():
    """Bind/Execute fail (no entries queued), then the client's Close+Parse and Sync."""
    link = Link(10, track=True)
    s = stmt("SELECT 7")
    names = {b"s": s}
    assert link.error(ERR, names) is None
    assert link.skipping and link.dirty
    link.statements.add(s.name)
    link.expect.extend([L.SWALLOW_ENTRY, Entry(L.PARSED, names, b"s", s), L.SYNC_ENTRY])
    link.pending = 1
    link.dirty = False
    link.ready()  # PostgreSQL skipped the Close and Parse: only the Sync is answered
    assert link.tainted is None and link.settled()
    assert names == {} and s.name not in link.statements


def test_error_text_speaks_of_a_failed_parse_by_the_clients_name():
    link = Link(10, track=True)
    s = stmt("SELECT nope")
    names = {b"mine": s}
    link.expect.extend([L.SWALLOW_ENTRY, Entry(L.PARSED, names, b"mine", s), L.SYNC_ENTRY])
    text = M.error_response("ERROR", "42703", 'column "nope" in "%s"' % s.name.decode())
    out = link.error(text, names)
    assert b"mine" in out and s.name not in out and names == {}
