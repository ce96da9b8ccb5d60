"""
Issue 13, one case per failure tests/test_hostile.py found: a fixed hostile byte sequence on
one connection, then a well-behaved client (the canary) on the same pool, asserting what the
canary sees.  pool_size 1, so that the hostile client's server is the canary's next one.

The canary is a raw client with fixed bytes, the way psycopg (prepare_threshold=0) talks: it
Parses "_pg3_0" once, then Binds and Executes it, Sync after each; it must always get its
row, never an error, and within a few seconds.
"""

import struct
import time

import pytest

from conftest import (ConnectionClosed, RawClient, ServerError, md5_secret, parse_fields,
                      simple_config)
from hostile import SYNC, bind, execute, parse, query
from pgdoorman.protocol.messages import message

pytestmark = pytest.mark.timeout(60)

DB = "db1"
CANARY_SQL = "SELECT $1::int8 + 1"
CANARY_TYPES = [20]


@pytest.fixture
def d(pg, pgdoorman):
    user, password = pg.new_user("md5")
    d = pgdoorman(simple_config(pg, user, md5_secret(user, password), db=DB, pool_size=1,
                                server_password=password,
                                general={"query_wait_timeout": "5s"}))
    d.user, d.password = user, password
    return d


def login(d, timeout=5.0):
    return RawClient(d.port, timeout=timeout).startup(d.user, getattr(d, "db", DB), d.password)


def replies(c):
    """Read up to ReadyForQuery: (list of message kinds, list of error fields, data rows)."""
    kinds, errors, rows = [], [], []
    while True:
        kind, payload = c.recv_msg()
        kinds.append(kind)
        if kind == b"E":
            errors.append(parse_fields(payload))
        elif kind == b"D":
            (n,) = struct.unpack("!H", payload[:2])
            (ln,) = struct.unpack("!i", payload[2:6])
            rows.append(payload[6:6 + ln].decode() if n and ln >= 0 else None)
        elif kind == b"Z":
            return kinds, errors, rows


def describe_errors(errors):
    return ["%s %s" % (e.get("C"), e.get("M")) for e in errors]


class Canary:
    """
    A well-behaved named-statement client: Parses its statements once ("_pg3_0", ...), then
    Binds and Executes them, a Sync after each.  C{statements}: (query, parameter types,
    parameter, expected first column) for each.
    """

    def __init__(self, d, statements=((CANARY_SQL, CANARY_TYPES, "41", "42"),)):
        self.c = login(d)
        self.statements = statements
        out = b""
        for i, (sql, types, _, _) in enumerate(statements):
            out += parse("_pg3_%d" % i, sql, types)
        self.c.send(out + SYNC)
        kinds, errors, rows = replies(self.c)
        assert not errors, (kinds, describe_errors(errors))
        self.round()

    def round(self):
        """Bind/Execute/Sync of each statement: the canary expects its row and nothing else."""
        started = time.monotonic()
        for i, (_, _, param, want) in enumerate(self.statements):
            self.c.send(bind("_pg3_%d" % i, [param]) + execute() + SYNC)
            kinds, errors, rows = replies(self.c)
            assert not errors, "canary got %s" % describe_errors(errors)
            assert want is None or rows == [want], (kinds, rows)
        return time.monotonic() - started

    def close(self):
        self.c.terminate()


def hostile(d, data, read=True):
    """Log in, send C{data}, read the replies (up to the last ReadyForQuery) and leave."""
    h = login(d)
    h.send(data)
    if read:
        h.sock.settimeout(2)
        try:
            while True:
                h.recv_msg()
        except (OSError, ConnectionClosed):
            pass
    h.terminate()
    return h


def test_discard_all_that_fails_inside_a_transaction(d):
    """
    DISCARD ALL cannot run inside a transaction block: PostgreSQL refuses it (25001) and
    keeps every prepared statement.  The pooler must not forget the server's statements
    then, or it Parses them again for the next client: 42P05 "already exists".
    """
    canary = Canary(d)
    hostile(d, query("BEGIN") + query("DISCARD ALL") + query("ROLLBACK"))
    canary.round()


def test_deallocate_that_fails_in_an_aborted_transaction(d):
    """
    DEALLOCATE of a statement in an aborted transaction fails (25P02): the statement stays
    on the server.  Here the hostile client prepared the same text as the canary, so both
    share its server-side copy.
    """
    canary = Canary(d)
    hostile(d, parse("h", CANARY_SQL, CANARY_TYPES) + SYNC + query("BEGIN")
            + query("SELECT 1/0") + query("DEALLOCATE h") + query("ROLLBACK"))
    canary.round()


@pytest.mark.parametrize("sql", ["SELECT 1; DEALLOCATE ALL", "DEALLOCATE ALL; SELECT 1",
                                 "/* x */ DEALLOCATE ALL", "DISCARD ALL; SELECT 1"])
def test_deallocate_all_hidden_in_a_simple_query(d, sql):
    """
    DEALLOCATE ALL / DISCARD ALL among other statements of one Query (or after a comment)
    drops the server's statements just the same; the pooler must notice (or prevent it),
    or the next client's Bind finds nothing: 26000 "does not exist".  ("DISCARD ALL; SELECT
    1" passes today: PostgreSQL refuses DISCARD ALL in a multi-statement Query, so a fix
    that forgets the statements for any query mentioning it would break it.)
    """
    canary = Canary(d)
    hostile(d, query(sql))
    canary.round()


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_deallocate_all_through_the_extended_protocol(d, sql):
    """The same sent as Parse/Bind/Execute/Sync of the unnamed statement."""
    canary = Canary(d)
    hostile(d, parse("", sql) + bind("") + execute() + SYNC)
    canary.round()


def test_query_skipped_in_the_error_state_does_not_keep_the_server(d):
    """
    After an error in the extended protocol PostgreSQL skips everything up to Sync,
    Query messages included: no ReadyForQuery for them.  A client that did this and then
    idles must not keep the pool's only server: the canary must get it.
    """
    canary = Canary(d)
    h = login(d)
    h.send(parse("", "SELEC 1") + query("SELECT 1") + SYNC)
    kinds, errors, _ = replies(h)
    assert [e["C"] for e in errors] == ["42601"], kinds
    # The hostile client stays connected, idle, outside any transaction.
    took = canary.round()
    assert took < 3, "the canary waited %.1fs for the server" % took
    h.terminate()


@pytest.mark.parametrize("partial", [
    b"d" + struct.pack("!I", 104) + b"0123456789",    # a CopyData cut short
    b"H" + struct.pack("!I", 104) + b"0123456789",    # a Flush with a lying length
    b"c" + struct.pack("!I", 104),                     # a CopyDone with a lying length
], ids=["copydata", "flush", "copydone"])
def test_half_message_after_sync_is_not_left_in_a_released_server(d, partial):
    """
    A Sync, then the start of a message that PostgreSQL reads as incomplete: the Sync's
    ReadyForQuery ends the transaction and the pooler gives the server back, though the
    server is still reading the rest of that message.  The next client's bytes would
    complete it: the canary's Bind/Execute/Sync disappear into it and the canary hangs
    (or, with other bytes, PostgreSQL reads the canary's messages shifted).
    """
    canary = Canary(d)
    h = login(d)
    h.send(query("SELECT 1") + SYNC + partial)
    time.sleep(0.5)
    h.close()  # the process dies without sending the rest
    time.sleep(0.2)
    canary.round()


@pytest.mark.parametrize("before", [b"", query("SELECT 1")], ids=["alone", "after_query"])
def test_flush_with_a_body_leaves_no_error_state_behind(d, before):
    """
    A Flush with bytes in it: PostgreSQL answers "invalid message format" (08P01, an ERROR)
    and, as for any error in the extended protocol, skips every message up to the next
    Sync.  The pooler counts a Flush as nothing to wait for; it must not hand that server
    to the canary still skipping (the canary's Bind/Execute would be skipped, its Sync
    answered alone), nor pass it the error.
    """
    canary = Canary(d)
    hostile(d, before + message(b"H", b"junk"))
    canary.round()


BOGUS = message(b"\x01", b"junk")                       # no such frontend message
BAD_LENGTH = b"B" + struct.pack("!I", 2)                 # a length below 4
BAD_BIND = message(b"B", b"no-nul")                      # a Bind without its portal's NUL


@pytest.mark.parametrize("bad", [BOGUS, BAD_LENGTH], ids=["unknown_type", "bad_length"])
def test_unnamed_parse_before_a_fatal_message_leaves_no_expectation(d, bad):
    """
    An unnamed Parse and then, in the same write, a message that ends the client (08P01).
    The pooler drops the Parse with the client, so PostgreSQL never answers it; nothing may
    stay expected of it on the server, or the canary's next ParseComplete is taken for that
    answer, the canary's own Parse for one PostgreSQL skipped, and its statement forgotten:
    the canary's next Bind then reaches PostgreSQL unrenamed (26000 "_pg3_0 does not exist").
    """
    hostile(d, parse("", "SELECT 1") + bad)
    canary = Canary(d)
    canary.round()


@pytest.mark.parametrize("bad", [BOGUS, BAD_LENGTH, BAD_BIND],
                         ids=["unknown_type", "bad_length", "bad_bind"])
def test_named_parse_before_a_fatal_message_is_not_taken_as_done(d, bad):
    """
    The same with a named Parse of the canary's own query: the pooler must not believe the
    server holds that statement, or it skips the canary's Parse (26000 "does not exist" at
    the canary's Bind).
    """
    hostile(d, parse("h", CANARY_SQL, CANARY_TYPES) + bad)
    canary = Canary(d)
    canary.round()


def test_copy_through_the_extended_protocol_does_not_keep_the_server(d, pg):
    """
    COPY FROM STDIN by Parse/Bind/Execute/Sync, as libpq sends it for PQexecParams (psycopg's
    copy() with parameters): PostgreSQL ignores the Sync that arrives during copy-in and
    answers the one after CopyDone, so two Syncs get one ReadyForQuery.  Counted as two,
    the server never looks idle again: an idle client keeps the pool's only server.
    """
    pg.psql("CREATE TABLE IF NOT EXISTS hostile_copy (v int); "
            'GRANT ALL ON hostile_copy TO "%s"' % d.user, db=DB)
    canary = Canary(d)
    h = login(d)
    h.send(parse("", "COPY hostile_copy (v) FROM STDIN") + bind("") + execute() + SYNC)
    kinds = [h.recv_msg()[0] for _ in range(3)]
    assert kinds == [b"1", b"2", b"G"], kinds  # ParseComplete, BindComplete, CopyInResponse
    h.send(message(b"d", b"1\n") + message(b"c") + SYNC)
    kinds, errors, _ = replies(h)
    assert not errors and kinds[-2:] == [b"C", b"Z"], (kinds, describe_errors(errors))
    assert h.query("SELECT 40 + 2") == [("42",)]
    took = canary.round()
    assert took < 3, "the canary waited %.1fs for the server" % took
    h.terminate()


# -- found by reading the relay while diagnosing the above: one client, PostgreSQL's answers --

def test_close_skipped_after_an_error_keeps_the_statement(d):
    """
    A Close of a statement after an error in the same pipeline is skipped by PostgreSQL:
    the statement still exists after the Sync, and Binding it works.  The pooler forgets
    the client's name when it sends the Close, so the Bind goes out unrenamed (26000).
    """
    c = login(d)
    c.send(parse("a", CANARY_SQL, CANARY_TYPES) + SYNC)
    assert not replies(c)[1]
    c.send(parse("", "SELEC 1") + message(b"C", b"Sa\x00") + SYNC)
    assert [e["C"] for e in replies(c)[1]] == ["42601"]
    c.send(bind("a", ["1"]) + execute() + SYNC)
    kinds, errors, rows = replies(c)
    assert not errors, describe_errors(errors)
    assert rows == ["2"]


def test_parse_in_an_aborted_transaction_fails_like_postgresql(d):
    """
    In an aborted transaction PostgreSQL refuses a Parse (25P02), so the name stays free:
    after ROLLBACK the same Parse succeeds.  When the server already holds that text the
    pooler sends a Close of nothing instead, which PostgreSQL accepts even there: the client
    is told ParseComplete, keeps the name, and its Parse after ROLLBACK is answered 42P05
    "already exists".
    """
    c = login(d)
    c.send(parse("a", CANARY_SQL, CANARY_TYPES) + SYNC)
    assert not replies(c)[1]
    assert c.query("BEGIN") == []
    with pytest.raises(ServerError):
        c.query("SELECT 1/0")
    c.send(parse("b", CANARY_SQL, CANARY_TYPES) + SYNC)
    assert [e["C"] for e in replies(c)[1]] == ["25P02"]
    c.query("ROLLBACK")
    c.send(parse("b", CANARY_SQL, CANARY_TYPES) + bind("b", ["2"]) + execute() + SYNC)
    kinds, errors, rows = replies(c)
    assert not errors, describe_errors(errors)
    assert rows == ["3"]


@pytest.mark.timeout(90)
def test_cancel_that_arrives_as_the_query_ends_spares_the_next_client(d):
    """
    A client cancels its own query just as it finishes.  The pooler forwards the cancel
    (over a new connection to PostgreSQL) while the client still holds the server, the
    query's ReadyForQuery arrives, the server goes to the canary waiting for it, and the
    cancel lands on the canary's query: 57014 "canceling statement due to user request"
    for a client that never asked.  (PgBouncer keeps such a server out of the pool until
    the cancel has been delivered.)  A race, so tried at many offsets around the end of
    the query; on the current code it hits within a few tries.
    """
    from conftest import Background, send_cancel
    canary_c = login(d, timeout=10)
    for attempt in range(40):
        h = login(d)
        h.send(query("SELECT pg_sleep(0.2)"))
        # The canary's query waits for the pool's only server meanwhile.
        time.sleep(0.05)
        canary_c.send(query("SELECT pg_sleep(0.3), 'canary'"))
        time.sleep(0.15 - 0.001 * (attempt % 10) + 0.0005 * (attempt // 10))
        Background(send_cancel, d.port, *h.backend_key)
        kinds, errors, rows = replies(canary_c)
        assert not errors, "attempt %d: canary got %s" % (attempt, describe_errors(errors))
        h.terminate()


@pytest.mark.parametrize("use", ["bind", "describe"])
def test_names_a_client_never_parsed_do_not_reach_another_clients_statement(d, use):
    """
    SQL PREPARE goes to the server as is and stays there after its client leaves.  A Bind
    (or Describe) of a name this client never Parsed also goes as is, so it finds that
    other client's statement: the canary runs the hostile client's query (or is told its
    columns) where PostgreSQL would answer 26000 "does not exist".
    """
    hostile(d, query("PREPARE evil AS SELECT 'from the hostile client' AS stolen"))
    c = login(d)
    if use == "bind":
        c.send(bind("evil") + execute() + SYNC)
    else:
        c.send(message(b"D", b"Sevil\x00") + SYNC)
    kinds, errors, rows = replies(c)
    assert [e["C"] for e in errors] == ["26000"], (kinds, rows, describe_errors(errors))


@pytest.mark.parametrize("first", ["other_datestyle", "deferred_begin"])
@pytest.mark.parametrize("bad", [BOGUS, b"Q" + struct.pack("!I", 0xFFFFFFFF)],
                         ids=["unknown_type", "huge_length"])
def test_fatal_first_message_leaves_no_internal_query_behind(d, first, bad):
    """
    A client whose parameters differ from the server's (another DateStyle), or who
    sent a lone BEGIN (answered without a server), gets a server with a query of the
    pooler's own put in front of its messages (SET ..., or the deferred BEGIN).  When the
    first message is fatal, that query is never sent, yet its replies are still awaited:
    the server goes back to the pool, and the canary's replies are swallowed as the
    pooler's own; the canary hangs.
    """
    canary = Canary(d)
    if first == "other_datestyle":
        h = RawClient(d.port, timeout=5).startup(d.user, DB, d.password,
                                                  DateStyle="SQL, DMY")
        canary.round()  # the server is back to the canary's DateStyle
    else:
        h = login(d)
        assert h.query("BEGIN") == []
    h.send(bad)
    try:
        h.read_error_then_close()
    except (OSError, ConnectionClosed):
        pass
    h.close()
    took = canary.round()
    assert took < 3, "the canary waited %.1fs" % took


def test_copy_abandoned_after_its_sync_does_not_hand_a_copying_server_on(d, pg):
    """
    COPY FROM STDIN by Parse/Bind/Execute/Sync, then the client leaves in the middle of its
    data.  PostgreSQL ignored the Sync (copy-in), so nothing is owed by the count, yet the
    server is still reading COPY data: it must not go to the canary, whose Bind would be
    "unexpected message type 0x42 during COPY from stdin".
    """
    pg.psql("CREATE TABLE IF NOT EXISTS hostile_copy (v int); "
            'GRANT ALL ON hostile_copy TO "%s"' % d.user, db=DB)
    h = login(d)
    h.send(parse("", "COPY hostile_copy (v) FROM STDIN") + bind("") + execute() + SYNC)
    kinds = [h.recv_msg()[0] for _ in range(3)]
    assert kinds == [b"1", b"2", b"G"], kinds
    h.send(message(b"d", b"1\n"))
    h.close()
    time.sleep(0.3)
    canary = Canary(d)
    canary.round()


def test_copy_done_without_its_sync_is_not_committed_by_the_next_client(d, pg):
    """
    COPY FROM STDIN by Parse/Bind/Execute/Sync ends with CopyDone: PostgreSQL answers
    CommandComplete and then waits for a Sync (the first one was ignored during copy-in), the
    implicit transaction still open.  A client that leaves then has committed nothing; if its
    server went to the next client as it was, that client's first query would commit the rows.
    """
    pg.psql("CREATE TABLE IF NOT EXISTS hostile_copy (v int); "
            'GRANT ALL ON hostile_copy TO "%s"' % d.user, db=DB)
    h = login(d)
    h.send(parse("", "COPY hostile_copy (v) FROM STDIN") + bind("") + execute() + SYNC)
    kinds = [h.recv_msg()[0] for _ in range(3)]
    assert kinds == [b"1", b"2", b"G"], kinds
    h.send(message(b"d", b"424242\n") + message(b"c") + message(b"H"))  # + Flush
    assert h.recv_msg()[0] == b"C"  # COPY 1, and no ReadyForQuery: a Sync is owed
    h.close()
    time.sleep(0.3)
    canary = Canary(d)
    for _ in range(3):
        canary.round()
    assert pg.psql("SELECT count(*) FROM hostile_copy WHERE v = 424242", db=DB).strip() == "0"
