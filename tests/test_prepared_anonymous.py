"""
Anonymous (unnamed) Parse caching in transaction mode, PgDoorman's
client_anonymous_prepared_cache_size (issue 15).

PostgreSQL plans the unnamed statement again at every Bind, and forgets it at the next unnamed
Parse.  pgdoorman sends each anonymous Parse as a named statement of its own (DOORMAN_<hash>),
shared by every client of the pool that parses the same text: a server that already holds it
is not sent the Parse at all, and its plan cache serves every client.  The client must see
exactly what PostgreSQL would have sent, errors included.
"""

import struct

import pytest

from conftest import same_replies_as_postgresql, RawClient, simple_config
from test_prepared_protocol import SYNC, bind, close, describe, execute, parse, query, replies

pytestmark = pytest.mark.timeout(90)


def scenario_unnamed(a, b):
    t = []
    a.send(parse("", "SELECT $1::int + 1 AS a") + bind("", ["1"]) + execute() + SYNC)
    t.append(replies(a))
    b.send(parse("", "SELECT $1::int + 1 AS a") + bind("", ["2"]) + execute() + SYNC)
    t.append(replies(b))                                  # the server holds it: no Parse
    b.send(parse("", "SELECT $1::text AS b") + describe(b"S", "") + SYNC)
    t.append(replies(b))
    a.send(bind("", ["10"]) + execute() + SYNC)           # a's unnamed, after a Sync
    t.append(replies(a))
    a.send(parse("", "SELECT 'replaced'") + bind("") + execute() + SYNC)
    t.append(replies(a))                                  # no 42P05 for the unnamed
    a.send(bind("", ["1"]) + execute() + SYNC)            # wrong number of parameters
    t.append(replies(a))
    a.send(parse("", "SELEC 1") + bind("") + execute() + SYNC)
    t.append(replies(a))                                  # syntax error, rest skipped
    a.send(bind("") + execute() + SYNC)                   # the failed Parse left none
    t.append(replies(a))
    b.send(bind("", ["still b"]) + execute() + SYNC)
    t.append(replies(b))
    b.send(close(b"S", "") + bind("", ["x"]) + execute() + SYNC)
    t.append(replies(b))                                  # closed: 26000
    a.send(parse("", "SELECT 1/$1::int") + bind("", ["0"]) + execute() + SYNC
           + bind("", ["1"]) + execute() + SYNC)
    t.append(replies(a, ready=2))                         # an Execute error, then fine
    a.send(query("BEGIN") + query("SELECT 1/0"))
    t.append(replies(a, ready=2))
    a.send(parse("", "SELECT 2") + bind("") + execute() + SYNC)
    t.append(replies(a))                                  # 25P02, as PostgreSQL
    a.send(query("ROLLBACK"))
    t.append(replies(a))
    # The unnamed statement and named ones of the same text are one server statement.
    a.send(parse("n1", "SELECT $1::int + 1 AS a") + parse("", "SELECT $1::int + 1 AS a")
           + bind("n1", ["5"]) + execute() + bind("", ["6"]) + execute() + SYNC)
    t.append(replies(a))
    return t


def scenario_unnamed_sql(a, b):
    """An unnamed statement whose text is SQL EXECUTE of the client's statement."""
    t = []
    a.send(query("PREPARE foo (int) AS SELECT $1 * 2 AS a"))
    t.append(replies(a))
    b.send(query("PREPARE foo (int) AS SELECT $1 * 3 AS b"))
    t.append(replies(b))
    a.send(parse("", "EXECUTE foo($1)", [23]) + bind("", ["21"]) + execute() + SYNC)
    t.append(replies(a))
    b.send(parse("", "EXECUTE foo($1)", [23]) + bind("", ["21"]) + execute() + SYNC)
    t.append(replies(b))
    a.send(parse("", "EXECUTE nosuch") + bind("") + execute() + SYNC)
    t.append(replies(a))
    return t


@pytest.mark.parametrize("scenario", [scenario_unnamed, scenario_unnamed_sql],
                         ids=lambda f: f.__name__[9:])
def test_same_replies_as_postgresql(pg, new_user, pgdoorman, scenario):
    same_replies_as_postgresql(pg, new_user, pgdoorman, scenario)


def test_pg8000_anonymous_statements_share_one_server_plan(pg, new_user, pgdoorman):
    """
    Three pg8000 clients run the same parameterised query (an unnamed Parse each time) on a
    pool of one server: the server holds it once, as a named statement whose plan cache
    served every execution, and most Parses never reached it.
    """
    import pg8000.native
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=1,
                                general={"client_anonymous_prepared_cache_size": 2}))
    cons = [pg8000.native.Connection(user, host="127.0.0.1", port=d.port, database="db1",
                                     password=password) for _ in range(3)]
    text = "SELECT CAST(:x AS int) + CAST(:c AS int) AS anon_total"
    for i in range(10):
        for cid, con in enumerate(cons):
            assert con.run(text, x=i, c=cid * 100) == [[i + cid * 100]]
            # Other texts in between: the client's LRU of 2 keeps the hot one.
            assert con.run("SELECT CAST(:s AS text) AS other%d" % (i % 3), s="s") == [["s"]]
    rows = cons[0].run("SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
                       "WHERE statement LIKE '%anon_total'")
    for con in cons:
        con.close()
    assert len(rows) == 1, rows
    name, plans = rows[0]
    assert name.startswith("DOORMAN_")
    assert plans == 30  # every execution, by every client, used the one statement
    stats = RawClient(d.port).startup("admin", "pgdoorman", "admin")
    out = stats.query("SHOW PREPARED_STATEMENTS")
    stats.terminate()
    assert out, "no pool in SHOW PREPARED_STATEMENTS"
    hits = int(out[0][3])
    assert hits >= 30, out  # Parses answered without the server parsing again


def test_unnamed_statement_stays_the_clients_across_servers(pg, new_user, pgdoorman):
    """pg8000's Parse; Sync; Bind; Sync on a pool of two busy servers: each client's own."""
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=2))
    clients = [RawClient(d.port).startup(user, "db1", password) for _ in range(6)]
    for rnd in range(5):
        for i, c in enumerate(clients):
            c.send(parse("", "SELECT %d * 1000 + $1::int" % i) + SYNC)
        for c in clients:
            assert [m[0] for m in replies(c)] == [b"1", b"Z"]
        for i, c in enumerate(reversed(clients)):
            c.send(bind("", [str(rnd)]) + execute() + SYNC)
        for i, c in enumerate(clients):
            rows = [m[1] for m in replies(c) if m[0] == b"D"]
            want = str(i * 1000 + rnd).encode()
            assert rows == [struct.pack("!Hi", 1, len(want)) + want]
    for c in clients:
        c.terminate()
